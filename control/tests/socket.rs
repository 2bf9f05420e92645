//! The control socket against an in-process west gateway that carried traffic: every answer
//! comes over a real Unix socket and is checked against the workers' own counters.

use espada_control::server::{ControlServer, Gateway};
use espada_control::{client, Request};
use espada_dataplane::pair::{lab, Pair, PairSpec};
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
    for w in 0..2 {
        let line = format!("espada_packets_total{{worker=\"{w}\",direction=\"encap\"}} ");
        let v: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .unwrap_or_else(|| panic!("no {line} in\n{text}"))
            .trim()
            .parse()
            .unwrap();
        assert_eq!(v, st.data["workers"][w]["encap_packets"], "worker {w}");
    }
    assert!(
        text.contains(
            "espada_sa_packets_total{worker=\"0\",spi=\"0x00001001\",direction=\"out\"} 500"
        ),
        "{text}"
    );
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
