//! shmbusctl: talk to a shmbus broker from the shell.
//!
//! Every string a client chose (its name and command, patterns, topics,
//! channel topics) goes through `shmbus_proto::text::escape` before it is
//! printed for people, so no name can forge a line or drive the terminal.
//! `--json` output is left to JSON's own escaping. Lists of clients,
//! topics and channels are fetched a page at a time and printed as each
//! page arrives, so a huge bus never has to fit in memory at once.
//!
//! Services: `call` makes one call and prints its answer, `serve` owns a
//! name and answers every request (echoing, or running a shell command per
//! request), `names` lists the names. See `call --help` and `serve --help`
//! for their exit codes and what a command run by `serve --exec` gets.
//!
//! Administration: `monitor` prints every event the broker sees (publishes,
//! requests, answers, refusals, connects...) as it happens, and `policy
//! check` asks how the broker's policy decides an action for a uid. Both
//! need the broker's rights (`monitor`, `introspect`); without a policy
//! file everyone admitted has them.

#![forbid(unsafe_code)]

use std::io::{BufRead, IsTerminal, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use serde::Serialize;
use serde_json::json;
use shmbus::{
    reply_code, Address, BusEvent, CallError, ChannelEvent, ChannelInfo, Client, ClientInfo, ErrorCode,
    Event, Message, MonitorError, MonitorItem, MonitorKind, NameFlags, NameFlagsExt, NameInfo, RecvError,
    Reply, ReplyError, Request, RequestError, Service, Stats, SubscribeError, Subscription, TopicInfo,
};
use shmbus_proto::text::escape;

/// Command-line tool for the shmbus message bus.
///
/// Subjects (topics, names) are dot-separated tokens: `sensors.kitchen.temp`.
/// Subscription patterns may use `*` for exactly one token and `>` for
/// all the rest: `sensors.*.temp`, `sensors.>`.
#[derive(Parser, Debug)]
#[command(name = "shmbusctl", version, after_help = MAIN_EXAMPLES)]
struct Args {
    /// Bus address: `@name` (abstract socket, no file) or a socket file's
    /// path. Default: $SHMBUS_ADDRESS, else the user bus `@shmbus.<uid>`.
    /// Example: --address @shmbus.1000
    #[arg(long, global = true, value_name = "ADDR")]
    address: Option<Address>,
    /// Use the system bus, `@shmbus`.
    #[arg(long, global = true, conflicts_with = "address")]
    system: bool,
    /// Machine-readable output: one JSON object per line.
    #[arg(long, global = true)]
    json: bool,
    /// End when the connection to the broker is lost, instead of making
    /// it again (`sub`, `serve` and `monitor` otherwise keep going across
    /// a broker restart, with a notice on stderr).
    #[arg(long, global = true)]
    no_reconnect: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Round trip to the broker: its pid and uid, and the time it took.
    ///
    /// --wait SECS keeps trying to reach the broker for up to SECS seconds
    /// first (for scripts that have just started one).
    #[command(
        after_help = "Examples:\n  shmbusctl ping\n  shmbusctl ping --count 5 --json\n  shmbusd & shmbusctl ping --wait 10"
    )]
    Ping {
        /// Round trips to make. Example: --count 5
        #[arg(long, short = 'c', default_value_t = 1)]
        count: u32,
        /// Seconds to keep trying while no broker listens yet. Example: --wait 10
        #[arg(long, value_name = "SECS", value_parser = parse_secs)]
        wait: Option<Duration>,
    },
    /// Broker counters, and its ring channels.
    ///
    /// --json: one object, the counters as numbers and `channels` a list
    /// of objects (id, topic, publisher, readers, slot_size, slot_count,
    /// overflow, published, overruns).
    #[command(after_help = "Examples:\n  shmbusctl status\n  shmbusctl status --json | jq .msgs_in")]
    Status,
    /// Connected clients.
    #[command(after_help = "Examples:\n  shmbusctl clients\n  shmbusctl clients --json")]
    Clients,
    /// Subscribed patterns and their subscriber counts.
    #[command(after_help = "Examples:\n  shmbusctl topics")]
    Topics,
    /// Publish DATA (or --file, or standard input) to TOPIC.
    ///
    /// With neither DATA nor --file, the payload is standard input, read
    /// to its end (refused if standard input is a terminal, unless
    /// --channel). --file sends
    /// the file by sealed memfd, copied from the file a piece at a time, so
    /// even a huge file costs little memory; subscribers map the same pages.
    ///
    /// --channel publishes into the ring channel TOPIC instead (opening it,
    /// as its one publisher): DATA is one message (--count times); without
    /// DATA each line of standard input is one message (without its
    /// newline) as it arrives, until end of input; --file is one message.
    /// A message must fit a slot (--slot-size). The channel closes when
    /// shmbusctl exits; readers that joined after a message was written do
    /// not see it, so --wait-readers N waits for N readers first.
    ///
    /// Nothing is kept for subscribers that come later (as in NATS):
    /// --wait-subscribers N waits until N subscriptions match TOPIC before
    /// publishing, for scripts that have just started a subscriber.
    #[command(after_help = PUB_EXAMPLES)]
    Pub {
        /// The topic: a subject without wildcards. Example: sensors.kitchen.temp
        topic: String,
        /// The payload, as given (UTF-8 text). Example: 21.5
        data: Option<String>,
        /// Send this file's bytes. Example: --file ./report.pdf
        #[arg(long, short = 'f', value_name = "PATH", conflicts_with = "data")]
        file: Option<std::path::PathBuf>,
        /// Publish it this many times. Example: --count 1000
        #[arg(long, short = 'c', default_value_t = 1)]
        count: u64,
        /// Publish into the ring channel TOPIC (see above).
        #[arg(long)]
        channel: bool,
        /// --channel: largest message, in bytes (the channel's slot size).
        #[arg(long, value_name = "BYTES", default_value_t = 1024, requires = "channel")]
        slot_size: u32,
        /// --channel: messages the ring holds before the oldest is overwritten.
        #[arg(long, value_name = "N", default_value_t = 1024, requires = "channel")]
        slots: u32,
        /// --channel: wait until this many readers have opened the channel
        /// before publishing (bounded by --timeout).
        #[arg(long, value_name = "N", default_value_t = 0, requires = "channel")]
        wait_readers: usize,
        /// Wait until this many subscriptions match TOPIC before publishing
        /// (bounded by --timeout). Example: --wait-subscribers 1
        #[arg(long, value_name = "N", default_value_t = 0, conflicts_with = "channel")]
        wait_subscribers: u64,
        /// Seconds to wait for --wait-readers or --wait-subscribers.
        #[arg(long, short = 't', value_name = "SECS", default_value = "30", value_parser = parse_secs)]
        timeout: Duration,
    },
    /// Print messages matching PATTERN(s): `TOPIC PAYLOAD` per line.
    ///
    /// A pattern is a subject whose tokens may be `*` (exactly one token)
    /// or, last, `>` (one or more tokens): `sensors.*.temp` matches
    /// `sensors.kitchen.temp`; `sensors.>` matches everything under
    /// `sensors`.
    ///
    /// A payload is printed as text if it is UTF-8, with control
    /// characters escaped (`\n`, `\e`, `\u{0}`), else byte by byte with
    /// `\xNN` escapes, so each message is one line and nothing drives the
    /// terminal. --hex prints every payload in hex; --raw writes the bytes
    /// exactly as received (no topic, no newline); --json prints one object
    /// per message (topic, seq, size, sender, origin (null unless the
    /// publisher gave one, as shmbus-bridge does), and payload if it is
    /// UTF-8, else payload_hex).
    ///
    /// --channel reads the ring channel TOPIC (one plain subject) instead;
    /// if it has no publisher yet, it waits for one (up to --timeout).
    #[command(after_help = SUB_EXAMPLES)]
    Sub {
        /// Subject patterns (`*` one token, `>` the rest). Example: 'sensors.>'
        #[arg(required = true, value_name = "PATTERN")]
        patterns: Vec<String>,
        /// Exit after this many messages. Example: --count 1
        #[arg(long, short = 'c')]
        count: Option<u64>,
        /// Write payload bytes only, exactly as received.
        #[arg(long, conflicts_with_all = ["json", "hex"])]
        raw: bool,
        /// Print payloads in hex.
        #[arg(long, conflicts_with = "json")]
        hex: bool,
        /// Read the ring channel named by the one PATTERN (a plain subject)
        /// instead of subscribing.
        #[arg(long)]
        channel: bool,
        /// --channel: seconds to wait for the channel's publisher to appear
        /// (default: for ever).
        #[arg(long, short = 't', value_name = "SECS", value_parser = parse_secs, requires = "channel")]
        timeout: Option<Duration>,
    },
    /// Call the service NAME with DATA and print its reply.
    ///
    /// The payload is DATA, or the bytes of --file (`--file -`: standard
    /// input), or empty. The reply is printed as text (escaped; a final
    /// newline is not shown), as exact bytes (--raw), or as one JSON object
    /// (--json: `name`, `responder`, `size`, and `payload` if it is UTF-8,
    /// else `payload_hex`; a call that failed prints `name`, `error`, `code`
    /// and `message` instead).
    ///
    /// Exit status: 0 the reply came; 3 the service answered an
    /// application error; 4 no responder, or the service went away without
    /// answering; 5 timed out; 1 anything else (refused, invalid, no bus).
    /// A call to a name imported by shmbus-bridge that fails on the far
    /// side exits the same way (4, 5, or 3).
    #[command(after_help = CALL_EXAMPLES)]
    Call {
        /// The name called (a subject without wildcards). Example: svc.echo
        name: String,
        /// The request's payload, as given. Example: hello
        data: Option<String>,
        /// Send this file's bytes (`-`: standard input). Example: --file req.json
        #[arg(long, short = 'f', value_name = "PATH", conflicts_with = "data")]
        file: Option<PathBuf>,
        /// Seconds to wait for the answer (the broker enforces it, capped at
        /// its --max-request-timeout-ms, 60 s by default).
        #[arg(long, short = 't', value_name = "SECS", default_value = "5", value_parser = parse_secs)]
        timeout: Duration,
        /// Write the reply's bytes only, exactly as received.
        #[arg(long, conflicts_with = "json")]
        raw: bool,
        /// Wait (up to --timeout) until someone owns NAME before calling,
        /// for scripts that have just started the service.
        #[arg(long)]
        wait_owner: bool,
    },
    /// Own the name NAME and answer every request to it.
    ///
    /// --exec runs `sh -c CMD` once per request, in its own process group,
    /// with the payload on standard input and these in its environment:
    /// SHMBUS_NAME, SHMBUS_SERIAL, SHMBUS_TIMEOUT_MS, SHMBUS_EXPECTS_REPLY
    /// (1 or 0 for a fire-and-forget send) and the caller as the broker saw
    /// it: SHMBUS_SENDER_ID, SHMBUS_SENDER_UID, SHMBUS_SENDER_GID,
    /// SHMBUS_SENDER_PID. Exit status 0: its standard output is the reply.
    /// Otherwise the reply is an application error whose code is the exit
    /// status and whose message is the first line of its standard error
    /// (killed by signal N: code 128+N). A command still running at the
    /// request's deadline is killed, group and all (its caller gets the
    /// broker's timeout; the log says code 124); one that writes more
    /// than --max-output is killed too (code 125); if `sh` cannot be
    /// started, 127.
    #[command(group(clap::ArgGroup::new("answer").required(true).args(["echo", "exec"])))]
    #[command(after_help = SERVE_EXAMPLES)]
    Serve {
        /// The name to own (a subject without wildcards). Example: svc.echo
        name: String,
        /// Reply with the request's own payload.
        #[arg(long)]
        echo: bool,
        /// Run CMD with `sh -c` for each request; its output is the reply.
        #[arg(long, value_name = "CMD")]
        exec: Option<String>,
        /// Share the name with other servers that ask for it shared; the
        /// broker spreads requests among them. Without it the name is
        /// owned exclusively, and serving fails if someone else owns it.
        #[arg(long)]
        shared: bool,
        /// Exit after this many requests. Example: --count 1
        #[arg(long, short = 'c')]
        count: Option<u64>,
        /// Answer up to N requests at once (each in turn otherwise).
        #[arg(long, short = 'j', value_name = "N", default_value_t = 1,
              value_parser = clap::value_parser!(u32).range(1..=1024))]
        jobs: u32,
        /// Largest reply a command may write, in bytes.
        #[arg(long, value_name = "BYTES", default_value_t = 64 << 20)]
        max_output: u64,
    },
    /// Names, their owners (client ids, see `clients`), queue and flags.
    #[command(after_help = "Examples:\n  shmbusctl names")]
    Names,
    /// Print every event the broker sees, one line each, until interrupted.
    ///
    /// Events: publish, request, answer, error (a refusal), connect,
    /// disconnect, subscribe, unsubscribe, name-change; with PATTERNs, only
    /// those whose subject (topic, name or pattern) matches one of them.
    /// Each line: the time (UTC, to the microsecond), the kind, the
    /// subject, who caused it, whom it reached, and the payload:
    ///
    ///   12:00:01.123456 publish sensors.kitchen.temp from client 4 (uid 1000, pid 77) to [5, 9] 4 B "21.5"
    ///
    /// A payload is shown as quoted text (escaped) if it is UTF-8, else as
    /// `hex 0a1b...`, cut to 64 characters (`...` marks a cut) unless
    /// --full; one that travelled as a memfd as `memfd N B` (the broker
    /// never reads those). A publish that reached no one says `to nobody`.
    /// The broker's word on the event (an answer's outcome, a refusal)
    /// ends the line in parentheses. Lost events (the monitor fell behind)
    /// show as `-- N events lost: the monitor fell behind --`.
    ///
    /// --json: one object per event with kind, subject, sender (client_id,
    /// uid, gid, pid), receivers, detail, payload_len, memfd, payload (as
    /// the broker sent it: text, or a hex string), payload_encoding ("utf8"
    /// or "hex"), payload_cut, seq and time_us (microseconds since the
    /// epoch); lost events as {"gap": N}.
    ///
    /// Needs the broker's `monitor` right: refused, it exits with status 1.
    #[command(after_help = "Examples:\n  shmbusctl monitor\n  shmbusctl monitor 'sensors.>' --full\n  \
                            shmbusctl monitor --json --count 10")]
    Monitor {
        /// Subject patterns (`*` one token, `>` the rest); none: everything.
        /// Example: 'sensors.>'
        #[arg(value_name = "PATTERN")]
        patterns: Vec<String>,
        /// Whole inline payloads, rather than their first 256 bytes (as
        /// the broker sends them) cut again to 64 characters.
        #[arg(long)]
        full: bool,
        /// Exit after this many events. Example: --count 10
        #[arg(long, short = 'c')]
        count: Option<u64>,
    },
    /// Ask the broker about its policy.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Print a shell completion script (needs no broker).
    #[command(after_help = "Examples:\n  shmbusctl completions bash > /etc/bash_completion.d/shmbusctl\n  \
                            shmbusctl completions zsh > \"${fpath[1]}/_shmbusctl\"\n  \
                            shmbusctl completions fish > ~/.config/fish/completions/shmbusctl.fish")]
    Completions {
        /// The shell. Example: bash
        shell: clap_complete::Shell,
    },
    /// Write manual pages (roff; needs no broker): shmbusctl.1 on standard
    /// output, or with --out, shmbusctl.1 and shmbusctl-SUBCOMMAND.1 for
    /// every subcommand in DIR.
    #[command(
        after_help = "Examples:\n  shmbusctl man | man -l -\n  shmbusctl man --out /usr/local/share/man/man1"
    )]
    Man {
        /// Write the pages into this directory (made if missing). Example: --out ./man
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
}

const MAIN_EXAMPLES: &str = "Examples:
  shmbusd &                                  start a broker on the user bus
  shmbusctl ping
  shmbusctl sub 'sensors.>' &                print what is published under sensors
  shmbusctl pub sensors.kitchen.temp 21.5
  shmbusctl status

`shmbusctl COMMAND --help` shows each command's arguments and examples.";

const PUB_EXAMPLES: &str = "Examples:
  shmbusctl pub sensors.kitchen.temp 21.5
  shmbusctl pub files.report --file ./report.pdf
  echo hello | shmbusctl pub greetings
  shmbusctl pub bench.x payload --count 1000
  shmbusctl pub --wait-subscribers 1 jobs.start now
  tail -f app.log | shmbusctl pub --channel logs.app
  shmbusctl pub --channel ticks --wait-readers 1 tick";

const SUB_EXAMPLES: &str = "Examples:
  shmbusctl sub 'sensors.>'
  shmbusctl sub 'sensors.*.temp' --count 1
  shmbusctl sub files.report --raw --count 1 > report.pdf
  shmbusctl sub 'bin.>' --hex
  shmbusctl sub --channel logs.app --timeout 10";

const CALL_EXAMPLES: &str = "Examples:
  shmbusctl call svc.echo hello
  shmbusctl call svc.render --file request.json --timeout 30
  echo '{\"x\":1}' | shmbusctl call svc.compute --file -
  shmbusctl call --wait-owner thermo.read";

const SERVE_EXAMPLES: &str = "Examples:
  shmbusctl serve svc.echo --echo
  shmbusctl serve svc.upper --exec 'tr a-z A-Z'
  shmbusctl serve svc.work --shared --jobs 4 --exec ./handle.sh";

#[derive(Subcommand, Debug)]
enum PolicyCmd {
    /// How the broker's policy decides ACTION on SUBJECT for a peer with
    /// --uid and --gid, and why.
    ///
    /// Prints `allow: <why>` or `deny: <why>` (--json: an object with
    /// `allowed` and `explanation`). ACTION is one of the policy file's
    /// words: connect, publish, subscribe, own, call, channel-publish,
    /// channel-read, monitor, introspect; SUBJECT is the subject, pattern
    /// or name it is about (none for connect, monitor and introspect).
    ///
    /// Exit status: 0 allowed; 1 denied; 2 the question could not be
    /// answered (no bus, an unknown action, a bad subject, or no
    /// `introspect` right to ask).
    #[command(
        after_help = "Examples:\n  shmbusctl policy check --uid alice publish sensors.kitchen.temp\n  \
                            shmbusctl policy check --uid 1000 --gid 1000 --gid adm subscribe 'logs.>'\n  \
                            shmbusctl policy check --uid 0 connect"
    )]
    Check {
        /// The peer's uid, or a user name (/etc/passwd). Example: --uid 1000
        #[arg(long, value_name = "USER|UID", value_parser = shmbus_broker::daemon::config::parse_uid)]
        uid: u32,
        /// Its groups, the primary one first, by gid or name (/etc/group;
        /// repeat for each; none: the group numbered like the uid).
        /// Example: --gid 1000 --gid adm
        #[arg(long = "gid", value_name = "GROUP|GID", value_parser = shmbus_broker::daemon::config::parse_gid)]
        gids: Vec<u32>,
        /// What it would do: connect, publish, subscribe, own, call,
        /// channel-publish, channel-read, monitor or introspect. Example: publish
        action: String,
        /// What it would do it on (a subject, pattern or name). Example: sensors.kitchen.temp
        subject: Option<String>,
    },
}

/// Seconds, fractions allowed: more than 0, and finite.
fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    match Duration::try_from_secs_f64(secs) {
        Ok(d) if !d.is_zero() => Ok(d),
        _ => Err(format!("the timeout must be more than 0 seconds, and finite, not {s}")),
    }
}

/// Exit status of `policy check` when it cannot answer (0 and 1 are its
/// verdicts).
const EXIT_POLICY_ERROR: u8 = 2;

fn main() -> ExitCode {
    let args = Args::parse();
    let failure = match args.cmd {
        Cmd::Policy { .. } => ExitCode::from(EXIT_POLICY_ERROR),
        _ => ExitCode::FAILURE,
    };
    match run(args) {
        Ok(code) => code,
        // The reader of our output went away (`shmbusctl sub x | head`):
        // not an error worth a message.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            // Errors may quote the broker, which may quote a client.
            eprintln!("shmbusctl: {}", escape(&e.to_string()));
            failure
        }
    }
}

type Fallible<T> = Result<T, Box<dyn std::error::Error>>;

fn connect(args: &Args) -> Fallible<Client> {
    let mut opts = Client::options().name("shmbusctl");
    if args.no_reconnect {
        opts = opts.reconnect(shmbus::ReconnectPolicy::never());
    }
    if let Some(a) = &args.address {
        opts = opts.address(a.clone());
    } else if args.system {
        opts = opts.system();
    }
    opts.connect().map_err(|e| connect_advice(&e, args).unwrap_or_else(|| e.to_string()).into())
}

/// What to do about a bus that cannot be reached, as words for people:
/// `None` for errors that say enough as they are.
fn connect_advice(e: &shmbus::ConnectError, args: &Args) -> Option<String> {
    let shmbus::ConnectError::Unreachable { address, source } = e else { return None };
    let whence = if args.address.is_some() {
        String::new()
    } else if args.system {
        " (the system bus, --system)".to_owned()
    } else if std::env::var_os("SHMBUS_ADDRESS").is_some() {
        " (from $SHMBUS_ADDRESS)".to_owned()
    } else {
        " (the user bus, the default; --address or $SHMBUS_ADDRESS name another)".to_owned()
    };
    let start = if args.system {
        "shmbusd --system (or systemctl start shmbus.socket)".to_owned()
    } else {
        format!("shmbusd --address {address}")
    };
    use std::io::ErrorKind as K;
    Some(match source.kind() {
        K::ConnectionRefused => format!(
            "cannot reach the bus at {address}{whence}: no broker listens there (connection refused). Start \
             one with `{start}`"
        ),
        K::NotFound if !address.starts_with('@') && !address.contains('/') => format!(
            "cannot reach the bus at {address}{whence}: no socket file there, so no broker was started on \
             that path. Start one with `{start}`; an abstract address (no file) starts with `@`, as in \
             --address @{address}"
        ),
        K::NotFound if !address.starts_with('@') => format!(
            "cannot reach the bus at {address}{whence}: no socket file there, so no broker was started on \
             that path. Start one with `{start}`"
        ),
        K::PermissionDenied => format!(
            "cannot reach the bus at {address}{whence}: permission denied, the socket file's mode or group \
             keeps uid {} out (shmbusd --socket-mode and --socket-group set them)",
            rustix::process::getuid().as_raw()
        ),
        _ => return None,
    })
}

fn run(args: Args) -> Fallible<ExitCode> {
    // What needs no broker.
    match &args.cmd {
        Cmd::Completions { shell } => {
            let mut cmd = <Args as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut cmd, "shmbusctl", &mut std::io::stdout().lock());
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Man { out } => {
            write_man_pages(out.as_deref())?;
            return Ok(ExitCode::SUCCESS);
        }
        // (With --channel, lines typed are messages: that is fine.)
        // A bad topic is said as such, bus or no bus.
        Cmd::Pub { topic, .. } if shmbus_proto::subject::validate_subject(topic).is_err() => {
            let e = shmbus_proto::subject::validate_subject(topic).unwrap_err();
            return Err(format!("invalid subject {:?}: {e}", escape(topic)).into());
        }
        Cmd::Pub { data: None, file: None, channel: false, .. } if std::io::stdin().is_terminal() => {
            return Err(
                "no DATA given and stdin is a terminal: give DATA, --file, or pipe the payload in".into()
            );
        }
        _ => {}
    }
    let client = match &args.cmd {
        Cmd::Ping { wait: Some(wait), .. } => connect_within(&args, *wait)?,
        _ => connect(&args)?,
    };
    match &args.cmd {
        Cmd::Completions { .. } | Cmd::Man { .. } => unreachable!("answered above"),
        Cmd::Ping { count, .. } => {
            for _ in 0..*count {
                let rtt = client.ping()?;
                let b = client.broker_cred();
                if args.json {
                    println!(
                        "{}",
                        json!({"rtt_ns": rtt.as_nanos() as u64, "broker_pid": b.pid, "broker_uid": b.uid})
                    );
                } else {
                    println!("pong in {rtt:?} (broker pid {}, uid {})", b.pid, b.uid);
                }
            }
        }
        Cmd::Status => {
            let mut out = std::io::stdout().lock();
            let stats = client.stats()?;
            if args.json {
                // One object: the counters, and the channels as a list.
                let mut channels = Vec::new();
                for_each_page(
                    |after| client.channels_page(after),
                    |cs: Vec<ChannelInfo>| {
                        channels.extend(cs);
                        Ok(())
                    },
                )?;
                let mut v = serde_json::to_value(&stats)?;
                v["channels"] = serde_json::to_value(&channels)?;
                writeln!(out, "{v}")?;
                out.flush()?;
            } else {
                print_stats(&mut out, &stats, false)?;
                print_channels(&mut out, &client, false)?;
            }
        }
        Cmd::Clients => print_clients(&mut std::io::stdout().lock(), &client, args.json)?,
        Cmd::Topics => print_topics(&mut std::io::stdout().lock(), &client, args.json)?,
        Cmd::Pub {
            topic, data, file, count, channel: true, slot_size, slots, wait_readers, timeout, ..
        } => {
            let config = shmbus::ChannelConfig {
                slot_size: *slot_size,
                slot_count: *slots,
                ..shmbus::ChannelConfig::default()
            };
            let mut publisher = client.channel_publisher(topic, config)?;
            wait_for_readers(&mut publisher, topic, *wait_readers, *timeout)?;
            match (data, file) {
                (Some(d), _) => {
                    for _ in 0..*count {
                        publisher.publish(d.as_bytes())?;
                    }
                }
                (None, Some(f)) => {
                    let bytes = std::fs::read(f).map_err(|e| format!("cannot read {}: {e}", f.display()))?;
                    for _ in 0..*count {
                        publisher.publish(&bytes)?;
                    }
                }
                (None, None) => {
                    for line in std::io::stdin().lock().split(b'\n') {
                        publisher.publish(&line?)?;
                    }
                }
            }
        }
        Cmd::Pub { topic, data, file, count, wait_subscribers, timeout, .. } => {
            wait_for_subscribers(&client, topic, *wait_subscribers, *timeout)?;
            match (data, file) {
                (Some(d), _) => {
                    for _ in 0..*count {
                        client.publish(topic, d.as_bytes())?;
                    }
                }
                (None, Some(f)) => publish_file(&client, topic, f, *count)?,
                (None, None) => {
                    let mut v = Vec::new();
                    std::io::stdin().read_to_end(&mut v)?;
                    for _ in 0..*count {
                        client.publish(topic, &v)?;
                    }
                }
            }
            client.flush()?;
        }
        Cmd::Sub { patterns, count, raw, hex, channel: true, timeout } => {
            let [topic] = patterns.as_slice() else {
                return Err("--channel reads exactly one channel".into());
            };
            let shown = Shown::new(*raw, *hex, args.json);
            return read_channel(&client, topic, *count, shown, *timeout);
        }
        Cmd::Sub { patterns, count, raw, hex, channel: false, .. } => {
            return subscribe(&client, patterns, *count, Shown::new(*raw, *hex, args.json))
        }
        Cmd::Call { name, data, file, timeout, raw, wait_owner } => {
            if *wait_owner {
                wait_for_owner(&client, name, *timeout)?;
            }
            let payload = match (data, file) {
                (Some(d), _) => d.clone().into_bytes(),
                (None, Some(f)) if f.as_os_str() == "-" => {
                    let mut v = Vec::new();
                    std::io::stdin().read_to_end(&mut v)?;
                    v
                }
                (None, Some(f)) => {
                    std::fs::read(f).map_err(|e| format!("cannot read {}: {e}", f.display()))?
                }
                (None, None) => Vec::new(),
            };
            return call(&client, name, &payload, *timeout, *raw, args.json);
        }
        Cmd::Serve { name, echo: _, exec, shared, count, jobs, max_output } => {
            let flags = if *shared {
                NameFlags::shared().do_not_queue()
            } else {
                NameFlags::exclusive().do_not_queue()
            };
            let how = match exec {
                Some(cmd) => How::Exec { cmd, max_output: *max_output },
                None => How::Echo,
            };
            return serve(&client, name, flags, how, *count, *jobs);
        }
        Cmd::Names => print_names(&mut std::io::stdout().lock(), &client, args.json)?,
        Cmd::Monitor { patterns, full, count } => {
            return monitor(&client, patterns, *full, *count, args.json)
        }
        Cmd::Policy { cmd: PolicyCmd::Check { uid, gids, action, subject } } => {
            let subject = subject.as_deref().unwrap_or("");
            return policy_check(&client, *uid, gids, action, subject, args.json);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// How `sub` shows a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shown {
    /// Text if UTF-8 (control characters escaped), else `\xNN` escapes.
    Text,
    Hex,
    /// The bytes exactly.
    Raw,
    Json,
}

impl Shown {
    fn new(raw: bool, hex: bool, json: bool) -> Shown {
        match (raw, hex, json) {
            (true, _, _) => Shown::Raw,
            (_, true, _) => Shown::Hex,
            (_, _, true) => Shown::Json,
            _ => Shown::Text,
        }
    }
}

fn subscribe(client: &Client, patterns: &[String], count: Option<u64>, shown: Shown) -> Fallible<ExitCode> {
    let json = shown == Shown::Json;
    let mut subs = Vec::new();
    for p in patterns {
        subs.push(client.subscribe(p)?);
    }
    let mut refs: Vec<&Subscription> = subs.iter().collect();
    let mut out = std::io::stdout().lock();
    let mut seen = 0u64;
    while count.is_none_or(|c| seen < c) {
        let (i, ev) = match Subscription::recv_any(&refs, None) {
            Ok(Some(got)) => got,
            Ok(None) => continue,
            // The broker ended one (a policy reload): go on with the
            // others, if any are left.
            Err(e @ RecvError::Revoked(_)) => {
                refs.retain(|s| s.revocation().is_none());
                if refs.is_empty() {
                    return Err(e.into());
                }
                eprintln!("shmbusctl: {}", escape(&e.to_string()));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        match ev {
            Event::Message(m) => {
                seen += 1;
                write_message(&mut out, &m, shown)?;
                out.flush()?;
            }
            Event::Gap { missed } => {
                let pattern = refs[i].pattern();
                if json {
                    writeln!(out, "{}", json!({"gap": missed, "pattern": pattern}))?;
                }
                eprintln!("shmbusctl: fell behind on {}: {missed} messages missed", escape(pattern));
            }
            Event::Reconnected => {
                let pattern = refs[i].pattern();
                if json {
                    writeln!(out, "{}", json!({"reconnected": true, "pattern": pattern}))?;
                }
                eprintln!(
                    "shmbusctl: reconnected to the broker; messages on {} in between may have been missed",
                    escape(pattern)
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Opens the ring channel `topic` for reading, waiting (up to `timeout`,
/// if given) for a publisher to open it.
fn open_channel(
    client: &Client,
    topic: &str,
    timeout: Option<Duration>,
) -> Fallible<shmbus::ChannelSubscriber> {
    let start = Instant::now();
    let mut delay = Duration::from_millis(5);
    let mut told = false;
    loop {
        match client.channel_subscriber(topic) {
            Err(shmbus::ChannelError::Refused { code: ErrorCode::NoSuchChannel, .. }) => {
                if !told {
                    eprintln!("shmbusctl: waiting for a publisher on {}", escape(topic));
                    told = true;
                }
                let left = match timeout {
                    Some(t) => match t.checked_sub(start.elapsed()) {
                        Some(left) if !left.is_zero() => left,
                        _ => {
                            return Err(format!(
                                "no publisher opened the channel {} within {} s",
                                escape(topic),
                                secs(t)
                            )
                            .into())
                        }
                    },
                    None => delay,
                };
                std::thread::sleep(delay.min(left));
                delay = (delay * 2).min(Duration::from_millis(250));
            }
            other => return Ok(other?),
        }
    }
}

/// Waits (up to `timeout`) until `want` readers have opened the channel.
/// Connects, trying again while no broker listens at the address yet, for
/// up to `wait`.
fn connect_within(args: &Args, wait: Duration) -> Fallible<Client> {
    let start = Instant::now();
    loop {
        match connect(args) {
            Err(_) if start.elapsed() < wait => std::thread::sleep(Duration::from_millis(20)),
            other => return other,
        }
    }
}

/// Waits until someone owns the name `name`, for up to `timeout`.
fn wait_for_owner(client: &Client, name: &str, timeout: Duration) -> Fallible<()> {
    let start = Instant::now();
    while client.name_owner(name)?.is_none() {
        if start.elapsed() >= timeout {
            return Err(format!("nobody owned {} within {} s", escape(name), secs(timeout)).into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Waits until `want` subscriptions match `topic` (as the broker's topic
/// list says), for up to `timeout`.
fn wait_for_subscribers(client: &Client, topic: &str, want: u64, timeout: Duration) -> Fallible<()> {
    let start = Instant::now();
    let mut told = false;
    loop {
        let have: u64 = client
            .topics()?
            .iter()
            .filter(|t| shmbus_proto::subject::pattern_matches(&t.pattern, topic))
            .map(|t| u64::from(t.subscribers))
            .sum();
        if have >= want {
            return Ok(());
        }
        if !told {
            eprintln!("shmbusctl: waiting for {want} subscriber(s) on {} ({have} now)", escape(topic));
            told = true;
        }
        if start.elapsed() >= timeout {
            return Err(format!(
                "{have} of {want} subscriptions matched {} within {} s",
                escape(topic),
                secs(timeout)
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn wait_for_readers(
    publisher: &mut shmbus::ChannelPublisher,
    topic: &str,
    want: usize,
    timeout: Duration,
) -> Fallible<()> {
    let start = Instant::now();
    let mut told = false;
    loop {
        publisher.update_readers()?;
        if publisher.readers() >= want {
            return Ok(());
        }
        if !told {
            let readers = if want == 1 { "a reader" } else { "readers" };
            eprintln!("shmbusctl: waiting for {readers} on channel {} ({want} wanted)", escape(topic));
            told = true;
        }
        if start.elapsed() >= timeout {
            return Err(format!(
                "{} of {want} readers opened the channel {} within {} s",
                publisher.readers(),
                escape(topic),
                secs(timeout)
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn read_channel(
    client: &Client,
    topic: &str,
    count: Option<u64>,
    how: Shown,
    timeout: Option<Duration>,
) -> Fallible<ExitCode> {
    let mut sub = open_channel(client, topic, timeout)?;
    let shown = escape(topic);
    let mut out = std::io::stdout().lock();
    let mut seen = 0u64;
    while count.is_none_or(|c| seen < c) {
        match sub.recv(<[u8]>::to_vec) {
            Ok(ChannelEvent::Message { seq, value }) => {
                seen += 1;
                match how {
                    Shown::Raw => out.write_all(&value)?,
                    Shown::Json => {
                        let text = std::str::from_utf8(&value).ok();
                        let hex = text.is_none().then(|| hex(&value));
                        writeln!(
                            out,
                            "{}",
                            json!({"topic": topic, "seq": seq, "size": value.len(), "payload": text,
                                   "payload_hex": hex})
                        )?;
                    }
                    Shown::Hex => writeln!(out, "{shown} {}", hex(&value))?,
                    Shown::Text => writeln!(out, "{shown} {}", printable(&value))?,
                }
                out.flush()?;
            }
            Ok(ChannelEvent::Missed(k)) => {
                eprintln!("shmbusctl: fell behind on channel {shown}: {k} messages missed")
            }
            Ok(ChannelEvent::Reconnected) => eprintln!(
                "shmbusctl: reconnected to the broker; channel {shown} opened again (messages in between may \
                 have been missed)"
            ),
            Err(shmbus::ChannelError::Corrupt(what)) => {
                eprintln!("shmbusctl: channel {shown}: skipped corrupt slot ({what})")
            }
            Err(shmbus::ChannelError::Closed) => {
                eprintln!("shmbusctl: channel {shown} closed");
                break;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Files up to this size are read whole and published as any payload;
/// larger ones go by memfd, filled a piece at a time.
const WHOLE_FILE: u64 = shmbus_proto::limits::MAX_INLINE_PAYLOAD as u64;
/// Files from this size show their progress (on a terminal).
const SHOW_PROGRESS: u64 = 64 << 20;

/// Publishes the file at `path` `count` times. A large file is copied into
/// a memfd a MiB at a time (never whole into this process's memory),
/// sealed, and that one memfd is sent each time.
fn publish_file(client: &Client, topic: &str, path: &std::path::Path, count: u64) -> Fallible<()> {
    let cannot = |e: std::io::Error| format!("cannot read {}: {e}", path.display());
    let mut file = std::fs::File::open(path).map_err(cannot)?;
    let meta = file.metadata().map_err(cannot)?;
    if !meta.is_file() || meta.len() <= WHOLE_FILE {
        let mut v = Vec::new();
        file.read_to_end(&mut v).map_err(cannot)?;
        for _ in 0..count {
            client.publish(topic, &v)?;
        }
        return Ok(());
    }
    let len = meta.len();
    let memfd = shmbus_proto::sys::memfd::create("shmbusctl-pub", len)
        .map_err(|e| format!("cannot make a memfd of {len} bytes: {e}"))?;
    let mut dst = std::fs::File::from(memfd);
    let progress = len >= SHOW_PROGRESS && std::io::stderr().is_terminal();
    let mut buf = vec![0u8; 1 << 20];
    let (mut done, mut shown) = (0u64, u64::MAX);
    while done < len {
        let want = (len - done).min(buf.len() as u64) as usize;
        let n = file.read(&mut buf[..want]).map_err(cannot)?;
        if n == 0 {
            return Err(format!("{} shrank while it was read ({done} of {len} bytes)", path.display()).into());
        }
        dst.write_all(&buf[..n])?;
        done += n as u64;
        if progress && done * 100 / len != shown {
            shown = done * 100 / len;
            eprint!("\rshmbusctl: {}: {shown}% of {} MiB", path.display(), len >> 20);
        }
    }
    if progress {
        eprintln!();
    }
    let fd = std::os::fd::OwnedFd::from(dst);
    shmbus_proto::sys::memfd::seal(std::os::fd::AsFd::as_fd(&fd))?;
    for _ in 0..count {
        client.publish_fd(topic, &fd)?;
    }
    Ok(())
}

/// shmbusctl.1 on standard output, or every page into `dir`.
fn write_man_pages(dir: Option<&std::path::Path>) -> Fallible<()> {
    let mut cmd = <Args as clap::CommandFactory>::command();
    // Built, global flags (--address, --json...) are in every subcommand.
    cmd.build();
    let Some(dir) = dir else {
        let mut out = std::io::stdout().lock();
        clap_mangen::Man::new(cmd).render(&mut out)?;
        return Ok(out.flush()?);
    };
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
    let mut pages = vec![("shmbusctl".to_owned(), cmd.clone())];
    let mut i = 0;
    while i < pages.len() {
        let (name, c) = pages[i].clone();
        for sub in c.get_subcommands().filter(|sub| sub.get_name() != "help") {
            let sub_name = format!("{name}-{}", sub.get_name());
            // clap names are &'static str (without its `string` feature);
            // a few bytes per page, once per run.
            let leaked: &'static str = Box::leak(sub_name.clone().into_boxed_str());
            pages.push((sub_name, sub.clone().name(leaked).version(env!("CARGO_PKG_VERSION"))));
        }
        i += 1;
    }
    let mut out = std::io::stdout().lock();
    for (name, c) in pages {
        let path = dir.join(format!("{name}.1"));
        let mut f =
            std::fs::File::create(&path).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        clap_mangen::Man::new(c).render(&mut f)?;
        writeln!(out, "{}", path.display())?;
    }
    Ok(out.flush()?)
}

/// Calls `page` for each page of an introspection answer in turn, and
/// `each` with its items as it arrives.
fn for_each_page<T>(
    mut page: impl FnMut(Option<&str>) -> Result<(Vec<T>, Option<String>), RequestError>,
    mut each: impl FnMut(Vec<T>) -> std::io::Result<()>,
) -> Fallible<()> {
    let mut after: Option<String> = None;
    loop {
        let (items, next) = page(after.as_deref())?;
        each(items)?;
        match next {
            None => return Ok(()),
            Some(n) if after.as_deref() == Some(n.as_str()) => {
                return Err("the broker answered the same page twice".into())
            }
            Some(n) => after = Some(n),
        }
    }
}

/// One JSON object per line.
fn write_json(out: &mut impl Write, items: &[impl Serialize]) -> std::io::Result<()> {
    for i in items {
        serde_json::to_writer(&mut *out, i)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

fn print_channels(out: &mut impl Write, client: &Client, json: bool) -> Fallible<()> {
    let mut header = false;
    for_each_page(
        |after| client.channels_page(after),
        |cs: Vec<ChannelInfo>| {
            if json {
                return write_json(out, &cs);
            }
            if !cs.is_empty() && !header {
                header = true;
                writeln!(out, "  channels:")?;
                writeln!(
                    out,
                    "    {:>4} {:<24} {:>9} {:>7} {:>9} {:>7} {:<9} {:>12} {:>10}",
                    "ID",
                    "TOPIC",
                    "PUBLISHER",
                    "READERS",
                    "SLOT_SIZE",
                    "SLOTS",
                    "OVERFLOW",
                    "PUBLISHED",
                    "OVERRUNS"
                )?;
            }
            for c in cs {
                writeln!(
                    out,
                    "    {:>4} {:<24} {:>9} {:>7} {:>9} {:>7} {:<9} {:>12} {:>10}",
                    c.id,
                    escape(&c.topic),
                    c.publisher,
                    c.readers,
                    c.slot_size,
                    c.slot_count,
                    format!("{:?}", c.overflow),
                    c.published,
                    c.overruns
                )?;
            }
            out.flush()
        },
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn write_message(out: &mut impl Write, m: &Message, shown: Shown) -> std::io::Result<()> {
    if shown == Shown::Raw {
        return out.write_all(m.payload());
    }
    if shown == Shown::Hex {
        return writeln!(out, "{} {}", escape(m.topic()), hex(m.payload()));
    }
    if shown == Shown::Json {
        let s = m.sender();
        let text = std::str::from_utf8(m.payload()).ok();
        let hex: Option<String> = text.is_none().then(|| hex(m.payload()));
        return writeln!(
            out,
            "{}",
            json!({
                "topic": m.topic(), "seq": m.seq(), "size": m.payload().len(),
                "sender": {"client_id": s.client_id, "uid": s.uid, "gid": s.gid, "pid": s.pid},
                "origin": m.origin(), "payload": text, "payload_hex": hex,
            })
        );
    }
    writeln!(out, "{} {}", escape(m.topic()), printable(m.payload()))
}

/// UTF-8 text as is (control and format characters escaped, as in names);
/// anything else escaped byte by byte.
fn printable(p: &[u8]) -> String {
    match std::str::from_utf8(p) {
        Ok(s) => escape(s).into_owned(),
        Err(_) => p.escape_ascii().to_string(),
    }
}

fn print_stats(out: &mut impl Write, s: &Stats, json: bool) -> std::io::Result<()> {
    if json {
        return write_json(out, std::slice::from_ref(s));
    }
    writeln!(
        out,
        "shmbusd {} on {}, up {:.1?}",
        escape(&s.version),
        escape(&s.address),
        Duration::from_millis(s.uptime_ms)
    )?;
    writeln!(out, "  clients        {:>12}", s.clients)?;
    writeln!(out, "  subscriptions  {:>12}   ({} patterns)", s.subscriptions, s.patterns)?;
    writeln!(out, "  messages in    {:>12}   ({} bytes)", s.msgs_in, s.bytes_in)?;
    writeln!(out, "  messages out   {:>12}   ({} bytes)", s.msgs_out, s.bytes_out)?;
    writeln!(out, "  dropped        {:>12}   (reported in {} gap notices)", s.dropped, s.gap_notices)?;
    writeln!(
        out,
        "  connections    {:>12}   accepted, {} refused, {} without Hello in time",
        s.connections_accepted, s.connections_refused, s.hello_timeouts
    )?;
    writeln!(
        out,
        "  disconnects    {:>12}   protocol errors, {} slow consumers",
        s.protocol_errors, s.slow_disconnects
    )?;
    writeln!(
        out,
        "  refusals       {:>12}   by quota, {} by policy, {} broker short of fds or memory",
        s.quota_refusals, s.policy_denials, s.broker_resource_errors
    )?;
    if s.log_suppressed > 0 {
        writeln!(out, "  log lines left out by the rate limit: {}", s.log_suppressed)?;
    }
    out.flush()
}

fn print_clients(out: &mut impl Write, client: &Client, json: bool) -> Fallible<()> {
    if !json {
        writeln!(
            out,
            "{:>5} {:<16} {:>7} {:>6} {:<16} {:>5} {:>10} {:>10} {:>8} {:>10}  SUBSCRIPTIONS",
            "ID", "NAME", "PID", "UID", "COMMAND", "SUBS", "MSGS_IN", "MSGS_OUT", "DROPPED", "QUEUED_B"
        )?;
    }
    for_each_page(
        |after| client.clients_page(after),
        |cs: Vec<ClientInfo>| {
            if json {
                return write_json(out, &cs);
            }
            for c in cs {
                let mut subs = c.subscriptions.iter().map(|p| escape(p)).collect::<Vec<_>>().join(" ");
                let untold = (c.subscription_count as usize).saturating_sub(c.subscriptions.len());
                if untold > 0 {
                    subs.push_str(&format!(" (+{untold} more)"));
                }
                writeln!(
                    out,
                    "{:>5} {:<16} {:>7} {:>6} {:<16} {:>5} {:>10} {:>10} {:>8} {:>10}  {}",
                    c.id,
                    escape(&c.name),
                    c.pid,
                    c.uid,
                    escape(&c.command),
                    c.subscription_count,
                    c.msgs_in,
                    c.msgs_out,
                    c.dropped,
                    c.queued_bytes,
                    subs
                )?;
            }
            out.flush()
        },
    )
}

fn print_topics(out: &mut impl Write, client: &Client, json: bool) -> Fallible<()> {
    if !json {
        writeln!(out, "{:>11}  PATTERN", "SUBSCRIBERS")?;
    }
    for_each_page(
        |after| client.topics_page(after),
        |ts: Vec<TopicInfo>| {
            if json {
                return write_json(out, &ts);
            }
            for t in ts {
                writeln!(out, "{:>11}  {}", t.subscribers, escape(&t.pattern))?;
            }
            out.flush()
        },
    )
}

// ------------------------------------------------------------ services --

/// Exit statuses of `call`, by outcome.
const EXIT_APP_ERROR: u8 = 3;
const EXIT_NO_RESPONDER: u8 = 4;
const EXIT_TIMEOUT: u8 = 5;

fn call(
    client: &Client,
    name: &str,
    payload: &[u8],
    timeout: Duration,
    raw: bool,
    json: bool,
) -> Fallible<ExitCode> {
    let started = Instant::now();
    let answer = client.request(name, payload, timeout);
    let mut out = std::io::stdout().lock();
    match answer {
        Ok(reply) => {
            write_reply(&mut out, name, &reply, raw, json)?;
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            let (status, what) = call_failure(name, &e, timeout, started.elapsed());
            if json {
                let (error, code) = match &e {
                    CallError::App { code, .. } => ("app_error", Some(*code)),
                    CallError::NoResponder { .. } => ("no_responder", None),
                    CallError::ResponderGone { .. } => ("responder_gone", None),
                    CallError::Timeout { .. } => ("timeout", None),
                    CallError::Denied { .. } => ("denied", None),
                    CallError::LimitExceeded { .. } => ("limit_exceeded", None),
                    CallError::InvalidName(_) | CallError::Invalid { .. } => ("invalid", None),
                    CallError::Disconnected(_) => ("disconnected", None),
                    _ => ("io", None),
                };
                // The service's or the broker's own words where there are
                // some, else the sentence printed on standard error.
                let message = match &e {
                    CallError::App { message, .. }
                    | CallError::Denied { message, .. }
                    | CallError::LimitExceeded { message, .. }
                    | CallError::Invalid { message, .. } => message.clone(),
                    _ => what.clone(),
                };
                writeln!(out, "{}", json!({"name": name, "error": error, "code": code, "message": message}))?;
                out.flush()?;
            }
            // The service's message is its own text: escaped.
            eprintln!("shmbusctl: {}", escape(&what));
            Ok(ExitCode::from(status))
        }
    }
}

/// The exit status and the sentence for a call that got no reply.
fn call_failure(name: &str, e: &CallError, timeout: Duration, waited: Duration) -> (u8, String) {
    match e {
        CallError::NoResponder { .. } => (EXIT_NO_RESPONDER, format!("no responder for {name}")),
        CallError::ResponderGone { .. } => (EXIT_NO_RESPONDER, format!("{name} went away without answering")),
        // The broker caps timeouts at its maximum: say so when that cut
        // the wait short.
        CallError::Timeout { .. } if waited + Duration::from_millis(500) < timeout => (
            EXIT_TIMEOUT,
            format!(
                "timed out after {} s waiting for {name} (the broker's --max-request-timeout-ms is \
                 below the {} s asked for)",
                secs(waited),
                secs(timeout)
            ),
        ),
        CallError::Timeout { .. } => {
            (EXIT_TIMEOUT, format!("timed out after {} s waiting for {name}", secs(timeout)))
        }
        // The codes shmbus-bridge answers with for what went wrong on the
        // far side (`shmbus_bridge::code`, README "Calls across hosts"):
        // the same exit statuses as here.
        CallError::App { code: c @ 0xFFFE_0000..=0xFFFE_FFFF, message, .. } => {
            let (status, what) = match *c {
                0xFFFE_0001 => (EXIT_NO_RESPONDER, "no responder"),
                0xFFFE_0002 => (EXIT_TIMEOUT, "timed out"),
                0xFFFE_0003 => (EXIT_NO_RESPONDER, "responder gone"),
                0xFFFE_0004 => (EXIT_APP_ERROR, "too large for NATS"),
                0xFFFE_0005 => (EXIT_APP_ERROR, "bridge unavailable"),
                0xFFFE_0006 => (EXIT_APP_ERROR, "denied"),
                0xFFFE_0007 => (EXIT_APP_ERROR, "limit reached"),
                0xFFFE_0008 => (EXIT_APP_ERROR, "invalid"),
                _ => (EXIT_APP_ERROR, "failed"),
            };
            (status, format!("{name} across the NATS bridge: {what} (code {c:#x}): {message}"))
        }
        CallError::App { code, message, .. } => {
            let library = match *code {
                reply_code::UNANSWERED => " (the service dropped the request unanswered)",
                reply_code::NOT_SERVED => " (the name's owner does not serve it)",
                c if c >= reply_code::RESERVED => " (a code reserved for the client library)",
                _ => "",
            };
            (EXIT_APP_ERROR, format!("{name} answered error {code}{library}: {message}"))
        }
        other => (1, other.to_string()),
    }
}

/// Seconds for people: `5`, `0.25`, `1.5`.
fn secs(d: Duration) -> String {
    let s = format!("{:.3}", d.as_secs_f64());
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

fn write_reply(out: &mut impl Write, name: &str, r: &Reply, raw: bool, json: bool) -> Fallible<()> {
    let payload = r.try_payload()?;
    if raw {
        out.write_all(payload)?;
        return Ok(());
    }
    if json {
        let s = r.responder();
        let text = std::str::from_utf8(payload).ok();
        let hex: Option<String> =
            text.is_none().then(|| payload.iter().map(|b| format!("{b:02x}")).collect());
        writeln!(
            out,
            "{}",
            json!({
                "name": name, "size": payload.len(),
                "responder": {"client_id": s.client_id, "uid": s.uid, "gid": s.gid, "pid": s.pid},
                "payload": text, "payload_hex": hex,
            })
        )?;
        return Ok(());
    }
    // One line: the final newline a command's output usually ends with is
    // the line's own.
    let shown = payload.strip_suffix(b"\n").unwrap_or(payload);
    writeln!(out, "{}", printable(shown))?;
    Ok(())
}

/// How `serve` answers.
enum How<'a> {
    Echo,
    Exec { cmd: &'a str, max_output: u64 },
}

fn serve(
    client: &Client,
    name: &str,
    flags: NameFlags,
    how: How<'_>,
    count: Option<u64>,
    jobs: u32,
) -> Fallible<ExitCode> {
    if let How::Exec { .. } = how {
        kill_commands_on_signals()?;
    }
    let service = client.serve_with(name, flags)?;
    eprintln!("shmbusctl: serving {} ({})", escape(name), if flags.shared { "shared" } else { "exclusive" });
    // Requests still to take: each worker claims one before it waits.
    let left = AtomicU64::new(count.unwrap_or(u64::MAX));
    let claim = || left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
    let worker = || -> Result<(), String> {
        while claim() {
            let request = service.recv().map_err(|e| e.to_string())?;
            match answer(&service, request, &how) {
                Ok(()) => {}
                // The connection is gone: so is the service.
                Err(e @ ReplyError::Disconnected(_)) => return Err(e.to_string()),
                // That one reply could not be sent (no memory for its
                // memfd, say): its caller is answered an error for it by
                // the library, and the service goes on.
                Err(e) => eprintln!("shmbusctl: {}: cannot reply: {}", escape(name), escape(&e.to_string())),
            }
        }
        Ok(())
    };
    let results: Vec<Result<(), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..jobs).map(|_| s.spawn(worker)).collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("a worker panicked".into()))).collect()
    });
    if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
        return Err(e.into());
    }
    // Let go of the name and make sure the last reply left.
    service.release()?;
    client.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// Answers one request as `how` says.
fn answer(service: &Service, request: Request, how: &How<'_>) -> Result<(), ReplyError> {
    let payload = match request.try_payload() {
        Ok(p) => p,
        Err(e) => {
            let msg = format!("the request's memfd could not be mapped: {e}");
            eprintln!("shmbusctl: {}: {}", escape(service.name()), escape(&msg));
            request.reply_error(1, &msg)?;
            return Ok(());
        }
    };
    match how {
        How::Echo => {
            // `reply` copies: the payload borrows the request.
            let echo = payload.to_vec();
            request.reply(&echo)?;
        }
        How::Exec { cmd, max_output } => match run_command(cmd, &request, payload, *max_output) {
            Ok(stdout) => request.reply(&stdout)?,
            Err(Failed { code, message }) => {
                let s = request.sender();
                eprintln!(
                    "shmbusctl: {}: request {} from pid {} uid {}: error {code}: {}",
                    escape(service.name()),
                    request.serial(),
                    s.pid,
                    s.uid,
                    escape(&message)
                );
                if code == CODE_TIMEOUT {
                    // The broker answers the caller `Timeout` at its own
                    // deadline, a moment before ours, and refuses a reply
                    // after it. Answering at once could race its timer and
                    // reach the caller first; answer once it has surely
                    // passed, without holding up the next request.
                    let at = request.deadline() + LATE_ANSWER;
                    std::thread::spawn(move || {
                        std::thread::sleep(at.saturating_duration_since(Instant::now()));
                        let _ = request.reply_error(code, &message);
                    });
                    return Ok(());
                }
                request.reply_error(code, &message)?;
            }
        },
    }
    Ok(())
}

/// Process groups of the commands running now, for the signal handler.
static RUNNING: Mutex<Vec<i32>> = Mutex::new(Vec::new());

/// On SIGINT, SIGTERM or SIGHUP: kill every command still running (each
/// is in its own process group, out of reach of the terminal's ^C), then
/// exit as if killed by the signal.
fn kill_commands_on_signals() -> std::io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    for sig in [SIGINT, SIGTERM, SIGHUP] {
        let (mut rx, tx) = std::os::unix::net::UnixStream::pair()?;
        signal_hook::low_level::pipe::register(sig, tx)?;
        std::thread::spawn(move || {
            let _ = rx.read(&mut [0u8]);
            // Held to the end: no command starts after this.
            let running = RUNNING.lock().unwrap_or_else(|p| p.into_inner());
            for &pgid in running.iter() {
                kill_group(pgid);
            }
            std::process::exit(128 + sig);
        });
    }
    Ok(())
}

fn kill_group(pgid: i32) {
    if let Some(pid) = rustix::process::Pid::from_raw(pgid) {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
}

/// Why a command gave no reply: the application error to answer with.
struct Failed {
    code: u32,
    message: String,
}

/// Application error codes of `serve --exec` beyond the command's own exit
/// status (GNU timeout's 124 for a timeout, the shell's 127 for "cannot
/// run").
const CODE_TIMEOUT: u32 = 124;
const CODE_TOO_MUCH_OUTPUT: u32 = 125;
const CODE_CANNOT_RUN: u32 = 127;

/// How long after a request's deadline `serve --exec` answers a command it
/// killed there (see [`answer`]).
const LATE_ANSWER: Duration = Duration::from_millis(500);

/// What the threads around one command report.
enum Piece {
    /// All of it, or why not.
    Stdout(Result<Vec<u8>, String>),
    Stderr(Vec<u8>),
    Exit(std::process::ExitStatus),
}

/// Runs `sh -c cmd` for `request` with `payload` on its standard input,
/// until the request's deadline: its standard output, or why not.
fn run_command(cmd: &str, request: &Request, payload: &[u8], max_output: u64) -> Result<Vec<u8>, Failed> {
    if Instant::now() >= request.deadline() {
        return Err(Failed {
            code: CODE_TIMEOUT,
            message: "the request's deadline passed before its command could start".into(),
        });
    }
    let s = request.sender();
    let mut command = Command::new("/bin/sh");
    command
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .env("SHMBUS_NAME", request.name())
        .env("SHMBUS_SERIAL", request.serial().to_string())
        .env("SHMBUS_TIMEOUT_MS", request.timeout().as_millis().to_string())
        .env("SHMBUS_EXPECTS_REPLY", if request.expects_reply() { "1" } else { "0" })
        .env("SHMBUS_SENDER_ID", s.client_id.to_string())
        .env("SHMBUS_SENDER_UID", s.uid.to_string())
        .env("SHMBUS_SENDER_GID", s.gid.to_string())
        .env("SHMBUS_SENDER_PID", s.pid.to_string());
    let mut child = {
        let mut running = RUNNING.lock().unwrap_or_else(|p| p.into_inner());
        let child = command
            .spawn()
            .map_err(|e| Failed { code: CODE_CANNOT_RUN, message: format!("cannot run /bin/sh: {e}") })?;
        running.push(child.id() as i32);
        child
    };
    let pgid = child.id() as i32;
    let _unlist = Unlist(pgid);

    // Every pipe has its own thread, and nothing here waits on one past
    // the deadline: a command that leaves a process holding a pipe (one
    // that escaped its group) costs a thread, not a hang.
    let (tx, rx) = mpsc::channel();
    let (mut stdin, mut stdout, mut stderr) =
        (child.stdin.take().unwrap(), child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let input = payload.to_vec();
    std::thread::spawn(move || {
        // A command that does not read its input is fine.
        let _ = stdin.write_all(&input);
    });
    let t = tx.clone();
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let got = match (&mut stdout).take(max_output.saturating_add(1)).read_to_end(&mut v) {
            Ok(_) if v.len() as u64 > max_output => {
                Err(format!("the command wrote more than {max_output} bytes"))
            }
            Ok(_) => Ok(v),
            Err(e) => Err(format!("cannot read the command's output: {e}")),
        };
        let _ = t.send(Piece::Stdout(got));
    });
    let t = tx.clone();
    std::thread::spawn(move || {
        // Drain it all (a full pipe would stall the command), keep the start.
        let (mut kept, mut buf) = (Vec::new(), [0u8; 4096]);
        while let Ok(n @ 1..) = stderr.read(&mut buf) {
            let room = shmbus::MAX_ERROR_MESSAGE.saturating_sub(kept.len());
            kept.extend_from_slice(&buf[..n.min(room)]);
        }
        let _ = t.send(Piece::Stderr(kept));
    });
    std::thread::spawn(move || {
        if let Ok(status) = child.wait() {
            let _ = tx.send(Piece::Exit(status));
        }
    });

    let (mut out, mut err, mut status) = (None, None, None);
    let mut deadline = request.deadline();
    let mut killed: Option<Failed> = None;
    while out.is_none() || err.is_none() || status.is_none() {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Piece::Stdout(Ok(v))) => out = Some(v),
            Ok(Piece::Stdout(Err(message))) => {
                out = Some(Vec::new());
                if killed.is_none() {
                    kill_group(pgid);
                    killed = Some(Failed { code: CODE_TOO_MUCH_OUTPUT, message });
                }
            }
            Ok(Piece::Stderr(v)) => err = Some(v),
            Ok(Piece::Exit(s)) => status = Some(s),
            Err(mpsc::RecvTimeoutError::Timeout) if killed.is_none() => {
                kill_group(pgid);
                killed = Some(Failed {
                    code: CODE_TIMEOUT,
                    message: format!(
                        "the command ran past the request's timeout ({} s)",
                        secs(request.timeout())
                    ),
                });
                // What is left of the group dies now; wait a moment for
                // its pipes to close.
                deadline = Instant::now() + Duration::from_secs(1);
            }
            Err(_) => break,
        }
    }
    if let Some(k) = killed {
        return Err(k);
    }
    let (Some(out), Some(err), Some(status)) = (out, err, status) else {
        unreachable!("the loop ends early only once the command was killed")
    };
    if status.success() {
        return Ok(out);
    }
    let code = match (status.code(), status.signal()) {
        (Some(c), _) => c as u32,
        (None, Some(sig)) => 128 + sig as u32,
        (None, None) => 1,
    };
    let first = String::from_utf8_lossy(&err).lines().next().unwrap_or("").trim().to_owned();
    let message = match (first.is_empty(), status.signal()) {
        (false, _) => first,
        (true, Some(sig)) => format!("the command was killed by signal {sig}"),
        (true, None) => format!("the command exited with status {code}"),
    };
    Err(Failed { code, message })
}

/// Takes a process group off [`RUNNING`] when its command is done with.
struct Unlist(i32);

impl Drop for Unlist {
    fn drop(&mut self) {
        let mut running = RUNNING.lock().unwrap_or_else(|p| p.into_inner());
        running.retain(|&g| g != self.0);
    }
}

/// A name's owners or queue as `names` prints them: the ids listed, then
/// how many the broker counted but did not list (it lists at most
/// `MAX_NAME_INFO_IDS` ids of a name).
fn id_list(listed: &[u64], count: u32) -> String {
    let mut s = match listed {
        [] => "-".to_owned(),
        v => v.iter().map(u64::to_string).collect::<Vec<_>>().join(","),
    };
    let unlisted = u64::from(count).saturating_sub(listed.len() as u64);
    if unlisted > 0 {
        s.push_str(&format!(",+{unlisted} more"));
    }
    s
}

fn print_names(out: &mut impl Write, client: &Client, json: bool) -> Fallible<()> {
    if !json {
        writeln!(out, "{:<32} {:<9} {:<16} {:<16}  FLAGS", "NAME", "KIND", "OWNERS", "QUEUED")?;
    }
    for_each_page(
        |after| client.names_page(after),
        |ns: Vec<NameInfo>| {
            if json {
                return write_json(out, &ns);
            }
            for n in ns {
                writeln!(
                    out,
                    "{:<32} {:<9} {:<16} {:<16}  {}",
                    escape(&n.name),
                    if n.shared { "shared" } else { "exclusive" },
                    id_list(&n.owners, n.owner_count),
                    id_list(&n.queued, n.queued_count),
                    if n.allow_replacement { "allow_replacement" } else { "-" }
                )?;
            }
            out.flush()
        },
    )
}

// ------------------------------------------------------ administration --

/// How the broker's policy decides one action: printed, and the verdict as
/// the exit status.
fn policy_check(
    client: &Client,
    uid: u32,
    gids: &[u32],
    action: &str,
    subject: &str,
    json: bool,
) -> Fallible<ExitCode> {
    let verdict = client.policy_check(uid, gids, action, subject).map_err(|e| match e {
        RequestError::Refused { code: ErrorCode::Denied, message } => {
            format!(
                "denied: this client may not ask about the policy (it needs the introspect right): {message}"
            )
        }
        other => format!("cannot check the policy: {other}"),
    })?;
    let word = if verdict.allowed { "allow" } else { "deny" };
    let mut out = std::io::stdout().lock();
    if json {
        let v = json!({
            "uid": uid, "gids": gids, "action": action, "subject": subject,
            "allowed": verdict.allowed, "explanation": verdict.explanation,
        });
        writeln!(out, "{v}")?;
    } else {
        // The broker may say the verdict itself ("allow: rule 2 ..."):
        // not twice.
        let why = verdict.explanation.strip_prefix(word).and_then(|r| r.strip_prefix(": "));
        writeln!(out, "{word}: {}", escape(why.unwrap_or(&verdict.explanation)))?;
    }
    out.flush()?;
    Ok(if verdict.allowed { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// Characters of a payload `monitor` shows unless --full.
const MONITOR_SHOWN: usize = 64;

fn monitor(
    client: &Client,
    patterns: &[String],
    full: bool,
    count: Option<u64>,
    json: bool,
) -> Fallible<ExitCode> {
    let refs: Vec<&str> = patterns.iter().map(String::as_str).collect();
    let monitor = client.monitor(&refs, full).map_err(|e| match e {
        SubscribeError::Refused { code: ErrorCode::Denied, message } => {
            format!("denied: this client may not monitor the bus (it needs the monitor right): {message}")
        }
        other => format!("cannot start the monitor: {other}"),
    })?;
    let what =
        if patterns.is_empty() { "everything".to_owned() } else { escape(&refs.join(" ")).into_owned() };
    eprintln!("shmbusctl: monitoring {what}");
    let mut out = std::io::stdout().lock();
    let mut seen = 0u64;
    while count.is_none_or(|c| seen < c) {
        match monitor.recv() {
            Ok(MonitorItem::Event(e)) => {
                seen += 1;
                write_event(&mut out, &e, full, json)?;
            }
            Ok(MonitorItem::Gap { missed }) => {
                if json {
                    writeln!(out, "{}", json!({ "gap": missed }))?;
                } else {
                    writeln!(out, "-- {missed} events lost: the monitor fell behind --")?;
                }
            }
            Ok(MonitorItem::Reconnected) => {
                if json {
                    writeln!(out, "{}", json!({ "reconnected": true }))?;
                }
                eprintln!("shmbusctl: reconnected to the broker; events in between were not seen");
            }
            // One event lost to a broker we cannot read; the rest goes on.
            Err(e @ MonitorError::Malformed { .. }) => eprintln!("shmbusctl: {}", escape(&e.to_string())),
            Err(e) => return Err(e.into()),
        }
        out.flush()?;
    }
    Ok(ExitCode::SUCCESS)
}

fn kind_word(kind: MonitorKind) -> &'static str {
    match kind {
        MonitorKind::Publish => "publish",
        MonitorKind::Request => "request",
        MonitorKind::Answer => "answer",
        MonitorKind::Error => "error",
        MonitorKind::Connect => "connect",
        MonitorKind::Disconnect => "disconnect",
        MonitorKind::Subscribe => "subscribe",
        MonitorKind::Unsubscribe => "unsubscribe",
        MonitorKind::NameChange => "name-change",
    }
}

/// A monitor event's payload bytes as text if they are UTF-8, else `None`.
/// An excerpt the broker cut in the middle of a character is text up to
/// that character.
fn payload_text(e: &BusEvent) -> Option<&str> {
    match std::str::from_utf8(&e.payload) {
        Ok(t) => Some(t),
        Err(bad) if e.payload_is_cut() && bad.error_len().is_none() => {
            std::str::from_utf8(&e.payload[..bad.valid_up_to()]).ok()
        }
        Err(_) => None,
    }
}

/// A payload for people: `N B` and then the bytes, quoted and escaped if
/// they are text, else in hex after `hex`; at most `limit` characters of
/// either (`...` marks a cut, here or the broker's). A memfd payload is
/// `memfd N B`.
fn shown_payload(e: &BusEvent, limit: Option<usize>) -> String {
    if e.memfd {
        return format!("memfd {} B", e.payload_len);
    }
    if e.payload_len == 0 {
        return "0 B".to_owned();
    }
    let cut_by_broker = e.payload_is_cut();
    let (shown, cut_here) = match payload_text(e) {
        Some(text) => {
            let end = limit.and_then(|l| text.char_indices().nth(l)).map_or(text.len(), |(i, _)| i);
            (format!("\"{}\"", escape(&text[..end])), end < text.len())
        }
        None => {
            let bytes = limit.map_or(e.payload.len(), |l| (l / 2).min(e.payload.len()));
            let hex: String = e.payload[..bytes].iter().map(|b| format!("{b:02x}")).collect();
            (format!("hex {hex}"), bytes < e.payload.len())
        }
    };
    let more = if cut_here || cut_by_broker { "..." } else { "" };
    format!("{} B {shown}{more}", e.payload_len)
}

/// Now, as the time of day in UTC to the microsecond, and as microseconds
/// since the epoch.
fn timestamp() -> (String, u64) {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let us = since.as_micros() as u64;
    let day = since.as_secs() % 86_400;
    let clock =
        format!("{:02}:{:02}:{:02}.{:06}", day / 3600, day / 60 % 60, day % 60, since.subsec_micros());
    (clock, us)
}

fn write_event(out: &mut impl Write, e: &BusEvent, full: bool, json: bool) -> std::io::Result<()> {
    let (clock, time_us) = timestamp();
    let s = e.sender;
    if json {
        let (payload, encoding) = match payload_text(e) {
            Some(t) => (t.to_owned(), "utf8"),
            None => (e.payload.iter().map(|b| format!("{b:02x}")).collect(), "hex"),
        };
        let v = json!({
            "time_us": time_us, "kind": kind_word(e.kind), "subject": e.subject,
            "sender": {"client_id": s.client_id, "uid": s.uid, "gid": s.gid, "pid": s.pid},
            "receivers": e.receivers, "detail": e.detail, "payload_len": e.payload_len, "memfd": e.memfd,
            "payload": payload, "payload_encoding": encoding, "payload_cut": e.payload_is_cut(), "seq": e.seq,
        });
        return writeln!(out, "{v}");
    }
    let mut line = format!("{clock} {}", kind_word(e.kind));
    if !e.subject.is_empty() {
        line.push(' ');
        line.push_str(&escape(&e.subject));
    }
    if s.client_id == 0 {
        line.push_str(&format!(" from the broker (pid {})", s.pid));
    } else {
        line.push_str(&format!(" from client {} (uid {}, pid {})", s.client_id, s.uid, s.pid));
    }
    let carries = matches!(e.kind, MonitorKind::Publish | MonitorKind::Request | MonitorKind::Answer);
    if !e.receivers.is_empty() {
        let to: Vec<String> = e.receivers.iter().map(u64::to_string).collect();
        line.push_str(&format!(" to [{}]", to.join(", ")));
    } else if carries {
        // A publish no subscription matched.
        line.push_str(" to nobody");
    }
    if carries || e.payload_len > 0 {
        line.push(' ');
        line.push_str(&shown_payload(e, (!full).then_some(MONITOR_SHOWN)));
    }
    if !e.detail.is_empty() {
        line.push_str(&format!(" ({})", escape(&e.detail)));
    }
    writeln!(out, "{line}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_name_s_ids_say_how_many_were_not_listed() {
        assert_eq!(super::id_list(&[], 0), "-");
        assert_eq!(super::id_list(&[3, 4], 2), "3,4");
        assert_eq!(super::id_list(&[3, 4], 5), "3,4,+3 more");
        // A broker's count lower than its list is not a negative.
        assert_eq!(super::id_list(&[3, 4], 1), "3,4");
    }
}
