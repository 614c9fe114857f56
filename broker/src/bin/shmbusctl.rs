//! shmbusctl: talk to a shmbus broker from the shell.

#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::json;
use shmbus::{Address, ChannelEvent, Client, ClientInfo, Event, Message, Stats, Subscription, TopicInfo};

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
            eprintln!("shmbusctl: {e}");
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
            print_stats(&client.stats()?, args.json);
            print_channels(&client.channels()?, args.json);
        }
        Cmd::Clients => print_clients(&client.clients()?, args.json),
        Cmd::Topics => print_topics(&client.topics()?, args.json),
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
                eprintln!("shmbusctl: fell behind on {pattern}: {missed} messages missed");
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
                    writeln!(out, "{topic} {}", printable(&value))?;
                }
                out.flush()?;
            }
            Ok(ChannelEvent::Missed(k)) => {
                eprintln!("shmbusctl: fell behind on channel {topic}: {k} messages missed")
            }
            Err(shmbus::ChannelError::Corrupt(what)) => {
                eprintln!("shmbusctl: channel {topic}: skipped corrupt slot ({what})")
            }
            Err(shmbus::ChannelError::Closed) => {
                eprintln!("shmbusctl: channel {topic} closed");
                break;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_channels(cs: &[shmbus::ChannelInfo], json: bool) {
    if json {
        for c in cs {
            println!("{}", serde_json::to_string(c).unwrap_or_default());
        }
        return;
    }
    if cs.is_empty() {
        return;
    }
    println!("  channels:");
    println!(
        "    {:>4} {:<24} {:>9} {:>7} {:>9} {:>7} {:<9} {:>12} {:>10}",
        "ID", "TOPIC", "PUBLISHER", "READERS", "SLOT_SIZE", "SLOTS", "OVERFLOW", "PUBLISHED", "OVERRUNS"
    );
    for c in cs {
        println!(
            "    {:>4} {:<24} {:>9} {:>7} {:>9} {:>7} {:<9} {:>12} {:>10}",
            c.id,
            c.topic,
            c.publisher,
            c.readers,
            c.slot_size,
            c.slot_count,
            format!("{:?}", c.overflow),
            c.published,
            c.overruns
        );
    }
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
    writeln!(out, "{} {}", m.topic(), printable(m.payload()))
}

/// UTF-8 text as is (control characters escaped); anything else escaped.
fn printable(p: &[u8]) -> String {
    match std::str::from_utf8(p) {
        Ok(s) => s
            .chars()
            .flat_map(|c| if c.is_control() { c.escape_default().collect::<Vec<_>>() } else { vec![c] })
            .collect(),
        Err(_) => p.escape_ascii().to_string(),
    }
}

fn print_stats(s: &Stats, json: bool) {
    if json {
        println!("{}", serde_json::to_string(s).unwrap_or_default());
        return;
    }
    println!("shmbusd {} on {}, up {:.1?}", s.version, s.address, Duration::from_millis(s.uptime_ms));
    println!("  clients        {:>12}", s.clients);
    println!("  subscriptions  {:>12}   ({} patterns)", s.subscriptions, s.patterns);
    println!("  messages in    {:>12}   ({} bytes)", s.msgs_in, s.bytes_in);
    println!("  messages out   {:>12}   ({} bytes)", s.msgs_out, s.bytes_out);
    println!("  dropped        {:>12}   (reported in {} gap notices)", s.dropped, s.gap_notices);
    println!("  connections    {:>12}   accepted, {} refused", s.connections_accepted, s.connections_refused);
    println!(
        "  disconnects    {:>12}   protocol errors, {} slow consumers",
        s.protocol_errors, s.slow_disconnects
    );
}

fn print_clients(cs: &[ClientInfo], json: bool) {
    if json {
        for c in cs {
            println!("{}", serde_json::to_string(c).unwrap_or_default());
        }
        return;
    }
    println!(
        "{:>5} {:<16} {:>7} {:>6} {:<16} {:>5} {:>10} {:>10} {:>8} {:>10}  SUBSCRIPTIONS",
        "ID", "NAME", "PID", "UID", "COMMAND", "SUBS", "MSGS_IN", "MSGS_OUT", "DROPPED", "QUEUED_B"
    );
    for c in cs {
        println!(
            "{:>5} {:<16} {:>7} {:>6} {:<16} {:>5} {:>10} {:>10} {:>8} {:>10}  {}",
            c.id,
            c.name,
            c.pid,
            c.uid,
            c.command,
            c.subscription_count,
            c.msgs_in,
            c.msgs_out,
            c.dropped,
            c.queued_bytes,
            c.subscriptions.join(" ")
        );
    }
}

fn print_topics(ts: &[TopicInfo], json: bool) {
    if json {
        for t in ts {
            println!("{}", serde_json::to_string(t).unwrap_or_default());
        }
        return;
    }
    println!("{:>11}  PATTERN", "SUBSCRIBERS");
    for t in ts {
        println!("{:>11}  {}", t.subscribers, t.pattern);
    }
}
