//! A small publisher: sends a reading to `sensors.<room>.temp` every
//! 500 ms, as a typed value.
//!
//! ```text
//! cargo run --release --bin shmbusd &
//! cargo run -p shmbus-examples --bin subscriber &
//! cargo run -p shmbus-examples --bin publisher -- kitchen 5
//! ```

#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::Duration;

use serde::Serialize;
use shmbus::Client;

#[derive(Serialize)]
struct Reading<'a> {
    room: &'a str,
    celsius: f32,
}

fn main() -> ExitCode {
    // Errors for people: their Display, not their Debug.
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("publisher: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let room = args.next().unwrap_or_else(|| "kitchen".to_owned());
    let count: u32 = args
        .next()
        .map(|n| n.parse().map_err(|_| format!("COUNT must be a number, not {n:?}")))
        .transpose()?
        .unwrap_or(10);

    let client = Client::connect()?;
    let topic = format!("sensors.{room}.temp");
    for i in 0..count {
        let reading = Reading { room: &room, celsius: 20.0 + (i % 5) as f32 * 0.5 };
        client.publish_value(&topic, &reading)?;
        println!("published {topic} {:.1}", reading.celsius);
        std::thread::sleep(Duration::from_millis(500));
    }
    // Make sure the broker took everything before we leave.
    client.flush()?;
    Ok(())
}
