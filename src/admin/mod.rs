//! The admin HTTP API.
//!
//! Endpoints:
//! - `GET /v1/backends` — every backend: name, url (password redacted), weight, target share,
//!   actual share since start and since the last weight change, records routed and written, up,
//!   and while down why (`down_cause`, `down_cause_code`, `excluded`).
//! - `PUT /v1/weights` — body `{"A":50,"B":50}`: change any subset of weights atomically, from
//!   the next record routed. Answers with the new state, or a 4xx `{"error": "…"}` and changes
//!   nothing. A change that could not be written to the state file still applies; each backend's
//!   `unsaved` then says why. Once the body is in, the change is not cut off by
//!   [`REQUEST_TIMEOUT`]: a caller is never told 408 for a change that took effect.
//!   With `--control`, the change is written to the fleet record in the control Redis
//!   (compare-and-set, audited) and every agent follows it; the answer comes once this agent
//!   serves it (or after 2 s), 503 if the control Redis does not answer (nothing changes).
//! - `GET /v1/control` — with `--control`: the fleet version served, whether it is stale (the
//!   control Redis not answering), and the newest version refused and why; 404 without.
//! - `GET /metrics` — Prometheus text format.
//! - `GET /healthz` — `ok` while the daemon runs; 503 while a failed packet capture is being
//!   reopened.
//! - The live page and `GET /v1/live`: see [`page`], a child of this module because it serves
//!   from this router and reads this [`AdminState`].
//!
//! With a token configured (required when listening beyond loopback), every endpoint but
//! `/healthz` needs `Authorization: Bearer <token>` and answers 401 without it.
//!
//! Limits, so no client can hold the daemon up or use it up: at most [`MAX_CONNECTIONS`]
//! connections at once (more are answered 503 and closed at once, never queued); a request's
//! headers must arrive within [`HEADER_READ_TIMEOUT`] (which also closes idle keep-alive
//! connections) and the whole request within [`REQUEST_TIMEOUT`]; a client that stops reading
//! its answers is cut off after [`WRITE_STALL_TIMEOUT`]; on shutdown, open
//! connections get [`SHUTDOWN_DRAIN`] to finish and are then closed.
//!
//! The API never touches the record hot path: a weight change publishes a new snapshot that the
//! router picks up on its next record.

pub mod page;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::balance::{Balance, Origin, WeightError, WeightStore, MAX_WEIGHT};
use crate::buffer::Budget;
use crate::config::BackendConfig;
use crate::health::Board;
use crate::metrics::Metrics;

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

/// Most connections served at once. Beyond it, a connection is answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 64;

/// A request's headers must arrive within this from when the server starts waiting for them
/// (an idle keep-alive connection waits too, so it is closed after this long).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest a request may take once its headers are in, body and handler included (408).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A client that stops reading its answers (its socket buffer full) is cut off after this:
/// it must not hold one of the [`MAX_CONNECTIONS`] for ever.
pub const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// On shutdown, how long open connections get to finish before they are closed.
pub const SHUTDOWN_DRAIN: Duration = Duration::from_secs(1);

/// The path of weight changes (exempt from the whole-request timeout: see [`set_weights`]).
const WEIGHTS_PATH: &str = "/v1/weights";

/// What the handlers read and change.
#[derive(Clone)]
pub struct AdminState {
    /// Weights and routing counters.
    pub balance: Arc<Balance>,
    /// Where weight changes go (applied and recorded in the state file).
    pub weights: Arc<WeightStore>,
    /// Every metric.
    pub metrics: Arc<Metrics>,
    /// Backend health.
    pub board: Arc<Board>,
    /// Waiting records.
    pub budget: Arc<Budget>,
    /// The configured backends (for names and redacted URLs).
    pub backends: Vec<BackendConfig>,
    /// Bearer token every endpoint but `/healthz` requires, if set.
    pub token: Option<String>,
    /// The control Redis (`--control`), where weight changes go instead, if set.
    pub control: Option<Arc<crate::control::Control>>,
}

/// One backend in `GET /v1/backends` and `PUT /v1/weights` answers.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct BackendView {
    /// Backend name.
    pub name: String,
    /// Redis URL, password replaced by `***`.
    pub url: String,
    /// Current weight.
    pub weight: u32,
    /// weight / Σ weights.
    pub target_share: f64,
    /// Share of every record routed since start.
    pub actual_share: f64,
    /// Share of the records routed since the last weight change.
    pub actual_share_since_change: f64,
    /// Records routed to this backend since start.
    pub records_routed: u64,
    /// Records routed to this backend since the last weight change.
    pub records_routed_since_change: u64,
    /// Records stored in this backend.
    pub records_written: u64,
    /// Failed write attempts.
    pub write_errors: u64,
    /// Whether the backend takes records now.
    pub up: bool,
    /// Why it is down (`"connection refused"`, `"authentication failed (WRONGPASS/NOAUTH)"`,
    /// `"out of memory (OOM)"`, `"timeout"`, `"same server as backend A"`…); `null` while up.
    #[serde(default)]
    pub down_cause: Option<String>,
    /// The metric label of `down_cause` (`refused`, `auth`, `oom`, `timeout`, …); `null` while up.
    #[serde(default)]
    pub down_cause_code: Option<String>,
    /// Taken out of service for the rest of the run (same server as another backend, or its
    /// lease held by another redtap with this agent name).
    #[serde(default)]
    pub excluded: bool,
    /// Why the weights in force are not in the state file (its last write failed: they apply
    /// now, and a restart would lose them); `null` when saved or with no state file.
    #[serde(default)]
    pub unsaved: Option<String>,
}

/// The admin router.
pub fn router(state: AdminState) -> Router {
    let guarded = Router::new()
        .route("/v1/backends", get(backends))
        .route(WEIGHTS_PATH, put(set_weights))
        .route("/v1/control", get(control_status))
        .route("/metrics", get(metrics))
        .merge(page::guarded())
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .merge(guarded)
        .route("/healthz", get(healthz))
        .merge(page::public(&state))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn(request_timeout))
        .with_state(state)
}

/// `ok`, or 503 while capture is down: a supervisor should not take a daemon that records
/// nothing for a healthy one.
async fn healthz(State(state): State<AdminState>) -> Response {
    if state.metrics.capture_up() {
        "ok\n".into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "capture down: reopening it\n",
        )
            .into_response()
    }
}

/// A slow request body (or handler) ends in 408 instead of holding its connection.
/// `PUT /v1/weights` bounds its body itself: once it applies a change it must answer with the
/// outcome, never 408 for a change that took effect.
async fn request_timeout(req: Request, next: Next) -> Response {
    if req.method() == axum::http::Method::PUT && req.uri().path() == WEIGHTS_PATH {
        return next.run(req).await;
    }
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
        Ok(r) => r,
        Err(_) => error(
            StatusCode::REQUEST_TIMEOUT,
            format!("request not completed within {REQUEST_TIMEOUT:?}"),
        ),
    }
}

/// With a token configured, refuse requests without `Authorization: Bearer <token>` (401).
async fn require_token(State(state): State<AdminState>, req: Request, next: Next) -> Response {
    if let Some(token) = &state.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
            return error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token (Authorization: Bearer <token>)".into(),
            );
        }
    }
    next.run(req).await
}

/// Compare without an early exit, so timing does not reveal how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serve the admin API on `listener` until `shutdown` fires; then give open connections
/// [`SHUTDOWN_DRAIN`] and close them, so no client can delay the daemon's exit.
///
/// An accept loop of its own rather than `axum::serve`, which has no header-read timeout, no
/// connection cap, and waits for every connection on graceful shutdown.
pub async fn serve(listener: TcpListener, state: AdminState, shutdown: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "admin API listening");
    }
    let metrics = state.metrics.clone();
    let app = router(state);
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = JoinSet::new();
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            // Reap finished connections as they end, so the set stays small.
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            _ = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                backoff = Duration::from_millis(5);
                a
            }
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                warn!(error = %e, "admin API: accept failed");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            debug!(%peer, "admin API: connection limit reached; closing");
            metrics.admin_refused();
            // Best effort, never waiting: the client learns why instead of seeing a reset.
            let _ = stream.try_write(
                b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n\
                  Content-Length: 0\r\n\r\n",
            );
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let stop = shutdown.clone();
        conns.spawn(async move {
            let _permit = permit;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let io = TokioIo::new(WriteStall::new(stream, WRITE_STALL_TIMEOUT));
            let conn = builder.serve_connection(io, service);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        debug!(%peer, error = %e, "admin API: connection ended");
                    }
                }
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    drop(listener);
    let open = conns.len();
    let drained = tokio::time::timeout(SHUTDOWN_DRAIN, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            connections = conns.len(),
            of = open,
            "admin API: closing connections still open after {SHUTDOWN_DRAIN:?}"
        );
        conns.shutdown().await;
    }
}

fn view(state: &AdminState) -> Vec<BackendView> {
    let unsaved = state.weights.unsaved().map(|u| u.to_string());
    state
        .balance
        .view()
        .into_iter()
        .zip(&state.backends)
        .zip(&state.metrics.backends)
        .zip(state.board.snapshot())
        .enumerate()
        .map(|(i, (((v, b), m), up))| {
            let cause = if up { None } else { state.board.cause(i) };
            BackendView {
                name: v.name,
                url: b.redacted_url(),
                weight: v.weight,
                target_share: v.target_share,
                actual_share: v.actual_share,
                actual_share_since_change: v.actual_share_since_change,
                records_routed: v.routed,
                records_routed_since_change: v.routed_since_change,
                records_written: m.written.get(),
                write_errors: m.write_errors.get(),
                up,
                down_cause: cause.as_ref().map(|c| c.to_string()),
                down_cause_code: cause.as_ref().map(|c| c.label().to_string()),
                excluded: state.board.is_excluded(i),
                unsaved: unsaved.clone(),
            }
        })
        .collect()
}

async fn backends(State(state): State<AdminState>) -> Json<Vec<BackendView>> {
    Json(view(&state))
}

/// `PUT /v1/weights`. The body must arrive within [`REQUEST_TIMEOUT`]; the change itself is
/// not timed out (it waits at most for another change's state-file fsync), so its answer always
/// says what happened.
async fn set_weights(State(state): State<AdminState>, req: Request) -> Response {
    let body = match tokio::time::timeout(REQUEST_TIMEOUT, Bytes::from_request(req, &())).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            return error(
                e.status(),
                format!(
                    "request body refused ({}); limit is {MAX_BODY} bytes",
                    e.body_text()
                ),
            )
        }
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                format!("request not completed within {REQUEST_TIMEOUT:?}; nothing changed"),
            )
        }
    };
    let changes = match parse_weights(&body) {
        Ok(c) => c,
        Err(msg) => return error(StatusCode::BAD_REQUEST, msg),
    };
    if let Some(control) = &state.control {
        // In its own task, like a local change: a client that hangs up does not cut a change
        // from its outcome.
        let (control, store, c) = (control.clone(), state.weights.clone(), changes.clone());
        let changed = tokio::spawn(async move { control.change(&store, &c).await }).await;
        let changed = match changed {
            Ok(r) => r,
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        };
        return match changed {
            Ok(fleet) => {
                info!(
                    version = fleet.version,
                    ?changes,
                    "fleet weights changed through the admin API"
                );
                Json(view(&state)).into_response()
            }
            Err(e @ crate::control::ControlError::Invalid(_)) => {
                error(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
            }
            Err(e) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{e}; weights unchanged"),
            ),
        };
    }
    // The state file is written with fsync: off the async workers, which carry the records.
    // Awaited to the end, and in its own task, so that neither a timeout nor a client that
    // hangs up can separate a change from its answer.
    let store = state.weights.clone();
    let applied = {
        let changes = changes.clone();
        tokio::task::spawn_blocking(move || store.apply(&changes, Origin::AdminApi)).await
    };
    let applied = match applied {
        Ok(r) => r,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    match applied {
        Ok(unsaved) => {
            match unsaved {
                None => info!(?changes, "weights changed through the admin API"),
                Some(u) => warn!(?changes, %u, "weights changed through the admin API"),
            }
            Json(view(&state)).into_response()
        }
        Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
    }
}

async fn control_status(State(state): State<AdminState>) -> Response {
    match &state.control {
        Some(c) => Json(c.status()).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "no control Redis: this agent was started without --control".into(),
        ),
    }
}

/// `{"NAME": weight, …}` with each weight an integer 0..=[`MAX_WEIGHT`].
fn parse_weights(body: &[u8]) -> Result<BTreeMap<String, u32>, String> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| format!("body is not valid JSON: {e}; expected {{\"NAME\": WEIGHT, …}}"))?;
    let serde_json::Value::Object(map) = value else {
        return Err("body must be a JSON object such as {\"A\": 50, \"B\": 50}".into());
    };
    let mut out = BTreeMap::new();
    for (name, w) in map {
        let weight = w
            .as_u64()
            .filter(|&w| w <= u64::from(MAX_WEIGHT))
            .ok_or_else(|| WeightError::OutOfRange(name.clone(), w.to_string()).to_string())?;
        out.insert(name, weight as u32);
    }
    Ok(out)
}

async fn metrics(State(state): State<AdminState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state
            .metrics
            .render(&state.balance, &state.board, &state.budget),
    )
        .into_response()
}

fn error(status: StatusCode, msg: String) -> Response {
    #[derive(Serialize)]
    struct ErrorBody {
        error: String,
    }
    (status, Json(ErrorBody { error: msg })).into_response()
}

/// A socket whose writes fail once one has waited longer than `limit` for the peer to read.
/// (hyper bounds the wait for a request's headers, not for a client that never reads answers.)
struct WriteStall {
    inner: tokio::net::TcpStream,
    limit: Duration,
    /// Armed while a write waits; reset by every write that goes through.
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl WriteStall {
    fn new(inner: tokio::net::TcpStream, limit: Duration) -> Self {
        WriteStall {
            inner,
            limit,
            deadline: None,
        }
    }

    /// After a write returned `Pending`: fail once the deadline has passed, else make sure the
    /// task wakes at it.
    fn stalled(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<usize>> {
        let limit = self.limit;
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match std::future::Future::poll(deadline.as_mut(), cx) {
            std::task::Poll::Ready(()) => std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "admin API client stopped reading",
            ))),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

impl tokio::io::AsyncRead for WriteStall {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for WriteStall {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match std::pin::Pin::new(&mut self.inner).poll_write(cx, buf) {
            std::task::Poll::Pending => self.stalled(cx),
            done => {
                self.deadline = None;
                done
            }
        }
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_must_be_whole_and_in_range() {
        assert_eq!(
            parse_weights(br#"{"A":50,"B":0}"#).unwrap(),
            BTreeMap::from([("A".into(), 50), ("B".into(), 0)])
        );
        for bad in [
            &br#"{"A":-1}"#[..],
            br#"{"A":1.5}"#,
            br#"{"A":10001}"#,
            br#"{"A":"5"}"#,
            br#"[1,2]"#,
            br#"{"A":"#,
        ] {
            assert!(
                parse_weights(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
