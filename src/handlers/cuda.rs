//! The CUDA targets' policy: what the CUDA kernels refuse (options they do not have, groups
//! they cannot index), their own attributes, then the CUDA backend's group step on XLA's stream
//! (the backend sees a stream and a layout, never the call frame).

use super::decode::decode_layout;
use crate::cuda::{self, CudaError, CudaOptions};
use crate::ffi::{CallFrame, FfiError, FfiResult};
use crate::step::layout::StepLayout;
use crate::step::{self, NoiseSchedule, NuclearEstimator};

/// The CUDA kernels index layers with 32-bit integers: refuse a group they cannot address.
pub fn check_cuda_limits(layout: &StepLayout) -> FfiResult<()> {
    let layers = layout.leaves.iter().try_fold(0usize, |n, l| n.checked_add(l.shape.layers));
    match layers {
        Some(n) if n <= i32::MAX as usize => Ok(()),
        _ => Err(FfiError::invalid(format!("the group has more than {} layers (the CUDA kernels' limit)", i32::MAX))),
    }
}

/// Reads the CUDA-only attributes (optional; defaults: noise work on, bf16 Newton-Schulz).
pub fn decode_cuda_options(call: &CallFrame) -> FfiResult<CudaOptions> {
    let noise_work = call.attr_opt("noise_work", CallFrame::attr_bool)?.unwrap_or(true);
    let ns_f32 = match call.attr_opt("ns_dtype", CallFrame::attr_str)?.as_deref() {
        None | Some("bfloat16") => false,
        Some("float32") => true,
        Some(other) => {
            return Err(FfiError::invalid(format!("attribute 'ns_dtype': expected bfloat16 or float32, got '{other}'")))
        }
    };
    Ok(CudaOptions { noise_work, ns_f32 })
}

pub(super) fn run_cuda_step(call: &CallFrame, in_place: bool) -> FfiResult<()> {
    let layout = decode_layout(call, in_place)?;
    if layout.config.nuclear == NuclearEstimator::GramEigen {
        return Err(FfiError::invalid(
            "attribute 'noise_estimator': 'eigen' runs on CPU only; the CUDA kernels estimate the noise by polar iteration ('polar' or 'auto')",
        ));
    }
    if layout.config.noise_relative {
        return Err(FfiError::invalid(
            "attribute 'noise_relative': the noise-to-signal measure runs on CPU only (an ablation option); \
             the CUDA kernels measure the paper's absolute noise",
        ));
    }
    // Without the argument every layer is at phase 0: right for the synchronous schedule, and for
    // a staggered one whose phases are all 0 anyway (K = 1, one layer per shape class). The phase
    // map is built only in that second case (the shim sends a synchronous call without phases,
    // every step).
    let (schedule, every) = (layout.config.noise_schedule, layout.config.noise_every);
    if layout.phases.is_none()
        && schedule != NoiseSchedule::Synchronous
        && step::noise_phases(schedule, every, &layout.shapes()).iter().any(|&p| p != 0)
    {
        return Err(FfiError::invalid(format!(
            "{}: noise_schedule 'staggered' needs the trailing 'phases' argument on the CUDA targets (int32, one per \
             layer of the group: step::noise_phases; the CPU targets compute it when absent)",
            layout.describe()
        )));
    }
    let opts = decode_cuda_options(call)?;
    check_cuda_limits(&layout)?;
    let plan = cuda::plan_in_scratch(&layout, opts)?;
    let stream = call.stream()?;
    // SAFETY: XLA's stream lives for the whole call, and the layout's buffers are XLA's device
    // buffers of its context, kept until the enqueued work has run.
    unsafe { cuda::group_step(stream, &layout, plan) }?;
    Ok(())
}

/// XLA's initialize stage: the kernels and cuBLAS handle for the stream's context.
pub(super) fn prepare_cuda(call: &CallFrame) -> FfiResult<()> {
    let stream = call.stream()?;
    // SAFETY: XLA's stream lives for the whole call.
    unsafe { cuda::prepare_device(stream) }?;
    Ok(())
}

impl From<CudaError> for FfiError {
    fn from(e: CudaError) -> FfiError {
        match e {
            CudaError::Invalid(m) => FfiError::invalid(m),
            CudaError::Precondition(m) => FfiError::precondition(m),
            CudaError::Internal(m) => FfiError::internal(m),
        }
    }
}
