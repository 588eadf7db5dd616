//! Reverse-mode automatic differentiation as a graph transform: the backward nodes are
//! appended to the same graph, built with the shape-checked builders of `ops`, and each
//! is stamped with the origin of the forward node it differentiates ("grad of ...").
//!
//! Only `F32` nodes carry gradients. A node gets a gradient only if it lies on a path
//! from one of the `wrt` nodes to the loss, so the emitted graph holds no dead or zero
//! branches.

use crate::graph::{BinaryOp, DType, Graph, NodeId, Op, ReduceOp, UnaryOp};
use crate::ops::{self, OpError};
use std::collections::HashMap;

type R<T = NodeId> = Result<T, String>;

fn err(e: OpError) -> String {
    format!("autodiff: {}", e.message)
}

/// Appends the backward pass of the scalar `loss` to `g` and returns, for each node of
/// `wrt`, its gradient (a node of the same shape; a zeros constant where the loss does
/// not depend on it).
pub fn differentiate(g: &mut Graph, loss: NodeId, wrt: &[NodeId]) -> R<Vec<NodeId>> {
    let n = g.len();
    if loss.index() >= n {
        return Err(format!("autodiff: loss %{} is not a node of the graph", loss.index()));
    }
    if let Some(w) = wrt.iter().find(|w| w.index() >= n) {
        return Err(format!("autodiff: %{} is not a node of the graph", w.index()));
    }
    if g.dtype(loss) != DType::F32 {
        return Err(format!("autodiff: the loss must be f32, got {}", ops::shape_text(g.dtype(loss), g.shape(loss))));
    }
    if g.shape(loss).iter().product::<usize>() != 1 {
        return Err(format!("autodiff: the loss must be a scalar, got {}", ops::shape_text(g.dtype(loss), g.shape(loss))));
    }

    // Nodes on a gradient-carrying path from `wrt` to `loss`.
    let reaches_loss = g.ancestors(&[loss]);
    let mut from_wrt = vec![false; n];
    for w in wrt {
        from_wrt[w.index()] = g.dtype(*w) == DType::F32;
    }
    for i in 0..=loss.index() {
        let id = NodeId::new(i);
        if from_wrt[i] || !reaches_loss[i] {
            continue;
        }
        from_wrt[i] = g.operands(id).iter().enumerate().any(|(pos, &o)| carries_grad(g, id, pos, o) && from_wrt[o.index()]);
    }
    let relevant: Vec<bool> = (0..n).map(|i| from_wrt[i] && reaches_loss[i]).collect();

    let saved_origin = g.current_origin.clone();
    let mut contributions: HashMap<NodeId, Vec<NodeId>> = HashMap::new();
    let mut grads: HashMap<NodeId, NodeId> = HashMap::new();
    let result = (|| -> R<()> {
        if !relevant[loss.index()] {
            return Ok(());
        }
        set_origin(g, loss);
        let ls = g.shape(loss).to_vec();
        let seed = ops::constant(g, 1.0, &ls, DType::F32);
        contributions.insert(loss, vec![seed]);
        for i in (0..=loss.index()).rev() {
            let id = NodeId::new(i);
            if !relevant[i] {
                continue;
            }
            let Some(parts) = contributions.remove(&id) else {
                continue;
            };
            set_origin(g, id);
            let gi = ops::add_all(g, &parts).map_err(err)?;
            grads.insert(id, gi);
            let operands = g.operands(id);
            let needs: Vec<bool> =
                operands.iter().enumerate().map(|(pos, &o)| carries_grad(g, id, pos, o) && relevant[o.index()]).collect();
            if !needs.iter().any(|&b| b) {
                continue;
            }
            let vjps = vjp(g, id, &operands, &needs, gi)?;
            for ((o, need), v) in operands.iter().zip(&needs).zip(vjps) {
                if let (true, Some(v)) = (need, v) {
                    debug_assert_eq!(g.shape(v), g.shape(*o), "gradient shape of %{}", o.index());
                    contributions.entry(*o).or_default().push(v);
                }
            }
        }
        Ok(())
    })();
    g.current_origin = saved_origin.clone();
    result?;

    let mut out = Vec::with_capacity(wrt.len());
    for &w in wrt {
        match grads.get(&w) {
            Some(&gw) => out.push(gw),
            None => {
                g.current_origin = g.node(w).origin.clone().map(|mut o| {
                    o.what = format!("grad of {}", o.what);
                    o
                });
                let s = g.shape(w).to_vec();
                out.push(ops::constant(g, 0.0, &s, DType::F32));
                g.current_origin = saved_origin.clone();
            }
        }
    }
    Ok(out)
}

fn set_origin(g: &mut Graph, id: NodeId) {
    g.current_origin = g.node(id).origin.clone().map(|mut o| {
        o.what = format!("grad of {}", o.what);
        o
    });
}

/// Whether a gradient flows from node `id` into its operand `o` at position `pos`.
fn carries_grad(g: &Graph, id: NodeId, pos: usize, o: NodeId) -> bool {
    if g.dtype(id) != DType::F32 || g.dtype(o) != DType::F32 {
        return false;
    }
    match &g.node(id).op {
        Op::Input(_) | Op::Param(_) | Op::State(_) | Op::Hyper(_) | Op::Const(_) | Op::Iota(_) | Op::Assign(_) => false,
        // Piecewise constant: zero gradient almost everywhere (as in PyTorch).
        Op::Unary(UnaryOp::Step | UnaryOp::Floor) => false,
        Op::Binary(b) => !matches!(b, BinaryOp::Lt | BinaryOp::Le | BinaryOp::Gt | BinaryOp::Ge | BinaryOp::Eq | BinaryOp::Ne),
        Op::Select => pos != 0,
        Op::Gather | Op::ScatterAdd { .. } => pos == 0,
        Op::Cast(_) => true,
        // q, k and v; never the mask.
        Op::Attention { .. } => pos < 3,
        // Not differentiated again (no second-order rule).
        Op::AttentionBackward { .. } => false,
        Op::Unary(_)
        | Op::Reduce(..)
        | Op::Broadcast
        | Op::Reshape
        | Op::Permute(_)
        | Op::Slice { .. }
        | Op::Pad { .. }
        | Op::Concat(_)
        | Op::MatMul => true,
    }
}

fn f32(g: &mut Graph, x: NodeId) -> NodeId {
    ops::to_f32(g, x)
}

/// The vector-Jacobian products of node `id` for the operands flagged in `needs`.
fn vjp(g: &mut Graph, id: NodeId, operands: &[NodeId], needs: &[bool], gy: NodeId) -> R<Vec<Option<NodeId>>> {
    let node = g.node(id).clone();
    let y = id;
    let a = operands.first().copied();
    let b = operands.get(1).copied();
    let mut out = vec![None; operands.len()];
    match &node.op {
        Op::Unary(u) => {
            let a = a.ok_or("autodiff: unary without operand")?;
            let r = match u {
                UnaryOp::Neg => ops::neg(g, gy),
                UnaryOp::Exp => ops::mul(g, gy, y).map_err(err)?,
                UnaryOp::Log => ops::div(g, gy, a).map_err(err)?,
                UnaryOp::Sqrt => {
                    let h = ops::mul_scalar(g, gy, 0.5);
                    ops::div(g, h, y).map_err(err)?
                }
                UnaryOp::Rsqrt => {
                    let h = ops::mul_scalar(g, gy, -0.5);
                    let hy = ops::mul(g, h, y).map_err(err)?;
                    ops::div(g, hy, a).map_err(err)?
                }
                UnaryOp::Abs => {
                    let pos = ops::unary(g, UnaryOp::Step, a);
                    let na = ops::neg(g, a);
                    let negs = ops::unary(g, UnaryOp::Step, na);
                    let sign = ops::sub(g, pos, negs).map_err(err)?;
                    ops::mul(g, gy, sign).map_err(err)?
                }
                UnaryOp::GeluTanh => {
                    // One elementwise kernel, recomputed from x alone (the forward keeps
                    // nothing else).
                    let d = ops::unary(g, UnaryOp::GeluTanhGrad, a);
                    ops::mul(g, gy, d).map_err(err)?
                }
                UnaryOp::GeluTanhGrad => {
                    // gelu = x·σ(u), u = 2K(x + C·x³): gelu'' = σ(1 − σ)·(2u' + x(1 − 2σ)u'² + x·u''),
                    // u' = 2K(1 + 3C·x²), u'' = 12KC·x.
                    let (k, c) = ((2.0 / std::f64::consts::PI).sqrt(), 0.044715);
                    let a2 = ops::unary(g, UnaryOp::Square, a);
                    let a3 = ops::mul(g, a2, a).map_err(err)?;
                    let ca3 = ops::mul_scalar(g, a3, c);
                    let u = ops::add(g, a, ca3).map_err(err)?;
                    let u = ops::mul_scalar(g, u, 2.0 * k);
                    let sig = ops::unary(g, UnaryOp::Sigmoid, u);
                    let du = ops::mul_scalar(g, a2, 3.0 * c);
                    let du = ops::add_scalar(g, du, 1.0);
                    let du = ops::mul_scalar(g, du, 2.0 * k);
                    let one_minus = ops::neg(g, sig);
                    let one_minus = ops::add_scalar(g, one_minus, 1.0);
                    let spread = ops::mul(g, sig, one_minus).map_err(err)?;
                    let two_sig = ops::mul_scalar(g, sig, -2.0);
                    let one_minus_2sig = ops::add_scalar(g, two_sig, 1.0);
                    let du2 = ops::unary(g, UnaryOp::Square, du);
                    let mid = ops::mul(g, one_minus_2sig, du2).map_err(err)?;
                    let ddu = ops::mul_scalar(g, a, 12.0 * k * c);
                    let mid = ops::add(g, mid, ddu).map_err(err)?;
                    let mid = ops::mul(g, a, mid).map_err(err)?;
                    let two_du = ops::mul_scalar(g, du, 2.0);
                    let sum = ops::add(g, two_du, mid).map_err(err)?;
                    let d = ops::mul(g, spread, sum).map_err(err)?;
                    ops::mul(g, gy, d).map_err(err)?
                }
                UnaryOp::Tanh => {
                    let y2 = ops::unary(g, UnaryOp::Square, y);
                    let one = ops::scalar(g, 1.0);
                    let d = ops::sub(g, one, y2).map_err(err)?;
                    ops::mul(g, gy, d).map_err(err)?
                }
                UnaryOp::Sigmoid => {
                    let one = ops::scalar(g, 1.0);
                    let d = ops::sub(g, one, y).map_err(err)?;
                    let gy1 = ops::mul(g, gy, y).map_err(err)?;
                    ops::mul(g, gy1, d).map_err(err)?
                }
                UnaryOp::Relu => {
                    // From the output, as PyTorch's `threshold_backward(gy, y, 0)`:
                    // relu(x) > 0 exactly where x > 0 (NaN and ±0 give 0 either way),
                    // and the next layer keeps `y` anyway, so the forward need not
                    // store its input too.
                    let s = ops::unary(g, UnaryOp::Step, y);
                    ops::mul(g, gy, s).map_err(err)?
                }
                UnaryOp::Sin => {
                    let c = ops::unary(g, UnaryOp::Cos, a);
                    ops::mul(g, gy, c).map_err(err)?
                }
                UnaryOp::Cos => {
                    let s = ops::unary(g, UnaryOp::Sin, a);
                    let p = ops::mul(g, gy, s).map_err(err)?;
                    ops::neg(g, p)
                }
                UnaryOp::Erf => {
                    let a2 = ops::unary(g, UnaryOp::Square, a);
                    let na2 = ops::neg(g, a2);
                    let e = ops::unary(g, UnaryOp::Exp, na2);
                    let d = ops::mul_scalar(g, e, std::f64::consts::FRAC_2_SQRT_PI);
                    ops::mul(g, gy, d).map_err(err)?
                }
                UnaryOp::Recip => {
                    let y2 = ops::unary(g, UnaryOp::Square, y);
                    let p = ops::mul(g, gy, y2).map_err(err)?;
                    ops::neg(g, p)
                }
                UnaryOp::Square => {
                    let p = ops::mul(g, gy, a).map_err(err)?;
                    ops::mul_scalar(g, p, 2.0)
                }
                UnaryOp::Step | UnaryOp::Floor => return Ok(out),
            };
            out[0] = Some(r);
        }
        Op::Binary(op) => {
            let (a, b) = (a.ok_or("autodiff: binary without operands")?, b.ok_or("autodiff: binary without operands")?);
            match op {
                BinaryOp::Add => {
                    out[0] = Some(gy);
                    out[1] = Some(gy);
                }
                BinaryOp::Sub => {
                    out[0] = Some(gy);
                    if needs[1] {
                        out[1] = Some(ops::neg(g, gy));
                    }
                }
                BinaryOp::Mul => {
                    if needs[0] {
                        out[0] = Some(ops::mul(g, gy, b).map_err(err)?);
                    }
                    if needs[1] {
                        out[1] = Some(ops::mul(g, gy, a).map_err(err)?);
                    }
                }
                BinaryOp::Div => {
                    if needs[0] {
                        out[0] = Some(ops::div(g, gy, b).map_err(err)?);
                    }
                    if needs[1] {
                        let p = ops::mul(g, gy, y).map_err(err)?;
                        let q = ops::div(g, p, b).map_err(err)?;
                        out[1] = Some(ops::neg(g, q));
                    }
                }
                BinaryOp::Max | BinaryOp::Min => {
                    // PyTorch splits the gradient evenly between tied operands.
                    let wins = if *op == BinaryOp::Max { BinaryOp::Gt } else { BinaryOp::Lt };
                    let tie = ops::binary(g, BinaryOp::Eq, a, b).map_err(err)?;
                    let tie = f32(g, tie);
                    let half_tie = ops::mul_scalar(g, tie, 0.5);
                    for (k, (p, q)) in [(a, b), (b, a)].into_iter().enumerate() {
                        if needs[k] {
                            let w = ops::binary(g, wins, p, q).map_err(err)?;
                            let w = f32(g, w);
                            let m = ops::add(g, w, half_tie).map_err(err)?;
                            out[k] = Some(ops::mul(g, gy, m).map_err(err)?);
                        }
                    }
                }
                BinaryOp::Pow => {
                    if needs[0] {
                        let bm1 = ops::add_scalar(g, b, -1.0);
                        let p = ops::binary(g, BinaryOp::Pow, a, bm1).map_err(err)?;
                        let gb = ops::mul(g, gy, b).map_err(err)?;
                        out[0] = Some(ops::mul(g, gb, p).map_err(err)?);
                    }
                    if needs[1] {
                        let la = ops::unary(g, UnaryOp::Log, a);
                        let gyy = ops::mul(g, gy, y).map_err(err)?;
                        out[1] = Some(ops::mul(g, gyy, la).map_err(err)?);
                    }
                }
                BinaryOp::Lt | BinaryOp::Le | BinaryOp::Gt | BinaryOp::Ge | BinaryOp::Eq | BinaryOp::Ne => {}
            }
        }
        Op::Select => {
            let c = operands[0];
            let zero = ops::scalar(g, 0.0);
            if needs[1] {
                out[1] = Some(ops::select(g, c, gy, zero).map_err(err)?);
            }
            if needs[2] {
                out[2] = Some(ops::select(g, c, zero, gy).map_err(err)?);
            }
        }
        Op::Reduce(r, axes) => {
            let a = a.ok_or("autodiff: reduce without operand")?;
            let in_shape = g.shape(a).to_vec();
            let keep: Vec<usize> = in_shape.iter().enumerate().map(|(i, &d)| if axes.contains(&i) { 1 } else { d }).collect();
            let gk = ops::reshape(g, gy, &keep).map_err(err)?;
            let r = match r {
                ReduceOp::Sum => ops::broadcast_to(g, gk, &in_shape).map_err(err)?,
                ReduceOp::Max | ReduceOp::Min => {
                    // Ties share the gradient evenly (like torch.amax / amin).
                    let yk = ops::reshape(g, y, &keep).map_err(err)?;
                    let hit = ops::binary(g, BinaryOp::Eq, a, yk).map_err(err)?;
                    let mask = f32(g, hit);
                    let ax: Vec<i64> = axes.iter().map(|&x| x as i64).collect();
                    let cnt = if ax.is_empty() { mask } else { ops::reduce(g, ReduceOp::Sum, mask, &ax, true).map_err(err)? };
                    let share = ops::div(g, gk, cnt).map_err(err)?;
                    ops::mul(g, share, mask).map_err(err)?
                }
            };
            out[0] = Some(r);
        }
        Op::Broadcast => {
            let a = a.ok_or("autodiff: broadcast without operand")?;
            let in_shape = g.shape(a).to_vec();
            let out_shape = node.shape.clone();
            let lead = out_shape.len() - in_shape.len();
            let axes: Vec<i64> =
                (0..out_shape.len()).filter(|&i| i < lead || (in_shape[i - lead] == 1 && out_shape[i] != 1)).map(|i| i as i64).collect();
            let s = if axes.is_empty() { gy } else { ops::sum(g, gy, &axes, false).map_err(err)? };
            out[0] = Some(ops::reshape(g, s, &in_shape).map_err(err)?);
        }
        Op::Reshape => {
            let a = a.ok_or("autodiff: reshape without operand")?;
            let s = g.shape(a).to_vec();
            out[0] = Some(ops::reshape(g, gy, &s).map_err(err)?);
        }
        Op::Permute(p) => {
            let mut inv = vec![0; p.len()];
            for (i, &pi) in p.iter().enumerate() {
                inv[pi] = i;
            }
            out[0] = Some(ops::permute(g, gy, &inv).map_err(err)?);
        }
        Op::Slice { axis, start, end } => {
            let a = a.ok_or("autodiff: slice without operand")?;
            let n = g.shape(a)[*axis];
            out[0] = Some(ops::pad(g, gy, *axis, *start, n - end));
        }
        Op::Pad { axis, before, .. } => {
            let a = a.ok_or("autodiff: pad without operand")?;
            let n = g.shape(a)[*axis];
            out[0] = Some(ops::slice(g, gy, *axis as i64, *before as i64, (before + n) as i64).map_err(err)?);
        }
        Op::Concat(axis) => {
            let mut off = 0;
            for (k, &o) in operands.iter().enumerate() {
                let w = g.shape(o)[*axis];
                if needs[k] {
                    out[k] = Some(ops::slice(g, gy, *axis as i64, off as i64, (off + w) as i64).map_err(err)?);
                }
                off += w;
            }
        }
        Op::MatMul => {
            let (a, b) = (a.ok_or("autodiff: matmul without operands")?, b.ok_or("autodiff: matmul without operands")?);
            if needs[0] {
                let bt = ops::transpose(g, b, -2, -1).map_err(err)?;
                out[0] = Some(ops::matmul(g, gy, bt).map_err(err)?);
            }
            if needs[1] {
                let at = ops::transpose(g, a, -2, -1).map_err(err)?;
                out[1] = Some(ops::matmul(g, at, gy).map_err(err)?);
            }
        }
        Op::Gather => {
            let (table, ids) = (a.ok_or("autodiff: gather without operands")?, b.ok_or("autodiff: gather without operands")?);
            let ts = g.shape(table).to_vec();
            out[0] = Some(g.add(Op::ScatterAdd { rows: ts[0] }, &[gy, ids], ts, DType::F32));
        }
        Op::ScatterAdd { .. } => {
            let (src, ids) = (a.ok_or("autodiff: scatter_add without operands")?, b.ok_or("autodiff: scatter_add without operands")?);
            let s = g.shape(src).to_vec();
            out[0] = Some(g.add(Op::Gather, &[gy, ids], s, DType::F32));
        }
        Op::Cast(_) => out[0] = Some(gy),
        Op::Attention { causal, scale, masked } => {
            // One fused kernel gives dq, dk and dv packed; slice them apart. Its last
            // operand is the forward node itself, whose kernel keeps the probabilities
            // for it (so every entry running the backward runs that forward too).
            let mut args = operands.to_vec();
            args.extend([gy, id]);
            let sizes: Vec<usize> = operands[..3].iter().map(|&o| g.shape(o).iter().product()).collect();
            let total: usize = sizes.iter().sum();
            let op = Op::AttentionBackward { causal: *causal, scale: *scale, masked: *masked };
            let packed = g.add(op, &args, vec![total], DType::F32);
            let mut at = 0;
            for (k, &o) in operands[..3].iter().enumerate() {
                if needs[k] {
                    let part = ops::slice(g, packed, 0, at as i64, (at + sizes[k]) as i64).map_err(err)?;
                    let s = g.shape(o).to_vec();
                    out[k] = Some(ops::reshape(g, part, &s).map_err(err)?);
                }
                at += sizes[k];
            }
        }
        Op::AttentionBackward { .. } => {}
        Op::Input(_) | Op::Param(_) | Op::State(_) | Op::Hyper(_) | Op::Const(_) | Op::Iota(_) | Op::Assign(_) => {}
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::Origin;
    use bm_grammar::SourceFile;

    #[test]
    fn backward_nodes_carry_grad_origins() {
        let mut g = Graph::new();
        let file = SourceFile::new("m.bm", "x = exp(p)\n");
        let p = g.add(Op::Param("p".into()), &[], vec![3], DType::F32);
        let q = g.add(Op::Param("q".into()), &[], vec![3], DType::F32);
        g.current_origin = Some(Origin { what: "exp".into(), file: file.clone(), span: bm_grammar::ast::Span { start: 4, end: 10 } });
        let e = ops::unary(&mut g, UnaryOp::Exp, p);
        let l = ops::sum(&mut g, e, &[], false).unwrap();
        g.current_origin = None;
        let n0 = g.len();
        let gr = differentiate(&mut g, l, &[p]).unwrap();
        assert!(g.len() > n0);
        for i in n0..g.len() {
            let o = g.node(NodeId::new(i)).origin.as_ref().expect("backward nodes have origins");
            assert_eq!(o.what, "grad of exp");
            assert_eq!(o.location(), "m.bm:1:5");
        }
        assert!(g.current_origin.is_none());
        assert_eq!(g.shape(gr[0]), &[3]);
        let gq = differentiate(&mut g, l, &[q]).unwrap();
        assert_eq!(g.node(gq[0]).op, Op::Const(0.0));
        assert_eq!(g.shape(gq[0]), &[3]);
    }

    #[test]
    fn skips_nodes_off_the_path() {
        let mut g = Graph::new();
        let p = g.add(Op::Param("p".into()), &[], vec![4], DType::F32);
        let x = g.add(Op::Input("x".into()), &[], vec![4], DType::F32);
        // A large subgraph that does not depend on p.
        let mut h = x;
        for _ in 0..5 {
            h = ops::unary(&mut g, UnaryOp::Tanh, h);
        }
        let m = ops::mul(&mut g, p, h).unwrap();
        let l = ops::sum(&mut g, m, &[], false).unwrap();
        let n0 = g.len();
        differentiate(&mut g, l, &[p]).unwrap();
        // seed const, its reshape and broadcast (constants), and the mul by h.
        assert!(g.len() - n0 <= 4, "{}", g.to_text());
        for i in n0..g.len() {
            assert!(!matches!(g.node(NodeId::new(i)).op, Op::Unary(UnaryOp::Square)));
        }
    }
}
