//! Products of small, cache-resident matrices on one thread: attention's per-block
//! products (`q kᵀ`, `p v` and the four of the backward, 64 query rows against at most a
//! few hundred keys, head sizes 32–128), and a row group's panels against a weight
//! packed once for all of them ([`pack`], [`product_packed`]: the `gemm` crate would
//! pack it again for every panel).
//!
//! The `gemm` crate packs both operands and dispatches per call; on these shapes it ran
//! at about a third of one core's FMA peak inside attention (`perf`: its micro-kernel
//! half the time, with `k` = 32 per tile). Here only `B` is packed, into strips two
//! vectors wide (a transpose like `kᵀ` through 8 × 8 in-register transposes), and `C` is
//! computed in register tiles of up to [`avx512::MR`] rows × 32 columns with AVX-512 (24
//! of its 32 registers accumulate), or [`avx2::MR`] rows × 16 columns with AVX2 (12 of
//! 16), each step of the sum broadcasting one element of `A` per row (any strides, so
//! `Aᵀ` costs nothing) against one contiguous row of the strip.
//!
//! Every element of `C` is one sum in order of `k` with FMA, then scaled: the results
//! are the same bit for bit with AVX-512 and AVX2, and whatever the thread count; they
//! differ from the `gemm` crate's in rounding only. Without AVX2 and FMA the crate is
//! used.

use crate::gemm::View;
/// The register tiles' vector width on this CPU, in floats: 16 with AVX-512F (unless
/// switched off, `crate::cpu`), 8 with AVX2 and FMA, `None` without (the `gemm` crate
/// then).
fn lanes() -> Option<usize> {
    if crate::cpu::avx512() {
        Some(16)
    } else if crate::cpu::avx2_fma() {
        Some(8)
    } else {
        None
    }
}

/// Whether this CPU has register tiles (else [`product`] calls the `gemm` crate).
pub(crate) fn usable() -> bool {
    lanes().is_some()
}

/// The width of a full strip of columns on this CPU (two vectors), `None` without
/// tiles: products split among threads at multiples of it.
pub(crate) fn strip_width() -> Option<usize> {
    lanes().map(|l| 2 * l)
}

/// Rows of the widest register tile: products split among threads at multiples of it.
pub(crate) const ROWS: usize = 12;

/// Steps of the sum per block (`KC`), rows per block (`MC`, a multiple of both widths'
/// tile rows) and columns per block (`NC`, whole strips of both widths): a block of `a`
/// (`MC × KC`, 192 KiB) stays in L2 across the block's strips, a strip's block of `b`
/// (`KC` × 32, 32 KiB) in L1 across its tiles, the block of `c` (`MC × NC`, 384 KiB) in
/// L2 across the blocks of the sum. (With the blocks of the sum inside the strips
/// instead, W3's long sums ran at 78–82% of the FMA peak on two threads: a block's rows
/// of `a` over the whole sum, 1.1 MiB, did not fit in L2; now 90%, `gemm::timing`.)
const KC: usize = 256;
const MC: usize = 192;
const NC: usize = 512;

/// Rows per block for a sum of `k` that runs in one block (a product that adds to `c`
/// or scales): [`MC`], fewer for long sums, so that the block's `a` stays within half
/// of a 1 MiB L2.
fn rows_per_block(k: usize) -> usize {
    const FLOATS: usize = (512 << 10) / 4;
    (FLOATS / k.max(1) / 24 * 24).clamp(24, MC)
}

/// Every width this CPU can run, widest first (for tests and timing).
#[cfg(test)]
fn available() -> Vec<Option<usize>> {
    let mut v = vec![];
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        v.push(Some(16));
    }
    if crate::cpu::avx2_fma() {
        v.push(Some(8));
    }
    v.push(None);
    v
}

/// `b` packed into strips for [`product_packed`] (by [`pack`]), and the vector width
/// the strips were made for; and room for a narrow product's transposed result
/// ([`product`]).
#[derive(Default)]
pub(crate) struct Packed {
    strips: Vec<f32>,
    lanes: usize,
    transposed: Vec<f32>,
}

#[cfg(test)]
impl Packed {
    /// Whether nothing was ever packed here.
    pub(crate) fn is_empty(&self) -> bool {
        self.strips.is_empty()
    }
}

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
    pack: &mut Packed,
) {
    // SAFETY: forwarded from the caller.
    unsafe { product_in(m, n, k, c, ldc, accumulate, a, b, alpha, pack, lanes()) }
}

/// [`product`] with tiles of `lanes` (a width [`available`] lists; `None`: the `gemm` crate).
#[allow(clippy::too_many_arguments)]
unsafe fn product_in(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    a: View,
    b: View,
    alpha: f32,
    pack: &mut Packed,
    lanes: Option<usize>,
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
    if let Some(l) = lanes {
        if n < l && m >= 2 * l {
            // Fewer columns than a vector (a classifier's 10 outputs): a tile here would
            // broadcast one element of `a` per multiply-add into a vector mostly unused.
            // `cᵀ = bᵀ aᵀ` has `m` columns instead, in full strips; each element is the
            // same sum in the same order (scaled the same way, then added), so the result
            // is the same bit for bit. Measured (`gemm::timing`, one thread) on W1's
            // 256 × 10 × 128 weight gradient: 72 → 171 GFLOP/s.
            let mut t = std::mem::take(&mut pack.transposed);
            t.clear();
            t.resize(n * m, 0.0);
            // SAFETY: forwarded; `t` holds the n × m transpose, distinct from a, b and c.
            unsafe { product_in(n, m, k, t.as_mut_ptr(), m, false, b.t(), a.t(), alpha, pack, lanes) };
            for i in 0..m {
                // SAFETY: c covers m rows of n at stride ldc.
                let row = unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), n) };
                for (j, x) in row.iter_mut().enumerate() {
                    let v = t[j * m + i];
                    *x = if accumulate { *x + v } else { v };
                }
            }
            pack.transposed = t;
            return;
        }
        // A `b` with contiguous rows is read in place, any other is packed first.
        let direct = b.cs == 1;
        if !direct {
            // SAFETY: b covers k × n.
            unsafe { pack_in(k, n, b, pack, false, l) };
        }
        // SAFETY: forwarded from the caller; a packed b is in `pack`, for width `l`.
        unsafe { run(m, n, k, c, ldc, accumulate, a, direct.then_some(b), pack, if direct { l } else { pack.lanes }, alpha) };
        return;
    }
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
pub(crate) unsafe fn pack(k: usize, n: usize, b: View, dst: &mut Packed, parallel: bool) -> bool {
    let Some(l) = lanes() else { return false };
    // SAFETY: forwarded from the caller.
    unsafe { pack_in(k, n, b, dst, parallel, l) };
    true
}

/// [`pack`] for tiles of `l` lanes (a width [`available`] lists).
///
/// # Safety
/// `b` must cover k × n.
unsafe fn pack_in(k: usize, n: usize, b: View, dst: &mut Packed, parallel: bool, l: usize) {
    use rayon::prelude::*;
    dst.lanes = l;
    let strips = &mut dst.strips;
    // Grown, not cleared: every lane a strip's tiles read is written below (the last
    // strip's unused lanes are masked off in `b` as in `c`), and zeroing the whole
    // packing first cost a write pass over it per product (W1's forward, every step).
    let len = k * n.next_multiple_of(l);
    if strips.len() < len {
        strips.resize(len, 0.0);
    }
    // Column ranges of whole wide strips (the last takes the rest), packed in parallel
    // when large: strip j lies at j · k whichever range packs it.
    let pieces = if parallel && k * n >= 1 << 16 { rayon::current_num_threads() * 2 } else { 1 };
    if pieces == 1 {
        // On this thread: a parallel iterator, even over one piece, hands the work to a
        // rayon pool (the global one outside the executor's, e.g. with one thread).
        // SAFETY: b covers k × n; strips holds every strip.
        unsafe { pack_range(k, n, b, strips.as_mut_ptr(), l) };
        return;
    }
    let width = n.div_ceil(pieces).next_multiple_of(2 * l);
    let (d, bp) = (strips.as_mut_ptr() as usize, b.ptr as usize);
    (0..n.div_ceil(width)).into_par_iter().for_each(|i| {
        let (j0, j1) = (i * width, ((i + 1) * width).min(n));
        let sub = View { ptr: (bp as *const f32).wrapping_add(j0 * b.cs), ..b };
        // SAFETY: b covers k × n, so columns j0..j1 too; the range's strips lie in dst
        // from j0 · k on, disjoint from the other ranges'.
        unsafe { pack_range(k, j1 - j0, sub, (d as *mut f32).add(j0 * k), l) };
    });
}

/// Packs `b` (k × n) into the strips of width `l` at `dst` (the used columns of each;
/// the last strip's padding is left as it was): with AVX2 rows of a row-major `b` are
/// copied whole and 8 × 8 blocks of a transposed `b` go through registers, else
/// element by element.
///
/// # Safety
/// `b` covers k × n; `dst` holds `k · n.next_multiple_of(l)` floats.
unsafe fn pack_range(k: usize, n: usize, b: View, dst: *mut f32, l: usize) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: forwarded; AVX2 was detected.
        unsafe { avx2::pack(k, n, b, dst, l) };
        return;
    }
    for (j, w, used) in strips(n, l) {
        for t in 0..k {
            for c in 0..used {
                // SAFETY: inside k × n and inside strip j.
                unsafe { *dst.add(j * k + t * w + c) = *b.ptr.add(t * b.rs + (j + c) * b.cs) };
            }
        }
    }
}

/// `c (+)= alpha · a @ b` with `b` already packed by [`pack`] (which returned `true`).
///
/// # Safety
/// As [`product`]; `packed` holds `b` (k × n) packed by [`pack`], or more columns of
/// it when `n` is a [`packed_prefix`] of them.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn product_packed(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    a: View,
    packed: &Packed,
    alpha: f32,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    assert!(packed.lanes > 0 && packed.strips.len() >= k * n.next_multiple_of(packed.lanes), "product_packed: `b` is not packed");
    // SAFETY: forwarded from the caller; `pack` ran, so the width's instructions exist.
    unsafe { run(m, n, k, c, ldc, accumulate, a, None, packed, packed.lanes, alpha) };
}

/// The columns to multiply so that a product over the first `n` of the `all` columns
/// packed in `packed` reads the packing as it lies: `n` rounded up to whole wide strips
/// (at most `all`), since the strips of fewer columns than were packed end in a
/// narrower one, laid out differently. The columns past `n` are computed too (each
/// element the same sum whatever the columns around it), so `c` must have room for them.
/// For attention's causal blocks, whose keys grow block by block over one packing of
/// `kᵀ`.
pub(crate) fn packed_prefix(packed: &Packed, n: usize, all: usize) -> usize {
    n.next_multiple_of(2 * packed.lanes.max(1)).min(all)
}

/// The register tiles of width `l` (16: AVX-512, 8: AVX2) over `b` read in place
/// (`direct`) or from `packed`.
///
/// # Safety
/// As [`product`]; `packed` holds `b` packed for width `l` unless `direct`, and the
/// CPU has the width's instructions.
#[allow(clippy::too_many_arguments)]
unsafe fn run(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    a: View,
    direct: Option<View>,
    packed: &Packed,
    l: usize,
    alpha: f32,
) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: forwarded; `l` is a width `lanes` detected.
    unsafe {
        let p = packed.strips.as_ptr();
        match l {
            16 => avx512::product(m, n, k, c, ldc, accumulate, a, direct, p, alpha),
            8 => avx2::product(m, n, k, c, ldc, accumulate, a, direct, p, alpha),
            _ => unreachable!("register tiles of {l} lanes"),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (m, n, k, c, ldc, accumulate, a, direct, packed, l, alpha);
}

/// The strips of `n` columns for vectors of `l` floats: `(first column, width in the
/// packing, columns used)` — `2l` wide, then one of `l`, then the last `n % l` columns
/// padded to `l`. Strip `j`'s `k` rows of `width` start at `j · k` in the packing.
fn strips(n: usize, l: usize) -> impl Iterator<Item = (usize, usize, usize)> {
    let nw = n - n % (2 * l);
    let full = (0..nw).step_by(2 * l).map(move |j| (j, 2 * l, 2 * l));
    let one = (n % (2 * l) >= l).then_some((nw, l, l));
    let j = n - n % l;
    let tail = (!n.is_multiple_of(l)).then_some((j, l, n - j));
    full.chain(one).chain(tail)
}

/// The register-tile kernel, written once for both vector widths: the vector and mask
/// types, the lanes per vector, and the operations it needs (zero, load, masked load,
/// broadcast, FMA, multiply, add, store, masked store). Expands, in the module of one
/// width, to `Strip` and `product` (compiled for the width's features, `$feat`); that module provides `MR`, `lane_mask` and
/// `Strip::rest` (the tiles of fewer than `MR` rows).
macro_rules! tile_kernel {
    ($feat:literal, $vec:ty, $mask:ty, $lanes:expr, $zero:expr, $load:expr, $mload:expr, $set1:expr, $fma:expr, $mul:expr, $add:expr, $store:expr, $mstore:expr) => {
        /// One strip of `c`'s columns and what its tiles share.
        struct Strip {
            c: *mut f32,
            ldc: usize,
            accumulate: bool,
            /// Whether the sums start from `c` (a later block of the sum) instead of 0.
            resume: bool,
            a: View,
            /// The strip of `b`: `k` rows of `LANES·V` floats, `brs` apart.
            b: *const f32,
            brs: usize,
            k: usize,
            alpha: f32,
            /// The lanes of the strip's last vector that are columns (of `b` and `c`).
            mask: $mask,
        }

        /// `c (+)= alpha · a @ b`, `b` read in place when its rows are contiguous
        /// (`direct`), else from its strips in `packed`: in each strip, tiles of [`MR`]
        /// rows; the last strip's unused columns are neither read from `b` nor read or
        /// written in `c`.
        ///
        /// # Safety
        /// As [`super::product`]; `direct` has `cs == 1`, else `packed` holds `b` packed
        /// for this width; the width's instructions present.
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = $feat)]
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
            // Blocks of MC rows, of NC columns, then of at most KC steps of the sum, and
            // the strips of such a block (sizes at `KC`). A block after the first of the
            // sum resumes each element's sum from `c`, which holds exactly the sum so far
            // when nothing is scaled or added; else the sum runs in one block.
            let kc = if !accumulate && alpha == 1.0 { KC } else { k.max(1) };
            let mc = if kc < k { MC } else { rows_per_block(k) };
            for i0 in (0..m).step_by(mc) {
                let i1 = (i0 + mc).min(m);
                for jc in (0..n).step_by(NC) {
                    for k0 in (0..k).step_by(kc) {
                        let (resume, kb) = (k0 > 0, kc.min(k - k0));
                        let a = View { ptr: a.ptr.wrapping_add(k0 * a.cs), ..a };
                        for (j, w, used) in strips(NC.min(n - jc), $lanes) {
                            // Strip `j` of the whole product (blocks of NC are whole strips).
                            let j = jc + j;
                            let (b, brs) = match direct {
                                Some(b) => (b.ptr.wrapping_add(j + k0 * b.rs), b.rs),
                                None => (packed.wrapping_add(j * k + k0 * w), w),
                            };
                            // SAFETY: the tiles stay inside m × n and the strip (the mask
                            // limits the last columns), and the block inside the sum.
                            unsafe {
                                let strip =
                                    Strip { c: c.add(j), ldc, accumulate, resume, a, b, brs, k: kb, alpha, mask: lane_mask(used % $lanes) };
                                match (w, used) {
                                    (w, _) if w == 2 * $lanes => strip.rows::<2, false>(i0, i1),
                                    (_, u) if u == $lanes => strip.rows::<1, false>(i0, i1),
                                    _ => strip.rows::<1, true>(i0, i1),
                                }
                            }
                        }
                    }
                }
            }
        }

        impl Strip {
            #[inline(always)]
            unsafe fn rows<const V: usize, const MASKED: bool>(&self, i0: usize, i1: usize) {
                let mut i = i0;
                // SAFETY (every call): rows i .. i + R exist.
                while i + MR <= i1 {
                    unsafe { self.tile::<MR, V, MASKED>(i) };
                    i += MR;
                }
                unsafe { self.rest::<V, MASKED>(i, i1 - i) };
            }

            /// Rows `i .. i + R` of the strip: `R·V` accumulators over the whole sum, then
            /// scaled by `alpha` and stored (added to `c` with `accumulate`). With
            /// `MASKED` the strip's single vector is cut to the mask's lanes, in `b` and
            /// `c`.
            #[inline(always)]
            unsafe fn tile<const R: usize, const V: usize, const MASKED: bool>(&self, i: usize) {
                let a = self.a;
                // SAFETY: the caller's rows exist; the strip holds k rows of LANES·V (of
                // which the mask's lanes when MASKED).
                unsafe {
                    let mut acc: [[$vec; V]; R] = [[$zero; V]; R];
                    if self.resume {
                        for (r, acc) in acc.iter_mut().enumerate() {
                            let cp = self.c.add((i + r) * self.ldc);
                            for (v, acc) in acc.iter_mut().enumerate() {
                                *acc = if MASKED { $mload(cp, self.mask) } else { $load(cp.add($lanes * v)) };
                            }
                        }
                    }
                    // A pointer to every third row of the tile (four cover `MR` = 12),
                    // each advanced by one step of the sum, the rows between one and two
                    // row strides from it. With one pointer for all rows, the compiler
                    // carried it from step to step through `R` dependent adds, 13 cycles
                    // a step against the 12 of its 24 FMAs; now one add is carried.
                    // (Measured, old and new binaries alternating, one thread, W2/W3's
                    // weight gradients: tiles ÷ crate 0.96–0.97 → 0.99–1.03 on
                    // 384 × 384 × 2048, the other shapes within the noise: the tiles are
                    // mostly bound by memory there, not by this chain.)
                    let mut ap: [*const f32; 4] = std::array::from_fn(|g| a.ptr.wrapping_add((i + 3 * g) * a.rs));
                    let mut bp = self.b;
                    for _ in 0..self.k {
                        let bv: [$vec; V] = std::array::from_fn(|v| if MASKED { $mload(bp, self.mask) } else { $load(bp.add($lanes * v)) });
                        for (r, acc) in acc.iter_mut().enumerate() {
                            let av = $set1(*ap[r / 3].add((r % 3) * a.rs));
                            for v in 0..V {
                                acc[v] = $fma(av, bv[v], acc[v]);
                            }
                        }
                        for p in &mut ap[..R.div_ceil(3)] {
                            *p = p.wrapping_add(a.cs);
                        }
                        bp = bp.add(self.brs);
                    }
                    let scale = $set1(self.alpha);
                    for (r, acc) in acc.iter().enumerate() {
                        let cp = self.c.add((i + r) * self.ldc);
                        for (v, &sum) in acc.iter().enumerate() {
                            let mut x = $mul(sum, scale);
                            let at = cp.add($lanes * v);
                            if MASKED {
                                if self.accumulate {
                                    x = $add(x, $mload(at, self.mask));
                                }
                                $mstore(at, self.mask, x);
                            } else {
                                if self.accumulate {
                                    x = $add(x, $load(at));
                                }
                                $store(at, x);
                            }
                        }
                    }
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{KC, MC, NC, rows_per_block, strips};
    use crate::gemm::View;
    use std::arch::x86_64::*;

    /// Rows of a register tile: 12 × 2 accumulators of the 32 registers, two for the
    /// strip's row and one for the broadcast.
    pub(super) const MR: usize = 12;

    fn lane_mask(used: usize) -> __mmask16 {
        if used == 0 { !0 } else { ((1u32 << used) - 1) as __mmask16 }
    }

    tile_kernel!(
        "avx512f,avx2,fma",
        __m512,
        __mmask16,
        16,
        _mm512_setzero_ps(),
        |p: *const f32| _mm512_loadu_ps(p),
        |p: *const f32, m: __mmask16| _mm512_maskz_loadu_ps(m, p),
        _mm512_set1_ps,
        _mm512_fmadd_ps,
        _mm512_mul_ps,
        _mm512_add_ps,
        |p: *mut f32, x: __m512| _mm512_storeu_ps(p, x),
        |p: *mut f32, m: __mmask16, x: __m512| _mm512_mask_storeu_ps(p, m, x)
    );

    impl Strip {
        /// The last `left` (< [`MR`]) rows from row `i`.
        #[inline(always)]
        unsafe fn rest<const V: usize, const MASKED: bool>(&self, i: usize, left: usize) {
            // SAFETY: rows i .. i + left exist.
            unsafe {
                match left {
                    0 => {}
                    1 => self.tile::<1, V, MASKED>(i),
                    2 => self.tile::<2, V, MASKED>(i),
                    3 => self.tile::<3, V, MASKED>(i),
                    4 => self.tile::<4, V, MASKED>(i),
                    5 => self.tile::<5, V, MASKED>(i),
                    6 => self.tile::<6, V, MASKED>(i),
                    7 => self.tile::<7, V, MASKED>(i),
                    8 => self.tile::<8, V, MASKED>(i),
                    9 => self.tile::<9, V, MASKED>(i),
                    10 => self.tile::<10, V, MASKED>(i),
                    _ => self.tile::<11, V, MASKED>(i),
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{KC, MC, NC, rows_per_block, strips};
    use crate::gemm::View;
    use std::arch::x86_64::*;

    /// Rows of a register tile: 6 × 2 accumulators of the 16 registers.
    pub(super) const MR: usize = 6;

    fn lane_mask(used: usize) -> __m256i {
        let lanes: [i32; 8] = std::array::from_fn(|l| if l < used || used == 0 { -1 } else { 0 });
        // SAFETY: an unaligned load of 8 lanes from an array of 8.
        unsafe { _mm256_loadu_si256(lanes.as_ptr() as *const __m256i) }
    }

    tile_kernel!(
        "avx2,fma",
        __m256,
        __m256i,
        8,
        _mm256_setzero_ps(),
        |p: *const f32| _mm256_loadu_ps(p),
        |p: *const f32, m: __m256i| _mm256_maskload_ps(p, m),
        _mm256_set1_ps,
        _mm256_fmadd_ps,
        _mm256_mul_ps,
        _mm256_add_ps,
        |p: *mut f32, x: __m256| _mm256_storeu_ps(p, x),
        |p: *mut f32, m: __m256i, x: __m256| _mm256_maskstore_ps(p, m, x)
    );

    impl Strip {
        /// The last `left` (< [`MR`]) rows from row `i`.
        #[inline(always)]
        unsafe fn rest<const V: usize, const MASKED: bool>(&self, i: usize, left: usize) {
            // SAFETY: rows i .. i + left exist.
            unsafe {
                match left {
                    0 => {}
                    1 => self.tile::<1, V, MASKED>(i),
                    2 => self.tile::<2, V, MASKED>(i),
                    3 => self.tile::<3, V, MASKED>(i),
                    4 => self.tile::<4, V, MASKED>(i),
                    _ => self.tile::<5, V, MASKED>(i),
                }
            }
        }
    }

    /// Copies `b` (k × n, any strides) into its strips for vectors of `lanes` (see
    /// [`strips`]; the used columns only). A row-major `b` (`b.cs == 1`) is copied a row
    /// at a time; a transposed one (`b.rs == 1`) goes through 8 × 8 blocks: eight
    /// contiguous reads of 8, transposed in registers, eight contiguous writes of 8.
    ///
    /// # Safety
    /// `b` covers k × n; `dst` holds `k · n.next_multiple_of(lanes)` floats; AVX2 present.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn pack(k: usize, n: usize, b: View, dst: *mut f32, lanes: usize) {
        // SAFETY: every index below is inside k × n and inside its strip.
        unsafe {
            for (j, w, used) in strips(n, lanes) {
                let strip = dst.add(j * k);
                if b.cs == 1 {
                    // Rows of b are contiguous: each row of the strip is one copy.
                    for t in 0..k {
                        std::ptr::copy_nonoverlapping(b.ptr.add(t * b.rs + j), strip.add(t * w), used);
                    }
                    continue;
                }
                // Columns of b contiguous along t (a transposed weight): 8 × 8 blocks of
                // the first `c8` columns and `k8` rows through registers, the rest (the
                // last rows of those columns, every row of the last columns) one by one.
                let (c8, k8) = if b.rs == 1 { (used - used % 8, k - k % 8) } else { (0, 0) };
                for c in (0..c8).step_by(8) {
                    for t in (0..k8).step_by(8) {
                        // Column j + c + l of b (contiguous along t) is row l here.
                        let r: [__m256; 8] = std::array::from_fn(|l| _mm256_loadu_ps(b.ptr.add((j + c + l) * b.cs + t)));
                        for (l, row) in transpose8(r).iter().enumerate() {
                            _mm256_storeu_ps(strip.add((t + l) * w + c), *row);
                        }
                    }
                }
                for t in 0..k {
                    for c in if t < k8 { c8 } else { 0 }..used {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every shape class (full strips, the one-vector strip, masked tails, every row
    /// remainder), transposed and strided operands, accumulation and scaling, against a
    /// naive f64 product, with every vector width this CPU has; the widths agree bit for
    /// bit.
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

    /// A product over the first columns of a packing (`packed_prefix`: attention's causal
    /// blocks over one packing of `kᵀ`) equals, on those columns, the product of just
    /// them, bit for bit, for every width and every prefix length.
    #[test]
    fn products_over_a_prefix_of_a_packing_match_the_prefix_alone() {
        let (m, k, all) = (13, 9, 75);
        let val = |s: usize, i: usize| ((i * 7919 + s * 104729) % 1000) as f32 / 500.0 - 1.0;
        let av: Vec<f32> = (0..m * k).map(|i| val(1, i)).collect();
        // bᵀ stored row-major (all × k): b = its transpose, packed as attention packs kᵀ.
        let bt: Vec<f32> = (0..all * k).map(|i| val(2, i)).collect();
        let a = View::dense(av.as_ptr(), k);
        let b = View { ptr: bt.as_ptr(), rs: 1, cs: k };
        for l in available().into_iter().flatten() {
            let (mut packed, mut scratch) = (Packed::default(), Packed::default());
            // SAFETY: b covers k × all.
            unsafe { pack_in(k, all, b, &mut packed, false, l) };
            for n in 1..=all {
                let cols = packed_prefix(&packed, n, all);
                assert!(cols >= n && cols <= all);
                let (mut got, mut want) = (vec![f32::NAN; m * all], vec![f32::NAN; m * all]);
                // SAFETY: the views cover their matrices; c holds m rows of `all` ≥ cols.
                unsafe {
                    product_packed(m, cols, k, got.as_mut_ptr(), all, false, a, &packed, 0.5);
                    product_in(m, n, k, want.as_mut_ptr(), all, false, a, b, 0.5, &mut scratch, Some(l));
                }
                for r in 0..m {
                    for j in 0..n {
                        assert_eq!(got[r * all + j].to_bits(), want[r * all + j].to_bits(), "{l} lanes, n {n}, c[{r}][{j}]");
                    }
                }
            }
        }
    }

    fn sweep(packed_once: bool, parallel: bool) {
        let (mut strips, mut pack_b) = (Packed::default(), Packed::default());
        let shapes = [
            (1, 1, 1),
            (6, 16, 3),
            (7, 17, 5),
            (13, 40, 32),
            (64, 37, 9),
            (5, 8, 64),
            (64, 128, 32),
            (3, 3, 200),
            (9, 300, 250),
            (25, 48, 7),
            (23, 31, 17),
            (12, 79, 40),
            // Several blocks of the sum (KC) and of rows (MC).
            (30, 70, 600),
            (200, 33, 520),
            // Narrow outputs (computed as `cᵀ = bᵀ aᵀ`), several blocks of columns (NC),
            // a long sum in one block (rows per block below MC).
            (64, 10, 300),
            (40, 5, 70),
            (20, 600, 300),
            (50, 20, 3000),
        ];
        let widths: Vec<usize> = available().into_iter().flatten().collect();
        for (m, n, k) in shapes {
            for (ta, tb, accumulate) in
                [(false, false, false), (true, false, true), (true, false, false), (false, true, false), (true, true, true)]
            {
                let val = |s: usize, i: usize| ((i * 7919 + s * 104729) % 1000) as f32 / 500.0 - 1.0;
                // A: m × k (or its transpose in memory), padded rows so strides are not dense.
                let (ars, acs, alen) = if ta { (1, m + 3, k * (m + 3)) } else { (k + 2, 1, m * (k + 2)) };
                let (brs, bcs, blen) = if tb { (1, k + 1, n * (k + 1)) } else { (n + 5, 1, k * (n + 5)) };
                let av: Vec<f32> = (0..alen).map(|i| val(1, i)).collect();
                let bv: Vec<f32> = (0..blen).map(|i| val(2, i)).collect();
                let ldc = n + 4;
                let before: Vec<f32> = (0..m * ldc).map(|i| val(3, i)).collect();
                let alpha = if packed_once { 1.0 } else { 0.75 };
                let (a, b) = (View { ptr: av.as_ptr(), rs: ars, cs: acs }, View { ptr: bv.as_ptr(), rs: brs, cs: bcs });
                let mut first: Option<Vec<f32>> = None;
                for &l in &widths {
                    let mut cv = before.clone();
                    // SAFETY: the views cover their matrices; c is distinct.
                    unsafe {
                        if packed_once {
                            // A packing is grown, not cleared: NaN in what the pack
                            // leaves (the last strip's padding) must never be read.
                            pack_b.strips.iter_mut().for_each(|x| *x = f32::NAN);
                            pack_in(k, n, b, &mut pack_b, parallel, l);
                            product_packed(m, n, k, cv.as_mut_ptr(), ldc, accumulate, a, &pack_b, 1.0);
                        } else {
                            product_in(m, n, k, cv.as_mut_ptr(), ldc, accumulate, a, b, alpha, &mut strips, Some(l));
                        }
                    }
                    let case = format!("{m}x{n}x{k} ta {ta} tb {tb}, {l} lanes");
                    for r in 0..m {
                        for col in 0..ldc {
                            let got = cv[r * ldc + col];
                            if col >= n {
                                assert_eq!(got.to_bits(), before[r * ldc + col].to_bits(), "{case}: wrote past column {n}");
                                continue;
                            }
                            let term = |t: usize| (av[r * ars + t * acs], bv[t * brs + col * bcs]);
                            let dot: f64 = (0..k).map(|t| term(t).0 as f64 * term(t).1 as f64).sum();
                            let size: f64 = (0..k).map(|t| (term(t).0 as f64 * term(t).1 as f64).abs()).sum();
                            let want = alpha as f64 * dot + if accumulate { before[r * ldc + col] as f64 } else { 0.0 };
                            // f32 rounding of a sum of k terms: k ulps of the terms' size.
                            let tol = 1e-6 * (1.0 + want.abs()) + k as f64 * f32::EPSILON as f64 * size;
                            assert!((got as f64 - want).abs() <= tol, "{case}: ({r}, {col}) {got} vs {want}");
                            if alpha == 1.0 && !accumulate {
                                // One FMA chain in order of k, however the sum is blocked.
                                let chain = (0..k).fold(0.0f32, |s, t| term(t).0.mul_add(term(t).1, s));
                                assert_eq!(got.to_bits(), chain.to_bits(), "{case}: ({r}, {col}) is not the sum in order of k");
                            }
                        }
                    }
                    match &first {
                        None => first = Some(cv),
                        Some(f) => {
                            assert!(f.iter().zip(&cv).all(|(x, y)| x.to_bits() == y.to_bits()), "{case}: differs from the widest tiles")
                        }
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
pub(crate) mod timing {
    use super::*;

    #[test]
    #[ignore]
    fn attention_blocks() {
        // (m, n, k, a transposed, b transposed): q kᵀ, p v (and ds k), dsᵀ q (and pᵀ dO) of
        // one block of `attention::QB` = 32 query rows seeing every key — W2's head size,
        // then W3's.
        compare(&[
            (32, 128, 32, false, true),
            (32, 32, 128, false, false),
            (128, 32, 32, true, false),
            (32, 256, 64, false, true),
            (32, 64, 256, false, false),
            (256, 64, 32, true, false),
        ]);
    }

    /// Row-group panels of W1 (32 rows; 64 before session 15), W2 and W3 (128 rows): `x Wᵀ` forward, `dy W`
    /// backward.
    #[test]
    #[ignore]
    fn row_panels() {
        compare(&[
            (32, 256, 64, false, true),
            (32, 256, 256, false, true),
            (32, 10, 256, false, true),
            (32, 256, 256, false, false),
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
            // W3 (128-row panels): the MLP's two products, forward and backward.
            (128, 1536, 384, false, true),
            (128, 384, 1536, false, true),
            (128, 384, 1536, false, false),
            (128, 1536, 384, false, false),
        ]);
    }

    /// W2's and W3's weight gradients (`xᵀ dy`: a transposed `a`, long sums), as they
    /// run on one thread beside a row group.
    #[test]
    #[ignore]
    fn weight_gradients() {
        compare(&[
            (384, 128, 2048, true, false),
            (512, 128, 2048, true, false),
            (384, 384, 2048, true, false),
            (1152, 384, 2048, true, false),
            (384, 1536, 2048, true, false),
            (1536, 384, 2048, true, false),
        ]);
    }

    /// This thread's FMA rate in GFLOP/s over `steps` steps of 12 independent vector FMA
    /// chains (operands in registers), `lanes` wide: 16 (AVX-512) or 8 (AVX2); `None`
    /// where the CPU lacks that width. [`fma_peak`] and `gemm::timing` (the ceiling
    /// measured between products, the one of that moment) use it.
    pub(crate) fn fma_gflops(lanes: usize, steps: usize) -> Option<f64> {
        #[cfg(target_arch = "x86_64")]
        {
            // Twelve chains in named registers (an array of them invited LLVM to rotate
            // and spill), each 4 FMAs of latency deep: enough to fill two FMA pipes.
            macro_rules! chains {
                ($name:ident, $feat:literal, $vec:ty, $set1:ident, $fma:ident, $add:ident, $store:ident, $lanes:literal) => {
                    #[target_feature(enable = $feat)]
                    fn $name(steps: usize) -> f32 {
                        use std::arch::x86_64::*;
                        let (x, y) = ($set1(0.999_999), $set1(1e-7));
                        let [mut a0, mut a1, mut a2, mut a3, mut a4, mut a5, mut a6, mut a7, mut a8, mut a9, mut a10, mut a11]: [$vec; 12] =
                            std::array::from_fn(|i| $set1(i as f32));
                        for _ in 0..steps {
                            a0 = $fma(a0, x, y);
                            a1 = $fma(a1, x, y);
                            a2 = $fma(a2, x, y);
                            a3 = $fma(a3, x, y);
                            a4 = $fma(a4, x, y);
                            a5 = $fma(a5, x, y);
                            a6 = $fma(a6, x, y);
                            a7 = $fma(a7, x, y);
                            a8 = $fma(a8, x, y);
                            a9 = $fma(a9, x, y);
                            a10 = $fma(a10, x, y);
                            a11 = $fma(a11, x, y);
                        }
                        let sum = [a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11].iter().fold(a0, |s, &a| $add(s, a));
                        let mut out = [0.0f32; $lanes];
                        // SAFETY: out holds a vector's floats.
                        unsafe { $store(out.as_mut_ptr(), sum) };
                        out.iter().sum()
                    }
                };
            }
            chains!(chains512, "avx512f", __m512, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_add_ps, _mm512_storeu_ps, 16);
            chains!(chains256, "avx2,fma", __m256, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_add_ps, _mm256_storeu_ps, 8);
            let usable = if lanes == 16 { std::is_x86_feature_detected!("avx512f") } else { lanes == 8 && crate::cpu::avx2_fma() };
            if !usable {
                return None;
            }
            let t0 = std::time::Instant::now();
            // SAFETY: the width's features were checked above.
            let r = unsafe { if lanes == 16 { chains512(steps) } else { chains256(steps) } };
            std::hint::black_box(r);
            Some(2.0 * (lanes * 12 * steps) as f64 / t0.elapsed().as_secs_f64() / 1e9)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (lanes, steps);
            None
        }
    }

    /// The machine's FMA ceiling on one thread and on two at once.
    #[test]
    #[ignore]
    fn fma_peak() {
        let steps = 10_000_000;
        for lanes in [16, 8] {
            if fma_gflops(lanes, 1000).is_none() {
                continue;
            }
            let run = || fma_gflops(lanes, steps).unwrap_or(0.0);
            let one: Vec<f64> = (0..5).map(|_| run()).collect();
            let two: Vec<f64> = (0..5)
                .map(|_| {
                    // Two OS threads (rayon's join may run both halves on one).
                    std::thread::scope(|sc| {
                        let other = sc.spawn(run);
                        run() + other.join().unwrap()
                    })
                })
                .collect();
            let best = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
            println!("{lanes} lanes: FMA peak one thread {:.1} GFLOP/s, two threads {:.1} GFLOP/s (best of 5)", best(&one), best(&two));
        }
    }

    fn compare(shapes: &[(usize, usize, usize, bool, bool)]) {
        for &(m, n, k, ta, tb) in shapes {
            let a = vec![0.5f32; m * k];
            let b = vec![0.25f32; k * n];
            let mut c = vec![0.0f32; m * n];
            let av = if ta { View { ptr: a.as_ptr(), rs: 1, cs: m } } else { View::dense(a.as_ptr(), k) };
            let bv = if tb { View { ptr: b.as_ptr(), rs: 1, cs: k } } else { View::dense(b.as_ptr(), n) };
            // Per width: tiles packing `b` per call, and tiles with `b` packed once outside
            // the timing (a row group's weight); `None`: the `gemm` crate.
            // (name, width, b packed once, the packing, GFLOP/s per round)
            type Variant = (String, Option<usize>, bool, Packed, Vec<f64>);
            let mut variants: Vec<Variant> = vec![];
            for l in available() {
                let name = match l {
                    Some(l) => format!("{l} lanes"),
                    None => "gemm crate".into(),
                };
                variants.push((name.clone(), l, false, Packed::default(), vec![]));
                if let Some(l) = l {
                    let mut once = Packed::default();
                    // SAFETY: bv covers k × n.
                    unsafe { pack_in(k, n, bv, &mut once, false, l) };
                    variants.push((format!("{name}, b packed once"), Some(l), true, once, vec![]));
                }
            }
            let cp = c.as_mut_ptr();
            // About 50 MFLOP a round (200 of attention's 64 × 128 × 32 blocks).
            let reps = (200 * 64 * 128 * 32 / (m * n * k)).max(2);
            // Alternating rounds, so that all see the same load on a shared host.
            for _ in 0..31 {
                for (_, l, once, pack, times) in variants.iter_mut() {
                    let t0 = std::time::Instant::now();
                    for _ in 0..reps {
                        // SAFETY: the views cover their matrices; a packed-once `pack`
                        // holds b.
                        unsafe {
                            if *once {
                                product_packed(m, n, k, cp, n, false, av, pack, 1.0);
                            } else {
                                product_in(m, n, k, cp, n, false, av, bv, 1.0, pack, *l);
                            }
                        }
                    }
                    times.push(2.0 * (m * n * k) as f64 * reps as f64 / t0.elapsed().as_secs_f64() / 1e9);
                }
            }
            let line: Vec<String> = variants
                .iter_mut()
                .map(|(name, _, _, _, times)| {
                    times.sort_by(f64::total_cmp);
                    format!("{name} {:.1}", times[times.len() / 2])
                })
                .collect();
            println!("{m}x{n}x{k} ta={ta} tb={tb}: GFLOP/s {} (medians of 31 alternating rounds)", line.join(", "));
        }
    }
}
