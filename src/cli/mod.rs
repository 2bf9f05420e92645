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
pub mod vectors;
pub mod wireshark;
pub mod xfrm;

/// Ctrl-C ends the measurement in progress (the report still prints what was measured); a
/// second Ctrl-C exits at once (130).
pub fn catch_ctrl_c() {
    let flag = espada_dataplane::pair::interrupt_flag();
    let sig = signal_hook::consts::SIGINT;
    let _ = signal_hook::flag::register_conditional_shutdown(sig, 130, flag.clone());
    let _ = signal_hook::flag::register(sig, flag);
}
