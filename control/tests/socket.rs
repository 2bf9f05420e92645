//! The control socket against an in-process west gateway that carried traffic: every answer
//! comes over a real Unix socket and is checked against the workers' own counters.

use espada_control::server::{ControlServer, Gateway};
use espada_control::{client, Request};
use espada_harness::pair::{lab, Pair, PairSpec};
use espada_sadb::db::SaMode;
use espada_sadb::lifetime::Lifetimes;
use std::sync::Arc;
use std::time::Instant;

/// West of the in-process pair as the control socket sees a gateway.
fn gateway(p: &Pair, cores: Vec<Option<usize>>) -> Arc<Gateway> {
    Arc::new(Gateway {
        monitor: Default::default(),
        name: "west".into(),
        version: "test".into(),
        started: Instant::now(),
        cores,
        cells: p.west.cells.clone(),
        shared: p.west.shared.clone(),
        reload: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        commands: None,
    })
}

fn req(what: &str) -> Request {
    Request::new("show", what)
}

#[test]
fn show_over_the_socket_matches_the_workers() {
    let (w, e) = lab::dbs(2, 2, SaMode::PerCpu, Lifetimes::default());
    let (ws, es) = lab::sides();
    let mut p = Pair::new(
        w,
        e,
        ws,
        es,
        PairSpec {
            workers: 2,
            size: 300,
            limit: Some(500),
            ..Default::default()
        },
    )
    .unwrap();
    p.drain();
    for wk in p.west.workers.iter_mut() {
        wk.finish(); // publish the SA counters now
    }
    let gw = gateway(&p, vec![Some(0), Some(1)]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("west.sock");
    let srv = ControlServer::start(&path, gw.clone()).unwrap();
    // A second gateway on the same socket is refused while the first serves it.
    let e = ControlServer::start(&path, gw.clone()).err().unwrap();
    assert!(e.to_string().contains("another gateway"), "{e}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // Filters (issue 27): one SPI, one tunnel, a tunnel that is not there.
    let mut f = req("sa");
    f.args = serde_json::json!({"spi": 0x1001});
    let one = client::request(&path, &f).unwrap();
    assert_eq!(one.data["sas"].as_array().unwrap().len(), 1, "{one:?}");
    f.args = serde_json::json!({"tunnel": "lab"});
    let lab = client::request(&path, &f).unwrap();
    assert_eq!(lab.data["sas"].as_array().unwrap().len(), 6, "{lab:?}");
    f.args = serde_json::json!({"tunnel": "nope"});
    let none = client::request(&path, &f).unwrap();
    assert!(none.data["sas"].as_array().unwrap().is_empty());
    let sa = client::request(&path, &req("sa")).unwrap();
    assert!(sa.ok, "{sa:?}");
    let rows = sa.data["sas"].as_array().unwrap();
    let out: Vec<_> = rows.iter().filter(|r| r["dir"] == "out").collect();
    // Fallback + two per-CPU SAs out, the same in: the per-CPU ones carried 500 each.
    assert_eq!(out.len(), 3);
    for (spi, core) in [("0x00001001", 0), ("0x00001002", 1)] {
        let r = out.iter().find(|r| r["spi"] == spi).unwrap();
        assert_eq!(r["packets"], 500, "{r}");
        assert_eq!(r["seq"], 500, "{r}");
        // The newest use on any core (issue 25 item 4: DPD needs it), in UNIX seconds.
        assert!(r["last_use"].as_u64().unwrap() > 1_700_000_000, "{r}");
        assert_eq!(r["owner_cores"], serde_json::json!([core]), "{r}");
        assert_eq!(r["cpu"], core);
    }
    assert!(
        !sa.data.to_string().contains("key"),
        "no key material in answers"
    );

    let st = client::request(&path, &req("stats")).unwrap();
    let enc: u64 = p.west.workers.iter().map(|w| w.stats().encap_packets).sum();
    assert_eq!(st.data["total"]["encap_packets"], enc);
    assert_eq!(enc, 1000);

    for what in ["errors", "workers", "neighbors", "policy"] {
        let r = client::request(&path, &req(what)).unwrap();
        assert!(r.ok, "{what}: {r:?}");
    }
    let pol = client::request(&path, &req("policy")).unwrap();
    assert!(pol.data["policies"][0]["action"]
        .as_str()
        .unwrap()
        .starts_with("protect"));
    let r = client::request(&path, &Request::new("reload", "")).unwrap();
    assert!(r.ok && gw.reload.load(std::sync::atomic::Ordering::Relaxed));
    let bad = client::request(&path, &req("nothing")).unwrap();
    assert!(!bad.ok && bad.error.unwrap().contains("one of: sa, stats"));

    // Metrics over real HTTP (curl), validated by Prometheus' own promtool, agreeing with
    // `show stats`.
    let m = espada_control::metrics::MetricsServer::start("127.0.0.1:0", gw.clone()).unwrap();
    let out = std::process::Command::new("curl")
        .args(["-sf", &format!("http://{}/metrics", m.addr())])
        .output()
        .expect("curl");
    assert!(out.status.success(), "curl: {out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let sample = |name: &str, labels: &[&str]| -> Option<f64> {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix('{')?;
            let (ls, v) = rest.split_once("} ")?;
            labels
                .iter()
                .all(|want| ls.split(',').any(|x| x == *want))
                .then(|| v.trim().parse().ok())?
        })
    };
    for w in 0..2 {
        let v = sample(
            "espada_packets_total",
            &[&format!("worker=\"{w}\""), "direction=\"encap\""],
        )
        .unwrap_or_else(|| panic!("no encap packets of worker {w} in\n{text}"));
        assert_eq!(
            v as u64, st.data["workers"][w]["encap_packets"],
            "worker {w}"
        );
    }
    // One label name per idea: the SA series say `direction` encap/decap, as the packet
    // series do, and name their tunnel.
    assert_eq!(
        sample(
            "espada_sa_packets_total",
            &[
                "worker=\"0\"",
                "spi=\"0x00001001\"",
                "direction=\"encap\"",
                "tunnel=\"lab\""
            ]
        ),
        Some(500.0),
        "{text}"
    );
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let names = l
            .split_once('{')
            .map(|(_, r)| {
                r.split(',')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, _)| k)
            })
            .into_iter()
            .flatten();
        for k in names {
            assert!(k != "dir" && k != "way", "an old label name: {l}");
        }
        if l.starts_with("espada_sa_") {
            assert!(
                !l.contains("direction=\"out\""),
                "SA series say encap/decap: {l}"
            );
        }
    }
    // The standard series a Prometheus user expects: the process collector's, build info,
    // reload state; no uptime gauge in their place.
    for name in [
        "process_start_time_seconds",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "espada_build_info",
        "espada_config_last_reload_successful",
        "espada_config_last_reload_success_timestamp_seconds",
        "espada_tunnel_sas",
        "espada_neighbors",
        "espada_worker_heartbeats_total",
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "no {name} in\n{text}"
        );
    }
    assert!(!text.contains("espada_uptime_seconds"));
    // Keepalives and TFC dummies are normal traffic: counted apart from drops.
    assert!(
        text.contains("espada_discarded_total{reason=\"keepalive\""),
        "{text}"
    );
    assert!(
        !text.contains("espada_drops_total{reason=\"keepalive\""),
        "{text}"
    );
    contrib_rules_and_dashboard_use_only_exposed_metrics(&text);
    // Issue 27: HEAD answers as GET without the body; `:PORT` listens on every address; other
    // methods on /metrics are 405.
    let head = std::process::Command::new("curl")
        .args(["-sI", &format!("http://{}/metrics", m.addr())])
        .output()
        .expect("curl");
    let h = String::from_utf8_lossy(&head.stdout);
    assert!(
        h.starts_with("HTTP/1.1 200 OK") && h.contains("version=0.0.4"),
        "{h}"
    );
    let any = espada_control::metrics::MetricsServer::start(":0", gw.clone()).unwrap();
    assert!(any.addr().ip().is_unspecified(), "{}", any.addr());
    let post = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"])
        .arg(format!("http://127.0.0.1:{}/metrics", any.addr().port()))
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&post.stdout), "405");
    if std::env::var("ESPADA_SKIP_PROMTOOL").is_ok_and(|v| v == "1") {
        eprintln!("ESPADA_SKIP_PROMTOOL=1: promtool was NOT run");
    } else {
        let mut child = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("promtool (Debian package prometheus; scripts/test installs it)");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let r = child.wait_with_output().unwrap();
        assert!(
            r.status.success(),
            "promtool: {}{}\n{text}",
            String::from_utf8_lossy(&r.stdout),
            String::from_utf8_lossy(&r.stderr)
        );
    }
    let nf = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{}/", m.addr()),
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&nf.stdout), "404");
    drop(m);

    drop(srv);
    assert!(!path.exists(), "the socket goes with the server");
    let gone = client::request(&path, &req("sa")).unwrap_err();
    assert!(gone.contains("cannot reach a gateway"), "{gone}");
}

/// Issue 24 ("also found"): a client that never sends a newline, or one that sends an endless
/// line, neither blocks other clients nor grows the gateway's heap; on both listeners.
#[test]
fn slow_and_endless_clients_do_not_block_the_others() {
    use std::io::{Read, Write};
    let (w, e) = lab::dbs(1, 1, SaMode::PerCpu, Lifetimes::default());
    let (ws, es) = lab::sides();
    let p = Pair::new(
        w,
        e,
        ws,
        es,
        PairSpec {
            workers: 1,
            size: 100,
            limit: Some(10),
            ..Default::default()
        },
    )
    .unwrap();
    let gw = gateway(&p, vec![None]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("west.sock");
    let _srv = ControlServer::start(&path, gw.clone()).unwrap();
    // Three clients that say nothing, and one that sends 8 MiB without a newline.
    let idle: Vec<_> = (0..3)
        .map(|_| std::os::unix::net::UnixStream::connect(&path).unwrap())
        .collect();
    let mut big = std::os::unix::net::UnixStream::connect(&path).unwrap();
    let flood = std::thread::spawn(move || {
        let chunk = vec![b'x'; 512 * 1024];
        for _ in 0..16 {
            if big.write_all(&chunk).is_err() {
                break;
            }
        }
        let mut answer = String::new();
        let _ = big.read_to_string(&mut answer);
        answer
    });
    // Meanwhile an ordinary request is answered.
    let r = client::request(&path, &req("stats")).unwrap();
    assert!(r.ok, "{r:?}");
    let answer = flood.join().unwrap();
    assert!(answer.contains("at most 4194304 bytes"), "{answer}");
    drop(idle);

    let m = espada_control::metrics::MetricsServer::start("127.0.0.1:0", gw.clone()).unwrap();
    let mut slow = std::net::TcpStream::connect(m.addr()).unwrap();
    slow.write_all(b"GET /metr").unwrap(); // and nothing more
    let out = std::process::Command::new("curl")
        .args(["-sf", "-m", "5", &format!("http://{}/metrics", m.addr())])
        .output()
        .expect("curl");
    assert!(out.status.success(), "a slow client blocked curl: {out:?}");
    // A request head without end is cut at the bound.
    let mut endless = std::net::TcpStream::connect(m.addr()).unwrap();
    let _ = endless.write_all(&vec![b'a'; 64 * 1024]);
    let mut rest = Vec::new();
    let _ = endless.read_to_end(&mut rest);
    drop(slow);
}

/// Issue 27: the alert rules pass `promtool check rules`, and every metric name the rules and
/// the Grafana dashboard use is in the exposition (a rename cannot leave them behind).
fn contrib_rules_and_dashboard_use_only_exposed_metrics(text: &str) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let rules = root.join("contrib/prometheus/espada-alerts.yml");
    let dash = root.join("contrib/grafana/espada-dashboard.json");
    let mut used = std::collections::BTreeSet::new();
    for f in [&rules, &dash] {
        let body = std::fs::read_to_string(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        for w in body.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if w.starts_with("espada_") || w.starts_with("process_") {
                used.insert(w.to_string());
            }
        }
    }
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&dash).unwrap())
        .expect("the dashboard is JSON");
    assert!(
        json["panels"].as_array().is_some_and(|p| p.len() >= 4),
        "panels"
    );
    assert!(used.len() >= 8, "{used:?}");
    let exposed: std::collections::BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for name in &used {
        // A histogram's or summary's sample names end in _bucket/_sum/_count: none here.
        assert!(
            exposed.contains(name.as_str()),
            "{name} is used in contrib/ but not exposed"
        );
    }
    if std::env::var("ESPADA_SKIP_PROMTOOL").is_ok_and(|v| v == "1") {
        eprintln!("ESPADA_SKIP_PROMTOOL=1: promtool check rules was NOT run");
        return;
    }
    let r = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .expect("promtool");
    assert!(
        r.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
}
