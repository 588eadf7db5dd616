//! Dead-code elimination: rebuilds the graph with only the nodes that an output, the
//! loss, a parameter, an input or an `Assign` needs (builders leave behind constants
//! they folded away, and autodiff may build terms nothing reads).

use crate::graph::{Graph, NodeId, Op};

pub fn eliminate_dead_code(g: &Graph) -> Graph {
    let mut roots: Vec<NodeId> = g.outputs.iter().map(|o| o.1).collect();
    roots.extend(g.loss);
    roots.extend(g.params.iter().map(|p| p.node));
    roots.extend(g.inputs.iter().map(|i| i.1));
    roots.extend(g.node_ids().filter(|&n| matches!(g.node(n).op, Op::Assign(_))));
    if let Some((l, t, _)) = g.classification {
        roots.extend([l, t]);
    }
    let live = g.ancestors(&roots);
    let mut out = Graph::new();
    let mut map: Vec<Option<NodeId>> = vec![None; g.len()];
    for id in g.node_ids() {
        if !live[id.index()] {
            continue;
        }
        let n = g.node(id);
        let operands: Vec<NodeId> = g.operands(id).iter().map(|o| map[o.index()].expect("operands are live and come first")).collect();
        out.current_origin = n.origin.clone();
        map[id.index()] = Some(out.add(n.op.clone(), &operands, n.shape.clone(), n.dtype));
    }
    g.remapped_metadata(&mut out, |id| map[id.index()].expect("roots are live"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::DType;
    use crate::ops;

    #[test]
    fn removes_unused_nodes_and_keeps_roots() {
        let mut g = Graph::new();
        let x = g.add(Op::Input("x".into()), &[], vec![3], DType::F32);
        g.inputs.push(("x".into(), x));
        let _unused = ops::scalar(&mut g, 7.0);
        let y = ops::mul_scalar(&mut g, x, 2.0);
        g.set_output("y", y);
        let d = eliminate_dead_code(&g);
        assert_eq!(d.len(), 3, "{}", d.to_text());
        assert_eq!(d.shape(d.output("y").unwrap()), &[3]);
    }
}
