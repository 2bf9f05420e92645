//! `espada xfrm -c FILE`: the Linux `ip xfrm` commands that set up the same SAs and policies in
//! the kernel, for an A/B run against kernel XFRM (per-CPU SAs with `pcpu-num`, kernel >= 6.13,
//! iproute2 >= 7.0).

use crate::config;
use anyhow::Result;
use clap::Args;
pub use espada_config::export::xfrm::{parse_back, render, render_delete};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args)]
pub struct XfrmArgs {
    /// Configuration file.
    #[arg(short = 'c', long = "config", required_unless_present = "encap_socket")]
    config: Option<PathBuf>,
    /// Send on one SA per tunnel (the fallback SA) instead of per-CPU SAs with `pcpu-num`
    /// (kernels before 6.13, iproute2 before 7.0). The inbound SAs always cover every SPI the
    /// peer may send on, per-CPU ones included.
    #[arg(long)]
    no_pcpu: bool,
    /// Print the commands that remove these SAs and policies again (policies first; give
    /// --no-pcpu again if the setup had it).
    #[arg(long)]
    delete: bool,
    /// Instead of printing commands: hold a UDP socket on port 4500 with UDP_ENCAP_ESPINUDP
    /// until killed. The kernel decapsulates inbound ESP-in-UDP only while such a socket exists
    /// (normally the IKE daemon's); run this in the background next to the loaded SAs.
    #[arg(long)]
    encap_socket: bool,
}

pub fn run(a: XfrmArgs) -> Result<ExitCode> {
    if a.encap_socket {
        eprintln!("espada xfrm: holding UDP port 4500 with UDP_ENCAP_ESPINUDP (inbound ESP-in-UDP reaches the kernel's SAs) until killed");
        if let Err(e) = espada_dataplane::state::kernel::hold_udp_encap_socket(4500) {
            eprintln!("error: UDP port 4500: {e} (is an IKE daemon holding it already? then nothing is needed)");
            return Ok(ExitCode::from(1));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let path = a.config.expect("clap requires it");
    let c = match config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    let db = c.sadb(c.resolved_workers())?;
    for t in c.tunnels.iter().filter(|t| t.lab_rekey.is_some()) {
        eprintln!("# espada xfrm: tunnel \"{}\" has lab_rekey: espada moves to new keys and SPIs every soft_seconds and a kernel peer does not; these are the configured SAs (set lab_rekey = false on both sides to pair with the kernel)", t.name);
    }
    let out = match if a.delete {
        render_delete(&c, &db, !a.no_pcpu)
    } else {
        render(&c, &db, !a.no_pcpu)
    } {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {}: {e}", path.display());
            return Ok(ExitCode::from(1));
        }
    };
    if let Err(e) = parse_back(&out) {
        anyhow::bail!("internal error: generated an invalid ip xfrm command: {e}");
    }
    if !a.delete {
        eprintln!("# espada xfrm: the output contains keys; treat it like the key file");
    }
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}
