//! shmbusctl and introspection, end to end.

mod common;

use std::process::Command;
use std::sync::{Arc, Mutex};

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
    let dir = TempDir::new("cli");
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
    probe.publish_with_origin("b.2.3", [0xff, 0x00], "nats:hostA uid=7").unwrap();
    let out = sub.wait_output();
    assert!(out.status.success(), "{}", stderr(&out));
    let rows: Vec<serde_json::Value> =
        stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows[0]["topic"], "a.1");
    assert_eq!(rows[0]["payload"], "text");
    assert_eq!(rows[0]["sender"]["client_id"], probe.id());
    assert_eq!(rows[1]["payload_hex"], "ff00");
    assert_eq!(rows[0]["origin"], serde_json::Value::Null);
    assert_eq!(rows[1]["origin"], "nats:hostA uid=7");

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
    let dir = TempDir::new("path");
    let path = dir.join("bus.sock");
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
    // A clean exit removes the socket file it made; a stale one (a broker
    // killed) is replaced on the next start.
    assert!(!path.exists());
    let mut killed = spawn();
    wait_up();
    killed.0.as_mut().unwrap().kill().unwrap();
    let _ = killed.0.as_mut().unwrap().wait();
    assert!(path.exists(), "SIGKILL leaves the socket file behind");
    let _second = spawn();
    wait_up();
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
    let dir = TempDir::new("cli-call");
    let file = dir.join("blob");
    let blob: Vec<u8> = (0..200_000u32).map(|i| (i * 13 % 251) as u8).collect();
    std::fs::write(&file, &blob).unwrap();
    let out = b.ctl(&["call", "echo.test", "--file", file.to_str().unwrap(), "--raw"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(out.stdout == blob, "{} bytes back", out.stdout.len());

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
    let dir = TempDir::new("cli-slow");
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
    let dir = TempDir::new("cli-jobs");
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

// ------------------------------------------------------ administration --

/// A long-running `shmbusctl` (a monitor), its stdout and stderr read line
/// by line as they come; killed on drop.
struct Watch {
    _child: ChildGuard,
    out: std::sync::mpsc::Receiver<String>,
    err: std::sync::mpsc::Receiver<String>,
    /// Lines of stdout read so far, for failure messages.
    seen: Vec<String>,
}

impl Watch {
    fn start(b: &Broker, args: &[&str]) -> Watch {
        use std::io::BufRead;
        let mut cmd = Command::new(SHMBUSCTL);
        cmd.args(["--address", &b.address]).args(args);
        let mut child = spawn_guarded(cmd);
        let lines = |r: Box<dyn std::io::Read + Send>| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(r).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            rx
        };
        let c = child.0.as_mut().unwrap();
        let out = lines(Box::new(c.stdout.take().unwrap()));
        let err = lines(Box::new(c.stderr.take().unwrap()));
        Watch { _child: child, out, err, seen: Vec::new() }
    }

    /// Waits (bounded) until the monitor says it is live: the broker has
    /// acknowledged it, so every later event reaches it.
    fn wait_live(&self) {
        let start = std::time::Instant::now();
        loop {
            let line = self
                .err
                .recv_timeout(PATIENCE.saturating_sub(start.elapsed()))
                .expect("the monitor never said it was live");
            if line.starts_with("shmbusctl: monitoring") {
                return;
            }
        }
    }

    /// The next line of stdout for which `pick` holds (bounded); the
    /// lines before it are kept in `seen`.
    fn line_where(&mut self, what: &str, pick: impl Fn(&str) -> bool) -> String {
        let start = std::time::Instant::now();
        loop {
            match self.out.recv_timeout(PATIENCE.saturating_sub(start.elapsed())) {
                Ok(line) if pick(&line) => return line,
                Ok(line) => self.seen.push(line),
                Err(_) => panic!("the monitor never printed {what}; it printed {:#?}", self.seen),
            }
        }
    }

    /// Waits (bounded) for it to exit; its status, and what it printed
    /// that was not read yet.
    fn finish(mut self) -> (std::process::ExitStatus, Vec<String>) {
        let mut child = self._child.0.take().unwrap();
        let status = wait_timeout(&mut child, PATIENCE).expect("the monitor did not exit");
        let start = std::time::Instant::now();
        let mut rest = Vec::new();
        // Until its stdout ends.
        while let Ok(line) = self.out.recv_timeout(PATIENCE.saturating_sub(start.elapsed())) {
            rest.push(line);
        }
        (status, rest)
    }

    /// The next JSON event of `kind` on `subject`.
    fn event(&mut self, kind: &str, subject: &str) -> serde_json::Value {
        let line = self.line_where(&format!("a {kind} on {subject}"), |l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["kind"] == kind && v["subject"] == subject
        });
        serde_json::from_str(&line).unwrap()
    }
}

fn sorted(mut v: Vec<u64>) -> Vec<u64> {
    v.sort_unstable();
    v
}

fn ids(v: &serde_json::Value) -> Vec<u64> {
    sorted(
        v.as_array()
            .unwrap_or_else(|| panic!("not a list: {v}"))
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect(),
    )
}

#[test]
fn ctl_monitor_json_sees_a_publish_with_its_receivers_and_a_call_with_its_answer() {
    let b = Broker::start("monitor-json");
    let mut mon = Watch::start(&b, &["--json", "monitor", "t.>", "svc.>"]);
    mon.wait_live();

    // A publish, with the subscribers it reached.
    let (s1, s2, publisher) = (b.client(), b.client(), b.client());
    let _sub1 = s1.subscribe("t.x").unwrap();
    let _sub2 = s2.subscribe("t.*").unwrap();
    publisher.publish("other.x", b"not watched").unwrap();
    publisher.publish("t.x", b"21.5").unwrap();
    publisher.publish("t.bin", [0xff, 0x00, 0x01]).unwrap();
    publisher.flush().unwrap();
    let v = mon.event("publish", "t.x");
    assert_eq!(v["sender"]["client_id"], publisher.id(), "{v}");
    assert_eq!(v["sender"]["pid"], std::process::id(), "{v}");
    assert_eq!(v["sender"]["uid"], rustix::process::getuid().as_raw(), "{v}");
    assert_eq!(ids(&v["receivers"]), sorted(vec![s1.id(), s2.id()]), "{v}");
    assert_eq!((v["payload"].as_str(), v["payload_encoding"].as_str()), (Some("21.5"), Some("utf8")), "{v}");
    assert_eq!((v["payload_len"].as_u64(), v["memfd"].as_bool()), (Some(4), Some(false)), "{v}");
    assert!(v["seq"].is_u64() && v["time_us"].is_u64(), "{v}");
    let v = mon.event("publish", "t.bin");
    assert_eq!((v["payload"].as_str(), v["payload_encoding"].as_str()), (Some("ff0001"), Some("hex")), "{v}");
    assert_eq!(ids(&v["receivers"]), vec![s2.id()], "{v}");
    assert!(
        !mon.seen.iter().any(|l| l.contains("other.x")),
        "a subject no pattern matches is not shown: {:#?}",
        mon.seen
    );

    // A call: the request to the service, and its answer to the caller.
    let (server, caller) = (b.client(), b.client());
    let service = server.serve("svc.echo").unwrap();
    let answering = std::thread::spawn(move || {
        let request = service.recv_timeout(PATIENCE).unwrap().expect("a request");
        assert_eq!(request.payload(), b"ping");
        request.reply(b"pong").unwrap();
        service
    });
    let reply = caller.request("svc.echo", b"ping", std::time::Duration::from_secs(10)).unwrap();
    assert_eq!(reply.payload(), b"pong");
    let _service = answering.join().unwrap();
    let request = mon.event("request", "svc.echo");
    assert_eq!(request["sender"]["client_id"], caller.id(), "{request}");
    assert_eq!(ids(&request["receivers"]), vec![server.id()], "{request}");
    assert_eq!(request["payload"], "ping", "{request}");
    let answer = mon.event("answer", "svc.echo");
    assert_eq!(answer["sender"]["client_id"], server.id(), "{answer}");
    assert_eq!(ids(&answer["receivers"]), vec![caller.id()], "{answer}");
    assert_eq!(answer["payload"], "pong", "{answer}");
    assert!(answer["detail"].as_str().unwrap().contains("Reply"), "{answer}");

    // A call nobody answers is answered by the broker itself.
    let e = caller.request("svc.nobody", b"", std::time::Duration::from_secs(10)).unwrap_err();
    assert!(matches!(e, shmbus::CallError::NoResponder { .. }), "{e}");
    let answer = mon.event("answer", "svc.nobody");
    assert_eq!(answer["sender"]["client_id"], 0, "{answer}");
    assert!(answer["detail"].as_str().unwrap().contains("NoResponder"), "{answer}");
}

#[test]
fn ctl_monitor_prints_one_line_per_event_cutting_payloads_unless_full() {
    let b = Broker::start("monitor-text");
    let mut mon = Watch::start(&b, &["monitor", "t.>"]);
    mon.wait_live();
    let mut full = Watch::start(&b, &["monitor", "--full", "t.long"]);
    full.wait_live();
    let p = b.client();
    let (uid, pid) = (rustix::process::getuid().as_raw(), std::process::id());
    let long = "a".repeat(300);
    p.publish("t.x", b"21.5").unwrap();
    p.publish("t.bin", [0xff, 0x00, 0x01]).unwrap();
    p.publish("t.long", long.as_bytes()).unwrap();
    p.publish("t.big", vec![7u8; 100_000]).unwrap();
    p.publish("t.esc", b"line\nbreak\x1b[2J").unwrap();
    p.flush().unwrap();

    let line = mon.line_where("the publish on t.x", |l| l.contains(" publish t.x "));
    // 12:00:01.123456, then the event.
    let (time, rest) = line.split_once(' ').unwrap();
    assert!(time.len() == 15 && time.as_bytes()[8] == b'.' && time.split([':', '.']).count() == 4, "{line}");
    assert_eq!(
        rest,
        format!("publish t.x from client {} (uid {uid}, pid {pid}) to nobody 4 B \"21.5\"", p.id())
    );
    let line = mon.line_where("the publish on t.bin", |l| l.contains(" publish t.bin "));
    assert!(line.ends_with(" 3 B hex ff0001"), "{line}");
    let line = mon.line_where("the publish on t.long", |l| l.contains(" publish t.long "));
    assert!(line.ends_with(&format!(" 300 B \"{}\"...", "a".repeat(64))), "cut to 64 characters: {line}");
    let line = mon.line_where("the publish on t.big", |l| l.contains(" publish t.big "));
    assert!(line.ends_with(" memfd 100000 B"), "{line}");
    let line = mon.line_where("the publish on t.esc", |l| l.contains(" publish t.esc "));
    assert!(line.ends_with(" 14 B \"line\\nbreak\\e[2J\""), "escaped, on one line: {line}");
    // --full: the whole payload, uncut.
    let line = full.line_where("the publish on t.long", |l| l.contains(" publish t.long "));
    assert!(line.ends_with(&format!(" 300 B \"{long}\"")), "{line}");

    // --count: it exits by itself after that many events.
    let mut counted = Watch::start(&b, &["monitor", "t.count", "--count", "2"]);
    counted.wait_live();
    for i in 0..3 {
        p.publish("t.count", format!("{i}").as_bytes()).unwrap();
    }
    p.flush().unwrap();
    counted.line_where("the first event", |l| l.ends_with(" 1 B \"0\""));
    counted.line_where("the second event", |l| l.ends_with(" 1 B \"1\""));
    let (status, rest) = counted.finish();
    assert!(status.success(), "{status:?}");
    assert!(rest.is_empty(), "nothing after the second: {rest:?}");
}

#[test]
fn ctl_policy_check_without_a_policy_file_allows_and_says_why() {
    let b = Broker::start("policy-open");
    let out = b.ctl(&["policy", "check", "--uid", "4321", "publish", "a.b"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let said = stdout(&out);
    assert!(said.starts_with("allow: ") && said.contains("no policy file"), "{said}");
    assert!(!said.starts_with("allow: allow"), "the verdict is said once: {said}");
    let out =
        b.ctl(&["--json", "policy", "check", "--uid", "4321", "--gid", "4321", "--gid", "10", "monitor"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(v["allowed"], true, "{v}");
    assert_eq!(v["gids"], serde_json::json!([4321, 10]), "{v}");
    assert!(v["explanation"].as_str().unwrap().contains("no policy file"), "{v}");

    // What cannot be answered exits 2, saying why.
    let out = b.ctl(&["policy", "check", "--uid", "4321", "fly", "a.b"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("unknown action"), "{}", stderr(&out));
    assert!(out.stdout.is_empty());
    let out = b.ctl(&["policy", "check", "--uid", "4321", "subscribe", "a..b"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let mut cmd = Command::new(SHMBUSCTL);
    cmd.args(["--address", &unique_address("policy-nobody"), "policy", "check", "--uid", "1", "connect"]);
    let out = run_bounded(cmd);
    assert_eq!(out.status.code(), Some(2), "no bus: {}", stderr(&out));
}

#[test]
fn ctl_policy_check_follows_the_policy_file_and_exits_by_verdict() {
    let dir = TempDir::new("cli-policy");
    let path = dir.join("policy.toml");
    std::fs::write(
        &path,
        r#"
[[rule]]
match = {}
allow = ["connect"]

[[rule]]
match = { uid = 4321 }
allow = ["publish a.>", "subscribe a.>"]
deny = ["publish a.secret"]
"#,
    )
    .unwrap();
    let b = Broker::start_with("policy-file", &["--policy", path.to_str().unwrap()]);
    let check = |args: &[&str]| {
        let mut all = vec!["policy", "check"];
        all.extend_from_slice(args);
        let out = b.ctl(&all);
        (out.status.code(), stdout(&out), stderr(&out))
    };
    let (code, said, err) = check(&["--uid", "4321", "publish", "a.b"]);
    assert_eq!(code, Some(0), "{said} {err}");
    assert!(said.starts_with("allow: ") && said.contains("line"), "names the rule: {said}");
    let (code, said, err) = check(&["--uid", "4321", "publish", "a.secret"]);
    assert_eq!(code, Some(1), "{said} {err}");
    assert!(said.starts_with("deny: ") && said.contains("publish a.secret"), "{said}");
    let (code, said, _) = check(&["--uid", "4322", "publish", "a.b"]);
    assert_eq!(code, Some(1), "{said}");
    assert!(said.starts_with("deny: "), "{said}");
    let (code, said, _) = check(&["--uid", "4321", "subscribe", "a.*"]);
    assert_eq!(code, Some(0), "{said}");
    let (code, said, _) = check(&["--uid", "4321", "subscribe", ">"]);
    assert_eq!(code, Some(1), "a pattern wider than the rule: {said}");

    // A client without the rights (root and the broker's uid have every
    // right; another uid is needed, hence root).
    if rustix::process::getuid().is_root() {
        let out = b.ctl_as(&["policy", "check", "--uid", "4321", "publish", "a.b"], Some(4399));
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(stderr(&out).contains("denied"), "{}", stderr(&out));
        let out = b.ctl_as(&["monitor"], Some(4399));
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(stderr(&out).contains("denied") && stderr(&out).contains("monitor"), "{}", stderr(&out));
    } else {
        eprintln!("skipped the refusals: needs root to run shmbusctl as another uid");
    }
}

// ------------------------------------------------------ a newcomer's path --

fn ctl_at(address: &str, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(SHMBUSCTL);
    cmd.arg("--address").arg(address).args(args);
    run_bounded(cmd)
}

#[test]
fn ctl_no_broker_says_which_address_and_how_to_start_one() {
    let address = unique_address("nobroker");
    let out = ctl_at(&address, &["ping"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains(&format!("cannot reach the bus at {address}: no broker listens there")), "{err}");
    assert!(err.contains(&format!("`shmbusd --address {address}`")), "{err}");

    // A path with no socket file (a forgotten `@`, say).
    let missing = format!("shmbus-no-such-socket-{}", std::process::id());
    let out = ctl_at(&missing, &["ping"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains(&format!("cannot reach the bus at {missing}: no socket file there")), "{err}");
    assert!(err.contains("starts with `@`") && err.contains(&format!("--address @{missing}")), "{err}");
    assert!(!err.contains("os error"), "{err}");
}

/// `ping --wait`, `pub --wait-subscribers` and `call --wait-owner` wait
/// for the other side a script has just started, and give up with a
/// reason after their bound.
#[test]
fn ctl_waits_for_the_other_side_and_gives_up_with_a_reason() {
    let address = unique_address("waits");
    let out = ctl_at(&address, &["ping", "--wait", "0.3"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no broker listens there"), "{}", stderr(&out));

    // A broker that comes up while ping waits is found.
    let mut cmd = Command::new(SHMBUSCTL);
    cmd.args(["--address", &address, "ping", "--wait", "20"]);
    let ping = spawn_guarded(cmd);
    std::thread::sleep(std::time::Duration::from_millis(200));
    let b = Broker::launch_at(address.clone(), Launch::new());
    let out = ping.wait_output();
    assert!(out.status.success(), "{}", stderr(&out));

    let out = ctl_at(&b.address, &["pub", "--wait-subscribers", "1", "--timeout", "0.3", "w.x", "hi"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("0 of 1 subscriptions matched w.x within"), "{}", stderr(&out));
    let out = ctl_at(&b.address, &["call", "--wait-owner", "--timeout", "0.3", "w.svc"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("nobody owned w.svc within"), "{}", stderr(&out));

    // With the other side there (started after the waiting began).
    let mut cmd = Command::new(SHMBUSCTL);
    cmd.args(["--address", &b.address, "pub", "--wait-subscribers", "1", "w.x", "hi"]);
    let publisher = spawn_guarded(cmd);
    let probe = b.client();
    let sub = probe.subscribe("w.*").unwrap();
    assert_eq!(next_message(&sub).payload(), b"hi");
    assert!(publisher.wait_output().status.success());
    let mut cmd = Command::new(SHMBUSCTL);
    cmd.args(["--address", &b.address, "call", "--wait-owner", "w.svc", "ping"]);
    let caller = spawn_guarded(cmd);
    let service = probe.serve("w.svc").unwrap();
    let request = service.recv_timeout(PATIENCE).unwrap().expect("the call waited for the owner");
    request.reply("pong").unwrap();
    let out = caller.wait_output();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "pong\n");
}

#[test]
fn ctl_pub_without_data_on_a_terminal_is_refused() {
    // `script` (util-linux) runs the command on a pseudo-terminal.
    let b = Broker::start("tty");
    let line = format!("{SHMBUSCTL} --address {} pub tty.topic", b.address);
    let mut cmd = Command::new("script");
    cmd.args(["-qec", &line, "/dev/null"]);
    let out = run_bounded(cmd);
    let text = stdout(&out) + &stderr(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("no DATA given and stdin is a terminal"), "{text}");
}

#[test]
fn ctl_sub_escapes_binary_payloads_and_hex_shows_every_byte() {
    let b = Broker::start("hex");
    let probe = b.client();
    for (topic, hex) in [("bin.x", false), ("bin.hex", true)] {
        let mut cmd = Command::new(SHMBUSCTL);
        cmd.args(["--address", &b.address, "sub", topic, "--count", "2"]);
        if hex {
            cmd.arg("--hex");
        }
        let sub = spawn_guarded(cmd);
        wait_subscribers(&probe, topic, 1);
        probe.publish(topic, b"a\x00b\x1b[31m\nz").unwrap();
        probe.publish(topic, [0xff, 0xfe, b'\n', 0x07]).unwrap();
        probe.flush().unwrap();
        let out = sub.wait_output();
        assert!(out.status.success(), "{}", stderr(&out));
        let text = stdout(&out);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "one line per message: {text:?}");
        assert!(!text.contains('\x1b') && !text.contains('\0') && !text.contains('\x07'), "{text:?}");
        if hex {
            assert_eq!(lines, ["bin.hex 6100621b5b33316d0a7a", "bin.hex fffe0a07"]);
        } else {
            assert_eq!(lines[1], "bin.x \\xff\\xfe\\n\\x07");
        }
    }
}

#[test]
fn ctl_sub_channel_waits_for_its_publisher_and_pub_channel_feeds_it() {
    let b = Broker::start("chanwait");
    let mut cmd = Command::new(SHMBUSCTL);
    cmd.args(["--address", &b.address, "sub", "--channel", "chan.wait", "--count", "3"]);
    let mut sub = spawn_guarded(cmd);
    // Its first attempt is refused (no publisher), and it keeps trying;
    // the refusals do not end it. The publisher starts once the reader
    // said it waits: started as soon as the reader had connected, it
    // could open the channel before the reader's first attempt, and the
    // reader never waited (seen once in CI).
    let said = Arc::new(Mutex::new(String::new()));
    let reading = {
        let said = said.clone();
        let mut err = sub.0.as_mut().unwrap().stderr.take().unwrap();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 1024];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                said.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    let start = std::time::Instant::now();
    while !said.lock().unwrap().contains("waiting for a publisher on chan.wait") {
        assert!(start.elapsed() < PATIENCE, "the reader never said it waits: {:?}", said.lock().unwrap());
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // Lines of standard input are messages; --wait-readers holds them
    // until the reader is in.
    let mut cmd = Command::new(SHMBUSCTL);
    cmd.args(["--address", &b.address, "pub", "--channel", "chan.wait", "--wait-readers", "1"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"one\ntwo\nthree\n").unwrap();
    }
    let publisher = ChildGuard(Some(child)).wait_output();
    assert!(publisher.status.success(), "{}", stderr(&publisher));
    let out = sub.wait_output();
    reading.join().unwrap();
    let err = said.lock().unwrap().clone();
    assert!(out.status.success(), "{err}");
    assert_eq!(stdout(&out), "chan.wait one\nchan.wait two\nchan.wait three\n");
    assert_eq!(err.matches("waiting for a publisher on chan.wait").count(), 1, "{err}");
}

#[test]
fn ctl_sub_channel_gives_up_after_its_timeout() {
    let b = Broker::start("chantimeout");
    let out = b.ctl(&["sub", "--channel", "chan.none", "--timeout", "0.2"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("waiting for a publisher on chan.none"), "{err}");
    assert!(err.contains("no publisher opened the channel chan.none within 0.2 s"), "{err}");
}

#[test]
fn ctl_status_json_is_one_typed_object_with_its_channels() {
    let b = Broker::start("statusjson");
    let c = b.client();
    let _publisher = c.channel_publisher("chan.status", shmbus::ChannelConfig::default()).unwrap();
    c.publish("x", b"abc").unwrap();
    c.flush().unwrap();
    let out = b.ctl(&["status", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 1, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(v["msgs_in"].is_u64() && v["uptime_ms"].is_u64() && v["clients"].is_u64(), "{v}");
    assert_eq!(v["address"], b.address.as_str());
    let channels = v["channels"].as_array().unwrap();
    assert_eq!(channels.len(), 1, "{v}");
    assert_eq!(channels[0]["topic"], "chan.status");
    assert_eq!(channels[0]["slot_size"], 1024);
    assert!(channels[0]["readers"].is_u64(), "{v}");
}

#[test]
fn ctl_pub_file_of_megabytes_arrives_byte_exact_by_memfd() {
    let b = Broker::start("bigfile");
    let dir = TempDir::new("cli-big");
    let file = dir.join("blob");
    let blob: Vec<u8> = (0..(3u32 << 20) + 12345).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(&file, &blob).unwrap();

    let probe = b.client();
    let mut cmd = Command::new(SHMBUSCTL);
    cmd.args(["--address", &b.address, "--json", "sub", "big", "--count", "2"]);
    let meta = spawn_guarded(cmd);
    let mut cmd = Command::new(SHMBUSCTL);
    cmd.args(["--address", &b.address, "sub", "big", "--raw", "--count", "2"]);
    let raw = spawn_guarded(cmd);
    wait_subscribers(&probe, "big", 2);
    let out = b.ctl(&["pub", "big", "--file", file.to_str().unwrap(), "--count", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = raw.wait_output();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout.len(), 2 * blob.len());
    assert!(out.stdout == [blob.clone(), blob.clone()].concat());
    // It went as a memfd, the one sealed memfd both times.
    let out = meta.wait_output();
    for line in stdout(&out).lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["size"], blob.len());
    }
    let stats = probe.stats().unwrap();
    assert_eq!(stats.msgs_in, 2);
}

#[test]
fn ctl_completions_and_man_pages_need_no_broker() {
    let nowhere = unique_address("nowhere");
    let out = ctl_at(&nowhere, &["completions", "bash"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("_shmbusctl"));
    for shell in ["zsh", "fish"] {
        let out = ctl_at(&nowhere, &["completions", shell]);
        assert!(out.status.success() && stdout(&out).contains("shmbusctl"), "{shell}");
    }
    let out = ctl_at(&nowhere, &["man"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(".TH shmbusctl 1"), "{}", stdout(&out));

    // A directory of its own that --out makes.
    let tmp = TempDir::new("cli-man");
    let dir = tmp.join("man1");
    let out = ctl_at(&nowhere, &["man", "--out", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    for page in ["shmbusctl.1", "shmbusctl-pub.1", "shmbusctl-sub.1", "shmbusctl-policy-check.1"] {
        let text = std::fs::read_to_string(dir.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.contains(".TH"), "{page}");
    }
    let sub = std::fs::read_to_string(dir.join("shmbusctl-sub.1")).unwrap();
    assert!(sub.contains("sensors.>"), "{sub}");
}

#[test]
fn ctl_help_has_examples_for_every_command_and_the_pattern_syntax() {
    let out = run_bounded({
        let mut c = Command::new(SHMBUSCTL);
        c.arg("--help");
        c
    });
    let text = stdout(&out);
    assert!(text.contains("Examples:") && text.contains("`*` for exactly one token"), "{text}");
    let commands = [
        "ping",
        "status",
        "clients",
        "topics",
        "pub",
        "sub",
        "call",
        "serve",
        "names",
        "monitor",
        "completions",
        "man",
    ];
    for command in commands {
        let out = run_bounded({
            let mut c = Command::new(SHMBUSCTL);
            c.args([command, "--help"]);
            c
        });
        assert!(out.status.success(), "{command}");
        let text = stdout(&out);
        assert!(text.contains("Examples:\n  shmbusctl"), "{command} --help lacks examples:\n{text}");
    }
    let out = run_bounded({
        let mut c = Command::new(SHMBUSCTL);
        c.args(["sub", "--help"]);
        c
    });
    let text = stdout(&out);
    assert!(text.contains("`*` (exactly one token)") && text.contains("`>` (one or more tokens)"), "{text}");
    assert!(text.contains("Example: --count 1"), "{text}");
}

#[test]
fn ctl_policy_check_takes_user_and_group_names() {
    let b = Broker::start("policynames");
    let out = b.ctl(&["--json", "policy", "check", "--uid", "root", "--gid", "root", "publish", "x.y"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!((v["uid"].as_u64(), v["gids"][0].as_u64()), (Some(0), Some(0)), "{v}");
    let out = b.ctl(&["policy", "check", "--uid", "no-such-user-here", "publish", "x.y"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("no user named"), "{}", stderr(&out));
}
