//! The noise tracker, the within-group ratio and the whole update over multi-step sequences,
//! against a hand-computed example and against the float64 reference of tests/common.

mod common;
use common::*;
use lanton::cpu::{group_step, LeafIo};
use lanton::step::{noise_phases, Hyper, Kind, LayerShape, NoiseSchedule, RatioStat, StepConfig};

type Leaf = OwnedLeaf;

/// Runs one step in update mode and applies the update (as optax.apply_updates would).
fn step(cfg: &StepConfig, h: &Hyper, t: i32, leaves: &mut [Leaf], grads: &[Vec<f32>]) {
    let mut io: Vec<LeafIo> = leaves.iter_mut().zip(grads).map(|(lf, g)| lf.io(g, false)).collect();
    let phases = noise_phases(cfg.noise_schedule, cfg.noise_every, &io.iter().map(|l| l.shape).collect::<Vec<_>>());
    group_step(cfg, h, t, &phases, &mut io).unwrap();
    for lf in leaves.iter_mut() {
        lf.param.iter_mut().zip(&lf.update).for_each(|(p, u)| *p += u);
    }
}

fn hyper() -> Hyper {
    Hyper { lr: 0.1, beta1: 0.5, beta2: 0.5, weight_decay: 0.0, scale: 1.0 }
}

#[test]
fn hand_computed_embed_sequence() {
    // Two 1x2 layers (one leaf with a batch axis) in an embed group, K = 1, b1 = b2 = 0.5.
    let mut cfg = StepConfig { noise_every: 1, ..StepConfig::paper(Kind::Embed) };
    cfg.ratio_eps = 0.0;
    let shape = LayerShape { layers: 2, rows: 1, cols: 2, rows_are_input: true };
    let mut leaves = vec![Leaf::new(shape, vec![0.0; 4])];
    let h = hyper();
    // t = 1: no previous gradient, H stays 0, r = 1; G_prev is kept for t = 2.
    step(&cfg, &h, 1, &mut leaves, &[vec![1.0, -1.0, 2.0, 2.0]]);
    assert_eq!(leaves[0].noise, vec![0.0, 0.0]);
    assert_eq!(leaves[0].ratio, vec![1.0, 1.0]);
    assert_eq!(leaves[0].momentum, vec![0.5, -0.5, 1.0, 1.0]);
    assert_eq!(leaves[0].update, vec![-0.1, 0.1, -0.1, -0.1]); // -lr * sign(B)
    assert_eq!(leaves[0].prev_step, vec![1, 1]);
    // t = 2: n0 = |3-1| + |-1+1| = 2, n1 = |2-2| + |6-2| = 4 -> H = 0.5 * n^2 = (2, 8).
    step(&cfg, &h, 2, &mut leaves, &[vec![3.0, -1.0, 2.0, 6.0]]);
    assert_eq!(leaves[0].noise, vec![2.0, 8.0]);
    assert_eq!(leaves[0].valid, vec![1.0, 1.0]);
    // alpha = (1/sqrt 2, 1/sqrt 8): r = (1, 0.5).
    assert_eq!(leaves[0].ratio, vec![1.0, 0.5]);
    assert_eq!(leaves[0].update, vec![-0.1, 0.1, -0.05, -0.05]);
    // t = 3: n0 = |3-3| + |-3+1| = 2 -> H0 = 1 + 2 = 3; n1 = |2-2| + |6-6| = 0 -> H1 = 4.
    step(&cfg, &h, 3, &mut leaves, &[vec![3.0, -3.0, 2.0, 6.0]]);
    assert_eq!(leaves[0].noise, vec![3.0, 4.0]);
    let r1 = (3.0f64 / 4.0).sqrt() as f32;
    assert!((leaves[0].ratio[0] - 1.0).abs() < 1e-7 && (leaves[0].ratio[1] - r1).abs() < 1e-6);
}

#[test]
fn cadence_k3_zero_gradient_layer_and_singleton() {
    let mut cfg = StepConfig { noise_every: 1, ..StepConfig::paper(Kind::Vector) };
    cfg.noise_every = 3;
    cfg.ratio_eps = 0.0;
    let h = hyper();
    let shape = LayerShape { layers: 1, rows: 1, cols: 4, rows_are_input: true };
    let mut rng = Rng::new(3);
    let mut leaves = vec![Leaf::new(shape, rng.normals(4, 1.0)), Leaf::new(shape, rng.normals(4, 1.0))];
    for t in 1..=7 {
        let g = vec![rng.normals(4, 1.0), vec![0.0; 4]]; // second layer: always zero gradient
        step(&cfg, &h, t, &mut leaves, &g);
        let tracked = t >= 3; // first noise step is t = 3 (G_prev stored at t = 2)
        assert_eq!(leaves[0].noise[0] > 0.0, tracked, "t={t}");
        assert_eq!(leaves[0].prev_step[0], if t >= 5 { 5 } else if t >= 2 { 2 } else { 0 }, "t={t}");
        // The zero-gradient layer never becomes valid, so it is left out and steps at r = 1;
        // the other layer is then alone: a singleton, also r = 1.
        assert_eq!(leaves[1].valid[0], 0.0);
        assert_eq!(leaves[0].ratio[0], 1.0);
        assert_eq!(leaves[1].ratio[0], 1.0);
        assert!(leaves[1].update.iter().all(|&u| u == 0.0));
    }
}

#[test]
fn non_finite_gradient_leaves_state_untouched() {
    let cfg = StepConfig { noise_every: 1, ..StepConfig::paper(Kind::Hidden) };
    let h = Hyper { weight_decay: 0.1, ..hyper() };
    let shape = LayerShape { layers: 2, rows: 4, cols: 6, rows_are_input: true };
    let mut rng = Rng::new(9);
    let mut leaves = vec![Leaf::new(shape, rng.normals(48, 1.0))];
    step(&cfg, &h, 1, &mut leaves, &[rng.normals(48, 1.0)]);
    step(&cfg, &h, 2, &mut leaves, &[rng.normals(48, 1.0)]);
    let before = (leaves[0].momentum.clone(), leaves[0].prev_grad.clone(), leaves[0].noise.clone(), leaves[0].prev_step.clone());
    let mut g = rng.normals(48, 1.0);
    g[30] = f32::NAN; // layer 1 only
    let p_before = leaves[0].param.clone();
    step(&cfg, &h, 3, &mut leaves, &[g]);
    let lf = &leaves[0];
    assert_eq!(&lf.momentum[24..], &before.0[24..]);
    assert_eq!(&lf.prev_grad[24..], &before.1[24..]);
    assert_eq!(lf.noise[1], before.2[1]);
    assert_eq!(lf.prev_step[1], before.3[1]);
    assert!(lf.update[24..].iter().all(|&u| u == 0.0));
    assert_eq!(&lf.param[24..], &p_before[24..]);
    assert_eq!(lf.skipped, [0, 1], "the skip is counted for layer 1 only");
    // Layer 0 went on normally.
    assert_ne!(&lf.momentum[..24], &before.0[..24]);
    assert!(lf.param.iter().chain(&lf.momentum).chain(&lf.prev_grad).all(|x| x.is_finite()));
    // Step 4 cannot use the stale G_prev of layer 1 (stored at t = 2, not t = 3).
    let noise1 = lf.noise[1];
    step(&cfg, &h, 4, &mut leaves, &[rng.normals(48, 1.0)]);
    assert_eq!(leaves[0].noise[1], noise1);
    assert_eq!(leaves[0].prev_step[1], 4);
    assert_eq!(leaves[0].skipped, [0, 1]);
}

fn run_against_reference(kind: Kind, k: u32, nesterov: bool, wd: f32, noise_adaptive: bool, stat: RatioStat, steps: i32) {
    run_shaped_against_reference(kind, k, nesterov, wd, noise_adaptive, stat, steps, (1.0, 0.0))
}

#[allow(clippy::too_many_arguments)]
fn run_shaped_against_reference(kind: Kind, k: u32, nesterov: bool, wd: f32, noise_adaptive: bool, stat: RatioStat,
                                steps: i32, shaping: (f32, f32)) {
    run_configured_against_reference(kind, k, nesterov, wd, noise_adaptive, stat, steps, shaping, false, NoiseSchedule::Synchronous);
}

/// Runs the kernels and the f64 reference side by side for `steps` steps, checking every step;
/// returns the kernels' leaves.
#[allow(clippy::too_many_arguments)]
fn run_configured_against_reference(kind: Kind, k: u32, nesterov: bool, wd: f32, noise_adaptive: bool, stat: RatioStat,
                                    steps: i32, (power, floor): (f32, f32), relative: bool, schedule: NoiseSchedule) -> Vec<Leaf> {
    let mut cfg = StepConfig { noise_every: 1, noise_schedule: schedule, ..StepConfig::paper(kind) };
    cfg.noise_relative = relative;
    cfg.ratio_power = power;
    cfg.ratio_floor = floor;
    cfg.noise_every = k;
    cfg.nesterov = nesterov;
    cfg.noise_adaptive = noise_adaptive;
    cfg.ratio_stat = stat;
    cfg.ratio_cap = CAP.with(|c| *c.borrow()).unwrap_or(stat.default_cap());
    let h = Hyper { lr: 0.02, beta1: 0.9, beta2: 0.8, weight_decay: wd, scale: 0.2 };
    let shapes = match kind {
        Kind::Hidden => vec![(1, 12, 20, true), (3, 16, 8, false), (1, 1, 10, true), (2, 9, 1, true)],
        // The last two span several of the CPU's elementwise pieces (16 Ki elements), one partial.
        Kind::Embed => vec![(1, 30, 8, true), (1, 5, 8, false), (1, 300, 130, true), (2, 129, 131, false)],
        Kind::Vector => vec![(4, 1, 16, true), (1, 1, 7, true)],
        Kind::Adam => panic!("adam: see adam_kind_matches_nadamw_in_f64"),
    };
    let mut rng = Rng::new(1000 + k as u64);
    let mut leaves = Vec::new();
    let mut refs = Vec::new();
    for &(l, r, c, rin) in &shapes {
        let shape = LayerShape { layers: l, rows: r, cols: c, rows_are_input: rin };
        let p = rng.normals(l * r * c, 0.5);
        refs.push(RefLeaf::new(shape, &p));
        leaves.push(Leaf::new(shape, p));
    }
    for t in 1..=steps {
        // Per-layer noise levels differ so the ratios are not all 1.
        let grads: Vec<Vec<f32>> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(l, r, c, _))| {
                let base = rng.gradient_like(l * r, c);
                let noise = rng.normals(l * r * c, 0.2 * (i + 1) as f64);
                base.iter().zip(noise).map(|(a, b)| a + b).collect()
            })
            .collect();
        step(&cfg, &h, t, &mut leaves, &grads);
        let want = ref_group_step(&cfg, &h, t, &mut refs, &grads);
        for (i, (lf, rf)) in leaves.iter().zip(&refs).enumerate() {
            let ctx = format!("{kind} K={k} t={t} leaf {i}");
            let scale = want[i].iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-12);
            let tol = if kind == Kind::Hidden { 5e-3 } else { 1e-4 };
            assert!(max_abs_diff(&lf.update, &want[i]) <= tol * scale, "{ctx}: update");
            for (a, b) in lf.noise.iter().zip(&rf.noise) {
                assert!((*a as f64 - b).abs() <= 2e-2 * b.abs() + 1e-12, "{ctx}: noise {a} vs {b}");
            }
            for (a, b) in lf.ratio.iter().zip(&rf.ratio) {
                assert!((*a as f64 - b).abs() <= 1e-2 * b.abs(), "{ctx}: ratio {a} vs {b}");
            }
            assert_eq!(lf.prev_step, rf.prev_step, "{ctx}: prev_step");
            assert_eq!(lf.valid.iter().map(|&v| v > 0.5).collect::<Vec<_>>(), rf.valid, "{ctx}: valid");
        }
    }
    if noise_adaptive && steps >= 2 * k as i32 {
        let all: Vec<f32> = leaves.iter().flat_map(|l| l.ratio.clone()).collect();
        assert!(all.iter().any(|&r| (r - 1.0).abs() > 1e-3), "ratios never left 1: {all:?}");
    }
    leaves
}

#[test]
fn hidden_matches_reference_k1_and_k3() {
    run_against_reference(Kind::Hidden, 1, false, 0.0, true, RatioStat::Max, 6);
    run_against_reference(Kind::Hidden, 3, true, 0.1, true, RatioStat::Max, 8);
    run_against_reference(Kind::Hidden, 1, false, 0.1, false, RatioStat::Max, 4);
}

#[test]
fn staggered_schedule_matches_reference_and_refreshes_each_layer_once_per_k_steps() {
    // K = 3 over 9 steps: each shape class's layers on their own phases (the f64 reference counts
    // them itself), every kind; then the phases seen in prev_step: a layer of phase p stores
    // G_prev on steps t + 1 = p (mod 3), so after step 9 its prev_step is 8, 9 or 7 for p = 0, 1, 2.
    for kind in [Kind::Hidden, Kind::Embed, Kind::Vector] {
        let leaves = run_configured_against_reference(kind, 3, false, 0.0, true, RatioStat::Median, 9, (0.5, 0.0), false,
                                                      NoiseSchedule::Staggered);
        let shapes: Vec<LayerShape> = leaves.iter().map(|l| l.shape).collect();
        let phases = noise_phases(NoiseSchedule::Staggered, 3, &shapes);
        let stored: Vec<i32> = leaves.iter().flat_map(|l| l.prev_step.clone()).collect();
        let want: Vec<i32> = phases.iter().map(|&p| [8, 9, 7][p as usize]).collect();
        assert_eq!(stored, want, "{kind}: phases {phases:?}");
        assert!(phases.iter().any(|&p| p != 0), "{kind}: every layer in phase 0: {phases:?}");
    }
}

#[test]
fn shaped_ratios_match_reference() {
    // Tempered (p = 0.5) and floored: every kind, against the f64 reference's own formula.
    run_shaped_against_reference(Kind::Hidden, 1, false, 0.0, true, RatioStat::Max, 5, (0.5, 0.4));
    run_shaped_against_reference(Kind::Embed, 2, false, 0.0, true, RatioStat::Max, 6, (0.5, 0.0));
    run_shaped_against_reference(Kind::Vector, 1, false, 0.0, true, RatioStat::Mean, 4, (1.0, 0.8));
}

/// The median reference caps r at 1: against the f64 reference, tempered or not, on every kind;
/// at least one layer above the median (r = 1) and one below (r < 1) on the last step.
#[test]
fn median_reference_matches_reference() {
    for (kind, k, shaping) in [(Kind::Hidden, 1, (1.0, 0.0)), (Kind::Embed, 2, (0.5, 0.0)), (Kind::Vector, 1, (0.5, 0.3))] {
        let leaves = run_configured_against_reference(kind, k, false, 0.0, true, RatioStat::Median, 6, shaping, false, NoiseSchedule::Synchronous);
        let r: Vec<f32> = leaves.iter().flat_map(|l| l.ratio.clone()).collect();
        assert!(r.iter().all(|&x| x <= 1.0) && r.contains(&1.0) && r.iter().any(|&x| x < 1.0), "{kind}: {r:?}");
    }
}

thread_local! {
    /// ratio_cap for `run_configured_against_reference` (None: the statistic's default).
    static CAP: std::cell::RefCell<Option<f32>> = const { std::cell::RefCell::new(None) };
}

/// Without the cap (ratio_cap = inf) the median reference lets the quieter half step faster
/// (r > 1); with a cap of 1.3 no layer passes it: every kind against the f64 reference.
#[test]
fn uncapped_median_matches_reference() {
    for (cap, kind, k) in [(f32::INFINITY, Kind::Hidden, 1), (f32::INFINITY, Kind::Embed, 2), (1.3, Kind::Vector, 1)] {
        CAP.with(|c| *c.borrow_mut() = Some(cap));
        let leaves = run_configured_against_reference(kind, k, false, 0.0, true, RatioStat::Median, 6, (0.5, 0.0), false,
                                                      NoiseSchedule::Synchronous);
        CAP.with(|c| *c.borrow_mut() = None);
        let r: Vec<f32> = leaves.iter().flat_map(|l| l.ratio.clone()).collect();
        assert!(r.iter().any(|&x| x > 1.0) && r.iter().all(|&x| x <= cap), "{kind}: {r:?}");
    }
}

/// The noise-to-signal option: H tracks (||G - G_prev|| / ||B||)^2, every kind, against the
/// f64 reference; and it differs from the absolute measure on the same inputs.
#[test]
fn relative_noise_matches_reference() {
    for (kind, k, stat) in [(Kind::Hidden, 1, RatioStat::Max), (Kind::Embed, 2, RatioStat::Mean), (Kind::Vector, 1, RatioStat::Max)] {
        let relative = run_configured_against_reference(kind, k, false, 0.0, true, stat, 6, (1.0, 0.0), true, NoiseSchedule::Synchronous);
        let absolute = run_configured_against_reference(kind, k, false, 0.0, true, stat, 6, (1.0, 0.0), false, NoiseSchedule::Synchronous);
        let (hr, ha): (Vec<f32>, Vec<f32>) = (relative.iter().flat_map(|l| l.noise.clone()).collect(),
                                              absolute.iter().flat_map(|l| l.noise.clone()).collect());
        assert!(hr.iter().zip(&ha).any(|(a, b)| (a - b).abs() > 1e-3 * b.abs()), "{kind}: {hr:?} vs {ha:?}");
    }
}

#[test]
fn embed_and_vector_match_reference() {
    for kind in [Kind::Embed, Kind::Vector] {
        run_against_reference(kind, 1, false, 0.0, true, RatioStat::Max, 6);
        run_against_reference(kind, 2, true, 0.05, true, RatioStat::Mean, 7);
        run_against_reference(kind, 1, false, 0.0, true, RatioStat::Min, 4);
        run_against_reference(kind, 1, false, 0.05, false, RatioStat::Max, 4);
    }
}

/// The driver gives each thread whole layers when a group has many of them (and splits each
/// product across threads when it has few): both schedules must give the same numbers. Noise
/// adaptation is off so that a layer's result does not depend on its group; one layer's
/// gradient is not finite.
#[test]
fn many_layers_in_one_call_equal_each_leaf_alone() {
    let mut cfg = StepConfig { noise_every: 1, ..StepConfig::paper(Kind::Hidden) };
    cfg.noise_every = 1;
    cfg.noise_adaptive = false;
    let h = Hyper { weight_decay: 0.1, ..hyper() };
    // 160 x 160 products are large enough to be split across threads when run alone.
    let shapes = [(3, 160, 160, true), (2, 40, 96, false), (1, 96, 40, true), (4, 8, 8, true), (1, 1, 5, true)];
    let mut rng = Rng::new(77);
    let make = |rng: &mut Rng| -> Vec<Leaf> {
        shapes
            .iter()
            .map(|&(l, r, c, rin)| {
                Leaf::new(LayerShape { layers: l, rows: r, cols: c, rows_are_input: rin }, rng.normals(l * r * c, 0.5))
            })
            .collect()
    };
    let mut together = make(&mut rng);
    let mut alone = make(&mut Rng::new(77));
    for t in 1..=3 {
        let mut grads: Vec<Vec<f32>> = shapes.iter().map(|&(l, r, c, _)| rng.normals(l * r * c, 1.0)).collect();
        if t == 2 {
            grads[0][160 * 160 + 7] = f32::INFINITY; // layer 1 of leaf 0
        }
        step(&cfg, &h, t, &mut together, &grads);
        for (leaf, g) in alone.iter_mut().zip(&grads) {
            step(&cfg, &h, t, std::slice::from_mut(leaf), std::slice::from_ref(g));
        }
        for (i, (a, b)) in together.iter().zip(&alone).enumerate() {
            let ctx = format!("t={t} leaf {i}");
            assert_eq!(a.param, b.param, "{ctx}: param");
            assert_eq!(a.momentum, b.momentum, "{ctx}: momentum");
            assert_eq!(a.prev_grad, b.prev_grad, "{ctx}: prev_grad");
            assert_eq!(a.noise, b.noise, "{ctx}: noise");
            assert_eq!(a.prev_step, b.prev_step, "{ctx}: prev_step");
        }
    }
    assert!(together[0].param.iter().all(|x| x.is_finite()));
}

/// The in-place path writes exactly X + update for an embedding large enough to go through the
/// CPU's elementwise pieces in parallel.
#[test]
fn large_embed_in_place_equals_update_applied() {
    let mut cfg = StepConfig { noise_every: 1, ..StepConfig::paper(Kind::Embed) };
    cfg.noise_every = 1;
    cfg.nesterov = true;
    let h = Hyper { weight_decay: 0.05, ..hyper() };
    let shape = LayerShape { layers: 2, rows: 211, cols: 97, rows_are_input: true };
    let n = 2 * 211 * 97;
    let mut rng = Rng::new(31);
    let p0 = rng.normals(n, 0.5);
    let mut upd = Leaf::new(shape, p0.clone());
    let mut inp = Leaf::new(shape, p0);
    for t in 1..=3 {
        let g = rng.normals(n, 1.0);
        step(&cfg, &h, t, std::slice::from_mut(&mut upd), std::slice::from_ref(&g));
        group_step(&cfg, &h, t, &[0, 0], &mut [inp.io(&g, true)]).unwrap();
        assert_eq!(upd.momentum, inp.momentum, "t={t}");
        assert_eq!(upd.noise, inp.noise, "t={t}");
        let moved = upd.param.iter().zip(&inp.param).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(moved <= 1e-6, "t={t}: in place differs from update applied by {moved}");
    }
    assert!(upd.noise.iter().all(|&x| x > 0.0));
}


/// The adam kind against optax's NAdamW written out in f64 (optax.contrib.muon's Adam branch:
/// scale_by_adam with Nesterov, add_decayed_weights, scale_by_learning_rate), over 6 steps with
/// weight decay, a layer whose gradient is not finite on step 4 (skipped: zero update, its
/// moments and tracker kept), both Nesterov settings; nu lives in the G_prev buffer, r stays 1.
#[test]
fn adam_kind_matches_nadamw_in_f64() {
    for nesterov in [true, false] {
        let cfg = StepConfig { nesterov, adam_eps: 1e-6, ..StepConfig::new(Kind::Adam) };
        assert!(!cfg.noise_adaptive);
        let h = Hyper { lr: 0.01, beta1: 0.9, beta2: 0.99, weight_decay: 0.1, scale: 1.0 };
        let shapes = [LayerShape { layers: 2, rows: 3, cols: 5, rows_are_input: true },
                      LayerShape { layers: 1, rows: 1, cols: 7, rows_are_input: true }];
        let mut rng = Rng::new(41);
        let mut leaves: Vec<Leaf> = shapes.iter().map(|&s| Leaf::new(s, rng.normals(s.layers * s.layer_len(), 1.0))).collect();
        // f64 state per leaf: x, mu, nu.
        let mut x: Vec<Vec<f64>> = leaves.iter().map(|l| l.param.iter().map(|&v| v as f64).collect()).collect();
        let mut mu: Vec<Vec<f64>> = x.iter().map(|v| vec![0.0; v.len()]).collect();
        let mut nu = mu.clone();
        let (b1, b2, lr, wd, eps) = (0.9f64, 0.99f64, 0.01f64, 0.1f64, 1e-6f64);
        for t in 1..=6i32 {
            let mut grads: Vec<Vec<f32>> = shapes.iter().map(|s| rng.normals(s.layers * s.layer_len(), 1.0)).collect();
            if t == 4 {
                grads[0][17] = f32::INFINITY; // layer 1 of leaf 0 (elements 15..30)
            }
            let before: Vec<(Vec<f32>, Vec<f32>)> = leaves.iter().map(|l| (l.momentum.clone(), l.prev_grad.clone())).collect();
            step(&cfg, &h, t, &mut leaves, &grads);
            for (i, lf) in leaves.iter().enumerate() {
                let n = lf.shape.layer_len();
                for l in 0..lf.shape.layers {
                    let r = l * n..(l + 1) * n;
                    let skip = t == 4 && i == 0 && l == 1;
                    if skip {
                        assert!(lf.update[r.clone()].iter().all(|&u| u == 0.0));
                        assert_eq!(&lf.momentum[r.clone()], &before[i].0[r.clone()]);
                        assert_eq!(&lf.prev_grad[r.clone()], &before[i].1[r.clone()]);
                        continue;
                    }
                    let (bc1, bc1n, bc2) = (1.0 - b1.powi(t), 1.0 - b1.powi(t + 1), 1.0 - b2.powi(t));
                    for e in r {
                        let g = grads[i][e] as f64;
                        mu[i][e] = (1.0 - b1) * g + b1 * mu[i][e];
                        nu[i][e] = (1.0 - b2) * g * g + b2 * nu[i][e];
                        let m = if nesterov { b1 * mu[i][e] / bc1n + (1.0 - b1) * g / bc1 } else { mu[i][e] / bc1 };
                        let u = m / ((nu[i][e] / bc2).sqrt() + eps);
                        let delta = -lr * (u + wd * x[i][e]);
                        x[i][e] += delta;
                        let tol = 1e-5 * lr.max(delta.abs());
                        assert!((lf.update[e] as f64 - delta).abs() <= tol, "nesterov {nesterov} t={t} leaf {i}[{e}]: {} vs {delta}", lf.update[e]);
                        assert!((lf.momentum[e] as f64 - mu[i][e]).abs() <= 1e-6 * (1.0 + mu[i][e].abs()));
                        assert!((lf.prev_grad[e] as f64 - nu[i][e]).abs() <= 1e-6 * (1.0 + nu[i][e]));
                    }
                }
                assert!(lf.ratio.iter().all(|&r| r == 1.0) && lf.noise.iter().all(|&h| h == 0.0));
            }
        }
    }
}
