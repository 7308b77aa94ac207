//! The CPU targets' view of a decoded call: host tensors over the checked buffers (state
//! inputs copied into their results unless donated), then the CPU backend's group step.

use super::decode::{decode_call, RETS_PER_LEAF};
use crate::cpu::{self, LeafIo, ParamIo};
use crate::ffi::{CallFrame, FfiError, FfiResult};
use crate::step::layout::{LeafBuffers, Pair, StepLayout};
use crate::step::{self, Hyper, StepConfig};
use crate::tensor::TensorMut;

/// Everything the CPU step needs, borrowed from the frame.
pub struct DecodedStep<'a> {
    pub config: StepConfig,
    pub hyper: Hyper,
    pub t: i32,
    /// Every layer's noise phase, leaf order: the call's, or `step::noise_phases`.
    pub phases: Vec<i32>,
    pub leaves: Vec<LeafIo<'a>>,
}

/// The CPU view of a decoded call: host slices, state inputs copied into their results.
pub fn decode_step_call<'a>(call: &CallFrame<'a>, in_place: bool) -> FfiResult<DecodedStep<'a>> {
    let (layout, set) = decode_call(call, in_place)?;
    let phases = match &layout.phases {
        Some(b) => set.input_i32(b, "argument 'phases'")?.to_vec(),
        None => step::noise_phases(layout.config.noise_schedule, layout.config.noise_every, &layout.shapes()),
    };
    let StepLayout { config, hyper: hyper_b, step: step_b, leaves: bufs, scratch, .. } = layout;
    if scratch.is_some() {
        return Err(FfiError::invalid(format!(
            "the CPU targets take no scratch result: expected {RETS_PER_LEAF} x {} results, got one more",
            bufs.len()
        )));
    }
    let hyper = Hyper::from_slice(set.input(&hyper_b, "hyper")?.into_f32("hyper").map_err(FfiError::invalid)?).map_err(FfiError::invalid)?;
    let t = set.input_i32(&step_b, "step")?[0];
    if t < 1 {
        return Err(FfiError::invalid(format!("argument 'step': expected the 1-based step t >= 1, got {t}")));
    }

    let mut leaves = Vec::with_capacity(bufs.len());
    for LeafBuffers { name, shape, grad, state, param: param_io, ratio } in bufs {
        let float_out = |p: &Pair<'a>, what: &str| -> FfiResult<TensorMut<'a>> {
            let mut out = set.output(&p.ret, what)?;
            if !p.aliased {
                out.copy_from(&set.input(&p.arg, what)?).map_err(FfiError::internal)?;
            }
            Ok(out)
        };
        let f32_out = |p: &Pair<'a>, what: &str| -> FfiResult<&'a mut [f32]> { float_out(p, what)?.into_f32(what).map_err(FfiError::invalid) };
        let i32_out = |p: &Pair<'a>| -> FfiResult<&'a mut [i32]> {
            let out = set.output_i32(&p.ret, &name)?;
            if !p.aliased {
                out.copy_from_slice(set.input_i32(&p.arg, &name)?);
            }
            Ok(out)
        };
        let (prev_step, skipped) = (i32_out(&state[4])?, i32_out(&state[5])?);
        let params = if in_place {
            ParamIo::InPlace { param: float_out(&param_io, &name)? }
        } else {
            ParamIo::Update { param: set.input(&param_io.arg, &name)?, update: set.output(&param_io.ret, &name)? }
        };
        leaves.push(LeafIo {
            shape,
            params,
            grad: set.input(&grad, &name)?,
            momentum: float_out(&state[0], &name)?,
            prev_grad: float_out(&state[1], &name)?,
            noise: f32_out(&state[2], &name)?,
            valid: f32_out(&state[3], &name)?,
            prev_step,
            skipped,
            ratio: set.output(&ratio, &name)?.into_f32(&name).map_err(FfiError::invalid)?,
        });
    }
    Ok(DecodedStep { config, hyper, t, phases, leaves })
}

pub(super) fn run_cpu_step(call: &CallFrame, in_place: bool) -> FfiResult<()> {
    let mut d = decode_step_call(call, in_place)?;
    cpu::group_step(&d.config, &d.hyper, d.t, &d.phases, &mut d.leaves).map_err(|e| match e {
        cpu::PoolError::Env(m) => FfiError::precondition(m),
        cpu::PoolError::Build(m) => FfiError::internal(m),
    })
}
