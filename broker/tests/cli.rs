//! shmbusctl and introspection, end to end.

mod common;

use std::process::Command;

use common::*;

#[test]
fn introspection_lists_clients_topics_and_stats() {
    let b = Broker::start("intro");
    let a = b.client_named("alpha");
    let _s1 = a.subscribe("x.*").unwrap();
    let _s2 = a.subscribe("y.>").unwrap();
    let z = b.client_named("zeta");
    let _s3 = z.subscribe("x.*").unwrap();
    for _ in 0..3 {
        z.publish("x.1", b"abc").unwrap();
    }
    z.flush().unwrap();

    let clients = a.clients().unwrap();
    let alpha = clients.iter().find(|c| c.name == "alpha").unwrap();
    assert_eq!(alpha.id, a.id());
    assert_eq!(alpha.pid, std::process::id());
    assert_eq!(alpha.uid, rustix::process::getuid().as_raw());
    assert_eq!(alpha.subscriptions, ["x.*", "y.>"]);
    assert_eq!(alpha.subscription_count, 2);
    assert_eq!(alpha.msgs_out, 3);
    let zeta = clients.iter().find(|c| c.name == "zeta").unwrap();
    assert_eq!(zeta.msgs_in, 3);
    assert!(!zeta.command.is_empty());

    let topics = a.topics().unwrap();
    let xs = topics.iter().find(|t| t.pattern == "x.*").unwrap();
    assert_eq!(xs.subscribers, 2);

    let st = a.stats().unwrap();
    assert_eq!((st.clients, st.subscriptions, st.patterns, st.msgs_in, st.msgs_out), (2, 3, 2, 3, 6));
    assert_eq!(st.bytes_in, 9);
    assert_eq!(st.address, b.address);

    // The same through the CLI, readable and as JSON.
    let out = b.ctl(&["clients"]);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(text.contains("alpha") && text.contains("zeta") && text.contains("x.* y.>"), "{text}");
    let out = b.ctl(&["--json", "clients"]);
    let rows: Vec<serde_json::Value> =
        stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    // alpha, zeta and shmbusctl itself.
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert!(rows.iter().any(|r| r["name"] == "alpha" && r["subscription_count"] == 2));
    let out = b.ctl(&["topics", "--json"]);
    let rows: Vec<serde_json::Value> =
        stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(rows.iter().any(|r| r["pattern"] == "x.*" && r["subscribers"] == 2), "{rows:?}");
    let out = b.ctl(&["status", "--json"]);
    let st: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(st["msgs_in"], 3);
    let out = b.ctl(&["status"]);
    assert!(stdout(&out).contains("clients"), "{}", stdout(&out));
    let out = b.ctl(&["ping"]);
    assert!(stdout(&out).starts_with("pong"), "{}", stdout(&out));
}

#[test]
fn ctl_pub_file_and_sub_raw_are_byte_exact() {
    let b = Broker::start("raw");
    let dir = std::env::temp_dir().join(format!("shmbus-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("blob");
    let blob: Vec<u8> = (0..40_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&file, &blob).unwrap();

    let probe = b.client();
    let mut cmd = Command::new(SHMBUSCTL);
    cmd.args(["--address", &b.address, "sub", "blob", "--raw", "--count", "2"]);
    let sub = spawn_guarded(cmd);
    wait_subscribers(&probe, "blob", 1);
    let out = b.ctl(&["pub", "blob", "--file", file.to_str().unwrap(), "--count", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = sub.wait_output();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout.len(), 2 * blob.len());
    assert!(out.stdout == [blob.clone(), blob].concat());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn ctl_sub_many_patterns_json_and_binary_text() {
    let b = Broker::start("many");
    let probe = b.client();
    let mut cmd = Command::new(SHMBUSCTL);
    cmd.args(["--address", &b.address, "--json", "sub", "a.*", "b.>", "--count", "2"]);
    let sub = spawn_guarded(cmd);
    wait_subscribers(&probe, "a.*", 1);
    wait_subscribers(&probe, "b.>", 1);
    probe.publish("a.1", b"text").unwrap();
    probe.publish("b.2.3", &[0xff, 0x00]).unwrap();
    let out = sub.wait_output();
    assert!(out.status.success(), "{}", stderr(&out));
    let rows: Vec<serde_json::Value> =
        stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows[0]["topic"], "a.1");
    assert_eq!(rows[0]["payload"], "text");
    assert_eq!(rows[0]["sender"]["client_id"], probe.id());
    assert_eq!(rows[1]["payload_hex"], "ff00");

    // Plain text mode escapes what a terminal should not get raw.
    let mut cmd = Command::new(SHMBUSCTL);
    cmd.args(["--address", &b.address, "sub", "c", "--count", "1"]);
    let sub = spawn_guarded(cmd);
    wait_subscribers(&probe, "c", 1);
    probe.publish("c", b"line\nbreak").unwrap();
    let out = sub.wait_output();
    assert_eq!(stdout(&out), "c line\\nbreak\n");
}

#[test]
fn ctl_pub_reports_refusals_and_bad_input() {
    let b = Broker::start("badpub");
    let out = b.ctl(&["pub", "a.*", "x"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("wildcards"), "{}", stderr(&out));
}

#[test]
fn path_addresses_env_default_and_sigint() {
    // A filesystem path, given through $SHMBUS_ADDRESS to broker and tools.
    let dir = std::env::temp_dir().join(format!("shmbus-path-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bus.sock");
    let _ = std::fs::remove_file(&path);
    let spawn = || {
        let mut cmd = std::process::Command::new(SHMBUSD);
        cmd.env("SHMBUS_ADDRESS", &path);
        ChildGuard(Some(cmd.spawn().unwrap()))
    };
    let wait_up = || {
        let start = std::time::Instant::now();
        loop {
            let mut cmd = std::process::Command::new(SHMBUSCTL);
            cmd.env("SHMBUS_ADDRESS", &path).arg("ping");
            if run_bounded(cmd).status.success() {
                return;
            }
            assert!(start.elapsed() < PATIENCE, "broker never answered on {}", path.display());
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    let mut first = spawn();
    wait_up();
    assert!(std::os::unix::fs::FileTypeExt::is_socket(&std::fs::metadata(&path).unwrap().file_type()));
    // The library's default honours $SHMBUS_ADDRESS too (in a child, so
    // this test process's environment is left alone).
    let mut cmd = std::process::Command::new(SHMBUSCTL);
    cmd.env("SHMBUS_ADDRESS", &path).args(["pub", "x", "y"]);
    assert!(run_bounded(cmd).status.success());
    // SIGINT stops it cleanly, like SIGTERM.
    let pid = first.0.as_ref().unwrap().id() as i32;
    rustix::process::kill_process(rustix::process::Pid::from_raw(pid).unwrap(), rustix::process::Signal::INT)
        .unwrap();
    let status = wait_timeout(first.0.as_mut().unwrap(), PATIENCE).expect("exit after SIGINT");
    assert!(status.success(), "{status:?}");
    // The stale socket file left behind is replaced on the next start.
    assert!(path.exists());
    let _second = spawn();
    wait_up();
    let _ = std::fs::remove_dir_all(&dir);
}
