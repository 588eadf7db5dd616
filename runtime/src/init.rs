//! Parameter initialisers, deterministic from the train seed and the parameter's name.
//!
//! Element `i` (row-major) of a parameter takes the counter-based SplitMix64 value
//! `splitmix_nth(base + i + 1)` (see [`crate::rng`]) where `base` is
//! - for [`init_param`]: a 64-bit hash of (FNV-1a 64 of the name, seed), so every
//!   parameter has its own sequence and renaming one parameter changes only it;
//! - for [`init_param_stream`]: `stream << 40`, exactly `h(stream, i)` of the benchmark
//!   recipe (models.md), which reproduces the peers' initial parameters bit for bit.
//!
//! Value recipes (`u = (h >> 11) · 2^-53` in `[0, 1)`):
//! - `Uniform { low, high }`: when `low == -high`, `f32((2u − 1) · high)` (the recipe's
//!   symmetric uniform, one rounding); otherwise `f32(low + (high − low) · u)`, computed
//!   in f64 and rounded once to f32.
//! - `Normal { mean, std }`: Box–Muller in f64 on pairs: elements `2k` and `2k + 1` use
//!   `u1 = 1 − u(h(2k))` and `u2 = u(h(2k + 1))` and take `mean + std · r·cos θ` and
//!   `mean + std · r·sin θ` respectively (`r = sqrt(−2 ln u1)`, `θ = 2π u2`).
//! - `Zeros`, `Ones`, `Constant(v)`: no randomness.

use crate::kir::Init;
use crate::rng::{GOLDEN, mix64, splitmix_nth, uniform_sym, unit_f64};
use rayon::prelude::*;

/// FNV-1a, 64-bit.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The per-parameter sequence base used by [`init_param`].
pub fn param_base(name: &str, seed: u64) -> u64 {
    mix64(fnv1a64(name.as_bytes()) ^ mix64(seed.wrapping_add(1).wrapping_mul(GOLDEN)))
}

/// Initial values of a parameter of `shape`, from the train `seed` and its `name`.
pub fn init_param(init: &Init, shape: &[usize], name: &str, seed: u64) -> Vec<f32> {
    init_from_base(init, shape.iter().product(), param_base(name, seed))
}

/// Initial values from stream `stream` of the models.md recipe: element `i` uses
/// `h(stream, i)`.
pub fn init_param_stream(init: &Init, shape: &[usize], stream: u64) -> Vec<f32> {
    init_from_base(init, shape.iter().product(), stream << 40)
}

const PAR_MIN: usize = 1 << 16;

fn fill(n: usize, f: impl Fn(usize) -> f32 + Sync + Send) -> Vec<f32> {
    if n >= PAR_MIN { (0..n).into_par_iter().map(f).collect() } else { (0..n).map(f).collect() }
}

/// `n` values of `init` from the sequence starting after `base`.
pub fn init_from_base(init: &Init, n: usize, base: u64) -> Vec<f32> {
    let h = move |i: usize| splitmix_nth(base.wrapping_add(i as u64).wrapping_add(1));
    match *init {
        Init::Zeros => vec![0.0; n],
        Init::Ones => vec![1.0; n],
        Init::Constant(v) => vec![v as f32; n],
        Init::Uniform { low, high } => {
            if low == -high {
                fill(n, move |i| uniform_sym(h(i), high))
            } else {
                fill(n, move |i| (low + (high - low) * unit_f64(h(i))) as f32)
            }
        }
        Init::Normal { mean, std } => fill(n, move |i| {
            let k = i & !1;
            let u1 = 1.0 - unit_f64(h(k));
            let u2 = unit_f64(h(k + 1));
            let r = (-2.0 * u1.ln()).sqrt();
            let t = std::f64::consts::TAU * u2;
            let z = if i & 1 == 0 { r * t.cos() } else { r * t.sin() };
            (mean + std * z) as f32
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(v: &[f32]) -> (f64, f64) {
        let n = v.len() as f64;
        let m = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / n;
        (m, var.sqrt())
    }

    #[test]
    fn deterministic_and_name_dependent() {
        let init = Init::Normal { mean: 0.0, std: 1.0 };
        let a = init_param(&init, &[10, 10], "fc1.weight", 0);
        let b = init_param(&init, &[10, 10], "fc1.weight", 0);
        let c = init_param(&init, &[10, 10], "fc2.weight", 0);
        let d = init_param(&init, &[10, 10], "fc1.weight", 1);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
        // Large tensors (parallel path) agree with the sequential definition.
        let big = init_param(&init, &[PAR_MIN + 3], "w", 9);
        let small = init_param(&init, &[100], "w", 9);
        assert_eq!(&big[..100], &small[..]);
    }

    #[test]
    fn uniform_stats() {
        let v = init_param(&Init::Uniform { low: -0.5, high: 1.5 }, &[100_000], "u", 3);
        assert!(v.iter().all(|&x| (-0.5..=1.5).contains(&x)));
        let (m, s) = stats(&v);
        assert!((m - 0.5).abs() < 0.01, "{m}");
        assert!((s - 2.0 / 12f64.sqrt()).abs() < 0.01, "{s}");
        let v = init_param(&Init::Uniform { low: -0.1, high: 0.1 }, &[100_000], "u", 3);
        let (m, s) = stats(&v);
        assert!(m.abs() < 0.001, "{m}");
        assert!((s - 0.2 / 12f64.sqrt()).abs() < 0.001, "{s}");
    }

    #[test]
    fn normal_stats() {
        let v = init_param(&Init::Normal { mean: 2.0, std: 0.5 }, &[100_000], "n", 11);
        assert!(v.iter().all(|x| x.is_finite()));
        let (m, s) = stats(&v);
        assert!((m - 2.0).abs() < 0.01, "{m}");
        assert!((s - 0.5).abs() < 0.01, "{s}");
    }

    #[test]
    fn constants() {
        assert_eq!(init_param(&Init::Zeros, &[2, 3], "a", 0), vec![0.0; 6]);
        assert_eq!(init_param(&Init::Ones, &[4], "a", 0), vec![1.0; 4]);
        assert_eq!(init_param(&Init::Constant(0.25), &[3], "a", 0), vec![0.25; 3]);
        assert!(init_param(&Init::Ones, &[0, 5], "a", 0).is_empty());
        assert_eq!(init_param(&Init::Ones, &[], "scalar", 0), vec![1.0]);
    }

    #[test]
    fn models_md_stream_recipe() {
        let a = 1.0 / 64f64.sqrt();
        let w = init_param_stream(&Init::Uniform { low: -a, high: a }, &[64, 256], 0);
        let bits: Vec<u32> = w[..3].iter().map(|x| x.to_bits()).collect();
        assert_eq!(bits, vec![0x3dc44150, 0xbc8c3b0d, 0xbdf27746]);
    }
}
