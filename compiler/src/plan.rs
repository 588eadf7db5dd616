//! Memory planning: temporaries whose lifetimes never overlap share one buffer.
//!
//! A temporary lives, in each entry, from the first to the last kernel (in that entry's
//! order) that touches it, both ends included, so a kernel never reads and writes two
//! temporaries that share storage. Two temporaries may share a buffer only if their
//! lifetimes are disjoint in every entry. Entry results keep their own buffers (the
//! runtime reads them, with their shapes, after the entry ran). Greedy, largest first.

use bm_runtime::kir::{BufId, BufKind, Kernel, Program, ScalarExpr};
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
    let overlap = |a: BufId, b: BufId| {
        lifetimes.iter().any(|l| match (l[a], l[b]) {
            (Some((a0, a1)), Some((b0, b1))) => a0 <= b1 && b0 <= a1,
            _ => false,
        })
    };
    let mut temps: Vec<BufId> = (0..n).filter(|&b| p.buffers[b].kind == BufKind::Temp && !pinned.contains(&b)).collect();
    temps.sort_by_key(|&b| (std::cmp::Reverse(p.buffers[b].len()), b));
    // slots: (representative, members); the representative is the largest member.
    let mut slots: Vec<(BufId, Vec<BufId>)> = vec![];
    let mut rep = (0..n).collect::<Vec<BufId>>();
    for t in temps {
        let slot =
            slots.iter_mut().find(|(r, members)| p.buffers[*r].dtype == p.buffers[t].dtype && members.iter().all(|&m| !overlap(m, t)));
        match slot {
            Some((r, members)) => {
                members.push(t);
                rep[t] = *r;
            }
            None => slots.push((t, vec![t])),
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
