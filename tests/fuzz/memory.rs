//! Guarded memory: arenas whose guard words catch a write outside a buffer.

use super::*;

pub const GUARD_WORDS: usize = 2;
pub const GUARD: u64 = 0xA5A5_5A5A_DEAD_BEEF;
/// Largest data allocation the fuzzer makes; bigger described buffers get a null pointer.
pub const MAX_ALLOC_BYTES: usize = 1 << 20;

/// Heap blocks with guard words behind them. Blocks are never resized once handed out, so
/// pointers into them stay valid for the whole execution.
#[derive(Default)]
pub struct Arena {
    pub blocks: Vec<Vec<u64>>,
    /// Usable bytes of each block.
    pub usable: Vec<usize>,
}

impl Arena {
    pub fn alloc(&mut self, bytes: usize, rng: &mut Rng) -> usize {
        let words = bytes.div_ceil(8).max(1);
        let mut v: Vec<u64> = (0..words).map(|_| random_word(rng)).collect();
        v.extend(std::iter::repeat(GUARD).take(GUARD_WORDS));
        self.blocks.push(v);
        self.usable.push(words * 8);
        self.blocks.len() - 1
    }
    pub fn ptr(&mut self, block: usize, offset: usize) -> *mut c_void {
        // SAFETY (harness): callers keep offset within the block's usable bytes.
        unsafe { (self.blocks[block].as_mut_ptr() as *mut u8).add(offset) as *mut c_void }
    }
    pub fn guards_intact(&self) -> Option<usize> {
        self.blocks.iter().position(|b| b[b.len() - GUARD_WORDS..].iter().any(|&w| w != GUARD))
    }
}

/// Eight bytes of plausible data: two f32s, four 16-bit floats or two i32s, or raw bits.
pub fn random_word(rng: &mut Rng) -> u64 {
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
