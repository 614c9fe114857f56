#!/usr/bin/env python3
"""Writes the seeds of the ring_reader target into ring_reader/ (the input
layout is described in ../src/ring.rs): honest publish and read, laps,
loans given up, reads interleaved with a lapping or scribbling publisher,
forged heads, sequence words and lengths, a geometry the broker announces
wrongly, hand-made memfds the reader must refuse, edge geometries.

It also writes the hand-made cases in ../regressions/ring_reader/.

Run from anywhere: python3 fuzz/seeds/make_ring_reader_seeds.py
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "ring_reader")

# mode bits
HAND, ANNOUNCE, BLOCK, START = 1, 2, 4, 8


def small(size, count):
    """A small geometry: slot size 1 + a, count 2 + b % 31."""
    return bytes([0, size - 1, count - 2])


def edge(size_i, count_i):
    return bytes([2, size_i, count_i])


def any_geometry(size, count):
    return bytes([3]) + struct.pack("<II", size, count)


def u16(v):
    return struct.pack("<H", v)


def u64(v):
    return struct.pack("<Q", v)


FULL = 0xFFFF


def publish(n, fill=0):
    return bytes([0]) + u16(n) + bytes([fill])


def begin(n, fill=0):
    return bytes([1]) + u16(n) + bytes([fill])


def commit(n):
    return bytes([2]) + u16(n)


ABANDON = bytes([3])
READ = bytes([12])
SLEEP = bytes([15])
DRAIN = bytes([16])

# slots: the reader's next, the publisher's next
R_SLOT, W_SLOT = bytes([0]), bytes([1])


def head(mode, k=0):
    return bytes([4, mode, k])


def seq(slot, mode):
    return bytes([5]) + slot + bytes([mode])


def length(slot, mode, raw=b""):
    return bytes([6]) + slot + bytes([mode]) + raw


def word(slot, w, value):
    return bytes([7]) + slot + u16(w) + u64(value)


def fill(slot, n, byte):
    return bytes([8]) + slot + u16(n) + bytes([byte])


def header(field, value):
    return bytes([9, field]) + u64(value)


def signal(field, value):
    return bytes([10, field]) + u64(value)


def renumber(mode, k=0):
    return bytes([11, mode, k])


def during(point, step):
    """A read with a publisher step at point 0 (head), 1 (seq), 2 (data)."""
    return bytes([14, point]) + step


SEEDS = {
    "publish_read": bytes([0]) + small(64, 4) + publish(3, 1) + READ + publish(64) + READ + READ + DRAIN,
    "overrun": bytes([0]) + small(16, 4) + publish(1) * 9 + READ * 3 + DRAIN,
    "loan_commit_abandon": bytes([0]) + small(32, 2) + publish(4) * 2 + begin(10, 0xEE) + ABANDON
    + READ * 3 + begin(5, 1) + commit(20) + DRAIN,
    "lapped_while_copying": bytes([0]) + small(24, 2) + publish(8) * 2
    + during(2, publish(8)) + during(2, begin(3, 9)) + DRAIN,
    "lapped_before_seq": bytes([0]) + small(24, 2) + publish(8) * 2 + during(1, publish(8)) + DRAIN,
    "scribbled_while_copying": bytes([0]) + small(40, 3) + publish(40) + during(2, word(R_SLOT, 1, 0xDEADBEEF))
    + publish(40) + during(2, length(R_SLOT, 0)) + DRAIN,
    "forged_head": bytes([0]) + small(8, 4) + publish(8) + head(1, 3) + READ * 3 + head(3) + READ * 2
    + head(7) + READ * 2 + DRAIN,
    "forged_slot": bytes([0]) + small(16, 4) + publish(16) * 2 + seq(R_SLOT, 1) + READ
    + length(R_SLOT, 1) + seq(R_SLOT, 0) + READ + length(R_SLOT, 2) + seq(R_SLOT, 0) + READ
    + fill(R_SLOT, FULL, 0x41) + seq(R_SLOT, 0) + length(R_SLOT, 0) + READ + seq(R_SLOT, 6) + READ + DRAIN,
    "header_words_ignored": bytes([0]) + small(16, 4) + header(3, (1 << 32) - 1) + header(4, 0)
    + header(0, 0) + publish(16) + READ + header(6, 1) + SLEEP + DRAIN,
    "sleep": bytes([BLOCK]) + small(16, 4) + SLEEP + publish(2) + SLEEP + READ + SLEEP
    + signal(5, 1) + publish(1) + READ + signal(2, 0xFFFFFFFF) + SLEEP,
    "renumber_wrap": bytes([0]) + small(8, 4) + renumber(3, 1) + publish(8) * 3 + READ * 2
    + head(3) + READ * 4 + renumber(7, 127) + publish(1) * 2 + DRAIN,
    "start_late": bytes([START]) + small(8, 3) + u64(123456 << 2) + publish(8) * 5 + READ + DRAIN,
    "announced_other_geometry": bytes([ANNOUNCE]) + small(48, 4) + small(40, 4) + publish(48) * 2
    + READ * 2 + DRAIN,
    "announced_wrong_size": bytes([ANNOUNCE]) + small(48, 4) + small(48, 5),
    "invalid_geometry": bytes([0]) + edge(0, 4),
    "too_large": bytes([0]) + any_geometry(16 << 20, 1 << 20),
    "edge_16mib_slots": bytes([0]) + edge(13, 2) + publish(FULL) + READ + publish(100) + DRAIN,
    "edge_many_slots": bytes([0]) + edge(1, 8) + publish(1) * 4 + head(1, 200) + DRAIN,
    "edge_odd_size": bytes([0]) + edge(2, 3) + word(R_SLOT, 0, 0x0102030405060708) + publish(7) + READ + DRAIN,
    "hand_ok": bytes([HAND]) + small(16, 2) + bytes([0, 0]) + publish(16) + READ + DRAIN,
    "hand_unsealed": bytes([HAND]) + small(16, 2) + bytes([1, 0]),
    "hand_wrong_size": bytes([HAND]) + small(16, 2) + bytes([3 << 5, 0]),
    "hand_signal_read_only": bytes([HAND]) + small(16, 2) + bytes([8, 0]),
    "hand_signal_short": bytes([HAND]) + small(16, 2) + bytes([0, 4]),
}


# Written by hand into ../regressions/ring_reader/ (replayed by cargo test):
# the ring bugs of issue 9 the target must catch.
REGRESSIONS = {
    # A loan given up over message 0, which nobody read, after 8 of its 32
    # bytes were written: the reader must count message 0 missed, never
    # accept the half-overwritten bytes as message 0.
    "case-abandoned-loan-over-unread": bytes([0]) + small(32, 4) + publish(32) * 4 + begin(8, 0xEE)
    + ABANDON + READ * 2 + DRAIN,
    # The publisher laps the reader between its first look at the slot and
    # the copy (and once more with a loan half written): a torn copy must
    # be thrown away and counted missed.
    "case-lapped-during-copy": bytes([0]) + small(24, 2) + publish(24) * 2 + during(2, publish(3))
    + publish(24) + during(2, begin(5, 0x77)) + ABANDON + DRAIN,
}


def main():
    for out, files in [(OUT, SEEDS), (os.path.join(HERE, "..", "regressions", "ring_reader"), REGRESSIONS)]:
        os.makedirs(out, exist_ok=True)
        for name, data in files.items():
            with open(os.path.join(out, name), "wb") as f:
                f.write(data)


if __name__ == "__main__":
    main()
