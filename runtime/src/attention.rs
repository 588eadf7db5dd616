//! Fused attention kernels (forward and backward), written by hand.
//!
//! `out[b] = softmax(q[b] @ k[b]ᵀ · scale + mask[b]) @ v[b]` for every batch index `b`
//! (batch × heads), a block of [`QB`] query rows at a time, as matrix products of small
//! cache-resident blocks (`crate::tiles`, on one thread each) around a row-wise softmax:
//! - forward: `p = softmax(scale · q kᵀ + mask)` for the block (`QB × tk` scores in
//!   scratch, or straight into the kernel's `probs` buffer when it keeps them for the
//!   backward), then `out = p v`; causal blocks multiply only the keys their last row
//!   sees;
//! - backward: the block's `p` as the forward kept it (else recomputed: a third of W2's
//!   backward), then `dp = dO vᵀ`, `ds = scale · p (dp − Σ p·dp)`, `dq = ds k`,
//!   `dk += dsᵀ q`, `dv += pᵀ dO`. The kept `p` are the recomputed ones bit for bit.
//!
//! Work is split on the current rayon pool: tasks are batch indices (the backward's dk
//! and dv sum over every query row; a forward task's blocks share one packing of `kᵀ`),
//! or (batch index, query block) for a forward with few batch indices;
//! each writes only its own part of the output and is computed the same way whatever
//! the thread count, so results are bit-identical across thread counts. All arithmetic
//! is f32.

use crate::error::{Error, Result};
use crate::exec::Buffers;
use crate::gemm::View;
use crate::kir::{AttentionBackwardKernel, AttentionKernel, BufId, MatOperand};
use crate::tiles::{Packed, product as mm};
use rayon::prelude::*;

/// Query rows per block: the scratch is `QB × tk` scores (and as many score gradients).
/// Smaller blocks skip more of the causal mask's zeros (W2's 128 rows: 62.5% of the
/// full products computed with 32, 75% with 64); larger ones make longer products and pack
/// `kᵀ` and `vᵀ` fewer times. Measured in W2's step on Zen 4 (`bmc bench --profile`,
/// binaries alternating, three pairs): backward 9.5–10.1 ms (64) → 8.7–9.2 (32), forward
/// 3.8–4.0 → 3.4–3.9; 16 the same as 32; W3 even.
pub const QB: usize = crate::kir::ATTENTION_BLOCK_ROWS;

static KEPT_PROBABILITIES: crate::switch::Switch = crate::switch::Switch::new("BMC_KEPT_PROBABILITIES");

/// Lets (or stops) a kernel keep its probabilities in `AttentionKernel::probs` for the
/// backward, which otherwise recomputes them (`BMC_KEPT_PROBABILITIES=0`,
/// `BMC_BENCH_AB=kept-probabilities`). Switch it between steps only: a backward reads
/// what its forward kept.
pub fn set_kept_probabilities(on: bool) {
    KEPT_PROBABILITIES.set(on);
}

/// `a.probs_blocks()` when the kernel keeps its probabilities.
fn kept(a: &AttentionKernel) -> Option<(Vec<(usize, usize)>, usize)> {
    a.probs.filter(|_| KEPT_PROBABILITIES.on()).map(|_| a.probs_blocks())
}

/// Whether operand `o` stays inside a buffer of `len` elements over `batch × rows × cols`.
pub(crate) fn operand_in_bounds(o: &MatOperand, batch: &[usize], rows: usize, cols: usize, len: usize) -> Result<()> {
    o.check_in(batch, rows, cols, len, "attention")
}

/// Checks every operand of `k` (and `dout`) against the buffers' lengths (`len(buf)`,
/// `None` for a missing or non-f32 buffer), and the outputs (`outs`: the forward's
/// `out`, or the backward's dq, dk and dv, with their rows and columns): each in bounds,
/// columns contiguous, no element written twice, no input among their buffers. (That the
/// backward's three do not overlap each other is [`check_disjoint`]'s, once a program.)
pub(crate) fn check(
    k: &AttentionKernel,
    dout: Option<&MatOperand>,
    outs: &[(&MatOperand, usize, usize)],
    len: impl Fn(BufId) -> Option<usize>,
) -> Result<()> {
    let get = |b: BufId| len(b).ok_or_else(|| Error::internal(format!("attention: buffer b{b} does not exist or is not f32")));
    if k.causal && k.tq != k.tk {
        return Err(Error::internal(format!("causal attention needs tq = tk, got {} and {}", k.tq, k.tk)));
    }
    operand_in_bounds(&k.q, &k.batch, k.tq, k.d, get(k.q.buf)?)?;
    operand_in_bounds(&k.k, &k.batch, k.tk, k.d, get(k.k.buf)?)?;
    operand_in_bounds(&k.v, &k.batch, k.tk, k.dv, get(k.v.buf)?)?;
    let mut inputs = vec![k.q.buf, k.k.buf, k.v.buf];
    if let Some(m) = &k.mask {
        operand_in_bounds(m, &k.batch, k.tq, k.tk, get(m.buf)?)?;
        inputs.push(m.buf);
    }
    if let Some(o) = dout {
        operand_in_bounds(o, &k.batch, k.tq, k.dv, get(o.buf)?)?;
        inputs.push(o.buf);
    }
    for &(o, rows, cols) in outs {
        let out = o.buf;
        operand_in_bounds(o, &k.batch, rows, cols, get(out)?)?;
        let dims = k.batch.iter().copied().zip(o.batch_strides.iter().copied()).chain([(rows, o.row_stride), (cols, o.col_stride)]);
        // (The batch strides match the batch axes: `operand_in_bounds` checked.)
        if o.col_stride != 1 && cols > 1 || !crate::exec::injective(dims) {
            return Err(Error::internal(format!("attention output b{out} must have contiguous columns and no element written twice")));
        }
        if inputs.contains(&out) || k.probs == Some(out) {
            return Err(Error::internal(format!("attention output b{out} aliases an input")));
        }
    }
    if let Some(pb) = k.probs {
        if get(pb)? < k.probs_len() {
            return Err(Error::internal(format!("attention probabilities b{pb} hold fewer than {} elements", k.probs_len())));
        }
        if inputs.contains(&pb) {
            return Err(Error::internal(format!("attention probabilities b{pb} alias an operand")));
        }
    }
    Ok(())
}

/// Whether the backward's dq, dk and dv write no element twice between them (each alone
/// is [`check`]'s): marks every element they write, in buffers of `len(buf)` elements.
/// Once a program (a pass over the gradients' elements).
pub(crate) fn check_disjoint(bk: &AttentionBackwardKernel, len: impl Fn(BufId) -> Option<usize>) -> Result<()> {
    // Packed gradients (what the compiler emits) are consecutive dense ranges: disjoint
    // without marking a buffer's worth of elements at every start.
    if bk.is_packed() {
        return Ok(());
    }
    let mut marked: Vec<(BufId, Vec<bool>)> = vec![];
    for (name, o, rows, cols) in bk.grads() {
        let n = len(o.buf).ok_or_else(|| Error::internal(format!("attention: buffer b{} does not exist or is not f32", o.buf)))?;
        let at = match marked.iter().position(|(b, _)| *b == o.buf) {
            Some(i) => i,
            None => {
                marked.push((o.buf, vec![false; n]));
                marked.len() - 1
            }
        };
        let seen = &mut marked[at].1;
        for base in o.batch_offsets(&bk.fwd.batch) {
            for r in 0..rows {
                for c in 0..cols {
                    let e = base + r * o.row_stride + c * o.col_stride;
                    if e >= seen.len() || std::mem::replace(&mut seen[e], true) {
                        return Err(Error::internal(format!("attention gradient {name} overlaps another in b{}", o.buf)));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Base addresses of the operands (raw, so tasks can share them).
#[derive(Clone, Copy)]
struct Ptrs {
    q: usize,
    k: usize,
    v: usize,
    mask: usize,
    dout: usize,
    out: usize,
    /// The backward's dq, dk and dv.
    grads: [usize; 3],
    probs: usize,
}

/// Scores and probabilities of one block of query rows (`qb × n`, row stride `tk`), and
/// for the backward the gradient of the probabilities.
struct Scratch {
    p: Vec<f32>,
    dp: Vec<f32>,
    /// `kᵀ` and `vᵀ` of a batch index packed once for all its blocks (`tiles::pack`, as
    /// many keys as the task's last block sees), and whether they are.
    kt: Packed,
    vt: Packed,
    packed: bool,
    /// Scratch for the strips of any other operand [`mm`] packs.
    pack: Packed,
}

impl Scratch {
    /// Scratch for `r`'s tasks: `p` only where the probabilities are not kept (else they
    /// go to the kernel's `probs` buffer, [`Run::block_probs`]), `dp` for a backward.
    fn new(r: &Run, backward: bool) -> Scratch {
        let a = r.a;
        let len = a.tq.min(QB) * a.tk;
        Scratch {
            p: if r.probs.is_some() { vec![] } else { vec![0.0; len] },
            dp: vec![0.0; if backward { len } else { 0 }],
            kt: Default::default(),
            vt: Default::default(),
            packed: false,
            pack: Default::default(),
        }
    }

    /// Packs `kᵀ` (with `keys`) and `vᵀ` (with `values`) over the first `n` keys of
    /// batch `b`, once for the blocks of a task: per block, the causal blocks' growing key
    /// ranges had packed them again and again (W2's four blocks: 320 keys packed instead
    /// of 128).
    ///
    /// # Safety
    /// The operands were checked in bounds.
    unsafe fn pack_keys(&mut self, r: &Run, b: usize, n: usize, keys: bool, values: bool) {
        let (a, p) = (r.a, r.p);
        self.packed = true;
        // SAFETY: k and v cover tk ≥ n keys.
        unsafe {
            if keys {
                let kt = View::of(p.k, r.offs.k[b], &a.k, 0).t();
                self.packed = crate::tiles::pack(a.d, n, kt, &mut self.kt, false);
            }
            if values && self.packed {
                let vt = View::of(p.v, r.offs.v[b], &a.v, 0).t();
                self.packed = crate::tiles::pack(a.dv, n, vt, &mut self.vt, false);
            }
        }
    }
}

/// `c = alpha · a @ bt` (`bt`: `kᵀ` or `vᵀ`, one column a key) over the first `n` of
/// `all` keys: from `packed`, the task's packing of `bt`, when there is one (computing
/// up to its [`crate::tiles::packed_prefix`], so `c`'s rows of stride `ldc ≥ all` get a
/// few more columns), else packing `bt` here.
///
/// # Safety
/// As [`mm`].
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn mm_keys(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    ldc: usize,
    a: View,
    bt: View,
    alpha: f32,
    packed: Option<&Packed>,
    all: usize,
    pack: &mut Packed,
) {
    // SAFETY: forwarded; columns up to the packed prefix lie inside rows of ldc ≥ all.
    unsafe {
        match packed {
            Some(pk) => crate::tiles::product_packed(m, crate::tiles::packed_prefix(pk, n, all), k, c, ldc, false, a, pk, alpha),
            None => mm(m, n, k, c, ldc, false, a, bt, alpha, pack),
        }
    }
}

struct Offsets {
    q: Vec<usize>,
    k: Vec<usize>,
    v: Vec<usize>,
    mask: Vec<usize>,
    dout: Vec<usize>,
    /// The forward's output.
    out: Vec<usize>,
    /// The backward's dq, dk and dv.
    grads: [Vec<usize>; 3],
}

impl Offsets {
    fn new(a: &AttentionKernel, bk: Option<&AttentionBackwardKernel>) -> Offsets {
        Offsets {
            q: a.q.batch_offsets(&a.batch),
            k: a.k.batch_offsets(&a.batch),
            v: a.v.batch_offsets(&a.batch),
            mask: a.mask.as_ref().map(|m| m.batch_offsets(&a.batch)).unwrap_or_default(),
            dout: bk.map(|bk| bk.dout.batch_offsets(&a.batch)).unwrap_or_default(),
            out: if bk.is_none() { a.out.batch_offsets(&a.batch) } else { vec![] },
            grads: bk.map(|bk| bk.grads().map(|(_, o, _, _)| o.batch_offsets(&a.batch))).unwrap_or_default(),
        }
    }
}

/// `exp` in f32 without a library call, so loops over it vectorise (Cephes `expf`:
/// `n = round(x log2 e)`, a degree-5 polynomial, scaling by `2^n` in two steps; within
/// about 1 ulp of libm; exactly 0 below -103, +inf above 88.8, NaN for NaN).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // The interpreter's exp (the same Cephes polynomial), with exact 0 and inf at the ends
    // so fully masked keys weigh exactly nothing.
    let y = crate::interp::exp_core(x);
    if x < -103.0 {
        0.0
    } else if x > 88.8 {
        f32::INFINITY
    } else {
        y
    }
}

/// Folds `xs` with `f` in eight interleaved lanes (so the loop vectorises), then the
/// lanes pairwise.
#[inline(always)]
fn lanes(xs: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            acc[l] = f(acc[l], c[l]);
        }
    }
    for (l, &x) in rest.iter().enumerate() {
        acc[l] = f(acc[l], x);
    }
    let q = [f(acc[0], acc[4]), f(acc[1], acc[5]), f(acc[2], acc[6]), f(acc[3], acc[7])];
    f(f(q[0], q[2]), f(q[1], q[3]))
}

/// `Σ a·b` in eight lanes, as [`lanes`].
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    for (l, (&x, &y)) in ca.remainder().iter().zip(cb.remainder()).enumerate() {
        acc[l] = x * y;
    }
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    lanes(&acc, 0.0, |s, x| s + x)
}

/// The widest copies of the per-block bodies this CPU runs. They compute exactly the
/// same operations in the same order (no FMA contraction; reductions in eight lanes
/// whatever the width), only wider.
#[derive(Clone, Copy, PartialEq)]
enum Width {
    Avx512,
    Avx2,
    Scalar,
}

fn width() -> Width {
    if crate::cpu::avx512() {
        return Width::Avx512;
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        return Width::Avx2;
    }
    Width::Scalar
}

/// Shared, read-only state of one kernel run.
struct Run<'a> {
    a: &'a AttentionKernel,
    /// The backward's kernel (its `dout` and gradients), `None` in the forward.
    bk: Option<&'a AttentionBackwardKernel>,
    p: Ptrs,
    offs: Offsets,
    /// `a.probs_blocks()` when the kernel keeps its probabilities.
    probs: Option<(Vec<(usize, usize)>, usize)>,
}

impl Run<'_> {
    /// Where the probabilities of the block of query rows starting at `i0` of batch `b`
    /// live, and their row stride: the kernel's `probs` block when it keeps them, else
    /// the scratch (rows of `tk`).
    fn block_probs(&self, sc: &mut Scratch, b: usize, i0: usize) -> (*mut f32, usize) {
        match self.probs {
            Some((ref blocks, per_batch)) => {
                let (at, width) = blocks[i0 / QB];
                ((self.p.probs as *mut f32).wrapping_add(b * per_batch + at), width)
            }
            None => (sc.p.as_mut_ptr(), self.a.tk),
        }
    }

    /// The softmax probabilities of query rows `i0..i1` of batch `b` into `dst`, rows
    /// `ld` apart (keys `0..keys(i1 - 1)`; keys a row does not see are 0; `ld` leaves
    /// room for the columns [`mm_keys`] computes past them). A row whose every score is
    /// -inf (or any is NaN) is NaN, as the unfused softmax gives.
    ///
    /// # Safety
    /// Every operand must have been checked in bounds; `dst` holds `i1 - i0` rows of `ld`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn probabilities(&self, sc: &mut Scratch, dst: *mut f32, ld: usize, b: usize, i0: usize, i1: usize, all: usize) {
        let (a, p, offs) = (self.a, self.p, &self.offs);
        let n = a.keys(i1 - 1);
        let q = View::of(p.q, offs.q[b], &a.q, i0);
        let kt = View::of(p.k, offs.k[b], &a.k, 0).t();
        // SAFETY: q and k are in bounds; dst holds (i1 - i0) rows of ld.
        unsafe {
            let packed = sc.packed.then_some(&sc.kt);
            mm_keys(i1 - i0, n, a.d, dst, ld, q, kt, a.scale as f32, packed, all, &mut sc.pack)
        };
        for i in i0..i1 {
            // SAFETY: row i - i0 of dst, n ≤ ld elements.
            let row = unsafe { std::slice::from_raw_parts_mut(dst.add((i - i0) * ld), n) };
            let (seen, unseen) = row.split_at_mut(a.keys(i));
            unseen.fill(0.0);
            if let Some(m) = &a.mask {
                let mp = View::of(p.mask, offs.mask[b], m, i);
                for (j, x) in seen.iter_mut().enumerate() {
                    // SAFETY: the mask was checked in bounds.
                    *x += unsafe { *mp.ptr.add(j * mp.cs) };
                }
            }
            // NaN scores need no test here: they make the sum, so the row, NaN.
            let mx = lanes(seen, f32::NEG_INFINITY, |m, x| if x > m { x } else { m });
            if mx == f32::NEG_INFINITY {
                seen.fill(f32::NAN);
                continue;
            }
            for x in seen.iter_mut() {
                *x = exp(*x - mx);
            }
            // One division a row, then products: a division an element cost as much
            // as its exp (Zen 4's divider at half width).
            let inv = 1.0 / lanes(seen, 0.0, |s, x| s + x);
            for x in seen.iter_mut() {
                *x *= inv;
            }
        }
    }

    /// The forward of query rows `r0..r1` of batch `b`, a block of [`QB`] at a time
    /// over one packing of `kᵀ`.
    ///
    /// # Safety
    /// Every operand must have been checked in bounds; the output must be a distinct
    /// buffer (these rows of it are written by this call only).
    #[inline(always)]
    unsafe fn forward(&self, sc: &mut Scratch, b: usize, r0: usize, r1: usize) {
        let (a, p) = (self.a, self.p);
        let v = View::of(p.v, self.offs.v[b], &a.v, 0);
        let all = a.keys(r1 - 1);
        // SAFETY: as documented; each output block is (i1 - i0) × dv, dense.
        unsafe {
            sc.pack_keys(self, b, all, true, false);
            for i0 in (r0..r1).step_by(QB) {
                let i1 = (i0 + QB).min(r1);
                // The keys the block's last row sees: the sum of `p v`.
                let n = a.keys(i1 - 1);
                let out = (p.out as *mut f32).wrapping_add(self.offs.out[b] + i0 * a.out.row_stride);
                let (probs, ld) = self.block_probs(sc, b, i0);
                self.probabilities(sc, probs, ld, b, i0, i1, all);
                if self.probs.is_some() {
                    // Kept probabilities are 0 past the block's keys too (the product
                    // computed some of those columns, as many as the task's packing gave).
                    for r in 0..i1 - i0 {
                        std::slice::from_raw_parts_mut(probs.add(r * ld + n), ld - n).fill(0.0);
                    }
                }
                mm(i1 - i0, a.dv, n, out, a.out.row_stride, false, View::dense(probs, ld), v, 1.0, &mut sc.pack);
            }
        }
    }

    /// The backward of batch `b`: its blocks of dq, dk and dv, a block of query rows at
    /// a time (`p` as the forward kept it, or recomputed; `dp = dO vᵀ`,
    /// `ds = scale · p (dp − Σ p·dp)`, `dq = ds k`, `dk += dsᵀ q`, `dv += pᵀ dO`).
    ///
    /// # Safety
    /// As for [`Run::forward`] (batch `b`'s gradient blocks are written by this call only).
    #[inline(always)]
    unsafe fn backward(&self, sc: &mut Scratch, b: usize) {
        let (a, p, offs) = (self.a, self.p, &self.offs);
        let bk = self.bk.expect("the backward has its kernel");
        let dout = &bk.dout;
        let (tq, tk, d, dv) = (a.tq, a.tk, a.d, a.dv);
        let scale = a.scale as f32;
        // Batch b's rows of dq, dk and dv, and their row strides.
        let grad = |g: usize| ((p.grads[g] as *mut f32).wrapping_add(offs.grads[g][b]), bk.grads()[g].1.row_stride);
        let ((dq, lq), (dk, lk), (dvv, lv)) = (grad(0), grad(1), grad(2));
        let k = View::of(p.k, offs.k[b], &a.k, 0);
        let v = View::of(p.v, offs.v[b], &a.v, 0);
        // SAFETY: every view was checked in bounds; dq, dk, dv are this batch's rows of
        // outputs that overlap nothing else (`check`, `check_disjoint`).
        unsafe {
            for j in 0..tk {
                std::slice::from_raw_parts_mut(dk.add(j * lk), d).fill(0.0);
                std::slice::from_raw_parts_mut(dvv.add(j * lv), dv).fill(0.0);
            }
            let all = a.keys(tq - 1);
            sc.pack_keys(self, b, all, self.probs.is_none(), true);
            for i0 in (0..tq).step_by(QB) {
                let i1 = (i0 + QB).min(tq);
                let (m, n) = (i1 - i0, a.keys(i1 - 1));
                let (probs, ld) = self.block_probs(sc, b, i0);
                if self.probs.is_none() {
                    self.probabilities(sc, probs, ld, b, i0, i1, all);
                }
                let go = View::of(p.dout, offs.dout[b], dout, i0);
                let packed = sc.packed.then_some(&sc.vt);
                mm_keys(m, n, dv, sc.dp.as_mut_ptr(), tk, go, v.t(), 1.0, packed, all, &mut sc.pack);
                for r in 0..m {
                    let pr = std::slice::from_raw_parts(probs.add(r * ld), n);
                    let dr = &mut sc.dp[r * tk..r * tk + n];
                    let dsum = dot(pr, dr);
                    // dp becomes scale · ds (0 where the row sees no key).
                    for (y, &x) in dr.iter_mut().zip(pr) {
                        *y = scale * (x * (*y - dsum));
                    }
                }
                let ds = View::dense(sc.dp.as_ptr(), tk);
                let pm = View::dense(probs, ld);
                let q = View::of(p.q, offs.q[b], &a.q, i0);
                mm(m, d, n, dq.add(i0 * lq), lq, false, ds, k, 1.0, &mut sc.pack);
                mm(n, d, m, dk, lk, true, ds.t(), q, 1.0, &mut sc.pack);
                mm(n, dv, m, dvv, lv, true, pm.t(), go, 1.0, &mut sc.pack);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn forward_avx2(r: &Run, sc: &mut Scratch, b: usize, i0: usize, i1: usize) {
    unsafe { r.forward(sc, b, i0, i1) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn backward_avx2(r: &Run, sc: &mut Scratch, b: usize) {
    unsafe { r.backward(sc, b) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
unsafe fn forward_avx512(r: &Run, sc: &mut Scratch, b: usize, i0: usize, i1: usize) {
    unsafe { r.forward(sc, b, i0, i1) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
unsafe fn backward_avx512(r: &Run, sc: &mut Scratch, b: usize) {
    unsafe { r.backward(sc, b) }
}

fn ptrs(a: &AttentionKernel, bk: Option<&AttentionBackwardKernel>, bufs: &mut Buffers) -> Result<Ptrs> {
    let mut grads = [0; 3];
    if let Some(bk) = bk {
        for (g, (_, o, _, _)) in grads.iter_mut().zip(bk.grads()) {
            *g = bufs.f32_mut(o.buf)?.as_mut_ptr() as usize;
        }
    }
    Ok(Ptrs {
        q: bufs.f32(a.q.buf)?.as_ptr() as usize,
        k: bufs.f32(a.k.buf)?.as_ptr() as usize,
        v: bufs.f32(a.v.buf)?.as_ptr() as usize,
        mask: match &a.mask {
            Some(m) => bufs.f32(m.buf)?.as_ptr() as usize,
            None => 0,
        },
        dout: match bk {
            Some(bk) => bufs.f32(bk.dout.buf)?.as_ptr() as usize,
            None => 0,
        },
        // The backward writes its gradients, not `out`.
        out: if bk.is_none() { bufs.f32_mut(a.out.buf)?.as_mut_ptr() as usize } else { 0 },
        grads,
        probs: match a.probs {
            Some(pb) => bufs.f32_mut(pb)?.as_mut_ptr() as usize,
            None => 0,
        },
    })
}

/// Runs `f(scratch, task)` for tasks `0..n`, in parallel on the current pool when
/// `threads > 1`.
fn for_tasks(r: &Run, n: usize, backward: bool, threads: usize, f: impl Fn(&mut Scratch, usize) + Sync) {
    if threads > 1 && n > 1 {
        (0..n).into_par_iter().for_each_init(|| Scratch::new(r, backward), |s, t| f(s, t));
    } else {
        let mut s = Scratch::new(r, backward);
        for t in 0..n {
            f(&mut s, t);
        }
    }
}

/// The forward kernel. Call inside the executor's pool (`pool.install`) so that its
/// parallelism uses that pool. A task is one batch index, or one block of its query
/// rows when there are few batch indices.
pub fn forward(a: &AttentionKernel, bufs: &mut Buffers, threads: usize) -> Result<()> {
    check(a, None, &[(&a.out, a.tq, a.dv)], |b| bufs.f32(b).ok().map(|x| x.len()))?;
    let r = Run { a, bk: None, p: ptrs(a, None, bufs)?, offs: Offsets::new(a, None), probs: kept(a) };
    let width = width();
    // A task is a batch index (its blocks share one packing of `kᵀ`), or one block of
    // it when there are too few batch indices to share among the threads.
    let blocks = if a.batch_count() >= 4 * threads { 1 } else { a.tq.div_ceil(QB) };
    // Blocks start at multiples of QB either way: results do not depend on the split.
    let rows = if blocks == 1 { a.tq } else { QB };
    for_tasks(&r, a.batch_count() * blocks, false, threads, |sc, t| {
        let (b, i0) = (t / blocks, t % blocks * rows);
        let i1 = (i0 + rows).min(a.tq);
        // SAFETY: every operand was checked in bounds above; the output is a distinct
        // buffer and each task writes only its own rows; the width was detected.
        unsafe {
            match width {
                #[cfg(target_arch = "x86_64")]
                Width::Avx512 => forward_avx512(&r, sc, b, i0, i1),
                #[cfg(target_arch = "x86_64")]
                Width::Avx2 => forward_avx2(&r, sc, b, i0, i1),
                _ => r.forward(sc, b, i0, i1),
            }
        }
    });
    Ok(())
}

/// The backward kernel (packed dq, dk, dv). Call inside the executor's pool. A task is
/// one batch index (its dk and dv sum over every query row).
pub fn backward(bk: &AttentionBackwardKernel, bufs: &mut Buffers, threads: usize) -> Result<()> {
    let a = &bk.fwd;
    let outs = bk.grads().map(|(_, o, rows, cols)| (o, rows, cols));
    check(a, Some(&bk.dout), &outs, |b| bufs.f32(b).ok().map(|x| x.len()))?;
    let probs = kept(a);
    let r = Run { a, bk: Some(bk), p: ptrs(a, Some(bk), bufs)?, offs: Offsets::new(a, Some(bk)), probs };
    let width = width();
    for_tasks(&r, a.batch_count(), true, threads, |sc, b| {
        // SAFETY: as in `forward`.
        unsafe {
            match width {
                #[cfg(target_arch = "x86_64")]
                Width::Avx512 => backward_avx512(&r, sc, b),
                #[cfg(target_arch = "x86_64")]
                Width::Avx2 => backward_avx2(&r, sc, b),
                _ => r.backward(sc, b),
            }
        }
    });
    Ok(())
}

#[cfg(test)]
#[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
mod tests {
    use super::*;
    use crate::exec::test_support::*;
    use crate::kir::{DType, Kernel};

    /// Dense row-major operand of `rows × cols` per batch, batches contiguous (batch
    /// axis 0 broadcast when `bcast`), or transposed in memory when `t`.
    fn dense(buf: usize, batch: &[usize], rows: usize, cols: usize, t: bool, bcast: bool) -> (MatOperand, usize) {
        let mat = rows * cols;
        let mut bs = vec![0; batch.len()];
        let mut acc = mat;
        for dd in (0..batch.len()).rev() {
            bs[dd] = if bcast && dd == 0 { 0 } else { acc };
            if !(bcast && dd == 0) {
                acc *= batch[dd];
            }
        }
        let (rs, cs) = if t { (1, rows) } else { (cols, 1) };
        (MatOperand { buf, offset: 0, batch_strides: bs, row_stride: rs, col_stride: cs }, acc.max(1))
    }

    /// A naive reference: the full score matrix, softmax, product (f64).
    /// The forward's output, or with `dout` the packed gradients (dq, dk, dv dense, one
    /// after another).
    fn reference(a: &AttentionKernel, bufs: &Buffers, dout: Option<&MatOperand>) -> Vec<f64> {
        let at =
            |o: &MatOperand, off: usize, r: usize, c: usize| bufs.f32(o.buf).unwrap()[off + r * o.row_stride + c * o.col_stride] as f64;
        let bk = dout.map(|o| AttentionBackwardKernel::packed(a.clone(), o.clone(), 0));
        let offs = Offsets::new(a, bk.as_ref());
        let nb = a.batch_count();
        let (nq, nk, _) = a.grad_lens();
        let mut out = vec![0.0; if dout.is_some() { a.grad_lens().0 + nk + a.grad_lens().2 } else { a.out_len() }];
        for b in 0..nb {
            let mut p = vec![vec![0.0; a.tk]; a.tq];
            for i in 0..a.tq {
                let mut s = vec![f64::NEG_INFINITY; a.tk];
                for j in 0..a.tk {
                    if a.causal && j > i {
                        continue;
                    }
                    let mut x = 0.0;
                    for c in 0..a.d {
                        x += at(&a.q, offs.q[b], i, c) * at(&a.k, offs.k[b], j, c);
                    }
                    s[j] = x * a.scale + a.mask.as_ref().map_or(0.0, |m| at(m, offs.mask[b], i, j));
                }
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for j in 0..a.tk {
                    p[i][j] = e[j] / z;
                }
            }
            match dout {
                None => {
                    for i in 0..a.tq {
                        for c in 0..a.dv {
                            out[(b * a.tq + i) * a.dv + c] = (0..a.tk).map(|j| p[i][j] * at(&a.v, offs.v[b], j, c)).sum();
                        }
                    }
                }
                Some(go) => {
                    for i in 0..a.tq {
                        let dp: Vec<f64> =
                            (0..a.tk).map(|j| (0..a.dv).map(|c| at(go, offs.dout[b], i, c) * at(&a.v, offs.v[b], j, c)).sum()).collect();
                        let ds_sum: f64 = (0..a.tk).map(|j| p[i][j] * dp[j]).sum();
                        for j in 0..a.tk {
                            let ds = p[i][j] * (dp[j] - ds_sum) * a.scale;
                            for c in 0..a.d {
                                out[(b * a.tq + i) * a.d + c] += ds * at(&a.k, offs.k[b], j, c);
                                out[nq + (b * a.tk + j) * a.d + c] += ds * at(&a.q, offs.q[b], i, c);
                            }
                            for c in 0..a.dv {
                                out[nq + nk + (b * a.tk + j) * a.dv + c] += p[i][j] * at(go, offs.dout[b], i, c);
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// Runs forward and backward (the backward reading the probabilities the forward
    /// kept, with `keep`), checks them against [`reference`] and returns their bits.
    fn case(
        batch: &[usize],
        tq: usize,
        tk: usize,
        d: usize,
        dv: usize,
        causal: bool,
        masked: bool,
        transposed: bool,
        keep: bool,
    ) -> Vec<u32> {
        let (q, lq) = dense(0, batch, tq, d, transposed, false);
        let (k, lk) = dense(1, batch, tk, d, false, true);
        let (v, lv) = dense(2, batch, tk, dv, transposed, false);
        let (m, lm) = dense(3, batch, tq, tk, false, true);
        let (go, lg) = dense(4, batch, tq, dv, false, false);
        let nb: usize = batch.iter().product();
        let probs = keep.then_some(7);
        // The forward's output dense, or (with `transposed`) laid out for a reader: a
        // head's rows beside the other heads' (`[B, H, T, Dv]` written as `[B, T, H, Dv]`),
        // or rows padded apart without two batch axes.
        let out = match (transposed, batch) {
            (false, _) => MatOperand::dense(5, batch, tq, dv),
            (true, &[_, h]) => MatOperand { buf: 5, offset: 0, batch_strides: vec![tq * h * dv, dv], row_stride: h * dv, col_stride: 1 },
            (true, _) => {
                let mut o = MatOperand::dense(5, batch, tq, dv + 2);
                o.offset = 1;
                o
            }
        };
        let out_len = match (transposed, batch) {
            (true, &[_, _]) | (false, _) => nb * tq * dv,
            _ => nb * tq * (dv + 2) + 1,
        };
        let fwd =
            AttentionKernel { batch: batch.to_vec(), tq, tk, d, dv, q, k, v, mask: masked.then_some(m), causal, scale: 0.37, out, probs };
        // The gradients packed, or (with `transposed`) where a reader wants them: with two
        // batch axes and equal sizes as the heads of one `[B, T, 3, H, D]` buffer (the
        // gradient of a fused qkv product), else each with its rows padded apart.
        let mut bk = AttentionBackwardKernel::packed(fwd.clone(), go.clone(), 6);
        let (nq, nk, nv) = fwd.grad_lens();
        let mut grads_len = nq + nk + nv;
        if transposed {
            match batch {
                &[b0, h] if tq == tk && d == dv => {
                    let row = 3 * h * d;
                    let op = |which: usize| MatOperand {
                        buf: 6,
                        offset: which * h * d,
                        batch_strides: vec![tq * row, d],
                        row_stride: row,
                        col_stride: 1,
                    };
                    (bk.dq, bk.dk, bk.dv) = (op(0), op(1), op(2));
                    grads_len = b0 * tq * row;
                }
                _ => {
                    let mut at = 2;
                    for (o, rows, cols) in [(&mut bk.dq, tq, d), (&mut bk.dk, tk, d), (&mut bk.dv, tk, dv)] {
                        *o = MatOperand { offset: at, ..MatOperand::dense(6, batch, rows, cols + 1) };
                        at += nb * rows * (cols + 1);
                    }
                    grads_len = at;
                }
            }
        }
        let p = program(
            vec![
                buf("q", DType::F32, lq),
                buf("k", DType::F32, lk),
                buf("v", DType::F32, lv),
                buf("m", DType::F32, lm),
                buf("go", DType::F32, lg),
                buf("out", DType::F32, out_len),
                buf("grads", DType::F32, grads_len),
                buf("probs", DType::F32, fwd.probs_len().max(1)),
            ],
            vec![Kernel::Attention(fwd.clone()), Kernel::AttentionBackward(bk.clone())],
        );
        // Interpreter and JIT executor (threads) agree bit for bit.
        let bufs = check_jit(&p, (tq * 131 + tk * 7 + d) as u64, 3, false, 0.0);
        let close = |got: &[f32], want: &[f64], what: &str| {
            for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
                assert!(
                    (g as f64 - w).abs() <= 1e-4 * w.abs().max(1.0),
                    "{what}[{i}]: {g} vs {w} ({batch:?} {tq} {tk} {d} {dv} causal {causal})"
                );
            }
        };
        // The forward's output read back through its layout, row-major.
        let (outs, o) = (fwd.out.batch_offsets(batch), &fwd.out);
        let got: Vec<f32> =
            (0..nb * tq * dv).map(|e| bufs.f32(5).unwrap()[outs[e / (tq * dv)] + e / dv % tq * o.row_stride + e % dv]).collect();
        close(&got, &reference(&fwd, &bufs, None), "out");
        // The gradients read back through their operands, packed.
        let mut got = vec![];
        for (_, o, rows, cols) in bk.grads() {
            for base in o.batch_offsets(batch) {
                got.extend((0..rows * cols).map(|e| bufs.f32(6).unwrap()[base + e / cols * o.row_stride + e % cols]));
            }
        }
        close(&got, &reference(&fwd, &bufs, Some(&go)), "grads");
        bufs.f32(5).unwrap().iter().chain(bufs.f32(6).unwrap()).map(|x| x.to_bits()).collect()
    }

    #[test]
    fn matches_a_naive_reference() {
        for &(batch, tq, tk, d, dv) in &[
            (&[][..], 1usize, 1usize, 1usize, 1usize),
            (&[2][..], 7, 7, 3, 5),
            (&[2, 3][..], 33, 33, 8, 8),
            (&[3][..], 70, 70, 16, 9),
            (&[2][..], 130, 130, 4, 4),
        ] {
            for causal in [false, true] {
                for masked in [false, true] {
                    // The backward gives the same bits from the kept probabilities as
                    // from recomputed ones.
                    let kept = case(batch, tq, tk, d, dv, causal, masked, tq % 2 == 1, true);
                    assert!(kept == case(batch, tq, tk, d, dv, causal, masked, tq % 2 == 1, false), "{batch:?} {tq} {causal} {masked}");
                }
            }
        }
        // Tq ≠ Tk (not causal), more keys than one tile.
        for keep in [false, true] {
            case(&[2], 5, 100, 6, 3, false, true, false, keep);
            case(&[], 9, 2, 6, 3, false, false, true, keep);
        }
    }

    #[test]
    fn exp_is_close_to_libm() {
        let mut x = -110.0f32;
        while x < 90.0 {
            let (a, b) = (exp(x), x.exp());
            assert!(a == b || (a - b).abs() <= 4.0 * f32::EPSILON * b.abs() || (b < 1e-37 && a.abs() < 1e-37), "{x}: {a} vs {b}");
            x += 0.0137;
        }
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn rejects_bad_operands() {
        let (q, _) = dense(0, &[], 4, 4, false, false);
        let a = AttentionKernel {
            batch: vec![],
            tq: 4,
            tk: 4,
            d: 4,
            dv: 4,
            q: q.clone(),
            k: q.clone(),
            v: q,
            mask: None,
            causal: false,
            scale: 1.0,
            out: MatOperand::dense(1, &[], 4, 4),
            probs: None,
        };
        fn fwd(a: &AttentionKernel) -> [(&MatOperand, usize, usize); 1] {
            [(&a.out, a.tq, a.dv)]
        }
        let ok = |a: &AttentionKernel, len: usize| check(a, None, &fwd(a), |_| Some(len)).is_ok();
        assert!(ok(&a, 16));
        assert!(check(&a, None, &fwd(&a), |b| Some(if b == 0 { 15 } else { 16 })).is_err());
        // The output too short for its rows, written twice, or with strided columns.
        assert!(check(&a, None, &fwd(&a), |b| Some(if b == 1 { 15 } else { 16 })).is_err());
        let mut twice = a.clone();
        twice.out.row_stride = 2;
        assert!(!ok(&twice, 16));
        let mut columns = a.clone();
        (columns.out.row_stride, columns.out.col_stride) = (1, 4);
        assert!(!ok(&columns, 16));
        let mut padded = a.clone();
        padded.out.row_stride = 5;
        assert!(ok(&padded, 19) && !ok(&padded, 18));
        let mut alias = a.clone();
        alias.out.buf = 0;
        assert!(!ok(&alias, 16));
        let mut c = a.clone();
        c.causal = true;
        c.tk = 3;
        assert!(!ok(&c, 16));
        // Kept probabilities: one block of 4 rows, 4 wide; too short or aliasing is an error.
        let mut kept = a.clone();
        kept.probs = Some(2);
        assert_eq!(kept.probs_len(), 16);
        assert!(ok(&kept, 16));
        assert!(check(&kept, None, &fwd(&kept), |b| Some(if b == 2 { 15 } else { 16 })).is_err());
        kept.probs = Some(1);
        assert!(!ok(&kept, 16));
        // The backward's gradients: packed they fit 48 elements, not 47; two overlapping
        // is an error once a program (`check_disjoint`), each alone is not.
        let bk = AttentionBackwardKernel::packed(a.clone(), MatOperand::dense(3, &[], 4, 4), 4);
        let outs = bk.grads().map(|(_, o, r, c)| (o, r, c));
        assert!(check(&bk.fwd, Some(&bk.dout), &outs, |_| Some(48)).is_ok());
        assert!(check(&bk.fwd, Some(&bk.dout), &outs, |b| Some(if b == 4 { 47 } else { 48 })).is_err());
        assert!(check_disjoint(&bk, |_| Some(48)).is_ok());
        let mut overlapping = bk.clone();
        overlapping.dv.offset = 20;
        let outs = overlapping.grads().map(|(_, o, r, c)| (o, r, c));
        assert!(check(&overlapping.fwd, Some(&overlapping.dout), &outs, |_| Some(48)).is_ok());
        assert!(check_disjoint(&overlapping, |_| Some(48)).is_err());
    }
}

/// Times the kernels on W2's shapes: `cargo test --release -p bm-runtime attention::timing -- --ignored --nocapture`.
#[cfg(test)]
mod timing {
    use super::*;
    use crate::exec::test_support::*;
    use crate::kir::DType;

    #[test]
    #[ignore]
    fn w2_shapes() {
        // W2's shapes, then W3's.
        for (batch, t, d) in [(vec![16usize, 4], 128usize, 32usize), (vec![8, 6], 256, 64)] {
            shapes(batch, t, d);
        }
    }

    fn shapes(batch: Vec<usize>, t: usize, d: usize) {
        let nb: usize = batch.iter().product();
        let h = batch[1];
        let op = |buf| MatOperand { buf, offset: 0, batch_strides: vec![h * t * d, t * d], row_stride: d, col_stride: 1 };
        let recomputing = AttentionKernel {
            batch: batch.clone(),
            tq: t,
            tk: t,
            d,
            dv: d,
            q: op(0),
            k: op(1),
            v: op(2),
            mask: None,
            causal: true,
            scale: 0.17,
            out: MatOperand::dense(4, &batch, t, d),
            probs: None,
        };
        let n = nb * t * d;
        let p = program(
            vec![
                buf("q", DType::F32, n),
                buf("k", DType::F32, n),
                buf("v", DType::F32, n),
                buf("go", DType::F32, n),
                buf("o", DType::F32, n),
                buf("g", DType::F32, 3 * n),
                buf("p", DType::F32, recomputing.probs_len()),
            ],
            vec![],
        );
        let mut bufs = Buffers::new(&p);
        fill(&mut bufs, 1, false);
        // The backward recomputing the probabilities, then reading the ones the forward
        // kept (as the models' train steps run it).
        for (a, how) in [(recomputing.clone(), "recomputed"), (AttentionKernel { probs: Some(6), ..recomputing }, "kept")] {
            timed(&a, op(3), &mut bufs, how);
        }
    }

    /// Forward and backward of `a` (its output in buffer 4, the gradients in 5), 21 rounds
    /// on one thread and on two.
    fn timed(a: &AttentionKernel, dout: MatOperand, bufs: &mut Buffers, how: &str) {
        let bk = AttentionBackwardKernel::packed(a.clone(), dout, 5);
        let (batch, t, d) = (&a.batch, a.tq, a.d);
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let (mut f, mut b) = (vec![], vec![]);
            for _ in 0..21 {
                let t0 = std::time::Instant::now();
                pool.install(|| forward(a, bufs, threads)).unwrap();
                let t1 = std::time::Instant::now();
                pool.install(|| backward(&bk, bufs, threads)).unwrap();
                f.push((t1 - t0).as_secs_f64());
                b.push(t1.elapsed().as_secs_f64());
            }
            f.sort_by(f64::total_cmp);
            b.sort_by(f64::total_cmp);
            println!(
                "batch {batch:?} t {t} d {d}, {threads} threads, probabilities {how}: forward {:.2} ms, backward {:.2} ms (medians of 21; best {:.2}, {:.2})",
                f[10] * 1e3,
                b[10] * 1e3,
                f[0] * 1e3,
                b[0] * 1e3
            );
        }
    }
}
