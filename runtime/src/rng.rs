//! Deterministic random numbers.
//!
//! Two tools, both built on SplitMix64:
//!
//! - [`splitmix_h`]: the counter-based hash `h(s, i)` of the benchmark recipe
//!   (`shared/bench/peers/models.md`): element `i` of stream `s` is the
//!   `n = (s << 40) + i + 1`-th output of SplitMix64 started from state 0. It needs no
//!   state, so tensors can be filled in parallel and any element recomputed alone.
//!   [`uniform_sym`] turns one such value into a symmetric uniform `f32`.
//! - [`Rng`]: a sequential SplitMix64 generator whose whole state is one `u64`
//!   ([`Rng::state`] / [`Rng::from_state`]), so a resumed run continues exactly.

/// The SplitMix64 increment (the golden ratio in 64-bit fixed point).
pub const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function applied to an (already incremented) state `z`.
#[inline]
pub fn mix64(z: u64) -> u64 {
    let z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The `n`-th output (n ≥ 1) of SplitMix64 started from state 0.
#[inline]
pub fn splitmix_nth(n: u64) -> u64 {
    mix64(n.wrapping_mul(GOLDEN))
}

/// `h(s, i)` of models.md: the `n`-th output of SplitMix64 started from state 0 with
/// `n = (stream << 40) + i + 1` (all arithmetic modulo 2^64; the recipe keeps
/// `stream < 2^24` and `i < 2^40`, larger values simply wrap).
#[inline]
pub fn splitmix_h(stream: u64, i: u64) -> u64 {
    splitmix_nth((stream << 40).wrapping_add(i).wrapping_add(1))
}

/// `u = (h >> 11) · 2^-53`, exactly representable, in `[0, 1)`.
#[inline]
pub fn unit_f64(h: u64) -> f64 {
    (h >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// A symmetric uniform value of half-width `a`: `f32((2u − 1) · a)` with `u` from
/// [`unit_f64`], computed in f64 and rounded once to f32 (nearest-even).
#[inline]
pub fn uniform_sym(h: u64, a: f64) -> f32 {
    ((2.0 * unit_f64(h) - 1.0) * a) as f32
}

/// A seeded SplitMix64 generator. Its full state is one `u64`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// The standard SplitMix64 seeded with `seed` (its first output for seed 0 is
    /// `h(0, 0)`).
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    /// A generator for an independent purpose (`stream`) under one seed: the seed and
    /// the stream are hashed together so nearby seeds/streams give unrelated sequences.
    pub fn with_stream(seed: u64, stream: u64) -> Rng {
        Rng { state: mix64(seed.wrapping_mul(GOLDEN) ^ mix64(stream.wrapping_add(GOLDEN))) }
    }

    /// The whole state; `Rng::from_state(r.state())` continues exactly where `r` is.
    pub fn state(&self) -> u64 {
        self.state
    }

    pub fn from_state(state: u64) -> Rng {
        Rng { state }
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        mix64(self.state)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    #[inline]
    pub fn uniform(&mut self) -> f64 {
        unit_f64(self.next_u64())
    }

    /// Uniform in `0..n` without modulo bias (Lemire's multiply-and-reject).
    /// `below(0)` returns 0.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = (self.next_u64() as u128) * (n as u128);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            xs.swap(i, j);
        }
    }

    /// A standard normal value (Box–Muller, the cosine branch; two draws per value so
    /// that the state stays one `u64`).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_md_vectors() {
        assert_eq!(splitmix_h(0, 0), 0xe220a8397b1dcdaf);
        assert_eq!(splitmix_h(0, 1), 0x6e789e6aa1b965f4);
        assert_eq!(splitmix_h(0, 2), 0x06c45d188009454f);
        assert_eq!(splitmix_h(1 << 20, 0), 0x11dbeafbcb494d31);
        assert_eq!(splitmix_h(1 << 20, 1), 0xc1d65315eec5d7f0);
    }

    #[test]
    fn models_md_uniform_bits() {
        // mlp-digits fc1.w[0, 0:3]: stream 0, a = 1/sqrt(64)
        let a = 1.0 / 64f64.sqrt();
        let got: Vec<u32> = (0..3).map(|i| uniform_sym(splitmix_h(0, i), a).to_bits()).collect();
        assert_eq!(got, vec![0x3dc44150, 0xbc8c3b0d, 0xbdf27746]);
        // GPT wte[0, 0:3]: stream 0, a = 0.02 * sqrt(3)
        let a = 0.02 * 3f64.sqrt();
        let got: Vec<u32> = (0..3).map(|i| uniform_sym(splitmix_h(0, i), a).to_bits()).collect();
        assert_eq!(got, vec![0x3cd98d20, 0xbb9b728c, 0xbd066364]);
    }

    #[test]
    fn models_md_tokens() {
        // gpt-tiny batch 0 row 0: element i of the [B, T+1] array = h(2^20, i) mod V
        let toks: Vec<u64> = (0..8).map(|i| splitmix_h(1 << 20, i) % 65).collect();
        assert_eq!(toks, vec![38, 11, 60, 42, 10, 62, 58, 41]);
        let toks: Vec<u64> = (0..8).map(|i| splitmix_h(1 << 20, i) % 512).collect();
        assert_eq!(toks, vec![305, 496, 434, 288, 343, 240, 222, 111]);
    }

    #[test]
    fn rng_is_standard_splitmix() {
        let mut r = Rng::new(0);
        assert_eq!(r.next_u64(), splitmix_h(0, 0));
        assert_eq!(r.next_u64(), splitmix_h(0, 1));
    }

    #[test]
    fn state_round_trip() {
        let mut a = Rng::with_stream(42, 7);
        for _ in 0..10 {
            a.next_u64();
        }
        let mut b = Rng::from_state(a.state());
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
            assert_eq!(a.normal().to_bits(), b.normal().to_bits());
        }
    }

    #[test]
    fn below_is_in_range_and_unbiased() {
        let mut r = Rng::new(1);
        let mut counts = [0usize; 7];
        for _ in 0..70_000 {
            let x = r.below(7);
            assert!(x < 7);
            counts[x as usize] += 1;
        }
        for c in counts {
            assert!((9_500..10_500).contains(&c), "{counts:?}");
        }
        assert_eq!(r.below(0), 0);
        assert_eq!(r.below(1), 0);
        for _ in 0..1000 {
            assert!(r.below(u64::MAX) < u64::MAX);
        }
    }

    #[test]
    fn shuffle_is_permutation() {
        let mut r = Rng::new(3);
        let mut v: Vec<usize> = (0..1000).collect();
        r.shuffle(&mut v);
        assert_ne!(v, (0..1000).collect::<Vec<_>>());
        let mut s = v.clone();
        s.sort();
        assert_eq!(s, (0..1000).collect::<Vec<_>>());
        let mut empty: [u8; 0] = [];
        r.shuffle(&mut empty);
    }

    #[test]
    fn uniform_and_normal_stats() {
        let mut r = Rng::new(5);
        let n = 100_000;
        let us: Vec<f64> = (0..n).map(|_| r.uniform()).collect();
        assert!(us.iter().all(|&u| (0.0..1.0).contains(&u)));
        let m = us.iter().sum::<f64>() / n as f64;
        assert!((m - 0.5).abs() < 0.01);
        let zs: Vec<f64> = (0..n).map(|_| r.normal()).collect();
        assert!(zs.iter().all(|z| z.is_finite()));
        let m = zs.iter().sum::<f64>() / n as f64;
        let v = zs.iter().map(|z| (z - m) * (z - m)).sum::<f64>() / n as f64;
        assert!(m.abs() < 0.02, "{m}");
        assert!((v - 1.0).abs() < 0.02, "{v}");
    }
}
