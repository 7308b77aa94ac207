//! Typed slices over XLA buffers, handed out only after proving Rust's aliasing rules hold:
//! no writable buffer overlaps any other buffer in the set. An input donated to (aliased
//! with) an output is claimed once, as the writable output.

use super::api::dtype;
use super::frame::{BufferRef, FfiError, FfiResult};
use crate::tensor::{Dtype, RawTensor, Tensor, TensorMut};
use half::{bf16, f16};

pub fn float_dtype_ok(d: i32) -> bool {
    matches!(d, dtype::F32 | dtype::BF16 | dtype::F16)
}

struct Claim {
    start: usize,
    end: usize,
    writable: bool,
    name: String,
}

/// Collects the buffers a handler will touch, proves they are disjoint, then hands out slices.
#[derive(Default)]
pub struct BufferSet {
    claims: Vec<Claim>,
    sealed: bool,
}

impl BufferSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a buffer; `writable` ones must overlap nothing else.
    pub fn claim(&mut self, b: &BufferRef, writable: bool, name: impl Into<String>) {
        let bytes = b.len() * dtype::span_size(b.dtype);
        if bytes == 0 || b.data.is_null() {
            return; // Zero-element buffers may carry any pointer; no slice is built from them.
        }
        let start = b.data as usize;
        self.claims.push(Claim { start, end: start + bytes, writable, name: name.into() });
    }

    /// Checks that every writable claim is disjoint from all others.
    pub fn seal(&mut self) -> FfiResult<()> {
        self.claims.sort_by_key(|c| c.start);
        // A sweep over sorted ranges: track the claim reaching furthest right so far.
        let mut reach: Option<usize> = None;
        for i in 0..self.claims.len() {
            if let Some(j) = reach {
                let (a, b) = (&self.claims[j], &self.claims[i]);
                if b.start < a.end && (a.writable || b.writable) {
                    return Err(FfiError::invalid(format!(
                        "buffers '{}' and '{}' overlap and one of them is written; pass distinct arrays",
                        a.name, b.name
                    )));
                }
                if b.end > a.end {
                    reach = Some(i);
                }
            } else {
                reach = Some(i);
            }
        }
        self.sealed = true;
        Ok(())
    }

    fn check_sealed(&self) -> FfiResult<()> {
        if self.sealed {
            Ok(())
        } else {
            Err(FfiError::internal("BufferSet used before seal()"))
        }
    }

    /// A read-only float view of a claimed buffer.
    pub fn input<'a>(&self, b: &RawTensor<'a>, name: &str) -> FfiResult<Tensor<'a>> {
        self.check_sealed()?;
        let n = b.len;
        // SAFETY: the buffer holds `n` elements of `b.dtype` (XLA's contract, carried by
        // `BufferRef::raw`); it is claimed read-only and `seal` proved no writable claim
        // overlaps it. n == 0 builds no slice.
        unsafe {
            Ok(match b.dtype {
                Dtype::F32 => Tensor::F32(raw_slice(b.data as *const f32, n)),
                Dtype::BF16 => Tensor::BF16(raw_slice(b.data as *const bf16, n)),
                Dtype::F16 => Tensor::F16(raw_slice(b.data as *const f16, n)),
                d => return Err(unsupported(name, d)),
            })
        }
    }

    /// A writable float view of a claimed buffer. Each buffer must be taken mutably once.
    pub fn output<'a>(&self, b: &RawTensor<'a>, name: &str) -> FfiResult<TensorMut<'a>> {
        self.check_sealed()?;
        let n = b.len;
        // SAFETY: claimed writable and proved disjoint from every other claim by `seal`; the
        // caller takes each result buffer once, so this is the only reference to it.
        unsafe {
            Ok(match b.dtype {
                Dtype::F32 => TensorMut::F32(raw_slice_mut(b.data as *mut f32, n)),
                Dtype::BF16 => TensorMut::BF16(raw_slice_mut(b.data as *mut bf16, n)),
                Dtype::F16 => TensorMut::F16(raw_slice_mut(b.data as *mut f16, n)),
                d => return Err(unsupported(name, d)),
            })
        }
    }

    /// Read-only i32 view (step counters).
    pub fn input_i32<'a>(&self, b: &RawTensor<'a>, name: &str) -> FfiResult<&'a [i32]> {
        self.check_sealed()?;
        if b.dtype != Dtype::S32 {
            return Err(FfiError::invalid(format!("{name}: expected int32, got {}", dtype::name(b.dtype.code()))));
        }
        // SAFETY: as for `input`.
        Ok(unsafe { raw_slice(b.data as *const i32, b.len) })
    }

    /// Writable i32 view.
    pub fn output_i32<'a>(&self, b: &RawTensor<'a>, name: &str) -> FfiResult<&'a mut [i32]> {
        self.check_sealed()?;
        if b.dtype != Dtype::S32 {
            return Err(FfiError::invalid(format!("{name}: expected int32, got {}", dtype::name(b.dtype.code()))));
        }
        // SAFETY: as for `output`.
        Ok(unsafe { raw_slice_mut(b.data as *mut i32, b.len) })
    }
}

fn unsupported(name: &str, d: Dtype) -> FfiError {
    FfiError::invalid(format!("{name}: unsupported dtype {} (expected float32, bfloat16 or float16)", dtype::name(d.code())))
}

unsafe fn raw_slice<'a, T>(p: *const T, n: usize) -> &'a [T] {
    if n == 0 {
        &[]
    } else {
        std::slice::from_raw_parts(p, n)
    }
}

unsafe fn raw_slice_mut<'a, T>(p: *mut T, n: usize) -> &'a mut [T] {
    if n == 0 {
        &mut []
    } else {
        std::slice::from_raw_parts_mut(p, n)
    }
}
