//! Interoperability with an independent ESP implementation (scapy, installed from PyPI by
//! `scripts/test`): random inner packets (0–1500 bytes, IPv4/IPv6 inner and outer, AES-GCM-128
//! and -256, ESN on and off) encrypted by espada and decrypted by scapy, and the reverse.

use std::process::Command;

fn repo(p: &str) -> String {
    format!("{}/{p}", env!("CARGO_MANIFEST_DIR"))
}

fn python() -> String {
    std::env::var("ESPADA_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn require_scapy() {
    let ok = Command::new(python())
        .args(["-c", "import scapy.layers.ipsec"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "scapy is not importable by {}: run scripts/test (it installs scapy from PyPI) or pip install scapy",
        python()
    );
}

#[test]
fn espada_encrypts_scapy_decrypts() {
    require_scapy();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("espada.json");
    let st = Command::new(env!("CARGO_BIN_EXE_espada"))
        .args([
            "vectors",
            "gen",
            "--count",
            "96",
            "--seed",
            "2026",
            "--out",
            f.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let out = Command::new(python())
        .args([
            &repo("scripts/scapy_interop.py"),
            "check",
            f.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.trim(), "96 passed, 0 failed");
}

#[test]
fn scapy_encrypts_espada_decrypts() {
    require_scapy();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("scapy.json");
    let out = Command::new(python())
        .args([
            &repo("scripts/scapy_interop.py"),
            "gen",
            f.to_str().unwrap(),
            "--count",
            "96",
            "--seed",
            "2026",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(env!("CARGO_BIN_EXE_espada"))
        .args(["vectors", "check", f.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert_eq!(stdout.trim(), "96 passed, 0 failed");
}
