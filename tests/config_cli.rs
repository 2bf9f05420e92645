//! `espada check`, `espada xfrm` and `espada wireshark` on the lab configurations and on broken
//! ones, as a new user would meet them.

use std::process::Command;

fn espada(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_espada"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_accepts_both_lab_configs() {
    let (code, out, err) = espada(&[
        "check",
        "-c",
        "configs/west.toml",
        "-c",
        "configs/east.toml",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("configs/west.toml + configs/east.toml OK (mirror images of each other)"));
    assert!(
        out.contains("0  out  0x00001001   4501->4500  per-CPU SA 0"),
        "{out}"
    );
    assert!(
        out.contains("1  in   0x00001002   4502->4500  peer's per-CPU SA 1"),
        "{out}"
    );
    assert!(out.contains("(redacted)"));
    // No key material in the output: compare with what xfrm prints (which must contain keys).
    let (_, xfrm, _) = espada(&["xfrm", "-c", "configs/west.toml"]);
    let key = xfrm
        .split("0x")
        .nth(2)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .to_string();
    assert_eq!(key.len(), 40);
    assert!(!out.contains(&key));
}

#[test]
fn check_reports_a_mirror_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let east =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/configs/east.toml")).unwrap();
    let f = dir.path().join("east.toml");
    std::fs::write(
        &f,
        east.replace(
            "lab_secret = \"espada-lab-secret-change-me\"",
            "lab_secret = \"another-secret\"",
        ),
    )
    .unwrap();
    let (code, _, err) = espada(&[
        "check",
        "-c",
        "configs/west.toml",
        "-c",
        f.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("keys differ for at least one SPI"), "{err}");
}

#[test]
fn broken_configs_get_one_clear_message_each() {
    let dir = tempfile::tempdir().unwrap();
    let west =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/configs/west.toml")).unwrap();
    for (what, from, to, expect) in [
        (
            "typo",
            "replay_window = 4096",
            "replay_windw = 4096",
            ":28:1: unknown field `replay_windw`",
        ),
        (
            "short key",
            "lab_secret = \"espada-lab-secret-change-me\"",
            "lab_rekey = false\n[tunnel.keys]\n\"0x1000\" = \"0011\"",
            "key for SPI 0x00001000: aes-gcm-128 keying material must be 20 bytes",
        ),
        (
            "duplicate SPI",
            "in_spi = 0x2000 ",
            "in_spi = 0x1001 ",
            ":33:10: duplicate SPI 0x00001001",
        ),
    ] {
        let f = dir.path().join(format!("{}.toml", what.replace(' ', "-")));
        // (The lab_rekey line would land in a [tunnel.keys] table some cases add.)
        let base = west.replace("lab_rekey = true", "");
        std::fs::write(&f, base.replace(from, to)).unwrap();
        let (code, out, err) = espada(&["check", "-c", f.to_str().unwrap()]);
        assert_eq!(code, 1, "{what}: {out}{err}");
        assert_eq!(err.lines().count(), 1, "{what}: one message: {err}");
        assert!(
            err.starts_with(&format!("error: {}:", f.display())),
            "{what}: names the file: {err}"
        );
        assert!(err.contains(expect), "{what}: {err}");
        assert!(out.is_empty());
    }
}

#[test]
fn xfrm_output_is_pinned_and_parses() {
    for gw in ["west", "east"] {
        let (code, out, err) = espada(&["xfrm", "-c", &format!("configs/{gw}.toml")]);
        assert_eq!(code, 0, "{err}");
        let golden = std::fs::read_to_string(format!(
            "{}/tests/golden/{gw}.xfrm",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        assert_eq!(
            out, golden,
            "espada xfrm -c configs/{gw}.toml changed: update tests/golden/{gw}.xfrm if intended"
        );
        assert!(err.contains("contains keys"));
    }
    let (_, out, _) = espada(&["xfrm", "-c", "configs/west.toml"]);
    assert_eq!(
        out.lines()
            .filter(|l| l.starts_with("ip xfrm state") && l.contains("pcpu-num"))
            .count(),
        2,
        "our per-CPU SAs carry pcpu-num (and dir out); inbound SAs need none"
    );
    assert_eq!(
        out.lines()
            .filter(|l| l.starts_with("ip xfrm state") && !l.contains("pcpu-num"))
            .count(),
        4,
        "the fallback SA and every inbound SA do not"
    );
    let (_, out, _) = espada(&["xfrm", "-c", "configs/west.toml", "--no-pcpu"]);
    assert!(!out
        .lines()
        .any(|l| l.starts_with("ip xfrm") && l.contains("pcpu-num")));
    // One SA to send on, and every SPI the peer may send on (its per-CPU SAs included).
    assert_eq!(
        out.lines()
            .filter(|l| l.starts_with("ip xfrm state"))
            .count(),
        4
    );
}

#[test]
fn wireshark_entries_cover_every_sa() {
    let (code, out, _) = espada(&["wireshark", "-c", "configs/west.toml", "--options-only"]);
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "esp.enable_encryption_decode:TRUE");
    // ESN is on: Wireshark's ICV check (blind to the ESN high bits) is turned off.
    assert_eq!(lines[1], "esp.enable_authentication_check:FALSE");
    // lab_rekey: the 3 SAs out and in of the current generation, and the 3 in of the
    // generations before and after (accepted during a switch).
    assert_eq!(lines.len(), 2 + 3 + 3 + 6);
    assert!(
        lines[3].starts_with("uat:esp_sa:\"IPv4\",\"192.168.100.1\",\"192.168.100.2\",\"0x00"),
        "{}",
        lines[3]
    );
    assert!(
        lines[3].contains("1001\",\"AES-GCM with 16 octet ICV [RFC4106]\",\"0x"),
        "{}",
        lines[3]
    );
}

/// Issue 27 paper cut: `pin check` exited 0 with warnings; `--strict` makes them fail.
#[test]
fn pin_check_strict_fails_on_warnings() {
    let (code, out, err) = espada(&["pin", "check", "-c", "configs/west.toml"]);
    // This host has no west-red: a warning, not a failure.
    assert!(
        out.contains("warn west-red: not present on this host"),
        "{out}{err}"
    );
    if out.lines().any(|l| l.starts_with("bad")) {
        assert_eq!(code, 1);
        return;
    }
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, _) = espada(&["pin", "check", "-c", "configs/west.toml", "--strict"]);
    assert_eq!(code, 1);
}

#[test]
fn pin_plan_on_this_host_explains_what_is_missing() {
    let (code, out, err) = espada(&["pin", "plan", "-c", "configs/west.toml"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("#!/bin/sh\n# espada pinning plan for gateway \"west\""),
        "{out}"
    );
    assert!(
        out.contains("# NOTE: interface west-red does not exist on this host"),
        "{out}"
    );
    assert!(out.contains("no flow rules; espada hands packets to the owning core in software"));
    assert!(
        out.contains("#   in       1  0x00002002       4502"),
        "{out}"
    );
    let (code, out, _) = espada(&["pin", "plan", "-c", "configs/west.toml", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["sas"].as_array().unwrap().len(), 4);
    // A root without sysfs is a clear error, not a panic.
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = espada(&[
        "pin",
        "plan",
        "-c",
        "configs/west.toml",
        "--root",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("reading the host under") && err.contains("sys/devices/system/cpu/online"),
        "{err}"
    );
}

/// `espada sa batch`: a bad line is refused with its file and line before anything is sent;
/// a key file others can read is refused; errors carry one prefix (`error:`, issue 27).
#[test]
fn sa_batch_checks_its_file_before_sending() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("b.jsonl");
    std::fs::write(
        &f,
        "{\"what\":\"add\",\"args\":{\"tunnel\":\"t\",\"dir\":\"in\",\"spi\":4096,\"key\":\"00\"}}\n# a comment\n{\"what\":\"reload\"}\n",
    )
    .unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    let fs = f.to_str().unwrap();
    let (code, _, err) = espada(&["sa", "batch", fs, "--socket", "/nonexistent.sock"]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with("error: ")
            && err.contains("b.jsonl:3: \"what\" must be add, del, update or rekey"),
        "{err}"
    );
    std::fs::write(&f, "{\"what\":\"del\",\"args\":{\"spi\":4096}}\n").unwrap();
    let (code, _, err) = espada(&["sa", "batch", fs, "--socket", "/nonexistent.sock"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.starts_with("error: cannot reach a gateway on /nonexistent.sock"),
        "{err}"
    );
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, _, err) = espada(&["sa", "batch", fs, "--socket", "/nonexistent.sock"]);
    assert_eq!(code, 1);
    assert!(err.contains("readable by others"), "{err}");
}

/// `espada check --shell`: what scripts/lab reads instead of parsing TOML with awk.
#[test]
fn check_shell_prints_the_ports_as_assignments() {
    let (code, out, err) = espada(&["check", "-c", "configs/lab/west-dual.toml", "--shell"]);
    assert_eq!(code, 0, "{err}");
    for want in [
        "gateway_name='west'",
        "red_interface='west-red'",
        "red_address='10.1.0.1/24'",
        "black_mtu='1500'",
        "red_address6='fd00:1::1/64'",
    ] {
        assert!(out.lines().any(|l| l == want), "{want} not in\n{out}");
    }
}

/// Issue 27 paper cut: errors came with two prefixes (`error:` and `espada: error:`). Every
/// command's error starts with `error: ` now, whichever part of the program found it.
#[test]
fn every_error_has_one_prefix() {
    let cases: [&[&str]; 6] = [
        &["check", "-c", "/nonexistent/west.toml"],
        &["show", "sa"],
        &["show", "sa", "--socket", "/nonexistent/west.sock"],
        &["top", "--once", "--socket", "/nonexistent/west.sock"],
        &["reload", "--socket", "/nonexistent/west.sock"],
        &[
            "sa",
            "del",
            "--spi",
            "0x1000",
            "--socket",
            "/nonexistent/west.sock",
        ],
    ];
    for args in cases {
        let (code, _, err) = espada(args);
        assert_ne!(code, 0, "{args:?}");
        assert!(err.starts_with("error: "), "{args:?}: {err}");
        assert!(!err.contains("espada: error"), "{args:?}: {err}");
    }
}
