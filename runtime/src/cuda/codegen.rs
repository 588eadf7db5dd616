//! Kernel IR → CUDA C: one translation unit per program (`bmc emit --stage cuda`), and
//! the launch plan the CUDA executor follows.
//!
//! Every buffer lives in one device arena of 4-byte words; buffer `b` starts at word
//! `layout.offsets[b]` (256-byte aligned, as cuBLAS likes). Each generated `__global__`
//! takes the arena (`float* A`, viewed as `int*` for i32 buffers) and an error word
//! array, and has every shape, stride and offset baked in as a constant: the source is
//! specific to one program, and NVRTC folds all index arithmetic.
//!
//! Kernel kinds:
//! - `Loop` without reduction: one thread per point. With a reduction: a group of
//!   threads (a warp, or the block for long reductions) per output point, each folding
//!   a strided share of the reduced points, then a shuffle/shared-memory combine.
//!   A loop whose output is not injective over its non-reduced axes, or that reads its
//!   output buffer through another view, runs as one thread in the IR's order (what the
//!   CPU runs single-threaded for the same reason).
//! - `MatMul`: cuBLAS (`Launch::Gemm`) when every operand is a plain or transposed
//!   matrix with a valid leading dimension; otherwise a generated tiled kernel.
//! - `Gather` / `ScatterAdd`: one thread per element; an id out of range sets the error
//!   words (kernel, position, id) and the runtime reports it like the CPU does.
//! - `Attention` / `AttentionBackward`: a warp per query row with an online softmax (no
//!   T×T buffer), the backward recomputing probabilities and accumulating dK, dV with
//!   atomics after a memset (the buffer where the CPU keeps the forward's probabilities,
//!   `AttentionKernel::probs`, stays unused here).

use crate::kir::{
    Access, AttentionBackwardKernel, AttentionKernel, BinaryOp, BufId, DType, GatherKernel, Kernel, LoopKernel, MatMulKernel, MatOperand,
    Program, ReduceOp, ScalarExpr, ScatterAddKernel, UnaryOp,
};
use std::fmt::Write as _;

pub const PRELUDE: &str = include_str!("prelude.cu");
const BLOCK: usize = 256;
/// Words per alignment unit of the arena (256 bytes).
const ALIGN_WORDS: usize = 64;

/// Where each buffer lives in the arena, in 4-byte words.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    pub offsets: Vec<usize>,
    pub words: usize,
    /// With bf16 matrix products: the word offset of the bf16 shadow of the buffers
    /// (arena word `w` rounded to bf16 is the shadow's 2-byte element `w`), which the
    /// cast kernels write and cuBLAS reads.
    pub shadow: Option<usize>,
    /// Scratch of the tiled attention backward: per query row its softmax maximum, sum
    /// and `D = Σ p·dp` (3 × batch × tq words, the largest such kernel's).
    pub attention_stats: Option<usize>,
}

impl Layout {
    pub fn of(p: &Program) -> Layout {
        let mut offsets = Vec::with_capacity(p.buffers.len());
        let mut at = 0;
        for b in &p.buffers {
            offsets.push(at);
            at += b.len().div_ceil(ALIGN_WORDS).max(1) * ALIGN_WORDS;
        }
        let stats_words = p
            .kernels
            .iter()
            .filter_map(|k| match k {
                Kernel::AttentionBackward(a) if tiled_attention(&a.fwd) => Some(3 * a.fwd.batch_count() * a.fwd.tq),
                _ => None,
            })
            .max();
        let attention_stats = stats_words.map(|w| {
            let o = at;
            at += w.div_ceil(ALIGN_WORDS).max(1) * ALIGN_WORDS;
            o
        });
        let bf16 = p.kernels.iter().any(|k| matches!(k, Kernel::MatMul(m) if m.bf16));
        let shadow = bf16.then_some(at);
        if bf16 {
            at += at.div_ceil(2).div_ceil(ALIGN_WORDS) * ALIGN_WORDS;
        }
        Layout { offsets, words: at, shadow, attention_stats }
    }
}

/// A cuBLAS column-major GEMM `C = op(A) op(B)` (+ C with `accumulate`), sizes in
/// cuBLAS's terms, offsets in arena words, one entry per batch matrix or a uniform
/// batch stride.
#[derive(Clone, Debug, PartialEq)]
pub struct Gemm {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: usize,
    pub lda: usize,
    pub b: usize,
    pub ldb: usize,
    pub c: usize,
    pub ldc: usize,
    pub accumulate: bool,
    /// `(count, stride_a, stride_b, stride_c)` for a strided batched call, or the
    /// per-batch offsets `(a, b, c)` relative to the first matrices.
    pub batch: GemmBatch,
    /// bf16 operands: this kernel first writes A's and B's spans to the arena's bf16
    /// shadow (`Layout::shadow`), where cuBLAS reads them (same offsets, 2-byte
    /// elements; f32 accumulation and C).
    pub bf16: Option<Cast>,
}

/// A cast kernel `name<<<grid, block>>>(arena, errors)` run before a bf16 GEMM.
#[derive(Clone, Debug, PartialEq)]
pub struct Cast {
    pub name: String,
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shadow: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub enum GemmBatch {
    Strided { count: usize, stride_a: usize, stride_b: usize, stride_c: usize },
    Offsets(Vec<(usize, usize, usize)>),
}

/// How the executor runs one kernel of the program.
#[derive(Clone, Debug, PartialEq)]
pub enum Launch {
    /// `name<<<grid, block>>>(arena, errors)`.
    Grid {
        name: String,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
    },
    Gemm(Gemm),
    /// Kernels `name<<<grid, block>>>(arena, errors)` launched one after another.
    Seq(Vec<Grid>),
}

/// One kernel launch of a [`Launch::Seq`].
#[derive(Clone, Debug, PartialEq)]
pub struct Grid {
    pub name: String,
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
}

impl Launch {
    /// The generated kernels this launch runs, in order (a bf16 GEMM's cast kernel; a
    /// plain GEMM none).
    pub fn kernel_names(&self) -> Vec<&str> {
        match self {
            Launch::Grid { name, .. } => vec![name],
            Launch::Seq(v) => v.iter().map(|g| g.name.as_str()).collect(),
            Launch::Gemm(g) => g.bf16.iter().map(|c| c.name.as_str()).collect(),
        }
    }
}

/// The generated module: source text, launch plan per kernel and the arena layout.
#[derive(Clone, Debug)]
pub struct CudaModule {
    pub source: String,
    pub launches: Vec<Launch>,
    pub layout: Layout,
}

pub fn generate(p: &Program) -> CudaModule {
    let layout = Layout::of(p);
    let mut src = String::new();
    let _ = writeln!(src, "// CUDA C generated by bmc from the kernel IR (`bmc emit --stage kernels`).");
    let _ = writeln!(src, "// Arena of {} words; buffers:", layout.words);
    for (i, b) in p.buffers.iter().enumerate() {
        let _ = writeln!(src, "//   b{i} at {}: {}{:?} \"{}\"", layout.offsets[i], b.dtype.name(), b.shape, b.name);
    }
    src.push_str(PRELUDE);
    let mut launches = vec![];
    for (i, k) in p.kernels.iter().enumerate() {
        let g = Gen { p, layout: &layout, name: format!("k{i}") };
        let _ = writeln!(src, "\n// k{i}: {}", crate::kir::kernel_text(k).replace('\n', "\n//"));
        let launch = match k {
            Kernel::Loop(l) if !l.sums.is_empty() => g.loop_with_sums(l, &mut src),
            Kernel::Loop(l) => {
                let Grid { name, grid, block } = g.loop_kernel(l, &mut src);
                Launch::Grid { name, grid, block }
            }
            Kernel::MatMul(m) => match g.cublas(m) {
                Some(mut gemm) => {
                    if m.bf16 {
                        gemm.bf16 = Some(g.bf16_cast(m, &mut src));
                    }
                    let _ = writeln!(src, "// (cuBLAS) {gemm:?}");
                    Launch::Gemm(gemm)
                }
                None => g.tiled_matmul(m, &mut src),
            },
            Kernel::Gather(gk) => g.gather(gk, i, &mut src),
            Kernel::ScatterAdd(s) => g.scatter_add(s, i, &mut src),
            Kernel::Attention(a) if tiled_attention(a) => g.attention_tiled(a, &mut src),
            Kernel::AttentionBackward(a) if tiled_attention(&a.fwd) => g.attention_backward_tiled(a, &mut src),
            Kernel::Attention(a) => g.attention(a, &mut src),
            Kernel::AttentionBackward(a) => g.attention_backward(a, &mut src),
        };
        launches.push(launch);
    }
    CudaModule { source: src, launches, layout }
}

struct Gen<'a> {
    p: &'a Program,
    layout: &'a Layout,
    name: String,
}

fn grid1(n: usize, block: usize) -> (u32, u32, u32) {
    (n.div_ceil(block).max(1) as u32, 1, 1)
}

/// `f` as a C float literal that round-trips exactly.
fn float_lit(f: f32) -> String {
    if f.is_finite() { format!("{f:?}f") } else { format!("__int_as_float(0x{:08x}u)", f.to_bits()) }
}

impl Gen<'_> {
    fn dtype(&self, b: BufId) -> DType {
        self.p.buffers[b].dtype
    }

    /// The arena index of `a` at loop indices `i0, i1, ...`.
    fn index(&self, a: &Access) -> String {
        let mut s = format!("{}LL", self.layout.offsets[a.buf] + a.offset);
        for (d, &st) in a.strides.iter().enumerate() {
            if st != 0 {
                let _ = write!(s, " + i{d} * {st}LL");
            }
        }
        s
    }

    fn load(&self, a: &Access) -> String {
        match self.dtype(a.buf) {
            DType::F32 => format!("A[{}]", self.index(a)),
            DType::I32 => format!("(float)((const int*)A)[{}]", self.index(a)),
        }
    }

    fn expr(&self, e: &ScalarExpr) -> String {
        match e {
            ScalarExpr::Load(a) => self.load(a),
            ScalarExpr::Const(c) => float_lit(*c),
            ScalarExpr::Index(n) => format!("(float)i{n}"),
            ScalarExpr::Unary(op, a) => {
                let f = match op {
                    UnaryOp::Neg => return format!("(-{})", self.expr(a)),
                    UnaryOp::Exp => "expf",
                    UnaryOp::Log => "logf",
                    UnaryOp::Sqrt => "sqrtf",
                    UnaryOp::Rsqrt => "bm_rsqrt",
                    UnaryOp::Abs => "fabsf",
                    UnaryOp::Tanh => "tanhf",
                    UnaryOp::Sigmoid => "bm_sigmoid",
                    UnaryOp::Relu => "bm_relu",
                    UnaryOp::Sin => "sinf",
                    UnaryOp::Cos => "cosf",
                    UnaryOp::Erf => "erff",
                    UnaryOp::Recip => "bm_recip",
                    UnaryOp::Square => "bm_square",
                    UnaryOp::Step => "bm_step",
                    UnaryOp::Floor => "floorf",
                    UnaryOp::GeluTanh => "bm_gelu_tanh",
                    UnaryOp::GeluTanhGrad => "bm_gelu_tanh_grad",
                };
                format!("{f}({})", self.expr(a))
            }
            ScalarExpr::Binary(op, a, b) => {
                let (x, y) = (self.expr(a), self.expr(b));
                let infix = |o: &str| format!("({x} {o} {y})");
                match op {
                    BinaryOp::Add => infix("+"),
                    BinaryOp::Sub => infix("-"),
                    BinaryOp::Mul => infix("*"),
                    BinaryOp::Div => infix("/"),
                    BinaryOp::Max => format!("bm_max({x}, {y})"),
                    BinaryOp::Min => format!("bm_min({x}, {y})"),
                    BinaryOp::Pow => format!("powf({x}, {y})"),
                    BinaryOp::Lt => format!("bm_lt({x}, {y})"),
                    BinaryOp::Le => format!("bm_le({x}, {y})"),
                    BinaryOp::Gt => format!("bm_gt({x}, {y})"),
                    BinaryOp::Ge => format!("bm_ge({x}, {y})"),
                    BinaryOp::Eq => format!("bm_eq({x}, {y})"),
                    BinaryOp::Ne => format!("bm_ne({x}, {y})"),
                }
            }
            ScalarExpr::Select(c, a, b) => format!("bm_select({}, {}, {})", self.expr(c), self.expr(a), self.expr(b)),
        }
    }

    /// The statements of one point of an elementwise kernel: every side value and the
    /// body first, then their stores (side stores may update in place).
    fn elementwise_point(&self, k: &LoopKernel, body: &str) -> String {
        if k.side.is_empty() {
            return self.store(&k.out, body, k.accumulate);
        }
        let mut t = String::from("{ ");
        for (i, s) in k.side.iter().enumerate() {
            let _ = write!(t, "float s{i}_ = {}; ", self.expr(&s.value));
        }
        let _ = write!(t, "float v_ = {body}; ");
        for (i, s) in k.side.iter().enumerate() {
            let _ = write!(t, "{} ", self.store(&s.into, &format!("s{i}_"), false));
        }
        let _ = write!(t, "{} }}", self.store(&k.out, "v_", k.accumulate));
        t
    }

    /// The statement storing `v` into `out` at the current indices.
    fn store(&self, out: &Access, v: &str, accumulate: bool) -> String {
        let at = self.index(out);
        match (self.dtype(out.buf), accumulate) {
            (DType::F32, false) => format!("A[{at}] = {v};"),
            (DType::F32, true) => format!("A[{at}] += {v};"),
            (DType::I32, false) => format!("((int*)A)[{at}] = bm_to_i32({v});"),
            (DType::I32, true) => format!("((int*)A)[{at}] = bm_to_i32((float)((int*)A)[{at}] + {v});"),
        }
    }

    /// Declares `i{first}..i{first+dims.len()}` from the flat index `flat` (row-major).
    fn unravel(dims: &[usize], first: usize, flat: &str) -> String {
        let mut s = format!("long long r_ = {flat};");
        for (d, &n) in dims.iter().enumerate().rev() {
            if d == 0 {
                let _ = write!(s, " long long i{} = r_;", first + d);
            } else {
                let _ = write!(s, " long long i{} = r_ % {n}LL; r_ /= {n}LL;", first + d);
            }
        }
        if dims.is_empty() {
            s.push_str(" (void)r_;");
        }
        s
    }

    fn head(&self, src: &mut String) {
        let _ = writeln!(src, "extern \"C\" __global__ void {}(float* __restrict__ A, int* __restrict__ E) {{", self.name);
    }

    /// A loop kernel with fused sums: the loop, then each sum as its own reduction over
    /// the loop's points (`LoopKernel::sum_kernel`; a value that loads `out` reads what
    /// the loop stored).
    fn loop_with_sums(&self, k: &LoopKernel, src: &mut String) -> Launch {
        let main = LoopKernel { sums: vec![], ..k.clone() };
        let mut grids = vec![self.loop_kernel(&main, src)];
        for (j, s) in k.sums.iter().enumerate() {
            let g = Gen { p: self.p, layout: self.layout, name: format!("{}_s{j}", self.name) };
            grids.push(g.loop_kernel(&k.sum_kernel(s), src));
        }
        Launch::Seq(grids)
    }

    fn loop_kernel(&self, k: &LoopKernel, src: &mut String) -> Grid {
        let rank = k.shape.len();
        let red = k.reduce.map_or(0, |_| k.reduced_dims.min(rank));
        let keep = rank - red;
        let outer: usize = k.shape[..keep].iter().product();
        let inner: usize = k.shape[keep..].iter().product();
        let mut race_free = crate::exec::injective(k.shape[..keep].iter().copied().zip(k.out.strides[..keep].iter().copied()));
        let mut check = |a: &Access| {
            if a.buf == k.out.buf && (a.offset != k.out.offset || a.strides != k.out.strides) {
                race_free = false;
            }
        };
        crate::exec::walk_loads(&k.body, &mut check);
        k.side.iter().for_each(|s| crate::exec::walk_loads(&s.value, &mut check));
        self.head(src);
        let body = self.expr(&k.body);
        if !race_free {
            // One thread, in the IR's order.
            let _ = writeln!(src, "  if (blockIdx.x != 0 || threadIdx.x != 0) return;");
            let _ = writeln!(src, "  for (long long t_ = 0; t_ < {outer}LL; t_++) {{");
            let _ = writeln!(src, "    {}", Self::unravel(&k.shape[..keep], 0, "t_"));
            match k.reduce {
                None => {
                    let _ = writeln!(src, "    {}", self.elementwise_point(k, &body));
                }
                Some(op) => {
                    let (id, comb) = reduce_parts(op);
                    let _ = writeln!(src, "    float acc_ = {id};");
                    let _ = writeln!(src, "    for (long long s_ = 0; s_ < {inner}LL; s_++) {{");
                    let _ = writeln!(src, "      {}", Self::unravel(&k.shape[keep..], keep, "s_"));
                    let _ = writeln!(src, "      acc_ = {comb}(acc_, {body});");
                    let _ = writeln!(src, "    }}");
                    let _ = writeln!(src, "    {}", self.store(&k.out, "acc_", k.accumulate));
                }
            }
            let _ = writeln!(src, "  }}\n}}");
            return Grid { name: self.name.clone(), grid: (1, 1, 1), block: (1, 1, 1) };
        }
        match k.reduce {
            None => {
                let _ = writeln!(src, "  long long t_ = blockIdx.x * (long long)blockDim.x + threadIdx.x;");
                let _ = writeln!(src, "  if (t_ >= {outer}LL) return;");
                let _ = writeln!(src, "  {}", Self::unravel(&k.shape, 0, "t_"));
                let _ = writeln!(src, "  {}", self.elementwise_point(k, &body));
                let _ = writeln!(src, "}}");
                Grid { name: self.name.clone(), grid: grid1(outer, BLOCK), block: (BLOCK as u32, 1, 1) }
            }
            Some(op) => {
                // A warp per output for short reductions, the whole block for long ones.
                let group = if inner > 2048 { BLOCK } else { 32 };
                let per_block = BLOCK / group;
                let (id, comb) = reduce_parts(op);
                let opn = match op {
                    ReduceOp::Sum => 0,
                    ReduceOp::Max => 1,
                    ReduceOp::Min => 2,
                };
                let _ = writeln!(src, "  __shared__ float scratch_[{}];", BLOCK / 32);
                let _ = writeln!(src, "  long long t_ = blockIdx.x * {per_block}LL + threadIdx.x / {group};");
                let _ = writeln!(src, "  int g_ = threadIdx.x % {group};");
                let _ = writeln!(src, "  if (t_ >= {outer}LL) return;");
                let _ = writeln!(src, "  {}", Self::unravel(&k.shape[..keep], 0, "t_"));
                let _ = writeln!(src, "  float acc_ = {id};");
                let _ = writeln!(src, "  for (long long s_ = g_; s_ < {inner}LL; s_ += {group}) {{");
                let _ = writeln!(src, "    {}", Self::unravel(&k.shape[keep..], keep, "s_"));
                let _ = writeln!(src, "    acc_ = {comb}(acc_, {body});");
                let _ = writeln!(src, "  }}");
                let _ = writeln!(src, "  acc_ = bm_group_reduce<{opn}, {group}>(acc_, scratch_);");
                let _ = writeln!(src, "  if (g_ == 0) {{ {} }}", self.store(&k.out, "acc_", k.accumulate));
                let _ = writeln!(src, "}}");
                Grid { name: self.name.clone(), grid: grid1(outer, per_block), block: (BLOCK as u32, 1, 1) }
            }
        }
    }

    /// The per-batch arena offsets of a strided operand.
    fn batch_offsets(&self, o: &MatOperand, batch: &[usize]) -> Vec<usize> {
        let base = self.layout.offsets[o.buf];
        o.batch_offsets(batch).into_iter().map(|x| x + base).collect()
    }

    /// `m` as a cuBLAS call, when each operand is a (possibly transposed) matrix with a
    /// valid leading dimension.
    fn cublas(&self, m: &MatMulKernel) -> Option<Gemm> {
        if self.dtype(m.a.buf) != DType::F32 || self.dtype(m.b.buf) != DType::F32 || self.dtype(m.c.buf) != DType::F32 {
            return None;
        }
        if m.m == 0 || m.n == 0 || m.k == 0 {
            return None;
        }
        // Column-major storage of an r×c row-major view: Some((transposed, ld)) where
        // `transposed` means memory holds Xᵀ in column-major order.
        fn storage(o: &MatOperand, r: usize, c: usize) -> Option<(bool, usize)> {
            let (r1, c1) = (r.max(1), c.max(1));
            if o.row_stride == 1 || r == 1 {
                let ld = if c == 1 { r1 } else { o.col_stride };
                if ld >= r1 {
                    return Some((false, ld));
                }
            }
            if o.col_stride == 1 || c == 1 {
                let ld = if r == 1 { c1 } else { o.row_stride };
                if ld >= c1 {
                    return Some((true, ld));
                }
            }
            None
        }
        let (ta, lda) = storage(&m.a, m.m, m.k)?;
        let (tb, ldb) = storage(&m.b, m.k, m.n)?;
        let (tc, ldc) = storage(&m.c, m.m, m.n)?;
        let offs = |o: &MatOperand| self.batch_offsets(o, &m.batch);
        let (oa, ob, oc) = (offs(&m.a), offs(&m.b), offs(&m.c));
        // If C is stored transposed (row-major), compute Cᵀ = Bᵀ Aᵀ instead.
        let (first, second) = if tc { ((tb, ldb, &ob), (ta, lda, &oa)) } else { ((ta, lda, &oa), (tb, ldb, &ob)) };
        // op(X) is `N` when memory holds exactly the matrix cuBLAS wants: for C = A B that
        // is A (not transposed); for Cᵀ = Bᵀ Aᵀ that is Bᵀ (memory holds Bᵀ when `tb`).
        let (trans_a, trans_b) = if tc { (!first.0, !second.0) } else { (first.0, second.0) };
        let (cm, cn) = if tc { (m.n, m.m) } else { (m.m, m.n) };
        let count = oc.len();
        let stride = |v: &[usize]| -> Option<usize> {
            if v.len() < 2 {
                return Some(0);
            }
            let s = v[1].checked_sub(v[0])?;
            v.windows(2).all(|w| w[1].checked_sub(w[0]) == Some(s)).then_some(s)
        };
        let batch = match (stride(first.2), stride(second.2), stride(&oc)) {
            (Some(sa), Some(sb), Some(sc)) if count == 1 || sc >= m.m * m.n => {
                GemmBatch::Strided { count, stride_a: sa, stride_b: sb, stride_c: sc }
            }
            _ => GemmBatch::Offsets((0..count).map(|i| (first.2[i] - first.2[0], second.2[i] - second.2[0], oc[i] - oc[0])).collect()),
        };
        Some(Gemm {
            trans_a,
            trans_b,
            m: cm,
            n: cn,
            k: m.k,
            a: first.2[0],
            lda: first.1,
            b: second.2[0],
            ldb: second.1,
            c: oc[0],
            ldc,
            accumulate: m.accumulate,
            batch,
            bf16: None,
        })
    }

    /// The kernel writing the bf16 shadow of `m`'s operand spans (A's first, then B's).
    fn bf16_cast(&self, m: &MatMulKernel, src: &mut String) -> Cast {
        let shadow = self.layout.shadow.expect("a bf16 product has a shadow");
        let span = |o: &MatOperand, r: usize, c: usize| {
            let last = o.max_element(&m.batch, r, c).ok().flatten().unwrap_or(o.offset);
            (self.layout.offsets[o.buf] + o.offset, last + 1 - o.offset)
        };
        let ((sa, na), (sb, nb)) = (span(&m.a, m.m, m.k), span(&m.b, m.k, m.n));
        let name = format!("{}_bf16", self.name);
        let _ = writeln!(src, "extern \"C\" __global__ void {name}(float* __restrict__ A, int* __restrict__ E) {{");
        let _ = writeln!(src, "  long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;");
        let _ = writeln!(src, "  unsigned short* S = (unsigned short*)(A + {shadow}LL);");
        let _ = writeln!(src, "  long long w = i < {na}LL ? {sa}LL + i : {sb}LL + (i - {na}LL);");
        let _ = writeln!(src, "  if (i < {}LL) S[w] = bm_bf16_bits(A[w]);", na + nb);
        let _ = writeln!(src, "}}");
        Cast { name, grid: grid1(na + nb, BLOCK), block: (BLOCK as u32, 1, 1), shadow }
    }

    /// Batch offsets of operands computed in-kernel from the flat batch index `bvar`.
    fn batch_offset_code(&self, batch: &[usize], ops: &[(&str, &MatOperand)], bvar: &str) -> String {
        let mut s = String::new();
        for (n, o) in ops {
            let _ = write!(s, "long long {n} = {}LL; ", self.layout.offsets[o.buf] + o.offset);
        }
        let _ = write!(s, "{{ long long r_ = {bvar};");
        for (d, &len) in batch.iter().enumerate().rev() {
            let _ = write!(s, " long long x{d}_ = r_ % {len}LL; r_ /= {len}LL;");
            for (n, o) in ops {
                if o.batch_strides[d] != 0 {
                    let _ = write!(s, " {n} += x{d}_ * {}LL;", o.batch_strides[d]);
                }
            }
        }
        s.push_str(" (void)r_; }");
        s
    }

    fn tiled_matmul(&self, m: &MatMulKernel, src: &mut String) -> Launch {
        const T: usize = 16;
        let count: usize = m.batch.iter().product();
        self.head(src);
        let _ = writeln!(src, "  __shared__ float as_[{T}][{T}], bs_[{T}][{T}];");
        let _ = writeln!(src, "  long long row = blockIdx.y * {T}LL + threadIdx.y, col = blockIdx.x * {T}LL + threadIdx.x;");
        let _ = writeln!(src, "  {}", self.batch_offset_code(&m.batch, &[("oa", &m.a), ("ob", &m.b), ("oc", &m.c)], "blockIdx.z"));
        let _ = writeln!(src, "  float acc = 0.0f;");
        let _ = writeln!(src, "  for (long long t = 0; t < {}LL; t += {T}) {{", m.k);
        let _ = writeln!(src, "    long long ka = t + threadIdx.x, kb = t + threadIdx.y;");
        // bf16 operands are rounded as they are loaded.
        let (open, close) = if m.bf16 { ("bm_round_bf16(", ")") } else { ("", "") };
        let _ = writeln!(
            src,
            "    as_[threadIdx.y][threadIdx.x] = (row < {}LL && ka < {}LL) ? {open}A[oa + row * {}LL + ka * {}LL]{close} : 0.0f;",
            m.m, m.k, m.a.row_stride, m.a.col_stride
        );
        let _ = writeln!(
            src,
            "    bs_[threadIdx.y][threadIdx.x] = (kb < {}LL && col < {}LL) ? {open}A[ob + kb * {}LL + col * {}LL]{close} : 0.0f;",
            m.k, m.n, m.b.row_stride, m.b.col_stride
        );
        let _ = writeln!(src, "    __syncthreads();");
        let _ = writeln!(src, "    for (int j = 0; j < {T}; j++) acc += as_[threadIdx.y][j] * bs_[j][threadIdx.x];");
        let _ = writeln!(src, "    __syncthreads();");
        let _ = writeln!(src, "  }}");
        let op = if m.accumulate { "+=" } else { "=" };
        let _ = writeln!(
            src,
            "  if (row < {}LL && col < {}LL) A[oc + row * {}LL + col * {}LL] {op} acc;",
            m.m, m.n, m.c.row_stride, m.c.col_stride
        );
        let _ = writeln!(src, "}}");
        Launch::Grid {
            name: self.name.clone(),
            grid: (m.n.div_ceil(T) as u32, m.m.div_ceil(T) as u32, count as u32),
            block: (T as u32, T as u32, 1),
        }
    }

    /// Records an out-of-range id for the runtime's error message (first one wins).
    fn report(kernel: usize) -> String {
        format!("if (atomicCAS(&E[0], 0, {}) == 0) {{ E[1] = (int)i; E[2] = id; }} return;", kernel + 1)
    }

    /// The shared start of gather and scatter-add: thread `e` handles element `c` of row
    /// `i`, whose id `id` is checked against `rows`.
    fn id_rows(&self, n: usize, dim: usize, ids: BufId, rows: usize, kernel: usize, src: &mut String) {
        self.head(src);
        let _ = writeln!(src, "  long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x;");
        let _ = writeln!(src, "  if (e >= {n}LL) return;");
        let _ = writeln!(src, "  long long i = e / {dim}LL, c = e % {dim}LL;");
        let _ = writeln!(src, "  int id = ((const int*)A)[{}LL + i];", self.layout.offsets[ids]);
        let _ = writeln!(src, "  if (id < 0 || id >= {rows}) {{ {} }}", Self::report(kernel));
    }

    fn gather(&self, g: &GatherKernel, kernel: usize, src: &mut String) -> Launch {
        let (t, out) = (self.layout.offsets[g.table], self.layout.offsets[g.out]);
        let n = g.n * g.dim;
        self.id_rows(n, g.dim, g.ids, g.rows, kernel, src);
        let _ = writeln!(src, "  ((unsigned*)A)[{out}LL + e] = ((const unsigned*)A)[{t}LL + id * {}LL + c];", g.dim);
        let _ = writeln!(src, "}}");
        Launch::Grid { name: self.name.clone(), grid: grid1(n, BLOCK), block: (BLOCK as u32, 1, 1) }
    }

    fn scatter_add(&self, s: &ScatterAddKernel, kernel: usize, src: &mut String) -> Launch {
        let (from, out) = (self.layout.offsets[s.src], self.layout.offsets[s.out]);
        let n = s.n * s.dim;
        self.id_rows(n, s.dim, s.ids, s.rows, kernel, src);
        let _ = writeln!(src, "  atomicAdd(&A[{out}LL + id * {}LL + c], A[{from}LL + e]);", s.dim);
        let _ = writeln!(src, "}}");
        Launch::Grid { name: self.name.clone(), grid: grid1(n, BLOCK), block: (BLOCK as u32, 1, 1) }
    }

    /// The shared start of both attention kernels: warp `row` of the grid handles query
    /// row `i` of batch `b`; offsets `oq ok ov (om)` of that batch.
    fn attention_head(&self, a: &AttentionKernel, extra: &[(&str, &MatOperand)], src: &mut String) {
        let rows = a.batch_count() * a.tq;
        self.head(src);
        let _ = writeln!(src, "  long long row = (blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5;");
        let _ = writeln!(src, "  int lane = threadIdx.x & 31;");
        let _ = writeln!(src, "  if (row >= {rows}LL) return;");
        let _ = writeln!(src, "  long long b = row / {0}LL, i = row % {0}LL;", a.tq);
        let mut ops: Vec<(&str, &MatOperand)> = vec![("oq", &a.q), ("ok", &a.k), ("ov", &a.v)];
        if let Some(m) = &a.mask {
            ops.push(("om", m));
        }
        ops.extend_from_slice(extra);
        let _ = writeln!(src, "  {}", self.batch_offset_code(&a.batch, &ops, "b"));
        let dl = a.d.div_ceil(32);
        let _ = writeln!(src, "  float q[{dl}];");
        let _ = writeln!(
            src,
            "  for (int c = 0; c < {dl}; c++) {{ long long d = lane + 32 * c; q[c] = d < {} ? A[oq + i * {}LL + d * {}LL] : 0.0f; }}",
            a.d, a.q.row_stride, a.q.col_stride
        );
        let _ = writeln!(src, "  long long jend = {};", if a.causal { "i + 1".to_string() } else { format!("{}LL", a.tk) });
    }

    /// `s = scale · q·k_j + mask[i, j]` (warp-wide) into `s`.
    fn score(&self, a: &AttentionKernel) -> String {
        let dl = a.d.div_ceil(32);
        let mut s = format!(
            "float s = 0.0f; for (int c = 0; c < {dl}; c++) {{ long long d = lane + 32 * c; if (d < {}) s += q[c] * A[ok + j * {}LL + d * {}LL]; }} s = bm_warp_sum(s) * {};",
            a.d,
            a.k.row_stride,
            a.k.col_stride,
            float_lit(a.scale as f32)
        );
        if let Some(m) = &a.mask {
            let _ = write!(s, " s += A[om + i * {}LL + j * {}LL];", m.row_stride, m.col_stride);
        }
        s
    }

    /// The shared start of the tiled kernels whose block is ATT_ROWS query rows of one
    /// batch index: warp `w` has row `i` (`live` when it exists), its query row in
    /// `qs_[w]` and, with `dout`, its upstream gradient row in `gs_[w]`; the batch
    /// index's offsets of the operands, `dout`'s (`oo`) and `extra`'s (the outputs).
    fn attention_rows(&self, a: &AttentionKernel, dout: Option<&MatOperand>, extra: &[(&str, &MatOperand)], src: &mut String) {
        let (r, qblocks) = (ATT_ROWS, a.tq.div_ceil(ATT_ROWS));
        let _ = writeln!(src, "  int w = threadIdx.x >> 5, lane = threadIdx.x & 31;");
        let _ = writeln!(src, "  long long b = blockIdx.x / {qblocks}LL, i0 = (blockIdx.x % {qblocks}LL) * {r}LL, i = i0 + w;");
        let _ = writeln!(src, "  bool live = i < {}LL;", a.tq);
        // `dout`'s offset `oo` first, then the callers' outputs.
        let ops: Vec<(&str, &MatOperand)> = dout.map(|o| ("oo", o)).into_iter().chain(extra.iter().copied()).collect();
        self.attention_offsets(a, &ops, src);
        let _ = writeln!(
            src,
            "  for (int c = lane; c < {}; c += 32) qs_[w][c] = live ? A[oq + i * {}LL + c * {}LL] : 0.0f;",
            a.d, a.q.row_stride, a.q.col_stride
        );
        if let Some(o) = dout {
            let _ = writeln!(
                src,
                "  for (int c = lane; c < {}; c += 32) gs_[w][c] = live ? A[oo + i * {}LL + c * {}LL] : 0.0f;",
                a.dv, o.row_stride, o.col_stride
            );
        }
    }

    /// Batch `b`'s operand offsets `oq ok ov (om)`, then those of `extra` (the
    /// forward's output `ot`; the backward's `dout` `oo` and gradients).
    fn attention_offsets(&self, a: &AttentionKernel, extra: &[(&str, &MatOperand)], src: &mut String) {
        let mut ops: Vec<(&str, &MatOperand)> = vec![("oq", &a.q), ("ok", &a.k), ("ov", &a.v)];
        if let Some(m) = &a.mask {
            ops.push(("om", m));
        }
        ops.extend_from_slice(extra);
        let _ = writeln!(src, "  {}", self.batch_offset_code(&a.batch, &ops, "b"));
    }

    /// Loads keys `j0..j0 + ATT_KEYS` of K and V into `ks_`, `vs_` (zero past `tk`),
    /// between two block barriers.
    fn attention_tile(&self, a: &AttentionKernel, src: &mut String) {
        let (kt, threads) = (ATT_KEYS, ATT_ROWS * 32);
        let _ = writeln!(src, "    __syncthreads();");
        for (arr, o, dim, base) in [("ks_", &a.k, a.d, "ok"), ("vs_", &a.v, a.dv, "ov")] {
            let _ = writeln!(
                src,
                "    for (int e = threadIdx.x; e < {}; e += {threads}) {{ int jj = e / {dim}, c = e % {dim}; long long j = j0 + jj; {arr}[jj][c] = j < {}LL ? A[{base} + j * {}LL + c * {}LL] : 0.0f; }}",
                kt * dim,
                a.tk,
                o.row_stride,
                o.col_stride
            );
        }
        let _ = writeln!(src, "    __syncthreads();");
    }

    /// Lane `lane`'s score `s` for key `j` of the tile (row `i` of warp `w`), and with
    /// `dp` its `dout_i · v_j`.
    fn tile_score(&self, a: &AttentionKernel, dp: bool) -> String {
        let mut s =
            format!("s = 0.0f; for (int c = 0; c < {}; c++) s += qs_[w][c] * ks_[lane][c]; s *= {};", a.d, float_lit(a.scale as f32));
        if let Some(m) = &a.mask {
            let _ = write!(s, " s += A[om + i * {}LL + j * {}LL];", m.row_stride, m.col_stride);
        }
        if dp {
            let _ = write!(s, " for (int c = 0; c < {}; c++) dp += gs_[w][c] * vs_[lane][c];", a.dv);
        }
        s
    }

    /// Opens the loop over key tiles of an online softmax and folds the tile's scores `s`
    /// (and with `dp` their `dout·v`) into the row's `m` and `l`, leaving open the block
    /// `if (mn != -BM_INF) {` where `corr` rescales what came before and `p` is this
    /// lane's weight; the caller finishes it and closes both.
    fn online_tile_step(&self, a: &AttentionKernel, dp: bool, src: &mut String) {
        let _ = writeln!(src, "  for (long long j0 = 0; j0 < jmax; j0 += {ATT_KEYS}) {{");
        self.attention_tile(a, src);
        let _ = writeln!(src, "    long long j = j0 + lane;");
        let _ = writeln!(src, "    float s = -BM_INF{};", if dp { ", dp = 0.0f" } else { "" });
        let _ = writeln!(src, "    if (live && j < jend) {{ {} }}", self.tile_score(a, dp));
        let _ = writeln!(src, "    float mt = s;");
        let _ = writeln!(src, "    for (int o = 16; o > 0; o >>= 1) mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, o));");
        let _ = writeln!(src, "    float mn = fmaxf(m, mt);");
        let _ = writeln!(src, "    if (mn != -BM_INF) {{  // a tile of masked keys weighs nothing");
        let _ = writeln!(src, "      float corr = m == -BM_INF ? 0.0f : expf(m - mn), p = s == -BM_INF ? 0.0f : expf(s - mn);");
        let _ = writeln!(src, "      l = l * corr + bm_warp_sum(p);");
    }

    /// The keys row `i` sees (`jend`) and the block's rows together (`jmax`).
    fn key_ranges(a: &AttentionKernel, src: &mut String) {
        if a.causal {
            let _ = writeln!(src, "  long long jend = i + 1, jmax = i0 + {0}LL < {1}LL ? i0 + {0}LL : {1}LL;", ATT_ROWS, a.tk);
        } else {
            let _ = writeln!(src, "  long long jend = {0}LL, jmax = {0}LL;", a.tk);
        }
    }

    /// The tiled forward: a block of ATT_ROWS warps (a query row each) of one batch index
    /// shares each tile of ATT_KEYS keys and values in shared memory; lane `j` scores key
    /// `j` of the tile, the warp folds the tile into its row's online softmax, and lane
    /// `c` accumulates output features `c`, `c + 32`, ... from the tile's values.
    fn attention_tiled(&self, a: &AttentionKernel, src: &mut String) -> Launch {
        let (r, kt, vl) = (ATT_ROWS, ATT_KEYS, a.dv.div_ceil(32));
        self.head(src);
        let _ = writeln!(src, "  __shared__ float ks_[{kt}][{}], vs_[{kt}][{}], qs_[{r}][{}], ps_[{r}][{kt}];", a.d + 1, a.dv + 1, a.d);
        self.attention_rows(a, None, &[("ot", &a.out)], src);
        Self::key_ranges(a, src);
        let _ = writeln!(src, "  float m = -BM_INF, l = 0.0f, acc[{vl}];");
        let _ = writeln!(src, "  for (int t = 0; t < {vl}; t++) acc[t] = 0.0f;");
        self.online_tile_step(a, false, src);
        let _ = writeln!(src, "      ps_[w][lane] = p;");
        let _ = writeln!(src, "      __syncwarp();");
        let _ = writeln!(
            src,
            "      for (int t = 0; t < {vl}; t++) {{ int c = lane + 32 * t; if (c < {}) {{ float x = acc[t] * corr; for (int jj = 0; jj < {kt}; jj++) x += ps_[w][jj] * vs_[jj][c]; acc[t] = x; }} }}",
            a.dv
        );
        let _ = writeln!(src, "      __syncwarp();");
        let _ = writeln!(src, "      m = mn;");
        let _ = writeln!(src, "    }}");
        let _ = writeln!(src, "  }}");
        let _ = writeln!(src, "  // Every key masked: 0 / 0 = NaN, as the unfused softmax gives.");
        let _ = writeln!(
            src,
            "  if (live) for (int t = 0; t < {vl}; t++) {{ int c = lane + 32 * t; if (c < {0}) A[ot + i * {1}LL + c] = acc[t] / l; }}",
            a.dv, a.out.row_stride
        );
        let _ = writeln!(src, "}}");
        let blocks = a.batch_count() * a.tq.div_ceil(r);
        Launch::Grid { name: self.name.clone(), grid: (blocks as u32, 1, 1), block: ((r * 32) as u32, 1, 1) }
    }

    /// The tiled backward, two kernels and no atomics. `_dq` (blocks of query rows, as
    /// the forward): the row's softmax statistics and `D = Σ p·dp` over the key tiles,
    /// stored for the second kernel, then `dq = scale · Σ_j p_j (dp_j − D) k_j`. `_dkv`
    /// (a block per tile of ATT_KEYS keys): every block of query rows in turn computes its
    /// `p` and `ds` for the tile's keys (a warp per row, a lane per key) into shared
    /// memory, then each thread adds `Σ_rows ds q` and `Σ_rows p dout` into the elements
    /// of dk and dv it owns.
    fn attention_backward_tiled(&self, ab: &AttentionBackwardKernel, src: &mut String) -> Launch {
        let a = &ab.fwd;
        let (r, kt, threads) = (ATT_ROWS, ATT_KEYS, ATT_ROWS * 32);
        let dl = a.d.div_ceil(32);
        let st = self.layout.attention_stats.expect("a tiled attention backward has stats scratch");
        let n = a.batch_count() * a.tq;
        let scale = float_lit(a.scale as f32);
        let shared = format!(
            "  __shared__ float ks_[{kt}][{}], vs_[{kt}][{}], qs_[{r}][{}], gs_[{r}][{}], ps_[{r}][{kt}], ds_[{r}][{kt}];",
            a.d + 1,
            a.dv + 1,
            a.d,
            a.dv
        );

        // Kernel 1: statistics and dq.
        let k1 = format!("{}_dq", self.name);
        let _ = writeln!(src, "extern \"C\" __global__ void {k1}(float* __restrict__ A, int* __restrict__ E) {{");
        let _ = writeln!(src, "{shared}");
        self.attention_rows(a, Some(&ab.dout), &[("odq", &ab.dq)], src);
        Self::key_ranges(a, src);
        let _ = writeln!(src, "  float m = -BM_INF, l = 0.0f, dsum = 0.0f;");
        self.online_tile_step(a, true, src);
        let _ = writeln!(src, "      dsum = dsum * corr + bm_warp_sum(p * dp);");
        let _ = writeln!(src, "      m = mn;");
        let _ = writeln!(src, "    }}");
        let _ = writeln!(src, "  }}");
        let _ = writeln!(src, "  float D = dsum / l;");
        let _ = writeln!(
            src,
            "  if (live && lane == 0) {{ long long row = b * {tq}LL + i; A[{st}LL + row] = m; A[{}LL + row] = l; A[{}LL + row] = D; }}",
            st + n,
            st + 2 * n,
            tq = a.tq
        );
        let _ = writeln!(src, "  float gq[{dl}];");
        let _ = writeln!(src, "  for (int t = 0; t < {dl}; t++) gq[t] = 0.0f;");
        let _ = writeln!(src, "  for (long long j0 = 0; j0 < jmax; j0 += {kt}) {{");
        self.attention_tile(a, src);
        let _ = writeln!(src, "    long long j = j0 + lane;");
        let _ = writeln!(src, "    float s = -BM_INF, dp = 0.0f;");
        let _ = writeln!(src, "    if (live && j < jend) {{ {} }}", self.tile_score(a, true));
        let _ = writeln!(src, "    float p = s == -BM_INF ? 0.0f : expf(s - m) / l;");
        let _ = writeln!(src, "    ps_[w][lane] = p == 0.0f ? 0.0f : p * (dp - D) * {scale};");
        let _ = writeln!(src, "    __syncwarp();");
        let _ = writeln!(
            src,
            "    for (int t = 0; t < {dl}; t++) {{ int c = lane + 32 * t; if (c < {}) {{ float x = gq[t]; for (int jj = 0; jj < {kt}; jj++) x += ps_[w][jj] * ks_[jj][c]; gq[t] = x; }} }}",
            a.d
        );
        let _ = writeln!(src, "    __syncwarp();");
        let _ = writeln!(src, "  }}");
        let _ = writeln!(
            src,
            "  if (live) for (int t = 0; t < {dl}; t++) {{ int c = lane + 32 * t; if (c < {0}) A[odq + i * {1}LL + c] = gq[t]; }}",
            a.d, ab.dq.row_stride
        );
        let _ = writeln!(src, "}}");

        // Kernel 2: dk and dv of one tile of keys.
        let k2 = format!("{}_dkv", self.name);
        let kblocks = a.tk.div_ceil(kt);
        let (nk, nv) = ((kt * a.d).div_ceil(threads), (kt * a.dv).div_ceil(threads));
        let _ = writeln!(src, "extern \"C\" __global__ void {k2}(float* __restrict__ A, int* __restrict__ E) {{");
        let _ = writeln!(src, "{shared}");
        let _ = writeln!(src, "  int w = threadIdx.x >> 5, lane = threadIdx.x & 31;");
        let _ = writeln!(src, "  long long b = blockIdx.x / {kblocks}LL, j0 = (blockIdx.x % {kblocks}LL) * {kt}LL;");
        self.attention_offsets(a, &[("oo", &ab.dout), ("odk", &ab.dk), ("odv", &ab.dv)], src);
        self.attention_tile(a, src);
        let _ = writeln!(src, "  float gk[{nk}], gv[{nv}];");
        let _ = writeln!(src, "  for (int u = 0; u < {nk}; u++) gk[u] = 0.0f;");
        let _ = writeln!(src, "  for (int u = 0; u < {nv}; u++) gv[u] = 0.0f;");
        let istart = if a.causal { format!("j0 / {r}LL * {r}LL") } else { "0LL".into() };
        let _ = writeln!(src, "  for (long long i0 = {istart}; i0 < {}LL; i0 += {r}) {{", a.tq);
        let _ = writeln!(src, "    long long i = i0 + w;");
        let _ = writeln!(src, "    bool live = i < {}LL;", a.tq);
        let _ = writeln!(src, "    __syncthreads();");
        let _ = writeln!(
            src,
            "    for (int c = lane; c < {}; c += 32) qs_[w][c] = live ? A[oq + i * {}LL + c * {}LL] : 0.0f;",
            a.d, a.q.row_stride, a.q.col_stride
        );
        let _ = writeln!(
            src,
            "    for (int c = lane; c < {}; c += 32) gs_[w][c] = live ? A[oo + i * {}LL + c * {}LL] : 0.0f;",
            a.dv, ab.dout.row_stride, ab.dout.col_stride
        );
        let _ = writeln!(src, "    __syncwarp();");
        let _ = writeln!(src, "    long long j = j0 + lane;");
        let seen = if a.causal { " && j <= i" } else { "" };
        let _ = writeln!(src, "    float s = -BM_INF, dp = 0.0f, p = 0.0f, ds = 0.0f;");
        let _ = writeln!(src, "    if (live && j < {}LL{seen}) {{ {} }}", a.tk, self.tile_score(a, true));
        let _ = writeln!(src, "    if (s != -BM_INF) {{");
        let _ = writeln!(
            src,
            "      long long row = b * {}LL + i; float mi = A[{st}LL + row], li = A[{}LL + row], Di = A[{}LL + row];",
            a.tq,
            st + n,
            st + 2 * n
        );
        let _ = writeln!(src, "      p = expf(s - mi) / li;");
        let _ = writeln!(src, "      ds = p == 0.0f ? 0.0f : p * (dp - Di) * {scale};");
        let _ = writeln!(src, "    }}");
        let _ = writeln!(src, "    ps_[w][lane] = p;");
        let _ = writeln!(src, "    ds_[w][lane] = ds;");
        let _ = writeln!(src, "    __syncthreads();");
        for (acc, count, dim, coef, rows) in [("gk", nk, a.d, "ds_", "qs_"), ("gv", nv, a.dv, "ps_", "gs_")] {
            let _ = writeln!(
                src,
                "    for (int u = 0; u < {count}; u++) {{ int e = threadIdx.x + u * {threads}; if (e < {}) {{ int jj = e / {dim}, c = e % {dim}; float x = {acc}[u]; for (int ww = 0; ww < {r}; ww++) x += {coef}[ww][jj] * {rows}[ww][c]; {acc}[u] = x; }} }}",
                kt * dim
            );
        }
        let _ = writeln!(src, "  }}");
        for (acc, count, dim, base, o) in [("gk", nk, a.d, "odk", &ab.dk), ("gv", nv, a.dv, "odv", &ab.dv)] {
            let _ = writeln!(
                src,
                "  for (int u = 0; u < {count}; u++) {{ int e = threadIdx.x + u * {threads}; int jj = e / {dim}, c = e % {dim}; long long j = j0 + jj; if (e < {} && j < {}LL) A[{base} + j * {}LL + c] = {acc}[u]; }}",
                kt * dim,
                a.tk,
                o.row_stride
            );
        }
        let _ = writeln!(src, "}}");
        let block = (threads as u32, 1, 1);
        Launch::Seq(vec![
            Grid { name: k1, grid: ((a.batch_count() * a.tq.div_ceil(r)) as u32, 1, 1), block },
            Grid { name: k2, grid: ((a.batch_count() * kblocks) as u32, 1, 1), block },
        ])
    }

    fn attention(&self, a: &AttentionKernel, src: &mut String) -> Launch {
        let vl = a.dv.div_ceil(32);
        self.attention_head(a, &[("ot", &a.out)], src);
        let _ = writeln!(src, "  float m = -BM_INF, l = 0.0f, acc[{vl}];");
        let _ = writeln!(src, "  for (int c = 0; c < {vl}; c++) acc[c] = 0.0f;");
        let _ = writeln!(src, "  for (long long j = 0; j < jend; j++) {{");
        let _ = writeln!(src, "    {}", self.score(a));
        let _ = writeln!(src, "    if (s == -BM_INF) continue;  // a masked key weighs nothing");
        let _ = writeln!(src, "    float mn = fmaxf(m, s), corr = expf(m - mn), p = expf(s - mn);");
        let _ = writeln!(src, "    l = l * corr + p; m = mn;");
        let _ = writeln!(
            src,
            "    for (int c = 0; c < {vl}; c++) {{ long long d = lane + 32 * c; if (d < {}) acc[c] = acc[c] * corr + p * A[ov + j * {}LL + d * {}LL]; }}",
            a.dv, a.v.row_stride, a.v.col_stride
        );
        let _ = writeln!(src, "  }}");
        let _ = writeln!(src, "  // Every key masked: 0 / 0 = NaN, as the unfused softmax gives.");
        let _ = writeln!(
            src,
            "  for (int c = 0; c < {vl}; c++) {{ long long d = lane + 32 * c; if (d < {0}) A[ot + i * {1}LL + d] = acc[c] / l; }}",
            a.dv, a.out.row_stride
        );
        let _ = writeln!(src, "}}");
        Launch::Grid { name: self.name.clone(), grid: grid1(a.batch_count() * a.tq * 32, 128), block: (128, 1, 1) }
    }

    fn attention_backward(&self, ab: &AttentionBackwardKernel, src: &mut String) -> Launch {
        let a = &ab.fwd;
        let (dl, vl) = (a.d.div_ceil(32), a.dv.div_ceil(32));
        // dk and dv accumulate through atomics: zeroed first, by a kernel of their own.
        let zero = format!("{}_zero", self.name);
        let (per, row) = (a.tk * (a.d + a.dv), a.d + a.dv);
        let total = a.batch_count() * per;
        let _ = writeln!(src, "extern \"C\" __global__ void {zero}(float* __restrict__ A, int* __restrict__ E) {{");
        let _ = writeln!(src, "  long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x;");
        let _ = writeln!(src, "  if (e >= {total}LL) return;");
        let _ = writeln!(src, "  long long b = e / {per}LL, j = e % {per}LL / {row}LL, c = e % {row}LL;");
        let _ = writeln!(src, "  {}", self.batch_offset_code(&a.batch, &[("odk", &ab.dk), ("odv", &ab.dv)], "b"));
        let _ = writeln!(
            src,
            "  if (c < {0}LL) A[odk + j * {1}LL + c] = 0.0f; else A[odv + j * {2}LL + c - {0}LL] = 0.0f;",
            a.d, ab.dk.row_stride, ab.dv.row_stride
        );
        let _ = writeln!(src, "}}");
        self.attention_head(a, &[("oo", &ab.dout), ("odq", &ab.dq), ("odk", &ab.dk), ("odv", &ab.dv)], src);
        let _ = writeln!(src, "  float go[{vl}];");
        let _ = writeln!(
            src,
            "  for (int c = 0; c < {vl}; c++) {{ long long d = lane + 32 * c; go[c] = d < {} ? A[oo + i * {}LL + d * {}LL] : 0.0f; }}",
            a.dv, ab.dout.row_stride, ab.dout.col_stride
        );
        let dot_v = format!(
            "float dp = 0.0f; for (int c = 0; c < {vl}; c++) {{ long long d = lane + 32 * c; if (d < {}) dp += go[c] * A[ov + j * {}LL + d * {}LL]; }} dp = bm_warp_sum(dp);",
            a.dv, a.v.row_stride, a.v.col_stride
        );
        let _ = writeln!(src, "  // Pass 1: softmax statistics and D = Σ_j p_j (dout · v_j), online.");
        let _ = writeln!(src, "  float m = -BM_INF, l = 0.0f, dsum = 0.0f;");
        let _ = writeln!(src, "  for (long long j = 0; j < jend; j++) {{");
        let _ = writeln!(src, "    {}", self.score(a));
        let _ = writeln!(src, "    if (s == -BM_INF) continue;");
        let _ = writeln!(src, "    {dot_v}");
        let _ = writeln!(src, "    float mn = fmaxf(m, s), corr = expf(m - mn), p = expf(s - mn);");
        let _ = writeln!(src, "    l = l * corr + p; dsum = dsum * corr + p * dp; m = mn;");
        let _ = writeln!(src, "  }}");
        let _ = writeln!(src, "  float D = dsum / l;");
        let _ = writeln!(src, "  // Pass 2: dS = P (dP - D); dq = Σ dS k · scale, dk += dS q · scale, dv += P dout.");
        let _ = writeln!(src, "  float gq[{dl}];");
        let _ = writeln!(src, "  for (int c = 0; c < {dl}; c++) gq[c] = 0.0f;");
        let _ = writeln!(src, "  for (long long j = 0; j < jend; j++) {{");
        let _ = writeln!(src, "    {}", self.score(a));
        let _ = writeln!(src, "    if (s == -BM_INF) continue;");
        let _ = writeln!(src, "    {dot_v}");
        let _ = writeln!(src, "    float p = expf(s - m) / l, ds = p * (dp - D) * {};", float_lit(a.scale as f32));
        let _ = writeln!(src, "    for (int c = 0; c < {dl}; c++) {{ long long d = lane + 32 * c; if (d < {}) {{", a.d);
        let _ = writeln!(src, "      gq[c] += ds * A[ok + j * {}LL + d * {}LL];", a.k.row_stride, a.k.col_stride);
        let _ = writeln!(src, "      atomicAdd(&A[odk + j * {}LL + d], ds * q[c]);", ab.dk.row_stride);
        let _ = writeln!(src, "    }} }}");
        let _ = writeln!(
            src,
            "    for (int c = 0; c < {vl}; c++) {{ long long d = lane + 32 * c; if (d < {}) atomicAdd(&A[odv + j * {}LL + d], p * go[c]); }}",
            a.dv, ab.dv.row_stride
        );
        let _ = writeln!(src, "  }}");
        let _ = writeln!(
            src,
            "  for (int c = 0; c < {dl}; c++) {{ long long d = lane + 32 * c; if (d < {}) A[odq + i * {}LL + d] = gq[c]; }}",
            a.d, ab.dq.row_stride
        );
        let _ = writeln!(src, "}}");
        let block = (128, 1, 1);
        Launch::Seq(vec![
            Grid { name: zero, grid: grid1(total, 128), block },
            Grid { name: self.name.clone(), grid: grid1(a.batch_count() * a.tq * 32, 128), block },
        ])
    }
}

/// Query rows (a warp each) per block of the tiled attention kernels.
const ATT_ROWS: usize = 8;
/// Keys (a lane each) per shared-memory tile of the tiled attention kernels.
const ATT_KEYS: usize = 32;

/// Whether `a` runs as the tiled kernels: their shared memory (K and V tiles, the
/// block's query and upstream-gradient rows, two rows of probabilities per warp) fits in
/// 48 KiB. Otherwise the warp-per-row kernels run.
fn tiled_attention(a: &AttentionKernel) -> bool {
    let floats = ATT_KEYS * (a.d + 1) + ATT_KEYS * (a.dv + 1) + ATT_ROWS * (a.d + a.dv) + 2 * ATT_ROWS * ATT_KEYS;
    a.tq > 0 && a.tk > 0 && a.d > 0 && a.dv > 0 && floats * 4 <= 48 * 1024
}

/// The identity and combining function of a reduction.
fn reduce_parts(op: ReduceOp) -> (&'static str, &'static str) {
    match op {
        ReduceOp::Sum => ("0.0f", "bm_combine<0>"),
        ReduceOp::Max => ("-BM_INF", "bm_combine<1>"),
        ReduceOp::Min => ("BM_INF", "bm_combine<2>"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::test_support::*;
    use crate::kir::{Kernel, MatMulKernel};

    /// cuBLAS's column-major `sgemm` (+ strided batching) on a host arena, by its spec.
    fn emulate(g: &Gemm, arena: &mut [f32]) {
        let calls: Vec<(usize, usize, usize)> = match &g.batch {
            GemmBatch::Strided { count, stride_a, stride_b, stride_c } => {
                (0..*count).map(|i| (i * stride_a, i * stride_b, i * stride_c)).collect()
            }
            GemmBatch::Offsets(v) => v.clone(),
        };
        for (da, db, dc) in calls {
            let (a, b, c) = (g.a + da, g.b + db, g.c + dc);
            for i in 0..g.m {
                for j in 0..g.n {
                    let mut s = 0.0f64;
                    for l in 0..g.k {
                        let x = if g.trans_a { arena[a + l + i * g.lda] } else { arena[a + i + l * g.lda] };
                        let y = if g.trans_b { arena[b + j + l * g.ldb] } else { arena[b + l + j * g.ldb] };
                        s += x as f64 * y as f64;
                    }
                    let at = c + i + j * g.ldc;
                    arena[at] = if g.accumulate { arena[at] + s as f32 } else { s as f32 };
                }
            }
        }
    }

    /// An operand of `rows × cols` per batch: row-major, or transposed (`t`), batches
    /// contiguous (or broadcast along the first batch axis), at offset 3.
    fn dense(buf: usize, batch: &[usize], rows: usize, cols: usize, t: bool, bcast: bool) -> (MatOperand, usize) {
        let mut bs = vec![0; batch.len()];
        let mut acc = rows * cols;
        for d in (0..batch.len()).rev() {
            if !(bcast && d == 0) {
                bs[d] = acc;
                acc *= batch[d];
            }
        }
        let (rs, cs) = if t { (1, rows) } else { (cols, 1) };
        (MatOperand { buf, offset: 3, batch_strides: bs, row_stride: rs, col_stride: cs }, acc + 3)
    }

    /// Every GEMM the code generator hands to cuBLAS computes what the CPU does.
    #[test]
    fn cublas_plans_compute_the_kernel_ir_product() {
        let mut planned = 0;
        for batch in [vec![], vec![3], vec![2, 3]] {
            for &(m, n, k) in &[(1, 1, 1), (3, 5, 7), (4, 1, 6), (1, 6, 2), (7, 4, 1)] {
                for bits in 0..32u32 {
                    let f = |i: u32| bits & (1u32 << i) != 0;
                    let bcast = f(4) && !batch.is_empty();
                    let (a, la) = dense(0, &batch, m, k, f(0), false);
                    let (b, lb) = dense(1, &batch, k, n, f(1), bcast);
                    let (c, lc) = dense(2, &batch, m, n, f(2), false);
                    let mk = MatMulKernel { batch: batch.clone(), m, n, k, a, b, c, accumulate: f(3), bf16: false };
                    let p = program(
                        vec![buf("a", DType::F32, la), buf("b", DType::F32, lb), buf("c", DType::F32, lc)],
                        vec![Kernel::MatMul(mk.clone())],
                    );
                    let mut cpu = crate::exec::Executor::interpreted(&p).unwrap();
                    fill(cpu.buffers_mut(), (m * 7 + n * 3 + k + bits as usize) as u64, false);
                    let module = generate(&p);
                    let Launch::Gemm(g) = &module.launches[0] else { continue };
                    planned += 1;
                    let mut arena = vec![0f32; module.layout.words];
                    for i in 0..3 {
                        let at = module.layout.offsets[i];
                        let data = cpu.f32(i).unwrap();
                        arena[at..at + data.len()].copy_from_slice(data);
                    }
                    emulate(g, &mut arena);
                    cpu.run("main").unwrap();
                    let want = cpu.f32(2).unwrap();
                    let got = &arena[module.layout.offsets[2]..module.layout.offsets[2] + want.len()];
                    for (e, (x, y)) in got.iter().zip(want).enumerate() {
                        assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{mk:?}\n{g:?}\nelement {e}: cuBLAS plan {x} vs CPU {y}");
                    }
                }
            }
        }
        assert!(planned > 400, "only {planned} products went to cuBLAS");
    }

    #[test]
    fn layout_aligns_every_buffer() {
        let p = program(vec![buf("a", DType::F32, 1), buf("b", DType::I32, 65), buf("c", DType::F32, 0)], vec![]);
        let l = Layout::of(&p);
        assert_eq!(l.offsets, vec![0, 64, 192]);
        assert_eq!(l.words, 256);
    }
}
