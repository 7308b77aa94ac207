//! A frame description made into a real XLA call frame in guarded memory.

use super::*;

/// Everything a raw frame points at; dropped after the call. (Boxes inside the vectors keep
/// each struct at a fixed address while later ones are pushed.)
#[allow(clippy::vec_box)]
pub struct Built {
    pub arena: Arena,
    pub frame: Box<XLA_FFI_CallFrame>,
    pub api: Option<Box<XLA_FFI_Api>>,
    pub _bufs: Vec<Box<XLA_FFI_Buffer>>,
    pub _dims: Vec<Vec<i64>>,
    pub _ptr_lists: Vec<Vec<*mut c_void>>,
    pub _type_lists: Vec<Vec<i32>>,
    pub _names: Vec<Box<XLA_FFI_ByteSpan>>,
    pub _name_ptrs: Vec<*mut XLA_FFI_ByteSpan>,
    pub _name_bytes: Vec<Vec<u8>>,
    pub _payloads: Vec<Box<[u64; 8]>>,
    pub _values: Vec<Box<[u64; 2]>>,
    pub _arrays: Vec<Vec<u64>>,
    pub _exts: Vec<Box<XLA_FFI_Metadata_Extension>>,
    pub _metas: Vec<Box<XLA_FFI_Metadata>>,
    /// (block, snapshot) of every argument block no result points into.
    pub inputs: Vec<(usize, Vec<u64>)>,
}

pub fn build(spec: &FrameSpec, rng: &mut Rng) -> Built {
    let mut arena = Arena::default();
    // Allocate every buffer that owns its memory; remember (block, capacity) per id.
    let mut block_of: BTreeMap<usize, usize> = BTreeMap::new();
    let all: Vec<&Buf> = spec.args.iter().chain(spec.rets.iter()).filter_map(|e| e.buf.as_ref()).collect();
    let need = |b: &Buf| -> Option<usize> {
        if b.dims_null || b.rank < 0 {
            return Some(0);
        }
        described_count(&b.dims).and_then(|n| n.checked_mul(dtype::span_size(b.dtype)))
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
                    let len = if *data_null { *len } else { (*len).min((w.len() - 1) * 8 / dtype::span_size(*dtype)) };
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
            for i in (GROUP_ARGS + 6..spec.args.len()).step_by(lanton::handlers::ARGS_PER_LEAF) {
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
