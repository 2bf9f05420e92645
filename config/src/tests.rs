use super::*;

fn p(text: &str) -> Result<Config, ConfigError> {
    parse(Path::new("test.toml"), text)
}

const MIN: &str = r#"
[gateway]
name = "west"
workers = 2

[[tunnel]]
name = "t"
local = "192.168.100.1"
remote = "192.168.100.2"
local_subnets = ["10.1.0.0/24"]
remote_subnets = ["10.2.0.0/24"]
out_spi = 0x1000
in_spi = 0x2000
lab_secret = "0123456789"
"#;

#[test]
fn lab_configs_load_and_mirror() {
    let root = &Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let w = load(&root.join("configs/west.toml")).unwrap();
    let e = load(&root.join("configs/east.toml")).unwrap();
    assert!(
        w.mirror_mismatches(&e).is_empty(),
        "{:?}",
        w.mirror_mismatches(&e)
    );
    assert!(e.mirror_mismatches(&w).is_empty());
    let t = &w.tunnels[0];
    assert_eq!(
        (
            t.out_spi_of(Some(1)),
            t.out_port_of(Some(1)),
            t.out_port_of(None)
        ),
        (0x1002, 4502, 4500)
    );
    // The keys agree between the two sides: west's outbound SA is east's inbound SA.
    assert_eq!(w.tunnels[0].keys[&0x1001], e.tunnels[0].keys[&0x1001]);
    let db = w.sadb(2).unwrap();
    assert_eq!(db.tunnels[0].outbound.per_cpu.len(), 2);
    assert_eq!(db.spd.policies.len(), 1);
}

#[test]
fn minimal_config_defaults() {
    let c = p(MIN).unwrap();
    let t = &c.tunnels[0];
    assert_eq!(
        (t.cipher, t.esn, t.replay_window, t.pcpu, t.ttl, t.df),
        (Algorithm::AesGcm128, true, 4096, 2, 64, DfMode::Set)
    );
    assert_eq!(c.sa_mode, SaMode::PerCpu);
    assert_eq!(c.crypto, None, "auto by default");
    assert!(Backend::available().contains(&c.backend()));
}

fn err(text: &str) -> String {
    p(text).unwrap_err().to_string()
}

#[test]
fn typo_in_a_field_names_the_line() {
    let e = err(&MIN
        .replace("replay_window", "x")
        .replace("lab_secret", "lab_secert"));
    assert!(
        e.starts_with("test.toml:14:1: unknown field `lab_secert`"),
        "{e}"
    );
    assert!(e.contains("expected one of"), "{e}");
    assert!(e.contains("(did you mean `lab_secret`?)"), "{e}");
    // Nothing close: no guess.
    let e = err(&MIN.replace("lab_secret", "completely_else"));
    assert!(!e.contains("did you mean"), "{e}");
}

#[test]
fn short_key_names_the_spi_and_line() {
    let text = MIN.replace(
        "lab_secret = \"0123456789\"",
        "[tunnel.keys]\n\"0x1000\" = \"00112233\"",
    );
    let e = err(&text);
    assert!(e.starts_with("test.toml:14:1:"), "{e}");
    assert!(
        e.contains("key for SPI 0x00001000") && e.contains("must be 20 bytes"),
        "{e}"
    );
    assert!(
        !e.contains("00112233"),
        "the key itself is never echoed: {e}"
    );
}

#[test]
fn duplicate_spi_between_tunnels() {
    let mut text = MIN.to_string();
    text.push_str(
        &MIN[MIN.find("[[tunnel]]").unwrap()..]
            .replace("name = \"t\"", "name = \"u\"")
            .replace("in_spi = 0x2000", "in_spi = 0x2001"),
    );
    let e = err(&text);
    assert!(
        e.contains(
            "test.toml:22:10: duplicate SPI 0x00002001: already used by the tunnel at line 13"
        ),
        "{e}"
    );
}

#[test]
fn window_out_of_range_and_bad_prefix() {
    let e = err(&MIN.replace("in_spi = 0x2000", "in_spi = 0x2000\nreplay_window = 100000"));
    assert!(
        e.contains("test.toml:14:17: replay_window must be between 64 and 65536, got 100000"),
        "{e}"
    );
    let e = err(&MIN.replace("\"10.2.0.0/24\"", "\"10.2.0.1/24\""));
    assert!(e.contains("test.toml:11:19: remote_subnets: `10.2.0.1/24` has host bits set; did you mean 10.2.0.0/24?"), "{e}");
    let e = err(&MIN.replace("\"10.2.0.0/24\"", "\"10.2.0/24\""));
    assert!(e.contains("is not a prefix"), "{e}");
}

#[test]
fn other_mistakes_get_one_clear_line() {
    assert!(err(&MIN.replace("0123456789", "short"))
        .contains("lab_secret must be at least 8 characters"));
    assert!(
        err(&MIN.replace("local = \"192.168.100.1\"", "local = \"192.168.100.300\""))
            .contains("is not an IPv4 or IPv6 address")
    );
    assert!(
        err(&MIN.replace("remote = \"192.168.100.2\"", "remote = \"2001:db8::2\""))
            .contains("not of the same IP version")
    );
    assert!(
        err(&MIN.replace("workers = 2", "workers = 2\nsa_mode = \"percpu\""))
            .contains("sa_mode must be \"pcpu\" or \"shared\"")
    );
    assert!(
        err(&MIN.replace("in_spi = 0x2000", "in_spi = 0x2000\ncipher = \"aes-cbc\""))
            .contains("cipher must be")
    );
    assert!(err(&MIN.replace("lab_secret = \"0123456789\"", ""))
        .contains("give exactly one key source"));
    assert!(err("[gateway]\nname = \"x\"\n").contains("no [[tunnel]]"));
    assert!(err("[gateway\n").starts_with("test.toml:1:"));
    assert!(
        err(&MIN.replace("workers = 2", "workers = 2\ncores = \"0-1\""))
            .contains("either workers or cores")
    );
    assert!(
        err(&MIN.replace("in_spi = 0x2000", "in_spi = 0x2000\nbase_port = 4499"))
            .contains("include the fallback port 4500")
    );
}

#[test]
fn overlapping_policies_with_conflicting_actions() {
    let policies = r#"
[[policy]]
name = "all"
src = "10.0.0.0/8"
dst = "10.0.0.0/8"
action = "discard"

[[policy]]
name = "lab"
src = "10.1.0.0/24"
dst = "10.2.0.0/24"
action = "protect"
tunnel = "t"
"#;
    let e = err(&format!("{MIN}{policies}"));
    assert!(
        e.contains("policy \"lab\"")
            && e.contains("overlaps policy \"all\"")
            && e.contains("put the narrower policy first"),
        "{e}"
    );
    // The narrower one first is the intended "exception" pattern and is accepted.
    let swapped = format!(
        "{MIN}{}{}",
        &policies[policies.find("[[policy]]\nname = \"lab\"").unwrap()..],
        &policies[..policies.find("[[policy]]\nname = \"lab\"").unwrap()]
    );
    let c = p(&swapped).unwrap();
    assert_eq!(c.spd.policies.len(), 2);
    assert!(err(&format!("{MIN}[[policy]]\nname = \"x\"\nsrc = \"10.1.0.0/24\"\ndst = \"10.2.0.0/24\"\naction = \"protect\"\ntunnel = \"nope\"\n")).contains("no tunnel named \"nope\""));
}

#[test]
fn mirror_mismatch_is_reported() {
    let root = &Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let w = load(&root.join("configs/west.toml")).unwrap();
    let text = std::fs::read_to_string(root.join("configs/east.toml"))
        .unwrap()
        .replace("in_spi = 0x1000", "in_spi = 0x1100");
    let e = parse(Path::new("east.toml"), &text).unwrap();
    let m = w.mirror_mismatches(&e);
    assert!(
        m.iter()
            .any(|x| x.contains("out_spi 0x1000/in_spi 0x2000 do not mirror")),
        "{m:?}"
    );
}

#[cfg(unix)]
#[test]
fn key_file_must_be_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let kf = dir.path().join("t.keys");
    let mut keys = String::new();
    for spi in [0x1000, 0x1001, 0x1002, 0x2000, 0x2001, 0x2002] {
        // One key per SA (a shared key is refused: see below).
        keys.push_str(&format!(
            "\"{spi:#010x}\" = \"{}{spi:08x}\"\n",
            "ab".repeat(16)
        ));
    }
    std::fs::write(&kf, keys).unwrap();
    std::fs::set_permissions(&kf, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = dir.path().join("gw.toml");
    let text = MIN.replace("lab_secret = \"0123456789\"", "key_file = \"t.keys\"");
    std::fs::write(&cfg, &text).unwrap();
    let e = load(&cfg).unwrap_err().to_string();
    assert!(
        e.contains("readable by others (mode 644); run chmod 600"),
        "{e}"
    );
    std::fs::set_permissions(&kf, std::fs::Permissions::from_mode(0o600)).unwrap();
    let c = load(&cfg).unwrap();
    assert_eq!(c.tunnels[0].key_source, "key file");
    assert_eq!(c.tunnels[0].keys.len(), 6);
}

#[test]
fn one_key_for_two_sas_is_refused() {
    // Issue 12 item 5: two SAs with one key repeat nonces from their first packet.
    let k = |n: u8| format!("{:02x}", n).repeat(20);
    let mut keys = String::from("[tunnel.keys]\n");
    for (i, spi) in ["0x1000", "0x1001", "0x1002", "0x2000", "0x2001", "0x2002"]
        .iter()
        .enumerate()
    {
        // 0x2001 gets 0x1001's key.
        let n = if *spi == "0x2001" { 1 } else { i as u8 };
        keys.push_str(&format!("\"{spi}\" = \"{}\"\n", k(n + 1)));
    }
    let text = MIN.replace("lab_secret = \"0123456789\"", &keys);
    let e = err(&text);
    assert!(e.starts_with("test.toml:"), "{e}");
    assert!(
        e.contains(
            "SPIs 0x00001001 (tunnel \"t\") and 0x00002001 (tunnel \"t\") have the same key"
        ),
        "{e}"
    );
    assert!(!e.contains(&k(2)), "the key itself is never echoed: {e}");
    // Distinct keys load.
    let ok = MIN.replace(
        "lab_secret = \"0123456789\"",
        &keys.replace(
            &format!("\"0x2001\" = \"{}\"", k(2)),
            &format!("\"0x2001\" = \"{}\"", k(9)),
        ),
    );
    p(&ok).unwrap();
}

#[test]
fn an_empty_core_list_is_refused() {
    let e = err(&MIN.replace("workers = 2", "cores = \"\""));
    assert!(e.starts_with("test.toml:4:"), "{e}");
    assert!(e.contains("cores lists no core"), "{e}");
}

#[test]
fn an_endless_configuration_is_refused() {
    let e = load(Path::new("/dev/zero")).unwrap_err().to_string();
    assert!(e.contains("larger than 64 MiB"), "{e}");
}

#[test]
fn keys_in_a_configuration_others_can_read_are_refused_and_lab_secrets_flagged() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gw.toml");
    let mut keys = String::from("[tunnel.keys]\n");
    for spi in [0x1000, 0x1001, 0x1002, 0x2000, 0x2001, 0x2002] {
        keys.push_str(&format!(
            "\"{spi:#010x}\" = \"{}{spi:08x}\"\n",
            "cd".repeat(16)
        ));
    }
    std::fs::write(&cfg, MIN.replace("lab_secret = \"0123456789\"", &keys)).unwrap();
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = load(&cfg).unwrap_err().to_string();
    assert!(e.contains("readable by others (mode 644)"), "{e}");
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(load(&cfg).unwrap().tunnels[0].key_warning.is_none());
    // The shipped lab secret loads (it is meant for the lab) but is flagged.
    let root = &Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let w = load(&root.join("configs/west.toml")).unwrap();
    assert!(w.tunnels[0]
        .key_warning
        .as_deref()
        .is_some_and(|m| m.contains("shipped with espada")));
    let short = p(MIN).unwrap();
    assert!(short.tunnels[0]
        .key_warning
        .as_deref()
        .is_some_and(|m| m.contains("10 characters")));
}

#[test]
fn every_shipped_lab_config_loads_and_mirrors() {
    let root = &Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for (w, e) in [
        ("configs/lab/west-dual.toml", "configs/lab/east-dual.toml"),
        ("configs/lab/west-ike.toml", "configs/lab/east-ike.toml"),
    ] {
        let w = load(&root.join(w)).unwrap();
        let e = load(&root.join(e)).unwrap();
        assert!(
            w.mirror_mismatches(&e).is_empty(),
            "{:?}",
            w.mirror_mismatches(&e)
        );
    }
    // ike = true: every configured SA is a placeholder until the IKE daemon installs one.
    let w = load(&root.join("configs/lab/west-ike.toml")).unwrap();
    assert!(w.tunnels[0].ike);
    let db = w.sadb(2).unwrap();
    let t = &db.tunnels[0];
    assert!(t
        .outbound
        .all()
        .chain(t.inbound.all())
        .all(|s| s.awaiting_ike));
    assert!(load(&root.join("configs/west.toml"))
        .unwrap()
        .sadb(2)
        .unwrap()
        .tunnels[0]
        .outbound
        .all()
        .all(|s| !s.awaiting_ike));
}

#[test]
fn ike_and_lab_rekey_exclude_each_other() {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/west.toml"))
            .unwrap()
            .replace("lab_rekey = true", "lab_rekey = true\nike = true");
    let e = err(&text);
    assert!(
        e.contains("lab_rekey and ike = true exclude each other"),
        "{e}"
    );
    assert!(e.starts_with("test.toml:"), "{e}");
}

#[test]
fn shared_sa_order_defaults_to_wire_order_and_names_a_bad_value() {
    let c = p(MIN).unwrap();
    assert!(c.tunnels[0].shared_sa_wire_order);
    let db = c.sadb(2).unwrap();
    assert!(db.tunnels[0].outbound.fallback.wire_order);
    let c = p(&format!("{MIN}shared_sa_order = \"parallel\"\n")).unwrap();
    assert!(!c.sadb(2).unwrap().tunnels[0].outbound.fallback.wire_order);
    let e = err(&format!("{MIN}shared_sa_order = \"random\"\n"));
    assert!(
        e.starts_with(
            "test.toml:15:19: shared_sa_order must be \"wire\" or \"parallel\", got \"random\""
        ),
        "{e}"
    );
}

/// Issue 26: a `conf.d` of tunnel files. Tunnels and policies come from the included files in
/// name order; a mistake in one names that file and line; an included file holds tunnels and
/// policies only; a missing plain include is an error, an empty `conf.d` is not.
#[test]
fn tunnels_from_included_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("conf.d")).unwrap();
    let tunnel = |name: &str, n: u32| {
        format!(
            "[[tunnel]]\nname = \"{name}\"\nlocal = \"192.168.100.1\"\nremote = \"192.168.100.2\"\nlocal_subnets = [\"10.1.{n}.0/24\"]\nremote_subnets = [\"10.2.{n}.0/24\"]\nout_spi = {:#x}\nin_spi = {:#x}\nlab_secret = \"0123456789\"\n",
            0x1000 + n * 16,
            0x8000 + n * 16
        )
    };
    let main = "[gateway]\nname = \"west\"\nworkers = 2\ninclude = [\"conf.d/*.toml\"]\n\n"
        .to_string()
        + &tunnel("main", 0);
    std::fs::write(d.join("west.toml"), &main).unwrap();
    std::fs::write(d.join("conf.d/20-b.toml"), tunnel("b", 2)).unwrap();
    std::fs::write(
        d.join("conf.d/10-a.toml"),
        tunnel("a", 1) + &tunnel("a2", 3),
    )
    .unwrap();
    std::fs::write(d.join("conf.d/notes.txt"), "not toml").unwrap();
    let c = load(&d.join("west.toml")).unwrap();
    let names: Vec<&str> = c.tunnels.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["main", "a", "a2", "b"]);
    // A mistake in an included file: that file, that line.
    std::fs::write(
        d.join("conf.d/20-b.toml"),
        tunnel("b", 2).replace("remote = \"192.168.100.2\"", "remote = \"192.168.100.x\""),
    )
    .unwrap();
    let e = load(&d.join("west.toml")).unwrap_err().to_string();
    assert!(e.contains("conf.d/20-b.toml:4:"), "{e}");
    // The same SPI in two files names the other file.
    std::fs::write(
        d.join("conf.d/20-b.toml"),
        tunnel("b", 2).replace("in_spi = 0x8020", "in_spi = 0x8010"),
    )
    .unwrap();
    let e = load(&d.join("west.toml")).unwrap_err().to_string();
    assert!(e.contains("20-b.toml:") && e.contains("10-a.toml:"), "{e}");
    // A [gateway] in an included file is refused with what it may hold.
    std::fs::write(d.join("conf.d/20-b.toml"), "[gateway]\nname = \"x\"\n").unwrap();
    let e = load(&d.join("west.toml")).unwrap_err().to_string();
    assert!(
        e.contains("20-b.toml:1:") && e.contains("[[tunnel]] and [[policy]] tables only"),
        "{e}"
    );
    std::fs::remove_file(d.join("conf.d/20-b.toml")).unwrap();
    // A plain name must exist; an empty conf.d is fine.
    std::fs::write(
        d.join("west.toml"),
        main.replace("conf.d/*.toml", "conf.d/missing.toml"),
    )
    .unwrap();
    let e = load(&d.join("west.toml")).unwrap_err().to_string();
    assert!(
        e.contains("west.toml:4:") && e.contains("cannot read"),
        "{e}"
    );
    std::fs::write(
        d.join("west.toml"),
        main.replace("conf.d/*.toml", "empty/*.toml"),
    )
    .unwrap();
    std::fs::create_dir(d.join("empty")).unwrap();
    assert_eq!(load(&d.join("west.toml")).unwrap().tunnels.len(), 1);
}

/// Issue 27: the configuration reference (configs/README.md) names every field the parser
/// takes. The fields come from the parser itself (serde lists them when it meets an unknown
/// one), so a new field without its line in the reference fails here.
#[test]
fn the_reference_names_every_field() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let doc = std::fs::read_to_string(root.join("configs/README.md")).unwrap();
    let mut missing = Vec::new();
    let all = crate::fields();
    assert!(
        all.len() >= 7 && all.iter().all(|(_, f)| !f.is_empty()),
        "{all:?}"
    );
    for (section, fields) in all {
        for f in fields {
            // `name`, `name = ...`, [name], [[name]] or [tunnel.name].
            let named = doc.contains(&format!("`{f}`"))
                || doc.contains(&format!("`{f} "))
                || doc.contains(&format!("[{f}]"))
                || doc.contains(&format!(".{f}]"));
            if !named {
                missing.push(format!("{section} {f}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "configs/README.md does not name: {missing:?}"
    );
}

/// Issue 27 paper cut: the next generation's inbound SAs, accepted ahead of the peer's switch,
/// were shown as "(draining)"; they are marked as the next generation now.
#[test]
fn next_generation_sas_are_not_draining() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let c = load(&root.join("configs/west.toml")).unwrap();
    let ts = c.tunnel_sas(0, Some(10));
    let next: Vec<bool> = ts.draining.iter().map(|s| s.next_generation).collect();
    // Generation 9 (going) and 11 (coming): fallback + per-CPU SAs of each.
    assert_eq!(next.len() % 2, 0);
    let half = next.len() / 2;
    assert!(next[..half].iter().all(|n| !n), "{next:?}");
    assert!(next[half..].iter().all(|n| *n), "{next:?}");
    assert!(ts.inbound.all().all(|s| !s.next_generation));
}

/// Issue 27 paper cut: the CLI takes `--spi 0x1000`; the configuration refused `"0x1000"`.
/// Both forms are SPIs now, and a string that is not a number names its line.
#[test]
fn spis_may_be_quoted_as_on_the_cli() {
    let c = p(&MIN
        .replace("out_spi = 0x1000", "out_spi = \"0x1000\"")
        .replace("in_spi = 0x2000", "in_spi = \"8192\""))
    .unwrap();
    assert_eq!(
        (c.tunnels[0].out_spi, c.tunnels[0].in_spi),
        (0x1000, 0x2000)
    );
    let e = err(&MIN.replace("out_spi = 0x1000", "out_spi = \"0x10zz\""));
    assert!(
        e.starts_with("test.toml:12:11:") && e.contains("is not an SPI"),
        "{e}"
    );
    // The range check still applies (SPIs 1-255 are reserved).
    let e = err(&MIN.replace("out_spi = 0x1000", "out_spi = \"0x10\""));
    assert!(e.contains("out_spi"), "{e}");
}

/// `crypto = "auto"` above [`AUTO_TWO_SCHEDULES_MAX_TUNNELS`] tunnels never takes a backend that
/// keeps two key schedules per SA (memory per SA at scale), and says so; below, it may.
#[test]
fn auto_keeps_one_key_schedule_per_sa_above_a_thousand_tunnels() {
    let mut text = "[gateway]\nname = \"west\"\nworkers = 1\n".to_string();
    for n in 0..=AUTO_TWO_SCHEDULES_MAX_TUNNELS as u32 {
        let (a, b) = (n / 256, n % 256);
        text += &format!(
            "[[tunnel]]\nname = \"t{n}\"\nlocal = \"192.168.100.1\"\nremote = \"192.168.100.2\"\nlocal_subnets = [\"10.{a}.{b}.0/24\"]\nremote_subnets = [\"10.{}.{b}.0/24\"]\nout_spi = {:#x}\nin_spi = {:#x}\nlab_secret = \"0123456789\"\n",
            100 + a,
            0x1000 + n * 16,
            0x10_0000 + n * 16
        );
    }
    let many = p(&text).unwrap();
    assert_eq!(many.tunnels.len(), AUTO_TWO_SCHEDULES_MAX_TUNNELS + 1);
    assert!(!many.backend().two_schedules(), "{}", many.backend());
    let report = many.backend_report();
    assert!(report.contains("one key schedule per SA"), "{report}");
    assert!(
        !report.contains(Backend::Hybrid.name()),
        "not even measured: {report}"
    );
    let few = p(MIN).unwrap();
    assert!(!few.backend_report().contains("one key schedule per SA"));
}
