//! Sums of zero-padded pieces become concatenations.
//!
//! The gradient of a tensor used through slices (a fused qkv projection split into q, k
//! and v) is the sum of each slice's gradient padded back to the whole shape (`Pad`, the
//! VJP of `Slice`). When the padded ranges along one axis are disjoint, that sum is a
//! `Concat` of the pieces (zeros in any gaps): lowering writes each piece once into its
//! place, instead of zero-filling, copying and adding whole tensors.
//!
//! The rule `add(pieces a, pieces b) → concat(pieces a ∪ pieces b)` applies bottom-up,
//! so a chain of adds folds into one `Concat`; `pieces` reads a `Pad` (one piece) or a
//! `Concat` this pass built (its `Const(0)` operands are gaps).

use crate::graph::{BinaryOp, Graph, NodeId, Op};

pub fn concat_disjoint_pads(g: &Graph) -> Graph {
    let mut out = Graph::new();
    let mut map: Vec<NodeId> = Vec::with_capacity(g.len());
    for id in g.node_ids() {
        let n = g.node(id);
        let operands: Vec<NodeId> = g.operands(id).iter().map(|o| map[o.index()]).collect();
        out.current_origin = n.origin.clone();
        let merged = match n.op {
            Op::Binary(BinaryOp::Add) if operands.len() == 2 => merge(&out, operands[0], operands[1], &n.shape),
            _ => None,
        };
        let new = match merged {
            Some((axis, pieces)) => {
                // Named after the split whose gradient it is, not the add.
                out.current_origin = out.node(operands[0]).origin.clone();
                concat(&mut out, axis, pieces, &n.shape, n.dtype)
            }
            None => out.add(n.op.clone(), &operands, n.shape.clone(), n.dtype),
        };
        map.push(new);
    }
    g.remapped_metadata(&mut out, |id| map[id.index()]);
    out
}

/// `(axis, [(start, node)])`: `id` is zero except for these pieces along `axis`.
fn pieces(g: &Graph, id: NodeId) -> Option<(usize, Vec<(usize, NodeId)>)> {
    let ops = g.operands(id);
    match g.node(id).op {
        Op::Pad { axis, before, .. } => Some((axis, vec![(before, ops[0])])),
        Op::Concat(axis) => {
            let mut at = 0;
            let mut v = Vec::new();
            for o in ops {
                if g.node(o).op != Op::Const(0.0) {
                    v.push((at, o));
                }
                at += g.shape(o)[axis];
            }
            Some((axis, v))
        }
        _ => None,
    }
}

/// The pieces of `a + b` when both are pieces along one axis of `shape` with disjoint
/// ranges.
fn merge(g: &Graph, a: NodeId, b: NodeId, shape: &[usize]) -> Option<(usize, Vec<(usize, NodeId)>)> {
    let (ax, mut pa) = pieces(g, a)?;
    let (bx, pb) = pieces(g, b)?;
    if ax != bx || g.shape(a) != shape || g.shape(b) != shape || g.node(a).dtype != g.node(b).dtype {
        return None;
    }
    pa.extend(pb);
    pa.sort_by_key(|&(start, _)| start);
    let mut end = 0;
    for &(start, p) in &pa {
        if start < end {
            return None;
        }
        end = start + g.shape(p)[ax];
    }
    Some((ax, pa))
}

/// `Concat` of the pieces along `axis`, zeros in the gaps, covering all of `shape`.
fn concat(g: &mut Graph, axis: usize, pieces: Vec<(usize, NodeId)>, shape: &[usize], dtype: crate::graph::DType) -> NodeId {
    let mut operands = Vec::new();
    let mut at = 0;
    let zeros = |g: &mut Graph, from: usize, to: usize| {
        let mut s = shape.to_vec();
        s[axis] = to - from;
        g.add(Op::Const(0.0), &[], s, dtype)
    };
    for (start, p) in pieces {
        if start > at {
            operands.push(zeros(g, at, start));
        }
        at = start + g.shape(p)[axis];
        operands.push(p);
    }
    if at < shape[axis] {
        operands.push(zeros(g, at, shape[axis]));
    }
    if operands.len() == 1 {
        return operands[0];
    }
    g.add(Op::Concat(axis), &operands, shape.to_vec(), dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::{Tensor, evaluate};
    use crate::graph::DType;
    use crate::ops;
    use std::collections::HashMap;

    /// q, k, v slices of one tensor, each scaled, padded back and summed (as autodiff
    /// writes the gradient of a split), plus a gap and an overlap that must stay adds.
    #[test]
    fn disjoint_pads_become_one_concat_with_the_same_values() {
        let mut g = Graph::new();
        let x = g.add(Op::Input("x".into()), &[], vec![2, 9], DType::F32);
        g.inputs.push(("x".into(), x));
        let piece = |g: &mut Graph, start: usize, end: usize, k: f64| {
            let s = g.add(Op::Slice { axis: 1, start, end }, &[x], vec![2, end - start], DType::F32);
            let s = ops::mul_scalar(g, s, k);
            g.add(Op::Pad { axis: 1, before: start, after: 9 - end }, &[s], vec![2, 9], DType::F32)
        };
        let (q, k, v) = (piece(&mut g, 0, 3, 2.0), piece(&mut g, 3, 6, 3.0), piece(&mut g, 6, 9, 4.0));
        let qk = ops::add(&mut g, q, k).unwrap();
        let all = ops::add(&mut g, qk, v).unwrap();
        g.set_output("all", all);
        let gap = piece(&mut g, 7, 9, 5.0);
        let with_gap = ops::add(&mut g, q, gap).unwrap();
        g.set_output("gap", with_gap);
        let overlap = piece(&mut g, 2, 5, 6.0);
        let overlapping = ops::add(&mut g, q, overlap).unwrap();
        g.set_output("overlap", overlapping);

        let h = crate::passes::dce::eliminate_dead_code(&concat_disjoint_pads(&g));
        let text = h.to_text();
        let node = |name: &str| h.outputs.iter().find(|(n, _)| n == name).unwrap().1;
        assert!(matches!(h.node(node("all")).op, Op::Concat(1)), "{text}");
        assert_eq!(h.operands(node("all")).len(), 3, "{text}");
        assert!(matches!(h.node(node("gap")).op, Op::Concat(1)), "{text}");
        assert!(matches!(h.node(node("overlap")).op, Op::Binary(BinaryOp::Add)), "{text}");

        let feeds: HashMap<String, Tensor> = [("x".to_string(), Tensor::new(vec![2, 9], (0..18).map(|i| i as f64 - 4.5).collect()))].into();
        let (before, after) = (evaluate(&g, &feeds).unwrap(), evaluate(&h, &feeds).unwrap());
        for name in ["all", "gap", "overlap"] {
            let (a, b) = (&before[g.outputs.iter().find(|(n, _)| n == name).unwrap().1.index()], &after[node(name).index()]);
            assert_eq!(a.data, b.data, "{name}");
        }
    }
}
