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
    /// Directory to write espada.1 and espada-SUBCOMMAND.1 into. The configuration reference,
    /// espada.toml(5), goes beside it: into `../man5` when the directory is named `man1`
    /// (`espada man /usr/share/man/man1`), else into the same directory.
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
    let man5 = if a.dir.file_name().is_some_and(|n| n == "man1") {
        a.dir.with_file_name("man5")
    } else {
        a.dir.clone()
    };
    std::fs::create_dir_all(&man5).with_context(|| format!("cannot create {}", man5.display()))?;
    let p = man5.join("espada.toml.5");
    std::fs::write(&p, config_page(env!("CARGO_PKG_VERSION")))
        .with_context(|| format!("cannot write {}", p.display()))?;
    n += 1;
    println!("wrote {n} man pages to {}", a.dir.display());
    Ok(ExitCode::SUCCESS)
}

/// The configuration reference (configs/README.md, the one text a test holds to every field the
/// parser takes) as the man page espada.toml(5).
pub fn config_page(version: &str) -> String {
    const REFERENCE: &str = include_str!("../../configs/README.md");
    let mut out = format!(
        ".TH ESPADA.TOML 5 \"\" \"espada {version}\" \"File Formats\"\n\
         .SH NAME\nespada.toml \\- configuration of an espada IPsec gateway\n\
         .SH SYNOPSIS\n/etc/espada/\\fINAME\\fR.toml\n\
         .SH DESCRIPTION\nAn espada gateway (\\fBespada run \\-c\\fR \\fIFILE\\fR) reads one TOML file, \
         and the files its \\fBinclude\\fR list names. \\fBespada check\\fR validates it \
         (errors name the file, line and column). Sections and fields follow.\n"
    );
    let mut in_code = false;
    let mut para = false;
    for line in REFERENCE.lines().skip_while(|l| !l.starts_with("## ")) {
        if line.starts_with("```") {
            out.push_str(if in_code { ".fi\n" } else { ".PP\n.nf\n" });
            in_code = !in_code;
            continue;
        }
        if in_code {
            out.push_str(&roff_escape(line));
            out.push('\n');
            continue;
        }
        if let Some(h) = line.strip_prefix("## ") {
            out.push_str(&format!(".SH {}\n", roff_escape(&h.to_uppercase())));
            para = false;
        } else if line.trim().is_empty() {
            para = false;
        } else {
            if !para {
                out.push_str(".PP\n");
                para = true;
            }
            out.push_str(&roff_inline(line));
            out.push('\n');
        }
    }
    out.push_str(
        ".SH FILES\n/etc/espada/*.toml, /var/lib/espada (sequence-number state), \
         /run/espada/\\fINAME\\fR.sock (control socket)\n\
         .SH SEE ALSO\n\\fBespada\\fR(1), \\fBespada-run\\fR(1), \\fBespada-check\\fR(1)\n",
    );
    out
}

/// A line's text for roff: backslashes and leading dots or quotes escaped.
fn roff_escape(s: &str) -> String {
    let t = s.replace('\\', "\\e").replace('-', "\\-");
    if t.starts_with('.') || t.starts_with('\'') {
        format!("\\&{t}")
    } else {
        t
    }
}

/// A Markdown line for roff: `code` in bold.
fn roff_inline(s: &str) -> String {
    let mut out = String::new();
    for (i, part) in s.split('`').enumerate() {
        let e = roff_escape(part).trim_start_matches("\\&").to_string();
        if i % 2 == 1 {
            out.push_str(&format!("\\fB{e}\\fR"));
        } else {
            out.push_str(&e);
        }
    }
    roff_escape_lead(out)
}

fn roff_escape_lead(s: String) -> String {
    if s.starts_with('.') || s.starts_with('\'') {
        format!("\\&{s}")
    } else {
        s
    }
}
