#!/usr/bin/env python3
"""Writes the seed inputs in this folder: one valid frame of each kind
(frame_decode), and short conversations of a hostile broker with a client
(client_delivery; the layout is described in ../src/delivery.rs). The
router target starts from nothing: `arbitrary` inputs need no seeds.

Run from anywhere: python3 fuzz/seeds/make_seeds.py
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def s(text):
    b = text.encode()
    return varint(len(b)) + b


def frame(kind, body, payload=b""):
    return struct.pack("<HBBI", 0x4253, 6, kind, len(body)) + body + payload


V = varint
LIMITS = V(73728) + V(65536) + V(1 << 22) + V(8192) + V(4096) + V(64) + V(32)
SENDER = V(1) + V(1000) + V(1000) + V(42)
CLIENT_INFO = (V(7) + s("app") + V(42) + V(1000) + V(1000) + s("app") + V(2) + s("a.b") + s("c.>")
               + V(2) + V(0) + V(0) + V(1) + V(2) + V(0) + V(5))
STATS = s("0.1.0") + s("@shmbus") + b"".join(V(i) for i in range(25))
CHANNEL_INFO = V(3) + s("cam.0") + V(7) + V(1) + V(4096) + V(8) + V(0) + V(10) + V(0)

FRAMES = {
    "hello": frame(1, V(2) + s("app")),
    "subscribe": frame(2, V(1) + s("a.*.>") + V(0)),
    "unsubscribe": frame(3, V(1)),
    "publish_inline": frame(4, s("a.b") + b"\x01" + s("nats:host1") + V(0), b"hi"),
    "publish_memfd": frame(4, s("a.b") + b"\x00" + V(1) + V(5)),
    "ping": frame(5, V(7)),
    "query": frame(6, V(1) + V(1) + b"\x01" + s("a")),
    "channel_open": frame(7, V(1) + s("cam.0") + V(0) + V(64) + V(4) + V(1)),
    "channel_close": frame(8, V(3) + V(0)),
    "fd_ack": frame(9, V(3)),
    "welcome": frame(64, V(1) + LIMITS),
    "goodbye": frame(65, V(4) + s("bye")),
    "deliver_inline": frame(66, V(1) + s("a.b") + SENDER + V(9) + b"\x01" + s("nats:host1") + V(0), b"xy"),
    "deliver_memfd": frame(66, V(1) + s("a.b") + SENDER + V(9) + b"\x00" + V(1) + V(5)),
    "gap": frame(67, V(1) + V(5)),
    "subscribed": frame(68, V(1)),
    "pong": frame(69, V(1)),
    "query_item_client": frame(70, V(1) + V(0) + CLIENT_INFO),
    "query_item_topic": frame(70, V(1) + V(1) + s("a.>") + V(2)),
    "query_item_stats": frame(70, V(1) + V(2) + STATS),
    "query_item_channel": frame(70, V(1) + V(3) + CHANNEL_INFO),
    "query_item_name": frame(70, V(1) + V(4) + s("svc.a") + V(1) + V(7) + V(1) + V(8) + b"\x00\x01" + V(1) + V(1)),
    "query_end": frame(71, V(1) + b"\x01" + s("a")),
    "op_error": frame(72, V(0) + V(1) + V(0) + s("no")),
    "channel_granted": frame(73, V(1) + V(2) + V(0) + V(64) + V(4) + V(1)),
    "channel_reader": frame(74, V(1) + V(1) + b"\x01" + V(3)),
    "name_request": frame(10, V(1) + s("svc.a") + b"\x00\x01\x00\x00"),
    "name_release": frame(11, V(1) + s("svc.a")),
    "get_name_owner": frame(12, V(1) + s("svc.a")),
    "request": frame(13, V(1) + s("svc.a") + V(1000) + b"\x00" + b"\x00" + V(0), b"q"),
    "reply": frame(14, V(1) + V(0) + V(0), b"r"),
    "reply_error": frame(14, V(1) + V(1) + V(5) + s("bad") + V(1) + V(3)),
    "name_reply": frame(75, V(1) + V(0)),
    "name_owner": frame(76, V(1) + b"\x01" + V(7) + V(1)),
    "serve": frame(77, V(1) + s("svc.a") + SENDER + V(1000) + b"\x00" + b"\x01" + s("nats:h") + V(0), b"q"),
    "answer": frame(78, V(1) + V(1) + V(5) + s("bad") + b"\x01" + SENDER + V(0), b"r"),
    "answer_timeout": frame(78, V(1) + V(4) + b"\x00" + V(0)),
    # Not a frame: the payload of a delivery on $SYS.name.<name>.
    "name_owner_changed": s("svc.a") + b"\x00" + b"\x01" + V(7),
}


def write(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


for name, data in FRAMES.items():
    write("frame_decode", name, data)

# client_delivery: config, then packets (tag, fds, packet).
U16 = lambda n: struct.pack("<H", n)
U64 = lambda n: struct.pack("<Q", n)


def raw(packet, fds=()):
    tag = 0 | (len(fds) << 2)
    return bytes([tag]) + b"".join(bytes([k]) + U16(n) for k, n in fds) + U16(len(packet)) + packet


def deliver(sub, how, fds=(), inline=b"", memfd_len=0, topic=0, drain=False):
    tag = 2 | (len(fds) << 2) | (0x80 if drain else 0)
    out = bytes([tag]) + b"".join(bytes([k]) + U16(n) for k, n in fds)
    out += bytes([sub, topic, 1, 2, 3, 4]) + U64(1) + bytes([how])
    if how == 0:
        out += bytes([len(inline)]) + inline
    elif how == 2:
        out += U64(memfd_len)
    return out


def gap(sub, missed):
    return bytes([3, sub]) + U64(missed)


BROKER = {k: v for k, v in FRAMES.items() if v[:2] == b"SB" and v[3] >= 64}
for name, data in BROKER.items():
    write("client_delivery", "raw_" + name, b"\x00" + raw(data))
write("client_delivery", "inline", b"\x07" + deliver(1, 0, inline=b"hello") + deliver(2, 0, inline=b"x"))
write("client_delivery", "memfd", b"\x07" + deliver(1, 1, fds=[(0, 100)]))
write("client_delivery", "memfd_wrong_len", b"\x07" + deliver(1, 2, fds=[(0, 100)], memfd_len=99))
write("client_delivery", "memfd_unsealed", b"\x07" + deliver(1, 1, fds=[(1, 100)]))
write("client_delivery", "memfd_readonly", b"\x07" + deliver(1, 1, fds=[(4, 100)]))
write("client_delivery", "memfd_one_seal_short", b"\x07" + deliver(1, 1, fds=[(6, 100)]))
write("client_delivery", "memfd_pipe", b"\x07" + deliver(1, 1, fds=[(2, 0)]))
write("client_delivery", "memfd_tmpfs", b"\x07" + deliver(1, 1, fds=[(8, 0)]))
write("client_delivery", "two_fds", b"\x07" + deliver(1, 1, fds=[(0, 10), (0, 10)]))
write("client_delivery", "ctrunc", b"\x07" + deliver(1, 1, fds=[(0, 1)] * 5))
write("client_delivery", "overflow_gap",
      b"\x00" + deliver(1, 0, inline=b"a") + deliver(1, 0, inline=b"b") + gap(1, 3)
      + deliver(1, 0, inline=b"c", drain=True))
write("client_delivery", "byte_bound", b"\x43" + deliver(1, 0, inline=b"x" * 200) * 4)
write("client_delivery", "fd_bound", b"\x48" + deliver(1, 1, fds=[(0, 10)]) * 3 + deliver(2, 1, fds=[(0, 10)]))
write("client_delivery", "grant",
      b"\x07" + raw(BROKER["channel_granted"], fds=[(0, 4096), (0, 4096), (1, 4096)]))
write("client_delivery", "reader", b"\x07" + raw(BROKER["channel_reader"], fds=[(0, 4096)]))
write("client_delivery", "unexpected_fd", b"\x07" + raw(BROKER["pong"], fds=[(0, 1)]))
write("client_delivery", "goodbye_then_deliver", b"\x07" + raw(BROKER["goodbye"]) + deliver(1, 0, inline=b"late"))
write("client_delivery", "empty_packet", b"\x07" + deliver(1, 0, inline=b"a") + raw(b""))
