//! CPU backend: GEMM-based Newton-Schulz, the cheap norms, and the group step driver.

pub mod gemm;
pub mod kernels;
pub mod newton_schulz;
pub mod step;
pub mod tridiag;

pub use gemm::{check_env, PoolError};
pub use step::{group_step, LeafIo, ParamIo};
