//! Test support: a fake XLA Api table, hand-built call frames, seeded random data and a float64
//! reference of the LANTON math (SVD by Jacobi, Newton-Schulz, norms).
#![allow(dead_code)]

use lanton::ffi::api::*;
use std::ffi::{c_void, CStr};

// ---------------------------------------------------------------- fake Api

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

// ---------------------------------------------------------------- frames

/// An owned buffer: 8-byte aligned storage, dims, dtype.
pub struct OwnedBuffer {
    pub dtype: i32,
    pub dims: Vec<i64>,
    pub data: Vec<u64>,
    /// If set, this result shares the storage of that argument (donation).
    pub alias_of_arg: Option<usize>,
}

fn dtype_size(d: i32) -> usize {
    match d {
        dtype::F64 | dtype::S64 => 8,
        dtype::F32 | dtype::S32 => 4,
        dtype::BF16 | dtype::F16 => 2,
        _ => 1,
    }
}

impl OwnedBuffer {
    pub fn zeros(dtype: i32, dims: &[i64]) -> Self {
        let bytes = dims.iter().product::<i64>() as usize * dtype_size(dtype);
        OwnedBuffer { dtype, dims: dims.to_vec(), data: vec![0u64; bytes.div_ceil(8).max(1)], alias_of_arg: None }
    }
    pub fn f32(dims: &[i64], v: &[f32]) -> Self {
        let mut b = Self::zeros(dtype::F32, dims);
        b.as_f32_mut().copy_from_slice(v);
        b
    }
    pub fn i32(dims: &[i64], v: &[i32]) -> Self {
        let mut b = Self::zeros(dtype::S32, dims);
        let n = v.len();
        unsafe { std::slice::from_raw_parts_mut(b.data.as_mut_ptr() as *mut i32, n) }.copy_from_slice(v);
        b
    }
    pub fn bf16(dims: &[i64], v: &[f32]) -> Self {
        let mut b = Self::zeros(dtype::BF16, dims);
        let n = v.len();
        let s = unsafe { std::slice::from_raw_parts_mut(b.data.as_mut_ptr() as *mut half::bf16, n) };
        s.iter_mut().zip(v).for_each(|(o, &x)| *o = half::bf16::from_f32(x));
        b
    }
    pub fn len(&self) -> usize {
        self.dims.iter().product::<i64>() as usize
    }
    pub fn as_f32_mut(&mut self) -> &mut [f32] {
        let n = self.len();
        unsafe { std::slice::from_raw_parts_mut(self.data.as_mut_ptr() as *mut f32, n) }
    }
    pub fn to_f32(&self) -> Vec<f32> {
        let n = self.len();
        match self.dtype {
            dtype::F32 => unsafe { std::slice::from_raw_parts(self.data.as_ptr() as *const f32, n) }.to_vec(),
            dtype::BF16 => unsafe { std::slice::from_raw_parts(self.data.as_ptr() as *const half::bf16, n) }
                .iter()
                .map(|x| x.to_f32())
                .collect(),
            dtype::S32 => unsafe { std::slice::from_raw_parts(self.data.as_ptr() as *const i32, n) }
                .iter()
                .map(|&x| x as f32)
                .collect(),
            d => panic!("to_f32: dtype {d}"),
        }
    }
}

pub enum Attr {
    Str(String),
    I64(i64),
    Bool(bool),
    F64(f64),
    F32Array(Vec<f32>),
    I64Array(Vec<i64>),
    /// An attribute of a type the decoder must reject (dictionary).
    Dict,
}

#[derive(Default)]
pub struct Frame {
    pub args: Vec<OwnedBuffer>,
    pub rets: Vec<OwnedBuffer>,
    pub attrs: Vec<(String, Attr)>,
    /// Overrides the argument type tag of argument i (to build malformed frames).
    pub bad_arg_type: Option<usize>,
    /// The XLA stage of the call (default: execute).
    pub stage: Option<i32>,
}

pub type Handler = unsafe extern "C" fn(*mut XLA_FFI_CallFrame) -> *mut XLA_FFI_Error;

impl Frame {
    pub fn set_attr(&mut self, name: &str, a: Attr) {
        self.attrs.retain(|(n, _)| n != name);
        self.attrs.push((name.to_string(), a));
    }
    pub fn remove_attr(&mut self, name: &str) {
        self.attrs.retain(|(n, _)| n != name);
    }

    /// Calls `handler` at the execute stage; Err(message) if it returned an error.
    pub fn call(&mut self, handler: Handler) -> Result<(), String> {
        self.call_with(handler, std::ptr::null_mut())
    }

    pub fn call_with(&mut self, handler: Handler, ext: *mut XLA_FFI_Extension_Base) -> Result<(), String> {
        let api = fake_api();
        let arg_ptrs: Vec<*mut c_void> = self.args.iter_mut().map(|b| b.data.as_mut_ptr() as *mut c_void).collect();
        let mut raw_args: Vec<XLA_FFI_Buffer> = self
            .args
            .iter_mut()
            .zip(&arg_ptrs)
            .map(|(b, &p)| XLA_FFI_Buffer {
                struct_size: 48,
                extension_start: std::ptr::null_mut(),
                dtype: b.dtype,
                data: p,
                rank: b.dims.len() as i64,
                dims: b.dims.as_mut_ptr(),
            })
            .collect();
        let mut raw_rets: Vec<XLA_FFI_Buffer> = self
            .rets
            .iter_mut()
            .map(|b| XLA_FFI_Buffer {
                struct_size: 48,
                extension_start: std::ptr::null_mut(),
                dtype: b.dtype,
                data: match b.alias_of_arg {
                    Some(i) => arg_ptrs[i],
                    None => b.data.as_mut_ptr() as *mut c_void,
                },
                rank: b.dims.len() as i64,
                dims: b.dims.as_mut_ptr(),
            })
            .collect();
        let mut arg_types = vec![ARG_BUFFER; raw_args.len()];
        if let Some(i) = self.bad_arg_type {
            arg_types[i] = 7;
        }
        let mut ret_types = vec![RET_BUFFER; raw_rets.len()];
        let mut arg_pp: Vec<*mut c_void> = raw_args.iter_mut().map(|b| b as *mut _ as *mut c_void).collect();
        let mut ret_pp: Vec<*mut c_void> = raw_rets.iter_mut().map(|b| b as *mut _ as *mut c_void).collect();

        // Attributes, sorted by name as XLA sends them.
        self.attrs.sort_by(|a, b| a.0.cmp(&b.0));
        let mut scalars: Vec<Box<[u64; 1]>> = Vec::new();
        let mut payload_store: Vec<Box<[u8; 24]>> = Vec::new();
        let mut names: Vec<Box<XLA_FFI_ByteSpan>> = Vec::new();
        let mut types = Vec::new();
        let mut payloads: Vec<*mut c_void> = Vec::new();
        for (name, a) in &self.attrs {
            names.push(Box::new(XLA_FFI_ByteSpan { ptr: name.as_ptr() as *const _, len: name.len() }));
            let mut store = Box::new([0u8; 24]);
            let (ty, p): (i32, *mut c_void) = unsafe {
                match a {
                    Attr::Str(s) => {
                        let span = store.as_mut_ptr() as *mut XLA_FFI_ByteSpan;
                        *span = XLA_FFI_ByteSpan { ptr: s.as_ptr() as *const _, len: s.len() };
                        (attr_type::STRING, span as *mut c_void)
                    }
                    Attr::I64(_) | Attr::Bool(_) | Attr::F64(_) => {
                        let mut v = Box::new([0u64; 1]);
                        let dt = match a {
                            Attr::I64(x) => {
                                *(v.as_mut_ptr() as *mut i64) = *x;
                                dtype::S64
                            }
                            Attr::Bool(x) => {
                                *(v.as_mut_ptr() as *mut u8) = *x as u8;
                                dtype::PRED
                            }
                            Attr::F64(x) => {
                                *(v.as_mut_ptr() as *mut f64) = *x;
                                dtype::F64
                            }
                            _ => unreachable!(),
                        };
                        let sc = store.as_mut_ptr() as *mut XLA_FFI_Scalar;
                        *sc = XLA_FFI_Scalar { dtype: dt, value: v.as_mut_ptr() as *mut c_void };
                        scalars.push(v);
                        (attr_type::SCALAR, sc as *mut c_void)
                    }
                    Attr::F32Array(xs) => {
                        let arr = store.as_mut_ptr() as *mut XLA_FFI_Array;
                        *arr = XLA_FFI_Array { dtype: dtype::F32, size: xs.len(), data: xs.as_ptr() as *mut c_void };
                        (attr_type::ARRAY, arr as *mut c_void)
                    }
                    Attr::I64Array(xs) => {
                        let arr = store.as_mut_ptr() as *mut XLA_FFI_Array;
                        *arr = XLA_FFI_Array { dtype: dtype::S64, size: xs.len(), data: xs.as_ptr() as *mut c_void };
                        (attr_type::ARRAY, arr as *mut c_void)
                    }
                    Attr::Dict => (attr_type::DICTIONARY, store.as_mut_ptr() as *mut c_void),
                }
            };
            types.push(ty);
            payloads.push(p);
            payload_store.push(store);
        }
        let mut name_ptrs: Vec<*mut XLA_FFI_ByteSpan> = names.iter_mut().map(|b| &mut **b as *mut _).collect();

        let mut frame = XLA_FFI_CallFrame {
            struct_size: CALL_FRAME_STRUCT_SIZE,
            extension_start: ext,
            api: &*api,
            ctx: std::ptr::null_mut(),
            stage: self.stage.unwrap_or(STAGE_EXECUTE),
            args: XLA_FFI_Args {
                struct_size: 40,
                extension_start: std::ptr::null_mut(),
                size: arg_pp.len() as i64,
                types: arg_types.as_mut_ptr(),
                args: arg_pp.as_mut_ptr(),
            },
            rets: XLA_FFI_Rets {
                struct_size: 40,
                extension_start: std::ptr::null_mut(),
                size: ret_pp.len() as i64,
                types: ret_types.as_mut_ptr(),
                rets: ret_pp.as_mut_ptr(),
            },
            attrs: XLA_FFI_Attrs {
                struct_size: 48,
                extension_start: std::ptr::null_mut(),
                size: names.len() as i64,
                types: types.as_mut_ptr(),
                names: name_ptrs.as_mut_ptr(),
                attrs: payloads.as_mut_ptr(),
            },
            future: std::ptr::null_mut(),
        };
        let err = unsafe { handler(&mut frame) };
        // Copy aliased results back out of the argument storage they shared.
        for r in 0..self.rets.len() {
            if let Some(i) = self.rets[r].alias_of_arg {
                let src = self.args[i].data.clone();
                self.rets[r].data = src;
            }
        }
        match take_error(err) {
            None => Ok(()),
            Some(e) => Err(format!("[code {}] {}", e.code, e.message)),
        }
    }
}

// ---------------------------------------------------------------- random data

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1)
    }
    pub fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform().max(1e-300), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
    pub fn normals(&mut self, n: usize, scale: f64) -> Vec<f32> {
        (0..n).map(|_| (self.normal() * scale) as f32).collect()
    }
    /// A gradient-like matrix: a few strong rank-1 directions plus dense noise.
    pub fn gradient_like(&mut self, rows: usize, cols: usize) -> Vec<f32> {
        let mut m: Vec<f64> = (0..rows * cols).map(|_| 0.3 * self.normal()).collect();
        for k in 0..3 {
            let u: Vec<f64> = (0..rows).map(|_| self.normal()).collect();
            let v: Vec<f64> = (0..cols).map(|_| self.normal()).collect();
            let s = 3.0 / (k as f64 + 1.0);
            for i in 0..rows {
                for j in 0..cols {
                    m[i * cols + j] += s * u[i] * v[j] / ((rows * cols) as f64).sqrt().sqrt();
                }
            }
        }
        m.into_iter().map(|x| x as f32).collect()
    }
}

// ---------------------------------------------------------------- float64 reference

/// Singular values of a (rows x cols) via cyclic Jacobi on the smaller Gram matrix, in f64.
pub fn singular_values(a: &[f32], rows: usize, cols: usize) -> Vec<f64> {
    let (m, n, at) = if rows <= cols { (rows, cols, false) } else { (cols, rows, true) };
    let get = |i: usize, k: usize| if at { a[k * cols + i] as f64 } else { a[i * cols + k] as f64 };
    let mut g = vec![0.0f64; m * m];
    for i in 0..m {
        for j in 0..m {
            g[i * m + j] = (0..n).map(|k| get(i, k) * get(j, k)).sum();
        }
    }
    for _sweep in 0..100 {
        let off: f64 = (0..m).flat_map(|i| (0..m).filter(move |&j| j != i).map(move |j| (i, j))).map(|(i, j)| g[i * m + j].powi(2)).sum();
        let diag: f64 = (0..m).map(|i| g[i * m + i].powi(2)).sum();
        if off <= 1e-30 * diag.max(1e-300) {
            break;
        }
        for p in 0..m {
            for q in p + 1..m {
                let apq = g[p * m + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (g[q * m + q] - g[p * m + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..m {
                    let (gkp, gkq) = (g[k * m + p], g[k * m + q]);
                    g[k * m + p] = c * gkp - s * gkq;
                    g[k * m + q] = s * gkp + c * gkq;
                }
                for k in 0..m {
                    let (gpk, gqk) = (g[p * m + k], g[q * m + k]);
                    g[p * m + k] = c * gpk - s * gqk;
                    g[q * m + k] = s * gpk + c * gqk;
                }
            }
        }
    }
    (0..m).map(|i| g[i * m + i].max(0.0).sqrt()).collect()
}

pub fn nuclear_f64(a: &[f32], rows: usize, cols: usize) -> f64 {
    singular_values(a, rows, cols).iter().sum()
}

/// Newton-Schulz in f64 with the same orientation and normalization as the kernel.
pub fn newton_schulz_f64(v: &[f32], rows: usize, cols: usize, coeffs: &[[f32; 3]]) -> Vec<f64> {
    let (m, n, tr) = if rows <= cols { (rows, cols, false) } else { (cols, rows, true) };
    let mut x: Vec<f64> = (0..m * n)
        .map(|idx| {
            let (i, k) = (idx / n, idx % n);
            if tr { v[k * cols + i] as f64 } else { v[i * cols + k] as f64 }
        })
        .collect();
    let fro = x.iter().map(|e| e * e).sum::<f64>().sqrt();
    x.iter_mut().for_each(|e| *e /= fro + 1e-7);
    for &[a, b, c] in coeffs {
        let (a, b, c) = (a as f64, b as f64, c as f64);
        let mut am = vec![0.0; m * m];
        for i in 0..m {
            for j in 0..m {
                am[i * m + j] = (0..n).map(|k| x[i * n + k] * x[j * n + k]).sum();
            }
        }
        let mut bm = vec![0.0; m * m];
        for i in 0..m {
            for j in 0..m {
                let aa: f64 = (0..m).map(|k| am[i * m + k] * am[k * m + j]).sum();
                bm[i * m + j] = b * am[i * m + j] + c * aa;
            }
        }
        let mut y = vec![0.0; m * n];
        for i in 0..m {
            for k in 0..n {
                y[i * n + k] = a * x[i * n + k] + (0..m).map(|j| bm[i * m + j] * x[j * n + k]).sum::<f64>();
            }
        }
        x = y;
    }
    let mut out = vec![0.0; rows * cols];
    for i in 0..m {
        for k in 0..n {
            if tr { out[k * cols + i] = x[i * n + k] } else { out[i * cols + k] = x[i * n + k] }
        }
    }
    out
}

pub fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).abs()).fold(0.0, f64::max)
}

// ---------------------------------------------------------------- float64 reference step

use lanton::step::{Hyper, Kind, LayerShape, RatioStat, StepConfig};

/// One leaf's state in f64, mirroring the kernel's state arrays.
#[derive(Clone)]
pub struct RefLeaf {
    pub shape: LayerShape,
    pub param: Vec<f64>,
    pub momentum: Vec<f64>,
    pub prev_grad: Vec<f64>,
    pub noise: Vec<f64>,
    pub valid: Vec<bool>,
    pub prev_step: Vec<i32>,
    pub ratio: Vec<f64>,
}

impl RefLeaf {
    pub fn new(shape: LayerShape, param: &[f32]) -> Self {
        let n = shape.layers * shape.layer_len();
        RefLeaf {
            shape,
            param: param.iter().map(|&x| x as f64).collect(),
            momentum: vec![0.0; n],
            prev_grad: vec![0.0; n],
            noise: vec![0.0; shape.layers],
            valid: vec![false; shape.layers],
            prev_step: vec![0; shape.layers],
            ratio: vec![1.0; shape.layers],
        }
    }
}

pub fn ref_dual_norm(kind: Kind, d: &[f64], shape: &LayerShape) -> f64 {
    let f = lanton::step::dual_norm_factor(kind, shape) as f64;
    f * match kind {
        Kind::Hidden => {
            let d32: Vec<f32> = d.iter().map(|&x| x as f32).collect();
            nuclear_f64(&d32, shape.rows, shape.cols)
        }
        Kind::Embed => d.iter().map(|x| x.abs()).sum(),
        Kind::Vector => d.iter().map(|x| x * x).sum::<f64>().sqrt(),
    }
}

pub fn ref_direction(cfg: &StepConfig, v: &[f64], shape: &LayerShape) -> Vec<f64> {
    match cfg.kind {
        Kind::Hidden => {
            let v32: Vec<f32> = v.iter().map(|&x| x as f32).collect();
            newton_schulz_f64(&v32, shape.rows, shape.cols, &cfg.ns_coeffs)
        }
        Kind::Embed => v.iter().map(|&x| if x > 0.0 { 1.0 } else if x < 0.0 { -1.0 } else { 0.0 }).collect(),
        Kind::Vector => {
            let rms = (v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64).sqrt();
            v.iter().map(|x| x / (rms + cfg.vector_eps as f64)).collect()
        }
    }
}

/// The LANTON group step in f64, written independently of the kernel from ALGORITHM.md.
/// Returns each leaf's update (delta).
pub fn ref_group_step(cfg: &StepConfig, h: &Hyper, t: i32, leaves: &mut [RefLeaf], grads: &[Vec<f32>]) -> Vec<Vec<f64>> {
    let k = cfg.noise_every as i32;
    let noise_step = cfg.noise_adaptive && t >= 2 && t % k == 0;
    let keep = cfg.noise_adaptive && (t + 1) >= 2 && (t + 1) % k == 0;
    let (b1, b2) = (h.beta1 as f64, h.beta2 as f64);
    let mut skipped = Vec::new();
    for (leaf, g) in leaves.iter_mut().zip(grads) {
        let n = leaf.shape.layer_len();
        for l in 0..leaf.shape.layers {
            let r = l * n..(l + 1) * n;
            let gl: Vec<f64> = g[r.clone()].iter().map(|&x| x as f64).collect();
            let bad = gl.iter().any(|x| !x.is_finite());
            skipped.push(bad);
            if bad {
                continue;
            }
            for (b, &gv) in leaf.momentum[r.clone()].iter_mut().zip(&gl) {
                *b = b1 * *b + (1.0 - b1) * gv;
            }
            if noise_step && leaf.prev_step[l] == t - 1 && leaf.prev_step[l] >= 1 {
                let d: Vec<f64> = gl.iter().zip(&leaf.prev_grad[r.clone()]).map(|(a, b)| a - b).collect();
                let mut nrm = ref_dual_norm(cfg.kind, &d, &leaf.shape);
                if cfg.noise_relative {
                    nrm /= ref_dual_norm(cfg.kind, &leaf.momentum[r.clone()], &leaf.shape);
                }
                let tracked = b2 * leaf.noise[l] + (1.0 - b2) * nrm * nrm;
                if (tracked as f32).is_finite() {
                    leaf.noise[l] = tracked;
                    if nrm > 0.0 {
                        leaf.valid[l] = true;
                    }
                }
            }
            if keep {
                leaf.prev_grad[r].copy_from_slice(&gl);
                leaf.prev_step[l] = t;
            }
        }
    }
    let eps = cfg.ratio_eps as f64;
    let alphas: Vec<f64> = leaves
        .iter()
        .flat_map(|lf| lf.noise.iter().zip(&lf.valid).filter(|(_, &v)| v).map(|(&h, _)| 1.0 / (h + eps).sqrt()).collect::<Vec<_>>())
        .collect();
    let reference = match cfg.ratio_stat {
        RatioStat::Max => alphas.iter().cloned().fold(f64::MIN, f64::max),
        RatioStat::Min => alphas.iter().cloned().fold(f64::MAX, f64::min),
        RatioStat::Mean => alphas.iter().sum::<f64>() / alphas.len().max(1) as f64,
        RatioStat::Median => {
            let mut sorted = alphas.clone();
            sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
            let n = sorted.len();
            if n == 0 { f64::NAN } else { 0.5 * (sorted[(n - 1) / 2] + sorted[n / 2]) }
        }
    };
    let mut updates = Vec::new();
    let mut idx = 0;
    for (leaf, g) in leaves.iter_mut().zip(grads) {
        let n = leaf.shape.layer_len();
        let s = lanton::step::update_scale(cfg.kind, h.scale, &leaf.shape) as f64;
        let mut upd = vec![0.0; leaf.param.len()];
        for l in 0..leaf.shape.layers {
            let r = l * n..(l + 1) * n;
            let ratio = if cfg.noise_adaptive && leaf.valid[l] && !alphas.is_empty() {
                let q = 1.0 / (leaf.noise[l] + eps).sqrt() / reference;
                let r = q.powf(cfg.ratio_power as f64).max(cfg.ratio_floor as f64);
                if cfg.ratio_stat == RatioStat::Median { r.min(1.0) } else { r }
            } else {
                1.0
            };
            leaf.ratio[l] = ratio;
            let bad = skipped[idx];
            idx += 1;
            if bad {
                continue;
            }
            let v: Vec<f64> = if cfg.nesterov {
                leaf.momentum[r.clone()].iter().zip(&g[r.clone()]).map(|(&b, &gv)| b1 * b + (1.0 - b1) * gv as f64).collect()
            } else {
                leaf.momentum[r.clone()].to_vec()
            };
            let d = ref_direction(cfg, &v, &leaf.shape);
            for (j, i) in r.enumerate() {
                let delta = -(h.lr as f64) * (h.weight_decay as f64 * leaf.param[i] + s * ratio * d[j]);
                upd[i] = delta;
                leaf.param[i] += delta;
            }
        }
        updates.push(upd);
    }
    updates
}

/// U diag(s) V^T with random orthonormal U (rows x k), V (cols x k), k = min(rows, cols), and
/// the given singular values: exact spectra for the nuclear-norm tests.
pub fn with_spectrum(rng: &mut Rng, rows: usize, cols: usize, s: &[f64]) -> Vec<f32> {
    let k = rows.min(cols);
    let orthonormal = |rng: &mut Rng, n: usize| -> Vec<Vec<f64>> {
        let mut q: Vec<Vec<f64>> = Vec::new();
        while q.len() < k {
            let mut v: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
            for _ in 0..2 {
                for u in &q {
                    let d: f64 = u.iter().zip(&v).map(|(a, b)| a * b).sum();
                    v.iter_mut().zip(u).for_each(|(x, y)| *x -= d * y);
                }
            }
            let nrm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            v.iter_mut().for_each(|x| *x /= nrm);
            q.push(v);
        }
        q
    };
    let (u, v) = (orthonormal(rng, rows), orthonormal(rng, cols));
    let mut m = vec![0.0f32; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            m[i * cols + j] = (0..k).map(|t| u[t][i] * s[t] * v[t][j]).sum::<f64>() as f32;
        }
    }
    m
}

/// Owned f32 state of one leaf (zeroed state, r = 0 until the first step writes it), for
/// driving the step directly or through the C ABI.
pub struct OwnedLeaf {
    pub shape: LayerShape,
    pub param: Vec<f32>,
    pub momentum: Vec<f32>,
    pub prev_grad: Vec<f32>,
    pub noise: Vec<f32>,
    pub valid: Vec<f32>,
    pub prev_step: Vec<i32>,
    pub ratio: Vec<f32>,
    pub update: Vec<f32>,
}

impl OwnedLeaf {
    pub fn new(shape: LayerShape, param: Vec<f32>) -> Self {
        let (n, l) = (param.len(), shape.layers);
        OwnedLeaf {
            shape,
            param,
            momentum: vec![0.0; n],
            prev_grad: vec![0.0; n],
            noise: vec![0.0; l],
            valid: vec![0.0; l],
            prev_step: vec![0; l],
            ratio: vec![0.0; l],
            update: vec![0.0; n],
        }
    }

    /// This leaf as the C ABI's descriptor with gradient `grad`: its pointers borrow `self`
    /// and `grad`, so both must outlive every call that uses it.
    pub fn c_leaf(&mut self, grad: &[f32]) -> lanton::capi::LantonLeafF32 {
        lanton::capi::LantonLeafF32 {
            layers: self.shape.layers,
            rows: self.shape.rows,
            cols: self.shape.cols,
            rows_are_input: self.shape.rows_are_input as u8,
            param: self.param.as_mut_ptr(),
            grad: grad.as_ptr(),
            momentum: self.momentum.as_mut_ptr(),
            prev_grad: self.prev_grad.as_mut_ptr(),
            noise: self.noise.as_mut_ptr(),
            valid: self.valid.as_mut_ptr(),
            prev_step: self.prev_step.as_mut_ptr(),
            ratio: self.ratio.as_mut_ptr(),
        }
    }
}

pub struct LeafSpec {
    pub dims: [i64; 3],
    pub dtype: i32,
    pub rows_are_input: bool,
}

/// A well-formed step frame for `kind`, with random params and grads; state starts at zero.
pub fn step_frame(kind: &str, specs: &[LeafSpec], t: i32, rng: &mut Rng) -> Frame {
    let mut f = Frame::default();
    f.args.push(OwnedBuffer::f32(&[5], &[0.02, 0.9, 0.8, 0.01, 0.2]));
    f.args.push(OwnedBuffer::i32(&[], &[t]));
    for s in specs {
        let n = (s.dims[0] * s.dims[1] * s.dims[2]) as usize;
        let l = [s.dims[0]];
        let mk = |v: &[f32]| if s.dtype == dtype::BF16 { OwnedBuffer::bf16(&s.dims, v) } else { OwnedBuffer::f32(&s.dims, v) };
        f.args.push(mk(&rng.normals(n, 0.5)));
        f.args.push(mk(&rng.normals(n, 1.0)));
        f.args.push(OwnedBuffer::zeros(dtype::F32, &s.dims)); // momentum: f32
        f.args.push(mk(&vec![0.0; n]));
        f.args.push(OwnedBuffer::zeros(dtype::F32, &l));
        f.args.push(OwnedBuffer::zeros(dtype::F32, &l));
        f.args.push(OwnedBuffer::zeros(dtype::S32, &l));
        f.rets.push(OwnedBuffer::zeros(s.dtype, &s.dims));
        f.rets.push(OwnedBuffer::zeros(dtype::F32, &s.dims));
        f.rets.push(OwnedBuffer::zeros(s.dtype, &s.dims));
        f.rets.push(OwnedBuffer::zeros(dtype::F32, &l));
        f.rets.push(OwnedBuffer::zeros(dtype::F32, &l));
        f.rets.push(OwnedBuffer::zeros(dtype::S32, &l));
        f.rets.push(OwnedBuffer::zeros(dtype::F32, &l));
    }
    f.set_attr("kind", Attr::Str(kind.into()));
    f.set_attr("ns_coeffs", Attr::F32Array([3.4445, -4.7750, 2.0315].repeat(5)));
    f.set_attr("noise_every", Attr::I64(1));
    f.set_attr("noise_adaptive", Attr::Bool(true));
    f.set_attr("ratio_stat", Attr::Str("max".into()));
    f.set_attr("ratio_eps", Attr::F64(1e-30));
    f.set_attr("nesterov", Attr::Bool(false));
    f.set_attr("vector_eps", Attr::F64(1e-8));
    f.set_attr("rows_are_input", Attr::I64Array(specs.iter().map(|s| s.rows_are_input as i64).collect()));
    f.set_attr("leaf_names", Attr::Str(specs.iter().enumerate().map(|(i, _)| format!("blocks/{i}/kernel")).collect::<Vec<_>>().join("\n")));
    f
}

pub fn two_leaves(dtype: i32) -> Vec<LeafSpec> {
    vec![
        LeafSpec { dims: [1, 12, 20], dtype, rows_are_input: true },
        LeafSpec { dims: [2, 16, 8], dtype, rows_are_input: false },
    ]
}

/// Sends `handler` XLA's registration-time metadata query (an empty frame, as at registration:
/// the handler must answer without decoding anything) and returns what it filled in.
pub fn query_metadata(handler: Handler) -> XLA_FFI_Metadata {
    let mut meta = XLA_FFI_Metadata {
        struct_size: 40,
        api_version: XLA_FFI_Api_Version { struct_size: 24, extension_start: std::ptr::null_mut(), major_version: 0, minor_version: 0 },
        traits: 0,
        state_type_id: 0,
    };
    let mut ext = XLA_FFI_Metadata_Extension {
        extension_base: XLA_FFI_Extension_Base { struct_size: 32, type_: EXTENSION_METADATA, next: std::ptr::null_mut() },
        metadata: &mut meta,
    };
    Frame::default().call_with(handler, &mut ext.extension_base).unwrap();
    meta
}

/// `lanton_cuda_scratch_bytes` through the C ABI: the scratch size of a CUDA call, or its error.
pub fn cuda_scratch_bytes(plan_json: &str) -> Result<u64, String> {
    let text = std::ffi::CString::new(plan_json).unwrap();
    let (mut bytes, mut err) = (0u64, [0 as std::ffi::c_char; 512]);
    let rc = unsafe { lanton::capi::lanton_cuda_scratch_bytes(text.as_ptr(), &mut bytes, err.as_mut_ptr(), err.len()) };
    if rc == lanton::capi::LANTON_OK {
        Ok(bytes)
    } else {
        Err(format!("[{rc}] {}", unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy()))
    }
}

/// The plan description the Python shim sends `lanton_cuda_scratch_bytes` for these leaves.
pub fn scratch_plan_json(kind: &str, specs: &[LeafSpec], noise_adaptive: bool, noise_work: bool, ns_dtype: &str) -> String {
    let leaves: Vec<String> = specs.iter().map(|s| format!("[{}, {}, {}]", s.dims[0], s.dims[1], s.dims[2])).collect();
    format!(
        r#"{{"kind": "{kind}", "noise_adaptive": {noise_adaptive}, "noise_work": {noise_work}, "ns_dtype": "{ns_dtype}", "leaves": [{}]}}"#,
        leaves.join(", ")
    )
}

/// Appends the CUDA targets' trailing scratch result (uint8[bytes]).
pub fn add_scratch(f: &mut Frame, bytes: u64) {
    f.rets.push(OwnedBuffer::zeros(dtype::U8, &[bytes as i64]));
}
