//! A safe, lifetime-bound view of an XLA FFI call frame: buffers by index with dtype and shape
//! checks, attributes by name and type, and the Api services (stream, device ordinal,
//! thread count). Everything `unsafe` about reading XLA's memory lives in this file.

use super::api::*;
use crate::tensor::RawTensor;
use std::ffi::c_void;
use std::fmt;

/// An error a handler returns to XLA; surfaces in Python as `JaxRuntimeError`.
#[derive(Debug, Clone, PartialEq)]
pub struct FfiError {
    pub code: i32,
    pub message: String,
}

impl FfiError {
    pub fn invalid(message: impl Into<String>) -> Self {
        FfiError { code: errc::INVALID_ARGUMENT, message: message.into() }
    }
    pub fn internal(message: impl Into<String>) -> Self {
        FfiError { code: errc::INTERNAL, message: message.into() }
    }
    pub fn unimplemented(message: impl Into<String>) -> Self {
        FfiError { code: errc::UNIMPLEMENTED, message: message.into() }
    }
    /// The process is not set up for the call (e.g. an invalid environment variable).
    pub fn precondition(message: impl Into<String>) -> Self {
        FfiError { code: errc::FAILED_PRECONDITION, message: message.into() }
    }
}

impl fmt::Display for FfiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

pub type FfiResult<T> = Result<T, FfiError>;

/// A decoded argument or result buffer. `data` is only turned into slices by `BufferSet`
/// (src/ffi/buffers.rs), which proves the aliasing rules first.
///
/// Only `CallFrame` builds one, after checking that the dims are non-negative, that their
/// product (and its size in bytes) fits the address space, and that a non-empty buffer has a
/// non-null data pointer aligned for its dtype.
#[derive(Clone, Copy)]
pub struct BufferRef<'a> {
    pub dtype: i32,
    pub data: *mut c_void,
    pub dims: &'a [i64],
    elems: usize,
}

impl<'a> BufferRef<'a> {
    /// Number of elements (checked not to overflow when the buffer was decoded).
    pub fn len(&self) -> usize {
        self.elems
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn shape_string(&self) -> String {
        format!("{:?}", self.dims)
    }
    /// The buffer by address for the floors below (`what` names it if XLA's dtype is one
    /// lanton's buffers never hold).
    pub fn raw(&self, what: &str) -> FfiResult<RawTensor<'a>> {
        let dtype = dtype::to_tensor(self.dtype)
            .ok_or_else(|| FfiError::invalid(format!("{what}: unsupported dtype {}", dtype::name(self.dtype))))?;
        Ok(RawTensor { data: self.data, len: self.elems, dtype, _call: std::marker::PhantomData })
    }
}

/// One attribute's payload, as XLA encoded it.
#[derive(Clone, Copy)]
pub enum AttrValue<'a> {
    Scalar { dtype: i32, value: *const c_void },
    Array { dtype: i32, len: usize, data: *const c_void },
    Str(&'a [u8]),
    Dict,
}

/// Safe view of a call frame. Construct with [`CallFrame::from_raw`].
pub struct CallFrame<'a> {
    raw: &'a XLA_FFI_CallFrame,
    api: &'a XLA_FFI_Api,
}

unsafe fn slice_or_empty<'a, T>(ptr: *const T, len: usize) -> &'a [T] {
    if len == 0 || ptr.is_null() {
        &[]
    } else {
        // SAFETY: caller guarantees `ptr` points at `len` valid `T`s living for 'a.
        std::slice::from_raw_parts(ptr, len)
    }
}

/// An attribute array's elements, refused (not read) if `data` is misaligned for `T`.
///
/// # Safety
/// A non-null `data` points at `len` elements of `T` (XLA's contract).
unsafe fn array_of<'a, T>(name: &str, data: *const c_void, len: usize) -> FfiResult<&'a [T]> {
    if len > 0 && (data as usize) % std::mem::align_of::<T>() != 0 {
        return Err(FfiError::invalid(format!("attribute '{name}': array data {data:p} is misaligned")));
    }
    Ok(slice_or_empty(data as *const T, len))
}

/// Product of non-negative dims, `None` if it overflows (a zero dim makes it 0 whatever the rest).
pub fn element_count(dims: &[i64]) -> Option<usize> {
    if dims.contains(&0) {
        return Some(0);
    }
    dims.iter().try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?))
}

impl<'a> CallFrame<'a> {
    /// # Safety
    /// `frame` must be null or point at a call frame XLA (or a test) built, valid for `'a`,
    /// whose `api` table is valid for `'a` too.
    pub unsafe fn from_raw(frame: *const XLA_FFI_CallFrame) -> FfiResult<Self> {
        let raw = Self::header(frame)?;
        let api = raw.api.as_ref().ok_or_else(|| FfiError::internal("call frame without api table"))?;
        let lists = [
            ("args", raw.args.size, raw.args.types.is_null() || raw.args.args.is_null()),
            ("rets", raw.rets.size, raw.rets.types.is_null() || raw.rets.rets.is_null()),
            ("attrs", raw.attrs.size, raw.attrs.types.is_null() || raw.attrs.names.is_null() || raw.attrs.attrs.is_null()),
        ];
        for (what, size, null) in lists {
            if size > 0 && null {
                return Err(FfiError::invalid(format!("call frame: {what} has {size} entries but a null array")));
            }
        }
        Ok(CallFrame { raw, api })
    }

    /// The frame itself, checked non-null and at least as large as the struct we read.
    ///
    /// # Safety
    /// As `from_raw`.
    pub unsafe fn header<'f>(frame: *const XLA_FFI_CallFrame) -> FfiResult<&'f XLA_FFI_CallFrame> {
        let raw = frame.as_ref().ok_or_else(|| FfiError::internal("null call frame"))?;
        if raw.struct_size < CALL_FRAME_STRUCT_SIZE {
            return Err(FfiError::invalid(format!(
                "call frame too small: struct_size {} < {}",
                raw.struct_size, CALL_FRAME_STRUCT_SIZE
            )));
        }
        Ok(raw)
    }

    pub fn api(&self) -> &'a XLA_FFI_Api {
        self.api
    }
    pub fn num_args(&self) -> usize {
        self.raw.args.size.max(0) as usize
    }
    pub fn num_rets(&self) -> usize {
        self.raw.rets.size.max(0) as usize
    }

    unsafe fn decode_buffer(kind: &str, i: usize, ty: i32, ptr: *mut c_void) -> FfiResult<BufferRef<'a>> {
        if ty != ARG_BUFFER {
            return Err(FfiError::invalid(format!("{kind} {i}: expected a buffer, got type {ty}")));
        }
        // SAFETY: XLA passes an XLA_FFI_Buffer for every BUFFER-typed entry.
        let b = (ptr as *const XLA_FFI_Buffer)
            .as_ref()
            .ok_or_else(|| FfiError::invalid(format!("{kind} {i}: null buffer")))?;
        if b.rank < 0 {
            return Err(FfiError::invalid(format!("{kind} {i}: negative rank {}", b.rank)));
        }
        if b.rank > 0 && b.dims.is_null() {
            return Err(FfiError::invalid(format!("{kind} {i}: rank {} with a null dims pointer", b.rank)));
        }
        // SAFETY: a non-null `dims` points at `rank` entries (XLA's contract).
        let dims = slice_or_empty(b.dims as *const i64, b.rank as usize);
        if let Some(d) = dims.iter().find(|&&d| d < 0) {
            return Err(FfiError::invalid(format!("{kind} {i}: negative dimension {d}")));
        }
        let elem_size = dtype::size(b.dtype).max(1);
        let elems = element_count(dims)
            .filter(|&n| n.checked_mul(elem_size).is_some_and(|bytes| bytes <= isize::MAX as usize))
            .ok_or_else(|| FfiError::invalid(format!("{kind} {i}: shape {dims:?} is too large (its size overflows)")))?;
        if elems > 0 && b.data.is_null() {
            return Err(FfiError::invalid(format!("{kind} {i}: null data pointer for {elems} elements of shape {dims:?}")));
        }
        if elems > 0 && (b.data as usize) % elem_size != 0 {
            return Err(FfiError::invalid(format!(
                "{kind} {i}: data pointer {:p} is not aligned to {elem_size} bytes ({})",
                b.data,
                dtype::name(b.dtype)
            )));
        }
        Ok(BufferRef { dtype: b.dtype, data: b.data, dims, elems })
    }

    pub fn arg(&self, i: usize) -> FfiResult<BufferRef<'a>> {
        if i >= self.num_args() {
            return Err(FfiError::invalid(format!("argument {i} missing: the call has {} arguments", self.num_args())));
        }
        // SAFETY: i < size, and XLA's types/args arrays have `size` entries.
        unsafe { Self::decode_buffer("argument", i, *self.raw.args.types.add(i), *self.raw.args.args.add(i)) }
    }

    pub fn ret(&self, i: usize) -> FfiResult<BufferRef<'a>> {
        if i >= self.num_rets() {
            return Err(FfiError::invalid(format!("result {i} missing: the call has {} results", self.num_rets())));
        }
        // SAFETY: as for `arg`.
        unsafe { Self::decode_buffer("result", i, *self.raw.rets.types.add(i), *self.raw.rets.rets.add(i)) }
    }

    /// Every attribute name, in XLA's (sorted) order.
    pub fn attr_names(&self) -> Vec<String> {
        (0..self.raw.attrs.size.max(0) as usize)
            .map(|i| {
                // SAFETY: i < size; names[i] is null or points at a ByteSpan.
                match unsafe { (*self.raw.attrs.names.add(i)).as_ref() } {
                    // SAFETY: a non-null span points at `len` bytes.
                    Some(span) => String::from_utf8_lossy(unsafe { slice_or_empty(span.ptr as *const u8, span.len) }).into_owned(),
                    None => "<null name>".to_string(),
                }
            })
            .collect()
    }

    /// Looks an attribute up by name; `None` if absent.
    pub fn attr(&self, name: &str) -> FfiResult<Option<AttrValue<'a>>> {
        let attrs = &self.raw.attrs;
        for i in 0..attrs.size.max(0) as usize {
            // SAFETY: i < size; XLA fills names/types/attrs with `size` entries each.
            unsafe {
                let span = (*attrs.names.add(i))
                    .as_ref()
                    .ok_or_else(|| FfiError::invalid(format!("attribute {i} has a null name")))?;
                if slice_or_empty(span.ptr as *const u8, span.len) != name.as_bytes() {
                    continue;
                }
                let payload = *attrs.attrs.add(i);
                if payload.is_null() {
                    return Err(FfiError::invalid(format!("attribute '{name}' has a null payload")));
                }
                let value = match *attrs.types.add(i) {
                    attr_type::SCALAR => {
                        let s = &*(payload as *const XLA_FFI_Scalar);
                        if s.value.is_null() {
                            return Err(FfiError::invalid(format!("attribute '{name}' has a null scalar value")));
                        }
                        AttrValue::Scalar { dtype: s.dtype, value: s.value }
                    }
                    attr_type::ARRAY => {
                        let a = &*(payload as *const XLA_FFI_Array);
                        if a.data.is_null() && a.size > 0 {
                            return Err(FfiError::invalid(format!(
                                "attribute '{name}' has a null data pointer for {} elements",
                                a.size
                            )));
                        }
                        AttrValue::Array { dtype: a.dtype, len: a.size, data: a.data }
                    }
                    attr_type::STRING => {
                        let s = &*(payload as *const XLA_FFI_ByteSpan);
                        if s.ptr.is_null() && s.len > 0 {
                            return Err(FfiError::invalid(format!(
                                "attribute '{name}' has a null string pointer for {} bytes",
                                s.len
                            )));
                        }
                        AttrValue::Str(slice_or_empty(s.ptr as *const u8, s.len))
                    }
                    attr_type::DICTIONARY => AttrValue::Dict,
                    t => return Err(FfiError::invalid(format!("attribute '{name}' has unknown type {t}"))),
                };
                return Ok(Some(value));
            }
        }
        Ok(None)
    }

    /// An optional attribute: `None` if absent, else what `read` (one of the typed getters)
    /// makes of it, e.g. `call.attr_opt("ns_dtype", CallFrame::attr_str)`.
    pub fn attr_opt<T>(&self, name: &str, read: impl FnOnce(&Self, &str) -> FfiResult<T>) -> FfiResult<Option<T>> {
        match self.attr(name)? {
            Some(_) => read(self, name).map(Some),
            None => Ok(None),
        }
    }

    fn require(&self, name: &str) -> FfiResult<AttrValue<'a>> {
        self.attr(name)?.ok_or_else(|| {
            FfiError::invalid(format!("missing attribute '{name}' (attributes given: {:?})", self.attr_names()))
        })
    }

    /// An integer attribute (S64, S32 or PRED scalars accepted). Scalars are read unaligned.
    pub fn attr_i64(&self, name: &str) -> FfiResult<i64> {
        match self.require(name)? {
            // SAFETY: a scalar's value points at one element of its dtype.
            AttrValue::Scalar { dtype: dtype::S64, value } => Ok(unsafe { (value as *const i64).read_unaligned() }),
            AttrValue::Scalar { dtype: dtype::S32, value } => Ok(unsafe { (value as *const i32).read_unaligned() } as i64),
            AttrValue::Scalar { dtype: dtype::PRED, value } => Ok(unsafe { (value as *const u8).read_unaligned() } as i64),
            other => Err(type_error(name, "an integer scalar", &other)),
        }
    }

    pub fn attr_bool(&self, name: &str) -> FfiResult<bool> {
        match self.require(name)? {
            // SAFETY: PRED scalars are one byte.
            AttrValue::Scalar { dtype: dtype::PRED, value } => Ok(unsafe { (value as *const u8).read_unaligned() } != 0),
            AttrValue::Scalar { dtype: dtype::S64, value } => Ok(unsafe { (value as *const i64).read_unaligned() } != 0),
            other => Err(type_error(name, "a bool scalar", &other)),
        }
    }

    /// A float attribute (F32 or F64 scalar; Python floats arrive as F64).
    pub fn attr_f32(&self, name: &str) -> FfiResult<f32> {
        match self.require(name)? {
            // SAFETY: a scalar's value points at one element of its dtype.
            AttrValue::Scalar { dtype: dtype::F32, value } => Ok(unsafe { (value as *const f32).read_unaligned() }),
            AttrValue::Scalar { dtype: dtype::F64, value } => Ok(unsafe { (value as *const f64).read_unaligned() } as f32),
            other => Err(type_error(name, "a float scalar", &other)),
        }
    }

    pub fn attr_str(&self, name: &str) -> FfiResult<String> {
        match self.require(name)? {
            AttrValue::Str(bytes) => Ok(String::from_utf8_lossy(bytes).into_owned()),
            other => Err(type_error(name, "a string", &other)),
        }
    }

    /// A 1-D float array attribute (F32 or F64 elements).
    pub fn attr_f32_array(&self, name: &str) -> FfiResult<Vec<f32>> {
        match self.require(name)? {
            // SAFETY: an array's data points at `len` elements of its dtype.
            AttrValue::Array { dtype: dtype::F32, len, data } => {
                Ok(unsafe { array_of::<f32>(name, data, len) }?.to_vec())
            }
            AttrValue::Array { dtype: dtype::F64, len, data } => {
                Ok(unsafe { array_of::<f64>(name, data, len) }?.iter().map(|&x| x as f32).collect())
            }
            other => Err(type_error(name, "a 1-D float array", &other)),
        }
    }

    /// A 1-D integer array attribute (S64, S32, U8, S8 or PRED elements).
    pub fn attr_i64_array(&self, name: &str) -> FfiResult<Vec<i64>> {
        match self.require(name)? {
            // SAFETY: an array's data points at `len` elements of its dtype.
            AttrValue::Array { dtype: dtype::S64, len, data } => Ok(unsafe { array_of::<i64>(name, data, len) }?.to_vec()),
            AttrValue::Array { dtype: dtype::S32, len, data } => {
                Ok(unsafe { array_of::<i32>(name, data, len) }?.iter().map(|&x| x as i64).collect())
            }
            AttrValue::Array { dtype: dtype::U8 | dtype::PRED, len, data } => {
                Ok(unsafe { array_of::<u8>(name, data, len) }?.iter().map(|&x| x as i64).collect())
            }
            AttrValue::Array { dtype: dtype::S8, len, data } => {
                Ok(unsafe { array_of::<i8>(name, data, len) }?.iter().map(|&x| x as i64).collect())
            }
            other => Err(type_error(name, "a 1-D integer array", &other)),
        }
    }

    /// The platform stream (a `CUstream` on GPU). Errors on CPU.
    pub fn stream(&self) -> FfiResult<*mut c_void> {
        let f = self.api.stream_get.ok_or_else(|| FfiError::internal("api table has no Stream_Get"))?;
        let mut args = XLA_FFI_Stream_Get_Args {
            struct_size: std::mem::size_of::<XLA_FFI_Stream_Get_Args>(),
            extension_start: std::ptr::null_mut(),
            ctx: self.raw.ctx,
            stream: std::ptr::null_mut(),
        };
        // SAFETY: the api table's function takes this argument struct.
        let err = unsafe { f(&mut args) };
        self.check(err, "Stream_Get")?;
        Ok(args.stream)
    }

    pub fn device_ordinal(&self) -> FfiResult<i32> {
        let f = self.api.device_ordinal_get.ok_or_else(|| FfiError::internal("api table has no DeviceOrdinal_Get"))?;
        let mut args = XLA_FFI_DeviceOrdinal_Get_Args {
            struct_size: std::mem::size_of::<XLA_FFI_DeviceOrdinal_Get_Args>(),
            extension_start: std::ptr::null_mut(),
            ctx: self.raw.ctx,
            device_ordinal: 0,
        };
        // SAFETY: as above.
        let err = unsafe { f(&mut args) };
        self.check(err, "DeviceOrdinal_Get")?;
        Ok(args.device_ordinal)
    }

    /// Size of XLA's intra-op thread pool, if the platform has one.
    pub fn num_threads(&self) -> Option<usize> {
        let f = self.api.thread_pool_num_threads?;
        let mut n: i64 = 0;
        let mut args = XLA_FFI_ThreadPool_NumThreads_Args {
            struct_size: std::mem::size_of::<XLA_FFI_ThreadPool_NumThreads_Args>(),
            extension_start: std::ptr::null_mut(),
            ctx: self.raw.ctx,
            num_threads: &mut n,
        };
        // SAFETY: as above; `n` outlives the call.
        let err = unsafe { f(&mut args) };
        self.check(err, "ThreadPool_NumThreads").ok()?;
        (n > 0).then_some(n as usize)
    }

    /// Turns an error returned *by* an API call into ours; we own it, so read then destroy it.
    fn check(&self, err: *mut XLA_FFI_Error, what: &str) -> FfiResult<()> {
        if err.is_null() {
            return Ok(());
        }
        let mut message = String::from("(no message)");
        if let Some(get) = self.api.error_get_message {
            let mut args = XLA_FFI_Error_GetMessage_Args {
                struct_size: std::mem::size_of::<XLA_FFI_Error_GetMessage_Args>(),
                extension_start: std::ptr::null_mut(),
                error: err,
                message: std::ptr::null(),
                errc: 0,
            };
            // SAFETY: `err` came from this api; the message lives until Error_Destroy.
            unsafe {
                get(&mut args);
                if !args.message.is_null() {
                    message = std::ffi::CStr::from_ptr(args.message).to_string_lossy().into_owned();
                }
            }
        }
        if let Some(destroy) = self.api.error_destroy {
            let mut args = XLA_FFI_Error_Destroy_Args {
                struct_size: std::mem::size_of::<XLA_FFI_Error_Destroy_Args>(),
                extension_start: std::ptr::null_mut(),
                error: err,
            };
            // SAFETY: we own `err` and destroy it once.
            unsafe { destroy(&mut args) };
        }
        Err(FfiError::internal(format!("XLA {what} failed: {message}")))
    }
}

fn type_error(name: &str, expected: &str, got: &AttrValue) -> FfiError {
    let got = match got {
        AttrValue::Scalar { dtype: d, .. } => format!("a {} scalar", dtype::name(*d)),
        AttrValue::Array { dtype: d, len, .. } => format!("a {} array of {len}", dtype::name(*d)),
        AttrValue::Str(_) => "a string".to_string(),
        AttrValue::Dict => "a dictionary".to_string(),
    };
    FfiError::invalid(format!("attribute '{name}': expected {expected}, got {got}"))
}
