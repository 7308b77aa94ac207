//! lanton: the LANTON optimizer step (noise-adaptive layer-wise learning rates on Muon-style
//! geometry, arXiv 2510.14009) as fused XLA FFI custom calls.
//!
//! Layout: `ffi` is the XLA FFI ABI layer, `step` the one definition of the LANTON step, `tensor`
//! the host tensor view, `cpu` the CPU backend, `cuda` the CUDA backend, `handlers` the exported
//! XLA targets, `capi` the plain C ABI.

pub mod capi;
pub mod cpu;
pub mod cuda;
pub mod ffi;
pub mod handlers;
pub mod step;
pub mod tensor;
