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
pub mod vectors;
pub mod wireshark;
pub mod xfrm;
