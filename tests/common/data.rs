//! Seeded random data: the tests' one generator (splitmix64; the fuzzer's draws in
//! tests/fuzz/rng.rs build on it), normals, gradient-like matrices and matrices of a given
//! spectrum.

/// splitmix64: tiny, seedable, well mixed from any seed (0 included).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
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

/// The noise estimate's test spectra of k singular values: power-law and exponential (slowly
/// converging small singular values), low rank, rank 1 and flat.
pub fn test_spectra(k: usize) -> [(&'static str, Vec<f64>); 5] {
    [
        ("power-law", (0..k).map(|i| 1.0 / (1.0 + i as f64)).collect()),
        ("exponential", (0..k).map(|i| (-(i as f64) / (k as f64 / 8.0)).exp()).collect()),
        ("rank-4", (0..k).map(|i| if i < 4 { 4.0 - i as f64 } else { 0.0 }).collect()),
        ("rank-1", (0..k).map(|i| if i == 0 { 3.0 } else { 0.0 }).collect()),
        ("flat", vec![0.5; k]),
    ]
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
