//! Checks our #[repr(C)] mirror against XLA's official c_api.h by compiling a C program that
//! prints offsetof/sizeof. The header is found through LANTON_XLA_INCLUDE or the installed
//! jaxlib (`python3 -c "import jax; print(jax.ffi.include_dir())"`). CI installs jaxlib, so
//! there the check always runs; without jaxlib it says so and passes.

use lanton::ffi::api::*;
use std::mem::{offset_of, size_of};
use std::process::Command;

fn include_dir() -> Option<String> {
    if let Ok(d) = std::env::var("LANTON_XLA_INCLUDE") {
        return Some(d);
    }
    let py = std::env::var("LANTON_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(py).args(["-c", "import jax; print(jax.ffi.include_dir())"]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn mirror_matches_official_header() {
    let Some(inc) = include_dir() else {
        if std::env::var("CI").is_ok() {
            panic!("CI must have jaxlib's XLA headers (set LANTON_PYTHON or LANTON_XLA_INCLUDE)");
        }
        eprintln!("skipping: jaxlib's include dir not found");
        return;
    };
    let dir = std::env::temp_dir().join(format!("lanton_layout_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("layout.c");
    let checks = [
        ("offsetof(XLA_FFI_Api, XLA_FFI_Error_Create)", offset_of!(XLA_FFI_Api, error_create)),
        ("offsetof(XLA_FFI_Api, XLA_FFI_Error_GetMessage)", offset_of!(XLA_FFI_Api, error_get_message)),
        ("offsetof(XLA_FFI_Api, XLA_FFI_Error_Destroy)", offset_of!(XLA_FFI_Api, error_destroy)),
        ("offsetof(XLA_FFI_Api, XLA_FFI_Stream_Get)", offset_of!(XLA_FFI_Api, stream_get)),
        ("offsetof(XLA_FFI_Api, XLA_FFI_DeviceMemory_Allocate)", offset_of!(XLA_FFI_Api, device_memory_allocate)),
        ("offsetof(XLA_FFI_Api, XLA_FFI_DeviceMemory_Free)", offset_of!(XLA_FFI_Api, device_memory_free)),
        ("offsetof(XLA_FFI_Api, XLA_FFI_ThreadPool_NumThreads)", offset_of!(XLA_FFI_Api, thread_pool_num_threads)),
        ("offsetof(XLA_FFI_Api, XLA_FFI_DeviceOrdinal_Get)", offset_of!(XLA_FFI_Api, device_ordinal_get)),
        ("offsetof(XLA_FFI_CallFrame, args)", offset_of!(XLA_FFI_CallFrame, args)),
        ("offsetof(XLA_FFI_CallFrame, rets)", offset_of!(XLA_FFI_CallFrame, rets)),
        ("offsetof(XLA_FFI_CallFrame, attrs)", offset_of!(XLA_FFI_CallFrame, attrs)),
        ("offsetof(XLA_FFI_CallFrame, stage)", offset_of!(XLA_FFI_CallFrame, stage)),
        ("XLA_FFI_CallFrame_STRUCT_SIZE", CALL_FRAME_STRUCT_SIZE),
        ("XLA_FFI_Error_Create_Args_STRUCT_SIZE", ERROR_CREATE_ARGS_STRUCT_SIZE),
        ("sizeof(XLA_FFI_Buffer)", size_of::<XLA_FFI_Buffer>()),
        ("offsetof(XLA_FFI_Buffer, dims)", offset_of!(XLA_FFI_Buffer, dims)),
        ("sizeof(XLA_FFI_Attrs)", size_of::<XLA_FFI_Attrs>()),
        ("sizeof(XLA_FFI_Array)", size_of::<XLA_FFI_Array>()),
        ("sizeof(XLA_FFI_Scalar)", size_of::<XLA_FFI_Scalar>()),
        ("offsetof(XLA_FFI_Metadata, traits)", offset_of!(XLA_FFI_Metadata, traits)),
        ("offsetof(XLA_FFI_Metadata_Extension, metadata)", offset_of!(XLA_FFI_Metadata_Extension, metadata)),
        ("sizeof(XLA_FFI_Stream_Get_Args)", size_of::<XLA_FFI_Stream_Get_Args>()),
        ("sizeof(XLA_FFI_DeviceMemory_Allocate_Args)", size_of::<XLA_FFI_DeviceMemory_Allocate_Args>()),
        ("sizeof(XLA_FFI_ThreadPool_NumThreads_Args)", size_of::<XLA_FFI_ThreadPool_NumThreads_Args>()),
    ];
    let mut c = String::from("#include <stdio.h>\n#include <stddef.h>\n#include \"xla/ffi/api/c_api.h\"\nint main(void) {\n");
    for (expr, _) in &checks {
        c.push_str(&format!("  printf(\"%zu\\n\", (size_t)({expr}));\n"));
    }
    c.push_str("  return 0;\n}\n");
    std::fs::write(&src, c).unwrap();
    let exe = dir.join("layout");
    let cc = Command::new("cc").arg("-I").arg(&inc).arg(&src).arg("-o").arg(&exe).output().expect("a C compiler");
    assert!(cc.status.success(), "compiling against c_api.h failed: {}", String::from_utf8_lossy(&cc.stderr));
    let out = Command::new(&exe).output().unwrap();
    let got: Vec<usize> = String::from_utf8_lossy(&out.stdout).lines().map(|l| l.parse().unwrap()).collect();
    for ((expr, ours), theirs) in checks.iter().zip(&got) {
        assert_eq!(ours, theirs, "{expr}: ours {ours}, official header {theirs}");
    }
    let _ = std::fs::remove_dir_all(dir);
}
