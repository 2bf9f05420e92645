//! Builds the C shim against the system's intel-ipsec-mb and generates bindings for it.
//! Needs `libipsec-mb-dev` (Debian) and libclang (for bindgen); `scripts/test` installs both.

fn main() {
    println!("cargo:rerun-if-changed=shim/espada_imb.c");
    println!("cargo:rerun-if-changed=shim/espada_imb.h");
    if !std::path::Path::new("/usr/include/intel-ipsec-mb.h").exists()
        && std::env::var("IPSEC_MB_INCLUDE").is_err()
    {
        panic!("intel-ipsec-mb.h not found: install libipsec-mb-dev (apt-get install libipsec-mb-dev) or set IPSEC_MB_INCLUDE");
    }
    let mut b = cc::Build::new();
    b.file("shim/espada_imb.c").opt_level(2);
    if let Ok(inc) = std::env::var("IPSEC_MB_INCLUDE") {
        b.include(inc);
    }
    b.compile("espada_imb");
    println!("cargo:rustc-link-lib=IPSec_MB");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let mut bg = bindgen::Builder::default()
        .header("shim/espada_imb.h")
        // The key data's own type, so a key can hold it inline (its size and layout are the
        // library's, whatever version is installed).
        .header_contents("espada_imb_types.h", "#include <intel-ipsec-mb.h>\n")
        .allowlist_function("espada_imb_.*")
        .allowlist_type("espada_imb")
        .allowlist_type("gcm_key_data")
        .layout_tests(false);
    if let Ok(inc) = std::env::var("IPSEC_MB_INCLUDE") {
        bg = bg.clang_arg(format!("-I{inc}"));
    }
    bg.generate()
        .expect("bindgen on shim/espada_imb.h")
        .write_to_file(out.join("bindings.rs"))
        .expect("write bindings");
}
