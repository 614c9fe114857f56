//! `shmbus-bridge`: runs a bridge (`--config FILE`), or asks a running
//! one for its status (`status`).
//!
//! Model: the binary is a thin shell over the library: it reads and checks
//! the configuration (every error names its key, and exits 2), sets up
//! logging (stderr, `--verbose` for debug), and runs the bridge on a
//! multi-threaded tokio runtime until SIGTERM or SIGINT. `status` is a
//! plain shmbus call to the bridge's status name, printed for people or as
//! JSON; it exits 1 if the bridge does not answer.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use shmbus_bridge::{hostname, status_name, Config, Status};

#[derive(Parser)]
#[command(name = "shmbus-bridge", about = "Forwards chosen subjects and services between shmbus and NATS")]
struct Cli {
    /// The bridge's configuration (TOML).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Log debug detail too.
    #[arg(long, short)]
    verbose: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Asks a running bridge for its counters and connection states.
    Status {
        /// The bridge's name (default: the config's, else the host's).
        #[arg(long)]
        name: Option<String>,
        /// The shmbus address (default: the config's, else the client's).
        #[arg(long)]
        address: Option<String>,
        /// Print the JSON as the bridge answered it.
        #[arg(long)]
        json: bool,
    },
}

/// Why `status` failed.
#[derive(Debug, thiserror::Error)]
enum StatusError {
    #[error("{0}")]
    Config(#[from] shmbus_bridge::ConfigError),
    #[error("invalid name: {0}")]
    Name(String),
    #[error("cannot connect to the shmbus broker: {0}")]
    Connect(#[from] shmbus::ConnectError),
    #[error("the bridge did not answer: {0}")]
    Call(#[from] shmbus::CallError),
    #[error("the bridge's answer is not a status: {0}")]
    Decode(#[from] serde_json::Error),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = if cli.verbose { tracing::Level::DEBUG } else { tracing::Level::INFO };
    // Colours only on a terminal: a log file or the journal gets plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(colour)
        .init();
    match cli.command {
        Some(Command::Status { name, address, json }) => match status(cli.config, name, address, json) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("shmbus-bridge status: {e}");
                ExitCode::from(1)
            }
        },
        None => {
            let Some(path) = cli.config else {
                eprintln!("shmbus-bridge: --config FILE is required (see --help)");
                return ExitCode::from(2);
            };
            let cfg = match Config::load(&path, &hostname()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("shmbus-bridge: {e}");
                    return ExitCode::from(2);
                }
            };
            run(cfg)
        }
    }
}

fn run(cfg: Config) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("shmbus-bridge: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(async move {
        let shutdown = async {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!("cannot watch SIGTERM: {e}");
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        shmbus_bridge::run(cfg, hostname(), shutdown).await
    });
    rt.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(1)
        }
    }
}

fn status(
    config: Option<PathBuf>,
    name: Option<String>,
    address: Option<String>,
    json: bool,
) -> Result<(), StatusError> {
    let cfg = config.map(|p| Config::load(&p, &hostname())).transpose()?;
    let name = match (name, &cfg) {
        (Some(n), _) => n,
        (None, Some(c)) => c.name.clone(),
        (None, None) => shmbus_bridge::config::default_name(&hostname()),
    };
    shmbus_bridge::config::check_name(&name).map_err(StatusError::Name)?;
    let address = address.or_else(|| cfg.as_ref().and_then(|c| c.shmbus.clone()));
    let client = match address {
        Some(a) => shmbus::Client::connect_to(&a)?,
        None => shmbus::Client::connect()?,
    };
    let reply = client.request(&status_name(&name), b"", Duration::from_secs(5))?;
    let status: Status = serde_json::from_slice(reply.payload())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", status.render());
    }
    Ok(())
}
