//! The fuzzer's draws on the tests' one generator (`common::data::Rng`, splitmix64: the
//! seeds of runs and regressions depend on its sequence) and per-case seeds.

pub use crate::common::Rng;

impl Rng {
    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn upto(&mut self, n: usize) -> usize {
        self.below(n as u64 + 1) as usize
    }
    pub fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }
    /// A float: mostly ordinary values, sometimes an edge case.
    pub fn float(&mut self) -> f32 {
        if self.one_in(12) {
            self.pick(&[0.0, -0.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, f32::MIN_POSITIVE, 1e-40, -1.0, 1e30])
        } else {
            ((self.uniform() - 0.5) * 4.0) as f32
        }
    }
    pub fn interesting_i64(&mut self) -> i64 {
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
    pub fn interesting_i32(&mut self) -> i32 {
        self.pick(&[0, 1, 2, 3, 9, 10, -1, -7, i32::MAX, i32::MIN, 1 << 30])
    }
    pub fn bytes(&mut self, max: usize) -> Vec<u8> {
        (0..self.upto(max)).map(|_| self.next() as u8).collect()
    }
}

pub fn case_seed(seed: u64, case: u64) -> u64 {
    let mut r = Rng::new(seed ^ case.wrapping_mul(0xD6E8_FEB8_6659_FD93));
    r.next()
}
