//! Host tensors: a leaf's elements in memory the CPU can read, in one of the dtypes lanton takes
//! (f32, bf16, f16), as read-only and writable views. Below every front end: the XLA handlers
//! make them from checked call-frame buffers (`ffi::buffers`), the C ABI from the caller's
//! pointers; the CPU backend reads and writes through them. A `RawTensor` is a buffer known by
//! address only (no view yet): what the step layout holds, so that the CUDA backend, which never
//! reads it on the host, gets device addresses without any front end's types.

use half::{bf16, f16};
use std::ffi::c_void;
use std::marker::PhantomData;

/// The element types of a step's buffers. The discriminants are the codes the CUDA kernels read
/// (`DT_*` in src/cuda/kernels.cu), chosen equal to XLA's so a front end's code maps one to one.
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    S32 = 4,
    U8 = 6,
    F16 = 10,
    F32 = 11,
    BF16 = 16,
}

impl Dtype {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            Dtype::U8 => 1,
            Dtype::F16 | Dtype::BF16 => 2,
            Dtype::S32 | Dtype::F32 => 4,
        }
    }
    /// The kernels' code for this dtype.
    pub const fn code(self) -> i32 {
        self as i32
    }
}

/// A buffer by address: `len` elements of `dtype` at `data`, valid for `'a` (the call that
/// handed it out). No slice is made from it here: the CPU path asks its front end for a checked
/// view, the CUDA path passes the address to the device.
#[derive(Clone, Copy, Debug)]
pub struct RawTensor<'a> {
    pub data: *mut c_void,
    pub len: usize,
    pub dtype: Dtype,
    pub _call: PhantomData<&'a ()>,
}

impl RawTensor<'_> {
    /// Bytes the buffer spans.
    pub fn bytes(&self) -> usize {
        self.len * self.dtype.size()
    }
}

/// A read-only floating-point tensor of one of the supported dtypes.
pub enum Tensor<'a> {
    F32(&'a [f32]),
    BF16(&'a [bf16]),
    F16(&'a [f16]),
}

/// A writable floating-point tensor of one of the supported dtypes.
pub enum TensorMut<'a> {
    F32(&'a mut [f32]),
    BF16(&'a mut [bf16]),
    F16(&'a mut [f16]),
}

impl<'a> Tensor<'a> {
    /// The f32 slice, or an error naming `what` if the tensor has another dtype.
    pub fn into_f32(self, what: &str) -> Result<&'a [f32], String> {
        match self {
            Tensor::F32(s) => Ok(s),
            _ => Err(format!("{what}: expected float32")),
        }
    }
    pub fn len(&self) -> usize {
        match self {
            Tensor::F32(s) => s.len(),
            Tensor::BF16(s) => s.len(),
            Tensor::F16(s) => s.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The first `count * len` elements as `count` consecutive pieces of `len` (e.g. layers;
    /// `count` empty pieces when `len` is 0). Panics if the tensor is shorter.
    pub fn split(&self, count: usize, len: usize) -> Vec<Tensor<'a>> {
        fn pieces<T>(s: &[T], count: usize, len: usize) -> Vec<&[T]> {
            (0..count).map(|i| &s[i * len..(i + 1) * len]).collect()
        }
        match *self {
            Tensor::F32(s) => pieces(s, count, len).into_iter().map(Tensor::F32).collect(),
            Tensor::BF16(s) => pieces(s, count, len).into_iter().map(Tensor::BF16).collect(),
            Tensor::F16(s) => pieces(s, count, len).into_iter().map(Tensor::F16).collect(),
        }
    }
    /// Consecutive pieces of `len` elements (the last may be shorter; none if empty).
    pub fn chunks(&self, len: usize) -> Vec<Tensor<'a>> {
        match *self {
            Tensor::F32(s) => s.chunks(len).map(Tensor::F32).collect(),
            Tensor::BF16(s) => s.chunks(len).map(Tensor::BF16).collect(),
            Tensor::F16(s) => s.chunks(len).map(Tensor::F16).collect(),
        }
    }
    /// Converts `self[start..start + out.len()]` to f32.
    pub fn read(&self, start: usize, out: &mut [f32]) {
        let r = start..start + out.len();
        match self {
            Tensor::F32(s) => out.copy_from_slice(&s[r]),
            Tensor::BF16(s) => out.iter_mut().zip(&s[r]).for_each(|(o, x)| *o = x.to_f32()),
            Tensor::F16(s) => out.iter_mut().zip(&s[r]).for_each(|(o, x)| *o = x.to_f32()),
        }
    }
}

impl<'a> TensorMut<'a> {
    /// The f32 slice, or an error naming `what` if the tensor has another dtype.
    pub fn into_f32(self, what: &str) -> Result<&'a mut [f32], String> {
        match self {
            TensorMut::F32(s) => Ok(s),
            _ => Err(format!("{what}: expected float32")),
        }
    }
    pub fn len(&self) -> usize {
        match self {
            TensorMut::F32(s) => s.len(),
            TensorMut::BF16(s) => s.len(),
            TensorMut::F16(s) => s.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn read(&self, start: usize, out: &mut [f32]) {
        self.as_ref().read(start, out)
    }
    /// Disjoint writable pieces of `len` elements (the last may be shorter; none if empty).
    pub fn chunks_mut(&mut self, len: usize) -> Vec<TensorMut<'_>> {
        match self {
            TensorMut::F32(s) => s.chunks_mut(len).map(TensorMut::F32).collect(),
            TensorMut::BF16(s) => s.chunks_mut(len).map(TensorMut::BF16).collect(),
            TensorMut::F16(s) => s.chunks_mut(len).map(TensorMut::F16).collect(),
        }
    }
    /// The first `count * len` elements as `count` disjoint writable pieces of `len` (`count`
    /// empty pieces when `len` is 0). Panics if the tensor is shorter.
    pub fn split_mut(&mut self, count: usize, len: usize) -> Vec<TensorMut<'_>> {
        fn pieces<T>(mut s: &mut [T], count: usize, len: usize) -> Vec<&mut [T]> {
            let mut out = Vec::with_capacity(count);
            for _ in 0..count {
                let (head, tail) = std::mem::take(&mut s).split_at_mut(len);
                out.push(head);
                s = tail;
            }
            out
        }
        match self {
            TensorMut::F32(s) => pieces(s, count, len).into_iter().map(TensorMut::F32).collect(),
            TensorMut::BF16(s) => pieces(s, count, len).into_iter().map(TensorMut::BF16).collect(),
            TensorMut::F16(s) => pieces(s, count, len).into_iter().map(TensorMut::F16).collect(),
        }
    }
    pub fn as_ref(&self) -> Tensor<'_> {
        match self {
            TensorMut::F32(s) => Tensor::F32(s),
            TensorMut::BF16(s) => Tensor::BF16(s),
            TensorMut::F16(s) => Tensor::F16(s),
        }
    }
    /// Rounds `src` to this tensor's dtype into `self[start..start + src.len()]`.
    pub fn write(&mut self, start: usize, src: &[f32]) {
        let r = start..start + src.len();
        match self {
            TensorMut::F32(s) => s[r].copy_from_slice(src),
            TensorMut::BF16(s) => s[r].iter_mut().zip(src).for_each(|(o, &x)| *o = bf16::from_f32(x)),
            TensorMut::F16(s) => s[r].iter_mut().zip(src).for_each(|(o, &x)| *o = f16::from_f32(x)),
        }
    }
    /// Copies a same-dtype, same-length tensor in.
    pub fn copy_from(&mut self, src: &Tensor) -> Result<(), String> {
        match (self, src) {
            (TensorMut::F32(d), Tensor::F32(s)) if d.len() == s.len() => d.copy_from_slice(s),
            (TensorMut::BF16(d), Tensor::BF16(s)) if d.len() == s.len() => d.copy_from_slice(s),
            (TensorMut::F16(d), Tensor::F16(s)) if d.len() == s.len() => d.copy_from_slice(s),
            _ => return Err("copy between tensors of different dtype or size".into()),
        }
        Ok(())
    }
}
