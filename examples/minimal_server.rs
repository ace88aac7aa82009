//! A minimal accept-and-discard TCP server: the reference the connections benchmark compares
//! redtap's connections mode against (same runtime, same backlog, no records).
use tokio::io::AsyncReadExt;

#[tokio::main]
async fn main() {
    let addr: std::net::SocketAddr = std::env::args().nth(1).expect("ADDR").parse().unwrap();
    let l = redtap::capture::connections::bind_listener(addr).unwrap();
    loop {
        let Ok((mut s, _)) = l.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let mut b = [0u8; 4096];
            while let Ok(n) = s.read(&mut b).await {
                if n == 0 {
                    break;
                }
            }
        });
    }
}
