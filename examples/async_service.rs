//! The thermo service, async: owns `thermo.kitchen` and answers each call
//! from its own tokio task (so a slow answer holds up no other), with a
//! reading in °C, or in °F when the request says `f`. Any other request
//! gets an application error, code 1.
//!
//! ```text
//! cargo run --release --bin shmbusd &
//! cargo run -p shmbus-examples --bin async_service &
//! cargo run -p shmbus-examples --bin thermo_client          # or: shmbusctl call thermo.kitchen f
//! ```

#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::Duration;

use shmbus::{AsyncClient, Request};

#[tokio::main]
async fn main() -> ExitCode {
    // Errors for people: their Display, not their Debug.
    match serve().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("async_service: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve() -> Result<(), Box<dyn std::error::Error>> {
    let client = AsyncClient::connect().await?;
    let service = client.serve("thermo.kitchen").await?; // fails if someone else owns it
    println!("serving thermo.kitchen");
    // `service` is also a `futures_core::Stream` of requests.
    loop {
        let request = service.recv().await?;
        tokio::spawn(async move {
            if let Err(e) = answer(request).await {
                eprintln!("async_service: {e}");
            }
        });
    }
}

async fn answer(request: Request) -> Result<(), shmbus::ReplyError> {
    // A sensor would go here; it takes a moment.
    tokio::time::sleep(Duration::from_millis(10)).await;
    let celsius = 21.5f32;
    let unit = String::from_utf8_lossy(request.payload()).into_owned();
    let caller = request.sender().pid; // stamped by the broker, not forgeable
    match unit.as_str() {
        "" | "c" => request.reply_async(format!("{celsius:.1} °C").as_bytes()).await?,
        "f" => request.reply_async(format!("{:.1} °F", celsius * 1.8 + 32.0).as_bytes()).await?,
        _ => request.reply_error_async(1, &format!("unknown unit {unit:?}: ask for c or f")).await?,
    }
    println!("answered pid {caller} ({unit:?})");
    Ok(())
}
