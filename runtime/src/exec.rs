//! Buffer storage and the executor that runs a [`Program`]'s entries.
//!
//! [`Executor::new`] allocates every buffer (zero-filled, 64-byte aligned), validates
//! every kernel against the buffers (an access outside its buffer anywhere in the
//! iteration space is an [`Error::Internal`], found before anything runs) and compiles
//! every loop kernel with Cranelift ([`crate::jit`]). Matrix products go to the `gemm`
//! crate ([`crate::gemm`]); fused attention to [`crate::attention`]; gathers and
//! scatter-adds are plain Rust.
//! [`Executor::interpreted`] runs everything through the reference interpreter
//! ([`crate::interp`]) instead.
//!
//! Large loop kernels are split along their outermost (non-reduced) axis across the
//! executor's rayon pool when that is race free: the output view must be injective on
//! the non-reduced axes and every load of the output buffer must use the output's view.

use crate::error::{Error, Result};
use crate::formulas::Formula;
use crate::groups::{self, Group, Step};
use crate::interp;
use crate::jit::{self, JitProgram, KernelFn};
use crate::kir::{Access, BufId, DType, FusedSum, GatherKernel, Kernel, LoopKernel, MatOperand, Program, ScalarExpr, ScatterAddKernel};
use rayon::prelude::*;
use std::collections::HashMap;

/// One 64-byte line of storage; buffers are vectors of these so they are 64-byte aligned.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u32; 16]);

/// The storage of one buffer: `len` 4-byte elements of type `dtype`, 64-byte aligned.
#[derive(Clone)]
pub struct BufData {
    dtype: DType,
    len: usize,
    lines: Vec<Line>,
}

impl BufData {
    /// A zero-filled buffer (0.0 for f32, 0 for i32).
    pub fn zeroed(dtype: DType, len: usize) -> BufData {
        BufData { dtype, len, lines: vec![Line([0; 16]); len.div_ceil(16)] }
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The elements as f32, or `None` for an i32 buffer.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match self.dtype {
            // SAFETY: `lines` holds at least `len` initialised 4-byte elements, suitably aligned.
            DType::F32 => Some(unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const f32, self.len) }),
            DType::I32 => None,
        }
    }
    pub fn as_f32_mut(&mut self) -> Option<&mut [f32]> {
        match self.dtype {
            // SAFETY: as in `as_f32`, and `&mut self` gives exclusive access.
            DType::F32 => Some(unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut f32, self.len) }),
            DType::I32 => None,
        }
    }
    /// The elements as i32, or `None` for an f32 buffer.
    pub fn as_i32(&self) -> Option<&[i32]> {
        match self.dtype {
            // SAFETY: as in `as_f32`.
            DType::I32 => Some(unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const i32, self.len) }),
            DType::F32 => None,
        }
    }
    pub fn as_i32_mut(&mut self) -> Option<&mut [i32]> {
        match self.dtype {
            // SAFETY: as in `as_f32_mut`.
            DType::I32 => Some(unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut i32, self.len) }),
            DType::F32 => None,
        }
    }
    /// Element `i` converted to f32 (i32 converts exactly for |v| < 2^24).
    #[inline]
    pub fn get_f32(&self, i: usize) -> f32 {
        match self.dtype {
            DType::F32 => self.as_f32().unwrap()[i],
            DType::I32 => self.as_i32().unwrap()[i] as f32,
        }
    }
    /// Stores `v` at `i`; an i32 buffer gets `v` rounded to nearest (ties to even),
    /// saturated, NaN as 0 ([`f32_to_i32`]).
    #[inline]
    pub fn set_f32(&mut self, i: usize, v: f32) {
        match self.dtype {
            DType::F32 => self.as_f32_mut().unwrap()[i] = v,
            DType::I32 => self.as_i32_mut().unwrap()[i] = f32_to_i32(v),
        }
    }
    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.lines.as_mut_ptr() as *mut u8
    }
}

/// How a loop kernel stores an f32 into an i32 buffer: round to nearest, ties to even,
/// saturating at the i32 range, NaN to 0 (the same as the JIT's `nearest` +
/// `fcvt_to_sint_sat`).
#[inline]
pub fn f32_to_i32(v: f32) -> i32 {
    v.round_ties_even() as i32
}

/// Every buffer of a program, indexed by [`BufId`].
#[derive(Clone, Default)]
pub struct Buffers(Vec<BufData>);

impl Buffers {
    /// Zero-filled buffers for every buffer of `program`.
    pub fn new(program: &Program) -> Buffers {
        Buffers(program.buffers.iter().map(|b| BufData::zeroed(b.dtype, b.len())).collect())
    }
    pub fn from_data(data: Vec<BufData>) -> Buffers {
        Buffers(data)
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn get(&self, id: BufId) -> Result<&BufData> {
        self.0.get(id).ok_or_else(|| Error::internal(format!("buffer b{id} does not exist")))
    }
    pub fn get_mut(&mut self, id: BufId) -> Result<&mut BufData> {
        self.0.get_mut(id).ok_or_else(|| Error::internal(format!("buffer b{id} does not exist")))
    }
    pub fn f32(&self, id: BufId) -> Result<&[f32]> {
        self.get(id)?.as_f32().ok_or_else(|| dtype_err(id, DType::F32))
    }
    pub fn f32_mut(&mut self, id: BufId) -> Result<&mut [f32]> {
        self.get_mut(id)?.as_f32_mut().ok_or_else(|| dtype_err(id, DType::F32))
    }
    pub fn i32(&self, id: BufId) -> Result<&[i32]> {
        self.get(id)?.as_i32().ok_or_else(|| dtype_err(id, DType::I32))
    }
    pub fn i32_mut(&mut self, id: BufId) -> Result<&mut [i32]> {
        self.get_mut(id)?.as_i32_mut().ok_or_else(|| dtype_err(id, DType::I32))
    }
    /// `out` mutably and `src` shared; they must differ.
    pub(crate) fn pair_mut(&mut self, out: BufId, src: BufId) -> Result<(&mut BufData, &BufData)> {
        if out == src || out >= self.0.len() || src >= self.0.len() {
            return Err(Error::internal(format!("bad buffer pair b{out}, b{src}")));
        }
        if out < src {
            let (lo, hi) = self.0.split_at_mut(src);
            Ok((&mut lo[out], &hi[0]))
        } else {
            let (lo, hi) = self.0.split_at_mut(out);
            Ok((&mut hi[0], &lo[src]))
        }
    }
    /// The base pointer of every buffer, in [`BufId`] order (what JIT kernels take),
    /// into `out` (reused: a step allocates nothing). Valid until a buffer is replaced.
    pub(crate) fn base_ptrs_into(&mut self, out: &mut Vec<*mut u8>) {
        out.clear();
        out.extend(self.0.iter_mut().map(|b| b.as_mut_ptr()));
    }
}

fn dtype_err(id: BufId, want: DType) -> Error {
    Error::internal(format!("buffer b{id} is not {}", want.name()))
}

// ---------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------

/// The largest element offset `offset + Σ (extent_d - 1) * stride_d`, or `None` when an
/// extent is 0 (nothing is accessed). Errors on overflow.
fn max_offset(offset: usize, dims: impl Iterator<Item = (usize, usize)>) -> Result<Option<usize>> {
    let mut m = offset;
    for (extent, stride) in dims {
        if extent == 0 {
            return Ok(None);
        }
        m = (extent - 1).checked_mul(stride).and_then(|x| x.checked_add(m)).ok_or_else(|| Error::internal("access offset overflows"))?;
    }
    Ok(Some(m))
}

fn check_buf(program: &Program, buf: BufId, dtype: Option<DType>, what: &str) -> Result<usize> {
    let b = program.buffers.get(buf).ok_or_else(|| Error::internal(format!("{what}: buffer b{buf} does not exist")))?;
    if let Some(d) = dtype
        && b.dtype != d
    {
        return Err(Error::internal(format!("{what}: buffer b{buf} `{}` is {}, not {}", b.name, b.dtype.name(), d.name())));
    }
    Ok(b.len())
}

fn check_access(program: &Program, a: &Access, shape: &[usize], what: &str) -> Result<()> {
    let len = check_buf(program, a.buf, None, what)?;
    if a.strides.len() != shape.len() {
        return Err(Error::internal(format!(
            "{what}: access to b{} has {} strides for a rank-{} iteration space",
            a.buf,
            a.strides.len(),
            shape.len()
        )));
    }
    if let Some(m) = max_offset(a.offset, shape.iter().copied().zip(a.strides.iter().copied()))?
        && m >= len
    {
        return Err(Error::internal(format!(
            "{what}: access b{}[{}; {:?}] reaches element {m} of a buffer of {len}",
            a.buf, a.offset, a.strides
        )));
    }
    Ok(())
}

/// The length of buffer `buf` when it exists and holds f32.
fn f32_len(program: &Program, buf: BufId) -> Option<usize> {
    program.buffers.get(buf).filter(|b| b.dtype == DType::F32).map(|b| b.len())
}

fn check_operand(program: &Program, o: &MatOperand, batch: &[usize], rows: usize, cols: usize, what: &str) -> Result<()> {
    let len = check_buf(program, o.buf, Some(DType::F32), what)?;
    o.check_in(batch, rows, cols, len, what)
}

/// Whether the strided map `Σ i_d * stride_d` over `dims` (extent, stride) is injective,
/// by a sufficient test: sorted by stride, every stride exceeds the span of the smaller
/// ones.
pub(crate) fn injective(dims: impl Iterator<Item = (usize, usize)>) -> bool {
    let dims: Vec<(usize, usize)> = dims.collect();
    // An empty space maps nothing: injective.
    if dims.iter().any(|&(e, _)| e == 0) {
        return true;
    }
    let mut ds: Vec<(usize, usize)> = dims.into_iter().filter(|&(e, _)| e > 1).collect();
    ds.sort_by_key(|&(_, s)| s);
    let mut span: usize = 0;
    for (e, s) in ds {
        if s <= span || s == 0 {
            return false;
        }
        match (e - 1).checked_mul(s).and_then(|x| x.checked_add(span)) {
            Some(x) => span = x,
            None => return false,
        }
    }
    true
}

pub(crate) fn walk_loads<'a>(e: &'a ScalarExpr, f: &mut impl FnMut(&'a Access)) {
    e.for_each_load(f)
}

fn max_index(e: &ScalarExpr) -> Option<usize> {
    match e {
        ScalarExpr::Load(_) | ScalarExpr::Const(_) => None,
        ScalarExpr::Index(n) => Some(*n),
        ScalarExpr::Unary(_, a) => max_index(a),
        ScalarExpr::Binary(_, a, b) => max_index(a).max(max_index(b)),
        ScalarExpr::Select(c, a, b) => max_index(c).max(max_index(a)).max(max_index(b)),
    }
}

fn validate_loop(program: &Program, k: &LoopKernel, what: &str) -> Result<()> {
    let rank = k.shape.len();
    if k.reduce.is_some() && k.reduced_dims > rank {
        return Err(Error::internal(format!("{what}: reduces {} axes of a rank-{rank} loop", k.reduced_dims)));
    }
    check_access(program, &k.out, &k.shape, what)?;
    if k.reduce.is_some() && k.out.strides[rank - k.reduced_dims..].iter().any(|&s| s != 0) {
        return Err(Error::internal(format!("{what}: output strides are not zero on reduced axes")));
    }
    if let Some(n) = max_index(&k.body)
        && n >= rank
    {
        return Err(Error::internal(format!("{what}: index i{n} of a rank-{rank} loop")));
    }
    let mut res = Ok(());
    walk_loads(&k.body, &mut |a| {
        if res.is_ok() {
            res = check_access(program, a, &k.shape, what);
        }
    });
    res?;
    if !k.side.is_empty() {
        validate_side(program, k, what)?;
    }
    for (i, s) in k.sums.iter().enumerate() {
        validate_sum(program, k, s, &k.sums[..i], what)?;
    }
    Ok(())
}

/// Side stores sit in an elementwise kernel storing f32 without accumulation, are
/// injective f32 outputs in bounds, write distinct buffers, and every load of a buffer
/// a side store writes reads exactly the point being written.
fn validate_side(program: &Program, k: &LoopKernel, what: &str) -> Result<()> {
    let rank = k.shape.len();
    if k.reduce.is_some() || k.accumulate || program.buffers.get(k.out.buf).is_some_and(|b| b.dtype != DType::F32) {
        return Err(Error::internal(format!("{what}: side stores need an elementwise kernel storing f32 (no accumulation)")));
    }
    let mut written = vec![k.out.buf];
    for s in &k.side {
        check_buf(program, s.into.buf, Some(DType::F32), what)?;
        check_access(program, &s.into, &k.shape, what)?;
        if let Some(n) = max_index(&s.value)
            && n >= rank
        {
            return Err(Error::internal(format!("{what}: index i{n} of a rank-{rank} loop")));
        }
        if !injective(k.shape.iter().copied().zip(s.into.strides.iter().copied())) || written.contains(&s.into.buf) {
            return Err(Error::internal(format!("{what}: side store into b{} overlaps another store", s.into.buf)));
        }
        written.push(s.into.buf);
    }
    let mut res = Ok(());
    let mut check = |a: &Access| {
        if res.is_ok() {
            res = check_access(program, a, &k.shape, what);
        }
        if let Some(s) = k.side.iter().find(|s| s.into.buf == a.buf)
            && *a != s.into
            && res.is_ok()
        {
            res = Err(Error::internal(format!("{what}: b{} is read at another point than its side store writes", a.buf)));
        }
    };
    walk_loads(&k.body, &mut check);
    k.side.iter().for_each(|s| walk_loads(&s.value, &mut check));
    k.sums.iter().for_each(|s| walk_loads(&s.value, &mut check));
    res
}

/// A fused sum must sit in an elementwise f32 kernel, stay in bounds, map the points
/// onto its elements injectively along its non-zero strides, and have its buffer to
/// itself: nothing else in the kernel reads or writes `into`.
fn validate_sum(program: &Program, k: &LoopKernel, s: &FusedSum, earlier: &[FusedSum], what: &str) -> Result<()> {
    let rank = k.shape.len();
    if k.reduce.is_some() || k.accumulate || program.buffers.get(k.out.buf).is_some_and(|b| b.dtype != DType::F32) {
        return Err(Error::internal(format!("{what}: fused sums need an elementwise kernel storing f32 (no accumulation)")));
    }
    check_buf(program, s.into.buf, Some(DType::F32), what)?;
    check_access(program, &s.into, &k.shape, what)?;
    if let Some(n) = max_index(&s.value)
        && n >= rank
    {
        return Err(Error::internal(format!("{what}: index i{n} of a rank-{rank} loop")));
    }
    if !injective(k.shape.iter().copied().zip(s.into.strides.iter().copied()).filter(|&(_, st)| st != 0)) {
        return Err(Error::internal(format!("{what}: fused sum into b{} is not injective along its kept axes", s.into.buf)));
    }
    let mut res = Ok(());
    let mut reads_into = false;
    walk_loads(&s.value, &mut |a| {
        if a.buf == k.out.buf && *a != k.out && res.is_ok() {
            res = Err(Error::internal(format!("{what}: a fused sum reads the output b{} at another point", a.buf)));
        }
    });
    let mut check = |a: &Access| {
        reads_into |= a.buf == s.into.buf;
        if res.is_ok() {
            res = check_access(program, a, &k.shape, what);
        }
    };
    walk_loads(&k.body, &mut check);
    for t in k.sums.iter() {
        walk_loads(&t.value, &mut check);
    }
    for t in k.side.iter() {
        walk_loads(&t.value, &mut check);
    }
    res?;
    let shared =
        k.out.buf == s.into.buf || earlier.iter().any(|t| t.into.buf == s.into.buf) || k.side.iter().any(|t| t.into.buf == s.into.buf);
    if reads_into || shared {
        return Err(Error::internal(format!("{what}: fused sum into b{} shares its buffer within the kernel", s.into.buf)));
    }
    Ok(())
}

fn validate_kernel(program: &Program, i: usize, k: &Kernel) -> Result<()> {
    let what = format!("kernel k{i}");
    let what = what.as_str();
    match k {
        Kernel::Loop(l) => validate_loop(program, l, what),
        Kernel::MatMul(m) => {
            check_operand(program, &m.a, &m.batch, m.m, m.k, what)?;
            check_operand(program, &m.b, &m.batch, m.k, m.n, what)?;
            check_operand(program, &m.c, &m.batch, m.m, m.n, what)?;
            if m.c.buf == m.a.buf || m.c.buf == m.b.buf {
                return Err(Error::internal(format!("{what}: matmul output b{} aliases an input", m.c.buf)));
            }
            let dims = m.batch.iter().copied().zip(m.c.batch_strides.iter().copied()).chain([(m.m, m.c.row_stride), (m.n, m.c.col_stride)]);
            if !injective(dims) {
                return Err(Error::internal(format!("{what}: matmul output view overlaps itself")));
            }
            Ok(())
        }
        Kernel::Gather(g) => {
            let tl = check_buf(program, g.table, Some(DType::F32), what)?;
            let il = check_buf(program, g.ids, None, what)?;
            let ol = check_buf(program, g.out, Some(DType::F32), what)?;
            if g.out == g.table || g.out == g.ids {
                return Err(Error::internal(format!("{what}: gather output aliases an input")));
            }
            let need = |a: usize, b: usize| a.checked_mul(b).ok_or_else(|| Error::internal("gather size overflows"));
            if need(g.rows, g.dim)? > tl || g.n > il || need(g.n, g.dim)? > ol {
                return Err(Error::internal(format!("{what}: gather sizes exceed its buffers")));
            }
            Ok(())
        }
        Kernel::Attention(a) => crate::attention::check(a, None, &[(&a.out, a.tq, a.dv)], |b| f32_len(program, b))
            .map_err(|e| Error::internal(format!("{what}: {e}"))),
        Kernel::AttentionBackward(a) => {
            let outs = a.grads().map(|(_, o, rows, cols)| (o, rows, cols));
            crate::attention::check(&a.fwd, Some(&a.dout), &outs, |b| f32_len(program, b))
                .and_then(|()| crate::attention::check_disjoint(a, |b| f32_len(program, b)))
                .map_err(|e| Error::internal(format!("{what}: {e}")))
        }
        Kernel::ScatterAdd(s) => {
            let sl = check_buf(program, s.src, Some(DType::F32), what)?;
            let il = check_buf(program, s.ids, None, what)?;
            let ol = check_buf(program, s.out, Some(DType::F32), what)?;
            if s.out == s.src || s.out == s.ids {
                return Err(Error::internal(format!("{what}: scatter-add output aliases an input")));
            }
            let need = |a: usize, b: usize| a.checked_mul(b).ok_or_else(|| Error::internal("scatter-add size overflows"));
            if need(s.rows, s.dim)? > ol || s.n > il || need(s.n, s.dim)? > sl {
                return Err(Error::internal(format!("{what}: scatter-add sizes exceed its buffers")));
            }
            Ok(())
        }
    }
}

/// Checks that every kernel of `program` stays inside its buffers for its whole
/// iteration space, that dtypes fit, and that every entry names existing kernels and
/// buffers. Any failure is an [`Error::Internal`].
pub fn validate(program: &Program) -> Result<()> {
    for (i, k) in program.kernels.iter().enumerate() {
        validate_kernel(program, i, k)?;
    }
    for e in &program.entries {
        if let Some(&k) = e.kernels.iter().find(|&&k| k >= program.kernels.len()) {
            return Err(Error::internal(format!("entry `{}` names kernel k{k} which does not exist", e.name)));
        }
        if let Some((n, b)) = e.results.iter().find(|(_, b)| *b >= program.buffers.len()) {
            return Err(Error::internal(format!("entry `{}` result `{n}` names buffer b{b} which does not exist", e.name)));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Gather / scatter-add (shared by the executor and the interpreter)
// ---------------------------------------------------------------------------------------

fn id_at(ids: &BufData, i: usize, rows: usize) -> std::result::Result<usize, String> {
    match ids.dtype() {
        DType::I32 => {
            let v = ids.as_i32().unwrap()[i];
            if v >= 0 && (v as usize) < rows { Ok(v as usize) } else { Err(v.to_string()) }
        }
        DType::F32 => {
            let v = ids.as_f32().unwrap()[i];
            if v >= 0.0 && v.fract() == 0.0 && (v as usize) < rows { Ok(v as usize) } else { Err(format!("{v}")) }
        }
    }
}

/// `out[i, :] = table[ids[i], :]`; checks every id first, so a bad id leaves `out` as it was.
pub fn gather(g: &GatherKernel, bufs: &mut Buffers) -> Result<()> {
    let mut rows = Vec::with_capacity(g.n);
    {
        let ids = bufs.get(g.ids)?;
        for i in 0..g.n {
            let r = id_at(ids, i, g.rows)
                .map_err(|v| Error::user(format!("embedding id {v} at position {i} of `{}` is out of range 0..{}", g.what, g.rows)))?;
            rows.push(r);
        }
    }
    let (out, table) = bufs.pair_mut(g.out, g.table)?;
    let out = out.as_f32_mut().ok_or_else(|| dtype_err(g.out, DType::F32))?;
    let table = table.as_f32().ok_or_else(|| dtype_err(g.table, DType::F32))?;
    let d = g.dim;
    for (i, &r) in rows.iter().enumerate() {
        out[i * d..(i + 1) * d].copy_from_slice(&table[r * d..(r + 1) * d]);
    }
    Ok(())
}

/// `out[ids[i], :] += src[i, :]` in order of `i`; checks every id first.
pub fn scatter_add(s: &ScatterAddKernel, bufs: &mut Buffers) -> Result<()> {
    let mut rows = Vec::with_capacity(s.n);
    {
        let ids = bufs.get(s.ids)?;
        for i in 0..s.n {
            let r = id_at(ids, i, s.rows).map_err(|v| {
                Error::user(format!("embedding id {v} at position {i} of scatter-add into b{} is out of range 0..{}", s.out, s.rows))
            })?;
            rows.push(r);
        }
    }
    let (out, src) = bufs.pair_mut(s.out, s.src)?;
    let out = out.as_f32_mut().ok_or_else(|| dtype_err(s.out, DType::F32))?;
    let src = src.as_f32().ok_or_else(|| dtype_err(s.src, DType::F32))?;
    let d = s.dim;
    for (i, &r) in rows.iter().enumerate() {
        for (o, x) in out[r * d..(r + 1) * d].iter_mut().zip(&src[i * d..(i + 1) * d]) {
            *o += *x;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The executor
// ---------------------------------------------------------------------------------------

/// Loop kernels with more points than this are split across the thread pool. Measured on
/// W1 (2 threads; `[128, 256]` kernels of 32768 points, a fork-join costs a few µs):
/// 2^15 → 2^13 took its median from 0.92–1.00 to 0.67–0.93 ms; 2^12 gained nothing more.
const PARALLEL_POINTS: usize = 1 << 13;

/// How the executor runs one kernel.
enum Plan {
    /// Through the interpreter.
    Interp,
    /// A compiled loop kernel: its code, the outermost extent (of the normalised
    /// kernel, see [`jit::normalize`]) and whether splitting it across threads is safe.
    Jit {
        f: LoopFn,
        outer: usize,
        points: usize,
        splittable: bool,
        /// The kernel's fused sums, if any.
        sums: Option<Box<SumPlan>>,
    },
    MatMul,
    Gather,
    ScatterAdd,
    Attention,
    AttentionBackward,
}

/// A loop kernel's code: its JIT function, and the wide code of the known formula it
/// computes, if any ([`crate::formulas`]).
struct LoopFn {
    jit: KernelFn,
    formula: Option<Box<Formula>>,
}

impl LoopFn {
    /// Runs outermost indices `lo..hi` through the formula's code where there is one
    /// and `formulas` allows it, else through the JIT function.
    ///
    /// # Safety
    /// As for a [`KernelFn`]: `bufs` points at the buffers (or a fused-sum table) the
    /// kernel was validated against, and no other thread touches what `lo..hi` writes.
    unsafe fn call(&self, formulas: bool, bufs: *const *mut u8, lo: i64, hi: i64) {
        // SAFETY: the caller's promise (a formula touches exactly the kernel's points).
        unsafe {
            match &self.formula {
                Some(f) if formulas => f.run(bufs, lo, hi),
                _ => (self.jit)(bufs, lo, hi),
            }
        }
    }
}

/// How a kernel's [`FusedSum`]s run: every chunk of the outermost axis sums into its
/// own zeroed span of the executor's scratch (the kernel sees the span in place of the
/// sum's buffer), then the chunks' partial sums are added in chunk order.
struct SumPlan {
    chunks: usize,
    /// Per sum: its buffer, first element, span (elements from the first to the last it
    /// writes), where its chunks' spans start in the scratch, whether it accumulates,
    /// and the elements it writes (relative to the first).
    sums: Vec<SumSpan>,
    /// Scratch floats the kernel needs.
    need: usize,
}

struct SumSpan {
    buf: BufId,
    offset: usize,
    span: usize,
    at: usize,
    accumulate: bool,
    elements: Vec<usize>,
}

impl SumPlan {
    /// The plan of normalised kernel `k`, `None` without sums.
    fn of(k: &LoopKernel) -> Option<Box<SumPlan>> {
        if k.sums.is_empty() {
            return None;
        }
        let chunks = FusedSum::chunks(k.shape[0]);
        let mut need = 0;
        let sums = k
            .sums
            .iter()
            .map(|s| {
                // The written elements: the non-zero-stride axes, row-major (injective).
                let mut elements = vec![0usize];
                for (&n, &st) in k.shape.iter().zip(&s.into.strides) {
                    if st != 0 {
                        elements = elements.iter().flat_map(|&e| (0..n).map(move |i| e + i * st)).collect();
                    }
                }
                if k.shape.contains(&0) {
                    elements.clear();
                }
                let span = elements.iter().max().map_or(0, |m| m + 1);
                let at = need;
                need += span * chunks;
                SumSpan { buf: s.into.buf, offset: s.into.offset, span, at, accumulate: s.accumulate, elements }
            })
            .collect();
        Some(Box::new(SumPlan { chunks, sums, need }))
    }

    /// Appends, for every chunk, the kernel's pointer table: `ptrs` with each sum's
    /// buffer replaced by that chunk's span of `sums` (the kernel's zeroed scratch, laid
    /// out as `need` floats).
    fn tables(&self, ptrs: &[*mut u8], sums: *mut f32, tables: &mut Vec<*mut u8>) {
        let nb = ptrs.len();
        let start = tables.len();
        for c in 0..self.chunks {
            tables.extend_from_slice(ptrs);
            for s in &self.sums {
                // The kernel adds `offset + i` to this base: it lands on chunk c's span.
                tables[start + c * nb + s.buf] = sums.wrapping_add(s.at + c * s.span).wrapping_sub(s.offset) as *mut u8;
            }
        }
    }

    /// Adds the chunks' partial sums (`part`, the kernel's scratch) into the sums'
    /// buffers, every element in chunk order (from 0, or from the buffer's value with
    /// `accumulate`). Chunk by chunk over all the elements, so that a sum written densely
    /// (a bias or embedding gradient) adds whole rows in vector lanes; element by
    /// element, each element had read its 16 partial sums 16 spans apart (W2's
    /// `[128, 128]` position-embedding gradient: 0.4 ms a step).
    fn combine(&self, bufs: &mut Buffers, part: &[f32]) {
        for s in self.sums.iter().filter(|s| s.span > 0) {
            let out = bufs.f32_mut(s.buf).expect("validated f32");
            let part = &part[s.at..s.at + s.span * self.chunks];
            // The elements are distinct and inside the span: all of it when as many.
            let dense = s.elements.len() == s.span;
            let out = &mut out[s.offset..s.offset + s.span];
            if !s.accumulate {
                if dense {
                    out.fill(0.0);
                } else {
                    s.elements.iter().for_each(|&e| out[e] = 0.0);
                }
            }
            for p in part.chunks_exact(s.span) {
                if dense {
                    out.iter_mut().zip(p).for_each(|(o, &x)| *o += x);
                } else {
                    s.elements.iter().for_each(|&e| out[e] += p[e]);
                }
            }
        }
    }

    /// Runs kernel `f` (its formula's code where `formulas` allows) over `0..outer`
    /// chunk by chunk (in parallel when `parallel`), then combines the partial sums into
    /// their buffers.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        f: &LoopFn,
        formulas: bool,
        outer: usize,
        parallel: bool,
        bufs: &mut Buffers,
        scratch: &mut Scratch,
        pool: &rayon::ThreadPool,
    ) {
        let ptrs = &scratch.ptrs;
        let nb = ptrs.len();
        scratch.sums.clear();
        scratch.sums.resize(self.need, 0.0);
        scratch.tables.clear();
        self.tables(ptrs, scratch.sums.as_mut_ptr(), &mut scratch.tables);
        let tables = scratch.tables.as_ptr() as usize;
        let chunk = |c: usize| {
            let (lo, hi) = (outer * c / self.chunks, outer * (c + 1) / self.chunks);
            let table = (tables as *const *mut u8).wrapping_add(c * nb);
            // SAFETY: validated in bounds (each sum's accesses stay in its span); chunks
            // write disjoint output elements (the caller checked `splittable` for
            // `parallel`) and their own spans.
            unsafe { f.call(formulas, table, lo as i64, hi as i64) }
        };
        if parallel {
            pool.install(|| (0..self.chunks).into_par_iter().for_each(chunk));
        } else {
            (0..self.chunks).for_each(chunk);
        }
        self.combine(bufs, &scratch.sums);
    }
}

/// Reused memory for fused sums (so a step allocates nothing).
#[derive(Default)]
struct Scratch {
    /// Every buffer's base pointer, filled before each run ([`Buffers::base_ptrs_into`]).
    ptrs: Vec<*mut u8>,
    sums: Vec<f32>,
    tables: Vec<*mut u8>,
    /// Per matrix product of a row group, its `B` packed once for all panels.
    packed: Vec<crate::tiles::Packed>,
}

// SAFETY: the tables only hold addresses of the executor's own buffers and scratch,
// written and read by the thread running the kernel (the chunks read them only).
unsafe impl Send for Scratch {}
unsafe impl Sync for Scratch {}

/// Whether the normalised loop kernel `k` can run with its outermost axis split across
/// threads without two threads touching the same output element.
pub(crate) fn splittable(k: &LoopKernel) -> bool {
    let keep = k.shape.len() - k.reduce.map_or(0, |_| k.reduced_dims);
    if keep == 0 || k.out.strides[0] == 0 && k.shape[0] > 1 {
        return false;
    }
    if !injective(k.shape[..keep].iter().copied().zip(k.out.strides[..keep].iter().copied())) {
        return false;
    }
    // Side stores are injective and read only where they write (validated).
    let mut ok = true;
    let mut check = |a: &Access| {
        if a.buf == k.out.buf && (a.offset != k.out.offset || a.strides != k.out.strides) {
            ok = false;
        }
    };
    walk_loads(&k.body, &mut check);
    k.side.iter().for_each(|s| walk_loads(&s.value, &mut check));
    ok
}

/// Runs a program's entries: owns its buffers, its compiled kernels and a thread pool.
pub struct Executor {
    program: Program,
    bufs: Buffers,
    plans: Vec<Plan>,
    entries: HashMap<String, usize>,
    /// Per entry: its kernels as run, one by one or in row groups (see [`groups`]).
    schedules: Vec<Vec<Step>>,
    /// What the schedules were made with: row groups, products beside other steps.
    grouping: bool,
    beside: bool,
    threads: usize,
    /// Whether a row group's products run through `tiles`' register tiles, with each
    /// `B` packed once for all its panels where there are enough of them (else the
    /// `gemm` crate, per panel).
    packed_panels: bool,
    /// Whether loop kernels recognised as a known formula run its wide code
    /// ([`crate::formulas`]) instead of their JIT function.
    formulas: bool,
    pool: std::sync::Arc<rayon::ThreadPool>,
    /// With profiling on: per kernel, its runs and seconds (see [`Executor::profile`]).
    profile: Option<Vec<(u64, f64)>>,
    scratch: Scratch,
    // Declared last so the code outlives nothing that could call it.
    _jit: Option<JitProgram>,
}

/// Every entry's schedule: row groups where `grouping` (see [`groups`]), else one
/// kernel at a time; with `beside`, products run beside the independent step before
/// them ([`groups::beside`]).
fn schedules(program: &Program, grouping: bool, beside: bool) -> Vec<Vec<Step>> {
    let one_by_one = |e: &crate::kir::Entry| e.kernels.iter().map(|&k| Step::One(k)).collect();
    program
        .entries
        .iter()
        .map(|e| {
            let steps = if grouping { groups::schedule(program, &e.kernels) } else { one_by_one(e) };
            if beside { groups::beside(program, steps) } else { steps }
        })
        .collect()
}

fn build_pool(threads: usize) -> Result<std::sync::Arc<rayon::ThreadPool>> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("bm-worker-{i}"))
        .build()
        .map(std::sync::Arc::new)
        .map_err(|e| Error::internal(format!("cannot start the thread pool: {e}")))
}

fn resolve_threads(threads: usize) -> usize {
    if threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { threads }
}

impl Executor {
    /// Allocates every buffer (zero-filled), validates every kernel and JIT-compiles every
    /// loop kernel. `threads` is the size of the thread pool (0: one per CPU).
    pub fn new(program: &Program, threads: usize) -> Result<Executor> {
        validate(program)?;
        let jit = jit::compile(program)?;
        let plans = program
            .kernels
            .iter()
            .enumerate()
            .map(|(i, k)| match k {
                Kernel::Loop(l) => {
                    let n = jit::normalize(l);
                    let jit = jit.function(i).ok_or_else(|| Error::internal(format!("kernel k{i} was not compiled")))?;
                    let formula = Formula::recognise(&n, &|b| program.buffers[b].dtype == DType::F32).map(Box::new);
                    Ok(Plan::Jit {
                        f: LoopFn { jit, formula },
                        outer: n.shape[0],
                        points: n.shape.iter().product(),
                        splittable: splittable(&n),
                        sums: SumPlan::of(&n),
                    })
                }
                Kernel::MatMul(_) => Ok(Plan::MatMul),
                Kernel::Gather(_) => Ok(Plan::Gather),
                Kernel::ScatterAdd(_) => Ok(Plan::ScatterAdd),
                Kernel::Attention(_) => Ok(Plan::Attention),
                Kernel::AttentionBackward(_) => Ok(Plan::AttentionBackward),
            })
            .collect::<Result<Vec<_>>>()?;
        Self::build(program, plans, resolve_threads(threads), Some(jit))
    }

    /// Like [`Executor::new`], but every kernel runs through the reference interpreter.
    pub fn interpreted(program: &Program) -> Result<Executor> {
        validate(program)?;
        let plans = program.kernels.iter().map(|_| Plan::Interp).collect();
        Self::build(program, plans, 1, None)
    }

    fn build(program: &Program, plans: Vec<Plan>, threads: usize, jit: Option<JitProgram>) -> Result<Executor> {
        let entries = program.entries.iter().enumerate().map(|(i, e)| (e.name.clone(), i)).collect();
        // `BMC_ROW_GROUPS=0` turns row groups off (for measuring what they do).
        let grouping = jit.is_some() && std::env::var("BMC_ROW_GROUPS").map_or(true, |v| v != "0");
        // `BMC_BESIDE=0`: every step on its own (for A/B).
        let beside = jit.is_some() && std::env::var("BMC_BESIDE").map_or(true, |v| v != "0");
        let schedules = schedules(program, grouping, beside);
        Ok(Executor {
            program: program.clone(),
            bufs: Buffers::new(program),
            plans,
            entries,
            schedules,
            grouping,
            beside,
            threads,
            // `BMC_PACKED_PANELS=0`: a group's products through the `gemm` crate, which
            // packs `B` per panel (for A/B).
            packed_panels: std::env::var("BMC_PACKED_PANELS").map_or(true, |v| v != "0"),
            // `BMC_FORMULAS=0`: every loop kernel through its JIT function (for A/B).
            formulas: std::env::var("BMC_FORMULAS").map_or(true, |v| v != "0"),
            pool: build_pool(threads)?,
            profile: None,
            scratch: Scratch::default(),
            _jit: jit,
        })
    }

    /// Runs consecutive row-local kernels as row groups (the default with compiled
    /// kernels) or every kernel on its own.
    pub fn set_row_groups(&mut self, on: bool) {
        self.grouping = on && self._jit.is_some();
        self.schedules = schedules(&self.program, self.grouping, self.beside);
    }

    /// Runs matrix products beside the independent step before them (the default with
    /// compiled kernels, [`groups::beside`]; one thread runs them one after the other) or
    /// after it.
    pub fn set_beside(&mut self, on: bool) {
        self.beside = on && self._jit.is_some();
        self.schedules = schedules(&self.program, self.grouping, self.beside);
    }

    /// Whether a row group's products run through `tiles`' register tiles, packing
    /// each `B` once for all its panels where there are enough of them (the default),
    /// or through the `gemm` crate per panel.
    pub fn set_packed_panels(&mut self, on: bool) {
        self.packed_panels = on;
    }

    /// Whether loop kernels that compute a known formula run its wide code (the
    /// default) or their JIT function.
    pub fn set_formulas(&mut self, on: bool) {
        self.formulas = on;
    }

    /// The known formula loop kernel `k` computes, if it is recognised as one.
    pub fn formula(&self, k: usize) -> Option<&Formula> {
        match self.plans.get(k) {
            Some(Plan::Jit { f, .. }) => f.formula.as_deref(),
            _ => None,
        }
    }

    /// Starts (or restarts) timing every kernel `run` runs; `false` stops it.
    pub fn set_profiling(&mut self, on: bool) {
        self.profile = on.then(|| vec![(0, 0.0); self.program.kernels.len()]);
    }

    /// Per kernel of the program: how many times `run` ran it and for how many seconds
    /// in all, since profiling started. A step of several kernels (a row group, a product
    /// beside a step) is timed under its first kernel (see
    /// [`Executor::step_led_by`]); its other kernels count runs but no time.
    pub fn profile(&self) -> Option<&[(u64, f64)]> {
        self.profile.as_deref()
    }

    /// The step of a schedule whose first kernel is `k` and that runs more than `k`
    /// (a row group, or a step with a product beside it), if any: profiles time it as a
    /// whole, under `k`.
    pub fn step_led_by(&self, k: usize) -> Option<&Step> {
        self.steps().find(|s| !matches!(s, Step::One(_)) && s.first() == k)
    }

    /// Every step of every entry's schedule.
    pub fn steps(&self) -> impl Iterator<Item = &Step> {
        self.schedules.iter().flatten()
    }

    /// Every row group of every entry.
    pub fn groups(&self) -> impl Iterator<Item = &Group> {
        self.steps().filter_map(Step::group)
    }

    pub fn program(&self) -> &Program {
        &self.program
    }
    pub fn buffers(&self) -> &Buffers {
        &self.bufs
    }
    pub fn buffers_mut(&mut self) -> &mut Buffers {
        &mut self.bufs
    }
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f` on the executor's pool (one thread with `--threads 1`), so that a
    /// parallel iterator inside it uses this executor's threads, not rayon's global pool.
    pub fn on_pool<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    /// The thread pool, where it has more than one thread: a caller that runs many steps
    /// runs its loop on it ([`crate::session::Session::on_workers`]).
    pub fn workers(&self) -> Option<std::sync::Arc<rayon::ThreadPool>> {
        (self.threads > 1).then(|| self.pool.clone())
    }

    /// Resizes the thread pool (0: one thread per CPU).
    pub fn set_threads(&mut self, n: usize) -> Result<()> {
        let n = resolve_threads(n);
        if n != self.threads {
            self.pool = build_pool(n)?;
            self.threads = n;
        }
        Ok(())
    }

    pub fn f32(&self, buf: BufId) -> Result<&[f32]> {
        self.bufs.f32(buf)
    }
    pub fn f32_mut(&mut self, buf: BufId) -> Result<&mut [f32]> {
        self.bufs.f32_mut(buf)
    }
    pub fn i32(&self, buf: BufId) -> Result<&[i32]> {
        self.bufs.i32(buf)
    }
    pub fn i32_mut(&mut self, buf: BufId) -> Result<&mut [i32]> {
        self.bufs.i32_mut(buf)
    }

    /// Runs the kernels of entry `entry` in order. With several threads the whole entry
    /// runs on a worker of the pool, so a kernel split across threads is a fork-join
    /// among workers that are already awake, not a hand-off from (and wake-up of) the
    /// calling thread per kernel.
    pub fn run(&mut self, entry: &str) -> Result<()> {
        let e = *self.entries.get(entry).ok_or_else(|| Error::internal(format!("the program has no entry `{entry}`")))?;
        let (mut ctx, profile) = self.parts();
        let (steps, pool, threads) = (&ctx.schedules[e], ctx.pool, ctx.threads);
        in_pool(pool, threads, || match profile {
            None => steps.iter().try_for_each(|s| ctx.run_step(s)),
            Some(p) => steps.iter().try_for_each(|s| {
                let t = std::time::Instant::now();
                let r = ctx.run_step(s);
                let secs = t.elapsed().as_secs_f64();
                for (i, &k) in s.kernels().iter().enumerate() {
                    p[k].0 += 1;
                    if i == 0 {
                        p[k].1 += secs;
                    }
                }
                r
            }),
        })
    }

    /// Runs kernel `k` of the program alone.
    pub fn run_kernel(&mut self, k: usize) -> Result<()> {
        self.parts().0.run_kernel(k)
    }

    /// What running kernels needs, and the profile they add to (disjoint borrows).
    fn parts(&mut self) -> (Ctx<'_>, &mut Option<Vec<(u64, f64)>>) {
        self.bufs.base_ptrs_into(&mut self.scratch.ptrs);
        let ctx = Ctx {
            plans: &self.plans,
            schedules: &self.schedules,
            program: &self.program,
            bufs: &mut self.bufs,
            scratch: &mut self.scratch,
            threads: self.threads,
            packed_panels: self.packed_panels,
            formulas: self.formulas,
            pool: &self.pool,
        };
        (ctx, &mut self.profile)
    }
}

/// What running a kernel needs of the executor (the parts that may move to a worker).
struct Ctx<'a> {
    plans: &'a [Plan],
    schedules: &'a [Vec<Step>],
    program: &'a Program,
    bufs: &'a mut Buffers,
    scratch: &'a mut Scratch,
    threads: usize,
    packed_panels: bool,
    formulas: bool,
    pool: &'a rayon::ThreadPool,
}

impl Ctx<'_> {
    fn run_step(&mut self, s: &Step) -> Result<()> {
        match s {
            Step::One(k) => self.run_kernel(*k),
            Step::Group(g) => self.run_group(g),
            Step::Beside(first, k) => {
                let program = self.program;
                let Kernel::MatMul(m) = &program.kernels[*k] else {
                    return Err(Error::internal(format!("kernel k{k} runs beside a step but is not a matrix product")));
                };
                if self.threads <= 1 {
                    self.run_step(first)?;
                    return self.run_kernel(*k);
                }
                let (p, pool) = (self.scratch.ptrs.as_ptr() as usize, self.pool);
                // The product on one thread, as one job: the other thread takes it while
                // this one starts the step, whose blocks either thread takes in turn.
                // SAFETY: the product was validated; `groups::beside` paired it with a step
                // that neither writes what it reads nor touches what it writes, and it
                // touches its buffers through these pointers only.
                let product = || unsafe { crate::gemm::matmul_at(m, p as *const *mut u8, 1) };
                pool.install(|| rayon::join(|| self.run_step(first), product)).0
            }
        }
    }

    /// Runs row group `g` a block of chunks at a time: every member on the block's rows,
    /// in order, a loop kernel chunk by chunk (blocks in parallel when a member is large
    /// enough to split on its own), then the members' fused sums.
    fn run_group(&mut self, g: &Group) -> Result<()> {
        enum Member<'k> {
            /// A loop kernel and where its per-chunk pointer tables start (fused sums).
            Loop(&'k LoopFn, Option<usize>),
            /// A matrix product, its output rows per outermost index, and its `B` packed
            /// for all panels (an index into `scratch.packed`) or not.
            MatMul(&'k crate::kir::MatMulKernel, usize, Option<usize>),
        }
        let scratch = &mut *self.scratch;
        let ptrs = &scratch.ptrs;
        let nb = ptrs.len();
        let need: usize = g.kernels.iter().map(|&k| if let Plan::Jit { sums: Some(sp), .. } = &self.plans[k] { sp.need } else { 0 }).sum();
        scratch.sums.clear();
        scratch.sums.resize(need, 0.0);
        scratch.tables.clear();
        let sp = scratch.sums.as_mut_ptr();
        let mut members = Vec::with_capacity(g.kernels.len());
        let mut products = 0;
        let mut big = false;
        let mut at = 0;
        for &k in &g.kernels {
            match (&self.plans[k], &self.program.kernels[k]) {
                (Plan::Jit { f, points, sums, .. }, _) => {
                    let points = *points;
                    big |= points > PARALLEL_POINTS;
                    let tables = sums.as_ref().map(|plan| {
                        let start = scratch.tables.len();
                        plan.tables(ptrs, sp.wrapping_add(at), &mut scratch.tables);
                        at += plan.need;
                        start
                    });
                    members.push(Member::Loop(f, tables));
                }
                (Plan::MatMul, Kernel::MatMul(m)) => {
                    big |= m.m * m.n * m.k >= crate::gemm::PARALLEL_FLOPS;
                    // Every panel multiplies the same `B` (a weight): pack it once here
                    // rather than once per panel inside the `gemm` crate.
                    let slot = products;
                    products += 1;
                    if scratch.packed.len() < products {
                        scratch.packed.push(Default::default());
                    }
                    // With fewer blocks than twice the threads the per-panel packs run in
                    // parallel anyway, and one pack ahead of them would cost more. A
                    // row-major `B` the tiles read in place as fast as packed (32–128-row
                    // panels, `tiles::timing::row_panels`), so it is packed only for more
                    // than two blocks a thread: W1's backward groups (four blocks) skip the
                    // pack (0.263 → 0.256, 0.271 → 0.263 ms, 365 and 357 of 500 pairs);
                    // W2's sixteen blocks keep it (skipping it: 57.9 → 63.0 ms, 6/20).
                    let threads = self.threads.max(2);
                    let worth = self.packed_panels && if m.b.col_stride == 1 { g.blocks > 2 * threads } else { g.blocks >= 2 * threads };
                    // SAFETY: the kernel was validated against these buffers.
                    let packed =
                        worth && unsafe { crate::gemm::pack_panels_b(m, ptrs.as_ptr(), &mut scratch.packed[slot], self.threads > 1) };
                    members.push(Member::MatMul(m, m.m / g.outer, packed.then_some(slot)));
                }
                _ => return Err(Error::internal(format!("kernel k{k} cannot run in a row group"))),
            }
        }
        let (p, tables) = (ptrs.as_ptr() as usize, scratch.tables.as_ptr() as usize);
        let (packed, tiles, formulas) = (&scratch.packed, self.packed_panels, self.formulas);
        let block = |b: usize| {
            let (c0, c1) = g.block(b);
            for m in &members {
                match *m {
                    // SAFETY (both arms): validated in bounds; the group's members touch
                    // the buffers they write only in the chunk's own rows
                    // (`groups::schedule`), so chunks write disjoint elements and read
                    // only what earlier members wrote for the same chunk; fused sums go
                    // to per-chunk spans.
                    Member::Loop(f, None) => {
                        // No partial sums: the block's chunks are one range of rows, one call.
                        let (lo, hi) = (g.chunk(c0).0, g.chunk(c1 - 1).1);
                        unsafe { f.call(formulas, p as *const *mut u8, lo as i64, hi as i64) }
                    }
                    Member::Loop(f, Some(start)) => {
                        for c in c0..c1 {
                            let (lo, hi) = g.chunk(c);
                            let bufs = (tables as *const *mut u8).wrapping_add(start + c * nb);
                            unsafe { f.call(formulas, bufs, lo as i64, hi as i64) }
                        }
                    }
                    Member::MatMul(k, r, b) => {
                        let (lo, hi) = (g.chunk(c0).0, g.chunk(c1 - 1).1);
                        // SAFETY: as above; the panel's output rows belong to this block;
                        // `B` (a weight the group does not write) was packed above.
                        unsafe {
                            match b {
                                Some(i) => crate::gemm::panel_packed(k, p as *const *mut u8, lo * r, hi * r, &packed[i]),
                                None => crate::gemm::panel(k, p as *const *mut u8, lo * r, hi * r, tiles),
                            }
                        }
                    }
                }
            }
        };
        if big && self.threads > 1 {
            self.pool.install(|| (0..g.blocks).into_par_iter().for_each(block));
        } else {
            (0..g.blocks).for_each(block);
        }
        let mut at = 0;
        for &k in &g.kernels {
            if let Plan::Jit { sums: Some(plan), .. } = &self.plans[k] {
                plan.combine(self.bufs, &scratch.sums[at..at + plan.need]);
                at += plan.need;
            }
        }
        Ok(())
    }

    fn run_kernel(&mut self, k: usize) -> Result<()> {
        let plan = self.plans.get(k).ok_or_else(|| Error::internal(format!("kernel k{k} does not exist")))?;
        let kernel = &self.program.kernels[k];
        let (threads, pool, formulas) = (self.threads, self.pool, self.formulas);
        match (plan, kernel) {
            (Plan::Interp, k) => interp::run_kernel(k, self.bufs),
            (&Plan::Jit { ref f, outer, points, splittable, sums: Some(ref sums) }, _) => {
                let parallel = splittable && threads > 1 && points > PARALLEL_POINTS;
                sums.run(f, formulas, outer, parallel, self.bufs, self.scratch, pool);
                Ok(())
            }
            (&Plan::Jit { ref f, outer, points, splittable, sums: None }, _) => {
                let ptrs = &self.scratch.ptrs;
                let p = ptrs.as_ptr() as usize;
                if splittable && threads > 1 && points > PARALLEL_POINTS && outer > 1 {
                    let chunks = outer.min(threads * 4);
                    pool.install(|| {
                        (0..chunks).into_par_iter().for_each(|c| {
                            let lo = outer * c / chunks;
                            let hi = outer * (c + 1) / chunks;
                            // SAFETY: validated in bounds; chunks write disjoint elements (`splittable`).
                            unsafe { f.call(formulas, p as *const *mut u8, lo as i64, hi as i64) }
                        })
                    });
                } else {
                    // SAFETY: the kernel was validated to stay inside its buffers.
                    unsafe { f.call(formulas, ptrs.as_ptr(), 0, outer as i64) }
                }
                Ok(())
            }
            (Plan::MatMul, Kernel::MatMul(m)) => in_pool(pool, threads, || crate::gemm::matmul(m, self.bufs, threads)),
            (Plan::Gather, Kernel::Gather(g)) => gather(g, self.bufs),
            (Plan::ScatterAdd, Kernel::ScatterAdd(s)) => scatter_add(s, self.bufs),
            (Plan::Attention, Kernel::Attention(a)) => in_pool(pool, threads, || crate::attention::forward(a, self.bufs, threads)),
            (Plan::AttentionBackward, Kernel::AttentionBackward(a)) => {
                in_pool(pool, threads, || crate::attention::backward(a, self.bufs, threads))
            }
            _ => Err(Error::internal(format!("kernel k{k} does not match its plan"))),
        }
    }
}

/// Runs `f` in the executor's pool. With one thread, `f` runs single-threaded anyway:
/// run it here rather than hand it to the pool's thread and wait (futex round trips per
/// kernel, which dominate one-token decode steps).
fn in_pool<R: Send>(pool: &rayon::ThreadPool, threads: usize, f: impl FnOnce() -> R + Send) -> R {
    if threads > 1 { pool.install(f) } else { f() }
}

/// Helpers shared by the runtime's unit tests.
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use crate::kir::{BufKind, Buffer, Entry};

    /// A tiny deterministic generator (xorshift64*).
    pub struct Rng(pub u64);
    impl Rng {
        pub fn new(seed: u64) -> Rng {
            Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }
        pub fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            x.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        /// Uniform in `0..n` (n > 0).
        pub fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        pub fn chance(&mut self, num: usize, den: usize) -> bool {
            self.below(den) < num
        }
        /// Uniform in [lo, hi).
        pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
            lo + (hi - lo) * ((self.next() >> 40) as f32 / (1u64 << 24) as f32)
        }
    }

    pub fn load(buf: BufId, offset: usize, strides: &[usize]) -> ScalarExpr {
        ScalarExpr::Load(Access { buf, offset, strides: strides.to_vec() })
    }
    pub fn un(op: crate::kir::UnaryOp, a: ScalarExpr) -> ScalarExpr {
        ScalarExpr::Unary(op, Box::new(a))
    }
    pub fn bin(op: crate::kir::BinaryOp, a: ScalarExpr, b: ScalarExpr) -> ScalarExpr {
        ScalarExpr::Binary(op, Box::new(a), Box::new(b))
    }
    /// Row-major strides of `shape` (an axis of extent 0 counts as 1).
    pub fn contiguous(shape: &[usize]) -> Vec<usize> {
        let mut s = vec![0; shape.len()];
        let mut acc = 1;
        for d in (0..shape.len()).rev() {
            s[d] = acc;
            acc *= shape[d].max(1);
        }
        s
    }

    pub fn buf(name: &str, dtype: DType, len: usize) -> Buffer {
        Buffer { name: name.into(), dtype, shape: vec![len], kind: BufKind::Temp }
    }

    /// A program with one entry `main` running every kernel in order.
    pub fn program(buffers: Vec<Buffer>, kernels: Vec<Kernel>) -> Program {
        let n = kernels.len();
        Program {
            buffers,
            kernels,
            entries: vec![Entry { name: "main".into(), kernels: (0..n).collect(), results: vec![] }],
            params: vec![],
        }
    }

    /// Fills every buffer: f32 uniform in [-2, 2) (with a few special values when
    /// `special`), i32 uniform in `0..10`.
    pub fn fill(bufs: &mut Buffers, seed: u64, special: bool) {
        let mut r = Rng::new(seed);
        for id in 0..bufs.len() {
            let b = bufs.get_mut(id).unwrap();
            match b.dtype() {
                DType::F32 => {
                    for x in b.as_f32_mut().unwrap() {
                        *x = if special && r.chance(1, 12) {
                            [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, 0.0, 1.0][r.below(6)]
                        } else {
                            r.uniform(-2.0, 2.0)
                        };
                    }
                }
                DType::I32 => {
                    for x in b.as_i32_mut().unwrap() {
                        *x = r.below(10) as i32;
                    }
                }
            }
        }
    }

    pub fn same_f32(a: f32, b: f32) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }

    /// Every buffer of `a` equals `b`'s (f32: bit for bit or both NaN, or within `rel`
    /// relative error when `rel > 0`).
    pub fn assert_same(a: &Buffers, b: &Buffers, rel: f32, ctx: &str) {
        for id in 0..a.len() {
            let (x, y) = (a.get(id).unwrap(), b.get(id).unwrap());
            match x.dtype() {
                DType::F32 => {
                    for (i, (&p, &q)) in x.as_f32().unwrap().iter().zip(y.as_f32().unwrap()).enumerate() {
                        let ok = same_f32(p, q) || (rel > 0.0 && (p - q).abs() <= rel * p.abs().max(q.abs()).max(1.0));
                        assert!(ok, "{ctx}: b{id}[{i}]: {p:e} vs {q:e}");
                    }
                }
                DType::I32 => assert_eq!(x.as_i32().unwrap(), y.as_i32().unwrap(), "{ctx}: b{id}"),
            }
        }
    }

    /// Runs `main` through the interpreter and through the JIT executor (`threads`),
    /// from the same random contents; asserts equal results; returns the interpreter's.
    pub fn check_jit(p: &Program, seed: u64, threads: usize, special: bool, rel: f32) -> Buffers {
        let ctx = p.to_text();
        let mut a = Executor::interpreted(p).unwrap_or_else(|e| panic!("{e}\n{ctx}"));
        let mut b = Executor::new(p, threads).unwrap_or_else(|e| panic!("{e}\n{ctx}"));
        fill(a.buffers_mut(), seed, special);
        fill(b.buffers_mut(), seed, special);
        a.run("main").unwrap();
        b.run("main").unwrap();
        assert_same(a.buffers(), b.buffers(), rel, &ctx);
        a.buffers().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;
    use crate::kir::{MatMulKernel, ReduceOp, UnaryOp};

    /// Work run on the executor's pool (parameter initialisation) sees the executor's
    /// thread count, one included, not rayon's global pool.
    #[test]
    fn work_on_the_pool_sees_its_threads() {
        let p = program(vec![], vec![]);
        for threads in [1, 3] {
            let e = Executor::new(&p, threads).unwrap();
            assert_eq!(e.on_pool(rayon::current_num_threads), threads);
        }
    }

    #[test]
    fn an_empty_space_is_injective() {
        // A matmul with no output columns (`Linear(d, 0)`) has nothing to overlap.
        assert!(injective([(4, 0), (0, 1)].into_iter()));
        assert!(!injective([(4, 0), (2, 1)].into_iter()));
    }

    fn acc(buf: BufId, offset: usize, strides: &[usize]) -> Access {
        Access { buf, offset, strides: strides.to_vec() }
    }
    fn copy(shape: &[usize], src: Access, out: Access) -> Kernel {
        Kernel::Loop(LoopKernel {
            shape: shape.to_vec(),
            reduce: None,
            reduced_dims: 0,
            body: ScalarExpr::Load(src),
            out,
            accumulate: false,
            side: vec![],
            sums: vec![],
        })
    }
    fn internal<T>(r: Result<T>) -> String {
        match r {
            Err(Error::Internal(m)) => m,
            Err(e) => panic!("expected an internal error, got {e}"),
            Ok(_) => panic!("expected an internal error"),
        }
    }

    #[test]
    fn buffers_are_aligned_zeroed_and_typed() {
        let p = program(vec![buf("x", DType::F32, 5), buf("i", DType::I32, 33), buf("e", DType::F32, 0)], vec![]);
        let mut e = Executor::new(&p, 1).unwrap();
        assert_eq!(e.f32(0).unwrap(), &[0.0; 5]);
        assert_eq!(e.i32(1).unwrap(), &[0; 33][..]);
        assert!(e.f32(2).unwrap().is_empty());
        assert_eq!(e.f32(0).unwrap().as_ptr() as usize % 64, 0);
        assert_eq!(e.i32(1).unwrap().as_ptr() as usize % 64, 0);
        internal(e.i32(0));
        internal(e.f32_mut(1));
        internal(e.f32(3));
        e.i32_mut(1).unwrap()[32] = 7;
        assert_eq!(e.i32(1).unwrap()[32], 7);
        internal(e.run("nope"));
        e.run("main").unwrap();
    }

    #[test]
    fn validation_rejects_bad_programs() {
        let bufs = || vec![buf("x", DType::F32, 12), buf("o", DType::F32, 12), buf("i", DType::I32, 4)];
        let bad = |k: Kernel| {
            let p = program(bufs(), vec![k]);
            let m1 = internal(Executor::new(&p, 1));
            let m2 = internal(Executor::interpreted(&p));
            assert_eq!(m1, m2);
            m1
        };
        // reads one past the end
        let m = bad(copy(&[3, 4], acc(0, 1, &[4, 1]), acc(1, 0, &[4, 1])));
        assert!(m.contains("reaches element 12"), "{m}");
        // writes past the end via a transposed view
        bad(copy(&[3, 4], acc(0, 0, &[4, 1]), acc(1, 0, &[1, 4])));
        // stride count
        bad(copy(&[3, 4], acc(0, 0, &[4]), acc(1, 0, &[4, 1])));
        // missing buffer
        bad(copy(&[3, 4], acc(7, 0, &[4, 1]), acc(1, 0, &[4, 1])));
        // index out of rank
        bad(Kernel::Loop(LoopKernel {
            shape: vec![3],
            reduce: None,
            reduced_dims: 0,
            body: ScalarExpr::Index(1),
            out: acc(1, 0, &[1]),
            accumulate: false,
            side: vec![],
            sums: vec![],
        }));
        // output stride on a reduced axis
        bad(Kernel::Loop(LoopKernel {
            shape: vec![3, 4],
            reduce: Some(ReduceOp::Sum),
            reduced_dims: 1,
            body: ScalarExpr::Const(1.0),
            out: acc(1, 0, &[4, 1]),
            accumulate: false,
            side: vec![],
            sums: vec![],
        }));
        // too many reduced axes
        bad(Kernel::Loop(LoopKernel {
            shape: vec![3],
            reduce: Some(ReduceOp::Sum),
            reduced_dims: 2,
            body: ScalarExpr::Const(1.0),
            out: acc(1, 0, &[0]),
            accumulate: false,
            side: vec![],
            sums: vec![],
        }));
        // matmul: aliasing, overlapping output, i32 operand, out of bounds
        let mm = |a: usize, c: MatOperand, m: usize| {
            Kernel::MatMul(MatMulKernel {
                batch: vec![],
                m,
                n: 2,
                k: 2,
                a: MatOperand { buf: a, offset: 0, batch_strides: vec![], row_stride: 2, col_stride: 1 },
                b: MatOperand { buf: 0, offset: 0, batch_strides: vec![], row_stride: 2, col_stride: 1 },
                c,
                accumulate: false,
                bf16: false,
            })
        };
        let c = |buf, rs, cs| MatOperand { buf, offset: 0, batch_strides: vec![], row_stride: rs, col_stride: cs };
        bad(mm(0, c(0, 2, 1), 2));
        bad(mm(0, c(1, 1, 1), 2));
        bad(mm(2, c(1, 2, 1), 2));
        bad(mm(0, c(1, 2, 1), 7));
        // gather: sizes, aliasing
        bad(Kernel::Gather(GatherKernel { table: 0, ids: 2, out: 1, n: 5, rows: 3, dim: 2, what: "e".into() }));
        bad(Kernel::Gather(GatherKernel { table: 0, ids: 2, out: 0, n: 4, rows: 3, dim: 2, what: "e".into() }));
        bad(Kernel::ScatterAdd(ScatterAddKernel { src: 0, ids: 2, out: 1, n: 4, rows: 7, dim: 2 }));
        // entries naming missing kernels
        let mut p = program(bufs(), vec![]);
        p.entries[0].kernels.push(3);
        internal(Executor::new(&p, 1));
    }

    fn gather_program(ids_dtype: DType) -> Program {
        program(
            vec![buf("table", DType::F32, 8), buf("ids", ids_dtype, 3), buf("out", DType::F32, 6), buf("grad", DType::F32, 8)],
            vec![
                Kernel::Gather(GatherKernel { table: 0, ids: 1, out: 2, n: 3, rows: 4, dim: 2, what: "wte".into() }),
                Kernel::ScatterAdd(ScatterAddKernel { src: 2, ids: 1, out: 3, n: 3, rows: 4, dim: 2 }),
            ],
        )
    }

    #[test]
    fn gather_and_scatter_add() {
        for dt in [DType::I32, DType::F32] {
            let p = gather_program(dt);
            for mut e in [Executor::interpreted(&p).unwrap(), Executor::new(&p, 2).unwrap()] {
                e.f32_mut(0).unwrap().copy_from_slice(&[0.0, 1.0, 10.0, 11.0, 20.0, 21.0, 30.0, 31.0]);
                match dt {
                    DType::I32 => e.i32_mut(1).unwrap().copy_from_slice(&[2, 0, 2]),
                    DType::F32 => e.f32_mut(1).unwrap().copy_from_slice(&[2.0, 0.0, 2.0]),
                }
                e.f32_mut(3).unwrap().fill(1.0);
                e.run("main").unwrap();
                assert_eq!(e.f32(2).unwrap(), &[20.0, 21.0, 0.0, 1.0, 20.0, 21.0]);
                assert_eq!(e.f32(3).unwrap(), &[1.0, 2.0, 1.0, 1.0, 41.0, 43.0, 1.0, 1.0]);

                // out of range ids are user errors naming the embedding
                match dt {
                    DType::I32 => e.i32_mut(1).unwrap()[1] = 4,
                    DType::F32 => e.f32_mut(1).unwrap()[1] = -1.0,
                }
                let err = e.run("main").unwrap_err();
                let v = if dt == DType::I32 { "4" } else { "-1" };
                assert_eq!(err, Error::User(format!("embedding id {v} at position 1 of `wte` is out of range 0..4")));
                assert_eq!(err.exit_code(), 1);
                // and scatter-add alone checks too
                let err = e.run_kernel(1).unwrap_err();
                assert!(matches!(&err, Error::User(m) if m.contains("position 1") && m.contains("out of range 0..4")), "{err}");
            }
        }
    }

    #[test]
    fn injectivity_and_splitting() {
        assert!(injective([(3, 4), (4, 1)].into_iter()));
        assert!(injective([(3, 1), (4, 3)].into_iter()));
        assert!(injective([(1, 0), (4, 1)].into_iter()));
        assert!(!injective([(3, 1), (4, 1)].into_iter()));
        assert!(!injective([(3, 0), (4, 1)].into_iter()));
        assert!(!injective([(3, 3), (4, 1)].into_iter()));
        let lk = |out: Access, body: ScalarExpr, reduce: Option<ReduceOp>, nred: usize| LoopKernel {
            shape: vec![10, 20],
            reduce,
            reduced_dims: nred,
            body,
            out,
            accumulate: false,
            side: vec![],
            sums: vec![],
        };
        let ld = |a: Access| ScalarExpr::Load(a);
        assert!(splittable(&lk(acc(1, 0, &[20, 1]), ld(acc(0, 0, &[20, 1])), None, 0)));
        assert!(splittable(&lk(acc(1, 0, &[1, 10]), ld(acc(0, 0, &[20, 1])), None, 0)));
        assert!(splittable(&lk(acc(1, 0, &[1, 0]), ld(acc(0, 0, &[20, 1])), Some(ReduceOp::Sum), 1)));
        assert!(!splittable(&lk(acc(1, 0, &[0, 1]), ld(acc(0, 0, &[20, 1])), None, 0)));
        assert!(!splittable(&lk(acc(1, 0, &[1, 1]), ld(acc(0, 0, &[20, 1])), None, 0)));
        // in place with the same view is fine, a shifted read of the output is not
        assert!(splittable(&lk(acc(0, 0, &[20, 1]), ld(acc(0, 0, &[20, 1])), None, 0)));
        assert!(!splittable(&lk(acc(0, 0, &[20, 1]), ld(acc(0, 20, &[20, 1])), None, 0)));
    }

    #[test]
    fn non_injective_and_shifted_in_place_writes_stay_sequential() {
        // o[j] = x[i, j] for every i: the last i wins, as in the interpreter
        let (m, n) = (200, 300);
        let p = program(
            vec![buf("x", DType::F32, m * n + n), buf("o", DType::F32, n)],
            vec![
                copy(&[m, n], acc(0, 0, &[n, 1]), acc(1, 0, &[0, 1])),
                // x[i, j] = tanh(x[i + 1, j]) read ahead of the write: order matters
                Kernel::Loop(LoopKernel {
                    shape: vec![m, n],
                    reduce: None,
                    reduced_dims: 0,
                    body: ScalarExpr::Unary(UnaryOp::Tanh, Box::new(ScalarExpr::Load(acc(0, n, &[n, 1])))),
                    out: acc(0, 0, &[n, 1]),
                    accumulate: true,
                    side: vec![],
                    sums: vec![],
                }),
            ],
        );
        check_jit(&p, 5, 4, false, 0.0);
    }

    #[test]
    fn set_threads_and_entries() {
        let n = 100_000;
        let mut p = program(
            vec![buf("x", DType::F32, n), buf("o", DType::F32, n), buf("s", DType::F32, 1)],
            vec![
                copy(&[n], acc(0, 0, &[1]), acc(1, 0, &[1])),
                Kernel::Loop(LoopKernel {
                    shape: vec![n],
                    reduce: Some(ReduceOp::Sum),
                    reduced_dims: 1,
                    body: ScalarExpr::Load(acc(1, 0, &[1])),
                    out: acc(2, 0, &[0]),
                    accumulate: false,
                    side: vec![],
                    sums: vec![],
                }),
            ],
        );
        p.entries.push(crate::kir::Entry { name: "second".into(), kernels: vec![1], results: vec![("s".into(), 2)] });
        let mut e = Executor::new(&p, 3).unwrap();
        assert_eq!(e.threads(), 3);
        e.f32_mut(0).unwrap().iter_mut().enumerate().for_each(|(i, x)| *x = (i % 7) as f32);
        e.run("main").unwrap();
        let want: f32 = {
            let mut s = 0.0f32;
            for i in 0..n {
                s += (i % 7) as f32;
            }
            s
        };
        assert_eq!(e.f32(2).unwrap()[0], want);
        e.set_threads(1).unwrap();
        e.f32_mut(1).unwrap().fill(1.0);
        e.run("second").unwrap();
        assert_eq!(e.f32(2).unwrap()[0], n as f32);
        e.set_threads(0).unwrap();
        assert!(e.threads() >= 1);
    }
}

#[cfg(test)]
mod send_sync {
    fn check<T: Send + Sync>() {}
    #[test]
    fn executor_is_send_and_sync() {
        check::<super::Executor>();
    }
}
