//! Matrix products through the `gemm` crate (any row/column strides, every batch index).
//!
//! Results agree with the interpreter's naive loop to rounding (the crate blocks the
//! sum and uses FMA). Call [`matmul`] inside the executor's pool (`pool.install`) so that
//! its rayon parallelism uses that pool.

use crate::error::{Error, Result};
use crate::exec::Buffers;
use crate::kir::{MatMulKernel, MatOperand};
use crate::switch::Switch;
use ::gemm::Parallelism;
use rayon::prelude::*;

/// Products with at least this many multiply-adds use several threads.
pub(crate) const PARALLEL_FLOPS: usize = 1 << 18;

fn check(o: &MatOperand, batch: &[usize], rows: usize, cols: usize, len: usize) -> Result<()> {
    o.check_in(batch, rows, cols, len, "matmul")
}

/// A matrix in memory: element `(r, c)` at `ptr + r·rs + c·cs` (elements).
#[derive(Clone, Copy)]
pub(crate) struct View {
    pub ptr: *const f32,
    pub rs: usize,
    pub cs: usize,
}

impl View {
    /// Operand `o` at batch offset `off` from address `base`, starting at row `row`.
    pub fn of(base: usize, off: usize, o: &MatOperand, row: usize) -> View {
        // Only an address: dereferenced inside bounds the caller has checked.
        View { ptr: (base as *const f32).wrapping_add(off + row * o.row_stride), rs: o.row_stride, cs: o.col_stride }
    }
    /// A row-major matrix with leading dimension `ld`.
    pub fn dense(ptr: *const f32, ld: usize) -> View {
        View { ptr, rs: ld, cs: 1 }
    }
    /// The transpose (the same memory).
    pub fn t(self) -> View {
        View { ptr: self.ptr, rs: self.cs, cs: self.rs }
    }
}

/// `c = alpha · a @ b` (`m × k` by `k × n`; `c +` that with `accumulate`) through the
/// `gemm` crate, the one place that calls it.
///
/// # Safety
/// Every view must cover its matrix (`k > 0`); `c` is written and must not overlap `a`,
/// `b` or what another thread writes.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn product(m: usize, n: usize, k: usize, c: View, accumulate: bool, a: View, b: View, alpha: f32, par: Parallelism) {
    let s = |x: usize| x as isize;
    // SAFETY: forwarded from the caller.
    unsafe {
        ::gemm::gemm(
            m,
            n,
            k,
            c.ptr as *mut f32,
            s(c.cs),
            s(c.rs),
            accumulate,
            a.ptr,
            s(a.cs),
            s(a.rs),
            b.ptr,
            s(b.cs),
            s(b.rs),
            1.0,
            alpha,
            false,
            false,
            false,
            par,
        )
    }
}

thread_local! {
    /// Each thread's scratch for the strips of `B` in [`panel`] and [`tiled`] (kept: a fresh
    /// allocation per product would fault in new pages every step).
    static STRIPS: std::cell::RefCell<crate::tiles::Packed> = std::cell::RefCell::new(Default::default());
}

/// `c = alpha · a @ b` (or `c +=` with `accumulate`; `c` with contiguous rows) through
/// `tiles`' register tiles, split into blocks of rows and columns that the current
/// pool's threads take in turn when `parallel` (else on this thread); `false` (nothing
/// done) where the CPU has no tiles. Each element is one sum in order of `k`, so the
/// result does not depend on the split or the thread count.
///
/// Split into blocks of whole strips of columns and whole tiles of rows, about four
/// per thread (so that a thread slowed by another process leaves its share to the
/// other), shaped to read the operands the fewest times.
///
/// Every standalone product uses it where the CPU has the tiles ([`one`]).
///
/// # Safety
/// As [`product`]; `c.cs == 1`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn tiled(m: usize, n: usize, k: usize, c: View, accumulate: bool, a: View, b: View, alpha: f32, parallel: bool) -> bool {
    let Some(strip) = crate::tiles::strip_width() else { return false };
    let (cp, ap, bp) = (c.ptr as usize, a.ptr as usize, b.ptr as usize);
    let block = |(r0, r1): (usize, usize), (j0, j1): (usize, usize)| {
        STRIPS.with(|s| {
            let mut fresh = Default::default();
            let mut mine = s.try_borrow_mut().ok();
            let pack = mine.as_deref_mut().unwrap_or(&mut fresh);
            // SAFETY: the block's rows and columns lie inside the matrices the caller's
            // views cover; blocks write disjoint parts of c.
            unsafe {
                let cb = (cp as *mut f32).add(r0 * c.rs + j0);
                let ab = View { ptr: (ap as *const f32).add(r0 * a.rs), ..a };
                let bb = View { ptr: (bp as *const f32).add(j0 * b.cs), ..b };
                crate::tiles::product(r1 - r0, j1 - j0, k, cb, c.rs, accumulate, ab, bb, alpha, pack);
            }
        })
    };
    // About four blocks a thread, none under PARALLEL_FLOPS multiply-adds (~1–2 µs:
    // finer, taking and waiting cost more than they balance; W1's 128 × 256 × 10 in
    // eight blocks ran at 52 GFLOP/s, in two at 50–81, on one thread at 130). Not
    // `parallel`: one block, on this thread (split, its blocks went to whatever pool
    // was current: rayon's global one, both cores, under `--threads 1`).
    let want = if parallel { (4 * rayon::current_num_threads()).min(m * n * k / PARALLEL_FLOPS) } else { 1 };
    if want <= 1 {
        block((0, m), (0, n));
        return true;
    }
    let strips = n.div_ceil(strip);
    let tiles = m.div_ceil(crate::tiles::ROWS);
    // Each block reads its rows of `a` and its columns of `b`: with `cols` column blocks
    // `a` is read `cols` times, with `rows` row blocks `b` `rows` times; the split reads
    // the least (W3's 1536 × 384 × 2048 weight gradient: 8 row blocks, `a` read once,
    // instead of 8 column blocks that read its 12 MiB 8 times).
    let split = |cols: usize| (cols, want.div_ceil(cols).min(tiles).max(1));
    let (cols, rows) = (1..=strips.min(want)).map(split).min_by_key(|&(cols, rows)| m * cols + n * rows).unwrap_or((1, 1));
    // Column ranges of whole strips, row ranges of whole tiles where they divide evenly.
    let col = |i: usize| ((strips * i / cols) * strip).min(n);
    let row = |i: usize| if i == rows { m } else { (m * i / rows) / crate::tiles::ROWS * crate::tiles::ROWS };
    (0..rows * cols).into_par_iter().for_each(|t| {
        let (r, j) = (t / cols, t % cols);
        let (r0, r1, j0, j1) = (row(r), row(r + 1), col(j), col(j + 1));
        if r0 < r1 && j0 < j1 {
            block((r0, r1), (j0, j1));
        }
    });
    true
}

static TILED_PRODUCTS: Switch = Switch::new("BMC_TILED_PRODUCTS");

/// Lets (or stops) standalone products use `tiles`' register tiles ([`tiled`]) where
/// they measured faster than the crate (`BMC_TILED_PRODUCTS=0`, or
/// `BMC_BENCH_AB=tiled-products`, to compare in one process).
pub fn set_tiled_products(on: bool) {
    TILED_PRODUCTS.set(on);
}

/// Whether a product into `c` runs through [`tiled`]: wherever `c`'s rows are
/// contiguous (and not switched off). Measured against the crate (`gemm::timing`, timed
/// inside the pool, one thread and two, on W1–W3's shapes): faster or equal on all but
/// a few weight gradients with long sums (W3's 384 × 1536 × 2048: 0.9×), 2.4× on W1's
/// 256 × 10 × 128; W3's step 487 → 459 ms, W1's faster in 642 and 775 of 1000 pairs,
/// W2 even (`BMC_BENCH_AB=tiled-products`).
fn through_tiles(c: View, a: View, k: usize) -> bool {
    TILED_PRODUCTS.on() && c.cs == 1 && !(LONG_SUMS_TO_CRATE.on() && long_transposed_sum(a, k))
}

static LONG_SUMS_TO_CRATE: Switch = Switch::new("BMC_LONG_SUMS_TO_CRATE");

/// Lets (or stops) [`long_transposed_sum`] products go to the crate
/// (`BMC_LONG_SUMS_TO_CRATE=0`, `BMC_BENCH_AB=long-sums`).
pub fn set_long_sums_to_crate(on: bool) {
    LONG_SUMS_TO_CRATE.set(on);
}

/// Sums at least this long count as long in [`long_transposed_sum`].
const LONG_SUM: usize = 1024;

/// Whether a product is a weight gradient `xᵀ dy` summed over a batch's rows: a
/// column-major `a` and a long sum. The tiles read such an `a` in place, each step of
/// the sum one row of `x` further (a power-of-two stride, into few of L1's sets), from
/// memory the forward wrote long before; the crate packs it first. Measured in W2's
/// step on Zen 4 (no groups, products alone, two threads): 128 × 512 × 2048 6.5 → 5.6 ms
/// and 512 × 128 × 2048 7.7 → 6.3 ms for the four layers.
fn long_transposed_sum(a: View, k: usize) -> bool {
    a.rs == 1 && a.cs != 1 && k >= LONG_SUM
}

#[derive(Clone, Copy)]
struct Ptrs {
    a: usize,
    b: usize,
    c: usize,
}

/// One product at element offsets `(ao, bo, co)`.
///
/// # Safety
/// The pointers must cover the operands at these offsets, and `c` must not overlap
/// `a`, `b`, or the output of any concurrent call.
unsafe fn one(k: &MatMulKernel, p: Ptrs, (ao, bo, co): (usize, usize, usize), par: Parallelism) {
    let (a, b, c) = (p.a as *const f32, p.b as *const f32, p.c as *mut f32);
    unsafe {
        let c = c.add(co);
        if k.k == 0 {
            if !k.accumulate {
                for i in 0..k.m {
                    for j in 0..k.n {
                        *c.add(i * k.c.row_stride + j * k.c.col_stride) = 0.0;
                    }
                }
            }
            return;
        }
        let (av, bv, cv) = (View::of(a as usize, ao, &k.a, 0), View::of(b as usize, bo, &k.b, 0), View::of(c as usize, 0, &k.c, 0));
        let parallel = matches!(par, Parallelism::Rayon(_));
        // As it is, or a column-major `c` as the row-major `cᵀ = bᵀ aᵀ`.
        for (m, n, c, a, b) in [(k.m, k.n, cv, av, bv), (k.n, k.m, cv.t(), bv.t(), av.t())] {
            if through_tiles(c, a, k.k) && tiled(m, n, k.k, c, k.accumulate, a, b, 1.0, parallel) {
                return;
            }
        }
        product(k.m, k.n, k.k, cv, k.accumulate, av, bv, 1.0, par);
    }
}

/// Output rows `r0..r1` of product `k` (f32, no batch axes, `k.k > 0`) on this thread:
/// one panel of a row group (see `crate::groups`). `bufs` are the buffers' base
/// addresses. Through `tiles`' register tiles with `tiles` where the CPU has them and
/// the output's rows are contiguous (faster than the crate on every panel shape
/// measured, `tiles::timing::row_panels`), else the crate.
///
/// # Safety
/// `k` must have been validated against these buffers, and rows `r0..r1` of its output
/// must be written by this call only.
pub(crate) unsafe fn panel(k: &MatMulKernel, bufs: *const *mut u8, r0: usize, r1: usize, tiles: bool) {
    // SAFETY: the buffers cover the validated operands; the panel's rows are in range.
    unsafe {
        let base = |b: usize| *bufs.add(b) as usize;
        let at = |o: &MatOperand, row: usize| View::of(base(o.buf), o.offset, o, row);
        let (c, a, b) = (at(&k.c, r0), at(&k.a, r0), at(&k.b, 0));
        if tiles && k.c.col_stride == 1 && crate::tiles::usable() {
            STRIPS.with(|s| {
                let mut fresh = Default::default();
                let mut mine = s.try_borrow_mut().ok();
                let pack = mine.as_deref_mut().unwrap_or(&mut fresh);
                crate::tiles::product(r1 - r0, k.n, k.k, c.ptr as *mut f32, c.rs, k.accumulate, a, b, 1.0, pack);
            });
            return;
        }
        product(r1 - r0, k.n, k.k, c, k.accumulate, a, b, 1.0, Parallelism::None);
    }
}

/// The weight `B` of product `k` (f32, no batch axes) packed once for all of a row
/// group's panels (`tiles::pack`, by the current pool's threads with `parallel`);
/// `false` where the panels should use [`panel`]: no AVX2 and FMA, or an output whose
/// rows are not contiguous.
///
/// # Safety
/// `k` must have been validated against these buffers.
pub(crate) unsafe fn pack_panels_b(k: &MatMulKernel, bufs: *const *mut u8, dst: &mut crate::tiles::Packed, parallel: bool) -> bool {
    if k.c.col_stride != 1 {
        return false;
    }
    // SAFETY: the buffers cover the validated operand.
    unsafe { crate::tiles::pack(k.k, k.n, View::of(*bufs.add(k.b.buf) as usize, k.b.offset, &k.b, 0), dst, parallel) }
}

/// Output rows `r0..r1` of product `k` with its `B` packed by [`pack_panels_b`]: as
/// [`panel`], through `tiles`' register tiles.
///
/// # Safety
/// As [`panel`]; `packed` holds `k`'s `B` packed by [`pack_panels_b`].
pub(crate) unsafe fn panel_packed(k: &MatMulKernel, bufs: *const *mut u8, r0: usize, r1: usize, packed: &crate::tiles::Packed) {
    // SAFETY: the buffers cover the validated operands; the panel's rows are in range.
    unsafe {
        let base = |b: usize| *bufs.add(b) as usize;
        let (c, a) = (View::of(base(k.c.buf), k.c.offset, &k.c, r0), View::of(base(k.a.buf), k.a.offset, &k.a, r0));
        crate::tiles::product_packed(r1 - r0, k.n, k.k, c.ptr as *mut f32, c.rs, k.accumulate, a, packed, 1.0);
    }
}

thread_local! {
    /// Reused buffers for bf16-rounded operands (grown, never shrunk: a fresh allocation
    /// per product would fault in new zero pages every step).
    static ROUNDED: std::cell::RefCell<[Vec<f32>; 2]> = const { std::cell::RefCell::new([Vec::new(), Vec::new()]) };
}

/// Fills `dst` (grown to `buf`'s length) at the span operand `o` reads with `buf`'s
/// values rounded to bfloat16; the rest of `dst` is never read.
fn round_span(dst: &mut Vec<f32>, buf: &[f32], o: &MatOperand, batch: &[usize], rows: usize, cols: usize) -> Result<()> {
    if dst.len() < buf.len() {
        dst.resize(buf.len(), 0.0);
    }
    if let Some(last) = o.max_element(batch, rows, cols).map_err(Error::internal)? {
        for (d, s) in dst[o.offset..=last].iter_mut().zip(&buf[o.offset..=last]) {
            *d = crate::interp::round_bf16(*s);
        }
    }
    Ok(())
}

/// `c[b] (+)= a[b] @ b[b]` for every batch index. `threads` bounds the parallelism
/// (rayon, in the current pool). The output must not alias the inputs and its view must
/// not overlap itself (the executor validates both).
pub fn matmul(k: &MatMulKernel, bufs: &mut Buffers, threads: usize) -> Result<()> {
    if k.c.buf == k.a.buf || k.c.buf == k.b.buf {
        return Err(Error::internal("matmul output aliases an input"));
    }
    if k.batch.contains(&0) || k.m == 0 || k.n == 0 {
        return Ok(());
    }
    let a = bufs.f32(k.a.buf)?;
    check(&k.a, &k.batch, k.m, k.k, a.len())?;
    let b = bufs.f32(k.b.buf)?;
    check(&k.b, &k.batch, k.k, k.n, b.len())?;
    if !k.bf16 {
        let (a, b) = (a.as_ptr() as usize, b.as_ptr() as usize);
        return products(k, a, b, bufs, threads);
    }
    // bf16: the operands' spans rounded into copies at the same offsets (the rest of
    // each copy is never read), so strides and offsets stay as they are.
    ROUNDED.with(|cell| {
        let mut fresh = [Vec::new(), Vec::new()];
        let mut mine = cell.try_borrow_mut().ok();
        let [ra, rb] = match mine.as_deref_mut() {
            Some(r) => r,
            None => &mut fresh,
        };
        let (a, b) = (bufs.f32(k.a.buf)?, bufs.f32(k.b.buf)?);
        round_span(ra, a, &k.a, &k.batch, k.m, k.k)?;
        round_span(rb, b, &k.b, &k.batch, k.k, k.n)?;
        products(k, ra.as_ptr() as usize, rb.as_ptr() as usize, bufs, threads)
    })
}

/// [`matmul`] of an f32 product (not `bf16`) from the buffers' base pointers, without
/// checks: what a product run beside another step (`groups::Step::Beside`) uses, since it
/// cannot borrow the buffers.
///
/// # Safety
/// `k` was validated against these buffers (`exec::validate`), and nothing else touches
/// its output or writes its operands meanwhile.
pub(crate) unsafe fn matmul_at(k: &MatMulKernel, bufs: *const *mut u8, threads: usize) {
    debug_assert!(!k.bf16);
    if k.batch.contains(&0) || k.m == 0 || k.n == 0 {
        return;
    }
    // SAFETY: the caller's promise.
    let at = |b: usize| unsafe { *bufs.add(b) as usize };
    run_products(k, Ptrs { a: at(k.a.buf), b: at(k.b.buf), c: at(k.c.buf) }, threads);
}

/// The products of `k` with its operands at addresses `a` and `b` (checked in bounds)
/// into `c` of `bufs`.
fn products(k: &MatMulKernel, a: usize, b: usize, bufs: &mut Buffers, threads: usize) -> Result<()> {
    let c = bufs.f32_mut(k.c.buf)?;
    check(&k.c, &k.batch, k.m, k.n, c.len())?;
    let c = c.as_mut_ptr() as usize;
    run_products(k, Ptrs { a, b, c }, threads);
    Ok(())
}

/// The products of `k` at `p` (operands in bounds, `c` written by nothing else).
fn run_products(k: &MatMulKernel, p: Ptrs, threads: usize) {
    let offs: Vec<(usize, usize, usize)> =
        k.a.batch_offsets(&k.batch)
            .into_iter()
            .zip(k.b.batch_offsets(&k.batch))
            .zip(k.c.batch_offsets(&k.batch))
            .map(|((a, b), c)| (a, b, c))
            .collect();
    let flops = k.m * k.n * k.k.max(1);
    let total = flops * offs.len();
    if threads <= 1 || total < PARALLEL_FLOPS {
        for &o in &offs {
            // SAFETY: in bounds (the caller's promise); c is a distinct buffer whose
            // batches do not overlap.
            unsafe { one(k, p, o, Parallelism::None) };
        }
    } else if offs.len() >= threads && flops < PARALLEL_FLOPS * 4 {
        // SAFETY: as above; distinct batches write disjoint parts of c (validated injective).
        offs.par_iter().for_each(|&o| unsafe { one(k, p, o, Parallelism::None) });
    } else {
        let par = if flops >= PARALLEL_FLOPS { Parallelism::Rayon(threads) } else { Parallelism::None };
        for &o in &offs {
            // SAFETY: as above.
            unsafe { one(k, p, o, par) };
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::exec::test_support::*;
    use crate::kir::{DType, Kernel, MatMulKernel, MatOperand};

    fn op(buf: usize, offset: usize, batch_strides: &[usize], row_stride: usize, col_stride: usize) -> MatOperand {
        MatOperand { buf, offset, batch_strides: batch_strides.to_vec(), row_stride, col_stride }
    }

    /// Row-major (or transposed, `t`) operand of `rows × cols` per batch, batches contiguous.
    fn dense(buf: usize, batch: &[usize], rows: usize, cols: usize, t: bool, bcast: bool) -> (MatOperand, usize) {
        let mat = rows * cols;
        let mut bs = vec![0; batch.len()];
        let mut acc = mat;
        for d in (0..batch.len()).rev() {
            bs[d] = if bcast && d == 0 { 0 } else { acc };
            if !(bcast && d == 0) {
                acc *= batch[d];
            }
        }
        let (rs, cs) = if t { (1, rows) } else { (cols, 1) };
        (op(buf, 1, &bs, rs, cs), acc + 1)
    }

    #[allow(clippy::too_many_arguments)]
    fn case(batch: &[usize], m: usize, n: usize, k: usize, ta: bool, tb: bool, tc: bool, bcast: bool, acc: bool, threads: usize) {
        case_bf16(batch, m, n, k, ta, tb, tc, bcast, acc, threads, false)
    }

    #[allow(clippy::too_many_arguments)]
    fn case_bf16(
        batch: &[usize],
        m: usize,
        n: usize,
        k: usize,
        ta: bool,
        tb: bool,
        tc: bool,
        bcast: bool,
        acc: bool,
        threads: usize,
        bf16: bool,
    ) {
        let (a, la) = dense(0, batch, m, k, ta, false);
        let (b, lb) = dense(1, batch, k, n, tb, bcast);
        let (c, lc) = dense(2, batch, m, n, tc, false);
        let p = program(
            vec![buf("a", DType::F32, la), buf("b", DType::F32, lb), buf("c", DType::F32, lc)],
            vec![Kernel::MatMul(MatMulKernel { batch: batch.to_vec(), m, n, k, a, b, c, accumulate: acc, bf16 })],
        );
        check_jit(&p, (m * 31 + n * 7 + k) as u64, threads, false, 1e-5);
    }

    #[test]
    fn matmul_matches_naive_loop() {
        for &(m, n, k) in &[(1, 1, 1), (3, 5, 7), (16, 16, 16), (17, 9, 33), (1, 40, 8), (40, 1, 8), (5, 6, 0)] {
            for bits in 0..32u32 {
                let f = |i: u32| bits & (1u32 << i) != 0;
                case(&[], m, n, k, f(0), f(1), f(2), false, f(3), if f(4) { 2 } else { 1 });
            }
        }
    }

    /// bf16 products round their operands the same way in the interpreter and here.
    #[test]
    fn bf16_matmul_matches_the_interpreter() {
        for bits in 0..16u32 {
            let f = |i: u32| bits & (1u32 << i) != 0;
            case_bf16(&[], 17, 9, 33, f(0), f(1), f(2), false, f(3), 2, true);
        }
        case_bf16(&[2, 3], 4, 5, 6, false, true, false, true, true, 2, true);
        case_bf16(&[], 128, 96, 80, false, false, false, false, false, 4, true);
        assert_eq!(crate::interp::round_bf16(1.0 + 1.0 / 256.0), 1.0); // a tie: to even
        assert_eq!(crate::interp::round_bf16(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert!(crate::interp::round_bf16(f32::NAN).is_nan());
    }

    #[test]
    fn batched_broadcast_and_large_parallel() {
        case(&[2, 3], 4, 5, 6, false, true, false, true, true, 2);
        case(&[3], 7, 3, 2, true, false, true, false, false, 1);
        // many small batches → parallel over batches
        case(&[8, 4], 16, 16, 64, false, true, false, false, true, 4);
        // one big product → gemm's own parallelism
        case(&[], 128, 96, 80, false, false, false, false, false, 4);
        case(&[2], 96, 128, 70, true, true, false, true, true, 3);
    }

    /// A product not run in parallel stays on the calling thread, also outside any
    /// pool (`--threads 1`), where a split would hand its blocks to rayon's global
    /// pool: the packing of its transposed `b` is this thread's.
    #[test]
    fn products_not_in_parallel_run_on_the_calling_thread() {
        use super::{PARALLEL_FLOPS, STRIPS, View, tiled};
        let (m, n, k) = (256, 256, 256);
        assert!(m * n * k / PARALLEL_FLOPS >= 8, "large enough to have been split");
        let a = vec![0.5f32; m * k];
        let b = vec![0.25f32; k * n];
        let mut c = vec![0.0f32; m * n];
        std::thread::spawn(move || {
            let (cv, av, bv) = (View::dense(c.as_mut_ptr(), n), View::dense(a.as_ptr(), k), View::dense(b.as_ptr(), k).t());
            // SAFETY: the views cover a (m × k), b (transposed, k × n) and c (m × n).
            let done = unsafe { tiled(m, n, k, cv, false, av, bv, 1.0, false) };
            if done {
                assert!(STRIPS.with(|s| !s.borrow().is_empty()), "the product's blocks ran on other threads");
                assert!(c.iter().all(|&x| x == 0.5 * 0.25 * k as f32));
            }
        })
        .join()
        .unwrap();
    }

    /// Standalone products through the register tiles split among threads (`tiled`):
    /// splits into more column blocks and into more row blocks, a narrow output (`cᵀ`
    /// computed), a column-major output (`one` takes `cᵀ = bᵀ aᵀ`), sums of several
    /// blocks; against the interpreter, and the same bits on 1, 2 and 3 threads.
    #[test]
    fn tiled_products_split_among_threads() {
        let shapes = [(300, 40, 600, true), (40, 300, 300, false), (256, 10, 128, true), (64, 600, 280, false), (33, 7, 50, false)];
        for &(m, n, k, ta) in &shapes {
            for tc in [false, true] {
                // Against the interpreter's sums in f32 (at 1e-5: short sums; the tiles'
                // own tests check long ones against f64 and their order of `k`).
                case(&[], m, n, k.min(64), ta, false, tc, false, tc, 2);
            }
            let val = |s: usize, i: usize| ((i * 7919 + s * 104729) % 1000) as f32 / 500.0 - 1.0;
            let a: Vec<f32> = (0..m * k).map(|i| val(1, i)).collect();
            let b: Vec<f32> = (0..k * n).map(|i| val(2, i)).collect();
            let (ars, acs) = if ta { (1, m) } else { (k, 1) };
            let mut first: Option<Vec<f32>> = None;
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let mut c = vec![0.0f32; m * n];
                let cp = c.as_mut_ptr() as usize;
                let (ap, bp) = (a.as_ptr() as usize, b.as_ptr() as usize);
                // SAFETY: the views cover a (m × k), b (k × n) and c (m × n).
                let done = pool.install(|| unsafe {
                    let v = |p: usize, rs: usize, cs: usize| super::View { ptr: p as *const f32, rs, cs };
                    super::tiled(m, n, k, v(cp, n, 1), false, v(ap, ars, acs), v(bp, n, 1), 1.0, true)
                });
                if !done {
                    return; // no register tiles on this CPU
                }
                match &first {
                    None => first = Some(c),
                    Some(f) => assert!(f.iter().zip(&c).all(|(x, y)| x.to_bits() == y.to_bits()), "{m}x{n}x{k}: {threads} threads differ"),
                }
            }
        }
    }

    #[test]
    fn hand_computed_2x2() {
        let p = program(
            vec![buf("a", DType::F32, 4), buf("b", DType::F32, 4), buf("c", DType::F32, 4)],
            vec![Kernel::MatMul(MatMulKernel {
                bf16: false,
                batch: vec![],
                m: 2,
                n: 2,
                k: 2,
                a: op(0, 0, &[], 2, 1),
                b: op(1, 0, &[], 1, 2), // b transposed in memory
                c: op(2, 0, &[], 2, 1),
                accumulate: true,
            })],
        );
        for mut e in [crate::exec::Executor::interpreted(&p).unwrap(), crate::exec::Executor::new(&p, 1).unwrap()] {
            e.f32_mut(0).unwrap().copy_from_slice(&[1.0, 2.0, 3.0, 4.0]);
            e.f32_mut(1).unwrap().copy_from_slice(&[5.0, 7.0, 6.0, 8.0]); // b = [[5, 6], [7, 8]]
            e.f32_mut(2).unwrap().copy_from_slice(&[1.0, 1.0, 1.0, 1.0]);
            e.run("main").unwrap();
            assert_eq!(e.f32(2).unwrap(), &[20.0, 23.0, 44.0, 51.0]);
        }
    }
}

/// Times the `gemm` crate and the register tiles on W1–W3's shapes, one thread and two,
/// against the FMA ceiling measured between them (each round: the crate, the tiles, the
/// tiles on `Cᵀ`, then every thread's FMA rate for as many multiply-adds, so that the
/// ceiling is the one of that moment; in session 25 it stayed at 440–458 GFLOP/s on two
/// threads while the products moved by 20 points with the host's load on memory):
/// `cargo test --release -p bm-runtime gemm::timing -- --ignored --nocapture`.
#[cfg(test)]
mod timing {
    #[test]
    #[ignore]
    fn w2_w3_shapes() {
        // (m, n, k, a transposed, b transposed): forward x @ Wᵀ, input grads, weight grads.
        let shapes = [
            // W1's weight gradients, then W2's and W3's products.
            (256, 256, 128, true, false),
            (64, 256, 128, true, false),
            (256, 10, 128, true, false),
            (128, 10, 256, false, false),
            (128, 256, 10, false, true),
            (2048, 384, 128, false, true),
            (2048, 512, 128, false, true),
            (2048, 128, 512, false, true),
            (2048, 128, 384, false, false),
            (384, 128, 2048, true, false),
            (2048, 1152, 384, false, true),
            (2048, 1536, 384, false, true),
            (2048, 384, 1536, false, true),
            (1536, 384, 2048, true, false),
            // W2's and W3's other weight gradients (a single thread beside a group).
            (512, 128, 2048, true, false),
            (128, 512, 2048, true, false),
            (128, 128, 2048, true, false),
            (1152, 384, 2048, true, false),
            (384, 384, 2048, true, false),
            (384, 1536, 2048, true, false),
        ];
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            for &(m, n, k, ta, tb) in &shapes {
                let a = vec![0.5f32; m * k];
                let b = vec![0.25f32; k * n];
                let mut c = vec![0.0f32; m * n];
                let (ars, acs) = if ta { (1, m) } else { (k, 1) };
                let (brs, bcs) = if tb { (1, k) } else { (n, 1) };
                let par = if threads > 1 { ::gemm::Parallelism::Rayon(threads) } else { ::gemm::Parallelism::None };
                // Alternating: the crate, the register tiles split among threads, the tiles
                // on Cᵀ, and the ceiling: every thread's FMA chains for the same work.
                let mut times = [vec![], vec![], vec![]];
                let mut ceiling = vec![];
                // The tiles' vector width (half a strip).
                let lanes = crate::tiles::strip_width().map_or(8, |w| w / 2);
                let fma_steps = (m * n * k / (threads * 12 * lanes)).max(1000);
                let rounds = if m * n * k < 1 << 24 { 400 } else { 20 };
                let mut ct = vec![0.0f32; m * n];
                let (cp, ap, bp, ctp) = (c.as_mut_ptr() as usize, a.as_ptr() as usize, b.as_ptr() as usize, ct.as_mut_ptr() as usize);
                // Timed inside the pool: a pool's sleeping worker takes ~20 µs to wake.
                pool.install(|| {
                    for _ in 0..rounds {
                        for (v, t) in times.iter_mut().enumerate() {
                            let t0 = std::time::Instant::now();
                            unsafe {
                                let cv = super::View { ptr: cp as *const f32, rs: n, cs: 1 };
                                let av = super::View { ptr: ap as *const f32, rs: ars, cs: acs };
                                let bv = super::View { ptr: bp as *const f32, rs: brs, cs: bcs };
                                match v {
                                    0 => super::product(m, n, k, cv, false, av, bv, 1.0, par),
                                    1 => assert!(super::tiled(m, n, k, cv, false, av, bv, 1.0, threads > 1)),
                                    _ => {
                                        let ctv = super::View { ptr: ctp as *const f32, rs: m, cs: 1 };
                                        assert!(super::tiled(n, m, k, ctv, false, bv.t(), av.t(), 1.0, threads > 1));
                                        let (c, ct) = (
                                            std::slice::from_raw_parts_mut(cp as *mut f32, m * n),
                                            std::slice::from_raw_parts(ctp as *const f32, m * n),
                                        );
                                        for i in 0..m {
                                            for j in 0..n {
                                                c[i * n + j] = ct[j * m + i];
                                            }
                                        }
                                    }
                                }
                            }
                            t.push(t0.elapsed().as_secs_f64());
                        }
                        let rates = rayon::broadcast(|_| crate::tiles::timing::fma_gflops(lanes, fma_steps).unwrap_or(0.0));
                        ceiling.push(rates.iter().sum::<f64>());
                    }
                });
                let _ = (&mut c, &mut ct);
                let gflops = |t: f64| 2.0 * (m * n * k) as f64 / t / 1e9;
                for t in times.iter_mut().chain([&mut ceiling]) {
                    t.sort_by(f64::total_cmp);
                }
                let median = |t: &[f64]| t[t.len() / 2];
                let line: Vec<String> = times
                    .iter()
                    .zip(["crate", "tiles", "tiles on Cᵀ"])
                    .map(|(t, name)| format!("{name} median {:.1} best {:.1} GFLOP/s", gflops(median(t)), gflops(t[0])))
                    .collect();
                let ceiling = median(&ceiling);
                let best = gflops(median(&times[0]).min(median(&times[1])));
                println!(
                    "{threads}t {m}x{n}x{k} ta={ta} tb={tb}: {}; FMA ceiling median {ceiling:.1}: crate or tiles {:.0}% of it",
                    line.join("; "),
                    100.0 * best / ceiling
                );
            }
        }
    }
}

/// The crate's own two-thread split against row panels taken dynamically by the pool:
/// `cargo test --release -p bm-runtime gemm::panel_timing -- --ignored --nocapture`.
#[cfg(test)]
mod panel_timing {
    #[test]
    #[ignore]
    fn panels_vs_crate_threads() {
        // (m, n, k, a transposed, b transposed)
        let shapes = [
            (128, 256, 256, false, true),
            (256, 256, 128, true, false),
            (2048, 512, 128, false, true),
            (2048, 128, 512, false, false),
            (128, 512, 2048, true, false),
            (2048, 1536, 384, false, true),
            (2048, 384, 1536, false, false),
            (384, 1536, 2048, true, false),
        ];
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for &(m, n, k, ta, tb) in &shapes {
            let a = vec![0.5f32; m * k];
            let b = vec![0.25f32; k * n];
            let mut c = vec![0.0f32; m * n];
            let (ars, acs) = if ta { (1, m) } else { (k, 1) };
            let (brs, bcs) = if tb { (1, k) } else { (n, 1) };
            let (ap, bp, cp) = (a.as_ptr() as usize, b.as_ptr() as usize, c.as_mut_ptr() as usize);
            let run = |rows: std::ops::Range<usize>, par: ::gemm::Parallelism| unsafe {
                super::product(
                    rows.len(),
                    n,
                    k,
                    super::View { ptr: (cp as *mut f32).add(rows.start * n) as *const f32, rs: n, cs: 1 },
                    false,
                    super::View { ptr: (ap as *const f32).add(rows.start * ars), rs: ars, cs: acs },
                    super::View { ptr: bp as *const f32, rs: brs, cs: bcs },
                    1.0,
                    par,
                )
            };
            let variants = [0usize, 4, 8, 16];
            let mut t = vec![vec![]; variants.len()];
            let reps = if m * n * k > 1 << 26 { 30 } else { 300 };
            for _ in 0..reps {
                for (v, &panels) in variants.iter().enumerate() {
                    use rayon::prelude::*;
                    let t0 = std::time::Instant::now();
                    pool.install(|| {
                        if panels == 0 {
                            run(0..m, ::gemm::Parallelism::Rayon(2))
                        } else {
                            (0..panels).into_par_iter().for_each(|p| {
                                let (lo, hi) = (m * p / panels / 8 * 8, if p + 1 == panels { m } else { m * (p + 1) / panels / 8 * 8 });
                                run(lo..hi, ::gemm::Parallelism::None)
                            })
                        }
                    });
                    t[v].push(t0.elapsed().as_secs_f64());
                }
            }
            let _ = &mut c;
            let line: Vec<String> = t
                .iter_mut()
                .zip(variants)
                .map(|(v, p)| {
                    v.sort_by(f64::total_cmp);
                    let g = |x: f64| 2.0 * (m * n * k) as f64 / x / 1e9;
                    format!(
                        "{}: {:.1} (p90 {:.1})",
                        if p == 0 { "crate".to_string() } else { format!("{p} panels") },
                        g(v[v.len() / 2]),
                        g(v[v.len() * 9 / 10])
                    )
                })
                .collect();
            println!("{m}x{n}x{k} ta={ta} tb={tb}: {}", line.join(", "));
        }
    }
}

/// The crate's two-thread split against splitting the sum over `k` in two
/// single-threaded products added afterwards (weight gradients: small `m·n`, long `k`):
/// `cargo test --release -p bm-runtime gemm::ksplit_timing -- --ignored --nocapture`.
#[cfg(test)]
mod ksplit_timing {
    #[test]
    #[ignore]
    fn ksplit_vs_crate_threads() {
        // (m, n, k): A is kᵀ-major (transposed), B row-major, as a weight gradient.
        let shapes = [
            (128, 512, 2048),
            (128, 384, 2048),
            (128, 128, 2048),
            (512, 128, 2048),
            (384, 1536, 2048),
            (1536, 384, 2048),
            (384, 1152, 2048),
            (384, 384, 2048),
        ];
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for &(m, n, k) in &shapes {
            let a = vec![0.5f32; m * k];
            let b = vec![0.25f32; k * n];
            let mut c = vec![0.0f32; m * n];
            let mut c2 = vec![0.0f32; m * n];
            let (ap, bp, cp, c2p) = (a.as_ptr() as usize, b.as_ptr() as usize, c.as_mut_ptr() as usize, c2.as_mut_ptr() as usize);
            // C (m × n, column-major as the weight gradient's [out, in] layout) over k0..k1.
            let run = |dst: usize, k0: usize, k1: usize, par: ::gemm::Parallelism| unsafe {
                super::product(
                    m,
                    n,
                    k1 - k0,
                    super::View { ptr: dst as *mut f32 as *const f32, rs: 1, cs: m },
                    false,
                    super::View { ptr: (ap as *const f32).add(k0 * m), rs: 1, cs: m },
                    super::View { ptr: (bp as *const f32).add(k0 * n), rs: n, cs: 1 },
                    1.0,
                    par,
                )
            };
            // The same product as Cᵀ = Bᵀ Aᵀ (n × m, row-major: the same memory as C).
            let swapped = || unsafe {
                super::product(
                    n,
                    m,
                    k,
                    super::View { ptr: cp as *mut f32 as *const f32, rs: m, cs: 1 },
                    false,
                    super::View { ptr: bp as *const f32, rs: 1, cs: n },
                    super::View { ptr: ap as *const f32, rs: m, cs: 1 },
                    1.0,
                    ::gemm::Parallelism::Rayon(2),
                )
            };
            // Cᵀ computed column-major (the crate's fast orientation when n > m: the big
            // operand B read in place), then transposed into C.
            let mut ct = vec![0.0f32; m * n];
            let ctp = ct.as_mut_ptr() as usize;
            let via_t = || {
                unsafe {
                    super::product(
                        n,
                        m,
                        k,
                        super::View { ptr: ctp as *mut f32 as *const f32, rs: 1, cs: n },
                        false,
                        super::View { ptr: bp as *const f32, rs: 1, cs: n },
                        super::View { ptr: ap as *const f32, rs: m, cs: 1 },
                        1.0,
                        ::gemm::Parallelism::Rayon(2),
                    )
                };
                // SAFETY: both hold m·n floats; C(i, j) at i + j·m, Cᵀ(j, i) at j + i·n.
                let (c, ct) = unsafe {
                    (std::slice::from_raw_parts_mut(cp as *mut f32, m * n), std::slice::from_raw_parts(ctp as *const f32, m * n))
                };
                for i0 in (0..m).step_by(32) {
                    for j0 in (0..n).step_by(32) {
                        for i in i0..(i0 + 32).min(m) {
                            for j in j0..(j0 + 32).min(n) {
                                c[i + j * m] = ct[j + i * n];
                            }
                        }
                    }
                }
            };
            let mut t = [vec![], vec![], vec![], vec![]];
            for _ in 0..40 {
                let t0 = std::time::Instant::now();
                pool.install(via_t);
                t[3].push(t0.elapsed().as_secs_f64());
                let t0 = std::time::Instant::now();
                pool.install(swapped);
                t[2].push(t0.elapsed().as_secs_f64());
                let t0 = std::time::Instant::now();
                pool.install(|| run(cp, 0, k, ::gemm::Parallelism::Rayon(2)));
                let t1 = std::time::Instant::now();
                pool.install(|| {
                    rayon::join(|| run(cp, 0, k / 2, ::gemm::Parallelism::None), || run(c2p, k / 2, k, ::gemm::Parallelism::None));
                    // SAFETY: both buffers hold m·n floats.
                    let (x, y) = unsafe {
                        (std::slice::from_raw_parts_mut(cp as *mut f32, m * n), std::slice::from_raw_parts(c2p as *const f32, m * n))
                    };
                    for (x, y) in x.iter_mut().zip(y) {
                        *x += y;
                    }
                });
                t[0].push((t1 - t0).as_secs_f64());
                t[1].push(t1.elapsed().as_secs_f64());
            }
            let _ = (&mut c, &mut c2, &mut ct);
            let med = |v: &mut Vec<f64>| {
                v.sort_by(f64::total_cmp);
                2.0 * (m * n * k) as f64 / v[v.len() / 2] / 1e9
            };
            println!(
                "{m}x{n}x{k}: crate Rayon(2) {:.1}, k halves {:.1}, as Cᵀ = Bᵀ Aᵀ {:.1}, Cᵀ column-major then transposed {:.1} GFLOP/s (medians)",
                med(&mut t[0]),
                med(&mut t[1]),
                med(&mut t[2]),
                med(&mut t[3])
            );
        }
    }
}
