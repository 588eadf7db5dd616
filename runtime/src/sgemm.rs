//! A hand-written f32 matrix product for x86-64 with AVX2 and FMA, BLIS-style.
//!
//! `c = (c if accumulate else 0) + alpha · a @ b` for strided `a` (m × k), `b` (k × n)
//! and `c` (m × n). The work is blocked so each operand streams from the cache level
//! where it is reused: for every block of [`KC`] steps of `k`, `b` is packed once into
//! slivers of [`NR`] columns (shared by every thread), then each task packs its block of
//! rows of `a` into slivers of [`MR`] rows and runs the 6 × 16 micro-kernel (12 ymm
//! accumulators, 2 loads of `b` and 6 broadcasts of `a` per 12 FMAs) over its tiles.
//! Packing zero-pads the edges, so every tile runs the same kernel; edge tiles and
//! outputs that are not row-major go through a 6 × 16 scratch tile.
//!
//! Each element of `c` sums its products in the same order whatever the thread count
//! (blocks of `k` in order, then `k` within a block), so results are bit-identical
//! across thread counts.
//!
//! Measured against the `gemm` crate on this project's shapes (`gemm::timing`); see
//! docs/PERFORMANCE.md. [`available`] says whether this CPU can run it.

use rayon::prelude::*;
use std::cell::RefCell;

/// Rows of `a` per micro-kernel tile.
pub const MR: usize = 6;
/// Columns of `b` per micro-kernel tile (two ymm registers).
pub const NR: usize = 16;
/// Steps of `k` per packed block: a 6 × KC sliver of `a` (6 KiB) and a KC × 16 sliver
/// of `b` (16 KiB) stay in L1 while a tile is computed.
pub const KC: usize = 256;
/// Rows of `a` per task block at most (an MC × KC block of `a`, 96 KiB, stays in L2).
pub const MC: usize = 96;

/// A strided matrix: element `(r, c)` at `ptr + r·rs + c·cs`.
#[derive(Clone, Copy, Debug)]
pub struct Mat {
    pub ptr: *const f32,
    pub rs: usize,
    pub cs: usize,
}

// SAFETY: a `Mat` is only an address and strides; every dereference is in an `unsafe`
// function whose caller guarantees the memory is valid (and not written concurrently).
unsafe impl Send for Mat {}
unsafe impl Sync for Mat {}

impl Mat {
    fn t(self) -> Mat {
        Mat { ptr: self.ptr, rs: self.cs, cs: self.rs }
    }
}

/// Whether this CPU runs the kernel (AVX2 and FMA).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

thread_local! {
    static PACK_A: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static PACK_B: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's packing buffer `slot` of at least `len` elements (a fresh
/// one if the thread's is already in use).
fn with_buffer<R>(slot: &'static std::thread::LocalKey<RefCell<Vec<f32>>>, len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    slot.with(|cell| match cell.try_borrow_mut() {
        Ok(mut v) => {
            if v.len() < len {
                v.resize(len, 0.0);
            }
            f(&mut v[..len])
        }
        Err(_) => f(&mut vec![0.0; len]),
    })
}

/// `c (+)= alpha · a @ b`, on `threads` threads of the current rayon pool.
///
/// # Safety
/// [`available`] must hold; every view must cover its matrix; `c` must not overlap `a`
/// or `b`, and must not overlap itself (distinct `(r, c)` are distinct elements).
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: Mat,
    c: *mut f32,
    c_rs: usize,
    c_cs: usize,
    accumulate: bool,
    alpha: f32,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    // A column-major output is the transposed problem's row-major one: cᵀ = bᵀ aᵀ.
    if c_rs == 1 && c_cs != 1 {
        // SAFETY: the same elements, described transposed.
        return unsafe { sgemm(n, m, k, b.t(), a.t(), c, c_cs, c_rs, accumulate, alpha, threads) };
    }
    let c = Out { ptr: c as usize, rs: c_rs, cs: c_cs };
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    // SAFETY: c covers m × n.
                    unsafe { *c.at(i, j) = 0.0 };
                }
            }
        }
        return;
    }
    let slivers = n.div_ceil(NR);
    // Tasks: blocks of rows, and of columns when there are too few row blocks to keep
    // every thread busy (a few tasks per thread, for threads slowed by other work).
    let want = if threads > 1 { threads * 3 } else { 1 };
    let row_blocks = m.div_ceil(MC).max(want.min(m.div_ceil(MR * 4)));
    let mc = m.div_ceil(row_blocks).div_ceil(MR) * MR;
    let row_blocks = m.div_ceil(mc);
    let col_blocks = want.div_ceil(row_blocks).min(slivers).max(1);
    let ncs = slivers.div_ceil(col_blocks);
    let col_blocks = slivers.div_ceil(ncs);
    let tasks = row_blocks * col_blocks;
    // Rows of `a` contiguous in `k`: the kernel broadcasts from them in place, as packing
    // would cost as much as the product when `n` is small.
    let direct = a.cs == 1;
    with_buffer(&PACK_B, KC * slivers * NR, |bp| {
        for p0 in (0..k).step_by(KC) {
            let kc = KC.min(k - p0);
            // SAFETY: b covers k × n.
            unsafe { pack_b(b, p0, kc, n, bp) };
            let first = p0 == 0 && !accumulate;
            let bp = &*bp;
            let task = |t: usize| {
                let (i0, s0) = (t / col_blocks * mc, t % col_blocks * ncs);
                let rows = mc.min(m - i0);
                let s1 = (s0 + ncs).min(slivers);
                with_buffer(&PACK_A, rows.div_ceil(MR) * MR * kc, |ap| {
                    // SAFETY: a covers m × k; this task writes only rows i0.. and the
                    // columns of slivers s0..s1 of c.
                    unsafe {
                        pack_a(a, i0, rows, p0, kc, direct, ap);
                        let at = At { a, direct, i0, p0 };
                        block(ap, at, bp, kc, rows, n, s0, s1, c, first, alpha);
                    }
                })
            };
            if tasks > 1 && threads > 1 {
                (0..tasks).into_par_iter().for_each(task);
            } else {
                (0..tasks).for_each(task);
            }
        }
    });
}

/// The output, shareable across tasks (each writes its own tiles).
#[derive(Clone, Copy)]
struct Out {
    ptr: usize,
    rs: usize,
    cs: usize,
}

impl Out {
    fn at(self, i: usize, j: usize) -> *mut f32 {
        (self.ptr as *mut f32).wrapping_add(i * self.rs + j * self.cs)
    }
}

/// Packs rows `i0..i0 + rows`, steps `p0..p0 + kc` of `a` into slivers of MR rows:
/// sliver `s` holds, for each step `p`, its MR rows' values (zero past the last row).
/// With `direct`, only a last partial sliver is packed (the kernel reads full ones in
/// place).
///
/// # Safety
/// `a` must cover those elements.
unsafe fn pack_a(a: Mat, i0: usize, rows: usize, p0: usize, kc: usize, direct: bool, ap: &mut [f32]) {
    for s in 0..rows.div_ceil(MR) {
        let r0 = i0 + s * MR;
        let live = MR.min(i0 + rows - r0);
        if direct && live == MR {
            continue;
        }
        let dst = &mut ap[s * MR * kc..(s + 1) * MR * kc];
        if live < MR {
            dst.fill(0.0);
        }
        let src: [*const f32; MR] = std::array::from_fn(|r| a.ptr.wrapping_add((r0 + r.min(live - 1)) * a.rs + p0 * a.cs));
        for (p, d) in dst.chunks_exact_mut(MR).enumerate() {
            for r in 0..live {
                // SAFETY: in bounds by the caller's contract.
                d[r] = unsafe { *src[r].add(p * a.cs) };
            }
        }
    }
}

/// Packs steps `p0..p0 + kc` of `b` into slivers of NR columns: sliver `s` holds, for
/// each step `p`, its NR columns' values (zero past the last column).
///
/// # Safety
/// `b` must cover those elements.
unsafe fn pack_b(b: Mat, p0: usize, kc: usize, n: usize, bp: &mut [f32]) {
    for s in 0..n.div_ceil(NR) {
        let dst = &mut bp[s * NR * kc..(s + 1) * NR * kc];
        let j0 = s * NR;
        let live = NR.min(n - j0);
        if live < NR {
            dst.fill(0.0);
        }
        if b.cs == 1 {
            for p in 0..kc {
                // SAFETY: in bounds by the caller's contract; row p's live columns.
                let src = unsafe { std::slice::from_raw_parts(b.ptr.add((p0 + p) * b.rs + j0), live) };
                dst[p * NR..p * NR + live].copy_from_slice(src);
            }
        } else {
            for j in 0..live {
                let src = b.ptr.wrapping_add(p0 * b.rs + (j0 + j) * b.cs);
                for p in 0..kc {
                    // SAFETY: as above.
                    dst[p * NR + j] = unsafe { *src.add(p * b.rs) };
                }
            }
        }
    }
}

/// Where a task's rows of `a` are: row `i0`, step `p0` of `a` itself when `direct`.
#[derive(Clone, Copy)]
struct At {
    a: Mat,
    direct: bool,
    i0: usize,
    p0: usize,
}

/// Every tile of the task's `rows` and slivers `s0..s1` of the output.
///
/// # Safety
/// As for [`sgemm`]; `ap` and `bp` are packed for this block.
#[allow(clippy::too_many_arguments)]
unsafe fn block(ap: &[f32], at: At, bp: &[f32], kc: usize, rows: usize, n: usize, s0: usize, s1: usize, c: Out, first: bool, alpha: f32) {
    for s in s0..s1 {
        let j0 = s * NR;
        let cols = NR.min(n - j0);
        let b = bp[s * NR * kc..].as_ptr();
        for t in 0..rows.div_ceil(MR) {
            let r = MR.min(rows - t * MR);
            let a = if at.direct && r == MR {
                A { ptr: at.a.ptr.wrapping_add((at.i0 + t * MR) * at.a.rs + at.p0), rs: at.a.rs, ps: 1 }
            } else {
                A { ptr: ap[t * MR * kc..].as_ptr(), rs: 1, ps: MR }
            };
            let dst = c.at(at.i0 + t * MR, j0);
            // SAFETY: the slivers hold kc steps; the tile is inside c.
            unsafe {
                if r == MR && cols == NR && c.cs == 1 {
                    kernel(kc, a, b, dst, c.rs, !first, alpha);
                } else {
                    // The same roundings as the kernel's own stores.
                    let mut tile = [0.0f32; MR * NR];
                    kernel(kc, a, b, tile.as_mut_ptr(), NR, false, 1.0);
                    for i in 0..r {
                        for j in 0..cols {
                            let o = dst.wrapping_add(i * c.rs + j * c.cs);
                            let v = tile[i * NR + j];
                            *o = if first { v * alpha } else { v.mul_add(alpha, *o) };
                        }
                    }
                }
            }
        }
    }
}

/// A sliver of MR rows of `a` for the kernel: row `r`, step `p` at `ptr + r·rs + p·ps`
/// (packed: `rs` 1, `ps` MR; in place: `a`'s row stride and 1).
#[derive(Clone, Copy)]
struct A {
    ptr: *const f32,
    rs: usize,
    ps: usize,
}

/// The 6 × 16 micro-kernel: `c = (c if load else 0) + alpha · Σ_p a[p] ⊗ b[p]` over `kc`
/// steps (`b` packed), `c` row-major with row stride `ldc`.
///
/// # Safety
/// AVX2 and FMA must be present; `a` covers 6 rows of kc steps, `b` kc × 16, `c` 6 rows
/// of 16.
#[inline(always)]
unsafe fn kernel(kc: usize, a: A, b: *const f32, c: *mut f32, ldc: usize, load: bool, alpha: f32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: forwarded.
    unsafe {
        kernel_avx2(kc, a, b, c, ldc, load, alpha)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (kc, a, b, c, ldc, load, alpha);
        unreachable!("sgemm::available() is false off x86-64")
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_avx2(kc: usize, a: A, mut b: *const f32, c: *mut f32, ldc: usize, load: bool, alpha: f32) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract covers every load and store.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        let mut ap = a.ptr;
        for _ in 0..kc {
            let b0 = _mm256_loadu_ps(b);
            let b1 = _mm256_loadu_ps(b.add(8));
            for (r, row) in acc.iter_mut().enumerate() {
                let x = _mm256_broadcast_ss(&*ap.add(r * a.rs));
                row[0] = _mm256_fmadd_ps(x, b0, row[0]);
                row[1] = _mm256_fmadd_ps(x, b1, row[1]);
            }
            ap = ap.add(a.ps);
            b = b.add(NR);
        }
        let al = _mm256_set1_ps(alpha);
        for (r, row) in acc.iter().enumerate() {
            let p = c.add(r * ldc);
            for (h, &v) in row.iter().enumerate() {
                let q = p.add(8 * h);
                let v = if load { _mm256_fmadd_ps(v, al, _mm256_loadu_ps(q)) } else { _mm256_mul_ps(v, al) };
                _mm256_storeu_ps(q, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every shape class (edges, transposed operands and output, k blocks, accumulate,
    /// alpha, threads) against a naive f64 loop.
    #[test]
    fn matches_a_naive_product() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX2/FMA");
            return;
        }
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let mut seed = 7u64;
        let mut next = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        for &(m, n, k) in &[(1, 1, 1), (6, 16, 4), (7, 17, 300), (100, 33, 513), (13, 200, 9), (250, 40, 70), (2, 3, 0)] {
            for bits in 0..16u32 {
                let f = |i: u32| bits & (1 << i) != 0;
                let (ta, tb, tc, acc) = (f(0), f(1), f(2), f(3));
                let a: Vec<f32> = (0..m * k).map(|_| next()).collect();
                let b: Vec<f32> = (0..k * n).map(|_| next()).collect();
                let c0: Vec<f32> = (0..m * n).map(|_| next()).collect();
                let am = if ta { Mat { ptr: a.as_ptr(), rs: 1, cs: m } } else { Mat { ptr: a.as_ptr(), rs: k, cs: 1 } };
                let bm = if tb { Mat { ptr: b.as_ptr(), rs: 1, cs: k } } else { Mat { ptr: b.as_ptr(), rs: n, cs: 1 } };
                let (crs, ccs) = if tc { (1, m) } else { (n, 1) };
                let alpha = if acc { 0.75 } else { 1.0 };
                let mut want = vec![0.0f64; m * n];
                for i in 0..m {
                    for j in 0..n {
                        let mut s = 0.0f64;
                        for p in 0..k {
                            let x = if ta { a[p * m + i] } else { a[i * k + p] };
                            let y = if tb { b[j * k + p] } else { b[p * n + j] };
                            s += x as f64 * y as f64;
                        }
                        let c = c0[i * crs + j * ccs] as f64;
                        want[i * n + j] = if acc { c + alpha as f64 * s } else { s };
                    }
                }
                for threads in [1, 3] {
                    let mut c = c0.clone();
                    pool.install(|| unsafe { sgemm(m, n, k, am, bm, c.as_mut_ptr(), crs, ccs, acc, alpha, threads) });
                    for i in 0..m {
                        for j in 0..n {
                            let (g, w) = (c[i * crs + j * ccs] as f64, want[i * n + j]);
                            assert!(
                                (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                                "{m}x{n}x{k} bits {bits} threads {threads} ({i},{j}): {g} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn bit_identical_across_thread_counts() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX2/FMA");
            return;
        }
        let (m, n, k) = (200, 150, 600);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 53 % 97) as f32 - 48.0) / 11.0).collect();
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let mut c = vec![0.0f32; m * n];
            let (am, bm) = (Mat { ptr: a.as_ptr(), rs: k, cs: 1 }, Mat { ptr: b.as_ptr(), rs: 1, cs: k });
            pool.install(|| unsafe { sgemm(m, n, k, am, bm, c.as_mut_ptr(), n, 1, false, 1.0, threads) });
            c
        };
        let one = run(1);
        for t in [2, 3, 5] {
            assert!(one == run(t), "{t} threads differ from 1");
        }
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    #[test]
    #[ignore]
    fn microkernel_in_l1() {
        let kc = 256;
        let a = vec![0.5f32; kc * MR];
        let b = vec![0.25f32; kc * NR];
        let mut c = vec![0.0f32; MR * NR];
        let reps = 200_000;
        for _ in 0..3 {
            let t0 = std::time::Instant::now();
            for _ in 0..reps {
                unsafe { kernel(kc, A { ptr: a.as_ptr(), rs: 1, ps: MR }, b.as_ptr(), c.as_mut_ptr(), NR, true, 1.0) };
            }
            let dt = t0.elapsed().as_secs_f64();
            println!("packed: {:.1} GFLOP/s", (reps * kc * MR * NR * 2) as f64 / dt / 1e9);
        }
    }
}
