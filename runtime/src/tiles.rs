//! Products of small, cache-resident matrices on one thread: attention's per-block
//! products (`q kᵀ`, `p v` and the four of the backward, 64 query rows against at most a
//! few hundred keys, head sizes 32–128), and a row group's panels against a weight
//! packed once for all of them ([`pack`], [`product_packed`]: the `gemm` crate would
//! pack it again for every panel).
//!
//! The `gemm` crate packs both operands and dispatches per call; on these shapes it ran
//! at about a third of one core's FMA peak inside attention (`perf`: its micro-kernel
//! half the time, with `k` = 32 per tile). Here only `B` is packed, into strips of 16
//! columns (a transpose like `kᵀ` through 8 × 8 in-register transposes), and `C` is
//! computed in register tiles of up to 6 rows × 16 columns (12 AVX2 accumulators), each
//! step of the sum broadcasting 6 elements of `A` (any strides, so `Aᵀ` costs nothing)
//! against one contiguous 16-element row of the strip.
//!
//! Results differ from the `gemm` crate's in rounding only (FMA, the sum in order of
//! `k`); they do not depend on the thread count. Without AVX2 and FMA the crate is used.

use crate::gemm::View;

/// `c = alpha · a @ b`, or `c += alpha · a @ b` with `accumulate` (`a`: m × k, `b`:
/// k × n, `c`: m × n with row stride `ldc` and contiguous rows), on this thread.
/// `pack` is scratch for `b`'s strips.
///
/// # Safety
/// Every view must cover its matrix; `c` must not overlap `a` or `b` and is written by
/// this call only.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn product(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    a: View,
    b: View,
    alpha: f32,
    pack: &mut Vec<f32>,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                // SAFETY: c covers m rows of n at stride ldc.
                unsafe { std::slice::from_raw_parts_mut(c.add(r * ldc), n).fill(0.0) };
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        let packed = b.cs != 1;
        if packed {
            // SAFETY: b covers k × n.
            unsafe { self::pack(k, n, b, pack, false) };
        }
        // SAFETY: forwarded from the caller; a packed b is in `pack`; AVX2 and FMA were
        // detected.
        unsafe { avx2::product(m, n, k, c, ldc, accumulate, a, if packed { None } else { Some(b) }, pack.as_ptr(), alpha) };
        return;
    }
    let _ = pack;
    // SAFETY: forwarded from the caller.
    unsafe { crate::gemm::product(m, n, k, View::dense(c, ldc), accumulate, a, b, alpha, ::gemm::Parallelism::None) }
}

/// `b` (k × n, any strides) packed into strips in `dst` for [`product_packed`], once for
/// many products with the same `b` (a row group's panels all multiply one weight), by
/// the current rayon pool's threads with `parallel`; `false` (and `dst` untouched)
/// without AVX2 and FMA.
///
/// # Safety
/// `b` must cover k × n.
pub(crate) unsafe fn pack(k: usize, n: usize, b: View, dst: &mut Vec<f32>, parallel: bool) -> bool {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        use rayon::prelude::*;
        dst.clear();
        dst.resize(k * n.next_multiple_of(8), 0.0);
        // Column ranges of whole strips (a multiple of 16 wide, the last takes the rest),
        // packed in parallel when large: strip j lies at j · k whichever range packs it.
        let pieces = if parallel && k * n >= 1 << 16 { rayon::current_num_threads() * 2 } else { 1 };
        if pieces == 1 {
            // On this thread: a parallel iterator, even over one piece, hands the work to
            // a rayon pool (the global one outside the executor's, e.g. with one thread).
            // SAFETY: b covers k × n; dst holds every strip; AVX2 was detected.
            unsafe { avx2::pack(k, n, b, dst.as_mut_ptr()) };
            return true;
        }
        let width = n.div_ceil(pieces).next_multiple_of(16);
        let (d, bp) = (dst.as_mut_ptr() as usize, b.ptr as usize);
        (0..n.div_ceil(width)).into_par_iter().for_each(|i| {
            let (j0, j1) = (i * width, ((i + 1) * width).min(n));
            let sub = View { ptr: (bp as *const f32).wrapping_add(j0 * b.cs), ..b };
            // SAFETY: b covers k × n, so columns j0..j1 too; the range's strips lie in
            // dst from j0 · k on, disjoint from the other ranges'; AVX2 was detected.
            unsafe { avx2::pack(k, j1 - j0, sub, (d as *mut f32).add(j0 * k)) };
        });
        return true;
    }
    let _ = (k, n, b, dst);
    false
}

/// `c (+)= a @ b` with `b` already packed by [`pack`] (which returned `true`).
///
/// # Safety
/// As [`product`]; `packed` holds `b` (k × n) packed by [`pack`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn product_packed(m: usize, n: usize, k: usize, c: *mut f32, ldc: usize, accumulate: bool, a: View, packed: &[f32]) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    assert!(packed.len() >= k * n.next_multiple_of(8), "product_packed: `b` is not packed");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: forwarded from the caller; `pack` ran, so AVX2 and FMA are present.
    unsafe {
        avx2::product(m, n, k, c, ldc, accumulate, a, None, packed.as_ptr(), 1.0)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (c, ldc, accumulate, a);
}

/// The strips of `n` columns: `(first column, width in the packing, columns used)` —
/// 16 wide, then one of 8, then the last `n % 8` columns padded to 8. Strip `j`'s `k`
/// rows of `width` start at `j · k` in the packing.
fn strips(n: usize) -> impl Iterator<Item = (usize, usize, usize)> {
    let n16 = n - n % 16;
    let full = (0..n16).step_by(16).map(|j| (j, 16, 16));
    let eight = (n % 16 >= 8).then_some((n16, 8, 8));
    let j = n - n % 8;
    let tail = (!n.is_multiple_of(8)).then_some((j, 8, n - j));
    full.chain(eight).chain(tail)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::strips;
    use crate::gemm::View;
    use std::arch::x86_64::*;

    /// Rows of a register tile.
    const MR: usize = 6;

    /// Copies `b` (k × n, any strides) into its strips (see [`strips`]; `dst` zeroed).
    /// A transposed `b` (`b.rs == 1`) goes through 8 × 8 blocks: eight contiguous reads
    /// of 8, transposed in registers, eight contiguous writes of 8.
    ///
    /// # Safety
    /// `b` covers k × n; `dst` holds `k · n.next_multiple_of(8)` floats; AVX2 present.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn pack(k: usize, n: usize, b: View, dst: *mut f32) {
        let k8 = k - k % 8;
        // SAFETY: every index below is inside k × n and inside its strip.
        unsafe {
            for (j, w, used) in strips(n) {
                let strip = dst.add(j * k);
                let mut t0 = 0;
                if b.rs == 1 && used % 8 == 0 {
                    for c in (0..used).step_by(8) {
                        for t in (0..k8).step_by(8) {
                            // Column j + c + l of b (contiguous along t) is row l here.
                            let r: [__m256; 8] = std::array::from_fn(|l| _mm256_loadu_ps(b.ptr.add((j + c + l) * b.cs + t)));
                            for (l, row) in transpose8(r).iter().enumerate() {
                                _mm256_storeu_ps(strip.add((t + l) * w + c), *row);
                            }
                        }
                    }
                    t0 = k8;
                }
                for t in t0..k {
                    for c in 0..used {
                        *strip.add(t * w + c) = *b.ptr.add(t * b.rs + (j + c) * b.cs);
                    }
                }
            }
        }
    }

    /// The transpose of an 8 × 8 block held as eight rows.
    #[inline(always)]
    unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        // SAFETY: register shuffles only.
        unsafe {
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            let t4 = _mm256_unpacklo_ps(r[4], r[5]);
            let t5 = _mm256_unpackhi_ps(r[4], r[5]);
            let t6 = _mm256_unpacklo_ps(r[6], r[7]);
            let t7 = _mm256_unpackhi_ps(r[6], r[7]);
            let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            [
                _mm256_permute2f128_ps::<0x20>(u0, u4),
                _mm256_permute2f128_ps::<0x20>(u1, u5),
                _mm256_permute2f128_ps::<0x20>(u2, u6),
                _mm256_permute2f128_ps::<0x20>(u3, u7),
                _mm256_permute2f128_ps::<0x31>(u0, u4),
                _mm256_permute2f128_ps::<0x31>(u1, u5),
                _mm256_permute2f128_ps::<0x31>(u2, u6),
                _mm256_permute2f128_ps::<0x31>(u3, u7),
            ]
        }
    }

    /// `c (+)= alpha · a @ b`, `b` read in place when its rows are contiguous (`direct`),
    /// else from its strips in `packed`: in each strip, tiles of [`MR`] rows; the last
    /// strip's unused columns are neither read from `b` nor read or written in `c`.
    ///
    /// # Safety
    /// As [`super::product`]; `direct` has `cs == 1`, else `packed` holds `b` packed by
    /// [`pack`]; AVX2 and FMA present.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn product(
        m: usize,
        n: usize,
        k: usize,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
        a: View,
        direct: Option<View>,
        packed: *const f32,
        alpha: f32,
    ) {
        for (j, w, used) in strips(n) {
            let lanes: [i32; 8] = std::array::from_fn(|l| if l < used % 8 || used % 8 == 0 { -1 } else { 0 });
            let (b, brs) = match direct {
                Some(b) => (b.ptr.wrapping_add(j), b.rs),
                None => (packed.wrapping_add(j * k), w),
            };
            // SAFETY: the tiles stay inside m × n and the strip (the mask limits the
            // last columns).
            unsafe {
                let mask = _mm256_loadu_si256(lanes.as_ptr() as *const __m256i);
                let strip = Strip { c: c.add(j), ldc, accumulate, a, b, brs, k, alpha, mask };
                match (w, used) {
                    (16, _) => strip.rows::<2, false>(m),
                    (_, 8) => strip.rows::<1, false>(m),
                    _ => strip.rows::<1, true>(m),
                }
            }
        }
    }

    /// One strip of `c`'s columns and what its tiles share.
    struct Strip {
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
        a: View,
        /// The strip of `b`: `k` rows of `8·V` floats, `brs` apart.
        b: *const f32,
        brs: usize,
        k: usize,
        alpha: f32,
        /// The lanes of the strip's last vector that are columns (of `b` and `c`).
        mask: __m256i,
    }

    impl Strip {
        #[inline(always)]
        unsafe fn rows<const V: usize, const MASKED: bool>(&self, m: usize) {
            let mut i = 0;
            // SAFETY (every call): rows i .. i + R exist.
            while i + MR <= m {
                unsafe { self.tile::<MR, V, MASKED>(i) };
                i += MR;
            }
            unsafe {
                match m - i {
                    0 => {}
                    1 => self.tile::<1, V, MASKED>(i),
                    2 => self.tile::<2, V, MASKED>(i),
                    3 => self.tile::<3, V, MASKED>(i),
                    4 => self.tile::<4, V, MASKED>(i),
                    _ => self.tile::<5, V, MASKED>(i),
                }
            }
        }

        /// Rows `i .. i + R` of the strip: `R·V` accumulators over the whole sum, then
        /// scaled by `alpha` and stored (added to `c` with `accumulate`). With `MASKED`
        /// the strip's single vector is cut to the mask's lanes, in `b` and `c`.
        #[inline(always)]
        unsafe fn tile<const R: usize, const V: usize, const MASKED: bool>(&self, i: usize) {
            let a = self.a;
            // SAFETY: the caller's rows exist; the strip holds k rows of 8·V (of which the
            // mask's lanes when MASKED).
            unsafe {
                let mut acc = [[_mm256_setzero_ps(); V]; R];
                let mut ap = a.ptr.add(i * a.rs);
                let mut bp = self.b;
                for _ in 0..self.k {
                    let bv: [__m256; V] =
                        std::array::from_fn(|v| if MASKED { _mm256_maskload_ps(bp, self.mask) } else { _mm256_loadu_ps(bp.add(8 * v)) });
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let av = _mm256_broadcast_ss(&*ap.add(r * a.rs));
                        for v in 0..V {
                            acc[v] = _mm256_fmadd_ps(av, bv[v], acc[v]);
                        }
                    }
                    ap = ap.add(a.cs);
                    bp = bp.add(self.brs);
                }
                let scale = _mm256_set1_ps(self.alpha);
                for (r, acc) in acc.iter().enumerate() {
                    let cp = self.c.add((i + r) * self.ldc);
                    for (v, &sum) in acc.iter().enumerate() {
                        let mut x = _mm256_mul_ps(sum, scale);
                        let at = cp.add(8 * v);
                        if MASKED {
                            if self.accumulate {
                                x = _mm256_add_ps(x, _mm256_maskload_ps(at, self.mask));
                            }
                            _mm256_maskstore_ps(at, self.mask, x);
                        } else {
                            if self.accumulate {
                                x = _mm256_add_ps(x, _mm256_loadu_ps(at));
                            }
                            _mm256_storeu_ps(at, x);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every shape class (full strips, the 8-wide strip, masked tails, every row
    /// remainder), transposed and strided operands, accumulation and scaling, against a
    /// naive f64 product.
    #[test]
    fn products_match_a_naive_sum() {
        sweep(false, false);
    }

    /// The same with `b` packed once (`pack`, in column ranges by several threads when
    /// large: a row group's weights) and multiplied by `product_packed`.
    #[test]
    fn products_of_a_packed_b_match_a_naive_sum() {
        sweep(true, false);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        pool.install(|| sweep(true, true));
    }

    fn sweep(packed_once: bool, parallel: bool) {
        let (mut strips, mut pack_b) = (vec![], vec![]);
        let shapes = [(1, 1, 1), (6, 16, 3), (7, 17, 5), (13, 40, 32), (64, 37, 9), (5, 8, 64), (64, 128, 32), (3, 3, 200), (9, 300, 250)];
        for (m, n, k) in shapes {
            for (ta, tb, accumulate) in [(false, false, false), (true, false, true), (false, true, false), (true, true, true)] {
                let val = |s: usize, i: usize| ((i * 7919 + s * 104729) % 1000) as f32 / 500.0 - 1.0;
                // A: m × k (or its transpose in memory), padded rows so strides are not dense.
                let (ars, acs, alen) = if ta { (1, m + 3, k * (m + 3)) } else { (k + 2, 1, m * (k + 2)) };
                let (brs, bcs, blen) = if tb { (1, k + 1, n * (k + 1)) } else { (n + 5, 1, k * (n + 5)) };
                let av: Vec<f32> = (0..alen).map(|i| val(1, i)).collect();
                let bv: Vec<f32> = (0..blen).map(|i| val(2, i)).collect();
                let ldc = n + 4;
                let mut cv: Vec<f32> = (0..m * ldc).map(|i| val(3, i)).collect();
                let before = cv.clone();
                let alpha = if packed_once { 1.0 } else { 0.75 };
                let (a, b) = (View { ptr: av.as_ptr(), rs: ars, cs: acs }, View { ptr: bv.as_ptr(), rs: brs, cs: bcs });
                // SAFETY: the views cover their matrices; c is distinct.
                if packed_once && unsafe { pack(k, n, b, &mut pack_b, parallel) } {
                    unsafe { product_packed(m, n, k, cv.as_mut_ptr(), ldc, accumulate, a, &pack_b) };
                } else if packed_once {
                    continue;
                } else {
                    unsafe { product(m, n, k, cv.as_mut_ptr(), ldc, accumulate, a, b, alpha, &mut strips) };
                }
                for r in 0..m {
                    for col in 0..ldc {
                        let got = cv[r * ldc + col];
                        if col >= n {
                            assert_eq!(got.to_bits(), before[r * ldc + col].to_bits(), "wrote past column {n}");
                            continue;
                        }
                        let dot: f64 = (0..k).map(|t| av[r * ars + t * acs] as f64 * bv[t * brs + col * bcs] as f64).sum();
                        let want = alpha as f64 * dot + if accumulate { before[r * ldc + col] as f64 } else { 0.0 };
                        assert!(
                            (got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{m}x{n}x{k} ta {ta} tb {tb}: ({r}, {col}) {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}

/// Times [`product`], [`product_packed`] (`b` packed once, outside the timing) and the
/// `gemm` crate on attention's block shapes and row-group panels, operands in cache:
/// `cargo test --release -p bm-runtime tiles::timing -- --ignored --nocapture`.
#[cfg(test)]
mod timing {
    use super::*;

    #[test]
    #[ignore]
    fn attention_blocks() {
        // (m, n, k, a transposed, b transposed): q kᵀ, p v, dsᵀ q — W2's head size, then W3's.
        compare(&[
            (64, 128, 32, false, true),
            (64, 32, 128, false, false),
            (128, 32, 64, true, false),
            (64, 256, 64, false, true),
            (64, 64, 256, false, false),
            (256, 64, 64, true, false),
        ]);
    }

    /// Row-group panels of W1 (64 rows) and W2 (128 rows): `x Wᵀ` forward, `dy W` backward.
    #[test]
    #[ignore]
    fn row_panels() {
        compare(&[
            (64, 256, 64, false, true),
            (64, 256, 256, false, true),
            (64, 10, 256, false, true),
            (64, 256, 256, false, false),
            (64, 256, 10, false, false),
            (128, 512, 128, false, true),
            (128, 128, 512, false, true),
            (128, 128, 512, false, false),
            (128, 512, 128, false, false),
            (128, 384, 128, false, true),
        ]);
    }

    fn compare(shapes: &[(usize, usize, usize, bool, bool)]) {
        for &(m, n, k, ta, tb) in shapes {
            let a = vec![0.5f32; m * k];
            let b = vec![0.25f32; k * n];
            let mut c = vec![0.0f32; m * n];
            let av = if ta { View { ptr: a.as_ptr(), rs: 1, cs: m } } else { View::dense(a.as_ptr(), k) };
            let bv = if tb { View { ptr: b.as_ptr(), rs: 1, cs: k } } else { View::dense(b.as_ptr(), n) };
            let mut pack = vec![];
            // `b` packed once, outside the timing (a row group's weight).
            let mut once = vec![];
            // SAFETY: bv covers k × n.
            let packed_once = unsafe { super::pack(k, n, bv, &mut once, false) };
            let cp = c.as_mut_ptr();
            // About 50 MFLOP a round (200 of attention's 64 × 128 × 32 blocks).
            let reps = (200 * 64 * 128 * 32 / (m * n * k)).max(2);
            // Alternating rounds, so that all see the same load on a shared host.
            let (mut ours, mut theirs, mut prepacked) = (vec![], vec![], vec![]);
            for _ in 0..31 {
                for (times, variant) in [(&mut ours, 0), (&mut theirs, 1), (&mut prepacked, 2)] {
                    let t0 = std::time::Instant::now();
                    for _ in 0..reps {
                        // SAFETY: the views cover their matrices; `once` holds b packed.
                        unsafe {
                            match variant {
                                0 => product(m, n, k, cp, n, false, av, bv, 1.0, &mut pack),
                                1 => crate::gemm::product(m, n, k, View::dense(cp, n), false, av, bv, 1.0, ::gemm::Parallelism::None),
                                _ if packed_once => product_packed(m, n, k, cp, n, false, av, &once),
                                _ => {}
                            }
                        }
                    }
                    times.push(2.0 * (m * n * k) as f64 * reps as f64 / t0.elapsed().as_secs_f64() / 1e9);
                }
            }
            let median = |v: &mut Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let (tiles, krate, once) = (median(&mut ours), median(&mut theirs), median(&mut prepacked));
            println!(
                "{m}x{n}x{k} ta={ta} tb={tb}: tiles {tiles:.1} GFLOP/s, with b packed once {once:.1}, gemm crate {krate:.1} (medians of 31 alternating rounds)"
            );
        }
    }
}
