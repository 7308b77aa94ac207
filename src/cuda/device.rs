//! The safe layer of the CUDA backend: per-context compiled kernels and cuBLAS handle (created
//! once, cached for the process), kernel launches and GEMMs on a borrowed stream.

use super::kernels::{Kernel, KERNEL_NAMES, KERNEL_SOURCE};
use super::sys::{self, check, check_cublas, CublasHandle};
use cudarc::driver::sys as cu;
use std::collections::HashMap;
use std::ffi::{c_char, c_void, CString};
use std::sync::{Mutex, MutexGuard, OnceLock};


/// Compiled code for one architecture ("sm_90": CUBIN; "compute_90": PTX).
pub fn compile(arch: &str) -> Result<Vec<u8>, String> {
    let nv = sys::nvrtc()?;
    let src = CString::new(KERNEL_SOURCE).expect("kernel source has no NUL");
    let name = CString::new("lanton_kernels.cu").unwrap();
    let mut prog: sys::NvrtcProgram = std::ptr::null_mut();
    // SAFETY: valid C strings; no headers.
    let rc = unsafe { (nv.nvrtcCreateProgram)(&mut prog, src.as_ptr(), name.as_ptr(), 0, std::ptr::null(), std::ptr::null()) };
    if rc != 0 {
        return Err(format!("nvrtcCreateProgram failed ({rc})"));
    }
    let opts: Vec<CString> = [format!("--gpu-architecture={arch}"), "--std=c++17".into(), "-default-device".into()]
        .into_iter()
        .map(|o| CString::new(o).unwrap())
        .collect();
    let opt_ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    // SAFETY: prog is live; the option strings outlive the call.
    let rc = unsafe { (nv.nvrtcCompileProgram)(prog, opt_ptrs.len() as i32, opt_ptrs.as_ptr()) };
    let read = |size_fn: unsafe extern "C" fn(sys::NvrtcProgram, *mut usize) -> i32,
                get_fn: unsafe extern "C" fn(sys::NvrtcProgram, *mut c_char) -> i32| {
        let mut n = 0usize;
        // SAFETY: prog is live; the buffer has the size NVRTC reported.
        unsafe { size_fn(prog, &mut n) };
        let mut buf = vec![0u8; n];
        if n > 0 {
            unsafe { get_fn(prog, buf.as_mut_ptr() as *mut c_char) };
        }
        buf
    };
    let result = if rc != 0 {
        let log = read(nv.nvrtcGetProgramLogSize, nv.nvrtcGetProgramLog);
        Err(format!("NVRTC could not compile the kernels for {arch}:\n{}", String::from_utf8_lossy(&log)))
    } else if arch.starts_with("sm_") {
        Ok(read(nv.nvrtcGetCUBINSize, nv.nvrtcGetCUBIN))
    } else {
        Ok(read(nv.nvrtcGetPTXSize, nv.nvrtcGetPTX))
    };
    // SAFETY: prog was created above and is destroyed once.
    unsafe { (nv.nvrtcDestroyProgram)(&mut prog) };
    result
}

/// What to give the driver, in order: CUBIN for the device's exact architecture, then PTX for
/// the driver's JIT (when this NVRTC does not know the architecture, or the driver refuses the
/// CUBIN, e.g. one from an NVRTC newer than the driver).
pub fn images_for(major: i32, minor: i32) -> [String; 2] {
    [format!("sm_{major}{minor}"), format!("compute_{major}{minor}")]
}

/// Compiles each target in turn and returns what `load` makes of the first image it accepts;
/// PTX ("compute_*") reaches `load` NUL-terminated. The error lists every attempt.
pub fn load_first<M>(
    targets: &[String], mut compile: impl FnMut(&str) -> Result<Vec<u8>, String>,
    mut load: impl FnMut(&[u8]) -> Result<M, String>,
) -> Result<M, String> {
    let mut failures = Vec::new();
    for arch in targets {
        let attempt = compile(arch).and_then(|mut image| {
            if arch.starts_with("compute_") {
                image.push(0);
            }
            load(&image)
        });
        match attempt {
            Ok(m) => return Ok(m),
            Err(e) => failures.push(format!("{arch}: {e}")),
        }
    }
    Err(format!("cannot load lanton's CUDA kernels on this device:\n{}", failures.join("\n")))
}

/// The versions that decide whether a compiled image loads, for load errors.
fn version_hint() -> String {
    let nvrtc = sys::nvrtc().map(|nv| {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: writes two ints.
        unsafe { (nv.nvrtcVersion)(&mut major, &mut minor) };
        format!("NVRTC {major}.{minor} ({})", nv.lib.path)
    });
    let driver = sys::driver_version().map(|v| format!("{}.{}", v / 1000, v % 1000 / 10));
    format!(
        "{} with a driver for CUDA {}: an NVRTC newer than the driver produces code the driver cannot load; \
         update the driver or point LANTON_NVRTC to an NVRTC no newer than it",
        nvrtc.unwrap_or_else(|e| e),
        driver.unwrap_or_else(|e| e)
    )
}

/// Kernels and cuBLAS for one CUDA context.
pub struct Device {
    pub functions: [cu::CUfunction; KERNEL_NAMES.len()],
    pub sm_count: u32,
    /// Compute capability 8.0 or newer: TF32 mma.sync (lanton_noise_gemm_tc) runs here.
    pub tensor_cores: bool,
    blas: Mutex<CublasHandle>,
}

// SAFETY: CUfunction handles are immutable and usable from any thread of the context; the cuBLAS
// handle is only touched behind its mutex.
unsafe impl Send for Device {}
unsafe impl Sync for Device {}

/// Makes `ctx` current on this thread for the guard's lifetime (XLA's own context stays
/// untouched underneath).
pub struct ContextGuard;

impl ContextGuard {
    /// # Safety
    /// `ctx` must be a live context (here: the one owning XLA's stream for this call).
    pub unsafe fn push(ctx: cu::CUcontext) -> Result<ContextGuard, String> {
        check(cu::cuCtxPushCurrent_v2(ctx), "cuCtxPushCurrent")?;
        Ok(ContextGuard)
    }
}

impl Drop for ContextGuard {
    fn drop(&mut self) {
        let mut ctx = std::ptr::null_mut();
        // SAFETY: pops what `push` pushed.
        unsafe { cu::cuCtxPopCurrent_v2(&mut ctx) };
    }
}

/// The context that owns `stream`.
///
/// # Safety
/// `stream` must be a live CUDA stream (here: the one XLA handed to this call).
pub unsafe fn stream_context(stream: cu::CUstream) -> Result<cu::CUcontext, String> {
    if !sys::driver_present() {
        return Err("the CUDA driver library (libcuda.so.1) is not loadable on this machine".into());
    }
    let mut ctx = std::ptr::null_mut();
    check(cu::cuStreamGetCtx(stream, &mut ctx), "cuStreamGetCtx")?;
    Ok(ctx)
}

/// A context's key in the device cache: its pointer and, where the driver has cuCtxGetId, its
/// unique id (a destroyed context's pointer can come back for a new context).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ContextKey {
    pub ptr: usize,
    pub id: Option<u64>,
}

impl ContextKey {
    /// # Safety
    /// `ctx` must be a live context.
    pub unsafe fn of(ctx: cu::CUcontext) -> ContextKey {
        ContextKey { ptr: ctx as usize, id: unsafe { sys::context_id(ctx) } }
    }
}

/// Values built once per key and kept for the process (leaked, so handed out as `'static`).
pub struct SetupCache<K, V: 'static> {
    map: OnceLock<Mutex<HashMap<K, &'static V>>>,
}

impl<K: Eq + std::hash::Hash, V: Sync + 'static> SetupCache<K, V> {
    pub const fn new() -> Self {
        SetupCache { map: OnceLock::new() }
    }

    /// The value of `key`; on a miss `allowed` is asked first (its error returned, nothing built
    /// or cached), then `build` runs, under the cache's lock.
    pub fn get_or_build<E>(
        &self, key: K, allowed: impl FnOnce() -> Result<(), E>, build: impl FnOnce() -> Result<V, E>,
    ) -> Result<&'static V, E> {
        let mut map = self.map.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = map.get(&key) {
            return Ok(v);
        }
        allowed()?;
        let v: &'static V = Box::leak(Box::new(build()?));
        map.insert(key, v);
        Ok(v)
    }
}

impl<K: Eq + std::hash::Hash, V: Sync + 'static> Default for SetupCache<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

/// The error for first-time setup during graph capture (cuStreamIsCapturing's `status`), or
/// Ok when the stream is not being captured.
pub fn setup_allowed(status: u32) -> Result<(), String> {
    match status {
        0 => Ok(()),
        s => Err(format!(
            "lanton's CUDA setup must run before graph capture: this device's kernels are not compiled yet \
             and XLA's stream is being captured into a CUDA graph (capture status {s}), where NVRTC, module \
             loading and cublasCreate are not allowed. XLA normally runs the setup at its initialize stage, \
             which this call did not reach; run one step without CUDA graphs on this device first, or disable \
             XLA's command buffers (XLA_FLAGS=--xla_gpu_enable_command_buffer=)"
        )),
    }
}

/// The cached device state of `ctx` (which must be current), built on first use after
/// `allowed` agrees (the execute stage checks that XLA's stream is not being captured).
/// Setup failures are turned into `E` by `failed`.
///
/// # Safety
/// `ctx` must be a live context, current on this thread (here: the one owning XLA's stream).
pub unsafe fn device<E>(
    ctx: cu::CUcontext, allowed: impl FnOnce() -> Result<(), E>, failed: impl FnOnce(String) -> E,
) -> Result<&'static Device, E> {
    static CACHE: SetupCache<ContextKey, Device> = SetupCache::new();
    // SAFETY: the caller guarantees `ctx` is live.
    let key = unsafe { ContextKey::of(ctx) };
    CACHE.get_or_build(key, allowed, || build_device().map_err(failed))
}

fn attribute(dev: cu::CUdevice, a: cu::CUdevice_attribute) -> Result<i32, String> {
    let mut v = 0;
    // SAFETY: plain query on a valid device.
    check(unsafe { cu::cuDeviceGetAttribute(&mut v, a, dev) }, "cuDeviceGetAttribute")?;
    Ok(v)
}

fn build_device() -> Result<Device, String> {
    let mut dev: cu::CUdevice = 0;
    // SAFETY: a context is current (ContextGuard).
    check(unsafe { cu::cuCtxGetDevice(&mut dev) }, "cuCtxGetDevice")?;
    use cu::CUdevice_attribute::*;
    let major = attribute(dev, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
    let minor = attribute(dev, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
    let sm_count = attribute(dev, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?.max(1) as u32;
    let module = load_first(
        &images_for(major, minor),
        compile,
        |image| {
            let mut module = std::ptr::null_mut();
            // SAFETY: `image` is a CUBIN or NUL-terminated PTX (load_first); the module lives for
            // the process.
            check(unsafe { cu::cuModuleLoadData(&mut module, image.as_ptr() as *const c_void) }, "cuModuleLoadData")
                .map(|()| module)
        },
    )
    .map_err(|e| format!("{e}\n{}", version_hint()))?;
    let mut functions = [std::ptr::null_mut(); KERNEL_NAMES.len()];
    for (f, name) in functions.iter_mut().zip(KERNEL_NAMES) {
        let c = CString::new(name).unwrap();
        // SAFETY: module loaded above; name is a kernel in it.
        check(unsafe { cu::cuModuleGetFunction(f, module, c.as_ptr()) }, name)?;
    }
    let blas = sys::cublas()?;
    let mut handle = std::ptr::null_mut();
    // SAFETY: creates a handle in the current context.
    check_cublas(blas, unsafe { (blas.cublasCreate_v2)(&mut handle) }, "cublasCreate")?;
    Ok(Device { functions, sm_count, tensor_cores: major >= 8, blas: Mutex::new(handle) })
}

/// A kernel launch configuration.
pub struct Grid {
    pub x: u32,
    pub y: u32,
    pub block: u32,
}

/// One call's view of the device: the stream, and cuBLAS bound to it (locked for the call).
pub struct Session<'d> {
    pub device: &'d Device,
    pub stream: cu::CUstream,
    blas: MutexGuard<'d, CublasHandle>,
}

impl<'d> Session<'d> {
    /// Binds cuBLAS to `stream` with `workspace` (carved from the call's scratch result, so
    /// nothing is allocated while a CUDA graph is being captured).
    ///
    /// # Safety
    /// `stream` must be a live stream of `device`'s context, current on this thread, and
    /// `workspace` a device buffer of `workspace_len` bytes that outlives the enqueued work.
    pub unsafe fn new(device: &'d Device, stream: cu::CUstream, workspace: *mut c_void, workspace_len: usize) -> Result<Self, String> {
        let blas = device.blas.lock().unwrap_or_else(|e| e.into_inner());
        let lib = sys::cublas()?;
        // The handle belongs to this context and is locked by us.
        check_cublas(lib, (lib.cublasSetStream_v2)(*blas, stream), "cublasSetStream")?;
        check_cublas(lib, (lib.cublasSetWorkspace_v2)(*blas, workspace, workspace_len), "cublasSetWorkspace")?;
        Ok(Session { device, stream, blas })
    }

    /// Launches kernel `k` with `params` (pointers to each argument).
    ///
    /// # Safety
    /// `params` must match the kernel's signature and every device pointer in them must be valid
    /// for the accesses the kernel makes until the stream reaches it.
    pub unsafe fn launch(&self, k: Kernel, grid: Grid, params: &mut [*mut c_void]) -> Result<(), String> {
        if grid.x == 0 || grid.y == 0 {
            return Ok(());
        }
        let rc = cu::cuLaunchKernel(
            self.device.functions[k as usize], grid.x, grid.y, 1, grid.block, 1, 1, 0, self.stream,
            params.as_mut_ptr(), std::ptr::null_mut(),
        );
        check(rc, k.name())
    }

    /// dst <- src (device to device, on the stream).
    pub fn copy(&self, dst: *mut c_void, src: *const c_void, bytes: usize) -> Result<(), String> {
        if bytes == 0 || std::ptr::eq(dst, src) {
            return Ok(());
        }
        // SAFETY: both ranges are device buffers of at least `bytes` (checked by the decoder).
        check(unsafe { cu::cuMemcpyDtoDAsync_v2(dst as u64, src as u64, bytes, self.stream) }, "cuMemcpyDtoDAsync")
    }

    /// Zeroes `words` 32-bit words.
    pub fn zero(&self, dst: *mut c_void, words: usize) -> Result<(), String> {
        if words == 0 {
            return Ok(());
        }
        // SAFETY: dst is scratch of at least `words` * 4 bytes.
        check(unsafe { cu::cuMemsetD32Async(dst as u64, 0, words, self.stream) }, "cuMemsetD32Async")
    }

    /// Batched column-major GEMM, C = alpha * op(A) op(B) + beta * C, strided over `batch`.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(&self, g: &Gemm) -> Result<(), String> {
        if g.batch == 0 || g.m == 0 || g.n == 0 {
            return Ok(());
        }
        let lib = sys::cublas()?;
        // SAFETY: the caller sized every buffer for m, n, k, the strides and the batch.
        let st = unsafe {
            (lib.cublasGemmStridedBatchedEx)(
                *self.blas, g.trans_a as i32, g.trans_b as i32, g.m, g.n, g.k,
                &g.alpha as *const f32 as *const c_void, g.a, g.dtype, g.lda, g.stride_a,
                g.b, g.dtype, g.ldb, g.stride_b, &g.beta as *const f32 as *const c_void,
                g.c, g.dtype, g.ldc, g.stride_c, g.batch, g.compute, CUBLAS_GEMM_DEFAULT,
            )
        };
        check_cublas(lib, st, "cublasGemmStridedBatchedEx")
    }
}

pub const CUDA_R_32F: i32 = 0;
pub const CUDA_R_16BF: i32 = 14;
pub const CUBLAS_COMPUTE_32F: i32 = 68;
pub const CUBLAS_GEMM_DEFAULT: i32 = -1;

/// One strided-batched GEMM (all operands of one dtype, f32 accumulation).
pub struct Gemm {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub alpha: f32,
    pub a: *const c_void,
    pub lda: i32,
    pub stride_a: i64,
    pub b: *const c_void,
    pub ldb: i32,
    pub stride_b: i64,
    pub beta: f32,
    pub c: *mut c_void,
    pub ldc: i32,
    pub stride_c: i64,
    pub batch: i32,
    pub dtype: i32,
    pub compute: i32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    fn targets() -> Vec<String> {
        images_for(9, 0).to_vec()
    }

    #[test]
    fn the_cubin_is_used_when_the_driver_takes_it() {
        let compiled = RefCell::new(Vec::new());
        let got = load_first(
            &targets(),
            |a| {
                compiled.borrow_mut().push(a.to_string());
                Ok(b"\x7fELF".to_vec())
            },
            |img| Ok(img.to_vec()),
        );
        assert_eq!(got.unwrap(), b"\x7fELF");
        assert_eq!(*compiled.borrow(), ["sm_90"], "no PTX compiled when the CUBIN loads");
    }

    #[test]
    fn ptx_follows_when_nvrtc_lacks_the_arch_or_the_driver_refuses_the_cubin() {
        // NVRTC does not know sm_90.
        let got = load_first(
            &targets(),
            |a| if a == "sm_90" { Err("invalid --gpu-architecture".into()) } else { Ok(b".entry x".to_vec()) },
            |img| Ok(img.to_vec()),
        );
        assert_eq!(got.unwrap(), b".entry x\0", "PTX reaches the driver NUL-terminated");
        // NVRTC compiles the CUBIN but cuModuleLoadData refuses it.
        let loads = RefCell::new(0);
        let got = load_first(
            &targets(),
            |a| Ok(a.as_bytes().to_vec()),
            |img| {
                *loads.borrow_mut() += 1;
                if img.starts_with(b"sm_") { Err("cuModuleLoadData failed: CUDA_ERROR_NO_BINARY_FOR_GPU".into()) } else { Ok(img.to_vec()) }
            },
        );
        assert_eq!((got.unwrap(), *loads.borrow()), (b"compute_90\0".to_vec(), 2));
    }

    #[test]
    fn when_nothing_loads_the_error_lists_every_attempt() {
        let err = load_first(
            &targets(),
            |a| Ok(a.as_bytes().to_vec()),
            |img| -> Result<(), String> {
                Err(if img.starts_with(b"sm_") { "CUDA_ERROR_INVALID_IMAGE" } else { "CUDA_ERROR_UNSUPPORTED_PTX_VERSION" }.into())
            },
        )
        .unwrap_err();
        for needle in ["cannot load lanton's CUDA kernels", "sm_90: CUDA_ERROR_INVALID_IMAGE", "compute_90: CUDA_ERROR_UNSUPPORTED_PTX_VERSION"] {
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn setup_is_refused_only_while_the_stream_is_captured() {
        assert!(setup_allowed(0).is_ok());
        for status in [1, 2] {
            let e = setup_allowed(status).unwrap_err();
            assert!(e.starts_with("lanton's CUDA setup must run before graph capture"), "{e}");
        }
    }

    #[test]
    fn the_cache_builds_once_per_key_and_never_during_capture() {
        let cache: SetupCache<ContextKey, u32> = SetupCache::new();
        let builds = RefCell::new(0);
        let build = |v: u32| {
            let builds = &builds;
            move || -> Result<u32, String> {
                *builds.borrow_mut() += 1;
                Ok(v)
            }
        };
        let capturing = || setup_allowed(1);
        let a = ContextKey { ptr: 0x1000, id: Some(7) };
        // A miss while capturing: the error, nothing built, nothing cached.
        assert!(cache.get_or_build(a, capturing, build(1)).unwrap_err().contains("before graph capture"));
        assert_eq!(*builds.borrow(), 0);
        // A miss outside capture builds; a later hit needs no check, even during capture.
        assert_eq!(*cache.get_or_build(a, || Ok(()), build(1)).unwrap(), 1);
        assert_eq!(*cache.get_or_build(a, capturing, build(99)).unwrap(), 1);
        assert_eq!(*builds.borrow(), 1);
        // A new context at the old one's address has a new id: its own entry, its own setup.
        let reused = ContextKey { ptr: 0x1000, id: Some(8) };
        assert!(cache.get_or_build(reused, capturing, build(2)).is_err());
        assert_eq!(*cache.get_or_build(reused, || Ok(()), build(2)).unwrap(), 2);
        // Without cuCtxGetId the pointer alone is the key.
        let bare = ContextKey { ptr: 0x1000, id: None };
        assert_eq!(*cache.get_or_build(bare, || Ok(()), build(3)).unwrap(), 3);
        assert_eq!(*cache.get_or_build(bare, || Ok(()), build(4)).unwrap(), 3);
        assert_eq!(*builds.borrow(), 3);
        // A failed build caches nothing.
        let c = ContextKey { ptr: 0x2000, id: Some(9) };
        assert!(cache.get_or_build(c, || Ok(()), || Err::<u32, String>("nvrtc".into())).is_err());
        assert_eq!(*cache.get_or_build(c, || Ok(()), build(5)).unwrap(), 5);
    }
}
