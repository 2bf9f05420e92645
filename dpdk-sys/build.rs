//! Finds DPDK (>= 22.11) with pkg-config, compiles the C shim with DPDK's own flags (the raw
//! `pkg-config --cflags`, which carries `-include rte_config.h`), links, and runs bindgen with
//! explicit allowlists. `scripts/test` installs libdpdk-dev, pkg-config and libclang-dev.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=shim/espada_dpdk.c");
    println!("cargo:rerun-if-changed=shim/espada_dpdk.h");
    let lib = pkg_config::Config::new()
        .atleast_version("22.11")
        .probe("libdpdk")
        .unwrap_or_else(|e| panic!("DPDK >= 22.11 not found with pkg-config ({e}); install libdpdk-dev, or build without the `dpdk` feature"));
    let cflags = String::from_utf8(
        Command::new("pkg-config")
            .args(["--cflags", "libdpdk"])
            .output()
            .expect("pkg-config")
            .stdout,
    )
    .expect("utf-8 cflags");
    let flags: Vec<String> = cflags.split_whitespace().map(str::to_string).collect();
    let mut b = cc::Build::new();
    b.file("shim/espada_dpdk.c").opt_level(2).warnings(false);
    let mut it = flags.iter();
    while let Some(f) = it.next() {
        if f == "-include" {
            if let Some(h) = it.next() {
                b.flag("-include").flag(h);
            }
        } else if !f.starts_with("-march") {
            b.flag(f);
        }
    }
    b.flag("-mssse3");
    b.compile("espada_dpdk");
    // The ring PMD's API (rte_eth_from_rings) lives in its own library.
    println!("cargo:rustc-link-lib=rte_net_ring");
    for p in &lib.link_paths {
        println!("cargo:rustc-link-search=native={}", p.display());
    }
    let mut clang: Vec<String> = flags
        .iter()
        .filter(|f| !f.starts_with("-march"))
        .cloned()
        .collect();
    clang.push("-mssse3".into());
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap());
    bindgen::Builder::default()
        .header("shim/espada_dpdk.h")
        .clang_args(&clang)
        .allowlist_function("espada_.*")
        .allowlist_function("rte_eal_init")
        .allowlist_function("rte_eal_cleanup")
        .allowlist_function("rte_eth_dev_count_avail")
        .allowlist_function("rte_eth_dev_get_port_by_name")
        .allowlist_function("rte_eth_dev_socket_id")
        .allowlist_function("rte_eth_dev_stop")
        .allowlist_function("rte_eth_dev_close")
        .allowlist_function("rte_eth_xstats_get")
        .allowlist_function("rte_eth_xstats_get_names")
        .allowlist_function("rte_socket_id")
        .allowlist_function("rte_lcore_id")
        .allowlist_function("rte_strerror")
        .allowlist_function("rte_mempool_free")
        .allowlist_type("rte_eth_xstat.*")
        .opaque_type("rte_mbuf")
        .opaque_type("rte_mempool")
        .opaque_type("rte_flow")
        .blocklist_type("rte_mbuf_.*")
        .layout_tests(false)
        .derive_default(true)
        .generate()
        .expect("bindgen over the DPDK shim")
        .write_to_file(out.join("bindings.rs"))
        .expect("write bindings");
}
