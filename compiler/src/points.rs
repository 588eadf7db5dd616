//! Maps one loop kernel's iteration space onto another's, for the kernel-level fusion
//! passes (`fuse_chains.rs`, `fuse_sums.rs`).
//!
//! Two kernels visit the same points when an access of one and an access of the other
//! walk the same buffer elements: equal offsets, and the non-trivial axes pair up with
//! equal extents and strides. The pairing turns the first kernel's accesses and indices
//! into the second's.

use bm_runtime::kir::{Access, BufId, Program, ScalarExpr};
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
