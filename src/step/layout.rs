//! The buffers of one decoded group step, backend-neutral: `handlers` builds a `StepLayout` from
//! an XLA call frame (validating every dtype and shape), and each backend reads it (the CPU as
//! host slices, CUDA as device addresses). It lives on this floor because both need it.

use super::{LayerShape, StepConfig};
use crate::ffi::{BufferRef, BufferSet};

/// A state buffer pair (arg i -> ret j): aliased when donated, otherwise copied through.
pub struct Pair<'a> {
    pub arg: BufferRef<'a>,
    pub ret: BufferRef<'a>,
    pub aliased: bool,
}

/// A leaf's validated buffers (backend-neutral: the CUDA path uses the device addresses).
pub struct LeafBuffers<'a> {
    pub name: String,
    pub shape: LayerShape,
    pub grad: BufferRef<'a>,
    /// (arg -> ret): momentum, prev_grad, noise, valid, prev_step.
    pub state: [Pair<'a>; 5],
    /// param -> out (aliased for the in-place variant when donated).
    pub param: Pair<'a>,
    pub ratio: BufferRef<'a>,
}

/// A decoded, validated step call: every buffer checked for dtype and shape, and the outputs
/// proved not to overlap anything else (`set` is sealed).
pub struct StepLayout<'a> {
    pub config: StepConfig,
    pub in_place: bool,
    pub hyper: BufferRef<'a>,
    pub step: BufferRef<'a>,
    pub leaves: Vec<LeafBuffers<'a>>,
    /// The trailing uint8 scratch result (rank 1), if the call has one (the CUDA targets need
    /// it, the CPU targets refuse it); its size is checked against the plan by the backend.
    pub scratch: Option<BufferRef<'a>>,
    pub set: BufferSet,
}
