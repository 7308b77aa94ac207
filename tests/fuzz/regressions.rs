//! Regressions the fuzzer found, one by one.

use super::*;

// Each input below crashed, hung, aborted or panicked before the validation it names existed.

/// A well-formed frame with exactly one leaf, for the hand-made regressions below.
fn one_leaf_frame() -> FrameSpec {
    (0u64..)
        .map(|s| FrameSpec::well_formed(&mut Rng::new(s)))
        .find(|f| f.args.len() == 2 + lanton::handlers::ARGS_PER_LEAF && f.hyper.is_some() && f.step.is_some())
        .unwrap()
}

fn call(spec: &FrameSpec, handler: Handler) -> Result<(), String> {
    let mut built = build(spec, &mut Rng::new(7));
    // SAFETY (harness): `built` owns everything the frame points at.
    let err = unsafe { handler(&mut *built.frame) };
    assert!(built.arena.guards_intact().is_none(), "wrote out of bounds");
    match take_error(err) {
        None => Ok(()),
        Some(e) => {
            assert!(!e.message.contains(PANIC_MESSAGE), "{}", e.message);
            Err(e.message)
        }
    }
}

fn expect_err(spec: &FrameSpec, needle: &str) {
    for (name, h) in TARGETS {
        let e = call(spec, h).expect_err(name);
        assert!(e.contains(needle), "{name}: {e:?} should mention {needle:?}");
    }
}

#[test]
fn regression_cyclic_extension_chain_is_refused_not_followed_forever() {
    let mut f = one_leaf_frame();
    f.exts = vec![ExtSpec { type_: 0, struct_size: 32, metadata: None }, ExtSpec { type_: 7, struct_size: 32, metadata: None }];
    f.ext_cycle = true;
    expect_err(&f, "extension chain longer than");
}

#[test]
fn regression_null_data_and_null_arrays_are_refused() {
    let mut f = one_leaf_frame();
    f.args[3].buf.as_mut().unwrap().data = Data::Null; // the gradient
    f.args[3].buf.as_mut().unwrap().dims = vec![1, 2, 2];
    expect_err(&f, "argument 3: null data pointer for 4 elements");
    let mut f = one_leaf_frame();
    f.args[1].buf.as_mut().unwrap().data = Data::Null; // the step scalar
    expect_err(&f, "argument 1: null data pointer for 1 elements");
    for k in 0..3 {
        let mut f = one_leaf_frame();
        f.null_arrays[k] = true;
        expect_err(&f, "entries but a null array");
    }
    let mut f = one_leaf_frame();
    let i = f.attrs.iter().position(|a| a.name.as_deref() == Some(b"noise_every")).unwrap();
    f.attrs[i].payload = Payload::Scalar { dtype: dtype::S64, bits: 1, value_null: true, misalign: 0 };
    expect_err(&f, "attribute 'noise_every' has a null scalar value");
}

#[test]
fn regression_overflowing_and_zero_layer_shapes() {
    // dims whose product wraps to a small number must not size a slice.
    let mut f = one_leaf_frame();
    for k in 2..6 {
        f.args[k].buf.as_mut().unwrap().dims = vec![1 << 32, 1 << 32, 1];
        f.args[k].buf.as_mut().unwrap().data = Data::Null;
    }
    expect_err(&f, "is too large");
    // A leaf without layers whose layer size cannot exist.
    let mut f = one_leaf_frame();
    for e in f.args.iter_mut().skip(2).take(4).chain(f.rets.iter_mut().take(3)) {
        e.buf.as_mut().unwrap().dims = vec![0, 1 << 40, 1 << 40];
    }
    for e in f.args.iter_mut().skip(6).chain(f.rets.iter_mut().skip(3)) {
        e.buf.as_mut().unwrap().dims = vec![0];
    }
    expect_err(&f, "a layer of 1099511627776 x 1099511627776 elements is too large");
    // ... and one whose layer size exists but would need terabytes of scratch: nothing to do.
    for e in f.args.iter_mut().skip(2).take(4).chain(f.rets.iter_mut().take(3)) {
        e.buf.as_mut().unwrap().dims = vec![0, 1 << 20, 1 << 20];
    }
    for (name, h) in &TARGETS[..2] {
        call(&f, *h).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn regression_misaligned_data_and_unknown_stage() {
    let mut f = one_leaf_frame();
    f.args[2].buf.as_mut().unwrap().data = Data::Own { misalign: 1 };
    f.args[2].buf.as_mut().unwrap().dtype = dtype::F32;
    f.args[2].buf.as_mut().unwrap().dims = vec![1, 1, 1];
    expect_err(&f, "argument 2: data pointer");
    let mut f = one_leaf_frame();
    f.stage = 17;
    expect_err(&f, "unknown execution stage 17");
    let mut f = one_leaf_frame();
    f.exts = vec![ExtSpec { type_: EXTENSION_METADATA, struct_size: 32, metadata: Some(8) }];
    expect_err(&f, "metadata struct too small");
}

fn host_call(config: &str, leaf: &LantonLeafF32) -> (i32, String) {
    let cfg = std::ffi::CString::new(config).unwrap();
    let hyper = [0.02f32, 0.9, 0.9, 0.0, 0.2];
    let mut err = [0 as c_char; 256];
    // SAFETY: the leaf's pointers are null or valid for what it states (tests below).
    let rc = unsafe { lanton_step_host_f32(cfg.as_ptr(), hyper.as_ptr(), 1, leaf, 1, err.as_mut_ptr(), err.len()) };
    (rc, unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned())
}

#[test]
fn regression_c_abi_zero_layer_leaf_and_loose_ns_coeffs() {
    let mut state = vec![0.0f32; 4];
    let mut steps = vec![0i32; 1];
    let (p, ps) = (state.as_mut_ptr(), steps.as_mut_ptr());
    let leaf = |layers: usize, rows: usize, cols: usize| LantonLeafF32 {
        layers,
        rows,
        cols,
        rows_are_input: 1,
        param: p,
        grad: p,
        momentum: p,
        prev_grad: p,
        noise: p,
        valid: p,
        prev_step: ps,
        ratio: p,
        skipped: ps,
    };
    // No layers: every array is empty (any pointer is valid for zero elements), but the
    // per-layer size used to size scratch: 2^62 elements panicked (capacity overflow), 2^40
    // aborted the process (allocation failure).
    let (rc, msg) = host_call(r#"{"kind": "hidden"}"#, &leaf(0, 1 << 31, 1 << 31));
    assert_eq!(rc, LANTON_ERR_INVALID, "{msg}");
    assert!(msg.contains("leaf 0: size 0 x 2147483648 x 2147483648 overflows"), "{msg}");
    let (rc, msg) = host_call(r#"{"kind": "hidden"}"#, &leaf(0, 1 << 20, 1 << 20));
    assert_eq!(rc, LANTON_OK, "{msg}");
    // ns_coeffs entries with a non-number used to be read as the numbers around it.
    let (rc, msg) = host_call(r#"{"kind": "hidden", "ns_coeffs": [[1, "a", 2, 3]]}"#, &leaf(0, 1, 1));
    assert_eq!(rc, LANTON_ERR_INVALID, "{msg}");
    assert!(msg.contains("every 'ns_coeffs' entry must be [a, b, c]"), "{msg}");
}

#[test]
fn regression_last_representable_step() {
    // t = i32::MAX: "is t + 1 a noise step?" overflowed (a panic with overflow checks, a
    // wrapped step otherwise).
    let mut f = one_leaf_frame();
    f.step = Some(i32::MAX);
    for (name, h) in &TARGETS[..2] {
        call(&f, *h).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let mut state = [0.5f32; 7]; // param, grad, momentum, prev_grad, noise, valid, ratio
    let mut steps = [0i32; 1];
    let mut skipped = [0i32; 1];
    let p = state.as_mut_ptr();
    // SAFETY: offsets 0..7 lie inside `state`; every buffer is one distinct element.
    let at = |i: usize| unsafe { p.add(i) };
    let leaf = LantonLeafF32 {
        layers: 1,
        rows: 1,
        cols: 1,
        rows_are_input: 1,
        param: at(0),
        grad: at(1),
        momentum: at(2),
        prev_grad: at(3),
        noise: at(4),
        valid: at(5),
        prev_step: steps.as_mut_ptr(),
        ratio: at(6),
        skipped: skipped.as_mut_ptr(),
    };
    let cfg = c"{\"kind\": \"embed\", \"noise_every\": 1}";
    let hyper = [0.02f32, 0.9, 0.9, 0.0, 0.2];
    // SAFETY: every pointer is valid for the one element the leaf states; none overlap.
    let rc = unsafe { lanton_step_host_f32(cfg.as_ptr(), hyper.as_ptr(), i32::MAX, &leaf, 1, std::ptr::null_mut(), 0) };
    assert_eq!(rc, LANTON_OK);
    assert_eq!(steps[0], i32::MAX, "G_prev kept for step t + 1 (K = 1)");
}
