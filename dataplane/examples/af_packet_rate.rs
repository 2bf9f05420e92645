//! How fast one west gateway worker forwards over AF_PACKET, on one thread: sunset's socket
//! sends, the gateway (red and black AF_PACKET queues) encapsulates, east's socket receives and
//! counts. Run inside a namespace holding veth pairs `<red>`-`<red peer>` and
//! `<black>`-`<black peer>`, e.g. (as root):
//!
//! ```text
//! ip netns add afr && for p in "ra rb" "ba bb"; do set -- $p; ip -n afr link add $1 type veth peer name $2; ip -n afr link set $1 up; ip -n afr link set $2 up; done
//! ip netns exec afr target/release/examples/af_packet_rate ra rb ba bb 1400 3
//! ```
//!
//! Prints ESP frames per second seen on east's side. Sender, gateway and receiver share one
//! core, as the one-core bench does; compare two builds side by side, not absolute figures.

use espada_dataplane::pool::{Pool, PoolCache};
use espada_dataplane::port::af_packet::{interface_mac, AfPacketQueue, RingConfig};
use espada_dataplane::port::PortQueue;
use espada_harness::pair::{lab, lab_worker_on, mac, LabGateway};
use espada_harness::traffic::{Generator, TrafficCounters, TrafficSpec};
use espada_sadb::db::SaMode;
use espada_sadb::lifetime::Lifetimes;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() != 6 {
        eprintln!("usage: af_packet_rate RED RED_PEER BLACK BLACK_PEER SIZE SECONDS");
        std::process::exit(2);
    }
    let q = |i: &str| AfPacketQueue::open(i, 0, 1, 9, RingConfig::default()).expect(i);
    let size: usize = a[4].parse().expect("size");
    let secs: f64 = a[5].parse().expect("seconds");
    let (red, mut sunset, black, mut east) = (q(&a[0]), q(&a[1]), q(&a[2]), q(&a[3]));
    let red_mac = interface_mac(&a[0]).expect("red mac");
    let (w, _) = lab::dbs(1, 1, SaMode::PerCpu, Lifetimes::default());
    let pool = Pool::new(1024, 4096);
    let mut gw = lab_worker_on(
        LabGateway::West,
        w,
        lab::sides(),
        Box::new(red),
        Box::new(black),
        &pool,
    )
    .expect("gateway");
    let spec = TrafficSpec {
        src: "10.1.0.10".parse().unwrap(),
        dst: "10.2.0.10".parse().unwrap(),
        src_mac: mac::SUNSET,
        size,
        flows: 4,
        limit: None,
        rate: None,
        imix: false,
        tunnels: 0,
        tunnel_last: false,
    };
    let mut generator = Generator::new(spec, red_mac, 0, Arc::new(TrafficCounters::default()));
    let mut pc = PoolCache::new(pool.clone());
    let (mut v, mut got) = (Vec::new(), Vec::new());
    let (mut esp, mut t0) = (0u64, Instant::now());
    let mut all = 0u64;
    let mut warm = true;
    loop {
        generator.rx_burst(&mut pc, &mut v, 32);
        sunset.tx_burst(&mut pc, &mut v);
        gw.poll();
        east.rx_burst(&mut pc, &mut got, 64);
        esp += got.len() as u64;
        all += got.len() as u64;
        for f in got.drain(..) {
            pc.put(f);
        }
        if warm && t0.elapsed() > Duration::from_millis(500) {
            (warm, esp, t0) = (false, 0, Instant::now());
        }
        if !warm && t0.elapsed().as_secs_f64() >= secs {
            break;
        }
    }
    let s = t0.elapsed().as_secs_f64();
    println!(
        "{:.4} Mpps ESP out ({esp} frames in {s:.2} s; {all} with the warm-up)",
        esp as f64 / s / 1e6
    );
}
