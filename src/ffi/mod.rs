//! The XLA FFI ABI layer: the C mirror (`api`), the safe call-frame view (`frame`), aliasing-
//! checked typed slices (`buffers`) and the entry protocol (`handler`). Nothing here knows LANTON.

pub mod api;
pub mod buffers;
pub mod frame;
pub mod handler;

pub use buffers::BufferSet;
pub use frame::{BufferRef, CallFrame, FfiError, FfiResult};
