//! Lowering: the training graph to the kernel IR.
//!
//! Every node becomes either a *view* of an existing value (broadcast, permute,
//! slice, contiguous reshape: no kernel, just strides and an offset; constants and
//! iotas are views that need no buffer at all) or one or more kernels writing a new
//! buffer. Entries are the dependency closures of their results; `Assign`s run at the
//! end of `train_step`, after every read of the values they overwrite.

use crate::graph::{DType, Graph, NodeId, Op};
use crate::timings::timed;
use bm_runtime::kir::{
    self, Access, AttentionBackwardKernel, AttentionKernel, BufId, BufKind, Buffer, Entry, GatherKernel, Kernel, LoopKernel, MatMulKernel,
    MatOperand, ParamSpec, Program, ScalarExpr, ScatterAddKernel,
};
use std::collections::{HashMap, HashSet};

/// Where a node's value lives.
#[derive(Clone, Debug, PartialEq)]
enum Src {
    Buf(BufId),
    Const(f64),
    /// Value = offset + Σ index_d * strides_d.
    Iota,
    /// An elementwise value not stored anywhere: the expression over the node's own
    /// iteration space, inlined into its single consumer (loop fusion at lowering).
    /// The second field is the producer's shape, the space the expression is over.
    Lazy(Box<ScalarExpr>, Vec<usize>),
}

#[derive(Clone, Debug, PartialEq)]
struct View {
    src: Src,
    offset: usize,
    shape: Vec<usize>,
    strides: Vec<usize>,
}

/// The strides that read a view of `shape`/`strides` reshaped to `new` (same elements in
/// row-major order) without a copy, if there are any: every group of old axes merged
/// into (or split from) new axes must be contiguous among itself (NumPy's no-copy
/// reshape). `None` when the reshape needs a copy.
fn reshape_strides(shape: &[usize], strides: &[usize], new: &[usize]) -> Option<Vec<usize>> {
    if shape.contains(&0) || new.contains(&0) {
        return None;
    }
    let old: Vec<(usize, usize)> = shape.iter().copied().zip(strides.iter().copied()).filter(|&(d, _)| d != 1).collect();
    let mut out = vec![0; new.len()];
    let (mut oi, mut ni) = (0, 0);
    while oi < old.len() && ni < new.len() {
        let (mut oj, mut nj) = (oi + 1, ni + 1);
        let (mut op, mut np) = (old[oi].0, new[ni]);
        while op != np {
            if np < op {
                np *= *new.get(nj)?;
                nj += 1;
            } else {
                op *= old.get(oj)?.0;
                oj += 1;
            }
        }
        for k in oi..oj - 1 {
            if old[k].1 != old[k + 1].0 * old[k + 1].1 {
                return None;
            }
        }
        out[nj - 1] = old[oj - 1].1;
        for k in (ni + 1..nj).rev() {
            out[k - 1] = out[k] * new[k];
        }
        (oi, ni) = (oj, nj);
    }
    // Trailing size-1 axes of `new` keep stride 0; any other leftover is a mismatch.
    (oi == old.len() && new[ni..].iter().all(|&d| d == 1)).then_some(out)
}

fn row_major(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![0; shape.len()];
    let mut acc = 1;
    for i in (0..shape.len()).rev() {
        s[i] = acc;
        acc *= shape[i];
    }
    s
}

impl View {
    fn contiguous(src: Src, shape: &[usize]) -> View {
        View { src, offset: 0, shape: shape.to_vec(), strides: row_major(shape) }
    }
    fn is_contiguous(&self) -> bool {
        self.shape.iter().zip(&self.strides).zip(row_major(&self.shape)).all(|((&d, &s), r)| d <= 1 || s == r)
    }
    fn expr(&self) -> ScalarExpr {
        match &self.src {
            Src::Lazy(..) => unreachable!("lazy values are read through Lowering::read"),
            Src::Const(v) => ScalarExpr::Const(*v as f32),
            Src::Buf(b) => ScalarExpr::Load(Access { buf: *b, offset: self.offset, strides: self.strides.clone() }),
            Src::Iota => {
                let mut e = ScalarExpr::Const(self.offset as f32);
                for (d, &s) in self.strides.iter().enumerate() {
                    if s != 0 && self.shape[d] > 1 {
                        let term = if s == 1 {
                            ScalarExpr::Index(d)
                        } else {
                            ScalarExpr::Binary(kir::BinaryOp::Mul, Box::new(ScalarExpr::Index(d)), Box::new(ScalarExpr::Const(s as f32)))
                        };
                        e = if e == ScalarExpr::Const(0.0) {
                            term
                        } else {
                            ScalarExpr::Binary(kir::BinaryOp::Add, Box::new(e), Box::new(term))
                        };
                    }
                }
                e
            }
        }
    }
}

struct Lowering<'g> {
    g: &'g Graph,
    buffers: Vec<Buffer>,
    kernels: Vec<Kernel>,
    /// The kernels each node emitted.
    node_kernels: Vec<Vec<usize>>,
    views: Vec<Option<View>>,
    assigns: Vec<(NodeId, usize)>,
    /// Kernels copying a result that is a view into a whole buffer, run only by the
    /// entries that return it.
    result_kernels: Vec<(NodeId, usize)>,
    /// `sum over batch of a @ b` computed by one GEMM at the matmul: the reduce node's
    /// value (see `MatMul` lowering).
    folded_sums: HashMap<NodeId, View>,
    /// The graph's outputs (indexed: asked for every node).
    is_output: Vec<bool>,
    /// Parameter and optimiser-state buffers by name, for `Assign`.
    assignable: HashMap<String, BufId>,
    /// The buffer where an `Attention` node with a backward keeps its probabilities.
    attention_probs: HashMap<NodeId, BufId>,
}

/// Lowers a training graph (or a forward-only graph) to a program.
pub fn lower(g: &Graph) -> Result<Program, String> {
    let mut l = Lowering {
        g,
        buffers: vec![],
        kernels: vec![],
        node_kernels: vec![vec![]; g.len()],
        views: vec![None; g.len()],
        assigns: vec![],
        result_kernels: vec![],
        folded_sums: HashMap::new(),
        is_output: {
            let mut o = vec![false; g.len()];
            g.outputs.iter().for_each(|(_, id)| o[id.index()] = true);
            o
        },
        assignable: HashMap::new(),
        attention_probs: HashMap::new(),
    };
    let mut params = vec![];
    timed("lower nodes", || g.node_ids().try_for_each(|id| l.lower_node(id)))?;
    for p in &g.params {
        if let Some(View { src: Src::Buf(b), .. }) = &l.views[p.node.index()] {
            params.push(ParamSpec { name: p.name.clone(), buf: *b, init: p.init.clone() });
        }
    }
    let mut entries = vec![];
    let outputs: Vec<(String, NodeId)> = g.outputs.clone();
    let pick = |pred: &dyn Fn(&str) -> bool| -> Vec<(String, NodeId)> { outputs.iter().filter(|(n, _)| pred(n)).cloned().collect() };
    let user_output = |n: &str| !n.starts_with("grad.") && n != "lr" && n != "grad_norm";
    let forward = pick(&|n| user_output(n));
    let grad = pick(&|n| n == "loss" || n.starts_with("grad."));
    let train = pick(&|n| n == "loss" || n == "lr" || n == "grad_norm");
    let has_grads = outputs.iter().any(|(n, _)| n.starts_with("grad."));
    entries.push(l.entry("forward", &forward, false)?);
    if has_grads {
        entries.push(l.entry("grad", &grad, false)?);
    }
    if !l.assigns.is_empty() {
        entries.push(l.entry("train_step", &train, true)?);
    }
    let mut program = Program { buffers: l.buffers, kernels: l.kernels, entries, params };
    timed("fuse_chains", || crate::fuse_chains::fuse_chains(&mut program));
    timed("fuse_sums", || crate::fuse_sums::fuse_sums(&mut program));
    timed("inplace", || crate::inplace::update_in_place(&mut program));
    timed("sink", || crate::sink::sink_products(&mut program));
    timed("plan", || crate::plan::share_temporaries(&mut program));
    Ok(program)
}

impl Lowering<'_> {
    fn new_buffer(&mut self, name: String, dtype: kir::DType, shape: &[usize], kind: BufKind) -> BufId {
        if matches!(kind, BufKind::Param | BufKind::OptState) {
            self.assignable.entry(name.clone()).or_insert(self.buffers.len());
        }
        self.buffers.push(Buffer { name, dtype, shape: shape.to_vec(), kind });
        self.buffers.len() - 1
    }

    fn emit(&mut self, node: NodeId, k: Kernel) {
        self.kernels.push(k);
        let i = self.kernels.len() - 1;
        self.node_kernels[node.index()].push(i);
    }

    fn view(&self, id: NodeId) -> Result<View, String> {
        self.views[id.index()].clone().ok_or_else(|| format!("node %{} was not lowered", id.index()))
    }

    /// A loop kernel over `shape` writing `body` into a contiguous view of `buf`.
    fn loop_into(&mut self, node: NodeId, shape: &[usize], body: ScalarExpr, out: Access) {
        let (shape, body, out) = scalar_fix(shape, body, out);
        self.emit(node, Kernel::Loop(LoopKernel::elementwise(shape, body, out)));
    }

    /// Computes `view` into a fresh contiguous buffer (for operands that must be
    /// materialised: GEMM inputs that are constants, non-contiguous reshapes, ids).
    fn materialize(&mut self, node: NodeId, v: &View, dtype: kir::DType) -> View {
        let b = self.new_buffer(format!("t{}", node.index()), dtype, &v.shape, BufKind::Temp);
        let out = Access { buf: b, offset: 0, strides: row_major(&v.shape) };
        let e = self.read(v);
        self.loop_into(node, &v.shape.clone(), e, out);
        View::contiguous(Src::Buf(b), &v.shape)
    }

    fn temp(&mut self, node: NodeId) -> (BufId, View) {
        let shape = self.g.shape(node).to_vec();
        let b = self.new_buffer(format!("t{}", node.index()), kir::DType::F32, &shape, BufKind::Temp);
        (b, View::contiguous(Src::Buf(b), &shape))
    }

    /// The permutation every user of `node` applies to it (`permute[p]`), if they all
    /// apply the same one and `node` is no output. An `attention_backward` that takes
    /// `node` as its forward (its last operand: where the probabilities were kept) reads
    /// none of its values and does not count.
    fn common_permutation(&self, node: NodeId) -> Option<Vec<usize>> {
        if self.is_output[node.index()] {
            return None;
        }
        let mut perm: Option<&Vec<usize>> = None;
        for &u in self.g.users(node).iter() {
            match &self.g.node(u).op {
                Op::Permute(p) if perm.is_none_or(|q| q == p) => perm = Some(p),
                Op::AttentionBackward { .. }
                    if self.g.operands(u).iter().position(|&o| o == node) == Some(self.g.operands(u).len() - 1) => {}
                _ => return None,
            }
        }
        perm.cloned()
    }

    /// A buffer for `node` laid out as its users read it (`p`, its
    /// [`common_permutation`](Self::common_permutation)): the buffer holds the permuted
    /// array row-major, `node`'s view reads it through the matching strides, and the
    /// users see it contiguous, so a reshape after them copies nothing. For kernels that
    /// write any strides: a rank-2 GEMM whose users transpose it (a weight gradient in
    /// PyTorch's [out, in] layout), attention whose user moves the heads back beside each
    /// other (`[B, H, T, Dv] → [B, T, H, Dv]`, then `[B, T, H·Dv]`).
    fn permuted_temp(&mut self, node: NodeId, p: &[usize]) -> (BufId, View) {
        let shape = self.g.shape(node).to_vec();
        let permuted: Vec<usize> = p.iter().map(|&a| shape[a]).collect();
        let b = self.new_buffer(format!("t{}", node.index()), kir::DType::F32, &permuted, BufKind::Temp);
        let mut strides = vec![0; shape.len()];
        for (&a, &s) in p.iter().zip(&row_major(&permuted)) {
            strides[a] = s;
        }
        (b, View { src: Src::Buf(b), offset: 0, shape, strides })
    }

    /// [`permuted_temp`](Self::permuted_temp) where `node`'s users agree on a
    /// permutation the writing kernel can take (`fits`), else a plain [`temp`](Self::temp).
    fn placed_temp(&mut self, node: NodeId, fits: impl Fn(&[usize]) -> bool) -> (BufId, View) {
        match self.common_permutation(node).filter(|p| fits(p)) {
            Some(p) => self.permuted_temp(node, &p),
            None => self.temp(node),
        }
    }

    fn lower_node(&mut self, id: NodeId) -> Result<(), String> {
        let n = self.g.node(id);
        let shape = n.shape.clone();
        let ops = self.g.operands(id);
        let v = match &n.op {
            Op::Input(name) => {
                let dt = if n.dtype == DType::F32 { kir::DType::F32 } else { kir::DType::I32 };
                let b = self.new_buffer(name.clone(), dt, &shape, BufKind::Input);
                View::contiguous(Src::Buf(b), &shape)
            }
            Op::Param(name) => View::contiguous(Src::Buf(self.new_buffer(name.clone(), kir::DType::F32, &shape, BufKind::Param)), &shape),
            Op::State(name) => {
                View::contiguous(Src::Buf(self.new_buffer(name.clone(), kir::DType::F32, &shape, BufKind::OptState)), &shape)
            }
            Op::Hyper(name) => View::contiguous(Src::Buf(self.new_buffer(name.clone(), kir::DType::F32, &shape, BufKind::Hyper)), &shape),
            Op::Const(c) => View { src: Src::Const(*c), offset: 0, shape: shape.clone(), strides: vec![0; shape.len()] },
            Op::Iota(axis) => {
                let mut strides = vec![0; shape.len()];
                strides[*axis] = 1;
                View { src: Src::Iota, offset: 0, shape: shape.clone(), strides }
            }
            Op::Unary(op) => {
                let a = self.view(ops[0])?;
                let e = ScalarExpr::Unary(*op, Box::new(self.read(&a)));
                self.elementwise(id, &shape, e)
            }
            Op::Binary(op) => {
                let (a, c) = (self.view(ops[0])?, self.view(ops[1])?);
                let e = ScalarExpr::Binary(*op, Box::new(self.read(&a)), Box::new(self.read(&c)));
                self.elementwise(id, &shape, e)
            }
            Op::Select => {
                let (c, a, e) = (self.view(ops[0])?, self.view(ops[1])?, self.view(ops[2])?);
                let e = ScalarExpr::Select(Box::new(self.read(&c)), Box::new(self.read(&a)), Box::new(self.read(&e)));
                self.elementwise(id, &shape, e)
            }
            Op::Cast(to) => {
                let a = self.view(ops[0])?;
                if *to == DType::Bool {
                    let (b, out) = self.temp(id);
                    let e = ScalarExpr::Binary(kir::BinaryOp::Ne, Box::new(self.read(&a)), Box::new(ScalarExpr::Const(0.0)));
                    self.loop_into(id, &shape, e, access(b, &shape));
                    out
                } else {
                    // f32, i32 and bool values share the f32 representation in temps.
                    a
                }
            }
            Op::Reduce(_, _) if self.folded_sums.contains_key(&id) => self.folded_sums[&id].clone(),
            Op::Reduce(op, axes) => {
                let a = self.view(ops[0])?;
                let kept: Vec<usize> = (0..a.shape.len()).filter(|d| !axes.contains(d)).collect();
                let mut order = kept.clone();
                order.extend(axes.iter().copied());
                let mut it_shape: Vec<usize> = order.iter().map(|&d| a.shape[d]).collect();
                let mut in_view = View {
                    src: a.src.clone(),
                    offset: a.offset,
                    shape: it_shape.clone(),
                    strides: order.iter().map(|&d| a.strides[d]).collect(),
                };
                let (b, out) = self.temp(id);
                let mut out_strides = row_major(&shape);
                out_strides.extend(std::iter::repeat_n(0, axes.len()));
                if kept.is_empty() {
                    // Keep one outer axis so every loop kernel has one to split.
                    it_shape.insert(0, 1);
                    in_view.shape.insert(0, 1);
                    in_view.strides.insert(0, 0);
                    out_strides.insert(0, 0);
                }
                let body = self.read(&in_view);
                self.emit(
                    id,
                    Kernel::Loop(LoopKernel {
                        shape: it_shape,
                        reduce: Some(*op),
                        reduced_dims: axes.len(),
                        body,
                        out: Access { buf: b, offset: 0, strides: out_strides },
                        accumulate: false,
                        side: vec![],
                        sums: vec![],
                    }),
                );
                out
            }
            Op::Broadcast => {
                let a = self.view(ops[0])?;
                let lead = shape.len() - a.shape.len();
                let mut strides = vec![0; lead];
                for (i, (&d, &s)) in a.shape.iter().zip(&a.strides).enumerate() {
                    strides.push(if d == 1 && shape[lead + i] != 1 { 0 } else { s });
                }
                View { src: a.src, offset: a.offset, shape: shape.clone(), strides }
            }
            Op::Reshape => {
                let a = self.view(ops[0])?;
                match a.src {
                    Src::Const(_) => View { shape: shape.clone(), strides: vec![0; shape.len()], ..a },
                    Src::Buf(_)
                        if !a.is_contiguous()
                            && let Some(strides) = reshape_strides(&a.shape, &a.strides, &shape) =>
                    {
                        // A strided buffer view whose reshaped axes stay expressible (the
                        // heads of a fused qkv projection): no copy.
                        View { strides, shape: shape.clone(), ..a }
                    }
                    _ => {
                        let a = if a.is_contiguous() && a.src != Src::Iota { a } else { self.materialize(id, &a, kir::DType::F32) };
                        View { src: a.src, offset: a.offset, shape: shape.clone(), strides: row_major(&shape) }
                    }
                }
            }
            Op::Permute(perm) => {
                let a = self.view(ops[0])?;
                View { src: a.src.clone(), offset: a.offset, shape: shape.clone(), strides: perm.iter().map(|&p| a.strides[p]).collect() }
            }
            Op::Slice { axis, start, .. } => {
                let a = self.view(ops[0])?;
                // Offsets of constants are ignored; of buffers and iotas they shift the start.
                View { offset: a.offset + start * a.strides[*axis], shape: shape.clone(), ..a }
            }
            Op::Pad { axis, before, .. } => {
                let a = self.view(ops[0])?;
                let (b, out) = self.temp(id);
                self.loop_into(id, &shape, ScalarExpr::Const(0.0), access(b, &shape));
                let rm = row_major(&shape);
                let e = self.read(&a);
                self.loop_into(id, &a.shape.clone(), e, Access { buf: b, offset: before * rm[*axis], strides: rm });
                out
            }
            Op::Concat(axis) => {
                let (b, out) = self.temp(id);
                let rm = row_major(&shape);
                let mut at = 0;
                for &o in &ops {
                    let a = self.view(o)?;
                    let w = a.shape[*axis];
                    let e = self.read(&a);
                    self.loop_into(id, &a.shape.clone(), e, Access { buf: b, offset: at * rm[*axis], strides: rm.clone() });
                    at += w;
                }
                out
            }
            Op::MatMul => {
                let a = self.gemm_operand(id, ops[0])?;
                let c = self.gemm_operand(id, ops[1])?;
                let r = shape.len();
                let (m, nn) = (shape[r - 2], shape[r - 1]);
                let k = a.shape[a.shape.len() - 1];
                let operand = |v: &View| MatOperand {
                    buf: match v.src {
                        Src::Buf(b) => b,
                        _ => unreachable!("gemm operands are materialised"),
                    },
                    offset: v.offset,
                    batch_strides: v.strides[..v.strides.len() - 2].to_vec(),
                    row_stride: v.strides[v.strides.len() - 2],
                    col_stride: v.strides[v.strides.len() - 1],
                };
                let rm = row_major(&shape);
                let mut kern = MatMulKernel {
                    bf16: false,
                    batch: shape[..r - 2].to_vec(),
                    m,
                    n: nn,
                    k,
                    a: operand(&a),
                    b: operand(&c),
                    // The output buffer is chosen below.
                    c: MatOperand {
                        buf: usize::MAX,
                        offset: 0,
                        batch_strides: rm[..r - 2].to_vec(),
                        row_stride: rm[r - 2],
                        col_stride: rm[r - 1],
                    },
                    accumulate: false,
                };
                fold_batch_into_rows(&mut kern);
                // Σ_batch a_b @ b_b (a weight gradient: the VJP of a broadcast weight) is one
                // product with the batch folded into k, when the only user is that sum.
                if let Some(sum) = self.batch_sum_user(id, r) {
                    let mut folded = kern.clone();
                    if fold_batch_into_k(&mut folded) {
                        let (sb, sum_view) = self.placed_temp(sum, |p| p.len() == 2);
                        let (row_stride, col_stride) = (sum_view.strides[0], sum_view.strides[1]);
                        folded.c = MatOperand { buf: sb, offset: 0, batch_strides: vec![], row_stride, col_stride };
                        self.emit(id, Kernel::MatMul(folded));
                        self.folded_sums.insert(sum, sum_view.clone());
                        self.views[id.index()] = Some(sum_view);
                        return Ok(());
                    }
                }
                let (b, out) = self.placed_temp(id, |p| p.len() == 2);
                if r == 2 {
                    // No batch axes: C is exactly the view (transposed or not).
                    kern.c.row_stride = out.strides[0];
                    kern.c.col_stride = out.strides[1];
                }
                kern.c.buf = b;
                self.emit(id, Kernel::MatMul(kern));
                out
            }
            Op::Gather => {
                let table = self.whole_buffer(id, ops[0], kir::DType::F32)?;
                let ids = self.whole_buffer(id, ops[1], kir::DType::I32)?;
                let (b, out) = self.temp(id);
                let ts = self.g.shape(ops[0]);
                let what = match &self.g.node(ops[1]).op {
                    Op::Input(n) => format!("input `{n}`"),
                    _ => "embedding ids".to_string(),
                };
                let n: usize = self.g.shape(ops[1]).iter().product();
                self.emit(id, Kernel::Gather(GatherKernel { table, ids, out: b, n, rows: ts[0], dim: ts[1], what }));
                out
            }
            Op::ScatterAdd { rows } => {
                let src = self.whole_buffer(id, ops[0], kir::DType::F32)?;
                let ids = self.whole_buffer(id, ops[1], kir::DType::I32)?;
                let (b, out) = self.temp(id);
                self.loop_into(id, &shape, ScalarExpr::Const(0.0), access(b, &shape));
                let n: usize = self.g.shape(ops[1]).iter().product();
                self.emit(id, Kernel::ScatterAdd(ScatterAddKernel { src, ids, out: b, n, rows: *rows, dim: shape[1] }));
                out
            }
            Op::Attention { causal, scale, masked } | Op::AttentionBackward { causal, scale, masked } => {
                let qs = self.g.shape(ops[0]).to_vec();
                let r = qs.len();
                let (tq, d) = (qs[r - 2], qs[r - 1]);
                let tk = self.g.shape(ops[1])[r - 2];
                let dv = self.g.shape(ops[2])[r - 1];
                let batch = qs[..r - 2].to_vec();
                let q = self.mat_operand(id, ops[0])?;
                let k = self.mat_operand(id, ops[1])?;
                let v = self.mat_operand(id, ops[2])?;
                let mask = if *masked {
                    let mut scores = batch.clone();
                    scores.extend([tq, tk]);
                    Some(self.mask_operand(id, ops[3], &scores)?)
                } else {
                    None
                };
                let backward = matches!(n.op, Op::AttentionBackward { .. });
                // The forward's rows go where its reader wants them, columns contiguous;
                // the backward's gradients are packed into a plain buffer.
                let (b, out) = if backward { self.temp(id) } else { self.placed_temp(id, |p| p.last() == Some(&(r - 1))) };
                let out_operand = if backward {
                    MatOperand::dense(b, &batch, tq, dv)
                } else {
                    MatOperand {
                        buf: b,
                        offset: 0,
                        batch_strides: out.strides[..r - 2].to_vec(),
                        row_stride: out.strides[r - 2],
                        col_stride: 1,
                    }
                };
                let mut fwd =
                    AttentionKernel { batch, tq, tk, d, dv, q, k, v, mask, causal: *causal, scale: *scale, out: out_operand, probs: None };
                let dout_at = if *masked { 4 } else { 3 };
                if backward {
                    // Its last operand is the forward node, which kept its probabilities.
                    fwd.probs = self.attention_probs.get(&ops[dout_at + 1]).copied();
                    let dout = self.mat_operand(id, ops[dout_at])?;
                    self.emit(id, Kernel::AttentionBackward(AttentionBackwardKernel::packed(fwd, dout, b)));
                } else {
                    let differentiated = self
                        .g
                        .users(id)
                        .iter()
                        .any(|&u| matches!(self.g.node(u).op, Op::AttentionBackward { .. }) && self.g.operands(u).last() == Some(&id));
                    if differentiated {
                        let probs = self.new_buffer(format!("t{}.probs", id.index()), kir::DType::F32, &[fwd.probs_len()], BufKind::Temp);
                        self.attention_probs.insert(id, probs);
                        fwd.probs = Some(probs);
                    }
                    self.emit(id, Kernel::Attention(fwd));
                }
                out
            }
            Op::Assign(target) => {
                let a = self.view(ops[0])?;
                let buf = *self.assignable.get(target).ok_or_else(|| format!("assign to unknown `{target}`"))?;
                let before = self.kernels.len();
                let e = self.read(&a);
                self.loop_into(id, &shape, e, access(buf, &shape));
                self.assigns.push((id, before));
                a
            }
        };
        self.views[id.index()] = Some(v);
        Ok(())
    }

    /// An elementwise node: inlined into its consumer when it has exactly one, which
    /// reads it elementwise (loop fusion); otherwise computed into a new buffer.
    fn elementwise(&mut self, id: NodeId, shape: &[usize], e: ScalarExpr) -> View {
        if self.fusible(id) {
            return View { src: Src::Lazy(Box::new(e), shape.to_vec()), offset: 0, shape: shape.to_vec(), strides: row_major(shape) };
        }
        let (b, out) = self.temp(id);
        self.loop_into(id, shape, e, access(b, shape));
        out
    }

    fn fusible(&self, id: NodeId) -> bool {
        let is_root = self.is_output[id.index()] || self.g.loss == Some(id);
        let mut users = self.g.g.edges_directed(id, petgraph::Direction::Outgoing);
        let (Some(e), None) = (users.next(), users.next()) else { return false };
        let user = petgraph::visit::EdgeRef::target(&e);
        !is_root && matches!(self.g.node(user).op, Op::Unary(_) | Op::Binary(_) | Op::Select | Op::Reduce(..))
    }

    /// The scalar expression reading `v` at each point of an iteration space of
    /// `v.shape`. A lazy value's expression is re-indexed into that space.
    fn read(&mut self, v: &View) -> ScalarExpr {
        let Src::Lazy(e, producer) = &v.src else { return v.expr() };
        // The producer's dims (row-major strides over its own shape) must each appear as
        // one dim of the view: then the view is a permutation (plus broadcast dims).
        let rm = row_major(producer);
        let mut map = vec![None; producer.len()];
        let mut ok = v.offset == 0;
        for (d, (&size, &stride)) in producer.iter().zip(&rm).enumerate() {
            if size <= 1 {
                continue;
            }
            let found: Vec<usize> = (0..v.shape.len()).filter(|&c| v.shape[c] == size && v.strides[c] == stride).collect();
            match found.as_slice() {
                [c] => map[d] = Some(*c),
                _ => ok = false,
            }
        }
        if ok {
            return remap(e, &map, v.shape.len());
        }
        unreachable!("a lazy value is only read by its one elementwise or reduce consumer")
    }

    /// The node's single user if it is a sum over exactly the leading `rank - 2` axes.
    fn batch_sum_user(&self, id: NodeId, rank: usize) -> Option<NodeId> {
        if rank < 3 || self.is_output[id.index()] {
            return None;
        }
        let mut users = self.g.g.edges_directed(id, petgraph::Direction::Outgoing);
        let (Some(e), None) = (users.next(), users.next()) else { return None };
        let user = petgraph::visit::EdgeRef::target(&e);
        match &self.g.node(user).op {
            Op::Reduce(crate::graph::ReduceOp::Sum, axes) if *axes == (0..rank - 2).collect::<Vec<_>>() => Some(user),
            _ => None,
        }
    }

    fn gemm_operand(&mut self, node: NodeId, o: NodeId) -> Result<View, String> {
        let v = self.view(o)?;
        Ok(if matches!(v.src, Src::Buf(_)) { v } else { self.materialize(node, &v, kir::DType::F32) })
    }

    /// An f32 buffer view of operand `o` (materialised when it is not one).
    fn f32_buffer_view(&mut self, node: NodeId, o: NodeId) -> Result<View, String> {
        let v = self.view(o)?;
        Ok(match v.src {
            Src::Buf(b) if self.buffers[b].dtype == kir::DType::F32 => v,
            _ => self.materialize(node, &v, kir::DType::F32),
        })
    }

    /// Operand `o` (`[batch..., rows, cols]`) as a strided matrix operand.
    fn mat_operand(&mut self, node: NodeId, o: NodeId) -> Result<MatOperand, String> {
        let v = self.f32_buffer_view(node, o)?;
        mat_operand_of(&v)
    }

    /// An attention mask `o`, broadcastable to `scores` (`[batch..., tq, tk]`), as a
    /// strided operand over `scores` (0 strides where it broadcasts).
    fn mask_operand(&mut self, node: NodeId, o: NodeId, scores: &[usize]) -> Result<MatOperand, String> {
        let v = self.f32_buffer_view(node, o)?;
        let lead = scores.len().checked_sub(v.shape.len()).ok_or("attention mask has a higher rank than the scores")?;
        let mut strides = vec![0; lead];
        for (t, (&dim, &st)) in v.shape.iter().zip(&v.strides).enumerate() {
            strides.push(if dim == 1 && scores[lead + t] != 1 { 0 } else { st });
        }
        mat_operand_of(&View { shape: scores.to_vec(), strides, ..v })
    }

    /// The operand as a whole contiguous buffer of `dtype` starting at offset 0.
    fn whole_buffer(&mut self, node: NodeId, o: NodeId, dtype: kir::DType) -> Result<BufId, String> {
        let v = self.view(o)?;
        if let Src::Buf(b) = v.src {
            let buf = &self.buffers[b];
            if v.offset == 0 && v.is_contiguous() && buf.dtype == dtype && buf.len() == v.shape.iter().product::<usize>() {
                return Ok(b);
            }
        }
        match self.materialize(node, &v, dtype).src {
            Src::Buf(b) => Ok(b),
            _ => Err("materialize gave no buffer".into()),
        }
    }

    /// An entry computing `results`: the kernels of their dependency closure, in order,
    /// and with `assigns`, every Assign last.
    fn entry(&mut self, name: &str, results: &[(String, NodeId)], assigns: bool) -> Result<Entry, String> {
        let mut roots: Vec<NodeId> = results.iter().map(|r| r.1).collect();
        if assigns {
            roots.extend(self.assigns.iter().map(|a| a.0));
        }
        // Results must be whole buffers the runtime can read.
        let mut named = vec![];
        for (rname, id) in results {
            let v = self.view(*id)?;
            let b = match v.src {
                Src::Buf(b) if v.offset == 0 && v.is_contiguous() && self.buffers[b].len() == v.shape.iter().product::<usize>() => b,
                _ => match self.result_kernels.iter().find(|(n, _)| n == id) {
                    Some(&(_, k)) => match &self.kernels[k] {
                        Kernel::Loop(l) => l.out.buf,
                        _ => return Err("result copy is not a loop".into()),
                    },
                    None => {
                        let before = self.kernels.len();
                        let m = self.materialize(*id, &v, kir::DType::F32);
                        let all = std::mem::take(&mut self.node_kernels[id.index()]);
                        let (keep, added): (Vec<usize>, Vec<usize>) = all.into_iter().partition(|&k| k < before);
                        self.node_kernels[id.index()] = keep;
                        self.result_kernels.extend(added.into_iter().map(|k| (*id, k)));
                        match m.src {
                            Src::Buf(b) => b,
                            _ => return Err("materialize gave no buffer".into()),
                        }
                    }
                },
            };
            named.push((rname.clone(), b));
        }
        let needed = self.g.ancestors(&roots);
        let assign_nodes: HashSet<NodeId> = self.assigns.iter().map(|a| a.0).collect();
        let mut kernels: Vec<usize> = self
            .g
            .node_ids()
            .filter(|id| needed[id.index()] && !assign_nodes.contains(id))
            .flat_map(|id| self.node_kernels[id.index()].iter().copied())
            .collect();
        kernels.extend(self.result_kernels.iter().filter(|(n, _)| results.iter().any(|r| r.1 == *n)).map(|(_, k)| *k));
        kernels.sort();
        kernels.dedup();
        if assigns {
            for &a in &assign_nodes {
                kernels.extend(self.node_kernels[a.index()].iter().copied());
            }
        }
        Ok(Entry { name: name.to_string(), kernels, results: named })
    }
}

/// Re-indexes an expression over a producer's iteration space into a consumer's:
/// producer dim `d` is consumer dim `map[d]` (`None`: a size-1 dim, index 0).
fn remap(e: &ScalarExpr, map: &[Option<usize>], rank: usize) -> ScalarExpr {
    match e {
        ScalarExpr::Load(a) => {
            let mut strides = vec![0; rank];
            for (d, &s) in a.strides.iter().enumerate() {
                if let Some(Some(c)) = map.get(d) {
                    strides[*c] += s;
                }
            }
            ScalarExpr::Load(Access { buf: a.buf, offset: a.offset, strides })
        }
        ScalarExpr::Index(d) => match map.get(*d) {
            Some(Some(c)) => ScalarExpr::Index(*c),
            _ => ScalarExpr::Const(0.0),
        },
        ScalarExpr::Const(c) => ScalarExpr::Const(*c),
        ScalarExpr::Unary(op, a) => ScalarExpr::Unary(*op, Box::new(remap(a, map, rank))),
        ScalarExpr::Binary(op, a, b) => ScalarExpr::Binary(*op, Box::new(remap(a, map, rank)), Box::new(remap(b, map, rank))),
        ScalarExpr::Select(c, a, b) => {
            ScalarExpr::Select(Box::new(remap(c, map, rank)), Box::new(remap(a, map, rank)), Box::new(remap(b, map, rank)))
        }
    }
}

/// A buffer view `[batch..., rows, cols]` as a matrix operand.
fn mat_operand_of(v: &View) -> Result<MatOperand, String> {
    let Src::Buf(buf) = v.src else { return Err("matrix operand is not a buffer".into()) };
    let r = v.strides.len();
    if r < 2 {
        return Err("matrix operand has rank < 2".into());
    }
    Ok(MatOperand {
        buf,
        offset: v.offset,
        batch_strides: v.strides[..r - 2].to_vec(),
        row_stride: v.strides[r - 2],
        col_stride: v.strides[r - 1],
    })
}

/// `x @ w` with `x: [..., m, k]` and a weight broadcast over the batch (`[k, n]`, batch
/// strides 0) is one `[(...)·m, k] @ [k, n]` product when `x`'s batch dims are laid out
/// like extra rows: fold them into `m` (one large GEMM instead of many small ones).
fn fold_batch_into_rows(k: &mut MatMulKernel) {
    if k.batch.is_empty() || k.b.batch_strides.iter().any(|&s| s != 0) {
        return;
    }
    // Innermost batch dim first: each must step exactly over the rows inside it.
    let mut span_a = k.a.row_stride * k.m;
    let mut span_c = k.c.row_stride * k.m;
    for (d, &size) in k.batch.iter().enumerate().rev() {
        if size > 1 && (k.a.batch_strides[d] != span_a || k.c.batch_strides[d] != span_c) {
            return;
        }
        span_a *= size;
        span_c *= size;
    }
    k.m *= k.batch.iter().product::<usize>();
    k.batch.clear();
    k.a.batch_strides.clear();
    k.b.batch_strides.clear();
    k.c.batch_strides.clear();
}

/// Σ_b a_b @ b_b as one product `[m, B·k] @ [B·k, n]` when every batch dim steps
/// exactly over the k columns of `a` and the k rows of `b` inside it.
fn fold_batch_into_k(k: &mut MatMulKernel) -> bool {
    if k.batch.is_empty() {
        return false;
    }
    let mut span_a = k.a.col_stride * k.k;
    let mut span_b = k.b.row_stride * k.k;
    for (d, &size) in k.batch.iter().enumerate().rev() {
        if size > 1 && (k.a.batch_strides[d] != span_a || k.b.batch_strides[d] != span_b) {
            return false;
        }
        span_a *= size;
        span_b *= size;
    }
    k.k *= k.batch.iter().product::<usize>();
    k.batch.clear();
    k.a.batch_strides.clear();
    k.b.batch_strides.clear();
    k.c.batch_strides.clear();
    true
}

fn access(buf: BufId, shape: &[usize]) -> Access {
    Access { buf, offset: 0, strides: row_major(shape) }
}

/// Rank-0 loops become rank-1 loops of one point, so every loop has an outer axis.
fn scalar_fix(shape: &[usize], body: ScalarExpr, out: Access) -> (Vec<usize>, ScalarExpr, Access) {
    if !shape.is_empty() {
        return (shape.to_vec(), body, out);
    }
    fn widen(e: ScalarExpr) -> ScalarExpr {
        match e {
            ScalarExpr::Load(a) => ScalarExpr::Load(Access { strides: vec![0], ..a }),
            ScalarExpr::Unary(op, a) => ScalarExpr::Unary(op, Box::new(widen(*a))),
            ScalarExpr::Binary(op, a, b) => ScalarExpr::Binary(op, Box::new(widen(*a)), Box::new(widen(*b))),
            ScalarExpr::Select(c, a, b) => ScalarExpr::Select(Box::new(widen(*c)), Box::new(widen(*a)), Box::new(widen(*b))),
            other => other,
        }
    }
    (vec![1], widen(body), Access { strides: vec![0], ..out })
}

/// Summary numbers for `bmc info`.
pub struct ProgramStats {
    pub kernels: usize,
    pub temp_bytes: usize,
    pub param_count: usize,
    pub matmul_flops: u128,
}

pub fn stats(p: &Program, entry: &str) -> ProgramStats {
    let temp_bytes = p.buffers.iter().filter(|b| b.kind == BufKind::Temp).map(|b| b.len() * 4).sum();
    let param_count = p.buffers.iter().filter(|b| b.kind == BufKind::Param).map(|b| b.len()).sum();
    let ks: Vec<usize> = p.entry(entry).map(|e| e.kernels.clone()).unwrap_or_default();
    let matmul_flops = ks
        .iter()
        .filter_map(|&k| match &p.kernels[k] {
            Kernel::MatMul(m) => Some(m.flop()),
            _ => None,
        })
        .sum();
    ProgramStats { kernels: ks.len(), temp_bytes, param_count, matmul_flops }
}

#[cfg(test)]
mod tests {
    use super::reshape_strides;

    #[test]
    fn no_copy_reshapes() {
        // the heads of a q slice of a [B, T, 3·D] buffer: [2, 5, 8] (row stride 24) → [2, 5, 2, 4]
        assert_eq!(reshape_strides(&[2, 5, 8], &[120, 24, 1], &[2, 5, 2, 4]), Some(vec![120, 24, 4, 1]));
        // merging the batch axes of a strided view
        assert_eq!(reshape_strides(&[2, 5, 8], &[120, 24, 1], &[10, 8]), Some(vec![24, 1]));
        // size-1 axes anywhere (their strides are never used)
        assert_eq!(reshape_strides(&[3, 1, 4], &[8, 99, 1], &[1, 3, 4, 1]), Some(vec![24, 8, 1, 0]));
        // a permuted view split again
        assert_eq!(reshape_strides(&[4, 6], &[1, 4], &[4, 2, 3]), Some(vec![1, 12, 4]));
        // a transposed matrix cannot be flattened without a copy
        assert_eq!(reshape_strides(&[3, 4], &[1, 3], &[12]), None);
        // a sliced row (stride 24, 8 used) cannot merge with the next axis
        assert_eq!(reshape_strides(&[5, 8], &[24, 1], &[40]), None);
        // nor can axes be regrouped across a gap: [2, 3] → [3, 2] of a strided view
        assert_eq!(reshape_strides(&[2, 3], &[10, 1], &[3, 2]), None);
    }
}
