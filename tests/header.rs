//! include/lanton.h must equal what cbindgen generates from src/capi.rs (CI fails on drift).

#[test]
fn checked_in_header_is_current() {
    let generated = std::fs::read_to_string(concat!(env!("OUT_DIR"), "/lanton.h")).expect("build.rs output");
    let checked_in = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/include/lanton.h")).unwrap_or_default();
    assert!(
        generated == checked_in,
        "include/lanton.h is stale: run `LANTON_UPDATE_HEADER=1 cargo build` and commit it"
    );
}
