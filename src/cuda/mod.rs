//! The CUDA backend: the fused group step as XLA custom calls on XLA's stream.
//!
//! `sys` finds the CUDA libraries at run time (nothing CUDA is linked), `device` is the safe
//! layer (compiled kernels and cuBLAS per context, launches), `step` enqueues one group step.
//! The kernels (`kernels.cu`) are compiled by NVRTC once per process and context.

pub mod device;
pub mod step;
pub mod sys;

pub use device::{compile, KERNEL_NAMES, KERNEL_SOURCE};
pub use step::{
    batches, enqueue_on, group_step, noise_gemm_kernel, plan_in_scratch, prepare_device, scratch_layout, CudaOptions, GemmArgs, GroupArgs, LeafBatch,
    Plan, Queue, ScratchLayout, MAX_LEAVES, SCRATCH_ALIGN,
};
