//! The agent's control task: the thin I/O loop around the pure [`Follower`].
//!
//! Owns: the connection to the control Redis, the pub/sub subscription that nudges (for speed),
//! the poll every [`POLL_EVERY`] (so a lost nudge costs at most that), the heartbeat, and the
//! [`Status`] the admin API and metrics read (version served, stale, refused version).
//!
//! Never: decides anything itself (the [`Follower`] does), blocks the record path, or ends the
//! daemon: a control Redis that is down only leaves the weights stale.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use redis::aio::MultiplexedConnection;
use serde::Serialize;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{
    agents, heartbeat, raise, read, set, ControlError, FleetWeights, Follower, Heartbeat,
    HeartbeatBackend, Keys, Step, COMMAND_TIMEOUT, POLL_EVERY,
};
use crate::balance::WeightStore;
use crate::config::BackendConfig;
use crate::connect::{self, Timeouts};
use crate::health::Board;
use crate::metrics::Metrics;

/// What the admin API and the metrics show of the control plane.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Status {
    /// The control Redis URL, password redacted.
    pub control: String,
    /// The fleet version served (`null`: none yet, the agent's own weights).
    pub version: Option<u64>,
    /// True while the control Redis has not answered since start or since it was lost: the
    /// weights served may be behind the fleet's.
    pub stale: bool,
    /// The newest fleet version this agent refused, and why (its last good weights stay).
    pub refused_version: Option<u64>,
    /// Why `refused_version` was refused.
    pub error: Option<String>,
}

/// One agent's handle on the control Redis, shared by its control task and its admin API.
#[derive(Debug)]
pub struct Control {
    client: redis::Client,
    /// The control keys under this agent's prefix.
    pub keys: Keys,
    agent: String,
    status: watch::Sender<Status>,
    /// Poll now (after this agent's own change), without waiting for the nudge.
    poll_now: Notify,
}

impl Control {
    /// A handle for agent `agent` over the control Redis `target` (any URL a backend takes),
    /// its keys under `prefix`.
    pub fn new(
        target: &BackendConfig,
        prefix: &str,
        agent: &str,
    ) -> Result<Arc<Self>, crate::config::ConfigError> {
        Ok(Arc::new(Control {
            client: target.client()?,
            keys: Keys::new(prefix),
            agent: agent.to_string(),
            status: watch::Sender::new(Status {
                control: target.redacted_url(),
                stale: true,
                ..Status::default()
            }),
            poll_now: Notify::new(),
        }))
    }

    /// The control plane as it stands.
    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    async fn connect(&self) -> Result<MultiplexedConnection, ControlError> {
        Ok(connect::connect_client(&self.client, Timeouts::both(COMMAND_TIMEOUT)).await?)
    }

    /// `PUT /v1/weights` on this agent: write `changes` into the fleet record (over this
    /// agent's weights if there is none yet), then wait up to [`POLL_EVERY`] × 2 until this
    /// agent serves it. Names this agent does not have are refused and change nothing.
    pub async fn change(
        &self,
        store: &WeightStore,
        changes: &BTreeMap<String, u32>,
    ) -> Result<FleetWeights, ControlError> {
        let names = store.balance().names().to_vec();
        if let Some(unknown) = changes.keys().find(|n| !names.contains(n)) {
            return Err(ControlError::Invalid(format!(
                "unknown backend {unknown:?} (configured: {})",
                names.join(", ")
            )));
        }
        let mut conn = self.connect().await?;
        let base = store.balance().weights_by_name();
        let origin = format!("admin@{}", self.agent);
        let fleet = set(&mut conn, &self.keys, changes, &base, &origin, |_| Ok(())).await?;
        self.poll_now.notify_one();
        let mut rx = self.status.subscribe();
        let _ = tokio::time::timeout(
            POLL_EVERY * 2,
            rx.wait_for(|s| {
                s.version >= Some(fleet.version) || s.refused_version >= Some(fleet.version)
            }),
        )
        .await;
        Ok(fleet)
    }

    /// Start following the fleet's weights. The first read happens here, bounded by
    /// [`COMMAND_TIMEOUT`], so that when the control Redis answers its weights are in force
    /// before the first record; when it does not, the agent starts with the state file's last
    /// version (or its configured weights), marked stale.
    pub async fn start(
        self: Arc<Self>,
        store: Arc<WeightStore>,
        board: Arc<Board>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> JoinHandle<()> {
        let balance = store.balance().clone();
        let mut follower = Follower::new(
            balance.names().to_vec(),
            balance.current().weights.clone(),
            store.saved_fleet(),
        );
        let mut io = Io {
            control: self.clone(),
            store,
            board,
            metrics,
            conn: None,
            last_captured: 0,
            last_beat: Instant::now(),
        };
        io.last_captured = io.metrics.captured.get();
        io.poll(&mut follower).await;
        if follower.stale() {
            warn!(control = %self.status().control, version = ?follower.version(),
                  "control Redis unreachable at start; serving the last known weights (stale) \
                   until it answers");
        }
        io.publish(&follower);
        tokio::spawn(io.run(follower, shutdown))
    }
}

/// The control task's I/O state.
struct Io {
    control: Arc<Control>,
    store: Arc<WeightStore>,
    board: Arc<Board>,
    metrics: Arc<Metrics>,
    conn: Option<MultiplexedConnection>,
    last_captured: u64,
    last_beat: Instant,
}

impl Io {
    async fn run(mut self, mut follower: Follower, shutdown: CancellationToken) {
        let (nudge_tx, mut nudges) = mpsc::channel(64);
        let listener = tokio::spawn(listen(
            self.control.client.clone(),
            self.control.keys.nudge.clone(),
            nudge_tx,
            shutdown.clone(),
        ));
        let mut tick = tokio::time::interval(POLL_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(v) = nudges.recv() => {
                    if follower.on_nudge(v) == Step::Poll {
                        self.poll(&mut follower).await;
                    }
                }
                _ = self.control.poll_now.notified() => self.poll(&mut follower).await,
                _ = tick.tick() => {
                    self.poll(&mut follower).await;
                    self.beat(&follower).await;
                }
            }
            self.publish(&follower);
        }
        let _ = listener.await;
        // Gone from the list at once rather than after the heartbeat's TTL.
        if let Some(c) = self.conn.as_mut() {
            let key = self.control.keys.agent(&self.control.agent);
            let _ = super::timed(redis::cmd("DEL").arg(key).query_async::<()>(c)).await;
        }
    }

    /// Read the fleet record and do what the follower says.
    async fn poll(&mut self, follower: &mut Follower) {
        let was_stale = follower.stale();
        let keys = self.control.keys.clone();
        let answer = match self.conn().await {
            Ok(c) => read(c, &keys).await,
            Err(e) => Err(e),
        };
        let step = match answer {
            Ok(a) => follower.on_answer(a),
            Err(e) => {
                self.conn = None;
                if !was_stale {
                    warn!(error = %e, version = ?follower.version(),
                          "control Redis lost; serving the last known weights (stale) until it \
                           answers");
                }
                follower.on_lost();
                return;
            }
        };
        if was_stale && !follower.stale() && self.control.status.borrow().version.is_some() {
            info!(version = ?follower.version(), "control Redis answers again");
        }
        match step {
            Step::Apply { fleet, weights } => {
                let store = self.store.clone();
                let f = fleet.clone();
                // The state file is written with fsync: off the async workers.
                let applied =
                    tokio::task::spawn_blocking(move || store.apply_fleet(&f, &weights)).await;
                // The status follows the weights at once: an API reader (and a PUT waiting
                // for its version) sees the version as soon as it is served.
                self.publish(follower);
                match applied {
                    Ok(Ok(())) => info!(version = fleet.version, weights = ?fleet.weights,
                                        "fleet weights applied"),
                    Ok(Err(e)) => error!(version = fleet.version, error = %e,
                                         "fleet weights not applied"),
                    Err(e) => error!(version = fleet.version, error = %e,
                                     "fleet weights not applied"),
                }
            }
            Step::Refused { version, error } => {
                error!(version, error = %error,
                       "fleet weights refused for this agent; keeping its last good weights")
            }
            Step::Raise(fleet) => {
                let origin = format!("raise@{}", self.control.agent);
                if let Ok(c) = self.conn().await {
                    match raise(c, &keys, &fleet, &origin).await {
                        Ok(true) => warn!(version = fleet.version,
                                          "the control Redis held an older fleet version (restarted \
                                           without its data?); wrote back the one this agent serves"),
                        Ok(false) => {}
                        Err(e) => warn!(error = %e, "cannot write back the fleet version"),
                    }
                }
            }
            Step::Poll | Step::Nothing => {}
        }
    }

    async fn conn(&mut self) -> Result<&mut MultiplexedConnection, ControlError> {
        if self.conn.is_none() {
            self.conn = Some(self.control.connect().await?);
        }
        Ok(self.conn.as_mut().expect("just set"))
    }

    /// Write this agent's heartbeat; a failure only waits for the next one.
    async fn beat(&mut self, follower: &Follower) {
        let now = Instant::now();
        let captured = self.metrics.captured.get();
        let secs = now.duration_since(self.last_beat).as_secs_f64();
        let rate = if secs > 0.0 {
            captured.saturating_sub(self.last_captured) as f64 / secs
        } else {
            0.0
        };
        self.last_captured = captured;
        self.last_beat = now;
        let beat = Heartbeat {
            agent: self.control.agent.clone(),
            version: follower.version(),
            stale: follower.stale(),
            error: follower.refused().map(|(v, e)| format!("version {v}: {e}")),
            records_per_s: rate,
            backends: self
                .store
                .balance()
                .view()
                .into_iter()
                .zip(self.board.snapshot())
                .map(|(v, up)| HeartbeatBackend {
                    name: v.name,
                    weight: v.weight,
                    share_since_change: v.actual_share_since_change,
                    routed_since_change: v.routed_since_change,
                    up,
                })
                .collect(),
            at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        };
        let keys = self.control.keys.clone();
        if let Ok(c) = self.conn().await {
            if heartbeat(c, &keys, &beat).await.is_err() {
                self.conn = None;
            }
        }
    }

    /// Make the follower's state visible: status (API) and metrics.
    fn publish(&self, follower: &Follower) {
        self.metrics
            .set_control(follower.stale(), follower.version().unwrap_or(0));
        self.control.status.send_if_modified(|s| {
            let new = Status {
                control: s.control.clone(),
                version: follower.version(),
                stale: follower.stale(),
                refused_version: follower.refused().map(|r| r.0),
                error: follower.refused().map(|r| r.1.to_string()),
            };
            let changed = *s != new;
            *s = new;
            changed
        });
    }
}

/// Forward every nudge (a version number published by a change) to the control task;
/// resubscribe every [`POLL_EVERY`] while the control Redis is away.
async fn listen(
    client: redis::Client,
    channel: String,
    nudges: mpsc::Sender<u64>,
    shutdown: CancellationToken,
) {
    loop {
        if let Ok(Ok(mut pubsub)) =
            tokio::time::timeout(COMMAND_TIMEOUT, client.get_async_pubsub()).await
        {
            if let Ok(Ok(())) =
                tokio::time::timeout(COMMAND_TIMEOUT, pubsub.subscribe(&channel)).await
            {
                let mut messages = pubsub.on_message();
                loop {
                    tokio::select! {
                        m = messages.next() => match m {
                            Some(m) => {
                                // A full channel means a poll is coming anyway.
                                if let Ok(v) = m.get_payload::<u64>() {
                                    let _ = nudges.try_send(v);
                                }
                            }
                            None => break,
                        },
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL_EVERY) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Open a connection to a control Redis for the command line (`redtap weights --control`).
pub async fn connect(target: &BackendConfig) -> anyhow::Result<MultiplexedConnection> {
    connect::connect(target, Timeouts::both(Duration::from_secs(5)))
        .await
        .map_err(|e| anyhow::anyhow!("control Redis {}: {e}", target.redacted_url()))
}

/// Every live agent, for `redtap weights --control`.
pub async fn list(
    conn: &mut MultiplexedConnection,
    keys: &Keys,
) -> Result<(Option<FleetWeights>, Vec<Heartbeat>), ControlError> {
    Ok((read(conn, keys).await?, agents(conn, keys).await?))
}
