//! One decoder of a group's step configuration from named options, whatever carries them: the
//! XLA call's attributes (`handlers`) or the C ABI's JSON object (`capi`), each a thin `Options`
//! adapter. The defaults are `StepConfig::new`'s, the bounds are checked here and in
//! `StepConfig::validate`: once for both front ends.

use super::{Kind, NoiseSchedule, NuclearEstimator, RatioStat, StepConfig};

/// The option names the decoder reads (`kind` is required, every other one optional).
pub const CONFIG_KEYS: [&str; 16] = [
    "kind",
    "ns_coeffs",
    "noise_every",
    "noise_schedule",
    "noise_adaptive",
    "ratio_stat",
    "ratio_eps",
    "ratio_power",
    "ratio_floor",
    "ratio_cap",
    "noise_relative",
    "nesterov",
    "vector_eps",
    "noise_estimator",
    "adam_eps",
    "adam_eps_root",
];

/// Named option values. Each getter returns `Ok(None)` when the option is absent and an error
/// (saying what was expected and what came) when it has the wrong type.
pub trait Options {
    fn text(&self, name: &str) -> Result<Option<String>, String>;
    fn number(&self, name: &str) -> Result<Option<f64>, String>;
    fn integer(&self, name: &str) -> Result<Option<i64>, String>;
    fn flag(&self, name: &str) -> Result<Option<bool>, String>;
    /// Newton-Schulz coefficients, flat: a, b, c of each step in turn.
    fn numbers(&self, name: &str) -> Result<Option<Vec<f64>>, String>;
}

/// The configuration the options give, over `StepConfig::new`'s defaults. Errors name the
/// option as `'name': ...`; the front end says where it came from (an attribute, a JSON key).
pub fn decode(src: &impl Options) -> Result<StepConfig, String> {
    let kind_s = src.text("kind")?.ok_or("'kind' (hidden, embed, vector or adam) is required")?;
    let kind = Kind::parse(&kind_s).ok_or_else(|| format!("'kind': expected one of hidden, embed, vector, adam, got '{kind_s}'"))?;
    let mut cfg = StepConfig::new(kind);
    if let Some(flat) = src.numbers("ns_coeffs")? {
        if flat.len() % 3 != 0 {
            return Err(format!("'ns_coeffs': expected (a, b, c) triples (a multiple of 3 values), got {}", flat.len()));
        }
        cfg.ns_coeffs = flat.chunks(3).map(|c| [c[0] as f32, c[1] as f32, c[2] as f32]).collect();
    }
    if let Some(k) = src.integer("noise_every")? {
        // Bounded by the step count's type (t is i32; the CUDA kernels take K as an int too).
        if !(1..=i32::MAX as i64).contains(&k) {
            return Err(format!("'noise_every': expected an integer from 1 to {}, got {k}", i32::MAX));
        }
        cfg.noise_every = k as u32;
    }
    if let Some(s) = src.text("noise_schedule")? {
        cfg.noise_schedule = NoiseSchedule::parse(&s)
            .ok_or_else(|| format!("'noise_schedule': expected synchronous or staggered, got '{s}'"))?;
    }
    if let Some(s) = src.text("ratio_stat")? {
        cfg.ratio_stat =
            RatioStat::parse(&s).ok_or_else(|| format!("'ratio_stat': expected max, mean, min or median, got '{s}'"))?;
        cfg.ratio_cap = cfg.ratio_stat.default_cap();
    }
    if let Some(s) = src.text("noise_estimator")? {
        cfg.nuclear = NuclearEstimator::parse(&s)
            .ok_or_else(|| format!("'noise_estimator': expected auto, eigen or polar, got '{s}'"))?;
    }
    let set_flag = |name: &str, field: &mut bool| -> Result<(), String> {
        if let Some(b) = src.flag(name)? {
            *field = b;
        }
        Ok(())
    };
    set_flag("noise_adaptive", &mut cfg.noise_adaptive)?;
    set_flag("noise_relative", &mut cfg.noise_relative)?;
    set_flag("nesterov", &mut cfg.nesterov)?;
    let set_number = |name: &str, field: &mut f32| -> Result<(), String> {
        if let Some(x) = src.number(name)? {
            *field = x as f32;
        }
        Ok(())
    };
    set_number("ratio_eps", &mut cfg.ratio_eps)?;
    set_number("ratio_power", &mut cfg.ratio_power)?;
    set_number("ratio_floor", &mut cfg.ratio_floor)?;
    set_number("ratio_cap", &mut cfg.ratio_cap)?;
    set_number("vector_eps", &mut cfg.vector_eps)?;
    set_number("adam_eps", &mut cfg.adam_eps)?;
    set_number("adam_eps_root", &mut cfg.adam_eps_root)?;
    cfg.validate()?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[derive(Default)]
    struct Map(HashMap<&'static str, &'static str>);

    impl Options for Map {
        fn text(&self, n: &str) -> Result<Option<String>, String> {
            Ok(self.0.get(n).map(|s| s.to_string()))
        }
        fn number(&self, n: &str) -> Result<Option<f64>, String> {
            self.0.get(n).map(|s| s.parse().map_err(|_| format!("'{n}': not a number"))).transpose()
        }
        fn integer(&self, n: &str) -> Result<Option<i64>, String> {
            self.0.get(n).map(|s| s.parse().map_err(|_| format!("'{n}': not an integer"))).transpose()
        }
        fn flag(&self, n: &str) -> Result<Option<bool>, String> {
            self.0.get(n).map(|s| s.parse().map_err(|_| format!("'{n}': not a flag"))).transpose()
        }
        fn numbers(&self, n: &str) -> Result<Option<Vec<f64>>, String> {
            Ok(self.0.get(n).map(|s| s.split(',').map(|x| x.parse().unwrap()).collect()))
        }
    }

    #[test]
    fn absent_options_take_the_one_set_of_defaults() {
        let cfg = decode(&Map([("kind", "embed")].into())).unwrap();
        assert_eq!(cfg, StepConfig::new(Kind::Embed));
        assert_eq!((cfg.noise_every, cfg.ratio_stat, cfg.ratio_power), (10, RatioStat::Median, 0.5));
    }

    #[test]
    fn options_override_and_bounds_are_named() {
        let cfg = decode(&Map([("kind", "hidden"), ("noise_every", "3"), ("ratio_stat", "max"), ("ns_coeffs", "1,2,3")].into()))
            .unwrap();
        assert_eq!((cfg.noise_every, cfg.ratio_stat, cfg.ns_coeffs.clone()), (3, RatioStat::Max, vec![[1.0, 2.0, 3.0]]));
        // The cap follows the statistic unless given (median: 1, the others: none).
        assert_eq!(cfg.ratio_cap, f32::INFINITY);
        assert_eq!(decode(&Map([("kind", "hidden")].into())).unwrap().ratio_cap, 1.0);
        let uncapped = decode(&Map([("kind", "hidden"), ("ratio_cap", "inf")].into())).unwrap();
        assert_eq!((uncapped.ratio_stat, uncapped.ratio_cap), (RatioStat::Median, f32::INFINITY));
        let capped = decode(&Map([("kind", "hidden"), ("ratio_cap", "2"), ("ratio_stat", "mean")].into())).unwrap();
        assert_eq!(capped.ratio_cap, 2.0);
        for (pairs, needle) in [
            (vec![], "'kind' (hidden, embed, vector or adam) is required"),
            (vec![("kind", "conv")], "'kind': expected one of hidden, embed, vector, adam, got 'conv'"),
            (vec![("kind", "adam"), ("noise_adaptive", "true")], "an adam group tracks no noise"),
            (vec![("kind", "adam"), ("adam_eps", "-1")], "adam_eps and adam_eps_root must be finite and >= 0"),
            (vec![("kind", "hidden"), ("noise_every", "0")], "'noise_every': expected an integer from 1 to"),
            (vec![("kind", "hidden"), ("noise_every", "2147483648")], "got 2147483648"),
            (vec![("kind", "hidden"), ("ns_coeffs", "1,2")], "'ns_coeffs': expected (a, b, c) triples"),
            (vec![("kind", "hidden"), ("ratio_stat", "mode")], "'ratio_stat': expected max, mean, min or median"),
            (vec![("kind", "hidden"), ("noise_schedule", "random")], "'noise_schedule': expected synchronous or staggered, got 'random'"),
            (vec![("kind", "hidden"), ("ratio_power", "-1")], "ratio_power must be finite and >= 0"),
            (vec![("kind", "hidden"), ("ratio_cap", "0")], "ratio_cap must be > 0 and >= ratio_floor (0), got 0"),
            (vec![("kind", "hidden"), ("ratio_cap", "0.5"), ("ratio_floor", "0.6")], "ratio_cap must be > 0 and >= ratio_floor"),
            (vec![("kind", "hidden"), ("ratio_cap", "NaN")], "ratio_cap must be > 0"),
        ] {
            let err = decode(&Map(pairs.into_iter().collect())).unwrap_err();
            assert!(err.contains(needle), "{err:?} should contain {needle:?}");
        }
    }
}
