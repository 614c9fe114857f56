//! Signals as events in the poll loop: a handler writes a byte into a
//! socketpair (the self-pipe trick, via signal-hook) whose read end is
//! registered with mio. TERM and INT share one pipe (shut down), HUP has
//! its own: the event loop reloads the policy file on it (and only logs
//! it when there is none), rather than the default of killing the broker.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;

#[derive(Debug)]
pub struct SignalPipe {
    pub read: UnixStream,
}

impl SignalPipe {
    pub fn new(signals: &[i32]) -> io::Result<SignalPipe> {
        let (r, w) = UnixStream::pair()?;
        r.set_nonblocking(true)?;
        w.set_nonblocking(true)?;
        for &sig in signals {
            signal_hook::low_level::pipe::register(sig, w.try_clone()?)?;
        }
        Ok(SignalPipe { read: r })
    }

    /// Empties the pipe; returns whether any signal had arrived.
    pub fn drain(&mut self) -> bool {
        let mut buf = [0u8; 64];
        let mut any = false;
        loop {
            match self.read.read(&mut buf) {
                Ok(0) => return any,
                Ok(_) => any = true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return any,
            }
        }
    }
}

/// The broker's signal pipes: TERM and INT (stop), HUP (reload). Installed
/// before the broker listens ([`crate::daemon::Config::signals`]): from
/// then on these signals are events for the loop, never their default
/// action, which killed a broker caught between making its socket file and
/// starting its loop (34 of 400 start-then-TERM cycles), leaving the file.
#[derive(Debug)]
pub struct Signals {
    pub stop: SignalPipe,
    pub hup: SignalPipe,
}

impl Signals {
    pub fn install() -> io::Result<Signals> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        Ok(Signals { stop: SignalPipe::new(&[SIGTERM, SIGINT])?, hup: SignalPipe::new(&[SIGHUP])? })
    }
}
