//! Capture: turns traffic to the listen address into [`Record`](crate::record::Record)s.
//!
//! Capture only produces records and sends them down the record queue; nothing downstream calls
//! back into it. It never waits on Redis — only on a full queue, which is backpressure.

pub mod connections;
