//! The same SAs for other implementations: `ip xfrm` commands for the Linux kernel, `esp_sa`
//! entries for Wireshark. These print keys on purpose; the CLI says so.

pub mod wireshark;
pub mod xfrm;
