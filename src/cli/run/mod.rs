//! `espada run -c FILE`: a gateway on real interfaces (AF_PACKET, AF_XDP, DPDK), one pinned
//! worker per core, a live per-core table once a second, JSON lines on request, totals on exit
//! (SIGINT/SIGTERM).
//!
//! A run goes through four steps, one file each: [`open`] (configuration, cores, interface
//! locks, the state directory's sequence reservations, the control socket and metrics bound —
//! nothing touches a NIC yet), [`start`] (ports, workers, IKE punt thread, servers),
//! [`supervise`] (the control loop: reloads, SA commands, lifetimes, the live table) and
//! [`totals`] (workers joined, totals printed). [`watch`] holds the run-time checks (softirq on
//! worker cores, systemd's watchdog).

mod open;
mod start;
mod supervise;
mod totals;
mod watch;

use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args)]
pub struct RunArgs {
    /// Gateway configuration.
    #[arg(short = 'c', long = "config")]
    config: PathBuf,
    /// Worker count (default: from the configuration, else every online core).
    #[arg(long)]
    workers: Option<usize>,
    /// Seconds between live table updates (0 = no live table).
    #[arg(long, default_value_t = 1.0)]
    interval: f64,
    /// Append one JSON line of per-core counters per interval to this file.
    #[arg(long)]
    stats_json: Option<PathBuf>,
    /// Stop after this many seconds (default: run until SIGINT/SIGTERM).
    #[arg(long)]
    duration: Option<f64>,
    /// Record the black side's frames (both directions, all queues) to FILE-q<N>.pcap.
    #[arg(long)]
    pcap_black: Option<PathBuf>,
    /// How to reach the NICs: `af-packet` (kernel driver stays in charge), `af-xdp` (XSK
    /// sockets, one per queue; needs `--features af-xdp`) or `dpdk` (poll-mode driver; ports and
    /// EAL arguments from the `[dpdk]` section; needs `--features dpdk`).
    #[arg(long, default_value = "af-packet", value_parser = ["af-packet", "af-xdp", "dpdk"])]
    port: String,
    /// When a worker finds nothing for 256 polls in a row, sleep this many microseconds (0: pure
    /// busy polling, for cores dedicated to espada; a few tens of µs keeps a shared host's
    /// kernel, e.g. a veth lab on a 2-core VM, from starving).
    #[arg(long, default_value_t = 0)]
    idle_sleep_us: u32,
    /// Hand IKE to a daemon (strongSwan's charon) through TUN interface NAME, created in
    /// espada's network namespace with the black addresses: the daemon binds UDP 500/4500
    /// there as on a real interface. IKE arriving on black (UDP 500; UDP 4500 with the non-ESP
    /// marker; NAT-T keepalives) is written into it, and the daemon's IKE packets leave on
    /// black. Without it IKE is counted and dropped. Needs CAP_NET_ADMIN and `ip`.
    #[arg(long, value_name = "NAME")]
    ike_tun: Option<String>,
    /// Do not pin workers to cores.
    #[arg(long)]
    no_pin: bool,
    /// Start even when an interface's queue interrupt or RPS mask sends the kernel's receive
    /// work (softirq) to a worker's core. By default that is refused: under overload the
    /// softirq starves the worker (a receive livelock). `espada pin apply` moves them off.
    #[arg(long)]
    allow_softirq_on_workers: bool,
    /// State directory: durable sequence-number reservations per outbound key
    /// (`espada.seq`, keys named by an HMAC fingerprint), so that a restart with the same
    /// static keys never repeats an AES-GCM nonce, and the lock that keeps a second gateway off
    /// it. The gateway refuses to start when it cannot write here, when the file is damaged,
    /// and, with static keys, when the directory holds no state (see --new-keys). Keep it on
    /// storage that outlives the gateway (the Dockerfile's /var/lib/espada volume).
    #[arg(long, default_value = "/var/lib/espada", value_name = "DIR")]
    state_dir: PathBuf,
    /// The outbound keys of the configuration have never sent a packet: start with an empty
    /// state directory. Without it a gateway with static keys (key files, hex keys,
    /// lab_secret) refuses an empty state directory, because it cannot know which sequence
    /// numbers, hence AES-GCM nonces, its keys already used (a lost volume, a new
    /// --state-dir, a second copy of the gateway). Give it on the very first start only, or
    /// after every outbound key has been replaced.
    #[arg(long)]
    new_keys: bool,
    /// More detail in the log (-v debug, -vv trace); RUST_LOG, when set, decides instead.
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Only warnings and errors in the log.
    #[arg(short, long, conflicts_with = "verbose")]
    quiet: bool,
    /// Log as JSON lines (one object per event, with a timestamp and a level).
    #[arg(long)]
    log_json: bool,
    /// Serve Prometheus metrics over HTTP at ADDR (`GET /metrics`), e.g. 127.0.0.1:9100.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Control socket for `espada show` (default: `[gateway] control_socket`, else
    /// /run/espada/NAME.sock); `none` serves none.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Sequence numbers reserved per SA per state-file write; a restart skips at most this many.
    #[arg(long, default_value_t = espada_dataplane::state::seqstore::DEFAULT_BLOCK, value_name = "N")]
    seq_block: u64,
}

/// A refusal to start (a bad configuration, a lock held, a state directory that cannot be
/// trusted, a socket in use): printed as one `error:` line, exit status 1. Other errors are
/// the binary's (status 2).
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// An error that refuses the start (see [`Refused`]).
fn refuse(text: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Refused(text.into()))
}

pub fn run(a: RunArgs) -> anyhow::Result<ExitCode> {
    crate::init_logs(a.verbose, a.quiet, a.log_json);
    let started = open::Opened::open(&a).and_then(|o| start::Running::start(&a, o));
    let mut g = match started {
        Ok(g) => g,
        Err(e) => {
            return match e.downcast_ref::<Refused>() {
                Some(r) => {
                    eprintln!("error: {r}");
                    Ok(ExitCode::from(1))
                }
                None => Err(e),
            }
        }
    };
    g.supervise(&a)?;
    g.finish(&a)
}
