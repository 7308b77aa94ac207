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
        unsafe { CallFrame::header(frame) }?;
        // SAFETY: the header check above proved `frame` non-null and large enough.
        if unsafe { answer_metadata(frame, traits) }? {
            return Ok(());
        }
        // SAFETY: see this function's contract.
        let call = unsafe { CallFrame::from_raw(frame) }?;
        // SAFETY: from_raw checked the frame; reading the stage field is plain data.
        match unsafe { (*frame).stage } {
            STAGE_EXECUTE => body(&call),
            STAGE_INITIALIZE => initialize(&call),
            STAGE_INSTANTIATE | STAGE_PREPARE => Ok(()),
            other => Err(FfiError::invalid(format!("unknown execution stage {other}"))),
        }
    }));
    let err = match outcome {
        Ok(Ok(())) => return std::ptr::null_mut(),
        Ok(Err(e)) => e,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            FfiError::internal(format!("{PANIC_MESSAGE}: {what}"))
        }
    };
    // SAFETY: frame validity as per the contract; create_error never panics.
    unsafe { create_error(frame, &format!("{handler}: {}", err.message), err.code) }
}

/// The start of the message a handler returns when its body panicked. Reaching it means a
/// validation is missing: tests/fuzz_frames.rs treats it as a failure.
pub const PANIC_MESSAGE: &str = "internal error (panic)";

/// Extension nodes followed before the chain is declared malformed (a cycle, say).
const MAX_EXTENSIONS: usize = 64;

/// If this call is XLA's registration-time metadata query, fills it in and returns true.
///
/// # Safety
/// `frame` is non-null and passed `CallFrame::header`; its extension chain is null-terminated
/// or cyclic, every node at least an `XLA_FFI_Extension_Base`.
unsafe fn answer_metadata(frame: *mut XLA_FFI_CallFrame, traits: u32) -> FfiResult<bool> {
    let mut ext = (*frame).extension_start;
    for _ in 0..MAX_EXTENSIONS {
        let Some(e) = ext.as_ref() else { return Ok(false) };
        if e.type_ == EXTENSION_METADATA {
            if e.struct_size < METADATA_EXTENSION_STRUCT_SIZE {
                return Err(FfiError::invalid(format!(
                    "metadata extension too small: struct_size {} < {METADATA_EXTENSION_STRUCT_SIZE}",
                    e.struct_size
                )));
            }
            // SAFETY: its struct_size says the node is a whole metadata extension.
            let meta_ext = &*(ext as *const XLA_FFI_Metadata_Extension);
            let meta = meta_ext
                .metadata
                .as_mut()
                .ok_or_else(|| FfiError::invalid("metadata extension without a metadata struct"))?;
            if meta.struct_size < METADATA_STRUCT_SIZE {
                return Err(FfiError::invalid(format!(
                    "metadata struct too small: struct_size {} < {METADATA_STRUCT_SIZE}",
                    meta.struct_size
                )));
            }
            meta.api_version.major_version = API_MAJOR;
            meta.api_version.minor_version = API_MINOR;
            meta.traits = traits;
            return Ok(true);
        }
        ext = e.next;
    }
    Err(FfiError::invalid(format!("call frame extension chain longer than {MAX_EXTENSIONS} (a cycle?)")))
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
