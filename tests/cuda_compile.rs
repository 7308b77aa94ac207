//! CUDA checks that need no GPU: every kernel compiles through NVRTC for sm_80 and sm_90, and
//! the library has no link-time CUDA dependency.
//!
//! NVRTC comes from the pip package `nvidia-cuda-nvrtc` (installed by scripts/setup.sh); the
//! test finds it through LANTON_NVRTC, or next to LANTON_PYTHON's site-packages. Under CI=true
//! a missing NVRTC fails the test instead of skipping it.

use std::path::PathBuf;
use std::process::Command;

fn nvrtc_path() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("LANTON_NVRTC") {
        return Some(PathBuf::from(p));
    }
    let python = std::env::var("LANTON_PYTHON").ok()?;
    let out = Command::new(python)
        .args(["-c", "import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0]))"])
        .output()
        .ok()?;
    let site = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    ["nvidia/cu13/lib/libnvrtc.so.13", "nvidia/cuda_nvrtc/lib/libnvrtc.so.12"]
        .iter()
        .map(|p| site.join(p))
        .find(|p| p.exists())
}

fn require_nvrtc() -> bool {
    match nvrtc_path() {
        Some(p) => {
            std::env::set_var("LANTON_NVRTC", &p);
            true
        }
        None if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("NVRTC not found: set LANTON_NVRTC or LANTON_PYTHON (a python with nvidia-cuda-nvrtc)")
        }
        None => {
            eprintln!("skipping: NVRTC not found (set LANTON_NVRTC)");
            false
        }
    }
}

#[test]
fn kernels_compile_for_ampere_and_hopper() {
    if !require_nvrtc() {
        return;
    }
    for arch in ["sm_80", "sm_90"] {
        let cubin = lanton::cuda::compile(arch).unwrap_or_else(|e| panic!("{e}"));
        assert!(cubin.starts_with(b"\x7fELF"), "{arch}: NVRTC did not return a CUBIN (ELF) image");
        let text = String::from_utf8_lossy(&cubin);
        for name in lanton::cuda::KERNEL_NAMES {
            assert!(text.contains(name), "{arch}: kernel {name} missing from the CUBIN");
        }
    }
    // PTX for the driver JIT fallback.
    let ptx = String::from_utf8(lanton::cuda::compile("compute_90").unwrap()).unwrap();
    for name in lanton::cuda::KERNEL_NAMES {
        assert!(ptx.contains(&format!(".entry {name}")), "PTX lacks .entry {name}");
    }
}

#[test]
fn a_broken_kernel_reports_nvrtc_log() {
    if !require_nvrtc() {
        return;
    }
    // The compile error path returns NVRTC's log, not a panic.
    let err = lanton::cuda::compile("sm_1").unwrap_err();
    assert!(err.contains("sm_1"), "{err}");
}

#[test]
fn no_cuda_library_is_linked() {
    // The cdylib next to this test binary (target/<profile>/liblanton.so).
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let so = dir.join("liblanton.so");
    if !so.exists() {
        panic!("{} not built (cargo test builds the cdylib with the tests)", so.display());
    }
    let out = Command::new("readelf").arg("-d").arg(&so).output().expect("readelf (binutils) is needed");
    let text = String::from_utf8_lossy(&out.stdout);
    let needed: Vec<&str> = text.lines().filter(|l| l.contains("(NEEDED)")).collect();
    assert!(!needed.is_empty(), "readelf found no NEEDED entries: {text}");
    for l in &needed {
        for lib in ["libcuda", "libcublas", "libnvrtc", "libcudart"] {
            assert!(!l.contains(lib), "liblanton.so links {lib} at load time: {l}");
        }
    }
}

#[test]
fn library_lookup_prefers_the_copy_already_loaded_and_names_what_it_tried() {
    use lanton::cuda::sys::{resident, Library};
    // libc stands in for libcublas.so.13: a library this process has already mapped.
    let mapped = resident("libc.so.").expect("libc is mapped into every test process");
    assert!(mapped.starts_with('/'), "{mapped}");
    let lib = Library::open("libc", "LANTON_TEST_UNSET_VAR", "libc.so.", &["libdoesnotexist.so.9"]).unwrap();
    assert_eq!(lib.path, mapped, "the resident copy must win over the SONAME list");
    let err = Library::open("thing", "LANTON_TEST_UNSET_VAR", "libnothing.so.", &["libnothing.so.1"]).err().unwrap();
    assert!(err.contains("libnothing.so.1") && err.contains("LANTON_TEST_UNSET_VAR"), "{err}");
}
