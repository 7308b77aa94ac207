//! Typed slices over XLA buffers, handed out only after proving Rust's aliasing rules hold:
//! no writable buffer overlaps any other buffer in the set. An input donated to (aliased
//! with) an output is claimed once, as the writable output.

use super::api::dtype;
use super::frame::{BufferRef, FfiError, FfiResult};
use half::{bf16, f16};

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
    pub fn into_f32(self, what: &str) -> FfiResult<&'a [f32]> {
        match self {
            Tensor::F32(s) => Ok(s),
            _ => Err(FfiError::invalid(format!("{what}: expected float32"))),
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
    pub fn into_f32(self, what: &str) -> FfiResult<&'a mut [f32]> {
        match self {
            TensorMut::F32(s) => Ok(s),
            _ => Err(FfiError::invalid(format!("{what}: expected float32"))),
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
    pub fn copy_from(&mut self, src: &Tensor) -> FfiResult<()> {
        match (self, src) {
            (TensorMut::F32(d), Tensor::F32(s)) if d.len() == s.len() => d.copy_from_slice(s),
            (TensorMut::BF16(d), Tensor::BF16(s)) if d.len() == s.len() => d.copy_from_slice(s),
            (TensorMut::F16(d), Tensor::F16(s)) if d.len() == s.len() => d.copy_from_slice(s),
            _ => return Err(FfiError::internal("copy between tensors of different dtype or size")),
        }
        Ok(())
    }
}

pub fn float_dtype_ok(d: i32) -> bool {
    matches!(d, dtype::F32 | dtype::BF16 | dtype::F16)
}

fn elem_size(d: i32) -> usize {
    match d {
        dtype::F64 | dtype::S64 => 8,
        dtype::F32 | dtype::S32 => 4,
        dtype::BF16 | dtype::F16 => 2,
        _ => 1,
    }
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
        let bytes = b.len() * elem_size(b.dtype);
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
    pub fn input<'a>(&self, b: &BufferRef<'a>, name: &str) -> FfiResult<Tensor<'a>> {
        self.check_sealed()?;
        let n = b.len();
        // SAFETY: the buffer holds `n` elements of `b.dtype` (XLA's contract); it is claimed
        // read-only and `seal` proved no writable claim overlaps it. n == 0 builds no slice.
        unsafe {
            Ok(match b.dtype {
                dtype::F32 => Tensor::F32(raw_slice(b.data as *const f32, n)),
                dtype::BF16 => Tensor::BF16(raw_slice(b.data as *const bf16, n)),
                dtype::F16 => Tensor::F16(raw_slice(b.data as *const f16, n)),
                d => return Err(unsupported(name, d)),
            })
        }
    }

    /// A writable float view of a claimed buffer. Each buffer must be taken mutably once.
    pub fn output<'a>(&self, b: &BufferRef<'a>, name: &str) -> FfiResult<TensorMut<'a>> {
        self.check_sealed()?;
        let n = b.len();
        // SAFETY: claimed writable and proved disjoint from every other claim by `seal`; the
        // caller takes each result buffer once, so this is the only reference to it.
        unsafe {
            Ok(match b.dtype {
                dtype::F32 => TensorMut::F32(raw_slice_mut(b.data as *mut f32, n)),
                dtype::BF16 => TensorMut::BF16(raw_slice_mut(b.data as *mut bf16, n)),
                dtype::F16 => TensorMut::F16(raw_slice_mut(b.data as *mut f16, n)),
                d => return Err(unsupported(name, d)),
            })
        }
    }

    /// Read-only i32 view (step counters).
    pub fn input_i32<'a>(&self, b: &BufferRef<'a>, name: &str) -> FfiResult<&'a [i32]> {
        self.check_sealed()?;
        if b.dtype != dtype::S32 {
            return Err(FfiError::invalid(format!("{name}: expected int32, got {}", dtype::name(b.dtype))));
        }
        // SAFETY: as for `input`.
        Ok(unsafe { raw_slice(b.data as *const i32, b.len()) })
    }

    /// Writable i32 view.
    pub fn output_i32<'a>(&self, b: &BufferRef<'a>, name: &str) -> FfiResult<&'a mut [i32]> {
        self.check_sealed()?;
        if b.dtype != dtype::S32 {
            return Err(FfiError::invalid(format!("{name}: expected int32, got {}", dtype::name(b.dtype))));
        }
        // SAFETY: as for `output`.
        Ok(unsafe { raw_slice_mut(b.data as *mut i32, b.len()) })
    }
}

fn unsupported(name: &str, d: i32) -> FfiError {
    FfiError::invalid(format!("{name}: unsupported dtype {} (expected float32, bfloat16 or float16)", dtype::name(d)))
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
