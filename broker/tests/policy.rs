//! The policy file, enforced on real clients of other uids and groups.
//!
//! Each client is an *agent*: this test binary re-run (as
//! `agent_process`) under another uid, gid and supplementary groups with
//! `setpriv`, so the broker reads real credentials and groups from the
//! kernel (`SO_PEERCRED`, `SO_PEERGROUPS`). The test drives it line by
//! line on its stdin (`sub ID PATTERN`, `pub SUBJECT DATA`, ...) and reads
//! one answer per line: `ok ...`, `denied ...` (an error of kind
//! `Denied`), or `error ...`. Needs root (skipped otherwise).

mod common;

use std::io::{BufRead, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use shmbus::{ChannelConfig, Client, ErrorKind, Event};

const ADDR: &str = "SHMBUS_AGENT_ADDR";
const SAY: &str = "AGENT:";

/// What an operation's result looks like on the agent's stdout.
fn answer<T>(r: Result<T, impl std::fmt::Display>, kind: impl Fn() -> ErrorKind) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) if kind() == ErrorKind::Denied => format!("denied {e}"),
        Err(e) => format!("error {e}"),
    }
}

macro_rules! verdict {
    ($r:expr) => {{
        let r = $r;
        let kind = r.as_ref().err().map(|e| e.kind());
        answer(r, || kind.unwrap())
    }};
}

/// Not a test on its own: the agent's body, run only when a test spawns
/// this binary with `--ignored --exact agent_process`.
#[test]
#[ignore = "helper process body, spawned by the other tests"]
fn agent_process() {
    let addr = std::env::var(ADDR).expect("set by the parent");
    let client = match Client::options().address(shmbus::Address::parse(&addr).unwrap()).connect() {
        Ok(c) => c,
        Err(e) => {
            let kind = if e.kind() == ErrorKind::Denied { "denied" } else { "error" };
            println!("{SAY}0 {kind} {e}");
            return;
        }
    };
    println!("{SAY}0 ok {}", client.id());
    let mut subs = std::collections::HashMap::new();
    // What ended each service this agent ran, as its thread saw it.
    let ended = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut channels = Vec::new();
    let mut readers = Vec::new();
    for (n, line) in std::io::stdin().lock().lines().enumerate() {
        let line = line.unwrap();
        let words: Vec<&str> = line.split_whitespace().collect();
        let reply = match words[..] {
            ["sub", id, pattern] => match client.subscribe(pattern) {
                Ok(s) => {
                    subs.insert(id.to_owned(), s);
                    "ok".into()
                }
                Err(e) => verdict!(Err::<(), _>(e)),
            },
            ["recv", id] => match subs[id].recv_timeout(Duration::from_millis(500)) {
                Ok(Some(Event::Message(m))) => {
                    format!("ok {} {}", m.topic(), String::from_utf8_lossy(m.payload()))
                }
                Ok(Some(Event::Gap { missed })) => format!("ok gap {missed}"),
                Ok(Some(Event::Reconnected)) => "ok reconnected".into(),
                Ok(None) => "ok none".into(),
                Err(e) => verdict!(Err::<(), _>(e)),
            },
            ["pub", subject, data] => {
                let r = client.publish(subject, data.as_bytes());
                match r {
                    Err(e) => verdict!(Err::<(), _>(e)),
                    Ok(()) => verdict!(client.flush()),
                }
            }
            ["own", name] => match client.serve(name) {
                Ok(service) => {
                    let name = name.to_owned();
                    let ended = ended.clone();
                    std::thread::spawn(move || {
                        for req in &service {
                            match req {
                                Ok(r) => {
                                    let echo = r.payload().to_vec();
                                    let _ = r.reply(&echo);
                                }
                                Err(e) => {
                                    ended.lock().unwrap().push(format!("{name}: {e}"));
                                    return;
                                }
                            }
                        }
                    });
                    "ok".into()
                }
                Err(e) => verdict!(Err::<(), _>(e)),
            },
            ["call", name, data] => match client.request(name, data.as_bytes(), Duration::from_secs(5)) {
                Ok(r) => format!("ok {}", String::from_utf8_lossy(r.payload())),
                Err(e) => verdict!(Err::<(), _>(e)),
            },
            ["chanpub", topic] => match client.channel_publisher(topic, ChannelConfig::default()) {
                Ok(c) => {
                    channels.push(c);
                    "ok".into()
                }
                Err(e) => verdict!(Err::<(), _>(e)),
            },
            ["chanread", topic] => match client.channel_subscriber(topic) {
                Ok(c) => {
                    readers.push(c);
                    "ok".into()
                }
                Err(e) => verdict!(Err::<(), _>(e)),
            },
            ["chansend", data] => match channels.last_mut() {
                Some(c) => verdict!(c.publish(data.as_bytes())),
                None => "error no channel".into(),
            },
            ["chanrecv"] => {
                match readers.last_mut().map(|r| r.recv_vec_timeout(Duration::from_millis(500))) {
                    Some(Ok(Some(shmbus::ChannelEvent::Message { value, .. }))) => {
                        format!("ok {}", String::from_utf8_lossy(&value))
                    }
                    Some(Ok(Some(shmbus::ChannelEvent::Reconnected))) => panic!("unexpected reconnection"),
                    Some(Ok(Some(shmbus::ChannelEvent::Missed(n)))) => format!("ok missed {n}"),
                    Some(Ok(None)) => "ok none".into(),
                    Some(Err(e)) => verdict!(Err::<(), _>(e)),
                    None => "error no reader".into(),
                }
            }
            ["introspect"] => verdict!(client.clients()),
            ["ended"] => format!("ok {}", ended.lock().unwrap().join("; ")),
            ["monitor"] => match client.monitor(&[], false) {
                Ok(m) => {
                    std::mem::forget(m);
                    "ok".into()
                }
                Err(e) => verdict!(Err::<(), _>(e)),
            },
            _ => format!("error unknown command {line:?}"),
        };
        println!("{SAY}{} {reply}", n + 1);
    }
}

/// A running agent, answering commands.
struct Agent {
    helper: Helper,
    stdin: std::process::ChildStdin,
    sent: usize,
    /// The answer to connecting: `ok <client id>`, `denied ...`.
    pub connected: String,
}

impl Agent {
    /// An agent of `uid`, primary group `gid`, supplementary `groups`.
    fn spawn(b: &Broker, uid: u32, gid: u32, groups: &[u32]) -> Agent {
        let exe = world_readable_copy(std::env::current_exe().unwrap().to_str().unwrap());
        let mut cmd = Command::new("setpriv");
        cmd.arg(format!("--reuid={uid}")).arg(format!("--regid={gid}"));
        if groups.is_empty() {
            cmd.arg("--clear-groups");
        } else {
            let list: Vec<String> = groups.iter().map(u32::to_string).collect();
            cmd.arg(format!("--groups={}", list.join(",")));
        }
        cmd.arg("--")
            .arg(exe)
            .args(["--exact", "agent_process", "--ignored", "--nocapture", "--test-threads=1"])
            .env(ADDR, &b.address)
            .current_dir("/")
            .stdin(Stdio::piped());
        let mut helper = Helper::spawn(&mut cmd, SAY);
        let stdin = helper.child.0.as_mut().unwrap().stdin.take().unwrap();
        let connected = helper.expect("0 ");
        Agent { helper, stdin, sent: 0, connected }
    }

    /// Runs one command; its answer.
    fn run(&mut self, command: &str) -> String {
        self.sent += 1;
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
        self.helper.expect(&format!("{} ", self.sent))
    }

    /// Runs one command that must be allowed; the rest of its answer.
    fn ok(&mut self, command: &str) -> String {
        let a = self.run(command);
        assert!(a == "ok" || a.starts_with("ok "), "{command:?} should be allowed, got {a:?}");
        a.trim_start_matches("ok").trim().to_owned()
    }

    /// Runs one command that the policy must refuse.
    fn denied(&mut self, command: &str) -> String {
        let a = self.run(command);
        assert!(a.starts_with("denied "), "{command:?} should be denied by policy, got {a:?}");
        a
    }
}

fn write_policy(dir: &std::path::Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("policy.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// uids and groups of the agents; none of them needs to exist in
/// /etc/passwd, since the rules name them by number.
const READER: u32 = 4001;
const SENSOR: u32 = 4002;
const OUTSIDER: u32 = 4003;
const PLAIN: u32 = 4004;
const SENSORS_GROUP: u32 = 4100;

const POLICY: &str = r#"
# Everyone may connect, read public subjects and call public services.
[[rule]]
match = {}
allow = ["connect", "subscribe public.>", "call svc.public.>", "channel-read public.>"]

# The sensors group (a supplementary group of its members) publishes.
[[rule]]
match = { gid = 4100 }
allow = ["publish sensors.>", "subscribe sensors.>", "own svc.>", "channel-publish public.>",
         "channel-publish sensors.>"]
deny = ["publish sensors.secret.>"]

[[rule]]
match = { uid = 4001 }
allow = ["monitor", "introspect"]

[[rule]]
match = { uid = 4003 }
deny = ["connect"]
"#;

#[test]
fn each_action_is_allowed_or_denied_by_uid_and_supplementary_group() {
    if !is_root() {
        eprintln!("skipped: needs root to run clients as other uids");
        return;
    }
    let dir = TempDir::new("policy-actions");
    let path = write_policy(&dir, POLICY);
    let b = Broker::start_with("policy-actions", &["--policy", path.to_str().unwrap()]);
    let root = b.client();

    let mut reader = Agent::spawn(&b, READER, READER, &[]);
    let mut sensor = Agent::spawn(&b, SENSOR, SENSOR, &[SENSORS_GROUP]);
    // The same as `sensor` but without the supplementary group.
    let mut plain = Agent::spawn(&b, PLAIN, PLAIN, &[]);
    let outsider = Agent::spawn(&b, OUTSIDER, OUTSIDER, &[]);
    assert!(outsider.connected.starts_with("denied "), "uid 4003 must be refused: {}", outsider.connected);
    assert!(outsider.connected.contains("connect"), "{}", outsider.connected);

    // Subscribing: every subject the pattern can match must be allowed.
    reader.ok("sub p public.>");
    reader.ok("sub pn public.news.*");
    let e = reader.denied("sub all >");
    assert!(e.contains("subscribe >"), "the refusal names action and pattern: {e}");
    reader.denied("sub s sensors.>");
    reader.denied("sub pp *.news");
    // `$SYS` events are subjects like any other.
    reader.denied("sub sys $SYS.name.>");

    // Publishing, with a deny carved out of the group's allow.
    sensor.ok("sub s sensors.>");
    sensor.ok("pub sensors.kitchen.temp 21");
    let e = sensor.denied("pub sensors.secret.key 42");
    assert!(e.contains("line") && e.contains("deny publish sensors.secret.>"), "names its rule: {e}");
    reader.denied("pub sensors.kitchen.temp 21");
    // Without the supplementary group, the same request is refused.
    plain.denied("pub sensors.kitchen.temp 21");

    // A message on an allowed subject arrives; the refused publishes
    // never reach anyone.
    root.publish("public.news.today", b"hello").unwrap();
    root.flush().unwrap();
    assert_eq!(reader.ok("recv p"), "public.news.today hello");
    assert_eq!(reader.ok("recv pn"), "public.news.today hello");
    assert_eq!(sensor.ok("recv s"), "sensors.kitchen.temp 21", "only the allowed publish was routed");
    assert_eq!(sensor.ok("recv s"), "none");

    // Names and calls.
    sensor.ok("own svc.public.echo");
    sensor.ok("own svc.private.echo");
    reader.denied("own svc.reader");
    assert_eq!(reader.ok("call svc.public.echo hi"), "hi");
    let e = reader.denied("call svc.private.echo hi");
    assert!(e.contains("call svc.private.echo"), "{e}");

    // Channels.
    sensor.ok("chanpub public.cam");
    reader.ok("chanread public.cam");
    reader.denied("chanpub public.cam2");
    sensor.ok("chanpub sensors.raw");
    reader.denied("chanread sensors.raw");

    // Monitor and introspection.
    reader.ok("introspect");
    reader.ok("monitor");
    sensor.denied("introspect");
    sensor.denied("monitor");
    plain.denied("introspect");

    // Every refusal was counted.
    assert!(root.stats().unwrap().policy_denials >= 14, "{:?}", root.stats().unwrap());
}

#[test]
fn a_reload_revokes_what_it_no_longer_allows_and_a_broken_file_keeps_the_old_rules() {
    if !is_root() {
        eprintln!("skipped: needs root to run clients as other uids");
        return;
    }
    let dir = TempDir::new("policy-reload");
    let path = write_policy(
        &dir,
        r#"
[[rule]]
match = {}
allow = ["connect", "subscribe public.>", "own svc.>", "channel-publish public.>", "channel-read public.>"]
"#,
    );
    let b = Broker::launch(
        "policy-reload",
        Launch::new().args(&["--policy", path.to_str().unwrap()]).capture_log(),
    );
    let root = b.client();
    let mut a = Agent::spawn(&b, READER, READER, &[]);
    a.ok("sub p public.>");
    a.ok("sub n public.news.>");
    a.ok("own svc.a");
    a.ok("chanpub public.cam");
    let mut watcher = Agent::spawn(&b, PLAIN, PLAIN, &[]);
    watcher.ok("chanread public.cam");
    a.ok("chansend frame-1");
    assert_eq!(watcher.ok("chanrecv"), "frame-1");

    // A file that does not parse: logged with its line, the old rules stay.
    std::fs::write(&path, "[[rule]]\nmatch = {}\nallow = [\"connect\", \"subscribe public.>\"\n").unwrap();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(b.pid() as i32).unwrap(),
        rustix::process::Signal::HUP,
    )
    .unwrap();
    let log = b.wait_log("policy not reloaded");
    assert!(log.contains("line "), "the error names the line: {log}");
    root.publish("public.news.a", b"1").unwrap();
    root.flush().unwrap();
    assert_eq!(a.ok("recv p"), "public.news.a 1", "the old rules are still in force");
    assert_eq!(a.ok("recv n"), "public.news.a 1");
    assert_eq!(root.request("svc.a", b"x", Duration::from_secs(5)).unwrap().payload(), b"x");

    // A good file that allows less: what it no longer allows is ended,
    // each with a notice; what it allows goes on.
    std::fs::write(
        &path,
        r#"
[[rule]]
match = {}
allow = ["connect", "subscribe public.news.>", "channel-read public.>"]
"#,
    )
    .unwrap();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(b.pid() as i32).unwrap(),
        rustix::process::Signal::HUP,
    )
    .unwrap();
    let e = a.run("recv p");
    assert!(e.starts_with("denied ") && e.contains("revoked") && e.contains("subscribe public.>"), "{e}");
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let ended = a.ok("ended");
        if ended.contains("svc.a") {
            assert!(ended.contains("revoked") && ended.contains("own svc.a"), "{ended}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the service never heard its name was revoked");
        std::thread::sleep(Duration::from_millis(20));
    }
    root.publish("public.news.b", b"2").unwrap();
    root.flush().unwrap();
    assert_eq!(a.ok("recv n"), "public.news.b 2", "an allowed subscription goes on");
    a.denied("sub p2 public.>");
    a.denied("own svc.a");
    // The channel closed for every member: its publisher may no longer
    // publish, its reader (which may still read the topic) is told why
    // the channel ended.
    let e = a.denied("chansend frame-2");
    assert!(e.contains("channel-publish public.cam"), "{e}");
    let e = watcher.denied("chanrecv");
    assert!(e.contains("policy reloaded"), "{e}");
    // Reading the topic is still allowed; the channel is gone.
    let e = watcher.run("chanread public.cam");
    assert!(e.starts_with("error ") && e.contains("no channel"), "{e}");
    let owner = root.name_owner("svc.a").unwrap();
    assert_eq!(owner, None, "the revoked name was released");
}

/// `shmbusctl policy check` says what the broker then does.
#[test]
fn policy_check_agrees_with_what_the_broker_enforces() {
    if !is_root() {
        eprintln!("skipped: needs root to run clients as other uids");
        return;
    }
    let dir = TempDir::new("policy-check");
    let path = write_policy(&dir, POLICY);
    let b = Broker::start_with("policy-check", &["--policy", path.to_str().unwrap()]);
    let mut sensor = Agent::spawn(&b, SENSOR, SENSOR, &[SENSORS_GROUP]);
    let mut reader = Agent::spawn(&b, READER, READER, &[]);
    sensor.ok("own svc.public.x");
    let cases: &[(&str, &str, &str, &str)] = &[
        // (who, action, subject, agent command)
        ("sensor", "publish", "sensors.a", "pub sensors.a 1"),
        ("sensor", "publish", "sensors.secret.a", "pub sensors.secret.a 1"),
        ("sensor", "subscribe", "sensors.>", "sub c1 sensors.>"),
        ("sensor", "subscribe", ">", "sub c2 >"),
        ("sensor", "introspect", "", "introspect"),
        ("reader", "subscribe", "public.>", "sub c3 public.>"),
        ("reader", "subscribe", "public.*.x", "sub c4 public.*.x"),
        ("reader", "subscribe", "*.x", "sub c5 *.x"),
        ("reader", "publish", "sensors.a", "pub sensors.a 1"),
        ("reader", "call", "svc.public.x", "call svc.public.x 1"),
        ("reader", "own", "svc.r", "own svc.r"),
        ("reader", "monitor", "", "monitor"),
        ("reader", "channel-read", "public.cam", "chanread public.cam"),
    ];
    sensor.ok("chanpub public.cam");
    for &(who, action, subject, command) in cases {
        let (agent, uid, gids) = match who {
            "sensor" => (&mut sensor, SENSOR, format!("{SENSOR},{SENSORS_GROUP}")),
            _ => (&mut reader, READER, READER.to_string()),
        };
        let mut args = vec!["policy", "check", "--uid"];
        let uid = uid.to_string();
        args.push(&uid);
        let gid_args: Vec<String> = gids.split(',').map(str::to_owned).collect();
        for g in &gid_args {
            args.push("--gid");
            args.push(g);
        }
        args.push(action);
        if !subject.is_empty() {
            args.push(subject);
        }
        let out = b.ctl(&args);
        let said = stdout(&out);
        let enforced = agent.run(command);
        let says_allow = said.starts_with("allow");
        assert!(said.starts_with("allow") || said.starts_with("deny"), "{args:?}: {said} {}", stderr(&out));
        assert_eq!(out.status.code(), Some(if says_allow { 0 } else { 1 }), "{args:?}: exit status");
        assert_eq!(
            says_allow,
            !enforced.starts_with("denied"),
            "{who} {action} {subject}: policy check said {said:?}, the broker did {enforced:?}"
        );
    }
}

/// A monitor with the right sees a call between two other clients; one
/// without it is refused.
#[test]
fn a_monitor_sees_a_call_between_others_and_needs_the_right() {
    if !is_root() {
        eprintln!("skipped: needs root to run clients as other uids");
        return;
    }
    let dir = TempDir::new("policy-monitor");
    let path = write_policy(&dir, POLICY);
    let b = Broker::start_with("policy-monitor", &["--policy", path.to_str().unwrap()]);

    let refused = b.ctl_as(&["monitor"], Some(SENSOR));
    assert!(!refused.status.success(), "a monitor without the right must fail");
    assert!(stderr(&refused).to_lowercase().contains("denied"), "{}", stderr(&refused));

    let mut cmd = command_as(SHMBUSCTL, READER);
    cmd.args(["--address", &b.address, "monitor", "--json", "svc.>"]).stdout(Stdio::piped());
    let mut monitor = spawn_guarded(cmd);
    let out = monitor.0.as_mut().unwrap().stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The monitor is live once the broker lists its subscription.
    let root = b.client();
    let deadline = std::time::Instant::now() + PATIENCE;
    while !root.clients().unwrap().iter().any(|c| c.uid == READER && !c.subscriptions.is_empty()) {
        assert!(std::time::Instant::now() < deadline, "the monitor never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut sensor = Agent::spawn(&b, SENSOR, SENSOR, &[SENSORS_GROUP]);
    sensor.ok("own svc.public.echo");
    let mut caller = Agent::spawn(&b, PLAIN, PLAIN, &[]);
    assert_eq!(caller.ok("call svc.public.echo ping-42"), "ping-42");
    let (mut request, mut reply) = (None, None);
    let deadline = std::time::Instant::now() + PATIENCE;
    while request.is_none() || reply.is_none() {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .expect("the monitor saw the request and its answer");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["subject"] == "svc.public.echo"
            && v["kind"].as_str().is_some_and(|k| k.eq_ignore_ascii_case("request"))
        {
            request = Some(v);
        } else if v["subject"] == "svc.public.echo"
            && v["kind"].as_str().is_some_and(|k| k.eq_ignore_ascii_case("answer"))
        {
            reply = Some(v);
        }
    }
    let request = request.unwrap();
    assert_eq!(request["sender"]["uid"], PLAIN, "{request}");
    assert!(request["payload"].as_str().unwrap().contains("ping-42"), "{request}");
    let reply = reply.unwrap();
    assert_eq!(reply["sender"]["uid"], SENSOR, "{reply}");
}

#[test]
fn a_bad_policy_file_stops_the_broker_at_start_with_its_line() {
    let dir = TempDir::new("policy-bad");
    let path = write_policy(&dir, "[[rule]]\nmatch = {}\nallow = [\"connect\", \"fly away\"]\n");
    let out = run_bounded({
        let mut c = Command::new(SHMBUSD);
        c.args(["--address", &unique_address("policy-bad"), "--policy", path.to_str().unwrap()]);
        c
    });
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("line 3"), "{}", stderr(&out));
}

/// A monitor that does not read loses events, counted as gaps; the bus
/// does not wait for it and nobody else loses anything.
#[test]
fn a_slow_monitor_loses_events_as_gaps_and_the_bus_goes_on() {
    const ROUNDS: u64 = 40;
    const PER_ROUND: u64 = 500;
    let b = Broker::start_with("policy-slow-monitor", &["--queue-frames", "4096"]);
    let watcher = b.client();
    let monitor = watcher.monitor(&["flood.>"], false).unwrap();
    let sub_client = b.client();
    let sub = sub_client.subscribe("flood.>").unwrap();
    let publisher = b.client();
    let mut got = 0u64;
    for round in 0..ROUNDS {
        for i in 0..PER_ROUND {
            publisher.publish("flood.x", (round * PER_ROUND + i).to_le_bytes()).unwrap();
        }
        publisher.flush().unwrap();
        for _ in 0..PER_ROUND {
            match next_event(&sub) {
                Event::Message(m) => assert_eq!(m.payload(), &got.to_le_bytes(), "in order, none lost"),
                Event::Gap { missed } => panic!("the subscriber lost {missed} because of the monitor"),
                Event::Reconnected => panic!("no reconnection here"),
            }
            got += 1;
        }
    }
    // Now read the monitor: every publish is an event or counted in a gap.
    let (mut events, mut missed) = (0u64, 0u64);
    while events + missed < ROUNDS * PER_ROUND {
        match monitor.recv_timeout(PATIENCE).unwrap().expect("the monitor's events or gaps") {
            // The subscriber's own subscription shows too.
            shmbus::MonitorItem::Event(e) if e.kind == shmbus::MonitorKind::Subscribe => {}
            shmbus::MonitorItem::Event(e) => {
                assert_eq!(e.kind, shmbus::MonitorKind::Publish);
                assert_eq!(e.subject, "flood.x");
                assert_eq!(e.receivers, vec![sub_client.id()]);
                events += 1;
            }
            shmbus::MonitorItem::Gap { missed: m } => missed += m,
            shmbus::MonitorItem::Reconnected => panic!("no reconnection here"),
        }
    }
    assert_eq!(events + missed, ROUNDS * PER_ROUND);
    assert!(missed > 0, "a monitor that never read must have lost events");
    assert!(events >= 4000, "its queue's worth arrived: {events}");
}

fn next_event(sub: &shmbus::Subscription) -> Event {
    sub.recv_timeout(PATIENCE).unwrap().expect("a message within PATIENCE")
}

/// The commented default policy the system unit ships loads, and says
/// what it says: everyone may connect and follow name events, not more.
#[test]
fn the_shipped_system_policy_loads_and_holds() {
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/policy.toml");
    let b = Broker::start_with("policy-shipped", &["--policy", shipped.to_str().unwrap()]);
    let root = b.client();
    let verdict = root.policy_check(4242, &[], "connect", "").unwrap();
    assert!(verdict.allowed, "{verdict:?}");
    let verdict = root.policy_check(4242, &[], "subscribe", "$SYS.name.>").unwrap();
    assert!(verdict.allowed, "{verdict:?}");
    for (action, subject) in [("subscribe", ">"), ("publish", "a.b"), ("own", "pub.x"), ("monitor", "")] {
        let verdict = root.policy_check(4242, &[], action, subject).unwrap();
        assert!(!verdict.allowed, "{action} {subject}: {verdict:?}");
    }
    if is_root() {
        let mut a = Agent::spawn(&b, READER, READER, &[]);
        a.ok("sub sys $SYS.name.>");
        a.denied("sub all >");
        a.denied("pub a.b 1");
    }
}

/// Without a policy file, monitoring (which shows requests and replies
/// between other clients) is for root and the broker's uid only; another
/// admitted uid may still do everything else.
#[test]
fn without_a_policy_file_only_the_privileged_may_monitor() {
    if !is_root() {
        eprintln!("skipped: needs root to run clients as other uids");
        return;
    }
    let b = Broker::start_with("policy-none-monitor", &["--allow-uid", "4001"]);
    let refused = b.ctl_as(&["monitor"], Some(READER));
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("only root and the broker's uid may monitor"), "{}", stderr(&refused));
    let mut a = Agent::spawn(&b, READER, READER, &[]);
    a.denied("monitor");
    a.ok("sub all >");
    a.ok("introspect");
    a.ok("pub x.y 1");
    let root = b.client();
    let m = root.monitor(&[], false).unwrap();
    drop(m);
}
