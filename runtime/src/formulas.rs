//! Loop kernels whose body is a known formula, run through hand-written wide code.
//!
//! Cranelift's vectors are 128 bits. Most loop kernels are bound by memory, where that
//! costs nothing, but Adam's update does two divisions and a square root per element:
//! at 4 lanes the divider bounds it (W1: 15% of a step, 4 cycles an element). The
//! executor asks [`Formula::recognise`] about every loop kernel; one whose outputs are,
//! expression for expression, Adam's (`m`, `v` and the parameter, as
//! `compiler/src/passes/optimizer.rs` emits them, in any order of the outputs) runs
//! through [`Formula::run`] instead of its JIT function: the same operations in the same
//! order, compiled 16 lanes wide with AVX-512 (8 with AVX2, see [`crate::cpu`]), so the
//! results are bit for bit the JIT's and the interpreter's. The second formula is the
//! MLP's forward epilogue, a bias added to every row and GELU (`pre = x + b`, kept for
//! the backward, and `act = gelu(pre)`): its JIT function spends as many instructions
//! moving rows through a stack buffer for `rows`' wide GELU as the GELU itself. The
//! third is its backward, `dpre = dact · gelu′(pre)` with the bias gradient summed from
//! it (a fused sum: the formula adds into the chunk's partial sums as the JIT function
//! does). Every other kernel, and an Adam update the patterns do not cover (say, a
//! parameter stored in another dtype), keeps its JIT function.
//!
//! A pattern (`Pat`) is an expression with holes: a load at the kernel's point from
//! a contiguous buffer, a load of one element (a scalar every point reads), a load of
//! one row every row reads (a bias), a constant.
//! A hole used twice must bind the same thing. Alternatives (`Pat::Any`) cover the
//! optimiser's variants: decoupled decay or none, Adam's L2 term or none, a clipped
//! gradient or not.

use crate::kir::{Access, BinaryOp, BufId, LoopKernel, ScalarExpr, UnaryOp};

/// A hole of a pattern: which binding of its kind it fills.
type Slot = usize;

/// An expression with holes.
enum Pat {
    /// A load at the kernel's point, from a buffer laid out like the iteration space.
    Point(Slot),
    /// A load of one element, the same at every point.
    Scalar(Slot),
    /// A load of one row, the same for every row: element `j` of the innermost axis at
    /// every point (a bias added to every row).
    Row(Slot),
    /// A constant.
    Const(Slot),
    Un(UnaryOp, &'static Pat),
    Bin(BinaryOp, &'static Pat, &'static Pat),
    /// The first alternative that matches.
    Any(&'static [Pat]),
}

use Pat::{Any, Bin, Const, Point, Row, Scalar, Un};

// Point holes: Adam's inputs and its outputs.
const PARAM: Slot = 0;
const M: Slot = 1;
const V: Slot = 2;
const GRAD: Slot = 3;
const OUT_PARAM: Slot = 4;
const OUT_M: Slot = 5;
const OUT_V: Slot = 6;
const POINTS: usize = 7;
// Scalar holes.
const DECAY: Slot = 0; // 1 - lr · weight decay (AdamW)
const BC2_SQRT: Slot = 1; // √(1 - β₂ᵗ)
const STEP_SIZE: Slot = 2; // lr / (1 - β₁ᵗ)
const CLIP: Slot = 3; // the gradient clipping coefficient
const SCALARS: usize = 4;
// Constant holes.
const ONE_MINUS_B1: Slot = 0;
const B2: Slot = 1;
const ONE_MINUS_B2: Slot = 2;
const EPS: Slot = 3;
const L2: Slot = 4; // Adam's coupled weight decay
const CONSTS: usize = 5;
// Row holes.
const BIAS: Slot = 0;
const ROWS: usize = 1;

/// The gradient as the update reads it: clipped or not.
const CLIPPED: Pat = Any(&[Bin(BinaryOp::Mul, &Point(GRAD), &Scalar(CLIP)), Point(GRAD)]);
/// … plus Adam's L2 term `wd · p`, or not.
const G: Pat = Any(&[Bin(BinaryOp::Add, &CLIPPED, &Bin(BinaryOp::Mul, &Point(PARAM), &Const(L2))), CLIPPED]);
/// `m + (g - m)(1 - β₁)` (PyTorch's `m.lerp_(g, 1 - β₁)`).
const M1: Pat = Bin(BinaryOp::Add, &Point(M), &Bin(BinaryOp::Mul, &Bin(BinaryOp::Sub, &G, &Point(M)), &Const(ONE_MINUS_B1)));
/// `v β₂ + g² (1 - β₂)`.
const V1: Pat =
    Bin(BinaryOp::Add, &Bin(BinaryOp::Mul, &Point(V), &Const(B2)), &Bin(BinaryOp::Mul, &Bin(BinaryOp::Mul, &G, &G), &Const(ONE_MINUS_B2)));
/// The parameter after AdamW's decoupled decay, or as it is.
const P0: Pat = Any(&[Bin(BinaryOp::Mul, &Point(PARAM), &Scalar(DECAY)), Point(PARAM)]);
/// `p0 - m1 / (√v1 / √(1 - β₂ᵗ) + ε) · step size`.
const P1: Pat = Bin(
    BinaryOp::Sub,
    &P0,
    &Bin(
        BinaryOp::Mul,
        &Bin(BinaryOp::Div, &M1, &Bin(BinaryOp::Add, &Bin(BinaryOp::Div, &Un(UnaryOp::Sqrt, &V1), &Scalar(BC2_SQRT)), &Const(EPS))),
        &Scalar(STEP_SIZE),
    ),
);
/// Adam's outputs: (where it is stored, what is stored).
const ADAM: [(Slot, &Pat); 3] = [(OUT_M, &M1), (OUT_V, &V1), (OUT_PARAM, &P1)];

// Point holes of a bias and GELU (the other formula; numbered apart from Adam's, as
// each pattern is matched on its own).
const X: Slot = 0;
const OUT_PRE: Slot = 1;
const OUT_ACT: Slot = 2;
/// `x + b`: a matrix product's output plus its bias, row by row.
const PRE: Pat = Bin(BinaryOp::Add, &Point(X), &Row(BIAS));
const ACT: Pat = Un(UnaryOp::GeluTanh, &PRE);
/// The MLP's forward epilogue as training emits it (the pre-activation kept for the
/// backward), then as inference does (the activation only).
const BIAS_GELU: [&[(Slot, &Pat)]; 2] = [&[(OUT_PRE, &PRE), (OUT_ACT, &ACT)], &[(OUT_ACT, &ACT)]];

// Point holes of GELU's backward (numbered apart again).
const DY: Slot = 0;
const PRE_ACT: Slot = 1;
const OUT_DPRE: Slot = 2;
const GELU_GRAD: Pat = Un(UnaryOp::GeluTanhGrad, &Point(PRE_ACT));
/// `dpre = dact · gelu′(pre)`, in either order of the product (which NaN a product of
/// two NaNs gives depends on it).
const GELU_BACKWARD: [&[(Slot, &Pat)]; 2] =
    [&[(OUT_DPRE, &Bin(BinaryOp::Mul, &Point(DY), &GELU_GRAD))], &[(OUT_DPRE, &Bin(BinaryOp::Mul, &GELU_GRAD, &Point(DY)))]];

/// What a pattern's holes are bound to.
#[derive(Clone, Default)]
struct Binds {
    points: [Option<(BufId, usize)>; POINTS],
    scalars: [Option<(BufId, usize)>; SCALARS],
    rows: [Option<(BufId, usize)>; ROWS],
    consts: [Option<u32>; CONSTS],
}

fn bind<T: PartialEq>(hole: &mut Option<T>, x: T) -> bool {
    match hole {
        Some(y) => *y == x,
        None => {
            *hole = Some(x);
            true
        }
    }
}

/// The kernel being matched: its shape and which buffers are f32.
struct Space<'a> {
    shape: &'a [usize],
    f32: &'a dyn Fn(BufId) -> bool,
}

impl Space<'_> {
    /// Whether `a` reads (or writes) element `offset + flat index` at every point.
    fn point(&self, a: &Access) -> bool {
        let mut step = 1;
        for (&n, &s) in self.shape.iter().zip(&a.strides).rev() {
            if n > 1 && s != step {
                return false;
            }
            step *= n;
        }
        (self.f32)(a.buf)
    }

    /// Whether `a` reads the same element at every point.
    fn scalar(&self, a: &Access) -> bool {
        self.shape.iter().zip(&a.strides).all(|(&n, &s)| n <= 1 || s == 0) && (self.f32)(a.buf)
    }

    /// Whether `a` reads element `offset + j` at every point whose innermost index is `j`.
    fn row(&self, a: &Access) -> bool {
        let last = self.shape.len().saturating_sub(1);
        self.shape.iter().zip(&a.strides).enumerate().all(|(d, (&n, &s))| n <= 1 || s == if d == last { 1 } else { 0 }) && (self.f32)(a.buf)
    }

    fn unify(&self, p: &Pat, e: &ScalarExpr, b: &mut Binds) -> bool {
        match (p, e) {
            (Point(s), ScalarExpr::Load(a)) => self.point(a) && bind(&mut b.points[*s], (a.buf, a.offset)),
            (Scalar(s), ScalarExpr::Load(a)) => self.scalar(a) && bind(&mut b.scalars[*s], (a.buf, a.offset)),
            (Row(s), ScalarExpr::Load(a)) => self.row(a) && bind(&mut b.rows[*s], (a.buf, a.offset)),
            (Const(s), ScalarExpr::Const(c)) => bind(&mut b.consts[*s], c.to_bits()),
            (Un(op, x), ScalarExpr::Unary(o, y)) => op == o && self.unify(x, y, b),
            (Bin(op, x, y), ScalarExpr::Binary(o, l, r)) => op == o && self.unify(x, l, b) && self.unify(y, r, b),
            (Any(alternatives), e) => alternatives.iter().any(|alt| {
                let mut tried = b.clone();
                let ok = self.unify(alt, e, &mut tried);
                if ok {
                    *b = tried;
                }
                ok
            }),
            _ => false,
        }
    }

    /// Binds `outputs` (where, what) to the pattern's outputs in some order.
    fn outputs(&self, pattern: &[(Slot, &Pat)], outputs: &[(&Access, &ScalarExpr)]) -> Option<Binds> {
        if pattern.len() != outputs.len() {
            return None;
        }
        let n = outputs.len();
        // Every order of the kernel's outputs (there are three).
        let mut order: Vec<usize> = (0..n).collect();
        loop {
            let mut b = Binds::default();
            let ok = pattern.iter().zip(&order).all(|(&(into, pat), &o)| {
                let (at, value) = outputs[o];
                self.point(at) && bind(&mut b.points[into], (at.buf, at.offset)) && self.unify(pat, value, &mut b)
            });
            if ok {
                return Some(b);
            }
            if !next_permutation(&mut order) {
                return None;
            }
        }
    }
}

/// The next order of `v` in lexicographic order; `false` after the last.
fn next_permutation(v: &mut [usize]) -> bool {
    let Some(i) = (1..v.len()).rev().find(|&i| v[i - 1] < v[i]) else { return false };
    let j = (i..v.len()).rev().find(|&j| v[j] > v[i - 1]).expect("v[i] is greater");
    v.swap(i - 1, j);
    v[i..].reverse();
    true
}

/// An element of a buffer: which, and where in it.
#[derive(Clone, Copy, Debug, PartialEq)]
struct At {
    buf: BufId,
    offset: usize,
}

impl At {
    fn of(b: Option<(BufId, usize)>) -> Option<At> {
        b.map(|(buf, offset)| At { buf, offset })
    }

    /// SAFETY: `bufs` holds base pointers of f32 buffers, `buf` among them.
    unsafe fn ptr(self, bufs: *const *mut u8) -> *mut f32 {
        unsafe { (*bufs.add(self.buf) as *mut f32).add(self.offset) }
    }
}

/// A loop kernel recognised as a known formula.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Formula {
    /// Adam's (or AdamW's) update of one parameter.
    Adam(Adam),
    /// A bias added to every row, then GELU (tanh form).
    BiasGelu(BiasGelu),
    /// GELU's backward, with the bias gradient summed from it or not.
    GeluBackward(GeluBackward),
}

/// A loop kernel recognised as Adam's (or AdamW's) update of one parameter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Adam {
    /// Elements per index of the outermost axis.
    inner: usize,
    param: At,
    m: At,
    v: At,
    grad: At,
    out_param: At,
    out_m: At,
    out_v: At,
    decay: Option<At>,
    bc2_sqrt: At,
    step_size: At,
    clip: Option<At>,
    one_minus_b1: f32,
    b2: f32,
    one_minus_b2: f32,
    eps: f32,
    l2: Option<f32>,
}

/// The update's scalars for one call.
#[derive(Clone, Copy)]
struct Coefs {
    decay: f32,
    clip: f32,
    bc2_sqrt: f32,
    step_size: f32,
    one_minus_b1: f32,
    b2: f32,
    one_minus_b2: f32,
    eps: f32,
    l2: f32,
}

/// Adam's update of one element, in the compiled expression's order of operations
/// (Rust does not contract `a * b + c`, and neither does the JIT). A missing decay
/// factor or clip coefficient is 1, which leaves every value as it is.
#[inline(always)]
fn adam<const L2: bool>(c: &Coefs, p: f32, m: f32, v: f32, g: f32) -> (f32, f32, f32) {
    let g = g * c.clip;
    let g = if L2 { g + p * c.l2 } else { g };
    let m1 = m + (g - m) * c.one_minus_b1;
    let v1 = v * c.b2 + (g * g) * c.one_minus_b2;
    let p1 = p * c.decay - (m1 / (v1.sqrt() / c.bc2_sqrt + c.eps)) * c.step_size;
    (p1, m1, v1)
}

/// The buffers of one call: inputs and outputs, each `n` elements from its pointer.
#[derive(Clone, Copy)]
struct Rows {
    param: *mut f32,
    m: *mut f32,
    v: *mut f32,
    grad: *mut f32,
    out_param: *mut f32,
    out_m: *mut f32,
    out_v: *mut f32,
}

/// Updates elements `j..j + W`: loads every input, computes, then stores (an output may
/// be an input, updated in place: it is read only at the point it is written).
#[inline(always)]
unsafe fn lanes<const W: usize, const L2: bool>(c: &Coefs, r: Rows, j: usize) {
    // SAFETY (whole body): the caller keeps `j + W` within every row.
    let load = |p: *mut f32| {
        let mut x = [0.0f32; W];
        unsafe { std::ptr::copy_nonoverlapping(p.add(j), x.as_mut_ptr(), W) };
        x
    };
    let (p, m, v, g) = (load(r.param), load(r.m), load(r.v), load(r.grad));
    let (mut p1, mut m1, mut v1) = ([0.0f32; W], [0.0f32; W], [0.0f32; W]);
    for i in 0..W {
        (p1[i], m1[i], v1[i]) = adam::<L2>(c, p[i], m[i], v[i], g[i]);
    }
    let store = |p: *mut f32, x: &[f32; W]| unsafe { std::ptr::copy_nonoverlapping(x.as_ptr(), p.add(j), W) };
    store(r.out_m, &m1);
    store(r.out_v, &v1);
    store(r.out_param, &p1);
}

#[inline(always)]
unsafe fn update<const W: usize, const L2: bool>(c: &Coefs, r: Rows, lo: usize, hi: usize) {
    let mut j = lo;
    // SAFETY: `j + W <= hi`, then `j < hi`, within the rows (the caller's promise).
    while j + W <= hi {
        unsafe { lanes::<W, L2>(c, r, j) };
        j += W;
    }
    while j < hi {
        unsafe { lanes::<1, L2>(c, r, j) };
        j += 1;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn update_avx512<const L2: bool>(c: &Coefs, r: Rows, lo: usize, hi: usize) {
    unsafe { update::<16, L2>(c, r, lo, hi) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn update_avx2<const L2: bool>(c: &Coefs, r: Rows, lo: usize, hi: usize) {
    unsafe { update::<8, L2>(c, r, lo, hi) }
}

/// The lanes of the widest code this CPU runs: 16 (AVX-512), 8 (AVX2) or 4.
fn widest_lanes() -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu::avx512() {
            return 16;
        }
        if std::is_x86_feature_detected!("avx2") {
            return 8;
        }
    }
    4
}

/// Runs `update` at the widest width this CPU has.
unsafe fn update_widest<const L2: bool>(c: &Coefs, r: Rows, lo: usize, hi: usize) {
    // SAFETY: the width's instructions were detected; the rest is the caller's promise.
    unsafe {
        match widest_lanes() {
            #[cfg(target_arch = "x86_64")]
            16 => update_avx512::<L2>(c, r, lo, hi),
            #[cfg(target_arch = "x86_64")]
            8 => update_avx2::<L2>(c, r, lo, hi),
            _ => update::<4, L2>(c, r, lo, hi),
        }
    }
}

impl Formula {
    /// The formula normalised loop kernel `k` computes, if it is a known one; `f32`
    /// tells which buffers hold f32.
    pub fn recognise(k: &LoopKernel, f32: &dyn Fn(BufId) -> bool) -> Option<Formula> {
        if k.reduce.is_some() || k.accumulate || k.shape.is_empty() {
            return None;
        }
        let space = Space { shape: &k.shape, f32 };
        let mut outputs = vec![(&k.out, &k.body)];
        outputs.extend(k.side.iter().map(|s| (&s.into, &s.value)));
        if k.sums.is_empty() {
            if let Some(b) = space.outputs(&ADAM, &outputs) {
                return Adam::of(k, &b).map(Formula::Adam);
            }
            if let Some(b) = BIAS_GELU.iter().find_map(|p| space.outputs(p, &outputs)) {
                return BiasGelu::of(k, &b).map(Formula::BiasGelu);
            }
        }
        let (order, b) = GELU_BACKWARD.iter().enumerate().find_map(|(i, p)| Some((i, space.outputs(p, &outputs)?)))?;
        GeluBackward::of(k, &space, b, order == 1).map(Formula::GeluBackward)
    }

    /// Whether it is an optimiser's update of a parameter.
    pub fn is_update(&self) -> bool {
        matches!(self, Formula::Adam(_))
    }

    /// A name for profiles: what it computes and how wide.
    pub fn describe(&self) -> String {
        let name = match self {
            Formula::Adam(a) if a.decay.is_some() => "AdamW update",
            Formula::Adam(_) => "Adam update",
            Formula::BiasGelu(_) => "bias and GELU",
            Formula::GeluBackward(g) if g.bias_grad.is_some() => "GELU backward and bias gradient",
            Formula::GeluBackward(_) => "GELU backward",
        };
        format!("{name}, {} lanes", widest_lanes())
    }

    /// Runs outermost indices `lo..hi`, like the kernel's JIT function.
    ///
    /// # Safety
    /// `bufs` holds the base pointer of every buffer of the program the kernel was
    /// validated against (so every element it touches is in bounds), and no other thread
    /// touches the elements of `lo..hi` meanwhile.
    pub unsafe fn run(&self, bufs: *const *mut u8, lo: i64, hi: i64) {
        // SAFETY: forwarded.
        unsafe {
            match self {
                Formula::Adam(a) => a.run(bufs, lo, hi),
                Formula::BiasGelu(g) => g.run(bufs, lo, hi),
                Formula::GeluBackward(g) => g.run(bufs, lo, hi),
            }
        }
    }
}

impl Adam {
    fn of(k: &LoopKernel, b: &Binds) -> Option<Adam> {
        let point = |s: Slot| At::of(b.points[s]);
        let scalar = |s: Slot| At::of(b.scalars[s]);
        let constant = |s: Slot| b.consts[s].map(f32::from_bits);
        Some(Adam {
            inner: k.shape[1..].iter().product(),
            param: point(PARAM)?,
            m: point(M)?,
            v: point(V)?,
            grad: point(GRAD)?,
            out_param: point(OUT_PARAM)?,
            out_m: point(OUT_M)?,
            out_v: point(OUT_V)?,
            decay: scalar(DECAY),
            bc2_sqrt: scalar(BC2_SQRT)?,
            step_size: scalar(STEP_SIZE)?,
            clip: scalar(CLIP),
            one_minus_b1: constant(ONE_MINUS_B1)?,
            b2: constant(B2)?,
            one_minus_b2: constant(ONE_MINUS_B2)?,
            eps: constant(EPS)?,
            l2: constant(L2),
        })
    }

    /// [`Formula::run`] of an update.
    ///
    /// # Safety
    /// As [`Formula::run`].
    unsafe fn run(&self, bufs: *const *mut u8, lo: i64, hi: i64) {
        // SAFETY (whole body): the caller's promise; the scalars are elements of their
        // buffers, the rows cover `lo * inner .. hi * inner` of theirs.
        unsafe {
            let read = |a: At| *a.ptr(bufs);
            let c = Coefs {
                decay: self.decay.map_or(1.0, read),
                clip: self.clip.map_or(1.0, read),
                bc2_sqrt: read(self.bc2_sqrt),
                step_size: read(self.step_size),
                one_minus_b1: self.one_minus_b1,
                b2: self.b2,
                one_minus_b2: self.one_minus_b2,
                eps: self.eps,
                l2: self.l2.unwrap_or(0.0),
            };
            let r = Rows {
                param: self.param.ptr(bufs),
                m: self.m.ptr(bufs),
                v: self.v.ptr(bufs),
                grad: self.grad.ptr(bufs),
                out_param: self.out_param.ptr(bufs),
                out_m: self.out_m.ptr(bufs),
                out_v: self.out_v.ptr(bufs),
            };
            let (lo, hi) = (lo.max(0) as usize * self.inner, hi.max(0) as usize * self.inner);
            if self.l2.is_some() { update_widest::<true>(&c, r, lo, hi) } else { update_widest::<false>(&c, r, lo, hi) }
        }
    }
}

/// A loop kernel recognised as `pre = x + b` (stored or not) and `act = gelu(pre)`,
/// `b` one row for every row: the MLP's forward epilogue. Its JIT function computes
/// `x + b` into a stack row, calls `rows::bm_row_gelu_tanh` on it, then stores both
/// outputs, at 4 lanes: as many instructions as the GELU itself (W2, perf: 1.9% of the
/// step's CPU time in these kernels' own code beside 1.8% in the GELU).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BiasGelu {
    /// Elements per index of the outermost axis, and per row (the innermost axis).
    inner: usize,
    row: usize,
    x: At,
    bias: At,
    out_pre: Option<At>,
    out_act: At,
}

impl BiasGelu {
    fn of(k: &LoopKernel, b: &Binds) -> Option<BiasGelu> {
        // Rows below the outermost axis, so that every index of it is whole rows.
        if k.shape.len() < 2 {
            return None;
        }
        let g = BiasGelu {
            inner: k.shape[1..].iter().product(),
            row: *k.shape.last()?,
            x: At::of(b.points[X])?,
            bias: At::of(b.rows[BIAS])?,
            out_pre: At::of(b.points[OUT_PRE]),
            out_act: At::of(b.points[OUT_ACT])?,
        };
        // Two outputs at one point would leave whichever the JIT stores last.
        (g.out_pre != Some(g.out_act) && g.row > 0).then_some(g)
    }

    /// [`Formula::run`] of a bias and GELU.
    ///
    /// # Safety
    /// As [`Formula::run`].
    unsafe fn run(&self, bufs: *const *mut u8, lo: i64, hi: i64) {
        // SAFETY (whole body): the caller's promise; the rows cover `lo * inner ..
        // hi * inner` of the points' buffers, the bias `row` elements of its own.
        unsafe {
            let r = GeluRows {
                x: self.x.ptr(bufs),
                bias: self.bias.ptr(bufs),
                pre: self.out_pre.map(|a| a.ptr(bufs)),
                act: self.out_act.ptr(bufs),
                row: self.row,
            };
            let (lo, hi) = (lo.max(0) as usize * self.inner, hi.max(0) as usize * self.inner);
            match widest_lanes() {
                #[cfg(target_arch = "x86_64")]
                16 => bias_gelu_avx512(r, lo, hi),
                #[cfg(target_arch = "x86_64")]
                8 => bias_gelu_avx2(r, lo, hi),
                _ => bias_gelu::<4>(r, lo, hi),
            }
        }
    }
}

#[derive(Clone, Copy)]
struct GeluRows {
    x: *mut f32,
    bias: *mut f32,
    pre: Option<*mut f32>,
    act: *mut f32,
    row: usize,
}

/// Elements `at..at + w` (`w ≤ W`) of a row, bias elements `j..j + w`: the JIT's
/// operations (`x + b`, then `interp::gelu_tanh`), so the same bits. The loads come
/// before the stores (an output may be `x`, updated in place).
///
/// # Safety
/// `at + w` stays within the rows, `j + w` within the bias.
// The indices are the rows' pointer offsets too, so they stay explicit.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn bias_gelu_step<const W: usize>(r: GeluRows, at: usize, j: usize, w: usize) {
    let mut z = [0.0f32; W];
    for i in 0..w {
        // SAFETY (every access): the caller's promise.
        z[i] = unsafe { *r.x.add(at + i) + *r.bias.add(j + i) };
    }
    let mut y = [0.0f32; W];
    for i in 0..W {
        y[i] = crate::interp::gelu_tanh(z[i]);
    }
    if let Some(pre) = r.pre {
        for i in 0..w {
            unsafe { *pre.add(at + i) = z[i] };
        }
    }
    for i in 0..w {
        unsafe { *r.act.add(at + i) = y[i] };
    }
}

/// Elements `lo..hi` (whole rows), `W` at a time within each row.
///
/// # Safety
/// `lo..hi` lie within the rows and are whole rows.
#[inline(always)]
unsafe fn bias_gelu<const W: usize>(r: GeluRows, lo: usize, hi: usize) {
    let mut start = lo;
    while start < hi {
        let mut j = 0;
        // SAFETY: every step stays within row `start` and the bias.
        unsafe {
            while j + W <= r.row {
                bias_gelu_step::<W>(r, start + j, j, W);
                j += W;
            }
            if j < r.row {
                bias_gelu_step::<W>(r, start + j, j, r.row - j);
            }
        }
        start += r.row;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn bias_gelu_avx512(r: GeluRows, lo: usize, hi: usize) {
    unsafe { bias_gelu::<16>(r, lo, hi) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn bias_gelu_avx2(r: GeluRows, lo: usize, hi: usize) {
    unsafe { bias_gelu::<8>(r, lo, hi) }
}

/// A loop kernel recognised as GELU's backward `dpre = dact · gelu′(pre)` (in place of
/// `pre` or `dact`, or elsewhere), and with it the bias gradient: a fused sum of `dpre`
/// over every row (one per chunk of rows, see `kir::FusedSum`). Its JIT function moves
/// every row through a stack buffer for `rows::bm_row_gelu_tanh_grad`, then multiplies
/// and sums 4 lanes wide (W2, perf: 2.55% of the step's CPU time in the row function,
/// about as much again in the kernels' own code).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GeluBackward {
    /// Elements per index of the outermost axis, and per row (the innermost axis; all
    /// of `inner` without a bias gradient).
    inner: usize,
    row: usize,
    dact: At,
    pre: At,
    out: At,
    /// Where the sum of every row of `dpre` goes: this chunk's partial sums.
    bias_grad: Option<At>,
    /// Whether the product is `gelu′(pre) · dact` rather than `dact · gelu′(pre)`.
    grad_first: bool,
}

impl GeluBackward {
    fn of(k: &LoopKernel, space: &Space, mut b: Binds, grad_first: bool) -> Option<GeluBackward> {
        let bias_grad = match &k.sums[..] {
            [] => None,
            // The sum of the stored value over rows (a fused sum reads it after the store).
            [s] if k.shape.len() >= 2 && space.row(&s.into) && space.unify(&Point(OUT_DPRE), &s.value, &mut b) => {
                Some(At { buf: s.into.buf, offset: s.into.offset })
            }
            _ => return None,
        };
        let inner: usize = k.shape[1..].iter().product();
        let g = GeluBackward {
            inner,
            row: if bias_grad.is_some() { *k.shape.last()? } else { inner },
            dact: At::of(b.points[DY])?,
            pre: At::of(b.points[PRE_ACT])?,
            out: At::of(b.points[OUT_DPRE])?,
            bias_grad,
            grad_first,
        };
        (g.row > 0).then_some(g)
    }

    /// [`Formula::run`] of GELU's backward.
    ///
    /// # Safety
    /// As [`Formula::run`] (a bias gradient's pointer is the chunk's own partial sums).
    unsafe fn run(&self, bufs: *const *mut u8, lo: i64, hi: i64) {
        // SAFETY (whole body): the caller's promise; the rows cover `lo * inner ..
        // hi * inner` of the points' buffers, the bias gradient `row` elements.
        unsafe {
            let r = GradRows {
                dact: self.dact.ptr(bufs),
                pre: self.pre.ptr(bufs),
                out: self.out.ptr(bufs),
                bias_grad: self.bias_grad.map(|a| a.ptr(bufs)),
                row: self.row,
                grad_first: self.grad_first,
            };
            let (lo, hi) = (lo.max(0) as usize * self.inner, hi.max(0) as usize * self.inner);
            match widest_lanes() {
                #[cfg(target_arch = "x86_64")]
                16 => gelu_backward_avx512(r, lo, hi),
                #[cfg(target_arch = "x86_64")]
                8 => gelu_backward_avx2(r, lo, hi),
                _ => gelu_backward::<4>(r, lo, hi),
            }
        }
    }
}

#[derive(Clone, Copy)]
struct GradRows {
    dact: *mut f32,
    pre: *mut f32,
    out: *mut f32,
    bias_grad: Option<*mut f32>,
    row: usize,
    grad_first: bool,
}

/// Elements `at..at + w` (`w ≤ W`) of a row, bias gradient elements `j..j + w`: the
/// JIT's operations (`interp::gelu_tanh_grad`, the product, then each sum element plus
/// the stored value), so the same bits. The loads come before the stores (the output
/// may be an input, updated in place).
///
/// # Safety
/// `at + w` stays within the rows, `j + w` within the bias gradient.
// The indices are the rows' pointer offsets too, so they stay explicit.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn gelu_backward_step<const W: usize>(r: GradRows, at: usize, j: usize, w: usize) {
    let (mut dy, mut x) = ([0.0f32; W], [0.0f32; W]);
    for i in 0..w {
        // SAFETY (every access): the caller's promise.
        unsafe {
            dy[i] = *r.dact.add(at + i);
            x[i] = *r.pre.add(at + i);
        }
    }
    let mut d = [0.0f32; W];
    for i in 0..W {
        let g = crate::interp::gelu_tanh_grad(x[i]);
        // The kernel's own order, as the JIT writes it: the two can differ only in a
        // NaN's payload (x86 returns the first operand's when both are NaN).
        #[allow(clippy::if_same_then_else)]
        let p = if r.grad_first { g * dy[i] } else { dy[i] * g };
        d[i] = p;
    }
    for i in 0..w {
        unsafe { *r.out.add(at + i) = d[i] };
    }
    if let Some(s) = r.bias_grad {
        for i in 0..w {
            unsafe { *s.add(j + i) += d[i] };
        }
    }
}

/// Elements `lo..hi` (whole rows), `W` at a time within each row. (The same walk as
/// [`bias_gelu`]'s, written out again: one walker taking the step as a closure ran both
/// formulas 4× slower in W2, the closure compiled without its caller's target features.)
///
/// # Safety
/// `lo..hi` lie within the rows and are whole rows.
#[inline(always)]
unsafe fn gelu_backward<const W: usize>(r: GradRows, lo: usize, hi: usize) {
    let mut start = lo;
    while start < hi {
        let mut j = 0;
        // SAFETY: every step stays within row `start` and the bias gradient.
        unsafe {
            while j + W <= r.row {
                gelu_backward_step::<W>(r, start + j, j, W);
                j += W;
            }
            if j < r.row {
                gelu_backward_step::<W>(r, start + j, j, r.row - j);
            }
        }
        start += r.row;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gelu_backward_avx512(r: GradRows, lo: usize, hi: usize) {
    unsafe { gelu_backward::<16>(r, lo, hi) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn gelu_backward_avx2(r: GradRows, lo: usize, hi: usize) {
    unsafe { gelu_backward::<8>(r, lo, hi) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::test_support::{Rng, assert_same, bin, buf, contiguous, fill, load, program, un};
    use crate::exec::{Buffers, Executor};
    use crate::kir::{DType, Kernel, Program, SideStore};

    /// Which of the optimiser's variants a test kernel computes.
    #[derive(Clone, Copy, Debug)]
    struct Variant {
        decay: bool,
        l2: bool,
        clip: bool,
        in_place: bool,
        /// Which output is the kernel's body (0: the parameter, 1: m, 2: v).
        body: usize,
    }

    // Buffers of the test programs.
    const B_PARAM: BufId = 0;
    const B_M: BufId = 1;
    const B_V: BufId = 2;
    const B_GRAD: BufId = 3;
    const B_SCALARS: BufId = 4; // decay, √bc2, step size, clip at 1, 2, 3, 4
    const B_OUT: BufId = 5; // out of place: the parameter, m, v at 5, 6, 7

    /// An elementwise kernel over `shape` storing `outs` (where, what): output `body` as
    /// its body, the others as side stores.
    fn elementwise(shape: &[usize], mut outs: Vec<(Access, ScalarExpr)>, body: usize) -> LoopKernel {
        let (out, body) = outs.remove(body);
        LoopKernel {
            shape: shape.to_vec(),
            reduce: None,
            reduced_dims: 0,
            body,
            out,
            accumulate: false,
            side: outs.into_iter().map(|(into, value)| SideStore { value, into }).collect(),
            sums: vec![],
        }
    }

    /// Adam's update of one parameter of `shape`, as the optimiser pass and fusion
    /// write it (the gradient at offset 3 of its buffer, the scalars at offsets 1–4).
    fn adam_program(shape: &[usize], v: Variant) -> Program {
        let n: usize = shape.iter().product();
        let st = contiguous(shape);
        let zero = vec![0; shape.len()];
        let pt = |b: BufId, off: usize| load(b, off, &st);
        let sc = |off: usize| load(B_SCALARS, off, &zero);
        let c = ScalarExpr::Const;
        let mut g = pt(B_GRAD, 3);
        if v.clip {
            g = bin(BinaryOp::Mul, g, sc(4));
        }
        if v.l2 {
            g = bin(BinaryOp::Add, g, bin(BinaryOp::Mul, pt(B_PARAM, 0), c(0.01)));
        }
        let m1 = bin(BinaryOp::Add, pt(B_M, 0), bin(BinaryOp::Mul, bin(BinaryOp::Sub, g.clone(), pt(B_M, 0)), c(0.1)));
        let v1 = bin(BinaryOp::Add, bin(BinaryOp::Mul, pt(B_V, 0), c(0.95)), bin(BinaryOp::Mul, bin(BinaryOp::Mul, g.clone(), g), c(0.05)));
        let p0 = if v.decay { bin(BinaryOp::Mul, pt(B_PARAM, 0), sc(1)) } else { pt(B_PARAM, 0) };
        let denom = bin(BinaryOp::Add, bin(BinaryOp::Div, un(UnaryOp::Sqrt, v1.clone()), sc(2)), c(1e-8));
        let p1 = bin(BinaryOp::Sub, p0, bin(BinaryOp::Mul, bin(BinaryOp::Div, m1.clone(), denom), sc(3)));
        let into = |b: BufId, i: usize| Access { buf: if v.in_place { b } else { B_OUT + i }, offset: 0, strides: st.clone() };
        let k = elementwise(shape, vec![(into(B_PARAM, 0), p1), (into(B_M, 1), m1), (into(B_V, 2), v1)], v.body);
        let bufs = vec![
            buf("p", DType::F32, n),
            buf("m", DType::F32, n),
            buf("v", DType::F32, n),
            buf("g", DType::F32, n + 3),
            buf("scalars", DType::F32, 5),
            buf("p_out", DType::F32, n),
            buf("m_out", DType::F32, n),
            buf("v_out", DType::F32, n),
        ];
        program(bufs, vec![Kernel::Loop(k)])
    }

    /// Random inputs as training sees them: `v ≥ 0`, positive scalars; with `special`,
    /// some NaN, ±∞ and ±0 among them.
    fn inputs(b: &mut Buffers, seed: u64, special: bool) {
        fill(b, seed, special);
        let mut r = Rng::new(seed ^ 0xADA);
        for x in b.f32_mut(B_V).unwrap() {
            *x = x.abs() * r.uniform(0.0, 1e-2);
        }
        for x in b.f32_mut(B_SCALARS).unwrap() {
            *x = x.abs() + 0.01;
        }
    }

    fn run(p: &Program, formulas: Option<usize>, seed: u64, special: bool) -> Buffers {
        let mut e = match formulas {
            Some(threads) => Executor::new(p, threads).unwrap(),
            None => Executor::interpreted(p).unwrap(),
        };
        inputs(e.buffers_mut(), seed, special);
        e.run("main").unwrap();
        e.buffers().clone()
    }

    fn variants() -> Vec<Variant> {
        let mut all = vec![];
        for bits in 0..32 {
            let f = |i: u32| bits & (1 << i) != 0;
            all.push(Variant { decay: f(0), l2: f(1), clip: f(2), in_place: f(3), body: if f(4) { 0 } else { (bits as usize) % 3 } });
        }
        all
    }

    /// Every variant of the update is recognised, and its wide code (at each width this
    /// CPU has, with tails, on one and two threads) leaves every buffer bit for bit as
    /// the interpreter does.
    #[test]
    fn adam_updates_match_the_interpreter_bit_for_bit() {
        for (i, v) in variants().into_iter().enumerate() {
            // [64, 300]: enough points that two threads split it (chunk boundaries).
            for shape in [vec![3, 37], vec![300], vec![2, 5, 16], vec![1], vec![64, 300]] {
                let p = adam_program(&shape, v);
                let e = Executor::new(&p, 1).unwrap();
                let Some(Formula::Adam(f)) = e.formula(0) else { panic!("{v:?} {shape:?} not recognised:\n{}", p.to_text()) };
                assert_eq!((f.decay.is_some(), f.l2.is_some(), f.clip.is_some()), (v.decay, v.l2, v.clip), "{v:?}");
                let seed = i as u64 * 7 + shape.len() as u64;
                let want = run(&p, None, seed, i % 3 == 0);
                for threads in [1, 2] {
                    let ctx = format!("{v:?} {shape:?} {threads} threads");
                    assert_same(&want, &run(&p, Some(threads), seed, i % 3 == 0), 0.0, &ctx);
                }
                #[cfg(target_arch = "x86_64")]
                for avx512 in [false, true] {
                    crate::cpu::set_avx512(avx512);
                    let got = run(&p, Some(1), seed, false);
                    crate::cpu::set_avx512(true);
                    assert_same(&run(&p, None, seed, false), &got, 0.0, &format!("{v:?} {shape:?} avx512 {avx512}"));
                }
            }
        }
    }

    /// `pre = x + b` (stored in place, elsewhere, or not at all; as the kernel's body or
    /// a side store) and `act = gelu(pre)`, `b` one row for every row.
    fn bias_gelu_program(shape: &[usize], pre: Option<BufId>, pre_is_body: bool) -> Program {
        let n: usize = shape.iter().product();
        let st = contiguous(shape);
        let mut row = vec![0; shape.len()];
        *row.last_mut().unwrap() = 1;
        let z = bin(BinaryOp::Add, load(0, 0, &st), load(1, 2, &row));
        let at = |b: BufId| Access { buf: b, offset: 0, strides: st.clone() };
        let mut outs = vec![(at(3), un(UnaryOp::GeluTanh, z.clone()))];
        if let Some(b) = pre {
            outs.insert(if pre_is_body { 0 } else { 1 }, (at(b), z));
        }
        let k = elementwise(shape, outs, 0);
        let row_len = *shape.last().unwrap();
        program(
            vec![buf("x", DType::F32, n), buf("b", DType::F32, row_len + 2), buf("pre", DType::F32, n), buf("act", DType::F32, n)],
            vec![Kernel::Loop(k)],
        )
    }

    /// The MLP's bias and GELU is recognised in each of its forms, and its wide code
    /// (each width, with row tails, one and two threads) leaves every buffer bit for bit
    /// as the interpreter does, NaN, ±∞ and ±0 included.
    #[test]
    fn bias_and_gelu_match_the_interpreter_bit_for_bit() {
        let run = |p: &Program, threads: Option<usize>, seed: u64| {
            let mut e = match threads {
                Some(t) => Executor::new(p, t).unwrap(),
                None => Executor::interpreted(p).unwrap(),
            };
            fill(e.buffers_mut(), seed, seed.is_multiple_of(2));
            e.run("main").unwrap();
            e.buffers().clone()
        };
        for (i, (pre, pre_is_body)) in [(Some(0), false), (Some(0), true), (Some(2), false), (None, false)].into_iter().enumerate() {
            for shape in [vec![3, 37], vec![2, 5, 16], vec![64, 300], vec![16, 4, 512], vec![5, 1]] {
                let p = bias_gelu_program(&shape, pre, pre_is_body);
                let e = Executor::new(&p, 1).unwrap();
                let Some(Formula::BiasGelu(f)) = e.formula(0) else { panic!("{pre:?} {shape:?} not recognised:\n{}", p.to_text()) };
                assert_eq!(f.out_pre.is_some(), pre.is_some());
                for seed in [i as u64, i as u64 + 7] {
                    let want = run(&p, None, seed);
                    for threads in [1, 2] {
                        assert_same(&want, &run(&p, Some(threads), seed), 0.0, &format!("{pre:?} {shape:?} {threads} threads"));
                    }
                    #[cfg(target_arch = "x86_64")]
                    for avx512 in [false, true] {
                        crate::cpu::set_avx512(avx512);
                        let got = run(&p, Some(1), seed);
                        crate::cpu::set_avx512(true);
                        assert_same(&want, &got, 0.0, &format!("{pre:?} {shape:?} avx512 {avx512}"));
                    }
                }
            }
        }
    }

    /// `dpre = dact · gelu′(pre)` into `out` (0: over `dact`, 1: over `pre`, 2: its own
    /// buffer; the product in either order), with the bias gradient summed from it into
    /// buffer 3 at offset 1, or not.
    fn gelu_backward_program(shape: &[usize], out: BufId, grad_first: bool, bias_grad: bool) -> Program {
        let n: usize = shape.iter().product();
        let st = contiguous(shape);
        let g = un(UnaryOp::GeluTanhGrad, load(1, 0, &st));
        let (dy, g) = (load(0, 0, &st), g);
        let body = if grad_first { bin(BinaryOp::Mul, g, dy) } else { bin(BinaryOp::Mul, dy, g) };
        let at = Access { buf: out, offset: 0, strides: st.clone() };
        let mut k = elementwise(shape, vec![(at.clone(), body)], 0);
        if bias_grad {
            let mut row = vec![0; shape.len()];
            *row.last_mut().unwrap() = 1;
            let into = Access { buf: 3, offset: 1, strides: row };
            k.sums.push(crate::kir::FusedSum { value: ScalarExpr::Load(at), into, accumulate: out == 2 });
        }
        let row_len = *shape.last().unwrap();
        program(
            vec![buf("dact", DType::F32, n), buf("pre", DType::F32, n), buf("dpre", DType::F32, n), buf("db", DType::F32, row_len + 2)],
            vec![Kernel::Loop(k)],
        )
    }

    /// GELU's backward is recognised in each of its forms, and its wide code (each
    /// width, with row tails, one and two threads, the bias gradient's chunks) leaves
    /// every buffer bit for bit as the interpreter does, NaN, ±∞ and ±0 included.
    #[test]
    fn gelu_backward_matches_the_interpreter_bit_for_bit() {
        let run = |p: &Program, threads: Option<usize>, seed: u64| {
            let mut e = match threads {
                Some(t) => Executor::new(p, t).unwrap(),
                None => Executor::interpreted(p).unwrap(),
            };
            fill(e.buffers_mut(), seed, seed.is_multiple_of(2));
            e.run("main").unwrap();
            e.buffers().clone()
        };
        let mut i = 0u64;
        for out in [0, 1, 2] {
            for grad_first in [false, true] {
                for bias_grad in [true, false] {
                    for shape in [vec![3, 37], vec![2, 5, 16], vec![64, 300], vec![16, 4, 512], vec![5, 1]] {
                        i += 1;
                        let p = gelu_backward_program(&shape, out, grad_first, bias_grad);
                        let e = Executor::new(&p, 1).unwrap();
                        let ctx = format!("out {out} grad first {grad_first} bias grad {bias_grad} {shape:?}");
                        let Some(Formula::GeluBackward(f)) = e.formula(0) else { panic!("{ctx} not recognised:\n{}", p.to_text()) };
                        assert_eq!((f.bias_grad.is_some(), f.grad_first), (bias_grad, grad_first), "{ctx}");
                        for seed in [i, i + 7] {
                            let want = run(&p, None, seed);
                            for threads in [1, 2] {
                                assert_same(&want, &run(&p, Some(threads), seed), 0.0, &format!("{ctx} {threads} threads"));
                            }
                            #[cfg(target_arch = "x86_64")]
                            for avx512 in [false, true] {
                                crate::cpu::set_avx512(avx512);
                                let got = run(&p, Some(1), seed);
                                crate::cpu::set_avx512(true);
                                assert_same(&want, &got, 0.0, &format!("{ctx} avx512 {avx512}"));
                            }
                        }
                    }
                }
            }
        }
        // Near misses keep their JIT function: the sum of the old `pre` (not of the
        // stored value), a bias gradient along another axis.
        let recognised = |p: &Program| Executor::new(p, 1).unwrap().formula(0).is_some();
        let mut old_pre = gelu_backward_program(&[4, 8], 2, false, true);
        let Kernel::Loop(k) = &mut old_pre.kernels[0] else { unreachable!() };
        k.sums[0].value = load(1, 0, &contiguous(&[4, 8]));
        assert!(!recognised(&old_pre));
        let mut by_row = gelu_backward_program(&[4, 8], 2, false, true);
        let Kernel::Loop(k) = &mut by_row.kernels[0] else { unreachable!() };
        k.sums[0].into.strides = vec![1, 0];
        assert!(!recognised(&by_row));
    }

    /// Kernels that only resemble a bias and GELU keep their JIT function: a bias read
    /// along another axis, one axis only, another activation. (Both outputs at one point
    /// the executor rejects before.)
    #[test]
    fn near_bias_and_gelus_are_not_recognised() {
        let recognised = |p: &Program| Executor::new(p, 1).unwrap().formula(0).is_some();
        let base = bias_gelu_program(&[4, 8], Some(2), false);
        assert!(recognised(&base));
        let edit = |f: &dyn Fn(&mut LoopKernel)| {
            let mut p = base.clone();
            let Kernel::Loop(k) = &mut p.kernels[0] else { unreachable!() };
            f(k);
            p
        };
        fn restride(e: &mut ScalarExpr, buf: BufId, strides: &[usize]) {
            match e {
                ScalarExpr::Load(a) if a.buf == buf => a.strides = strides.to_vec(),
                ScalarExpr::Unary(_, x) => restride(x, buf, strides),
                ScalarExpr::Binary(_, x, y) => {
                    restride(x, buf, strides);
                    restride(y, buf, strides);
                }
                _ => {}
            }
        }
        // The bias indexed by the row instead of the column.
        let by_row = edit(&|k| {
            restride(&mut k.body, 1, &[1, 0]);
            k.side.iter_mut().for_each(|s| restride(&mut s.value, 1, &[1, 0]));
        });
        assert!(!recognised(&by_row));
        assert!(!recognised(&bias_gelu_program(&[8], Some(2), false)));
        let relu = edit(&|k| {
            let ScalarExpr::Unary(op, _) = &mut k.body else { panic!() };
            *op = UnaryOp::Relu;
        });
        assert!(!recognised(&relu));
    }

    /// Kernels that only resemble the update keep their JIT function: an operand
    /// order, a constant that differs between two uses, a transposed operand, an i32
    /// buffer, a reduction.
    #[test]
    fn near_misses_are_not_recognised() {
        let v = Variant { decay: true, l2: false, clip: false, in_place: true, body: 0 };
        let recognised = |p: &Program| Executor::new(p, 1).unwrap().formula(0).is_some();
        let base = adam_program(&[4, 8], v);
        assert!(recognised(&base));
        let edit = |f: &dyn Fn(&mut LoopKernel)| {
            let mut p = base.clone();
            let Kernel::Loop(k) = &mut p.kernels[0] else { unreachable!() };
            f(k);
            p
        };
        // `β₂ v` for `v β₂`.
        let swapped = edit(&|k| {
            let ScalarExpr::Binary(BinaryOp::Add, a, _) = &mut k.side[1].value else { panic!() };
            let ScalarExpr::Binary(BinaryOp::Mul, x, y) = &mut **a else { panic!() };
            std::mem::swap(x, y);
        });
        assert!(!recognised(&swapped));
        // 1 - β₁ = 0.2 in m's update but 0.1 in the parameter's.
        let differs = edit(&|k| {
            let ScalarExpr::Binary(BinaryOp::Add, _, d) = &mut k.side[0].value else { panic!() };
            let ScalarExpr::Binary(BinaryOp::Mul, _, c) = &mut **d else { panic!() };
            **c = ScalarExpr::Const(0.2);
        });
        assert!(!recognised(&differs));
        // The gradient read transposed.
        fn transpose(e: &mut ScalarExpr) {
            match e {
                ScalarExpr::Load(a) if a.buf == B_GRAD => a.strides = vec![1, 4],
                ScalarExpr::Unary(_, x) => transpose(x),
                ScalarExpr::Binary(_, x, y) => {
                    transpose(x);
                    transpose(y);
                }
                _ => {}
            }
        }
        let transposed = edit(&|k| {
            transpose(&mut k.body);
            k.side.iter_mut().for_each(|s| transpose(&mut s.value));
        });
        assert!(!recognised(&transposed));
        let mut i32_grad = base.clone();
        i32_grad.buffers[B_GRAD].dtype = DType::I32;
        assert!(!recognised(&i32_grad));
        let reduced = edit(&|k| {
            k.side.clear();
            k.reduce = Some(crate::kir::ReduceOp::Sum);
            k.reduced_dims = 1;
            k.out.strides = vec![1, 0];
        });
        assert!(!recognised(&reduced));
    }

    #[test]
    fn permutations_cover_every_order() {
        let mut v = vec![0, 1, 2];
        let mut seen = vec![v.clone()];
        while next_permutation(&mut v) {
            seen.push(v.clone());
        }
        assert_eq!(seen, [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]]);
    }
}
