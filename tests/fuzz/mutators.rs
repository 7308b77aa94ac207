//! The mutations that turn a well-formed frame into a hostile one.

use super::*;

pub fn random_dims(rng: &mut Rng) -> Vec<i64> {
    let rank = rng.pick(&[0, 1, 1, 2, 3, 3, 3, 4, 6]);
    (0..rank)
        .map(|_| if rng.one_in(3) { rng.interesting_i64() } else { rng.below(6) as i64 })
        .collect()
}

pub fn random_attr_name(rng: &mut Rng) -> Vec<u8> {
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

pub fn random_payload(rng: &mut Rng) -> (i32, Payload) {
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

pub fn mutate(f: &mut FrameSpec, rng: &mut Rng) {
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

pub fn pick_entry<'a>(f: &'a mut FrameSpec, rng: &mut Rng) -> Option<&'a mut Entry> {
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

pub fn pick_buf<'a>(f: &'a mut FrameSpec, rng: &mut Rng) -> Option<&'a mut Buf> {
    let mut bufs = f.all_bufs_mut();
    if bufs.is_empty() {
        return None;
    }
    let i = rng.below(bufs.len() as u64) as usize;
    Some(bufs.swap_remove(i))
}
