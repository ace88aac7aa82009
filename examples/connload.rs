//! A small connection load for the demo: `connload ADDR N` opens and closes N TCP connections to
//! ADDR, four at a time, and prints the rate. It is the test harness's own load generator.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(addr), Some(n)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: connload ADDR N");
        std::process::exit(64);
    };
    let addr: std::net::SocketAddr = addr.parse().expect("ADDR like 127.0.0.1:9000");
    let n: usize = n.parse().expect("N, a number of connections");
    let t = Instant::now();
    let ok = common::connect_many(addr, n, 4);
    println!(
        "{ok} of {n} connected, {:.0} conn/s",
        ok as f64 / t.elapsed().as_secs_f64()
    );
}
