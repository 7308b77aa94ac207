//! `LANTON_NUM_THREADS` is validated every time it is read: an invalid value (`abc`, `0`, `-3`,
//! out of range) is an error naming the variable, the value and the allowed range, from
//! `lanton_check_env`, from the CPU handlers (an FFI error, not a panic) and from the C ABI
//! step; a valid one sizes the CPU kernels' pool.
//!
//! The environment of a process is shared by its threads, so each value is tried in a child
//! process: this test binary re-runs one of its own tests with the variable set (the `child_*`
//! tests do nothing unless `LANTON_ENV_TEST_CHILD=1`).

mod common;

use common::*;
use lanton::capi::*;
use lanton::ffi::api::{dtype, errc};
use lanton::handlers::lanton_step_update_cpu;
use std::ffi::{c_char, CStr};
use std::process::Command;

const CHILD: &str = "LANTON_ENV_TEST_CHILD";

fn is_child() -> bool {
    std::env::var(CHILD).is_ok_and(|v| v == "1")
}

/// Runs test `name` of this binary in a child process with `LANTON_NUM_THREADS=value`.
fn run_child(name: &str, value: &str) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .env("LANTON_NUM_THREADS", value)
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child {name} with LANTON_NUM_THREADS={value:?} failed:\n{stdout}\n{stderr}"
    );
}

fn check_env_message() -> (i32, String) {
    let mut buf = [0 as c_char; 256];
    // SAFETY: the buffer holds 256 bytes.
    let rc = unsafe { lanton_check_env(buf.as_mut_ptr(), buf.len()) };
    (rc, unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
}

fn host_step() -> (i32, String) {
    let shape = lanton::step::LayerShape { layers: 1, rows: 2, cols: 3, rows_are_input: true };
    let mut l = OwnedLeaf::new(shape, vec![0.5; 6]);
    let grad = [1.0f32; 6];
    let leaf = l.c_leaf(&grad);
    let hyper = [0.02f32, 0.9, 0.9, 0.0, 0.2];
    let mut err = [0 as c_char; 256];
    // SAFETY: every buffer above is live and sized as the leaf states.
    let rc = unsafe {
        lanton_step_host_f32(c"{\"kind\": \"hidden\"}".as_ptr(), hyper.as_ptr(), 1, &leaf, 1, err.as_mut_ptr(), err.len())
    };
    (rc, unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned())
}

fn ffi_step() -> Result<(), String> {
    let mut f = step_frame("hidden", &two_leaves(dtype::F32), 1, &mut Rng::new(5));
    f.call(lanton_step_update_cpu)
}

#[test]
fn invalid_num_threads_is_an_error_everywhere() {
    for value in ["abc", "0", "-3", "1025", "2.5", "4 threads"] {
        run_child("child_with_invalid_value", value);
    }
}

#[test]
fn valid_num_threads_sizes_the_pool() {
    for value in ["3", " 2 ", "1"] {
        run_child("child_with_valid_value", value);
    }
    // Blank is the same as unset: one thread per core.
    run_child("child_with_blank_value", "");
}

#[test]
fn child_with_invalid_value() {
    if !is_child() {
        return;
    }
    let value = std::env::var("LANTON_NUM_THREADS").unwrap();
    let names_it = |m: &str| m.contains("LANTON_NUM_THREADS") && m.contains(&format!("{value:?}")) && m.contains("1 to 1024");

    let (rc, msg) = check_env_message();
    assert_eq!(rc, LANTON_ERR_ENV, "{msg}");
    assert!(names_it(&msg), "lanton_check_env: {msg}");

    let err = ffi_step().expect_err("the CPU handler ran with an invalid LANTON_NUM_THREADS");
    assert!(err.starts_with(&format!("[code {}] lanton_step_update_cpu: ", errc::FAILED_PRECONDITION)), "{err}");
    assert!(names_it(&err) && !err.contains("panic"), "handler: {err}");

    let (rc, msg) = host_step();
    assert_eq!(rc, LANTON_ERR_ENV, "{msg}");
    assert!(names_it(&msg), "lanton_step_host_f32: {msg}");

    // Still an error on the next call (validated on every read, not once per process).
    assert!(ffi_step().is_err());
    assert_eq!(check_env_message().0, LANTON_ERR_ENV);
}

#[test]
fn child_with_valid_value() {
    if !is_child() {
        return;
    }
    let want: usize = std::env::var("LANTON_NUM_THREADS").unwrap().trim().parse().unwrap();
    assert_eq!(check_env_message(), (LANTON_OK, String::new()));
    ffi_step().unwrap();
    let (rc, msg) = host_step();
    assert_eq!(rc, LANTON_OK, "{msg}");
    assert_eq!(lanton::cpu::gemm::pool().unwrap().current_num_threads(), want);
}

#[test]
fn child_with_blank_value() {
    if !is_child() {
        return;
    }
    assert_eq!(check_env_message(), (LANTON_OK, String::new()));
    ffi_step().unwrap();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    assert_eq!(lanton::cpu::gemm::pool().unwrap().current_num_threads(), cores);
}

#[test]
fn check_env_follows_the_error_buffer_convention() {
    // Whatever this process's environment, the call must not write past `err_len`, and with a
    // null or empty buffer must write nothing.
    let mut buf = [0x5Au8; 8];
    // SAFETY: 8 bytes, of which we announce 4.
    let rc = unsafe { lanton_check_env(buf.as_mut_ptr() as *mut c_char, 4) };
    assert!(rc == LANTON_OK || rc == LANTON_ERR_ENV);
    assert!(buf[4..].iter().all(|&b| b == 0x5A));
    if rc == LANTON_ERR_ENV {
        assert_eq!(buf[3], 0, "truncated message is NUL-terminated");
    }
    // SAFETY: null buffer, zero length.
    let rc0 = unsafe { lanton_check_env(std::ptr::null_mut(), 0) };
    assert_eq!(rc0, rc);
}
