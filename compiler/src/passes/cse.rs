//! Common-subexpression elimination: nodes with the same operation on the same operands
//! become one (LayerNorm's mean and variance share `sum(x)`, every layer's causal mask
//! is the same tensor). Every op is pure except `Assign`, which is never merged.

use crate::graph::{Graph, NodeId, Op};
use std::collections::HashMap;

pub fn eliminate_common_subexpressions(g: &Graph) -> Graph {
    let mut out = Graph::new();
    let mut map: Vec<NodeId> = Vec::with_capacity(g.len());
    let mut seen: HashMap<(String, Vec<NodeId>, Vec<usize>, crate::graph::DType), NodeId> = HashMap::new();
    for id in g.node_ids() {
        let n = g.node(id);
        let operands: Vec<NodeId> = g.operands(id).iter().map(|o| map[o.index()]).collect();
        let key = (format!("{:?}", n.op), operands.clone(), n.shape.clone(), n.dtype);
        let mergeable = !matches!(n.op, Op::Assign(_));
        if mergeable && let Some(&existing) = seen.get(&key) {
            map.push(existing);
            continue;
        }
        out.current_origin = n.origin.clone();
        let new = out.add(n.op.clone(), &operands, n.shape.clone(), n.dtype);
        if mergeable {
            seen.insert(key, new);
        }
        map.push(new);
    }
    g.remapped_metadata(&mut out, |id| map[id.index()]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::DType;
    use crate::ops;

    #[test]
    fn merges_identical_nodes_but_not_different_ones() {
        let mut g = Graph::new();
        let x = g.add(Op::Input("x".into()), &[], vec![4], DType::F32);
        g.inputs.push(("x".into(), x));
        let a = ops::sum(&mut g, x, &[], false).unwrap();
        let b = ops::sum(&mut g, x, &[], false).unwrap();
        let c = ops::reduce(&mut g, crate::graph::ReduceOp::Max, x, &[], false).unwrap();
        let s = ops::add(&mut g, a, b).unwrap();
        let t = ops::add(&mut g, s, c).unwrap();
        g.set_output("t", t);
        let before = g.len();
        let h = eliminate_common_subexpressions(&g);
        assert_eq!(h.len(), before - 1, "{}", h.to_text());
    }
}
