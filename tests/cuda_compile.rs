//! CUDA checks that need no GPU: every kernel compiles through NVRTC for sm_80 and sm_90, and
//! the library has no link-time CUDA dependency (checked on the cdylib itself, which the test
//! builds with cargo when `cargo test` did not leave a current one).
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
    // The tensor-core noise products are compiled in for Hopper (their body is guarded by
    // __CUDA_ARCH__ >= 800), TF32 operands rounded by cvt.rna.
    assert!(ptx.contains("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32"), "PTX lacks the TF32 mma");
    assert!(ptx.contains("cvt.rna.tf32.f32"), "PTX lacks the TF32 rounding");
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

/// The cdylib of this build, target/<profile>/liblanton.so (next to this test's deps/ folder),
/// brought up to date first: `cargo test` builds the crate for the tests but need not leave the
/// cdylib there (on a fresh target directory it is absent), so it is built here with the same
/// cargo, profile and target directory as this test. When it is current, that is a no-op.
fn current_cdylib() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).expect("test binary lives in <target>/<profile>/deps");
    let target_dir = profile_dir.parent().expect("profile directory has a parent");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--lib", "--manifest-path", concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"), "--target-dir"])
        .arg(target_dir);
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("release") => cmd.arg("--release"),
        Some("debug") => &mut cmd, // the dev profile
        Some(other) => cmd.args(["--profile", other]),
        None => panic!("cannot tell the cargo profile from {}", profile_dir.display()),
    };
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stderr);
    println!("{cmd:?}:\n{}", said.trim_end());
    let so = profile_dir.join("liblanton.so");
    assert!(so.exists(), "{cmd:?} succeeded but {} does not exist", so.display());
    so
}

#[test]
fn no_cuda_library_is_linked() {
    let so = current_cdylib();
    let out = Command::new("readelf").arg("-d").arg(&so).output().expect("readelf (binutils) is needed");
    assert!(out.status.success(), "readelf -d {} failed: {}", so.display(), String::from_utf8_lossy(&out.stderr));
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
    let mapped = resident("libc.so.").into_iter().next().expect("libc is mapped into every test process");
    assert!(mapped.starts_with('/'), "{mapped}");
    let lib = Library::open("libc", "LANTON_TEST_UNSET_VAR", "libc.so.", &["libdoesnotexist.so.9"]).unwrap();
    assert_eq!(lib.path, mapped, "the resident copy must win over the SONAME list");
    let err = Library::open("thing", "LANTON_TEST_UNSET_VAR", "libnothing.so.", &["libnothing.so.1"]).err().unwrap();
    assert!(err.contains("libnothing.so.1") && err.contains("LANTON_TEST_UNSET_VAR"), "{err}");
}
