//! `router`: the broker's router in-process, with one subscription and
//! with 100k in the shapes an attacker would pick.
//!
//! Each publish row times `Router::matches` for one subject against the
//! router holding one subscription (`one_sub`, the floor): the ratio is
//! what 100k subscriptions cost over one. The shapes, each 100k distinct
//! patterns at the depth limit where depth matters (and the worst one
//! also at 4096, one connection's default limit):
//! - `star_mix`: `*` or `a` at each of the first 17 levels (the binary
//!   expansion of the pattern's number), `a` to level 31, then `z`; the
//!   subject is 32 `a`s, so every pattern agrees with it on 31 tokens and
//!   fails on the last. The worst case of the router's bound, with no
//!   match to show for it.
//! - `shared_prefix`: half `p.….p.x<i>`, half `*.….*.x<i>`, 32 deep;
//!   the subject `p.….p.y` follows both shared paths and misses at the
//!   last token.
//! - `literal`: `svc.<i>.state`; one subject that matches one pattern and
//!   one that matches none.
//!
//! Fast calls are timed in batches (each sample is a batch's mean), slow
//! ones one by one. Insert and remove rows time each of the 100k calls
//! while filling and then draining the router, against one insert into
//! (or removal from) an otherwise empty router; their note compares the
//! resident memory the router took (built afresh in a child process) with
//! what `router::cost` charges.

use std::hint::black_box;
use std::time::Instant;

use shmbus_broker::bus::router::{cost, Router};
use shmbus_proto::limits::DEFAULT_MAX_SUBSCRIPTIONS;

use crate::{percentiles, Report, Row};

const N: usize = 100_000;
type Key = (u64, u32);

/// A shape's name, and the subjects to publish: (what, subject).
type Shape = (&'static str, Vec<(&'static str, String)>);

/// `(p50, p99)` ns per call of `f`, in batches sized so a batch takes at
/// least ~2 µs, for about `budget_ms` in all. The batch is sized by the
/// mean of 100 warm calls: a first call, run cold, can take 2-3 times a
/// warm one and would halve the batch. (Also used by `policy`.)
pub(crate) fn per_call(budget_ms: u64, mut f: impl FnMut()) -> (u64, u64) {
    f();
    let t = Instant::now();
    for _ in 0..100 {
        f();
    }
    let one = (t.elapsed().as_nanos() as u64 / 100).max(1);
    let batch = (2_000 / one).clamp(1, 1_000);
    let samples = (budget_ms * 1_000_000 / (one * batch)).clamp(21, 20_000) as usize;
    for _ in 0..(samples / 10).max(2) * batch as usize {
        f();
    }
    let mut v = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t = Instant::now();
        for _ in 0..batch {
            f();
        }
        v.push(t.elapsed().as_nanos() as u64 / batch);
    }
    percentiles(v)
}

fn publish(r: &Router<Key>, subject: &str, budget_ms: u64) -> ((u64, u64), usize) {
    let mut out = Vec::new();
    r.matches(subject, &mut out);
    let matched = out.len();
    let t = per_call(budget_ms, || {
        out.clear();
        r.matches(black_box(subject), &mut out);
        black_box(out.len());
    });
    (t, matched)
}

fn star_mix(i: usize) -> String {
    let mut t: Vec<&str> = (0..17).map(|l| if i >> l & 1 == 1 { "*" } else { "a" }).collect();
    t.extend(std::iter::repeat_n("a", 14));
    t.push("z");
    t.join(".")
}

fn shared_prefix(i: usize) -> String {
    let head = if i.is_multiple_of(2) { "p" } else { "*" };
    format!("{}.x{i}", vec![head; 31].join("."))
}

fn literal(i: usize) -> String {
    format!("svc.{i}.state")
}

/// Resident bytes of this process.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
    kib.unwrap_or(0) * 1024
}

fn maker(shape: &str) -> fn(usize) -> String {
    match shape {
        "star_mix" => star_mix,
        "shared_prefix" => shared_prefix,
        _ => literal,
    }
}

/// A fresh process builds the router of one shape and prints the resident
/// bytes per subscription it took (in this process, memory freed by an
/// earlier shape would be reused and hide it).
pub(crate) fn helper_mem(shape: &str) {
    let patterns: Vec<String> = (0..N).map(maker(shape)).collect();
    let before = rss();
    let mut r: Router<Key> = Router::new();
    for (i, p) in patterns.iter().enumerate() {
        r.insert(p, (i as u64, 1));
    }
    let took = rss().saturating_sub(before) / N as u64;
    black_box(&r);
    println!("{took}");
}

fn rss_per_sub(shape: &str) -> String {
    let exe = std::env::current_exe().expect("own path");
    let out = std::process::Command::new(exe).args(["__router-mem", shape]).output();
    out.ok().and_then(|o| String::from_utf8(o.stdout).ok()).map_or("?".into(), |s| s.trim().to_string())
}

/// Fills a router with `patterns` (timing each insert), runs `then` on
/// it, and drains it (timing each removal). Returns the insert and remove
/// times.
fn fill_and_drain(patterns: &[String], then: impl FnOnce(&Router<Key>)) -> ((u64, u64), (u64, u64)) {
    let mut ins = Vec::with_capacity(patterns.len());
    let mut rem = Vec::with_capacity(patterns.len());
    let mut r: Router<Key> = Router::new();
    for (i, p) in patterns.iter().enumerate() {
        let t = Instant::now();
        r.insert(black_box(p), (i as u64, 1));
        ins.push(t.elapsed().as_nanos() as u64);
    }
    assert_eq!(r.len(), patterns.len());
    then(&r);
    for (i, p) in patterns.iter().enumerate() {
        let t = Instant::now();
        assert!(r.remove(black_box(p), (i as u64, 1)));
        rem.push(t.elapsed().as_nanos() as u64);
    }
    assert!(r.is_empty());
    (percentiles(ins), percentiles(rem))
}

/// Insert and removal of `pattern` in an empty router, alternating:
/// `(insert, remove)`.
fn alone(pattern: &str) -> ((u64, u64), (u64, u64)) {
    let mut r: Router<Key> = Router::new();
    let (mut ins, mut rem) = (Vec::new(), Vec::new());
    for _ in 0..20_000 {
        let t = Instant::now();
        r.insert(black_box(pattern), (1, 1));
        ins.push(t.elapsed().as_nanos() as u64);
        let t = Instant::now();
        r.remove(black_box(pattern), (1, 1));
        rem.push(t.elapsed().as_nanos() as u64);
    }
    (percentiles(ins), percentiles(rem))
}

pub(crate) fn router(report: &mut Report) {
    let one_pattern = "sensors.kitchen.temp";
    let mut one: Router<Key> = Router::new();
    one.insert(one_pattern, (1, 1));
    let (floor, m) = publish(&one, one_pattern, 300);
    assert_eq!(m, 1);
    let publish_row = |report: &mut Report, path: &str, subject: &str, subs: usize, t, note: String| {
        let mut row =
            Row::timed("router", path, subject.len(), Some(subs as u32), t, ("publish_one_sub", floor.0));
        row.note = note;
        report.push(row);
    };
    publish_row(report, "publish_one_sub", one_pattern, 1, floor, "1 match; 1 sub".into());

    let star_miss = vec!["a"; 32].join(".");
    // One connection's worth (the default subscription limit) of the
    // worst shape.
    let few = DEFAULT_MAX_SUBSCRIPTIONS as usize;
    let mut r: Router<Key> = Router::new();
    for i in 0..few {
        r.insert(&star_mix(i), (i as u64, 1));
    }
    let (t, matched) = publish(&r, &star_miss, 1_000);
    publish_row(
        report,
        "publish_star_mix_miss",
        &star_miss,
        few,
        t,
        format!("{matched} matches; {few} subs"),
    );
    drop(r);

    let shapes: [Shape; 3] = [
        ("star_mix", vec![("miss", star_miss.clone())]),
        ("shared_prefix", vec![("miss", format!("{}.y", vec!["p"; 31].join(".")))]),
        ("literal", vec![("hit", literal(N / 2)), ("miss", "svc.x.state".into())]),
    ];
    for (name, subjects) in shapes {
        let patterns: Vec<String> = (0..N).map(maker(name)).collect();
        let charged = patterns.iter().map(|p| cost(p)).sum::<u64>() / N as u64;
        let took = rss_per_sub(name);
        let (ins1, rem1) = alone(&patterns[0]);
        let (ins, rem) = fill_and_drain(&patterns, |r| {
            for (what, s) in &subjects {
                let (t, matched) = publish(r, s, 1_500);
                let path = format!("publish_{name}_{what}");
                publish_row(report, &path, s, N, t, format!("{matched} matches; {N} subs"));
            }
        });
        let size = patterns[0].len();
        let mut row = Row::timed(
            "router",
            &format!("insert_{name}"),
            size,
            Some(N as u32),
            ins,
            ("insert_alone", ins1.0),
        );
        row.note = format!("each of {N} while filling, vs into an empty router; rss {took} B/sub, cost() charges {charged} B/sub");
        report.push(row);
        let mut row = Row::timed(
            "router",
            &format!("remove_{name}"),
            size,
            Some(N as u32),
            rem,
            ("remove_alone", rem1.0),
        );
        row.note = format!("each of {N} while draining, vs from a router holding only it");
        report.push(row);
    }
}
