//! Test support, one file per thing it builds: a fake XLA Api table (`fake_xla`), hand-built call
//! frames (`frames`), seeded random data (`data`), host-memory leaves (`fixtures`) and a float64
//! reference of the LANTON math (`reference`: SVD by Jacobi, Newton-Schulz, norms, the step).
#![allow(dead_code)]
// Each test crate uses part of the support: the rest is unused there.
#![allow(unused_imports)]

use lanton::ffi::api::*;
use lanton::step::{Hyper, Kind, LayerShape, NoiseSchedule, RatioStat, StepConfig};
use std::ffi::{c_void, CStr};

mod data;
mod fake_xla;
mod fixtures;
mod frames;
mod reference;

pub use data::*;
pub use fake_xla::*;
pub use fixtures::*;
pub use frames::*;
pub use reference::*;
