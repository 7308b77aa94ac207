//! A fake XLA FFI Api table: errors, streams and device memory as the handlers see them.

use super::*;

pub struct FakeError {
    pub message: String,
    pub code: i32,
}

unsafe extern "C" fn fake_error_create(args: *mut XLA_FFI_Error_Create_Args) -> *mut XLA_FFI_Error {
    let a = &*args;
    assert!(a.struct_size >= ERROR_CREATE_ARGS_STRUCT_SIZE);
    let message = CStr::from_ptr(a.message).to_string_lossy().into_owned();
    Box::into_raw(Box::new(FakeError { message, code: a.errc })) as *mut XLA_FFI_Error
}

unsafe extern "C" fn fake_stream_get(_args: *mut XLA_FFI_Stream_Get_Args) -> *mut XLA_FFI_Error {
    let mut args = XLA_FFI_Error_Create_Args {
        struct_size: ERROR_CREATE_ARGS_STRUCT_SIZE,
        extension_start: std::ptr::null_mut(),
        message: c"GPU context is not available".as_ptr(),
        errc: 9,
    };
    fake_error_create(&mut args)
}

unsafe extern "C" fn fake_error_get_message(args: *mut XLA_FFI_Error_GetMessage_Args) {
    let e = &*((*args).error as *const FakeError);
    // Leak a C string for the test's lifetime; tests are short.
    (*args).message = std::ffi::CString::new(e.message.clone()).unwrap().into_raw();
}

unsafe extern "C" fn fake_error_destroy(args: *mut XLA_FFI_Error_Destroy_Args) {
    drop(Box::from_raw((*args).error as *mut FakeError));
}

thread_local! {
    /// DeviceMemory_Allocate / DeviceMemory_Free calls on this thread (handlers run on the caller's).
    static DEVICE_MEMORY_CALLS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many times a handler called DeviceMemory_Allocate or DeviceMemory_Free through the fake
/// Api on this thread (the CUDA handlers must not: their scratch is a result of the call).
pub fn device_memory_calls() -> usize {
    DEVICE_MEMORY_CALLS.with(|c| c.get())
}

fn refuse_device_memory(what: &std::ffi::CStr) -> *mut XLA_FFI_Error {
    DEVICE_MEMORY_CALLS.with(|c| c.set(c.get() + 1));
    let mut args = XLA_FFI_Error_Create_Args {
        struct_size: ERROR_CREATE_ARGS_STRUCT_SIZE,
        extension_start: std::ptr::null_mut(),
        message: what.as_ptr(),
        errc: 13,
    };
    unsafe { fake_error_create(&mut args) }
}

unsafe extern "C" fn fake_allocate(_args: *mut XLA_FFI_DeviceMemory_Allocate_Args) -> *mut XLA_FFI_Error {
    refuse_device_memory(c"the test Api refuses DeviceMemory_Allocate")
}

unsafe extern "C" fn fake_free(_args: *mut XLA_FFI_DeviceMemory_Free_Args) -> *mut XLA_FFI_Error {
    refuse_device_memory(c"the test Api refuses DeviceMemory_Free")
}

pub fn fake_api() -> Box<XLA_FFI_Api> {
    Box::new(XLA_FFI_Api {
        struct_size: std::mem::size_of::<XLA_FFI_Api>(),
        extension_start: std::ptr::null_mut(),
        api_version: XLA_FFI_Api_Version {
            struct_size: 24,
            extension_start: std::ptr::null_mut(),
            major_version: 0,
            minor_version: 3,
        },
        internal_api: std::ptr::null(),
        error_create: Some(fake_error_create),
        error_get_message: Some(fake_error_get_message),
        error_destroy: Some(fake_error_destroy),
        handler_register: None,
        stream_get: Some(fake_stream_get),
        type_register: None,
        execution_context_get: None,
        state_set: None,
        state_get: None,
        device_memory_allocate: Some(fake_allocate),
        device_memory_free: Some(fake_free),
        thread_pool_schedule: None,
        thread_pool_num_threads: None,
        future_create: None,
        future_set_available: None,
        future_set_error: None,
        run_id_get: None,
        device_ordinal_get: None,
    })
}

/// Takes ownership of a handler's returned error.
pub fn take_error(e: *mut XLA_FFI_Error) -> Option<FakeError> {
    if e.is_null() {
        None
    } else {
        Some(*unsafe { Box::from_raw(e as *mut FakeError) })
    }
}
