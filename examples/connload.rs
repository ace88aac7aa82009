use std::time::Instant;
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let addr: std::net::SocketAddr = a[1].parse().unwrap();
    let (threads, per): (usize, usize) = (a[2].parse().unwrap(), a[3].parse().unwrap());
    let t = Instant::now();
    let hs: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || {
                for _ in 0..per {
                    drop(std::net::TcpStream::connect(addr).unwrap());
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    println!(
        "{:.0} conn/s",
        (threads * per) as f64 / t.elapsed().as_secs_f64()
    );
}
