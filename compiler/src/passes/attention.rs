//! Attention fusion: rewrites the unfused attention pattern into one `Attention` node.
//!
//! The pattern, as `ops` builds it (after CSE), matched backwards from the final product:
//!
//! ```text
//! out = matmul(p, v)
//! p   = div(e, broadcast(reshape(reduce_sum[last](e))))
//! e   = exp(sub(s, broadcast(reshape(reduce_max[last](s)))))
//! s   = add(scaled, mask) | add(mask, scaled) | scaled
//! scaled = mul(·, const c) | mul(const c, ·) | div(·, const c) | ...   (any chain, or none)
//!        of matmul(q, [broadcast] permute[.., last, last-1](k))
//! ```
//!
//! That covers `q @ k.T` and `q @ k.transpose(-2, -1)`, `/ s`, `* s` and `* (1 / s)`,
//! and no mask, `causal_mask(T)` (recognised exactly: `select(iota[1] > iota[0], -inf,
//! 0)`, giving `causal`) or any other additive mask that does not depend on a parameter
//! (no gradient flows into the mask of the fused op). A match is rewritten only when
//! every intermediate (the scores, the softmax's maximum, exponentials, sum and
//! probabilities) is used by the pattern alone and is not a result, so nothing computed
//! by the unfused form is still needed; otherwise the graph is left as it is. The
//! rewritten graph keeps the unfused nodes until the dead-code pass that follows drops
//! them.

use crate::graph::{BinaryOp, DType, Graph, NodeId, Op, ReduceOp, UnaryOp};
use crate::ops;
use std::collections::{HashMap, HashSet};

#[derive(Clone, Debug, PartialEq)]
struct Match {
    q: NodeId,
    k: NodeId,
    v: NodeId,
    mask: Option<NodeId>,
    causal: bool,
    scale: f64,
}

/// The graph with every recognised attention pattern replaced by an `Attention` node
/// (and dead nodes removed). Returns the graph unchanged (a copy) when nothing matches.
pub fn fuse_attention(g: &Graph) -> Graph {
    let roots = result_nodes(g);
    let matches: HashMap<NodeId, Match> =
        g.node_ids().filter(|&id| g.node(id).op == Op::MatMul).filter_map(|id| Some((id, match_at(g, &roots, id)?))).collect();
    if matches.is_empty() {
        return g.clone();
    }
    let mut out = Graph::new();
    let mut map: Vec<NodeId> = Vec::with_capacity(g.len());
    for id in g.node_ids() {
        let n = g.node(id);
        out.current_origin = n.origin.clone();
        if let Some(m) = matches.get(&id) {
            out.current_origin = n.origin.clone().map(|mut o| {
                o.what = "attention".into();
                o
            });
            let r = ops::fused_attention(
                &mut out,
                map[m.q.index()],
                map[m.k.index()],
                map[m.v.index()],
                m.mask.map(|x| map[x.index()]),
                m.causal,
                m.scale,
            );
            if let Ok(a) = r
                && out.shape(a) == n.shape.as_slice()
            {
                map.push(a);
                continue;
            }
            out.current_origin = n.origin.clone();
        }
        let operands: Vec<NodeId> = g.operands(id).iter().map(|o| map[o.index()]).collect();
        map.push(out.add(n.op.clone(), &operands, n.shape.clone(), n.dtype));
    }
    g.remapped_metadata(&mut out, |id| map[id.index()]);
    crate::passes::dce::eliminate_dead_code(&out)
}

/// Nodes the runtime reads: they must survive as they are.
fn result_nodes(g: &Graph) -> HashSet<NodeId> {
    let mut r: HashSet<NodeId> = g.outputs.iter().map(|o| o.1).collect();
    r.extend(g.loss);
    if let Some((l, t, _)) = g.classification {
        r.extend([l, t]);
    }
    r
}

struct Ctx<'a> {
    g: &'a Graph,
    roots: &'a HashSet<NodeId>,
}

impl Ctx<'_> {
    fn op(&self, id: NodeId) -> &Op {
        &self.g.node(id).op
    }

    /// `id` is an intermediate whose only user is `user` (and not a result).
    fn sole(&self, id: NodeId, user: NodeId) -> Option<()> {
        (self.g.users(id) == [user] && !self.roots.contains(&id)).then_some(())
    }

    /// `id` is an intermediate used exactly by `users` (sorted) and not a result.
    fn only_users(&self, id: NodeId, users: &[NodeId]) -> Option<()> {
        let mut want = users.to_vec();
        want.sort();
        want.dedup();
        (self.g.users(id) == want && !self.roots.contains(&id)).then_some(())
    }

    fn two(&self, id: NodeId) -> Option<(NodeId, NodeId)> {
        match self.g.operands(id)[..] {
            [a, b] => Some((a, b)),
            _ => None,
        }
    }

    fn one(&self, id: NodeId) -> Option<NodeId> {
        match self.g.operands(id)[..] {
            [a] => Some(a),
            _ => None,
        }
    }

    /// `x` (of the shape `[..., n]`) is `broadcast(reshape(reduce_<op>[last](of)))` or
    /// `reshape(reduce(...))` when nothing broadcasts; each piece used only by the next.
    /// Returns the reduce node.
    fn keepdim_reduce(&self, x: NodeId, user: NodeId, op: ReduceOp, of: NodeId) -> Option<NodeId> {
        let last = self.g.shape(of).len().checked_sub(1)?;
        self.sole(x, user)?;
        let (rs, rs_user) = if *self.op(x) == Op::Broadcast { (self.one(x)?, x) } else { (x, user) };
        if *self.op(rs) != Op::Reshape {
            return None;
        }
        self.sole(rs, rs_user)?;
        let red = self.one(rs)?;
        if *self.op(red) != Op::Reduce(op, vec![last]) || self.one(red)? != of {
            return None;
        }
        self.sole(red, rs)?;
        Some(red)
    }

    /// A constant scalar factor.
    fn constant(&self, id: NodeId) -> Option<f64> {
        match self.op(id) {
            Op::Const(c) if c.is_finite() && *c != 0.0 && self.g.dtype(id) == DType::F32 => Some(*c),
            _ => None,
        }
    }

    /// `x` = (chain of `* c`, `c *`, `/ c` of) `matmul(q, kᵀ)`: `(q, k, scale)`. The
    /// caller checks `x`'s users; the nodes below it must each have one user.
    fn scaled_scores(&self, mut x: NodeId) -> Option<(NodeId, NodeId, f64)> {
        let mut scale = 1.0;
        let mut user: Option<NodeId> = None;
        loop {
            if let Some(u) = user {
                self.sole(x, u)?;
            }
            match self.op(x) {
                Op::Binary(BinaryOp::Mul) => {
                    let (a, b) = self.two(x)?;
                    let (inner, c) = match (self.constant(a), self.constant(b)) {
                        (_, Some(c)) => (a, c),
                        (Some(c), None) => (b, c),
                        (None, None) => return None,
                    };
                    scale *= c;
                    user = Some(x);
                    x = inner;
                }
                Op::Binary(BinaryOp::Div) => {
                    let (a, b) = self.two(x)?;
                    scale /= self.constant(b)?;
                    user = Some(x);
                    x = a;
                }
                Op::MatMul => {
                    let (q, kt) = self.two(x)?;
                    let kt = if *self.op(kt) == Op::Broadcast { self.one(kt)? } else { kt };
                    let Op::Permute(perm) = self.op(kt) else { return None };
                    let r = perm.len();
                    let swap =
                        r >= 2 && perm[r - 2] == r - 1 && perm[r - 1] == r - 2 && perm[..r - 2].iter().enumerate().all(|(i, &p)| i == p);
                    if !swap || self.g.shape(q).len() < 2 {
                        return None;
                    }
                    return Some((q, self.one(kt)?, scale));
                }
                _ => return None,
            }
        }
    }

    /// `m` is `causal_mask(T)`, possibly broadcast: `select(iota[r-1] > iota[r-2], -inf, 0)`.
    fn is_causal_mask(&self, m: NodeId) -> bool {
        let m = if *self.op(m) == Op::Broadcast { self.one(m) } else { Some(m) };
        let Some(m) = m else { return false };
        let (Op::Select, [c, a, b]) = (self.op(m), &self.g.operands(m)[..]) else { return false };
        let is_const = |x: NodeId, v: f64| matches!(self.op(x), Op::Const(c) if *c == v);
        if !is_const(*a, f64::NEG_INFINITY) || !is_const(*b, 0.0) {
            return false;
        }
        let c = if *self.op(*c) == Op::Broadcast { self.one(*c) } else { Some(*c) };
        let Some(c) = c else { return false };
        let Some((x, y)) = self.two(c) else { return false };
        // col > row, or row < col
        let (col, row) = match self.op(c) {
            Op::Binary(BinaryOp::Gt) => (x, y),
            Op::Binary(BinaryOp::Lt) => (y, x),
            _ => return false,
        };
        let iota_axis = |n: NodeId| match self.op(n) {
            Op::Iota(a) => Some((*a, self.g.shape(n).len())),
            _ => None,
        };
        match (iota_axis(col), iota_axis(row)) {
            (Some((ac, rc)), Some((ar, rr))) => {
                let s = self.g.shape(col);
                rc >= 2 && rc == rr && ac == rc - 1 && ar == rr - 2 && s == self.g.shape(row) && s[rc - 1] == s[rc - 2]
            }
            _ => false,
        }
    }

    /// Whether `x` depends on a parameter or optimiser state (would need a gradient).
    fn depends_on_params(&self, x: NodeId) -> bool {
        let seen = self.g.ancestors(&[x]);
        self.g.node_ids().any(|n| seen[n.index()] && matches!(self.op(n), Op::Param(_) | Op::State(_)))
    }
}

fn match_at(g: &Graph, roots: &HashSet<NodeId>, mm: NodeId) -> Option<Match> {
    let c = Ctx { g, roots };
    let (p, v) = c.two(mm)?;
    // p = e / sum(e)
    if *c.op(p) != Op::Binary(BinaryOp::Div) || g.dtype(p) != DType::F32 || g.shape(p).len() < 2 {
        return None;
    }
    c.sole(p, mm)?;
    let (e, bsum) = c.two(p)?;
    let sum = c.keepdim_reduce(bsum, p, ReduceOp::Sum, e)?;
    c.only_users(e, &[sum, p])?;
    // e = exp(s - max(s))
    if *c.op(e) != Op::Unary(UnaryOp::Exp) {
        return None;
    }
    let dd = c.one(e)?;
    c.sole(dd, e)?;
    if *c.op(dd) != Op::Binary(BinaryOp::Sub) {
        return None;
    }
    let (s, bmax) = c.two(dd)?;
    let max = c.keepdim_reduce(bmax, dd, ReduceOp::Max, s)?;
    c.only_users(s, &[max, dd])?;
    // s = scaled (+ mask)
    let (q, k, scale, mask) = match c.op(s) {
        Op::Binary(BinaryOp::Add) => {
            let (a, b) = c.two(s)?;
            let side = |x: NodeId| {
                c.sole(x, s)?;
                c.scaled_scores(x)
            };
            let (q, k, scale, mask) = match side(a) {
                Some((q, k, sc)) => (q, k, sc, b),
                None => {
                    let (q, k, sc) = side(b)?;
                    (q, k, sc, a)
                }
            };
            (q, k, scale, Some(mask))
        }
        _ => {
            let (q, k, sc) = c.scaled_scores(s)?;
            (q, k, sc, None)
        }
    };
    let (mask, causal) = match mask {
        None => (None, false),
        Some(m) if c.is_causal_mask(m) => (None, true),
        Some(m) => {
            if c.depends_on_params(m) || g.dtype(m) != DType::F32 {
                return None;
            }
            let m0 = if *c.op(m) == Op::Broadcast { c.one(m)? } else { m };
            (Some(m0), false)
        }
    };
    Some(Match { q, k, v, mask, causal, scale })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::DType;

    fn input(g: &mut Graph, name: &str, shape: &[usize]) -> NodeId {
        let id = g.add(Op::Input(name.into()), &[], shape.to_vec(), DType::F32);
        g.inputs.push((name.into(), id));
        id
    }

    fn count(g: &Graph, f: impl Fn(&Op) -> bool) -> usize {
        g.node_ids().filter(|&n| f(&g.node(n).op)).count()
    }

    #[test]
    fn rewrites_the_unfused_builder_and_leaves_softmax_alone() {
        for causal in [false, true] {
            let mut g = Graph::new();
            let q = input(&mut g, "q", &[2, 5, 4]);
            let k = input(&mut g, "k", &[2, 5, 4]);
            let v = input(&mut g, "v", &[2, 5, 3]);
            let y = ops::attention_unfused(&mut g, q, k, v, causal, 0.5).unwrap();
            g.set_output("y", y);
            let g = crate::passes::cse::eliminate_common_subexpressions(&g);
            let f = fuse_attention(&g);
            assert_eq!(count(&f, |o| matches!(o, Op::Attention { .. })), 1, "{}", f.to_text());
            assert_eq!(count(&f, |o| *o == Op::MatMul), 0, "{}", f.to_text());
            let a = f.output("y").unwrap();
            assert_eq!(f.node(a).op, Op::Attention { causal, scale: 0.5, masked: false });
        }
        // softmax alone, and a product that is not attention
        let mut g = Graph::new();
        let x = input(&mut g, "x", &[3, 4]);
        let w = input(&mut g, "w", &[4, 4]);
        let s = ops::softmax(&mut g, x, -1).unwrap();
        let y = ops::matmul(&mut g, s, w).unwrap();
        g.set_output("y", y);
        let f = fuse_attention(&g);
        assert_eq!(f.len(), g.len());
    }
}
