//! `espada vectors check` on the independent vector file, on broken files, and on a file whose
//! vectors were tampered with (the checker must be able to fail).

use std::process::Command;

fn espada() -> Command {
    Command::new(env!("CARGO_BIN_EXE_espada"))
}

fn repo(p: &str) -> String {
    format!("{}/{p}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn independent_vectors_all_pass() {
    let out = espada()
        .args([
            "vectors",
            "check",
            &repo("tests/vectors/esp-in-udp-gcm.json"),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert_eq!(stdout.trim(), "58 passed, 0 failed");
}

#[test]
fn shared_vectors_when_present() {
    // CI lays ../shared beside the clone; use the original file there when it exists.
    let shared = repo("../shared/vectors/esp-in-udp-gcm.json");
    if !std::path::Path::new(&shared).exists() {
        eprintln!("no ../shared/vectors beside the repository; the in-tree copy is checked above");
        return;
    }
    let out = espada()
        .args(["vectors", "check", &shared])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).ends_with("58 passed, 0 failed\n"));
}

#[test]
fn tampered_vectors_fail_one_line_each() {
    let text = std::fs::read_to_string(repo("tests/vectors/esp-in-udp-gcm.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let vs = v["vectors"].as_array_mut().unwrap();
    // 1: wrong expected inner packet; 2: wrong expectation on a negative case; 3: wrong ESP bytes.
    vs[0]["inner"] =
        serde_json::Value::String(vs[0]["inner"].as_str().unwrap().replacen("45", "46", 1));
    let last = vs.len() - 1;
    vs[last]["expect"] = "accept".into();
    let esp = vs[5]["esp"].as_str().unwrap().to_string();
    vs[5]["esp"] = format!("{}00", &esp[..esp.len() - 2]).into();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.json");
    std::fs::write(&f, serde_json::to_string(&v).unwrap()).unwrap();
    let out = espada()
        .args(["vectors", "check", f.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("FAIL ")).count(),
        3,
        "{stdout}"
    );
    assert!(
        stdout.trim_end().ends_with("55 passed, 3 failed"),
        "{stdout}"
    );
}

#[test]
fn broken_file_gets_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("broken.json");
    std::fs::write(&f, "{\n \"vectors\": [ {\"name\": 3} ]\n}\n").unwrap();
    let out = espada()
        .args(["vectors", "check", f.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains("broken.json") && stderr.contains("line 2"),
        "{stderr}"
    );
    let out = espada()
        .args(["vectors", "check", "/nonexistent/v.json"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read vector file"));
}

#[test]
fn generated_vectors_check_with_espada() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("gen.json");
    let st = espada()
        .args([
            "vectors",
            "gen",
            "--count",
            "40",
            "--seed",
            "7",
            "--out",
            f.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let out = espada()
        .args(["vectors", "check", f.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "40 passed, 0 failed"
    );
}

#[test]
fn a_closed_pipe_ends_the_output_quietly() {
    // `espada vectors check -v FILE | head -1`: the reader goes away after one line. espada
    // used to panic in println! (exit 134); now it ends on SIGPIPE as coreutils do.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "'{}' vectors check -v '{}' | head -1; echo \"status ${{PIPESTATUS:-}}\"",
            env!("CARGO_BIN_EXE_espada"),
            repo("tests/vectors/esp-in-udp-gcm.json")
        ))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("Broken pipe"), "{stderr}");
    let status = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "'{}' vectors check -v '{}' | head -1 >/dev/null; echo ${{PIPESTATUS[0]}}",
            env!("CARGO_BIN_EXE_espada"),
            repo("tests/vectors/esp-in-udp-gcm.json")
        ))
        .output()
        .unwrap();
    let code = String::from_utf8_lossy(&status.stdout).trim().to_string();
    // 141 = 128 + SIGPIPE, like `yes | head -1`; never 134 (abort after a panic).
    assert!(code == "141" || code == "0", "exit status {code}");
}
