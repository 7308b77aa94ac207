//! `#[repr(C)]` mirror of the parts of XLA's FFI C API (`xla/ffi/api/c_api.h`, API 0.3/0.4)
//! that handlers use. Offsets are pinned by compile-time asserts below and checked against the
//! official header by `tests/ffi_header_layout.rs` when jaxlib is installed.
//!
//! Enums are read as plain `i32`: a value Rust does not know must never become a Rust enum.
#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_void};

pub type DataTypeRaw = i32;
pub type ErrorCode = i32;

pub mod dtype {
    pub const PRED: i32 = 1;
    pub const S8: i32 = 2;
    pub const S32: i32 = 4;
    pub const S64: i32 = 5;
    pub const U8: i32 = 6;
    pub const F16: i32 = 10;
    pub const F32: i32 = 11;
    pub const F64: i32 = 12;
    pub const BF16: i32 = 16;

    /// Bytes per element (0 for dtypes lanton never receives).
    pub fn size(d: i32) -> usize {
        match (to_tensor(d), d) {
            (Some(t), _) => t.size(), // lanton's own element types: their one home
            (None, PRED | S8) => 1,
            (None, S64 | F64) => 8,
            _ => 0,
        }
    }

    /// Bytes per element of a buffer whose dtype may be one lanton does not know: the widest
    /// (8) then, so a buffer's extent is never under-estimated (the aliasing proof, test buffers).
    pub fn span_size(d: i32) -> usize {
        match size(d) {
            0 => 8,
            n => n,
        }
    }

    /// The lanton element type of an XLA dtype (None for those lanton's buffers never hold).
    pub fn to_tensor(d: i32) -> Option<crate::tensor::Dtype> {
        use crate::tensor::Dtype;
        match d {
            S32 => Some(Dtype::S32),
            U8 => Some(Dtype::U8),
            F16 => Some(Dtype::F16),
            F32 => Some(Dtype::F32),
            BF16 => Some(Dtype::BF16),
            _ => None,
        }
    }
    // The kernels' codes are XLA's (tensor::Dtype's promise).
    const _: () = {
        use crate::tensor::Dtype;
        assert!(Dtype::S32.code() == S32 && Dtype::U8.code() == U8 && Dtype::F16.code() == F16);
        assert!(Dtype::F32.code() == F32 && Dtype::BF16.code() == BF16);
    };

    /// Human-readable name used in error messages.
    pub fn name(d: i32) -> &'static str {
        match d {
            PRED => "bool",
            S8 => "int8",
            S32 => "int32",
            S64 => "int64",
            U8 => "uint8",
            F16 => "float16",
            F32 => "float32",
            F64 => "float64",
            BF16 => "bfloat16",
            _ => "unsupported dtype",
        }
    }
}

pub mod errc {
    pub const INVALID_ARGUMENT: i32 = 3;
    pub const FAILED_PRECONDITION: i32 = 9;
    pub const UNIMPLEMENTED: i32 = 12;
    pub const INTERNAL: i32 = 13;
}

pub mod attr_type {
    pub const ARRAY: i32 = 1;
    pub const DICTIONARY: i32 = 2;
    pub const SCALAR: i32 = 3;
    pub const STRING: i32 = 4;
}

pub const ARG_BUFFER: i32 = 1;
pub const RET_BUFFER: i32 = 1;
pub const EXTENSION_METADATA: i32 = 1;
pub const STAGE_INSTANTIATE: i32 = 0;
pub const STAGE_PREPARE: i32 = 1;
pub const STAGE_INITIALIZE: i32 = 2;
pub const STAGE_EXECUTE: i32 = 3;
pub const TRAIT_COMMAND_BUFFER_COMPATIBLE: u32 = 1;

/// The API version handlers report: accepted by jaxlib 0.10 (API 0.3) and 0.11 (API 0.4).
pub const API_MAJOR: i32 = 0;
pub const API_MINOR: i32 = 3;

#[repr(C)]
pub struct XLA_FFI_Extension_Base {
    pub struct_size: usize,
    pub type_: i32,
    pub next: *mut XLA_FFI_Extension_Base,
}

#[repr(C)]
pub struct XLA_FFI_Api_Version {
    pub struct_size: usize,
    pub extension_start: *mut XLA_FFI_Extension_Base,
    pub major_version: i32,
    pub minor_version: i32,
}

#[repr(C)]
pub struct XLA_FFI_Error {
    _opaque: [u8; 0],
}

#[repr(C)]
pub struct XLA_FFI_ExecutionContext {
    _opaque: [u8; 0],
}

#[repr(C)]
pub struct XLA_FFI_Error_Create_Args {
    pub struct_size: usize,
    pub extension_start: *mut XLA_FFI_Extension_Base,
    pub message: *const c_char,
    pub errc: ErrorCode,
}

/// 0.4 added an `errc` out-field (40 bytes); XLA 0.3 reads only the first 32.
#[repr(C)]
pub struct XLA_FFI_Error_GetMessage_Args {
    pub struct_size: usize,
    pub extension_start: *mut XLA_FFI_Extension_Base,
    pub error: *mut XLA_FFI_Error,
    pub message: *const c_char,
    pub errc: ErrorCode,
}

#[repr(C)]
pub struct XLA_FFI_Error_Destroy_Args {
    pub struct_size: usize,
    pub extension_start: *mut XLA_FFI_Extension_Base,
    pub error: *mut XLA_FFI_Error,
}

#[repr(C)]
pub struct XLA_FFI_Buffer {
    pub struct_size: usize,
    pub extension_start: *mut XLA_FFI_Extension_Base,
    pub dtype: DataTypeRaw,
    pub data: *mut c_void,
    pub rank: i64,
    pub dims: *mut i64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct XLA_FFI_ByteSpan {
    pub ptr: *const c_char,
    pub len: usize,
}

#[repr(C)]
pub struct XLA_FFI_Scalar {
    pub dtype: DataTypeRaw,
    pub value: *mut c_void,
}

#[repr(C)]
pub struct XLA_FFI_Array {
    pub dtype: DataTypeRaw,
    pub size: usize,
    pub data: *mut c_void,
}

#[repr(C)]
pub struct XLA_FFI_Args {
    pub struct_size: usize,
    pub extension_start: *mut XLA_FFI_Extension_Base,
    pub size: i64,
    pub types: *mut i32,
    pub args: *mut *mut c_void,
}

#[repr(C)]
pub struct XLA_FFI_Rets {
    pub struct_size: usize,
    pub extension_start: *mut XLA_FFI_Extension_Base,
    pub size: i64,
    pub types: *mut i32,
    pub rets: *mut *mut c_void,
}

#[repr(C)]
pub struct XLA_FFI_Attrs {
    pub struct_size: usize,
    pub extension_start: *mut XLA_FFI_Extension_Base,
    pub size: i64,
    pub types: *mut i32,
    pub names: *mut *mut XLA_FFI_ByteSpan,
    pub attrs: *mut *mut c_void,
}

#[repr(C)]
pub struct XLA_FFI_CallFrame {
    pub struct_size: usize,
    pub extension_start: *mut XLA_FFI_Extension_Base,
    pub api: *const XLA_FFI_Api,
    pub ctx: *mut XLA_FFI_ExecutionContext,
    pub stage: i32,
    pub args: XLA_FFI_Args,
    pub rets: XLA_FFI_Rets,
    pub attrs: XLA_FFI_Attrs,
    pub future: *mut c_void,
}

#[repr(C)]
pub struct XLA_FFI_Metadata {
    pub struct_size: usize,
    pub api_version: XLA_FFI_Api_Version,
    pub traits: u32,
    pub state_type_id: i64,
}

#[repr(C)]
pub struct XLA_FFI_Metadata_Extension {
    pub extension_base: XLA_FFI_Extension_Base,
    pub metadata: *mut XLA_FFI_Metadata,
}

#[repr(C)]
pub struct XLA_FFI_Stream_Get_Args {
    pub struct_size: usize,
    pub extension_start: *mut XLA_FFI_Extension_Base,
    pub ctx: *mut XLA_FFI_ExecutionContext,
    pub stream: *mut c_void,
}

#[repr(C)]
pub struct XLA_FFI_DeviceMemory_Allocate_Args {
    pub struct_size: usize,
    pub extension_start: *mut XLA_FFI_Extension_Base,
    pub ctx: *mut XLA_FFI_ExecutionContext,
    pub size: usize,
    pub alignment: usize,
    pub data: *mut c_void,
}

#[repr(C)]
pub struct XLA_FFI_DeviceMemory_Free_Args {
    pub struct_size: usize,
    pub extension_start: *mut XLA_FFI_Extension_Base,
    pub ctx: *mut XLA_FFI_ExecutionContext,
    pub size: usize,
    pub data: *mut c_void,
}

#[repr(C)]
pub struct XLA_FFI_ThreadPool_NumThreads_Args {
    pub struct_size: usize,
    pub extension_start: *mut XLA_FFI_Extension_Base,
    pub ctx: *mut XLA_FFI_ExecutionContext,
    pub num_threads: *mut i64,
}

#[repr(C)]
pub struct XLA_FFI_DeviceOrdinal_Get_Args {
    pub struct_size: usize,
    pub extension_start: *mut XLA_FFI_Extension_Base,
    pub ctx: *mut XLA_FFI_ExecutionContext,
    pub device_ordinal: i32,
}

pub type ErrorCreateFn = unsafe extern "C" fn(*mut XLA_FFI_Error_Create_Args) -> *mut XLA_FFI_Error;
pub type ErrorGetMessageFn = unsafe extern "C" fn(*mut XLA_FFI_Error_GetMessage_Args);
pub type ErrorDestroyFn = unsafe extern "C" fn(*mut XLA_FFI_Error_Destroy_Args);
pub type StreamGetFn = unsafe extern "C" fn(*mut XLA_FFI_Stream_Get_Args) -> *mut XLA_FFI_Error;
pub type DeviceMemoryAllocateFn =
    unsafe extern "C" fn(*mut XLA_FFI_DeviceMemory_Allocate_Args) -> *mut XLA_FFI_Error;
pub type DeviceMemoryFreeFn =
    unsafe extern "C" fn(*mut XLA_FFI_DeviceMemory_Free_Args) -> *mut XLA_FFI_Error;
pub type ThreadPoolNumThreadsFn =
    unsafe extern "C" fn(*mut XLA_FFI_ThreadPool_NumThreads_Args) -> *mut XLA_FFI_Error;
pub type DeviceOrdinalGetFn =
    unsafe extern "C" fn(*mut XLA_FFI_DeviceOrdinal_Get_Args) -> *mut XLA_FFI_Error;
/// Slots we never call are kept as opaque pointers so the table's layout stays exact.
pub type OpaqueFn = Option<unsafe extern "C" fn()>;

/// The function table. Only the first 192 bytes (through DeviceOrdinal_Get) are read.
#[repr(C)]
pub struct XLA_FFI_Api {
    pub struct_size: usize,
    pub extension_start: *mut XLA_FFI_Extension_Base,
    pub api_version: XLA_FFI_Api_Version,
    pub internal_api: *const c_void,
    pub error_create: Option<ErrorCreateFn>,
    pub error_get_message: Option<ErrorGetMessageFn>,
    pub error_destroy: Option<ErrorDestroyFn>,
    pub handler_register: OpaqueFn,
    pub stream_get: Option<StreamGetFn>,
    pub type_register: OpaqueFn,
    pub execution_context_get: OpaqueFn,
    pub state_set: OpaqueFn,
    pub state_get: OpaqueFn,
    pub device_memory_allocate: Option<DeviceMemoryAllocateFn>,
    pub device_memory_free: Option<DeviceMemoryFreeFn>,
    pub thread_pool_schedule: OpaqueFn,
    pub thread_pool_num_threads: Option<ThreadPoolNumThreadsFn>,
    pub future_create: OpaqueFn,
    pub future_set_available: OpaqueFn,
    pub future_set_error: OpaqueFn,
    pub run_id_get: OpaqueFn,
    pub device_ordinal_get: Option<DeviceOrdinalGetFn>,
}

/// `struct_size` as XLA defines it: offset + size of the struct's last field.
pub const CALL_FRAME_STRUCT_SIZE: usize = 168;
pub const ERROR_CREATE_ARGS_STRUCT_SIZE: usize = 28;
/// Through `metadata` / `traits`, the last fields handlers read or write (XLA checks the same).
pub const METADATA_EXTENSION_STRUCT_SIZE: usize = 32;
pub const METADATA_STRUCT_SIZE: usize = 36;

macro_rules! assert_offset {
    ($t:ty, $f:ident, $off:expr) => {
        const _: () = assert!(std::mem::offset_of!($t, $f) == $off);
    };
}

// Pinned layout (x86-64 / aarch64 LP64), from xla/ffi/api/c_api.h.
assert_offset!(XLA_FFI_Api, error_create, 48);
assert_offset!(XLA_FFI_Api, error_get_message, 56);
assert_offset!(XLA_FFI_Api, error_destroy, 64);
assert_offset!(XLA_FFI_Api, stream_get, 80);
assert_offset!(XLA_FFI_Api, device_memory_allocate, 120);
assert_offset!(XLA_FFI_Api, device_memory_free, 128);
assert_offset!(XLA_FFI_Api, thread_pool_num_threads, 144);
assert_offset!(XLA_FFI_Api, device_ordinal_get, 184);
assert_offset!(XLA_FFI_CallFrame, api, 16);
assert_offset!(XLA_FFI_CallFrame, ctx, 24);
assert_offset!(XLA_FFI_CallFrame, stage, 32);
assert_offset!(XLA_FFI_CallFrame, args, 40);
assert_offset!(XLA_FFI_CallFrame, rets, 80);
assert_offset!(XLA_FFI_CallFrame, attrs, 120);
assert_offset!(XLA_FFI_CallFrame, future, 168);
assert_offset!(XLA_FFI_Buffer, dtype, 16);
assert_offset!(XLA_FFI_Buffer, data, 24);
assert_offset!(XLA_FFI_Buffer, rank, 32);
assert_offset!(XLA_FFI_Buffer, dims, 40);
assert_offset!(XLA_FFI_Error_Create_Args, errc, 24);
assert_offset!(XLA_FFI_Metadata, api_version, 8);
assert_offset!(XLA_FFI_Metadata, traits, 32);
assert_offset!(XLA_FFI_Metadata_Extension, metadata, 24);
assert_offset!(XLA_FFI_Array, data, 16);
assert_offset!(XLA_FFI_Scalar, value, 8);
const _: () = assert!(std::mem::size_of::<XLA_FFI_Api>() == 192);
const _: () = assert!(std::mem::size_of::<XLA_FFI_Error_GetMessage_Args>() == 40);
const _: () = assert!(std::mem::offset_of!(XLA_FFI_Metadata, traits) + 4 == METADATA_STRUCT_SIZE);
const _: () = assert!(std::mem::size_of::<XLA_FFI_Metadata_Extension>() == METADATA_EXTENSION_STRUCT_SIZE);
