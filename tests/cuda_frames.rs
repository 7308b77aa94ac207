//! The CUDA handlers driven with the fake Api (no GPU): frames are decoded and validated
//! exactly like the CPU ones, the launch plan (shape classes, scratch layout, per-leaf kernel
//! arguments) is right, the scratch result is checked against it (and sized by the C ABI's
//! `lanton_cuda_scratch_bytes` from the same plan), nothing is allocated, and a call that
//! reaches the device layer without a GPU fails cleanly.

mod common;
use common::*;
use lanton::cuda::{CudaOptions, Plan};
use lanton::ffi::api::*;
use lanton::handlers::{decode_cuda_options, decode_layout, lanton_step_inplace_cuda, lanton_step_update_cuda};
use std::cell::RefCell;

fn expect_error(f: &mut Frame, handler: Handler, needles: &[&str]) {
    let err = f.call(handler).expect_err("frame was accepted");
    for n in needles {
        assert!(err.contains(n), "error {err:?} should mention {n:?}");
    }
}

fn frame(kind: &str, dtype: i32) -> Frame {
    step_frame(kind, &two_leaves(dtype), 3, &mut Rng::new(11))
}

#[test]
fn cuda_handlers_validate_before_touching_the_device() {
    for h in [lanton_step_update_cuda as Handler, lanton_step_inplace_cuda] {
        let mut f = frame("hidden", dtype::F32);
        f.args[3] = OwnedBuffer::zeros(dtype::F64, &[1, 12, 20]);
        expect_error(&mut f, h, &["blocks/0/kernel (grad)", "unsupported dtype float64"]);
        let mut f = frame("hidden", dtype::F32);
        f.args[2 + lanton::handlers::ARGS_PER_LEAF] = OwnedBuffer::zeros(dtype::F32, &[2, 16, 9]); // leaf 1's param
        expect_error(&mut f, h, &["blocks/1/kernel (grad)", "expected shape [2, 16, 9], got [2, 16, 8]"]);
        let mut f = frame("hidden", dtype::F32);
        f.set_attr("ns_dtype", Attr::Str("float8".into()));
        expect_error(&mut f, h, &["'ns_dtype'", "got 'float8'"]);
        let mut f = frame("hidden", dtype::F32);
        f.set_attr("noise_work", Attr::Str("yes".into()));
        expect_error(&mut f, h, &["'noise_work'"]);
        let mut f = frame("hidden", dtype::F32);
        f.set_attr("noise_estimator", Attr::Str("eigen".into()));
        expect_error(&mut f, h, &["'noise_estimator'", "CPU only"]);
        let mut f = frame("hidden", dtype::F32);
        f.set_attr("noise_estimator", Attr::Str("svd".into()));
        expect_error(&mut f, h, &["'noise_estimator'", "got 'svd'"]);
        let mut f = frame("hidden", dtype::F32);
        f.set_attr("noise_relative", Attr::Bool(true));
        expect_error(&mut f, h, &["'noise_relative'", "CPU only"]);
        // (K = 3: the second leaf's two layers get phases 0 and 1; with K = 1 all would be 0 and
        // the call needs no phases, as for the synchronous schedule.)
        let mut f = frame("hidden", dtype::F32);
        f.set_attr("noise_schedule", Attr::Str("staggered".into()));
        f.set_attr("noise_every", Attr::I64(3));
        expect_error(&mut f, h, &["noise_schedule 'staggered' needs the trailing 'phases' argument on the CUDA targets"]);
    }
}

/// The scratch bytes of `frame(kind, _)`'s call (defaults: noise work on, bf16 Newton-Schulz).
fn frame_scratch(kind: &str) -> u64 {
    cuda_scratch_bytes(&scratch_plan_json(kind, &two_leaves(dtype::F32), true, true, "bfloat16")).unwrap()
}

#[test]
fn a_valid_call_without_a_gpu_fails_cleanly_at_the_stream() {
    // The fake Api answers Stream_Get like XLA's CPU client: the error surfaces, nothing crashes.
    for h in [lanton_step_update_cuda as Handler, lanton_step_inplace_cuda] {
        let mut f = frame("hidden", dtype::BF16);
        add_scratch(&mut f, frame_scratch("hidden"));
        expect_error(&mut f, h, &["lanton_step_", "_cuda", "Stream_Get", "GPU context is not available"]);
    }
}

#[test]
fn the_scratch_result_is_checked_before_the_device_and_nothing_is_allocated() {
    for h in [lanton_step_update_cuda as Handler, lanton_step_inplace_cuda] {
        for kind in ["hidden", "embed", "vector"] {
            let need = frame_scratch(kind);
            let group = format!("the {kind} group (blocks/0/kernel, blocks/1/kernel)");
            // No scratch result: the shim is older than the library.
            let mut f = frame(kind, dtype::F32);
            expect_error(&mut f, h, &[&group, "trailing uint8 scratch result", "lanton_cuda_scratch_bytes", "only the results of its 2 leaves"]);
            // One byte short of the plan.
            let mut f = frame(kind, dtype::F32);
            add_scratch(&mut f, need - 1);
            let msg = format!("holds {} bytes, but the step needs {need}", need - 1);
            expect_error(&mut f, h, &[&group, &msg, "[code 3]"]);
            // Not bytes, or not one-dimensional.
            let mut f = frame(kind, dtype::F32);
            f.rets.push(OwnedBuffer::zeros(dtype::F32, &[need as i64]));
            expect_error(&mut f, h, &["result 'scratch': expected uint8, got float32"]);
            let mut f = frame(kind, dtype::F32);
            f.rets.push(OwnedBuffer::zeros(dtype::U8, &[1, need as i64]));
            expect_error(&mut f, h, &["result 'scratch': expected rank 1"]);
            // Exactly the plan's size, or more: accepted (the call goes on to the stream).
            for extra in [0, 4096] {
                let mut f = frame(kind, dtype::F32);
                add_scratch(&mut f, need + extra);
                expect_error(&mut f, h, &["Stream_Get"]);
            }
        }
    }
    // Two extra results are no scratch: the count is refused as such.
    let mut f = frame("hidden", dtype::F32);
    add_scratch(&mut f, 1);
    add_scratch(&mut f, 1);
    expect_error(&mut f, lanton_step_update_cuda, &["expected 8 x 2 results for 2 leaves (plus one uint8 scratch result on CUDA), got 18"]);
    assert_eq!(device_memory_calls(), 0, "the CUDA handlers must not call DeviceMemory_Allocate/Free");
}

#[test]
fn cpu_handlers_refuse_a_scratch_result() {
    for h in [lanton::handlers::lanton_step_update_cpu as Handler, lanton::handlers::lanton_step_inplace_cpu] {
        let mut f = frame("hidden", dtype::F32);
        add_scratch(&mut f, 1024);
        expect_error(&mut f, h, &["the CPU targets take no scratch result", "expected 8 x 2 results"]);
        let mut f = frame("vector", dtype::F32);
        f.call(h).unwrap();
    }
}

#[test]
fn scratch_bytes_of_the_c_abi_equal_the_handlers_plan() {
    // Every group the plan distinguishes: kinds, data dtypes, Newton-Schulz dtypes, noise on and
    // off, repeated shapes (one class), zero-size leaves and leaves without layers.
    let groups: Vec<Vec<LeafSpec>> = vec![
        two_leaves(dtype::F32),
        two_leaves(dtype::BF16),
        vec![
            LeafSpec { dims: [2, 16, 8], dtype: dtype::BF16, rows_are_input: false },
            LeafSpec { dims: [1, 12, 20], dtype: dtype::F32, rows_are_input: true },
            LeafSpec { dims: [3, 16, 8], dtype: dtype::BF16, rows_are_input: true },
            LeafSpec { dims: [1, 8, 16], dtype: dtype::F32, rows_are_input: true },
        ],
        vec![
            LeafSpec { dims: [2, 0, 8], dtype: dtype::F32, rows_are_input: true },
            LeafSpec { dims: [1, 12, 0], dtype: dtype::F32, rows_are_input: true },
            LeafSpec { dims: [0, 4, 4], dtype: dtype::F32, rows_are_input: true },
            LeafSpec { dims: [3, 16, 8], dtype: dtype::F32, rows_are_input: true },
        ],
        vec![LeafSpec { dims: [0, 4, 4], dtype: dtype::BF16, rows_are_input: true }],
        vec![LeafSpec { dims: [300, 1, 8], dtype: dtype::F32, rows_are_input: true },
             LeafSpec { dims: [1, 1, 3000], dtype: dtype::BF16, rows_are_input: true }],
    ];
    let mut seen = std::collections::BTreeSet::new();
    for specs in &groups {
        for kind in ["hidden", "embed", "vector"] {
            for (adaptive, work, ns) in [(true, true, "bfloat16"), (true, false, "bfloat16"), (true, true, "float32"),
                                         (true, false, "float32"), (false, true, "bfloat16"), (false, true, "float32")] {
                let mut f = step_frame(kind, specs, 3, &mut Rng::new(4));
                f.set_attr("noise_adaptive", Attr::Bool(adaptive));
                f.set_attr("noise_work", Attr::Bool(work));
                f.set_attr("ns_dtype", Attr::Str(ns.into()));
                let (plan, _, _) = probe(&mut f);
                let json = scratch_plan_json(kind, specs, adaptive, work, ns);
                assert_eq!(cuda_scratch_bytes(&json).unwrap(), plan.len as u64, "{json}");
                seen.insert(plan.len);
            }
        }
    }
    assert!(seen.len() > 12, "the groups above should need many different sizes: {seen:?}");
    // The deterministic reductions' slots: as many per layer as the longest layer has chunks
    // (3,000 elements: 3 blocks of 1,024), for all 301 layers, inside the zeroed prefix.
    let (plan, _, _) = probe(&mut step_frame("vector", &groups[5], 3, &mut Rng::new(4)));
    assert_eq!(plan.group.chunk_stride, 3);
    assert!(plan.offsets.partials + 301 * 3 * 4 * 8 <= plan.offsets.zeroed);
    // Absent options take the handler's defaults (noise work on, bf16 operands).
    let specs = two_leaves(dtype::F32);
    let (plan, _, _) = probe(&mut frame("hidden", dtype::F32));
    assert_eq!(cuda_scratch_bytes(r#"{"kind": "hidden", "leaves": [[1, 12, 20], [2, 16, 8]]}"#).unwrap(), plan.len as u64);
    assert_eq!(cuda_scratch_bytes(&scratch_plan_json("hidden", &specs, true, true, "bfloat16")).unwrap(), plan.len as u64);
}

#[test]
fn scratch_bytes_errors_are_reported() {
    let err = |json: &str| cuda_scratch_bytes(json).unwrap_err();
    let e = err("{");
    assert!(e.contains("[1] plan is not valid JSON"), "{e}");
    let e = err(r#"{"kind": "hidden", "leaves": [], "noise_evry": 1}"#);
    assert!(e.contains("unknown key 'noise_evry'"), "{e}");
    let e = err(r#"{"leaves": []}"#);
    assert!(e.contains("'kind' (hidden, embed, vector or adam) is required"), "{e}");
    let e = err(r#"{"kind": "conv", "leaves": []}"#);
    assert!(e.contains("unknown kind 'conv'"), "{e}");
    let e = err(r#"{"kind": "hidden"}"#);
    assert!(e.contains("'leaves'"), "{e}");
    for bad in ["[1, 2]", "[1, -2, 3]", "[1, 2.5, 3]", "\"1x2x3\"", "[1, 2, 3, 4]"] {
        let e = err(&format!(r#"{{"kind": "embed", "leaves": [[1, 1, 1], {bad}]}}"#));
        assert!(e.contains("leaf 1 must be [layers, rows, cols]"), "{e}");
    }
    let e = err(r#"{"kind": "hidden", "leaves": [[1, 4, 4]], "ns_dtype": "float16"}"#);
    assert!(e.contains("'ns_dtype'"), "{e}");
    let e = err(r#"{"kind": "hidden", "leaves": [[1, 4, 4]], "noise_work": 1}"#);
    assert!(e.contains("'noise_work' must be true or false"), "{e}");
    // Sizes that would overflow the layout, or more layers than the kernels index.
    for leaves in ["[[1, 4294967296, 4294967296]]", "[[4294967296, 4294967296, 1]]", "[[18446744073709551615, 1, 1]]",
                   "[[1099511627776, 1024, 1024], [1, 1, 1]]"] {
        let e = err(&format!(r#"{{"kind": "hidden", "leaves": {leaves}}}"#));
        assert!(e.contains("too large") || e.contains("layers"), "{leaves}: {e}");
    }
    let e = err(r#"{"kind": "vector", "leaves": [[2147483647, 0, 1], [1, 0, 1]]}"#);
    assert!(e.contains("more than 2147483647 layers"), "{e}");
    // A huge dimension beside a zero one is an empty leaf: fine.
    assert!(cuda_scratch_bytes(r#"{"kind": "hidden", "leaves": [[5, 4611686018427387904, 0]]}"#).is_ok());
    // Null pointers and a short error buffer: codes, never a crash.
    let json = std::ffi::CString::new(r#"{"kind": "hidden", "leaves": []}"#).unwrap();
    let mut bytes = 0u64;
    let rc = unsafe { lanton::capi::lanton_cuda_scratch_bytes(std::ptr::null(), &mut bytes, std::ptr::null_mut(), 0) };
    assert_eq!(rc, lanton::capi::LANTON_ERR_INVALID);
    let mut small = [1 as std::ffi::c_char; 8];
    let rc = unsafe { lanton::capi::lanton_cuda_scratch_bytes(json.as_ptr(), std::ptr::null_mut(), small.as_mut_ptr(), small.len()) };
    assert_eq!(rc, lanton::capi::LANTON_ERR_INVALID);
    assert_eq!(unsafe { std::ffi::CStr::from_ptr(small.as_ptr()) }.to_bytes(), b"plan_js");
    let rc = unsafe { lanton::capi::lanton_cuda_scratch_bytes(json.as_ptr(), &mut bytes, std::ptr::null_mut(), 0) };
    assert_eq!((rc, bytes > 0), (lanton::capi::LANTON_OK, true));
}

#[test]
fn cuda_handlers_answer_the_metadata_query() {
    for h in [lanton_step_update_cuda as Handler, lanton_step_inplace_cuda] {
        let meta = query_metadata(h);
        assert_eq!(meta.traits, TRAIT_COMMAND_BUFFER_COMPATIBLE, "CUDA handlers must be graph-capturable");
        assert_eq!((meta.api_version.major_version, meta.api_version.minor_version), (0, 3));
    }
}

/// What the probe handler saw: the plan, the options, and each leaf's (param result, grad) addresses.
type Seen = (Plan, CudaOptions, Vec<(usize, usize)>);

thread_local! {
    static SEEN: RefCell<Option<Seen>> = const { RefCell::new(None) };
    /// The scratch base address the probe plans for.
    static BASE: std::cell::Cell<usize> = const { std::cell::Cell::new(SCRATCH) };
}

const SCRATCH: usize = 0x7000_0000;

unsafe extern "C" fn plan_probe(frame: *mut XLA_FFI_CallFrame) -> *mut XLA_FFI_Error {
    lanton::ffi::handler::dispatch(frame, "plan_probe", 0, |c| {
        let layout = decode_layout(c, false)?;
        let opts = decode_cuda_options(c)?;
        let buffers = layout.leaves.iter().map(|l| (l.param.ret.data as usize, l.grad.data as usize)).collect();
        let base = BASE.with(|b| b.get());
        let plan = Plan::new(&layout, opts, base).map_err(lanton::ffi::FfiError::invalid)?;
        SEEN.with(|s| *s.borrow_mut() = Some((plan, opts, buffers)));
        Ok(())
    })
}

fn probe(f: &mut Frame) -> Seen {
    f.call(plan_probe).unwrap();
    SEEN.with(|s| s.borrow_mut().take()).unwrap()
}

#[test]
fn hidden_plan_batches_same_shapes_and_points_into_the_frame() {
    let specs = vec![
        LeafSpec { dims: [2, 16, 8], dtype: dtype::BF16, rows_are_input: false },
        LeafSpec { dims: [1, 12, 20], dtype: dtype::BF16, rows_are_input: true },
        LeafSpec { dims: [3, 16, 8], dtype: dtype::BF16, rows_are_input: true },
    ];
    let mut f = step_frame("hidden", &specs, 5, &mut Rng::new(2));
    let (plan, opts, bufs) = probe(&mut f);
    assert_eq!(opts, CudaOptions { noise_work: true, ns_f32: false });
    // Two classes: 16x8 (2 + 3 layers, in order of appearance) and 12x20.
    assert_eq!(plan.classes.len(), 2);
    assert_eq!((plan.classes[0].rows, plan.classes[0].cols, plan.classes[0].batch, plan.classes[0].base), (16, 8, 5, 0));
    assert_eq!((plan.classes[1].rows, plan.classes[1].cols, plan.classes[1].batch, plan.classes[1].base), (12, 20, 1, 5 * 128));
    let o = plan.offsets;
    let ns = |leaf: usize| plan.leaves[leaf].ns_in as usize - SCRATCH - o.x;
    // bf16 operands: 2 bytes per element; leaf 2 follows leaf 0's two layers in class 0.
    assert_eq!((ns(0), ns(1), ns(2)), (0, 5 * 128 * 2, 2 * 128 * 2));
    assert_eq!(plan.leaves[2].noise_in as usize - SCRATCH - o.n0, 2 * 128 * 4, "noise operands are f32");
    assert_eq!(plan.group_layers, 6);
    assert_eq!(plan.leaves.iter().map(|l| l.group_layer).collect::<Vec<_>>(), vec![0, 2, 3]);
    // Every sub-buffer inside the allocation, 256-byte aligned, not overlapping.
    // One partial-sum slot per layer here (128-element layers fit one block), ACC_N doubles each.
    assert_eq!(plan.group.chunk_stride, 1);
    let mut spans = [(o.acc, 6 * 4 * 8), (o.partials, 6 * 4 * 8), (o.reference, 16), (o.h, 24), (o.valid, 24), (o.workspace, o.workspace_len),
                         (o.x, (640 + 240) * 2), (o.y, (640 + 240) * 2), (o.n0, (640 + 240) * 4)];
    spans.sort();
    for w in spans.windows(2) {
        assert!(w[0].0 + w[0].1 <= w[1].0, "scratch spans overlap: {w:?}");
    }
    assert!(spans.iter().all(|&(off, len)| off % 256 == 0 && off + len <= plan.len));
    assert!(o.zeroed >= o.valid + 24 && o.zeroed >= o.partials + 6 * 4 * 8 && o.zeroed <= o.workspace);
    // Kernel arguments point at the frame's buffers, with the right dtypes and scales.
    for (leaf, (out, grad)) in plan.leaves.iter().zip(&bufs) {
        assert_eq!((leaf.out as usize, leaf.grad as usize), (*out, *grad));
        assert_eq!((leaf.dt_param, leaf.dt_grad, leaf.dt_mom, leaf.dt_ns), (dtype::BF16, dtype::BF16, dtype::F32, dtype::BF16));
        assert_eq!(leaf.in_place, 0);
    }
    assert!((plan.leaves[1].shape_scale - 20f32.sqrt()).abs() < 1e-6);
    // d_out / d_in: leaf 0 has rows = d_out = 16, cols = d_in = 8.
    assert!((plan.leaves[0].dual_factor - 2f32.sqrt()).abs() < 1e-6);
    assert!((plan.leaves[2].dual_factor - 0.5f32.sqrt()).abs() < 1e-6);
    assert_eq!((plan.group.kind, plan.group.noise_every, plan.group.noise_work, plan.group.ratio_stat), (0, 1, 1, 0));
    assert!(plan.noise_polar);
}

#[test]
fn cublas_workspace_is_256_byte_aligned_whatever_the_scratch_base() {
    // XLA promises 16-byte aligned scratch; cuBLAS wants its workspace on 256 bytes.
    let mut sizes = Vec::new();
    for base in [SCRATCH, SCRATCH + 16, SCRATCH + 0x50, SCRATCH + 0xf0, SCRATCH + 0x100 + 0x80] {
        BASE.with(|b| b.set(base));
        let (plan, _, _) = probe(&mut frame("hidden", dtype::F32));
        BASE.with(|b| b.set(SCRATCH));
        let o = plan.offsets;
        assert_eq!(plan.scratch, base);
        assert_eq!((base + o.workspace) % 256, 0, "workspace at {:#x}", base + o.workspace);
        assert_eq!(o.workspace_len, 32 << 20);
        // The workspace stays inside its slack region: after the zeroed accumulators, before X.
        assert!(o.workspace >= o.zeroed && o.workspace + o.workspace_len <= o.x, "{o:?}");
        assert!(o.x + (240 + 2 * 128) * 4 <= plan.len);
        sizes.push(plan.len);
    }
    // The size asked of XLA is computed before the base is known: it must not depend on it.
    assert!(sizes.windows(2).all(|w| w[0] == w[1]), "{sizes:?}");
}

#[test]
fn options_change_the_plan() {
    let mut f = frame("hidden", dtype::F32);
    f.set_attr("noise_work", Attr::Bool(false));
    f.set_attr("ns_dtype", Attr::Str("float32".into()));
    let (plan, opts, _) = probe(&mut f);
    assert_eq!(opts, CudaOptions { noise_work: false, ns_f32: true });
    assert!(!plan.noise_polar && plan.group.noise_work == 0);
    assert!(plan.leaves.iter().all(|l| l.noise_in.is_null() && l.dt_ns == dtype::F32));
    assert_eq!(plan.offsets.n0, plan.offsets.nb, "no noise scratch without noise work");

    // Cheap kinds keep their noise work (a reduction) and need no Newton-Schulz scratch.
    for kind in ["embed", "vector"] {
        let mut f = frame(kind, dtype::F32);
        f.set_attr("noise_work", Attr::Bool(false));
        let (plan, _, _) = probe(&mut f);
        assert!(plan.classes.is_empty() && plan.group.noise_work == 1 && plan.offsets.workspace_len == 0);
        assert!(plan.leaves.iter().all(|l| l.ns_in.is_null()));
        assert_eq!(plan.leaves[0].shape_scale, 1.0);
    }
}

#[test]
fn leaves_are_batched_into_multi_tensor_launches() {
    use lanton::cuda::{batches, MAX_LEAVES};
    let specs: Vec<LeafSpec> =
        (0..MAX_LEAVES + 3).map(|i| LeafSpec { dims: [1 + (i % 2) as i64, 40, 70 + i as i64], dtype: dtype::F32, rows_are_input: true }).collect();
    let mut f = step_frame("hidden", &specs, 2, &mut Rng::new(5));
    let (plan, _, _) = probe(&mut f);
    let per_layer = batches(&plan.leaves, false).unwrap();
    assert_eq!(per_layer.len(), 2);
    assert_eq!((per_layer[0].0.count, per_layer[1].0.count), (MAX_LEAVES as i32, 3));
    for (b, blocks) in &per_layer {
        let n = b.count as usize;
        let mut total = 0;
        for i in 0..n {
            assert_eq!(b.first_block[i], total);
            // 40 x (70 + i) elements: chunks of 1024 per block.
            let len = b.leaf[i].layer_len as usize;
            assert_eq!(b.chunks[i] as usize, len.div_ceil(1024));
            total += b.chunks[i] * b.leaf[i].layers;
        }
        assert_eq!(*blocks as i32, total);
        assert!(b.first_block[n..].iter().all(|&x| x == total), "tail of the prefix sum");
    }
    // track: one thread per layer, one block per leaf here.
    let track = batches(&plan.leaves, true).unwrap();
    assert_eq!(track[0].1, MAX_LEAVES as u32);
    assert!(track[0].0.chunks[..MAX_LEAVES].iter().all(|&c| c == 1));
}

#[test]
fn initialize_stage_prepares_the_device_and_execute_runs_the_step() {
    // At initialize the CUDA handler goes for the stream (to compile its kernels) without
    // decoding the buffers; without a GPU that fails cleanly. The CPU handler ignores the stage.
    let mut f = Frame { stage: Some(STAGE_INITIALIZE), ..Frame::default() };
    expect_error(&mut f, lanton_step_update_cuda, &["lanton_step_update_cuda", "Stream_Get"]);
    f.call(lanton::handlers::lanton_step_update_cpu).unwrap();
    // Instantiate and prepare stages are no-ops for both.
    for stage in [0, 1] {
        let mut f = Frame { stage: Some(stage), ..Frame::default() };
        f.call(lanton_step_inplace_cuda).unwrap();
    }
}
