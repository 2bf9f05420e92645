//! One module per subcommand.

pub mod ab;
pub mod bench;
pub mod check;
pub mod demo;
pub mod meta;
pub mod pin;
pub mod run;
pub mod sa;
pub mod show;
pub mod table;
pub mod top;
pub mod vectors;
pub mod wireshark;
pub mod xfrm;

/// Ctrl-C ends the measurement in progress (the report still prints what was measured); a
/// second Ctrl-C exits at once (130).
pub fn catch_ctrl_c() {
    let flag = espada_harness::pair::interrupt_flag();
    let sig = signal_hook::consts::SIGINT;
    let _ = signal_hook::flag::register_conditional_shutdown(sig, 130, flag.clone());
    let _ = signal_hook::flag::register(sig, flag);
}

/// Where a measurement writes its results when `--out` is not given: a directory of its own
/// per run under `$XDG_STATE_HOME/espada` (`~/.local/state/espada`), never the directory the
/// command runs in (a source tree). `kind`: `bench`, `ab`.
pub(crate) fn results_dir(kind: &str) -> std::path::PathBuf {
    use std::path::PathBuf;
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("espada").join(format!(
        "{kind}-{}",
        chrono::Local::now().format("%Y%m%d-%H%M%S")
    ))
}
