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

fn call(cfg: &str, hyper: &[f32; 5], t: i32, l: &mut OwnedLeaf, grad: &[f32]) -> Result<(), String> {
    let leaf = l.c_leaf(grad);
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
    let n = 120;
    let p0 = rng.normals(n, 0.5);
    let shape = lanton::step::LayerShape { layers: 2, rows: 6, cols: 10, rows_are_input: true };
    let mut leaf = OwnedLeaf::new(shape, p0.clone());
    let hyper = [0.05, 0.9, 0.9, 0.0, 0.2];
    let config = r#"{"kind": "hidden", "noise_every": 1}"#;
    let cfg = lanton::capi::config_from_json(config).unwrap();
    let h = lanton::step::Hyper::from_slice(&hyper).unwrap();
    let mut refs = vec![RefLeaf::new(shape, &p0)];
    for t in 1..=3 {
        let grad = rng.normals(n, 1.0);
        call(config, &hyper, t, &mut leaf, &grad).unwrap();
        ref_group_step(&cfg, &h, t, &mut refs, &[grad]);
        assert!(max_abs_diff(&leaf.param, &refs[0].param) < 1e-4, "t={t}");
    }
    assert!(leaf.valid.iter().all(|&v| v == 1.0));
}

#[test]
fn host_step_takes_the_staggered_schedule() {
    // Three layers of one shape, K = 3: phases 0, 1, 2 (the C ABI derives them, step::noise_phases).
    let text = r#"{"kind": "hidden", "noise_every": 3, "noise_schedule": "staggered"}"#;
    let cfg = lanton::capi::config_from_json(text).unwrap();
    assert_eq!(cfg.noise_schedule, lanton::step::NoiseSchedule::Staggered);
    let mut rng = Rng::new(79);
    let shape = lanton::step::LayerShape { layers: 3, rows: 6, cols: 10, rows_are_input: true };
    let p0 = rng.normals(180, 0.5);
    let mut leaf = OwnedLeaf::new(shape, p0.clone());
    let hyper = [0.05, 0.9, 0.9, 0.0, 0.2];
    let h = lanton::step::Hyper::from_slice(&hyper).unwrap();
    let mut refs = vec![RefLeaf::new(shape, &p0)];
    for t in 1..=5 {
        let grad = rng.normals(180, 1.0);
        call(text, &hyper, t, &mut leaf, &grad).unwrap();
        ref_group_step(&cfg, &h, t, &mut refs, &[grad]);
        assert!(max_abs_diff(&leaf.param, &refs[0].param) < 1e-4, "t={t}");
        assert_eq!(leaf.prev_step, refs[0].prev_step, "t={t}");
    }
    // Stored on steps 2 (phase 0), 3 (phase 1), 4 (phase 2); all three measured by step 5.
    assert_eq!(leaf.prev_step, vec![5, 3, 4]);
    assert!(leaf.valid.iter().all(|&v| v == 1.0));
    let err = lanton::capi::config_from_json(r#"{"kind": "hidden", "noise_schedule": "random"}"#).unwrap_err();
    assert!(err.contains("'noise_schedule': expected synchronous or staggered"), "{err}");
}

#[test]
fn host_step_takes_the_noise_to_signal_option() {
    use lanton::capi::config_from_json;
    let err = config_from_json(r#"{"kind": "hidden", "noise_relative": 1}"#).unwrap_err();
    assert!(err.contains("'noise_relative' must be true or false"), "{err}");
    let text = r#"{"kind": "hidden", "noise_every": 1, "noise_relative": true}"#;
    let cfg = config_from_json(text).unwrap();
    assert!(cfg.noise_relative);
    let mut rng = Rng::new(78);
    let shape = lanton::step::LayerShape { layers: 2, rows: 6, cols: 10, rows_are_input: true };
    let p0 = rng.normals(120, 0.5);
    let mut leaf = OwnedLeaf::new(shape, p0.clone());
    let hyper = [0.05, 0.9, 0.9, 0.0, 0.2];
    let h = lanton::step::Hyper::from_slice(&hyper).unwrap();
    let mut refs = vec![RefLeaf::new(shape, &p0)];
    for t in 1..=3 {
        let grad = rng.normals(120, 1.0);
        call(text, &hyper, t, &mut leaf, &grad).unwrap();
        ref_group_step(&cfg, &h, t, &mut refs, &[grad]);
    }
    // H holds squared noise-to-signal ratios (order 1 here), not squared noise norms.
    for (a, b) in leaf.noise.iter().zip(&refs[0].noise) {
        assert!(*b > 0.0 && (*a as f64 - b).abs() <= 1e-4 * b, "{a} vs {b}");
    }
}

#[test]
fn host_step_errors_are_reported() {
    let shape = lanton::step::LayerShape { layers: 1, rows: 2, cols: 2, rows_are_input: true };
    let mut leaf = OwnedLeaf::new(shape, vec![0.0; 4]);
    let g = [1.0f32; 4];
    let h = [0.1, 0.9, 0.9, 0.0, 0.2];
    let e = call("{not json", &h, 1, &mut leaf, &g).unwrap_err();
    assert!(e.contains("not valid JSON"), "{e}");
    let e = call(r#"{"kind": "conv"}"#, &h, 1, &mut leaf, &g).unwrap_err();
    assert!(e.contains("config: 'kind': expected one of hidden, embed, vector, adam, got 'conv'"), "{e}");
    let e = call(r#"{"kind": "adam", "noise_adaptive": true}"#, &h, 1, &mut leaf, &g).unwrap_err();
    assert!(e.contains("an adam group tracks no noise"), "{e}");
    let e = call(r#"{"kind": "embed", "noise_evry": 3}"#, &h, 1, &mut leaf, &g).unwrap_err();
    assert!(e.contains("unknown key 'noise_evry'"), "{e}");
    let e = call(r#"{"kind": "embed", "noise_every": 0}"#, &h, 1, &mut leaf, &g).unwrap_err();
    assert!(e.contains("noise_every"), "{e}");
    let e = call(r#"{"kind": "embed"}"#, &h, 0, &mut leaf, &g).unwrap_err();
    assert!(e.contains("step must be >= 1"), "{e}");
    let rc = unsafe { lanton_step_host_f32(std::ptr::null(), h.as_ptr(), 1, std::ptr::null(), 0, std::ptr::null_mut(), 0) };
    assert_eq!(rc, LANTON_ERR_INVALID);
}

#[test]
fn absent_config_keys_take_the_one_set_of_defaults_and_the_defaults_read_back() {
    use lanton::capi::{config_from_json, config_to_json, lanton_default_config_json};
    use lanton::step::{Kind, RatioStat, StepConfig};
    let cfg = config_from_json(r#"{"kind": "hidden"}"#).unwrap();
    assert_eq!(cfg, StepConfig::new(Kind::Hidden));
    assert_eq!((cfg.noise_every, cfg.ratio_stat, cfg.ratio_power, cfg.ratio_floor), (10, RatioStat::Median, 0.5, 0.0));
    let text = unsafe { CStr::from_ptr(lanton_default_config_json()) }.to_str().unwrap().to_owned();
    assert_eq!(config_from_json(&text).unwrap(), cfg);
    let paper = StepConfig { noise_every: 3, nesterov: true, ..StepConfig::paper(Kind::Embed) };
    assert_eq!(config_from_json(&config_to_json(&paper)).unwrap(), paper);
    assert_eq!(paper.ratio_cap, f32::INFINITY); // written as 1e39, read back as no cap
    let capped = StepConfig { ratio_cap: 2.5, ..paper };
    assert_eq!(config_from_json(&config_to_json(&capped)).unwrap(), capped);
    // The adam kind's own defaults (no noise, Nesterov: optax.contrib.muon's Adam branch), and its options.
    let adam = config_from_json(r#"{"kind": "adam"}"#).unwrap();
    assert_eq!(adam, StepConfig::new(Kind::Adam));
    assert!(!adam.noise_adaptive && adam.nesterov && adam.adam_eps == 1e-8 && adam.adam_eps_root == 0.0);
    let adam = config_from_json(r#"{"kind": "adam", "adam_eps": 0.001, "adam_eps_root": 1e-9, "nesterov": false}"#).unwrap();
    assert!(!adam.nesterov && adam.adam_eps == 1e-3 && adam.adam_eps_root == 1e-9);
    assert_eq!(config_from_json(&config_to_json(&adam)).unwrap(), adam);
}

#[test]
fn host_step_runs_the_adam_kind() {
    // Through the C ABI: the same bits as the CPU kernel called directly (tests/step_sequence.rs
    // checks that against NAdamW in f64); nu in the G_prev buffer, r = 1, no noise tracked.
    let mut rng = Rng::new(41);
    let shape = lanton::step::LayerShape { layers: 2, rows: 3, cols: 8, rows_are_input: true };
    let p0 = rng.normals(48, 0.5);
    let (mut a, mut b) = (OwnedLeaf::new(shape, p0.clone()), OwnedLeaf::new(shape, p0));
    let hyper = [0.01, 0.9, 0.999, 0.1, 1.0];
    let cfg = lanton::step::StepConfig::new(lanton::step::Kind::Adam);
    let h = lanton::step::Hyper::from_slice(&hyper).unwrap();
    for t in 1..=3 {
        let grad = rng.normals(48, 1.0);
        call(r#"{"kind": "adam"}"#, &hyper, t, &mut a, &grad).unwrap();
        let mut io = vec![b.io(&grad, true)];
        lanton::cpu::group_step(&cfg, &h, t, &[0, 0], &mut io).unwrap();
        assert_eq!(a.param, b.param, "t={t}");
        assert_eq!(a.prev_grad, b.prev_grad);
    }
    assert!(a.prev_grad.iter().all(|&v| v > 0.0) && a.ratio == vec![1.0, 1.0] && a.valid == vec![0.0, 0.0]);
}
