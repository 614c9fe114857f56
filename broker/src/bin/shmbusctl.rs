//! shmbusctl: talk to a shmbus broker from the shell.
//!
//! Every string a client chose (its name and command, patterns, topics,
//! channel topics) goes through `shmbus_proto::text::escape` before it is
//! printed for people, so no name can forge a line or drive the terminal.
//! `--json` output is left to JSON's own escaping. Lists of clients,
//! topics and channels are fetched a page at a time and printed as each
//! page arrives, so a huge bus never has to fit in memory at once.

#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde::Serialize;
use serde_json::json;
use shmbus::{
    Address, ChannelEvent, ChannelInfo, Client, ClientInfo, Event, Message, RequestError, Stats,
    Subscription, TopicInfo,
};
use shmbus_proto::text::escape;

/// Command-line tool for the shmbus message bus.
#[derive(Parser, Debug)]
#[command(name = "shmbusctl", version)]
struct Args {
    /// Bus address: `@name` (abstract socket) or a path. Default:
    /// $SHMBUS_ADDRESS, else the user bus `@shmbus.<uid>`.
    #[arg(long, global = true, value_name = "ADDR")]
    address: Option<Address>,
    /// Use the system bus, `@shmbus`.
    #[arg(long, global = true, conflicts_with = "address")]
    system: bool,
    /// Machine-readable output: one JSON object per line.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Round trip to the broker.
    Ping {
        #[arg(long, short = 'c', default_value_t = 1)]
        count: u32,
    },
    /// Broker counters.
    Status,
    /// Connected clients.
    Clients,
    /// Subscribed patterns and their subscriber counts.
    Topics,
    /// Publish DATA (or --file, or standard input) to TOPIC.
    Pub {
        topic: String,
        data: Option<String>,
        #[arg(long, short = 'f', conflicts_with = "data")]
        file: Option<std::path::PathBuf>,
        /// Publish it this many times.
        #[arg(long, short = 'c', default_value_t = 1)]
        count: u64,
    },
    /// Print messages matching PATTERN(s): `TOPIC PAYLOAD` per line.
    Sub {
        #[arg(required = true)]
        patterns: Vec<String>,
        /// Exit after this many messages.
        #[arg(long, short = 'c')]
        count: Option<u64>,
        /// Write payload bytes only, exactly as received.
        #[arg(long, conflicts_with = "json")]
        raw: bool,
        /// Read the ring channel named by the one PATTERN (a plain subject)
        /// instead of subscribing.
        #[arg(long)]
        channel: bool,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
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
            ExitCode::FAILURE
        }
    }
}

type Fallible<T> = Result<T, Box<dyn std::error::Error>>;

fn connect(args: &Args) -> Fallible<Client> {
    let mut opts = Client::options().name("shmbusctl");
    if let Some(a) = &args.address {
        opts = opts.address(a.clone());
    } else if args.system {
        opts = opts.system();
    }
    Ok(opts.connect()?)
}

fn run(args: Args) -> Fallible<ExitCode> {
    let client = connect(&args)?;
    match &args.cmd {
        Cmd::Ping { count } => {
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
            print_stats(&mut out, &client.stats()?, args.json)?;
            print_channels(&mut out, &client, args.json)?;
        }
        Cmd::Clients => print_clients(&mut std::io::stdout().lock(), &client, args.json)?,
        Cmd::Topics => print_topics(&mut std::io::stdout().lock(), &client, args.json)?,
        Cmd::Pub { topic, data, file, count } => {
            let payload = match (data, file) {
                (Some(d), _) => d.clone().into_bytes(),
                (None, Some(f)) => {
                    std::fs::read(f).map_err(|e| format!("cannot read {}: {e}", f.display()))?
                }
                (None, None) => {
                    let mut v = Vec::new();
                    std::io::stdin().read_to_end(&mut v)?;
                    v
                }
            };
            for _ in 0..*count {
                client.publish(topic, &payload)?;
            }
            client.flush()?;
        }
        Cmd::Sub { patterns, count, raw, channel: true } => {
            let [topic] = patterns.as_slice() else {
                return Err("--channel reads exactly one channel".into());
            };
            return read_channel(&client, topic, *count, *raw, args.json);
        }
        Cmd::Sub { patterns, count, raw, channel: false } => {
            return subscribe(&client, patterns, *count, *raw, args.json)
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn subscribe(
    client: &Client,
    patterns: &[String],
    count: Option<u64>,
    raw: bool,
    json: bool,
) -> Fallible<ExitCode> {
    let mut subs = Vec::new();
    for p in patterns {
        subs.push(client.subscribe(p)?);
    }
    let refs: Vec<&Subscription> = subs.iter().collect();
    let mut out = std::io::stdout().lock();
    let mut seen = 0u64;
    while count.is_none_or(|c| seen < c) {
        let Some((i, ev)) = Subscription::recv_any(&refs, None)? else { continue };
        match ev {
            Event::Message(m) => {
                seen += 1;
                write_message(&mut out, &m, raw, json)?;
                out.flush()?;
            }
            Event::Gap { missed } => {
                let pattern = refs[i].pattern();
                if json {
                    writeln!(out, "{}", json!({"gap": missed, "pattern": pattern}))?;
                }
                eprintln!("shmbusctl: fell behind on {}: {missed} messages missed", escape(pattern));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn read_channel(
    client: &Client,
    topic: &str,
    count: Option<u64>,
    raw: bool,
    json: bool,
) -> Fallible<ExitCode> {
    let mut sub = client.channel_subscriber(topic)?;
    let shown = escape(topic);
    let mut out = std::io::stdout().lock();
    let mut seen = 0u64;
    while count.is_none_or(|c| seen < c) {
        match sub.recv(<[u8]>::to_vec) {
            Ok(ChannelEvent::Message { seq, value }) => {
                seen += 1;
                if raw {
                    out.write_all(&value)?;
                } else if json {
                    let text = std::str::from_utf8(&value).ok();
                    writeln!(
                        out,
                        "{}",
                        json!({"topic": topic, "seq": seq, "size": value.len(), "payload": text})
                    )?;
                } else {
                    writeln!(out, "{shown} {}", printable(&value))?;
                }
                out.flush()?;
            }
            Ok(ChannelEvent::Missed(k)) => {
                eprintln!("shmbusctl: fell behind on channel {shown}: {k} messages missed")
            }
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

fn write_message(out: &mut impl Write, m: &Message, raw: bool, json: bool) -> std::io::Result<()> {
    if raw {
        return out.write_all(m.payload());
    }
    if json {
        let s = m.sender();
        let text = std::str::from_utf8(m.payload()).ok();
        let hex: Option<String> =
            text.is_none().then(|| m.payload().iter().map(|b| format!("{b:02x}")).collect());
        return writeln!(
            out,
            "{}",
            json!({
                "topic": m.topic(), "seq": m.seq(), "size": m.payload().len(),
                "sender": {"client_id": s.client_id, "uid": s.uid, "gid": s.gid, "pid": s.pid},
                "payload": text, "payload_hex": hex,
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
        "  refusals       {:>12}   by quota, {} broker short of fds or memory",
        s.quota_refusals, s.broker_resource_errors
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
