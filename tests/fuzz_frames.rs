//! Hostile inputs, generated from a seeded PRNG, for every entry point a host can reach:
//!
//! * XLA FFI call frames for `lanton_step_{update,inplace}_{cpu,cuda}` and for the CUDA decode
//!   and launch-planning path (`decode_layout` + `Plan::new` + `batches`, which needs no GPU):
//!   random numbers of args/rets, entry type tags, dtypes (invalid codes too), ranks and dims
//!   (0, negative, huge, overflowing products), null/misaligned/aliased data pointers, struct
//!   sizes, stages, extension chains, api tables, and attribute sets (missing, extra, renamed,
//!   wrong types and dtypes, null payloads, non-UTF-8 strings, empty and large arrays);
//! * the plain C ABI (`include/lanton.h`): arbitrary JSON (and non-JSON) configurations, leaf
//!   descriptions with zero, huge and overflowing sizes, null pointers, hyperparameters and
//!   steps, error buffers of every length; CUDA scratch plans (`lanton_cuda_scratch_bytes`)
//!   with hostile leaf sizes and options.
//!
//! Inputs never break the documented safety contract themselves: every non-null pointer points
//! at live memory of at least the size its description states (descriptions whose size cannot
//! exist get null or a small live allocation, which the callee must refuse before reading), so
//! whatever goes wrong is the callee's fault. Each execution must end in success or in an error
//! with a named, non-empty message; the panic firewall's message (a panic caught at the ABI,
//! i.e. a missing validation), `LANTON_ERR_PANIC`, a write outside the buffers (guard words),
//! or a write to an input that was not donated counts as a failure. A crash ends the process:
//! the seed is printed first (on stderr, uncaptured) so the run can be repeated.
//!
//! `LANTON_FUZZ_ITERS` cases (default 20000) from case `LANTON_FUZZ_FIRST` (default 0), seed
//! `LANTON_FUZZ_SEED` (default 0x1a2705); `LANTON_FUZZ_CASE=i` replays one case,
//! `LANTON_FUZZ_TRACE=1` names every case before running it, `LANTON_FUZZ_DUMP=1` prints each
//! frame description.

mod common;

use common::{fake_api, take_error};
use lanton::capi::*;
use lanton::cuda::{batches, CudaOptions, Plan};
use lanton::ffi::api::*;
use lanton::ffi::handler::{dispatch, PANIC_MESSAGE};
use lanton::ffi::FfiError;
use lanton::handlers::{
    check_cuda_limits, GROUP_ARGS, decode_cuda_options, decode_layout, lanton_step_inplace_cpu, lanton_step_inplace_cuda,
    lanton_step_update_cpu, lanton_step_update_cuda,
};
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{c_char, c_void, CStr};
use std::io::Write;

const DEFAULT_ITERS: u64 = 20_000;
const DEFAULT_SEED: u64 = 0x1a2705;

// ------------------------------------------------------------------------------------ PRNG

/// splitmix64: tiny, seedable, good enough to drive a fuzzer.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in 0..n (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn upto(&mut self, n: usize) -> usize {
        self.below(n as u64 + 1) as usize
    }
    fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// A float: mostly ordinary values, sometimes an edge case.
    fn float(&mut self) -> f32 {
        if self.one_in(12) {
            self.pick(&[0.0, -0.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, f32::MIN_POSITIVE, 1e-40, -1.0, 1e30])
        } else {
            ((self.unit() - 0.5) * 4.0) as f32
        }
    }
    fn interesting_i64(&mut self) -> i64 {
        self.pick(&[
            0,
            1,
            -1,
            2,
            3,
            7,
            i32::MAX as i64,
            i32::MIN as i64,
            u32::MAX as i64,
            1 << 31,
            1 << 32,
            1 << 40,
            1 << 62,
            i64::MAX,
            i64::MIN,
            -(1 << 40),
        ])
    }
    fn interesting_i32(&mut self) -> i32 {
        self.pick(&[0, 1, 2, 3, 9, 10, -1, -7, i32::MAX, i32::MIN, 1 << 30])
    }
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        (0..self.upto(max)).map(|_| self.next() as u8).collect()
    }
}

fn case_seed(seed: u64, case: u64) -> u64 {
    let mut r = Rng::new(seed ^ case.wrapping_mul(0xD6E8_FEB8_6659_FD93));
    r.next()
}

// ---------------------------------------------------------------------- guarded memory

const GUARD_WORDS: usize = 2;
const GUARD: u64 = 0xA5A5_5A5A_DEAD_BEEF;
/// Largest data allocation the fuzzer makes; bigger described buffers get a null pointer.
const MAX_ALLOC_BYTES: usize = 1 << 20;

/// Heap blocks with guard words behind them. Blocks are never resized once handed out, so
/// pointers into them stay valid for the whole execution.
#[derive(Default)]
struct Arena {
    blocks: Vec<Vec<u64>>,
    /// Usable bytes of each block.
    usable: Vec<usize>,
}

impl Arena {
    fn alloc(&mut self, bytes: usize, rng: &mut Rng) -> usize {
        let words = bytes.div_ceil(8).max(1);
        let mut v: Vec<u64> = (0..words).map(|_| random_word(rng)).collect();
        v.extend(std::iter::repeat(GUARD).take(GUARD_WORDS));
        self.blocks.push(v);
        self.usable.push(words * 8);
        self.blocks.len() - 1
    }
    fn ptr(&mut self, block: usize, offset: usize) -> *mut c_void {
        // SAFETY (harness): callers keep offset within the block's usable bytes.
        unsafe { (self.blocks[block].as_mut_ptr() as *mut u8).add(offset) as *mut c_void }
    }
    fn guards_intact(&self) -> Option<usize> {
        self.blocks.iter().position(|b| b[b.len() - GUARD_WORDS..].iter().any(|&w| w != GUARD))
    }
}

/// Eight bytes of plausible data: two f32s, four 16-bit floats or two i32s, or raw bits.
fn random_word(rng: &mut Rng) -> u64 {
    match rng.below(4) {
        0 => (rng.float().to_bits() as u64) | ((rng.float().to_bits() as u64) << 32),
        1 => {
            let h = |r: &mut Rng| half::bf16::from_f32(r.float()).to_bits() as u64;
            h(rng) | (h(rng) << 16) | (h(rng) << 32) | (h(rng) << 48)
        }
        2 => rng.below(30) | (rng.below(30) << 32),
        _ => rng.next(),
    }
}

// ------------------------------------------------------------------ frame description

const VALID_DTYPES: [i32; 9] = [dtype::F32, dtype::BF16, dtype::F16, dtype::S32, dtype::F64, dtype::S64, dtype::U8, dtype::S8, dtype::PRED];
const BAD_DTYPES: [i32; 7] = [0, -1, 3, 13, 99, i32::MAX, i32::MIN];

fn elem_size(d: i32) -> usize {
    match dtype::size(d) {
        0 => 8, // unknown: assume the widest, so the allocation is enough whatever the callee thinks
        n => n,
    }
}

/// Element count the description claims, if it can exist (non-negative, no overflow).
fn described_count(dims: &[i64]) -> Option<usize> {
    if dims.iter().any(|&d| d < 0) {
        return None;
    }
    if dims.contains(&0) {
        return Some(0);
    }
    dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d as usize))
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Data {
    Null,
    /// Own allocation; `misalign` bytes past its (8-aligned) start.
    Own { misalign: usize },
    /// Inside the allocation of buffer `id`, `offset` bytes in (falls back to Own if it does
    /// not fit there).
    Share { id: usize, offset: usize },
}

#[derive(Clone, Debug)]
struct Buf {
    id: usize,
    dtype: i32,
    dims: Vec<i64>,
    /// The rank field; equals dims.len() unless dims are null or it is negative.
    rank: i64,
    dims_null: bool,
    data: Data,
    struct_size: usize,
}

#[derive(Clone, Debug)]
struct Entry {
    type_code: i32,
    /// None: a null pointer in the args/rets array.
    buf: Option<Buf>,
}

#[derive(Clone, Debug)]
enum Payload {
    Scalar { dtype: i32, bits: u64, value_null: bool, misalign: usize },
    Array { dtype: i32, len: usize, data_null: bool, words: Vec<u64>, misalign: usize },
    Str { bytes: Vec<u8>, null: bool },
    /// Dictionaries and unknown type codes: the payload is opaque storage.
    Opaque,
}

#[derive(Clone, Debug)]
struct AttrSpec {
    /// None: a null name pointer.
    name: Option<Vec<u8>>,
    type_code: i32,
    payload: Payload,
    payload_null: bool,
}

#[derive(Clone, Debug)]
struct ExtSpec {
    type_: i32,
    struct_size: usize,
    /// None: null metadata pointer; Some(struct_size).
    metadata: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum ApiKind {
    Fake,
    Null,
    NoStream,
    NoErrorReadback,
}

#[derive(Clone, Debug)]
struct FrameSpec {
    null_frame: bool,
    struct_size: usize,
    stage: i32,
    api: ApiKind,
    args: Vec<Entry>,
    rets: Vec<Entry>,
    attrs: Vec<AttrSpec>,
    list_struct_sizes: [usize; 3],
    /// Overrides of args.size / rets.size / attrs.size (never above the real array length).
    size_override: [Option<i64>; 3],
    /// Null types/pointer arrays with a positive size.
    null_arrays: [bool; 3],
    exts: Vec<ExtSpec>,
    ext_cycle: bool,
    next_id: usize,
    /// Written into argument 0 (hyper) and 1 (step) when they own enough memory; otherwise
    /// those hold random bits like every other buffer.
    hyper: Option<[f32; 5]>,
    step: Option<i32>,
}

// -------------------------------------------------------------------- well-formed base

fn scalar(name: &str, dtype: i32, bits: u64) -> AttrSpec {
    AttrSpec {
        name: Some(name.as_bytes().to_vec()),
        type_code: attr_type::SCALAR,
        payload: Payload::Scalar { dtype, bits, value_null: false, misalign: 0 },
        payload_null: false,
    }
}

fn string(name: &str, s: &[u8]) -> AttrSpec {
    AttrSpec {
        name: Some(name.as_bytes().to_vec()),
        type_code: attr_type::STRING,
        payload: Payload::Str { bytes: s.to_vec(), null: false },
        payload_null: false,
    }
}

fn array(name: &str, dtype: i32, words: Vec<u64>, len: usize) -> AttrSpec {
    AttrSpec {
        name: Some(name.as_bytes().to_vec()),
        type_code: attr_type::ARRAY,
        payload: Payload::Array { dtype, len, data_null: false, words, misalign: 0 },
        payload_null: false,
    }
}

/// Packs values of `dtype` (given as i64 or f64 bits) into 8-byte words, one value per
/// element at its natural width.
fn pack(dtype: i32, values: &[f64]) -> Vec<u64> {
    let size = elem_size(dtype);
    let mut bytes = vec![0u8; (values.len() * size).div_ceil(8).max(1) * 8];
    for (i, &v) in values.iter().enumerate() {
        let at = &mut bytes[i * size..(i + 1) * size];
        match dtype {
            dtype::F32 => at.copy_from_slice(&(v as f32).to_ne_bytes()),
            dtype::F64 => at.copy_from_slice(&v.to_ne_bytes()),
            dtype::S32 => at.copy_from_slice(&(v as i32).to_ne_bytes()),
            dtype::S64 => at.copy_from_slice(&(v as i64).to_ne_bytes()),
            dtype::U8 | dtype::PRED | dtype::S8 => at[0] = v as i64 as u8,
            _ => at.copy_from_slice(&(v as i64).to_ne_bytes()[..size]),
        }
    }
    bytes.chunks(8).map(|c| u64::from_ne_bytes(c.try_into().unwrap())).collect()
}

fn bool_attr(rng: &mut Rng, name: &str) -> AttrSpec {
    let v = rng.below(2);
    if rng.one_in(4) {
        scalar(name, dtype::S64, v)
    } else {
        scalar(name, dtype::PRED, v)
    }
}

fn float_attr(rng: &mut Rng, name: &str, v: f64) -> AttrSpec {
    if rng.one_in(3) {
        scalar(name, dtype::F32, (v as f32).to_bits() as u64)
    } else {
        scalar(name, dtype::F64, v.to_bits())
    }
}

impl FrameSpec {
    fn buf(&mut self, dtype: i32, dims: Vec<i64>) -> Buf {
        self.next_id += 1;
        Buf { id: self.next_id, dtype, rank: dims.len() as i64, dims, dims_null: false, data: Data::Own { misalign: 0 }, struct_size: 48 }
    }

    fn push_arg(&mut self, dtype: i32, dims: Vec<i64>) -> usize {
        let b = self.buf(dtype, dims);
        self.args.push(Entry { type_code: ARG_BUFFER, buf: Some(b) });
        self.args.len() - 1
    }

    fn push_ret(&mut self, dtype: i32, dims: Vec<i64>) -> usize {
        let b = self.buf(dtype, dims);
        self.rets.push(Entry { type_code: RET_BUFFER, buf: Some(b) });
        self.rets.len() - 1
    }

    /// A well-formed step call: random kind, leaves, dtypes, attribute encodings, donation.
    fn well_formed(rng: &mut Rng) -> FrameSpec {
        let mut f = FrameSpec {
            null_frame: false,
            struct_size: CALL_FRAME_STRUCT_SIZE,
            stage: STAGE_EXECUTE,
            api: ApiKind::Fake,
            args: Vec::new(),
            rets: Vec::new(),
            attrs: Vec::new(),
            list_struct_sizes: [40, 40, 48],
            size_override: [None; 3],
            null_arrays: [false; 3],
            exts: Vec::new(),
            ext_cycle: false,
            next_id: 0,
            hyper: (!rng.one_in(8)).then_some([0.02, 0.9, 0.9, 0.01, 0.2]),
            step: (!rng.one_in(8)).then(|| 1 + rng.below(20) as i32),
        };
        f.push_arg(dtype::F32, vec![5]);
        f.push_arg(dtype::S32, vec![]);
        let n_leaves = rng.pick(&[0, 1, 1, 2, 2, 3, 5]);
        let donate = rng.one_in(2);
        let mut rows_are_input = Vec::new();
        for _ in 0..n_leaves {
            let small = [0, 1, 1, 2, 3, 4, 5, 8, 9];
            let mut dims = vec![rng.pick(&[0, 1, 1, 2, 3]) as i64, rng.pick(&small) as i64, rng.pick(&small) as i64];
            if rng.one_in(40) {
                dims[1] = rng.pick(&[17, 33, 64]);
                dims[2] = rng.pick(&[16, 40, 64]);
            }
            let l = vec![dims[0]];
            let fd = |r: &mut Rng| r.pick(&[dtype::F32, dtype::F32, dtype::BF16, dtype::F16]);
            let (dp, dg, dm, dpg) = (fd(rng), fd(rng), fd(rng), fd(rng));
            let base = f.args.len();
            f.push_arg(dp, dims.clone());
            f.push_arg(dg, dims.clone());
            f.push_arg(dm, dims.clone());
            f.push_arg(dpg, dims.clone());
            f.push_arg(dtype::F32, l.clone());
            f.push_arg(dtype::F32, l.clone());
            f.push_arg(dtype::S32, l.clone());
            let rbase = f.rets.len();
            f.push_ret(dp, dims.clone());
            f.push_ret(dm, dims.clone());
            f.push_ret(dpg, dims.clone());
            f.push_ret(dtype::F32, l.clone());
            f.push_ret(dtype::F32, l.clone());
            f.push_ret(dtype::S32, l.clone());
            f.push_ret(dtype::F32, l.clone());
            if donate {
                for (r, a) in [(0, 0), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6)] {
                    let id = f.args[base + a].buf.as_ref().unwrap().id;
                    f.rets[rbase + r].buf.as_mut().unwrap().data = Data::Share { id, offset: 0 };
                }
            }
            rows_are_input.push(rng.below(2) as f64);
        }
        let kind: &[u8] = rng.pick(&[b"hidden".as_slice(), b"embed", b"vector"]);
        f.attrs.push(string("kind", kind));
        let steps = rng.pick(&[1usize, 2, 5, 7]);
        let coeffs: Vec<f64> = (0..steps).flat_map(|_| [3.4445, -4.7750, 2.0315]).collect();
        let cd = rng.pick(&[dtype::F32, dtype::F64]);
        f.attrs.push(array("ns_coeffs", cd, pack(cd, &coeffs), coeffs.len()));
        let k = rng.pick(&[1u64, 2, 3, 10]);
        f.attrs.push(if rng.one_in(3) { scalar("noise_every", dtype::S32, k) } else { scalar("noise_every", dtype::S64, k) });
        f.attrs.push(bool_attr(rng, "noise_adaptive"));
        let stat: &[u8] = rng.pick(&[b"max".as_slice(), b"mean", b"min"]);
        f.attrs.push(string("ratio_stat", stat));
        f.attrs.push(float_attr(rng, "ratio_eps", 1e-30));
        f.attrs.push(bool_attr(rng, "nesterov"));
        f.attrs.push(float_attr(rng, "vector_eps", 1e-8));
        if rng.one_in(3) {
            f.attrs.push(bool_attr(rng, "noise_relative"));
        }
        let rd = rng.pick(&[dtype::S64, dtype::S32, dtype::U8, dtype::S8, dtype::PRED]);
        f.attrs.push(array("rows_are_input", rd, pack(rd, &rows_are_input), rows_are_input.len()));
        if rng.one_in(2) {
            let names: Vec<String> = (0..n_leaves).map(|i| format!("blocks/{i}/w")).collect();
            f.attrs.push(string("leaf_names", names.join("\n").as_bytes()));
        }
        if rng.one_in(3) {
            f.attrs.push(bool_attr(rng, "noise_work"));
        }
        if rng.one_in(3) {
            let d: &[u8] = rng.pick(&[b"bfloat16".as_slice(), b"float32"]);
            f.attrs.push(string("ns_dtype", d));
        }
        if rng.one_in(2) {
            let e: &[u8] = rng.pick(&[b"auto".as_slice(), b"eigen", b"polar"]);
            f.attrs.push(string("noise_estimator", e));
        }
        f.attrs.sort_by(|a, b| a.name.cmp(&b.name));
        f
    }

    fn all_bufs_mut(&mut self) -> Vec<&mut Buf> {
        self.args.iter_mut().chain(self.rets.iter_mut()).filter_map(|e| e.buf.as_mut()).collect()
    }

    fn ids(&self) -> Vec<usize> {
        self.args.iter().chain(self.rets.iter()).filter_map(|e| e.buf.as_ref().map(|b| b.id)).collect()
    }
}

// ------------------------------------------------------------------------- mutations

fn random_dims(rng: &mut Rng) -> Vec<i64> {
    let rank = rng.pick(&[0, 1, 1, 2, 3, 3, 3, 4, 6]);
    (0..rank)
        .map(|_| if rng.one_in(3) { rng.interesting_i64() } else { rng.below(6) as i64 })
        .collect()
}

fn random_attr_name(rng: &mut Rng) -> Vec<u8> {
    const NAMES: [&str; 18] = [
        "kind", "ns_coeffs", "noise_every", "noise_adaptive", "ratio_stat", "ratio_eps", "nesterov", "vector_eps",
        "rows_are_input", "leaf_names", "noise_work", "ns_dtype", "noise_estimator", "noise_relative", "Kind", "kind ", "", "extra",
    ];
    match rng.below(4) {
        0 => rng.bytes(12),
        1 => {
            let mut n = rng.pick(&NAMES).as_bytes().to_vec();
            if !n.is_empty() {
                let i = rng.below(n.len() as u64) as usize;
                n[i] ^= 1 << rng.below(8);
            }
            n
        }
        _ => rng.pick(&NAMES).as_bytes().to_vec(),
    }
}

fn random_payload(rng: &mut Rng) -> (i32, Payload) {
    match rng.below(5) {
        0 => {
            let dtype = if rng.one_in(4) { rng.pick(&BAD_DTYPES) } else { rng.pick(&VALID_DTYPES) };
            let misalign = if rng.one_in(6) { rng.upto(7) } else { 0 };
            (attr_type::SCALAR, Payload::Scalar { dtype, bits: rng.next(), value_null: rng.one_in(8), misalign })
        }
        1 => {
            let dtype = if rng.one_in(4) { rng.pick(&BAD_DTYPES) } else { rng.pick(&VALID_DTYPES) };
            let len = match rng.below(6) {
                0 => 0,
                1 => rng.upto(70_000),
                _ => rng.upto(12),
            };
            let data_null = rng.one_in(8);
            let words = if data_null { Vec::new() } else { (0..len.max(1)).map(|_| random_word(rng)).collect() };
            // A null array may claim any length: the callee must not read it.
            let len = if data_null && rng.one_in(2) { rng.interesting_i64() as usize } else { len };
            let misalign = if rng.one_in(6) { rng.upto(7) } else { 0 };
            (attr_type::ARRAY, Payload::Array { dtype, len, data_null, words, misalign })
        }
        2 => {
            let bytes = match rng.below(4) {
                0 => rng.pick(&[b"hidden".as_slice(), b"max", b"float32", b"bfloat16", b"embed\n", b"eigen", b"polar"]).to_vec(),
                1 => vec![0xff, 0xfe, b'h', 0xc3],
                2 => rng.bytes(3000),
                _ => rng.bytes(10),
            };
            (attr_type::STRING, Payload::Str { bytes, null: rng.one_in(10) })
        }
        3 => (attr_type::DICTIONARY, Payload::Opaque),
        _ => (rng.pick(&[0, 5, -1, 99, i32::MIN]), Payload::Opaque),
    }
}

fn mutate(f: &mut FrameSpec, rng: &mut Rng) {
    match rng.below(24) {
        // ---- counts
        0 => {
            if !f.args.is_empty() {
                let i = rng.below(f.args.len() as u64) as usize;
                f.args.remove(i);
            }
        }
        1 => {
            if !f.rets.is_empty() {
                let i = rng.below(f.rets.len() as u64) as usize;
                f.rets.remove(i);
            }
        }
        2 => {
            let (dt, dims) = (rng.pick(&VALID_DTYPES), random_dims(rng));
            if rng.one_in(2) {
                f.push_arg(dt, dims);
            } else {
                f.push_ret(dt, dims);
            }
        }
        3 => {
            let n = rng.upto(f.args.len());
            f.args.truncate(n);
        }
        // ---- entries
        4 => {
            if let Some(e) = pick_entry(f, rng) {
                e.type_code = rng.pick(&[0, 2, 7, -1, i32::MAX]);
            }
        }
        5 => {
            if let Some(e) = pick_entry(f, rng) {
                e.buf = None;
            }
        }
        // ---- buffers
        6 => {
            if let Some(b) = pick_buf(f, rng) {
                b.dtype = if rng.one_in(2) { rng.pick(&BAD_DTYPES) } else { rng.pick(&VALID_DTYPES) };
            }
        }
        7 | 8 => {
            if let Some(b) = pick_buf(f, rng) {
                b.dims = random_dims(rng);
                b.rank = b.dims.len() as i64;
            }
        }
        9 => {
            if let Some(b) = pick_buf(f, rng) {
                // One dimension only: keeps the rest of the frame consistent.
                if !b.dims.is_empty() {
                    let i = rng.below(b.dims.len() as u64) as usize;
                    b.dims[i] = rng.interesting_i64();
                }
            }
        }
        10 => {
            if let Some(b) = pick_buf(f, rng) {
                if rng.one_in(2) {
                    b.dims_null = true;
                    b.rank = rng.pick(&[1, 3, 1 << 40]);
                } else {
                    b.rank = rng.pick(&[-1, -3, i64::MIN]);
                }
            }
        }
        11 => {
            if let Some(b) = pick_buf(f, rng) {
                b.data = match rng.below(3) {
                    0 => Data::Null,
                    _ => Data::Own { misalign: rng.pick(&[1, 2, 3, 4]) },
                };
            }
        }
        12 | 13 => {
            // Aliasing: a buffer placed inside another's allocation (donation-like, partial
            // overlap, read-read sharing, write-write sharing).
            let ids = f.ids();
            if !ids.is_empty() {
                let id = rng.pick(&ids);
                let offset = rng.pick(&[0, 0, 4, 8, 16]);
                if let Some(b) = pick_buf(f, rng) {
                    if b.id != id {
                        b.data = Data::Share { id, offset };
                    }
                }
            }
        }
        14 => {
            if let Some(b) = pick_buf(f, rng) {
                b.struct_size = rng.pick(&[0, 8, 47, 1 << 20]);
            }
        }
        // ---- frame header
        15 => f.struct_size = rng.pick(&[0, 8, 100, CALL_FRAME_STRUCT_SIZE - 1, CALL_FRAME_STRUCT_SIZE + 8]),
        16 => f.stage = rng.pick(&[0, 1, 2, 4, -1, 17, i32::MAX]),
        17 => {
            let i = rng.below(3) as usize;
            match rng.below(3) {
                0 => f.list_struct_sizes[i] = rng.pick(&[0, 1, 39, 1000]),
                1 => f.size_override[i] = Some(rng.pick(&[-1, -100, i64::MIN, 0])),
                _ => f.null_arrays[i] = true,
            }
        }
        18 => {
            for _ in 0..rng.upto(3) {
                let type_ = if rng.one_in(2) { EXTENSION_METADATA } else { rng.pick(&[0, 2, 7, -1]) };
                let metadata = if rng.one_in(4) { None } else { Some(rng.pick(&[0, 8, 35, 36, 40])) };
                f.exts.push(ExtSpec { type_, struct_size: rng.pick(&[0, 24, 31, 32, 64]), metadata });
            }
            f.ext_cycle = rng.one_in(4);
        }
        19 => f.api = rng.pick(&[ApiKind::Null, ApiKind::NoStream, ApiKind::NoErrorReadback]),
        // ---- attributes
        20 => {
            if !f.attrs.is_empty() {
                let i = rng.below(f.attrs.len() as u64) as usize;
                match rng.below(3) {
                    0 => {
                        f.attrs.remove(i);
                    }
                    1 => f.attrs[i].name = if rng.one_in(6) { None } else { Some(random_attr_name(rng)) },
                    _ => f.attrs[i].payload_null = true,
                }
            }
        }
        21 | 22 => {
            // Replace or add an attribute with a random payload (often under a known name).
            let (type_code, payload) = random_payload(rng);
            let spec = AttrSpec { name: Some(random_attr_name(rng)), type_code, payload, payload_null: false };
            if !f.attrs.is_empty() && rng.one_in(2) {
                let i = rng.below(f.attrs.len() as u64) as usize;
                let name = f.attrs[i].name.clone();
                f.attrs[i] = AttrSpec { name, ..spec };
            } else {
                f.attrs.push(spec);
            }
        }
        _ => {
            // Values the kernels see: hyperparameters and step.
            f.hyper = Some([rng.float(), rng.float(), rng.float(), rng.float(), rng.float()]);
            f.step = Some(rng.interesting_i32());
        }
    }
}

fn pick_entry<'a>(f: &'a mut FrameSpec, rng: &mut Rng) -> Option<&'a mut Entry> {
    let n = f.args.len() + f.rets.len();
    if n == 0 {
        return None;
    }
    let i = rng.below(n as u64) as usize;
    if i < f.args.len() {
        f.args.get_mut(i)
    } else {
        f.rets.get_mut(i - f.args.len())
    }
}

fn pick_buf<'a>(f: &'a mut FrameSpec, rng: &mut Rng) -> Option<&'a mut Buf> {
    let mut bufs = f.all_bufs_mut();
    if bufs.is_empty() {
        return None;
    }
    let i = rng.below(bufs.len() as u64) as usize;
    Some(bufs.swap_remove(i))
}

// ---------------------------------------------------------------------- materialization

/// Everything a raw frame points at; dropped after the call. (Boxes inside the vectors keep
/// each struct at a fixed address while later ones are pushed.)
#[allow(clippy::vec_box)]
struct Built {
    arena: Arena,
    frame: Box<XLA_FFI_CallFrame>,
    api: Option<Box<XLA_FFI_Api>>,
    _bufs: Vec<Box<XLA_FFI_Buffer>>,
    _dims: Vec<Vec<i64>>,
    _ptr_lists: Vec<Vec<*mut c_void>>,
    _type_lists: Vec<Vec<i32>>,
    _names: Vec<Box<XLA_FFI_ByteSpan>>,
    _name_ptrs: Vec<*mut XLA_FFI_ByteSpan>,
    _name_bytes: Vec<Vec<u8>>,
    _payloads: Vec<Box<[u64; 8]>>,
    _values: Vec<Box<[u64; 2]>>,
    _arrays: Vec<Vec<u64>>,
    _exts: Vec<Box<XLA_FFI_Metadata_Extension>>,
    _metas: Vec<Box<XLA_FFI_Metadata>>,
    /// (block, snapshot) of every argument block no result points into.
    inputs: Vec<(usize, Vec<u64>)>,
}

fn build(spec: &FrameSpec, rng: &mut Rng) -> Built {
    let mut arena = Arena::default();
    // Allocate every buffer that owns its memory; remember (block, capacity) per id.
    let mut block_of: BTreeMap<usize, usize> = BTreeMap::new();
    let all: Vec<&Buf> = spec.args.iter().chain(spec.rets.iter()).filter_map(|e| e.buf.as_ref()).collect();
    let need = |b: &Buf| -> Option<usize> {
        if b.dims_null || b.rank < 0 {
            return Some(0);
        }
        described_count(&b.dims).and_then(|n| n.checked_mul(elem_size(b.dtype)))
    };
    for b in &all {
        let bytes = need(b).filter(|&n| n <= MAX_ALLOC_BYTES).unwrap_or(0);
        block_of.insert(b.id, arena.alloc(bytes + 8, rng));
    }
    let mut ret_blocks = BTreeSet::new();
    let mut resolve = |b: &Buf, arena: &mut Arena, is_ret: bool| -> *mut c_void {
        let Some(bytes) = need(b) else {
            // A size that cannot exist: null, or a small live block the callee must not read.
            let blk = block_of[&b.id];
            return if matches!(b.data, Data::Null) { std::ptr::null_mut() } else { arena.ptr(blk, 0) };
        };
        if bytes > MAX_ALLOC_BYTES {
            return std::ptr::null_mut(); // too large to back with memory: only null is honest
        }
        let own = block_of[&b.id];
        let (blk, off) = match b.data {
            Data::Null => return std::ptr::null_mut(),
            Data::Own { misalign } => (own, misalign),
            Data::Share { id, offset } => match block_of.get(&id) {
                Some(&blk) if offset + bytes <= arena.usable[blk] => (blk, offset),
                _ => (own, 0),
            },
        };
        if is_ret {
            ret_blocks.insert(blk);
        }
        arena.ptr(blk, off)
    };

    let mut bufs: Vec<Box<XLA_FFI_Buffer>> = Vec::new();
    let mut dims_store: Vec<Vec<i64>> = Vec::new();
    let mut lists: Vec<Vec<*mut c_void>> = Vec::new();
    let mut types: Vec<Vec<i32>> = Vec::new();
    let mut arg_blocks = BTreeSet::new();
    for (k, entries) in [&spec.args, &spec.rets].into_iter().enumerate() {
        let mut ptrs = Vec::new();
        let mut tys = Vec::new();
        for e in entries {
            tys.push(e.type_code);
            let Some(b) = &e.buf else {
                ptrs.push(std::ptr::null_mut());
                continue;
            };
            let data = resolve(b, &mut arena, k == 1);
            if k == 0 {
                if let Data::Own { .. } = b.data {
                    arg_blocks.insert(block_of[&b.id]);
                }
            }
            let mut dims = b.dims.clone();
            let dims_ptr = if b.dims_null { std::ptr::null_mut() } else { dims.as_mut_ptr() };
            dims_store.push(dims);
            let mut raw = Box::new(XLA_FFI_Buffer {
                struct_size: b.struct_size,
                extension_start: std::ptr::null_mut(),
                dtype: b.dtype,
                data,
                rank: b.rank,
                dims: dims_ptr,
            });
            ptrs.push(&mut *raw as *mut XLA_FFI_Buffer as *mut c_void);
            bufs.push(raw);
        }
        lists.push(ptrs);
        types.push(tys);
    }

    // Attributes.
    let mut names: Vec<Box<XLA_FFI_ByteSpan>> = Vec::new();
    let mut name_ptrs: Vec<*mut XLA_FFI_ByteSpan> = Vec::new();
    let mut name_bytes: Vec<Vec<u8>> = Vec::new();
    let mut payloads: Vec<Box<[u64; 8]>> = Vec::new();
    let mut values: Vec<Box<[u64; 2]>> = Vec::new();
    let mut arrays: Vec<Vec<u64>> = Vec::new();
    let mut attr_ptrs: Vec<*mut c_void> = Vec::new();
    let mut attr_types: Vec<i32> = Vec::new();
    for a in &spec.attrs {
        match &a.name {
            Some(n) => {
                let bytes = n.clone();
                let mut span = Box::new(XLA_FFI_ByteSpan { ptr: bytes.as_ptr() as *const c_char, len: bytes.len() });
                name_ptrs.push(&mut *span);
                names.push(span);
                name_bytes.push(bytes);
            }
            None => name_ptrs.push(std::ptr::null_mut()),
        }
        attr_types.push(a.type_code);
        let mut store = Box::new([0u64; 8]);
        let p = store.as_mut_ptr() as *mut c_void;
        // SAFETY (harness): `store` is 64 bytes, 8-aligned: room for any payload struct.
        unsafe {
            match &a.payload {
                Payload::Scalar { dtype, bits, value_null, misalign } => {
                    // 16 bytes: an 8-byte value fits at any misalignment up to 7.
                    let mut v = Box::new([*bits, *bits]);
                    let at = (v.as_mut_ptr() as *mut u8).add(*misalign) as *mut c_void;
                    let value = if *value_null { std::ptr::null_mut() } else { at };
                    *(p as *mut XLA_FFI_Scalar) = XLA_FFI_Scalar { dtype: *dtype, value };
                    values.push(v);
                }
                Payload::Array { dtype, len, data_null, words, misalign } => {
                    let mut w = words.clone();
                    w.push(0); // room for the misalignment
                    let at = (w.as_mut_ptr() as *mut u8).add(*misalign) as *mut c_void;
                    let data = if *data_null { std::ptr::null_mut() } else { at };
                    // Non-null data always backs `len` elements of the dtype.
                    let len = if *data_null { *len } else { (*len).min((w.len() - 1) * 8 / elem_size(*dtype)) };
                    *(p as *mut XLA_FFI_Array) = XLA_FFI_Array { dtype: *dtype, size: len, data };
                    arrays.push(w);
                }
                Payload::Str { bytes, null } => {
                    let b = bytes.clone();
                    let span = if *null {
                        XLA_FFI_ByteSpan { ptr: std::ptr::null(), len: b.len().max(1) }
                    } else {
                        XLA_FFI_ByteSpan { ptr: b.as_ptr() as *const c_char, len: b.len() }
                    };
                    *(p as *mut XLA_FFI_ByteSpan) = span;
                    name_bytes.push(b);
                }
                Payload::Opaque => {}
            }
        }
        attr_ptrs.push(if a.payload_null { std::ptr::null_mut() } else { p });
        payloads.push(store);
    }

    // Extensions (each node a whole metadata extension, whatever its type says).
    let mut exts: Vec<Box<XLA_FFI_Metadata_Extension>> = Vec::new();
    let mut metas: Vec<Box<XLA_FFI_Metadata>> = Vec::new();
    for e in &spec.exts {
        let meta_ptr = match e.metadata {
            Some(size) => {
                let mut m = Box::new(XLA_FFI_Metadata {
                    struct_size: size,
                    api_version: XLA_FFI_Api_Version { struct_size: 24, extension_start: std::ptr::null_mut(), major_version: 0, minor_version: 0 },
                    traits: 0,
                    state_type_id: 0,
                });
                let p: *mut XLA_FFI_Metadata = &mut *m;
                metas.push(m);
                p
            }
            None => std::ptr::null_mut(),
        };
        exts.push(Box::new(XLA_FFI_Metadata_Extension {
            extension_base: XLA_FFI_Extension_Base { struct_size: e.struct_size, type_: e.type_, next: std::ptr::null_mut() },
            metadata: meta_ptr,
        }));
    }
    for i in 1..exts.len() {
        let next: *mut XLA_FFI_Extension_Base = &mut exts[i].extension_base;
        exts[i - 1].extension_base.next = next;
    }
    if spec.ext_cycle && !exts.is_empty() {
        let first: *mut XLA_FFI_Extension_Base = &mut exts[0].extension_base;
        exts.last_mut().unwrap().extension_base.next = first;
    }
    let ext_start = exts.first_mut().map_or(std::ptr::null_mut(), |e| &mut e.extension_base as *mut _);

    let api = match spec.api {
        ApiKind::Null => None,
        kind => {
            let mut a = fake_api();
            if kind == ApiKind::NoStream {
                a.stream_get = None;
            }
            if kind == ApiKind::NoErrorReadback {
                a.error_get_message = None;
                a.error_destroy = None; // the fake's errors then leak: harmless in a test
            }
            Some(a)
        }
    };
    let api_ptr = api.as_ref().map_or(std::ptr::null(), |a| &**a as *const XLA_FFI_Api);

    let size = |k: usize, len: usize| spec.size_override[k].unwrap_or(len as i64);
    let arr = |k: usize, p: *mut c_void| if spec.null_arrays[k] { std::ptr::null_mut() } else { p };
    let (n_args, n_rets, n_attrs) = (lists[0].len(), lists[1].len(), attr_ptrs.len());
    let frame = Box::new(XLA_FFI_CallFrame {
        struct_size: spec.struct_size,
        extension_start: ext_start,
        api: api_ptr,
        ctx: std::ptr::null_mut(),
        stage: spec.stage,
        args: XLA_FFI_Args {
            struct_size: spec.list_struct_sizes[0],
            extension_start: std::ptr::null_mut(),
            size: if spec.null_arrays[0] { n_args.max(1) as i64 } else { size(0, n_args) },
            types: arr(0, types[0].as_mut_ptr() as *mut c_void) as *mut i32,
            args: arr(0, lists[0].as_mut_ptr() as *mut c_void) as *mut *mut c_void,
        },
        rets: XLA_FFI_Rets {
            struct_size: spec.list_struct_sizes[1],
            extension_start: std::ptr::null_mut(),
            size: if spec.null_arrays[1] { n_rets.max(1) as i64 } else { size(1, n_rets) },
            types: arr(1, types[1].as_mut_ptr() as *mut c_void) as *mut i32,
            rets: arr(1, lists[1].as_mut_ptr() as *mut c_void) as *mut *mut c_void,
        },
        attrs: XLA_FFI_Attrs {
            struct_size: spec.list_struct_sizes[2],
            extension_start: std::ptr::null_mut(),
            size: if spec.null_arrays[2] { n_attrs.max(1) as i64 } else { size(2, n_attrs) },
            types: arr(2, attr_types.as_mut_ptr() as *mut c_void) as *mut i32,
            names: arr(2, name_ptrs.as_mut_ptr() as *mut c_void) as *mut *mut XLA_FFI_ByteSpan,
            attrs: arr(2, attr_ptrs.as_mut_ptr() as *mut c_void) as *mut *mut c_void,
        },
        future: std::ptr::null_mut(),
    });
    // The hyperparameters and the step, where their buffers own enough memory.
    let own_block = |i: usize| match spec.args.get(i).and_then(|e| e.buf.as_ref()) {
        Some(b) if b.data == (Data::Own { misalign: 0 }) => Some(block_of[&b.id]),
        _ => None,
    };
    if let (Some(h), Some(blk)) = (spec.hyper, own_block(0)) {
        for (i, w) in arena.blocks[blk].iter_mut().take(arena.usable[blk] / 8).take(3).enumerate() {
            let lo = h.get(2 * i).copied().unwrap_or(0.0).to_bits() as u64;
            let hi = h.get(2 * i + 1).copied().unwrap_or(0.0).to_bits() as u64;
            *w = lo | (hi << 32);
        }
    }
    if let (Some(t), Some(blk)) = (spec.step, own_block(1)) {
        arena.blocks[blk][0] = t as u32 as u64;
        // Half the time every leaf's prev_step says G_prev is from step t - 1, so noise steps
        // run the noise estimate.
        if rng.one_in(2) {
            let prev = t.wrapping_sub(1) as u32 as u64;
            for i in (GROUP_ARGS + 6..spec.args.len()).step_by(7) {
                if let Some(pb) = own_block(i) {
                    let words = arena.usable[pb] / 8;
                    arena.blocks[pb][..words].fill(prev | (prev << 32));
                }
            }
        }
    }
    let inputs = arg_blocks.difference(&ret_blocks).map(|&b| (b, arena.blocks[b].clone())).collect();
    let mut ptr_lists = lists;
    ptr_lists.push(attr_ptrs);
    types.push(attr_types);
    Built {
        arena,
        frame,
        api,
        _bufs: bufs,
        _dims: dims_store,
        _ptr_lists: ptr_lists,
        _type_lists: types,
        _names: names,
        _name_ptrs: name_ptrs,
        _name_bytes: name_bytes,
        _payloads: payloads,
        _values: values,
        _arrays: arrays,
        _exts: exts,
        _metas: metas,
        inputs,
    }
}

// ------------------------------------------------------------------------------ targets

type Handler = unsafe extern "C" fn(*mut XLA_FFI_CallFrame) -> *mut XLA_FFI_Error;

/// The CUDA handlers' decode and launch planning (pure host code), as a handler.
fn plan_probe(frame: *mut XLA_FFI_CallFrame, name: &str, in_place: bool) -> *mut XLA_FFI_Error {
    // SAFETY (harness): the frame was built by `build` and outlives the call.
    unsafe {
        dispatch(frame, name, 0, |c| {
            let layout = decode_layout(c, in_place)?;
            let opts: CudaOptions = decode_cuda_options(c)?;
            check_cuda_limits(&layout)?;
            let plan = Plan::new(&layout, opts, 0x7000_0000).map_err(FfiError::invalid)?;
            for track in [false, true] {
                batches(&plan.leaves, track).map_err(FfiError::invalid)?;
            }
            Ok(())
        })
    }
}
unsafe extern "C" fn cuda_plan_update(frame: *mut XLA_FFI_CallFrame) -> *mut XLA_FFI_Error {
    plan_probe(frame, "cuda_plan_update", false)
}
unsafe extern "C" fn cuda_plan_inplace(frame: *mut XLA_FFI_CallFrame) -> *mut XLA_FFI_Error {
    plan_probe(frame, "cuda_plan_inplace", true)
}

const TARGETS: [(&str, Handler); 6] = [
    ("lanton_step_update_cpu", lanton_step_update_cpu),
    ("lanton_step_inplace_cpu", lanton_step_inplace_cpu),
    ("lanton_step_update_cuda", lanton_step_update_cuda),
    ("lanton_step_inplace_cuda", lanton_step_inplace_cuda),
    ("cuda_plan_update", cuda_plan_update),
    ("cuda_plan_inplace", cuda_plan_inplace),
];

// ---------------------------------------------------------------------------- the stats

#[derive(Default)]
struct Stats {
    executions: u64,
    successes: u64,
    unreported: u64,
    failures: Vec<String>,
    messages: BTreeSet<String>,
    by_target: BTreeMap<&'static str, (u64, u64)>,
}

impl Stats {
    fn fail(&mut self, seed: u64, case: u64, what: String) {
        if self.failures.len() < 200 {
            // At once and uncaptured: a crash later in the run must not hide it.
            say(&format!("fuzz_frames: FAILURE case {case}: {what}"));
        }
        if self.failures.len() < 20 {
            self.failures.push(format!(
                "case {case} [LANTON_FUZZ_SEED={seed:#x} LANTON_FUZZ_CASE={case}]: {what}"
            ));
        } else {
            self.failures.push(String::new());
        }
    }
    fn reject(&mut self, msg: &str) {
        self.messages.insert(normalize(msg));
    }
}

/// Collapses the variable parts of a message (numbers, pointers, quoted values, the list of
/// attributes given) so that distinct messages mean distinct rejections.
fn normalize(msg: &str) -> String {
    let msg = match msg.find("(attributes given:") {
        Some(i) => &msg[..i],
        None => msg,
    };
    let mut out = String::new();
    let mut chars = msg.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '0' && chars.peek() == Some(&'x') {
            chars.next();
            while chars.peek().is_some_and(|c| c.is_ascii_hexdigit()) {
                chars.next();
            }
            out.push('P');
        } else if c.is_ascii_digit() || (c == '-' && chars.peek().is_some_and(|d| d.is_ascii_digit())) {
            while chars.peek().is_some_and(|c| c.is_ascii_digit() || *c == '.' || *c == 'e') {
                chars.next();
            }
            out.push('N');
        } else if c == '\'' || c == '"' {
            let rest: String = chars.clone().collect();
            let close = rest.find(c).unwrap_or(rest.len());
            let inner = &rest[..close];
            let plain = !inner.is_empty() && inner.len() <= 24 && inner.chars().all(|d| d.is_ascii_lowercase() || d == '_');
            // A quoted value of random bytes may hold the quote itself: it runs to the last one.
            let end = if plain { close } else { rest.rfind(c).unwrap_or(rest.len()) };
            let skip = rest[..end].chars().count() + usize::from(end < rest.len());
            for _ in 0..skip {
                chars.next();
            }
            out.push(c);
            out.push_str(if plain { inner } else { "…" });
            out.push(c);
        } else {
            out.push(c);
        }
    }
    out
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => {
            let v = v.trim();
            let parsed = match v.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16),
                None => v.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("{name}={v:?} is not an integer"))
        }
        Err(_) => default,
    }
}

/// Writes straight to the process's stderr, past the test harness's capture: visible even if
/// the process dies in the next call.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

// --------------------------------------------------------------------------- XLA frames

fn run_frame_case(stats: &mut Stats, seed: u64, case: u64) {
    let mut rng = Rng::new(case_seed(seed, case));
    let mut spec = FrameSpec::well_formed(&mut rng);
    let mutations = match rng.below(8) {
        0 | 1 => 0,
        2..=4 => 1,
        5 | 6 => 2,
        _ => 2 + rng.upto(6),
    };
    for _ in 0..mutations {
        mutate(&mut spec, &mut rng);
    }
    spec.null_frame = rng.one_in(300);
    if std::env::var("LANTON_FUZZ_DUMP").is_ok_and(|v| v == "1") {
        say(&format!("{spec:#?}"));
    }
    // Run the same description against every target (each gets freshly built memory).
    for (name, handler) in TARGETS {
        let mut built = build(&spec, &mut Rng::new(case_seed(seed, case) ^ 0x55));
        let frame_ptr: *mut XLA_FFI_CallFrame = if spec.null_frame { std::ptr::null_mut() } else { &mut *built.frame };
        // SAFETY (harness): `built` owns every byte the frame points at, for the whole call.
        let err = unsafe { handler(frame_ptr) };
        stats.executions += 1;
        let counts = stats.by_target.entry(name).or_default();
        counts.0 += 1;
        let can_report = !spec.null_frame && built.api.is_some();
        let label = format!("{name} ({} mutations)", mutations);
        if err.is_null() {
            if can_report {
                stats.successes += 1;
                counts.1 += 1;
            } else {
                stats.unreported += 1;
            }
        } else if !can_report {
            stats.fail(seed, case, format!("{label}: returned an error without an api table to create it"));
        } else {
            let e = take_error(err).unwrap();
            let rest = e.message.strip_prefix(&format!("{name}: ")).map(str::trim).unwrap_or("");
            if rest.is_empty() {
                stats.fail(seed, case, format!("{label}: unnamed or empty error message {:?}", e.message));
            } else if e.message.contains(PANIC_MESSAGE) {
                stats.fail(seed, case, format!("{label}: panic caught by the firewall: {}", e.message));
            } else if ![errc::INVALID_ARGUMENT, errc::FAILED_PRECONDITION, errc::UNIMPLEMENTED, errc::INTERNAL].contains(&e.code) {
                stats.fail(seed, case, format!("{label}: unexpected error code {}: {}", e.code, e.message));
            } else {
                stats.reject(rest);
            }
        }
        if let Some(b) = built.arena.guards_intact() {
            stats.fail(seed, case, format!("{label}: wrote past the end of buffer block {b}"));
        }
        for (b, before) in &built.inputs {
            if &built.arena.blocks[*b] != before {
                stats.fail(seed, case, format!("{label}: modified input block {b}, which no result shares"));
            }
        }
    }
}

// ------------------------------------------------------------------------------- C ABI

fn random_json(rng: &mut Rng, depth: u32) -> String {
    let leaf = depth == 0 || rng.one_in(3);
    match if leaf { rng.below(5) } else { 5 + rng.below(2) } {
        0 => rng.pick(&["null", "true", "false"]).to_string(),
        1 => rng.pick(&["0", "-0", "1", "-1", "1.5", "1e308", "-1e308", "1e-320", "4294967295", "4294967296", "18446744073709551616", "1e400", "3.0"]).to_string(),
        2 => format!("{}", rng.float()).replace("NaN", "0").replace("inf", "1e999"),
        3 => rng.pick(&["\"hidden\"", "\"embed\"", "\"vector\"", "\"max\"", "\"mean\"", "\"min\"", "\"\"", "\"\\u0000\"", "\"\\ud800\"", "\"é\\n\\\"\""]).to_string(),
        4 => format!("\"{}\"", rng.bytes(8).iter().map(|b| (b'a' + b % 26) as char).collect::<String>()),
        5 => {
            let items: Vec<String> = (0..rng.upto(4)).map(|_| random_json(rng, depth - 1)).collect();
            format!("[{}]", items.join(","))
        }
        _ => {
            let items: Vec<String> = (0..rng.upto(4)).map(|_| format!("{}:{}", random_key(rng), random_json(rng, depth - 1))).collect();
            format!("{{{}}}", items.join(","))
        }
    }
}

fn random_key(rng: &mut Rng) -> String {
    let k = rng.pick(&[
        "kind", "ns_coeffs", "noise_every", "noise_adaptive", "ratio_stat", "ratio_eps", "nesterov", "vector_eps", "noise_evry", "",
        "KIND", "kind\\u0000",
    ]);
    format!("\"{k}\"")
}

fn config_value(rng: &mut Rng, key: &str) -> String {
    if rng.one_in(5) {
        return random_json(rng, 2);
    }
    match key {
        "kind" => rng.pick(&["\"hidden\"", "\"embed\"", "\"vector\"", "\"conv\"", "1", "null"]).to_string(),
        "ns_coeffs" => {
            let n = match rng.below(8) {
                0 => 0,
                1 => rng.upto(300),
                _ => 1 + rng.upto(6),
            };
            let triple = |r: &mut Rng| match r.below(10) {
                0 => "[1, 2]".to_string(),
                1 => "[1, \"a\", 2, 3]".to_string(),
                2 => "[\"x\", 1, 2, 3]".to_string(),
                3 => "5".to_string(),
                4 => format!("[{}, {}, {}]", r.pick(&["1e308", "-1e308", "0"]), r.float(), r.float()),
                _ => "[3.4445, -4.7750, 2.0315]".to_string(),
            };
            format!("[{}]", (0..n).map(|_| triple(rng)).collect::<Vec<_>>().join(","))
        }
        "noise_every" => rng.pick(&["1", "2", "10", "0", "-1", "1.5", "4294967295", "4294967296", "1e20", "\"3\"", "true"]).to_string(),
        "noise_adaptive" | "nesterov" => rng.pick(&["true", "false", "0", "1", "\"true\"", "null"]).to_string(),
        "ratio_stat" => rng.pick(&["\"max\"", "\"mean\"", "\"min\"", "\"median\"", "[]", "3"]).to_string(),
        _ => rng.pick(&["1e-30", "1e-8", "0", "-0.0", "-1", "1e300", "1e-320", "\"eps\"", "1e39"]).to_string(),
    }
}

/// Bytes of a configuration (no NUL inside; the caller appends the terminator).
fn random_config(rng: &mut Rng) -> Vec<u8> {
    let text = match rng.below(10) {
        0..=4 => {
            let keys = ["kind", "ns_coeffs", "noise_every", "noise_adaptive", "ratio_stat", "ratio_eps", "nesterov", "vector_eps"];
            let mut parts = Vec::new();
            for k in keys {
                if k == "kind" && !rng.one_in(10) || rng.one_in(3) {
                    parts.push(format!("\"{k}\": {}", config_value(rng, k)));
                }
            }
            if rng.one_in(8) {
                parts.push(format!("{}: {}", random_key(rng), random_json(rng, 2)));
            }
            format!("{{{}}}", parts.join(", "))
        }
        5 | 6 => random_json(rng, 4),
        7 => "[".repeat(rng.upto(300)) + &"]".repeat(rng.upto(300)),
        8 => {
            let mut b = VALID_CONFIG.as_bytes().to_vec();
            for _ in 0..1 + rng.upto(3) {
                if b.is_empty() {
                    break;
                }
                let i = rng.below(b.len() as u64) as usize;
                match rng.below(3) {
                    0 => b[i] = rng.next() as u8,
                    1 => b.truncate(i),
                    _ => {
                        b.remove(i);
                    }
                }
            }
            return b.into_iter().map(|c| if c == 0 { b'?' } else { c }).collect();
        }
        _ => return rng.bytes(40).into_iter().map(|c| c.max(1)).collect(),
    };
    text.into_bytes()
}

const VALID_CONFIG: &str = r#"{"kind": "hidden", "noise_every": 2, "ratio_stat": "mean", "ns_coeffs": [[3.4445, -4.775, 2.0315]]}"#;

fn run_c_abi_case(stats: &mut Stats, seed: u64, case: u64) {
    let mut rng = Rng::new(case_seed(seed, case) ^ 0xC0FFEE);
    let mut arena = Arena::default();

    // Version queries.
    let v = unsafe { CStr::from_ptr(lanton_version()) };
    stats.executions += 2;
    if v.to_str() != Ok(env!("CARGO_PKG_VERSION")) || lanton_abi_version() != LANTON_ABI_VERSION {
        stats.fail(seed, case, "version queries disagree with the crate".into());
    }

    // Config, hyperparameters, step.
    let config = random_config(&mut rng);
    let mut config_z = config.clone();
    config_z.push(0);
    let config_ptr = if rng.one_in(40) { std::ptr::null() } else { config_z.as_ptr() as *const c_char };
    let hyper: Vec<f32> = if rng.one_in(2) {
        vec![0.02, 0.9, 0.9, 0.0, 0.2]
    } else {
        (0..5).map(|_| rng.float()).collect()
    };
    let hyper_ptr = if rng.one_in(40) { std::ptr::null() } else { hyper.as_ptr() };
    let step = if rng.one_in(4) { rng.interesting_i32() } else { 1 + rng.below(12) as i32 };

    // Leaves.
    let n = rng.pick(&[0usize, 1, 1, 2, 3]);
    let mut descs: Vec<LantonLeafF32> = Vec::new();
    let mut const_blocks = Vec::new();
    for _ in 0..n {
        let shape_kind = rng.below(10);
        let (layers, rows, cols) = match shape_kind {
            0 => (rng.interesting_i64() as usize, rng.interesting_i64() as usize, rng.interesting_i64() as usize),
            1 => (0, rng.pick(&[1usize << 20, 1 << 31, 1 << 33, usize::MAX]), rng.pick(&[1usize << 20, 1 << 31, 3])),
            2 => (rng.pick(&[1usize << 40, usize::MAX]), 0, rng.upto(4)),
            _ => (rng.upto(3), rng.upto(9), rng.upto(9)),
        };
        let total = layers.checked_mul(rows).and_then(|x| x.checked_mul(cols));
        // Backed only when the stated sizes fit in a real allocation; otherwise pointers are
        // null, or (for sizes no memory can have, or zero-length arrays) small live blocks.
        let backed = |count: Option<usize>| count.is_some_and(|c| c <= MAX_ALLOC_BYTES / 4);
        let field = |count: Option<usize>, rng: &mut Rng, arena: &mut Arena| -> *mut c_void {
            if rng.one_in(15) {
                return std::ptr::null_mut();
            }
            match count {
                Some(c) if backed(Some(c)) => {
                    let b = arena.alloc(c * 4, rng);
                    arena.ptr(b, 0)
                }
                Some(_) => std::ptr::null_mut(),
                None => {
                    let b = arena.alloc(8, rng);
                    arena.ptr(b, 0)
                }
            }
        };
        let elems = total;
        let per_layer = Some(layers);
        let param = field(elems, &mut rng, &mut arena);
        let grad = field(elems, &mut rng, &mut arena);
        if !grad.is_null() {
            const_blocks.push(arena.blocks.len() - 1);
        }
        let desc = LantonLeafF32 {
            layers,
            rows,
            cols,
            rows_are_input: rng.next() as u8,
            param: param as *mut f32,
            grad: grad as *const f32,
            momentum: field(elems, &mut rng, &mut arena) as *mut f32,
            prev_grad: field(elems, &mut rng, &mut arena) as *mut f32,
            noise: field(per_layer, &mut rng, &mut arena) as *mut f32,
            valid: field(per_layer, &mut rng, &mut arena) as *mut f32,
            prev_step: field(per_layer, &mut rng, &mut arena) as *mut i32,
            ratio: field(per_layer, &mut rng, &mut arena) as *mut f32,
        };
        descs.push(desc);
    }
    let (leaves_ptr, n_leaves) = match rng.below(30) {
        0 => (std::ptr::null(), rng.pick(&[0usize, 1, 3])),
        _ => (if descs.is_empty() { std::ptr::null() } else { descs.as_ptr() }, descs.len()),
    };
    let grads_before: Vec<(usize, Vec<u64>)> = const_blocks.iter().map(|&b| (b, arena.blocks[b].clone())).collect();

    // The error buffer: null, empty, tiny or roomy, with a guard behind it.
    let err_len = rng.pick(&[0usize, 0, 1, 2, 7, 64, 512, 512, 512]);
    let mut err_buf = vec![0x5Au8; err_len + 16];
    let err_ptr = if rng.one_in(15) { std::ptr::null_mut() } else { err_buf.as_mut_ptr() as *mut c_char };

    // SAFETY (harness): every pointer is null or live for the sizes it is described with;
    // buffers are distinct allocations.
    let rc = unsafe { lanton_step_host_f32(config_ptr, hyper_ptr, step, leaves_ptr, n_leaves, err_ptr, err_len) };
    stats.executions += 1;
    check_c_result(stats, seed, case, "lanton_step_host_f32", rc, &[LANTON_OK, LANTON_ERR_INVALID, LANTON_ERR_ENV], &err_buf, err_ptr.is_null(), err_len);
    if let Some(b) = arena.guards_intact() {
        stats.fail(seed, case, format!("lanton_step_host_f32: wrote past the end of leaf block {b}"));
    }
    for (b, before) in &grads_before {
        if &arena.blocks[*b] != before {
            stats.fail(seed, case, "lanton_step_host_f32: modified a gradient (const input)".into());
        }
    }

    // The environment check, with every kind of error buffer.
    let err_len = rng.pick(&[0usize, 1, 2, 5, 300]);
    let mut err_buf = vec![0x5Au8; err_len + 16];
    let err_ptr = if rng.one_in(8) { std::ptr::null_mut() } else { err_buf.as_mut_ptr() as *mut c_char };
    // SAFETY (harness): `err_buf` holds err_len (+16) bytes.
    let rc = unsafe { lanton_check_env(err_ptr, err_len) };
    stats.executions += 1;
    check_c_result(stats, seed, case, "lanton_check_env", rc, &[LANTON_OK, LANTON_ERR_ENV], &err_buf, err_ptr.is_null(), err_len);

    // The CUDA scratch size of a random plan (its own stream: the calls above are unchanged).
    let mut rng = Rng::new(case_seed(seed, case) ^ 0x5C2A7C4);
    let plan = random_scratch_plan(&mut rng);
    let plan_ptr = if rng.one_in(40) { std::ptr::null() } else { plan.as_ptr() as *const c_char };
    let mut bytes = 0u64;
    let bytes_ptr: *mut u64 = if rng.one_in(40) { std::ptr::null_mut() } else { &mut bytes };
    let err_len = rng.pick(&[0usize, 1, 2, 7, 512, 512]);
    let mut err_buf = vec![0x5Au8; err_len + 16];
    let err_ptr = if rng.one_in(15) { std::ptr::null_mut() } else { err_buf.as_mut_ptr() as *mut c_char };
    // SAFETY (harness): `plan` is NUL-terminated, `bytes` a live u64, `err_buf` err_len (+16) bytes.
    let rc = unsafe { lanton_cuda_scratch_bytes(plan_ptr, bytes_ptr, err_ptr, err_len) };
    stats.executions += 1;
    check_c_result(stats, seed, case, "lanton_cuda_scratch_bytes", rc, &[LANTON_OK, LANTON_ERR_INVALID], &err_buf, err_ptr.is_null(), err_len);
    if rc == LANTON_OK && bytes < 256 {
        stats.fail(seed, case, format!("lanton_cuda_scratch_bytes: {bytes} bytes (the accumulators alone take 256)"));
    }
}

/// A NUL-terminated plan for `lanton_cuda_scratch_bytes`: mostly well-formed groups with
/// hostile sizes, else arbitrary JSON.
fn random_scratch_plan(rng: &mut Rng) -> Vec<u8> {
    let mut text = if rng.one_in(5) {
        random_json(rng, 3)
    } else {
        let dim = |r: &mut Rng| match r.below(6) {
            0 => r.interesting_i64().to_string(),
            1 => r.pick(&["4294967296", "18446744073709551615", "18446744073709551616", "1e3", "-0", "2.5", "null", "\"3\""]).to_string(),
            _ => r.upto(9).to_string(),
        };
        let leaves: Vec<String> = (0..rng.upto(4))
            .map(|_| match rng.below(12) {
                0 => format!("[{}, {}]", dim(rng), dim(rng)),
                1 => random_json(rng, 1),
                _ => format!("[{}, {}, {}]", dim(rng), dim(rng), dim(rng)),
            })
            .collect();
        let mut parts = vec![format!("\"leaves\": [{}]", leaves.join(", "))];
        if !rng.one_in(10) {
            parts.push(format!("\"kind\": {}", rng.pick(&["\"hidden\"", "\"embed\"", "\"vector\"", "\"conv\"", "1"])));
        }
        for k in ["noise_adaptive", "noise_work"] {
            if rng.one_in(2) {
                parts.push(format!("\"{k}\": {}", rng.pick(&["true", "false", "0", "null"])));
            }
        }
        if rng.one_in(2) {
            parts.push(format!("\"ns_dtype\": {}", rng.pick(&["\"bfloat16\"", "\"float32\"", "\"float16\"", "3"])));
        }
        if rng.one_in(10) {
            parts.push(format!("{}: 1", random_key(rng)));
        }
        format!("{{{}}}", parts.join(", "))
    }
    .into_bytes();
    text.retain(|&c| c != 0);
    text.push(0);
    text
}

#[allow(clippy::too_many_arguments)]
fn check_c_result(stats: &mut Stats, seed: u64, case: u64, name: &str, rc: i32, allowed: &[i32], buf: &[u8], null: bool, len: usize) {
    if !allowed.contains(&rc) {
        let end = buf[..len].iter().position(|&b| b == 0).unwrap_or(len);
        let msg = String::from_utf8_lossy(&buf[..end]).into_owned();
        stats.fail(seed, case, format!("{name}: return code {rc} (message {msg:?})"));
        return;
    }
    if buf[len..].iter().any(|&b| b != 0x5A) {
        stats.fail(seed, case, format!("{name}: wrote past err_len = {len}"));
    }
    if null {
        return;
    }
    if rc == LANTON_OK {
        if buf[..len].iter().any(|&b| b != 0x5A) {
            stats.fail(seed, case, format!("{name}: wrote an error message but returned LANTON_OK"));
        }
        return;
    }
    if len == 0 {
        return;
    }
    let Some(end) = buf[..len].iter().position(|&b| b == 0) else {
        stats.fail(seed, case, format!("{name}: error message not NUL-terminated within err_len = {len}"));
        return;
    };
    let msg = String::from_utf8_lossy(&buf[..end]);
    if len >= 2 && msg.trim().is_empty() {
        stats.fail(seed, case, format!("{name}: empty error message (code {rc})"));
    } else if msg.contains(PANIC_MESSAGE) {
        stats.fail(seed, case, format!("{name}: panic caught by the firewall: {msg}"));
    } else if len >= 512 {
        stats.reject(&format!("{name}: {msg}"));
    }
}

// -------------------------------------------------------------------------------- test

#[test]
fn hostile_frames_and_c_abi_inputs() {
    let iters = env_u64("LANTON_FUZZ_ITERS", DEFAULT_ITERS);
    let seed = env_u64("LANTON_FUZZ_SEED", DEFAULT_SEED);
    let only = std::env::var("LANTON_FUZZ_CASE").ok().map(|v| v.parse::<u64>().expect("LANTON_FUZZ_CASE is an integer"));
    let trace = std::env::var("LANTON_FUZZ_TRACE").is_ok_and(|v| v == "1");
    say(&format!(
        "fuzz_frames: seed {seed:#x}, {iters} cases (LANTON_FUZZ_SEED / LANTON_FUZZ_ITERS; LANTON_FUZZ_CASE=i replays one, LANTON_FUZZ_TRACE=1 names each)"
    ));
    let start = std::time::Instant::now();
    let mut stats = Stats::default();
    let first = env_u64("LANTON_FUZZ_FIRST", 0);
    let cases: Vec<u64> = match only {
        Some(c) => vec![c],
        None => (first..first + iters).collect(),
    };
    for &case in &cases {
        if trace {
            say(&format!("fuzz_frames: case {case}"));
        }
        run_frame_case(&mut stats, seed, case);
        run_c_abi_case(&mut stats, seed, case);
    }
    let crashes = stats.failures.len();
    println!(
        "fuzz: {} executions, {} crashes/panics, {} distinct rejection messages",
        stats.executions,
        crashes,
        stats.messages.len()
    );
    println!(
        "fuzz: seed {seed:#x}, {} cases in {:.1} s; {} successful calls, {} without an api table to report through; per target (calls, successes): {:?}",
        cases.len(),
        start.elapsed().as_secs_f64(),
        stats.successes,
        stats.unreported,
        stats.by_target
    );
    if std::env::var("LANTON_FUZZ_MESSAGES").is_ok_and(|v| v == "1") {
        for m in &stats.messages {
            println!("  {m}");
        }
    }
    if crashes > 0 {
        let shown: Vec<&String> = stats.failures.iter().filter(|s| !s.is_empty()).collect();
        panic!(
            "fuzz: {crashes} failures with seed {seed:#x} (reproduce: LANTON_FUZZ_SEED={seed:#x} LANTON_FUZZ_ITERS={iters} cargo test --release --test fuzz_frames -- --nocapture):\n{}",
            shown.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n")
        );
    }
}

// ------------------------------------------------------------- regressions, one by one
// Each input below crashed, hung, aborted or panicked before the validation it names existed.

/// A well-formed frame with exactly one leaf, for the hand-made regressions below.
fn one_leaf_frame() -> FrameSpec {
    (0u64..)
        .map(|s| FrameSpec::well_formed(&mut Rng::new(s)))
        .find(|f| f.args.len() == 9 && f.hyper.is_some() && f.step.is_some())
        .unwrap()
}

fn call(spec: &FrameSpec, handler: Handler) -> Result<(), String> {
    let mut built = build(spec, &mut Rng::new(7));
    // SAFETY (harness): `built` owns everything the frame points at.
    let err = unsafe { handler(&mut *built.frame) };
    assert!(built.arena.guards_intact().is_none(), "wrote out of bounds");
    match take_error(err) {
        None => Ok(()),
        Some(e) => {
            assert!(!e.message.contains(PANIC_MESSAGE), "{}", e.message);
            Err(e.message)
        }
    }
}

fn expect_err(spec: &FrameSpec, needle: &str) {
    for (name, h) in TARGETS {
        let e = call(spec, h).expect_err(name);
        assert!(e.contains(needle), "{name}: {e:?} should mention {needle:?}");
    }
}

#[test]
fn regression_cyclic_extension_chain_is_refused_not_followed_forever() {
    let mut f = one_leaf_frame();
    f.exts = vec![ExtSpec { type_: 0, struct_size: 32, metadata: None }, ExtSpec { type_: 7, struct_size: 32, metadata: None }];
    f.ext_cycle = true;
    expect_err(&f, "extension chain longer than");
}

#[test]
fn regression_null_data_and_null_arrays_are_refused() {
    let mut f = one_leaf_frame();
    f.args[3].buf.as_mut().unwrap().data = Data::Null; // the gradient
    f.args[3].buf.as_mut().unwrap().dims = vec![1, 2, 2];
    expect_err(&f, "argument 3: null data pointer for 4 elements");
    let mut f = one_leaf_frame();
    f.args[1].buf.as_mut().unwrap().data = Data::Null; // the step scalar
    expect_err(&f, "argument 1: null data pointer for 1 elements");
    for k in 0..3 {
        let mut f = one_leaf_frame();
        f.null_arrays[k] = true;
        expect_err(&f, "entries but a null array");
    }
    let mut f = one_leaf_frame();
    let i = f.attrs.iter().position(|a| a.name.as_deref() == Some(b"noise_every")).unwrap();
    f.attrs[i].payload = Payload::Scalar { dtype: dtype::S64, bits: 1, value_null: true, misalign: 0 };
    expect_err(&f, "attribute 'noise_every' has a null scalar value");
}

#[test]
fn regression_overflowing_and_zero_layer_shapes() {
    // dims whose product wraps to a small number must not size a slice.
    let mut f = one_leaf_frame();
    for k in 2..6 {
        f.args[k].buf.as_mut().unwrap().dims = vec![1 << 32, 1 << 32, 1];
        f.args[k].buf.as_mut().unwrap().data = Data::Null;
    }
    expect_err(&f, "is too large");
    // A leaf without layers whose layer size cannot exist.
    let mut f = one_leaf_frame();
    for e in f.args.iter_mut().skip(2).take(4).chain(f.rets.iter_mut().take(3)) {
        e.buf.as_mut().unwrap().dims = vec![0, 1 << 40, 1 << 40];
    }
    for e in f.args.iter_mut().skip(6).chain(f.rets.iter_mut().skip(3)) {
        e.buf.as_mut().unwrap().dims = vec![0];
    }
    expect_err(&f, "a layer of 1099511627776 x 1099511627776 elements is too large");
    // ... and one whose layer size exists but would need terabytes of scratch: nothing to do.
    for e in f.args.iter_mut().skip(2).take(4).chain(f.rets.iter_mut().take(3)) {
        e.buf.as_mut().unwrap().dims = vec![0, 1 << 20, 1 << 20];
    }
    for (name, h) in &TARGETS[..2] {
        call(&f, *h).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn regression_misaligned_data_and_unknown_stage() {
    let mut f = one_leaf_frame();
    f.args[2].buf.as_mut().unwrap().data = Data::Own { misalign: 1 };
    f.args[2].buf.as_mut().unwrap().dtype = dtype::F32;
    f.args[2].buf.as_mut().unwrap().dims = vec![1, 1, 1];
    expect_err(&f, "argument 2: data pointer");
    let mut f = one_leaf_frame();
    f.stage = 17;
    expect_err(&f, "unknown execution stage 17");
    let mut f = one_leaf_frame();
    f.exts = vec![ExtSpec { type_: EXTENSION_METADATA, struct_size: 32, metadata: Some(8) }];
    expect_err(&f, "metadata struct too small");
}

fn host_call(config: &str, leaf: &LantonLeafF32) -> (i32, String) {
    let cfg = std::ffi::CString::new(config).unwrap();
    let hyper = [0.02f32, 0.9, 0.9, 0.0, 0.2];
    let mut err = [0 as c_char; 256];
    // SAFETY: the leaf's pointers are null or valid for what it states (tests below).
    let rc = unsafe { lanton_step_host_f32(cfg.as_ptr(), hyper.as_ptr(), 1, leaf, 1, err.as_mut_ptr(), err.len()) };
    (rc, unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned())
}

#[test]
fn regression_c_abi_zero_layer_leaf_and_loose_ns_coeffs() {
    let mut state = vec![0.0f32; 4];
    let mut steps = vec![0i32; 1];
    let (p, ps) = (state.as_mut_ptr(), steps.as_mut_ptr());
    let leaf = |layers: usize, rows: usize, cols: usize| LantonLeafF32 {
        layers,
        rows,
        cols,
        rows_are_input: 1,
        param: p,
        grad: p,
        momentum: p,
        prev_grad: p,
        noise: p,
        valid: p,
        prev_step: ps,
        ratio: p,
    };
    // No layers: every array is empty (any pointer is valid for zero elements), but the
    // per-layer size used to size scratch: 2^62 elements panicked (capacity overflow), 2^40
    // aborted the process (allocation failure).
    let (rc, msg) = host_call(r#"{"kind": "hidden"}"#, &leaf(0, 1 << 31, 1 << 31));
    assert_eq!(rc, LANTON_ERR_INVALID, "{msg}");
    assert!(msg.contains("leaf 0: size 0 x 2147483648 x 2147483648 overflows"), "{msg}");
    let (rc, msg) = host_call(r#"{"kind": "hidden"}"#, &leaf(0, 1 << 20, 1 << 20));
    assert_eq!(rc, LANTON_OK, "{msg}");
    // ns_coeffs entries with a non-number used to be read as the numbers around it.
    let (rc, msg) = host_call(r#"{"kind": "hidden", "ns_coeffs": [[1, "a", 2, 3]]}"#, &leaf(0, 1, 1));
    assert_eq!(rc, LANTON_ERR_INVALID, "{msg}");
    assert!(msg.contains("every 'ns_coeffs' entry must be [a, b, c]"), "{msg}");
}

#[test]
fn regression_last_representable_step() {
    // t = i32::MAX: "is t + 1 a noise step?" overflowed (a panic with overflow checks, a
    // wrapped step otherwise).
    let mut f = one_leaf_frame();
    f.step = Some(i32::MAX);
    for (name, h) in &TARGETS[..2] {
        call(&f, *h).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let mut state = [0.5f32; 7]; // param, grad, momentum, prev_grad, noise, valid, ratio
    let mut steps = [0i32; 1];
    let p = state.as_mut_ptr();
    // SAFETY: offsets 0..7 lie inside `state`; every buffer is one distinct element.
    let at = |i: usize| unsafe { p.add(i) };
    let leaf = LantonLeafF32 {
        layers: 1,
        rows: 1,
        cols: 1,
        rows_are_input: 1,
        param: at(0),
        grad: at(1),
        momentum: at(2),
        prev_grad: at(3),
        noise: at(4),
        valid: at(5),
        prev_step: steps.as_mut_ptr(),
        ratio: at(6),
    };
    let cfg = c"{\"kind\": \"embed\", \"noise_every\": 1}";
    let hyper = [0.02f32, 0.9, 0.9, 0.0, 0.2];
    // SAFETY: every pointer is valid for the one element the leaf states; none overlap.
    let rc = unsafe { lanton_step_host_f32(cfg.as_ptr(), hyper.as_ptr(), i32::MAX, &leaf, 1, std::ptr::null_mut(), 0) };
    assert_eq!(rc, LANTON_OK);
    assert_eq!(steps[0], i32::MAX, "G_prev kept for step t + 1 (K = 1)");
}
