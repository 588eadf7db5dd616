//! In-place updates: an `Assign` lowers to a copy kernel `state = new` at the end of
//! `train_step`. When one elementwise loop kernel computes `new` and nothing after it
//! still needs the old `state`, that kernel writes into `state` directly and the copy
//! disappears (AdamW: m, v and the parameter each lose a full pass over memory).
//!
//! Kernel-level pass over the lowered program, run before memory planning. For a copy
//! `T = B` (whole contiguous buffers; `T` a parameter or optimiser state, `B` a
//! temporary that is not an entry result) it requires, in every entry that runs the
//! producer `K` of `B`:
//! - `K` is the only kernel writing `B`, a loop without accumulation whose output or
//!   side store is all of `B` in the copy's layout, and the entry also runs the copy;
//! - `K` reads `T` only at the element it writes (elementwise in place);
//! - no kernel after `K`, except the copy, reads or writes `T`.
//!
//! Then `K` writes `T`, every read of `B` reads `T`, and the copy is removed.

use crate::plan::for_each_buf;
use bm_runtime::kir::{Access, BufId, BufKind, Kernel, Program, ScalarExpr};

/// A whole-buffer row-major access of `len` elements over a loop of `shape`.
fn whole(a: &Access, shape: &[usize], len: usize) -> bool {
    if a.offset != 0 || shape.iter().product::<usize>() != len {
        return false;
    }
    let mut stride = 1;
    for (d, &n) in shape.iter().enumerate().rev() {
        if n > 1 && a.strides[d] != stride {
            return false;
        }
        stride *= n;
    }
    true
}

/// `T = B` over whole buffers: `Some((T, B))`.
fn copy_of(p: &Program, k: &Kernel) -> Option<(BufId, BufId)> {
    let Kernel::Loop(l) = k else { return None };
    let ScalarExpr::Load(src) = &l.body else { return None };
    let (t, b) = (l.out.buf, src.buf);
    let state = matches!(p.buffers[t].kind, BufKind::Param | BufKind::OptState);
    let ok = state
        && p.buffers[b].kind == BufKind::Temp
        && l.reduce.is_none()
        && !l.accumulate
        && src.strides == l.out.strides
        && src.offset == l.out.offset
        && p.buffers[t].len() == p.buffers[b].len()
        && p.buffers[t].dtype == p.buffers[b].dtype
        && whole(&l.out, &l.shape, p.buffers[t].len());
    ok.then_some((t, b))
}

/// The buffers kernel `k` names, sorted.
fn named(k: &Kernel) -> Vec<BufId> {
    let mut k = k.clone();
    let mut bufs = vec![];
    for_each_buf(&mut k, &mut |b| bufs.push(*b));
    bufs.sort_unstable();
    bufs.dedup();
    bufs
}

/// Every load of `buf` in `e` uses exactly `at`.
pub(crate) fn loads_only_at(e: &ScalarExpr, buf: BufId, at: &Access) -> bool {
    match e {
        ScalarExpr::Load(a) => a.buf != buf || (a.offset == at.offset && a.strides == at.strides),
        ScalarExpr::Const(_) | ScalarExpr::Index(_) => true,
        ScalarExpr::Unary(_, a) => loads_only_at(a, buf, at),
        ScalarExpr::Binary(_, a, b) => loads_only_at(a, buf, at) && loads_only_at(b, buf, at),
        ScalarExpr::Select(c, a, b) => loads_only_at(c, buf, at) && loads_only_at(a, buf, at) && loads_only_at(b, buf, at),
    }
}

/// Forwards every eligible copy into its producer; returns how many were removed.
pub fn update_in_place(p: &mut Program) -> usize {
    let results: Vec<BufId> = p.entries.iter().flat_map(|e| e.results.iter().map(|r| r.1)).collect();
    // Indexes built once, so the pass stays linear in the program's size (a model of
    // thousands of layers has thousands of copies and hundreds of thousands of kernels).
    let mut writers: Vec<Vec<usize>> = vec![vec![]; p.buffers.len()];
    for (k, kernel) in p.kernels.iter().enumerate() {
        for b in kernel.writes() {
            if !writers[b].contains(&k) {
                writers[b].push(k);
            }
        }
    }
    // Per entry: each kernel's position, and per buffer the positions touching it (rising).
    let mut position: Vec<Vec<Option<usize>>> = vec![vec![None; p.kernels.len()]; p.entries.len()];
    let mut touching: Vec<Vec<Vec<usize>>> = vec![vec![vec![]; p.buffers.len()]; p.entries.len()];
    for (ei, e) in p.entries.iter().enumerate() {
        for (pos, &k) in e.kernels.iter().enumerate() {
            position[ei][k] = Some(pos);
            for b in named(&p.kernels[k]) {
                touching[ei][b].push(pos);
            }
        }
    }
    let mut renamed: Vec<BufId> = (0..p.buffers.len()).collect();
    let mut removed = vec![];
    for c in 0..p.kernels.len() {
        let Some((t, b)) = copy_of(p, &p.kernels[c]) else { continue };
        if results.contains(&b) {
            continue;
        }
        let others: Vec<usize> = writers[b].iter().copied().filter(|&k| k != c).collect();
        let [k] = others[..] else { continue };
        let Kernel::Loop(kl) = &p.kernels[k] else { continue };
        let Kernel::Loop(copy) = &p.kernels[c] else { continue };
        if kl.accumulate || kl.reduce.is_some() || kl.writes_buf(t) {
            continue;
        }
        // K stores B as its output or as a side store.
        let store = match kl.side.iter().find(|s| s.into.buf == b) {
            _ if kl.out.buf == b => &kl.out,
            Some(s) => &s.into,
            None => continue,
        };
        if store.strides != copy.out.strides || store.offset != 0 || !whole(store, &kl.shape, p.buffers[b].len()) {
            continue;
        }
        let in_place = Access { buf: t, ..store.clone() };
        // A fused sum reading T would see the new value once K writes T.
        let mut sum_reads_t = false;
        kl.sums.iter().for_each(|s| s.value.for_each_load(&mut |a| sum_reads_t |= a.buf == t));
        let elementwise = loads_only_at(&kl.body, t, &in_place) && kl.side.iter().all(|s| loads_only_at(&s.value, t, &in_place));
        if !elementwise || sum_reads_t {
            continue;
        }
        let safe = p.entries.iter().enumerate().all(|(ei, e)| {
            let Some(pk) = position[ei][k] else {
                return position[ei][c].is_none();
            };
            let after = &touching[ei][t];
            position[ei][c].is_some() && after[after.partition_point(|&x| x <= pk)..].iter().all(|&x| e.kernels[x] == c)
        });
        if !safe {
            continue;
        }
        // Every use of B, K's store included, becomes T (the copies are removed). The
        // checks above stay valid without renaming first: each B is another copy's
        // temporary, never a T.
        renamed[b] = t;
        removed.push(c);
    }
    for kernel in p.kernels.iter_mut() {
        for_each_buf(kernel, &mut |x| *x = renamed[*x]);
    }
    removed.sort_unstable();
    p.remove_kernels(&removed);
    removed.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bm_runtime::kir::{BinaryOp, Buffer, DType, Entry, LoopKernel};

    fn buf(name: &str, kind: BufKind) -> Buffer {
        Buffer { name: name.into(), dtype: DType::F32, shape: vec![4, 3], kind }
    }
    fn at(buf: BufId) -> Access {
        Access { buf, offset: 0, strides: vec![3, 1] }
    }
    fn lp(out: BufId, body: ScalarExpr) -> Kernel {
        Kernel::Loop(LoopKernel::elementwise(vec![4, 3], body, at(out)))
    }
    fn load(b: BufId) -> ScalarExpr {
        ScalarExpr::Load(at(b))
    }

    /// b0 = param, b1 = grad, b2 = new value, b3 = another temp.
    fn program(after: Option<Kernel>) -> Program {
        let update = lp(2, ScalarExpr::Binary(BinaryOp::Sub, Box::new(load(0)), Box::new(load(1))));
        let mut kernels = vec![update];
        kernels.extend(after);
        kernels.push(lp(0, load(2)));
        let n = kernels.len();
        Program {
            buffers: vec![buf("w", BufKind::Param), buf("g", BufKind::Temp), buf("w.new", BufKind::Temp), buf("t", BufKind::Temp)],
            kernels,
            entries: vec![Entry { name: "train_step".into(), kernels: (0..n).collect(), results: vec![] }],
            params: vec![],
        }
    }

    #[test]
    fn the_update_writes_the_parameter_and_the_copy_goes() {
        // A later reader of the new value reads the parameter instead.
        let mut p = program(Some(lp(3, load(2))));
        assert_eq!(update_in_place(&mut p), 1);
        assert_eq!(p.kernels.len(), 2);
        assert_eq!(p.entries[0].kernels, vec![0, 1]);
        let Kernel::Loop(l) = &p.kernels[0] else { panic!() };
        assert_eq!(l.out.buf, 0);
        let Kernel::Loop(r) = &p.kernels[1] else { panic!() };
        assert_eq!(r.body, load(0));
    }

    #[test]
    fn a_later_reader_of_the_old_value_keeps_the_copy() {
        let mut p = program(Some(lp(3, load(0))));
        assert_eq!(update_in_place(&mut p), 0);
        assert_eq!(p.kernels.len(), 3);
    }

    #[test]
    fn a_transposed_read_of_the_parameter_keeps_the_copy() {
        let mut p = program(None);
        p.kernels[0] = lp(2, ScalarExpr::Load(Access { buf: 0, offset: 0, strides: vec![1, 4] }));
        assert_eq!(update_in_place(&mut p), 0);
    }
}
