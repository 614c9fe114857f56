//! The broker process: one thread around one `mio::Poll`.
//!
//! Layering: this module owns every socket, the signal pipes, the timers
//! and the clock; every decision is the bus core's ([`crate::bus`]), which
//! does no I/O. The loop hands the core what arrived and applies the
//! effects it returns: send what a peer's queue holds, close a peer.

pub mod config;
pub mod event_loop;
pub mod link;
pub mod policy_file;
pub mod read_turns;
pub mod signals;
pub mod systemd;

pub use config::Config;
pub use event_loop::run;

/// Where the broker's log goes, as [`init_logging`] chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogSink {
    /// The systemd journal, natively: one entry per event with its fields
    /// (PRIORITY from the level, TARGET, CODE_FILE, ...).
    Journal,
    /// Standard error, as plain lines: no colours, and no timestamps when
    /// a service manager records stderr (it stamps each line itself).
    Stderr { colour: bool, timestamps: bool },
}

/// Tracing target of the broker's start line, which is logged at every
/// level but `error` (it is written at `info`).
pub const START_TARGET: &str = "shmbusd::start";

/// Sets up the broker's log: up to `level`, plus its start line
/// ([`START_TARGET`]) unless `level` is `error`.
///
/// Under systemd (`$JOURNAL_STREAM` names the file stderr is), entries go
/// to the journal with their fields when its socket answers, else to
/// stderr without colours or timestamps. Elsewhere, to stderr, with
/// colours only if stderr is a terminal.
pub fn init_logging(level: tracing::Level) -> LogSink {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;

    // `error` alone silences the start line too.
    let start = if level >= tracing::Level::WARN { tracing::Level::INFO } else { level };
    let filter = Targets::new().with_default(level).with_target(START_TARGET, start);
    let managed = stderr_is_journal_stream();
    if managed {
        if let Ok(journal) = tracing_journald::layer() {
            tracing_subscriber::registry().with(journal.with_filter(filter)).init();
            return LogSink::Journal;
        }
    }
    let colour = !managed && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt =
        tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false).with_ansi(colour);
    if managed {
        tracing_subscriber::registry().with(fmt.without_time().with_filter(filter)).init();
    } else {
        tracing_subscriber::registry().with(fmt.with_filter(filter)).init();
    }
    LogSink::Stderr { colour, timestamps: !managed }
}

/// `$JOURNAL_STREAM` is `DEV:INODE` of the stream systemd connected
/// stdout/stderr to: true if stderr is that stream (and not, say,
/// redirected to a file by a script run from a service).
fn stderr_is_journal_stream() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else { return false };
    let Some((dev, ino)) = v.to_str().and_then(|v| v.split_once(':')) else { return false };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else { return false };
    match rustix::fs::fstat(std::io::stderr()) {
        Ok(st) => st.st_dev == dev && st.st_ino == ino,
        Err(_) => false,
    }
}
