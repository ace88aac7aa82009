//! Capture: turns traffic to the listen address into [`Record`](crate::record::Record)s.
//!
//! Capture only produces records and sends them down the record queue; nothing downstream calls
//! back into it. It never waits on Redis. Connections mode waits on a full queue (backpressure
//! on accepting); packets mode cannot hold the kernel back, so it drops and counts instead.
//!
//! - [`packets`]: every TCP segment to the address, from a libpcap ring (the default).
//! - [`parse`]: frame bytes → segment; pure, fuzzed.
//! - [`connections`]: one record per accepted connection; also serves the port for packets mode.

pub mod connections;
pub mod packets;
pub mod parse;
