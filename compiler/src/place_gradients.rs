//! Attention's gradients placed where their readers want them, so that no copy runs.
//!
//! Kernel-level pass over the lowered program, run first (before fusion and planning).
//! The lowering writes an attention backward's dq, dk and dv packed into one buffer
//! (`AttentionBackwardKernel::packed`); a model that split q, k and v from one product
//! and its heads out of them (`qkv.split(3)`, `reshape`, `transpose`) then has three
//! loop kernels that only copy: each moves one gradient's heads back beside each other
//! into `[B, T, H·D]`, then the concat copies that into its third of the product's
//! gradient `[B, T, 3·H·D]`. Here each gradient's operand becomes the copy's
//! destination, seen through the gradient's own axes, and the copy goes; again, until
//! the gradients sit in the concat's buffer.
//!
//! The gradients of a backward `A` that share a buffer `S` are placed when:
//! - `S` is a temporary no entry returns, written by `A` alone, and read by as many
//!   kernels as it holds gradients, each a plain copy (`dst[..] = S[..]`: no reduction,
//!   side store, sum or accumulation) of exactly one of them: its source access walks
//!   that gradient's elements, each once, axis for axis (same extents and strides, axes
//!   of extent 1 aside), and its destination columns are contiguous;
//! - every entry runs `A` iff it runs the copies, and between `A` and each copy nothing
//!   but the other copies touches the copy's destination buffer (the copy's stores now
//!   happen at `A`), and `A` reads none of them.

use bm_runtime::kir::{Access, AttentionBackwardKernel, BufKind, Kernel, MatOperand, Program, ScalarExpr};

/// Places every eligible attention backward's gradients, again where a placed one is
/// copied on (the lowering materialises a permuted view, then the concat copies that);
/// returns how many copies went.
pub fn place_gradients(p: &mut Program) -> usize {
    let mut gone_in_all = 0;
    loop {
        let mut gone = vec![];
        for a in 0..p.kernels.len() {
            let Kernel::AttentionBackward(bk) = &p.kernels[a] else { continue };
            let bufs: Vec<usize> = bk.grads().iter().map(|g| g.1.buf).collect();
            for (i, &x) in bufs.iter().enumerate() {
                if bufs[..i].contains(&x) {
                    continue;
                }
                let Kernel::AttentionBackward(bk) = &p.kernels[a] else { unreachable!() };
                let Some((placed, copies)) = placement(p, a, bk, x) else { continue };
                if copies.iter().any(|c| gone.contains(c)) {
                    continue;
                }
                if let Kernel::AttentionBackward(bk) = &mut p.kernels[a] {
                    for (g, o) in placed {
                        *[&mut bk.dq, &mut bk.dk, &mut bk.dv][g] = o;
                    }
                    // Not written by the backward; kept naming a buffer it does write.
                    bk.fwd.out = bk.dq.clone();
                }
                gone.extend(copies);
            }
        }
        if gone.is_empty() {
            return gone_in_all;
        }
        gone_in_all += gone.len();
        gone.sort_unstable();
        p.remove_kernels(&gone);
    }
}

/// New operands for some gradients (by index: dq, dk, dv) and the copies they replace.
type Placement = (Vec<(usize, MatOperand)>, Vec<usize>);

/// The [`Placement`] of the gradients of `A` (kernel `a`) in buffer `x`, if they are
/// eligible.
fn placement(p: &Program, a: usize, bk: &AttentionBackwardKernel, x: usize) -> Option<Placement> {
    let pinned = p.entries.iter().any(|e| e.results.iter().any(|r| r.1 == x));
    if p.buffers[x].kind != BufKind::Temp || pinned {
        return None;
    }
    let here: Vec<usize> = (0..3).filter(|&g| bk.grads()[g].1.buf == x).collect();
    let touching: Vec<usize> = (0..p.kernels.len()).filter(|&k| k != a && touches(&p.kernels[k], x)).collect();
    if touching.len() != here.len() || touching.iter().any(|&k| p.kernels[k].writes().contains(&x)) {
        return None;
    }
    let mut placed: Vec<(usize, MatOperand)> = vec![];
    for &c in &touching {
        let (src, dst) = plain_copy(&p.kernels[c])?;
        let Kernel::Loop(l) = &p.kernels[c] else { return None };
        let (g, o) = here.iter().find_map(|&g| {
            let (_, o, rows, cols) = bk.grads()[g];
            Some((g, through(&bk.fwd.batch, rows, cols, o, &l.shape, src, dst)?))
        })?;
        if placed.iter().any(|(h, _)| *h == g) {
            return None;
        }
        placed.push((g, o));
    }
    let a_reads = p.kernels[a].reads();
    for &c in &touching {
        let Kernel::Loop(l) = &p.kernels[c] else { return None };
        let d = l.out.buf;
        if d == x || a_reads.contains(&d) {
            return None;
        }
        for e in &p.entries {
            let (at_a, at_c) = (e.kernels.iter().position(|&k| k == a), e.kernels.iter().position(|&k| k == c));
            match (at_a, at_c) {
                (None, None) => {}
                (Some(i), Some(j)) if i < j => {
                    let between = &e.kernels[i + 1..j];
                    if between.iter().any(|&k| !touching.contains(&k) && touches(&p.kernels[k], d)) {
                        return None;
                    }
                }
                _ => return None,
            }
        }
    }
    Some((placed, touching))
}

/// Whether kernel `k` reads or writes buffer `b`.
fn touches(k: &Kernel, b: usize) -> bool {
    k.reads().contains(&b) || k.writes().contains(&b)
}

/// A loop kernel that only copies: `(source, destination)`.
fn plain_copy(k: &Kernel) -> Option<(&Access, &Access)> {
    let Kernel::Loop(l) = k else { return None };
    if l.reduce.is_some() || !l.side.is_empty() || !l.sums.is_empty() || l.accumulate {
        return None;
    }
    match &l.body {
        ScalarExpr::Load(src) if src.buf != l.out.buf => Some((src, &l.out)),
        _ => None,
    }
}

/// The gradient `o` (`batch × rows × cols`) seen through a copy over `shape` from `src`
/// to `dst`, when the copy reads exactly its elements: every copy axis (extent above 1)
/// is split among the gradient's axes (extent above 1) whose source strides lie inside
/// it, as digits of one mixed-radix number (a `[B, H, T, D]` gradient read as
/// `[B, T, H, D]`, or its `H` and `D` as one axis of `H·D`), and each gradient axis takes
/// its copy axis's destination stride times its digit's weight (columns contiguous).
fn through(batch: &[usize], rows: usize, cols: usize, o: &MatOperand, shape: &[usize], src: &Access, dst: &Access) -> Option<MatOperand> {
    if src.buf != o.buf || src.offset != o.offset {
        return None;
    }
    let axes: Vec<(usize, usize)> =
        batch.iter().copied().zip(o.batch_strides.iter().copied()).chain([(rows, o.row_stride), (cols, o.col_stride)]).collect();
    // Each gradient axis's copy axis: the one with the largest source stride that
    // divides the axis's and spans it.
    let mut strides = vec![0; axes.len()];
    let mut inside: Vec<Vec<(usize, usize, usize)>> = vec![vec![]; shape.len()];
    for (at, &(extent, stride)) in axes.iter().enumerate() {
        if extent <= 1 {
            continue;
        }
        let i = (0..shape.len())
            .filter(|&i| shape[i] > 1 && src.strides[i] > 0 && stride % src.strides[i] == 0 && stride / src.strides[i] < shape[i])
            .max_by_key(|&i| src.strides[i])?;
        inside[i].push((stride / src.strides[i], extent, at));
    }
    for (i, digits) in inside.iter_mut().enumerate() {
        if shape[i] <= 1 {
            continue;
        }
        digits.sort_unstable();
        let mut weight = 1;
        for &(w, extent, at) in digits.iter() {
            if w != weight {
                return None;
            }
            strides[at] = dst.strides[i] * w;
            weight *= extent;
        }
        if weight != shape[i] {
            return None;
        }
    }
    let n = batch.len();
    let placed = MatOperand {
        buf: dst.buf,
        offset: dst.offset,
        batch_strides: strides[..n].to_vec(),
        row_stride: strides[n],
        col_stride: strides[n + 1],
    };
    (placed.col_stride == 1 || cols <= 1).then_some(placed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bm_runtime::kir::{AttentionKernel, Buffer, DType, Entry, LoopKernel};

    /// W2's pattern at a small size: q, k, v heads read from one `[B, T, 3·H·D]` product,
    /// the packed gradients copied back into its gradient's thirds.
    fn program(heads: usize) -> Program {
        let (b, t, h, d) = (2usize, 3usize, heads, 4usize);
        let c = h * d;
        let buf = |name: &str, len: usize| Buffer { name: name.into(), dtype: DType::F32, shape: vec![len], kind: BufKind::Temp };
        let qkv =
            |third: usize| MatOperand { buf: 0, offset: third * c, batch_strides: vec![t * 3 * c, d], row_stride: 3 * c, col_stride: 1 };
        let fwd = AttentionKernel {
            batch: vec![b, h],
            tq: t,
            tk: t,
            d,
            dv: d,
            q: qkv(0),
            k: qkv(1),
            v: qkv(2),
            mask: None,
            causal: true,
            scale: 0.5,
            out: MatOperand::dense(1, &[b, h], t, d),
            probs: None,
        };
        let dout = MatOperand::dense(2, &[b, h], t, d);
        let bk = AttentionBackwardKernel::packed(fwd.clone(), dout, 3);
        let n = b * h * t * d;
        // Copy `which` over [B, T, H, D]: from the packed [B, H, T, D] gradient into the
        // product's gradient (buffer 4) at third `which`.
        let copy = |which: usize| {
            let src = Access { buf: 3, offset: which * n, strides: vec![h * t * d, d, t * d, 1] };
            let dst = Access { buf: 4, offset: which * c, strides: vec![t * 3 * c, 3 * c, d, 1] };
            Kernel::Loop(LoopKernel::elementwise(vec![b, t, h, d], ScalarExpr::Load(src), dst))
        };
        Program {
            buffers: vec![buf("qkv", b * t * 3 * c), buf("out", n), buf("dout", n), buf("grads", 3 * n), buf("dqkv", b * t * 3 * c)],
            kernels: vec![Kernel::Attention(fwd), Kernel::AttentionBackward(bk), copy(0), copy(1), copy(2)],
            entries: vec![Entry { name: "grad".into(), kernels: vec![0, 1, 2, 3, 4], results: vec![] }],
            params: vec![],
        }
    }

    #[test]
    fn places_the_gradients_into_the_products_gradient() {
        for heads in [1, 2] {
            let mut p = program(heads);
            assert_eq!(place_gradients(&mut p), 3, "heads {heads}");
            assert_eq!(p.kernels.len(), 2);
            let Kernel::AttentionBackward(bk) = &p.kernels[1] else { panic!() };
            let (t, c) = (3, heads * 4);
            for (third, o) in [&bk.dq, &bk.dk, &bk.dv].into_iter().enumerate() {
                let want_batch = if heads > 1 { vec![t * 3 * c, 4] } else { vec![t * 3 * c, 0] };
                assert_eq!(*o, MatOperand { buf: 4, offset: third * c, batch_strides: want_batch, row_stride: 3 * c, col_stride: 1 });
            }
            assert_eq!(p.entries[0].kernels, vec![0, 1]);
        }
    }

    #[test]
    fn leaves_what_it_cannot_place() {
        // Something else reads the packed gradients.
        let mut p = program(2);
        p.kernels.push(Kernel::Loop(LoopKernel::elementwise(
            vec![4],
            ScalarExpr::Load(Access { buf: 3, offset: 0, strides: vec![1] }),
            Access { buf: 1, offset: 0, strides: vec![1] },
        )));
        p.entries[0].kernels.push(5);
        assert_eq!(place_gradients(&mut p), 0);
        // A copy that reads a gradient's elements twice (its column axis doubled).
        let mut p = program(2);
        if let Kernel::Loop(l) = &mut p.kernels[2]
            && let ScalarExpr::Load(src) = &mut l.body
        {
            src.strides[3] = 0;
        }
        assert_eq!(place_gradients(&mut p), 0);
        // Something touches the destination between the backward and a copy.
        let mut p = program(2);
        p.kernels.push(Kernel::Loop(LoopKernel::elementwise(
            vec![4],
            ScalarExpr::Load(Access { buf: 4, offset: 0, strides: vec![1] }),
            Access { buf: 1, offset: 0, strides: vec![1] },
        )));
        p.entries[0].kernels = vec![0, 1, 5, 2, 3, 4];
        assert_eq!(place_gradients(&mut p), 0);
        // The copies in another entry than the backward.
        let mut p = program(2);
        p.entries[0].kernels = vec![0, 1, 2, 3];
        p.entries.push(Entry { name: "other".into(), kernels: vec![4], results: vec![] });
        assert_eq!(place_gradients(&mut p), 0);
        // The packed gradients are an entry's result.
        let mut p = program(2);
        p.entries[0].results.push(("grads".into(), 3));
        assert_eq!(place_gradients(&mut p), 0);
    }
}
