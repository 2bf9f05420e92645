//! `espada`: a userspace, poll-mode IPsec (ESP-in-UDP, AES-GCM) gateway with per-CPU SAs.

mod cli;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// espada: a userspace, poll-mode IPsec dataplane (ESP-in-UDP tunnel mode, AES-GCM) in which
/// every worker core owns its own per-CPU SA (RFC 9611).
///
/// Red is the cleartext side, black the ESP side, as in the lab
/// `sunset — west == east — sunrise`.
#[derive(Parser)]
#[command(name = "espada", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run west and east in one process and report per-core throughput (the main demo).
    Demo(cli::demo::DemoArgs),
    /// Check or generate ESP-in-UDP known-answer vector files.
    #[command(subcommand)]
    Vectors(cli::vectors::VectorsCmd),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Demo(a) => cli::demo::run(a),
        Command::Vectors(c) => cli::vectors::run(c),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("espada: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
