//! Host-memory leaves for driving the step directly or through the C ABI.

use super::*;

/// Owned f32 state of one leaf (zeroed state, r = 0 until the first step writes it), for
/// driving the step directly or through the C ABI.
pub struct OwnedLeaf {
    pub shape: LayerShape,
    pub param: Vec<f32>,
    pub momentum: Vec<f32>,
    pub prev_grad: Vec<f32>,
    pub noise: Vec<f32>,
    pub valid: Vec<f32>,
    pub prev_step: Vec<i32>,
    pub ratio: Vec<f32>,
    pub skipped: Vec<i32>,
    pub update: Vec<f32>,
}

impl OwnedLeaf {
    pub fn new(shape: LayerShape, param: Vec<f32>) -> Self {
        let (n, l) = (param.len(), shape.layers);
        OwnedLeaf {
            shape,
            param,
            momentum: vec![0.0; n],
            prev_grad: vec![0.0; n],
            noise: vec![0.0; l],
            valid: vec![0.0; l],
            prev_step: vec![0; l],
            ratio: vec![0.0; l],
            skipped: vec![0; l],
            update: vec![0.0; n],
        }
    }

    /// The CPU kernel's view of this leaf with gradient `grad`: the update written beside the
    /// parameters, or the parameters rewritten in place.
    pub fn io<'a>(&'a mut self, grad: &'a [f32], in_place: bool) -> lanton::cpu::LeafIo<'a> {
        use lanton::cpu::{LeafIo, ParamIo};
        use lanton::tensor::{Tensor, TensorMut};
        let params = if in_place {
            ParamIo::InPlace { param: TensorMut::F32(&mut self.param) }
        } else {
            ParamIo::Update { param: Tensor::F32(&self.param), update: TensorMut::F32(&mut self.update) }
        };
        LeafIo {
            shape: self.shape,
            params,
            grad: Tensor::F32(grad),
            momentum: TensorMut::F32(&mut self.momentum),
            prev_grad: TensorMut::F32(&mut self.prev_grad),
            noise: &mut self.noise,
            valid: &mut self.valid,
            prev_step: &mut self.prev_step,
            skipped: &mut self.skipped,
            ratio: &mut self.ratio,
        }
    }

    /// This leaf as the C ABI's descriptor with gradient `grad`: its pointers borrow `self`
    /// and `grad`, so both must outlive every call that uses it.
    pub fn c_leaf(&mut self, grad: &[f32]) -> lanton::capi::LantonLeafF32 {
        lanton::capi::LantonLeafF32 {
            layers: self.shape.layers,
            rows: self.shape.rows,
            cols: self.shape.cols,
            rows_are_input: self.shape.rows_are_input as u8,
            param: self.param.as_mut_ptr(),
            grad: grad.as_ptr(),
            momentum: self.momentum.as_mut_ptr(),
            prev_grad: self.prev_grad.as_mut_ptr(),
            noise: self.noise.as_mut_ptr(),
            valid: self.valid.as_mut_ptr(),
            prev_step: self.prev_step.as_mut_ptr(),
            ratio: self.ratio.as_mut_ptr(),
            skipped: self.skipped.as_mut_ptr(),
        }
    }
}
