//! `espada`: a userspace, poll-mode IPsec (ESP-in-UDP, AES-GCM) gateway with per-CPU SAs.

mod cli;
pub(crate) use espada_config as config;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Large, long-lived tables (a core's SAs and key schedules, the SPD's hash tables, packet
/// pools) on transparent huge pages: see `espada_dataplane::heap::HugeAlloc`.
#[global_allocator]
static ALLOC: espada_dataplane::heap::HugeAlloc = espada_dataplane::heap::HugeAlloc;

/// espada: a userspace, poll-mode IPsec dataplane (ESP-in-UDP tunnel mode, AES-GCM) in which
/// every worker core owns its own per-CPU SA (RFC 9611).
///
/// Red is the cleartext side, black the ESP side, as in the lab
/// `sunset — west == east — sunrise`.
#[derive(Parser)]
#[command(name = "espada", version, about, long_about)]
pub(crate) struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Logs on stderr with a timestamp and a level (`tracing`): the gateway's events (start-up,
/// generation switches, reloads, lifetime and sequence-space warnings). The live table and
/// the totals stay plain output.
pub(crate) fn init_logs(verbose: u8, quiet: bool, json: bool) {
    use tracing_subscriber::EnvFilter;
    let level = match (quiet, verbose) {
        (true, _) => "warn",
        (_, 0) => "info",
        (_, 1) => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colors only on a terminal: a log file or journald gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

#[derive(Subcommand)]
enum Command {
    /// A/B against kernel XFRM in the namespace lab: the loop ceiling, the kernel halves (where the kernel has ESP) and espada side by side (docs/ab.md).
    Ab(cli::ab::AbArgs),
    /// (internal) UDP load for `espada ab`, run inside the lab namespaces.
    #[command(subcommand, hide = true)]
    AbTraffic(cli::ab::TrafficCmd),
    /// Measure per-core throughput, ceiling ratio, latency; sweep cores or flows.
    Bench(cli::bench::BenchArgs),
    /// Run a gateway on real interfaces (AF_PACKET) from a configuration file.
    Run(cli::run::RunArgs),
    /// Run west and east in one process and report per-core throughput (the main demo).
    Demo(cli::demo::DemoArgs),
    /// Validate configurations and print the SA table per core (keys redacted).
    Check(cli::check::CheckArgs),
    /// Print the `ip xfrm` commands that set up the same SAs in the Linux kernel.
    Xfrm(cli::xfrm::XfrmArgs),
    /// Print the Wireshark/tshark `esp_sa` entries that decrypt espada's traffic.
    Wireshark(cli::wireshark::WiresharkArgs),
    /// Ask a running gateway (its control socket): SAs, counters, drops, workers, neighbors,
    /// policies.
    Show(cli::show::ShowArgs),
    /// Ask a running gateway to re-read its configuration (as SIGHUP does): tunnels, keys and
    /// policies change make-before-break.
    Reload(cli::show::ReloadArgs),
    /// Zero a running gateway's counters (per worker: packets, bytes, drops by reason,
    /// handoffs, bursts), as VPP's `clear errors`. SA packet and byte counters stay: the SAs'
    /// lifetimes count on them. Prometheus sees a counter reset.
    Clear(cli::show::ReloadArgs),
    /// Watch a running gateway's events as they happen (SAs installed, rekeyed, refused,
    /// expired; reloads; acquires; neighbors), as `ip xfrm monitor` does for the kernel: one line each,
    /// or JSON with --json, until Ctrl-C.
    Monitor(cli::show::MonitorArgs),
    /// A running gateway's live view: per worker the packet and bit rates, drops, busy share
    /// and cost per packet of each stage; the busiest SAs with their rates and drops (q quits;
    /// --once prints one reading and exits).
    Top(cli::top::TopArgs),
    /// Change a running gateway's SAs: add, delete or update one, delete or re-add a tunnel,
    /// rekey lab_secret tunnels now (through its control socket, make-before-break).
    Sa(cli::sa::SaArgs),
    /// Version, git revision, features, crypto backends and DPDK version of this binary.
    Version,
    /// Shell completions on stdout (bash, zsh, fish, elvish, powershell).
    Completions(cli::meta::CompletionsArgs),
    /// Man pages for espada and every subcommand, written into a directory.
    Man(cli::meta::ManArgs),
    /// Plan, apply or check core/IRQ/flow-rule pinning for a gateway.
    #[command(subcommand)]
    Pin(cli::pin::PinCmd),
    /// Check or generate ESP-in-UDP known-answer vector files.
    #[command(subcommand)]
    Vectors(cli::vectors::VectorsCmd),
}

/// Output into a closed pipe (`espada ... | head -1`) ends the process quietly, as coreutils
/// do, instead of panicking in `println!` with exit 134.
fn restore_sigpipe() {
    // SAFETY: resetting a signal's disposition to the default before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    restore_sigpipe();
    let cli = Cli::parse();
    // `espada run` sets its own level (-v/-q/--log-json); every other command logs at info.
    if !matches!(cli.command, Command::Run(_)) {
        init_logs(0, false, false);
    }
    let r = match cli.command {
        Command::Demo(a) => cli::demo::run(a),
        Command::Bench(a) => cli::bench::run(a),
        Command::Ab(a) => cli::ab::run(a),
        Command::AbTraffic(c) => cli::ab::traffic(c),
        Command::Run(a) => cli::run::run(a),
        Command::Vectors(c) => cli::vectors::run(c),
        Command::Check(a) => cli::check::run(a),
        Command::Pin(c) => cli::pin::run(c),
        Command::Xfrm(a) => cli::xfrm::run(a),
        Command::Wireshark(a) => cli::wireshark::run(a),
        Command::Show(a) => cli::show::run(a),
        Command::Reload(a) => cli::show::reload(a),
        Command::Clear(a) => cli::show::clear(a),
        Command::Monitor(a) => cli::show::monitor(a),
        Command::Top(a) => cli::top::run(a),
        Command::Sa(a) => cli::sa::run(a),
        Command::Version => cli::meta::version(),
        Command::Completions(a) => cli::meta::completions(a),
        Command::Man(a) => cli::meta::man(a),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            // The one prefix every command's errors use.
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
