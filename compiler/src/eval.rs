//! An f64 reference evaluator of op graphs. Slow and simple: every node is computed in
//! index order (indices are topological) into a dense row-major tensor. The gradient
//! tests compare `passes::autodiff` against finite differences with it.
//!
//! Semantics follow `bm_runtime::kir` (and its interpreter), in f64:
//! - `Bool` values are 1.0/0.0, `I32` values are integral f64;
//! - `Max`/`Min` (binary, `Relu`, reductions) propagate NaN;
//! - comparisons give 1/0; `Step(x)` is `x > 0`; `Select(c, a, b)` takes `a` when `c != 0`;
//! - `Cast` to `I32` rounds toward zero (PyTorch `.to(int)`), to `Bool` is `x != 0`.

use crate::graph::{BinaryOp, DType, Graph, NodeId, Op, ReduceOp, UnaryOp};
use std::collections::HashMap;

/// A dense row-major f64 tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f64>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "tensor data does not match its shape {shape:?}");
        Tensor { shape, data }
    }

    pub fn full(shape: &[usize], value: f64) -> Self {
        Tensor { shape: shape.to_vec(), data: vec![value; shape.iter().product()] }
    }

    pub fn scalar(value: f64) -> Self {
        Tensor { shape: vec![], data: vec![value] }
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// Row-major strides of a shape.
fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// The multi-index of flat position `flat` in `shape`.
fn unravel(mut flat: usize, shape: &[usize], idx: &mut [usize]) {
    for d in (0..shape.len()).rev() {
        let n = shape[d].max(1);
        idx[d] = flat % n;
        flat /= n;
    }
}

fn fmax(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
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

fn fmin(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
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

fn bool_f(b: bool) -> f64 {
    if b { 1.0 } else { 0.0 }
}

pub fn unary(op: UnaryOp, x: f64) -> f64 {
    match op {
        UnaryOp::Neg => -x,
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => x.ln(),
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Rsqrt => 1.0 / x.sqrt(),
        UnaryOp::Abs => x.abs(),
        UnaryOp::Tanh => x.tanh(),
        UnaryOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
        UnaryOp::Relu => fmax(x, 0.0),
        UnaryOp::Sin => x.sin(),
        UnaryOp::Cos => x.cos(),
        UnaryOp::Erf => erf(x),
        UnaryOp::Recip => 1.0 / x,
        UnaryOp::Square => x * x,
        UnaryOp::Step => bool_f(x > 0.0),
        UnaryOp::Floor => x.floor(),
        UnaryOp::GeluTanh => {
            let k = (2.0 / std::f64::consts::PI).sqrt();
            0.5 * x * (1.0 + (k * (x + 0.044715 * x * x * x)).tanh())
        }
        UnaryOp::GeluTanhGrad => {
            // ½(1 + t) + ½·x·(1 − t²)·K·(1 + 3C·x²), t = tanh(K(x + C·x³))
            let (k, c) = ((2.0 / std::f64::consts::PI).sqrt(), 0.044715);
            let t = (k * (x + c * x * x * x)).tanh();
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3.0 * c * x * x)
        }
    }
}

pub fn binary(op: BinaryOp, a: f64, b: f64) -> f64 {
    match op {
        BinaryOp::Add => a + b,
        BinaryOp::Sub => a - b,
        BinaryOp::Mul => a * b,
        BinaryOp::Div => a / b,
        BinaryOp::Max => fmax(a, b),
        BinaryOp::Min => fmin(a, b),
        BinaryOp::Pow => a.powf(b),
        BinaryOp::Lt => bool_f(a < b),
        BinaryOp::Le => bool_f(a <= b),
        BinaryOp::Gt => bool_f(a > b),
        BinaryOp::Ge => bool_f(a >= b),
        BinaryOp::Eq => bool_f(a == b),
        BinaryOp::Ne => bool_f(a != b),
    }
}

/// Converts a value to what a tensor of `dtype` holds.
pub fn convert(x: f64, dtype: DType) -> f64 {
    match dtype {
        DType::F32 => x,
        DType::I32 => {
            if x.is_nan() {
                0.0
            } else {
                x.trunc()
            }
        }
        DType::Bool => bool_f(x != 0.0),
    }
}

/// Evaluates every node of `g` in index order. `feeds` supplies the values of `Input`,
/// `Param`, `State` and `Hyper` nodes by name. Returns one tensor per node.
pub fn evaluate(g: &Graph, feeds: &HashMap<String, Tensor>) -> Result<Vec<Tensor>, String> {
    let mut vals: Vec<Tensor> = Vec::with_capacity(g.len());
    for id in g.node_ids() {
        let t = eval_node(g, id, &vals, feeds).map_err(|e| format!("%{} = {}: {e}", id.index(), crate::graph::op_text(&g.node(id).op)))?;
        let want: usize = g.shape(id).iter().product();
        if t.shape != g.shape(id) || t.data.len() != want {
            return Err(format!(
                "%{}: computed shape {:?} ({} elements) differs from the node's {:?}",
                id.index(),
                t.shape,
                t.data.len(),
                g.shape(id)
            ));
        }
        vals.push(t);
    }
    Ok(vals)
}

fn eval_node(g: &Graph, id: NodeId, vals: &[Tensor], feeds: &HashMap<String, Tensor>) -> Result<Tensor, String> {
    let node = g.node(id);
    let shape = node.shape.clone();
    let n: usize = shape.iter().product();
    let ops = g.operands(id);
    let arg = |i: usize| -> Result<&Tensor, String> {
        let o = ops.get(i).ok_or_else(|| format!("missing operand {i}"))?;
        vals.get(o.index()).ok_or_else(|| format!("operand %{} is not computed yet", o.index()))
    };
    Ok(match &node.op {
        Op::Input(name) | Op::Param(name) | Op::State(name) | Op::Hyper(name) => {
            let t = feeds.get(name).ok_or_else(|| format!("no value fed for `{name}`"))?;
            if t.shape != shape || t.data.len() != n {
                return Err(format!("the value fed for `{name}` has shape {:?}, the node {:?}", t.shape, shape));
            }
            t.clone()
        }
        Op::Const(v) => Tensor { data: vec![convert(*v, node.dtype); n], shape },
        Op::Iota(axis) => {
            if *axis >= shape.len() {
                return Err(format!("iota axis {axis} is out of range for {shape:?}"));
            }
            let mut idx = vec![0; shape.len()];
            let data = (0..n)
                .map(|f| {
                    unravel(f, &shape, &mut idx);
                    idx[*axis] as f64
                })
                .collect();
            Tensor { shape, data }
        }
        Op::Unary(u) => {
            let a = arg(0)?;
            Tensor { data: a.data.iter().map(|&x| unary(*u, x)).collect(), shape }
        }
        Op::Binary(b) => {
            let (x, y) = (arg(0)?, arg(1)?);
            if x.shape != shape || y.shape != shape {
                return Err(format!("binary operands {:?} and {:?} differ from the node's shape", x.shape, y.shape));
            }
            Tensor { data: x.data.iter().zip(&y.data).map(|(&p, &q)| binary(*b, p, q)).collect(), shape }
        }
        Op::Select => {
            let (c, a, b) = (arg(0)?, arg(1)?, arg(2)?);
            if c.shape != shape || a.shape != shape || b.shape != shape {
                return Err("select operands differ from the node's shape".into());
            }
            let data = (0..n).map(|i| if c.data[i] != 0.0 { a.data[i] } else { b.data[i] }).collect();
            Tensor { shape, data }
        }
        Op::Reduce(op, axes) => {
            let a = arg(0)?;
            let in_shape = &a.shape;
            if axes.iter().any(|&ax| ax >= in_shape.len()) {
                return Err(format!("reduce axes {axes:?} are out of range for {in_shape:?}"));
            }
            let out_shape: Vec<usize> = in_shape.iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, &d)| d).collect();
            if out_shape != shape {
                return Err(format!("reducing {in_shape:?} over {axes:?} gives {out_shape:?}, not {shape:?}"));
            }
            let init = match op {
                ReduceOp::Sum => 0.0,
                ReduceOp::Max => f64::NEG_INFINITY,
                ReduceOp::Min => f64::INFINITY,
            };
            let mut data = vec![init; n];
            let os = strides(&out_shape);
            let mut idx = vec![0; in_shape.len()];
            for (f, &v) in a.data.iter().enumerate() {
                unravel(f, in_shape, &mut idx);
                let mut o = 0;
                let mut k = 0;
                for (d, &i) in idx.iter().enumerate() {
                    if !axes.contains(&d) {
                        o += i * os[k];
                        k += 1;
                    }
                }
                data[o] = match op {
                    ReduceOp::Sum => data[o] + v,
                    ReduceOp::Max => fmax(data[o], v),
                    ReduceOp::Min => fmin(data[o], v),
                };
            }
            Tensor { shape, data }
        }
        Op::Broadcast => {
            let a = arg(0)?;
            let (r_in, r_out) = (a.shape.len(), shape.len());
            if r_in > r_out {
                return Err(format!("cannot broadcast {:?} to {shape:?}", a.shape));
            }
            let lead = r_out - r_in;
            for (i, &d) in a.shape.iter().enumerate() {
                if d != 1 && d != shape[lead + i] {
                    return Err(format!("cannot broadcast {:?} to {shape:?}", a.shape));
                }
            }
            let is = strides(&a.shape);
            let mut idx = vec![0; r_out];
            let data = (0..n)
                .map(|f| {
                    unravel(f, &shape, &mut idx);
                    let mut src = 0;
                    for (i, &d) in a.shape.iter().enumerate() {
                        if d != 1 {
                            src += idx[lead + i] * is[i];
                        }
                    }
                    a.data[src]
                })
                .collect();
            Tensor { shape, data }
        }
        Op::Reshape => {
            let a = arg(0)?;
            if a.data.len() != n {
                return Err(format!("cannot reshape {:?} into {shape:?}", a.shape));
            }
            Tensor { shape, data: a.data.clone() }
        }
        Op::Permute(perm) => {
            let a = arg(0)?;
            if perm.len() != a.shape.len() || perm.iter().enumerate().any(|(i, &p)| p >= a.shape.len() || a.shape[p] != shape[i]) {
                return Err(format!("permute {perm:?} of {:?} does not give {shape:?}", a.shape));
            }
            let is = strides(&a.shape);
            let mut idx = vec![0; shape.len()];
            let data = (0..n)
                .map(|f| {
                    unravel(f, &shape, &mut idx);
                    let src: usize = perm.iter().enumerate().map(|(i, &p)| idx[i] * is[p]).sum();
                    a.data[src]
                })
                .collect();
            Tensor { shape, data }
        }
        Op::Slice { axis, start, end } => {
            let a = arg(0)?;
            if *axis >= a.shape.len() || start > end || *end > a.shape[*axis] || shape[*axis] != end - start {
                return Err(format!("slice {start}..{end} of axis {axis} is invalid for {:?}", a.shape));
            }
            let is = strides(&a.shape);
            let mut idx = vec![0; shape.len()];
            let data = (0..n)
                .map(|f| {
                    unravel(f, &shape, &mut idx);
                    idx[*axis] += start;
                    let src: usize = idx.iter().zip(&is).map(|(i, s)| i * s).sum();
                    a.data[src]
                })
                .collect();
            Tensor { shape, data }
        }
        Op::Pad { axis, before, after } => {
            let a = arg(0)?;
            if *axis >= a.shape.len() || shape[*axis] != a.shape[*axis] + before + after {
                return Err(format!("pad {before}, {after} of axis {axis} is invalid for {:?}", a.shape));
            }
            let is = strides(&a.shape);
            let mut idx = vec![0; shape.len()];
            let data = (0..n)
                .map(|f| {
                    unravel(f, &shape, &mut idx);
                    let i = idx[*axis];
                    if i < *before || i >= before + a.shape[*axis] {
                        0.0
                    } else {
                        idx[*axis] -= before;
                        let src: usize = idx.iter().zip(&is).map(|(i, s)| i * s).sum();
                        a.data[src]
                    }
                })
                .collect();
            Tensor { shape, data }
        }
        Op::Concat(axis) => {
            let parts: Vec<&Tensor> = (0..ops.len()).map(&arg).collect::<Result<_, _>>()?;
            let total: usize = parts.iter().map(|p| p.shape.get(*axis).copied().unwrap_or(0)).sum();
            if *axis >= shape.len() || total != shape[*axis] {
                return Err(format!("concat along axis {axis} does not give {shape:?}"));
            }
            // Which operand (and offset) covers each position along the axis.
            let mut owner = Vec::with_capacity(total);
            for (pi, p) in parts.iter().enumerate() {
                for j in 0..p.shape[*axis] {
                    owner.push((pi, j));
                }
            }
            let pstrides: Vec<Vec<usize>> = parts.iter().map(|p| strides(&p.shape)).collect();
            let mut idx = vec![0; shape.len()];
            let data = (0..n)
                .map(|f| {
                    unravel(f, &shape, &mut idx);
                    let (pi, j) = owner[idx[*axis]];
                    idx[*axis] = j;
                    let src: usize = idx.iter().zip(&pstrides[pi]).map(|(i, s)| i * s).sum();
                    parts[pi].data[src]
                })
                .collect();
            Tensor { shape, data }
        }
        Op::MatMul => {
            let (a, b) = (arg(0)?, arg(1)?);
            let (ra, rb) = (a.shape.len(), b.shape.len());
            if ra < 2 || rb < 2 || ra != rb || a.shape[..ra - 2] != b.shape[..rb - 2] {
                return Err(format!("matmul operands {:?} and {:?} need rank ≥ 2 and equal batch dims", a.shape, b.shape));
            }
            let (m, k) = (a.shape[ra - 2], a.shape[ra - 1]);
            let (k2, nn) = (b.shape[rb - 2], b.shape[rb - 1]);
            let batch: usize = a.shape[..ra - 2].iter().product();
            let mut want = a.shape[..ra - 2].to_vec();
            want.extend([m, nn]);
            if k != k2 || want != shape {
                return Err(format!("matmul {:?} @ {:?} does not give {shape:?}", a.shape, b.shape));
            }
            let mut data = vec![0.0; n];
            for bi in 0..batch {
                let (ao, bo, co) = (bi * m * k, bi * k * nn, bi * m * nn);
                for i in 0..m {
                    for j in 0..nn {
                        let mut s = 0.0;
                        for l in 0..k {
                            s += a.data[ao + i * k + l] * b.data[bo + l * nn + j];
                        }
                        data[co + i * nn + j] = s;
                    }
                }
            }
            Tensor { shape, data }
        }
        Op::Gather => {
            let (table, ids) = (arg(0)?, arg(1)?);
            if table.shape.len() != 2 {
                return Err(format!("gather table must be [rows, dim], got {:?}", table.shape));
            }
            let (rows, d) = (table.shape[0], table.shape[1]);
            let mut want = ids.shape.clone();
            want.push(d);
            if want != shape {
                return Err(format!("gather of {:?} by ids {:?} does not give {shape:?}", table.shape, ids.shape));
            }
            let mut data = Vec::with_capacity(n);
            for &id in &ids.data {
                let r = row_index(id, rows)?;
                data.extend_from_slice(&table.data[r * d..(r + 1) * d]);
            }
            Tensor { shape, data }
        }
        Op::ScatterAdd { rows } => {
            let (src, ids) = (arg(0)?, arg(1)?);
            let d = *src.shape.last().ok_or("scatter_add source must have rank ≥ 1")?;
            if src.shape[..src.shape.len() - 1] != ids.shape[..] || shape != [*rows, d] {
                return Err(format!("scatter_add of {:?} by ids {:?} into {shape:?} is invalid", src.shape, ids.shape));
            }
            let mut data = vec![0.0; n];
            for (i, &id) in ids.data.iter().enumerate() {
                let r = row_index(id, *rows)?;
                for j in 0..d {
                    data[r * d + j] += src.data[i * d + j];
                }
            }
            Tensor { shape, data }
        }
        Op::Cast(dt) => {
            let a = arg(0)?;
            Tensor { data: a.data.iter().map(|&x| convert(x, *dt)).collect(), shape }
        }
        Op::Attention { causal, scale, masked } | Op::AttentionBackward { causal, scale, masked } => {
            let backward = matches!(node.op, Op::AttentionBackward { .. });
            let (q, k, v) = (arg(0)?, arg(1)?, arg(2)?);
            let mask = if *masked { Some(arg(3)?) } else { None };
            let dout = if backward { Some(arg(if *masked { 4 } else { 3 })?) } else { None };
            attention(q, k, v, mask, dout, *causal, *scale, &shape)?
        }
        Op::Assign(_) => {
            let a = arg(0)?;
            if a.data.len() != n {
                return Err(format!("assigned value {:?} differs from the node's shape", a.shape));
            }
            Tensor { shape, data: a.data.clone() }
        }
    })
}

/// Fused attention (`Op::Attention`), or with `dout` its packed gradient
/// (`Op::AttentionBackward`): the plain formula, softmax row by row.
#[allow(clippy::too_many_arguments)]
fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    dout: Option<&Tensor>,
    causal: bool,
    scale: f64,
    shape: &[usize],
) -> Result<Tensor, String> {
    let r = q.shape.len();
    if r < 2 || k.shape.len() != r || v.shape.len() != r || q.shape[..r - 2] != k.shape[..r - 2] || q.shape[..r - 2] != v.shape[..r - 2] {
        return Err(format!("attention operands {:?}, {:?}, {:?} need rank ≥ 2 and equal batch dims", q.shape, k.shape, v.shape));
    }
    let batch = &q.shape[..r - 2];
    let nb: usize = batch.iter().product();
    let (tq, d) = (q.shape[r - 2], q.shape[r - 1]);
    let (tk, dv) = (k.shape[r - 2], v.shape[r - 1]);
    if k.shape[r - 1] != d || v.shape[r - 2] != tk || (causal && tq != tk) {
        return Err(format!("attention operands {:?}, {:?}, {:?} do not fit together", q.shape, k.shape, v.shape));
    }
    let mut full = batch.to_vec();
    full.extend([tq, tk]);
    // Mask strides over [batch..., tq, tk] (0 where it broadcasts).
    let mstrides: Vec<usize> = match mask {
        None => vec![],
        Some(m) => {
            if m.shape.len() > r || crate::ops::broadcast_shapes(&m.shape, &full).as_deref() != Some(&full[..]) {
                return Err(format!("attention mask {:?} does not broadcast to {full:?}", m.shape));
            }
            let ms = strides(&m.shape);
            let lead = r - m.shape.len();
            (0..r).map(|t| if t < lead || m.shape[t - lead] == 1 { 0 } else { ms[t - lead] }).collect()
        }
    };
    let mut want = batch.to_vec();
    want.push(tq);
    want.push(dv);
    if let Some(go) = dout {
        if go.shape != want {
            return Err(format!("attention gradient {:?} is not {want:?}", go.shape));
        }
        if shape != [nb * (tq * d + tk * d + tk * dv)] {
            return Err(format!("attention_backward gives {shape:?}"));
        }
    } else if shape != want {
        return Err(format!("attention gives {want:?}, the node is {shape:?}"));
    }
    let (nq, nk) = (nb * tq * d, nb * tk * d);
    let mut data = vec![0.0; shape.iter().product()];
    let mut bidx = vec![0; batch.len()];
    for b in 0..nb {
        unravel(b, batch, &mut bidx);
        let mbase: usize = bidx.iter().zip(&mstrides).map(|(i, s)| i * s).sum();
        let (qo, ko, vo, oo) = (b * tq * d, b * tk * d, b * tk * dv, b * tq * dv);
        for i in 0..tq {
            let n = if causal { i + 1 } else { tk };
            let mut p: Vec<f64> = (0..n)
                .map(|j| {
                    let dotp: f64 = (0..d).map(|c| q.data[qo + i * d + c] * k.data[ko + j * d + c]).sum();
                    let m = mask.map_or(0.0, |m| m.data[mbase + i * mstrides[r - 2] + j * mstrides[r - 1]]);
                    dotp * scale + m
                })
                .collect();
            let mx = p.iter().copied().fold(f64::NEG_INFINITY, fmax);
            for x in &mut p {
                *x = (*x - mx).exp();
            }
            let z: f64 = p.iter().sum();
            for x in &mut p {
                *x /= z;
            }
            match dout {
                None => {
                    for c in 0..dv {
                        data[oo + i * dv + c] = (0..n).map(|j| p[j] * v.data[vo + j * dv + c]).sum();
                    }
                }
                Some(go) => {
                    let g = &go.data[oo + i * dv..oo + (i + 1) * dv];
                    let dp: Vec<f64> = (0..n).map(|j| (0..dv).map(|c| g[c] * v.data[vo + j * dv + c]).sum()).collect();
                    let dsum: f64 = (0..n).map(|j| p[j] * dp[j]).sum();
                    for j in 0..n {
                        let ds = p[j] * (dp[j] - dsum) * scale;
                        for c in 0..d {
                            data[qo + i * d + c] += ds * k.data[ko + j * d + c];
                            data[nq + ko + j * d + c] += ds * q.data[qo + i * d + c];
                        }
                        for c in 0..dv {
                            data[nq + nk + vo + j * dv + c] += p[j] * g[c];
                        }
                    }
                }
            }
        }
    }
    Ok(Tensor { shape: shape.to_vec(), data })
}

fn row_index(id: f64, rows: usize) -> Result<usize, String> {
    if !(id >= 0.0 && id < rows as f64) || id.fract() != 0.0 {
        return Err(format!("id {id} is out of range for a table of {rows} rows"));
    }
    Ok(id as usize)
}

// ---------------------------------------------------------------------------------------
// erf, ported from FreeBSD msun s_erf.c (via the `libm` crate), accurate to < 1 ulp.
//
// Copyright (C) 1993 by Sun Microsystems, Inc. All rights reserved.
// Developed at SunPro, a Sun Microsystems, Inc. business.
// Permission to use, copy, modify, and distribute this software is freely granted,
// provided that this notice is preserved.
// ---------------------------------------------------------------------------------------

pub use erf_impl::erf;

#[allow(clippy::excessive_precision)]
mod erf_impl {
    const ERX: f64 = 8.45062911510467529297e-01;
    const EFX8: f64 = 1.02703333676410069053e+00;
    const PP0: f64 = 1.28379167095512558561e-01;
    const PP1: f64 = -3.25042107247001499370e-01;
    const PP2: f64 = -2.84817495755985104766e-02;
    const PP3: f64 = -5.77027029648944159157e-03;
    const PP4: f64 = -2.37630166566501626084e-05;
    const QQ1: f64 = 3.97917223959155352819e-01;
    const QQ2: f64 = 6.50222499887672944485e-02;
    const QQ3: f64 = 5.08130628187576562776e-03;
    const QQ4: f64 = 1.32494738004321644526e-04;
    const QQ5: f64 = -3.96022827877536812320e-06;
    const PA0: f64 = -2.36211856075265944077e-03;
    const PA1: f64 = 4.14856118683748331666e-01;
    const PA2: f64 = -3.72207876035701323847e-01;
    const PA3: f64 = 3.18346619901161753674e-01;
    const PA4: f64 = -1.10894694282396677476e-01;
    const PA5: f64 = 3.54783043256182359371e-02;
    const PA6: f64 = -2.16637559486879084300e-03;
    const QA1: f64 = 1.06420880400844228286e-01;
    const QA2: f64 = 5.40397917702171048937e-01;
    const QA3: f64 = 7.18286544141962662868e-02;
    const QA4: f64 = 1.26171219808761642112e-01;
    const QA5: f64 = 1.36370839120290507362e-02;
    const QA6: f64 = 1.19844998467991074170e-02;
    const RA0: f64 = -9.86494403484714822705e-03;
    const RA1: f64 = -6.93858572707181764372e-01;
    const RA2: f64 = -1.05586262253232909814e+01;
    const RA3: f64 = -6.23753324503260060396e+01;
    const RA4: f64 = -1.62396669462573470355e+02;
    const RA5: f64 = -1.84605092906711035994e+02;
    const RA6: f64 = -8.12874355063065934246e+01;
    const RA7: f64 = -9.81432934416914548592e+00;
    const SA1: f64 = 1.96512716674392571292e+01;
    const SA2: f64 = 1.37657754143519042600e+02;
    const SA3: f64 = 4.34565877475229228821e+02;
    const SA4: f64 = 6.45387271733267880336e+02;
    const SA5: f64 = 4.29008140027567833386e+02;
    const SA6: f64 = 1.08635005541779435134e+02;
    const SA7: f64 = 6.57024977031928170135e+00;
    const SA8: f64 = -6.04244152148580987438e-02;
    const RB0: f64 = -9.86494292470009928597e-03;
    const RB1: f64 = -7.99283237680523006574e-01;
    const RB2: f64 = -1.77579549177547519889e+01;
    const RB3: f64 = -1.60636384855821916062e+02;
    const RB4: f64 = -6.37566443368389627722e+02;
    const RB5: f64 = -1.02509513161107724954e+03;
    const RB6: f64 = -4.83519191608651397019e+02;
    const SB1: f64 = 3.03380607434824582924e+01;
    const SB2: f64 = 3.25792512996573918826e+02;
    const SB3: f64 = 1.53672958608443695994e+03;
    const SB4: f64 = 3.19985821950859553908e+03;
    const SB5: f64 = 2.55305040643316442583e+03;
    const SB6: f64 = 4.74528541206955367215e+02;
    const SB7: f64 = -2.24409524465858183362e+01;

    /// `erfc(|x|)` for 0.84375 <= |x| < 28 (`ix` is the high word of |x|).
    fn erfc2(ix: u32, x: f64) -> f64 {
        let x = x.abs();
        if ix < 0x3ff40000 {
            // |x| < 1.25
            let s = x - 1.0;
            let p = PA0 + s * (PA1 + s * (PA2 + s * (PA3 + s * (PA4 + s * (PA5 + s * PA6)))));
            let q = 1.0 + s * (QA1 + s * (QA2 + s * (QA3 + s * (QA4 + s * (QA5 + s * QA6)))));
            return 1.0 - ERX - p / q;
        }
        let s = 1.0 / (x * x);
        let (r, big_s) = if ix < 0x4006db6d {
            // |x| < 1/0.35
            (
                RA0 + s * (RA1 + s * (RA2 + s * (RA3 + s * (RA4 + s * (RA5 + s * (RA6 + s * RA7)))))),
                1.0 + s * (SA1 + s * (SA2 + s * (SA3 + s * (SA4 + s * (SA5 + s * (SA6 + s * (SA7 + s * SA8))))))),
            )
        } else {
            (
                RB0 + s * (RB1 + s * (RB2 + s * (RB3 + s * (RB4 + s * (RB5 + s * RB6))))),
                1.0 + s * (SB1 + s * (SB2 + s * (SB3 + s * (SB4 + s * (SB5 + s * (SB6 + s * SB7)))))),
            )
        };
        // z = x with the low 32 bits cleared, so that z*z is exact.
        let z = f64::from_bits(x.to_bits() & 0xffff_ffff_0000_0000);
        (-z * z - 0.5625).exp() * ((z - x) * (z + x) + r / big_s).exp() / x
    }

    /// The error function, to within an ulp.
    pub fn erf(x: f64) -> f64 {
        let hi = (x.to_bits() >> 32) as u32;
        let sign = hi >> 31 != 0;
        let ix = hi & 0x7fffffff;
        if ix >= 0x7ff00000 {
            // erf(nan) = nan, erf(±inf) = ±1
            return if x.is_nan() {
                x
            } else if sign {
                -1.0
            } else {
                1.0
            };
        }
        if ix < 0x3feb0000 {
            // |x| < 0.84375
            if ix < 0x3e300000 {
                // |x| < 2^-28
                return 0.125 * (8.0 * x + EFX8 * x);
            }
            let z = x * x;
            let r = PP0 + z * (PP1 + z * (PP2 + z * (PP3 + z * PP4)));
            let s = 1.0 + z * (QQ1 + z * (QQ2 + z * (QQ3 + z * (QQ4 + z * QQ5))));
            return x + x * (r / s);
        }
        let y = if ix < 0x40180000 {
            // 0.84375 <= |x| < 6
            1.0 - erfc2(ix, x)
        } else {
            1.0 - f64::from_bits(0x0010000000000000)
        };
        if sign { -y } else { y }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops;

    #[test]
    #[allow(clippy::excessive_precision)]
    fn erf_matches_reference_values() {
        // High-precision values (Abramowitz & Stegun / mpmath).
        let cases = [
            (0.0, 0.0),
            (1e-10, 1.1283791670955126e-10),
            (0.1, 0.1124629160182849),
            (0.5, 0.5204998778130465),
            (0.8, 0.7421009647076605),
            (1.0, 0.8427007929497149),
            (1.5, 0.9661051464753108),
            (2.0, 0.9953222650189527),
            (2.5, 0.9995930479825550),
            (3.0, 0.9999779095030014),
            (4.0, 0.9999999845827421),
            (-0.3, -0.3286267594591274),
            (-1.2, -0.9103139782296353),
        ];
        for (x, want) in cases {
            let got = erf(x);
            assert!((got - want).abs() <= 2e-16_f64.max(want.abs() * 4e-16), "erf({x}) = {got}, want {want}");
        }
        assert_eq!(erf(f64::INFINITY), 1.0);
        assert_eq!(erf(f64::NEG_INFINITY), -1.0);
        assert!(erf(f64::NAN).is_nan());
    }

    #[test]
    fn evaluates_shape_ops() {
        let mut g = Graph::new();
        let x = g.add(Op::Input("x".into()), &[], vec![2, 3], DType::F32);
        let t = ops::transpose(&mut g, x, 0, 1).unwrap();
        let s = ops::slice(&mut g, t, 0, 1, 3).unwrap();
        let p = ops::pad(&mut g, s, 1, 1, 0);
        let c = ops::concat(&mut g, &[x, x], 0).unwrap();
        let b = ops::broadcast_to(&mut g, x, &[2, 2, 3]).unwrap();
        let r = ops::sum(&mut g, b, &[0, 2], false).unwrap();
        let m = ops::reduce(&mut g, ReduceOp::Max, x, &[1], false).unwrap();
        let mm = ops::matmul(&mut g, x, t).unwrap();
        let i32c = ops::constant(&mut g, -2.7, &[2], DType::F32);
        let ci = g.add(Op::Cast(DType::I32), &[i32c], vec![2], DType::I32);
        let mut feeds = HashMap::new();
        feeds.insert("x".to_string(), Tensor::new(vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]));
        let v = evaluate(&g, &feeds).unwrap();
        assert_eq!(v[t.index()].data, vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
        assert_eq!(v[s.index()].data, vec![2.0, 5.0, 3.0, 6.0]);
        assert_eq!(v[p.index()].data, vec![0.0, 2.0, 5.0, 0.0, 3.0, 6.0]);
        assert_eq!(v[c.index()].data, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(v[r.index()].data, vec![12.0, 30.0]);
        assert_eq!(v[m.index()].data, vec![3.0, 6.0]);
        assert_eq!(v[mm.index()].data, vec![14.0, 32.0, 32.0, 77.0]);
        assert_eq!(v[ci.index()].data, vec![-2.0, -2.0]);
    }

    #[test]
    fn gather_and_scatter() {
        let mut g = Graph::new();
        let t = g.add(Op::Input("t".into()), &[], vec![3, 2], DType::F32);
        let ids = g.add(Op::Input("ids".into()), &[], vec![4], DType::I32);
        let e = ops::embedding(&mut g, t, ids).unwrap();
        let s = g.add(Op::ScatterAdd { rows: 3 }, &[e, ids], vec![3, 2], DType::F32);
        let mut feeds = HashMap::new();
        feeds.insert("t".to_string(), Tensor::new(vec![3, 2], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]));
        feeds.insert("ids".to_string(), Tensor::new(vec![4], vec![2.0, 0.0, 2.0, 1.0]));
        let v = evaluate(&g, &feeds).unwrap();
        assert_eq!(v[e.index()].data, vec![5.0, 6.0, 1.0, 2.0, 5.0, 6.0, 3.0, 4.0]);
        assert_eq!(v[s.index()].data, vec![1.0, 2.0, 3.0, 4.0, 10.0, 12.0]);
        feeds.insert("ids".to_string(), Tensor::new(vec![4], vec![2.0, 0.0, 3.0, 1.0]));
        assert!(evaluate(&g, &feeds).is_err());
        feeds.remove("ids");
        assert!(evaluate(&g, &feeds).unwrap_err().contains("no value fed"));
    }
}
