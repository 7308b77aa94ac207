//! The XLA FFI layer driven with a fake Api and hand-built call frames: well-formed calls
//! (aliased and not, f32 and bf16) agree with the direct step; malformed ones are rejected
//! with an error that names the problem; the metadata query and panics are handled.

mod common;
use common::*;
use lanton::ffi::api::*;
use lanton::handlers::{lanton_step_inplace_cpu, lanton_step_update_cpu, ARGS_PER_LEAF, RETS_PER_LEAF};
use lanton::step::{Hyper, Kind, LayerShape, StepConfig};

/// Runs the same first steps through the f64 reference and compares the frame's results.
fn check_against_reference(f: &Frame, specs: &[LeafSpec], in_place: bool, tol: f64) {
    let cfg = StepConfig { noise_every: 1, ..StepConfig::paper(Kind::Hidden) };
    let h = Hyper { lr: 0.02, beta1: 0.9, beta2: 0.8, weight_decay: 0.01, scale: 0.2 };
    let mut refs: Vec<RefLeaf> = Vec::new();
    let mut grads = Vec::new();
    for (i, s) in specs.iter().enumerate() {
        let shape = LayerShape { layers: s.dims[0] as usize, rows: s.dims[1] as usize, cols: s.dims[2] as usize, rows_are_input: s.rows_are_input };
        refs.push(RefLeaf::new(shape, &f.args[2 + ARGS_PER_LEAF * i].to_f32()));
        grads.push(f.args[3 + ARGS_PER_LEAF * i].to_f32());
    }
    let want = ref_group_step(&cfg, &h, 1, &mut refs, &grads);
    for (i, rf) in refs.iter().enumerate() {
        let out = f.rets[RETS_PER_LEAF * i].to_f32();
        let expect: Vec<f64> = if in_place { rf.param.clone() } else { want[i].clone() };
        let scale = want[i].iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let err = max_abs_diff(&out, &expect);
        assert!(err <= tol * scale, "leaf {i}: err {err} vs scale {scale}");
        let mom = f.rets[RETS_PER_LEAF * i + 1].to_f32();
        assert!(max_abs_diff(&mom, &rf.momentum) < 1e-6 + tol * 0.1, "leaf {i}: momentum");
        assert_eq!(f.rets[RETS_PER_LEAF * i + 5].to_f32(), vec![1.0; rf.prev_step.len()], "leaf {i}: prev_step");
        assert_eq!(f.rets[RETS_PER_LEAF * i + 6].to_f32(), vec![1.0; rf.prev_step.len()], "leaf {i}: ratio at t=1");
    }
}

#[test]
fn update_call_matches_reference_f32() {
    let specs = two_leaves(dtype::F32);
    let mut f = step_frame("hidden", &specs, 1, &mut Rng::new(1));
    f.call(lanton_step_update_cpu).unwrap();
    check_against_reference(&f, &specs, false, 5e-3);
}

#[test]
fn inplace_call_with_donated_buffers_matches_reference() {
    let specs = two_leaves(dtype::F32);
    let mut f = step_frame("hidden", &specs, 1, &mut Rng::new(2));
    // Donation: result k of each leaf shares its input's storage.
    for i in 0..specs.len() {
        for (r, a) in [(0, 0), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (7, 7)] {
            f.rets[RETS_PER_LEAF * i + r].alias_of_arg = Some(2 + ARGS_PER_LEAF * i + a);
        }
    }
    let params_before: Vec<Vec<f32>> = (0..specs.len()).map(|i| f.args[2 + ARGS_PER_LEAF * i].to_f32()).collect();
    f.call(lanton_step_inplace_cpu).unwrap();
    // The donated inputs were overwritten; restore the parameters for the reference.
    for i in 0..specs.len() {
        f.args[2 + ARGS_PER_LEAF * i] = OwnedBuffer::f32(&specs[i].dims, &params_before[i]);
    }
    check_against_reference(&f, &specs, true, 5e-3);
}

#[test]
fn bf16_params_and_grads_match_reference_loosely() {
    let specs = two_leaves(dtype::BF16);
    let mut f = step_frame("hidden", &specs, 1, &mut Rng::new(3));
    f.call(lanton_step_update_cpu).unwrap();
    check_against_reference(&f, &specs, false, 2e-2);
}

fn expect_error(f: &mut Frame, handler: Handler, needles: &[&str]) {
    let err = f.call(handler).expect_err("malformed frame was accepted");
    for n in needles {
        assert!(err.contains(n), "error {err:?} should mention {n:?}");
    }
}

fn base() -> Frame {
    step_frame("hidden", &two_leaves(dtype::F32), 1, &mut Rng::new(4))
}

#[test]
fn rejects_wrong_dtypes() {
    let mut f = base();
    f.args[3] = OwnedBuffer::zeros(dtype::F64, &[1, 12, 20]);
    expect_error(&mut f, lanton_step_update_cpu, &["blocks/0/kernel (grad)", "unsupported dtype float64"]);
    let mut f = base();
    f.args[0] = OwnedBuffer::zeros(dtype::F64, &[5]);
    expect_error(&mut f, lanton_step_update_cpu, &["hyper", "expected float32, got float64"]);
    let mut f = base();
    f.rets[2] = OwnedBuffer::zeros(dtype::BF16, &[1, 12, 20]);
    expect_error(&mut f, lanton_step_update_cpu, &["blocks/0/kernel (prev_grad)", "expected float32, got bfloat16"]);
}

#[test]
fn rejects_wrong_counts_and_shapes() {
    let mut f = base();
    f.args.pop();
    expect_error(&mut f, lanton_step_update_cpu, &["arguments", "got 17"]);
    let mut f = base();
    f.rets.pop();
    expect_error(&mut f, lanton_step_update_cpu, &["results", "got 15"]);
    let mut f = base();
    f.args[3 + ARGS_PER_LEAF] = OwnedBuffer::zeros(dtype::F32, &[2, 16, 9]);
    expect_error(&mut f, lanton_step_update_cpu, &["blocks/1/kernel (grad)", "expected shape [2, 16, 8], got [2, 16, 9]"]);
    let mut f = base();
    f.args[2] = OwnedBuffer::zeros(dtype::F32, &[12, 20]);
    expect_error(&mut f, lanton_step_update_cpu, &["blocks/0/kernel (param)", "rank 3"]);
    let mut f = base();
    f.args[6] = OwnedBuffer::zeros(dtype::F32, &[3]);
    expect_error(&mut f, lanton_step_update_cpu, &["(noise)", "expected shape [1], got [3]"]);
    let mut f = base();
    f.set_attr("rows_are_input", Attr::I64Array(vec![1]));
    expect_error(&mut f, lanton_step_update_cpu, &["rows_are_input", "one entry per leaf (2), got 1"]);
}

#[test]
fn rejects_bad_attributes() {
    let mut f = base();
    f.remove_attr("kind");
    expect_error(&mut f, lanton_step_update_cpu, &["'kind' (hidden, embed, vector or adam) is required"]);
    let mut f = base();
    f.set_attr("kind", Attr::Str("conv".into()));
    expect_error(&mut f, lanton_step_update_cpu, &["'kind'", "got 'conv'"]);
    let mut f = base();
    f.set_attr("noise_every", Attr::Str("ten".into()));
    expect_error(&mut f, lanton_step_update_cpu, &["'noise_every'", "expected an integer scalar, got a string"]);
    let mut f = base();
    f.set_attr("noise_every", Attr::I64(0));
    expect_error(&mut f, lanton_step_update_cpu, &["'noise_every'", "got 0"]);
    let mut f = base();
    f.set_attr("ns_coeffs", Attr::F32Array(vec![1.0, 2.0]));
    expect_error(&mut f, lanton_step_update_cpu, &["'ns_coeffs'", "got 2"]);
    let mut f = base();
    f.set_attr("ratio_stat", Attr::Dict);
    expect_error(&mut f, lanton_step_update_cpu, &["'ratio_stat'", "expected a string, got a dictionary"]);
    // The work-split attribute of C ABI 4-6, gone in 7: refused, whatever its type, since a
    // caller relying on it would otherwise get every update on every device.
    for attr in [Attr::I64Array(vec![1, 0]), Attr::Str("all".into())] {
        let mut f = base();
        f.set_attr("owned_layers", attr);
        expect_error(&mut f, lanton_step_update_cpu, &["attribute 'owned_layers' is no longer supported (C ABI 7)"]);
    }
}

#[test]
fn phases_argument_is_checked_and_sets_each_layers_cadence() {
    // two_leaves: 1 + 2 layers. K = 3, t = 1: a layer of phase 2 stores G_prev (step 2 measures
    // it), one of phase 0 does not.
    let with = |phases: OwnedBuffer| {
        let mut f = base();
        f.set_attr("noise_every", Attr::I64(3));
        f.args.push(phases);
        f
    };
    let mut f = with(OwnedBuffer::i32(&[3], &[2, 0, 2]));
    f.call(lanton_step_update_cpu).unwrap();
    let prev_steps = |f: &Frame| (f.rets[5].to_f32(), f.rets[RETS_PER_LEAF + 5].to_f32());
    assert_eq!(prev_steps(&f), (vec![1.0], vec![0.0, 1.0]));
    // Absent: the attribute's schedule (the default, staggered: phases 0 | 0 1 for these two shapes,
    // so none stores G_prev at t = 1).
    let mut f = base();
    f.set_attr("noise_every", Attr::I64(3));
    f.remove_attr("noise_schedule");
    f.call(lanton_step_update_cpu).unwrap();
    assert_eq!(prev_steps(&f), (vec![0.0], vec![0.0, 0.0]));
    expect_error(&mut with(OwnedBuffer::f32(&[3], &[2.0, 0.0, 2.0])), lanton_step_update_cpu,
                 &["argument 'phases'", "expected int32, got float32"]);
    expect_error(&mut with(OwnedBuffer::i32(&[2], &[2, 0])), lanton_step_update_cpu,
                 &["argument 'phases' (one per layer of the group)", "expected shape [3], got [2]"]);
    let mut f = with(OwnedBuffer::i32(&[3], &[0, 0, 0]));
    f.args.push(OwnedBuffer::i32(&[3], &[0, 0, 0]));
    expect_error(&mut f, lanton_step_update_cpu, &["expected 2 + 8 x (number of leaves) arguments, and optionally the phases, got 20"]);
}

#[test]
fn the_kernels_count_skipped_steps_from_the_incoming_count() {
    // two_leaves: 1 + 2 layers. A NaN in leaf 1's second layer: its count goes 4 -> 5, every
    // other layer keeps its own, donated or not.
    for donated in [false, true] {
        let mut f = base();
        let (a, r) = (2 + ARGS_PER_LEAF, RETS_PER_LEAF);
        let mut g = f.args[a + 1].to_f32();
        *g.last_mut().unwrap() = f32::NAN;
        f.args[a + 1] = OwnedBuffer::f32(&[2, 16, 8], &g);
        f.args[2 + 7] = OwnedBuffer::i32(&[1], &[2]);
        f.args[a + 7] = OwnedBuffer::i32(&[2], &[3, 4]);
        if donated {
            for i in 0..2 {
                f.rets[r * i + 7].alias_of_arg = Some(2 + ARGS_PER_LEAF * i + 7);
            }
        }
        f.call(lanton_step_update_cpu).unwrap();
        assert_eq!((f.rets[7].to_f32(), f.rets[r + 7].to_f32()), (vec![2.0], vec![3.0, 5.0]), "donated {donated}");
    }
}

#[test]
fn rejects_bad_step_argument_types_and_overlap() {
    let mut f = base();
    f.args[1] = OwnedBuffer::i32(&[], &[0]);
    expect_error(&mut f, lanton_step_update_cpu, &["'step'", "t >= 1, got 0"]);
    let mut f = base();
    f.bad_arg_type = Some(4);
    expect_error(&mut f, lanton_step_update_cpu, &["argument 4", "expected a buffer"]);
    // A written result sharing memory with a read-only input (the gradient) is refused.
    let mut f = base();
    f.rets[1].alias_of_arg = Some(3);
    expect_error(&mut f, lanton_step_update_cpu, &["overlap", "blocks/0/kernel (grad)", "blocks/0/kernel (momentum)"]);
}

#[test]
fn answers_metadata_query_without_touching_api() {
    let meta = query_metadata(lanton_step_update_cpu);
    assert_eq!((meta.api_version.major_version, meta.api_version.minor_version), (0, 3));
    assert_eq!(meta.traits, TRAIT_COMMAND_BUFFER_COMPATIBLE);
}

#[test]
fn a_panicking_body_becomes_an_error() {
    unsafe extern "C" fn panicking(frame: *mut XLA_FFI_CallFrame) -> *mut XLA_FFI_Error {
        lanton::ffi::handler::dispatch(frame, "test_handler", 0, |_| panic!("boom in body"))
    }
    let mut f = base();
    expect_error(&mut f, panicking, &["test_handler", "panic", "boom in body"]);
}

#[test]
fn stream_error_is_read_and_reported() {
    unsafe extern "C" fn wants_stream(frame: *mut XLA_FFI_CallFrame) -> *mut XLA_FFI_Error {
        lanton::ffi::handler::dispatch(frame, "gpu_only", 0, |c| c.stream().map(|_| ()))
    }
    let mut f = base();
    expect_error(&mut f, wants_stream, &["gpu_only", "Stream_Get", "GPU context is not available"]);
}

#[test]
fn null_frame_does_not_crash() {
    let err = unsafe { lanton_step_update_cpu(std::ptr::null_mut()) };
    assert!(err.is_null()); // nothing to report through; the handler must simply not crash
}
