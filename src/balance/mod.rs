//! Balancing: which backend each record goes to, by weight.
//!
//! Owns, one layer per file:
//! - [`swrr`]: the pure selector ([`Swrr`]) with its proved one-record bound;
//! - [`weights`]: the weights in force ([`Balance`], one immutable [`WeightSnapshot`] per
//!   change), their validation ([`WeightError`]), the routing counts, and the one way weights
//!   change at run time ([`WeightStore`]: apply + persist, restore at start);
//! - [`router`]: the hot-path side ([`Router`]) that rebuilds the selector on a weight or health
//!   change and publishes counts once per batch.
//!
//! Never: moves records (that is [`crate::pipeline`]'s dispatcher) or locks on the hot path:
//! the router only `load()`s the snapshot.

pub mod router;
pub mod swrr;
pub mod weights;

pub use router::{OnDown, Router};
pub use swrr::Swrr;
pub use weights::{
    Balance, Origin, ShareView, Unsaved, WeightError, WeightSnapshot, WeightStore, MAX_WEIGHT,
};
