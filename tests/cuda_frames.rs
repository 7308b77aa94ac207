//! The CUDA handlers driven with the fake Api (no GPU): frames are decoded and validated
//! exactly like the CPU ones, the launch plan (shape classes, scratch layout, per-leaf kernel
//! arguments) is right, and a call that reaches the device layer without a GPU fails cleanly.

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
        f.args[9] = OwnedBuffer::zeros(dtype::F32, &[2, 16, 9]);
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
    }
}

#[test]
fn a_valid_call_without_a_gpu_fails_cleanly_at_the_stream() {
    // The fake Api answers Stream_Get like XLA's CPU client: the error surfaces, nothing crashes.
    for h in [lanton_step_update_cuda as Handler, lanton_step_inplace_cuda] {
        let mut f = frame("hidden", dtype::BF16);
        expect_error(&mut f, h, &["lanton_step_", "_cuda", "Stream_Get", "GPU context is not available"]);
    }
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
        SEEN.with(|s| *s.borrow_mut() = Some((Plan::new(&layout, opts, base), opts, buffers)));
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
    let mut spans = [(o.acc, 6 * 4 * 8), (o.reference, 16), (o.h, 24), (o.valid, 24), (o.workspace, o.workspace_len),
                         (o.x, (640 + 240) * 2), (o.y, (640 + 240) * 2), (o.n0, (640 + 240) * 4)];
    spans.sort();
    for w in spans.windows(2) {
        assert!(w[0].0 + w[0].1 <= w[1].0, "scratch spans overlap: {w:?}");
    }
    assert!(spans.iter().all(|&(off, len)| off % 256 == 0 && off + len <= plan.len));
    assert!(o.zeroed >= o.valid + 24 && o.zeroed <= o.workspace);
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
