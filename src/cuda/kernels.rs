//! Our kernels: their source (`kernels.cu`, compiled by NVRTC at first use on each device) and
//! one enum that every name and index comes from.

/// The kernel sources.
pub const KERNEL_SOURCE: &str = include_str!("kernels.cu");

/// Every `extern "C" __global__` function of kernels.cu; `k as usize` indexes `KERNEL_NAMES`
/// and the loaded functions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Stats,
    SumChunks,
    Prepare,
    Dot,
    Track,
    Reference,
    AffineDiag,
    Apply,
    NoiseGemm,
    NoiseGemmTc,
}

impl Kernel {
    pub const ALL: [Kernel; 10] = [
        Kernel::Stats, Kernel::SumChunks, Kernel::Prepare, Kernel::Dot, Kernel::Track, Kernel::Reference, Kernel::AffineDiag, Kernel::Apply,
        Kernel::NoiseGemm, Kernel::NoiseGemmTc,
    ];

    /// The function's name in kernels.cu.
    pub const fn name(self) -> &'static str {
        match self {
            Kernel::Stats => "lanton_stats",
            Kernel::SumChunks => "lanton_sum_chunks",
            Kernel::Prepare => "lanton_prepare",
            Kernel::Dot => "lanton_dot",
            Kernel::Track => "lanton_track",
            Kernel::Reference => "lanton_reference",
            Kernel::AffineDiag => "lanton_affine_diag",
            Kernel::Apply => "lanton_apply",
            Kernel::NoiseGemm => "lanton_noise_gemm",
            Kernel::NoiseGemmTc => "lanton_noise_gemm_tc",
        }
    }

    /// A per-leaf pass: its first argument is a `LeafBatch` (multi-tensor launch).
    pub const fn per_leaf(self) -> bool {
        matches!(self, Kernel::Stats | Kernel::Prepare | Kernel::Dot | Kernel::Track | Kernel::Apply)
    }

    /// The kernel named `name`, if it is one of ours.
    pub fn named(name: &str) -> Option<Kernel> {
        Kernel::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// The kernels' names in `Kernel` order (what the loader looks up).
pub const KERNEL_NAMES: [&str; Kernel::ALL.len()] = {
    let mut names = [""; Kernel::ALL.len()];
    let mut i = 0;
    while i < names.len() {
        names[i] = Kernel::ALL[i].name();
        i += 1;
    }
    names
};

// `ALL` lists the variants in declaration order, so `k as usize` is k's place in it.
const _: () = {
    let mut i = 0;
    while i < Kernel::ALL.len() {
        assert!(Kernel::ALL[i] as usize == i);
        i += 1;
    }
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_is_defined_in_the_source_once() {
        for k in Kernel::ALL {
            let def = format!("void {}(", k.name());
            assert_eq!(KERNEL_SOURCE.matches(&def).count(), 1, "{}", k.name());
            assert_eq!(Kernel::named(k.name()), Some(k));
        }
        assert_eq!(Kernel::named("lanton_nothing"), None);
    }
}
