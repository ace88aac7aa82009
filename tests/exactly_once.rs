//! The writer's exactly-once bookkeeping ([`redtap::sink::backlog::Backlog`]) against a seeded
//! model of Redis with faults, over many tiny random schedules, in every layout (packed: an
//! entry of several records is stored, refused or lost as one).
//!
//! The model executes what the backlog's pipelines carry — the same commands redtap sends (a
//! sample of pipelines is checked against the real RESP bytes redtap builds) — on per-second
//! bucket streams or NX keys with expiries, and can: refuse a command (OOM, READONLY, LOADING,
//! MISCONF), execute a pipeline and lose its answer, close the connection mid-pipeline, let the
//! writer give up on a pipeline that still executes later on its old connection (after newer
//! pipelines on a new one), restart having lost everything or only the last second, and refuse an
//! ID not above a stream's top. The writer's side — capture, health going down and up (budget,
//! drop-oldest), expiry, shutdown — is driven by the same seed.
//!
//! A share of the schedules model a Redis Cluster backend of three primaries, as
//! `redtap::connect::cluster` drives one: the layout stripes buckets per pipeline, a pipeline is
//! split into one part per primary (by each key's hash slot), each part queued on its primary's
//! own connection and run in that primary's order, independently of the others; a part lost
//! fails the whole pipeline while the other parts may still run; a primary restarts alone
//! (losing only its keys); and a command may be answered `MOVED`/`ASK` (a refusal).
//!
//! After each schedule, for every captured record: it was written or dropped exactly once; a
//! written record was stored; no record was ever readable twice; a record dropped for any reason
//! but `unknown` was never readable; and `written` equals what the model holds plus what the
//! model's restarts destroyed or expiry removed, less what was dropped as `unknown` yet stored.
//!
//! `REDTAP_SIM_SEED=<seed>` runs one schedule (a failure prints its seed);
//! `REDTAP_SIM_SCHEDULES=<n>` sets how many run (default 1,000,000).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use redtap::buffer::{Budget, OnFull, RECORD_COST};
use redtap::config::Schema;
use redtap::connect::cluster::{hash_slot, stripe_tags, SLOTS, STRIPES};
use redtap::layout::{bucket_expire_at_ms, bucket_of, Answer, Bucket as BucketId, Layout, Slot};
use redtap::metrics::DropReason;
use redtap::record::{Kind, Record};
use redtap::sink::backlog::{Backlog, Cmd, Fate, Plan};
use redtap::sink::WINDOW;

/// splitmix64: small, fast, and the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// A command as Redis sees it, taken from a plan when it is sent (the record may be gone from
/// the backlog by the time a late pipeline executes).
#[derive(Debug, Clone)]
enum Op {
    /// `EVAL <create bucket> …` (create) or `XADD key NOMKSTREAM id …`: an entry of one record
    /// (stream) or several (packed), each (record, capture µs).
    Xadd {
        /// The bucket stream's key, its second and stripe.
        key: String,
        bucket: BucketId,
        id: Slot,
        create: bool,
        recs: Vec<(u16, u64)>,
        expire_at: u64,
    },
    /// `XRANGE key id id`.
    Xrange {
        key: String,
        bucket: BucketId,
        id: Slot,
    },
    /// `XREVRANGE key + - COUNT 1`.
    Xrevrange { key: String, bucket: BucketId },
    /// `SET key value PXAT expire_at NX`.
    Set {
        key: Slot,
        rec: u16,
        ts: u64,
        expire_at: u64,
    },
    /// `GET key`.
    Get { key: Slot },
}

impl Op {
    /// The key it works on, as Redis names it.
    fn key(&self) -> String {
        match self {
            Op::Xadd { key, .. } | Op::Xrange { key, .. } | Op::Xrevrange { key, .. } => {
                key.clone()
            }
            Op::Set { key, .. } | Op::Get { key } => key_name(*key),
        }
    }
}

/// The keys schema's name for `slot`.
fn key_name(slot: Slot) -> String {
    format!("sim:ev:a:{}:{}", slot.major, slot.seq)
}

/// The primary (of `nodes`, owning even slot ranges as `redis-cli --cluster create` makes them)
/// that holds `key`; 0 outside a cluster.
fn node_of(key: &str, nodes: usize) -> usize {
    usize::from(hash_slot(key.as_bytes())) * nodes / usize::from(SLOTS)
}

/// The ops of `plan`, built from the backlog's records and layout.
fn ops(b: &Backlog, plan: &Plan) -> Vec<Op> {
    let layout = b.layout();
    plan.cmds
        .iter()
        .map(|c| match *c {
            Cmd::Store {
                h, slot, create, ..
            } => {
                let r = b.record(h);
                match layout.schema {
                    Schema::Stream | Schema::Packed => Op::Xadd {
                        key: layout.bucket_key(BucketId::of(r, b.stripe(h))),
                        bucket: BucketId::of(r, b.stripe(h)),
                        id: slot,
                        create,
                        recs: b.entry(h).iter().map(|r| (r.src.port(), r.ts_us)).collect(),
                        expire_at: bucket_expire_at_ms(bucket_of(r), layout.retention_ms),
                    },
                    Schema::Keys => Op::Set {
                        key: slot,
                        rec: r.src.port(),
                        ts: r.ts_us,
                        expire_at: layout.expire_at_ms(r),
                    },
                }
            }
            Cmd::Check { h, slot } => match layout.schema {
                Schema::Stream | Schema::Packed => {
                    let bucket = BucketId::of(b.record(h), b.stripe(h));
                    Op::Xrange {
                        key: layout.bucket_key(bucket),
                        bucket,
                        id: slot,
                    }
                }
                Schema::Keys => Op::Get { key: slot },
            },
            Cmd::Top { bucket } => Op::Xrevrange {
                key: layout.bucket_key(bucket),
                bucket,
            },
        })
        .collect()
}

/// A stored entry: which records (with their capture µs; packed: several), and when it was
/// written (for a restart that loses the last second).
#[derive(Debug, Clone)]
struct Entry {
    recs: Vec<(u16, u64)>,
    at: u64,
}

impl Entry {
    /// What a read-back identifies it by: its first record's capture time and source port.
    fn id(&self) -> (u64, u16) {
        (self.recs[0].1, self.recs[0].0)
    }
}

#[derive(Debug, Default)]
struct Bucket {
    entries: BTreeMap<Slot, Entry>,
    expire_at: u64,
    created_at: u64,
}

#[derive(Debug, Default)]
struct Model {
    /// Bucket streams by key.
    buckets: HashMap<String, Bucket>,
    /// Keys schema: key → (entry, expiry).
    keys: HashMap<Slot, (Entry, u64)>,
    /// Per record: copies that became readable, copies a restart destroyed, copies present now,
    /// and stores that succeeded (readable or not).
    readable: Vec<u8>,
    lost: Vec<u8>,
    present: Vec<u8>,
    executed: Vec<u8>,
    /// A record that was present twice at once.
    twice: Option<u16>,
    /// Keys schema: percent of key names found taken by someone else (an earlier run) the first
    /// time one of ours is written there.
    foreign: u64,
    /// Commands refused.
    refused: u64,
    /// Keys schema: names written at least once.
    touched: std::collections::HashSet<Slot>,
    /// Percent of commands refused.
    refuse: u64,
    /// Primaries: 1 for one server.
    nodes: usize,
}

impl Model {
    fn expire(&mut self, now: u64) {
        let present = &mut self.present;
        self.buckets.retain(|_, b| {
            let keep = b.expire_at > now;
            if !keep {
                for e in b.entries.values() {
                    for &(r, _) in &e.recs {
                        present[r as usize] = present[r as usize].saturating_sub(1);
                    }
                }
            }
            keep
        });
        self.keys.retain(|_, (e, exp)| {
            let keep = *exp > now;
            if !keep {
                for &(r, _) in &e.recs {
                    present[r as usize] = present[r as usize].saturating_sub(1);
                }
            }
            keep
        });
    }

    fn appear(&mut self, rec: u16) {
        let r = rec as usize;
        if self.present[r] > 0 {
            self.twice.get_or_insert(rec);
        }
        self.present[r] += 1;
        self.readable[r] += 1;
    }

    /// Execute one op at `now`.
    fn exec(&mut self, op: Op, now: u64, rng: &mut Rng) -> Answer {
        self.expire(now);
        if rng.chance(self.refuse) {
            let errors = ["OOM", "READONLY", "LOADING", "MISCONF", "MOVED", "ASK"];
            // Redirects only from a cluster.
            let kinds = if self.nodes > 1 { 6 } else { 4 };
            let e = errors[rng.below(kinds) as usize];
            self.refused += 1;
            return Answer::Refused(e.into());
        }
        match op {
            Op::Xadd {
                key,
                id,
                create,
                recs,
                expire_at,
                ..
            } => {
                let b = match self.buckets.get_mut(&key) {
                    Some(b) => b,
                    None if create => self.buckets.entry(key.clone()).or_insert(Bucket {
                        entries: BTreeMap::new(),
                        expire_at,
                        created_at: now,
                    }),
                    None => return Answer::Nil,
                };
                if b.entries.keys().next_back().is_some_and(|top| id <= *top) {
                    if b.entries.is_empty() {
                        self.buckets.remove(&key);
                    }
                    return Answer::NotAbove;
                }
                let alive = b.expire_at > now;
                b.entries.insert(
                    id,
                    Entry {
                        recs: recs.clone(),
                        at: now,
                    },
                );
                for &(rec, _) in &recs {
                    self.executed[rec as usize] += 1;
                    if alive {
                        self.appear(rec);
                    }
                }
                if !alive {
                    // PEXPIREAT in the past: the key is deleted at once, never readable.
                    self.buckets.remove(&key);
                }
                Answer::Done
            }
            Op::Xrange { key, id, .. } => Answer::Found(
                self.buckets
                    .get(&key)
                    .and_then(|b| b.entries.get(&id))
                    .map(Entry::id),
            ),
            Op::Xrevrange { key, .. } => Answer::Top(
                self.buckets
                    .get(&key)
                    .and_then(|b| b.entries.keys().next_back().copied()),
            ),
            Op::Get { key } => Answer::Found(self.keys.get(&key).map(|(e, _)| e.id())),
            Op::Set {
                key,
                rec,
                ts,
                expire_at,
            } => {
                if self.touched.insert(key) && rng.chance(self.foreign) {
                    let theirs = Entry {
                        recs: vec![(0, 0)],
                        at: 0,
                    };
                    self.keys.insert(key, (theirs, u64::MAX));
                }
                if self.keys.contains_key(&key) {
                    return Answer::Nil;
                }
                self.executed[rec as usize] += 1;
                if expire_at > now {
                    self.appear(rec);
                    let e = Entry {
                        recs: vec![(rec, ts)],
                        at: now,
                    };
                    self.keys.insert(key, (e, expire_at));
                }
                Answer::Done
            }
        }
    }

    /// A restart of primary `node` (or every one): everything it had written since `since` is
    /// gone (0: everything).
    fn restart(&mut self, since: u64, node: Option<usize>) {
        let (lost, present) = (&mut self.lost, &mut self.present);
        let mut gone = |e: &Entry| {
            for &(r, _) in &e.recs {
                lost[r as usize] += 1;
                present[r as usize] = present[r as usize].saturating_sub(1);
            }
        };
        let nodes = self.nodes;
        let hit = |key: &str| node.is_none_or(|n| node_of(key, nodes) == n);
        self.buckets.retain(|key, b| {
            if !hit(key) {
                return true;
            }
            // Entries of a bucket created since then are gone with their key.
            let keep = b.created_at < since;
            b.entries.retain(|_, e| {
                let stay = keep && e.at < since;
                if !stay {
                    gone(e);
                }
                stay
            });
            keep
        });
        self.keys.retain(|&slot, (e, _)| {
            let keep = !hit(&key_name(slot)) || e.at < since;
            if !keep {
                gone(e);
            }
            keep
        });
    }

    /// Records readable now.
    fn held(&mut self, now: u64) -> u64 {
        self.expire(now);
        let recs = |e: &Entry| e.recs.len() as u64;
        self.buckets
            .values()
            .flat_map(|b| b.entries.values())
            .map(recs)
            .sum::<u64>()
            + self.keys.values().map(|(e, _)| recs(e)).sum::<u64>()
    }
}

/// What the schedules exercised, summed.
#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    records: u64,
    written: u64,
    dropped_unknown: u64,
    pipelines: u64,
    refused: u64,
    answers_lost: u64,
    late_runs: u64,
    restarts: u64,
    read_backs: u64,
    tops: u64,
    /// Packed: stores of an entry of more than one record.
    multi_record_stores: u64,
    /// Schedules against a cluster.
    clusters: u64,
    /// Cluster: pipelines split over more than one primary.
    split_pipelines: u64,
    /// Cluster: restarts of one primary alone.
    node_restarts: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.records += o.records;
        self.written += o.written;
        self.dropped_unknown += o.dropped_unknown;
        self.pipelines += o.pipelines;
        self.refused += o.refused;
        self.answers_lost += o.answers_lost;
        self.late_runs += o.late_runs;
        self.restarts += o.restarts;
        self.read_backs += o.read_backs;
        self.tops += o.tops;
        self.multi_record_stores += o.multi_record_stores;
        self.clusters += o.clusters;
        self.split_pipelines += o.split_pipelines;
        self.node_restarts += o.node_restarts;
    }
}

/// A pipeline (on a cluster: its part for one primary) Redis has received on a connection and
/// not executed yet.
struct Queued {
    plan: u64,
    /// The index of each op in its pipeline.
    idx: Vec<usize>,
    ops: Vec<Op>,
    /// The writer gave up on its answer (timeout, or another part was lost): it may still
    /// execute.
    abandoned: bool,
}

/// A writer's connection: one queue per primary (one, for one server).
struct Conn {
    nodes: Vec<std::collections::VecDeque<Queued>>,
}

impl Conn {
    /// Whatever is left of pipeline `plan` may still run, but nobody awaits its answer.
    fn abandon(&mut self, plan: u64) {
        for q in self.nodes.iter_mut().flatten() {
            if q.plan == plan {
                q.abandoned = true;
            }
        }
    }
}

/// A pipeline the writer awaits: on which connection, the answers of its parts so far, and
/// how many parts have not answered.
struct Awaited {
    conn: usize,
    answers: Vec<Option<Answer>>,
    parts: usize,
}

/// The writer's answer to pipeline `plan` is lost: settle it so, and abandon what is left of it.
fn lose(plan: u64, awaiting: &mut BTreeMap<u64, Awaited>, conns: &mut [Conn], b: &mut Backlog) {
    if let Some(a) = awaiting.remove(&plan) {
        conns[a.conn].abandon(plan);
        b.settle(plan, Err(()));
    }
}

/// Run one schedule; `Err` describes what broke.
fn schedule(seed: u64, trace: bool) -> Result<Stats, String> {
    let mut st = Stats::default();
    macro_rules! trace {
        ($($t:tt)*) => { if trace { eprintln!($($t)*); } };
    }
    let mut rng = Rng(seed);
    let schema = [Schema::Stream, Schema::Keys, Schema::Packed][rng.below(3) as usize];
    let stream = schema != Schema::Keys;
    let retention = 2000 + rng.below(3) * 1000;
    let mut now: u64 = 1_700_000_000_000 + rng.below(1000);
    // Packed: entries of up to a batch of records.
    let batch = 1 + rng.below(if schema == Schema::Packed { 4 } else { 3 }) as usize;
    let on_full = if rng.chance(50) {
        OnFull::DropOldest
    } else {
        OnFull::Wait
    };
    let budget = Arc::new(Budget::new((2 + rng.below(4) as usize) * RECORD_COST));
    // A cluster of three primaries, as often as one server for the bucket layouts.
    let nodes = if rng.chance(if stream { 50 } else { 25 }) {
        3
    } else {
        1
    };
    st.clusters = u64::from(nodes > 1);
    let layout = Layout::new(schema, "sim", "a", retention);
    // Few stripes as often as all of them: a short schedule then reuses a stripe's bucket
    // across pipelines, as a long run does with sixteen.
    let stripes = if nodes > 1 {
        [2, 3, STRIPES][rng.below(3) as usize]
    } else {
        0
    };
    let layout = if nodes > 1 {
        layout.for_cluster("sim", "a").with_stripes(stripes)
    } else {
        layout
    };
    let mut b = Backlog::new(layout, batch, on_full, budget.clone());
    b.keep_journal();
    let total = 2 + rng.below(if schema == Schema::Packed { 7 } else { 5 }) as u16;
    let mut model = Model {
        readable: vec![0; total as usize + 1],
        lost: vec![0; total as usize + 1],
        present: vec![0; total as usize + 1],
        executed: vec![0; total as usize + 1],
        refuse: [0, 5, 20, 50][rng.below(4) as usize],
        foreign: [0, 0, 10, 30][rng.below(4) as usize],
        nodes,
        ..Default::default()
    };
    // A previous run's entries at or above where this run's IDs start (on a cluster, in the
    // stripe this run's first pipeline takes, or another).
    if stream && rng.chance(20) {
        let bucket = now / 1000;
        let mut stripe = b.layout().stripe_after(0);
        for _ in 0..rng.below(3) {
            stripe = b.layout().stripe_after(stripe);
        }
        model.buckets.insert(
            b.layout().bucket_key(BucketId {
                sec: bucket,
                stripe,
            }),
            Bucket {
                entries: [(
                    Slot {
                        major: now + rng.below(3),
                        seq: rng.below(3),
                    },
                    Entry {
                        recs: vec![(0, 0)],
                        at: 0,
                    },
                )]
                .into(),
                expire_at: bucket_expire_at_ms(bucket, retention),
                created_at: 0,
            },
        );
        model.present[0] = 1;
        model.readable[0] = 1;
    }
    let mut conns: Vec<Conn> = Vec::new();
    let mut conn: Option<usize> = None;
    // Plans the writer still awaits.
    let mut awaiting: BTreeMap<u64, Awaited> = BTreeMap::new();
    let mut captured: u16 = 0;
    let mut checked_resp = false;
    let mut steps = 0;
    let faulty_steps = 20 + rng.below(30);
    let abort_at_end = rng.chance(25);
    let mut aborting = false;
    loop {
        steps += 1;
        if steps > 2000 {
            return Err("schedule did not finish".into());
        }
        let faults = steps <= faulty_steps;
        if !faults {
            model.refuse = 0;
            if !b.is_up() {
                b.set_up(true);
            }
            if captured == total && abort_at_end && !aborting {
                aborting = true;
            }
        }
        if aborting && b.unsent() > 0 {
            b.abort();
        }
        if captured == total && b.is_empty() && awaiting.is_empty() {
            break;
        }
        match rng.below(10) {
            // Capture.
            0 | 1 if captured < total && (b.has_room() || aborting) => {
                let most = if schema == Schema::Packed { 3 } else { 2 };
                let n = (1 + rng.below(most) as u16).min(total - captured);
                let recs: Vec<Record> = (0..n)
                    .map(|i| {
                        // Now and then the clock steps back.
                        let back = if rng.chance(10) { rng.below(1500) } else { 0 };
                        Record {
                            ts_us: (now - back) * 1000 + rng.below(1000),
                            src: std::net::SocketAddr::from(([10, 0, 0, 1], captured + i + 1)),
                            dst: "10.0.0.2:9000".parse().unwrap(),
                            kind: Kind::Conn,
                        }
                    })
                    .collect();
                captured += n;
                trace!("t={now} capture {recs:?}");
                b.accept(recs);
            }
            // Send.
            2 | 3 => {
                b.drop_expired(now);
                if !b.can_send() {
                    continue;
                }
                let c = *conn.get_or_insert_with(|| {
                    conns.push(Conn {
                        nodes: (0..nodes).map(|_| Default::default()).collect(),
                    });
                    conns.len() - 1
                });
                let Some(plan) = b.plan() else { continue };
                // The RESP redtap would send says what the model runs: every pipeline with a
                // read-back, a top or a resend (the keys the rules depend on), and a sample of
                // the others.
                let careful = plan.cmds.iter().any(|c| {
                    matches!(c, Cmd::Check { .. } | Cmd::Top { .. })
                        || matches!(c, Cmd::Store { resend: true, .. })
                });
                if careful || (!checked_resp && seed.is_multiple_of(8)) {
                    checked_resp = true;
                    check_resp(&b, &plan, stripes)?;
                }
                let ops = ops(&b, &plan);
                st.pipelines += 1;
                for c in &plan.cmds {
                    match c {
                        Cmd::Check { .. } => st.read_backs += 1,
                        Cmd::Top { .. } => st.tops += 1,
                        Cmd::Store { h, .. } => {
                            st.multi_record_stores += u64::from(b.entry(*h).len() > 1);
                        }
                    }
                }
                trace!(
                    "t={now} send plan {} on conn {c}: {:?} = {ops:?}",
                    plan.id,
                    plan.cmds
                );
                // One part per primary that owns a key of the pipeline, in send order.
                let mut parts: Vec<Queued> = (0..nodes)
                    .map(|_| Queued {
                        plan: plan.id,
                        idx: Vec::new(),
                        ops: Vec::new(),
                        abandoned: false,
                    })
                    .collect();
                let n_ops = ops.len();
                for (i, op) in ops.into_iter().enumerate() {
                    let part = &mut parts[node_of(&op.key(), nodes)];
                    part.idx.push(i);
                    part.ops.push(op);
                }
                parts.retain(|p| !p.ops.is_empty());
                st.split_pipelines += u64::from(parts.len() > 1);
                awaiting.insert(
                    plan.id,
                    Awaited {
                        conn: c,
                        answers: vec![None; n_ops],
                        parts: parts.len(),
                    },
                );
                for part in parts {
                    let n = node_of(&part.ops[0].key(), nodes);
                    conns[c].nodes[n].push_back(part);
                }
            }
            // A primary executes the oldest pipeline (part) of some connection, old ones
            // included.
            4..=6 => {
                let live: Vec<(usize, usize)> = (0..conns.len())
                    .flat_map(|i| (0..nodes).map(move |n| (i, n)))
                    .filter(|&(i, n)| !conns[i].nodes[n].is_empty())
                    .collect();
                if live.is_empty() {
                    continue;
                }
                let (c, node) = live[rng.below(live.len() as u64) as usize];
                let q = conns[c].nodes[node].pop_front().unwrap();
                // How the answer fares: delivered, executed and lost, or cut mid-pipeline.
                let fate = if faults { rng.below(10) } else { 0 };
                let upto = if fate == 9 {
                    rng.below(q.ops.len() as u64 + 1) as usize
                } else {
                    q.ops.len()
                };
                let answers: Vec<Answer> = q
                    .ops
                    .iter()
                    .take(upto)
                    .map(|op| model.exec(op.clone(), now, &mut rng))
                    .collect();
                trace!("t={now} conn {c} node {node} runs plan {} ops {:?} ({upto} of {}, fate {fate}, abandoned {}): {answers:?}", q.plan, q.idx, q.ops.len(), q.abandoned);
                if q.abandoned {
                    st.late_runs += u64::from(upto > 0);
                    continue;
                }
                st.answers_lost += u64::from(fate >= 8);
                if fate >= 8 {
                    // The connection to this primary is gone: its other pipelines never run,
                    // and a pipeline with a part lost is lost whole (other parts may still run).
                    let dead: Vec<u64> = conns[c].nodes[node].drain(..).map(|q| q.plan).collect();
                    for plan in std::iter::once(q.plan).chain(dead) {
                        lose(plan, &mut awaiting, &mut conns, &mut b);
                    }
                    if conn == Some(c) {
                        conn = None;
                    }
                    b.failed();
                    continue;
                }
                let a = awaiting.get_mut(&q.plan).expect("awaited");
                for (&i, answer) in q.idx.iter().zip(answers) {
                    a.answers[i] = Some(answer);
                }
                a.parts -= 1;
                if a.parts > 0 {
                    continue;
                }
                let a = awaiting.remove(&q.plan).expect("awaited");
                let answers = a
                    .answers
                    .into_iter()
                    .map(|x| x.expect("answered"))
                    .collect();
                let s = b.settle(q.plan, Ok(answers));
                if !s.ok() {
                    b.failed();
                }
            }
            // The writer gives up on a pipeline (timeout); Redis may still run it later.
            7 if faults => {
                let Some(&plan) = awaiting.keys().next() else {
                    continue;
                };
                trace!("t={now} writer gives up on plan {plan}");
                st.answers_lost += 1;
                lose(plan, &mut awaiting, &mut conns, &mut b);
                b.failed();
                conn = None;
            }
            // Redis (on a cluster: one primary, or now and then all) restarts, losing
            // everything or the last second; the connections to it die.
            8 if faults && rng.chance(15) => {
                let since = if rng.chance(50) {
                    0
                } else {
                    now.saturating_sub(1000)
                };
                let node = (nodes > 1 && rng.chance(80)).then(|| rng.below(nodes as u64) as usize);
                trace!("t={now} restart of {node:?} losing since {since}");
                st.restarts += 1;
                st.node_restarts += u64::from(node.is_some());
                model.restart(since, node);
                let mut dead = Vec::new();
                for c in conns.iter_mut() {
                    for (n, q) in c.nodes.iter_mut().enumerate() {
                        if node.is_none_or(|x| x == n) {
                            dead.extend(q.drain(..).map(|q| q.plan));
                        }
                    }
                }
                for plan in dead {
                    lose(plan, &mut awaiting, &mut conns, &mut b);
                }
                conn = None;
            }
            // Health flips.
            8 if faults => {
                trace!("t={now} up: {}", !b.is_up());
                b.set_up(!b.is_up());
            }
            // Time passes.
            _ => {
                now += rng.below(700);
                b.drop_expired(now);
            }
        }
    }
    // Late pipelines of abandoned connections may still run after the writer is done.
    for q in conns.iter_mut().flat_map(|c| c.nodes.iter_mut()) {
        for q in q.drain(..) {
            if rng.chance(50) {
                st.late_runs += 1;
                for op in q.ops {
                    let a = model.exec(op.clone(), now, &mut rng);
                    trace!("t={now} late plan {}: {op:?} → {a:?}", q.plan);
                }
            }
        }
    }
    trace!("journal (before verify): {:?}", b.totals());
    verify(&mut b, &mut model, total, now)?;
    if budget.used() != 0 {
        return Err(format!("budget not given back: {}", budget.used()));
    }
    let t = b.totals();
    st.records = u64::from(total);
    st.written = t.written;
    st.dropped_unknown = t.dropped[DropReason::Unknown as usize];
    st.refused = model.refused;
    Ok(st)
}

fn verify(b: &mut Backlog, model: &mut Model, total: u16, now: u64) -> Result<(), String> {
    if let Some(r) = model.twice {
        return Err(format!("record {r} stored twice"));
    }
    let mut fate: Vec<Option<Fate>> = vec![None; total as usize + 1];
    for (rec, f) in b.take_journal() {
        let r = rec.src.port() as usize;
        if fate[r].is_some() {
            return Err(format!(
                "record {r} settled twice: {:?} then {f:?}",
                fate[r]
            ));
        }
        fate[r] = Some(f);
    }
    // Copies that became readable and were not destroyed by a restart (Redis's loss): held now
    // or expired since.
    let kept = |r: usize| model.readable[r] - model.lost[r];
    let (mut written_kept, mut unknown_kept) = (0u64, 0u64);
    for (r, fate) in fate.iter().enumerate().skip(1) {
        match fate {
            None => return Err(format!("record {r} neither written nor dropped")),
            Some(Fate::Written) if model.executed[r] == 0 => {
                return Err(format!("record {r} counted written but never stored"))
            }
            Some(Fate::Written) => written_kept += u64::from(kept(r)),
            Some(Fate::Dropped(DropReason::Unknown)) => unknown_kept += u64::from(kept(r)),
            Some(Fate::Dropped(reason)) if kept(r) > 0 => {
                return Err(format!("record {r} dropped ({reason:?}) yet stored"))
            }
            _ => {}
        }
        if kept(r) > 1 {
            return Err(format!("record {r} kept {} times", kept(r)));
        }
    }
    let t = b.totals();
    if t.written + t.dropped_total() != u64::from(total) {
        return Err(format!("{total} captured, {t:?}"));
    }
    let lost: u64 = model.lost[1..].iter().map(|&n| u64::from(n)).sum();
    // The counters redtap publishes agree with the fate of every record.
    let written_fates = fate.iter().filter(|f| **f == Some(Fate::Written)).count() as u64;
    if written_fates != t.written {
        return Err(format!(
            "{written_fates} records written, counter says {}",
            t.written
        ));
    }
    for reason in DropReason::ALL {
        let n = fate
            .iter()
            .filter(|f| **f == Some(Fate::Dropped(reason)))
            .count() as u64;
        if n != t.dropped[reason as usize] {
            return Err(format!(
                "{n} records dropped ({reason:?}), counter says {}",
                t.dropped[reason as usize]
            ));
        }
    }
    let held = model.held(now);
    let present: u64 = model.present[1..].iter().map(|&n| u64::from(n)).sum();
    if held < present || present > written_kept + unknown_kept {
        return Err(format!(
            "model holds {held} (ours {present}), kept written {written_kept} + unknown {unknown_kept}, lost {lost}"
        ));
    }
    Ok(())
}

/// The RESP bytes redtap sends for `plan` say what the model executes.
fn check_resp(b: &Backlog, plan: &Plan, stripes: usize) -> Result<(), String> {
    let bytes = b.pipeline(plan).get_packed_pipeline();
    let cmds = parse_resp(&bytes).ok_or("unparseable RESP")?;
    let ops = ops(b, plan);
    if cmds.len() != ops.len() {
        return Err(format!("{} commands for {} ops", cmds.len(), ops.len()));
    }
    // Written out here, not taken from the layout: one agent's bucket of a second, and on a
    // cluster the stripe's hash tag (whose slot lies in the stripe's share of the slots).
    // With `stripes` of the sixteen, stripe `i` is the sixteen's `(2i + 1) · 16 / 2·stripes`.
    let tags = stripe_tags("a");
    let cluster = stripes > 0;
    let key_of = |bucket: BucketId| {
        if cluster {
            let i = usize::from(bucket.stripe);
            assert!(i < stripes, "stripe {i} of {stripes}");
            let of16 = (2 * i + 1) * STRIPES / (2 * stripes);
            let tag = &tags[of16];
            assert_eq!(
                usize::from(hash_slot(tag.as_bytes())) * STRIPES / usize::from(SLOTS),
                of16
            );
            format!("sim:events:{{{tag}}}:{}", bucket.sec)
        } else {
            assert_eq!(bucket.stripe, 0);
            format!("sim:events:{{a}}:{}", bucket.sec)
        }
    };
    for (raw, op) in cmds.iter().zip(&ops) {
        let args: Vec<String> = raw
            .iter()
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        // Packed: the fields are `p` and a value that decodes to the entry's records.
        let packed_ok = |at: usize, i: Slot, recs: &[(u16, u64)]| {
            b.layout().schema != Schema::Packed
                || (raw.len() == at + 2
                    && a[at] == "p"
                    && redtap::layout::packed::decode(&raw[at + 1], i.major).is_ok_and(|d| {
                        d.iter().map(|d| (d.sport, d.ts_us)).collect::<Vec<_>>() == recs
                    }))
        };
        let id = |s: Slot| format!("{}-{}", s.major, s.seq);
        let ok = match *op {
            Op::Xadd {
                bucket,
                id: i,
                create: true,
                expire_at,
                ref recs,
                ..
            } => {
                a[0] == "EVAL"
                    && a[2] == "1"
                    && a[3] == key_of(bucket)
                    && a[4] == expire_at.to_string()
                    && a[5] == id(i)
                    && packed_ok(6, i, recs)
            }
            Op::Xadd {
                bucket,
                id: i,
                ref recs,
                ..
            } => {
                a[..4]
                    == [
                        "XADD",
                        key_of(bucket).as_str(),
                        "NOMKSTREAM",
                        id(i).as_str(),
                    ]
                    && packed_ok(4, i, recs)
            }
            Op::Xrange { bucket, id: i, .. } => {
                a == [
                    "XRANGE",
                    key_of(bucket).as_str(),
                    id(i).as_str(),
                    id(i).as_str(),
                ]
            }
            Op::Xrevrange { bucket, .. } => {
                a == ["XREVRANGE", key_of(bucket).as_str(), "+", "-", "COUNT", "1"]
            }
            Op::Get { key } => {
                a == [
                    "GET",
                    format!("sim:ev:a:{}:{}", key.major, key.seq).as_str(),
                ]
            }
            Op::Set { key, expire_at, .. } => {
                a[0] == "SET"
                    && a[1] == format!("sim:ev:a:{}:{}", key.major, key.seq)
                    && a[3..] == ["PXAT", expire_at.to_string().as_str(), "NX"]
            }
        };
        if !ok {
            return Err(format!("RESP {a:?} is not {op:?}"));
        }
    }
    Ok(())
}

/// Arrays of bulk strings, as redis-rs packs commands.
fn parse_resp(mut b: &[u8]) -> Option<Vec<Vec<Vec<u8>>>> {
    fn line(b: &mut &[u8]) -> Option<String> {
        let end = b.windows(2).position(|w| w == b"\r\n")?;
        let s = String::from_utf8(b[..end].to_vec()).ok()?;
        *b = &b[end + 2..];
        Some(s)
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let n: usize = line(&mut b)?.strip_prefix('*')?.parse().ok()?;
        let mut args = Vec::new();
        for _ in 0..n {
            let len: usize = line(&mut b)?.strip_prefix('$')?.parse().ok()?;
            args.push(b.get(..len)?.to_vec());
            b = &b[len + 2..];
        }
        out.push(args);
    }
    Some(out)
}

#[test]
fn a_million_faulty_schedules_store_every_record_once_or_count_it() {
    if let Ok(seed) = std::env::var("REDTAP_SIM_SEED") {
        let seed: u64 = seed.parse().expect("REDTAP_SIM_SEED is a number");
        if let Err(e) = schedule(seed, std::env::var_os("REDTAP_SIM_TRACE").is_some()) {
            panic!("seed {seed}: {e}");
        }
        return;
    }
    let n: u64 = std::env::var("REDTAP_SIM_SCHEDULES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let base = 0x5EED_0000_0000u64;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get() as u64)
        .unwrap_or(1)
        .min(4);
    let started = std::time::Instant::now();
    let stats: Stats = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut stats = Stats::default();
                    let mut i = t;
                    while i < n {
                        let seed = base + i;
                        match schedule(seed, false) {
                            Ok(st) => stats.add(&st),
                            Err(e) => panic!(
                                "seed {seed}: {e}\n\
                                 reproduce: REDTAP_SIM_SEED={seed} cargo test --test exactly_once"
                            ),
                        }
                        i += threads;
                    }
                    stats
                })
            })
            .collect();
        let mut all = Stats::default();
        for h in handles {
            all.add(&h.join().unwrap());
        }
        all
    });
    eprintln!(
        "exactly-once simulation: {n} schedules in {:?}, window {WINDOW}: {stats:#?}",
        started.elapsed()
    );
    // What the schedules are for happened (a model that lost its cluster, its faults or its
    // read-backs would pass everything silently).
    if n >= 10_000 {
        for (what, count) in [
            ("cluster schedules", stats.clusters),
            ("pipelines split over primaries", stats.split_pipelines),
            ("one-primary restarts", stats.node_restarts),
            ("read-backs", stats.read_backs),
            ("tops", stats.tops),
            ("late runs", stats.late_runs),
            ("packed multi-record stores", stats.multi_record_stores),
        ] {
            assert!(count > 0, "no {what} in {n} schedules");
        }
    }
}
