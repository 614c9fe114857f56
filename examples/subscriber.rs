//! A small subscriber: prints every reading on `sensors.*.temp`, with who
//! sent it, and says so when it fell behind.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use serde::Deserialize;
use shmbus::{Client, Event};

#[derive(Deserialize, Debug)]
struct Reading {
    room: String,
    celsius: f32,
}

fn main() -> ExitCode {
    // Errors for people: their Display, not their Debug.
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("subscriber: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let client = Client::connect()?;
    let sub = client.subscribe("sensors.*.temp")?;
    println!("listening on sensors.*.temp");
    for event in &sub {
        match event? {
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
                // Someone else's bytes on our subject (`shmbusctl pub
                // sensors.kitchen.temp 21.5`, say): not a reason to stop.
                Err(e) => println!("{}: not a reading ({e})", m.topic()),
            },
            Event::Reconnected => println!("the broker restarted; readings in between may be missed"),
            Event::Gap { missed } => println!("fell behind: {missed} readings missed"),
        }
    }
    Ok(())
}
