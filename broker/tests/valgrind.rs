//! shmbus programs run under valgrind, the tool a service's author reaches
//! for first when their process misbehaves. Here the broker and a linked
//! client both run under memcheck through a stream dense enough for the
//! broker to spin on the client's ring (where it asks which CPU it runs
//! on), and a reader checks that every message came.
//!
//! The CPU number once came from rustix's vDSO parser, which reads the
//! ELF image the auxiliary vector points to; valgrind does not map it, so
//! every program linking shmbus died of a segfault at its first send
//! under valgrind (rustix issue 1559). glibc's `sched_getcpu` is used now.

mod common;

use std::process::Command;

use common::*;
use shmbus::Event;

const MESSAGES: u32 = 2_000;

#[test]
fn the_broker_and_a_linked_client_run_under_memcheck_without_an_error() {
    let broker = Broker::launch("valgrind", Launch::new().valgrind());
    let reader = broker.client();
    let sub = reader.subscribe("vg.>").unwrap();
    reader.ping().unwrap();
    let mut cmd = Command::new("valgrind");
    cmd.args(VALGRIND).arg(SHMBUSCTL).arg("--address").arg(&broker.address);
    cmd.args(["pub", "vg.stream", "x", "--count", &MESSAGES.to_string()]);
    let out = run_bounded(cmd);
    assert!(
        out.status.success(),
        "shmbusctl pub under valgrind: {} (99: memcheck found an error; 139: a segfault); stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut got = 0;
    while got < MESSAGES {
        match sub.recv_timeout(PATIENCE).unwrap() {
            Some(Event::Message(m)) => {
                assert_eq!(m.payload(), b"x");
                got += 1;
            }
            other => panic!("after {got} messages: {other:?}"),
        }
    }
    drop(sub);
    drop(reader);
    let mut broker = broker;
    let status = broker.terminate();
    assert!(status.success(), "shmbusd under valgrind exited with {status} (99: memcheck found an error)");
}
