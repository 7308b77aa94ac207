//! The CUDA step without a GPU: kernels.cu is compiled for the host with an emulation header
//! (tests/cuda_emu: one fiber per CUDA thread, barriers for __syncthreads and warp shuffles)
//! and driven by the real launch plan and `enqueue_on` (src/cuda/launch.rs), the plan (src/cuda/plan.rs) laid out in
//! the call's scratch result (sized by `lanton_cuda_scratch_bytes`, as the Python shim does),
//! with a naive column-major strided-batched GEMM standing in for cuBLAS. Results must match the CPU
//! handler's over several steps (noise refreshes, G_prev stores, skipped layers), for every
//! group kind, f32 and bf16 data, f32 and bf16 Newton-Schulz operands, zero-size leaves, and
//! layers spread over several blocks (the launches are recorded to prove it). The noise
//! estimate's products run through the emulated `lanton_noise_gemm` (gated on the device step
//! count), so every step's launches are the same and the noise steps' results still match; its
//! tensor-core twin `lanton_noise_gemm_tc` runs with mma.sync emulated from the PTX ISA's
//! fragment layout (which only a GPU run can confirm).
//!
//! What this cannot check: the CUDA driver and cuBLAS calls themselves, real concurrency
//! between blocks, and anything about speed (tests/gpu/run.sh does, on a GPU).

mod common;
use common::*;
use half::bf16;
use lanton::cuda::device::{Gemm, Grid, CUDA_R_16BF, CUDA_R_32F};
use lanton::cuda::{enqueue_on, noise_gemm_kernel, plan_in_scratch, GemmArgs, Kernel, LeafBatch, Queue, KERNEL_NAMES};
use lanton::ffi::api::*;
use lanton::step::{noise_phases, LayerShape, NoiseSchedule};
use lanton::handlers::{decode_cuda_options, decode_layout, lanton_step_inplace_cpu, lanton_step_update_cpu, ARGS_PER_LEAF, RETS_PER_LEAF};
use std::cell::RefCell;
use std::ffi::{c_char, c_void, CString};
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

type LaunchFn = unsafe extern "C" fn(*const c_char, u32, u32, u32, *mut *mut c_void, i32) -> i32;

/// g++ builds the emulated kernels once per test binary.
fn emu_launch() -> LaunchFn {
    static F: OnceLock<usize> = OnceLock::new();
    let addr = *F.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let so = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("liblanton_cuda_emu.so");
        let out = Command::new("g++")
            .args(["-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-o"])
            .arg(&so)
            .arg(root.join("tests/cuda_emu/launch.cpp"))
            .output()
            .expect("g++ is needed to emulate the CUDA kernels on the host");
        assert!(out.status.success(), "g++ failed:\n{}", String::from_utf8_lossy(&out.stderr));
        let path = CString::new(so.to_str().unwrap()).unwrap();
        // SAFETY: loads the library just built; kept for the process.
        let h = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW) };
        assert!(!h.is_null(), "dlopen of the emulated kernels failed");
        let f = unsafe { libc::dlsym(h, c"emu_launch".as_ptr()) };
        assert!(!f.is_null());
        f as usize
    });
    // SAFETY: emu_launch has this signature (tests/cuda_emu/launch.cpp).
    unsafe { std::mem::transmute::<usize, LaunchFn>(addr) }
}

struct HostQueue;

/// What the emulated launches looked like, per kernel: the largest grid and the most blocks
/// one layer (per-layer passes) or one leaf (track) was given.
#[derive(Clone, Copy, Debug, Default)]
struct Seen {
    launches: usize,
    max_grid: u32,
    max_chunks: i32,
}

thread_local! {
    static LAUNCHES: RefCell<[Seen; KERNEL_NAMES.len()]> = RefCell::new([Seen::default(); KERNEL_NAMES.len()]);
    /// cuBLAS products asked for, by operand dtype: (f32, bf16).
    static GEMMS: RefCell<(usize, usize)> = const { RefCell::new((0, 0)) };
    /// Every operation queued, in order, when recording (Some): kernels with their grids,
    /// products with their shapes, copies and fills with their sizes.
    static SEQUENCE: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
}

fn take_launches() -> [Seen; KERNEL_NAMES.len()] {
    LAUNCHES.with(|l| std::mem::take(&mut *l.borrow_mut()))
}

fn record(op: impl FnOnce() -> String) {
    SEQUENCE.with(|s| {
        if let Some(seq) = s.borrow_mut().as_mut() {
            seq.push(op());
        }
    });
}

fn take_gemms() -> (usize, usize) {
    GEMMS.with(|g| std::mem::take(&mut *g.borrow_mut()))
}

fn launches_of(seen: &[Seen], name: &str) -> usize {
    seen[kernel(name) as usize].launches
}

/// cuBLAS's own argument checks (CUBLAS_STATUS_INVALID_VALUE), which a naive GEMM would not make.
fn cublas_checks(g: &Gemm) -> Result<(), String> {
    let rows_a = if g.trans_a { g.k } else { g.m };
    let rows_b = if g.trans_b { g.n } else { g.k };
    if g.m < 0 || g.n < 0 || g.k < 0 || g.batch < 0 || g.lda < rows_a.max(1) || g.ldb < rows_b.max(1) || g.ldc < g.m.max(1) {
        return Err(format!(
            "cuBLAS would refuse: m {} n {} k {} lda {} ldb {} ldc {} batch {}",
            g.m, g.n, g.k, g.lda, g.ldb, g.ldc, g.batch
        ));
    }
    Ok(())
}

unsafe fn ld(p: *const c_void, dt: i32, i: usize) -> f64 {
    if dt == CUDA_R_32F { *(p as *const f32).add(i) as f64 } else { (*(p as *const bf16).add(i)).to_f64() }
}
unsafe fn st(p: *mut c_void, dt: i32, i: usize, v: f64) {
    if dt == CUDA_R_32F { *(p as *mut f32).add(i) = v as f32 } else { *(p as *mut bf16).add(i) = bf16::from_f64(v) }
}

impl Queue for HostQueue {
    unsafe fn launch(&self, k: Kernel, grid: Grid, params: &mut [*mut c_void]) -> Result<(), String> {
        let name = CString::new(k.name()).unwrap();
        let name_k = k.name();
        let chunks = if k.per_leaf() {
            // SAFETY: the per-leaf kernels take a LeafBatch first (what enqueue_on passes).
            let b = unsafe { &*(params[0] as *const LeafBatch) };
            b.chunks[..b.count as usize].iter().copied().max().unwrap_or(0)
        } else {
            0
        };
        record(|| format!("{name_k} grid {}x{} block {}", grid.x, grid.y, grid.block));
        LAUNCHES.with(|l| {
            let seen = &mut l.borrow_mut()[k as usize];
            seen.launches += 1;
            seen.max_grid = seen.max_grid.max(grid.x);
            seen.max_chunks = seen.max_chunks.max(chunks);
        });
        let reverse = REVERSE_BLOCKS.with(|r| *r.borrow()) as i32;
        match emu_launch()(name.as_ptr(), grid.x, grid.y, grid.block, params.as_mut_ptr(), reverse) {
            0 => Ok(()),
            rc => Err(format!("emulated launch of {name_k} failed: {rc}")),
        }
    }
    fn gemm(&self, g: &Gemm) -> Result<(), String> {
        assert!(g.dtype == CUDA_R_32F || g.dtype == CUDA_R_16BF);
        cublas_checks(g)?;
        record(|| format!("gemm {:?}", (g.trans_a, g.trans_b, g.m, g.n, g.k, g.lda, g.ldb, g.ldc, g.batch, g.dtype)));
        GEMMS.with(|n| {
            let n = &mut *n.borrow_mut();
            if g.dtype == CUDA_R_32F { n.0 += 1 } else { n.1 += 1 }
        });
        for b in 0..g.batch as usize {
            // SAFETY: the plan sized every operand for the batch (what this test checks).
            unsafe {
                let (a, bb, c) = (
                    (g.a as usize + b * g.stride_a as usize * if g.dtype == CUDA_R_32F { 4 } else { 2 }) as *const c_void,
                    (g.b as usize + b * g.stride_b as usize * if g.dtype == CUDA_R_32F { 4 } else { 2 }) as *const c_void,
                    (g.c as usize + b * g.stride_c as usize * if g.dtype == CUDA_R_32F { 4 } else { 2 }) as *mut c_void,
                );
                for j in 0..g.n as usize {
                    for i in 0..g.m as usize {
                        let mut acc = 0.0f64;
                        for p in 0..g.k as usize {
                            let x = if g.trans_a { ld(a, g.dtype, p + i * g.lda as usize) } else { ld(a, g.dtype, i + p * g.lda as usize) };
                            let y = if g.trans_b { ld(bb, g.dtype, j + p * g.ldb as usize) } else { ld(bb, g.dtype, p + j * g.ldb as usize) };
                            acc += x * y;
                        }
                        let idx = i + j * g.ldc as usize;
                        let old = if g.beta != 0.0 { g.beta as f64 * ld(c, g.dtype, idx) } else { 0.0 };
                        st(c, g.dtype, idx, g.alpha as f64 * acc + old);
                    }
                }
            }
        }
        Ok(())
    }
    fn copy(&self, dst: *mut c_void, src: *const c_void, bytes: usize) -> Result<(), String> {
        record(|| format!("copy {bytes}"));
        if !std::ptr::eq(dst, src) {
            // SAFETY: both are frame buffers of `bytes` (decoded sizes).
            unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, bytes) };
        }
        Ok(())
    }
    fn zero(&self, dst: *mut c_void, words: usize) -> Result<(), String> {
        record(|| format!("zero {words}"));
        // SAFETY: scratch of at least `words` words.
        unsafe { std::ptr::write_bytes(dst as *mut u32, 0, words) };
        Ok(())
    }
}

thread_local! {
    /// Run every block of the next launches in reverse order (a GPU promises no order).
    static REVERSE_BLOCKS: RefCell<bool> = const { RefCell::new(false) };
    static IN_PLACE: RefCell<bool> = const { RefCell::new(false) };
    /// `ratio_stat` for the next trajectories, on both sides (None: the frame's default).
    static STAT: RefCell<Option<&'static str>> = const { RefCell::new(None) };
    /// The `ratio_cap` attribute in `raw_trajectory` (None: absent, the statistic's default).
    static CAP: RefCell<Option<f64>> = const { RefCell::new(None) };
    /// The staggered noise schedule in `raw_trajectory`: the CPU handler derives the phases from
    /// the attribute, the CUDA one takes them as the trailing argument (step::noise_phases).
    static STAGGERED: RefCell<bool> = const { RefCell::new(false) };
    /// LANTON_NOISE_GEMM for the next emulated steps (a device with tensor cores).
    static NOISE_GEMM: RefCell<Option<&'static str>> = const { RefCell::new(None) };
}

fn run_emulated(frame: *mut XLA_FFI_CallFrame) -> *mut XLA_FFI_Error {
    // SAFETY: a test frame.
    unsafe {
        lanton::ffi::handler::dispatch(frame, "emulated_cuda", 0, |c| {
            let in_place = IN_PLACE.with(|p| *p.borrow());
            let layout = decode_layout(c, in_place)?;
            let opts = decode_cuda_options(c)?;
            // What the CUDA handler does before it takes the stream: the plan laid out in the
            // call's scratch result (sized by lanton_cuda_scratch_bytes, poisoned by the caller).
            let mut plan = plan_in_scratch(&layout, opts)?;
            plan.noise_gemm = noise_gemm_kernel(NOISE_GEMM.with(|n| *n.borrow()), true).map_err(lanton::ffi::FfiError::invalid)?;
            enqueue_on(&HostQueue, &layout, &mut plan).map_err(lanton::ffi::FfiError::internal)
        })
    }
}
unsafe extern "C" fn emulated_update(f: *mut XLA_FFI_CallFrame) -> *mut XLA_FFI_Error {
    IN_PLACE.with(|p| *p.borrow_mut() = false);
    run_emulated(f)
}
unsafe extern "C" fn emulated_inplace(f: *mut XLA_FFI_CallFrame) -> *mut XLA_FFI_Error {
    IN_PLACE.with(|p| *p.borrow_mut() = true);
    run_emulated(f)
}

/// Leaf i's state results (momentum, prev_grad, noise, valid, prev_step, skipped) become the next step's
/// state arguments.
fn carry_state(f: &mut Frame, i: usize) {
    let (a, r) = (2 + ARGS_PER_LEAF * i, RETS_PER_LEAF * i);
    for (ak, rk) in [(2, 1), (3, 2), (4, 3), (5, 4), (6, 5), (7, 7)] {
        f.args[a + ak].data = f.rets[r + rk].data.clone();
    }
}

fn buffer_like(b: &OwnedBuffer, v: &[f32]) -> OwnedBuffer {
    if b.dtype == dtype::BF16 { OwnedBuffer::bf16(&b.dims, v) } else { OwnedBuffer::f32(&b.dims, v) }
}

/// Runs `steps` steps of one group through `handler`; returns every step's results (as f32).
/// `cuda`: the call carries the CUDA targets' scratch result, sized by lanton_cuda_scratch_bytes.
#[allow(clippy::too_many_arguments)]
/// Optional ratio shaping (ratio_power, ratio_floor) set on both sides.
type Shaping = Option<(f64, f64)>;

#[allow(clippy::too_many_arguments)]
fn trajectory(kind: &str, specs: &[LeafSpec], k: i64, steps: i32, handler: Handler, in_place: bool,
              ns_dtype: &str, nan_at: Option<(usize, i32)>, cuda: bool, shaping: Shaping) -> Vec<Vec<Vec<f32>>> {
    let raw = raw_trajectory(kind, specs, k, steps, handler, in_place, ns_dtype, nan_at, cuda, shaping);
    raw.iter().map(|rets| rets[..RETS_PER_LEAF * specs.len()].iter().map(|r| r.to_f32()).collect()).collect()
}

/// `trajectory`'s every result buffer after each step, as stored (the CUDA scratch included).
#[allow(clippy::too_many_arguments)]
fn raw_trajectory(kind: &str, specs: &[LeafSpec], k: i64, steps: i32, handler: Handler, in_place: bool,
                  ns_dtype: &str, nan_at: Option<(usize, i32)>, cuda: bool, shaping: Shaping) -> Vec<Vec<OwnedBuffer>> {
    let mut rng = Rng::new(77);
    let mut f = step_frame(kind, specs, 1, &mut rng);
    f.set_attr("noise_every", Attr::I64(k));
    if kind == "adam" {  // no noise tracking; Nesterov (NAdamW), as the library's adam groups
        f.set_attr("noise_adaptive", Attr::Bool(false));
        f.set_attr("nesterov", Attr::Bool(true));
    }
    if let Some((power, floor)) = shaping {
        f.set_attr("ratio_power", Attr::F64(power));
        f.set_attr("ratio_floor", Attr::F64(floor));
    }
    f.set_attr("ns_dtype", Attr::Str(ns_dtype.into()));
    // The GPU's noise estimator on both sides (the CPU's own default is the Gram eigenvalues).
    f.set_attr("noise_estimator", Attr::Str("polar".into()));
    if let Some(stat) = STAT.with(|s| *s.borrow()) {
        f.set_attr("ratio_stat", Attr::Str(stat.into()));
    }
    if let Some(cap) = CAP.with(|s| *s.borrow()) {
        f.set_attr("ratio_cap", Attr::F64(cap));
    }
    if STAGGERED.with(|s| *s.borrow()) {
        f.set_attr("noise_schedule", Attr::Str("staggered".into()));
        if cuda {
            let shapes: Vec<LayerShape> = specs.iter().map(|s| LayerShape {
                layers: s.dims[0] as usize, rows: s.dims[1] as usize, cols: s.dims[2] as usize, rows_are_input: s.rows_are_input,
            }).collect();
            let phases = noise_phases(NoiseSchedule::Staggered, k as u32, &shapes);
            f.args.push(OwnedBuffer::i32(&[phases.len() as i64], &phases));
        }
    }
    if cuda {
        add_scratch(&mut f, cuda_scratch_bytes(&scratch_plan_json(kind, specs, true, true, ns_dtype)).unwrap());
    }
    let leaf_rets = RETS_PER_LEAF * specs.len();
    let mut out = Vec::new();
    for t in 1..=steps {
        if cuda {
            // Poison the scratch: whatever the plan does not zero must be written before it is read.
            f.rets[leaf_rets].data.fill(0x7fc0_0000_7fc0_0000);
        }
        f.args[1] = OwnedBuffer::i32(&[], &[t]);
        for (i, s) in specs.iter().enumerate() {
            let n = (s.dims[0] * s.dims[1] * s.dims[2]) as usize;
            let mut g = rng.normals(n, 1.0);
            if nan_at == Some((i, t)) {
                g[n - 1] = f32::NAN; // last layer of leaf i
            }
            let gb = &f.args[2 + ARGS_PER_LEAF * i + 1];
            f.args[2 + ARGS_PER_LEAF * i + 1] = buffer_like(gb, &g);
        }
        f.call(handler).unwrap();
        out.push(f.rets.clone());
        for i in 0..specs.len() {
            let (a, r) = (2 + ARGS_PER_LEAF * i, RETS_PER_LEAF * i);
            let p = f.args[a].to_f32();
            let o = f.rets[r].to_f32();
            let next: Vec<f32> = if in_place { o } else { p.iter().zip(&o).map(|(x, d)| x + d).collect() };
            f.args[a] = buffer_like(&f.args[a], &next);
            carry_state(&mut f, i);
        }
    }
    out
}

fn compare(kind: &str, specs: &[LeafSpec], k: i64, ns_dtype: &str, tol: f64, in_place: bool, nan_at: Option<(usize, i32)>) {
    compare_shaped(kind, specs, k, ns_dtype, tol, in_place, nan_at, None);
}

#[allow(clippy::too_many_arguments)]
fn compare_shaped(kind: &str, specs: &[LeafSpec], k: i64, ns_dtype: &str, tol: f64, in_place: bool,
                  nan_at: Option<(usize, i32)>, shaping: Shaping) -> Vec<Vec<Vec<f32>>> {
    let cpu = if in_place { lanton_step_inplace_cpu as Handler } else { lanton_step_update_cpu };
    let emu = if in_place { emulated_inplace as Handler } else { emulated_update };
    let want = trajectory(kind, specs, k, 4, cpu, in_place, "float32", nan_at, false, shaping);
    let got = trajectory(kind, specs, k, 4, emu, in_place, ns_dtype, nan_at, true, shaping);
    assert_eq!(device_memory_calls(), 0, "the step allocates nothing");
    const NAMES: [&str; RETS_PER_LEAF] = ["out", "momentum", "prev_grad", "noise", "valid", "prev_step", "ratio", "skipped"];
    for (t, (w, g)) in want.iter().zip(&got).enumerate() {
        for (j, (wb, gb)) in w.iter().zip(g).enumerate() {
            let scale = wb.iter().fold(1e-6f64, |m, &x| m.max((x as f64).abs()));
            let err = wb.iter().zip(gb).fold(0.0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
            assert!(
                err <= tol * scale,
                "{kind} K={k} ns={ns_dtype} step {} leaf {} {}: max error {err:.3e} vs scale {scale:.3e}\nwant {:?}\ngot  {:?}",
                t + 1, j / RETS_PER_LEAF, NAMES[j % RETS_PER_LEAF], &wb[..wb.len().min(6)], &gb[..gb.len().min(6)]
            );
        }
    }
    got
}

fn hidden_specs(dt: i32) -> Vec<LeafSpec> {
    vec![
        LeafSpec { dims: [2, 16, 8], dtype: dt, rows_are_input: false },
        LeafSpec { dims: [1, 12, 20], dtype: dt, rows_are_input: true },
        LeafSpec { dims: [3, 16, 8], dtype: dt, rows_are_input: true },
    ]
}

#[test]
fn hidden_f32_matches_cpu_kernels() {
    compare("hidden", &hidden_specs(dtype::F32), 2, "float32", 2e-4, false, None);
    compare("hidden", &hidden_specs(dtype::F32), 1, "float32", 2e-4, false, None);
}

#[test]
fn hidden_bf16_newton_schulz_is_close() {
    // bf16 operands carry 8 mantissa bits: a few percent of the largest entry.
    compare("hidden", &hidden_specs(dtype::F32), 2, "bfloat16", 6e-2, false, None);
}

#[test]
fn hidden_bf16_data_in_place() {
    compare("hidden", &hidden_specs(dtype::BF16), 2, "float32", 1e-2, true, None);
}

#[test]
fn embed_and_vector_match_cpu_kernels() {
    let embed = vec![LeafSpec { dims: [1, 40, 16], dtype: dtype::F32, rows_are_input: true },
                     LeafSpec { dims: [1, 16, 40], dtype: dtype::F32, rows_are_input: true }];
    compare("embed", &embed, 2, "bfloat16", 1e-5, false, None);
    let vector = vec![LeafSpec { dims: [3, 1, 24], dtype: dtype::F32, rows_are_input: true },
                      LeafSpec { dims: [1, 1, 7], dtype: dtype::BF16, rows_are_input: true }];
    compare("vector", &vector, 1, "bfloat16", 1e-5, false, None);
    compare("vector", &vector, 2, "bfloat16", 1e-5, true, None);
}

#[test]
fn adam_matches_cpu_kernels() {
    // NAdamW's moments (nu in the G_prev buffer), bias corrections from the device step count, a
    // layer skipped for a NaN on step 3; f32 and bf16 leaves, update and in place.
    let adam = vec![LeafSpec { dims: [2, 8, 40], dtype: dtype::F32, rows_are_input: true },
                    LeafSpec { dims: [1, 1, 7], dtype: dtype::BF16, rows_are_input: true },
                    LeafSpec { dims: [1, 30, 20], dtype: dtype::F32, rows_are_input: true }];
    compare("adam", &adam, 1, "bfloat16", 1e-5, false, Some((0, 3)));
    compare("adam", &adam, 1, "bfloat16", 1e-5, true, Some((2, 2)));
}

#[test]
fn a_non_finite_gradient_skips_its_layer_like_the_cpu() {
    compare("hidden", &hidden_specs(dtype::F32), 1, "float32", 2e-4, false, Some((2, 2)));
    compare("hidden", &hidden_specs(dtype::F32), 2, "float32", 2e-4, true, Some((0, 3)));
}

#[test]
fn staggered_schedule_matches_the_cpu_with_non_finite_gradients_on_due_steps() {
    // K = 3 over 4 steps: the (16, 8) class's five layers have phases 0 1 | 2 0 1 and the (12, 20)
    // layer phase 0, so steps 2, 3 and 4 each measure some layers and skip the others. A NaN in
    // leaf 0's last layer on its noise step (t = 4), then in leaf 2's last layer on the step it
    // stores G_prev (t = 3): its next step must not measure.
    STAGGERED.with(|s| *s.borrow_mut() = true);
    let got = compare_shaped("hidden", &hidden_specs(dtype::F32), 3, "float32", 2e-4, false, Some((0, 4)), None);
    compare_shaped("hidden", &hidden_specs(dtype::F32), 3, "float32", 2e-4, true, Some((2, 3)), None);
    STAGGERED.with(|s| *s.borrow_mut() = false);
    // prev_step after step 4 (results 5, 13, 21): a layer of phase p last stored on the step
    // t <= 4 with t = p - 1 (mod 3).
    let stored: Vec<f32> = [5, 13, 21].iter().flat_map(|&j| got[3][j].clone()).collect();
    assert_eq!(stored, vec![2.0, 3.0, 2.0, 4.0, 2.0, 3.0], "phases 0 1, 0, 2 0 1");
}

#[test]
fn more_leaves_than_one_launch_holds() {
    // 30 leaves: two multi-tensor launches per pass (23 + 7), mixed shapes and layer counts.
    let specs: Vec<LeafSpec> = (0..30)
        .map(|i| LeafSpec { dims: [1 + (i % 3) as i64, 6 + (i % 4) as i64, 5 + (i % 5) as i64], dtype: dtype::F32, rows_are_input: i % 2 == 0 })
        .collect();
    compare("hidden", &specs, 2, "float32", 2e-4, false, None);
}

#[test]
fn zero_size_leaves_write_their_ratio_and_skip_cublas() {
    // Empty layers (0 rows or 0 columns) beside ordinary ones, and a leaf without layers: the
    // emulated GEMM refuses what cuBLAS would (ld = 0), and every ratio must match the CPU's.
    let hidden = vec![
        LeafSpec { dims: [2, 16, 8], dtype: dtype::F32, rows_are_input: false },
        LeafSpec { dims: [2, 0, 8], dtype: dtype::F32, rows_are_input: true },
        LeafSpec { dims: [1, 12, 0], dtype: dtype::F32, rows_are_input: true },
        LeafSpec { dims: [0, 4, 4], dtype: dtype::F32, rows_are_input: true },
        LeafSpec { dims: [3, 16, 8], dtype: dtype::F32, rows_are_input: true },
    ];
    compare("hidden", &hidden, 1, "float32", 2e-4, false, None);
    compare("hidden", &hidden, 2, "float32", 2e-4, true, None);
    let embed = vec![LeafSpec { dims: [1, 0, 16], dtype: dtype::F32, rows_are_input: true },
                     LeafSpec { dims: [1, 40, 16], dtype: dtype::F32, rows_are_input: true }];
    compare("embed", &embed, 2, "bfloat16", 1e-5, false, None);
    let vector = vec![LeafSpec { dims: [2, 1, 0], dtype: dtype::F32, rows_are_input: true },
                      LeafSpec { dims: [3, 1, 24], dtype: dtype::F32, rows_are_input: true }];
    compare("vector", &vector, 1, "bfloat16", 1e-5, false, None);
    // Stated outright (the CPU's value, and the reference's): an empty layer that never had a
    // usable noise estimate gets r = 1. The results start zeroed, so an unwritten ratio shows.
    let got = trajectory("hidden", &hidden, 1, 3, emulated_update, false, "float32", None, true, None);
    for step in &got {
        let ratio = |leaf: usize| &step[RETS_PER_LEAF * leaf + 6];
        assert_eq!(ratio(1), &vec![1.0; 2], "leaf 1 (2 x 0 x 8) ratio");
        assert_eq!(ratio(2), &vec![1.0; 1], "leaf 2 (1 x 12 x 0) ratio");
        assert!(ratio(3).is_empty());
    }
}

#[test]
fn layers_larger_than_one_block_reduce_across_blocks() {
    // A per-layer pass gives a layer ceil(len / 1024) blocks (src/cuda/args.rs), whose partial
    // sums meet in atomics: layers of 2,560, 2,560 and 1,296 elements need 3, 3 and 2 blocks.
    let hidden = vec![
        LeafSpec { dims: [2, 40, 64], dtype: dtype::F32, rows_are_input: false },
        LeafSpec { dims: [1, 64, 40], dtype: dtype::F32, rows_are_input: true },
        LeafSpec { dims: [1, 36, 36], dtype: dtype::F32, rows_are_input: true },
    ];
    for (k, in_place) in [(1, false), (2, true)] {
        take_launches();
        compare("hidden", &hidden, k, "float32", 2e-4, in_place, None);
        let seen = take_launches();
        for (name, s) in KERNEL_NAMES.iter().zip(&seen) {
            match *name {
                "lanton_stats" | "lanton_prepare" | "lanton_dot" | "lanton_apply" => {
                    assert!(s.launches > 0 && s.max_chunks >= 3 && s.max_grid > 1, "{name}: {s:?}")
                }
                "lanton_affine_diag" => assert!(s.max_grid > 1, "{name}: {s:?}"),
                _ => {}
            }
        }
    }
    let embed = vec![LeafSpec { dims: [1, 50, 64], dtype: dtype::F32, rows_are_input: true }];
    take_launches();
    compare("embed", &embed, 1, "bfloat16", 1e-5, false, None);
    assert!(take_launches()[0].max_chunks == 4, "embed stats: 3,200 elements in 4 blocks");
    // More layers than one block has threads: lanton_track takes two blocks for the leaf, and
    // lanton_reference (one block by design) strides over 300 layers.
    let vector = vec![LeafSpec { dims: [300, 1, 8], dtype: dtype::F32, rows_are_input: true },
                      LeafSpec { dims: [1, 1, 3000], dtype: dtype::F32, rows_are_input: true }];
    take_launches();
    compare("vector", &vector, 1, "bfloat16", 1e-5, false, None);
    let seen = take_launches();
    let (track, stats) = (Kernel::Track as usize, Kernel::Stats as usize);
    assert!(seen[track].max_chunks == 2, "track: {:?}", seen[track]);
    assert!(seen[stats].max_chunks == 3 && seen[stats].max_grid == 303, "stats: {:?}", seen[stats]);
}

#[test]
fn shaped_ratios_match_cpu_kernels() {
    // r = max(floor, (alpha/ref)^p): tempered and floored, on every kind.
    let got = compare_shaped("hidden", &hidden_specs(dtype::F32), 1, "float32", 2e-4, false, None, Some((0.5, 0.3)));
    let ratios: Vec<f32> = got.iter().flat_map(|step| step.iter().skip(6).step_by(RETS_PER_LEAF).flatten().copied()).collect();
    assert!(ratios.iter().any(|&r| r > 0.3 && r < 0.999), "no tempered ratio strictly between floor and 1: {ratios:?}");
    let embed = vec![LeafSpec { dims: [1, 30, 8], dtype: dtype::F32, rows_are_input: true }, LeafSpec { dims: [2, 5, 8], dtype: dtype::F32, rows_are_input: false }];
    compare_shaped("embed", &embed, 1, "bfloat16", 1e-5, false, None, Some((0.25, 0.9)));
}

#[test]
fn median_reference_matches_cpu_kernels() {
    // lanton_reference's median by rank (one block striding over the group), then r capped at 1:
    // an even count (6 hidden layers, tempered) and an odd one (300 + 1 vector layers).
    STAT.with(|s| *s.borrow_mut() = Some("median"));
    let got = compare_shaped("hidden", &hidden_specs(dtype::F32), 1, "float32", 2e-4, false, None, Some((0.5, 0.0)));
    let vector = vec![LeafSpec { dims: [300, 1, 8], dtype: dtype::F32, rows_are_input: true },
                      LeafSpec { dims: [1, 1, 64], dtype: dtype::F32, rows_are_input: true }];
    let got_vector = compare_shaped("vector", &vector, 1, "bfloat16", 1e-5, false, None, None);
    STAT.with(|s| *s.borrow_mut() = None);
    for (name, steps) in [("hidden", &got), ("vector", &got_vector)] {
        let last: Vec<f32> = steps.last().unwrap().iter().skip(6).step_by(RETS_PER_LEAF).flatten().copied().collect();
        let capped = last.iter().filter(|&&r| r == 1.0).count();
        assert!(last.iter().all(|&r| r <= 1.0) && 2 * capped >= last.len() && capped < last.len(), "{name}: {last:?}");
    }
}

#[test]
fn uncapped_median_matches_cpu_kernels() {
    // ratio_cap = inf: the quieter half of the group steps above the base rate (r > 1), the
    // same on both backends; a cap of 1.1 stops it there.
    STAT.with(|s| *s.borrow_mut() = Some("median"));
    let last_of = |cap: f64| {
        CAP.with(|s| *s.borrow_mut() = Some(cap));
        let got = compare_shaped("hidden", &hidden_specs(dtype::F32), 1, "float32", 2e-4, false, None, Some((0.5, 0.0)));
        got.last().unwrap().iter().skip(6).step_by(RETS_PER_LEAF).flatten().copied().collect::<Vec<f32>>()
    };
    let (free, capped) = (last_of(f64::INFINITY), last_of(1.1));
    CAP.with(|s| *s.borrow_mut() = None);
    STAT.with(|s| *s.borrow_mut() = None);
    assert!(free.iter().any(|&r| r > 1.1) && free.iter().any(|&r| r < 1.0), "{free:?}");
    assert!(capped.iter().all(|&r| r <= 1.1) && capped.contains(&1.1), "{capped:?}");
}

#[test]
fn every_step_enqueues_the_same_work_and_noise_products_skip_cublas() {
    // K = 2 over 4 steps: steps 2 and 4 refresh the tracker, 1 and 3 do not. The direction's
    // products go to cuBLAS (bf16 here) and the noise estimate's to lanton_noise_gemm, which
    // reads the step count on the device: the host enqueues the same launches on every step,
    // so nothing needs a conditional (and results still match the CPU, noise steps included).
    // hidden_specs: two shape classes (16 x 8, five layers; 12 x 20, one layer).
    let (steps, classes) = (4, 2);
    take_launches();
    take_gemms();
    compare("hidden", &hidden_specs(dtype::F32), 2, "bfloat16", 6e-2, false, None);
    let (seen, (f32_gemms, bf16_gemms)) = (take_launches(), take_gemms());
    let (direction_iters, noise_iters) = (5, 7); // NS5, and the nuclear norm's 5 + 2 polar steps
    assert_eq!((f32_gemms, bf16_gemms), (0, steps * classes * direction_iters * 3), "cuBLAS products");
    assert_eq!(launches_of(&seen, "lanton_noise_gemm"), steps * classes * noise_iters * 3);
    assert_eq!(launches_of(&seen, "lanton_affine_diag"), steps * classes * (direction_iters + noise_iters));
    assert_eq!(launches_of(&seen, "lanton_dot"), steps);
}

#[test]
fn tf32_noise_products_run_on_the_tensor_core_kernel_and_match_the_cpu() {
    // LANTON_NOISE_GEMM=tf32 on a device with tensor cores: the same launches, with
    // lanton_noise_gemm_tc in place of lanton_noise_gemm; TF32 operands (10-bit mantissas) move
    // the noise estimate by ~1e-3 relative, the ratios and updates by less.
    let (steps, classes, noise_iters) = (4, 2, 7);
    take_launches();
    NOISE_GEMM.with(|n| *n.borrow_mut() = Some("tf32"));
    compare("hidden", &hidden_specs(dtype::F32), 2, "float32", 2e-3, false, None);
    NOISE_GEMM.with(|n| *n.borrow_mut() = None);
    let seen = take_launches();
    assert_eq!(launches_of(&seen, "lanton_noise_gemm"), 0);
    assert_eq!(launches_of(&seen, "lanton_noise_gemm_tc"), steps * classes * noise_iters * 3);
}

#[test]
fn the_noise_gemm_choice_is_simt_unless_tf32_is_asked_for_on_tensor_cores() {
    let (simt, tc) = (kernel("lanton_noise_gemm"), kernel("lanton_noise_gemm_tc"));
    assert_eq!(noise_gemm_kernel(None, true), Ok(simt));
    assert_eq!(noise_gemm_kernel(Some("simt"), true), Ok(simt));
    assert_eq!(noise_gemm_kernel(Some("tf32"), true), Ok(tc));
    assert_eq!(noise_gemm_kernel(Some("tf32"), false), Ok(simt), "no TF32 mma before compute capability 8.0");
    let err = noise_gemm_kernel(Some("TF32x3"), true).unwrap_err();
    assert!(err.contains("LANTON_NOISE_GEMM") && err.contains("TF32x3") && err.contains("tf32"), "{err}");
}

fn kernel(name: &str) -> Kernel {
    Kernel::named(name).unwrap()
}

/// A column-major f64 product of `(rows, cols)` operands, op() by the flags: the test's oracle.
fn product(g: &GemmArgs, a: &[f32], b: &[f32], c0: &[f32], batch: usize) -> Vec<f32> {
    let mut c = c0.to_vec();
    for z in 0..batch {
        let (a, b) = (&a[z * g.stride_a as usize..], &b[z * g.stride_b as usize..]);
        for j in 0..g.n as usize {
            for i in 0..g.m as usize {
                let mut acc = 0.0f64;
                for p in 0..g.k as usize {
                    let x = if g.trans_a != 0 { a[p + i * g.lda as usize] } else { a[i + p * g.lda as usize] };
                    let y = if g.trans_b != 0 { b[j + p * g.ldb as usize] } else { b[p + j * g.ldb as usize] };
                    acc += x as f64 * y as f64;
                }
                let at = z * g.stride_c as usize + i + j * g.ldc as usize;
                let old = if g.beta != 0.0 { g.beta as f64 * c[at] as f64 } else { 0.0 };
                c[at] = (g.alpha as f64 * acc + old) as f32;
            }
        }
    }
    c
}

#[test]
fn noise_gemm_multiplies_the_due_matrices_and_leaves_the_others_alone() {
    noise_gemm_case("lanton_noise_gemm");
}

#[test]
fn tensor_core_noise_gemm_multiplies_within_tf32_rounding() {
    noise_gemm_case("lanton_noise_gemm_tc");
}

/// Several 64 x 64 tiles with ragged edges, both transposes, beta = 0 (C never read: it starts
/// as NaN) and beta != 0, a batch of 2; the gate: a matrix whose `due` flag is 0 (not measured
/// this step) must keep C bitwise as it was. The TF32 kernel rounds each operand to 11
/// significant bits: within 2^-10 |alpha| sum |a||b| of the f64 product (a wrong fragment
/// layout is off by the size of the entries themselves).
fn noise_gemm_case(name: &str) {
    let tf32 = name.ends_with("_tc");
    let mut rng = Rng::new(5);
    let (m, n, k, batch) = (70usize, 130usize, 40usize, 2usize);
    for (trans_a, trans_b, beta) in [(false, false, 0.0f32), (true, false, 0.5), (false, true, 0.0), (true, true, -1.5)] {
        let lda = if trans_a { k + 3 } else { m + 1 };
        let ldb = if trans_b { n } else { k + 2 };
        let ldc = m + 5;
        let (sa, sb, sc) = (lda * if trans_a { m } else { k }, ldb * if trans_b { k } else { n }, ldc * n);
        let a = rng.normals(sa * batch, 1.0);
        let b = rng.normals(sb * batch, 1.0);
        let c0 = if beta == 0.0 { vec![f32::NAN; sc * batch] } else { rng.normals(sc * batch, 1.0) };
        // Matrix z is multiplied only if due[1 + z] (the flags of a batch that starts at index 1).
        for due in [[9, 1, 1], [9, 0, 0], [9, 0, 1], [9, 1, 0]] {
            let mut c = c0.clone();
            let mut args = GemmArgs {
                a: a.as_ptr(), b: b.as_ptr(), c: c.as_mut_ptr(), stride_a: sa as i64, stride_b: sb as i64,
                stride_c: sc as i64, m: m as i32, n: n as i32, k: k as i32, lda: lda as i32, ldb: ldb as i32,
                ldc: ldc as i32, trans_a: trans_a as i32, trans_b: trans_b as i32, alpha: 0.75, beta,
                due: due.as_ptr(), due_first: 1, unused: 0,
            };
            let grid = Grid { x: (m.div_ceil(64) * n.div_ceil(64)) as u32, y: batch as u32, block: 256 };
            // SAFETY: the arguments lanton_noise_gemm takes; every operand holds the batch.
            unsafe { HostQueue.launch(kernel(name), grid, &mut [&mut args as *mut GemmArgs as *mut c_void]) }.unwrap();
            let what = format!("{name}: trans ({trans_a}, {trans_b}) beta {beta} due {due:?}");
            let want = product(&args, &a, &b, &c0, batch);
            let abs = |v: &[f32]| v.iter().map(|x| x.abs()).collect::<Vec<f32>>();
            let size = product(&GemmArgs { alpha: args.alpha.abs(), beta: 0.0, ..args }, &abs(&a), &abs(&b), &c0, batch);
            for z in 0..batch {
                let mine = z * sc..(z + 1) * sc;
                if due[1 + z] == 0 {
                    let kept = c[mine.clone()].iter().zip(&c0[mine]).all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(kept, "{what}: C[{z}] was written");
                    continue;
                }
                for j in 0..n {
                    for i in 0..m {
                        let at = z * sc + i + j * ldc;
                        let tol = 1e-4 * (1.0 + want[at].abs()) + if tf32 { size[at] / 1024.0 } else { 0.0 };
                        assert!((c[at] - want[at]).abs() <= tol, "{what}: C[{z}][{i},{j}] {} vs {}", c[at], want[at]);
                    }
                }
            }
        }
    }
    take_launches();
}


/// H of every layer after two steps with noise_every = 1 and beta2 = 0: G_prev = `g1` is stored
/// at step 1, so step 2 sets H = (dual_factor * ||g2 - g1||_*)^2 exactly as the estimator measures.
fn noise_after_two_steps(specs: &[LeafSpec], g1: &[f32], g2: &[f32], handler: Handler, cuda: bool, estimator: &str) -> Vec<f32> {
    let mut f = step_frame("hidden", specs, 1, &mut Rng::new(1));
    f.args[0] = OwnedBuffer::f32(&[5], &[0.02, 0.9, 0.0, 0.01, 0.2]); // beta2 = 0: H = n^2
    f.set_attr("noise_estimator", Attr::Str(estimator.into()));
    f.set_attr("ns_dtype", Attr::Str("float32".into()));
    if cuda {
        add_scratch(&mut f, cuda_scratch_bytes(&scratch_plan_json("hidden", specs, true, true, "float32")).unwrap());
    }
    for (t, g) in [(1, g1), (2, g2)] {
        f.args[1] = OwnedBuffer::i32(&[], &[t]);
        f.args[3] = buffer_like(&f.args[3], g);
        f.call(handler).unwrap();
        carry_state(&mut f, 0);
    }
    f.rets[3].to_f32()
}

#[test]
fn noise_estimate_within_one_percent_of_svd_with_tf32_products() {
    // The accuracy table of the noise estimate (||G - G_prev||_* by polar iteration) by product
    // precision, against an f64 SVD, on the spectra of tests/kernels.rs (power-law, exponential,
    // rank 4, rank 1, flat; square, wide and tall; f32 and bf16 gradients, the reference seeing
    // the difference the kernels see). Rows: the CPU's Gram-eigenvalue estimator (its default),
    // the CPU's f32 polar iteration, and the emulated CUDA step with the polar iteration's
    // products on lanton_noise_gemm (f32, CUDA cores) and on lanton_noise_gemm_tc (TF32 tensor
    // cores, mma emulated with cvt.rna rounding). Bar: ALGORITHM.md's 1 % for every row. The
    // table goes to $CARGO_TARGET_TMPDIR/noise_accuracy.md (benches/results/noise_accuracy.md).
    let cpu = lanton_step_update_cpu as Handler;
    let precisions: [(&str, Handler, bool, Option<&'static str>, &str); 4] = [
        ("cpu gram-eigen (f64)", cpu, false, None, "eigen"),
        ("cpu polar (f32)", cpu, false, None, "polar"),
        ("emulated polar, f32 products", emulated_update, true, None, "polar"),
        ("emulated polar, TF32 products", emulated_update, true, Some("tf32"), "polar"),
    ];
    let mut rng = Rng::new(41);
    let mut table = format!(
        "| shape | grad | spectrum | {} |\n|---|---|---|{}\n",
        precisions.map(|p| p.0).join(" | "),
        "---|".repeat(precisions.len())
    );
    let mut worst = [0.0f64; 4];
    for (r, c) in [(64usize, 64usize), (48, 120), (120, 48), (200, 96)] {
        for dt in [dtype::F32, dtype::BF16] {
            let spectra = test_spectra(r.min(c));
            let (layers, len) = (spectra.len(), r * c);
            let specs = vec![LeafSpec { dims: [layers as i64, r as i64, c as i64], dtype: dt, rows_are_input: true }];
            let g1 = rng.normals(layers * len, 1.0);
            let mut g2 = g1.clone();
            for (l, (_, s)) in spectra.iter().enumerate() {
                let d = with_spectrum(&mut rng, r, c, s);
                g2[l * len..(l + 1) * len].iter_mut().zip(&d).for_each(|(g, x)| *g += x);
            }
            let seen = |g: &[f32]| if dt == dtype::BF16 { g.iter().map(|&x| bf16::from_f32(x).to_f32()).collect() } else { g.to_vec() };
            let (s1, s2) = (seen(&g1), seen(&g2));
            let shape = lanton::step::LayerShape { layers, rows: r, cols: c, rows_are_input: true };
            let factor = lanton::step::dual_norm_factor(lanton::step::Kind::Hidden, &shape) as f64;
            let want: Vec<f64> = (0..layers)
                .map(|l| {
                    let diff: Vec<f32> = (l * len..(l + 1) * len).map(|i| s2[i] - s1[i]).collect();
                    factor * nuclear_f64(&diff, r, c)
                })
                .collect();
            let mut rel = vec![[0.0f64; 4]; layers];
            for (p, &(name, handler, cuda, gemm, estimator)) in precisions.iter().enumerate() {
                NOISE_GEMM.with(|n| *n.borrow_mut() = gemm);
                take_launches();
                let h = noise_after_two_steps(&specs, &g1, &g2, handler, cuda, estimator);
                NOISE_GEMM.with(|n| *n.borrow_mut() = None);
                let seen = take_launches();
                let kernel = if gemm.is_some() { "lanton_noise_gemm_tc" } else { "lanton_noise_gemm" };
                assert_eq!(launches_of(&seen, kernel) > 0, cuda, "{name}: {kernel} launches {seen:?}");
                for l in 0..layers {
                    rel[l][p] = ((h[l] as f64).sqrt() - want[l]).abs() / want[l];
                    assert!(rel[l][p] < 1e-2, "{name} {} {r}x{c} {}: n {} vs {} (rel {:.2e})",
                            spectra[l].0, dtype::name(dt), (h[l] as f64).sqrt(), want[l], rel[l][p]);
                    worst[p] = worst[p].max(rel[l][p]);
                }
            }
            for (l, (label, _)) in spectra.iter().enumerate() {
                let cells: Vec<String> = rel[l].iter().map(|e| format!("{e:.1e}")).collect();
                table += &format!("| {r}x{c} | {} | {label} | {} |\n", dtype::name(dt), cells.join(" | "));
            }
        }
    }
    let cells: Vec<String> = worst.iter().map(|e| format!("**{e:.1e}**")).collect();
    table += &format!("| worst | | | {} |\n", cells.join(" | "));
    std::fs::write(PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("noise_accuracy.md"), &table).unwrap();
}

#[test]
fn results_are_bitwise_the_same_in_any_block_order() {
    // A GPU runs a launch's blocks in any order. With fixed-order reductions (each block writes
    // its partial sums to its own slot, lanton_sum_chunks adds them in a fixed order; no
    // floating-point atomics) every result, and the whole scratch with its f64 accumulators, is
    // bitwise the same when the blocks run last to first. Layers over several blocks: hidden
    // 40 x 64 (3 chunks), embed 50 x 64 (4), vector 3,000 (3); K = 2 over 4 steps (noise steps
    // and skips), f32 and bf16.
    for dt in [dtype::F32, dtype::BF16] {
        let cases = [
            ("hidden", vec![LeafSpec { dims: [2, 40, 64], dtype: dt, rows_are_input: false }, LeafSpec { dims: [1, 64, 40], dtype: dt, rows_are_input: true }]),
            ("embed", vec![LeafSpec { dims: [1, 50, 64], dtype: dt, rows_are_input: true }]),
            ("vector", vec![LeafSpec { dims: [3, 1, 8], dtype: dt, rows_are_input: true }, LeafSpec { dims: [1, 1, 3000], dtype: dt, rows_are_input: true }]),
        ];
        for (kind, specs) in cases {
            let run = |reverse: bool| {
                REVERSE_BLOCKS.with(|r| *r.borrow_mut() = reverse);
                let out = raw_trajectory(kind, &specs, 2, 4, emulated_update, false, "float32", None, true, None);
                REVERSE_BLOCKS.with(|r| *r.borrow_mut() = false);
                out
            };
            let (forward, reversed) = (run(false), run(true));
            for (t, (a, b)) in forward.iter().zip(&reversed).enumerate() {
                for (j, (x, y)) in a.iter().zip(b).enumerate() {
                    let what = if j == a.len() - 1 { "the scratch".to_string() } else { format!("leaf {} result {}", j / RETS_PER_LEAF, j % RETS_PER_LEAF) };
                    let diff = x.data.iter().zip(&y.data).position(|(p, q)| p != q);
                    assert!(diff.is_none(), "{kind} {}: step {} {what} differs at word {diff:?} when the blocks run in reverse", dtype::name(dt), t + 1);
                }
            }
        }
    }
}

#[test]
fn every_step_enqueues_the_same_operations_in_the_same_order() {
    // K = 3 over 6 steps: plain steps (1, 4), steps that store G_prev (2, 5) and noise steps
    // (3, 6) queue one sequence: the same kernels with the same grids, the same products with the
    // same shapes, the same copies and fills, in the same order (the device decides from its step
    // count what each launch does). Each step starts with the scratch fill.
    // The staggered schedule (every step measures some layers) queues that sequence too.
    let record = |staggered: bool| {
        STAGGERED.with(|s| *s.borrow_mut() = staggered);
        SEQUENCE.with(|s| *s.borrow_mut() = Some(Vec::new()));
        trajectory("hidden", &hidden_specs(dtype::F32), 3, 6, emulated_update, false, "bfloat16", None, true, None);
        STAGGERED.with(|s| *s.borrow_mut() = false);
        SEQUENCE.with(|s| s.borrow_mut().take()).unwrap()
    };
    let (seq, staggered) = (record(false), record(true));
    assert_eq!(seq, staggered, "the staggered schedule queues other operations");
    let mut steps: Vec<Vec<String>> = Vec::new();
    for op in seq {
        if op.starts_with("zero ") {
            steps.push(Vec::new());
        }
        steps.last_mut().expect("a step starts with the scratch fill").push(op);
    }
    assert_eq!(steps.len(), 6);
    for (t, step) in steps.iter().enumerate().skip(1) {
        assert_eq!(step, &steps[0], "step {} queues other operations than step 1", t + 1);
    }
    let first = &steps[0];
    for want in ["lanton_stats", "lanton_sum_chunks", "lanton_noise_gemm ", "lanton_dot", "gemm (", "lanton_apply"] {
        assert!(first.iter().any(|op| op.starts_with(want)), "no {want} in {first:?}");
    }
}
