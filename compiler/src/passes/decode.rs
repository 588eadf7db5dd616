//! Decode specialisation: from a causal language model's forward graph, the graph that
//! computes the logits of ONE new position from that position's token and the keys and
//! values of the earlier positions (a KV cache). `sample` runs it once per generated
//! token instead of a forward pass over the whole window.
//!
//! The input is the fused forward graph at batch 1 with one token input `[1, T]`. A
//! *time-axis analysis* walks the logits' ancestors in order and gives every node that
//! depends on the position (the tokens, `arange(T)`, and everything computed from them)
//! the axis that runs over positions. Each rule below keeps position `t` of the result a
//! function of position `t` of the operands only, except causal attention, whose keys
//! and values come from the cache; any op that mixes positions any other way (a
//! reduction or slice over time, a matmul contracting time, a non-causal or masked
//! attention, a second data input) makes the model not decodable, and `sample` falls
//! back to recomputing the window. Position-independent values that broadcast against
//! the time axis (constants, broadcasts) shrink along it; a parameter indexed by position
//! along its first axis (a learned position table added directly) becomes its row `pos`.
//!
//! The decode graph is the same computation with that axis of length 1, plus (named with
//! `@`, which no parameter name can contain):
//! - inputs `@tokens [1, 1]` (the new token), `@pos [1]` (its position, what `arange`
//!   gave), `@slot [T]` (one-hot at `@pos`) and `@keymask [T]` (0 for filled positions,
//!   −∞ after),
//! - for the `i`-th attention, inputs `@cache.k.i` / `@cache.v.i` (the operands' full
//!   `[..., T, D]` shapes, zero where not filled) and outputs `new.k.i` / `new.v.i`
//!   (this position's rows). The attention reads `cache + slot ⊗ new`, so the new
//!   position sees itself; the runtime then writes `new` into slot `pos` of the cache.
//!
//! Outputs: `logits` (`[..., 1, V]`) first, then the `new.*` rows.

use crate::graph::{DType, Graph, NodeId, Op, ParamInfo};

/// The decode graph of `g`'s output `logits`, or why the model cannot be decoded one
/// position at a time.
pub fn decode_graph(g: &Graph, logits: &str) -> Result<Graph, String> {
    let out = g.output(logits).ok_or_else(|| format!("the model has no output `{logits}`"))?;
    let live = g.ancestors(&[out]);
    let data: Vec<&(String, NodeId)> = g.inputs.iter().filter(|(_, id)| live[id.index()]).collect();
    let (name, tokens) = match data.as_slice() {
        [one] => (&one.0, one.1),
        [] => return Err(format!("the `{logits}` do not depend on any input")),
        more => {
            let names: Vec<String> = more.iter().map(|(n, _)| format!("`{n}`")).collect();
            return Err(format!("the `{logits}` depend on several inputs ({}); decoding feeds one token input", names.join(", ")));
        }
    };
    let tshape = g.shape(tokens);
    if tshape.len() != 2 || tshape[0] != 1 || tshape[1] < 2 || g.dtype(tokens) != DType::I32 {
        let per_example = tshape.get(1..).unwrap_or(&[]);
        return Err(format!(
            "decoding generates one token id at a time: the input `{name}` must be i32[B, T] (ids over T ≥ 2 positions), not {}{per_example:?} per example",
            g.dtype(tokens).name()
        ));
    }
    let t = tshape[1];
    let axes = analyse(g, &live, tokens, t)?;
    build(g, &live, &axes, tokens, t, out, logits)
}

/// The time axis of a node: `Time` for values that depend on the position, `Shrink` for
/// position-independent values that a position-dependent user lines up with its time
/// axis (constant along it, so length 1 gives the same values).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Axis {
    None,
    Time(usize),
    Shrink(usize),
}

impl Axis {
    fn time(self) -> Option<usize> {
        if let Axis::Time(a) = self { Some(a) } else { None }
    }
}

fn describe(g: &Graph, id: NodeId) -> String {
    let n = g.node(id);
    let what = crate::graph::op_text(&n.op);
    match &n.origin {
        Some(o) => format!("`{}` ({what} at {})", o.what, o.location()),
        None => format!("`{what}`"),
    }
}

fn analyse(g: &Graph, live: &[bool], tokens: NodeId, t: usize) -> Result<Vec<Axis>, String> {
    let mut axes = vec![Axis::None; g.len()];
    let mut shrink: Vec<Option<usize>> = vec![None; g.len()];
    let need = |shrink: &mut Vec<Option<usize>>, o: NodeId, a: usize| -> Result<(), String> {
        match shrink[o.index()] {
            Some(b) if b != a => Err(format!("{} lines up with positions along two axes", describe(g, o))),
            _ => {
                shrink[o.index()] = Some(a);
                Ok(())
            }
        }
    };
    for id in g.node_ids().filter(|id| live[id.index()]) {
        let ops = g.operands(id);
        let at = |i: usize| axes[ops[i].index()].time();
        let rank = g.shape(id).len();
        let mixes = |why: &str| Err(format!("{} {why}", describe(g, id)));
        let a: Option<usize> = match &g.node(id).op {
            Op::Input(_) => (id == tokens).then_some(1),
            Op::Param(_) | Op::State(_) | Op::Hyper(_) | Op::Const(_) => None,
            Op::Iota(ax) => (g.shape(id)[*ax] == t).then_some(*ax),
            Op::Unary(_) | Op::Cast(_) => at(0),
            Op::Binary(_) | Op::Select | Op::Concat(_) => {
                let timed: Vec<usize> = (0..ops.len()).filter_map(at).collect();
                match timed.first() {
                    None => None,
                    Some(&a) if timed.iter().any(|&b| b != a) => return mixes("combines positions along different axes"),
                    Some(&a) => {
                        if matches!(g.node(id).op, Op::Concat(ax) if ax == a) {
                            return mixes("concatenates along the time axis");
                        }
                        for (i, &o) in ops.iter().enumerate() {
                            if at(i).is_none() {
                                need(&mut shrink, o, a)?;
                            }
                        }
                        Some(a)
                    }
                }
            }
            Op::Reduce(_, red) => match at(0) {
                Some(a) if red.contains(&a) => return mixes("reduces over the positions"),
                Some(a) => Some(a - red.iter().filter(|&&r| r < a).count()),
                None => None,
            },
            Op::Broadcast => at(0).map(|a| a + rank - g.shape(ops[0]).len()),
            Op::Reshape => match at(0) {
                None => None,
                Some(a) => {
                    let src = g.shape(ops[0]);
                    let before: usize = src[..a].iter().product();
                    let dst = g.shape(id);
                    match (0..dst.len()).find(|&j| dst[j] == t && dst[..j].iter().product::<usize>() == before) {
                        Some(j) => Some(j),
                        None => return mixes("reshapes across the time axis"),
                    }
                }
            },
            Op::Permute(perm) => at(0).map(|a| perm.iter().position(|&p| p == a).expect("a permutation")),
            Op::Slice { axis, .. } | Op::Pad { axis, .. } => match at(0) {
                Some(a) if a == *axis => return mixes("slices or pads along the positions"),
                other => other,
            },
            Op::MatMul => match (at(0), at(1)) {
                (None, None) => None,
                (Some(a), None) if a == rank - 2 => Some(a),
                (None, Some(a)) if a == rank - 1 => Some(a),
                (Some(a), None) | (None, Some(a)) if a < rank - 2 => {
                    let free = if at(0).is_none() { ops[0] } else { ops[1] };
                    need(&mut shrink, free, a)?;
                    Some(a)
                }
                (Some(a), Some(b)) if a == b && a < rank - 2 => Some(a),
                _ => return mixes("multiplies across positions (an unfused attention?)"),
            },
            Op::Gather => match (at(0), at(1)) {
                (None, ids) => ids,
                (Some(_), _) => return mixes("looks up rows of a position-dependent table"),
            },
            Op::Attention { causal, masked, .. } => {
                let all = (0..3).all(|i| at(i) == Some(g.shape(ops[i]).len() - 2));
                match (all, *causal, *masked) {
                    (true, true, false) => Some(rank - 2),
                    (false, _, _) if (0..3).all(|i| at(i).is_none()) => None,
                    (_, false, _) => return mixes("is not causal: every position sees later ones"),
                    (_, _, true) => return mixes("has an additive mask besides the causal one"),
                    _ => return mixes("attends over an axis other than the positions"),
                }
            }
            Op::ScatterAdd { .. } | Op::AttentionBackward { .. } | Op::Assign(_) => {
                if ops.iter().enumerate().any(|(i, _)| at(i).is_some()) {
                    return mixes("is a training op");
                }
                None
            }
        };
        axes[id.index()] = match a {
            Some(a) => Axis::Time(a),
            None => Axis::None,
        };
    }
    // Position-independent values a timed user lines up with its time axis: users come
    // after their operands, so walking backwards sees every user's demand first.
    for id in (0..g.len()).rev().map(NodeId::new).filter(|id| live[id.index()]) {
        let Some(a) = shrink[id.index()] else { continue };
        if axes[id.index()] != Axis::None {
            continue;
        }
        axes[id.index()] = Axis::Shrink(a);
        let ops = g.operands(id);
        match &g.node(id).op {
            Op::Const(_) | Op::Hyper(_) => {}
            // A learned position table added directly (`x + pos`, `pos: [T, d]`): the
            // decode graph picks its row `pos`.
            Op::Param(_) if a == 0 && g.shape(id)[0] == t => {}
            Op::Iota(ax) if *ax != a => {}
            Op::Broadcast => {
                let src = g.shape(ops[0]);
                let lead = g.shape(id).len() - src.len();
                if a >= lead && src[a - lead] != 1 {
                    need(&mut shrink, ops[0], a - lead)?;
                }
            }
            Op::Unary(_) | Op::Cast(_) | Op::Binary(_) | Op::Select => {
                for &o in &ops {
                    need(&mut shrink, o, a)?;
                }
            }
            _ => return Err(format!("{} varies along the positions without depending on the tokens", describe(g, id))),
        }
    }
    Ok(axes)
}

fn build(g: &Graph, live: &[bool], axes: &[Axis], tokens: NodeId, t: usize, out: NodeId, logits: &str) -> Result<Graph, String> {
    let mut d = Graph::new();
    let mut map: Vec<Option<NodeId>> = vec![None; g.len()];
    let input = |d: &mut Graph, name: &str, shape: Vec<usize>, dtype: DType| {
        let id = d.add(Op::Input(name.into()), &[], shape, dtype);
        d.inputs.push((name.into(), id));
        id
    };
    let new_tokens = input(&mut d, "@tokens", vec![1, 1], DType::I32);
    let pos = input(&mut d, "@pos", vec![1], DType::I32);
    let slot = input(&mut d, "@slot", vec![t], DType::F32);
    let keymask = input(&mut d, "@keymask", vec![t], DType::F32);
    let slot_col = d.add(Op::Reshape, &[slot], vec![t, 1], DType::F32);
    let mut new_rows = vec![];
    for id in g.node_ids().filter(|id| live[id.index()]) {
        let n = g.node(id);
        d.current_origin = n.origin.clone();
        let mut shape = n.shape.clone();
        if let Axis::Time(a) | Axis::Shrink(a) = axes[id.index()] {
            shape[a] = 1;
        }
        let ops: Vec<NodeId> = g.operands(id).iter().map(|o| map[o.index()].expect("operands come first")).collect();
        let new = match &n.op {
            Op::Input(_) if id == tokens => new_tokens,
            Op::Iota(_) if axes[id.index()].time().is_some() => {
                let p = if n.dtype == DType::I32 { pos } else { d.add(Op::Cast(n.dtype), &[pos], vec![1], n.dtype) };
                if shape == [1] { p } else { d.add(Op::Broadcast, &[p], shape, n.dtype) }
            }
            Op::Attention { causal: true, scale, masked: false } if axes[id.index()].time().is_some() => {
                let i = new_rows.len() / 2;
                let mut full = vec![];
                for (which, k) in [("k", 1), ("v", 2)] {
                    let cache_shape = g.shape(g.operands(id)[k]).to_vec();
                    let cache = input(&mut d, &format!("@cache.{which}.{i}"), cache_shape.clone(), DType::F32);
                    let row = d.add(Op::Broadcast, &[ops[k]], cache_shape.clone(), DType::F32);
                    let at = d.add(Op::Broadcast, &[slot_col], cache_shape.clone(), DType::F32);
                    let placed = d.add(Op::Binary(crate::graph::BinaryOp::Mul), &[at, row], cache_shape.clone(), DType::F32);
                    full.push(d.add(Op::Binary(crate::graph::BinaryOp::Add), &[cache, placed], cache_shape, DType::F32));
                    new_rows.push((format!("new.{which}.{i}"), ops[k]));
                }
                let op = Op::Attention { causal: false, scale: *scale, masked: true };
                d.add(op, &[ops[0], full[0], full[1], keymask], shape, DType::F32)
            }
            op => {
                let full = if matches!(op, Op::Param(_)) { n.shape.clone() } else { shape.clone() };
                let new = d.add(op.clone(), &ops, full.clone(), n.dtype);
                if let Op::Param(name) = op {
                    let init =
                        g.params.iter().find(|p| p.node == id).map(|p| p.init.clone()).ok_or("a parameter without an initialiser")?;
                    d.params.push(ParamInfo { name: name.clone(), node: new, init });
                }
                if full == shape {
                    new
                } else {
                    // A position table (`Shrink(0)`): row `pos` of it.
                    let rest: usize = full[1..].iter().product();
                    let table = d.add(Op::Reshape, &[new], vec![t, rest], n.dtype);
                    let row = d.add(Op::Gather, &[table, pos], vec![1, rest], n.dtype);
                    d.add(Op::Reshape, &[row], shape, n.dtype)
                }
            }
        };
        map[id.index()] = Some(new);
    }
    d.current_origin = None;
    d.set_output(logits, map[out.index()].expect("the logits are live"));
    for (name, id) in new_rows {
        d.set_output(&name, id);
    }
    let d = crate::passes::cse::eliminate_common_subexpressions(&d);
    Ok(crate::passes::dce::eliminate_dead_code(&d))
}
