//! Hand-built XLA call frames: owned buffers, attributes, the step frame of a group, the CUDA scratch.

use super::*;

/// An owned buffer: 8-byte aligned storage, dims, dtype.
#[derive(Clone)]
pub struct OwnedBuffer {
    pub dtype: i32,
    pub dims: Vec<i64>,
    pub data: Vec<u64>,
    /// If set, this result shares the storage of that argument (donation).
    pub alias_of_arg: Option<usize>,
}

impl OwnedBuffer {
    pub fn zeros(dtype: i32, dims: &[i64]) -> Self {
        let bytes = dims.iter().product::<i64>() as usize * dtype::span_size(dtype);
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
        f.args.push(OwnedBuffer::zeros(dtype::S32, &l)); // skipped
        f.rets.push(OwnedBuffer::zeros(s.dtype, &s.dims));
        f.rets.push(OwnedBuffer::zeros(dtype::F32, &s.dims));
        f.rets.push(OwnedBuffer::zeros(s.dtype, &s.dims));
        f.rets.push(OwnedBuffer::zeros(dtype::F32, &l));
        f.rets.push(OwnedBuffer::zeros(dtype::F32, &l));
        f.rets.push(OwnedBuffer::zeros(dtype::S32, &l));
        f.rets.push(OwnedBuffer::zeros(dtype::F32, &l));
        f.rets.push(OwnedBuffer::zeros(dtype::S32, &l)); // skipped
    }
    f.set_attr("kind", Attr::Str(kind.into()));
    f.set_attr("ns_coeffs", Attr::F32Array([3.4445, -4.7750, 2.0315].repeat(5)));
    f.set_attr("noise_every", Attr::I64(1));
    f.set_attr("noise_adaptive", Attr::Bool(true));
    f.set_attr("ratio_stat", Attr::Str("max".into()));
    // The paper's rule, spelled out (the library's defaults are p = 0.5 and the median).
    f.set_attr("ratio_power", Attr::F64(1.0));
    // ... and its cadence, every layer on the same steps (the library's default is "staggered").
    f.set_attr("noise_schedule", Attr::Str("synchronous".into()));
    f.set_attr("ratio_floor", Attr::F64(0.0));
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
