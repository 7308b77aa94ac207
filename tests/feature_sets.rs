//! `cargo build` (the library the Python package bundles, scripts/setup.sh) and `cargo test` must
//! build one and the same lanton. They do when the dev-dependencies (faer) turn on no feature of a
//! dependency the library also has; otherwise Cargo builds lanton once per feature set into the
//! same file and rebuilds it whenever one command follows the other (about 90 s a time here,
//! three times per run of scripts/test.sh). Cargo.toml turns such features on for the library too.

use std::collections::BTreeSet;
use std::process::Command;

/// `cargo tree` lines ("name vX.Y.Z", "name feature \"f\"") over the given dependency kinds.
fn tree(edges: &str) -> BTreeSet<String> {
    let out = Command::new(env!("CARGO"))
        .args(["tree", "--offline", "-e", "features", "-e", edges, "--prefix", "none"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running cargo tree");
    assert!(out.status.success(), "cargo tree failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().map(|l| l.trim_end_matches(" (*)").to_owned()).collect()
}

#[test]
fn dev_dependencies_turn_on_no_feature_of_the_librarys_dependencies() {
    let normal = tree("normal");
    let with_dev = tree("normal,dev");
    let crates: BTreeSet<&str> = normal.iter().filter(|l| !l.contains(" feature ")).filter_map(|l| l.split(' ').next()).collect();
    let extra: Vec<&String> = with_dev
        .difference(&normal)
        .filter(|l| l.contains(" feature ") && crates.contains(l.split(' ').next().unwrap_or("")))
        .collect();
    assert!(
        extra.is_empty(),
        "the dev-dependencies turn on features of the library's dependencies: {extra:?}; turn them on in \
         Cargo.toml's [dependencies] too, or `cargo build` and `cargo test` rebuild lanton in turn"
    );
}
