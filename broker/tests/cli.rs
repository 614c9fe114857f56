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

// ------------------------------------------------------------ services --

/// `shmbusctl --address <b> serve ARGS...`, started, and the client id that
/// owns `name` once it does (bounded).
fn ctl_serve(b: &Broker, probe: &shmbus::Client, name: &str, args: &[&str]) -> (ChildGuard, u64) {
    let mut cmd = Command::new(SHMBUSCTL);
    cmd.args(["--address", &b.address, "serve", name]).args(args);
    let before = probe.name_status(name).unwrap().members;
    let serve = spawn_guarded(cmd);
    let start = std::time::Instant::now();
    loop {
        let st = probe.name_status(name).unwrap();
        if st.members > before {
            return (serve, st.owner.unwrap());
        }
        assert!(start.elapsed() < PATIENCE, "shmbusctl serve {name} never owned it");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn ctl_serve_echo_and_call_round_trip() {
    let b = Broker::start("echo");
    let probe = b.client();
    let (serve, owner) = ctl_serve(&b, &probe, "echo.test", &["--echo", "--count", "4"]);

    // Text: escaped, on one line.
    let out = b.ctl(&["call", "echo.test", "hello\u{1b}[2J"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "hello\\e[2J\n");

    // Raw: the exact bytes, here of a file large enough to travel as a memfd.
    let dir = std::env::temp_dir().join(format!("shmbus-cli-call-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("blob");
    let blob: Vec<u8> = (0..200_000u32).map(|i| (i * 13 % 251) as u8).collect();
    std::fs::write(&file, &blob).unwrap();
    let out = b.ctl(&["call", "echo.test", "--file", file.to_str().unwrap(), "--raw"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(out.stdout == blob, "{} bytes back", out.stdout.len());
    std::fs::remove_dir_all(&dir).unwrap();

    // JSON: the responder as the broker stamped it; binary as hex.
    let out = b.ctl(&["--json", "call", "echo.test", "ok"]);
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(v["payload"], "ok");
    assert_eq!(v["size"], 2);
    assert_eq!(v["responder"]["client_id"], owner);
    assert_eq!(v["responder"]["pid"], serve.0.as_ref().unwrap().id());

    // An empty payload, the fourth request: then serve exits by itself.
    let out = b.ctl(&["call", "echo.test"]);
    assert_eq!(stdout(&out), "\n");
    let out = serve.wait_output();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("serving echo.test"), "{}", stderr(&out));
    assert_eq!(probe.name_owner("echo.test").unwrap(), None);
}

#[test]
fn ctl_call_names_each_failure() {
    let b = Broker::start("callfail");
    let probe = b.client();

    let out = b.ctl(&["call", "nobody.home", "hi"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("no responder for nobody.home"), "{}", stderr(&out));
    assert!(out.stdout.is_empty());
    let out = b.ctl(&["--json", "call", "nobody.home"]);
    assert_eq!(out.status.code(), Some(4));
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(v["error"], "no_responder");

    // A command that fails: its exit status is the code, its first line of
    // standard error the message.
    let (_fail, _) = ctl_serve(
        &b,
        &probe,
        "svc.fail",
        &["--exec", "cat >/dev/null; echo 'out of coffee\nmore' >&2; exit 7"],
    );
    let out = b.ctl(&["call", "svc.fail", "x"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("svc.fail answered error 7: out of coffee"), "{}", stderr(&out));
    let out = b.ctl(&["--json", "call", "svc.fail", "x"]);
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(
        (v["error"].as_str(), v["code"].as_u64(), v["message"].as_str()),
        (Some("app_error"), Some(7), Some("out of coffee"))
    );

    // A command that outlives the request is killed at its deadline: the
    // caller gets its timeout, and the command is gone soon after.
    let dir = std::env::temp_dir().join(format!("shmbus-cli-slow-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pidfile = dir.join("pid");
    let script = format!("echo $$ > {}; exec sleep 60", pidfile.display());
    let (_slow, _) = ctl_serve(&b, &probe, "svc.slow", &["--exec", &script]);
    let started = std::time::Instant::now();
    let out = b.ctl(&["call", "svc.slow", "x", "--timeout", "0.5"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("timed out after 0.5 s waiting for svc.slow"), "{}", stderr(&out));
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    let pid = std::fs::read_to_string(&pidfile).unwrap().trim().to_owned();
    let start = std::time::Instant::now();
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(start.elapsed() < PATIENCE, "the command outlived its request");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::fs::remove_dir_all(&dir).unwrap();

    // A command that will not stop writing is stopped at --max-output.
    let (_yes, _) = ctl_serve(&b, &probe, "svc.yes", &["--exec", "yes", "--max-output", "1000"]);
    let out = b.ctl(&["call", "svc.yes"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("svc.yes answered error 125: the command wrote more than 1000 bytes"),
        "{}",
        stderr(&out)
    );

    // A bad name is refused before anything is sent.
    let out = b.ctl(&["call", "a.*", "x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("wildcards"), "{}", stderr(&out));
}

#[test]
fn ctl_serve_exec_runs_a_command_per_request() {
    let b = Broker::start("exec");
    let probe = b.client();
    let (_up, _) = ctl_serve(&b, &probe, "text.upper", &["--exec", "tr a-z A-Z"]);
    for word in ["hello", "shell service"] {
        let out = b.ctl(&["call", "text.upper", word]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(stdout(&out), format!("{}\n", word.to_uppercase()));
    }
    // --jobs 2: two commands at once (each waits until both have started).
    let dir = std::env::temp_dir().join(format!("shmbus-cli-jobs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = format!(
        "touch {d}/$SHMBUS_SERIAL; while [ $(ls {d} | wc -l) -lt 2 ]; do sleep 0.02; done; cat",
        d = dir.display()
    );
    let (_pair, _) = ctl_serve(&b, &probe, "text.pair", &["--exec", &script, "--jobs", "2"]);
    let calls: Vec<_> = ["one", "two"]
        .map(|w| probe.request_async("text.pair", w.as_bytes(), std::time::Duration::from_secs(10)).unwrap())
        .into_iter()
        .collect();
    let got: Vec<Vec<u8>> = calls.into_iter().map(|c| c.wait().unwrap().payload().to_vec()).collect();
    assert_eq!(got, [b"one".to_vec(), b"two".to_vec()]);
    std::fs::remove_dir_all(&dir).unwrap();

    // The command learns who called, as the broker stamped it.
    let (_who, _) = ctl_serve(&b, &probe, "who.am.i", &["--exec", "echo $SHMBUS_NAME $SHMBUS_SENDER_UID"]);
    let reply = probe.request("who.am.i", b"", std::time::Duration::from_secs(5)).unwrap();
    assert_eq!(reply.payload(), format!("who.am.i {}\n", rustix::process::getuid().as_raw()).as_bytes());
}

#[test]
fn ctl_names_lists_owners_queue_and_kinds() {
    let b = Broker::start("names");
    let probe = b.client();
    let (_one, owner) = ctl_serve(&b, &probe, "thermo.kitchen", &["--echo"]);
    let (_s1, m1) = ctl_serve(&b, &probe, "pool.work", &["--echo", "--shared"]);
    let (_s2, _) = ctl_serve(&b, &probe, "pool.work", &["--echo", "--shared"]);
    // An exclusive name is not served twice: the second exits, naming it.
    let out = b.ctl(&["serve", "thermo.kitchen", "--echo"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("thermo.kitchen is taken"), "{}", stderr(&out));
    // A client waiting in the queue.
    let waiter = b.client();
    assert_eq!(
        waiter.request_name("thermo.kitchen", shmbus::NameFlags::default()).unwrap(),
        shmbus::NameResult::InQueue
    );

    let out = b.ctl(&["names"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let line = text.lines().find(|l| l.starts_with("thermo.kitchen ")).unwrap_or_else(|| panic!("{text}"));
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(cols, ["thermo.kitchen", "exclusive", &owner.to_string(), &waiter.id().to_string(), "-"]);
    let line = text.lines().find(|l| l.starts_with("pool.work ")).unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains("shared") && line.contains(&format!("{m1},")), "{line}");

    let out = b.ctl(&["names", "--json"]);
    let rows: Vec<serde_json::Value> =
        stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let t = rows.iter().find(|r| r["name"] == "thermo.kitchen").unwrap();
    assert_eq!(t["owners"], serde_json::json!([owner]));
    assert_eq!(t["queued"], serde_json::json!([waiter.id()]));
    let p = rows.iter().find(|r| r["name"] == "pool.work").unwrap();
    assert_eq!((p["shared"].as_bool(), p["owners"].as_array().map(Vec::len)), (Some(true), Some(2)));
}
