//! The thin `sys` layer of the CUDA backend: finding the CUDA libraries at run time.
//!
//! The driver API comes from `cudarc::driver::sys` (dynamic loading; `libcuda` is the one driver
//! of the machine, whatever name opens it). cuBLAS and NVRTC are resolved here instead of through
//! cudarc's loader: cudarc tries the unversioned `libcublas.so` first, which on a machine with a
//! system toolkit is a *different* copy from the `libcublas.so.13` jax's CUDA plugin already
//! loaded from its pip wheels. We take, in order: the copy already mapped into this process (the
//! one jax uses; with several CUDA majors mapped, the plugin's, else the newest the driver runs),
//! an explicit path from `LANTON_CUBLAS` / `LANTON_NVRTC`, then the versioned SONAMEs (newest
//! the driver runs first). Signatures use cudarc's handle types; enum arguments and status results are plain
//! `i32` (an unknown value in a Rust enum would be undefined behaviour).

use cudarc::driver::sys as cu;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::OnceLock;

/// Paths of the shared objects mapped into this process (dl_iterate_phdr).
pub fn loaded_objects() -> Vec<String> {
    unsafe extern "C" fn visit(info: *mut libc::dl_phdr_info, _size: usize, data: *mut c_void) -> c_int {
        // SAFETY: glibc passes a valid info struct and our `data` (a Vec<String>) for the whole call.
        let (info, out) = unsafe { (&*info, &mut *(data as *mut Vec<String>)) };
        if !info.dlpi_name.is_null() {
            // SAFETY: dlpi_name is a NUL-terminated string owned by the loader.
            out.push(unsafe { CStr::from_ptr(info.dlpi_name) }.to_string_lossy().into_owned());
        }
        0
    }
    let mut out: Vec<String> = Vec::new();
    // SAFETY: `visit` only reads the entries and appends to `out`, which outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(visit), &mut out as *mut Vec<String> as *mut c_void) };
    out
}

/// The CUDA major version in a versioned library name: "/x/libcublas.so.13.1.0.3" -> 13.
pub fn soname_major(path: &str, prefix: &str) -> Option<u32> {
    let file = path.rsplit('/').next()?;
    let digits: String = file.strip_prefix(prefix)?.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The CUDA major version XLA's CUDA plugin was built for, read from the paths of the objects
/// it mapped: `jax_plugins/xla_cuda13/...`, `jax_cuda12_plugin/...`.
pub fn plugin_cuda_major(paths: &[String]) -> Option<u32> {
    paths.iter().find_map(|p| {
        p.split('/').find_map(|dir| {
            let rest = dir.strip_prefix("xla_cuda").or_else(|| dir.strip_prefix("jax_cuda"))?;
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
    })
}

/// Orders candidate paths or SONAMEs of one library (file names starting with `prefix`) by
/// preference: the CUDA major of XLA's plugin (if the driver can run it), then the newest
/// major the driver can run (`driver_major`: cuDriverGetVersion / 1000), then the rest in
/// their given order. With several majors mapped (CUDA 12 and 13 in one process), taking
/// simply the first would pick whichever was loaded first.
pub fn rank_candidates(candidates: &[String], prefix: &str, driver_major: Option<u32>, plugin_major: Option<u32>) -> Vec<String> {
    let runnable = |m: u32| !matches!(driver_major, Some(d) if m > d);
    let rank = |c: &String| match soname_major(c, prefix) {
        Some(m) if Some(m) == plugin_major && runnable(m) => (0, 0),
        Some(m) if runnable(m) => (1, u32::MAX - m),
        _ => (2, 0),
    };
    let mut out = candidates.to_vec();
    out.sort_by_key(rank); // stable: equal ranks keep their order
    out
}

/// The copies of a library already in the process (file name starting with `prefix`, e.g.
/// "libcublas.so."), best first (`rank_candidates`).
pub fn resident(prefix: &str) -> Vec<String> {
    let objects = loaded_objects();
    let mapped: Vec<String> =
        objects.iter().filter(|p| p.rsplit('/').next().is_some_and(|f| f.starts_with(prefix))).cloned().collect();
    rank_candidates(&mapped, prefix, driver_major(), plugin_cuda_major(&objects))
}

/// The CUDA major version of the driver, if there is one.
fn driver_major() -> Option<u32> {
    driver_version().ok().map(|v| (v / 1000) as u32)
}

/// A dlopen'ed library; never closed (its function pointers are cached for the process).
pub struct Library {
    handle: *mut c_void,
    pub path: String,
}

// SAFETY: a dlopen handle is process-global and dlsym is thread-safe.
unsafe impl Send for Library {}
unsafe impl Sync for Library {}

impl Library {
    /// Opens the first candidate that loads; the error lists everything tried.
    pub fn open(what: &str, env: &str, resident_prefix: &str, sonames: &[&str]) -> Result<Library, String> {
        let mut tried = Vec::new();
        let mut candidates: Vec<String> = Vec::new();
        candidates.extend(resident(resident_prefix));
        candidates.extend(std::env::var(env).ok().filter(|s| !s.is_empty()));
        let sonames: Vec<String> = sonames.iter().map(|s| s.to_string()).collect();
        candidates.extend(rank_candidates(&sonames, resident_prefix, driver_major(), None));
        for c in candidates {
            let Ok(cs) = CString::new(c.clone()) else { continue };
            // SAFETY: dlopen with a valid C string; the handle is kept for the process lifetime.
            let handle = unsafe { libc::dlopen(cs.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
            if !handle.is_null() {
                return Ok(Library { handle, path: c });
            }
            tried.push(c);
        }
        Err(format!(
            "cannot load {what}: tried {tried:?}. Install jax's CUDA plugin (which ships it) or set {env} to its path"
        ))
    }

    /// # Safety
    /// `T` must be the C function pointer type of `name`.
    unsafe fn sym<T: Copy>(&self, name: &str) -> Result<T, String> {
        assert_eq!(std::mem::size_of::<T>(), std::mem::size_of::<*mut c_void>());
        let cs = CString::new(name).map_err(|e| e.to_string())?;
        // SAFETY: valid handle and C string.
        let p = unsafe { libc::dlsym(self.handle, cs.as_ptr()) };
        if p.is_null() {
            return Err(format!("{}: missing symbol {name}", self.path));
        }
        // SAFETY: the caller names the right function type; sizes checked above.
        Ok(unsafe { std::mem::transmute_copy::<*mut c_void, T>(&p) })
    }
}

macro_rules! fn_table {
    ($table:ident { $($name:ident : fn($($arg:ty),*) -> $ret:ty;)* }) => {
        #[allow(non_snake_case)]
        pub struct $table {
            pub lib: Library,
            $(pub $name: unsafe extern "C" fn($($arg),*) -> $ret,)*
        }
        impl $table {
            fn resolve(lib: Library) -> Result<Self, String> {
                // SAFETY: each field's type is the documented C signature of the symbol it names.
                unsafe { Ok($table { $($name: lib.sym(stringify!($name))?,)* lib }) }
            }
        }
    };
}

pub type CublasHandle = cudarc::cublas::sys::cublasHandle_t;

fn_table!(Cublas {
    cublasCreate_v2: fn(*mut CublasHandle) -> i32;
    cublasSetStream_v2: fn(CublasHandle, cu::CUstream) -> i32;
    cublasSetWorkspace_v2: fn(CublasHandle, *mut c_void, usize) -> i32;
    cublasGetStatusString: fn(i32) -> *const c_char;
    cublasGemmStridedBatchedEx: fn(
        CublasHandle, i32, i32, c_int, c_int, c_int, *const c_void,
        *const c_void, i32, c_int, i64,
        *const c_void, i32, c_int, i64, *const c_void,
        *mut c_void, i32, c_int, i64, c_int, i32, i32
    ) -> i32;
});

pub type NvrtcProgram = cudarc::nvrtc::sys::nvrtcProgram;

fn_table!(Nvrtc {
    nvrtcVersion: fn(*mut c_int, *mut c_int) -> i32;
    nvrtcCreateProgram: fn(*mut NvrtcProgram, *const c_char, *const c_char, c_int, *const *const c_char, *const *const c_char) -> i32;
    nvrtcCompileProgram: fn(NvrtcProgram, c_int, *const *const c_char) -> i32;
    nvrtcGetProgramLogSize: fn(NvrtcProgram, *mut usize) -> i32;
    nvrtcGetProgramLog: fn(NvrtcProgram, *mut c_char) -> i32;
    nvrtcGetCUBINSize: fn(NvrtcProgram, *mut usize) -> i32;
    nvrtcGetCUBIN: fn(NvrtcProgram, *mut c_char) -> i32;
    nvrtcGetPTXSize: fn(NvrtcProgram, *mut usize) -> i32;
    nvrtcGetPTX: fn(NvrtcProgram, *mut c_char) -> i32;
    nvrtcDestroyProgram: fn(*mut NvrtcProgram) -> i32;
});

/// cuBLAS, once per process.
pub fn cublas() -> Result<&'static Cublas, String> {
    static LIB: OnceLock<Result<Cublas, String>> = OnceLock::new();
    LIB.get_or_init(|| {
        Cublas::resolve(Library::open("cuBLAS", "LANTON_CUBLAS", "libcublas.so.", &["libcublas.so.13", "libcublas.so.12"])?)
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// NVRTC, once per process.
pub fn nvrtc() -> Result<&'static Nvrtc, String> {
    static LIB: OnceLock<Result<Nvrtc, String>> = OnceLock::new();
    LIB.get_or_init(|| {
        Nvrtc::resolve(Library::open("NVRTC", "LANTON_NVRTC", "libnvrtc.so.", &["libnvrtc.so.13", "libnvrtc.so.12"])?)
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// The CUDA driver is present (cudarc panics on first use otherwise).
pub fn driver_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: only tries to dlopen the driver's names.
    *PRESENT.get_or_init(|| unsafe { cu::is_culib_present() })
}

/// The driver's CUDA version (cuDriverGetVersion: 1000 * major + 10 * minor, e.g. 13000).
pub fn driver_version() -> Result<i32, String> {
    if !driver_present() {
        return Err("no CUDA driver".into());
    }
    let mut v = 0;
    // SAFETY: writes one int; needs no context.
    check(unsafe { cu::cuDriverGetVersion(&mut v) }, "cuDriverGetVersion")?;
    Ok(v)
}

/// cuStreamIsCapturing's answer: 0 none, 1 active, 2 invalidated (CUstreamCaptureStatus).
///
/// # Safety
/// `stream` must be a live stream (here: the one XLA handed to this call).
pub unsafe fn stream_capture_status(stream: cu::CUstream) -> Result<u32, String> {
    let mut status: u32 = u32::MAX;
    // SAFETY: the driver writes one CUstreamCaptureStatus (a C enum, 32 bits) through the pointer;
    // it lands in a u32, so a value unknown to cudarc's Rust enum is never read as that enum.
    check(
        unsafe { cu::cuStreamIsCapturing(stream, &mut status as *mut u32 as *mut cu::CUstreamCaptureStatus) },
        "cuStreamIsCapturing",
    )?;
    Ok(status)
}

/// The context's unique id (cuCtxGetId, CUDA >= 12.0); None when the driver predates it or
/// refuses. Unlike the CUcontext pointer, an id is never reused by a later context.
///
/// # Safety
/// `ctx` must be a live context.
pub unsafe fn context_id(ctx: cu::CUcontext) -> Option<u64> {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: only looks the symbol up in the driver (loaded: `ctx` came from it); cudarc's own
    // wrapper would panic on a driver without it.
    let present = *PRESENT.get_or_init(|| unsafe { cu::culib().get::<unsafe extern "C" fn()>(b"cuCtxGetId").is_ok() });
    if !present {
        return None;
    }
    let mut id: std::ffi::c_ulonglong = 0;
    // SAFETY: the symbol exists (checked above); writes one integer for a live context.
    (unsafe { cu::cuCtxGetId(ctx, &mut id) } == cu::CUresult::CUDA_SUCCESS).then_some(id)
}

/// A driver call's result as Result, with the driver's own message.
pub fn check(r: cu::CUresult, what: &str) -> Result<(), String> {
    if r == cu::CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    let mut msg: *const c_char = std::ptr::null();
    // SAFETY: cuGetErrorString writes a static string pointer (or leaves it null).
    unsafe { cu::cuGetErrorString(r, &mut msg) };
    let text = if msg.is_null() { String::new() } else { unsafe { CStr::from_ptr(msg) }.to_string_lossy().into_owned() };
    Err(format!("{what} failed: {r:?} {text}"))
}

/// A cuBLAS status as Result.
pub fn check_cublas(lib: &Cublas, status: i32, what: &str) -> Result<(), String> {
    if status == 0 {
        return Ok(());
    }
    // SAFETY: returns a static string for any status value.
    let s = unsafe { (lib.cublasGetStatusString)(status) };
    let text = if s.is_null() { String::new() } else { unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned() };
    Err(format!("{what} failed: cuBLAS status {status} {text}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn majors_are_read_from_library_and_plugin_paths() {
        assert_eq!(soname_major("/sp/nvidia/cu13/lib/libcublas.so.13", "libcublas.so."), Some(13));
        assert_eq!(soname_major("libcublas.so.12.9.1.4", "libcublas.so."), Some(12));
        assert_eq!(soname_major("/usr/lib/libcublas.so.", "libcublas.so."), None);
        assert_eq!(soname_major("/usr/lib/libcublasLt.so.13", "libcublas.so."), None);
        let objs = paths(&["/usr/lib/libc.so.6", "/sp/jax_plugins/xla_cuda13/xla_cuda_plugin.so"]);
        assert_eq!(plugin_cuda_major(&objs), Some(13));
        assert_eq!(plugin_cuda_major(&paths(&["/sp/jax_cuda12_plugin/_triton.so"])), Some(12));
        assert_eq!(plugin_cuda_major(&paths(&["/sp/torch/lib/libtorch_cuda.so", "/sp/jax_plugins/xla_cuda/x.so"])), None);
    }

    #[test]
    fn with_cuda_12_and_13_mapped_the_plugins_or_the_drivers_major_wins() {
        let p = "libcublas.so.";
        // torch (CUDA 12) loaded first, jax's CUDA 13 plugin second.
        let both = paths(&["/sp/nvidia/cublas/lib/libcublas.so.12", "/sp/nvidia/cu13/lib/libcublas.so.13"]);
        let first = |d, pl| rank_candidates(&both, p, d, pl)[0].clone();
        assert_eq!(first(Some(13), Some(13)), both[1], "the plugin's major");
        assert_eq!(first(Some(13), Some(12)), both[0], "the plugin's major, even below the newest");
        assert_eq!(first(Some(13), None), both[1], "no plugin seen: the newest the driver runs");
        assert_eq!(first(None, None), both[1], "no driver either: the newest");
        assert_eq!(first(Some(12), Some(13)), both[0], "a CUDA 12 driver cannot run the CUDA 13 copy");
        assert_eq!(first(Some(12), None), both[0]);
        // Everything is still tried, the unrunnable or unversioned last, in their given order.
        let odd = paths(&["/a/libcublas.so.", "/b/libcublas.so.13", "/c/libcublas.so.12", "/d/libcublas.so.14"]);
        assert_eq!(rank_candidates(&odd, p, Some(13), None), paths(&[odd[1].as_str(), &odd[2], &odd[0], &odd[3]]));
        // The fallback SONAMEs follow the same rule.
        let sonames = paths(&["libcublas.so.13", "libcublas.so.12"]);
        assert_eq!(rank_candidates(&sonames, p, Some(12), None), paths(&["libcublas.so.12", "libcublas.so.13"]));
        assert_eq!(rank_candidates(&sonames, p, Some(13), None), sonames);
        assert!(rank_candidates(&[], p, Some(13), Some(13)).is_empty());
    }
}
