//! Calls `thermo.kitchen` (see `thermo_service.rs`) and prints the answer,
//! or why there is none: every call gets exactly one answer.
//!
//! With `watch`, it follows who owns the name instead (the broker's
//! `NameOwnerChanged` events on `$SYS.name.thermo.kitchen`).
//!
//! ```text
//! cargo run -p shmbus-examples --bin thermo_client -- f
//! cargo run -p shmbus-examples --bin thermo_client -- watch
//! ```

#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::Duration;

use shmbus::{CallError, Client, Event, NameOwnerChanged};

fn main() -> ExitCode {
    let unit = std::env::args().nth(1).unwrap_or_default(); // "", "c" or "f"
    let client = match Client::connect() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("thermo_client: {e}");
            return ExitCode::FAILURE;
        }
    };
    if unit == "watch" {
        if let Err(e) = watch(&client) {
            eprintln!("thermo_client: {e}");
            return ExitCode::FAILURE;
        }
        return ExitCode::SUCCESS;
    }
    match client.request("thermo.kitchen", unit.as_bytes(), Duration::from_secs(1)) {
        Ok(reply) => {
            let text = String::from_utf8_lossy(reply.payload());
            println!("kitchen: {text} (from pid {})", reply.responder().pid);
            ExitCode::SUCCESS
        }
        Err(CallError::App { code, message, .. }) => {
            eprintln!("thermo_client: the service said no ({code}): {message}");
            ExitCode::FAILURE
        }
        Err(e @ CallError::NoResponder { .. }) => {
            eprintln!("thermo_client: {e}; is thermo_service running?");
            ExitCode::FAILURE
        }
        Err(e) => {
            // ResponderGone, Timeout, Denied, LimitExceeded, ... each says what happened.
            eprintln!("thermo_client: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Prints every change of owner of `thermo.kitchen`, as it happens.
fn watch(client: &Client) -> Result<(), Box<dyn std::error::Error>> {
    let events = client.subscribe("$SYS.name.thermo.kitchen")?; // or "$SYS.name.>" for every name
    println!("owner now: {}", who(client.name_owner("thermo.kitchen")?)); // no replay: ask once
    for event in &events {
        match event? {
            Event::Message(m) => {
                let change: NameOwnerChanged = m.decode()?;
                println!("{}: {} -> {}", change.name, who(change.old_owner), who(change.new_owner));
            }
            // Changes went by unseen: ask again.
            Event::Gap { .. } | Event::Reconnected => {
                println!("missed some changes; owner now: {}", who(client.name_owner("thermo.kitchen")?))
            }
        }
    }
    Ok(())
}

fn who(owner: Option<u64>) -> String {
    owner.map_or("nobody".into(), |id| format!("client {id}"))
}
