//! `espada bench` from a fresh clone: one run with JSON, and a sweep that writes the table,
//! CSV, JSON and plots. Figures are not asserted (machines are noisy); structure and
//! accounting are.

use std::process::Command;

fn espada(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_espada"))
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
fn single_run_reports_per_core_figures_and_the_ceiling() {
    let dir = tempfile::tempdir().unwrap();
    let j = dir.path().join("out.json");
    let (code, out, err) = espada(&[
        "bench",
        "--duration",
        "0.5",
        "--size",
        "512",
        "--quiet",
        "--json",
        j.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("| ipsec | pcpu |"), "{out}");
    assert!(
        err.contains("crypto auto -> ") && err.contains("aes-gcm-128 ceiling"),
        "{err}"
    );
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&j).unwrap()).unwrap();
    assert!(v["encap"]["mpps"].as_f64().unwrap() > 0.0);
    assert_eq!(v["encap"]["per_core_mpps"].as_array().unwrap().len(), 1);
    assert!(v["ceiling"]["seal_ns"].as_f64().unwrap() > 0.0);
    assert!(v["encap_fraction_of_seal"].as_f64().unwrap() > 0.0);
    let sent = v["sent"].as_u64().unwrap();
    let received = v["received"].as_u64().unwrap();
    let dropped: u64 = v["drops"]
        .as_object()
        .unwrap()
        .values()
        .map(|x| x.as_u64().unwrap())
        .sum();
    assert!(
        sent > 0 && received + dropped == sent,
        "sent {sent} received {received} dropped {dropped}"
    );
}

#[test]
fn sweep_writes_table_csv_json_and_plots() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = espada(&[
        "bench",
        "--sweep",
        "cores",
        "--max-cores",
        "2",
        "--duration",
        "0.3",
        "--size",
        "256",
        "--rounds",
        "2",
        "--quiet",
        "--out",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains("round 1/2") && err.contains("round 2/2"),
        "{err}"
    );
    // The scaling summary: each ratio from two measurements of the same round.
    assert!(
        out.contains("ipsec pcpu, 2 cores ÷ 1 core: ")
            && out.contains("(median of 2 interleaved rounds; "),
        "{out}"
    );
    for ext in ["md", "csv", "json", "svg", "png"] {
        let f = dir.path().join(format!("sweep-cores.{ext}"));
        assert!(
            f.metadata().map(|m| m.len() > 100).unwrap_or(false),
            "{} missing or empty",
            f.display()
        );
    }
    // Issue 27: the plot says what it is (harness, host, date, commit), has the ideal-scaling
    // line, puts plain forwarding on its own axis, and ticks whole cores only.
    let svg = std::fs::read_to_string(dir.path().join("sweep-cores.svg")).unwrap();
    for text in [
        "in-process west/east pair over memory ports, 2 rounds",
        "ideal: one core",
        "plain forwarding Gbit/s",
        "(git ",
    ] {
        assert!(svg.contains(text), "{text} not in the plot");
    }
    assert!(!svg.contains(">1.5<"), "a half-core tick");
    let csv = std::fs::read_to_string(dir.path().join("sweep-cores.csv")).unwrap();
    assert_eq!(
        csv.lines().count(),
        1 + 3 * 2,
        "pcpu, shared and loop at 1 and 2 cores:\n{csv}"
    );
    // Every point was measured twice; its ratio to the same mode's one-core point is there.
    for l in csv.lines().skip(1) {
        let f: Vec<&str> = l.split(',').collect();
        assert_eq!(f[15], "2", "rounds of {l}");
        let (lo, hi): (f64, f64) = (f[16].parse().unwrap(), f[17].parse().unwrap());
        assert!(lo > 0.0 && lo <= hi, "{l}");
        let ratio: f64 = f[18].parse().unwrap();
        if f[3] == "1" {
            assert_eq!(ratio, 1.0, "{l}");
        } else {
            assert!(ratio > 0.0, "{l}");
        }
    }
    let png = std::fs::read(dir.path().join("sweep-cores.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let svg = std::fs::read_to_string(dir.path().join("sweep-cores.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("per-CPU SAs"));
}

/// Issue 26: a run over 2000 tunnels (each its own subnets, SAs and policy) accounts for every
/// packet and says what it measured.
#[test]
fn a_run_over_thousands_of_tunnels_accounts_for_every_packet() {
    let dir = tempfile::tempdir().unwrap();
    let j = dir.path().join("out.json");
    for last in [false, true] {
        let mut args = vec![
            "bench",
            "--tunnels",
            "2000",
            "--duration",
            "0.5",
            "--size",
            "64",
            "--quiet",
            "--json",
            j.to_str().unwrap(),
        ];
        if last {
            args.push("--tunnel-last");
        }
        let (code, out, err) = espada(&args);
        assert_eq!(code, 0, "{out}{err}");
        let traffic = if last { "last" } else { "spread" };
        assert!(out.contains(&format!("| 2000 ({traffic}) |")), "{out}");
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&j).unwrap()).unwrap();
        assert_eq!(
            (v["tunnels"].as_u64(), v["traffic"].as_str()),
            (Some(2000), Some(traffic))
        );
        let (sent, received) = (v["sent"].as_u64().unwrap(), v["received"].as_u64().unwrap());
        assert!(
            sent > 0 && received == sent,
            "sent {sent} received {received}: {v}"
        );
        assert!(v["drops"].as_object().unwrap().is_empty(), "{v}");
    }
}

#[test]
fn bad_options_are_refused_clearly() {
    let (code, _, err) = espada(&["bench", "--size", "10"]);
    assert_ne!(code, 0);
    assert!(err.contains("--size must be between 64 and 9000"), "{err}");
    let (_, _, err) = espada(&["bench", "--backend", "nope"]);
    assert!(
        err.contains("crypto backend `nope` is not available"),
        "{err}"
    );
    let (code, _, err) = espada(&["bench", "--rounds", "0"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("invalid value '0' for '--rounds <ROUNDS>'"),
        "{err}"
    );
    let (code, _, err) = espada(&["bench", "--layout", "one-core", "--rounds", "3"]);
    assert_ne!(code, 0);
    assert!(err.contains("no --sweep, --rounds"), "{err}");
    let (code, _, err) = espada(&["bench", "--tunnels", "20000"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("invalid value '20000' for '--tunnels <TUNNELS>'"),
        "{err}"
    );
    let (_, _, err) = espada(&["bench", "--sweep", "moons"]);
    assert!(
        err.contains("invalid value 'moons' for '--sweep <SWEEP>'")
            && err.contains("[possible values: cores, flows, tunnels]"),
        "{err}"
    );
}

#[test]
fn an_unwritable_output_is_refused_before_anything_is_measured() {
    let (code, _, err) = espada(&["bench", "--duration", "30", "--json", "/nonexistent/b.json"]);
    assert_ne!(code, 0);
    assert!(err.contains("cannot write /nonexistent/b.json"), "{err}");
    assert!(
        !err.contains("measuring"),
        "refused before measuring: {err}"
    );
    let (code, _, err) = espada(&["demo", "--duration", "30", "--json", "/nonexistent/d.json"]);
    assert_ne!(code, 0);
    assert!(err.contains("cannot write /nonexistent/d.json"), "{err}");
    assert!(
        !err.contains("sunset sent"),
        "refused before running: {err}"
    );
}

/// Issue 27 paper cut: Ctrl-C in `espada demo` threw the whole run away. Now the run ends at
/// once and the report prints what was measured until then.
#[test]
fn ctrl_c_in_demo_reports_what_was_measured() {
    let child = Command::new(env!("CARGO_BIN_EXE_espada"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["demo", "--duration", "120", "--cores", "1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(4));
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("interrupted after") && stdout.contains("(Ctrl-C)"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("sunrise received"), "{stdout}");
    assert!(out.status.success(), "{stdout}");
}
