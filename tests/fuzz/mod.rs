//! The fuzz harness of tests/fuzz_frames.rs, one file per thing it builds: the PRNG (`rng`),
//! guarded memory (`memory`), frame descriptions (`spec`), their mutations (`mutators`), real
//! call frames from them (`materialize`), the targets and run statistics (`targets`), the XLA and
//! C ABI cases (`frames`, `c_abi`), and the regressions it found (`regressions`).
#![allow(clippy::too_many_arguments)]

pub use crate::common::{fake_api, take_error};
pub use lanton::capi::*;
pub use lanton::cuda::{batches, CudaOptions, Plan};
pub use lanton::ffi::api::*;
pub use lanton::ffi::handler::{dispatch, PANIC_MESSAGE};
pub use lanton::ffi::FfiError;
pub use lanton::handlers::{
    check_cuda_limits, GROUP_ARGS, decode_cuda_options, decode_layout, lanton_step_inplace_cpu, lanton_step_inplace_cuda,
    lanton_step_update_cpu, lanton_step_update_cuda,
};
pub use std::collections::{BTreeMap, BTreeSet};
pub use std::ffi::{c_char, c_void, CStr};
pub use std::io::Write;

pub const DEFAULT_ITERS: u64 = 20_000;
pub const DEFAULT_SEED: u64 = 0x1a2705;

mod rng;
mod memory;
mod spec;
mod mutators;
mod materialize;
mod targets;
mod frames;
mod c_abi;
mod regressions;

pub use rng::*;
pub use memory::*;
pub use spec::*;
pub use mutators::*;
pub use materialize::*;
pub use targets::*;
pub use frames::*;
pub use c_abi::*;
