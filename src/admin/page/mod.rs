//! The live page at the admin address.
//!
//! Endpoints (merged into [`super::router`]):
//! - `GET /`, `GET /page/app.js`, `GET /page/style.css` — the page: hand-written HTML, CSS and
//!   JS embedded in the binary, nothing loaded from elsewhere (a Content-Security-Policy of
//!   `'self'` says so to the browser). Public: it holds no data.
//! - `GET /v1/live` — what the page shows beside `GET /v1/backends`: shares and records/s of
//!   the last seconds, a minute of records/s per backend, drops by reason, queue and buffer
//!   depth, kernel drops, capture rate, the top sources of the last minute. Behind the token
//!   like every other `/v1` endpoint.
//!
//! The page polls `GET /v1/backends` and `GET /v1/live` once a second with `fetch()`, sending
//! `Authorization: Bearer` when the user typed a token (kept in `sessionStorage`). Polling
//! rather than server-sent events: `EventSource` cannot send the header, and a short request a
//! second holds no connection slot, keeps [`super::REQUEST_TIMEOUT`] meaningful, and
//! lets every answer carry its own status, so a refused token shows at once. Weight changes go
//! through the ordinary `PUT /v1/weights`.
//!
//! Owns: the page assets, the `/v1/live` view, and the once-a-second sampler that fills the
//! ring of [`crate::recent`]. Never: computes anything on the record hot
//! path (it reads counters and the samples of [`crate::recent`]), or changes state.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use super::AdminState;
use crate::balance::Balance;
use crate::metrics::{DropReason, KernelDrop, Metrics};
use crate::recent::{self, Sample, TopSource, RING_SECONDS};

const INDEX_HTML: &str = include_str!("index.html");
const APP_JS: &str = include_str!("app.js");
const STYLE_CSS: &str = include_str!("style.css");

/// The span of the "last seconds" shares and rates.
pub const RECENT_SECONDS: usize = 10;

/// Only what this binary serves, nothing from elsewhere; no framing by other sites.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; \
                   base-uri 'none'; form-action 'none'";

/// The public routes (the page and its assets). Starts the once-a-second sampler that fills
/// [`crate::recent`] when called inside a Tokio runtime; the sampler ends with the pipeline.
pub fn public(state: &AdminState) -> Router<AdminState> {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        if state.metrics.recent.claim_sampler() {
            rt.spawn(sample_every_second(
                Arc::downgrade(&state.balance),
                Arc::downgrade(&state.metrics),
            ));
        }
    }
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/page/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/page/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }),
        )
}

/// The routes that need the token when one is set: merge them under the token check.
pub fn guarded() -> Router<AdminState> {
    Router::new().route("/v1/live", get(live))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// `GET /v1/live`.
#[derive(Debug, Serialize)]
pub struct LiveView {
    /// Unix time of this view, in milliseconds.
    pub unix_ms: u64,
    /// Seconds the recent shares and rates span (up to [`RECENT_SECONDS`]; less just after
    /// start; 0 before the first sample).
    pub recent_seconds: f64,
    /// Whether capture runs.
    pub capture_up: bool,
    /// Records captured since start.
    pub captured: u64,
    /// Records captured per second over the recent span.
    pub capture_rate: f64,
    /// Records waiting between capture and the balancer.
    pub queue_depth: i64,
    /// Records waiting because their backend (or every backend) is down.
    pub buffered: usize,
    /// The most records that may wait.
    pub buffer_max: usize,
    /// Records not stored, by reason (`expired`, `shutdown`, `overflow`, `queue_full`).
    pub dropped: BTreeMap<&'static str, u64>,
    /// Frames the kernel dropped (packets mode), by cause (`ring`, `interface`).
    pub kernel_drops: BTreeMap<&'static str, u64>,
    /// Per backend, in configuration order.
    pub backends: Vec<LiveBackend>,
    /// Seconds the top sources span.
    pub top_seconds: usize,
    /// The heaviest sources of the last minute (see [`crate::recent`] for the accuracy).
    pub top_sources: Vec<TopSource>,
}

/// One backend in [`LiveView`].
#[derive(Debug, Serialize)]
pub struct LiveBackend {
    /// Backend name.
    pub name: String,
    /// Share of the records routed over the recent span.
    pub share_recent: f64,
    /// Records routed to it over the recent span.
    pub routed_recent: u64,
    /// Records routed to it per second, over the recent span.
    pub routed_rate: f64,
    /// Records written to it per second, over the recent span.
    pub written_rate: f64,
    /// Records routed to it in each second of the last minute, oldest first.
    pub routed_per_second: Vec<u64>,
}

/// Read the counters now.
fn sample(balance: &Balance, metrics: &Metrics) -> Sample {
    Sample {
        unix_ms: crate::record::now_us() / 1000,
        routed: balance.view().iter().map(|v| v.routed).collect(),
        written: metrics.backends.iter().map(|b| b.written.get()).collect(),
        captured: metrics.captured.get(),
        dropped: DropReason::ALL
            .iter()
            .map(|&r| metrics.dropped_count(r))
            .sum(),
    }
}

/// Push a sample into `metrics.recent` every second until the pipeline is gone (the weak
/// references no longer upgrade), and refresh the top sources' cache.
async fn sample_every_second(balance: Weak<Balance>, metrics: Weak<Metrics>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (Some(b), Some(m)) = (balance.upgrade(), metrics.upgrade()) else {
            return;
        };
        m.recent.push(sample(&b, &m));
        m.sources.refresh(recent::TOP_N);
    }
}

async fn live(State(state): State<AdminState>) -> Json<LiveView> {
    let now = sample(&state.balance, &state.metrics);
    let ring = state.metrics.recent.samples();
    let m = &state.metrics;
    let names = state.balance.names();
    Json(LiveView {
        dropped: DropReason::ALL
            .iter()
            .map(|&r| (r.as_str(), m.dropped_count(r)))
            .collect(),
        kernel_drops: BTreeMap::from([
            ("ring", m.kernel_drops(KernelDrop::Ring)),
            ("interface", m.kernel_drops(KernelDrop::Interface)),
        ]),
        capture_up: m.capture_up(),
        queue_depth: m.queue_depth(),
        buffered: state.budget.used(),
        buffer_max: state.budget.max_records(),
        top_seconds: RING_SECONDS,
        top_sources: m.sources.top(),
        ..summarize(names, &now, &ring)
    })
}

/// The recent shares and rates from the ring and a sample taken now.
fn summarize(names: &[String], now: &Sample, ring: &[Sample]) -> LiveView {
    // The sample closest to RECENT_SECONDS ago, or the oldest one.
    let since = ring
        .iter()
        .find(|s| now.unix_ms.saturating_sub(s.unix_ms) <= RECENT_SECONDS as u64 * 1000 + 500)
        .filter(|s| s.unix_ms < now.unix_ms);
    let secs = since.map_or(0.0, |s| (now.unix_ms - s.unix_ms) as f64 / 1000.0);
    let delta = |f: fn(&Sample) -> &Vec<u64>, i: usize| {
        since.map_or(0, |s| f(now)[i].saturating_sub(f(s)[i]))
    };
    let routed: Vec<u64> = (0..names.len()).map(|i| delta(|s| &s.routed, i)).collect();
    let all: u64 = routed.iter().sum();
    let rate = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
    let backends = names
        .iter()
        .enumerate()
        .map(|(i, name)| LiveBackend {
            name: name.clone(),
            share_recent: if all == 0 {
                0.0
            } else {
                routed[i] as f64 / all as f64
            },
            routed_recent: routed[i],
            routed_rate: rate(routed[i]),
            written_rate: rate(delta(|s| &s.written, i)),
            routed_per_second: ring
                .windows(2)
                .map(|w| w[1].routed[i].saturating_sub(w[0].routed[i]))
                .collect(),
        })
        .collect();
    LiveView {
        unix_ms: now.unix_ms,
        recent_seconds: secs,
        capture_up: true,
        captured: now.captured,
        capture_rate: rate(since.map_or(0, |s| now.captured.saturating_sub(s.captured))),
        queue_depth: 0,
        buffered: 0,
        buffer_max: 0,
        dropped: BTreeMap::new(),
        kernel_drops: BTreeMap::new(),
        backends,
        top_seconds: RING_SECONDS,
        top_sources: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_page_bounds_weights_by_the_servers_range() {
        let line = format!("const MAX_WEIGHT = {};", crate::balance::MAX_WEIGHT);
        assert!(super::APP_JS.contains(&line), "app.js must say {line}");
    }

    #[tokio::test]
    async fn the_sampler_samples_every_second_and_ends_with_the_pipeline() {
        let names = vec!["A".to_string(), "B".to_string()];
        let balance = Balance::new(names.clone(), vec![1, 1]);
        let metrics = std::sync::Arc::new(Metrics::new(&names));
        let task = tokio::spawn(sample_every_second(
            std::sync::Arc::downgrade(&balance),
            std::sync::Arc::downgrade(&metrics),
        ));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while metrics.recent.samples().len() < 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "no two samples within 5 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(metrics.recent.samples()[0].routed, vec![0, 0]);
        drop((balance, metrics));
        tokio::time::timeout(Duration::from_secs(3), task)
            .await
            .expect("the sampler ends once the pipeline is gone")
            .unwrap();
    }

    use super::*;

    fn at(unix_ms: u64, routed: [u64; 2], captured: u64) -> Sample {
        Sample {
            unix_ms,
            routed: routed.to_vec(),
            written: routed.to_vec(),
            captured,
            dropped: 0,
        }
    }

    #[test]
    fn recent_shares_use_the_last_ten_seconds_only() {
        let names = ["A".to_string(), "B".to_string()];
        // 20 s of 100/s all to A, then 10 s of 100/s split 30/70.
        let mut ring = Vec::new();
        for s in 0..=20u64 {
            ring.push(at(s * 1000, [s * 100, 0], s * 100));
        }
        for s in 1..=10u64 {
            ring.push(at((20 + s) * 1000, [2000 + s * 30, s * 70], 2000 + s * 100));
        }
        let now = ring.pop().unwrap();
        let v = summarize(&names, &now, &ring);
        assert_eq!(v.recent_seconds, 10.0);
        assert!((v.backends[0].share_recent - 0.3).abs() < 1e-9);
        assert!((v.backends[1].share_recent - 0.7).abs() < 1e-9);
        assert!((v.capture_rate - 100.0).abs() < 1e-9);
        assert_eq!(v.backends[1].routed_per_second.last(), Some(&70));
        assert_eq!(v.backends[0].routed_per_second.first(), Some(&100));
    }

    #[test]
    fn no_samples_yet_means_zero_not_nan() {
        let names = ["A".to_string()];
        let v = summarize(&names, &at(5000, [7, 0], 7), &[]);
        assert_eq!(v.recent_seconds, 0.0);
        assert_eq!(v.backends[0].share_recent, 0.0);
        assert_eq!(v.capture_rate, 0.0);
        assert!(v.backends[0].routed_per_second.is_empty());
    }
}
