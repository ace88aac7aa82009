//! One file per read command: its flags, its work over [`super::merge`] or [`super::read`], its
//! output, and `run`, which the binary calls.

pub mod query;
pub mod stats;
pub mod tail;
pub mod top;
