//! Row groups: runs of consecutive kernels that run together, a chunk of rows at a time.
//!
//! Most kernels of a training step walk their tensors a row block at a time along their
//! outermost axis (the batch): a LayerNorm's six kernels, a matrix product and the bias
//! and GELU after it, the residual add and the next LayerNorm. Run one after the other,
//! each streams whole tensors through memory; a *row group* runs all of them on the
//! rows of one chunk before moving to the next chunk, so what one member writes the
//! next reads while it is still in cache, and the threads fork and join once per group
//! instead of once per kernel. A matrix product in a group computes the rows of its
//! output that the chunk covers (an epilogue is then just the next member), which is
//! how bias, activation and residual adds fuse with the GEMM's output pass.
//!
//! Running chunk by chunk is the same as running kernel by kernel when every buffer the
//! group writes is touched, by every member, only inside one block of elements per
//! outermost index (`[base + o·step, base + o·step + step)`, the same `base` and
//! `step` for every access): chunk `c` then reads exactly what the members before it
//! wrote for the same rows, and nothing another chunk writes. Buffers the group only
//! reads (weights, biases, masks) are unconstrained. A fused sum's buffer is written
//! after the group (its chunks' partial sums are combined then), so no member may touch
//! it. The chunks are [`FusedSum::chunks`] of the outermost axis, the same a kernel
//! with fused sums uses alone, so results do not depend on grouping or thread count
//! (a matrix product's rows are computed by the `gemm` crate a panel at a time, which
//! may block its sums differently from the whole product: the same to rounding).
//!
//! Threads take the chunks a *block* at a time: a run of consecutive chunks that every
//! member finishes before the next member starts (a loop kernel chunk by chunk, with
//! each chunk's own partial sums; a matrix product as one panel of the block's rows).
//! Blocks are the chunks themselves unless a product would get panels of fewer than
//! [`MIN_PANEL_ROWS`] rows: a small batch (W1's 128 rows, 16 chunks) runs as four
//! blocks of 32 rows, so W1's products join the bias and ReLU kernels around them.
//!
//! The schedule is a run-time decision over the final kernel IR (after memory
//! planning, so reused buffers are checked as they really are); the compiler and the
//! other backends do not see it.

use crate::kir::{Access, BufId, FusedSum, Kernel, LoopKernel, MatMulKernel, Program};

/// Fewest output rows of a matrix product per block. Panels run through `tiles`' 12-row
/// register tiles with `B` packed once for the group when there are at least two
/// blocks a thread, so 32-row panels lose little to their remainder strip (8 of 36 rows)
/// and give each thread two blocks to take on W1's 128 rows: the threads of a virtual
/// machine run at unequal, drifting speeds, and with one block each the step waits for
/// the slower (W1 0.30 → 0.27 ms on two threads, alternating steps; the same on one).
/// Below 32 the remainder strips cost more than the balance gains.
pub const MIN_PANEL_ROWS: usize = 32;

/// Fewest outermost indices of a group, so that its chunks balance across threads.
pub const MIN_OUTER: usize = 8;

/// One step of an entry's schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// A kernel run on its own.
    One(usize),
    /// Kernels run together, chunk by chunk.
    Group(Group),
    /// A step and, at the same time, a matrix product independent of it (neither writes
    /// what the other reads or writes): the two share the threads (`rayon::join`), so
    /// neither waits at its own join for the slower thread (see [`beside`]).
    Beside(Box<Step>, usize),
}

impl Step {
    /// The kernels the step runs, in order (a product run beside last).
    pub fn kernels(&self) -> Vec<usize> {
        match self {
            Step::One(k) => vec![*k],
            Step::Group(g) => g.kernels.clone(),
            Step::Beside(s, k) => s.kernels().into_iter().chain([*k]).collect(),
        }
    }

    /// The first kernel the step runs (profiles time a step under it).
    pub fn first(&self) -> usize {
        match self {
            Step::One(k) => *k,
            Step::Group(g) => g.kernels[0],
            Step::Beside(s, _) => s.first(),
        }
    }

    /// The row group the step runs, if any (beside a product or not).
    pub fn group(&self) -> Option<&Group> {
        match self {
            Step::Group(g) => Some(g),
            Step::Beside(s, _) => s.group(),
            Step::One(_) => None,
        }
    }
}

/// The buffers some kernels read and the buffers they write.
type Touches = (Vec<BufId>, Vec<BufId>);

fn touches(program: &Program, kernels: impl IntoIterator<Item = usize>) -> Touches {
    let mut t: Touches = (vec![], vec![]);
    for k in kernels {
        t.0.extend(program.kernels[k].reads());
        t.1.extend(program.kernels[k].writes());
    }
    t
}

/// Whether kernels touching `a` and kernels touching `b` may run in either order, or
/// at once: neither writes what the other reads or writes.
fn commute((ra, wa): &Touches, (rb, wb): &Touches) -> bool {
    !wa.iter().any(|x| rb.contains(x) || wb.contains(x)) && !wb.iter().any(|x| ra.contains(x))
}

/// Kernels (in entry order) that run chunk by chunk over `outer` outermost indices,
/// `blocks` runs of consecutive chunks at a time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub kernels: Vec<usize>,
    pub outer: usize,
    pub chunks: usize,
    pub blocks: usize,
}

impl Group {
    /// Outermost indices `lo..hi` of chunk `c`.
    pub fn chunk(&self, c: usize) -> (usize, usize) {
        part(self.outer, self.chunks, c)
    }
    /// Chunks `lo..hi` of block `b`.
    pub fn block(&self, b: usize) -> (usize, usize) {
        part(self.chunks, self.blocks, b)
    }
}

/// Part `i` of `n` near-equal parts of `0..len`.
fn part(len: usize, n: usize, i: usize) -> (usize, usize) {
    (len * i / n, len * (i + 1) / n)
}

/// The most blocks (at most `chunks`, at least 2) of `chunks` chunks of `outer`
/// outermost indices in which every block has at least `min` of them; `None` if two
/// blocks cannot.
fn blocks_of(outer: usize, chunks: usize, min: usize) -> Option<usize> {
    (2..=chunks).rev().find(|&b| {
        (0..b).all(|i| {
            let (c0, c1) = part(chunks, b, i);
            part(outer, chunks, c1 - 1).1 - part(outer, chunks, c0).0 >= min
        })
    })
}

/// The elements one access touches at outermost index `o`: inside
/// `[base + o·step, base + o·step + len)`.
#[derive(Clone, Copy, Debug)]
struct Rows {
    buf: BufId,
    base: usize,
    step: usize,
    len: usize,
    write: bool,
}

/// The elements of `a` over `shape` (axis 0 outermost) as [`Rows`].
fn access_rows(a: &Access, shape: &[usize], write: bool) -> Rows {
    let len =
        if shape[1..].contains(&0) { 0 } else { 1 + shape[1..].iter().zip(&a.strides[1..]).map(|(&n, &s)| (n - 1) * s).sum::<usize>() };
    Rows { buf: a.buf, base: a.offset, step: a.strides[0], len, write }
}

/// A loop kernel's accesses and the buffers of its fused sums.
fn loop_rows(k: &LoopKernel) -> (Vec<Rows>, Vec<BufId>) {
    let mut rows = vec![];
    let mut load = |a: &Access| rows.push(access_rows(a, &k.shape, false));
    k.body.for_each_load(&mut load);
    for s in &k.side {
        s.value.for_each_load(&mut load);
    }
    for s in &k.sums {
        s.value.for_each_load(&mut load);
    }
    rows.push(access_rows(&k.out, &k.shape, true));
    rows.extend(k.side.iter().map(|s| access_rows(&s.into, &k.shape, true)));
    (rows, k.sums.iter().map(|s| s.into.buf).collect())
}

/// A matrix product's accesses when its output rows split into `outer` blocks of
/// `m / outer` (the second operand is read whole by every block: step 0).
fn matmul_rows(k: &MatMulKernel, outer: usize) -> Vec<Rows> {
    let r = k.m / outer;
    let block = |o: &crate::kir::MatOperand, cols: usize, write: bool| Rows {
        buf: o.buf,
        base: o.offset,
        step: r * o.row_stride,
        len: (r - 1) * o.row_stride + (cols - 1) * o.col_stride + 1,
        write,
    };
    let b = &k.b;
    let whole = Rows { buf: b.buf, base: b.offset, step: 0, len: (k.k - 1) * b.row_stride + (k.n - 1) * b.col_stride + 1, write: false };
    vec![block(&k.a, k.k, false), whole, block(&k.c, k.n, true)]
}

/// How a kernel may take part in a group.
enum Candidate<'a> {
    /// A loop kernel over `outer` outermost indices that can split them across threads.
    Loop {
        outer: usize,
        rows: Vec<Rows>,
        sums: Vec<BufId>,
    },
    /// A plain f32 matrix product without batch axes.
    MatMul(&'a MatMulKernel),
    No,
}

fn candidate(k: &Kernel) -> Candidate<'_> {
    match k {
        // A loop that reduces every axis runs over a leading axis of 1 (`jit::normalize`).
        Kernel::Loop(l) if !l.shape.is_empty() && l.reduce.is_none_or(|_| l.reduced_dims < l.shape.len()) && crate::exec::splittable(l) => {
            let (rows, sums) = loop_rows(l);
            Candidate::Loop { outer: l.shape[0], rows, sums }
        }
        Kernel::MatMul(m) if m.batch.is_empty() && !m.bf16 && m.m > 0 && m.n > 0 && m.k > 0 => Candidate::MatMul(m),
        _ => Candidate::No,
    }
}

/// Whether `members` can run as one group: `Some(Some((outer, blocks)))` if so,
/// `Some(None)` if they are matrix products only (a group needs a loop kernel to set its
/// rows, and may still get one), `None` if they cannot.
fn check(members: &[&Candidate]) -> Option<Option<(usize, usize)>> {
    let outer = members.iter().find_map(|c| match c {
        Candidate::Loop { outer, .. } => Some(*outer),
        _ => None,
    });
    let Some(outer) = outer else {
        return members.iter().all(|c| matches!(c, Candidate::MatMul(_))).then_some(None);
    };
    if outer < MIN_OUTER {
        return None;
    }
    let chunks = FusedSum::chunks(outer);
    // Outermost indices a block needs so that every product's panel has at least
    // MIN_PANEL_ROWS rows.
    let mut need = 1;
    let mut rows = vec![];
    let mut sums = vec![];
    for c in members {
        match c {
            Candidate::Loop { outer: o, rows: r, sums: s } => {
                if *o != outer {
                    return None;
                }
                rows.extend_from_slice(r);
                sums.extend_from_slice(s);
            }
            Candidate::MatMul(m) => {
                if m.m % outer != 0 {
                    return None;
                }
                need = need.max(MIN_PANEL_ROWS.div_ceil(m.m / outer));
                rows.extend(matmul_rows(m, outer));
            }
            Candidate::No => return None,
        }
    }
    // A fused sum's buffer is written after the group (the members' sums combined in
    // member order, as one by one): no load or store may touch it.
    if sums.iter().any(|&s| rows.iter().any(|r| r.buf == s)) {
        return None;
    }
    // Every access to a buffer the group writes stays in the same block per index.
    let mut written: Vec<BufId> = rows.iter().filter(|r| r.write).map(|r| r.buf).collect();
    written.sort_unstable();
    written.dedup();
    for b in written {
        let on_b = || rows.iter().filter(|r| r.buf == b);
        let step = on_b().next().map_or(0, |r| r.step);
        let base = on_b().map(|r| r.base).min().unwrap_or(0);
        let end = on_b().map(|r| r.base + r.len).max().unwrap_or(0);
        if step == 0 || on_b().any(|r| r.step != step) || end - base > step {
            return None;
        }
    }
    let blocks = if need > 1 { blocks_of(outer, chunks, need)? } else { chunks };
    Some(Some((outer, blocks)))
}

/// Kernels a group may run ahead of: a kernel that cannot join (a weight gradient's
/// product between a GELU's input gradient and the GELU) runs after the group when
/// nothing the group runs later touches what it writes or writes what it touches.
pub const MAX_DEFERRED: usize = 2;

/// The schedule of entry kernels `kernels`: groups of two or more (at least one loop
/// kernel) formed greedily in entry order, a kernel that cannot join deferred past the
/// group when independent of the members that overtake it; the rest one by one.
pub fn schedule(program: &Program, kernels: &[usize]) -> Vec<Step> {
    let n = kernels.len();
    let cands: Vec<Candidate> = kernels.iter().map(|&k| candidate(&program.kernels[k])).collect();
    let access: Vec<Touches> = kernels.iter().map(|&k| touches(program, [k])).collect();
    // Whether entry positions `a` and `b` may run in either order.
    let commute = |a: usize, b: usize| commute(&access[a], &access[b]);
    let mut steps = vec![];
    let mut i = 0;
    while i < n {
        let Some(mut outer) = check(&[&cands[i]]) else {
            steps.push(Step::One(kernels[i]));
            i += 1;
            continue;
        };
        let mut members = vec![i];
        let mut deferred: Vec<usize> = vec![];
        let mut j = i + 1;
        while j < n {
            let joins = deferred.iter().all(|&d| commute(d, j)) && {
                let trial: Vec<&Candidate> = members.iter().chain([&j]).map(|&m| &cands[m]).collect();
                check(&trial).map(|o| outer = o).is_some()
            };
            if joins {
                members.push(j);
            } else if deferred.len() < MAX_DEFERRED {
                deferred.push(j);
            } else {
                break;
            }
            j += 1;
        }
        // Kernels passed over after the last member stay where they are.
        let last = *members.last().expect("a member");
        deferred.retain(|&d| d < last);
        match outer {
            Some((outer, blocks)) if members.len() >= 2 => {
                let ids = members.iter().map(|&m| kernels[m]).collect();
                steps.push(Step::Group(Group { kernels: ids, outer, chunks: FusedSum::chunks(outer), blocks }));
                steps.extend(deferred.iter().map(|&d| Step::One(kernels[d])));
                i = last + 1;
            }
            _ => {
                steps.push(Step::One(kernels[i]));
                i += 1;
            }
        }
    }
    steps
}

/// `steps` with each matrix product that may run beside another step ([`worth_beside`])
/// and is independent of the step before it run beside that step ([`Step::Beside`]): a
/// weight gradient `dW = xᵀ dy` beside the input gradient `dx = dy Wᵀ` (and the kernels
/// grouped with it) that precedes it. Only adjacent steps pair, so the order of
/// everything else stays.
pub fn beside(program: &Program, steps: Vec<Step>) -> Vec<Step> {
    let mut out: Vec<Step> = Vec::with_capacity(steps.len());
    for s in steps {
        if let (&Step::One(k), Some(prev)) = (&s, out.last())
            && !matches!(prev, Step::Beside(..))
            && worth_beside(program, k)
            && commute(&touches(program, prev.kernels()), &touches(program, [k]))
        {
            let prev = out.pop().expect("a step before");
            out.push(Step::Beside(Box::new(prev), k));
            continue;
        }
        out.push(s);
    }
    out
}

/// Whether kernel `k` of `program` may run beside another step: an f32 product (a
/// `bf16` one reads rounded copies of its operands through the buffers) large enough to
/// use the threads.
fn worth_beside(program: &Program, k: usize) -> bool {
    match &program.kernels[k] {
        Kernel::MatMul(m) => !m.bf16 && m.m * m.n * m.k * m.batch.iter().product::<usize>() >= crate::gemm::PARALLEL_FLOPS,
        _ => false,
    }
}

/// The schedule the CPU executor runs entry `entry` of `program` with (`None` if there
/// is no such entry): what `bmc info` reports.
pub fn schedule_entry(program: &Program, entry: &str) -> Option<Vec<Step>> {
    let steps = schedule(program, &program.entry(entry)?.kernels);
    Some(beside(program, steps))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::Executor;
    use crate::exec::test_support::*;
    use crate::kir::{BinaryOp, DType, MatOperand, ReduceOp, ScalarExpr, UnaryOp};

    const B: usize = 16; // outermost extent
    const T: usize = 4;
    const D: usize = 64;

    fn at(buf: BufId, offset: usize, strides: &[usize]) -> Access {
        Access { buf, offset, strides: strides.to_vec() }
    }
    fn load(buf: BufId, offset: usize, strides: &[usize]) -> ScalarExpr {
        ScalarExpr::Load(at(buf, offset, strides))
    }
    fn ew(body: ScalarExpr, out: Access) -> Kernel {
        Kernel::Loop(LoopKernel::elementwise(vec![B, T, D], body, out))
    }
    const ROWS: [usize; 3] = [T * D, D, 1];

    /// A LayerNorm-like chain: `b1 = 2·b0`, `b2 = Σ_row b1`, `b3 = b1 − b2`.
    fn chain(shift_read: usize) -> Vec<Kernel> {
        let twice = ScalarExpr::Binary(BinaryOp::Mul, Box::new(load(0, 0, &ROWS)), Box::new(ScalarExpr::Const(2.0)));
        let sum = LoopKernel {
            shape: vec![B, T, D],
            reduce: Some(ReduceOp::Sum),
            reduced_dims: 1,
            body: load(1, 0, &ROWS),
            out: at(2, 0, &[T, 1, 0]),
            accumulate: false,
            side: vec![],
            sums: vec![],
        };
        let centre = ScalarExpr::Binary(BinaryOp::Sub, Box::new(load(1, shift_read, &ROWS)), Box::new(load(2, 0, &[T, 1, 0])));
        vec![ew(twice, at(1, 0, &ROWS)), Kernel::Loop(sum), ew(centre, at(3, 0, &ROWS))]
    }

    fn buffers() -> Vec<crate::kir::Buffer> {
        let n = B * T * D;
        vec![buf("x", DType::F32, n + T * D), buf("y", DType::F32, n + T * D), buf("s", DType::F32, B * T), buf("z", DType::F32, n)]
    }

    /// Runs `main` with row groups and one kernel at a time, from the same random
    /// contents; asserts `groups` groups formed and that the results agree bit for bit
    /// (to 1e-5 with a matrix product: a panel may block its sums differently).
    fn same_as_one_by_one(p: &Program, threads: usize, groups: usize) {
        let mut grouped = Executor::new(p, threads).unwrap();
        grouped.set_row_groups(true);
        assert_eq!(grouped.groups().count(), groups, "{}", p.to_text());
        let mut alone = Executor::new(p, threads).unwrap();
        alone.set_row_groups(false);
        assert_eq!(alone.groups().count(), 0);
        fill(grouped.buffers_mut(), 9, true);
        fill(alone.buffers_mut(), 9, true);
        grouped.run("main").unwrap();
        alone.run("main").unwrap();
        let gemm = p.kernels.iter().any(|k| matches!(k, Kernel::MatMul(_)));
        assert_same(grouped.buffers(), alone.buffers(), if gemm { 1e-5 } else { 0.0 }, &p.to_text());
    }

    fn steps_of(p: &Program) -> Vec<Step> {
        let e = &p.entries[0];
        groups::schedule(p, &e.kernels)
    }
    use crate::groups;

    #[test]
    fn a_row_local_chain_is_one_group_and_runs_as_the_interpreter() {
        let p = program(buffers(), chain(0));
        assert_eq!(steps_of(&p), vec![Step::Group(Group { kernels: vec![0, 1, 2], outer: B, chunks: 16, blocks: 16 })]);
        for threads in [1, 2, 3] {
            same_as_one_by_one(&p, threads, 1);
        }
        check_jit(&p, 7, 2, true, 1e-5);
    }

    #[test]
    fn reading_another_rows_block_splits_the_group() {
        // The last kernel reads b1 one outermost index ahead: a later chunk's rows.
        let p = program(buffers(), chain(T * D));
        let steps = steps_of(&p);
        assert!(steps.iter().all(|s| !matches!(s, Step::Group(g) if g.kernels.contains(&0) && g.kernels.contains(&2))), "{steps:?}");
        same_as_one_by_one(&p, 2, 1);
    }

    #[test]
    fn a_buffer_walked_with_another_row_step_splits_the_group() {
        // b1 written as [B, T·D] rows, then read as [B/2, 2·T·D]-sized blocks (step twice as large).
        let mut ks = chain(0);
        ks.push(Kernel::Loop(LoopKernel::elementwise(vec![B / 2, 2 * T * D], load(1, 0, &[2 * T * D, 1]), at(3, 0, &[2 * T * D, 1]))));
        let p = program(buffers(), ks);
        let steps = steps_of(&p);
        assert_eq!(steps.len(), 2, "{steps:?}");
        assert_eq!(steps[1], Step::One(3));
    }

    #[test]
    fn a_fused_sum_read_inside_the_group_splits_it() {
        // Kernel 0 sums b0 over the outermost axis into b2 (written after its chunks);
        // kernel 1 reads b2: it must see the finished sum.
        let mut k0 = LoopKernel::elementwise(vec![B, T, D], load(0, 0, &ROWS), at(1, 0, &ROWS));
        k0.sums.push(FusedSum { value: load(0, 0, &ROWS), into: at(3, 0, &[0, D, 1]), accumulate: false });
        let k1 = LoopKernel::elementwise(vec![B, T, D], load(3, 0, &[0, D, 1]), at(2, 0, &[0, 0, 0]));
        let bufs =
            vec![buf("x", DType::F32, B * T * D), buf("y", DType::F32, B * T * D), buf("s", DType::F32, 1), buf("z", DType::F32, T * D)];
        // k1 writes one element from every point: not splittable, so make it row-local instead.
        let k1 = LoopKernel { out: at(1, 0, &ROWS), ..k1 };
        let p = program(bufs, vec![Kernel::Loop(k0), Kernel::Loop(k1)]);
        assert_eq!(steps_of(&p), vec![Step::One(0), Step::One(1)]);
        same_as_one_by_one(&p, 2, 0);
    }

    /// `b4 = gelu(b1 @ W)` where `b1 = 2·b0` (rows `B·T·…`), W = b5: a prologue, a matrix
    /// product and an epilogue; with `write_w`, the first kernel also writes W.
    fn gemm_program(rows_per_index: usize, write_w: bool) -> Program {
        let (m, k, n) = (B * rows_per_index, 32, 48);
        let rows = [rows_per_index * k, k, 1];
        let twice = ScalarExpr::Binary(BinaryOp::Mul, Box::new(load(0, 0, &rows)), Box::new(ScalarExpr::Const(2.0)));
        let mut k0 = LoopKernel::elementwise(vec![B, rows_per_index, k], twice, at(1, 0, &rows));
        if write_w {
            k0.side.push(crate::kir::SideStore { value: load(0, 0, &rows), into: at(5, 0, &rows) });
        }
        let mm = crate::kir::MatMulKernel {
            batch: vec![],
            m,
            n,
            k,
            a: MatOperand { buf: 1, offset: 0, batch_strides: vec![], row_stride: k, col_stride: 1 },
            b: MatOperand { buf: 5, offset: 0, batch_strides: vec![], row_stride: n, col_stride: 1 },
            c: MatOperand { buf: 2, offset: 0, batch_strides: vec![], row_stride: n, col_stride: 1 },
            accumulate: false,
            bf16: false,
        };
        let out_rows = [rows_per_index * n, n, 1];
        let k2 = LoopKernel::elementwise(
            vec![B, rows_per_index, n],
            ScalarExpr::Unary(UnaryOp::GeluTanh, Box::new(load(2, 0, &out_rows))),
            at(4, 0, &out_rows),
        );
        let bufs = vec![
            buf("x", DType::F32, m * k),
            buf("a", DType::F32, m * k),
            buf("c", DType::F32, m * n),
            buf("unused", DType::F32, 1),
            buf("y", DType::F32, m * n),
            buf("w", DType::F32, (m * k).max(k * n)),
        ];
        program(bufs, vec![Kernel::Loop(k0), Kernel::MatMul(mm), Kernel::Loop(k2)])
    }

    /// The chain above, then a weight gradient `xᵀ y` (x: b0 as B·T rows of D, its
    /// first 60 columns, y: b4), or `b3ᵀ y` of the chain's output (`reads_chain`). Its
    /// 60 rows do not split into the group's 16 blocks, so it cannot join the group.
    fn chain_then_product(reads_chain: bool) -> Program {
        let mut ks = chain(0);
        let (m, n) = (60, 2 * D);
        ks.push(Kernel::MatMul(crate::kir::MatMulKernel {
            batch: vec![],
            m,
            n,
            k: B * T,
            a: MatOperand { buf: if reads_chain { 3 } else { 0 }, offset: 0, batch_strides: vec![], row_stride: 1, col_stride: D },
            b: MatOperand { buf: 4, offset: 0, batch_strides: vec![], row_stride: n, col_stride: 1 },
            c: MatOperand { buf: 5, offset: 0, batch_strides: vec![], row_stride: n, col_stride: 1 },
            accumulate: false,
            bf16: false,
        }));
        let mut bufs = buffers();
        bufs.extend([buf("y", DType::F32, B * T * n), buf("dw", DType::F32, m * n)]);
        program(bufs, ks)
    }

    /// A product independent of the group before it runs beside it (and the results are
    /// the same as one after the other, on one thread and on two); one that reads the
    /// group's output waits for it.
    #[test]
    fn an_independent_product_runs_beside_the_step_before_it() {
        let group = Step::Group(Group { kernels: vec![0, 1, 2], outer: B, chunks: 16, blocks: 16 });
        let p = chain_then_product(false);
        let paired = schedule_entry(&p, "main").unwrap();
        assert_eq!(paired, vec![Step::Beside(Box::new(group.clone()), 3)]);
        assert_eq!(paired[0].kernels(), [0, 1, 2, 3]);
        for threads in [1, 2] {
            let run = |beside: bool| {
                let mut e = Executor::new(&p, threads).unwrap();
                e.set_beside(beside);
                assert_eq!(e.step_led_by(0).is_some_and(|s| matches!(s, Step::Beside(..))), beside);
                fill(e.buffers_mut(), 5, false);
                e.run("main").unwrap();
                e.buffers().clone()
            };
            assert_same(&run(false), &run(true), 1e-5, &p.to_text());
        }
        let dependent = chain_then_product(true);
        assert_eq!(schedule_entry(&dependent, "main").unwrap(), vec![group, Step::One(3)]);
    }

    #[test]
    fn a_matrix_product_joins_its_prologue_and_epilogue() {
        let p = gemm_program(MIN_PANEL_ROWS, false);
        assert_eq!(steps_of(&p), vec![Step::Group(Group { kernels: vec![0, 1, 2], outer: B, chunks: 16, blocks: 16 })]);
        for threads in [1, 2] {
            same_as_one_by_one(&p, threads, 1);
            check_jit(&p, 11, threads, false, 1e-5);
        }
    }

    /// With 32 rows a chunk, the product's panels take two chunks each: 8 blocks of the
    /// 16 chunks, every loop member still chunk by chunk with its own partial sums (the
    /// prologue here also sums its input's columns: bit for bit as one by one).
    #[test]
    fn short_panels_take_blocks_of_chunks() {
        let mut p = gemm_program(MIN_PANEL_ROWS / 2, false);
        let k = 32;
        if let Kernel::Loop(l) = &mut p.kernels[0] {
            l.sums.push(FusedSum { value: load(0, 0, &[MIN_PANEL_ROWS / 2 * k, k, 1]), into: at(6, 0, &[0, 0, 1]), accumulate: false });
        }
        p.buffers.push(buf("colsum", DType::F32, k));
        assert_eq!(steps_of(&p), vec![Step::Group(Group { kernels: vec![0, 1, 2], outer: B, chunks: 16, blocks: 8 })]);
        for threads in [1, 2, 3] {
            same_as_one_by_one(&p, threads, 1);
            check_jit(&p, 12, threads, false, 1e-5);
            let sums = |grouped: bool| {
                let mut e = Executor::new(&p, threads).unwrap();
                e.set_row_groups(grouped);
                fill(e.buffers_mut(), 5, false);
                e.run("main").unwrap();
                e.f32(6).unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            };
            assert_eq!(sums(true), sums(false));
        }
    }

    #[test]
    fn blocks_keep_min_rows() {
        assert_eq!(blocks_of(16, 16, 1), Some(16));
        assert_eq!(blocks_of(16, 16, 2), Some(8));
        assert_eq!(blocks_of(16, 16, 3), Some(5)); // chunks 3,3,3,3,4 of one index each
        assert_eq!(blocks_of(128, 16, 64), Some(2));
        assert_eq!(blocks_of(128, 16, 65), None);
        // Chunks of 10 indices in 8 hold 1 or 2; three blocks would leave the first 2.
        assert_eq!(blocks_of(10, 8, 3), Some(2));
    }

    #[test]
    fn a_matrix_product_stays_out_when_its_panels_are_small_or_its_weights_are_written() {
        // At most two blocks of 8 indices · 2 rows: 16-row panels, too short.
        let small = gemm_program(2, false);
        assert_eq!(steps_of(&small), vec![Step::One(0), Step::One(1), Step::One(2)]);
        let written = gemm_program(MIN_PANEL_ROWS, true);
        let steps = steps_of(&written);
        assert_eq!(steps[0], Step::One(0), "{steps:?}");
        same_as_one_by_one(&written, 2, 1);
    }

    /// The chain with another kernel (another outermost extent, so it cannot join)
    /// before its last kernel: reading b4, or with `dependent` b3, which the chain's last
    /// kernel writes.
    fn chain_with_interloper(dependent: bool) -> Program {
        let mut ks = chain(0);
        let src = if dependent { 3 } else { 4 };
        let other = Kernel::Loop(LoopKernel::elementwise(vec![2, 8], load(src, 0, &[8, 1]), at(5, 0, &[8, 1])));
        ks.insert(2, other);
        let mut bufs = buffers();
        bufs.push(buf("u", DType::F32, 16));
        bufs.push(buf("v", DType::F32, 16));
        program(bufs, ks)
    }

    #[test]
    fn an_independent_kernel_runs_after_the_group_it_interrupts() {
        let p = chain_with_interloper(false);
        assert_eq!(steps_of(&p), vec![Step::Group(Group { kernels: vec![0, 1, 3], outer: B, chunks: 16, blocks: 16 }), Step::One(2)]);
        same_as_one_by_one(&p, 2, 1);
        // Kernel 2 writes b5; were kernel 3 to read b5 it could not overtake it.
        let mut q = chain_with_interloper(false);
        if let Kernel::Loop(l) = &mut q.kernels[3] {
            l.body = ScalarExpr::Binary(BinaryOp::Add, Box::new(l.body.clone()), Box::new(load(5, 0, &[0, 0, 0])));
        }
        assert_eq!(steps_of(&q)[0], Step::Group(Group { kernels: vec![0, 1], outer: B, chunks: 16, blocks: 16 }));
        same_as_one_by_one(&q, 2, 1);
    }

    #[test]
    fn a_kernel_is_not_overtaken_by_one_writing_what_it_reads() {
        // Kernel 2 reads b3, which kernel 3 (a would-be member) writes.
        let p = chain_with_interloper(true);
        assert_eq!(
            steps_of(&p),
            vec![Step::Group(Group { kernels: vec![0, 1], outer: B, chunks: 16, blocks: 16 }), Step::One(2), Step::One(3)]
        );
        same_as_one_by_one(&p, 2, 1);
    }

    /// A random chain of loop kernels over `[O, R, C]` on four buffers: loads and
    /// stores in the row block of their index, one block ahead, shifted by a row (across
    /// the block boundary) or broadcast over the outermost axis; some row reductions.
    fn random_chain(seed: u64) -> Program {
        const O: usize = 16;
        const R: usize = 3;
        const C: usize = 8;
        let mut r = Rng::new(seed);
        let len = (O + 1) * R * C;
        let rows = [R * C, C, 1];
        let pick_load = |r: &mut Rng| {
            let b = r.below(4);
            match r.below(6) {
                0 => load(b, R * C, &rows),
                1 => load(b, C, &rows),
                2 => load(b, 0, &[0, C, 1]),
                _ => load(b, 0, &rows),
            }
        };
        let n = 2 + r.below(5);
        let mut kernels = vec![];
        for _ in 0..n {
            let a = pick_load(&mut r);
            let b = pick_load(&mut r);
            let body = ScalarExpr::Binary(if r.chance(1, 2) { BinaryOp::Add } else { BinaryOp::Mul }, Box::new(a), Box::new(b));
            let reduce = r.chance(1, 4);
            let out_buf = r.below(4);
            // Loads of the output buffer must read the point written (in place) for the
            // kernel to split across threads: retarget them.
            let out = if reduce {
                at(out_buf, 0, &[R, 1, 0])
            } else if r.chance(1, 5) {
                at(out_buf, C, &rows)
            } else {
                at(out_buf, 0, &rows)
            };
            let body = body.map_loads(&|l: &Access| if l.buf == out_buf { Access { buf: 4, ..l.clone() } } else { l.clone() }, &|i| i);
            kernels.push(Kernel::Loop(LoopKernel {
                shape: vec![O, R, C],
                reduce: reduce.then_some(ReduceOp::Sum),
                reduced_dims: usize::from(reduce),
                body,
                out,
                accumulate: false,
                side: vec![],
                sums: vec![],
            }));
        }
        let bufs = (0..5).map(|i| buf(&format!("t{i}"), DType::F32, len)).collect();
        program(bufs, kernels)
    }

    #[test]
    fn random_chains_run_as_they_do_one_by_one() {
        let mut grouped = 0;
        for seed in 0..300 {
            let p = random_chain(seed);
            let mut a = Executor::new(&p, 2).unwrap();
            grouped += a.groups().count();
            let mut b = Executor::new(&p, 2).unwrap();
            b.set_row_groups(false);
            fill(a.buffers_mut(), seed, true);
            fill(b.buffers_mut(), seed, true);
            a.run("main").unwrap();
            b.run("main").unwrap();
            assert_same(a.buffers(), b.buffers(), 0.0, &p.to_text());
        }
        // The generator is worth running only if it makes groups (and hazards).
        assert!(grouped > 100, "{grouped} groups");
    }

    #[test]
    fn short_outermost_axes_do_not_group() {
        let k = |b: BufId, o: BufId| Kernel::Loop(LoopKernel::elementwise(vec![MIN_OUTER - 1, 8], load(b, 0, &[8, 1]), at(o, 0, &[8, 1])));
        let p = program(vec![buf("x", DType::F32, 64), buf("y", DType::F32, 64), buf("z", DType::F32, 64)], vec![k(0, 1), k(1, 2)]);
        assert_eq!(steps_of(&p), vec![Step::One(0), Step::One(1)]);
    }
}
