//! Matrix products for Newton-Schulz on CPU, over the `gemm` crate (pure Rust, runtime SIMD
//! dispatch). All matrices are row-major f32 and contiguous unless strides say otherwise.

use std::sync::OnceLock;

/// Below this many multiply-adds a product runs on the calling thread.
const PARALLEL_MIN_MACS: usize = 1 << 21;
/// Below this size `syrk` stops splitting and computes its square block whole.
const SYRK_LEAF: usize = 192;

/// The environment variable that sets the CPU kernels' thread count.
pub const NUM_THREADS_VAR: &str = "LANTON_NUM_THREADS";
/// Largest accepted `LANTON_NUM_THREADS`.
pub const MAX_NUM_THREADS: usize = 1024;

/// Why the CPU kernels cannot run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PoolError {
    /// An environment variable (`LANTON_NUM_THREADS`) holds an invalid value.
    Env(String),
    /// The thread pool could not be started.
    Build(String),
}

impl PoolError {
    pub fn message(&self) -> &str {
        match self {
            PoolError::Env(m) | PoolError::Build(m) => m,
        }
    }
}

impl std::fmt::Display for PoolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}

/// Parses a `LANTON_NUM_THREADS` value: `None` (unset) or blank means one thread per core
/// (`Ok(None)`); otherwise an integer in 1..=MAX_NUM_THREADS, surrounding blanks allowed.
/// Anything else is an error naming the variable, the value and the allowed range.
pub fn parse_num_threads(value: Option<&std::ffi::OsStr>) -> Result<Option<usize>, String> {
    let Some(raw) = value else { return Ok(None) };
    let text = raw.to_str().map(str::trim);
    if text == Some("") {
        return Ok(None);
    }
    match text.and_then(|t| t.parse::<usize>().ok()) {
        Some(n) if (1..=MAX_NUM_THREADS).contains(&n) => Ok(Some(n)),
        _ => Err(format!(
            "{NUM_THREADS_VAR}={:?} is invalid: expected an integer from 1 to {MAX_NUM_THREADS} \
             (or unset for one thread per core)",
            raw.to_string_lossy()
        )),
    }
}

/// Reads and validates `LANTON_NUM_THREADS` now (every call, so a bad value is reported by
/// every call that would use the CPU kernels, not only by the first).
pub fn num_threads_from_env() -> Result<Option<usize>, String> {
    parse_num_threads(std::env::var_os(NUM_THREADS_VAR).as_deref())
}

/// Checks every environment variable lanton reads when it runs (today `LANTON_NUM_THREADS`).
pub fn check_env() -> Result<(), String> {
    num_threads_from_env().map(|_| ())
}

/// The GEMM thread pool: `LANTON_NUM_THREADS` threads, else the machine's cores. The pool is
/// ours, so XLA's intra-op pool (idle while our custom call runs) is not oversubscribed by
/// nested work. Its size is fixed by the first successful call; the variable is validated on
/// every call.
pub fn pool() -> Result<&'static rayon::ThreadPool, PoolError> {
    let requested = num_threads_from_env().map_err(PoolError::Env)?;
    let built = POOL.get_or_init(|| {
        let n = requested.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("lanton-gemm-{i}"))
            .build()
            .map_err(|e| format!("cannot start the lanton GEMM thread pool ({n} threads): {e}"))
    });
    built.as_ref().map_err(|e| PoolError::Build(e.clone()))
}

static POOL: OnceLock<Result<rayon::ThreadPool, String>> = OnceLock::new();

/// Threads of the pool the GEMMs run on (1 if it cannot be built). Once the pool exists this
/// reads no environment: it runs for every product, inside a step that validated it.
fn pool_threads() -> usize {
    match POOL.get() {
        Some(Ok(p)) => p.current_num_threads(),
        Some(Err(_)) => 1,
        None => pool().map(|p| p.current_num_threads()).unwrap_or(1),
    }
}

thread_local! {
    /// Set while this thread works through layers of its own: its products stay on it.
    static SERIAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with every product on the calling thread. The step driver uses it when it already
/// gives each thread whole layers: splitting small products across threads again only costs
/// synchronization (a 128x128 product is ~0.1 ms).
pub fn serial<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            SERIAL.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(SERIAL.with(|c| c.replace(true)));
    f()
}

/// Threads a piece of work of `macs` multiply-adds is split over: the pool's, unless it is
/// small or this thread works through layers of its own (`serial`).
pub fn threads_for(macs: usize) -> usize {
    let n = pool_threads();
    if n > 1 && macs >= PARALLEL_MIN_MACS && !SERIAL.with(|c| c.get()) {
        n
    } else {
        1
    }
}

fn parallelism(macs: usize) -> gemm::Parallelism {
    match threads_for(macs) {
        1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// The element types products run in: f32 for the step, f64 for the noise estimate's Gram
/// matrix (its f32 round-off would read as small singular values).
pub trait Scalar: Copy + PartialEq + 'static {
    const ZERO: Self;
    const ONE: Self;
}

impl Scalar for f32 {
    const ZERO: f32 = 0.0;
    const ONE: f32 = 1.0;
}

impl Scalar for f64 {
    const ZERO: f64 = 0.0;
    const ONE: f64 = 1.0;
}

/// A strided read-only matrix: element (i, j) at `ptr[i*rs + j*cs]`.
struct View<T> {
    ptr: *const T,
    rs: isize,
    cs: isize,
}

impl<T> Clone for View<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for View<T> {}

/// dst(m x n, row stride ld) = alpha*dst + beta*lhs(m x k)*rhs(k x n).
///
/// SAFETY (internal): callers pass views whose extents lie inside live slices, and `dst`
/// does not overlap `lhs` or `rhs`.
#[allow(clippy::too_many_arguments)]
unsafe fn raw_gemm<T: Scalar>(m: usize, n: usize, k: usize, dst: *mut T, ld: isize, alpha: T, beta: T, lhs: View<T>, rhs: View<T>) {
    gemm::gemm(
        m, n, k, dst, 1, ld, alpha != T::ZERO, lhs.ptr, lhs.cs, lhs.rs, rhs.ptr, rhs.cs, rhs.rs, alpha, beta,
        false, false, false, parallelism(m * n * k),
    );
}

/// c(m x n) = a(m x k) * b(k x n).
pub fn matmul(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n, "matmul: slice too short");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c[..m * n].fill(0.0);
        return;
    }
    let lhs = View { ptr: a.as_ptr(), rs: k as isize, cs: 1 };
    let rhs = View { ptr: b.as_ptr(), rs: n as isize, cs: 1 };
    // SAFETY: extents checked above; `c` is a distinct &mut slice.
    unsafe { raw_gemm(m, n, k, c.as_mut_ptr(), n as isize, 0.0, 1.0, lhs, rhs) }
}

/// c(m x m) = x(m x k) * x^T, using symmetry: only blocks on and above the diagonal are
/// multiplied (recursive halving keeps each product large), then mirrored.
pub fn syrk<T: Scalar>(m: usize, k: usize, x: &[T], c: &mut [T]) {
    assert!(x.len() >= m * k && c.len() >= m * m, "syrk: slice too short");
    if m == 0 {
        return;
    }
    if k == 0 {
        c[..m * m].fill(T::ZERO);
        return;
    }
    if m <= SYRK_LEAF {
        // One block: symmetry would save nothing and mirroring costs (1.03-1.11x at 128 x 128,
        // benches/newton_schulz.rs).
        return xxt_plain(m, k, x, c);
    }
    // Above SYRK_LEAF rows `gram_upper` splits into SYRK_LEAF-row blocks: the upper triangle,
    // then the mirror.
    gram_upper(m, k, x, c);
    for i in 1..m {
        for j in 0..i {
            c[i * m + j] = c[j * m + i];
        }
    }
}

/// The upper triangle (row-major; the lower in column-major) of X X^T, X m x k: the noise
/// estimate's Gram matrix, whose reduction reads no other entry. Entries below the diagonal
/// are unspecified (diagonal blocks are written whole). Without the mirror, small blocks
/// pay: 64-row blocks at 128 rows (62 vs 79 us for `syrk` in a one-off timing).
pub fn gram_upper<T: Scalar>(m: usize, k: usize, x: &[T], c: &mut [T]) {
    assert!(x.len() >= m * k && c.len() >= m * m, "gram_upper: slice too short");
    if m == 0 {
        return;
    }
    if k == 0 {
        c[..m * m].fill(T::ZERO);
        return;
    }
    let leaf = if m <= SYRK_LEAF { 64 } else { SYRK_LEAF };
    // SAFETY: every block product below reads rows of `x` inside m*k and writes a block of `c`
    // inside m*m that no other product of this call writes.
    unsafe { syrk_upper(0, m, m, k, x.as_ptr(), c.as_mut_ptr(), leaf) };
}

unsafe fn syrk_upper<T: Scalar>(r0: usize, r1: usize, m: usize, k: usize, x: *const T, c: *mut T, leaf: usize) {
    let len = r1 - r0;
    let rows = |r: usize| View { ptr: x.add(r * k), rs: k as isize, cs: 1 };
    // x[rows]^T as a k x cols view: element (p, j) = x[j, p].
    let cols_t = |r: usize| View { ptr: x.add(r * k), rs: 1, cs: k as isize };
    if len <= leaf {
        raw_gemm(len, len, k, c.add(r0 * m + r0), m as isize, T::ZERO, T::ONE, rows(r0), cols_t(r0));
        return;
    }
    let mid = r0 + (len / 2).next_multiple_of(16).min(len - 1);
    syrk_upper(r0, mid, m, k, x, c, leaf);
    syrk_upper(mid, r1, m, k, x, c, leaf);
    raw_gemm(mid - r0, r1 - mid, k, c.add(r0 * m + mid), m as isize, T::ZERO, T::ONE, rows(r0), cols_t(mid));
}

/// The same product without symmetry: `syrk` below its split size, and the benchmark's
/// side-by-side comparison.
pub fn xxt_plain<T: Scalar>(m: usize, k: usize, x: &[T], c: &mut [T]) {
    assert!(x.len() >= m * k && c.len() >= m * m);
    if m == 0 || k == 0 {
        c[..m * m].fill(T::ZERO);
        return;
    }
    let lhs = View { ptr: x.as_ptr(), rs: k as isize, cs: 1 };
    let rhs = View { ptr: x.as_ptr(), rs: 1, cs: k as isize };
    // SAFETY: extents checked above.
    unsafe { raw_gemm(m, m, k, c.as_mut_ptr(), m as isize, T::ZERO, T::ONE, lhs, rhs) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f64> {
        let mut c = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] as f64 * b[p * n + j] as f64).sum();
            }
        }
        c
    }

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn syrk_matches_naive_across_split_sizes() {
        for &(m, k) in &[(1, 5), (7, 3), (193, 40), (400, 33), (517, 9)] {
            let x = rand(m * k, m as u64);
            let xt: Vec<f32> = (0..k * m).map(|idx| x[(idx % m) * k + idx / m]).collect();
            let want = naive(m, m, k, &x, &xt);
            let mut got = vec![f32::NAN; m * m];
            syrk(m, k, &x, &mut got);
            for (g, w) in got.iter().zip(&want) {
                assert!((*g as f64 - w).abs() < 1e-4 * (1.0 + w.abs()), "m={m} k={k}: {g} vs {w}");
            }
            let mut plain = vec![0.0; m * m];
            xxt_plain(m, k, &x, &mut plain);
            for (g, w) in plain.iter().zip(&want) {
                assert!((*g as f64 - w).abs() < 1e-4 * (1.0 + w.abs()));
            }
        }
    }

    #[test]
    fn num_threads_values() {
        use std::ffi::OsStr;
        let p = |s: &str| parse_num_threads(Some(OsStr::new(s)));
        assert_eq!(parse_num_threads(None), Ok(None));
        assert_eq!(p(""), Ok(None));
        assert_eq!(p("  "), Ok(None));
        assert_eq!(p("1"), Ok(Some(1)));
        assert_eq!(p(" 8 "), Ok(Some(8)));
        assert_eq!(p("1024"), Ok(Some(MAX_NUM_THREADS)));
        for bad in ["abc", "0", "-3", "1025", "4.0", "+", "2 threads", "99999999999999999999999"] {
            let e = p(bad).unwrap_err();
            assert!(e.contains("LANTON_NUM_THREADS") && e.contains(&format!("{bad:?}")) && e.contains("1 to 1024"), "{e}");
        }
        use std::os::unix::ffi::OsStrExt;
        let e = parse_num_threads(Some(OsStr::from_bytes(b"\xff4"))).unwrap_err();
        assert!(e.contains("LANTON_NUM_THREADS") && e.contains("1 to 1024"), "{e}");
    }

    #[test]
    fn matmul_matches_naive() {
        let (m, n, k) = (37, 61, 29);
        let (a, b) = (rand(m * k, 1), rand(k * n, 2));
        let want = naive(m, n, k, &a, &b);
        let mut got = vec![0.0; m * n];
        matmul(m, n, k, &a, &b, &mut got);
        for (g, w) in got.iter().zip(&want) {
            assert!((*g as f64 - w).abs() < 1e-4);
        }
    }
}
