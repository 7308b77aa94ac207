//! The CUDA backend: the fused group step on a caller's stream (XLA's, via `crate::handlers`).
//!
//! `sys` finds the CUDA libraries at run time (nothing CUDA is linked), `device` is the safe
//! layer (compiled kernels and cuBLAS per context, launches), `kernels` names our kernels,
//! `args` mirrors their argument structs, `plan` lays out one step's scratch and arguments, and
//! `launch` enqueues them. Nothing here knows XLA: the handler passes a stream and a layout.

pub mod args;
pub mod device;
pub mod kernels;
pub mod launch;
pub mod plan;
pub mod sys;

pub use args::{batches, GemmArgs, GroupArgs, LeafArgs, LeafBatch, MAX_LEAVES};
pub use device::compile;
pub use kernels::{Kernel, KERNEL_NAMES, KERNEL_SOURCE};
pub use launch::{enqueue_on, group_step, prepare_device, Queue};
pub use plan::{noise_gemm_kernel, plan_in_scratch, scratch_layout, CudaOptions, Plan, ScratchLayout, SCRATCH_ALIGN};

/// Why the CUDA backend refused or failed a step, by whose fault: the caller's arguments, the
/// state of the process or device (for example a stream under capture), or ours.
#[derive(Debug, Clone, PartialEq)]
pub enum CudaError {
    Invalid(String),
    Precondition(String),
    Internal(String),
}

impl CudaError {
    pub fn message(&self) -> &str {
        match self {
            CudaError::Invalid(m) | CudaError::Precondition(m) | CudaError::Internal(m) => m,
        }
    }
}

impl std::fmt::Display for CudaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}
