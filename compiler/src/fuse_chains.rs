//! Chains of elementwise kernels become one kernel with several outputs.
//!
//! Lowering inlines an elementwise value into its consumer only when it has one
//! consumer; a value with several (a bias-added pre-activation that GELU reads now and
//! its gradient reads later, AdamW's new moments that the parameter update reads and
//! the optimiser state keeps) gets its own kernel, and the next kernel reads it back
//! from memory. This kernel-level pass, run after lowering and before `fuse_sums`,
//! moves such a producer `A` into a consumer `B` that reads it at the same points: `B`
//! computes `A`'s value inline (instead of loading it) and stores it as a side store
//! ([`bm_runtime::kir::SideStore`]), so the value is written once and never read back
//! within the chain. AdamW's three kernels per parameter become one; so do a bias add
//! and the GELU after it, and LayerNorm's centring and scaling.
//!
//! `A` (elementwise, storing f32 without accumulation) moves into `B` (the same) when:
//! - `B` reads a buffer `A` writes, over the same points (`points.rs`), and every read of
//!   a buffer `A` writes is at the point being written;
//! - `B`'s stores keep the layout of `B`'s output along its unit-stride axis (the vector
//!   lanes store whole vectors);
//! - `B` writes nothing `A` reads;
//! - every entry runs both or neither, and between them nothing reads what `A` writes
//!   or writes what `A` reads or writes (`A` now runs at `B`'s place).

use crate::points::{PointMap, Touched, canonical, refinement, split_axes};
use bm_runtime::kir::{Access, BufId, BufKind, DType, Kernel, LoopKernel, Program, ScalarExpr, SideStore};
use std::collections::{BTreeSet, HashMap};

/// Merges every eligible producer into its consumer; returns how many merged.
pub fn fuse_chains(p: &mut Program) -> usize {
    let mut removed = vec![false; p.kernels.len()];
    let mut touched = Touched::of(p);
    // Kernels keep their places until the end of the pass (merged ones are only marked).
    let mut places = Places::of(p, &touched);
    let mut merged = 0;
    for b in 0..p.kernels.len() {
        if !elementwise(p, &p.kernels[b]) {
            continue;
        }
        // Take producers one at a time, nearest first, until none fits.
        'again: loop {
            let mut producers: Vec<usize> =
                touched.reads[b].iter().flat_map(|x| touched.writers(*x).iter().copied()).filter(|&a| a < b && !removed[a]).collect();
            producers.sort_unstable_by(|x, y| y.cmp(x));
            producers.dedup();
            for a in producers {
                if !elementwise(p, &p.kernels[a]) {
                    continue;
                }
                // The cheap test first: most producers cannot move.
                if !may_move(p, &touched, &places, a, b) {
                    continue;
                }
                let (Kernel::Loop(ak), Kernel::Loop(bk)) = (&p.kernels[a], &p.kernels[b]) else { continue };
                let Some(m) = merge(ak, bk) else { continue };
                p.kernels[b] = Kernel::Loop(m);
                removed[a] = true;
                let before = (touched.reads[b].clone(), touched.writes[b].clone());
                touched.update(p, b);
                places.retouch(b, before, (&touched.reads[b], &touched.writes[b]));
                merged += 1;
                continue 'again;
            }
            break;
        }
    }
    let gone: Vec<usize> = (0..p.kernels.len()).filter(|&k| removed[k]).collect();
    p.remove_kernels(&gone);
    drop_dead_side_stores(p);
    merged
}

/// Removes side stores into temporaries nothing reads (every reader computed the value
/// inline) and that no entry returns.
fn drop_dead_side_stores(p: &mut Program) {
    let results: Vec<BufId> = p.entries.iter().flat_map(|e| e.results.iter().map(|r| r.1)).collect();
    let read: std::collections::HashSet<BufId> = p.kernels.iter().flat_map(|k| k.reads()).collect();
    let dead = |b: BufId| p.buffers[b].kind == BufKind::Temp && !results.contains(&b) && !read.contains(&b);
    let dead: Vec<BufId> = (0..p.buffers.len()).filter(|&b| dead(b)).collect();
    for k in p.kernels.iter_mut() {
        if let Kernel::Loop(l) = k {
            l.side.retain(|s| !dead.contains(&s.into.buf));
        }
    }
}

/// An elementwise loop storing f32 without accumulation or fused sums, over a
/// non-empty space.
fn elementwise(p: &Program, k: &Kernel) -> bool {
    matches!(k, Kernel::Loop(l) if l.reduce.is_none() && !l.accumulate && l.sums.is_empty()
        && !l.shape.contains(&0) && p.buffers[l.out.buf].dtype == DType::F32)
}

/// `A`'s stores with their values: the output first, then the side stores.
fn stores(k: &LoopKernel) -> Vec<(&Access, &ScalarExpr)> {
    std::iter::once((&k.out, &k.body)).chain(k.side.iter().map(|s| (&s.into, &s.value))).collect()
}

/// `B` with `A` inside it, when `B` reads what `A` writes at the same points (after
/// splitting axes where one kernel walks as two axes what the other walks as one).
fn merge(a: &LoopKernel, b: &LoopKernel) -> Option<LoopKernel> {
    let a_stores = stores(a);
    let mut b_loads = vec![];
    b.body.for_each_load(&mut |l| b_loads.push(l));
    b.side.iter().for_each(|s| s.value.for_each_load(&mut |l| b_loads.push(l)));
    // The point map: from some store of A to B's read of the same elements.
    let pairs = || a_stores.iter().flat_map(|(st, _)| b_loads.iter().map(move |l| (*st, *l)));
    if let Some(map) = pairs().find_map(|(st, l)| PointMap::between(&a.shape, st, &b.shape, l)) {
        return merge_with(b, &a_stores, &map);
    }
    let (sa, sb) = pairs().find_map(|(st, l)| refinement(&a.shape, st, &b.shape, l))?;
    let (a, b) = (split_axes(a, &sa), split_axes(b, &sb));
    let a_stores = stores(&a);
    let mut b_loads = vec![];
    b.body.for_each_load(&mut |l| b_loads.push(l));
    b.side.iter().for_each(|s| s.value.for_each_load(&mut |l| b_loads.push(l)));
    let map = a_stores.iter().find_map(|(st, _)| b_loads.iter().find_map(|l| PointMap::between(&a.shape, st, &b.shape, l)))?;
    merge_with(&b, &a_stores, &map)
}

/// `B` with `A` inside it under the point map `map` (from `A`'s space to `B`'s).
fn merge_with(b: &LoopKernel, a_stores: &[(&Access, &ScalarExpr)], map: &PointMap) -> Option<LoopKernel> {
    // A's stores and values in B's space.
    let mapped: Vec<(Access, ScalarExpr)> = a_stores.iter().map(|(st, v)| (map.access(st), map.expr(v, &|x| x))).collect();
    // B writes nothing A reads; A and B write different buffers.
    let mut ok = true;
    for (_, v) in &mapped {
        v.for_each_load(&mut |l| ok &= !b.writes_buf(l.buf));
    }
    ok &= mapped.iter().all(|(st, _)| !b.writes_buf(st.buf));
    // B's unit-stride axis (where its vector lanes run) is A's stores' as well.
    if let Some(v) = (0..b.shape.len()).rev().find(|&d| b.out.strides[d] == 1 && b.shape[d] > 1) {
        ok &= mapped.iter().all(|(st, _)| st.strides[v] == 1);
    }
    if !ok {
        return None;
    }
    // Every read in B of something A writes must be at the point it is written; it
    // becomes A's value there.
    let inline = |e: &ScalarExpr| -> Option<ScalarExpr> { substitute(e, &b.shape, &mapped) };
    let body = inline(&b.body)?;
    let mut side: Vec<SideStore> = mapped.iter().map(|(st, v)| SideStore { value: v.clone(), into: st.clone() }).collect();
    for s in &b.side {
        side.push(SideStore { value: inline(&s.value)?, into: s.into.clone() });
    }
    // Reads of a store's own elements (in place) name exactly its access.
    let mut all: Vec<&Access> = vec![&b.out];
    all.extend(side.iter().map(|s| &s.into));
    let canon = |e: &ScalarExpr| e.map_loads(&|l| canonical(&b.shape, l.clone(), &all), &|n| n);
    let side: Vec<SideStore> = side.iter().map(|s| SideStore { value: canon(&s.value), into: s.into.clone() }).collect();
    // Inlined values repeat in the text (code generation shares them); keep kernels
    // small enough to read.
    let size = nodes(&body) + side.iter().map(|s| nodes(&s.value)).sum::<usize>();
    (size <= MAX_NODES).then(|| LoopKernel { body: canon(&body), side, ..b.clone() })
}

/// The largest merged kernel, in expression nodes over its body and side values.
const MAX_NODES: usize = 160;

fn nodes(e: &ScalarExpr) -> usize {
    1 + match e {
        ScalarExpr::Load(_) | ScalarExpr::Const(_) | ScalarExpr::Index(_) => 0,
        ScalarExpr::Unary(_, a) => nodes(a),
        ScalarExpr::Binary(_, a, b) => nodes(a) + nodes(b),
        ScalarExpr::Select(c, a, b) => nodes(c) + nodes(a) + nodes(b),
    }
}

/// `e` with every load of a buffer in `stores` replaced by the stored value, when the
/// load reads the stored point; `None` when it reads another.
fn substitute(e: &ScalarExpr, shape: &[usize], stores: &[(Access, ScalarExpr)]) -> Option<ScalarExpr> {
    let go = |x: &ScalarExpr| substitute(x, shape, stores).map(Box::new);
    Some(match e {
        ScalarExpr::Load(l) => match stores.iter().find(|(st, _)| st.buf == l.buf) {
            Some((st, v)) if crate::points::same_point(shape, l, st) => v.clone(),
            Some(_) => return None,
            None => e.clone(),
        },
        ScalarExpr::Const(_) | ScalarExpr::Index(_) => e.clone(),
        ScalarExpr::Unary(op, x) => ScalarExpr::Unary(*op, go(x)?),
        ScalarExpr::Binary(op, x, y) => ScalarExpr::Binary(*op, go(x)?, go(y)?),
        ScalarExpr::Select(c, x, y) => ScalarExpr::Select(go(c)?, go(x)?, go(y)?),
    })
}

/// Where each kernel runs in each entry (`at[e][k]`), and per entry and buffer the
/// places of the kernels reading and writing it, so that "does anything between these
/// two places touch this buffer" is a range query instead of a walk (the walk made the
/// pass quadratic in the kernel count). Merged-away kernels stay at their places with
/// what they touched, as in the kernel-by-kernel definition this replaces.
struct Places {
    at: Vec<Vec<Option<usize>>>,
    readers: Vec<HashMap<BufId, BTreeSet<usize>>>,
    writers: Vec<HashMap<BufId, BTreeSet<usize>>>,
}

impl Places {
    fn of(p: &Program, touched: &Touched) -> Places {
        let mut places = Places { at: vec![], readers: vec![], writers: vec![] };
        for e in &p.entries {
            let mut at = vec![None; p.kernels.len()];
            let (mut readers, mut writers): (HashMap<BufId, BTreeSet<usize>>, HashMap<BufId, BTreeSet<usize>>) = Default::default();
            for (i, &k) in e.kernels.iter().enumerate() {
                at[k] = Some(i);
                touched.reads[k].iter().for_each(|&x| _ = readers.entry(x).or_default().insert(i));
                touched.writes[k].iter().for_each(|&x| _ = writers.entry(x).or_default().insert(i));
            }
            places.at.push(at);
            places.readers.push(readers);
            places.writers.push(writers);
        }
        places
    }

    /// Kernel `k` now reads and writes `after` instead of `before`.
    fn retouch(&mut self, k: usize, before: (Vec<BufId>, Vec<BufId>), after: (&Vec<BufId>, &Vec<BufId>)) {
        for e in 0..self.at.len() {
            let Some(i) = self.at[e][k] else { continue };
            for (index, old, new) in [(&mut self.readers[e], &before.0, after.0), (&mut self.writers[e], &before.1, after.1)] {
                old.iter().filter(|x| !new.contains(x)).for_each(|x| _ = index.get_mut(x).map(|s| s.remove(&i)));
                new.iter().for_each(|&x| _ = index.entry(x).or_default().insert(i));
            }
        }
    }

    /// Whether, in entry `e`, a kernel strictly between places `lo` and `hi` reads
    /// (`index` = readers) or writes (writers) `x`.
    fn between(index: &HashMap<BufId, BTreeSet<usize>>, x: BufId, lo: usize, hi: usize) -> bool {
        index.get(&x).is_some_and(|s| s.range(lo + 1..hi).next().is_some())
    }
}

/// Whether `A` may run at `B`'s place in every entry.
fn may_move(p: &Program, touched: &Touched, places: &Places, a: usize, b: usize) -> bool {
    let (aw, ar) = (&touched.writes[a], &touched.reads[a]);
    (0..p.entries.len()).all(|e| match (places.at[e][a], places.at[e][b]) {
        (None, None) => true,
        (Some(pa), Some(pb)) if pa < pb => {
            let (readers, writers) = (&places.readers[e], &places.writers[e]);
            aw.iter().all(|&x| !Places::between(readers, x, pa, pb) && !Places::between(writers, x, pa, pb))
                && ar.iter().all(|&x| !Places::between(writers, x, pa, pb))
        }
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bm_runtime::kir::{BinaryOp, BufKind, Buffer, Entry, UnaryOp};

    fn buf(name: &str) -> Buffer {
        Buffer { name: name.into(), dtype: DType::F32, shape: vec![8, 4], kind: BufKind::Temp }
    }
    fn at(buf: BufId) -> Access {
        Access { buf, offset: 0, strides: vec![4, 1] }
    }
    fn load(buf: BufId) -> ScalarExpr {
        ScalarExpr::Load(at(buf))
    }
    fn lp(body: ScalarExpr, out: BufId) -> Kernel {
        Kernel::Loop(LoopKernel::elementwise(vec![8, 4], body, at(out)))
    }
    fn program(kernels: Vec<Kernel>, entries: &[&[usize]]) -> Program {
        Program {
            buffers: (0..6).map(|i| buf(&format!("b{i}"))).collect(),
            kernels,
            entries: entries
                .iter()
                .enumerate()
                .map(|(i, ks)| Entry { name: format!("e{i}"), kernels: ks.to_vec(), results: vec![] })
                .collect(),
            params: vec![],
        }
    }
    /// A row sum of `buf` into `out` (not elementwise: never merged).
    fn rowsum(buf: BufId, out: BufId) -> Kernel {
        let Kernel::Loop(mut k) = lp(load(buf), out) else { unreachable!() };
        k.reduce = Some(bm_runtime::kir::ReduceOp::Sum);
        k.reduced_dims = 1;
        k.out.strides = vec![1, 0];
        Kernel::Loop(k)
    }
    fn add(x: ScalarExpr, y: ScalarExpr) -> ScalarExpr {
        ScalarExpr::Binary(BinaryOp::Add, Box::new(x), Box::new(y))
    }

    #[test]
    fn a_bias_add_and_its_activation_become_one_kernel_with_two_outputs() {
        // b2 = b0 + b1 (kept for later); b3 = tanh(b2).
        let ks = vec![lp(add(load(0), load(1)), 2), lp(ScalarExpr::Unary(UnaryOp::Tanh, Box::new(load(2))), 3), rowsum(2, 4)];
        let mut p = program(ks, &[&[0, 1, 2]]);
        assert_eq!(fuse_chains(&mut p), 1);
        assert_eq!(p.kernels.len(), 2);
        let Kernel::Loop(k) = &p.kernels[0] else { panic!() };
        assert_eq!(k.body, ScalarExpr::Unary(UnaryOp::Tanh, Box::new(add(load(0), load(1)))));
        assert_eq!(k.side, vec![SideStore { value: add(load(0), load(1)), into: at(2) }]);
        assert_eq!(p.entries[0].kernels, vec![0, 1]);
    }

    #[test]
    fn a_head_permute_and_the_copy_after_it_become_one_copy() {
        // b2[b, t, h, d] = b0[b, h, t, d] (2 × 3 × 2 × 4); b3[b, t, 8 + j] = b2[b, t, j] (j = h·4 + d).
        let mut p = program(vec![], &[&[0, 1]]);
        p.buffers = vec![buf("x"), buf("y"), buf("perm"), buf("cat")];
        for (b, n) in [(0, 48), (2, 48), (3, 96)] {
            p.buffers[b].shape = vec![n];
        }
        let perm = LoopKernel {
            shape: vec![2, 3, 2, 4],
            reduce: None,
            reduced_dims: 0,
            body: ScalarExpr::Load(Access { buf: 0, offset: 0, strides: vec![24, 4, 12, 1] }),
            out: Access { buf: 2, offset: 0, strides: vec![24, 8, 4, 1] },
            accumulate: false,
            side: vec![],
            sums: vec![],
        };
        let cat = LoopKernel {
            shape: vec![2, 3, 8],
            body: ScalarExpr::Load(Access { buf: 2, offset: 0, strides: vec![24, 8, 1] }),
            out: Access { buf: 3, offset: 8, strides: vec![48, 16, 1] },
            ..perm.clone()
        };
        p.kernels = vec![Kernel::Loop(perm), Kernel::Loop(cat)];
        assert_eq!(fuse_chains(&mut p), 1);
        let Kernel::Loop(k) = &p.kernels[0] else { panic!() };
        assert_eq!(k.shape, vec![2, 3, 2, 4]);
        assert_eq!(k.body, ScalarExpr::Load(Access { buf: 0, offset: 0, strides: vec![24, 4, 12, 1] }));
        assert_eq!(k.out, Access { buf: 3, offset: 8, strides: vec![48, 16, 4, 1] });
        assert!(k.side.is_empty(), "the permuted copy is read by nothing else");
    }

    #[test]
    fn a_value_no_one_else_reads_is_not_stored() {
        // b2 = b0 + b1 is read only by b3 = tanh(b2): once inline, b2 is not stored.
        let ks = vec![lp(add(load(0), load(1)), 2), lp(ScalarExpr::Unary(UnaryOp::Tanh, Box::new(load(2))), 3)];
        let mut p = program(ks, &[&[0, 1]]);
        assert_eq!(fuse_chains(&mut p), 1);
        let Kernel::Loop(k) = &p.kernels[0] else { panic!() };
        assert!(k.side.is_empty());
    }

    #[test]
    fn adam_style_updates_chain_into_the_last() {
        // m' = m + g (b2 from b1, b0); v' = v + g·g (b4 from b3, b0); p' = m'/v' (b5).
        let sq = ScalarExpr::Binary(BinaryOp::Mul, Box::new(load(0)), Box::new(load(0)));
        let ks = vec![
            lp(add(load(1), load(0)), 2),
            lp(add(load(3), sq.clone()), 4),
            lp(ScalarExpr::Binary(BinaryOp::Div, Box::new(load(2)), Box::new(load(4))), 5),
        ];
        let mut p = program(ks, &[&[0, 1, 2]]);
        // The new moments are kept (the optimiser state's copies read them).
        p.entries[0].results = vec![("m".into(), 2), ("v".into(), 4)];
        assert_eq!(fuse_chains(&mut p), 2);
        let Kernel::Loop(k) = &p.kernels[0] else { panic!() };
        assert_eq!(k.side.len(), 2);
        assert_eq!(k.body, ScalarExpr::Binary(BinaryOp::Div, Box::new(add(load(1), load(0))), Box::new(add(load(3), sq))));
    }

    #[test]
    fn stays_apart_when_read_elsewhere_in_between_or_at_another_point() {
        // A kernel between them reads A's output: A cannot move past it.
        let ks = vec![lp(add(load(0), load(1)), 2), rowsum(2, 4), lp(ScalarExpr::Unary(UnaryOp::Tanh, Box::new(load(2))), 3)];
        let mut p = program(ks, &[&[0, 1, 2]]);
        assert_eq!(fuse_chains(&mut p), 0);
        // B reads A's output shifted by one element: not the same point.
        let shifted = ScalarExpr::Load(Access { buf: 2, offset: 1, strides: vec![4, 1] });
        let ks = vec![lp(add(load(0), load(1)), 2), lp(add(shifted, load(2)), 3)];
        let mut p = program(ks, &[&[0, 1]]);
        assert_eq!(fuse_chains(&mut p), 0);
        // An entry running only A.
        let ks = vec![lp(add(load(0), load(1)), 2), lp(load(2), 3)];
        let mut p = program(ks, &[&[0, 1], &[0]]);
        assert_eq!(fuse_chains(&mut p), 0);
    }
}
