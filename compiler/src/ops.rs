//! Shape-checked builders for every operation of LANGUAGE.md §6. Each either adds one
//! primitive node or expands a high-level operation (softmax, cross-entropy, ...) into
//! primitives, so autodiff only needs rules for the primitives of `graph::Op`.
//!
//! Builders return `OpError` on a shape or type mismatch; the elaborator attaches
//! source spans and the operands' origins.

use crate::graph::{BinaryOp, DType, Graph, NodeId, Op, ReduceOp, UnaryOp};

#[derive(Clone, Debug, PartialEq)]
pub struct OpError {
    pub message: String,
    /// Positions of the operands the error is about (the elaborator labels their spans
    /// with their shapes).
    pub operands: Vec<usize>,
    pub help: Option<String>,
}

impl OpError {
    pub fn new(message: impl Into<String>) -> Self {
        OpError { message: message.into(), operands: vec![], help: None }
    }
    pub fn about(mut self, operands: &[usize]) -> Self {
        self.operands = operands.to_vec();
        self
    }
    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
}

pub type OpResult<T = NodeId> = Result<T, OpError>;

pub fn shape_text(dtype: DType, shape: &[usize]) -> String {
    format!("{}{:?}", dtype.name(), shape)
}

fn describe(g: &Graph, x: NodeId) -> String {
    shape_text(g.dtype(x), g.shape(x))
}

/// Resolves a possibly negative axis against a rank.
pub fn norm_axis(axis: i64, rank: usize) -> OpResult<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r.max(0) {
        return Err(OpError::new(format!("axis {axis} is out of range for a tensor of rank {rank}")).help(format!(
            "valid axes are {} to {}",
            -r,
            r - 1
        )));
    }
    Ok(a as usize)
}

pub fn constant(g: &mut Graph, value: f64, shape: &[usize], dtype: DType) -> NodeId {
    g.add(Op::Const(value), &[], shape.to_vec(), dtype)
}

pub fn scalar(g: &mut Graph, value: f64) -> NodeId {
    constant(g, value, &[], DType::F32)
}

/// NumPy broadcasting of two shapes.
pub fn broadcast_shapes(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let n = a.len().max(b.len());
    let mut out = vec![0; n];
    for i in 0..n {
        let da = if i + a.len() >= n { a[i + a.len() - n] } else { 1 };
        let db = if i + b.len() >= n { b[i + b.len() - n] } else { 1 };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return None,
        };
    }
    Some(out)
}

pub fn broadcast_to(g: &mut Graph, x: NodeId, shape: &[usize]) -> OpResult {
    if g.shape(x) == shape {
        return Ok(x);
    }
    match broadcast_shapes(g.shape(x), shape) {
        Some(s) if s == shape => {}
        _ => {
            return Err(OpError::new(format!("cannot broadcast {} to {:?}", describe(g, x), shape)).about(&[0]));
        }
    }
    // A broadcast constant stays a constant (no data to read).
    if let Op::Const(v) = g.node(x).op {
        return Ok(constant(g, v, shape, g.dtype(x)));
    }
    let dt = g.dtype(x);
    Ok(g.add(Op::Broadcast, &[x], shape.to_vec(), dt))
}

pub fn cast(g: &mut Graph, x: NodeId, dtype: DType) -> NodeId {
    if g.dtype(x) == dtype {
        return x;
    }
    if let Op::Const(v) = g.node(x).op {
        // Fold the conversion too, exactly as `Cast` would compute it.
        let v = match dtype {
            DType::F32 => v,
            DType::I32 if v.is_nan() => 0.0,
            DType::I32 => v.trunc(),
            DType::Bool => f64::from(v != 0.0),
        };
        let s = g.shape(x).to_vec();
        return constant(g, v, &s, dtype);
    }
    let s = g.shape(x).to_vec();
    g.add(Op::Cast(dtype), &[x], s, dtype)
}

pub fn to_f32(g: &mut Graph, x: NodeId) -> NodeId {
    cast(g, x, DType::F32)
}

pub fn unary(g: &mut Graph, op: UnaryOp, x: NodeId) -> NodeId {
    let x = to_f32(g, x);
    let s = g.shape(x).to_vec();
    g.add(Op::Unary(op), &[x], s, DType::F32)
}

fn is_comparison(op: BinaryOp) -> bool {
    matches!(op, BinaryOp::Lt | BinaryOp::Le | BinaryOp::Gt | BinaryOp::Ge | BinaryOp::Eq | BinaryOp::Ne)
}

/// Elementwise binary operation with NumPy broadcasting. Arithmetic on two `i32`
/// tensors stays `i32`; anything involving `f32` is `f32`; comparisons give `bool`.
pub fn binary(g: &mut Graph, op: BinaryOp, a: NodeId, b: NodeId) -> OpResult {
    let Some(shape) = broadcast_shapes(g.shape(a), g.shape(b)) else {
        return Err(OpError::new(format!(
            "shapes {} and {} cannot be broadcast together for `{}`",
            describe(g, a),
            describe(g, b),
            binary_name(op)
        ))
        .about(&[0, 1])
        .help("NumPy broadcasting compares dims from the right; each pair must be equal or one of them 1"));
    };
    let int = g.dtype(a) == DType::I32 && g.dtype(b) == DType::I32 && !matches!(op, BinaryOp::Div | BinaryOp::Pow);
    let operand_dtype = if int { DType::I32 } else { DType::F32 };
    let a = cast(g, a, operand_dtype);
    let b = cast(g, b, operand_dtype);
    let a = broadcast_to(g, a, &shape)?;
    let b = broadcast_to(g, b, &shape)?;
    let dtype = if is_comparison(op) { DType::Bool } else { operand_dtype };
    Ok(g.add(Op::Binary(op), &[a, b], shape, dtype))
}

pub fn binary_name(op: BinaryOp) -> &'static str {
    match op {
        BinaryOp::Add => "+",
        BinaryOp::Sub => "-",
        BinaryOp::Mul => "*",
        BinaryOp::Div => "/",
        BinaryOp::Max => "maximum",
        BinaryOp::Min => "minimum",
        BinaryOp::Pow => "pow",
        BinaryOp::Lt => "<",
        BinaryOp::Le => "<=",
        BinaryOp::Gt => ">",
        BinaryOp::Ge => ">=",
        BinaryOp::Eq => "==",
        BinaryOp::Ne => "!=",
    }
}

pub fn add(g: &mut Graph, a: NodeId, b: NodeId) -> OpResult {
    binary(g, BinaryOp::Add, a, b)
}
/// The sum of `terms` (at least one) as a balanced tree of adds: neighbours first,
/// then neighbouring pairs, and so on. A chain `((a + b) + c) + …` over a gradient per
/// parameter (the global gradient norm) or a contribution per user (autodiff) is as
/// deep as it is long, and every recursive pass after it (lowering, fusion, code
/// generation) would pay for the depth — quadratically, and in stack.
pub fn add_all(g: &mut Graph, terms: &[NodeId]) -> OpResult {
    let mut level = terms.to_vec();
    while level.len() > 1 {
        let mut next = Vec::with_capacity(level.len().div_ceil(2));
        for pair in level.chunks(2) {
            next.push(match *pair {
                [a, b] => add(g, a, b)?,
                [a] => a,
                _ => unreachable!("chunks of two"),
            });
        }
        level = next;
    }
    Ok(level[0])
}
pub fn sub(g: &mut Graph, a: NodeId, b: NodeId) -> OpResult {
    binary(g, BinaryOp::Sub, a, b)
}
pub fn mul(g: &mut Graph, a: NodeId, b: NodeId) -> OpResult {
    binary(g, BinaryOp::Mul, a, b)
}
pub fn div(g: &mut Graph, a: NodeId, b: NodeId) -> OpResult {
    binary(g, BinaryOp::Div, a, b)
}
pub fn mul_scalar(g: &mut Graph, a: NodeId, s: f64) -> NodeId {
    let c = scalar(g, s);
    binary(g, BinaryOp::Mul, a, c).expect("a scalar always broadcasts")
}
pub fn add_scalar(g: &mut Graph, a: NodeId, s: f64) -> NodeId {
    let c = scalar(g, s);
    binary(g, BinaryOp::Add, a, c).expect("a scalar always broadcasts")
}
pub fn neg(g: &mut Graph, a: NodeId) -> NodeId {
    unary(g, UnaryOp::Neg, a)
}

/// `where(c, a, b)` with broadcasting of all three.
pub fn select(g: &mut Graph, c: NodeId, a: NodeId, b: NodeId) -> OpResult {
    let shape = broadcast_shapes(g.shape(a), g.shape(b)).and_then(|s| broadcast_shapes(&s, g.shape(c))).ok_or_else(|| {
        OpError::new(format!(
            "where(): condition {}, and values {} and {} cannot be broadcast together",
            describe(g, c),
            describe(g, a),
            describe(g, b)
        ))
        .about(&[0, 1, 2])
    })?;
    let dtype = if g.dtype(a) == DType::I32 && g.dtype(b) == DType::I32 { DType::I32 } else { DType::F32 };
    let c = cast(g, c, DType::Bool);
    let a = cast(g, a, dtype);
    let b = cast(g, b, dtype);
    let c = broadcast_to(g, c, &shape)?;
    let a = broadcast_to(g, a, &shape)?;
    let b = broadcast_to(g, b, &shape)?;
    Ok(g.add(Op::Select, &[c, a, b], shape, dtype))
}

/// Reduction over `axes` (all axes if empty), optionally keeping them as size 1.
pub fn reduce(g: &mut Graph, op: ReduceOp, x: NodeId, axes: &[i64], keepdim: bool) -> OpResult {
    let rank = g.shape(x).len();
    let mut ax: Vec<usize> =
        if axes.is_empty() { (0..rank).collect() } else { axes.iter().map(|&a| norm_axis(a, rank)).collect::<OpResult<_>>()? };
    ax.sort();
    ax.dedup();
    let x = if op == ReduceOp::Sum { x } else { to_f32(g, x) };
    let x = if g.dtype(x) == DType::Bool { to_f32(g, x) } else { x };
    let in_shape = g.shape(x).to_vec();
    let out: Vec<usize> = in_shape.iter().enumerate().filter(|(i, _)| !ax.contains(i)).map(|(_, &d)| d).collect();
    let dt = g.dtype(x);
    let r = if ax.is_empty() { x } else { g.add(Op::Reduce(op, ax.clone()), &[x], out, dt) };
    if keepdim {
        let kept: Vec<usize> = in_shape.iter().enumerate().map(|(i, &d)| if ax.contains(&i) { 1 } else { d }).collect();
        reshape(g, r, &kept)
    } else {
        Ok(r)
    }
}

fn count(g: &Graph, x: NodeId, axes: &[i64]) -> OpResult<usize> {
    let s = g.shape(x);
    if axes.is_empty() {
        return Ok(s.iter().product());
    }
    let mut n = 1;
    let mut seen = vec![];
    for &a in axes {
        let a = norm_axis(a, s.len())?;
        if !seen.contains(&a) {
            n *= s[a];
            seen.push(a);
        }
    }
    Ok(n)
}

pub fn sum(g: &mut Graph, x: NodeId, axes: &[i64], keepdim: bool) -> OpResult {
    let x = if g.dtype(x) == DType::Bool { to_f32(g, x) } else { x };
    reduce(g, ReduceOp::Sum, x, axes, keepdim)
}

pub fn mean(g: &mut Graph, x: NodeId, axes: &[i64], keepdim: bool) -> OpResult {
    let n = count(g, x, axes)?;
    let x = to_f32(g, x);
    let s = reduce(g, ReduceOp::Sum, x, axes, keepdim)?;
    Ok(mul_scalar(g, s, 1.0 / n.max(1) as f64))
}

/// Biased (population) variance, as LANGUAGE.md specifies.
pub fn var(g: &mut Graph, x: NodeId, axes: &[i64], keepdim: bool) -> OpResult {
    let x = to_f32(g, x);
    let m = mean(g, x, axes, true)?;
    let d = sub(g, x, m)?;
    let sq = unary(g, UnaryOp::Square, d);
    mean(g, sq, axes, keepdim)
}

/// `max(x) + log(sum(exp(x - max(x))))`, stable.
pub fn logsumexp(g: &mut Graph, x: NodeId, axes: &[i64], keepdim: bool) -> OpResult {
    let x = to_f32(g, x);
    let m = reduce(g, ReduceOp::Max, x, axes, true)?;
    let d = sub(g, x, m)?;
    let e = unary(g, UnaryOp::Exp, d);
    let s = reduce(g, ReduceOp::Sum, e, axes, true)?;
    let l = unary(g, UnaryOp::Log, s);
    let r = add(g, l, m)?;
    if keepdim {
        Ok(r)
    } else {
        let out: Vec<usize> = {
            let rank = g.shape(x).len();
            let ax: Vec<usize> =
                if axes.is_empty() { (0..rank).collect() } else { axes.iter().map(|&a| norm_axis(a, rank)).collect::<OpResult<_>>()? };
            g.shape(x).iter().enumerate().filter(|(i, _)| !ax.contains(i)).map(|(_, &d)| d).collect()
        };
        reshape(g, r, &out)
    }
}

pub fn softmax(g: &mut Graph, x: NodeId, axis: i64) -> OpResult {
    let x = to_f32(g, x);
    let m = reduce(g, ReduceOp::Max, x, &[axis], true)?;
    let d = sub(g, x, m)?;
    let e = unary(g, UnaryOp::Exp, d);
    let s = reduce(g, ReduceOp::Sum, e, &[axis], true)?;
    div(g, e, s)
}

pub fn log_softmax(g: &mut Graph, x: NodeId, axis: i64) -> OpResult {
    let x = to_f32(g, x);
    let l = logsumexp(g, x, &[axis], true)?;
    sub(g, x, l)
}

/// Reshape with at most one `-1`.
pub fn reshape_spec(g: &mut Graph, x: NodeId, spec: &[i64]) -> OpResult {
    let total: usize = g.shape(x).iter().product();
    let unknown: Vec<usize> = spec.iter().enumerate().filter(|(_, d)| **d == -1).map(|(i, _)| i).collect();
    if unknown.len() > 1 {
        return Err(OpError::new("reshape(): at most one dim may be -1"));
    }
    if let Some(bad) = spec.iter().find(|&&d| d < -1) {
        return Err(OpError::new(format!("reshape(): dim {bad} is negative")));
    }
    // Saturating: an absurd spec must give an error below, not an overflow.
    let known: usize = spec.iter().filter(|&&d| d != -1).fold(1usize, |a, &d| a.saturating_mul(d as usize));
    if known == usize::MAX {
        return Err(OpError::new(format!("reshape(): the shape {spec:?} has too many elements")));
    }
    let mut shape: Vec<usize> = spec.iter().map(|&d| d.max(0) as usize).collect();
    if let Some(&u) = unknown.first() {
        if known == 0 || !total.is_multiple_of(known) {
            return Err(OpError::new(format!(
                "reshape(): cannot reshape {} ({total} elements) into {spec:?}: {total} is not divisible by {known}",
                describe(g, x)
            ))
            .about(&[0]));
        }
        shape[u] = total / known;
    }
    reshape(g, x, &shape)
}

pub fn reshape(g: &mut Graph, x: NodeId, shape: &[usize]) -> OpResult {
    let total: usize = g.shape(x).iter().product();
    let n: usize = if shape.contains(&0) { 0 } else { shape.iter().fold(1usize, |a, &d| a.saturating_mul(d)) };
    if n == usize::MAX {
        return Err(OpError::new(format!("reshape(): the shape {shape:?} has too many elements")));
    }
    if total != n {
        return Err(OpError::new(format!("reshape(): cannot reshape {} ({total} elements) into {shape:?} ({n} elements)", describe(g, x)))
            .about(&[0])
            .help("the number of elements must stay the same; use -1 for one dim to have it inferred"));
    }
    if g.shape(x) == shape {
        return Ok(x);
    }
    let dt = g.dtype(x);
    if let Op::Const(v) = g.node(x).op {
        return Ok(constant(g, v, shape, dt));
    }
    Ok(g.add(Op::Reshape, &[x], shape.to_vec(), dt))
}

pub fn permute(g: &mut Graph, x: NodeId, perm: &[usize]) -> OpResult {
    let s = g.shape(x).to_vec();
    let mut sorted = perm.to_vec();
    sorted.sort();
    if sorted != (0..s.len()).collect::<Vec<_>>() {
        return Err(OpError::new(format!("permute(): {perm:?} is not a permutation of the {} axes of {}", s.len(), describe(g, x))));
    }
    if perm.iter().enumerate().all(|(i, &p)| i == p) {
        return Ok(x);
    }
    let out: Vec<usize> = perm.iter().map(|&p| s[p]).collect();
    let dt = g.dtype(x);
    Ok(g.add(Op::Permute(perm.to_vec()), &[x], out, dt))
}

pub fn transpose(g: &mut Graph, x: NodeId, a: i64, b: i64) -> OpResult {
    let rank = g.shape(x).len();
    let a = norm_axis(a, rank)?;
    let b = norm_axis(b, rank)?;
    let mut perm: Vec<usize> = (0..rank).collect();
    perm.swap(a, b);
    permute(g, x, &perm)
}

pub fn slice(g: &mut Graph, x: NodeId, axis: i64, start: i64, end: i64) -> OpResult {
    let s = g.shape(x).to_vec();
    let axis = norm_axis(axis, s.len())?;
    let n = s[axis] as i64;
    let fix = |v: i64| if v < 0 { v + n } else { v };
    let (st, en) = (fix(start), fix(end));
    if st < 0 || en > n || st > en {
        return Err(OpError::new(format!("slice(): range {start}..{end} is out of bounds for axis {axis} of size {n}")));
    }
    let (st, en) = (st as usize, en as usize);
    if st == 0 && en == s[axis] {
        return Ok(x);
    }
    let mut out = s.clone();
    out[axis] = en - st;
    let dt = g.dtype(x);
    Ok(g.add(Op::Slice { axis, start: st, end: en }, &[x], out, dt))
}

pub fn pad(g: &mut Graph, x: NodeId, axis: usize, before: usize, after: usize) -> NodeId {
    let mut out = g.shape(x).to_vec();
    out[axis] += before + after;
    let dt = g.dtype(x);
    g.add(Op::Pad { axis, before, after }, &[x], out, dt)
}

pub fn split(g: &mut Graph, x: NodeId, parts: usize, axis: i64) -> OpResult<Vec<NodeId>> {
    let s = g.shape(x).to_vec();
    let a = norm_axis(axis, s.len())?;
    if parts == 0 || !s[a].is_multiple_of(parts) {
        return Err(OpError::new(format!(
            "split(): axis {axis} of {} (size {}) does not divide into {parts} equal parts",
            describe(g, x),
            s[a]
        )));
    }
    let w = s[a] / parts;
    (0..parts).map(|i| slice(g, x, a as i64, (i * w) as i64, ((i + 1) * w) as i64)).collect()
}

pub fn concat(g: &mut Graph, xs: &[NodeId], axis: i64) -> OpResult {
    let Some(&first) = xs.first() else {
        return Err(OpError::new("concat(): needs at least one tensor"));
    };
    let s0 = g.shape(first).to_vec();
    let a = norm_axis(axis, s0.len())?;
    let mut total = 0;
    let dt = if xs.iter().all(|&x| g.dtype(x) == DType::I32) { DType::I32 } else { DType::F32 };
    let mut cast_xs = vec![];
    for (i, &x) in xs.iter().enumerate() {
        let s = g.shape(x);
        if s.len() != s0.len() || s.iter().zip(&s0).enumerate().any(|(d, (p, q))| d != a && p != q) {
            return Err(OpError::new(format!(
                "concat(): tensor {i} has shape {}, which does not match {} except along axis {axis}",
                describe(g, x),
                describe(g, first)
            )));
        }
        total += s[a];
        cast_xs.push(cast(g, x, dt));
    }
    if cast_xs.len() == 1 {
        return Ok(cast_xs[0]);
    }
    let mut out = s0;
    out[a] = total;
    Ok(g.add(Op::Concat(a), &cast_xs, out, dt))
}

pub fn unsqueeze(g: &mut Graph, x: NodeId, axis: i64) -> OpResult {
    let mut s = g.shape(x).to_vec();
    let a = norm_axis(axis, s.len() + 1)?;
    s.insert(a, 1);
    reshape(g, x, &s)
}

pub fn squeeze(g: &mut Graph, x: NodeId, axis: Option<i64>) -> OpResult {
    let s = g.shape(x).to_vec();
    let out: Vec<usize> = match axis {
        None => s.iter().copied().filter(|&d| d != 1).collect(),
        Some(a) => {
            let a = norm_axis(a, s.len())?;
            if s[a] != 1 {
                return Err(OpError::new(format!("squeeze(): axis {a} of {} has size {}, not 1", describe(g, x), s[a])));
            }
            s.iter().enumerate().filter(|(i, _)| *i != a).map(|(_, &d)| d).collect()
        }
    };
    reshape(g, x, &out)
}

pub fn flatten(g: &mut Graph, x: NodeId, start: i64) -> OpResult {
    let s = g.shape(x).to_vec();
    if s.is_empty() {
        return reshape(g, x, &[1]);
    }
    let a = norm_axis(start, s.len())?;
    let mut out: Vec<usize> = s[..a].to_vec();
    out.push(s[a..].iter().product());
    reshape(g, x, &out)
}

/// Batched matmul with NumPy semantics: 1-D operands are promoted and the added dim
/// removed again, leading dims broadcast.
pub fn matmul(g: &mut Graph, a: NodeId, b: NodeId) -> OpResult {
    let (sa, sb) = (g.shape(a).to_vec(), g.shape(b).to_vec());
    if sa.is_empty() || sb.is_empty() {
        return Err(OpError::new(format!("`@` needs tensors of rank ≥ 1, got {} and {}", describe(g, a), describe(g, b))).about(&[0, 1]));
    }
    let a = to_f32(g, a);
    let b = to_f32(g, b);
    let a2 = if sa.len() == 1 { unsqueeze(g, a, 0)? } else { a };
    let b2 = if sb.len() == 1 { unsqueeze(g, b, 1)? } else { b };
    let (pa, pb) = (g.shape(a2).to_vec(), g.shape(b2).to_vec());
    let (m, k) = (pa[pa.len() - 2], pa[pa.len() - 1]);
    let (k2, n) = (pb[pb.len() - 2], pb[pb.len() - 1]);
    if k != k2 {
        return Err(OpError::new(format!("`@`: inner dims differ: {} @ {} ({k} vs {k2})", describe(g, a), describe(g, b)))
            .about(&[0, 1])
            .help("for x @ w the last dim of x must equal the second-to-last dim of w; `w.T` transposes"));
    }
    let batch = broadcast_shapes(&pa[..pa.len() - 2], &pb[..pb.len() - 2]).ok_or_else(|| {
        OpError::new(format!("`@`: batch dims of {} and {} cannot be broadcast together", describe(g, a), describe(g, b))).about(&[0, 1])
    })?;
    let mut ta = batch.clone();
    ta.extend([m, k]);
    let mut tb = batch.clone();
    tb.extend([k, n]);
    let a3 = broadcast_to(g, a2, &ta)?;
    let b3 = broadcast_to(g, b2, &tb)?;
    let mut out = batch;
    out.extend([m, n]);
    let mut r = g.add(Op::MatMul, &[a3, b3], out.clone(), DType::F32);
    if sa.len() == 1 || sb.len() == 1 {
        let mut final_shape = out[..out.len() - 2].to_vec();
        if sa.len() > 1 {
            final_shape.push(m);
        }
        if sb.len() > 1 {
            final_shape.push(n);
        }
        r = reshape(g, r, &final_shape)?;
    }
    Ok(r)
}

/// Rows of `table [n, d]` picked by integer `ids`.
pub fn embedding(g: &mut Graph, table: NodeId, ids: NodeId) -> OpResult {
    let ts = g.shape(table).to_vec();
    if ts.len() != 2 {
        return Err(OpError::new(format!("embedding(): the table must be [rows, dim], got {}", describe(g, table))).about(&[0]));
    }
    if g.dtype(ids) != DType::I32 {
        return Err(OpError::new(format!("embedding(): ids must be i32, got {}", describe(g, ids))).about(&[1]));
    }
    let mut out = g.shape(ids).to_vec();
    out.push(ts[1]);
    Ok(g.add(Op::Gather, &[table, ids], out, DType::F32))
}

pub fn iota(g: &mut Graph, shape: &[usize], axis: usize, dtype: DType) -> NodeId {
    g.add(Op::Iota(axis), &[], shape.to_vec(), dtype)
}

pub fn one_hot(g: &mut Graph, ids: NodeId, n: usize) -> OpResult {
    let mut s = g.shape(ids).to_vec();
    let ax = s.len();
    s.push(n);
    let classes = iota(g, &s, ax, DType::I32);
    let ids = cast(g, ids, DType::I32);
    let ids = unsqueeze(g, ids, -1)?;
    let eq = binary(g, BinaryOp::Eq, classes, ids)?;
    Ok(cast(g, eq, DType::I32))
}

pub fn arange(g: &mut Graph, n: usize) -> NodeId {
    iota(g, &[n], 0, DType::I32)
}

/// `[t, t]`: 0 on and below the diagonal, -inf above.
pub fn causal_mask(g: &mut Graph, t: usize) -> OpResult {
    let row = iota(g, &[t, t], 0, DType::I32);
    let col = iota(g, &[t, t], 1, DType::I32);
    let above = binary(g, BinaryOp::Gt, col, row)?;
    let inf = constant(g, f64::NEG_INFINITY, &[], DType::F32);
    let zero = constant(g, 0.0, &[], DType::F32);
    select(g, above, inf, zero)
}

/// `gelu` with the tanh approximation (LANGUAGE.md's default) or the exact erf form.
pub fn gelu(g: &mut Graph, x: NodeId, exact: bool) -> OpResult {
    let x = to_f32(g, x);
    if !exact {
        // One primitive: its gradient recomputes tanh from x, so training keeps only x.
        return Ok(unary(g, UnaryOp::GeluTanh, x));
    }
    let s = mul_scalar(g, x, std::f64::consts::FRAC_1_SQRT_2);
    let inner = unary(g, UnaryOp::Erf, s);
    let one = add_scalar(g, inner, 1.0);
    let h = mul(g, x, one)?;
    Ok(mul_scalar(g, h, 0.5))
}

pub fn silu(g: &mut Graph, x: NodeId) -> OpResult {
    let x = to_f32(g, x);
    let s = unary(g, UnaryOp::Sigmoid, x);
    mul(g, x, s)
}

/// Mean cross-entropy over all non-ignored positions; logits `[..., C]`, targets `i32[...]`.
pub fn cross_entropy(g: &mut Graph, logits: NodeId, targets: NodeId, ignore_index: i64) -> OpResult {
    let ls = g.shape(logits).to_vec();
    let ts = g.shape(targets).to_vec();
    if ls.is_empty() || ls[..ls.len() - 1] != ts[..] {
        return Err(OpError::new(format!(
            "cross_entropy(): logits {} need targets of shape {:?} (the logits' shape without the class dim), got {}",
            describe(g, logits),
            ls.get(..ls.len().saturating_sub(1)).unwrap_or(&[]),
            describe(g, targets)
        ))
        .about(&[0, 1]));
    }
    if g.dtype(targets) != DType::I32 {
        return Err(OpError::new(format!("cross_entropy(): targets must be i32 class indices, got {}", describe(g, targets))).about(&[1]));
    }
    let logp = log_softmax(g, logits, -1)?;
    let hot = one_hot(g, targets, ls[ls.len() - 1])?;
    let picked = mul(g, logp, hot)?;
    let per_pos = sum(g, picked, &[-1], false)?;
    let nll = neg(g, per_pos);
    let ignore = constant(g, ignore_index as f64, &[], DType::I32);
    let keep = binary(g, BinaryOp::Ne, targets, ignore)?;
    let keep = to_f32(g, keep);
    let masked = mul(g, nll, keep)?;
    let total = sum(g, masked, &[], false)?;
    let n = sum(g, keep, &[], false)?;
    div(g, total, n)
}

pub fn mse(g: &mut Graph, a: NodeId, b: NodeId) -> OpResult {
    let d = sub(g, a, b)?;
    let sq = unary(g, UnaryOp::Square, d);
    mean(g, sq, &[], false)
}

/// `mean(max(x, 0) - x * y + log(1 + exp(-|x|)))`, PyTorch's stable form.
pub fn bce_with_logits(g: &mut Graph, x: NodeId, y: NodeId) -> OpResult {
    let x = to_f32(g, x);
    let y = to_f32(g, y);
    let r = unary(g, UnaryOp::Relu, x);
    let xy = mul(g, x, y)?;
    let a = sub(g, r, xy)?;
    let ab = unary(g, UnaryOp::Abs, x);
    let na = neg(g, ab);
    let e = unary(g, UnaryOp::Exp, na);
    let e1 = add_scalar(g, e, 1.0);
    let l = unary(g, UnaryOp::Log, e1);
    let t = add(g, a, l)?;
    mean(g, t, &[], false)
}

/// `attention(q, k, v, causal, scale)`: `softmax(q @ kᵀ * scale + mask) @ v` as one
/// fused `Attention` node (batch dims broadcast like `@`). A 1-D `v` takes the unfused
/// composition.
pub fn attention(g: &mut Graph, q: NodeId, k: NodeId, v: NodeId, causal: bool, scale: Option<f64>) -> OpResult {
    let qs = g.shape(q).to_vec();
    if qs.len() < 2 {
        return Err(OpError::new(format!("attention(): q must be [..., T, head_dim], got {}", describe(g, q))).about(&[0]));
    }
    let hd = qs[qs.len() - 1];
    let scale = scale.unwrap_or(1.0 / (hd as f64).sqrt());
    if g.shape(k).len() < 2 || g.shape(v).len() < 2 {
        return attention_unfused(g, q, k, v, causal, scale);
    }
    fused_attention(g, q, k, v, None, causal, scale)
}

/// The `Attention` primitive: `softmax(q @ kᵀ * scale + mask) @ v` over the last two
/// axes, with `q [..., Tq, D]`, `k [..., Tk, D]`, `v [..., Tk, Dv]` (batch dims broadcast
/// together) and an optional additive `mask` broadcastable to `[..., Tq, Tk]`.
pub fn fused_attention(g: &mut Graph, q: NodeId, k: NodeId, v: NodeId, mask: Option<NodeId>, causal: bool, scale: f64) -> OpResult {
    let (qs, ks, vs) = (g.shape(q).to_vec(), g.shape(k).to_vec(), g.shape(v).to_vec());
    for (i, (x, s)) in [(q, &qs), (k, &ks), (v, &vs)].into_iter().enumerate() {
        if s.len() < 2 {
            return Err(OpError::new(format!("attention(): {} must have rank ≥ 2, got {}", ["q", "k", "v"][i], describe(g, x))).about(&[i]));
        }
    }
    let (tq, d) = (qs[qs.len() - 2], qs[qs.len() - 1]);
    let (tk, dk) = (ks[ks.len() - 2], ks[ks.len() - 1]);
    let (tv, dv) = (vs[vs.len() - 2], vs[vs.len() - 1]);
    if d != dk {
        return Err(OpError::new(format!(
            "attention(): q {} and k {} have different head dims ({d} vs {dk})",
            describe(g, q),
            describe(g, k)
        ))
        .about(&[0, 1]));
    }
    if tk != tv {
        return Err(OpError::new(format!(
            "attention(): k {} and v {} have different numbers of keys ({tk} vs {tv})",
            describe(g, k),
            describe(g, v)
        ))
        .about(&[1, 2]));
    }
    if causal && tq != tk {
        return Err(OpError::new(format!("attention(causal = true) needs as many queries as keys, got {tq} and {tk}")));
    }
    let batch = broadcast_shapes(&qs[..qs.len() - 2], &ks[..ks.len() - 2])
        .and_then(|b| broadcast_shapes(&b, &vs[..vs.len() - 2]))
        .ok_or_else(|| {
            OpError::new(format!(
                "attention(): batch dims of {}, {} and {} cannot be broadcast together",
                describe(g, q),
                describe(g, k),
                describe(g, v)
            ))
            .about(&[0, 1, 2])
        })?;
    let with = |a: usize, b: usize| {
        let mut s = batch.clone();
        s.extend([a, b]);
        s
    };
    let q = to_f32(g, q);
    let k = to_f32(g, k);
    let v = to_f32(g, v);
    let q = broadcast_to(g, q, &with(tq, d))?;
    let k = broadcast_to(g, k, &with(tk, d))?;
    let v = broadcast_to(g, v, &with(tk, dv))?;
    let mut operands = vec![q, k, v];
    if let Some(m) = mask {
        let scores = with(tq, tk);
        if broadcast_shapes(g.shape(m), &scores).as_deref() != Some(&scores[..]) {
            return Err(
                OpError::new(format!("attention(): the mask {} does not broadcast to the scores {scores:?}", describe(g, m))).about(&[3])
            );
        }
        operands.push(to_f32(g, m));
    }
    Ok(g.add(Op::Attention { causal, scale, masked: mask.is_some() }, &operands, with(tq, dv), DType::F32))
}

/// `softmax(q @ kᵀ * scale + mask) @ v` from primitives (what the fusion pass
/// recognises; `attention` uses it only for a 1-D `v`).
pub fn attention_unfused(g: &mut Graph, q: NodeId, k: NodeId, v: NodeId, causal: bool, scale: f64) -> OpResult {
    let kt = transpose(g, k, -2, -1)?;
    let s = matmul(g, q, kt)?;
    let s = mul_scalar(g, s, scale);
    let s = if causal {
        let ss = g.shape(s).to_vec();
        let (tq, tk) = (ss[ss.len() - 2], ss[ss.len() - 1]);
        if tq != tk {
            return Err(OpError::new(format!("attention(causal = true) needs as many queries as keys, got {tq} and {tk}")));
        }
        let m = causal_mask(g, tq)?;
        add(g, s, m)?
    } else {
        s
    };
    let p = softmax(g, s, -1)?;
    matmul(g, p, v)
}

/// Inverted dropout: in training `x * (u >= p) / (1 - p)` with `u` uniform noise the
/// runtime draws each step; identity outside training.
pub fn dropout(g: &mut Graph, x: NodeId, p: f64, noise_index: usize) -> OpResult {
    if !(0.0..1.0).contains(&p) {
        return Err(OpError::new(format!("dropout(): p must be in [0, 1), got {p}")));
    }
    if p == 0.0 {
        return Ok(x);
    }
    let x = to_f32(g, x);
    let s = g.shape(x).to_vec();
    let u = g.add(Op::Hyper(format!("rand.{noise_index}")), &[], s, DType::F32);
    let pc = scalar(g, p);
    let keep = binary(g, BinaryOp::Ge, u, pc)?;
    let keep = to_f32(g, keep);
    let kept = mul(g, x, keep)?;
    let scaled = mul_scalar(g, kept, 1.0 / (1.0 - p));
    let training = g.add(Op::Hyper("training".into()), &[], vec![], DType::F32);
    select(g, training, scaled, x)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How many adds deep `id` is.
    fn depth(g: &Graph, id: NodeId) -> usize {
        match g.node(id).op {
            Op::Binary(BinaryOp::Add) => 1 + g.operands(id).iter().map(|&o| depth(g, o)).max().unwrap_or(0),
            _ => 0,
        }
    }

    /// The leaves of the sum at `id`, left to right.
    fn leaves(g: &Graph, id: NodeId, out: &mut Vec<NodeId>) {
        match g.node(id).op {
            Op::Binary(BinaryOp::Add) => g.operands(id).iter().for_each(|&o| leaves(g, o, out)),
            _ => out.push(id),
        }
    }

    #[test]
    fn add_all_is_a_balanced_sum_of_every_term_in_order() {
        for n in [1, 2, 3, 4, 5, 7, 8, 9, 100, 1000] {
            let mut g = Graph::new();
            let terms: Vec<NodeId> = (0..n).map(|i| g.add(Op::Param(format!("p{i}")), &[], vec![], DType::F32)).collect();
            let sum = add_all(&mut g, &terms).unwrap();
            let mut got = vec![];
            leaves(&g, sum, &mut got);
            assert_eq!(got, terms, "{n} terms");
            assert_eq!(depth(&g, sum), (n as f64).log2().ceil() as usize, "{n} terms");
        }
    }
}
