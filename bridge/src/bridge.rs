//! The running bridge: one shmbus connection, one NATS connection, and a
//! task per forwarded pattern or name, all on one tokio runtime.
//!
//! Tasks and their invariants:
//! - **export** (one per `export` pattern): reads the local subscription and
//!   never waits on NATS. Each message is decided by `stats::outbound` (a
//!   loop, a drop with its reason, or forward) and forwarded with `try_send`
//!   into the bounded queue; a full queue is a counted `queue-full` drop. So
//!   a slow or absent NATS never stalls the bridge's reader, and the broker
//!   never has to gap or cut off the bridge for it.
//! - **writer** (one): takes the queue and publishes on NATS with the
//!   bridge's headers, numbering each message per subject (`Shmbus-Seq`,
//!   [`SeqOut`]); what it cannot publish is counted, and its number given
//!   back.
//! - **import** (one per `import` pattern): reads the NATS subscription and
//!   never waits on the broker: each message goes with `try_send` into a
//!   second bounded queue (a full one is a counted `queue-full` drop), so
//!   NATS never buffers much for the bridge. What NATS drops on the way (a
//!   slow consumer's messages) shows as a gap in the sender's `Shmbus-Seq`,
//!   counted as `nats-lost` ([`SeqIn`]) before anything else may drop the
//!   message that shows it. Its own messages never come
//!   back (NATS `no_echo`), and one carrying its own `Shmbus-Bridge` name is
//!   dropped as a loop all the same.
//! - **local writer** (one): takes that queue and publishes locally with the
//!   origin text (or makes the sends to exported names); if the broker is
//!   away the publish waits for the reconnection, or fails and is counted
//!   (`shmbus-down`).
//! - Both queues hold at most `queue` messages and [`QUEUE_BYTES`] of
//!   payload.
//! - Overlapping patterns in one list: each side delivers a message once
//!   per matching subscription; only the task of the first matching pattern
//!   forwards it.
//! - **service export** (one per `services_export` pattern): each NATS
//!   request becomes a local call, in a task of its own under a bound
//!   (`max_inflight_requests`; past it the caller is answered
//!   `unavailable`). A NATS publish (no reply subject) becomes a local
//!   send, queued for the local writer like an imported message (a full
//!   queue: counted `unavailable`), so the task never waits on the broker.
//! - **service import** (one per `services_import` name): the bridge owns
//!   the name locally; each call becomes a NATS request, each send a NATS
//!   publish queued for the writer (a full queue: counted `unavailable`).
//! - **status**: serves `shmbus-bridge.<name>` with the JSON status.
//! - **gaps**: every half second, publishes what was lost since the last
//!   notice, on the receiving side (`shmbus-bridge.<name>.gap`, with the
//!   prefix on NATS), once that side is connected.
//!
//! Local loop prevention: a local message whose broker-stamped client id
//! is the bridge's own was imported by the bridge and is not exported
//! again. The id changes with a reconnection, and messages read before the
//! subscription's `Reconnected` event may still carry the old one: both
//! count as own until the event.
//!
//! Reconnection is the clients' own: the shmbus client renews
//! subscriptions and names, async-nats its subscriptions. The bridge only
//! watches (NATS connection events, shmbus `Reconnected` events), logs and
//! counts.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::{HeaderMap, HeaderValue};
use bytes::Bytes;
use futures_util::StreamExt;
use shmbus::{
    AsyncClient, AsyncService, CallError, ConnectOptions, Event, NameFlags, PublishError, Reply, Sender,
};
use tokio::sync::{mpsc, Semaphore};
use tracing::{debug, error, info, warn};

use crate::config::{Auth, Config};
use crate::mapping::{
    self, code, Prefix, RemoteError, SeqIn, SeqOut, H_BRIDGE, H_ERROR, H_HOST, H_SENDER, H_SEQ, H_TIMEOUT,
};
use crate::stats::{self, Counters, Dir, DropReason, Outbound, SideInfo};

/// The local name that answers the status of the bridge `name`.
pub fn status_name(name: &str) -> String {
    format!("shmbus-bridge.{name}")
}

/// The subject of gap notices of the bridge `name` (local; on NATS with
/// the prefix).
pub fn gap_subject(name: &str) -> String {
    format!("shmbus-bridge.{name}.gap")
}

/// Why the bridge could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot connect to the shmbus broker: {0}")]
    Shmbus(#[from] shmbus::ConnectError),
    #[error("cannot set up the NATS connection: {0}")]
    Nats(String),
    #[error("cannot subscribe to {pattern} on the bus: {source}")]
    Subscribe { pattern: String, source: shmbus::SubscribeError },
    #[error("cannot subscribe to {subject} on NATS: {message}")]
    NatsSubscribe { subject: String, message: String },
    #[error("cannot serve {name}: {source}")]
    Serve { name: String, source: shmbus::ServeError },
    #[error("another bridge named {0:?} already runs on this broker (it owns {1})")]
    NameTaken(String, String),
}

/// The most payload bytes the local-to-NATS queue holds, whatever its
/// length in messages: `queue` messages of up to `max_payload` each could
/// otherwise take gigabytes while NATS is slow.
pub const QUEUE_BYTES: usize = 64 << 20;

/// How many messages the NATS client buffers per subscription before it
/// drops them (async-nats's default, 65536, is 64 GiB of 1 MiB messages).
/// The bridge's tasks only move them into its own bounded queues, so this
/// fills only if they are starved of CPU.
const NATS_SUBSCRIPTION_CAPACITY: usize = 1024;

/// How many commands the NATS client buffers before its publishes wait
/// (async-nats's default, 2048, is 2 GiB of 1 MiB messages).
const NATS_CLIENT_CAPACITY: usize = 64;

/// A NATS message on its way to the local bus: a publish on `subject`,
/// or (`send`) a fire-and-forget send to the exported name `subject`.
struct Incoming {
    subject: String,
    payload: Bytes,
    origin: String,
    send: bool,
}

/// A local message on its way to NATS (`subject` with the prefix), or
/// (`send`) a local fire-and-forget send to an imported name.
struct Outgoing {
    subject: String,
    payload: Bytes,
    sender: Sender,
    send: bool,
}

/// What every task shares.
struct Shared {
    cfg: Config,
    host: String,
    prefix: Prefix,
    counters: Arc<Counters>,
    local: AsyncClient,
    nats: async_nats::Client,
    address: String,
    calls: Arc<Semaphore>,
    /// Payload bytes in the local-to-NATS queue (at most [`QUEUE_BYTES`]).
    queued: std::sync::atomic::AtomicUsize,
    /// Payload bytes in the NATS-to-local queue (at most [`QUEUE_BYTES`]).
    queued_in: std::sync::atomic::AtomicUsize,
    /// Request payload bytes held by calls in flight, both ways (at most
    /// [`QUEUE_BYTES`]): `calls` bounds their number, this their bytes,
    /// which a peer's requests near NATS's `max_payload` would otherwise
    /// grow to hundreds of MiB (a review: 271 MiB for 256 requests of
    /// 1,000 KiB to a stalled broker).
    calls_bytes: std::sync::atomic::AtomicUsize,
}

/// Bytes held by one call in flight, given back when it ends.
struct CallBytes {
    shared: Arc<Shared>,
    len: usize,
}

impl CallBytes {
    /// Takes `len` bytes of room for a call, if there is.
    fn take(shared: &Arc<Shared>, len: usize) -> Option<CallBytes> {
        take_room(&shared.calls_bytes, len).then(|| CallBytes { shared: shared.clone(), len })
    }
}

impl Drop for CallBytes {
    fn drop(&mut self) {
        self.shared.calls_bytes.fetch_sub(self.len, Ordering::AcqRel);
    }
}

impl Shared {
    fn nats_up(&self) -> bool {
        self.counters.nats_connected.load(Ordering::Relaxed)
    }

    /// The largest payload that may go to NATS with our headers; 0 while
    /// the server's limit is unknown (never connected).
    fn nats_limit(&self) -> usize {
        match self.nats.max_payload() {
            0 => 0,
            m => stats::payload_limit(m),
        }
    }

    fn headers(&self, sender: Option<&Sender>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(H_BRIDGE, value(&self.cfg.name));
        h.insert(H_HOST, value(&self.host));
        if let Some(s) = sender {
            h.insert(H_SENDER, value(&mapping::sender_value(s)));
        }
        h
    }

    fn snapshot(&self) -> stats::Status {
        let state = match self.nats.connection_state() {
            async_nats::connection::State::Connected => "connected",
            async_nats::connection::State::Disconnected => "disconnected",
            async_nats::connection::State::Pending => "pending",
        };
        self.counters.snapshot(SideInfo {
            name: self.cfg.name.clone(),
            host: self.host.clone(),
            prefix: self.cfg.prefix.clone(),
            shmbus_address: self.address.clone(),
            client_id: self.local.id(),
            nats_state: state.to_owned(),
            nats_servers: self.cfg.nats.clone(),
            max_payload: self.nats.max_payload(),
        })
    }
}

/// A header value from text the bridge controls or has cleaned: never
/// panics (async-nats's `From<&str>` does on CR/LF).
fn value(s: &str) -> HeaderValue {
    mapping::printable(s, mapping::MAX_HEADER_VALUE).parse().unwrap_or_default()
}

fn header<'a>(h: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    h.and_then(|h| h.get(name)).map(|v| v.as_str())
}

/// The host name, for headers and the default bridge name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

// The two call sites of the origin API: a local publish and a local call
// that carry where a bridged message or call came from.
async fn publish_local(
    local: &AsyncClient,
    subject: &str,
    payload: &[u8],
    origin: &str,
) -> Result<(), PublishError> {
    local.publish_with_origin(subject, payload, origin).await
}

async fn request_local(
    local: &AsyncClient,
    name: &str,
    payload: &[u8],
    timeout: Duration,
    origin: &str,
) -> Result<Reply, CallError> {
    local.request_with_origin(name, payload, timeout, origin).await
}

/// Connects to NATS with the configuration's servers, credentials and TLS;
/// returns at once (the first connection is retried in the background, as
/// every later one), with connection events driving `counters`.
async fn connect_nats(
    cfg: &Config,
    counters: Arc<Counters>,
    links: mpsc::UnboundedSender<()>,
) -> Result<async_nats::Client, StartError> {
    let mut o = async_nats::ConnectOptions::new()
        .name(format!("shmbus-bridge:{}", cfg.name))
        .no_echo()
        .client_capacity(NATS_CLIENT_CAPACITY)
        .subscription_capacity(NATS_SUBSCRIPTION_CAPACITY)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(cfg.request_timeout))
        .reconnect_delay_callback(|attempts| {
            // 50 ms, doubling, at most 2 s: back quickly after a restart.
            let shift = attempts.min(6) as u32;
            Duration::from_millis(50u64 << shift).min(Duration::from_secs(2))
        });
    o = match &cfg.auth {
        Auth::None => o,
        Auth::UserPassword { user, password } => o.user_and_password(user.clone(), password.clone()),
        Auth::Token(t) => o.token(t.clone()),
        Auth::Creds(path) => o
            .credentials_file(path)
            .await
            .map_err(|e| StartError::Nats(format!("creds {}: {e}", path.display())))?,
        Auth::Nkey(seed) => o.nkey(seed.clone()),
    };
    if cfg.tls.required {
        o = o.require_tls(true);
    }
    if let Some(ca) = &cfg.tls.ca {
        o = o.add_root_certificates(ca.clone());
    }
    if let Some((cert, key)) = &cfg.tls.client {
        o = o.add_client_certificate(cert.clone(), key.clone());
    }
    let ever = Arc::new(std::sync::atomic::AtomicBool::new(false));
    o = o.event_callback(move |event| {
        let counters = counters.clone();
        let ever = ever.clone();
        let links = links.clone();
        async move {
            match event {
                async_nats::Event::Connected => {
                    // Connected only once our subscriptions are on the
                    // server: `watch_nats` says so after a flush.
                    let _ = links.send(());
                    if ever.swap(true, Ordering::Relaxed) {
                        info!("nats: reconnected");
                    } else {
                        info!("nats: connected");
                    }
                }
                async_nats::Event::Disconnected => {
                    counters.nats_connected.store(false, Ordering::Relaxed);
                    warn!("nats: disconnected; reconnecting");
                }
                async_nats::Event::SlowConsumer(sid) => {
                    counters.nats_slow_consumer.fetch_add(1, Ordering::Relaxed);
                    warn!("nats: the bridge was too slow for subscription {sid}; NATS dropped messages");
                }
                async_nats::Event::LameDuckMode => warn!("nats: the server is in lame duck mode"),
                async_nats::Event::ServerError(e) => warn!("nats: server error: {e}"),
                async_nats::Event::ClientError(e) => warn!("nats: client error: {e}"),
                async_nats::Event::Closed => {
                    counters.nats_connected.store(false, Ordering::Relaxed);
                    error!("nats: connection closed");
                }
                async_nats::Event::Draining => debug!("nats: draining"),
            }
        }
    });
    o.connect(cfg.nats.clone()).await.map_err(|e| StartError::Nats(e.to_string()))
}

/// Connects to the broker, retrying (the broker may start after us) until
/// it works or `give_up` passes.
async fn connect_shmbus(cfg: &Config, give_up: Duration) -> Result<AsyncClient, StartError> {
    let start = Instant::now();
    let mut delay = Duration::from_millis(50);
    loop {
        let mut o = ConnectOptions::new().name(format!("shmbus-bridge:{}", cfg.name));
        if let Some(a) = &cfg.shmbus {
            o = o.address(shmbus::Address::parse(a).map_err(|e| StartError::Shmbus(e.into()))?);
        }
        match o.connect_async().await {
            Ok(c) => return Ok(c),
            Err(e) if start.elapsed() < give_up => {
                warn!("shmbus: cannot connect yet ({e}); retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Runs the bridge until `shutdown` completes; errors only at start.
pub async fn run(cfg: Config, host: String, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let counters = Arc::new(Counters::default());
    let local = connect_shmbus(&cfg, Duration::from_secs(30)).await?;
    info!("shmbus: connected as client {}", local.id());
    let (links, linked) = mpsc::unbounded_channel();
    let nats = connect_nats(&cfg, counters.clone(), links).await?;
    let address = cfg.shmbus.clone().unwrap_or_else(|| "(default)".to_owned());
    let shared = Arc::new(Shared {
        prefix: Prefix::new(&cfg.prefix),
        calls: Arc::new(Semaphore::new(cfg.max_inflight_requests)),
        queued: Default::default(),
        queued_in: Default::default(),
        calls_bytes: Default::default(),
        cfg,
        host,
        counters,
        local,
        nats,
        address,
    });
    let mut tasks = tokio::task::JoinSet::new();

    // Status first: it also proves no other bridge of this name runs here.
    let status_name = status_name(&shared.cfg.name);
    let status = match shared.local.serve(&status_name).await {
        Ok(s) => s,
        Err(shmbus::ServeError::Exists { .. }) => {
            return Err(StartError::NameTaken(shared.cfg.name.clone(), status_name))
        }
        Err(source) => return Err(StartError::Serve { name: status_name, source }),
    };

    // Our own events: shmbus reconnections (and the gap notices we send).
    let events = shared
        .local
        .subscribe(&gap_subject(&shared.cfg.name))
        .await
        .map_err(|source| StartError::Subscribe { pattern: gap_subject(&shared.cfg.name), source })?;
    tasks.spawn(watch_shmbus(shared.clone(), events));

    let (tx, rx) = mpsc::channel::<Outgoing>(shared.cfg.queue);
    let out_tx = tx.clone();
    tasks.spawn(writer(shared.clone(), rx));
    for (i, p) in shared.cfg.export.clone().into_iter().enumerate() {
        let sub = shared
            .local
            .subscribe(&p)
            .await
            .map_err(|source| StartError::Subscribe { pattern: p.clone(), source })?;
        tasks.spawn(export(shared.clone(), sub, i, tx.clone()));
    }
    drop(tx);
    let (tx, rx) = mpsc::channel::<Incoming>(shared.cfg.queue);
    tasks.spawn(local_writer(shared.clone(), rx));
    for (i, p) in shared.cfg.import.iter().enumerate() {
        let sub = nats_subscribe(&shared, p).await?;
        tasks.spawn(import(shared.clone(), sub, i, tx.clone()));
    }
    let (check_tx, check_rx) = mpsc::channel::<(String, Incoming)>(shared.cfg.queue);
    tasks.spawn(check_sends(shared.clone(), check_rx, tx.clone()));
    for (i, p) in shared.cfg.services_export.iter().enumerate() {
        let sub = nats_subscribe(&shared, p).await?;
        tasks.spawn(service_export(shared.clone(), sub, i, tx.clone(), check_tx.clone()));
    }
    drop(check_tx);
    for name in shared.cfg.services_import.clone() {
        let svc = shared
            .local
            .serve_with(&name, NameFlags::default())
            .await
            .map_err(|source| StartError::Serve { name: name.clone(), source })?;
        if svc.result() == shmbus::NameResult::InQueue {
            warn!("shmbus: {name} is owned by another client; the bridge waits in its queue");
        }
        tasks.spawn(service_import(shared.clone(), svc, out_tx.clone()));
    }
    drop(out_tx);
    // After every subscription was asked for: its flush follows them.
    tasks.spawn(watch_nats(shared.clone(), linked));
    tasks.spawn(gaps(shared.clone()));
    tasks.spawn(serve_status(shared.clone(), status));
    info!(
        "bridge {} ready: {} export, {} import, {} service export, {} service import pattern(s)",
        shared.cfg.name,
        shared.cfg.export.len(),
        shared.cfg.import.len(),
        shared.cfg.services_export.len(),
        shared.cfg.services_import.len()
    );

    shutdown.await;
    info!("shutting down");
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    let _ = tokio::time::timeout(Duration::from_secs(2), shared.nats.flush()).await;
    Ok(())
}

/// Marks NATS connected once a flush after a (re)connection came back:
/// async-nats sends the subscriptions, renewed ones included, before a
/// later flush, so from then on what is published on NATS reaches us.
///
/// Woken by the `Connected` event, but it does not trust events alone:
/// async-nats drops them when its 128-event queue is full (a burst of
/// slow-consumer events does that), so it also looks at the connection's
/// state and its count of connections every 200 ms. A lost `Connected`
/// would otherwise leave the bridge dropping everything as `nats-down`
/// until the next reconnection, a lost `Disconnected` counting messages
/// as forwarded into a dead connection.
async fn watch_nats(shared: Arc<Shared>, mut linked: mpsc::UnboundedReceiver<()>) {
    let stats = shared.nats.statistics();
    let mut flushed = 0;
    loop {
        let _ = tokio::time::timeout(Duration::from_millis(200), linked.recv()).await;
        if shared.nats.connection_state() != async_nats::connection::State::Connected {
            shared.counters.nats_connected.store(false, Ordering::Relaxed);
            continue;
        }
        let connects = stats.connects.load(Ordering::Relaxed);
        if connects == flushed {
            continue;
        }
        if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(2), shared.nats.flush()).await {
            flushed = connects;
            shared.counters.nats_reconnects.store(connects.saturating_sub(1), Ordering::Relaxed);
            if shared.nats.connection_state() == async_nats::connection::State::Connected {
                shared.counters.nats_connected.store(true, Ordering::Relaxed);
            }
        }
    }
}

async fn watch_shmbus(shared: Arc<Shared>, events: shmbus::AsyncSubscription) {
    loop {
        match events.recv().await {
            Ok(Event::Reconnected) => {
                shared.counters.shmbus_reconnects.fetch_add(1, Ordering::Relaxed);
                info!("shmbus: reconnected as client {}", shared.local.id());
            }
            Ok(_) => {}
            Err(e) => {
                warn!("shmbus: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

async fn export(
    shared: Arc<Shared>,
    sub: shmbus::AsyncSubscription,
    index: usize,
    tx: mpsc::Sender<Outgoing>,
) {
    let c = &shared.counters;
    // Our id as of the last `Reconnected` this subscription saw.
    let mut seen_id = shared.local.id();
    loop {
        let m = match sub.recv().await {
            Ok(Event::Message(m)) => m,
            Ok(Event::Gap { missed }) => {
                c.dropped(Dir::LocalToNats, DropReason::Gap, missed);
                warn!(
                    "shmbus: the broker dropped {missed} message(s) for {} (the bridge fell behind)",
                    sub.pattern()
                );
                continue;
            }
            Ok(Event::Reconnected) => {
                seen_id = shared.local.id();
                debug!("shmbus: {} renewed", sub.pattern());
                continue;
            }
            Err(e) => {
                warn!("shmbus: subscription {}: {e}", sub.pattern());
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if !mapping::first_match(&shared.cfg.export, index, m.topic()) {
            continue; // an earlier, overlapping pattern forwards it
        }
        let own = [shared.local.id(), seen_id];
        // What a bridge (this one or another) brought from NATS: never
        // back to NATS (split horizon, `mapping::from_nats`).
        let back = mapping::from_nats(m.origin());
        let decision = match back {
            true => Outbound::Loop,
            false => {
                stats::outbound(m.sender().client_id, &own, m.len(), shared.nats_limit(), shared.nats_up())
            }
        };
        match decision {
            Outbound::Loop => c.looped(Dir::LocalToNats),
            Outbound::Drop(why) => {
                c.dropped(Dir::LocalToNats, why, 1);
                debug!("dropped {} ({} B): {}", m.topic(), m.len(), why.label());
            }
            Outbound::Forward => {
                // Room first, so that a full queue costs no copy.
                let len = m.len();
                if tx.capacity() == 0 || !take_room(&shared.queued, len) {
                    c.dropped(Dir::LocalToNats, DropReason::QueueFull, 1);
                    continue;
                }
                let payload = match m.try_payload() {
                    Ok(p) => Bytes::copy_from_slice(p),
                    Err(e) => {
                        shared.queued.fetch_sub(len, Ordering::AcqRel);
                        c.dropped(Dir::LocalToNats, DropReason::PublishError, 1);
                        warn!("cannot read the payload of {}: {e}", m.topic());
                        continue;
                    }
                };
                let out = Outgoing {
                    subject: shared.prefix.to_nats(m.topic()),
                    payload,
                    sender: m.sender(),
                    send: false,
                };
                match tx.try_send(out) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        shared.queued.fetch_sub(len, Ordering::AcqRel);
                        c.dropped(Dir::LocalToNats, DropReason::QueueFull, 1)
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                }
            }
        }
    }
}

async fn writer(shared: Arc<Shared>, mut rx: mpsc::Receiver<Outgoing>) {
    let c = &shared.counters;
    // This one task numbers everything it hands to NATS, per subject, so
    // the importing bridge can count what NATS lost on the way.
    let mut seq = SeqOut::default();
    while let Some(out) = rx.recv().await {
        shared.queued.fetch_sub(out.payload.len(), Ordering::AcqRel);
        if out.send {
            // A send: no number (it is a call, counted as one).
            if !shared.nats_up() {
                c.call_failed(Dir::LocalToNats, "unavailable");
                continue;
            }
            let h = shared.headers(Some(&out.sender));
            match shared.nats.publish_with_headers(out.subject, h, out.payload).await {
                Ok(()) => c.call_ok(Dir::LocalToNats),
                Err(e) => {
                    let kind = match e.kind() {
                        async_nats::client::PublishErrorKind::MaxPayloadExceeded => "too-large",
                        _ => "unavailable",
                    };
                    c.call_failed(Dir::LocalToNats, kind);
                    debug!("nats publish of a send: {e}");
                }
            }
            continue;
        }
        if !shared.nats_up() {
            c.dropped(Dir::LocalToNats, DropReason::NatsDown, 1);
            continue;
        }
        let mut h = shared.headers(Some(&out.sender));
        h.insert(H_SEQ, value(&seq.take(&out.subject).to_string()));
        // Bytes underneath: the copy kept for `give_back` is a reference count.
        let subject = async_nats::Subject::from(out.subject);
        match shared.nats.publish_with_headers(subject.clone(), h, out.payload).await {
            Ok(()) => c.forwarded(Dir::LocalToNats),
            Err(e) => {
                // Counted here: the far side must not count it again.
                seq.give_back(&subject);
                let why = match e.kind() {
                    async_nats::client::PublishErrorKind::MaxPayloadExceeded => DropReason::TooLarge,
                    _ => DropReason::PublishError,
                };
                c.dropped(Dir::LocalToNats, why, 1);
                debug!("nats publish: {e}");
            }
        }
    }
}

/// Subscribes on NATS to the local pattern `pattern`, prefixed.
async fn nats_subscribe(shared: &Shared, pattern: &str) -> Result<async_nats::Subscriber, StartError> {
    let subject = shared.prefix.to_nats(pattern);
    shared
        .nats
        .subscribe(subject.clone())
        .await
        .map_err(|e| StartError::NatsSubscribe { subject, message: e.to_string() })
}

/// Takes `len` bytes of room under [`QUEUE_BYTES`] in `queued`, if there is.
fn take_room(queued: &std::sync::atomic::AtomicUsize, len: usize) -> bool {
    let over = queued.fetch_add(len, Ordering::AcqRel) + len > QUEUE_BYTES;
    if over {
        queued.fetch_sub(len, Ordering::AcqRel);
    }
    !over
}

async fn import(
    shared: Arc<Shared>,
    mut sub: async_nats::Subscriber,
    index: usize,
    tx: mpsc::Sender<Incoming>,
) {
    let c = &shared.counters;
    // A subject is this task's alone (first_match), so its sequence table
    // is too.
    let mut seq = SeqIn::default();
    while let Some(m) = sub.next().await {
        if !mapping::first_match(&shared.cfg.import, index, shared.prefix.strip(m.subject.as_str())) {
            continue; // an earlier, overlapping pattern's task takes it
        }
        let h = m.headers.as_ref();
        let bridge = header(h, H_BRIDGE);
        if mapping::is_own(bridge, &shared.cfg.name) {
            c.looped(Dir::NatsToLocal);
            continue;
        }
        // Before anything else may drop it: what NATS lost before this one.
        if let (Some(b), Some(n)) = (bridge, header(h, H_SEQ).and_then(|v| v.parse::<u64>().ok())) {
            let lost = seq.missed(b, m.subject.as_str(), n);
            if lost > 0 {
                c.dropped(Dir::NatsToLocal, DropReason::NatsLost, lost);
            }
        }
        let local = match shared.prefix.to_local(m.subject.as_str()) {
            Ok(s) => s,
            Err(e) => {
                c.dropped(Dir::NatsToLocal, DropReason::InvalidSubject, 1);
                debug!("nats: not imported: {e}");
                continue;
            }
        };
        let origin = mapping::origin(bridge, header(h, H_HOST), header(h, H_SENDER), m.subject.as_str());
        // Never wait for the broker here: NATS would buffer for us, without
        // a bound in bytes, and count its drops only as it can.
        let len = m.payload.len();
        if tx.capacity() == 0 || !take_room(&shared.queued_in, len) {
            c.dropped(Dir::NatsToLocal, DropReason::QueueFull, 1);
            continue;
        }
        let inc = Incoming { subject: local.to_owned(), payload: m.payload, origin, send: false };
        if tx.try_send(inc).is_err() {
            shared.queued_in.fetch_sub(len, Ordering::AcqRel);
            c.dropped(Dir::NatsToLocal, DropReason::QueueFull, 1);
        }
    }
    warn!("nats: an import subscription ended");
}

/// Publishes imported messages locally, and makes the sends to exported
/// names, in the order they came.
async fn local_writer(shared: Arc<Shared>, mut rx: mpsc::Receiver<Incoming>) {
    let c = &shared.counters;
    while let Some(inc) = rx.recv().await {
        shared.queued_in.fetch_sub(inc.payload.len(), Ordering::AcqRel);
        if inc.send {
            match shared.local.send_with_origin(&inc.subject, &inc.payload, &inc.origin).await {
                Ok(_) => c.call_ok(Dir::NatsToLocal),
                Err(e) => c.call_failed(Dir::NatsToLocal, RemoteError::from_call(&e).kind()),
            }
            continue;
        }
        match publish_local(&shared.local, &inc.subject, &inc.payload, &inc.origin).await {
            Ok(()) => c.forwarded(Dir::NatsToLocal),
            Err(e) => {
                let why = match e {
                    PublishError::Disconnected(_) => DropReason::ShmbusDown,
                    _ => DropReason::PublishError,
                };
                c.dropped(Dir::NatsToLocal, why, 1);
                warn!("shmbus: cannot publish {}: {e}", inc.subject);
            }
        }
    }
}

/// Passes on to the local writer the sends from NATS that name a bridge,
/// unless they would go straight back to it (`sends_back`). Their look-ups
/// are made here, not by the local writer: a NATS publisher's flood of
/// sends with a forged `Shmbus-Bridge` would otherwise slow it to broker
/// round trips per send, and every imported message behind them would be
/// dropped. Such a send may so be made after messages that came after it.
async fn check_sends(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<(String, Incoming)>,
    tx: mpsc::Sender<Incoming>,
) {
    while let Some((bridge, inc)) = rx.recv().await {
        if sends_back(&shared, bridge, inc.subject.clone()).await {
            shared.queued_in.fetch_sub(inc.payload.len(), Ordering::AcqRel);
            shared.counters.looped(Dir::NatsToLocal);
            continue;
        }
        // Its room in `queued_in` was taken when it was queued here.
        if let Err(e) = tx.send(inc).await {
            shared.queued_in.fetch_sub(e.0.payload.len(), Ordering::AcqRel);
            return;
        }
    }
}

/// Whether a send that the bridge `bridge` put on NATS would go straight
/// back to it: it runs on this broker (owns its status name here) and
/// owns `name` too, so it took the send from this bus, and would put it on
/// NATS again (a send carries no origin to tell it by).
async fn sends_back(shared: &Arc<Shared>, bridge: String, name: String) -> bool {
    let shared = shared.clone();
    let verdict = tokio::task::spawn_blocking(move || {
        let c = shared.local.blocking();
        // No such bridge here (the usual forged name): one look-up.
        let Ok(Some(a)) = c.name_owner(&status_name(&bridge)) else { return false };
        matches!(c.name_owner(&name), Ok(Some(b)) if a == b)
    });
    verdict.await.unwrap_or(false)
}

/// Publishes a NATS reply (a payload, or an error header); a failure only
/// logs, the caller times out.
async fn nats_reply(shared: &Shared, to: async_nats::Subject, result: Result<Bytes, RemoteError>) {
    let mut h = shared.headers(None);
    let payload = match result {
        Ok(p) => p,
        Err(e) => {
            h.insert(H_ERROR, value(&e.header()));
            Bytes::new()
        }
    };
    if let Err(e) = shared.nats.publish_with_headers(to, h, payload).await {
        warn!("nats: cannot send a reply: {e}");
    }
}

async fn service_export(
    shared: Arc<Shared>,
    mut sub: async_nats::Subscriber,
    index: usize,
    tx: mpsc::Sender<Incoming>,
    check_tx: mpsc::Sender<(String, Incoming)>,
) {
    while let Some(m) = sub.next().await {
        let c = &shared.counters;
        if !mapping::first_match(&shared.cfg.services_export, index, shared.prefix.strip(m.subject.as_str()))
        {
            continue; // an earlier, overlapping pattern's task takes it
        }
        if mapping::is_own(header(m.headers.as_ref(), H_BRIDGE), &shared.cfg.name) {
            c.looped(Dir::NatsToLocal);
            continue;
        }
        let name = match shared.prefix.to_local(m.subject.as_str()) {
            Ok(n) => n.to_owned(),
            Err(e) => {
                c.call_failed(Dir::NatsToLocal, "invalid");
                if let Some(r) = m.reply {
                    nats_reply(&shared, r, Err(RemoteError::Invalid(e.to_string()))).await;
                }
                continue;
            }
        };
        let Some(reply_to) = m.reply.clone() else {
            // A plain publish on a service subject: a fire-and-forget send,
            // made by the local writer (in order with the imported
            // messages; one that names a bridge goes through `check_sends`
            // first, so it may come after later ones). Never wait for the
            // broker here: NATS would buffer for us, 1,024 messages of up
            // to `max_payload` each.
            let bridge =
                header(m.headers.as_ref(), H_BRIDGE).filter(|b| crate::config::check_name(b).is_ok());
            let len = m.payload.len();
            let full = match bridge {
                Some(_) => check_tx.capacity() == 0,
                None => tx.capacity() == 0,
            };
            if full || !take_room(&shared.queued_in, len) {
                c.call_failed(Dir::NatsToLocal, "unavailable");
                continue;
            }
            // Marked as from NATS, as a call is: no bridge sends it back.
            let h = m.headers.as_ref();
            let origin = mapping::origin(header(h, H_BRIDGE), header(h, H_HOST), header(h, H_SENDER), &name);
            let inc = Incoming { subject: name, payload: m.payload, origin, send: true };
            let queued = match bridge {
                Some(b) => check_tx.try_send((b.to_owned(), inc)).is_ok(),
                None => tx.try_send(inc).is_ok(),
            };
            if !queued {
                shared.queued_in.fetch_sub(len, Ordering::AcqRel);
                c.call_failed(Dir::NatsToLocal, "unavailable");
            }
            continue;
        };
        let Ok(permit) = shared.calls.clone().try_acquire_owned() else {
            c.call_failed(Dir::NatsToLocal, "unavailable");
            nats_reply(&shared, reply_to, Err(RemoteError::Unavailable("too many calls in flight".into())))
                .await;
            continue;
        };
        let Some(held) = CallBytes::take(&shared, m.payload.len()) else {
            c.call_failed(Dir::NatsToLocal, "unavailable");
            let why = "too many bytes in calls in flight";
            nats_reply(&shared, reply_to, Err(RemoteError::Unavailable(why.into()))).await;
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _held = held;
            let h = m.headers.as_ref();
            let timeout = mapping::call_timeout(header(h, H_TIMEOUT), shared.cfg.request_timeout);
            let origin = mapping::origin(header(h, H_BRIDGE), header(h, H_HOST), header(h, H_SENDER), &name);
            let c = &shared.counters;
            let result = match request_local(&shared.local, &name, &m.payload, timeout, &origin).await {
                Ok(reply) => match reply.try_payload() {
                    Ok(p) if shared.nats_limit() > 0 && p.len() > shared.nats_limit() => {
                        Err(RemoteError::TooLarge(format!(
                            "the reply of {} B is over NATS's limit of {} B",
                            p.len(),
                            shared.nats_limit()
                        )))
                    }
                    Ok(p) => Ok(Bytes::copy_from_slice(p)),
                    Err(e) => Err(RemoteError::Other(format!("cannot read the reply: {e}"))),
                },
                Err(e) => Err(RemoteError::from_call(&e)),
            };
            match &result {
                Ok(_) => c.call_ok(Dir::NatsToLocal),
                Err(e) => c.call_failed(Dir::NatsToLocal, e.kind()),
            }
            nats_reply(&shared, reply_to, result).await;
        });
    }
    warn!("nats: a service export subscription ended");
}

async fn service_import(shared: Arc<Shared>, svc: AsyncService, tx: mpsc::Sender<Outgoing>) {
    let name = svc.name().to_owned();
    loop {
        let req = match svc.recv().await {
            Ok(r) => r,
            Err(e) => {
                warn!("shmbus: serving {name}: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let c = &shared.counters;
        if mapping::from_nats(req.origin()) {
            // A call or send a bridge brought from NATS: never back to
            // NATS (split horizon), where it would loop; its far side has
            // no owner here.
            c.looped(Dir::LocalToNats);
            if req.expects_reply() {
                let message =
                    format!("no responder for {name}: the call came from NATS, and goes back to no bridge");
                let _ = req.reply_error_async(code::NO_RESPONDER, &message).await;
            }
            continue;
        }
        if !req.expects_reply() {
            // A fire-and-forget send crosses as one, a NATS publish (which
            // the far bridge makes a local send), through the writer's
            // queue: no permit held waiting for an answer nobody reads.
            if let Err(kind) = queue_send(&shared, &name, &req, &tx) {
                c.call_failed(Dir::LocalToNats, kind);
            }
            continue;
        }
        let Ok(permit) = shared.calls.clone().try_acquire_owned() else {
            c.call_failed(Dir::LocalToNats, "unavailable");
            let _ = req.reply_error_async(code::UNAVAILABLE, "bridge: too many calls in flight").await;
            continue;
        };
        let Some(held) = CallBytes::take(&shared, req.len()) else {
            c.call_failed(Dir::LocalToNats, "unavailable");
            let _ =
                req.reply_error_async(code::UNAVAILABLE, "bridge: too many bytes in calls in flight").await;
            continue;
        };
        let shared = shared.clone();
        let name = name.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _held = held;
            let c = &shared.counters;
            let result = call_nats(&shared, &name, &req).await;
            let sent = match result {
                Ok(payload) => {
                    c.call_ok(Dir::LocalToNats);
                    req.reply_async(&payload).await
                }
                Err(e) => {
                    c.call_failed(Dir::LocalToNats, e.kind());
                    let (code, message) = e.local_answer(&name);
                    req.reply_error_async(code, &message).await
                }
            };
            if let Err(e) = sent {
                debug!("shmbus: cannot answer a call to {name}: {e}");
            }
        });
    }
}

/// Queues a local send to the imported `name` for the writer; the kind of
/// failure if it cannot go.
fn queue_send(
    shared: &Shared,
    name: &str,
    req: &shmbus::Request,
    tx: &mpsc::Sender<Outgoing>,
) -> Result<(), &'static str> {
    let payload = req.try_payload().map_err(|_| "other")?;
    let limit = shared.nats_limit();
    if limit > 0 && payload.len() > limit {
        return Err("too-large");
    }
    if !shared.nats_up() {
        return Err("unavailable");
    }
    let len = payload.len();
    if tx.capacity() == 0 || !take_room(&shared.queued, len) {
        return Err("unavailable");
    }
    let out = Outgoing {
        subject: shared.prefix.to_nats(name),
        payload: Bytes::copy_from_slice(payload),
        sender: req.sender(),
        send: true,
    };
    tx.try_send(out).map_err(|_| {
        shared.queued.fetch_sub(len, Ordering::AcqRel);
        "unavailable"
    })
}

/// One local call to an imported name, made on NATS.
async fn call_nats(shared: &Shared, name: &str, req: &shmbus::Request) -> Result<Bytes, RemoteError> {
    let payload =
        req.try_payload().map_err(|e| RemoteError::Other(format!("cannot read the request: {e}")))?;
    let limit = shared.nats_limit();
    if limit > 0 && payload.len() > limit {
        return Err(RemoteError::TooLarge(format!(
            "the request of {} B is over NATS's limit of {limit} B",
            payload.len()
        )));
    }
    if !shared.nats_up() {
        return Err(RemoteError::Unavailable("NATS is not connected".into()));
    }
    let left = req.deadline().saturating_duration_since(Instant::now());
    let timeout = left.min(shared.cfg.request_timeout);
    if timeout.is_zero() {
        return Err(RemoteError::Timeout);
    }
    let mut h = shared.headers(Some(&req.sender()));
    h.insert(H_TIMEOUT, value(&timeout.as_millis().to_string()));
    let request =
        async_nats::Request::new().payload(Bytes::copy_from_slice(payload)).headers(h).timeout(Some(timeout));
    // async-nats's timeout covers the wait for the answer, not the publish
    // of the request, which waits while its command buffer is full (NATS
    // stalled, or reconnecting): bound the whole.
    let sent = tokio::time::timeout(timeout, shared.nats.send_request(shared.prefix.to_nats(name), request));
    let Ok(answer) = sent.await else { return Err(RemoteError::Timeout) };
    match answer {
        Ok(m) => {
            if let Some(e) = header(m.headers.as_ref(), H_ERROR) {
                return Err(RemoteError::parse(e));
            }
            match m.status {
                Some(s) if !s.is_success() => {
                    Err(RemoteError::Other(format!("NATS status {s}: {}", m.description.unwrap_or_default())))
                }
                _ => Ok(m.payload),
            }
        }
        Err(e) => Err(match e.kind() {
            async_nats::RequestErrorKind::NoResponders => RemoteError::NoResponder,
            async_nats::RequestErrorKind::TimedOut => RemoteError::Timeout,
            async_nats::RequestErrorKind::MaxPayloadExceeded => RemoteError::TooLarge(e.to_string()),
            async_nats::RequestErrorKind::InvalidSubject => RemoteError::Invalid(e.to_string()),
            async_nats::RequestErrorKind::Other => RemoteError::Unavailable(e.to_string()),
        }),
    }
}

async fn serve_status(shared: Arc<Shared>, svc: AsyncService) {
    loop {
        match svc.recv().await {
            Ok(req) => {
                let json = serde_json::to_vec(&shared.snapshot()).unwrap_or_default();
                if let Err(e) = req.reply_async(&json).await {
                    debug!("status: cannot answer: {e}");
                }
            }
            Err(e) => {
                warn!("shmbus: serving the status: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Gap notices: the losses of each direction, told to its receiving side.
async fn gaps(shared: Arc<Shared>) {
    let c = &shared.counters;
    let mut told = [c.total_dropped(Dir::LocalToNats), c.total_dropped(Dir::NatsToLocal)];
    let subject = gap_subject(&shared.cfg.name);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        for (i, dir) in [Dir::LocalToNats, Dir::NatsToLocal].into_iter().enumerate() {
            let total = c.total_dropped(dir);
            if total <= told[i] {
                continue;
            }
            let missed = total - told[i];
            warn!("{}: {missed} message(s) lost since the last notice ({total} in all)", dir.label());
            if !shared.cfg.gap_notices {
                told[i] = total;
                continue;
            }
            let notice = serde_json::json!({
                "bridge": shared.cfg.name, "host": shared.host,
                "direction": dir.label(), "missed": missed, "total": total,
            })
            .to_string();
            let sent = match dir {
                Dir::LocalToNats if shared.nats_up() => shared
                    .nats
                    .publish_with_headers(
                        shared.prefix.to_nats(&subject),
                        shared.headers(None),
                        notice.into(),
                    )
                    .await
                    .is_ok(),
                Dir::LocalToNats => false,
                Dir::NatsToLocal => shared.local.publish(&subject, notice.as_bytes()).await.is_ok(),
            };
            if sent {
                told[i] = total;
            }
        }
    }
}
