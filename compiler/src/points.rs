//! Maps one loop kernel's iteration space onto another's, for the kernel-level fusion
//! passes (`fuse_chains.rs`, `fuse_sums.rs`).
//!
//! Two kernels visit the same points when an access of one and an access of the other
//! walk the same buffer elements: equal offsets, and the non-trivial axes pair up with
//! equal extents and strides. The pairing turns the first kernel's accesses and indices
//! into the second's.

use bm_runtime::kir::{Access, BinaryOp, BufId, FusedSum, LoopKernel, Program, ScalarExpr, SideStore};
use std::collections::HashMap;

/// For every axis of the source kernel, the axis of the target kernel it runs along
/// (`None` for source axes of extent 1).
pub struct PointMap {
    axis: Vec<Option<usize>>,
    target_rank: usize,
}

impl PointMap {
    /// The map under which `src` (over `src_shape`) and `dst` (over `dst_shape`) walk
    /// the same elements, when the non-trivial axes pair up one to one with equal
    /// extents and strides (so both kernels visit the same points).
    pub fn between(src_shape: &[usize], src: &Access, dst_shape: &[usize], dst: &Access) -> Option<PointMap> {
        if src.buf != dst.buf || src.offset != dst.offset {
            return None;
        }
        let mut used = vec![false; dst_shape.len()];
        let mut axis = vec![None; src_shape.len()];
        for i in 0..src_shape.len() {
            if src_shape[i] == 1 {
                continue;
            }
            if src.strides[i] == 0 {
                return None;
            }
            let j = (0..dst_shape.len()).find(|&j| !used[j] && dst_shape[j] == src_shape[i] && dst.strides[j] == src.strides[i])?;
            used[j] = true;
            axis[i] = Some(j);
        }
        (0..dst_shape.len()).all(|j| used[j] || dst_shape[j] == 1).then_some(PointMap { axis, target_rank: dst_shape.len() })
    }

    /// `a` in the target's iteration space.
    pub fn access(&self, a: &Access) -> Access {
        let mut strides = vec![0; self.target_rank];
        for (i, j) in self.axis.iter().enumerate() {
            if let Some(j) = j {
                strides[*j] = a.strides[i];
            }
        }
        Access { buf: a.buf, offset: a.offset, strides }
    }

    /// `e` in the target's iteration space; each mapped access goes through `canon`.
    pub fn expr(&self, e: &ScalarExpr, canon: &impl Fn(Access) -> Access) -> ScalarExpr {
        let go = |x: &ScalarExpr| Box::new(self.expr(x, canon));
        match e {
            ScalarExpr::Load(a) => ScalarExpr::Load(canon(self.access(a))),
            ScalarExpr::Const(c) => ScalarExpr::Const(*c),
            // An index along an axis of extent 1 is 0.
            ScalarExpr::Index(n) => match self.axis[*n] {
                Some(j) => ScalarExpr::Index(j),
                None => ScalarExpr::Const(0.0),
            },
            ScalarExpr::Unary(op, a) => ScalarExpr::Unary(*op, go(a)),
            ScalarExpr::Binary(op, a, b) => ScalarExpr::Binary(*op, go(a), go(b)),
            ScalarExpr::Select(c, a, b) => ScalarExpr::Select(go(c), go(a), go(b)),
        }
    }
}

/// Per axis of a kernel, the extents it splits into (outermost first).
pub type Splits = Vec<Vec<usize>>;

/// How to split the axes of two kernels so that accesses `a` (over `sa`) and `b` (over
/// `sb`) of the same elements can pair up axis by axis: for each axis, the extents it
/// splits into (outermost first). An axis of extent `n` and stride `s` splits at every
/// stride the other access steps at strictly inside `s..s·n` (a `[B, T, H·D]` copy
/// meeting a `[B, T, H, D]` one: `H·D` splits into `H, D`). `None` when neither needs a
/// split or the accesses name different elements.
pub fn refinement(sa: &[usize], a: &Access, sb: &[usize], b: &Access) -> Option<(Splits, Splits)> {
    if a.buf != b.buf || a.offset != b.offset {
        return None;
    }
    let dims = |shape: &[usize], acc: &Access| -> Vec<(usize, usize)> {
        shape.iter().zip(&acc.strides).filter(|&(&n, &s)| n > 1 && s > 0).map(|(&n, &s)| (n, s)).collect()
    };
    let bounds: Vec<usize> = dims(sa, a).iter().chain(&dims(sb, b)).flat_map(|&(n, s)| [s, s * n]).collect();
    let split = |shape: &[usize], acc: &Access| -> Splits {
        shape
            .iter()
            .zip(&acc.strides)
            .map(|(&n, &s)| {
                if n <= 1 || s == 0 {
                    return vec![n];
                }
                let mut cuts: Vec<usize> =
                    bounds.iter().copied().filter(|&c| c > s && c < s * n && c % s == 0 && (s * n) % c == 0).collect();
                cuts.sort_unstable();
                cuts.dedup();
                // Pieces from the outermost: s·n / c_last, …, c_1 / s — when the cuts
                // divide each other (else the axis stays whole and nothing pairs up).
                let mut pieces = vec![];
                let mut hi = s * n;
                for &c in cuts.iter().rev().chain([&s]) {
                    if hi % c != 0 {
                        return vec![n];
                    }
                    pieces.push(hi / c);
                    hi = c;
                }
                pieces
            })
            .collect()
    };
    let (ra, rb) = (split(sa, a), split(sb, b));
    (ra.iter().chain(&rb).any(|p| p.len() > 1)).then_some((ra, rb))
}

/// `k` over a finer iteration space: axis `j` becomes `splits[j]` (outermost first).
/// Every access and index means the same element and value as before.
pub fn split_axes(k: &LoopKernel, splits: &[Vec<usize>]) -> LoopKernel {
    // Where each old axis starts in the new space.
    let mut first = vec![];
    let mut n = 0;
    for p in splits {
        first.push(n);
        n += p.len();
    }
    let access = |a: &Access| {
        let mut strides = vec![];
        for (j, p) in splits.iter().enumerate() {
            for k in 0..p.len() {
                strides.push(a.strides[j] * p[k + 1..].iter().product::<usize>());
            }
        }
        Access { buf: a.buf, offset: a.offset, strides }
    };
    let expr = |e: &ScalarExpr| index_split(&e.map_loads(&access, &|j| first[j]), splits, &first);
    LoopKernel {
        shape: splits.iter().flatten().copied().collect(),
        reduce: k.reduce,
        reduced_dims: if k.reduce.is_some() { splits[splits.len() - k.reduced_dims..].iter().map(|p| p.len()).sum() } else { 0 },
        body: expr(&k.body),
        out: access(&k.out),
        accumulate: k.accumulate,
        side: k.side.iter().map(|s| SideStore { value: expr(&s.value), into: access(&s.into) }).collect(),
        sums: k.sums.iter().map(|s| FusedSum { value: expr(&s.value), into: access(&s.into), accumulate: s.accumulate }).collect(),
    }
}

/// After `map_loads` sent `Index(j)` to `Index(first[j])`: the old index of a split axis
/// is `Σ i_k · (extent of the pieces after k)`.
fn index_split(e: &ScalarExpr, splits: &[Vec<usize>], first: &[usize]) -> ScalarExpr {
    let go = |x: &ScalarExpr| Box::new(index_split(x, splits, first));
    match e {
        ScalarExpr::Index(n) => {
            let j = first.iter().position(|f| f == n).expect("an old axis start");
            let p = &splits[j];
            let mut sum = ScalarExpr::Index(first[j]);
            for (k, &extent) in p.iter().enumerate().skip(1) {
                let scaled = ScalarExpr::Binary(BinaryOp::Mul, Box::new(sum), Box::new(ScalarExpr::Const(extent as f32)));
                sum = ScalarExpr::Binary(BinaryOp::Add, Box::new(scaled), Box::new(ScalarExpr::Index(first[j] + k)));
            }
            sum
        }
        ScalarExpr::Load(_) | ScalarExpr::Const(_) => e.clone(),
        ScalarExpr::Unary(op, a) => ScalarExpr::Unary(*op, go(a)),
        ScalarExpr::Binary(op, a, b) => ScalarExpr::Binary(*op, go(a), go(b)),
        ScalarExpr::Select(c, a, b) => ScalarExpr::Select(go(c), go(a), go(b)),
    }
}

/// Whether `a` reads the element `store` writes at every point of `shape` (equal
/// offsets, equal strides on the axes of extent > 1).
pub fn same_point(shape: &[usize], a: &Access, store: &Access) -> bool {
    a.buf == store.buf && a.offset == store.offset && (0..shape.len()).all(|j| shape[j] == 1 || a.strides[j] == store.strides[j])
}

/// `a`, or the first of `stores` it reads at the same point (so that equal accesses
/// are equal values: the runtime recognises a read of a store's own access).
pub fn canonical(shape: &[usize], a: Access, stores: &[&Access]) -> Access {
    match stores.iter().find(|s| same_point(shape, &a, s)) {
        Some(s) => (*s).clone(),
        None => a,
    }
}

/// Every kernel's reads and writes and every buffer's writers, computed once and kept
/// current by a fusion pass as it rewrites kernels (the passes ask these questions for
/// every pair of kernels they consider).
pub struct Touched {
    pub reads: Vec<Vec<BufId>>,
    pub writes: Vec<Vec<BufId>>,
    writers: HashMap<BufId, Vec<usize>>,
    readers: HashMap<BufId, Vec<usize>>,
}

impl Touched {
    pub fn of(p: &Program) -> Touched {
        let mut t = Touched { reads: vec![], writes: vec![], writers: HashMap::new(), readers: HashMap::new() };
        for k in 0..p.kernels.len() {
            t.reads.push(vec![]);
            t.writes.push(vec![]);
            t.update(p, k);
        }
        t
    }

    /// Re-reads kernel `k` after a rewrite (buffers it stops touching keep it listed:
    /// callers check the kernel itself).
    pub fn update(&mut self, p: &Program, k: usize) {
        self.reads[k] = p.kernels[k].reads();
        self.writes[k] = p.kernels[k].writes();
        for (bufs, index) in [(&self.writes[k], &mut self.writers), (&self.reads[k], &mut self.readers)] {
            for &b in bufs {
                let w = index.entry(b).or_default();
                if !w.contains(&k) {
                    w.push(k);
                }
            }
        }
    }

    /// The kernels reading `b`.
    pub fn readers(&self, b: BufId) -> &[usize] {
        self.readers.get(&b).map_or(&[], |v| v)
    }

    /// The kernels writing `b`.
    pub fn writers(&self, b: BufId) -> &[usize] {
        self.writers.get(&b).map_or(&[], |v| v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bm_runtime::kir::{Access, UnaryOp};

    #[test]
    fn split_axes_keeps_every_element_and_index() {
        // out[i, j] = x[j, i] + i·10 + j over 3 × 6, with j split into 2 × 3.
        let k = LoopKernel {
            shape: vec![3, 6],
            reduce: None,
            reduced_dims: 0,
            body: ScalarExpr::Binary(
                BinaryOp::Add,
                Box::new(ScalarExpr::Load(Access { buf: 0, offset: 1, strides: vec![1, 3] })),
                Box::new(ScalarExpr::Unary(UnaryOp::Neg, Box::new(ScalarExpr::Index(1)))),
            ),
            out: Access { buf: 1, offset: 0, strides: vec![6, 1] },
            accumulate: false,
            side: vec![],
            sums: vec![],
        };
        let s = split_axes(&k, &[vec![3], vec![2, 3]]);
        assert_eq!(s.shape, vec![3, 2, 3]);
        assert_eq!(s.out.strides, vec![6, 3, 1]);
        let ScalarExpr::Binary(_, x, idx) = &s.body else { panic!() };
        assert_eq!(**x, ScalarExpr::Load(Access { buf: 0, offset: 1, strides: vec![1, 9, 3] }));
        let want = ScalarExpr::Binary(
            BinaryOp::Add,
            Box::new(ScalarExpr::Binary(BinaryOp::Mul, Box::new(ScalarExpr::Index(1)), Box::new(ScalarExpr::Const(3.0)))),
            Box::new(ScalarExpr::Index(2)),
        );
        assert_eq!(**idx, ScalarExpr::Unary(UnaryOp::Neg, Box::new(want)));
    }

    #[test]
    fn refinement_splits_where_the_other_access_steps() {
        // [2, 8] stride (8, 1) against [2, 2, 4] stride (8, 4, 1): the 8 splits into 2, 4.
        let a = Access { buf: 0, offset: 0, strides: vec![8, 1] };
        let b = Access { buf: 0, offset: 0, strides: vec![8, 4, 1] };
        let (ra, rb) = refinement(&[2, 8], &a, &[2, 2, 4], &b).unwrap();
        assert_eq!(ra, vec![vec![2], vec![2, 4]]);
        assert_eq!(rb, vec![vec![2], vec![2], vec![4]]);
        assert!(refinement(&[2, 8], &a, &[2, 8], &a).is_none());
        // [2, 6] against [3, 4] over the same 12 elements: no cut nests, nothing splits.
        let d = Access { buf: 0, offset: 0, strides: vec![4, 1] };
        let e = Access { buf: 0, offset: 0, strides: vec![6, 1] };
        assert!(refinement(&[2, 6], &e, &[3, 4], &d).is_none());
        // [12] against [2, 3, 2]: the 12 splits into 2, 3, 2.
        let c = Access { buf: 0, offset: 0, strides: vec![1] };
        let f = Access { buf: 0, offset: 0, strides: vec![6, 2, 1] };
        assert_eq!(refinement(&[12], &c, &[2, 3, 2], &f).unwrap().0, vec![vec![2, 3, 2]]);
        // Cuts at 4 and 6 of a 12 do not nest: it stays whole.
        assert!(refinement(&[12], &c, &[3, 6], &d).is_none());
    }
}
