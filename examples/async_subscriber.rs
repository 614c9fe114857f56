//! The subscriber, async: prints every reading on `sensors.*.temp` from a
//! tokio task, with who sent it, and says so when it fell behind.
//!
//! ```text
//! cargo run --release --bin shmbusd &
//! cargo run -p shmbus-examples --bin async_subscriber &
//! cargo run -p shmbus-examples --bin publisher
//! ```

#![forbid(unsafe_code)]

use std::process::ExitCode;

use serde::Deserialize;
use shmbus::{AsyncClient, Event};

#[derive(Deserialize, Debug)]
struct Reading {
    room: String,
    celsius: f32,
}

#[tokio::main]
async fn main() -> ExitCode {
    // Errors for people: their Display, not their Debug.
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("async_subscriber: error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let client = AsyncClient::connect().await?;
    let sub = client.subscribe("sensors.*.temp").await?;
    println!("listening on sensors.*.temp");
    // `sub` is also a `futures_core::Stream` of the same events.
    loop {
        match sub.recv().await? {
            Event::Message(m) => match m.decode::<Reading>() {
                Ok(r) => {
                    let s = m.sender();
                    println!(
                        "{}: {:.1} °C (from pid {} uid {}, #{})",
                        r.room,
                        r.celsius,
                        s.pid,
                        s.uid,
                        m.seq()
                    );
                }
                // Someone else's bytes on our subject: not a reason to stop.
                Err(e) => println!("{}: not a reading ({e})", m.topic()),
            },
            Event::Gap { missed } => println!("fell behind: {missed} readings missed"),
            Event::Reconnected => println!("the broker restarted: readings in between are missed"),
        }
    }
}
