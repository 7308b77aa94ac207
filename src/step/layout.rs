//! The buffers of one decoded group step, backend-neutral and front-end-neutral: a front end
//! (the XLA handlers) builds a `StepLayout` of `RawTensor`s after validating every dtype and
//! shape and proving the outputs overlap nothing else; each backend reads it (the CPU through
//! the front end's checked host views, CUDA as device addresses). It lives on this floor
//! because both backends need it.

use super::{LayerShape, StepConfig};
use crate::tensor::RawTensor;

/// A state buffer pair (arg i -> ret j): aliased when donated, otherwise copied through.
pub struct Pair<'a> {
    pub arg: RawTensor<'a>,
    pub ret: RawTensor<'a>,
    pub aliased: bool,
}

/// A leaf's validated buffers.
pub struct LeafBuffers<'a> {
    pub name: String,
    pub shape: LayerShape,
    pub grad: RawTensor<'a>,
    /// (arg -> ret): momentum, prev_grad, noise, valid, prev_step, skipped.
    pub state: [Pair<'a>; 6],
    /// param -> out (aliased for the in-place variant when donated).
    pub param: Pair<'a>,
    pub ratio: RawTensor<'a>,
}

/// A decoded, validated step call: every buffer checked for dtype and shape, and the outputs
/// proved not to overlap anything else.
pub struct StepLayout<'a> {
    pub config: StepConfig,
    pub in_place: bool,
    pub hyper: RawTensor<'a>,
    pub step: RawTensor<'a>,
    pub leaves: Vec<LeafBuffers<'a>>,
    /// Every layer's noise phase (i32, leaf order), if the call passes them; otherwise the
    /// phases of `config.noise_schedule` (`step::noise_phases`).
    pub phases: Option<RawTensor<'a>>,
    /// The trailing uint8 scratch result (rank 1), if the call has one (the CUDA targets need
    /// it, the CPU targets refuse it); its size is checked against the plan by the backend.
    pub scratch: Option<RawTensor<'a>>,
}

impl StepLayout<'_> {
    /// The layers' shapes, leaf by leaf.
    pub fn shapes(&self) -> Vec<super::LayerShape> {
        self.leaves.iter().map(|l| l.shape).collect()
    }

    /// Names the group in errors: its kind and its leaves (the first few).
    pub fn describe(&self) -> String {
        let names: Vec<&str> = self.leaves.iter().take(3).map(|l| l.name.as_str()).collect();
        let more = if self.leaves.len() > 3 { format!(", ... {} leaves in all", self.leaves.len()) } else { String::new() };
        format!("the {} group ({}{more})", self.config.kind, names.join(", "))
    }
}
