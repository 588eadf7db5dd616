//! Which vector instructions the hand-written kernels (`tiles`, `rows`, `attention`)
//! use: the widest this CPU has, decided per call from a cached feature check.
//!
//! Every width computes the same operations in the same order, so results do not
//! depend on it; it changes speed only. AVX-512 can be switched off
//! (`BMC_AVX512=0`, or [`set_avx512`]) to measure what it gains on the same machine in
//! the same process (`BMC_BENCH_AB=avx512 bmc bench …`).

use crate::switch::Switch;

static AVX512: Switch = Switch::new("BMC_AVX512");

/// Lets (or stops) the kernels use AVX-512 on a CPU that has it. Takes effect at the
/// next kernel; a packing made for one width records it (`tiles::Packed`).
pub fn set_avx512(on: bool) {
    AVX512.set(on);
}

/// Whether AVX-512F may be used: the CPU has it, and it was not switched off.
#[inline]
pub fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        AVX512.on() && std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether AVX2 with FMA is there.
#[inline]
pub fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}
