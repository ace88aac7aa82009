//! One file per read command: its flags, its work over [`super::merge`] or [`super::read`], its
//! output, and `run`, which the binary calls.
//! Never: Redis I/O of their own (that is `super::read`), or writes.

pub mod query;
pub mod stats;
pub mod tail;
pub mod top;
