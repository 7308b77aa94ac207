//! The floors of `src/`, as an import graph: every `crate::<module>` a file names (outside
//! comments) must be on a floor below its own. From the bottom: `tensor`; `ffi` (XLA's ABI) and
//! `step` (the algorithm); the backends `cpu` and `cuda`; the front ends `handlers` (XLA) and
//! `capi` (C). So no XLA type reaches the step or a backend, and no backend knows a front end.

use std::collections::BTreeSet;
use std::path::Path;

/// What each top-level module may import.
fn allowed(module: &str) -> &'static [&'static str] {
    match module {
        "tensor" => &[],
        "ffi" | "step" => &["tensor"],
        "cpu" | "cuda" => &["step", "tensor"],
        "handlers" => &["ffi", "step", "tensor", "cpu", "cuda"],
        "capi" => &["step", "tensor", "cpu", "cuda"],
        "lib" => &["capi", "cpu", "cuda", "ffi", "handlers", "step", "tensor"],
        other => panic!("src/{other}: a module the floors do not place; add it to tests/floors.rs"),
    }
}

/// Every `crate::name` in `code`, comments left out.
fn imports(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in code.lines() {
        let line = line.split("//").next().unwrap_or("");
        let mut rest = line;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

fn visit(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            visit(&p, files);
        } else if p.extension().is_some_and(|x| x == "rs") {
            files.push(p);
        }
    }
}

#[test]
fn no_floor_imports_one_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    visit(&src, &mut files);
    assert!(files.len() > 20, "found only {} files under src/", files.len());
    let mut breaches = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let module = rel.components().next().unwrap().as_os_str().to_string_lossy().trim_end_matches(".rs").to_string();
        let code = std::fs::read_to_string(f).unwrap();
        for name in imports(&code) {
            if name != module && !allowed(&module).contains(&name.as_str()) {
                breaches.push(format!("src/{} imports crate::{name}", rel.display()));
            }
        }
    }
    assert!(breaches.is_empty(), "imports that run up or across the floors:\n{}", breaches.join("\n"));
}

#[test]
fn the_scan_sees_imports_and_skips_comments() {
    let code = "use crate::ffi::{CallFrame, FfiError};\n// crate::handlers in a comment\nlet x = crate::step::f(); // crate::capi\n";
    let got: Vec<String> = imports(code).into_iter().collect();
    assert_eq!(got, ["ffi", "step"]);
}
