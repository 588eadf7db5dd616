//! The kernel IR: the contract between the compiler and the runtime.
//!
//! A [`Program`] is a set of flat buffers (parameters, gradients, optimiser state,
//! inputs, temporaries) and a list of kernels that read and write them. Every shape is
//! concrete. Kernels are target independent: loop nests over an iteration space with a
//! scalar expression body ([`LoopKernel`]), or calls to library kernels (GEMM, gather,
//! scatter-add) that a backend implements by hand. An [`Entry`] names a sequence of
//! kernels the runtime can run (`train_step`, `forward`, `grad`).
//!
//! Everything here is serde-serialisable (the training binary carries a Program) and has
//! a stable text form ([`Program::to_text`]) that snapshot tests hold.

use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

pub type BufId = usize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    F32,
    I32,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::I32 => "i32",
        }
    }
    pub fn size(self) -> usize {
        4
    }
}

/// What a buffer holds; decides who fills it and whether checkpoints store it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BufKind {
    /// A trainable parameter (PyTorch `state_dict` name in `Buffer::name`).
    Param,
    /// Optimiser state (e.g. `exp_avg.h.0.attn.qkv.weight`), saved in `step-N.optim.safetensors`.
    OptState,
    /// Fed by the runtime from a data batch before each run.
    Input,
    /// A scalar the runtime sets before each run (e.g. `step`, the 0-based step count).
    Hyper,
    /// A value computed by the kernels; read back by name when it is an entry's output.
    Temp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Buffer {
    pub name: String,
    pub dtype: DType,
    /// Logical shape (for checkpoints, inputs and messages); `len` is its product.
    pub shape: Vec<usize>,
    pub kind: BufKind,
}

impl Buffer {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A strided view of a buffer over a kernel's iteration space:
/// element at iteration index `i` is `buf[offset + Σ_d i[d] * strides[d]]`.
/// `strides.len()` equals the kernel's iteration rank; a 0 stride broadcasts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Access {
    pub buf: BufId,
    pub offset: usize,
    pub strides: Vec<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UnaryOp {
    Neg,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Abs,
    Tanh,
    Sigmoid,
    /// `max(x, 0)` with `BinaryOp::Max` semantics (NaN stays NaN, -0 gives +0).
    Relu,
    Sin,
    Cos,
    Erf,
    Recip,
    Square,
    /// 1.0 where the operand is > 0, else 0.0 (relu's derivative).
    Step,
    /// Rounds toward -inf (the `step` learning-rate schedule uses it). Added by the lead.
    Floor,
    /// GELU, tanh form: `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, evaluated as
    /// [`crate::interp::gelu_tanh`] does. One primitive so that training saves only its
    /// input for the backward (which recomputes the rest), not four intermediates.
    GeluTanh,
    /// The derivative of [`UnaryOp::GeluTanh`], evaluated as
    /// [`crate::interp::gelu_tanh_grad`] does: GELU's backward is one elementwise
    /// kernel `dy · gelu'(x)`.
    GeluTanhGrad,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    /// IEEE 754-2019 `maximum`/`minimum`: a NaN operand gives NaN, and -0 < +0
    /// (Cranelift's `fmax`/`fmin`; the same in `ReduceOp`).
    Max,
    Min,
    /// `a.powf(b)`
    Pow,
    /// Comparisons give 1.0 or 0.0.
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReduceOp {
    Sum,
    Max,
    Min,
}

/// The scalar computation at one point of a loop kernel's iteration space. All values
/// are f32; loads from `i32` buffers convert exactly (|v| < 2^24).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ScalarExpr {
    Load(Access),
    Const(#[serde(with = "nonfinite")] f32),
    /// The current loop index along iteration axis `n`, as f32.
    Index(usize),
    Unary(UnaryOp, Box<ScalarExpr>),
    Binary(BinaryOp, Box<ScalarExpr>, Box<ScalarExpr>),
    /// `if c != 0 { a } else { b }` (both sides are evaluated; loads must stay in bounds).
    Select(Box<ScalarExpr>, Box<ScalarExpr>, Box<ScalarExpr>),
}

/// A loop nest over `shape`. If `reduce` is `Some(op)`, the trailing `reduced_dims`
/// axes are reduced with `op` (identity 0, -inf or +inf) and `out` strides are zero on
/// them; otherwise every point writes `out`. With `accumulate`, the result is added
/// to what `out` already holds.
/// Storing into an `i32` buffer rounds to nearest (ties to even), saturating, NaN to 0.
///
/// An elementwise kernel (`reduce: None`, no accumulation) may also store
/// [`SideStore`]s, further outputs at the same points (a chain of elementwise kernels
/// becomes one kernel with several outputs: AdamW's moments and parameter), and host
/// [`FusedSum`]s: sums over any of its axes computed in the same pass over memory (a
/// bias gradient `Σ_rows dy` inside the kernel that writes `dy`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoopKernel {
    pub shape: Vec<usize>,
    pub reduce: Option<ReduceOp>,
    pub reduced_dims: usize,
    pub body: ScalarExpr,
    pub out: Access,
    pub accumulate: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub side: Vec<SideStore>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sums: Vec<FusedSum>,
}

/// `into[p] = value(p)` at every point `p` of the host kernel, `into` injective. At a
/// point, the body and every side value are evaluated first (from memory as the earlier
/// points left it), then everything is stored. A buffer the kernel writes is read only
/// at the point being written (an update in place, like `m = β·m + (1-β)·g`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SideStore {
    pub value: ScalarExpr,
    pub into: Access,
}

/// `into[e] (+)= Σ value(p)` over the points `p` of the host kernel's iteration space
/// that `into` maps to element `e` (its strides are 0 along the summed axes). `value`
/// is evaluated after the host stored `out` at `p`, so a load of exactly `out` reads
/// the value just computed there; `into` is written by nothing else in the kernel and
/// read by nothing in it.
///
/// The order of the additions is fixed, whatever the thread count: the outermost axis
/// (of the kernel as [`crate::jit::normalize`] gives it) is cut into
/// [`FusedSum::chunks`] contiguous chunks, each sums its points in row-major order from
/// zero, and `into` becomes `(accumulate ? into : 0) + chunk 0 + chunk 1 + …`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FusedSum {
    pub value: ScalarExpr,
    pub into: Access,
    pub accumulate: bool,
}

impl FusedSum {
    /// The chunks of an outermost axis of extent `outer` (see [`FusedSum`]): chunk `c`
    /// is `outer·c/n .. outer·(c+1)/n`.
    pub fn chunks(outer: usize) -> usize {
        outer.clamp(1, 16)
    }
}

/// One operand of a GEMM: matrix `(r, c)` of batch `b` is at
/// `buf[offset + Σ b_d * batch_strides[d] + r * row_stride + c * col_stride]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MatOperand {
    pub buf: BufId,
    pub offset: usize,
    pub batch_strides: Vec<usize>,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl MatOperand {
    /// `batch × rows × cols` row-major from element 0 of `buf`.
    pub fn dense(buf: BufId, batch: &[usize], rows: usize, cols: usize) -> MatOperand {
        let mut batch_strides = vec![0; batch.len()];
        let mut s = rows * cols;
        for d in (0..batch.len()).rev() {
            batch_strides[d] = s;
            s *= batch[d];
        }
        MatOperand { buf, offset: 0, batch_strides, row_stride: cols, col_stride: 1 }
    }

    /// Whether this is [`MatOperand::dense`] over `batch × rows × cols` (up to the strides
    /// of axes of extent 1, which never move).
    pub fn is_dense(&self, batch: &[usize], rows: usize, cols: usize) -> bool {
        let d = MatOperand::dense(self.buf, batch, rows, cols);
        let same = |n: usize, x: usize, y: usize| n <= 1 || x == y;
        self.offset == 0
            && self.batch_strides.len() == batch.len()
            && batch.iter().zip(self.batch_strides.iter().zip(&d.batch_strides)).all(|(&n, (&x, &y))| same(n, x, y))
            && same(rows, self.row_stride, d.row_stride)
            && same(cols, self.col_stride, 1)
    }

    /// The offset of every batch matrix, batch indices in row-major order.
    pub fn batch_offsets(&self, batch: &[usize]) -> Vec<usize> {
        let mut offs = vec![self.offset];
        for (&n, &s) in batch.iter().zip(&self.batch_strides) {
            offs = offs.iter().flat_map(|&b| (0..n).map(move |i| b + i * s)).collect();
        }
        offs
    }

    /// The largest element the operand reaches over `batch × rows × cols` (`None` when
    /// that is empty); an error when its batch rank differs or an offset overflows.
    pub fn max_element(&self, batch: &[usize], rows: usize, cols: usize) -> std::result::Result<Option<usize>, String> {
        if self.batch_strides.len() != batch.len() {
            return Err(format!("operand b{} has {} batch strides for {} batch axes", self.buf, self.batch_strides.len(), batch.len()));
        }
        let mut m = self.offset;
        let dims = batch.iter().zip(&self.batch_strides).map(|(&n, &s)| (n, s)).chain([(rows, self.row_stride), (cols, self.col_stride)]);
        for (n, s) in dims {
            if n == 0 {
                return Ok(None);
            }
            m = (n - 1).checked_mul(s).and_then(|x| x.checked_add(m)).ok_or_else(|| format!("operand b{} offsets overflow", self.buf))?;
        }
        Ok(Some(m))
    }

    /// An internal error unless the operand stays inside a buffer of `len` elements.
    pub fn check_in(&self, batch: &[usize], rows: usize, cols: usize, len: usize, what: &str) -> crate::error::Result<()> {
        match self.max_element(batch, rows, cols) {
            Err(e) => Err(crate::error::Error::internal(format!("{what}: {e}"))),
            Ok(Some(m)) if m >= len => {
                Err(crate::error::Error::internal(format!("{what}: operand b{} reaches element {m} of a buffer of {len}", self.buf)))
            }
            Ok(_) => Ok(()),
        }
    }
}

/// `c[b] (+)= a[b] @ b[b]` for every index of `batch` (`a`: m×k, `b`: k×n, `c`: m×n).
/// With `bf16`, every element of `a` and `b` is first rounded to bfloat16 (nearest
/// even, [`crate::interp::round_bf16`]); products and sums stay f32 (`precision =
/// "bf16"`: the GPU runs these on tensor cores).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MatMulKernel {
    pub batch: Vec<usize>,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: MatOperand,
    pub b: MatOperand,
    pub c: MatOperand,
    pub accumulate: bool,
    #[serde(default)]
    pub bf16: bool,
}

/// `out[i, :] = table[ids[i], :]` for `i < n` (rows of `dim` contiguous elements);
/// an id outside `0..rows` is a runtime error naming `what`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GatherKernel {
    pub table: BufId,
    pub ids: BufId,
    pub out: BufId,
    pub n: usize,
    pub rows: usize,
    pub dim: usize,
    pub what: String,
}

/// `out[ids[i], :] += src[i, :]` for `i < n` (out is not cleared first).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScatterAddKernel {
    pub src: BufId,
    pub ids: BufId,
    pub out: BufId,
    pub n: usize,
    pub rows: usize,
    pub dim: usize,
}

/// Fused attention `out[b] = softmax(q[b] @ k[b]ᵀ · scale + mask[b]) @ v[b]` for every
/// index `b` of `batch` (`q`: tq×d, `k`: tk×d, `v`: tk×dv, `mask`: tq×tk, any strides,
/// 0 to broadcast). With `causal`, query row `i` sees keys `j <= i` only (tq = tk). The
/// CPU runtime never stores a tq×tk matrix: it works a block of query rows at a time
/// (see `attention.rs`). `out` is where the output goes, columns contiguous: dense
/// (`batch × tq × dv` from element 0, [`MatOperand::dense`]), or laid out for its reader
/// (the compiler writes a head's rows straight into `[B, T, H·Dv]` when the only reader
/// permutes the heads back, so no copy runs). The backward writes its gradients through
/// operands of their own and leaves `fwd.out` alone.
///
/// `probs`, when present, is a buffer of [`AttentionKernel::probs_len`] elements in which
/// the forward keeps its softmax probabilities for the backward of the same inputs, so the
/// backward need not recompute them (on the CPU that recomputation was a third of W2's
/// attention backward). Its layout is [`AttentionKernel::probs_blocks`]: per batch index,
/// blocks of [`ATTENTION_BLOCK_ROWS`] query rows, each as wide as the keys its last row
/// sees rounded up to 32 (causal blocks skip the keys no row of theirs sees), 0 where a
/// row does not see a key. A backward whose `fwd.probs` names it reads it only after that
/// forward; a backend may leave it unused (the CUDA kernels recompute the probabilities).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttentionKernel {
    pub batch: Vec<usize>,
    pub tq: usize,
    pub tk: usize,
    pub d: usize,
    pub dv: usize,
    pub q: MatOperand,
    pub k: MatOperand,
    pub v: MatOperand,
    pub mask: Option<MatOperand>,
    pub causal: bool,
    pub scale: f64,
    pub out: MatOperand,
    #[serde(default)]
    pub probs: Option<BufId>,
}

/// Query rows per block of [`AttentionKernel::probs`] (the CPU's attention block).
pub const ATTENTION_BLOCK_ROWS: usize = 32;

/// The gradients of [`AttentionKernel`]'s output w.r.t. `q`, `k` and `v` for the
/// upstream gradient `dout` (batch × tq × dv), written through `dq` (batch × tq × d),
/// `dk` (batch × tk × d) and `dv` (batch × tk × dv), columns contiguous, no element
/// written twice (backends take any such layout). The compiler packs them one after
/// another in one buffer ([`AttentionBackwardKernel::packed`]): written straight into
/// the `[B, T, 3·H·D]` gradient of a qkv product instead (a pass measured in session 26,
/// `docs/PERFORMANCE.md`), the CPU backward lost more to rows 1.5 KiB apart, and the
/// bias gradient to a separate column sum, than the copies saved. The softmax
/// probabilities are the forward's kept ones or recomputed from `q` and `k`; no
/// gradient flows into the mask. `fwd.out` is not written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttentionBackwardKernel {
    pub fwd: AttentionKernel,
    pub dout: MatOperand,
    pub dq: MatOperand,
    pub dk: MatOperand,
    pub dv: MatOperand,
}

impl AttentionBackwardKernel {
    /// The gradients packed into `buf` ([`AttentionKernel::grad_lens`] elements): dq at
    /// 0, dk after it, dv last, each dense.
    pub fn packed(fwd: AttentionKernel, dout: MatOperand, buf: BufId) -> AttentionBackwardKernel {
        let (nq, nk, _) = fwd.grad_lens();
        let dq = MatOperand::dense(buf, &fwd.batch, fwd.tq, fwd.d);
        let dk = MatOperand { offset: nq, ..MatOperand::dense(buf, &fwd.batch, fwd.tk, fwd.d) };
        let dv = MatOperand { offset: nq + nk, ..MatOperand::dense(buf, &fwd.batch, fwd.tk, fwd.dv) };
        AttentionBackwardKernel { fwd, dout, dq, dk, dv }
    }

    /// Whether the gradients are [`AttentionBackwardKernel::packed`] into one buffer.
    pub fn is_packed(&self) -> bool {
        self == &AttentionBackwardKernel::packed(self.fwd.clone(), self.dout.clone(), self.dq.buf)
    }

    /// The gradients' operands with their rows and columns: `(name, operand, rows, cols)`.
    pub fn grads(&self) -> [(&'static str, &MatOperand, usize, usize); 3] {
        let a = &self.fwd;
        [("dq", &self.dq, a.tq, a.d), ("dk", &self.dk, a.tk, a.d), ("dv", &self.dv, a.tk, a.dv)]
    }
}

impl LoopKernel {
    /// `out = body` at every point of `shape`: no reduction, accumulation, side stores or
    /// sums.
    pub fn elementwise(shape: Vec<usize>, body: ScalarExpr, out: Access) -> LoopKernel {
        LoopKernel { shape, reduce: None, reduced_dims: 0, body, out, accumulate: false, side: vec![], sums: vec![] }
    }

    /// Whether the kernel stores into `buf` (its output, a side store or a fused sum).
    pub fn writes_buf(&self, buf: BufId) -> bool {
        self.out.buf == buf || self.side.iter().any(|s| s.into.buf == buf) || self.sums.iter().any(|s| s.into.buf == buf)
    }

    /// The kernel computing fused sum `s` on its own, after this kernel has run: a loop
    /// over the same points with the summed axes (where `into`'s stride is 0) moved last
    /// and reduced (what a backend without fused sums runs instead).
    pub fn sum_kernel(&self, s: &FusedSum) -> LoopKernel {
        let rank = self.shape.len();
        let (kept, summed): (Vec<usize>, Vec<usize>) = (0..rank).partition(|&d| s.into.strides[d] != 0);
        let order: Vec<usize> = kept.iter().chain(&summed).copied().collect();
        let permute = |a: &Access| Access { buf: a.buf, offset: a.offset, strides: order.iter().map(|&d| a.strides[d]).collect() };
        let mut position = vec![0; rank];
        for (new, &old) in order.iter().enumerate() {
            position[old] = new;
        }
        LoopKernel {
            shape: order.iter().map(|&d| self.shape[d]).collect(),
            reduce: Some(ReduceOp::Sum),
            reduced_dims: summed.len(),
            body: s.value.map_loads(&permute, &|n| position[n]),
            out: permute(&s.into),
            accumulate: s.accumulate,
            side: vec![],
            sums: vec![],
        }
    }
}

impl ScalarExpr {
    /// Calls `f` on every load, left to right.
    pub fn for_each_load<'a>(&'a self, f: &mut impl FnMut(&'a Access)) {
        match self {
            ScalarExpr::Load(a) => f(a),
            ScalarExpr::Const(_) | ScalarExpr::Index(_) => {}
            ScalarExpr::Unary(_, a) => a.for_each_load(f),
            ScalarExpr::Binary(_, a, b) => {
                a.for_each_load(f);
                b.for_each_load(f);
            }
            ScalarExpr::Select(c, a, b) => {
                c.for_each_load(f);
                a.for_each_load(f);
                b.for_each_load(f);
            }
        }
    }

    /// The expression with every access replaced by `acc(access)` and every `Index(n)`
    /// by `Index(axis(n))`.
    pub fn map_loads(&self, acc: &impl Fn(&Access) -> Access, axis: &impl Fn(usize) -> usize) -> ScalarExpr {
        match self {
            ScalarExpr::Load(a) => ScalarExpr::Load(acc(a)),
            ScalarExpr::Const(c) => ScalarExpr::Const(*c),
            ScalarExpr::Index(n) => ScalarExpr::Index(axis(*n)),
            ScalarExpr::Unary(op, a) => ScalarExpr::Unary(*op, Box::new(a.map_loads(acc, axis))),
            ScalarExpr::Binary(op, a, b) => ScalarExpr::Binary(*op, Box::new(a.map_loads(acc, axis)), Box::new(b.map_loads(acc, axis))),
            ScalarExpr::Select(c, a, b) => {
                ScalarExpr::Select(Box::new(c.map_loads(acc, axis)), Box::new(a.map_loads(acc, axis)), Box::new(b.map_loads(acc, axis)))
            }
        }
    }
}

impl MatMulKernel {
    /// Floating-point operations of the products: 2·m·n·k per batch index.
    pub fn flop(&self) -> u128 {
        2 * (self.m * self.n * self.k) as u128 * self.batch.iter().product::<usize>() as u128
    }
}

impl AttentionKernel {
    pub fn batch_count(&self) -> usize {
        self.batch.iter().product()
    }
    /// Elements of `out` (and of dq, dk, dv in the backward's packed result).
    pub fn out_len(&self) -> usize {
        self.batch_count() * self.tq * self.dv
    }
    pub fn grad_lens(&self) -> (usize, usize, usize) {
        let b = self.batch_count();
        (b * self.tq * self.d, b * self.tk * self.d, b * self.tk * self.dv)
    }

    /// Keys that query row `i` sees (a prefix: causal attention sees `0..=i`).
    pub fn keys(&self, i: usize) -> usize {
        if self.causal { (i + 1).min(self.tk) } else { self.tk }
    }

    /// The layout of [`AttentionKernel::probs`] within one batch index: for each block of
    /// [`ATTENTION_BLOCK_ROWS`] query rows `(offset, width)`, its rows stored one after
    /// another, `width` elements each (row `r`'s probability of key `j` at
    /// `offset + r·width + j`); and the elements per batch index.
    pub fn probs_blocks(&self) -> (Vec<(usize, usize)>, usize) {
        let mut at = 0;
        let blocks = (0..self.tq)
            .step_by(ATTENTION_BLOCK_ROWS)
            .map(|i0| {
                let i1 = (i0 + ATTENTION_BLOCK_ROWS).min(self.tq);
                let width = self.keys(i1 - 1).next_multiple_of(32).min(self.tk);
                let block = (at, width);
                at += (i1 - i0) * width;
                block
            })
            .collect();
        (blocks, at)
    }

    /// Elements of [`AttentionKernel::probs`].
    pub fn probs_len(&self) -> usize {
        self.batch_count() * self.probs_blocks().1
    }
}

// A program holds a few hundred kernels, built once: their size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Kernel {
    Loop(LoopKernel),
    MatMul(MatMulKernel),
    Gather(GatherKernel),
    ScatterAdd(ScatterAddKernel),
    Attention(AttentionKernel),
    AttentionBackward(AttentionBackwardKernel),
}

impl Kernel {
    /// The buffers the kernel writes (a loop's output first, then its side stores and
    /// fused sums).
    pub fn writes(&self) -> Vec<BufId> {
        match self {
            Kernel::Loop(l) => {
                std::iter::once(l.out.buf).chain(l.side.iter().map(|s| s.into.buf)).chain(l.sums.iter().map(|s| s.into.buf)).collect()
            }
            Kernel::MatMul(m) => vec![m.c.buf],
            Kernel::Gather(g) => vec![g.out],
            Kernel::ScatterAdd(s) => vec![s.out],
            Kernel::Attention(a) => std::iter::once(a.out.buf).chain(a.probs).collect(),
            Kernel::AttentionBackward(a) => {
                let mut w = vec![a.dq.buf, a.dk.buf, a.dv.buf];
                w.sort_unstable();
                w.dedup();
                w
            }
        }
    }

    /// The buffers the kernel reads (an accumulating output counts as read).
    pub fn reads(&self) -> Vec<BufId> {
        let mut r = vec![];
        match self {
            Kernel::Loop(l) => {
                l.body.for_each_load(&mut |a| r.push(a.buf));
                for s in &l.side {
                    s.value.for_each_load(&mut |a| r.push(a.buf));
                }
                for s in &l.sums {
                    s.value.for_each_load(&mut |a| r.push(a.buf));
                    if s.accumulate {
                        r.push(s.into.buf);
                    }
                }
                if l.accumulate {
                    r.push(l.out.buf);
                }
            }
            Kernel::MatMul(m) => {
                r.extend([m.a.buf, m.b.buf]);
                if m.accumulate {
                    r.push(m.c.buf);
                }
            }
            Kernel::Gather(g) => r.extend([g.table, g.ids]),
            Kernel::ScatterAdd(s) => r.extend([s.src, s.ids, s.out]),
            Kernel::Attention(a) => r.extend(a.inputs()),
            Kernel::AttentionBackward(a) => {
                r.extend(a.fwd.inputs());
                r.push(a.dout.buf);
                r.extend(a.fwd.probs);
            }
        }
        r
    }
}

impl AttentionKernel {
    fn inputs(&self) -> Vec<BufId> {
        let mut r = vec![self.q.buf, self.k.buf, self.v.buf];
        r.extend(self.mask.as_ref().map(|m| m.buf));
        r
    }
}

/// A named sequence of kernels (indices into `Program::kernels`) the runtime can run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub name: String,
    pub kernels: Vec<usize>,
    /// Named results (`loss`, `lr`, `grad_norm`, outputs, `grad.<param>`) and their buffers.
    pub results: Vec<(String, BufId)>,
}

/// How a parameter starts. Random inits are deterministic from the seed and the name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Init {
    Zeros,
    Ones,
    Constant(#[serde(with = "nonfinite")] f64),
    Normal { mean: f64, std: f64 },
    Uniform { low: f64, high: f64 },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParamSpec {
    pub name: String,
    pub buf: BufId,
    pub init: Init,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Program {
    pub buffers: Vec<Buffer>,
    pub kernels: Vec<Kernel>,
    pub entries: Vec<Entry>,
    pub params: Vec<ParamSpec>,
}

impl Program {
    pub fn entry(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// Drops the kernels at `gone` (sorted indices) and renumbers the entries' lists.
    pub fn remove_kernels(&mut self, gone: &[usize]) {
        if gone.is_empty() {
            return;
        }
        let mut new_index = vec![usize::MAX; self.kernels.len()];
        let mut next = 0;
        for (i, slot) in new_index.iter_mut().enumerate() {
            if gone.binary_search(&i).is_err() {
                *slot = next;
                next += 1;
            }
        }
        let mut i = 0;
        self.kernels.retain(|_| {
            i += 1;
            gone.binary_search(&(i - 1)).is_err()
        });
        for e in self.entries.iter_mut() {
            e.kernels = e.kernels.iter().filter(|k| gone.binary_search(k).is_err()).map(|&k| new_index[k]).collect();
        }
    }

    pub fn buffer_named(&self, name: &str) -> Option<BufId> {
        self.buffers.iter().position(|b| b.name == name)
    }

    /// The stable, deterministic text form used by `bmc emit --stage kernels`.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        for (i, b) in self.buffers.iter().enumerate() {
            let kind = match b.kind {
                BufKind::Param => "param",
                BufKind::OptState => "state",
                BufKind::Input => "input",
                BufKind::Hyper => "hyper",
                BufKind::Temp => "temp",
            };
            let _ = writeln!(s, "buf b{i}: {}{:?} {kind} \"{}\"", b.dtype.name(), b.shape, b.name);
        }
        for (i, k) in self.kernels.iter().enumerate() {
            let _ = writeln!(s, "\nk{i}: {}", kernel_text(k));
        }
        for e in &self.entries {
            let ks: Vec<String> = e.kernels.iter().map(|k| format!("k{k}")).collect();
            let rs: Vec<String> = e.results.iter().map(|(n, b)| format!("{n}=b{b}")).collect();
            let _ = writeln!(s, "\nentry {} [{}] -> {{{}}}", e.name, ks.join(" "), rs.join(", "));
        }
        s
    }
}

fn access_text(a: &Access) -> String {
    format!("b{}[{}; {:?}]", a.buf, a.offset, a.strides)
}

fn operand_text(o: &MatOperand) -> String {
    format!("b{}[{}; batch {:?}, row {}, col {}]", o.buf, o.offset, o.batch_strides, o.row_stride, o.col_stride)
}

pub fn kernel_text(k: &Kernel) -> String {
    match k {
        Kernel::Loop(l) => {
            let head = match l.reduce {
                Some(op) => format!("loop {:?} reduce {:?} over last {}", l.shape, op, l.reduced_dims),
                None => format!("loop {:?}", l.shape),
            };
            let assign = if l.accumulate { "+=" } else { "=" };
            let mut t = String::new();
            for s in &l.side {
                let _ = write!(t, "\n    {} = {}", access_text(&s.into), expr_text(&s.value));
            }
            let mut t = format!("{head}{t}\n    {} {assign} {}", access_text(&l.out), expr_text(&l.body));
            for s in &l.sums {
                let _ = write!(t, "\n    {} {} sum {}", access_text(&s.into), if s.accumulate { "+=" } else { "=" }, expr_text(&s.value));
            }
            t
        }
        Kernel::MatMul(m) => format!(
            "matmul{} batch {:?} m {} n {} k {}\n    {} {} {} @ {}",
            if m.bf16 { " bf16" } else { "" },
            m.batch,
            m.m,
            m.n,
            m.k,
            operand_text(&m.c),
            if m.accumulate { "+=" } else { "=" },
            operand_text(&m.a),
            operand_text(&m.b)
        ),
        Kernel::Gather(g) => format!("gather b{} = b{}[b{}] n {} rows {} dim {}", g.out, g.table, g.ids, g.n, g.rows, g.dim),
        Kernel::ScatterAdd(g) => {
            format!("scatter_add b{}[b{}] += b{} n {} rows {} dim {}", g.out, g.ids, g.src, g.n, g.rows, g.dim)
        }
        Kernel::Attention(a) => {
            let probs = a.probs.map(|p| format!(", b{p} = probabilities")).unwrap_or_default();
            let out = if a.out.is_dense(&a.batch, a.tq, a.dv) { format!("b{}", a.out.buf) } else { operand_text(&a.out) };
            format!("attention {}\n    {out} = attention({}){probs}", attention_head(a), attention_args(a))
        }
        Kernel::AttentionBackward(a) => format!(
            "attention_backward {}\n    {} = d attention({}) · {}{}",
            attention_head(&a.fwd),
            if a.is_packed() {
                format!("b{}", a.dq.buf)
            } else {
                a.grads().iter().map(|(n, o, _, _)| format!("{n} {}", operand_text(o))).collect::<Vec<_>>().join(", ")
            },
            attention_args(&a.fwd),
            operand_text(&a.dout),
            a.fwd.probs.map(|p| format!(" from probabilities b{p}")).unwrap_or_default()
        ),
    }
}

fn attention_head(a: &AttentionKernel) -> String {
    format!("batch {:?} tq {} tk {} d {} dv {} scale {}{}", a.batch, a.tq, a.tk, a.d, a.dv, a.scale, if a.causal { " causal" } else { "" })
}

fn attention_args(a: &AttentionKernel) -> String {
    let mut s = format!("{}, {}, {}", operand_text(&a.q), operand_text(&a.k), operand_text(&a.v));
    if let Some(m) = &a.mask {
        let _ = write!(s, ", mask {}", operand_text(m));
    }
    s
}

pub fn expr_text(e: &ScalarExpr) -> String {
    match e {
        ScalarExpr::Load(a) => access_text(a),
        ScalarExpr::Const(c) => format!("{c:?}"),
        ScalarExpr::Index(n) => format!("i{n}"),
        ScalarExpr::Unary(op, a) => {
            format!("{}({})", format!("{op:?}").to_lowercase(), expr_text(a))
        }
        ScalarExpr::Binary(op, a, b) => format!("{}({}, {})", format!("{op:?}").to_lowercase(), expr_text(a), expr_text(b)),
        ScalarExpr::Select(c, a, b) => format!("select({}, {}, {})", expr_text(c), expr_text(a), expr_text(b)),
    }
}

/// JSON has no infinities or NaN: such floats are written as the strings "inf",
/// "-inf" and "nan" (causal masks hold -inf constants).
mod nonfinite {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Num(f64),
        Text(String),
    }

    pub fn serialize<S: Serializer, T: Into<f64> + Copy>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        let x: f64 = (*v).into();
        if x.is_finite() {
            Repr::Num(x).serialize(s)
        } else if x.is_nan() {
            Repr::Text("nan".into()).serialize(s)
        } else if x > 0.0 {
            Repr::Text("inf".into()).serialize(s)
        } else {
            Repr::Text("-inf".into()).serialize(s)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>, T: FromF64>(d: D) -> Result<T, D::Error> {
        let x = match Repr::deserialize(d)? {
            Repr::Num(x) => x,
            Repr::Text(t) => match t.as_str() {
                "inf" => f64::INFINITY,
                "-inf" => f64::NEG_INFINITY,
                "nan" => f64::NAN,
                other => return Err(serde::de::Error::custom(format!("not a number: {other}"))),
            },
        };
        Ok(T::from_f64(x))
    }

    pub trait FromF64 {
        fn from_f64(x: f64) -> Self;
    }
    impl FromF64 for f32 {
        fn from_f64(x: f64) -> Self {
            x as f32
        }
    }
    impl FromF64 for f64 {
        fn from_f64(x: f64) -> Self {
            x
        }
    }
}

#[cfg(test)]
mod serde_tests {
    use super::*;

    #[test]
    fn non_finite_constants_survive_json() {
        let e = ScalarExpr::Binary(BinaryOp::Add, Box::new(ScalarExpr::Const(f32::NEG_INFINITY)), Box::new(ScalarExpr::Const(1.5)));
        let j = serde_json::to_string(&e).unwrap();
        let back: ScalarExpr = serde_json::from_str(&j).unwrap();
        assert_eq!(back, e);
        let n: ScalarExpr = serde_json::from_str(&serde_json::to_string(&ScalarExpr::Const(f32::NAN)).unwrap()).unwrap();
        assert!(matches!(n, ScalarExpr::Const(x) if x.is_nan()));
    }
}
