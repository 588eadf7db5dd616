//! Memory planning: temporaries whose lifetimes never overlap share one buffer.
//!
//! A temporary lives, in each entry, from the first to the last kernel (in that entry's
//! order) that touches it, both ends included. Two temporaries may share a buffer if, in
//! every entry, their lifetimes are disjoint, or one ends where the other begins at a
//! kernel that can write the new one over the old in place ([`writes_over`]: an
//! elementwise loop reading the old value only at the elements it writes — a bias add
//! and GELU over a product's output, a residual add, an activation's gradient). Then
//! the kernel's rows stay where they are in cache instead of streaming into a second
//! buffer. Entry results keep their own buffers (the runtime reads them, with their
//! shapes, after the entry ran). Greedy, largest first.

use crate::inplace::loads_only_at;
use bm_runtime::kir::{BufId, BufKind, DType, Kernel, Program, ScalarExpr};
use std::collections::HashSet;

/// Calls `f` on every buffer id a kernel names.
pub(crate) fn for_each_buf(k: &mut Kernel, f: &mut impl FnMut(&mut BufId)) {
    fn expr(e: &mut ScalarExpr, f: &mut impl FnMut(&mut BufId)) {
        match e {
            ScalarExpr::Load(a) => f(&mut a.buf),
            ScalarExpr::Const(_) | ScalarExpr::Index(_) => {}
            ScalarExpr::Unary(_, a) => expr(a, f),
            ScalarExpr::Binary(_, a, b) => {
                expr(a, f);
                expr(b, f);
            }
            ScalarExpr::Select(c, a, b) => {
                expr(c, f);
                expr(a, f);
                expr(b, f);
            }
        }
    }
    match k {
        Kernel::Loop(l) => {
            f(&mut l.out.buf);
            expr(&mut l.body, f);
            for s in &mut l.side {
                f(&mut s.into.buf);
                expr(&mut s.value, f);
            }
            for s in &mut l.sums {
                f(&mut s.into.buf);
                expr(&mut s.value, f);
            }
        }
        Kernel::MatMul(m) => {
            f(&mut m.a.buf);
            f(&mut m.b.buf);
            f(&mut m.c.buf);
        }
        Kernel::Gather(g) => {
            f(&mut g.table);
            f(&mut g.ids);
            f(&mut g.out);
        }
        Kernel::ScatterAdd(s) => {
            f(&mut s.src);
            f(&mut s.ids);
            f(&mut s.out);
        }
        Kernel::Attention(a) => attention(a, f),
        Kernel::AttentionBackward(b) => {
            attention(&mut b.fwd, f);
            f(&mut b.dout.buf);
        }
    }
    fn attention(a: &mut bm_runtime::kir::AttentionKernel, f: &mut impl FnMut(&mut BufId)) {
        f(&mut a.q.buf);
        f(&mut a.k.buf);
        f(&mut a.v.buf);
        if let Some(m) = &mut a.mask {
            f(&mut m.buf);
        }
        f(&mut a.out);
    }
}

/// Whether kernel `k` may write temporary `dst` over `src` (the last kernel to touch
/// `src`): an elementwise loop (no reduction, no accumulation) that stores `dst` once
/// (its output or one side store), does not write `src`, and reads `src` only at the
/// elements where it stores `dst` — never in a fused sum, whose value is evaluated after
/// the stores. At a point every value is computed before anything is stored (`kir`'s
/// rule for side stores), so each element is read before it is overwritten.
fn writes_over(k: &Kernel, src: BufId, dst: BufId) -> bool {
    let Kernel::Loop(l) = k else { return false };
    if l.reduce.is_some() || l.accumulate || l.writes_buf(src) {
        return false;
    }
    let stores: Vec<_> = std::iter::once(&l.out).chain(l.side.iter().map(|s| &s.into)).filter(|a| a.buf == dst).collect();
    let ([store], false) = (&stores[..], l.sums.iter().any(|s| s.into.buf == dst)) else { return false };
    let mut sum_reads = false;
    l.sums.iter().for_each(|s| s.value.for_each_load(&mut |a| sum_reads |= a.buf == src));
    let at = |e: &ScalarExpr| loads_only_at(e, src, store);
    !sum_reads && at(&l.body) && l.side.iter().all(|s| at(&s.value))
}

/// Temporaries sharing one buffer, and per entry their lifetimes `(first, last, member)`
/// sorted. Members never overlap (they may touch where one is written over the other),
/// so sorted by start their ends never decrease: whether a new lifetime meets a member
/// is two binary searches, and only members touching its ends need the exact check.
/// (First fit comparing every member made planning quadratic in the temporaries: 1.5 s
/// of a 192-layer model's compile.)
struct Slot {
    rep: BufId,
    dtype: DType,
    lives: Vec<Vec<(usize, usize, BufId)>>,
}

impl Slot {
    fn new(rep: BufId, dtype: DType, entries: usize) -> Slot {
        Slot { rep, dtype, lives: vec![vec![]; entries] }
    }

    fn add(&mut self, t: BufId, lifetimes: &[Vec<Option<(usize, usize)>>]) {
        for (e, l) in lifetimes.iter().enumerate() {
            if let Some((t0, t1)) = l[t] {
                let v = &mut self.lives[e];
                let at = v.partition_point(|&(s, z, _)| (s, z) <= (t0, t1));
                v.insert(at, (t0, t1, t));
            }
        }
    }

    /// Whether `t` (alive over `t0..=t1` in entry `e`) may join without meeting a member
    /// other than where one is written over the other (`overlap_in`).
    fn fits_in(&self, e: usize, t0: usize, t1: usize, t: BufId, overlap_in: &impl Fn(usize, BufId, BufId) -> bool) -> bool {
        let v = &self.lives[e];
        // Members starting by t0 are v[..i]; strictly inside t's lifetime, v[i..j].
        let i = v.partition_point(|m| m.0 <= t0);
        let j = v.partition_point(|m| m.0 < t1).max(i);
        // A member starting strictly inside, or alive across t0 into t's lifetime (the
        // latest starting by t0 ends last), shares more than one kernel with it: never
        // a handover.
        if j > i || (t1 > t0 && i > 0 && v[i - 1].1 > t0) {
            return false;
        }
        // What is left meets t at one of its ends, if at all: members starting at t1,
        // and those starting by t0 that end at t0 or later (the latest ones).
        let at_t1 = v[j..].iter().take_while(|m| m.0 == t1);
        let at_t0 = v[..i].iter().rev().take_while(|m| m.1 >= t0);
        at_t1.chain(at_t0).all(|m| !overlap_in(e, m.2, t))
    }
}

/// Shares temporaries' storage where lifetimes allow; returns the bytes saved.
pub fn share_temporaries(p: &mut Program) -> usize {
    let n = p.buffers.len();
    let pinned: HashSet<BufId> = p.entries.iter().flat_map(|e| e.results.iter().map(|r| r.1)).collect();
    // lifetimes[e][b] = (first, last) position in entry e.
    let mut lifetimes: Vec<Vec<Option<(usize, usize)>>> = vec![vec![None; n]; p.entries.len()];
    for (ei, e) in p.entries.iter().enumerate() {
        for (pos, &k) in e.kernels.iter().enumerate() {
            let mut kernel = p.kernels[k].clone();
            for_each_buf(&mut kernel, &mut |b| {
                let l = &mut lifetimes[ei][*b];
                *l = Some(match *l {
                    None => (pos, pos),
                    Some((a, z)) => (a.min(pos), z.max(pos)),
                });
            });
        }
    }
    // Whether `a` and `b` cannot share in entry `e`: they are alive at once, other than
    // where one ends and the other begins at a kernel writing it over the first.
    let overlap_in = |e: usize, a: BufId, b: BufId| match (lifetimes[e][a], lifetimes[e][b]) {
        (Some((a0, a1)), Some((b0, b1))) if a0 <= b1 && b0 <= a1 => {
            let kernels = &p.entries[e].kernels;
            let handover =
                |end: usize, src: BufId, start: usize, dst: BufId| end == start && writes_over(&p.kernels[kernels[end]], src, dst);
            !(handover(a1, a, b0, b) || handover(b1, b, a0, a))
        }
        _ => false,
    };
    let mut temps: Vec<BufId> = (0..n).filter(|&b| p.buffers[b].kind == BufKind::Temp && !pinned.contains(&b)).collect();
    temps.sort_by_key(|&b| (std::cmp::Reverse(p.buffers[b].len()), b));
    // First fit: each temporary joins the first slot (in creation order) of its dtype
    // none of whose members overlaps it; the representative is the largest member.
    let mut slots: Vec<Slot> = vec![];
    let mut rep = (0..n).collect::<Vec<BufId>>();
    for t in temps {
        let dtype = p.buffers[t].dtype;
        let life: Vec<(usize, usize, usize)> = (0..p.entries.len()).filter_map(|e| lifetimes[e][t].map(|(t0, t1)| (e, t0, t1))).collect();
        let fits = |slot: &Slot| slot.dtype == dtype && life.iter().all(|&(e, t0, t1)| slot.fits_in(e, t0, t1, t, &overlap_in));
        match slots.iter_mut().find(|s| fits(s)) {
            Some(slot) => {
                slot.add(t, &lifetimes);
                rep[t] = slot.rep;
            }
            None => {
                let mut slot = Slot::new(t, dtype, p.entries.len());
                slot.add(t, &lifetimes);
                slots.push(slot);
            }
        }
    }
    // Rename every use to the representative, then drop unused buffers and renumber.
    for k in p.kernels.iter_mut() {
        for_each_buf(k, &mut |b| *b = rep[*b]);
    }
    let keep: Vec<bool> = (0..n).map(|b| rep[b] == b).collect();
    let mut new_id = vec![usize::MAX; n];
    let mut next = 0;
    let mut saved = 0;
    for b in 0..n {
        if keep[b] {
            new_id[b] = next;
            next += 1;
        } else {
            saved += p.buffers[b].len() * 4;
        }
    }
    for k in p.kernels.iter_mut() {
        for_each_buf(k, &mut |b| *b = new_id[*b]);
    }
    for e in p.entries.iter_mut() {
        for r in e.results.iter_mut() {
            r.1 = new_id[r.1];
        }
    }
    for ps in p.params.iter_mut() {
        ps.buf = new_id[ps.buf];
    }
    let mut i = 0;
    p.buffers.retain(|_| {
        i += 1;
        keep[i - 1]
    });
    saved
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A slot's indexed test agrees with comparing the new lifetime against every
        /// member, as first fit builds slots from random lifetimes (one entry; short
        /// ones, so that members touch and some touches are handovers).
        #[test]
        fn slots_agree_with_comparing_every_member(lives in prop::collection::vec((0usize..40, 0usize..6, any::<bool>()), 1..60)) {
            let lifetimes = vec![lives.iter().map(|&(s, len, _)| Some((s, s + len))).collect::<Vec<_>>()];
            // A touch at one kernel is a handover when the later temporary says so.
            let overlap_in = |_: usize, a: BufId, b: BufId| {
                let ((a0, a1), (b0, b1)) = (lifetimes[0][a].unwrap(), lifetimes[0][b].unwrap());
                let handover = |end: usize, start: usize, dst: BufId| end == start && lives[dst].2;
                a0 <= b1 && b0 <= a1 && !(handover(a1, b0, b) || handover(b1, a0, a))
            };
            let mut slots: Vec<(Slot, Vec<BufId>)> = vec![];
            for t in 0..lives.len() {
                let (t0, t1) = lifetimes[0][t].unwrap();
                let mut home = None;
                for (i, (slot, members)) in slots.iter().enumerate() {
                    let naive = members.iter().all(|&m| !overlap_in(0, m, t));
                    prop_assert_eq!(slot.fits_in(0, t0, t1, t, &overlap_in), naive, "temporary {} in slot {}", t, i);
                    if naive && home.is_none() {
                        home = Some(i);
                    }
                }
                match home {
                    Some(i) => {
                        slots[i].0.add(t, &lifetimes);
                        slots[i].1.push(t);
                    }
                    None => {
                        let mut slot = Slot::new(t, DType::F32, 1);
                        slot.add(t, &lifetimes);
                        slots.push((slot, vec![t]));
                    }
                }
            }
        }
    }
}
