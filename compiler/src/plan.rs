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
            for o in [&mut b.dout, &mut b.dq, &mut b.dk, &mut b.dv] {
                f(&mut o.buf);
            }
        }
    }
    fn attention(a: &mut bm_runtime::kir::AttentionKernel, f: &mut impl FnMut(&mut BufId)) {
        f(&mut a.q.buf);
        f(&mut a.k.buf);
        f(&mut a.v.buf);
        if let Some(m) = &mut a.mask {
            f(&mut m.buf);
        }
        f(&mut a.out.buf);
        if let Some(p) = &mut a.probs {
            f(p);
        }
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

/// Per temporary, the temporary written over it where it dies, if one is to share its
/// buffer: the kernel that last touches `src` writes `dst` over it ([`writes_over`]),
/// `dst` is born there, has the same length and dtype, and in no entry meets `src`
/// otherwise (`meet`). Placed together, a product's output and the bias add or residual add
/// that consumes it share one buffer, so the add runs in place on rows still in cache;
/// placed one by one, first fit put the short-lived product output in the first slot
/// it fitted, which the long-lived sum then did not fit (W2's `qkv + b`: a second 3 MiB
/// stream written every layer). Each temporary has at most one successor and one
/// predecessor, so the pairs form chains: returned as each temporary's successor and
/// predecessor.
fn handovers(
    p: &Program,
    lifetimes: &[Vec<Option<(usize, usize)>>],
    is_temp: &impl Fn(BufId) -> bool,
    meet: &impl Fn(BufId, BufId) -> bool,
) -> (Vec<Option<BufId>>, Vec<Option<BufId>>) {
    let n = p.buffers.len();
    let (mut next, mut prev): (Vec<Option<BufId>>, Vec<Option<BufId>>) = (vec![None; n], vec![None; n]);
    for (e, entry) in p.entries.iter().enumerate() {
        // Temporaries by the position of their last kernel in this entry.
        let mut ending: Vec<Vec<BufId>> = vec![vec![]; entry.kernels.len()];
        for b in (0..n).filter(|&b| is_temp(b)) {
            if let Some((_, t1)) = lifetimes[e][b] {
                ending[t1].push(b);
            }
        }
        for (pos, &k) in entry.kernels.iter().enumerate() {
            let Kernel::Loop(l) = &p.kernels[k] else { continue };
            let stores = std::iter::once(&l.out).chain(l.side.iter().map(|s| &s.into));
            for dst in stores.map(|a| a.buf) {
                if !is_temp(dst) || prev[dst].is_some() || lifetimes[e][dst].is_none_or(|(t0, _)| t0 != pos) {
                    continue;
                }
                let partner = ending[pos].iter().copied().find(|&src| {
                    src != dst
                        && next[src].is_none()
                        && p.buffers[src].len() == p.buffers[dst].len()
                        && p.buffers[src].dtype == p.buffers[dst].dtype
                        && writes_over(&p.kernels[k], src, dst)
                        && !meet(src, dst)
                });
                if let Some(src) = partner {
                    next[src] = Some(dst);
                    prev[dst] = Some(src);
                }
            }
        }
    }
    (next, prev)
}

/// The chain of handovers through `t` ([`handovers`]), first to last (a cycle, which
/// lifetimes rule out in any one entry, is cut where it closes).
fn chain_of(t: BufId, next: &[Option<BufId>], prev: &[Option<BufId>]) -> Vec<BufId> {
    let mut head = t;
    while let Some(b) = prev[head].filter(|&b| b != t) {
        head = b;
    }
    let mut chain = vec![head];
    while let Some(b) = next[*chain.last().expect("not empty")].filter(|b| !chain.contains(b)) {
        chain.push(b);
    }
    chain
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
    let is_temp = |b: BufId| p.buffers[b].kind == BufKind::Temp && !pinned.contains(&b);
    let mut temps: Vec<BufId> = (0..n).filter(|&b| is_temp(b)).collect();
    temps.sort_by_key(|&b| (std::cmp::Reverse(p.buffers[b].len()), b));
    // Whether two temporaries' lifetimes overlap in some entry.
    let meet = |a: BufId, b: BufId| (0..p.entries.len()).any(|e| overlap_in(e, a, b));
    let (next, prev) = handovers(p, &lifetimes, &is_temp, &meet);
    // First fit: each temporary, with the temporaries it hands over to or takes over
    // from ([`handovers`]), joins the first slot (in creation order) of its dtype none
    // of whose members overlaps any of them; the representative is the largest member.
    let mut slots: Vec<Slot> = vec![];
    let mut rep = (0..n).collect::<Vec<BufId>>();
    let mut placed = vec![false; n];
    for t in temps {
        if placed[t] {
            continue;
        }
        let mut chain = chain_of(t, &next, &prev);
        // Members of a chain touch only where one hands over to the next; should two of
        // them meet otherwise in some entry, each goes alone.
        if chain.iter().enumerate().any(|(i, &a)| chain[i + 1..].iter().any(|&b| meet(a, b))) {
            chain = vec![t];
        }
        let dtype = p.buffers[t].dtype;
        let fits = |slot: &Slot| {
            slot.dtype == dtype
                && chain
                    .iter()
                    .all(|&c| (0..p.entries.len()).all(|e| lifetimes[e][c].is_none_or(|(t0, t1)| slot.fits_in(e, t0, t1, c, &overlap_in))))
        };
        let at = match slots.iter().position(fits) {
            Some(i) => i,
            None => {
                slots.push(Slot::new(t, dtype, p.entries.len()));
                slots.len() - 1
            }
        };
        for &c in &chain {
            slots[at].add(c, &lifetimes);
            rep[c] = slots[at].rep;
            placed[c] = true;
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
    use bm_runtime::kir::{Access, BinaryOp, Buffer, Entry, LoopKernel, MatMulKernel, MatOperand};
    use proptest::prelude::*;

    /// A product's output `t` (alive k0..k1) and the bias add `q = t + b` that consumes
    /// it (alive k1..k3) share one buffer, the add in place, although a larger
    /// temporary `big` (k2..k3), placed first, would have taken `t` first fit and left
    /// `q` a buffer of its own.
    #[test]
    fn a_product_output_and_the_add_that_consumes_it_share_a_buffer() {
        let buf = |name: &str, kind, len| Buffer { name: name.into(), dtype: DType::F32, shape: vec![len], kind };
        let (x, w, bias, t, q, big, out) = (0, 1, 2, 3, 4, 5, 6);
        let buffers = vec![
            buf("x", BufKind::Input, 16),
            buf("w", BufKind::Param, 16),
            buf("b", BufKind::Param, 4),
            buf("t", BufKind::Temp, 16),
            buf("q", BufKind::Temp, 16),
            buf("big", BufKind::Temp, 64),
            buf("out", BufKind::Temp, 16),
        ];
        let dense = |buf| MatOperand { buf, offset: 0, batch_strides: vec![], row_stride: 4, col_stride: 1 };
        let at = |buf, strides: &[usize]| Access { buf, offset: 0, strides: strides.to_vec() };
        let load = |buf, strides: &[usize]| ScalarExpr::Load(at(buf, strides));
        let ew = |shape: Vec<usize>, body, out| Kernel::Loop(LoopKernel::elementwise(shape, body, out));
        let kernels = vec![
            Kernel::MatMul(MatMulKernel {
                batch: vec![],
                m: 4,
                n: 4,
                k: 4,
                a: dense(x),
                b: dense(w),
                c: dense(t),
                accumulate: false,
                bf16: false,
            }),
            ew(vec![4, 4], ScalarExpr::Binary(BinaryOp::Add, Box::new(load(t, &[4, 1])), Box::new(load(bias, &[0, 1]))), at(q, &[4, 1])),
            ew(vec![64], load(x, &[0]), at(big, &[1])),
            ew(vec![16], ScalarExpr::Binary(BinaryOp::Add, Box::new(load(q, &[1])), Box::new(load(big, &[1]))), at(out, &[1])),
        ];
        let entry = Entry { name: "step".into(), kernels: vec![0, 1, 2, 3], results: vec![("out".into(), out)] };
        let mut p = Program { buffers, kernels, entries: vec![entry], params: vec![] };
        share_temporaries(&mut p);
        let (Kernel::MatMul(m), Kernel::Loop(add)) = (&p.kernels[0], &p.kernels[1]) else { unreachable!() };
        assert_eq!(add.out.buf, m.c.buf, "the add writes over the product's output: {:?}", p.kernels);
        assert_eq!(p.buffers[m.c.buf].name, "t");
    }

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
