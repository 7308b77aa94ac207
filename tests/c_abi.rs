//! The plain C ABI: version queries, a host-memory step against the direct step, and errors
//! reported through codes and the message buffer (never a panic across the boundary).

mod common;
use common::*;
use lanton::capi::*;
use std::ffi::CStr;

#[test]
fn version_queries() {
    let v = unsafe { CStr::from_ptr(lanton_version()) }.to_str().unwrap();
    assert_eq!(v, env!("CARGO_PKG_VERSION"));
    assert_eq!(lanton_abi_version(), LANTON_ABI_VERSION);
}

struct HostLeaf {
    param: Vec<f32>,
    grad: Vec<f32>,
    momentum: Vec<f32>,
    prev_grad: Vec<f32>,
    noise: Vec<f32>,
    valid: Vec<f32>,
    prev_step: Vec<i32>,
    ratio: Vec<f32>,
}

fn call(cfg: &str, hyper: &[f32; 5], t: i32, l: &mut HostLeaf, dims: (usize, usize, usize)) -> Result<(), String> {
    let leaf = LantonLeafF32 {
        layers: dims.0,
        rows: dims.1,
        cols: dims.2,
        rows_are_input: 1,
        param: l.param.as_mut_ptr(),
        grad: l.grad.as_ptr(),
        momentum: l.momentum.as_mut_ptr(),
        prev_grad: l.prev_grad.as_mut_ptr(),
        noise: l.noise.as_mut_ptr(),
        valid: l.valid.as_mut_ptr(),
        prev_step: l.prev_step.as_mut_ptr(),
        ratio: l.ratio.as_mut_ptr(),
    };
    let cfg = std::ffi::CString::new(cfg).unwrap();
    let mut err = [0 as std::ffi::c_char; 256];
    let rc = unsafe { lanton_step_host_f32(cfg.as_ptr(), hyper.as_ptr(), t, &leaf, 1, err.as_mut_ptr(), err.len()) };
    if rc == LANTON_OK {
        Ok(())
    } else {
        Err(unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned())
    }
}

#[test]
fn host_step_matches_reference() {
    let mut rng = Rng::new(77);
    let dims = (2, 6, 10);
    let n = 120;
    let p0 = rng.normals(n, 0.5);
    let mut leaf = HostLeaf {
        param: p0.clone(),
        grad: rng.normals(n, 1.0),
        momentum: vec![0.0; n],
        prev_grad: vec![0.0; n],
        noise: vec![0.0; 2],
        valid: vec![0.0; 2],
        prev_step: vec![0; 2],
        ratio: vec![0.0; 2],
    };
    let hyper = [0.05, 0.9, 0.9, 0.0, 0.2];
    let cfg = lanton::capi::config_from_json(r#"{"kind": "hidden"}"#).unwrap();
    let h = lanton::step::Hyper::from_slice(&hyper).unwrap();
    let shape = lanton::step::LayerShape { layers: 2, rows: 6, cols: 10, rows_are_input: true };
    let mut refs = vec![RefLeaf::new(shape, &p0)];
    for t in 1..=3 {
        leaf.grad = rng.normals(n, 1.0);
        call(r#"{"kind": "hidden", "noise_every": 1}"#, &hyper, t, &mut leaf, dims).unwrap();
        ref_group_step(&cfg, &h, t, &mut refs, &[leaf.grad.clone()]);
        assert!(max_abs_diff(&leaf.param, &refs[0].param) < 1e-4, "t={t}");
    }
    assert!(leaf.valid.iter().all(|&v| v == 1.0));
}

#[test]
fn host_step_errors_are_reported() {
    let mut leaf = HostLeaf {
        param: vec![0.0; 4],
        grad: vec![1.0; 4],
        momentum: vec![0.0; 4],
        prev_grad: vec![0.0; 4],
        noise: vec![0.0],
        valid: vec![0.0],
        prev_step: vec![0],
        ratio: vec![0.0],
    };
    let h = [0.1, 0.9, 0.9, 0.0, 0.2];
    let e = call("{not json", &h, 1, &mut leaf, (1, 2, 2)).unwrap_err();
    assert!(e.contains("not valid JSON"), "{e}");
    let e = call(r#"{"kind": "conv"}"#, &h, 1, &mut leaf, (1, 2, 2)).unwrap_err();
    assert!(e.contains("unknown kind 'conv'"), "{e}");
    let e = call(r#"{"kind": "embed", "noise_evry": 3}"#, &h, 1, &mut leaf, (1, 2, 2)).unwrap_err();
    assert!(e.contains("unknown key 'noise_evry'"), "{e}");
    let e = call(r#"{"kind": "embed", "noise_every": 0}"#, &h, 1, &mut leaf, (1, 2, 2)).unwrap_err();
    assert!(e.contains("noise_every"), "{e}");
    let e = call(r#"{"kind": "embed"}"#, &h, 0, &mut leaf, (1, 2, 2)).unwrap_err();
    assert!(e.contains("step must be >= 1"), "{e}");
    let rc = unsafe { lanton_step_host_f32(std::ptr::null(), h.as_ptr(), 1, std::ptr::null(), 0, std::ptr::null_mut(), 0) };
    assert_eq!(rc, LANTON_ERR_INVALID);
}
