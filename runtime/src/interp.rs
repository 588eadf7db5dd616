//! The reference interpreter: runs any kernel point by point, exactly as `kir` documents
//! it. Slow; the JIT and the GEMM path are tested against it.
//!
//! Scalar semantics shared with the JIT (which calls the same `extern "C"` functions
//! for transcendentals and uses native instructions for the rest):
//! - `Max`/`Min` (binary, `Relu`, and the reductions) propagate NaN and order -0 < +0
//!   (IEEE 754-2019 `maximum`/`minimum`, Cranelift's `fmax`/`fmin`);
//! - comparisons are IEEE (false with a NaN operand, except `Ne`) and give 1.0/0.0;
//!   `Step(x)` is `x > 0`; `Select(c, a, b)` takes `a` when `c != 0` (so also for NaN);
//! - `Rsqrt(x) = 1 / sqrt(x)`, `Recip(x) = 1 / x`, `Square(x) = x * x`,
//!   `Sigmoid(x) = 1 / (1 + exp(-x))` (in f32), `Erf` is f64 `erf` rounded to f32;
//! - `Index(n)` is the loop index as f32 (rounded to nearest);
//! - stores into i32 buffers round to nearest, ties to even, saturating, NaN to 0.

use crate::error::{Error, Result};
use crate::exec::{self, BufData, Buffers};
use crate::kir::{Access, BinaryOp, FusedSum, Kernel, LoopKernel, MatMulKernel, MatOperand, ReduceOp, ScalarExpr, UnaryOp};

// ---------------------------------------------------------------------------------------
// Scalar functions (the JIT calls the `extern "C"` ones)
// ---------------------------------------------------------------------------------------

/// `exp` (Cephes `expf`: Cody-Waite reduction by `n = round(x log2 e)`, a degree-5
/// polynomial, scaling by `2^n` in two exact steps; about 1 ulp from libm, subnormal
/// results rounded once, 0 below -104, inf above 88.72, NaN stays NaN). The JIT emits
/// exactly these f32 operations inline (`crate::jit`), so both agree bit for bit.
pub extern "C" fn bm_exp(x: f32) -> f32 {
    exp_core(x)
}

/// The body of [`bm_exp`], inlined where loops should vectorise (runtime/src/attention.rs).
#[inline(always)]
pub fn exp_core(x: f32) -> f32 {
    // clamp (NaN passes through: both comparisons are false)
    let x = if x < EXP_LO { EXP_LO } else { x };
    let x = if x > EXP_HI { EXP_HI } else { x };
    // round_ties_even(t) by adding 1.5·2^23 (|t| < 2^22 after the clamp): no libm call
    // and no saturating conversion, so the row functions (`crate::rows`) vectorise; the
    // JIT emits the same instructions.
    let tm = x * EXP_LOG2E + ROUND_MAGIC;
    let n = tm - ROUND_MAGIC;
    let r = x - n * EXP_C1;
    let r = r - n * EXP_C2;
    let mut p = EXP_P[0];
    for c in &EXP_P[1..] {
        p = p * r + c;
    }
    let y = p * (r * r) + r + 1.0;
    let ni = (tm.to_bits() as i32).wrapping_sub(ROUND_MAGIC.to_bits() as i32);
    let n1 = ni >> 1;
    let n2 = ni.wrapping_sub(n1);
    let s1 = f32::from_bits((n1.wrapping_add(127) as u32) << 23);
    let s2 = f32::from_bits((n2.wrapping_add(127) as u32) << 23);
    y * s1 * s2
}

pub const EXP_LO: f32 = -104.0;
/// `1.5 · 2^23`: adding it rounds an f32 of magnitude below 2^22 to an integer (ties to
/// even) in the low mantissa bits.
pub const ROUND_MAGIC: f32 = 12_582_912.0;
pub const EXP_HI: f32 = 89.0;
pub const EXP_LOG2E: f32 = std::f32::consts::LOG2_E;
pub const EXP_C1: f32 = 0.693_359_4;
pub const EXP_C2: f32 = -2.121_944_4e-4;
pub const EXP_P: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5];
/// `tanh` below this magnitude is an odd polynomial, above it `1 - 2 / (exp(2|x|) + 1)`.
pub const TANH_SMALL: f32 = 0.625;
pub const TANH_P: [f32; 5] = [-5.704_988_7e-3, 2.063_908_8e-2, -5.373_971_6e-2, 1.333_144_2e-1, -3.333_328e-1];
pub extern "C" fn bm_log(x: f32) -> f32 {
    x.ln()
}
/// `tanh` (Cephes `tanhf` on |x| with [`bm_exp`], then x's sign; about 2 ulp). The JIT
/// emits exactly these f32 operations inline.
pub extern "C" fn bm_tanh(x: f32) -> f32 {
    let a = x.abs();
    let z = a * a;
    let mut p = TANH_P[0];
    for c in &TANH_P[1..] {
        p = p * z + c;
    }
    let small = p * z * a + a;
    let large = 1.0 - 2.0 / (bm_exp(a + a) + 1.0);
    let t = if a < TANH_SMALL { small } else { large };
    t.copysign(x)
}
pub extern "C" fn bm_sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}
pub extern "C" fn bm_sin(x: f32) -> f32 {
    x.sin()
}
pub extern "C" fn bm_cos(x: f32) -> f32 {
    x.cos()
}
pub extern "C" fn bm_erf(x: f32) -> f32 {
    libm::erf(x as f64) as f32
}
pub extern "C" fn bm_pow(a: f32, b: f32) -> f32 {
    a.powf(b)
}

/// NaN-propagating maximum with -0 < +0 (Cranelift `fmax`).
#[inline]
pub fn fmax(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else if a > b {
        a
    } else if b > a {
        b
    } else if a.is_sign_positive() {
        a
    } else {
        b
    }
}

/// NaN-propagating minimum with -0 < +0 (Cranelift `fmin`).
#[inline]
pub fn fmin(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else if a < b {
        a
    } else if b < a {
        b
    } else if a.is_sign_negative() {
        a
    } else {
        b
    }
}

#[inline]
fn bool_f(b: bool) -> f32 {
    if b { 1.0 } else { 0.0 }
}

pub fn unary(op: UnaryOp, x: f32) -> f32 {
    match op {
        UnaryOp::Neg => -x,
        UnaryOp::Exp => bm_exp(x),
        UnaryOp::Log => bm_log(x),
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Rsqrt => 1.0 / x.sqrt(),
        UnaryOp::Abs => x.abs(),
        UnaryOp::Tanh => bm_tanh(x),
        UnaryOp::Sigmoid => bm_sigmoid(x),
        UnaryOp::Relu => fmax(x, 0.0),
        UnaryOp::Sin => bm_sin(x),
        UnaryOp::Cos => bm_cos(x),
        UnaryOp::Erf => bm_erf(x),
        UnaryOp::Recip => 1.0 / x,
        UnaryOp::Square => x * x,
        UnaryOp::Step => bool_f(x > 0.0),
        UnaryOp::Floor => x.floor(),
        UnaryOp::GeluTanh => gelu_tanh(x),
        UnaryOp::GeluTanhGrad => gelu_tanh_grad(x),
    }
}

/// √(2/π) in f32, GELU's tanh-form constant.
pub const GELU_K: f32 = 0.797_884_6;
/// GELU's cubic coefficient.
pub const GELU_C: f32 = 0.044715;

/// `2·√(2/π)`: `½(1 + tanh(s)) = σ(2s) = 1 / (1 + exp(-2s))`.
pub const GELU_K2: f32 = 1.595_769_2;
/// `3 × 0.044715`, the derivative's coefficient.
pub const GELU_C3: f32 = 0.134_145;
/// Beyond ±20, GELU's derivative is exactly 1 or 0 in f32; clamping there keeps `x²`
/// finite (no `inf · 0`).
pub const GELU_GRAD_LIMIT: f32 = 20.0;

/// GELU (tanh form) in exactly this order of f32 operations (the JIT and the CUDA
/// prelude repeat it), through the identity `½(1 + tanh(s)) = 1 / (1 + exp(-2s))`: one
/// `exp` and a division, and no cancellation in `1 + tanh(s)` for negative `x`:
/// `x3 = x·x·x; s = (x + x3·C)·K; x / (exp(-(s + s)) + 1)`.
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    let x3 = x * x * x;
    x / gelu_denominator(x, x3)
}

/// `exp(-(s + s)) + 1 = 1 / σ(2s)` for GELU's `s = (x + x3·C)·K` (the JIT's
/// `gelu_denominator` emits the same operations).
#[inline(always)]
fn gelu_denominator(x: f32, x3: f32) -> f32 {
    let s = (x + x3 * GELU_C) * GELU_K;
    exp_core(-(s + s)) + 1.0
}

/// GELU's derivative, in exactly this order of f32 operations (JIT, CUDA prelude):
/// with `σ = 1 / (1 + exp(-2s))`, `d/dx x·σ = σ + x·σ(1 − σ)·2K(1 + 3C·x²)`, on `x`
/// clamped to ±[`GELU_GRAD_LIMIT`] (NaN stays NaN).
#[inline(always)]
pub fn gelu_tanh_grad(x: f32) -> f32 {
    let x = if x < -GELU_GRAD_LIMIT { -GELU_GRAD_LIMIT } else { x };
    let x = if x > GELU_GRAD_LIMIT { GELU_GRAD_LIMIT } else { x };
    let x2 = x * x;
    let sig = 1.0 / gelu_denominator(x, x2 * x);
    let ds = (x2 * GELU_C3 + 1.0) * GELU_K2;
    sig + x * ds * (sig * (1.0 - sig))
}

pub fn binary(op: BinaryOp, a: f32, b: f32) -> f32 {
    match op {
        BinaryOp::Add => a + b,
        BinaryOp::Sub => a - b,
        BinaryOp::Mul => a * b,
        BinaryOp::Div => a / b,
        BinaryOp::Max => fmax(a, b),
        BinaryOp::Min => fmin(a, b),
        BinaryOp::Pow => bm_pow(a, b),
        BinaryOp::Lt => bool_f(a < b),
        BinaryOp::Le => bool_f(a <= b),
        BinaryOp::Gt => bool_f(a > b),
        BinaryOp::Ge => bool_f(a >= b),
        BinaryOp::Eq => bool_f(a == b),
        BinaryOp::Ne => bool_f(a != b),
    }
}

pub fn reduce_identity(op: ReduceOp) -> f32 {
    match op {
        ReduceOp::Sum => 0.0,
        ReduceOp::Max => f32::NEG_INFINITY,
        ReduceOp::Min => f32::INFINITY,
    }
}

pub fn reduce_combine(op: ReduceOp, acc: f32, v: f32) -> f32 {
    match op {
        ReduceOp::Sum => acc + v,
        ReduceOp::Max => fmax(acc, v),
        ReduceOp::Min => fmin(acc, v),
    }
}

// ---------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------

fn element(a: &Access, idx: &[usize]) -> usize {
    a.offset + idx.iter().zip(&a.strides).map(|(i, s)| i * s).sum::<usize>()
}

fn get(bufs: &Buffers, a: &Access, idx: &[usize]) -> Result<f32> {
    let b = bufs.get(a.buf)?;
    let e = element(a, idx);
    if e >= b.len() {
        return Err(Error::internal(format!("load b{}[{e}] is out of bounds ({})", a.buf, b.len())));
    }
    Ok(b.get_f32(e))
}

/// Evaluates `e` at iteration index `idx`.
pub fn eval(e: &ScalarExpr, bufs: &Buffers, idx: &[usize]) -> Result<f32> {
    Ok(match e {
        ScalarExpr::Load(a) => get(bufs, a, idx)?,
        ScalarExpr::Const(c) => *c,
        ScalarExpr::Index(n) => *idx.get(*n).ok_or_else(|| Error::internal(format!("index i{n} out of the iteration rank")))? as f32,
        ScalarExpr::Unary(op, a) => unary(*op, eval(a, bufs, idx)?),
        ScalarExpr::Binary(op, a, b) => binary(*op, eval(a, bufs, idx)?, eval(b, bufs, idx)?),
        ScalarExpr::Select(c, a, b) => {
            let c = eval(c, bufs, idx)?;
            let a = eval(a, bufs, idx)?;
            let b = eval(b, bufs, idx)?;
            if c != 0.0 { a } else { b }
        }
    })
}

fn store(bufs: &mut Buffers, out: &Access, idx: &[usize], v: f32, accumulate: bool) -> Result<()> {
    let b: &mut BufData = bufs.get_mut(out.buf)?;
    let e = element(out, idx);
    if e >= b.len() {
        return Err(Error::internal(format!("store b{}[{e}] is out of bounds ({})", out.buf, b.len())));
    }
    let v = if accumulate { b.get_f32(e) + v } else { v };
    b.set_f32(e, v);
    Ok(())
}

/// Advances `idx` lexicographically over `shape` (last axis fastest); false when done.
fn advance(idx: &mut [usize], shape: &[usize]) -> bool {
    for d in (0..idx.len()).rev() {
        idx[d] += 1;
        if idx[d] < shape[d] {
            return true;
        }
        idx[d] = 0;
    }
    false
}

/// One point of an elementwise kernel: the body and the side values, then their stores.
fn elementwise_point(k: &LoopKernel, bufs: &mut Buffers, idx: &[usize]) -> Result<()> {
    let v = eval(&k.body, bufs, idx)?;
    if k.side.is_empty() {
        return store(bufs, &k.out, idx, v, k.accumulate);
    }
    let side = k.side.iter().map(|s| eval(&s.value, bufs, idx)).collect::<Result<Vec<f32>>>()?;
    for (s, x) in k.side.iter().zip(side) {
        store(bufs, &s.into, idx, x, false)?;
    }
    store(bufs, &k.out, idx, v, k.accumulate)
}

pub fn run_loop(k: &LoopKernel, bufs: &mut Buffers) -> Result<()> {
    if !k.sums.is_empty() {
        return run_loop_with_sums(&crate::jit::normalize(k), bufs);
    }
    let rank = k.shape.len();
    let red = match k.reduce {
        Some(op) => {
            if k.reduced_dims > rank {
                return Err(Error::internal("loop kernel reduces more axes than it has"));
            }
            Some((op, k.reduced_dims))
        }
        None => None,
    };
    let nred = red.map_or(0, |r| r.1);
    let (outer, inner) = k.shape.split_at(rank - nred);
    if outer.contains(&0) {
        return Ok(());
    }
    let mut idx = vec![0usize; rank];
    loop {
        match red {
            None => elementwise_point(k, bufs, &idx)?,
            Some((op, _)) => {
                let mut acc = reduce_identity(op);
                if !inner.contains(&0) {
                    loop {
                        let v = eval(&k.body, bufs, &idx)?;
                        acc = reduce_combine(op, acc, v);
                        if !advance(&mut idx[rank - nred..], inner) {
                            break;
                        }
                    }
                }
                store(bufs, &k.out, &idx, acc, k.accumulate)?;
            }
        }
        if !advance(&mut idx[..rank - nred], outer) {
            break;
        }
    }
    Ok(())
}

/// An elementwise kernel hosting fused sums, normalised, in the order [`FusedSum`]
/// defines: per chunk of the outermost axis, its points in row-major order, each
/// storing `out` and then adding every sum's value into the chunk's partial sums.
fn run_loop_with_sums(k: &LoopKernel, bufs: &mut Buffers) -> Result<()> {
    if k.reduce.is_some() {
        return Err(Error::internal("fused sums need an elementwise host kernel"));
    }
    if k.shape.contains(&0) {
        return Ok(());
    }
    let rank = k.shape.len();
    let outer = k.shape[0];
    let chunks = FusedSum::chunks(outer);
    let points = |lo: usize, hi: usize| {
        let mut all = vec![];
        for i0 in lo..hi {
            let mut idx = vec![0usize; rank];
            idx[0] = i0;
            loop {
                all.push(idx.clone());
                if !advance(&mut idx[1..], &k.shape[1..]) {
                    break;
                }
            }
        }
        all
    };
    // The elements each sum writes, and every chunk's partial sums of them (from 0).
    let slots: Vec<std::collections::BTreeMap<usize, usize>> = k
        .sums
        .iter()
        .map(|s| {
            let mut m = std::collections::BTreeMap::new();
            for idx in points(0, outer) {
                let n = m.len();
                m.entry(element(&s.into, &idx)).or_insert(n);
            }
            m
        })
        .collect();
    let mut partial: Vec<Vec<f32>> = slots.iter().map(|m| vec![0.0; m.len() * chunks]).collect();
    for c in 0..chunks {
        for idx in points(outer * c / chunks, outer * (c + 1) / chunks) {
            elementwise_point(k, bufs, &idx)?;
            for (s, sum) in k.sums.iter().enumerate() {
                let x = eval(&sum.value, bufs, &idx)?;
                partial[s][c * slots[s].len() + slots[s][&element(&sum.into, &idx)]] += x;
            }
        }
    }
    for (s, sum) in k.sums.iter().enumerate() {
        for (&e, &slot) in &slots[s] {
            let mut t = if sum.accumulate { get(bufs, &Access { buf: sum.into.buf, offset: e, strides: vec![] }, &[])? } else { 0.0 };
            for c in 0..chunks {
                t += partial[s][c * slots[s].len() + slot];
            }
            store(bufs, &Access { buf: sum.into.buf, offset: e, strides: vec![] }, &[], t, false)?;
        }
    }
    Ok(())
}

/// `x` rounded to the nearest bfloat16 (ties to even; NaN stays NaN, ±inf stay), as f32:
/// the operands of a `bf16` matrix product.
pub fn round_bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// The naive triple loop: `c[b][i][j] (+)= Σ_p a[b][i][p] * b[b][p][j]`, summing `p` in order
/// (operands rounded to bfloat16 first for a `bf16` product).
pub fn run_matmul(k: &MatMulKernel, bufs: &mut Buffers) -> Result<()> {
    if k.batch.contains(&0) || k.m == 0 || k.n == 0 {
        return Ok(());
    }
    let round = |v: &[f32]| if k.bf16 { v.iter().map(|&x| round_bf16(x)).collect() } else { v.to_vec() };
    let a: Vec<f32> = round(bufs.f32(k.a.buf)?);
    let b: Vec<f32> = round(bufs.f32(k.b.buf)?);
    let c = bufs.f32_mut(k.c.buf)?;
    let oob = || Error::internal("matmul operand out of bounds");
    let mut bidx = vec![0usize; k.batch.len()];
    loop {
        let off = |o: &MatOperand| o.offset + bidx.iter().zip(&o.batch_strides).map(|(i, s)| i * s).sum::<usize>();
        let (ao, bo, co) = (off(&k.a), off(&k.b), off(&k.c));
        for i in 0..k.m {
            for j in 0..k.n {
                let mut s = 0.0f32;
                for p in 0..k.k {
                    let x = a.get(ao + i * k.a.row_stride + p * k.a.col_stride).ok_or_else(oob)?;
                    let y = b.get(bo + p * k.b.row_stride + j * k.b.col_stride).ok_or_else(oob)?;
                    s += x * y;
                }
                let e = c.get_mut(co + i * k.c.row_stride + j * k.c.col_stride).ok_or_else(oob)?;
                *e = if k.accumulate { *e + s } else { s };
            }
        }
        if !advance(&mut bidx, &k.batch) {
            break;
        }
    }
    Ok(())
}

/// Runs any kernel through the reference implementation.
pub fn run_kernel(k: &Kernel, bufs: &mut Buffers) -> Result<()> {
    match k {
        Kernel::Loop(l) => run_loop(l, bufs),
        Kernel::MatMul(m) => run_matmul(m, bufs),
        Kernel::Gather(g) => exec::gather(g, bufs),
        Kernel::ScatterAdd(s) => exec::scatter_add(s, bufs),
        Kernel::Attention(a) => crate::attention::forward(a, bufs, 1),
        Kernel::AttentionBackward(a) => crate::attention::backward(a, bufs, 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::Buffers;
    use crate::exec::test_support::*;
    use crate::kir::DType;

    #[test]
    fn scalar_functions() {
        // erf against known values
        for (x, want) in [
            (0.0f64, 0.0f64),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (-2.0, -0.995_322_265_018_952_7),
            (4.0, 0.999_999_984_582_742_1),
        ] {
            assert_eq!(bm_erf(x as f32), want as f32, "erf({x})");
        }
        assert_eq!(bm_sigmoid(0.0), 0.5);
        assert_eq!(bm_sigmoid(-200.0), 0.0);
        assert_eq!(bm_sigmoid(200.0), 1.0);
        assert!(fmax(f32::NAN, 1.0).is_nan() && fmax(1.0, f32::NAN).is_nan());
        assert!(fmin(f32::NAN, 1.0).is_nan() && fmin(1.0, f32::NAN).is_nan());
        assert_eq!(fmax(-0.0, 0.0).to_bits(), 0.0f32.to_bits());
        assert_eq!(fmin(0.0, -0.0).to_bits(), (-0.0f32).to_bits());
        assert_eq!(unary(UnaryOp::Step, 0.0), 0.0);
        assert_eq!(unary(UnaryOp::Step, 1e-30), 1.0);
        assert_eq!(unary(UnaryOp::Step, f32::NAN), 0.0);
        assert_eq!(unary(UnaryOp::Rsqrt, 4.0), 0.5);
        assert_eq!(unary(UnaryOp::Floor, -1.5), -2.0);
        assert_eq!(GELU_K, (2.0f64 / std::f64::consts::PI).sqrt() as f32);
        assert_eq!(GELU_C, 0.044715f64 as f32);
        // GELU(1) = 0.8411920 (PyTorch, approximate="tanh").
        assert!((unary(UnaryOp::GeluTanh, 1.0) - 0.841192).abs() < 1e-6);
        assert_eq!(GELU_K2, (8.0f64 / std::f64::consts::PI).sqrt() as f32);
        assert_eq!(GELU_C3, (3.0 * 0.044715f64) as f32);
        // The derivative against central differences of the f64 tanh form, and its ends.
        let gelu = |x: f64| 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh());
        for i in -80..=80 {
            let x = i as f64 * 0.1;
            let want = (gelu(x + 1e-6) - gelu(x - 1e-6)) / 2e-6;
            let got = gelu_tanh_grad(x as f32) as f64;
            assert!((got - want).abs() < 1e-6 * (1.0 + want.abs()), "gelu'({x}) = {got}, want {want}");
            assert!((gelu_tanh(x as f32) as f64 - gelu(x)).abs() < 1e-6 * (1.0 + gelu(x).abs()), "gelu({x})");
        }
        assert_eq!(gelu_tanh_grad(1e30), 1.0);
        assert_eq!(gelu_tanh_grad(-1e30), 0.0);
        assert_eq!(gelu_tanh(-1e30), 0.0);
        assert_eq!(gelu_tanh(1e30), 1e30);
        assert!(gelu_tanh_grad(f32::NAN).is_nan() && gelu_tanh(f32::NAN).is_nan());
        assert_eq!(binary(BinaryOp::Ne, f32::NAN, f32::NAN), 1.0);
        assert_eq!(binary(BinaryOp::Eq, f32::NAN, f32::NAN), 0.0);
        assert_eq!(binary(BinaryOp::Pow, 2.0, 10.0), 1024.0);
        assert_eq!(crate::exec::f32_to_i32(2.5), 2);
        assert_eq!(crate::exec::f32_to_i32(-2.5), -2);
        assert_eq!(crate::exec::f32_to_i32(3.5), 4);
        assert_eq!(crate::exec::f32_to_i32(f32::NAN), 0);
        assert_eq!(crate::exec::f32_to_i32(1e20), i32::MAX);
    }

    #[test]
    fn loop_kernel_by_hand() {
        // o[i, j] (+)= select(x[j] > 0, x[j] * i, -1) with a strided output sub-view
        let p = program(vec![buf("x", DType::F32, 3), buf("o", DType::F32, 20)], vec![]);
        let mut bufs = Buffers::new(&p);
        bufs.f32_mut(0).unwrap().copy_from_slice(&[1.0, -2.0, 3.0]);
        bufs.f32_mut(1).unwrap().fill(100.0);
        let x = ScalarExpr::Load(Access { buf: 0, offset: 0, strides: vec![0, 1] });
        let body = ScalarExpr::Select(
            Box::new(ScalarExpr::Binary(BinaryOp::Gt, Box::new(x.clone()), Box::new(ScalarExpr::Const(0.0)))),
            Box::new(ScalarExpr::Binary(BinaryOp::Mul, Box::new(x), Box::new(ScalarExpr::Index(0)))),
            Box::new(ScalarExpr::Const(-1.0)),
        );
        let k = Kernel::Loop(LoopKernel {
            shape: vec![2, 3],
            reduce: None,
            reduced_dims: 0,
            body,
            out: Access { buf: 1, offset: 2, strides: vec![8, 2] },
            accumulate: true,
            side: vec![],
            sums: vec![],
        });
        run_kernel(&k, &mut bufs).unwrap();
        let o = bufs.f32(1).unwrap();
        let mut want = [100.0f32; 20];
        for i in 0..2 {
            for (j, x) in [1.0f32, -2.0, 3.0].iter().enumerate() {
                want[2 + 8 * i + 2 * j] += if *x > 0.0 { x * i as f32 } else { -1.0 };
            }
        }
        assert_eq!(o, &want);
    }
}
