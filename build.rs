//! Generates the C header for the plain C ABI with cbindgen. The generated copy goes to
//! $OUT_DIR/lanton.h; `tests/header.rs` fails when include/lanton.h differs from it.
//! Refresh the checked-in header with `LANTON_UPDATE_HEADER=1 cargo build`.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=src/capi.rs");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-env-changed=LANTON_UPDATE_HEADER");
    let crate_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("lanton.h");
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("reading cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(crate_dir.join("src/capi.rs"))
        .generate()
        .expect("cbindgen could not generate include/lanton.h");
    bindings.write_to_file(&out);
    if std::env::var("LANTON_UPDATE_HEADER").is_ok_and(|v| v == "1") {
        bindings.write_to_file(crate_dir.join("include/lanton.h"));
    }
}
