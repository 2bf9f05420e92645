//! `espada vectors check FILE` and `espada vectors gen`: known-answer vector files in the format
//! of `tests/vectors/README.md` (made by scapy, checked by a second implementation).

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use espada_crypto::{Algorithm, Backend, Cipher, KeyMaterial};
use espada_dataplane::esp::{decapsulate, encapsulate, Decap, Encap};
use espada_dataplane::{PacketBuf, PktBuf};
use espada_sadb::{InboundSa, OutboundSa, ReplayWindow, TunnelEndpoints};
use espada_wire::{ipv4, ipv6, udp};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum VectorsCmd {
    /// Decrypt every vector and compare with `inner`, re-encrypt `inner` with the same SA,
    /// sequence number and IV and compare with `esp` byte for byte, and check that negative
    /// vectors get their expected verdict. Prints one line per failing vector, then
    /// `N passed, M failed`; exits 1 if any failed.
    Check(CheckArgs),
    /// Write a vector file whose ESP packets espada made (random inner packets), for another
    /// implementation to check.
    Gen(GenArgs),
}

#[derive(Args)]
pub struct CheckArgs {
    /// The vector file (JSON).
    file: PathBuf,
    /// Crypto backend: ring, aes-gcm, aws-lc (if built), or `all` to check with each.
    #[arg(long, default_value = "all")]
    backend: String,
    /// Print a line for passing vectors too.
    #[arg(long, short)]
    verbose: bool,
}

#[derive(Args)]
pub struct GenArgs {
    /// Output file.
    #[arg(long, short)]
    out: PathBuf,
    /// Number of vectors.
    #[arg(long, default_value_t = 64)]
    count: usize,
    /// Random seed (the same seed gives the same file).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Largest inner payload in bytes (sizes are drawn from 0..=max).
    #[arg(long, default_value_t = 1500)]
    max_payload: usize,
}

#[derive(Serialize, Deserialize, Clone)]
pub struct VectorFile {
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub set: String,
    pub vectors: Vec<Vector>,
}

#[derive(Serialize, Deserialize, Clone)]
pub struct Vector {
    pub name: String,
    pub aead: String,
    pub key_salt: String,
    pub spi: u32,
    pub esn: bool,
    pub seq: u64,
    pub iv: String,
    pub outer: String,
    pub outer_src: IpAddr,
    pub outer_dst: IpAddr,
    pub udp_sport: u16,
    pub udp_dport: u16,
    pub next_header: u8,
    pub inner: String,
    pub esp: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub outer_packet: String,
    pub expect: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

pub fn run(cmd: VectorsCmd) -> Result<ExitCode> {
    match cmd {
        VectorsCmd::Check(a) => check(a),
        VectorsCmd::Gen(a) => gen(a),
    }
}

fn load(path: &PathBuf) -> Result<VectorFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read vector file {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: not a vector file in the format of tests/vectors/README.md",
            path.display()
        )
    })
}

fn decode_hex(field: &str, s: &str) -> std::result::Result<Vec<u8>, String> {
    hex::decode(s).map_err(|e| format!("field `{field}` is not hex: {e}"))
}

/// Checks one vector with one backend. `Err` carries the reason it failed.
fn check_one(v: &Vector, backend: Backend) -> std::result::Result<(), String> {
    let alg = Algorithm::from_name(&v.aead).ok_or_else(|| {
        format!(
            "unknown aead `{}` (expected aes-gcm-128 or aes-gcm-256)",
            v.aead
        )
    })?;
    let km =
        KeyMaterial::new(alg, &decode_hex("key_salt", &v.key_salt)?).map_err(|e| e.to_string())?;
    let cipher = || Cipher::new(backend, &km).map_err(|e| e.to_string());
    let iv: [u8; 8] = decode_hex("iv", &v.iv)?
        .try_into()
        .map_err(|_| "field `iv` must be 8 bytes".to_string())?;
    let inner = decode_hex("inner", &v.inner)?;
    let esp = decode_hex("esp", &v.esp)?;
    if v.seq == 0 {
        return Err("seq 0 is never valid (RFC 4303 §3.3.3)".into());
    }
    if !v.esn && v.seq > u32::MAX as u64 {
        return Err("seq above 2^32-1 needs esn".into());
    }

    // Decapsulation, with the receiver's window just below this sequence number.
    let mut isa = InboundSa::new(v.spi, cipher()?, v.esn, 4096);
    isa.window = ReplayWindow::starting_at(4096, v.esn, v.seq - 1).into();
    let mut pkt = PktBuf::from_slice(&esp);
    let verdict = match decapsulate(&mut isa, &mut pkt) {
        Decap::Inner { .. } => "accept".to_string(),
        Decap::Control => "pass:ike".to_string(),
        Decap::Drop(r) => format!("drop:{}", r.label()),
    };
    if verdict != v.expect {
        return Err(format!("expected {}, got {verdict}", v.expect));
    }
    if v.expect != "accept" {
        return Ok(());
    }
    if pkt.data() != &inner[..] {
        return Err("decrypted inner packet differs from `inner`".into());
    }

    // Encapsulation with the same SA, sequence number and IV must give the same ESP bytes.
    if v.outer_src.is_ipv4() != v.outer_dst.is_ipv4() {
        return Err("outer_src and outer_dst are of different IP versions".into());
    }
    let mut t = TunnelEndpoints::new(v.outer_src, v.outer_dst);
    t.src_port = v.udp_sport;
    t.dst_port = v.udp_dport;
    let mut osa = OutboundSa::new(v.spi, cipher()?, v.esn, t).with_last_seq(v.seq - 1);
    let _ = osa.reserve(1);
    let mut pkt = PktBuf::from_slice(&inner);
    if let Encap::Drop(r) = encapsulate(&mut osa, v.seq, &iv, &mut pkt) {
        return Err(format!("encapsulation dropped the inner packet: {r}"));
    }
    let out = pkt.data();
    let (ip_len, proto, src, dst, total) = if v.outer_src.is_ipv4() {
        let p = ipv4::Packet::new_checked(out).map_err(|e| format!("outer IPv4: {e}"))?;
        if !p.verify_checksum() {
            return Err("outer IPv4 checksum invalid".into());
        }
        (
            20,
            p.protocol(),
            IpAddr::V4(p.src_addr()),
            IpAddr::V4(p.dst_addr()),
            p.total_len() as usize,
        )
    } else {
        let p = ipv6::Packet::new_checked(out).map_err(|e| format!("outer IPv6: {e}"))?;
        (
            40,
            p.next_header(),
            IpAddr::V6(p.src_addr()),
            IpAddr::V6(p.dst_addr()),
            p.total_len(),
        )
    };
    if proto != 17 || src != v.outer_src || dst != v.outer_dst || total != out.len() {
        return Err("outer IP header fields differ (protocol, addresses or length)".into());
    }
    let u = udp::Packet::new_checked(&out[ip_len..]).map_err(|e| format!("outer UDP: {e}"))?;
    if u.src_port() != v.udp_sport || u.dst_port() != v.udp_dport {
        return Err("outer UDP ports differ".into());
    }
    if !u.verify_checksum(src, dst) {
        return Err("outer UDP checksum invalid".into());
    }
    if u.payload() != &esp[..] {
        return Err(format!(
            "re-encrypted ESP differs (got {} bytes, expected {})",
            u.payload().len(),
            esp.len()
        ));
    }
    if !v.outer_packet.is_empty() {
        let op = decode_hex("outer_packet", &v.outer_packet)?;
        if op.len() != out.len() {
            return Err("outer packet length differs from `outer_packet`".into());
        }
    }
    Ok(())
}

fn check(a: CheckArgs) -> Result<ExitCode> {
    let file = load(&a.file)?;
    let backends: Vec<Backend> = if a.backend == "all" {
        Backend::available().to_vec()
    } else {
        match Backend::from_name(&a.backend) {
            Some(b) if Backend::available().contains(&b) => vec![b],
            Some(b) => bail!("backend `{b}` is not built in (build with --features aws-lc)"),
            None => bail!(
                "unknown backend `{}` (expected ring, aes-gcm, aws-lc or all)",
                a.backend
            ),
        }
    };
    let (mut passed, mut failed) = (0usize, 0usize);
    for v in &file.vectors {
        let mut errs = Vec::new();
        for b in &backends {
            if let Err(e) = check_one(v, *b) {
                errs.push(format!("[{b}] {e}"));
            }
        }
        if errs.is_empty() {
            passed += 1;
            if a.verbose {
                println!("ok   {}", v.name);
            }
        } else {
            failed += 1;
            println!("FAIL {}: {}", v.name, errs.join("; "));
        }
    }
    println!("{passed} passed, {failed} failed");
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn random_inner(rng: &mut impl Rng, v6: bool, payload: usize) -> Vec<u8> {
    let ip = if v6 {
        udp::IpHeader::V6(ipv6::Repr {
            src: "2001:db8:a::10".parse().unwrap(),
            dst: "2001:db8:b::20".parse().unwrap(),
            next_header: 17,
            payload_len: 0,
            hop_limit: 64,
            traffic_class: rng.random::<u8>() & 0xfc,
            flow_label: rng.random::<u32>() & 0xfffff,
        })
    } else {
        udp::IpHeader::V4(ipv4::Repr {
            src: "192.0.2.10".parse().unwrap(),
            dst: "198.51.100.20".parse().unwrap(),
            protocol: 17,
            payload_len: 0,
            ttl: 64,
            tos: rng.random::<u8>() & 0xfc,
            ident: rng.random(),
            dont_frag: rng.random(),
        })
    };
    let mut data = vec![0u8; payload];
    rng.fill(&mut data[..]);
    udp::build_packet(ip, rng.random(), 5201, &data)
}

fn gen(a: GenArgs) -> Result<ExitCode> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed);
    let mut vectors = Vec::with_capacity(a.count);
    for n in 0..a.count {
        let alg = if rng.random() {
            Algorithm::AesGcm256
        } else {
            Algorithm::AesGcm128
        };
        let esn: bool = rng.random();
        let outer_v6 = rng.random_ratio(1, 4);
        let inner_v6: bool = rng.random();
        let payload = rng.random_range(0..=a.max_payload);
        let mut key = vec![0u8; alg.key_material_len()];
        rng.fill(&mut key[..]);
        let spi = rng.random_range(0x100..u32::MAX);
        let seq = if esn {
            rng.random_range(1..(1u64 << 40))
        } else {
            rng.random_range(1..=u32::MAX as u64)
        };
        let iv = espada_dataplane::esp::iv_from_seq(seq);
        let (src, dst): (IpAddr, IpAddr) = if outer_v6 {
            ("2001:db8:1::1".parse()?, "2001:db8:1::2".parse()?)
        } else {
            ("203.0.113.1".parse()?, "203.0.113.2".parse()?)
        };
        let sport = 4500 + rng.random_range(0..16u16);
        let inner = random_inner(&mut rng, inner_v6, payload);
        let km = KeyMaterial::new(alg, &key)?;
        let mut t = TunnelEndpoints::new(src, dst);
        t.src_port = sport;
        let mut sa =
            OutboundSa::new(spi, Cipher::new(Backend::Ring, &km)?, esn, t).with_last_seq(seq - 1);
        let _ = sa.reserve(1);
        let mut pkt = PktBuf::from_slice(&inner);
        if let Encap::Drop(r) = encapsulate(&mut sa, seq, &iv, &mut pkt) {
            bail!("internal error: generated packet dropped: {r}");
        }
        let outer_len = sa.tunnel.outer_len();
        vectors.push(Vector {
            name: format!(
                "espada-{n}/{}-{}-{}/{}-{payload}",
                alg.name(),
                if outer_v6 { "ipv6" } else { "ipv4" },
                if esn { "esn" } else { "seq32" },
                if inner_v6 { "ipv6" } else { "ipv4" }
            ),
            aead: alg.name().into(),
            key_salt: hex::encode(&key),
            spi,
            esn,
            seq,
            iv: hex::encode(iv),
            outer: if outer_v6 { "ipv6" } else { "ipv4" }.into(),
            outer_src: src,
            outer_dst: dst,
            udp_sport: sport,
            udp_dport: 4500,
            next_header: if inner_v6 { 41 } else { 4 },
            inner: hex::encode(&inner),
            esp: hex::encode(&pkt.data()[outer_len..]),
            outer_packet: hex::encode(pkt.data()),
            expect: "accept".into(),
            note: String::new(),
        });
    }
    let f = VectorFile {
        source: format!(
            "espada {} (vectors gen --seed {})",
            env!("CARGO_PKG_VERSION"),
            a.seed
        ),
        set: "generated".into(),
        vectors,
    };
    std::fs::write(&a.out, serde_json::to_string_pretty(&f)? + "\n")
        .with_context(|| format!("cannot write {}", a.out.display()))?;
    eprintln!("wrote {} vectors to {}", a.count, a.out.display());
    Ok(ExitCode::SUCCESS)
}
