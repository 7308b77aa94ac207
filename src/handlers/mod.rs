//! The exported XLA FFI handlers. Each decodes and validates its frame in one place (`decode`),
//! then calls the backend's plain group-step function (`cpu`, `cuda`: one file per concern).

mod cpu;
mod cuda;
mod decode;

pub use self::cpu::{decode_step_call, DecodedStep};
pub use self::cuda::{check_cuda_limits, decode_cuda_options};
pub use self::decode::{decode_call, decode_config, decode_layout, ARGS_PER_LEAF, GROUP_ARGS, RETS_PER_LEAF};

use crate::ffi::api::{XLA_FFI_CallFrame, XLA_FFI_Error, TRAIT_COMMAND_BUFFER_COMPATIBLE};
use crate::ffi::handler::{dispatch, dispatch_staged};
use self::cpu::run_cpu_step;
use self::cuda::{prepare_cuda, run_cuda_step};

/// XLA FFI handler (CPU): one LANTON step for one group; results are optax updates.
///
/// # Safety
/// Called by XLA with a valid call frame.
#[no_mangle]
pub unsafe extern "C" fn lanton_step_update_cpu(frame: *mut XLA_FFI_CallFrame) -> *mut XLA_FFI_Error {
    dispatch(frame, "lanton_step_update_cpu", TRAIT_COMMAND_BUFFER_COMPATIBLE, |c| run_cpu_step(c, false))
}

/// XLA FFI handler (CPU): one LANTON step for one group; parameters are updated in place.
///
/// # Safety
/// Called by XLA with a valid call frame.
#[no_mangle]
pub unsafe extern "C" fn lanton_step_inplace_cpu(frame: *mut XLA_FFI_CallFrame) -> *mut XLA_FFI_Error {
    dispatch(frame, "lanton_step_inplace_cpu", TRAIT_COMMAND_BUFFER_COMPATIBLE, |c| run_cpu_step(c, true))
}

/// XLA FFI handler (CUDA): one LANTON step for one group on XLA's stream; optax updates.
/// Registered for the initialize stage too, where it compiles the kernels (`prepare_device`).
///
/// # Safety
/// Called by XLA with a valid call frame.
#[no_mangle]
pub unsafe extern "C" fn lanton_step_update_cuda(frame: *mut XLA_FFI_CallFrame) -> *mut XLA_FFI_Error {
    dispatch_staged(frame, "lanton_step_update_cuda", TRAIT_COMMAND_BUFFER_COMPATIBLE, prepare_cuda, |c| {
        run_cuda_step(c, false)
    })
}

/// XLA FFI handler (CUDA): one LANTON step for one group; parameters updated in place.
///
/// # Safety
/// Called by XLA with a valid call frame.
#[no_mangle]
pub unsafe extern "C" fn lanton_step_inplace_cuda(frame: *mut XLA_FFI_CallFrame) -> *mut XLA_FFI_Error {
    dispatch_staged(frame, "lanton_step_inplace_cuda", TRAIT_COMMAND_BUFFER_COMPATIBLE, prepare_cuda, |c| {
        run_cuda_step(c, true)
    })
}
