//! Fused attention kernels (forward and backward), written by hand.
//!
//! `out[b] = softmax(q[b] @ k[b]ᵀ · scale + mask[b]) @ v[b]` for every batch index `b`
//! (batch × heads). Neither direction stores the tq×tk score matrix:
//! - forward: each query row runs an online softmax over tiles of [`TILE`] keys (a
//!   running maximum and sum; the accumulator is rescaled when the maximum grows);
//! - backward: each query row's softmax is recomputed from `q` and `k` (scores, then
//!   max and sum), then `dv_j += p_j·dO`, `dp_j = dO·v_j`, `ds_j = p_j (dp_j − Σ p·dp)`,
//!   `dq += scale·ds_j·k_j`, `dk_j += scale·ds_j·q`.
//!
//! Scratch is one batch's K and V (packed contiguous) and a few rows, per task. Work is
//! split over the batch (one task per batch index, each writing only its own part of the
//! output) on the current rayon pool; each batch index is computed the same way whatever
//! the thread count, so results are bit-identical across thread counts. All arithmetic
//! is f32.

use crate::error::{Error, Result};
use crate::exec::Buffers;
use crate::kir::{AttentionBackwardKernel, AttentionKernel, BufId, MatOperand};
use rayon::prelude::*;

/// Keys per tile of the forward's online softmax.
pub const TILE: usize = 64;

/// Whether operand `o` stays inside a buffer of `len` elements over `batch × rows × cols`.
pub(crate) fn operand_in_bounds(o: &MatOperand, batch: &[usize], rows: usize, cols: usize, len: usize) -> Result<()> {
    o.check_in(batch, rows, cols, len, "attention")
}

/// Checks every operand of `k` (and `dout`, and the output of `out_len` elements)
/// against the buffers' lengths (`len(buf)`, `None` for a missing or non-f32 buffer).
pub(crate) fn check(k: &AttentionKernel, dout: Option<&MatOperand>, out_len: usize, len: impl Fn(BufId) -> Option<usize>) -> Result<()> {
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
    if get(k.out)? < out_len {
        return Err(Error::internal(format!("attention output b{} holds fewer than {out_len} elements", k.out)));
    }
    if inputs.contains(&k.out) {
        return Err(Error::internal(format!("attention output b{} aliases an input", k.out)));
    }
    Ok(())
}

/// `y += a · x`
#[inline]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * *x;
    }
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
}

/// Copies matrix `(rows, cols)` of operand `o` at element offset `off` into `dst`, row major.
///
/// # Safety
/// `base` must cover the operand at this offset.
unsafe fn load(base: usize, off: usize, o: &MatOperand, rows: usize, cols: usize, dst: &mut [f32]) {
    let p = base as *const f32;
    for r in 0..rows {
        let row = &mut dst[r * cols..(r + 1) * cols];
        unsafe {
            let src = p.add(off + r * o.row_stride);
            if o.col_stride == 1 {
                row.copy_from_slice(std::slice::from_raw_parts(src, cols));
            } else {
                for (c, x) in row.iter_mut().enumerate() {
                    *x = *src.add(c * o.col_stride);
                }
            }
        }
    }
}

struct Scratch {
    k: Vec<f32>,
    /// K transposed (d × tk), for the scores as a sum of scaled rows.
    kt: Vec<f32>,
    v: Vec<f32>,
    /// V transposed (dv × tk), for `dp` in the backward.
    vt: Vec<f32>,
    q: Vec<f32>,
    dout: Vec<f32>,
    s: Vec<f32>,
    dp: Vec<f32>,
    acc: Vec<f32>,
}

impl Scratch {
    fn new(a: &AttentionKernel, backward: bool) -> Scratch {
        let row = if backward { a.tk } else { a.tk.min(TILE) };
        Scratch {
            k: vec![0.0; a.tk * a.d],
            kt: vec![0.0; a.tk * a.d],
            v: vec![0.0; a.tk * a.dv],
            vt: vec![0.0; if backward { a.tk * a.dv } else { 0 }],
            q: vec![0.0; a.d],
            dout: vec![0.0; if backward { a.dv } else { 0 }],
            s: vec![0.0; row],
            dp: vec![0.0; if backward { a.tk } else { 0 }],
            acc: vec![0.0; a.dv],
        }
    }
}

struct Offsets {
    q: Vec<usize>,
    k: Vec<usize>,
    v: Vec<usize>,
    mask: Vec<usize>,
    dout: Vec<usize>,
}

impl Offsets {
    fn new(a: &AttentionKernel, dout: Option<&MatOperand>) -> Offsets {
        Offsets {
            q: a.q.batch_offsets(&a.batch),
            k: a.k.batch_offsets(&a.batch),
            v: a.v.batch_offsets(&a.batch),
            mask: a.mask.as_ref().map(|m| m.batch_offsets(&a.batch)).unwrap_or_default(),
            dout: dout.map(|o| o.batch_offsets(&a.batch)).unwrap_or_default(),
        }
    }
}

/// The scores `scale · q·k_j + mask[i, j]` for keys `j0..j1` of query row `i` into `s`
/// (from K transposed: a sum of `d` scaled rows, which vectorises).
///
/// # Safety
/// The mask pointer must cover the mask operand at `moff`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn scores(a: &AttentionKernel, p: Ptrs, q: &[f32], kt: &[f32], moff: usize, i: usize, j0: usize, j1: usize, s: &mut [f32]) {
    let scale = a.scale as f32;
    let tk = a.tk;
    let s = &mut s[..j1 - j0];
    s.fill(0.0);
    for (c, &qc) in q.iter().enumerate() {
        axpy(s, qc, &kt[c * tk + j0..c * tk + j1]);
    }
    for x in s.iter_mut() {
        *x *= scale;
    }
    if let Some(m) = &a.mask {
        let mp = p.mask as *const f32;
        for (jj, x) in s.iter_mut().enumerate() {
            // SAFETY: validated in bounds.
            *x += unsafe { *mp.add(moff + i * m.row_stride + (j0 + jj) * m.col_stride) };
        }
    }
}

fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    for r in 0..rows {
        for c in 0..cols {
            dst[c * rows + r] = src[r * cols + c];
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

/// Runs `f(scratch, b)` for every batch index, in parallel on the current pool when
/// `threads > 1`.
fn for_batches(a: &AttentionKernel, backward: bool, threads: usize, f: impl Fn(&mut Scratch, usize) + Sync) {
    let nb = a.batch_count();
    if threads > 1 && nb > 1 {
        (0..nb).into_par_iter().for_each_init(|| Scratch::new(a, backward), |s, b| f(s, b));
    } else {
        let mut s = Scratch::new(a, backward);
        for b in 0..nb {
            f(&mut s, b);
        }
    }
}

/// Whether the AVX2 copies of the per-batch bodies can run. They compute exactly the
/// same operations in the same order (no FMA contraction), only wider.
fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Shared, read-only state of one kernel run.
struct Run<'a> {
    a: &'a AttentionKernel,
    dout: Option<&'a MatOperand>,
    p: Ptrs,
    offs: Offsets,
}

/// The forward of batch `b`.
///
/// # Safety
/// Every operand must have been checked in bounds; the output must be a distinct buffer.
#[inline(always)]
unsafe fn forward_batch(r: &Run, sc: &mut Scratch, b: usize) {
    let (a, p, offs) = (r.a, r.p, &r.offs);
    let (tq, tk, d, dv) = (a.tq, a.tk, a.d, a.dv);
    unsafe {
        load(p.k, offs.k[b], &a.k, tk, d, &mut sc.k);
        transpose(&sc.k, tk, d, &mut sc.kt);
        load(p.v, offs.v[b], &a.v, tk, dv, &mut sc.v);
        // Batch `b` writes only its own `tq × dv` block.
        let out = std::slice::from_raw_parts_mut((p.out as *mut f32).add(b * tq * dv), tq * dv);
        let moff = offs.mask.get(b).copied().unwrap_or(0);
        for i in 0..tq {
            load(p.q, offs.q[b] + i * a.q.row_stride, &a.q, 1, d, &mut sc.q);
            let n = if a.causal { (i + 1).min(tk) } else { tk };
            let mut m = f32::NEG_INFINITY;
            let mut l = 0.0f32;
            sc.acc.fill(0.0);
            let mut j0 = 0;
            while j0 < n {
                let j1 = (j0 + TILE).min(n);
                scores(a, p, &sc.q, &sc.kt, moff, i, j0, j1, &mut sc.s);
                let s = &mut sc.s[..j1 - j0];
                let mut mt = f32::NEG_INFINITY;
                for &x in s.iter() {
                    if x > mt || x.is_nan() {
                        mt = x;
                    }
                }
                let mn = if mt > m || mt.is_nan() { mt } else { m };
                if mn == f32::NEG_INFINITY {
                    j0 = j1;
                    continue;
                }
                if mn != m {
                    let alpha = exp(m - mn);
                    l *= alpha;
                    for x in sc.acc.iter_mut() {
                        *x *= alpha;
                    }
                }
                for x in s.iter_mut() {
                    *x = exp(*x - mn);
                }
                for (jj, &e) in s.iter().enumerate() {
                    l += e;
                    let j = j0 + jj;
                    axpy(&mut sc.acc, e, &sc.v[j * dv..(j + 1) * dv]);
                }
                m = mn;
                j0 = j1;
            }
            let row = &mut out[i * dv..(i + 1) * dv];
            if n == 0 {
                row.fill(0.0);
            } else if l == 0.0 || m.is_nan() {
                // Every score was -inf (or NaN): the unfused softmax gives NaN.
                row.fill(f32::NAN);
            } else {
                for (o, &x) in row.iter_mut().zip(&sc.acc) {
                    *o = x / l;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn forward_batch_avx2(r: &Run, sc: &mut Scratch, b: usize) {
    unsafe { forward_batch(r, sc, b) }
}

/// The backward of batch `b` (its blocks of dq, dk and dv).
///
/// # Safety
/// As for [`forward_batch`].
#[inline(always)]
unsafe fn backward_batch(r: &Run, sc: &mut Scratch, b: usize) {
    let (a, p, offs) = (r.a, r.p, &r.offs);
    let dout = r.dout.expect("backward has dout");
    let (tq, tk, d, dv) = (a.tq, a.tk, a.d, a.dv);
    let (nq, nk, _) = a.grad_lens();
    let scale = a.scale as f32;
    unsafe {
        load(p.k, offs.k[b], &a.k, tk, d, &mut sc.k);
        transpose(&sc.k, tk, d, &mut sc.kt);
        load(p.v, offs.v[b], &a.v, tk, dv, &mut sc.v);
        transpose(&sc.v, tk, dv, &mut sc.vt);
        let base = p.out as *mut f32;
        let dq = std::slice::from_raw_parts_mut(base.add(b * tq * d), tq * d);
        let dk = std::slice::from_raw_parts_mut(base.add(nq + b * tk * d), tk * d);
        let dvv = std::slice::from_raw_parts_mut(base.add(nq + nk + b * tk * dv), tk * dv);
        dk.fill(0.0);
        dvv.fill(0.0);
        let moff = offs.mask.get(b).copied().unwrap_or(0);
        for i in 0..tq {
            load(p.q, offs.q[b] + i * a.q.row_stride, &a.q, 1, d, &mut sc.q);
            load(p.dout, offs.dout[b] + i * dout.row_stride, dout, 1, dv, &mut sc.dout);
            let n = if a.causal { (i + 1).min(tk) } else { tk };
            let dq_row = &mut dq[i * d..(i + 1) * d];
            dq_row.fill(0.0);
            if n == 0 {
                continue;
            }
            // Pass 1: the row's softmax.
            scores(a, p, &sc.q, &sc.kt, moff, i, 0, n, &mut sc.s);
            let s = &mut sc.s[..n];
            let mut m = f32::NEG_INFINITY;
            for &x in s.iter() {
                if x > m || x.is_nan() {
                    m = x;
                }
            }
            if m == f32::NEG_INFINITY {
                // Every key is masked: the unfused softmax gives NaN.
                s.fill(f32::NAN);
            } else {
                for x in s.iter_mut() {
                    *x = exp(*x - m);
                }
            }
            let mut l = 0.0f32;
            for &x in s.iter() {
                l += x;
            }
            for x in s.iter_mut() {
                *x /= l;
            }
            // Pass 2: gradients. dp_j = dO·v_j (from V transposed).
            let dp = &mut sc.dp[..n];
            dp.fill(0.0);
            for (c, &g) in sc.dout.iter().enumerate() {
                axpy(dp, g, &sc.vt[c * tk..c * tk + n]);
            }
            let mut dsum = 0.0f32;
            for j in 0..n {
                dsum += s[j] * dp[j];
            }
            for j in 0..n {
                // dp becomes scale · ds
                dp[j] = scale * (s[j] * (dp[j] - dsum));
            }
            for j in 0..n {
                axpy(&mut dvv[j * dv..(j + 1) * dv], s[j], &sc.dout);
                axpy(dq_row, dp[j], &sc.k[j * d..(j + 1) * d]);
                axpy(&mut dk[j * d..(j + 1) * d], dp[j], &sc.q);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn backward_batch_avx2(r: &Run, sc: &mut Scratch, b: usize) {
    unsafe { backward_batch(r, sc, b) }
}

fn ptrs(a: &AttentionKernel, dout: Option<&MatOperand>, bufs: &mut Buffers) -> Result<Ptrs> {
    Ok(Ptrs {
        q: bufs.f32(a.q.buf)?.as_ptr() as usize,
        k: bufs.f32(a.k.buf)?.as_ptr() as usize,
        v: bufs.f32(a.v.buf)?.as_ptr() as usize,
        mask: match &a.mask {
            Some(m) => bufs.f32(m.buf)?.as_ptr() as usize,
            None => 0,
        },
        dout: match dout {
            Some(o) => bufs.f32(o.buf)?.as_ptr() as usize,
            None => 0,
        },
        out: bufs.f32_mut(a.out)?.as_mut_ptr() as usize,
    })
}

/// The forward kernel. Call inside the executor's pool (`pool.install`) so that its
/// parallelism uses that pool.
pub fn forward(a: &AttentionKernel, bufs: &mut Buffers, threads: usize) -> Result<()> {
    check(a, None, a.out_len(), |b| bufs.f32(b).ok().map(|x| x.len()))?;
    let r = Run { a, dout: None, p: ptrs(a, None, bufs)?, offs: Offsets::new(a, None) };
    let avx2 = has_avx2();
    for_batches(a, false, threads, |sc, b| {
        // SAFETY: every operand was checked in bounds above; the output is a distinct
        // buffer and batch `b` writes only its own block; AVX2 was detected.
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            unsafe { forward_batch_avx2(&r, sc, b) };
            return;
        }
        let _ = avx2;
        unsafe { forward_batch(&r, sc, b) }
    });
    Ok(())
}

/// The backward kernel (packed dq, dk, dv). Call inside the executor's pool.
pub fn backward(bk: &AttentionBackwardKernel, bufs: &mut Buffers, threads: usize) -> Result<()> {
    let a = &bk.fwd;
    let (nq, nk, nv) = a.grad_lens();
    check(a, Some(&bk.dout), nq + nk + nv, |b| bufs.f32(b).ok().map(|x| x.len()))?;
    let r = Run { a, dout: Some(&bk.dout), p: ptrs(a, Some(&bk.dout), bufs)?, offs: Offsets::new(a, Some(&bk.dout)) };
    let avx2 = has_avx2();
    for_batches(a, true, threads, |sc, b| {
        // SAFETY: as in `forward`.
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            unsafe { backward_batch_avx2(&r, sc, b) };
            return;
        }
        let _ = avx2;
        unsafe { backward_batch(&r, sc, b) }
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
    fn reference(a: &AttentionKernel, bufs: &Buffers, dout: Option<&MatOperand>) -> Vec<f64> {
        let at =
            |o: &MatOperand, off: usize, r: usize, c: usize| bufs.f32(o.buf).unwrap()[off + r * o.row_stride + c * o.col_stride] as f64;
        let offs = Offsets::new(a, dout);
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

    fn case(batch: &[usize], tq: usize, tk: usize, d: usize, dv: usize, causal: bool, masked: bool, transposed: bool) {
        let (q, lq) = dense(0, batch, tq, d, transposed, false);
        let (k, lk) = dense(1, batch, tk, d, false, true);
        let (v, lv) = dense(2, batch, tk, dv, transposed, false);
        let (m, lm) = dense(3, batch, tq, tk, false, true);
        let (go, lg) = dense(4, batch, tq, dv, false, false);
        let nb: usize = batch.iter().product();
        let fwd = AttentionKernel { batch: batch.to_vec(), tq, tk, d, dv, q, k, v, mask: masked.then_some(m), causal, scale: 0.37, out: 5 };
        let mut bk = fwd.clone();
        bk.out = 6;
        let (nq, nk, nv) = bk.grad_lens();
        let p = program(
            vec![
                buf("q", DType::F32, lq),
                buf("k", DType::F32, lk),
                buf("v", DType::F32, lv),
                buf("m", DType::F32, lm),
                buf("go", DType::F32, lg),
                buf("out", DType::F32, nb * tq * dv),
                buf("grads", DType::F32, nq + nk + nv),
            ],
            vec![Kernel::Attention(fwd.clone()), Kernel::AttentionBackward(AttentionBackwardKernel { fwd: bk.clone(), dout: go.clone() })],
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
        close(bufs.f32(5).unwrap(), &reference(&fwd, &bufs, None), "out");
        close(bufs.f32(6).unwrap(), &reference(&bk, &bufs, Some(&go)), "grads");
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
                    case(batch, tq, tk, d, dv, causal, masked, tq % 2 == 1);
                }
            }
        }
        // Tq ≠ Tk (not causal), more keys than one tile.
        case(&[2], 5, 100, 6, 3, false, true, false);
        case(&[], 9, 2, 6, 3, false, false, true);
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
            out: 1,
        };
        assert!(check(&a, None, 16, |_| Some(16)).is_ok());
        assert!(check(&a, None, 16, |b| Some(if b == 0 { 15 } else { 16 })).is_err());
        assert!(check(&a, None, 17, |_| Some(16)).is_err());
        let mut alias = a.clone();
        alias.out = 0;
        assert!(check(&alias, None, 16, |_| Some(16)).is_err());
        let mut c = a.clone();
        c.causal = true;
        c.tk = 3;
        assert!(check(&c, None, 16, |_| Some(16)).is_err());
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
        let (batch, t, d) = (vec![16usize, 4], 128usize, 32usize);
        let nb: usize = batch.iter().product();
        let op = |buf| MatOperand { buf, offset: 0, batch_strides: vec![4 * t * d, t * d], row_stride: d, col_stride: 1 };
        let a = AttentionKernel {
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
            out: 4,
        };
        let bk = AttentionBackwardKernel { fwd: AttentionKernel { out: 5, ..a.clone() }, dout: op(3) };
        let n = nb * t * d;
        let p = program(
            vec![
                buf("q", DType::F32, n),
                buf("k", DType::F32, n),
                buf("v", DType::F32, n),
                buf("go", DType::F32, n),
                buf("o", DType::F32, n),
                buf("g", DType::F32, 3 * n),
            ],
            vec![],
        );
        let mut bufs = Buffers::new(&p);
        fill(&mut bufs, 1, false);
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let mut best = (f64::MAX, f64::MAX);
            for _ in 0..15 {
                let t0 = std::time::Instant::now();
                pool.install(|| forward(&a, &mut bufs, threads)).unwrap();
                let t1 = std::time::Instant::now();
                pool.install(|| backward(&bk, &mut bufs, threads)).unwrap();
                let t2 = std::time::Instant::now();
                best = (best.0.min((t1 - t0).as_secs_f64()), best.1.min((t2 - t1).as_secs_f64()));
            }
            println!("{threads} threads: forward {:.2} ms, backward {:.2} ms (best of 15)", best.0 * 1e3, best.1 * 1e3);
        }
    }
}
