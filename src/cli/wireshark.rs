//! `espada wireshark -c FILE`: the `esp_sa` UAT entries that let Wireshark or tshark decrypt
//! espada's ESP-in-UDP traffic.

use crate::config;
use anyhow::Result;
use clap::Args;
use espada_config::export::wireshark::options;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args)]
pub struct WiresharkArgs {
    /// Configuration file.
    #[arg(short = 'c', long = "config")]
    config: PathBuf,
    /// Print only the `-o` options, one per line (for scripts), not the commented command.
    #[arg(long)]
    options_only: bool,
}

pub fn run(a: WiresharkArgs) -> Result<ExitCode> {
    let c = match config::load(&a.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    // What a running gateway uses now: with lab_rekey, the current generations (the entries
    // change every soft_seconds).
    let db = c.sadb_at(c.resolved_workers(), Some(config::unix_now()))?;
    if c.tunnels.iter().any(|t| t.lab_rekey.is_some()) {
        eprintln!("# espada wireshark: lab_rekey is on: these entries cover the generations in use now (they change every soft_seconds)");
    }
    let opts = options(&c, &db);
    if c.tunnels.iter().any(|t| t.esn) {
        eprintln!("# espada wireshark: ESN is on: Wireshark leaves the ESN high bits out of the AES-GCM ICV check (wireshark issue 19658), so it would flag every ICV as incorrect although it decrypts correctly; the options turn its ICV check off (esp.enable_authentication_check:FALSE)");
    }
    if a.options_only {
        eprintln!("# espada wireshark: the output contains keys");
        for o in opts {
            println!("{o}");
        }
    } else {
        eprintln!("# espada wireshark: the output contains keys");
        println!(
            "# tshark options to decrypt gateway \"{}\" traffic (both directions, every SA):",
            c.name
        );
        let mut cmd = String::from("tshark");
        for o in &opts {
            let _ = write!(
                cmd,
                " \\\n  -o '{}'",
                o.trim_start_matches("-o ").trim_matches('\'')
            );
        }
        println!("{cmd} \\\n  -r capture.pcap");
    }
    Ok(ExitCode::SUCCESS)
}
