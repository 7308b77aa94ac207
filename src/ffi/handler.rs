//! The entry protocol every exported handler follows: answer XLA's metadata query, run only at
//! the execute stage, and never let a panic cross the C ABI.

use super::api::*;
use super::frame::{CallFrame, FfiError, FfiResult};
use std::ffi::CString;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Runs `body` for one XLA FFI call and converts its outcome into XLA's error convention.
///
/// # Safety
/// `frame` must be null or a call frame built by XLA (or a test) for this call.
pub unsafe fn dispatch(
    frame: *mut XLA_FFI_CallFrame,
    handler: &str,
    traits: u32,
    body: impl FnOnce(&CallFrame) -> FfiResult<()>,
) -> *mut XLA_FFI_Error {
    // SAFETY: forwarded contract.
    unsafe { dispatch_staged(frame, handler, traits, |_| Ok(()), body) }
}

/// `dispatch` for handlers registered for XLA's initialize stage too (before any execution or
/// CUDA-graph capture): `initialize` runs there, `body` at the execute stage.
///
/// # Safety
/// As `dispatch`.
pub unsafe fn dispatch_staged(
    frame: *mut XLA_FFI_CallFrame,
    handler: &str,
    traits: u32,
    initialize: impl FnOnce(&CallFrame) -> FfiResult<()>,
    body: impl FnOnce(&CallFrame) -> FfiResult<()>,
) -> *mut XLA_FFI_Error {
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: see this function's contract.
        if let Some(answered) = unsafe { answer_metadata(frame, traits) } {
            return Ok(answered);
        }
        // SAFETY: see this function's contract.
        let call = unsafe { CallFrame::from_raw(frame) }?;
        // SAFETY: from_raw checked the frame; reading the stage field is plain data.
        match unsafe { (*frame).stage } {
            STAGE_EXECUTE => body(&call).map(|_| true),
            STAGE_INITIALIZE => initialize(&call).map(|_| true),
            _ => Ok(true),
        }
    }));
    let err = match outcome {
        Ok(Ok(_)) => return std::ptr::null_mut(),
        Ok(Err(e)) => e,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            FfiError::internal(format!("internal error (panic): {what}"))
        }
    };
    // SAFETY: frame validity as per the contract; create_error never panics.
    unsafe { create_error(frame, &format!("{handler}: {}", err.message), err.code) }
}

/// If this call is XLA's registration-time metadata query, fills it in and returns Some.
unsafe fn answer_metadata(frame: *mut XLA_FFI_CallFrame, traits: u32) -> Option<bool> {
    let frame = frame.as_ref()?;
    let mut ext = frame.extension_start;
    while let Some(e) = ext.as_ref() {
        if e.type_ == EXTENSION_METADATA {
            let meta_ext = &*(ext as *const XLA_FFI_Metadata_Extension);
            if let Some(meta) = meta_ext.metadata.as_mut() {
                meta.api_version.major_version = API_MAJOR;
                meta.api_version.minor_version = API_MINOR;
                meta.traits = traits;
            }
            return Some(true);
        }
        ext = e.next;
    }
    None
}

/// Creates an XLA error through the api table (XLA copies the message).
unsafe fn create_error(frame: *mut XLA_FFI_CallFrame, message: &str, code: i32) -> *mut XLA_FFI_Error {
    let create = frame.as_ref().and_then(|f| f.api.as_ref()).and_then(|api| api.error_create);
    let Some(create) = create else {
        // No way to report through XLA; say it on stderr rather than fail silently.
        eprintln!("lanton: cannot report error without an XLA api table: {message}");
        return std::ptr::null_mut();
    };
    let msg = CString::new(message.replace('\0', " ")).unwrap_or_default();
    let mut args = XLA_FFI_Error_Create_Args {
        struct_size: ERROR_CREATE_ARGS_STRUCT_SIZE,
        extension_start: std::ptr::null_mut(),
        message: msg.as_ptr(),
        errc: code,
    };
    create(&mut args)
}
