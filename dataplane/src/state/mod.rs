//! What a gateway keeps beside its packets: the durable sequence-number state and the
//! per-interface instance locks (`seqstore`), and the kernel socket a gateway holds next to the
//! Linux kernel's own IPsec (`kernel`). Nothing here runs per packet.

pub mod kernel;
pub mod seqstore;
