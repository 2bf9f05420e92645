//! Records the git revision and (with the `dpdk` feature) the DPDK version for `espada version`.
fn main() {
    println!("cargo:rerun-if-changed=.git/HEAD");
    // HEAD names a branch; a commit moves the branch, not HEAD.
    if let Ok(head) = std::fs::read_to_string(".git/HEAD") {
        if let Some(r) = head.trim().strip_prefix("ref: ") {
            // (Only files that exist: a missing one would rerun this script on every build.)
            for f in [format!(".git/{r}"), ".git/packed-refs".to_string()] {
                if std::path::Path::new(&f).exists() {
                    println!("cargo:rerun-if-changed={f}");
                }
            }
        }
    }
    // A build without .git (a container's context) is told its revision.
    println!("cargo:rerun-if-env-changed=ESPADA_GIT_HASH");
    if let Ok(h) = std::env::var("ESPADA_GIT_HASH") {
        println!("cargo:rustc-env=ESPADA_GIT_HASH={h}");
    } else if let Ok(o) = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
    {
        if o.status.success() {
            let h = String::from_utf8_lossy(&o.stdout).trim().to_string();
            println!("cargo:rustc-env=ESPADA_GIT_HASH={h}");
        }
    }
    if std::env::var_os("CARGO_FEATURE_DPDK").is_some() {
        if let Ok(o) = std::process::Command::new("pkg-config")
            .args(["--modversion", "libdpdk"])
            .output()
        {
            if o.status.success() {
                let v = String::from_utf8_lossy(&o.stdout).trim().to_string();
                println!("cargo:rustc-env=ESPADA_DPDK_VERSION={v}");
            }
        }
    }
}
