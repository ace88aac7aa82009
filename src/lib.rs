//! redtap: who has been sending TCP traffic to an address in the last few minutes, kept in
//! Redis, balanced per record across weighted backends.
//!
//! ```text
//!  capture ──Record──▶ [queue] ──▶ dispatcher ──Vec<Record>──▶ sink ──▶ Redis
//!  (packets |          bounded     (pipeline)   per backend    one writer per backend,
//!   connections)                   routes each record by       batched, pipelined
//!                                  balance::Router
//!                                    ▲        ▲
//!  admin (HTTP API), SIGHUP, ─weights─┘        └── health (writers report up/down)
//!  control (fleet weights in a control Redis)
//! ```
//!
//! Layout (the daemon first, then the stages in the order a record meets them):
//! - [`daemon`]: `redtap run` — open capture once, check backends, bind, start the pipeline,
//!   admin and SIGHUP, wait for the shutdown token, drain; typed [`StartError`]s with exit codes.
//! - [`config`]: flags + environment + TOML → one validated [`config::Config`], before anything
//!   binds; each setting declared once ([`config::settings`]), errors naming what was typed.
//! - [`connect`]: the one way to connect to a backend (AUTH, TLS, bounded times) and its typed
//!   [`connect::ConnectError`]; a Redis Cluster backend through [`connect::cluster`] (one
//!   connection per primary, each command routed by its key's slot).
//! - [`record`]: the [`record::Record`] that flows one way through the pipeline.
//! - [`capture`]: produces records (packets mode: one per TCP segment to the address, from a
//!   libpcap ring; connections mode: one per accepted connection).
//! - [`pipeline`]: the record path behind capture — its [`Pipeline`] (start, drain, [`Summary`])
//!   and the dispatcher task that routes records and hands each writer its share.
//! - [`balance`]: the pure selector (`swrr`), the weights in force and their store (apply,
//!   persist, restore), the hot-path router.
//! - [`health`]: each backend's up/down verdict and why; [`buffer`]: the bound on waiting records.
//! - [`identity`]: one Redis, one writer — the start-up check of every backend, duplicate servers
//!   refused by `run_id`, this agent's lease on each backend.
//! - [`layout`]: the Redis data layouts (`stream`, `keys`), each writing and reading its format.
//! - [`sink`]: per-backend Redis writers (the I/O loop and the pure exactly-once backlog).
//! - [`admin`]: the HTTP API (`/v1/backends`, `/v1/weights`, `/metrics`, `/healthz`) and the
//!   live page it serves ([`admin::page`]); [`state`]: the file that keeps run-time weights
//!   across restarts.
//! - [`metrics`]: every metric, in one place.
//! - [`recent`]: the last minute the live page shows (one-second samples, top sources).
//! - [`check`]: `redtap check` — will `run` work here (every backend, capture, ports)?
//! - [`control`]: the fleet's weights in a control Redis (`--control`): one versioned record
//!   changed by compare-and-set, followed by every agent, with heartbeats and an audit stream.
//! - [`client`]: `redtap weights`; [`query`]: `redtap query/top/tail/stats`.
//! - `util`: small helpers with no home of their own (`poll_once`).
//!
//! `unsafe` is denied crate-wide; the only exception is the packet socket options (set and
//! read) fenced in `capture::packets::sys`.
//!
//! One shutdown path: the caller cancels the token passed to [`run`]; capture stops, the queue
//! drains through the dispatcher into the writers, and the writers finish within the grace
//! period, counting anything left as dropped (`shutdown`).

#![deny(unsafe_code)]

pub mod admin;
pub mod balance;
pub mod buffer;
pub mod capture;
pub mod check;
pub mod client;
pub mod config;
pub mod connect;
pub mod control;
pub mod daemon;
pub mod health;
pub mod identity;
pub mod layout;
pub mod metrics;
pub mod pipeline;
pub mod query;
pub mod recent;
pub mod record;
pub mod sink;
pub mod state;
mod util;

pub use daemon::{run, StartError};
pub use pipeline::{Pipeline, Summary};
