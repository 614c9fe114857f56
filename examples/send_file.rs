//! Sends a file of any size as one message, by sealed memfd: the file is
//! read straight into a loan (shared memory), sealed, and every subscriber
//! maps those same pages. Receive it with
//! `shmbusctl sub 'files.>' --raw --count 1 > copy`.
//!
//! ```text
//! cargo run -p shmbus-examples --bin send_file -- files.report ./report.pdf
//! ```

#![forbid(unsafe_code)]

use std::io::Read;
use std::process::ExitCode;

use shmbus::Client;

fn main() -> ExitCode {
    // Errors for people: their Display, not their Debug.
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("send_file: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(topic), Some(path)) = (args.next(), args.next()) else {
        eprintln!("usage: send_file TOPIC PATH");
        std::process::exit(2);
    };
    let mut file = std::fs::File::open(&path).map_err(|e| format!("cannot open {path}: {e}"))?;
    let len = file.metadata()?.len() as usize;

    let client = Client::connect()?;
    let mut loan = client.loan(len)?;
    file.read_exact(&mut loan)?; // the only copy: from the page cache into shared memory
    client.publish_loan(&topic, loan)?;
    client.flush()?;
    println!("sent {path} ({len} bytes) to {topic}");
    Ok(())
}
