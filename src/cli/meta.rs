//! `espada version`, `espada completions SHELL`, `espada man DIR`: what this binary is, and
//! the shell completions and man pages generated from the same clap definitions as `--help`.

use anyhow::{Context, Result};
use clap::{Args, CommandFactory};
use std::path::PathBuf;
use std::process::ExitCode;

/// The version line, the features built in, the crypto backends and the DPDK it links.
pub fn version() -> Result<ExitCode> {
    println!(
        "espada {} (git {})",
        env!("CARGO_PKG_VERSION"),
        option_env!("ESPADA_GIT_HASH").unwrap_or("unknown")
    );
    let mut features = Vec::new();
    if cfg!(feature = "dpdk") {
        features.push("dpdk");
    }
    if cfg!(feature = "af-xdp") {
        features.push("af-xdp");
    }
    if cfg!(feature = "ipsec-mb") {
        features.push("ipsec-mb");
    }
    if cfg!(feature = "aws-lc") {
        features.push("aws-lc");
    }
    println!(
        "features: {}",
        if features.is_empty() {
            "none (memory, pcap and AF_PACKET ports; ring and aes-gcm crypto)".to_string()
        } else {
            features.join(", ")
        }
    );
    println!(
        "crypto backends: {}",
        espada_crypto::Backend::available()
            .iter()
            .map(|b| b.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "DPDK: {}",
        option_env!("ESPADA_DPDK_VERSION").unwrap_or("not built in")
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

/// Completions for `shell` on stdout.
pub fn completions(a: CompletionsArgs) -> Result<ExitCode> {
    let mut cmd = crate::Cli::command();
    clap_complete::generate(a.shell, &mut cmd, "espada", &mut std::io::stdout());
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct ManArgs {
    /// Directory to write espada.1 and espada-SUBCOMMAND.1 into.
    #[arg(default_value = "man")]
    dir: PathBuf,
}

/// Man pages for espada and each subcommand.
pub fn man(a: ManArgs) -> Result<ExitCode> {
    std::fs::create_dir_all(&a.dir)
        .with_context(|| format!("cannot create {}", a.dir.display()))?;
    let cmd = crate::Cli::command();
    let mut n = 0;
    let mut write = |c: &clap::Command, name: String| -> Result<()> {
        let mut buf = Vec::new();
        let static_name: &'static str = Box::leak(name.clone().into_boxed_str());
        clap_mangen::Man::new(c.clone().name(static_name)).render(&mut buf)?;
        let p = a.dir.join(format!("{name}.1"));
        std::fs::write(&p, buf).with_context(|| format!("cannot write {}", p.display()))?;
        n += 1;
        Ok(())
    };
    write(&cmd, "espada".into())?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write(sub, format!("espada-{}", sub.get_name()))?;
    }
    println!("wrote {n} man pages to {}", a.dir.display());
    Ok(ExitCode::SUCCESS)
}
