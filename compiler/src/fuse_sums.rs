//! Fused sums: a `Sum` reduction kernel moves into an elementwise kernel that walks the
//! same points, so the data is read once, not twice.
//!
//! Kernel-level pass over the lowered program, run before in-place updates and memory
//! planning. The typical case is a bias gradient: `db = Σ_rows dy` right after the
//! kernel that writes `dy` (GELU's backward, a residual's gradient); the kernel writing
//! `dy` adds each value into per-chunk column sums as it stores it
//! ([`bm_runtime::kir::FusedSum`]) and the separate pass over `dy` disappears. A sibling
//! works as well: LayerNorm's `Σ_rows dy·x̂` rides along with the kernel computing its
//! input gradient from the same `dy` and `x̂`.
//!
//! A reduction `R` (sum over some axes, writing `W`) moves into an elementwise host `H`
//! when:
//! - it keeps `H`'s innermost axis (column sums: row sums stay separate, where they
//!   reduce in vector accumulators);
//! - some load of `R` reads a buffer `H` also reads or writes, over the same points: the
//!   two accesses are the same up to a permutation of the non-trivial axes (same
//!   extents and strides), which maps `R`'s iteration space onto `H`'s;
//! - a load of `H`'s output in `R` reads exactly the point `H` stores (then it reads the
//!   value just stored), and `H` neither reads nor writes `W`;
//! - every entry runs both or neither, and between them nothing reads or writes `W` or
//!   writes what `R` reads (`R` now runs at `H`'s place); if `H` comes after `R`, `R`
//!   reads nothing `H` writes.

use crate::points::{PointMap, Touched, canonical, refinement, split_axes};
use bm_runtime::kir::{Access, BufId, BufKind, DType, FusedSum, Kernel, LoopKernel, Program, ReduceOp, ScalarExpr};
use std::borrow::Cow;

/// Moves every eligible reduction into a host kernel; returns how many moved.
pub fn fuse_sums(p: &mut Program) -> usize {
    let mut removed = vec![false; p.kernels.len()];
    let mut touched = Touched::of(p);
    for r in 0..p.kernels.len() {
        let Kernel::Loop(rk) = &p.kernels[r] else { continue };
        if !is_sum(p, rk) {
            continue;
        }
        let rk = rk.clone();
        let moves = match host(p, &touched, &removed, r, &rk, &[]) {
            Some(h) => vec![h],
            None => by_pieces(p, &touched, &removed, r, &rk).unwrap_or_default(),
        };
        for (h, sum) in &moves {
            if let Kernel::Loop(hk) = &mut p.kernels[*h] {
                hk.sums.push(sum.clone());
            }
            touched.update(p, *h);
        }
        removed[r] = !moves.is_empty();
    }
    let gone: Vec<usize> = (0..p.kernels.len()).filter(|&k| removed[k]).collect();
    p.remove_kernels(&gone);
    gone.len()
}

/// A host for reduction `rk` (kernel `r`, or a piece of it): a kernel touching what it
/// reads, the producers first, then the nearest. Kernels in `disjoint` may write what
/// `rk` reads between the two (elements it does not read).
fn host(p: &Program, touched: &Touched, removed: &[bool], r: usize, rk: &LoopKernel, disjoint: &[usize]) -> Option<(usize, FusedSum)> {
    let reads = &touched.reads[r];
    let mut hosts: Vec<usize> = reads
        .iter()
        .flat_map(|&x| touched.writers(x).iter().chain(touched.readers(x)).copied())
        .filter(|&h| h != r && !removed[h] && can_host(p, &p.kernels[h]))
        .collect();
    hosts.sort_unstable();
    hosts.dedup();
    hosts.sort_by_key(|&h| (!reads.contains(&touched.writes[h][0]), h.abs_diff(r)));
    hosts.into_iter().find_map(|h| {
        let Kernel::Loop(hk) = &p.kernels[h] else { return None };
        let sum = onto(rk, hk)?;
        // A host after R must not change what R reads (its stores come first).
        let ok = may_move(p, touched, r, h, rk.out.buf, disjoint) && !(h > r && touched.writes[h].iter().any(|b| reads.contains(b)));
        ok.then_some((h, sum))
    })
}

/// A column sum over a buffer that several kernels write a block of columns each (the
/// pieces of a `Concat`: the qkv gradient), as one sum per piece, each hosted by the
/// kernel writing that piece; `None` unless every piece finds its host.
fn by_pieces(p: &Program, touched: &Touched, removed: &[bool], r: usize, rk: &LoopKernel) -> Option<Vec<(usize, FusedSum)>> {
    let ScalarExpr::Load(l) = &rk.body else { return None };
    let keep = rk.shape.len() - rk.reduced_dims;
    // Split along the kept axis the load walks contiguously, where the writers start.
    let k = (0..keep).filter(|&d| rk.shape[d] > 1).min_by_key(|&d| l.strides[d]).filter(|&d| l.strides[d] > 0)?;
    let step = l.strides[k];
    let writers = touched.writers(l.buf);
    let mut starts: Vec<usize> = writers
        .iter()
        .filter_map(|&w| match &p.kernels[w] {
            Kernel::Loop(wk) => wk.out.offset.checked_sub(l.offset).filter(|o| o % step == 0 && o / step < rk.shape[k]).map(|o| o / step),
            _ => None,
        })
        .collect();
    starts.sort_unstable();
    starts.dedup();
    if starts.len() < 2 || starts[0] != 0 {
        return None;
    }
    let ends = starts.iter().skip(1).copied().chain([rk.shape[k]]);
    let pieces: Vec<LoopKernel> = starts.iter().zip(ends).map(|(&s, e)| piece(rk, k, s, e)).collect();
    // The writers may write between a piece's host and R: they must turn out to be the
    // pieces' hosts, each storing exactly its piece (so not what another piece reads).
    let moves = pieces.iter().map(|q| host(p, touched, removed, r, q, writers)).collect::<Option<Vec<_>>>()?;
    let stores_exactly = |h: usize, q: &LoopKernel| match &p.kernels[h] {
        Kernel::Loop(hk) => hk.out.buf == l.buf && hk.side.iter().all(|s| s.into.buf != l.buf) && walks_store(q, hk),
        _ => false,
    };
    let mut used: Vec<usize> = moves.iter().map(|m| m.0).collect();
    used.sort_unstable();
    used.dedup();
    let exact = moves.iter().zip(&pieces).all(|((h, _), q)| stores_exactly(*h, q));
    (used.len() == moves.len() && exact && writers.iter().all(|w| used.contains(w))).then_some(moves)
}

/// Whether the load that is `q`'s body walks exactly the elements `h` stores.
fn walks_store(q: &LoopKernel, h: &LoopKernel) -> bool {
    matches!(q.body, ScalarExpr::Load(_)) && paired(q, 0, &h.shape, &h.out).is_some()
}

/// Reduction `rk` over indices `s..e` of its kept axis `k`.
fn piece(rk: &LoopKernel, k: usize, s: usize, e: usize) -> LoopKernel {
    let shift = |a: &Access| Access { offset: a.offset + s * a.strides[k], ..a.clone() };
    let mut shape = rk.shape.clone();
    shape[k] = e - s;
    LoopKernel { shape, body: rk.body.map_loads(&shift, &|i| i), out: shift(&rk.out), ..rk.clone() }
}

/// A plain `Sum` reduction into an f32 temporary over a non-empty iteration space.
fn is_sum(p: &Program, k: &LoopKernel) -> bool {
    k.reduce == Some(ReduceOp::Sum)
        && k.reduced_dims > 0
        && k.sums.is_empty()
        && !k.shape.contains(&0)
        && p.buffers[k.out.buf].dtype == DType::F32
        && p.buffers[k.out.buf].kind == BufKind::Temp
}

/// An elementwise loop storing f32 without accumulation, over a non-empty space.
fn can_host(p: &Program, k: &Kernel) -> bool {
    matches!(k, Kernel::Loop(l) if l.reduce.is_none() && !l.accumulate && !l.shape.contains(&0) && p.buffers[l.out.buf].dtype == DType::F32)
}

/// `R` as a sum inside `H`, when some load of `R` and some access of `H` walk the same
/// elements over the same points.
fn onto(r: &LoopKernel, h: &LoopKernel) -> Option<FusedSum> {
    let mut h_accesses = vec![&h.out];
    h_accesses.extend(h.side.iter().map(|s| &s.into));
    h.body.for_each_load(&mut |a| h_accesses.push(a));
    for li in 0..loads(r).len() {
        for a in &h_accesses {
            if let Some((r, map)) = paired(r, li, &h.shape, a)
                && let Some(sum) = remap(&r, h, &map)
            {
                return Some(sum);
            }
        }
    }
    None
}

fn loads(k: &LoopKernel) -> Vec<Access> {
    let mut v = vec![];
    k.body.for_each_load(&mut |a| v.push(a.clone()));
    v
}

/// `R` and the map under which its load number `li` and access `a` of a kernel over
/// `h_shape` walk the same elements; `R` over finer axes when the other kernel walks as
/// several axes what `R` walks as one (a `[B, T, H, D]` copy and a sum over
/// `[H·D, B, T]`) and needs no split itself. `None` if they walk different elements.
fn paired<'r>(r: &'r LoopKernel, li: usize, h_shape: &[usize], a: &Access) -> Option<(Cow<'r, LoopKernel>, PointMap)> {
    let l = &loads(r)[li];
    if let Some(map) = PointMap::between(&r.shape, l, h_shape, a) {
        return Some((Cow::Borrowed(r), map));
    }
    let (rs, hs) = refinement(&r.shape, l, h_shape, a)?;
    if hs.iter().any(|p| p.len() > 1) {
        return None;
    }
    let fine = split_axes(r, &rs);
    let map = PointMap::between(&fine.shape, &loads(&fine)[li], h_shape, a)?;
    Some((Cow::Owned(fine), map))
}

/// `R`'s body and output in `H`'s iteration space.
fn remap(r: &LoopKernel, h: &LoopKernel, map: &PointMap) -> Option<FusedSum> {
    let rank = h.shape.len();
    // A read of one of H's stores at the point H stores is that store's access itself.
    let mut stores = vec![&h.out];
    stores.extend(h.side.iter().map(|s| &s.into));
    let value = map.expr(&r.body, &|a| canonical(&h.shape, a, &stores));
    let into = map.access(&r.out);
    // Only sums that keep H's innermost axis: there the vector lanes add into distinct
    // elements. Summing along it would add lane by lane through memory, slower than the
    // separate row reduction's vector accumulators.
    let inner = (0..rank).rev().find(|&j| h.shape[j] > 1);
    let mut ok = !h.writes_buf(into.buf) && inner.is_none_or(|j| into.strides[j] != 0);
    value.for_each_load(&mut |a| {
        let store = stores.iter().find(|s| s.buf == a.buf);
        ok &= a.buf != into.buf && store.is_none_or(|s| *s == a) && h.sums.iter().all(|s| s.into.buf != a.buf)
    });
    h.body.for_each_load(&mut |a| ok &= a.buf != into.buf);
    h.side.iter().for_each(|s| s.value.for_each_load(&mut |a| ok &= a.buf != into.buf));
    ok.then_some(FusedSum { value, into, accumulate: r.accumulate })
}

/// Whether `R` (writing `w`) may run at `H`'s place in every entry.
fn may_move(p: &Program, touched: &Touched, r: usize, h: usize, w: BufId, disjoint: &[usize]) -> bool {
    if touched.reads[h].contains(&w) {
        return false;
    }
    let reads = &touched.reads[r];
    p.entries.iter().all(|e| {
        let pr = e.kernels.iter().position(|&k| k == r);
        let ph = e.kernels.iter().position(|&k| k == h);
        match (pr, ph) {
            (None, None) => true,
            (Some(pr), Some(ph)) => e.kernels[pr.min(ph) + 1..pr.max(ph)].iter().all(|&k| {
                let (kw, kr) = (&touched.writes[k], &touched.reads[k]);
                !kw.contains(&w) && !kr.contains(&w) && (disjoint.contains(&k) || !kw.iter().any(|b| reads.contains(b)))
            }),
            _ => false,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bm_runtime::kir::{Access, BinaryOp, Buffer, Entry, ScalarExpr, UnaryOp};

    fn buf(name: &str, shape: &[usize]) -> Buffer {
        Buffer { name: name.into(), dtype: DType::F32, shape: shape.to_vec(), kind: BufKind::Temp }
    }
    fn at(buf: BufId, strides: &[usize]) -> Access {
        Access { buf, offset: 0, strides: strides.to_vec() }
    }
    fn load(buf: BufId, strides: &[usize]) -> ScalarExpr {
        ScalarExpr::Load(at(buf, strides))
    }
    fn lp(shape: &[usize], reduce: usize, body: ScalarExpr, out: Access) -> Kernel {
        let k = LoopKernel::elementwise(shape.to_vec(), body, out);
        Kernel::Loop(LoopKernel { reduce: (reduce > 0).then_some(ReduceOp::Sum), reduced_dims: reduce, ..k })
    }
    fn program(kernels: Vec<Kernel>, entries: &[&[usize]]) -> Program {
        Program {
            buffers: vec![buf("x", &[8, 4]), buf("dy", &[8, 4]), buf("db", &[4]), buf("other", &[8, 4])],
            kernels,
            entries: entries
                .iter()
                .enumerate()
                .map(|(i, ks)| Entry { name: format!("e{i}"), kernels: ks.to_vec(), results: vec![] })
                .collect(),
            params: vec![],
        }
    }
    /// dy = tanh(x); db = Σ_rows dy (the reduction iterates columns outermost).
    fn bias_grad() -> Vec<Kernel> {
        vec![
            lp(&[8, 4], 0, ScalarExpr::Unary(UnaryOp::Tanh, Box::new(load(0, &[4, 1]))), at(1, &[4, 1])),
            lp(&[4, 8], 1, load(1, &[1, 4]), at(2, &[1, 0])),
        ]
    }

    #[test]
    fn a_bias_gradient_rides_along_with_its_producer() {
        let mut p = program(bias_grad(), &[&[0, 1]]);
        assert_eq!(fuse_sums(&mut p), 1);
        assert_eq!(p.kernels.len(), 1);
        assert_eq!(p.entries[0].kernels, vec![0]);
        let Kernel::Loop(k) = &p.kernels[0] else { panic!() };
        assert_eq!(k.sums, vec![FusedSum { value: ScalarExpr::Load(at(1, &[4, 1])), into: at(2, &[0, 1]), accumulate: false }]);
    }

    #[test]
    fn a_sibling_reading_the_same_points_hosts_a_product_sum() {
        // other = dy * 2 (elementwise); dg = Σ_rows dy·x rides along with it.
        let ks = vec![
            lp(&[8, 4], 0, ScalarExpr::Binary(BinaryOp::Mul, Box::new(load(1, &[4, 1])), Box::new(ScalarExpr::Const(2.0))), at(3, &[4, 1])),
            lp(&[4, 8], 1, ScalarExpr::Binary(BinaryOp::Mul, Box::new(load(1, &[1, 4])), Box::new(load(0, &[1, 4]))), at(2, &[1, 0])),
        ];
        let mut p = program(ks, &[&[0, 1]]);
        assert_eq!(fuse_sums(&mut p), 1);
        let Kernel::Loop(k) = &p.kernels[0] else { panic!() };
        assert_eq!(k.sums[0].into, at(2, &[0, 1]));
        assert_eq!(k.sums[0].value, ScalarExpr::Binary(BinaryOp::Mul, Box::new(load(1, &[4, 1])), Box::new(load(0, &[4, 1]))));
    }

    #[test]
    fn stays_apart_when_an_entry_runs_only_one_or_something_between_interferes() {
        let mut p = program(bias_grad(), &[&[0, 1], &[0]]);
        assert_eq!(fuse_sums(&mut p), 0);
        // A kernel between them overwrites db's input's source: still fine (it writes
        // `other`); one reading db in between is not.
        let mut ks = bias_grad();
        ks.insert(1, lp(&[4], 0, load(2, &[1]), at(3, &[1])));
        let mut p = program(ks, &[&[0, 1, 2]]);
        assert_eq!(fuse_sums(&mut p), 0);
    }

    /// `X[:, 0..4] = a`, `X[:, 4..8] = b` (the pieces of a concat), then `db = Σ_rows X`;
    /// with `heads` the copies walk their four columns as two axes of two (heads of a
    /// permute), with `overlap` a third copy writes columns 2..6 after both.
    fn concat_then_sum(heads: bool, overlap: bool) -> Program {
        let copy = |src: BufId, offset: usize| {
            let (shape, from, to) =
                if heads { (vec![8, 2, 2], vec![4, 2, 1], vec![8, 2, 1]) } else { (vec![8, 4], vec![4, 1], vec![8, 1]) };
            let out = Access { buf: 2, offset, strides: to };
            Kernel::Loop(LoopKernel::elementwise(shape, ScalarExpr::Load(Access { buf: src, offset: 0, strides: from }), out))
        };
        let mut kernels = vec![copy(0, 0), copy(1, 4)];
        if overlap {
            kernels.push(copy(1, 2));
        }
        kernels.push(lp(&[8, 8], 1, load(2, &[1, 8]), at(3, &[1, 0])));
        let n = kernels.len();
        Program {
            buffers: vec![buf("a", &[8, 4]), buf("b", &[8, 4]), buf("x", &[8, 8]), buf("db", &[8])],
            kernels,
            entries: vec![Entry { name: "e".into(), kernels: (0..n).collect(), results: vec![] }],
            params: vec![],
        }
    }

    #[test]
    fn a_column_sum_over_concatenated_pieces_rides_along_with_each_piece() {
        for heads in [false, true] {
            let mut p = concat_then_sum(heads, false);
            assert_eq!(fuse_sums(&mut p), 1, "heads {heads}");
            assert_eq!(p.kernels.len(), 2);
            for (k, offset) in [(0, 0), (1, 4)] {
                let Kernel::Loop(h) = &p.kernels[k] else { panic!() };
                assert_eq!(h.sums.len(), 1, "k{k}");
                let (into, x) = if heads { (vec![0, 2, 1], vec![8, 2, 1]) } else { (vec![0, 1], vec![8, 1]) };
                assert_eq!(h.sums[0].into, Access { buf: 3, offset, strides: into });
                assert_eq!(h.sums[0].value, ScalarExpr::Load(Access { buf: 2, offset, strides: x }));
            }
            let mut p = concat_then_sum(heads, true);
            assert_eq!(fuse_sums(&mut p), 0);
        }
    }
}
