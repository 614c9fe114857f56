//! A small service: owns the name `thermo.kitchen` and answers each call
//! with a reading, `21.5 °C` (or in °F when the request says `f`). Any
//! other request gets an application error, code 1.
//!
//! ```text
//! cargo run --release --bin shmbusd &
//! cargo run -p shmbus-examples --bin thermo_service &
//! cargo run -p shmbus-examples --bin thermo_client          # or: shmbusctl call thermo.kitchen f
//! ```

#![forbid(unsafe_code)]

use std::process::ExitCode;

use shmbus::Client;

fn main() -> ExitCode {
    // Errors for people: their Display, not their Debug.
    match serve() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("thermo_service: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve() -> Result<(), Box<dyn std::error::Error>> {
    let client = Client::connect()?;
    let service = client.serve("thermo.kitchen")?; // fails if someone else owns it
    println!("serving thermo.kitchen");
    for (n, request) in service.iter().enumerate() {
        let request = request?;
        let celsius = 20.0 + (n % 5) as f32 * 0.5; // a sensor would go here
        let unit = String::from_utf8_lossy(request.payload()).into_owned();
        let caller = request.sender().pid; // stamped by the broker, not forgeable
        match unit.as_str() {
            "" | "c" => request.reply(format!("{celsius:.1} °C").as_bytes())?,
            "f" => request.reply(format!("{:.1} °F", celsius * 1.8 + 32.0).as_bytes())?,
            _ => request.reply_error(1, &format!("unknown unit {unit:?}: ask for c or f"))?,
        }
        println!("answered pid {caller} ({unit:?})");
    }
    Ok(())
}
