//! Wireshark/tshark `esp_sa` entries that decrypt an espada gateway's ESP-in-UDP traffic.

use crate::Config;
use espada_sadb::db::SaDb;

/// `-o` options: the decode switch (and, with ESN, the ICV check off), then one `uat:esp_sa`
/// record per SA.
pub fn options(c: &Config, db: &SaDb) -> Vec<String> {
    let mut out = vec!["esp.enable_encryption_decode:TRUE".to_string()];
    if c.tunnels.iter().any(|t| t.esn) {
        out.push("esp.enable_authentication_check:FALSE".to_string());
    }
    for (ti, t) in c.tunnels.iter().enumerate() {
        let fam = if t.local.is_ipv4() { "IPv4" } else { "IPv6" };
        let tun = &db.tunnels[ti];
        for (sa, src, dst) in tun
            .outbound
            .all()
            .map(|s| (s, t.local, t.remote))
            .chain(tun.inbound.all().map(|s| (s, t.remote, t.local)))
            .chain(tun.draining.iter().map(|s| (s, t.remote, t.local)))
        {
            out.push(format!(
                "uat:esp_sa:\"{fam}\",\"{src}\",\"{dst}\",\"{:#010x}\",\"AES-GCM with 16 octet ICV [RFC4106]\",\"0x{}\",\"NULL\",\"\"",
                sa.spi,
                hex::encode(sa.key.expose_key_and_salt())
            ));
        }
    }
    out
}
