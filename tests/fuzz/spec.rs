//! The description of a call frame, and the well-formed frame every case starts from.

use super::*;

pub const VALID_DTYPES: [i32; 9] = [dtype::F32, dtype::BF16, dtype::F16, dtype::S32, dtype::F64, dtype::S64, dtype::U8, dtype::S8, dtype::PRED];
pub const BAD_DTYPES: [i32; 7] = [0, -1, 3, 13, 99, i32::MAX, i32::MIN];

/// Element count the description claims, if it can exist (non-negative, no overflow).
pub fn described_count(dims: &[i64]) -> Option<usize> {
    if dims.iter().any(|&d| d < 0) {
        return None;
    }
    if dims.contains(&0) {
        return Some(0);
    }
    dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d as usize))
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Data {
    Null,
    /// Own allocation; `misalign` bytes past its (8-aligned) start.
    Own { misalign: usize },
    /// Inside the allocation of buffer `id`, `offset` bytes in (falls back to Own if it does
    /// not fit there).
    Share { id: usize, offset: usize },
}

#[derive(Clone, Debug)]
pub struct Buf {
    pub id: usize,
    pub dtype: i32,
    pub dims: Vec<i64>,
    /// The rank field; equals dims.len() unless dims are null or it is negative.
    pub rank: i64,
    pub dims_null: bool,
    pub data: Data,
    pub struct_size: usize,
}

#[derive(Clone, Debug)]
pub struct Entry {
    pub type_code: i32,
    /// None: a null pointer in the args/rets array.
    pub buf: Option<Buf>,
}

#[derive(Clone, Debug)]
pub enum Payload {
    Scalar { dtype: i32, bits: u64, value_null: bool, misalign: usize },
    Array { dtype: i32, len: usize, data_null: bool, words: Vec<u64>, misalign: usize },
    Str { bytes: Vec<u8>, null: bool },
    /// Dictionaries and unknown type codes: the payload is opaque storage.
    Opaque,
}

#[derive(Clone, Debug)]
pub struct AttrSpec {
    /// None: a null name pointer.
    pub name: Option<Vec<u8>>,
    pub type_code: i32,
    pub payload: Payload,
    pub payload_null: bool,
}

#[derive(Clone, Debug)]
pub struct ExtSpec {
    pub type_: i32,
    pub struct_size: usize,
    /// None: null metadata pointer; Some(struct_size).
    pub metadata: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ApiKind {
    Fake,
    Null,
    NoStream,
    NoErrorReadback,
}

#[derive(Clone, Debug)]
pub struct FrameSpec {
    pub null_frame: bool,
    pub struct_size: usize,
    pub stage: i32,
    pub api: ApiKind,
    pub args: Vec<Entry>,
    pub rets: Vec<Entry>,
    pub attrs: Vec<AttrSpec>,
    pub list_struct_sizes: [usize; 3],
    /// Overrides of args.size / rets.size / attrs.size (never above the real array length).
    pub size_override: [Option<i64>; 3],
    /// Null types/pointer arrays with a positive size.
    pub null_arrays: [bool; 3],
    pub exts: Vec<ExtSpec>,
    pub ext_cycle: bool,
    pub next_id: usize,
    /// Written into argument 0 (hyper) and 1 (step) when they own enough memory; otherwise
    /// those hold random bits like every other buffer.
    pub hyper: Option<[f32; 5]>,
    pub step: Option<i32>,
}

// -------------------------------------------------------------------- well-formed base

pub fn scalar(name: &str, dtype: i32, bits: u64) -> AttrSpec {
    AttrSpec {
        name: Some(name.as_bytes().to_vec()),
        type_code: attr_type::SCALAR,
        payload: Payload::Scalar { dtype, bits, value_null: false, misalign: 0 },
        payload_null: false,
    }
}

pub fn string(name: &str, s: &[u8]) -> AttrSpec {
    AttrSpec {
        name: Some(name.as_bytes().to_vec()),
        type_code: attr_type::STRING,
        payload: Payload::Str { bytes: s.to_vec(), null: false },
        payload_null: false,
    }
}

pub fn array(name: &str, dtype: i32, words: Vec<u64>, len: usize) -> AttrSpec {
    AttrSpec {
        name: Some(name.as_bytes().to_vec()),
        type_code: attr_type::ARRAY,
        payload: Payload::Array { dtype, len, data_null: false, words, misalign: 0 },
        payload_null: false,
    }
}

/// Packs values of `dtype` (given as i64 or f64 bits) into 8-byte words, one value per
/// element at its natural width.
pub fn pack(dtype: i32, values: &[f64]) -> Vec<u64> {
    let size = dtype::span_size(dtype);
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

pub fn bool_attr(rng: &mut Rng, name: &str) -> AttrSpec {
    let v = rng.below(2);
    if rng.one_in(4) {
        scalar(name, dtype::S64, v)
    } else {
        scalar(name, dtype::PRED, v)
    }
}

pub fn float_attr(rng: &mut Rng, name: &str, v: f64) -> AttrSpec {
    if rng.one_in(3) {
        scalar(name, dtype::F32, (v as f32).to_bits() as u64)
    } else {
        scalar(name, dtype::F64, v.to_bits())
    }
}

impl FrameSpec {
    pub fn buf(&mut self, dtype: i32, dims: Vec<i64>) -> Buf {
        self.next_id += 1;
        Buf { id: self.next_id, dtype, rank: dims.len() as i64, dims, dims_null: false, data: Data::Own { misalign: 0 }, struct_size: 48 }
    }

    pub fn push_arg(&mut self, dtype: i32, dims: Vec<i64>) -> usize {
        let b = self.buf(dtype, dims);
        self.args.push(Entry { type_code: ARG_BUFFER, buf: Some(b) });
        self.args.len() - 1
    }

    pub fn push_ret(&mut self, dtype: i32, dims: Vec<i64>) -> usize {
        let b = self.buf(dtype, dims);
        self.rets.push(Entry { type_code: RET_BUFFER, buf: Some(b) });
        self.rets.len() - 1
    }

    /// A well-formed step call: random kind, leaves, dtypes, attribute encodings, donation.
    pub fn well_formed(rng: &mut Rng) -> FrameSpec {
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
            f.push_arg(dtype::S32, l.clone()); // skipped
            let rbase = f.rets.len();
            f.push_ret(dp, dims.clone());
            f.push_ret(dm, dims.clone());
            f.push_ret(dpg, dims.clone());
            f.push_ret(dtype::F32, l.clone());
            f.push_ret(dtype::F32, l.clone());
            f.push_ret(dtype::S32, l.clone());
            f.push_ret(dtype::F32, l.clone());
            f.push_ret(dtype::S32, l.clone()); // skipped
            if donate {
                for (r, a) in [(0, 0), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (7, 7)] {
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

    pub fn all_bufs_mut(&mut self) -> Vec<&mut Buf> {
        self.args.iter_mut().chain(self.rets.iter_mut()).filter_map(|e| e.buf.as_mut()).collect()
    }

    pub fn ids(&self) -> Vec<usize> {
        self.args.iter().chain(self.rets.iter()).filter_map(|e| e.buf.as_ref().map(|b| b.id)).collect()
    }
}
