//! Cranelift JIT for loop kernels.
//!
//! Every [`LoopKernel`] of a program becomes one native function
//! `unsafe extern "C" fn(bufs: *const *mut u8, lo: i64, hi: i64)` ([`KernelFn`]): `bufs`
//! holds the base pointer of every buffer (by [`BufId`]) and the function runs the
//! outermost axis of the *normalised* kernel ([`normalize`]) over `lo..hi`, so the
//! executor can split that axis across threads. Normalisation prepends an axis of
//! extent 1 when the kernel has rank 0 or reduces every axis, so the outermost axis is
//! never reduced.
//!
//! Loops are nested blocks; each access's address is strength-reduced level by level
//! (`addr_d = addr_{d-1} + i_d * stride_d * 4`), so the innermost loop only adds.
//! Reductions accumulate in a variable initialised to the identity, in the same order
//! as the interpreter. Transcendentals call the interpreter's `extern "C"` functions
//! (`crate::interp::bm_*`), so the two agree bit for bit; everything else is native
//! (see `crate::interp` for the shared scalar semantics).

use crate::error::{Error, Result};
use crate::interp;
use crate::kir::{Access, BinaryOp, BufId, DType, FusedSum, Kernel, LoopKernel, Program, ReduceOp, ScalarExpr, SideStore, UnaryOp};
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::immediates::Ieee32;
use cranelift_codegen::ir::{
    AbiParam, BlockArg, FuncRef, InstBuilder, MemFlagsData, StackSlot, StackSlotData, StackSlotKind, Type, UserFuncName, Value, types,
};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext, Variable};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{FuncId, Linkage, Module, default_libcall_names};
use std::borrow::Cow;
use std::collections::HashMap;

/// A compiled loop kernel: runs outermost (normalised) indices `lo..hi`.
pub type KernelFn = unsafe extern "C" fn(bufs: *const *mut u8, lo: i64, hi: i64);

/// The loop kernel with an extra leading axis of extent 1 (strides 0, `Index(n)`
/// renumbered to `n + 1`) when it has rank 0 or reduces every axis; otherwise itself.
pub fn normalize(k: &LoopKernel) -> Cow<'_, LoopKernel> {
    let rank = k.shape.len();
    let all_reduced = k.reduce.is_some() && k.reduced_dims >= rank;
    if rank > 0 && !all_reduced {
        return Cow::Borrowed(k);
    }
    let acc = |a: &Access| {
        let mut strides = vec![0];
        strides.extend_from_slice(&a.strides);
        Access { buf: a.buf, offset: a.offset, strides }
    };
    let expr = |e: &ScalarExpr| e.map_loads(&acc, &|n| n + 1);
    let mut shape = vec![1];
    shape.extend_from_slice(&k.shape);
    Cow::Owned(LoopKernel {
        shape,
        reduce: k.reduce,
        reduced_dims: if k.reduce.is_some() { rank } else { 0 },
        body: expr(&k.body),
        out: acc(&k.out),
        accumulate: k.accumulate,
        side: k.side.iter().map(|s| SideStore { value: expr(&s.value), into: acc(&s.into) }).collect(),
        sums: k.sums.iter().map(|s| FusedSum { value: expr(&s.value), into: acc(&s.into), accumulate: s.accumulate }).collect(),
    })
}

/// The compiled loop kernels of a program. Owns the code; the function pointers are
/// valid while it lives.
pub struct JitProgram {
    module: Option<JITModule>,
    fns: Vec<Option<KernelFn>>,
}

// SAFETY: after `finalize_definitions` the module's code and data are immutable; the
// module is only touched again to free it on drop.
unsafe impl Send for JitProgram {}
unsafe impl Sync for JitProgram {}

impl JitProgram {
    /// The function of kernel `k` (None if it is not a loop kernel).
    pub fn function(&self, k: usize) -> Option<KernelFn> {
        self.fns.get(k).copied().flatten()
    }
}

impl Drop for JitProgram {
    fn drop(&mut self) {
        if let Some(m) = self.module.take() {
            // SAFETY: the executor owning `self` is being dropped, so no kernel runs and
            // no function pointer is used afterwards.
            unsafe { m.free_memory() };
        }
    }
}

fn cl_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::internal(format!("JIT: {what}: {e}"))
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Ext {
    Exp,
    Log,
    Tanh,
    Sigmoid,
    Sin,
    Cos,
    Erf,
    Pow,
}

const EXTS: [(Ext, &str, usize); 8] = [
    (Ext::Exp, "bm_exp", 1),
    (Ext::Log, "bm_log", 1),
    (Ext::Tanh, "bm_tanh", 1),
    (Ext::Sigmoid, "bm_sigmoid", 1),
    (Ext::Sin, "bm_sin", 1),
    (Ext::Cos, "bm_cos", 1),
    (Ext::Erf, "bm_erf", 1),
    (Ext::Pow, "bm_pow", 2),
];

fn ext_ptr(e: Ext) -> *const u8 {
    match e {
        Ext::Exp => interp::bm_exp as extern "C" fn(f32) -> f32 as *const u8,
        Ext::Log => interp::bm_log as extern "C" fn(f32) -> f32 as *const u8,
        Ext::Tanh => interp::bm_tanh as extern "C" fn(f32) -> f32 as *const u8,
        Ext::Sigmoid => interp::bm_sigmoid as extern "C" fn(f32) -> f32 as *const u8,
        Ext::Sin => interp::bm_sin as extern "C" fn(f32) -> f32 as *const u8,
        Ext::Cos => interp::bm_cos as extern "C" fn(f32) -> f32 as *const u8,
        Ext::Erf => interp::bm_erf as extern "C" fn(f32) -> f32 as *const u8,
        Ext::Pow => interp::bm_pow as extern "C" fn(f32, f32) -> f32 as *const u8,
    }
}

/// Unary operations computed a row at a time by `crate::rows` (8 lanes where the CPU has
/// AVX2) when their operand is read contiguously along the innermost axis.
const ROW_OPS: [(UnaryOp, &str); 3] =
    [(UnaryOp::Exp, "bm_row_exp"), (UnaryOp::GeluTanh, "bm_row_gelu_tanh"), (UnaryOp::GeluTanhGrad, "bm_row_gelu_tanh_grad")];

/// Rows longer than this are computed inline (the results live on the stack).
const MAX_ROW: usize = 4096;

/// Rows shorter than this compute an operand expression inline: evaluating it into a
/// row first costs a loop and a round trip through the stack.
const MIN_COMPUTED_ROW: usize = 32;

/// A row function call hoisted out of the innermost loop: `op` of `src`'s row, into `slot`.
struct RowCall<'k> {
    op: UnaryOp,
    src: RowSrc<'k>,
    slot: StackSlot,
}

/// Where a row function reads its operand's row.
enum RowSrc<'k> {
    /// Load `j` (of `Gen::accesses`), in place.
    Load(usize),
    /// An expression, evaluated over the row into `slot` first (GELU's `x + bias`).
    Computed(&'k ScalarExpr, StackSlot),
}

/// Compiles every loop kernel of `program` (which must have passed
/// [`crate::exec::validate`]: the generated code does no bounds checks).
pub fn compile(program: &Program) -> Result<JitProgram> {
    let dtypes: Vec<DType> = program.buffers.iter().map(|b| b.dtype).collect();
    let loops: Vec<Option<&LoopKernel>> = program
        .kernels
        .iter()
        .map(|k| match k {
            Kernel::Loop(l) => Some(l),
            _ => None,
        })
        .collect();
    compile_loops(&loops, &dtypes)
}

/// Compiles loop kernels (`None` entries are skipped and get no function); `dtypes` is
/// the dtype of every buffer.
pub fn compile_loops(kernels: &[Option<&LoopKernel>], dtypes: &[DType]) -> Result<JitProgram> {
    compile_inner(kernels, dtypes, None)
}

/// The Cranelift IR of every loop kernel of `program`, before optimisation, as text
/// (`bmc emit --stage clif`).
pub fn clif_text(program: &Program) -> Result<String> {
    crate::exec::validate(program)?;
    let dtypes: Vec<DType> = program.buffers.iter().map(|b| b.dtype).collect();
    let loops: Vec<Option<&LoopKernel>> = program
        .kernels
        .iter()
        .map(|k| match k {
            Kernel::Loop(l) => Some(l),
            _ => None,
        })
        .collect();
    let mut text = String::new();
    compile_inner(&loops, &dtypes, Some(&mut text))?;
    Ok(text)
}

fn compile_inner(kernels: &[Option<&LoopKernel>], dtypes: &[DType], mut clif: Option<&mut String>) -> Result<JitProgram> {
    if kernels.iter().all(|k| k.is_none()) {
        return Ok(JitProgram { module: None, fns: vec![None; kernels.len()] });
    }
    let mut flags = settings::builder();
    flags.set("opt_level", "speed").map_err(|e| cl_err("flags", e))?;
    flags.set("use_colocated_libcalls", "false").map_err(|e| cl_err("flags", e))?;
    flags.set("is_pic", "false").map_err(|e| cl_err("flags", e))?;
    let isa =
        cranelift_native::builder().map_err(|e| cl_err("host", e))?.finish(settings::Flags::new(flags)).map_err(|e| cl_err("isa", e))?;
    let mut jb = JITBuilder::with_isa(isa, default_libcall_names());
    for (e, name, _) in EXTS {
        jb.symbol(name, ext_ptr(e));
    }
    for (op, name) in ROW_OPS {
        let f = crate::rows::row_fn(op).ok_or_else(|| cl_err("rows", format!("{op:?} has no row function")))?;
        jb.symbol(name, f as *const u8);
    }
    let mut module = JITModule::new(jb);
    let ptr_ty = module.target_config().pointer_type();

    let mut ext_ids = HashMap::new();
    for (e, name, arity) in EXTS {
        let mut sig = module.make_signature();
        for _ in 0..arity {
            sig.params.push(AbiParam::new(types::F32));
        }
        sig.returns.push(AbiParam::new(types::F32));
        let id = module.declare_function(name, Linkage::Import, &sig).map_err(|e| cl_err("declare", e))?;
        ext_ids.insert(e, id);
    }

    let mut row_ids = vec![];
    for (op, name) in ROW_OPS {
        let mut sig = module.make_signature();
        sig.params.push(AbiParam::new(ptr_ty));
        sig.params.push(AbiParam::new(types::I64));
        sig.params.push(AbiParam::new(ptr_ty));
        let id = module.declare_function(name, Linkage::Import, &sig).map_err(|e| cl_err("declare", e))?;
        row_ids.push((op, id));
    }

    let mut sig = module.make_signature();
    sig.params.push(AbiParam::new(ptr_ty));
    sig.params.push(AbiParam::new(types::I64));
    sig.params.push(AbiParam::new(types::I64));

    let mut ctx = module.make_context();
    // BM_JIT_DUMP=1 prints every kernel's Cranelift IR and machine code to stderr.
    let dump = std::env::var_os("BM_JIT_DUMP").is_some();
    ctx.set_disasm(dump);
    let mut fctx = FunctionBuilderContext::new();
    let mut ids: Vec<Option<FuncId>> = Vec::with_capacity(kernels.len());
    for (i, k) in kernels.iter().enumerate() {
        let Some(k) = k else {
            ids.push(None);
            continue;
        };
        let k = normalize(k);
        let id = module.declare_function(&format!("bm_kernel_{i}"), Linkage::Local, &sig).map_err(|e| cl_err("declare", e))?;
        ctx.func.signature = sig.clone();
        ctx.func.name = UserFuncName::user(0, id.as_u32());
        {
            let b = FunctionBuilder::new(&mut ctx.func, &mut fctx);
            let g = Gen {
                b,
                module: &mut module,
                ext_ids: &ext_ids,
                ext_refs: HashMap::new(),
                row_ids: &row_ids,
                rows: Vec::new(),
                row_addrs: Vec::new(),
                k: &k,
                dtypes,
                ptr_ty,
                accesses: Vec::new(),
                addrs: Vec::new(),
                idx: Vec::new(),
                acc: None,
                plan: VecPlan::Scalar,
                vaxis: None,
                lane_off: 0,
                hoisted: Vec::new(),
                cache: Vec::new(),
                side_at: 0,
                sums_at: 0,
                stored: None,
            };
            g.function()?;
        }
        if let Some(t) = clif.as_deref_mut() {
            t.push_str(&format!("; kernel k{i}\n{}\n", ctx.func.display()));
        }
        module.define_function(id, &mut ctx).map_err(|e| cl_err(&format!("kernel k{i}"), format!("{e:?}")))?;
        if dump && let Some(code) = ctx.compiled_code().and_then(|c| c.vcode.as_ref()) {
            eprintln!("; kernel k{i}\n{}\n{code}", ctx.func.display());
        }
        module.clear_context(&mut ctx);
        ctx.set_disasm(dump); // clear_context resets it
        ids.push(Some(id));
    }
    module.finalize_definitions().map_err(|e| cl_err("finalize", e))?;
    let fns = ids
        .iter()
        .map(|id| {
            id.map(|id| {
                let p = module.get_finalized_function(id);
                // SAFETY: the function was generated with exactly this signature.
                unsafe { std::mem::transmute::<*const u8, KernelFn>(p) }
            })
        })
        .collect();
    Ok(JitProgram { module: Some(module), fns })
}

/// Lanes of a vector (`f32x4`).
const LANES: i64 = 4;

/// How a kernel's loops are vectorised.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum VecPlan {
    /// Scalar loops only.
    Scalar,
    /// The loop over kept axis `v` runs 4 points at once (a vector loop plus a scalar
    /// tail); every lane computes exactly what the scalar code would, so this is exact.
    Lanes(usize),
    /// The innermost (reduced) axis is folded into vector accumulators, combined
    /// horizontally after each row: exact for `Max`/`Min`, a different order for `Sum`.
    ReduceInner,
}

/// Picks the vectorisation of the normalised kernel `k`; `loads` are its distinct loads.
fn vec_plan(k: &LoopKernel, loads: &[&Access]) -> VecPlan {
    let rank = k.shape.len();
    let nred = k.reduce.map_or(0, |_| k.reduced_dims);
    let keep = rank - nred;
    // A fused sum takes 4 lanes into 4 consecutive elements or, in lane order, into one
    // element; the latter keeps the points' order only if no later axis is summed too.
    let sum_ok = |d: usize, s: &crate::kir::FusedSum| {
        s.into.strides[d] == 1 || (s.into.strides[d] == 0 && (d + 1..rank).all(|e| s.into.strides[e] != 0 || k.shape[e] == 1))
    };
    let ok_axis = |d: usize| {
        k.shape[d] >= LANES as usize
            && k.shape[d] <= i32::MAX as usize
            && loads.iter().all(|a| a.strides[d] <= 1)
            && k.sums.iter().all(|s| sum_ok(d, s))
    };
    // Lanes store 4 points at once: no load may see the output through another view
    // (a lane would read an element before or after another lane's store), and no two
    // points may write the same element.
    let no_alias = loads.iter().all(|a| a.buf != k.out.buf || **a == k.out);
    if no_alias && crate::exec::injective(k.shape[..keep].iter().copied().zip(k.out.strides[..keep].iter().copied())) {
        for v in (0..keep).rev() {
            if k.out.strides[v] == 1 && ok_axis(v) {
                return VecPlan::Lanes(v);
            }
        }
    }
    // Nothing is stored while a row is reduced, so any load is fine here.
    if nred > 0 && ok_axis(rank - 1) && loads.iter().any(|a| a.strides[rank - 1] == 1) {
        return VecPlan::ReduceInner;
    }
    VecPlan::Scalar
}

struct Gen<'a, 'k> {
    b: FunctionBuilder<'a>,
    module: &'a mut JITModule,
    ext_ids: &'a HashMap<Ext, FuncId>,
    ext_refs: HashMap<Ext, FuncRef>,
    row_ids: &'a [(UnaryOp, FuncId)],
    /// Row functions called at the start of every innermost row, and the addresses of
    /// their results while that row's loops are emitted.
    rows: Vec<RowCall<'k>>,
    row_addrs: Vec<Option<Value>>,
    k: &'k LoopKernel,
    dtypes: &'a [DType],
    ptr_ty: Type,
    /// Distinct accesses (out first, then loads) and their current addresses.
    accesses: Vec<&'k Access>,
    addrs: Vec<Value>,
    /// The loop index value of every enclosing level.
    idx: Vec<Value>,
    acc: Option<Variable>,
    plan: VecPlan,
    /// While emitting vector code: the axis the 4 lanes run along (lane `l` is at index
    /// `idx[axis] + lane_off / 4 + l`).
    vaxis: Option<usize>,
    /// Byte offset of lane 0 from the current addresses along `vaxis`.
    lane_off: i64,
    /// Loads hoisted out of the loops they do not move in (by access).
    hoisted: Vec<Option<Value>>,
    /// Loads already emitted for the current point (by access).
    cache: Vec<Option<Value>>,
    /// Where the side stores' and the fused sums' `into` accesses start in `accesses`
    /// (after the loads: `1..side_at` are the loads).
    side_at: usize,
    sums_at: usize,
    /// The value just stored at the current point, while fused sums are evaluated (a
    /// load of exactly `out` reads it).
    stored: Option<Value>,
}

/// The outermost `op(operand)` nodes of `e` with a row function whose operand `row_src`
/// can feed (a row whose value at each point depends on that point only).
fn row_candidates<'k>(e: &'k ScalarExpr, row_src: &impl Fn(&ScalarExpr) -> bool, out: &mut Vec<(UnaryOp, &'k ScalarExpr)>) {
    match e {
        ScalarExpr::Unary(op, a) if crate::rows::row_fn(*op).is_some() && row_src(a) => out.push((*op, a)),
        ScalarExpr::Unary(_, a) => row_candidates(a, row_src, out),
        ScalarExpr::Binary(_, a, b) => {
            row_candidates(a, row_src, out);
            row_candidates(b, row_src, out);
        }
        ScalarExpr::Select(c, a, b) => {
            row_candidates(c, row_src, out);
            row_candidates(a, row_src, out);
            row_candidates(b, row_src, out);
        }
        ScalarExpr::Load(_) | ScalarExpr::Const(_) | ScalarExpr::Index(_) => {}
    }
}

fn collect<'k>(e: &'k ScalarExpr, out: &mut Vec<&'k Access>) {
    match e {
        ScalarExpr::Load(a) => {
            if !out.contains(&a) {
                out.push(a)
            }
        }
        ScalarExpr::Const(_) | ScalarExpr::Index(_) => {}
        ScalarExpr::Unary(_, a) => collect(a, out),
        ScalarExpr::Binary(_, a, b) => {
            collect(a, out);
            collect(b, out);
        }
        ScalarExpr::Select(c, a, b) => {
            collect(c, out);
            collect(a, out);
            collect(b, out);
        }
    }
}

/// Flags for vector memory accesses: in bounds, but only 4-byte aligned.
fn vflags() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

impl<'k> Gen<'_, 'k> {
    fn dtype(&self, buf: BufId) -> Result<DType> {
        self.dtypes.get(buf).copied().ok_or_else(|| Error::internal(format!("JIT: buffer b{buf} does not exist")))
    }

    fn function(mut self) -> Result<()> {
        let k = self.k;
        let entry = self.b.create_block();
        self.b.append_block_params_for_function_params(entry);
        self.b.switch_to_block(entry);
        let params = self.b.block_params(entry).to_vec();
        let (bufs, lo, hi) = (params[0], params[1], params[2]);

        self.accesses.push(&k.out);
        collect(&k.body, &mut self.accesses);
        for side in &k.side {
            collect(&side.value, &mut self.accesses);
        }
        for sum in &k.sums {
            collect(&sum.value, &mut self.accesses);
        }
        self.side_at = self.accesses.len();
        self.sums_at = self.side_at + k.side.len();
        self.plan = vec_plan(k, &self.accesses[1..]);
        self.accesses.extend(k.side.iter().map(|s| &s.into));
        self.accesses.extend(k.sums.iter().map(|s| &s.into));
        self.plan_rows()?;
        self.hoisted = vec![None; self.accesses.len()];
        self.cache = vec![None; self.accesses.len()];
        let mut bases: HashMap<BufId, Value> = HashMap::new();
        for i in 0..self.accesses.len() {
            let a = self.accesses[i];
            let base = match bases.get(&a.buf) {
                Some(&v) => v,
                None => {
                    let off = (a.buf * self.ptr_ty.bytes() as usize) as i32;
                    let v = self.b.ins().load(self.ptr_ty, MemFlagsData::trusted(), bufs, off);
                    bases.insert(a.buf, v);
                    v
                }
            };
            let mut addr = self.b.ins().iadd_imm_s(base, (a.offset * 4) as i64);
            // The outermost loop starts at `lo`.
            if a.strides[0] != 0 {
                let off = self.b.ins().imul_imm_s(lo, (a.strides[0] * 4) as i64);
                addr = self.b.ins().iadd(addr, off);
            }
            self.addrs.push(addr);
        }
        self.level(0, lo, hi)?;
        self.b.ins().return_(&[]);
        self.b.seal_all_blocks();
        let cfg = self.module.target_config();
        self.b.finalize(cfg);
        Ok(())
    }

    /// Finds the row functions worth calling, in rows of 8..=MAX_ROW (scalar code, or
    /// vector lanes along the innermost axis): `op(load)` with an f32 load contiguous
    /// along the innermost axis, read in place; or `op(expression)` whose loads move
    /// contiguously or not at all along that axis and read nothing this kernel writes
    /// (except each point's own element of the output or of a side store, moving along
    /// the row: read before it is written in either order; e.g. the bias add stored
    /// beside the GELU after it), evaluated over the row first.
    fn plan_rows(&mut self) -> Result<()> {
        let k = self.k;
        let rank = k.shape.len();
        // Vector lanes along another axis would need other rows' values.
        let lanes_elsewhere = matches!(self.plan, VecPlan::Lanes(v) if v + 1 != rank);
        if rank < 2 || lanes_elsewhere || !(8..=MAX_ROW).contains(&k.shape[rank - 1]) {
            return Ok(());
        }
        let inner = rank - 1;
        let stores: Vec<&Access> = self.accesses[self.side_at..].iter().copied().chain([&k.out]).collect();
        let sums: Vec<BufId> = k.sums.iter().map(|s| s.into.buf).collect();
        let dtypes = self.dtypes;
        let row_src = |e: &ScalarExpr| match e {
            ScalarExpr::Load(l) => l.strides[inner] == 1 && dtypes.get(l.buf) == Some(&DType::F32),
            _ if k.shape[inner] < MIN_COMPUTED_ROW => false,
            _ => {
                let mut loads = vec![];
                collect(e, &mut loads);
                loads.iter().all(|l| {
                    l.strides[inner] <= 1
                        && !sums.contains(&l.buf)
                        && stores.iter().all(|s| s.buf != l.buf || (s == l && l.strides[inner] == 1))
                })
            }
        };
        let mut found: Vec<(UnaryOp, &ScalarExpr)> = vec![];
        let exprs = std::iter::once(&k.body).chain(k.side.iter().map(|s| &s.value)).chain(k.sums.iter().map(|s| &s.value));
        for e in exprs {
            row_candidates(e, &row_src, &mut found);
        }
        let size = (k.shape[inner] * 4) as u32;
        for (op, a) in found {
            if self.row_of(op, a).is_some() {
                continue;
            }
            let mut slot = || self.b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, size, 4));
            let src = match a {
                ScalarExpr::Load(l) => RowSrc::Load(self.accesses[..self.side_at].iter().position(|x| *x == l).expect("collected")),
                _ => RowSrc::Computed(a, slot()),
            };
            let slot = slot();
            self.rows.push(RowCall { op, src, slot });
        }
        self.row_addrs = vec![None; self.rows.len()];
        Ok(())
    }

    /// The row call computing `op(a)`, if there is one.
    fn row_of(&self, op: UnaryOp, a: &ScalarExpr) -> Option<usize> {
        self.rows.iter().position(|r| {
            r.op == op
                && match r.src {
                    RowSrc::Load(j) => matches!(a, ScalarExpr::Load(acc) if self.accesses[j] == acc),
                    RowSrc::Computed(e, _) => e == a,
                }
        })
    }

    /// At the start of an innermost row (level `d`): every row function over the row's
    /// operands.
    fn call_rows(&mut self, d: usize) -> Result<()> {
        let n = self.k.shape[d] as i64;
        for i in 0..self.rows.len() {
            let (op, slot) = (self.rows[i].op, self.rows[i].slot);
            let src = match self.rows[i].src {
                RowSrc::Load(j) => self.addrs[j],
                RowSrc::Computed(e, into) => self.evaluate_row(d, e, into)?,
            };
            let id = self.row_ids.iter().find(|r| r.0 == op).expect("declared").1;
            let fr = self.module.declare_func_in_func(id, self.b.func);
            let dst = self.b.ins().stack_addr(self.ptr_ty, slot, 0);
            let count = self.b.ins().iconst(types::I64, n);
            self.b.ins().call(fr, &[src, count, dst]);
            self.row_addrs[i] = Some(dst);
        }
        Ok(())
    }

    /// Evaluates `e` at every point of the innermost row (level `d`: 4 lanes, then a
    /// scalar tail) into stack slot `into`; returns its address.
    fn evaluate_row(&mut self, d: usize, e: &ScalarExpr, into: StackSlot) -> Result<Value> {
        let zero = self.b.ins().iconst(types::I64, 0);
        let end = self.b.ins().iconst(types::I64, self.k.shape[d] as i64);
        let base = self.b.ins().stack_addr(self.ptr_ty, into, 0);
        let point = |g: &mut Self| -> Result<()> {
            g.cache.iter_mut().for_each(|c| *c = None);
            let v = g.expr(e)?;
            let off = g.b.ins().imul_imm_s(g.idx[d], 4);
            let addr = g.b.ins().iadd(base, off);
            g.b.ins().store(vflags(), v, addr, g.lane_off as i32);
            Ok(())
        };
        self.lanes_then_tail(d, zero, end, point)?;
        self.cache.iter_mut().for_each(|c| *c = None);
        Ok(base)
    }

    /// The loop of level `d` over `start..end` in vector lanes along `d`, 8 points per
    /// iteration (`body` twice, the second [`LANES`] points on through `lane_off`), then
    /// 4, then a scalar tail; `body` emits one vector or scalar step. Two steps an
    /// iteration halve the loop's own instructions (an add per moving pointer, the
    /// index, compare and branch: as many as a bias add's load, add and store).
    fn lanes_then_tail(&mut self, d: usize, start: Value, end: Value, body: impl Fn(&mut Self) -> Result<()>) -> Result<()> {
        self.vaxis = Some(d);
        let (i, addrs) = self.emit_loop(d, start, end, 2 * LANES, |g| g.unrolled(2, |g, _| body(g)))?;
        let saved = std::mem::replace(&mut self.addrs, addrs);
        let (i, addrs) = self.emit_loop(d, i, end, LANES, &body)?;
        self.vaxis = None;
        self.addrs = addrs;
        self.emit_loop(d, i, end, 1, &body)?;
        self.addrs = saved;
        Ok(())
    }

    /// `step(n)` for `n < times`, the `n`-th on the points [`LANES`]·`n` further along
    /// the vector axis (through `lane_off`): one iteration of an unrolled vector loop.
    fn unrolled(&mut self, times: usize, mut step: impl FnMut(&mut Self, usize) -> Result<()>) -> Result<()> {
        let mut r = Ok(());
        for n in 0..times {
            self.lane_off = 4 * LANES * n as i64;
            r = step(self, n);
            if r.is_err() {
                break;
            }
        }
        self.lane_off = 0;
        r
    }

    /// `op(a)` at the current point from its row function's results, if it has one.
    fn row_value(&mut self, op: UnaryOp, a: &ScalarExpr) -> Option<Value> {
        let i = self.row_of(op, a)?;
        let base = self.row_addrs[i]?;
        let rank = self.k.shape.len();
        let idx = *self.idx.get(rank - 1)?;
        let off = self.b.ins().imul_imm_s(idx, 4);
        let addr = self.b.ins().iadd(base, off);
        Some(if self.vaxis.is_some() {
            self.b.ins().load(types::F32X4, vflags(), addr, self.lane_off as i32)
        } else {
            self.b.ins().load(types::F32, MemFlagsData::trusted(), addr, 0)
        })
    }

    fn reduce_start(&self) -> Option<(ReduceOp, usize)> {
        self.k.reduce.map(|op| (op, self.k.shape.len() - self.k.reduced_dims))
    }

    /// The type of values in the code being emitted (f32, or f32x4 in vector code).
    fn vty(&self) -> Type {
        if self.vaxis.is_some() { types::F32X4 } else { types::F32 }
    }

    /// A scalar made a vector in vector code.
    fn widen(&mut self, v: Value) -> Value {
        if self.vaxis.is_some() && self.b.func.dfg.value_type(v) == types::F32 { self.b.ins().splat(types::F32X4, v) } else { v }
    }

    fn f32c(&mut self, x: f32) -> Value {
        let c = self.b.ins().f32const(Ieee32::with_bits(x.to_bits()));
        self.widen(c)
    }

    /// Emits `for i in (start..).step_by(step)` while `i + step <= end`; every access
    /// that moves along axis `d` gets a pointer carried by the loop. `body` runs with
    /// `idx[d] = i` and the addresses of iteration `i`. Returns the index and the
    /// addresses at the exit (for a tail loop); the addresses are restored.
    fn emit_loop(
        &mut self,
        d: usize,
        start: Value,
        end: Value,
        step: i64,
        body: impl FnOnce(&mut Self) -> Result<()>,
    ) -> Result<(Value, Vec<Value>)> {
        let moving: Vec<usize> = (0..self.accesses.len()).filter(|&j| self.accesses[j].strides[d] != 0).collect();
        let header = self.b.create_block();
        let body_b = self.b.create_block();
        let exit = self.b.create_block();
        let i = self.b.append_block_param(header, types::I64);
        let ps: Vec<Value> = moving.iter().map(|_| self.b.append_block_param(header, self.ptr_ty)).collect();
        let ei = self.b.append_block_param(exit, types::I64);
        let eps: Vec<Value> = moving.iter().map(|_| self.b.append_block_param(exit, self.ptr_ty)).collect();
        let mut args = vec![BlockArg::Value(start)];
        args.extend(moving.iter().map(|&j| BlockArg::Value(self.addrs[j])));
        self.b.ins().jump(header, &args);

        self.b.switch_to_block(header);
        let c = if step == 1 {
            self.b.ins().icmp(IntCC::SignedLessThan, i, end)
        } else {
            let n = self.b.ins().iadd_imm_s(i, step);
            self.b.ins().icmp(IntCC::SignedLessThanOrEqual, n, end)
        };
        let mut eargs = vec![BlockArg::Value(i)];
        eargs.extend(ps.iter().map(|&p| BlockArg::Value(p)));
        self.b.ins().brif(c, body_b, &[], exit, &eargs);

        self.b.switch_to_block(body_b);
        let saved = self.addrs.clone();
        for (m, &j) in moving.iter().enumerate() {
            self.addrs[j] = ps[m];
        }
        debug_assert_eq!(self.idx.len(), d);
        self.idx.push(i);
        body(self)?;
        self.idx.pop();
        let next = self.b.ins().iadd_imm_s(i, step);
        let mut nargs = vec![BlockArg::Value(next)];
        for (m, &j) in moving.iter().enumerate() {
            let inc = (self.accesses[j].strides[d] * 4) as i64 * step;
            nargs.push(BlockArg::Value(self.b.ins().iadd_imm_s(ps[m], inc)));
        }
        self.b.ins().jump(header, &nargs);

        self.b.switch_to_block(exit);
        let mut out = saved.clone();
        for (m, &j) in moving.iter().enumerate() {
            out[j] = eps[m];
        }
        self.addrs = saved;
        Ok((ei, out))
    }

    /// Emits the loop of level `d` over `start..end` (and everything inside it).
    fn level(&mut self, d: usize, start: Value, end: Value) -> Result<()> {
        let rank = self.k.shape.len();
        if d == rank {
            return self.point();
        }
        if d + 1 == rank && !self.rows.is_empty() {
            self.call_rows(d)?;
        }
        let red = self.reduce_start();
        let mut outer_acc = None;
        if let Some((op, rs)) = red
            && rs == d
        {
            let var = self.b.declare_var(self.vty());
            let id = self.f32c(interp::reduce_identity(op));
            self.b.def_var(var, id);
            outer_acc = Some(self.acc.replace(var));
        }

        if self.vaxis.is_none() && self.plan == VecPlan::Lanes(d) {
            self.lanes_then_tail(d, start, end, |g| g.inside(d))?;
        } else if self.vaxis.is_none() && self.plan == VecPlan::ReduceInner && d + 1 == rank {
            self.reduce_inner(d, start, end)?;
        } else {
            self.emit_loop(d, start, end, 1, |g| g.inside(d))?;
        }

        if let Some(prev) = outer_acc {
            let v = self.b.use_var(self.acc.unwrap());
            self.store(v)?;
            self.acc = prev;
        }
        Ok(())
    }

    /// The body of the loop of level `d`: hoists the loads that move last along `d`,
    /// then emits the inner levels.
    fn inside(&mut self, d: usize) -> Result<()> {
        let rank = self.k.shape.len();
        if d + 1 == rank {
            return self.level(rank, self.idx[d], self.idx[d]);
        }
        let mut here = Vec::new();
        // Only when the inner loops run: a load must stay in bounds.
        if !self.k.shape[d + 1..].contains(&0) {
            for j in 1..self.side_at {
                let a = self.accesses[j];
                let last = a.strides.iter().rposition(|&s| s != 0).unwrap_or(0);
                if a.buf != self.k.out.buf && last == d && self.hoisted[j].is_none() {
                    let v = self.load(j)?;
                    self.hoisted[j] = Some(v);
                    here.push(j);
                }
            }
        }
        let zero = self.b.ins().iconst(types::I64, 0);
        let n = self.b.ins().iconst(types::I64, self.k.shape[d + 1] as i64);
        self.level(d + 1, zero, n)?;
        for j in here {
            self.hoisted[j] = None;
        }
        Ok(())
    }

    /// The innermost, reduced level with vector accumulators: 16 points per iteration
    /// into four accumulators (four chains of adds: an add's latency is three or four
    /// cycles, so two chains left a row's sum bound by it), then 4 into the first, then
    /// a combine (`(a + b) + (c + d)`, then horizontally) and a scalar tail.
    fn reduce_inner(&mut self, d: usize, start: Value, end: Value) -> Result<()> {
        const ACCS: usize = 4;
        let (op, _) = self.reduce_start().expect("a reduction");
        let sacc = self.acc.expect("an accumulator");
        self.vaxis = Some(d);
        let id = self.f32c(interp::reduce_identity(op));
        let vs: Vec<Variable> = (0..ACCS).map(|_| self.b.declare_var(types::F32X4)).collect();
        for &v in &vs {
            self.b.def_var(v, id);
        }
        let va = vs[0];
        let (i1, a1) = self.emit_loop(d, start, end, ACCS as i64 * LANES, |g| {
            g.unrolled(ACCS, |g, n| {
                g.acc = Some(vs[n]);
                g.point()
            })
        })?;
        let x: Vec<Value> = vs.iter().map(|&v| self.b.use_var(v)).collect();
        let ab = self.combine(op, x[0], x[1]);
        let cd = self.combine(op, x[2], x[3]);
        let r = self.combine(op, ab, cd);
        self.b.def_var(va, r);
        let saved = std::mem::replace(&mut self.addrs, a1);
        let (i2, a2) = self.emit_loop(d, i1, end, LANES, |g| {
            g.acc = Some(va);
            g.point()
        })?;
        self.vaxis = None;
        self.acc = Some(sacc);
        let v = self.b.use_var(va);
        let l: Vec<Value> = (0..4u8).map(|l| self.b.ins().extractlane(v, l)).collect();
        let p = self.combine(op, l[0], l[1]);
        let q = self.combine(op, l[2], l[3]);
        let h = self.combine(op, p, q);
        let s = self.b.use_var(sacc);
        let s = self.combine(op, s, h);
        self.b.def_var(sacc, s);
        self.addrs = a2;
        self.emit_loop(d, i2, end, 1, |g| g.point())?;
        self.addrs = saved;
        Ok(())
    }

    /// One point (4 in vector code): evaluates the body and stores or accumulates it.
    fn point(&mut self) -> Result<()> {
        self.cache.iter_mut().for_each(|c| *c = None);
        let rank = self.k.shape.len();
        let v = self.expr(&self.k.body)?;
        match self.reduce_start() {
            Some((op, rs)) if rs == rank => {
                // Nothing reduced: every point combines with the identity.
                let id = self.f32c(interp::reduce_identity(op));
                let r = self.combine(op, id, v);
                self.store(r)?;
            }
            Some((op, _)) => {
                let var = self.acc.unwrap();
                let acc = self.b.use_var(var);
                let r = self.combine(op, acc, v);
                self.b.def_var(var, r);
            }
            None => {
                let side = self.k.side.iter().map(|s| self.expr(&s.value)).collect::<Result<Vec<Value>>>()?;
                for (i, x) in side.into_iter().enumerate() {
                    self.store_side(self.side_at + i, x);
                }
                self.store(v)?;
                self.fused_sums(v)?;
            }
        }
        Ok(())
    }

    /// Stores `x` through side-store access `j` (f32): one vector store when the lanes
    /// are consecutive elements, else lane by lane.
    fn store_side(&mut self, j: usize, x: Value) {
        let addr = self.addrs[j];
        match self.vaxis {
            Some(d) if self.accesses[j].strides[d] == 1 => {
                self.b.ins().store(vflags(), x, addr, self.lane_off as i32);
            }
            Some(d) => {
                let step = (self.accesses[j].strides[d] * 4) as i64;
                for l in 0..LANES as u8 {
                    let xl = self.b.ins().extractlane(x, l);
                    let off = (self.lane_off / 4 + l as i64) * step;
                    self.b.ins().store(MemFlagsData::trusted(), xl, addr, off as i32);
                }
            }
            None => {
                self.b.ins().store(MemFlagsData::trusted(), x, addr, 0);
            }
        }
    }

    /// Adds every fused sum's value at the current point (4 points in vector code, in
    /// lane order) into its chunk's partial sums; `v` is the value just stored.
    fn fused_sums(&mut self, v: Value) -> Result<()> {
        let k = self.k;
        if k.sums.is_empty() {
            return Ok(());
        }
        self.stored = Some(v);
        // Loads before the stores may be stale now (a side store in place).
        if !k.side.is_empty() {
            self.cache.iter_mut().for_each(|c| *c = None);
        }
        for (i, sum) in k.sums.iter().enumerate() {
            let x = self.expr(&sum.value)?;
            let addr = self.addrs[self.sums_at + i];
            match self.vaxis {
                Some(d) if sum.into.strides[d] == 1 => {
                    let off = self.lane_off as i32;
                    let old = self.b.ins().load(types::F32X4, vflags(), addr, off);
                    let new = self.b.ins().fadd(old, x);
                    self.b.ins().store(vflags(), new, addr, off);
                }
                Some(_) => {
                    let mut acc = self.b.ins().load(types::F32, MemFlagsData::trusted(), addr, 0);
                    for l in 0..LANES as u8 {
                        let xl = self.b.ins().extractlane(x, l);
                        acc = self.b.ins().fadd(acc, xl);
                    }
                    self.b.ins().store(MemFlagsData::trusted(), acc, addr, 0);
                }
                None => {
                    let old = self.b.ins().load(types::F32, MemFlagsData::trusted(), addr, 0);
                    let new = self.b.ins().fadd(old, x);
                    self.b.ins().store(MemFlagsData::trusted(), new, addr, 0);
                }
            }
        }
        self.stored = None;
        Ok(())
    }

    /// Stores `v` to the output at the current addresses (with `accumulate`, adds first).
    fn store(&mut self, v: Value) -> Result<()> {
        let addr = self.addrs[0];
        let vector = self.vaxis.is_some();
        let (fl, fty, ity) =
            if vector { (vflags(), types::F32X4, types::I32X4) } else { (MemFlagsData::trusted(), types::F32, types::I32) };
        let off = if vector { self.lane_off as i32 } else { 0 };
        match self.dtype(self.k.out.buf)? {
            DType::F32 => {
                let v = if self.k.accumulate {
                    let old = self.b.ins().load(fty, fl, addr, off);
                    self.b.ins().fadd(old, v)
                } else {
                    v
                };
                self.b.ins().store(fl, v, addr, off);
            }
            DType::I32 => {
                let v = if self.k.accumulate {
                    let old = self.b.ins().load(ity, fl, addr, off);
                    let old = self.b.ins().fcvt_from_sint(fty, old);
                    self.b.ins().fadd(old, v)
                } else {
                    v
                };
                let r = self.b.ins().nearest(v);
                let iv = self.b.ins().fcvt_to_sint_sat(ity, r);
                self.b.ins().store(fl, iv, addr, off);
            }
        }
        Ok(())
    }

    fn combine(&mut self, op: ReduceOp, acc: Value, v: Value) -> Value {
        match op {
            ReduceOp::Sum => self.b.ins().fadd(acc, v),
            ReduceOp::Max => self.b.ins().fmax(acc, v),
            ReduceOp::Min => self.b.ins().fmin(acc, v),
        }
    }

    /// Calls an interpreter function (lane by lane in vector code).
    fn call(&mut self, e: Ext, args: &[Value]) -> Value {
        let fr = match self.ext_refs.get(&e) {
            Some(&f) => f,
            None => {
                let f = self.module.declare_func_in_func(self.ext_ids[&e], self.b.func);
                self.ext_refs.insert(e, f);
                f
            }
        };
        if self.vaxis.is_none() {
            let call = self.b.ins().call(fr, args);
            return self.b.inst_results(call)[0];
        }
        let mut out: Option<Value> = None;
        for l in 0..LANES as u8 {
            let lane_args: Vec<Value> = args.iter().map(|&a| self.b.ins().extractlane(a, l)).collect();
            let call = self.b.ins().call(fr, &lane_args);
            let r = self.b.inst_results(call)[0];
            out = Some(match out {
                None => self.b.ins().splat(types::F32X4, r),
                Some(v) => self.b.ins().insertlane(v, r, l),
            });
        }
        out.expect("lanes")
    }

    /// An i32 constant (splatted in vector code).
    fn i32c(&mut self, x: i32) -> Value {
        let c = self.b.ins().iconst(types::I32, x as i64);
        if self.vaxis.is_some() { self.b.ins().splat(types::I32X4, c) } else { c }
    }

    fn ity(&self) -> Type {
        if self.vaxis.is_some() { types::I32X4 } else { types::I32 }
    }

    /// `2^n` for i32 `n` in -126..=127, as f32.
    fn pow2(&mut self, n: Value) -> Value {
        let bias = self.i32c(127);
        let e = self.b.ins().iadd(n, bias);
        let sh = self.b.ins().iconst(types::I32, 23);
        let bits = self.b.ins().ishl(e, sh);
        let ty = self.vty();
        self.b.ins().bitcast(ty, MemFlagsData::new(), bits)
    }

    /// `interp::bm_exp`, the same f32 operations inline.
    fn exp(&mut self, x: Value) -> Value {
        let lo = self.f32c(interp::EXP_LO);
        let hi = self.f32c(interp::EXP_HI);
        let c = self.b.ins().fcmp(FloatCC::LessThan, x, lo);
        let x = self.pick(c, lo, x);
        let c = self.b.ins().fcmp(FloatCC::GreaterThan, x, hi);
        let x = self.pick(c, hi, x);
        let l2e = self.f32c(interp::EXP_LOG2E);
        let t = self.b.ins().fmul(x, l2e);
        // round_ties_even(t) and its integer in three instructions instead of a round and
        // a saturating conversion: |t| < 2^22 after the clamp, so adding 1.5·2^23 leaves
        // the rounded integer in the low mantissa bits (the same value; a NaN `t` makes
        // `y` NaN either way).
        let magic = self.f32c(interp::ROUND_MAGIC);
        let tm = self.b.ins().fadd(t, magic);
        let n = self.b.ins().fsub(tm, magic);
        let c1 = self.f32c(interp::EXP_C1);
        let c2 = self.f32c(interp::EXP_C2);
        let nc1 = self.b.ins().fmul(n, c1);
        let r = self.b.ins().fsub(x, nc1);
        let nc2 = self.b.ins().fmul(n, c2);
        let r = self.b.ins().fsub(r, nc2);
        let mut p = self.f32c(interp::EXP_P[0]);
        for c in &interp::EXP_P[1..] {
            let pr = self.b.ins().fmul(p, r);
            let c = self.f32c(*c);
            p = self.b.ins().fadd(pr, c);
        }
        let r2 = self.b.ins().fmul(r, r);
        let y = self.b.ins().fmul(p, r2);
        let y = self.b.ins().fadd(y, r);
        let one = self.f32c(1.0);
        let y = self.b.ins().fadd(y, one);
        let ity = self.ity();
        let tmi = self.b.ins().bitcast(ity, MemFlagsData::new(), tm);
        let mi = self.b.ins().bitcast(ity, MemFlagsData::new(), magic);
        let ni = self.b.ins().isub(tmi, mi);
        let sh = self.b.ins().iconst(types::I32, 1);
        let n1 = self.b.ins().sshr(ni, sh);
        let n2 = self.b.ins().isub(ni, n1);
        let s1 = self.pow2(n1);
        let s2 = self.pow2(n2);
        let y = self.b.ins().fmul(y, s1);
        self.b.ins().fmul(y, s2)
    }

    /// `interp::bm_tanh`, the same f32 operations inline.
    fn tanh(&mut self, x: Value) -> Value {
        let a = self.b.ins().fabs(x);
        let z = self.b.ins().fmul(a, a);
        let mut p = self.f32c(interp::TANH_P[0]);
        for c in &interp::TANH_P[1..] {
            let pz = self.b.ins().fmul(p, z);
            let c = self.f32c(*c);
            p = self.b.ins().fadd(pz, c);
        }
        let pz = self.b.ins().fmul(p, z);
        let pza = self.b.ins().fmul(pz, a);
        let small = self.b.ins().fadd(pza, a);
        let a2 = self.b.ins().fadd(a, a);
        let e = self.exp(a2);
        let one = self.f32c(1.0);
        let two = self.f32c(2.0);
        let e1 = self.b.ins().fadd(e, one);
        let q = self.b.ins().fdiv(two, e1);
        let large = self.b.ins().fsub(one, q);
        let lim = self.f32c(interp::TANH_SMALL);
        let c = self.b.ins().fcmp(FloatCC::LessThan, a, lim);
        let t = self.pick(c, small, large);
        // copysign(t, x)
        let ity = self.ity();
        let tb = self.b.ins().bitcast(ity, MemFlagsData::new(), t);
        let xb = self.b.ins().bitcast(ity, MemFlagsData::new(), x);
        let mag = self.i32c(i32::MAX);
        let sign = self.i32c(i32::MIN);
        let tb = self.b.ins().band(tb, mag);
        let xb = self.b.ins().band(xb, sign);
        let r = self.b.ins().bor(tb, xb);
        let ty = self.vty();
        self.b.ins().bitcast(ty, MemFlagsData::new(), r)
    }

    /// `exp(-(s + s)) + 1` for GELU's `s = (x + x3·C)·K`: `1 / σ(2s)`, in
    /// `interp::gelu_tanh`'s order.
    fn gelu_denominator(&mut self, x: Value, x3: Value) -> Value {
        let c = self.f32c(interp::GELU_C);
        let x3c = self.b.ins().fmul(x3, c);
        let s = self.b.ins().fadd(x, x3c);
        let k = self.f32c(interp::GELU_K);
        let s = self.b.ins().fmul(s, k);
        let s2 = self.b.ins().fadd(s, s);
        let ns2 = self.b.ins().fneg(s2);
        let e = self.exp(ns2);
        let one = self.f32c(1.0);
        self.b.ins().fadd(e, one)
    }

    /// 1.0 where the comparison `c` holds, else 0.0.
    fn bool_f(&mut self, c: Value) -> Value {
        let one = self.f32c(1.0);
        let zero = self.f32c(0.0);
        self.pick(c, one, zero)
    }

    /// `c ? x : y` for a comparison result `c` (a lane mask in vector code).
    fn pick(&mut self, c: Value, x: Value, y: Value) -> Value {
        if self.vaxis.is_some() {
            let m = self.b.ins().bitcast(types::F32X4, MemFlagsData::new(), c);
            self.b.ins().bitselect(m, x, y)
        } else {
            self.b.ins().select(c, x, y)
        }
    }

    /// Loads access `j` at the current point (a vector of 4 lanes in vector code).
    fn load(&mut self, j: usize) -> Result<Value> {
        let a = self.accesses[j];
        let addr = self.addrs[j];
        let dt = self.dtype(a.buf)?;
        Ok(match self.vaxis {
            Some(v) if a.strides[v] == 1 => {
                let off = self.lane_off as i32;
                match dt {
                    DType::F32 => self.b.ins().load(types::F32X4, vflags(), addr, off),
                    DType::I32 => {
                        let x = self.b.ins().load(types::I32X4, vflags(), addr, off);
                        self.b.ins().fcvt_from_sint(types::F32X4, x)
                    }
                }
            }
            _ => {
                let x = match dt {
                    DType::F32 => self.b.ins().load(types::F32, MemFlagsData::trusted(), addr, 0),
                    DType::I32 => {
                        let v = self.b.ins().load(types::I32, MemFlagsData::trusted(), addr, 0);
                        self.b.ins().fcvt_from_sint(types::F32, v)
                    }
                };
                self.widen(x)
            }
        })
    }

    fn expr(&mut self, e: &ScalarExpr) -> Result<Value> {
        Ok(match e {
            ScalarExpr::Load(a) => {
                let j = self.accesses.iter().position(|x| *x == a).expect("collected");
                if j == 0
                    && let Some(v) = self.stored
                {
                    v
                } else if let Some(v) = self.hoisted[j] {
                    self.widen(v)
                } else if let Some(v) = self.cache[j] {
                    v
                } else {
                    let v = self.load(j)?;
                    self.cache[j] = Some(v);
                    v
                }
            }
            ScalarExpr::Const(c) => self.f32c(*c),
            ScalarExpr::Index(n) => {
                let i = *self.idx.get(*n).ok_or_else(|| Error::internal(format!("JIT: index i{n} out of rank")))?;
                if self.vaxis == Some(*n) {
                    let i = self.b.ins().iadd_imm_s(i, self.lane_off / 4);
                    let i = self.b.ins().ireduce(types::I32, i);
                    let s = self.b.ins().splat(types::I32X4, i);
                    let bytes: Vec<u8> = [0i32, 1, 2, 3].iter().flat_map(|x| x.to_le_bytes()).collect();
                    let c = self.b.func.dfg.constants.insert(bytes.into());
                    let lanes = self.b.ins().vconst(types::I32X4, c);
                    let v = self.b.ins().iadd(s, lanes);
                    self.b.ins().fcvt_from_sint(types::F32X4, v)
                } else {
                    let f = self.b.ins().fcvt_from_sint(types::F32, i);
                    self.widen(f)
                }
            }
            ScalarExpr::Unary(op, a) => {
                if let Some(v) = self.row_value(*op, a) {
                    return Ok(v);
                }
                let x = self.expr(a)?;
                match op {
                    UnaryOp::Neg => self.b.ins().fneg(x),
                    UnaryOp::Exp => self.exp(x),
                    UnaryOp::Log => self.call(Ext::Log, &[x]),
                    UnaryOp::Sqrt => self.b.ins().sqrt(x),
                    UnaryOp::Rsqrt => {
                        let s = self.b.ins().sqrt(x);
                        let one = self.f32c(1.0);
                        self.b.ins().fdiv(one, s)
                    }
                    UnaryOp::Abs => self.b.ins().fabs(x),
                    UnaryOp::Tanh => self.tanh(x),
                    UnaryOp::Sigmoid => self.call(Ext::Sigmoid, &[x]),
                    UnaryOp::Relu => {
                        let zero = self.f32c(0.0);
                        self.b.ins().fmax(x, zero)
                    }
                    UnaryOp::Sin => self.call(Ext::Sin, &[x]),
                    UnaryOp::Cos => self.call(Ext::Cos, &[x]),
                    UnaryOp::Erf => self.call(Ext::Erf, &[x]),
                    UnaryOp::Recip => {
                        let one = self.f32c(1.0);
                        self.b.ins().fdiv(one, x)
                    }
                    UnaryOp::Square => self.b.ins().fmul(x, x),
                    UnaryOp::Floor => self.b.ins().floor(x),
                    UnaryOp::GeluTanh => {
                        // interp::gelu_tanh's operations, in its order.
                        let x2 = self.b.ins().fmul(x, x);
                        let x3 = self.b.ins().fmul(x2, x);
                        let sig_den = self.gelu_denominator(x, x3);
                        self.b.ins().fdiv(x, sig_den)
                    }
                    UnaryOp::GeluTanhGrad => {
                        // interp::gelu_tanh_grad's operations, in its order.
                        let lim = self.f32c(interp::GELU_GRAD_LIMIT);
                        let nlim = self.f32c(-interp::GELU_GRAD_LIMIT);
                        let c = self.b.ins().fcmp(FloatCC::LessThan, x, nlim);
                        let x = self.pick(c, nlim, x);
                        let c = self.b.ins().fcmp(FloatCC::GreaterThan, x, lim);
                        let x = self.pick(c, lim, x);
                        let x2 = self.b.ins().fmul(x, x);
                        let x3 = self.b.ins().fmul(x2, x);
                        let den = self.gelu_denominator(x, x3);
                        let one = self.f32c(1.0);
                        let sig = self.b.ins().fdiv(one, den);
                        let c3 = self.f32c(interp::GELU_C3);
                        let ds = self.b.ins().fmul(x2, c3);
                        let ds = self.b.ins().fadd(ds, one);
                        let k2 = self.f32c(interp::GELU_K2);
                        let ds = self.b.ins().fmul(ds, k2);
                        let xds = self.b.ins().fmul(x, ds);
                        let rest = self.b.ins().fsub(one, sig);
                        let spread = self.b.ins().fmul(sig, rest);
                        let r = self.b.ins().fmul(xds, spread);
                        self.b.ins().fadd(sig, r)
                    }
                    UnaryOp::Step => {
                        let zero = self.f32c(0.0);
                        let c = self.b.ins().fcmp(FloatCC::GreaterThan, x, zero);
                        self.bool_f(c)
                    }
                }
            }
            ScalarExpr::Binary(op, a, b) => {
                let x = self.expr(a)?;
                let y = self.expr(b)?;
                let cmp = |cc| Some(cc);
                let cc = match op {
                    BinaryOp::Lt => cmp(FloatCC::LessThan),
                    BinaryOp::Le => cmp(FloatCC::LessThanOrEqual),
                    BinaryOp::Gt => cmp(FloatCC::GreaterThan),
                    BinaryOp::Ge => cmp(FloatCC::GreaterThanOrEqual),
                    BinaryOp::Eq => cmp(FloatCC::Equal),
                    BinaryOp::Ne => cmp(FloatCC::NotEqual),
                    _ => None,
                };
                if let Some(cc) = cc {
                    let c = self.b.ins().fcmp(cc, x, y);
                    self.bool_f(c)
                } else {
                    match op {
                        BinaryOp::Add => self.b.ins().fadd(x, y),
                        BinaryOp::Sub => self.b.ins().fsub(x, y),
                        BinaryOp::Mul => self.b.ins().fmul(x, y),
                        BinaryOp::Div => self.b.ins().fdiv(x, y),
                        BinaryOp::Max => self.b.ins().fmax(x, y),
                        BinaryOp::Min => self.b.ins().fmin(x, y),
                        BinaryOp::Pow => self.call(Ext::Pow, &[x, y]),
                        _ => unreachable!("comparisons handled above"),
                    }
                }
            }
            ScalarExpr::Select(c, a, b) => {
                let c = self.expr(c)?;
                let x = self.expr(a)?;
                let y = self.expr(b)?;
                let zero = self.f32c(0.0);
                let cond = self.b.ins().fcmp(FloatCC::NotEqual, c, zero);
                self.pick(cond, x, y)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::test_support::*;
    use crate::kir::Buffer;
    use proptest::prelude::{ProptestConfig, any, proptest};

    const UNARY: [UnaryOp; 18] = [
        UnaryOp::Neg,
        UnaryOp::Exp,
        UnaryOp::Log,
        UnaryOp::Sqrt,
        UnaryOp::Rsqrt,
        UnaryOp::Abs,
        UnaryOp::Tanh,
        UnaryOp::Sigmoid,
        UnaryOp::Relu,
        UnaryOp::Sin,
        UnaryOp::Cos,
        UnaryOp::Erf,
        UnaryOp::Recip,
        UnaryOp::Square,
        UnaryOp::Step,
        UnaryOp::Floor,
        UnaryOp::GeluTanh,
        UnaryOp::GeluTanhGrad,
    ];
    const BINARY: [BinaryOp; 13] = [
        BinaryOp::Add,
        BinaryOp::Sub,
        BinaryOp::Mul,
        BinaryOp::Div,
        BinaryOp::Max,
        BinaryOp::Min,
        BinaryOp::Pow,
        BinaryOp::Lt,
        BinaryOp::Le,
        BinaryOp::Gt,
        BinaryOp::Ge,
        BinaryOp::Eq,
        BinaryOp::Ne,
    ];
    const REDUCE: [ReduceOp; 3] = [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Min];

    fn lp(shape: &[usize], reduce: Option<(ReduceOp, usize)>, body: ScalarExpr, out: Access, accumulate: bool) -> Kernel {
        Kernel::Loop(LoopKernel {
            shape: shape.to_vec(),
            reduce: reduce.map(|r| r.0),
            reduced_dims: reduce.map_or(0, |r| r.1),
            body,
            out,
            accumulate,
            side: vec![],
            sums: vec![],
        })
    }

    /// Tolerance of `Sum` reductions (relative to the sum of the absolute values of
    /// their terms): the JIT sums contiguous rows in vector lanes, in another order.
    const SUM_REL: f32 = 1e-5;

    /// Like `check_jit`, but the outputs of `Sum` reductions only need to agree within
    /// `rel` times the sum of the absolute values of their terms (plus the result);
    /// every other buffer stays bit for bit.
    fn check_jit_sums(p: &Program, seed: u64, threads: usize, special: bool, rel: f32) -> crate::exec::Buffers {
        let ctx = p.to_text();
        let run = |p: &Program, jit: bool| {
            let mut e = if jit { crate::exec::Executor::new(p, threads) } else { crate::exec::Executor::interpreted(p) }
                .unwrap_or_else(|e| panic!("{e}\n{ctx}"));
            fill(e.buffers_mut(), seed, special);
            e.run("main").unwrap();
            e.buffers().clone()
        };
        let (a, b) = (run(p, false), run(p, true));
        let mut absp = p.clone();
        let mut sums = Vec::new();
        for k in &mut absp.kernels {
            if let Kernel::Loop(l) = k
                && l.reduce == Some(ReduceOp::Sum)
            {
                l.body = un(UnaryOp::Abs, l.body.clone());
                l.accumulate = false;
                sums.push(l.out.buf);
            }
        }
        let c = run(&absp, false);
        for id in 0..a.len() {
            let (x, y, m) = (a.get(id).unwrap(), b.get(id).unwrap(), c.get(id).unwrap());
            let sum = sums.contains(&id);
            for i in 0..x.len() {
                let (p, q, bound) = (x.get_f32(i), y.get_f32(i), m.get_f32(i));
                let ok = if x.dtype() == DType::I32 {
                    let (p, q) = (x.as_i32().unwrap()[i] as i64, y.as_i32().unwrap()[i] as i64);
                    p == q || (sum && ((p - q).abs() <= 1 || !bound.is_finite()))
                } else {
                    same_f32(p, q) || (sum && (!bound.is_finite() || (p - q).abs() <= rel * (bound + p.abs())))
                };
                assert!(ok, "{ctx}: b{id}[{i}]: {p:e} vs {q:e} (sum of |terms| {bound:e})");
            }
        }
        a
    }

    /// Strides for `shape` that lay it out contiguously in a random axis order, with
    /// random gaps (a strided sub-view) and, when `zeros`, some broadcast axes.
    fn layout(r: &mut Rng, shape: &[usize], zeros: bool) -> Vec<usize> {
        let mut order: Vec<usize> = (0..shape.len()).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, r.below(i + 1));
        }
        let mut strides = vec![0; shape.len()];
        let mut acc = 1 + r.below(2);
        for &d in &order {
            if zeros && r.chance(1, 4) {
                continue;
            }
            strides[d] = acc;
            acc *= shape[d].max(1);
            acc += r.below(2);
        }
        strides
    }

    fn need(a: &Access, shape: &[usize]) -> usize {
        a.offset + shape.iter().zip(&a.strides).map(|(n, s)| n.saturating_sub(1) * s).sum::<usize>() + 1
    }

    struct Gen {
        r: Rng,
        shape: Vec<usize>,
        nin: usize,
        lens: Vec<usize>,
    }

    impl Gen {
        fn access(&mut self) -> Access {
            let buf = self.r.below(self.nin);
            let a = Access { buf, offset: self.r.below(3), strides: layout(&mut self.r, &self.shape.clone(), true) };
            self.lens[buf] = self.lens[buf].max(need(&a, &self.shape));
            a
        }
        fn expr(&mut self, depth: usize) -> ScalarExpr {
            let leaf = depth == 0 || self.r.chance(1, 4);
            if leaf {
                match self.r.below(6) {
                    0 if !self.shape.is_empty() => ScalarExpr::Index(self.r.below(self.shape.len())),
                    1 => ScalarExpr::Const([0.0, 1.0, -1.5, 0.5, 2.0, -0.0, f32::INFINITY, f32::NAN][self.r.below(8)]),
                    _ => ScalarExpr::Load(self.access()),
                }
            } else {
                match self.r.below(7) {
                    0..=2 => un(UNARY[self.r.below(UNARY.len())], self.expr(depth - 1)),
                    3..=5 => {
                        let a = self.expr(depth - 1);
                        bin(BINARY[self.r.below(BINARY.len())], a, self.expr(depth - 1))
                    }
                    _ => {
                        let c = self.expr(depth - 1);
                        let a = self.expr(depth - 1);
                        ScalarExpr::Select(Box::new(c), Box::new(a), Box::new(self.expr(depth - 1)))
                    }
                }
            }
        }
    }

    /// A random loop kernel program: inputs b0.., output the last buffer (sometimes i32,
    /// sometimes the same as an input read in place).
    fn random_program(seed: u64) -> Program {
        let mut r = Rng::new(seed);
        let rank = r.below(5);
        let shape: Vec<usize> = (0..rank).map(|_| if r.chance(1, 30) { 0 } else { 1 + r.below(5) }).collect();
        let nin = 1 + r.below(3);
        let mut g = Gen { r, shape: shape.clone(), nin, lens: vec![1; nin] };
        let reduce = if g.r.chance(1, 2) { Some((REDUCE[g.r.below(3)], g.r.below(rank + 1))) } else { None };
        let depth = 1 + g.r.below(4);
        let body = g.expr(depth);
        let nred = reduce.map_or(0, |r| r.1);
        let keep = rank - nred;
        let zeros = g.r.chance(1, 8);
        let mut strides = layout(&mut g.r, &shape[..keep], zeros);
        strides.resize(rank, 0);
        let inplace = reduce.is_none() && g.r.chance(1, 5);
        let out_buf = if inplace { 0 } else { nin };
        let out = Access { buf: out_buf, offset: g.r.below(3), strides };
        let out_len = need(&out, &shape);
        let mut body = body;
        if inplace {
            g.lens[0] = g.lens[0].max(out_len);
            body = bin(BinaryOp::Add, body, ScalarExpr::Load(out.clone()));
        }
        let mut buffers: Vec<Buffer> =
            (0..nin).map(|i| buf(&format!("in{i}"), if g.r.chance(1, 5) { DType::I32 } else { DType::F32 }, g.lens[i])).collect();
        let odt = if g.r.chance(1, 6) { DType::I32 } else { DType::F32 };
        if !inplace {
            buffers.push(buf("out", odt, out_len));
        }
        let accumulate = g.r.chance(1, 3);
        program(buffers, vec![lp(&shape, reduce, body, out, accumulate)])
    }

    #[test]
    fn random_programs_fixed_seeds() {
        for seed in 0..400 {
            let p = random_program(seed);
            check_jit_sums(&p, seed ^ 0xABCD, 1, seed % 3 == 0, SUM_REL);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn random_programs_match_interpreter(seed in any::<u64>(), special in any::<bool>()) {
            let p = random_program(seed);
            check_jit_sums(&p, seed.rotate_left(17), 2, special, SUM_REL);
        }
    }

    /// A random elementwise kernel hosting one to three fused sums over random axes
    /// (some reading the value just stored), in random layouts; `big` makes it large
    /// enough to run its chunks in parallel.
    fn random_sum_program(seed: u64, big: bool) -> Program {
        let mut r = Rng::new(seed);
        let rank = 1 + r.below(4);
        let shape: Vec<usize> = if big { vec![40 + r.below(30), 33, 8 + r.below(40)] } else { (0..rank).map(|_| 1 + r.below(9)).collect() };
        let rank = shape.len();
        let nin = 1 + r.below(2);
        let mut g = Gen { r, shape: shape.clone(), nin, lens: vec![1; nin] };
        let depth = 1 + g.r.below(3);
        let body = g.expr(depth);
        let out = Access { buf: nin, offset: g.r.below(3), strides: layout(&mut g.r, &shape, false) };
        let mut buffers: Vec<Buffer> = vec![];
        let nsums = 1 + g.r.below(3);
        let mut sums = vec![];
        for i in 0..nsums {
            let kept: Vec<usize> = (0..rank).filter(|_| g.r.chance(1, 2)).collect();
            let sub: Vec<usize> = kept.iter().map(|&d| shape[d]).collect();
            let ks = layout(&mut g.r, &sub, false);
            let mut strides = vec![0; rank];
            for (j, &d) in kept.iter().enumerate() {
                strides[d] = ks[j];
            }
            let into = Access { buf: nin + 1 + i, offset: g.r.below(3), strides };
            let stored = ScalarExpr::Load(out.clone());
            let value = match g.r.below(3) {
                0 => stored,
                1 => bin(BinaryOp::Mul, stored, g.expr(2)),
                _ => g.expr(2),
            };
            sums.push(FusedSum { value, into, accumulate: g.r.chance(1, 2) });
        }
        for i in 0..nin {
            buffers.push(buf(&format!("in{i}"), if g.r.chance(1, 5) { DType::I32 } else { DType::F32 }, g.lens[i]));
        }
        buffers.push(buf("out", DType::F32, need(&out, &shape)));
        for (i, s) in sums.iter().enumerate() {
            buffers.push(buf(&format!("sum{i}"), DType::F32, need(&s.into, &shape)));
        }
        let Kernel::Loop(mut k) = lp(&shape, None, body, out, false) else { unreachable!() };
        k.sums = sums;
        program(buffers, vec![Kernel::Loop(k)])
    }

    /// `random_sum_program`'s kernel with one or two side stores as well: into fresh
    /// buffers in random layouts, some updated in place (read at the point written by
    /// the body, their own value and the others).
    fn random_side_program(seed: u64, big: bool) -> Program {
        let mut p = random_sum_program(seed, big);
        let mut r = Rng::new(seed ^ 0x51DE);
        let Kernel::Loop(k) = &mut p.kernels[0] else { unreachable!() };
        if r.chance(1, 3) {
            k.sums.clear();
        }
        let shape = k.shape.clone();
        for _ in 0..1 + r.below(2) {
            let b = p.buffers.len();
            let into = Access { buf: b, offset: r.below(3), strides: layout(&mut r, &shape, false) };
            p.buffers.push(buf(&format!("side{b}"), DType::F32, need(&into, &shape)));
            let old = ScalarExpr::Load(into.clone());
            let in_place = r.chance(1, 2);
            let value = if in_place {
                bin(BinaryOp::Add, bin(BinaryOp::Mul, old.clone(), ScalarExpr::Const(0.9)), k.body.clone())
            } else {
                un(UnaryOp::Exp, k.body.clone())
            };
            if in_place && r.chance(1, 2) {
                k.body = bin(BinaryOp::Sub, k.body.clone(), old.clone());
            }
            if r.chance(1, 3) {
                k.sums.push(FusedSum {
                    value: bin(BinaryOp::Mul, old, ScalarExpr::Const(2.0)),
                    into: Access { buf: b + 100, ..into.clone() },
                    accumulate: false,
                });
            }
            k.side.push(SideStore { value, into });
        }
        // Fused sums' buffers after the side stores' (renumbered from the placeholder).
        let mut sums = std::mem::take(&mut k.sums);
        for s in sums.iter_mut() {
            if s.into.buf >= 100 {
                let b = p.buffers.len();
                let strides: Vec<usize> = s.into.strides.iter().enumerate().map(|(d, &st)| if d == 0 { 0 } else { st }).collect();
                s.into = Access { buf: b, offset: 0, strides };
                p.buffers.push(buf(&format!("sum{b}"), DType::F32, need(&s.into, &shape)));
            }
        }
        let Kernel::Loop(k) = &mut p.kernels[0] else { unreachable!() };
        k.sums = sums;
        p
    }

    /// Transcendentals computed a row at a time (`crate::rows`, 8 lanes with AVX2) give
    /// the interpreter's results bit for bit: in the body, a side store and a fused sum,
    /// with a vector tail, next to a transposed operand computed inline.
    #[test]
    fn row_functions_match_the_interpreter_bit_for_bit() {
        let (r, n) = (5usize, 37usize);
        for op in [UnaryOp::Exp, UnaryOp::GeluTanh, UnaryOp::GeluTanhGrad] {
            let x = load(0, 0, &[n, 1]);
            let xt = load(0, 0, &[1, r]);
            let body = bin(BinaryOp::Add, bin(BinaryOp::Mul, load(1, 0, &[n, 1]), un(op, x.clone())), un(op, xt));
            let Kernel::Loop(mut k) = lp(&[r, n], None, body, Access { buf: 2, offset: 0, strides: vec![n, 1] }, false) else {
                unreachable!()
            };
            k.side = vec![SideStore { value: un(op, x.clone()), into: Access { buf: 3, offset: 0, strides: vec![n, 1] } }];
            k.sums = vec![FusedSum { value: un(op, x), into: Access { buf: 4, offset: 0, strides: vec![0, 1] }, accumulate: false }];
            let len = r * n;
            let p = program(
                vec![
                    buf("x", DType::F32, len),
                    buf("y", DType::F32, len),
                    buf("o", DType::F32, len),
                    buf("s", DType::F32, len),
                    buf("c", DType::F32, n),
                ],
                vec![Kernel::Loop(k)],
            );
            for (seed, special) in [(1, false), (2, true), (3, true)] {
                check_jit(&p, seed, 1, special, 0.0);
            }
            // Without the transposed operand the kernel runs in vector lanes.
            let mut v = p.clone();
            let Kernel::Loop(k) = &mut v.kernels[0] else { unreachable!() };
            let ScalarExpr::Binary(_, a, _) = k.body.clone() else { unreachable!() };
            k.body = *a;
            assert!(matches!(vec_plan(k, &[&Access { buf: 0, offset: 0, strides: vec![n, 1] }]), VecPlan::Lanes(1)));
            for (seed, special) in [(4, false), (5, true)] {
                check_jit(&v, seed, 1, special, 0.0);
            }
        }
    }

    /// A row function of a computed operand (GELU of `x + bias`, its operand also stored
    /// on the side, as the MLP's forward kernel does) is evaluated over the row first and
    /// then called, with the interpreter's results bit for bit, in vector and scalar code,
    /// with a tail, and in place. Operands that read what the kernel writes through
    /// another view stay inline.
    #[test]
    fn row_functions_of_computed_operands() {
        let (r, n) = (6usize, MIN_COMPUTED_ROW + 11);
        for op in [UnaryOp::Exp, UnaryOp::GeluTanh, UnaryOp::GeluTanhGrad] {
            let pre = bin(BinaryOp::Add, load(0, 0, &[n, 1]), load(1, 0, &[0, 1]));
            // (transposed, output in place, side store in place: `x = x + b` beside
            // `o = gelu(x + b)`, as the MLP's forward kernel stores its pre-activation).
            for (transposed, in_place, side_in_place) in
                [(false, false, false), (true, false, false), (false, true, false), (false, false, true)]
            {
                // A transposed load elsewhere in the body makes the kernel scalar.
                let other = if transposed { load(0, 0, &[1, r]) } else { ScalarExpr::Const(0.5) };
                let body = bin(BinaryOp::Mul, un(op, pre.clone()), other);
                let out = Access { buf: if in_place { 0 } else { 2 }, offset: 0, strides: vec![n, 1] };
                let Kernel::Loop(mut k) = lp(&[r, n], None, body, out, false) else { unreachable!() };
                let side = Access { buf: if side_in_place { 0 } else { 3 }, offset: 0, strides: vec![n, 1] };
                k.side = vec![SideStore { value: pre.clone(), into: side }];
                let len = r * n;
                let p = program(
                    vec![buf("x", DType::F32, len), buf("b", DType::F32, n), buf("o", DType::F32, len), buf("s", DType::F32, len)],
                    vec![Kernel::Loop(k)],
                );
                if !transposed {
                    let clif = clif_text(&p).unwrap();
                    assert!(clif.contains("call fn"), "no row call:\n{clif}");
                }
                for (seed, special) in [(1, false), (2, true)] {
                    check_jit(&p, seed, 2, special, 0.0);
                }
            }
            // Reading the output through another view (the next point's element): inline,
            // still exact.
            let shifted = bin(BinaryOp::Add, load(2, 1, &[n, 1]), load(1, 0, &[0, 1]));
            let Kernel::Loop(k) = lp(&[r, n - 1], None, un(op, shifted), Access { buf: 2, offset: 0, strides: vec![n, 1] }, false) else {
                unreachable!()
            };
            let p = program(vec![buf("o", DType::F32, r * n), buf("b", DType::F32, n), buf("o", DType::F32, r * n)], vec![Kernel::Loop(k)]);
            assert!(!clif_text(&p).unwrap().contains("call fn"));
            check_jit(&p, 3, 1, false, 0.0);
        }
    }

    /// Side stores (some in place) equal the interpreter bit for bit.
    #[test]
    fn side_stores_match_the_interpreter_bit_for_bit() {
        for seed in 0..300 {
            let p = random_side_program(seed, false);
            check_jit(&p, seed ^ 0x77, 1 + (seed % 3) as usize, seed % 4 == 0, 0.0);
        }
        for seed in 0..8 {
            let p = random_side_program(seed, true);
            for threads in [1, 2] {
                check_jit(&p, seed, threads, false, 0.0);
            }
        }
    }

    /// The JIT computes fused sums exactly as the interpreter does (the same chunks,
    /// the same order), with any thread count and vector plan.
    #[test]
    fn fused_sums_match_the_interpreter_bit_for_bit() {
        for seed in 0..300 {
            let p = random_sum_program(seed, false);
            check_jit(&p, seed ^ 0x5157, 1 + (seed % 3) as usize, seed % 4 == 0, 0.0);
        }
        for seed in 0..12 {
            let p = random_sum_program(seed, true);
            for threads in [1, 2, 3] {
                check_jit(&p, seed, threads, false, 0.0);
            }
        }
    }

    /// A fused sum gives what `LoopKernel::sum_kernel` (the unfused reduction a backend
    /// without fused sums runs) gives: exactly, on integer data, whatever the order.
    #[test]
    fn fused_sums_equal_their_separate_reductions() {
        let shape = [6usize, 5, 7];
        let x = Access { buf: 0, offset: 0, strides: vec![35, 7, 1] };
        let out = Access { buf: 1, offset: 0, strides: vec![1, 6, 30] };
        let body = bin(BinaryOp::Mul, ScalarExpr::Load(x.clone()), ScalarExpr::Const(3.0));
        let sums = vec![
            FusedSum {
                value: ScalarExpr::Load(out.clone()),
                into: Access { buf: 2, offset: 0, strides: vec![0, 0, 1] },
                accumulate: false,
            },
            FusedSum {
                value: bin(BinaryOp::Mul, ScalarExpr::Load(out.clone()), ScalarExpr::Load(x.clone())),
                into: Access { buf: 3, offset: 1, strides: vec![5, 1, 0] },
                accumulate: true,
            },
            FusedSum { value: ScalarExpr::Index(1), into: Access { buf: 4, offset: 0, strides: vec![0, 0, 0] }, accumulate: false },
        ];
        let Kernel::Loop(mut host) = lp(&shape, None, body, out, false) else { unreachable!() };
        host.sums = sums;
        let bufs = vec![
            buf("x", DType::F32, 210),
            buf("y", DType::F32, 210),
            buf("a", DType::F32, 7),
            buf("b", DType::F32, 31),
            buf("c", DType::F32, 1),
        ];
        let fused = program(bufs.clone(), vec![Kernel::Loop(host.clone())]);
        let mut split = vec![Kernel::Loop(LoopKernel { sums: vec![], ..host.clone() })];
        split.extend(host.sums.iter().map(|s| Kernel::Loop(host.sum_kernel(s))));
        let split = program(bufs, split);
        let run = |p: &Program, threads: usize| {
            let mut e = crate::exec::Executor::new(p, threads).unwrap();
            for (i, v) in e.buffers_mut().f32_mut(0).unwrap().iter_mut().enumerate() {
                *v = (i % 7) as f32 - 3.0;
            }
            e.buffers_mut().f32_mut(3).unwrap().fill(2.0);
            e.run("main").unwrap();
            e.buffers().clone()
        };
        let want = run(&split, 1);
        for threads in [1, 2] {
            let got = run(&fused, threads);
            for b in 1..5 {
                assert_eq!(got.f32(b).unwrap(), want.f32(b).unwrap(), "b{b}");
            }
        }
        assert_eq!(want.f32(4).unwrap()[0], (6 * 7 * (1 + 2 + 3 + 4)) as f32);
    }

    #[test]
    fn every_unary_and_binary_op() {
        let n = 64;
        let bufs = vec![buf("x", DType::F32, n), buf("y", DType::F32, n), buf("o", DType::F32, n)];
        for op in UNARY {
            let p = program(
                bufs.clone(),
                vec![lp(&[n], None, un(op, load(0, 0, &[1])), Access { buf: 2, offset: 0, strides: vec![1] }, false)],
            );
            check_jit(&p, 1, 1, true, 0.0);
            check_jit(&p, 2, 1, false, 0.0);
        }
        for op in BINARY {
            let body = bin(op, load(0, 0, &[1]), load(1, 0, &[1]));
            let p = program(bufs.clone(), vec![lp(&[n], None, body, Access { buf: 2, offset: 0, strides: vec![1] }, false)]);
            check_jit(&p, 3, 1, true, 0.0);
            check_jit(&p, 4, 1, false, 0.0);
            // equal operands matter for comparisons, max/min and -0/+0
            let body = bin(op, load(0, 0, &[1]), un(UnaryOp::Neg, un(UnaryOp::Neg, load(0, 0, &[1]))));
            let p = program(bufs.clone(), vec![lp(&[n], None, body, Access { buf: 2, offset: 0, strides: vec![1] }, false)]);
            check_jit(&p, 5, 1, true, 0.0);
        }
    }

    #[test]
    fn max_min_relu_nan_and_signed_zero() {
        let p = program(
            vec![
                buf("x", DType::F32, 6),
                buf("y", DType::F32, 6),
                buf("o", DType::F32, 6),
                buf("p", DType::F32, 6),
                buf("r", DType::F32, 6),
            ],
            vec![
                lp(
                    &[6],
                    None,
                    bin(BinaryOp::Max, load(0, 0, &[1]), load(1, 0, &[1])),
                    Access { buf: 2, offset: 0, strides: vec![1] },
                    false,
                ),
                lp(
                    &[6],
                    None,
                    bin(BinaryOp::Min, load(0, 0, &[1]), load(1, 0, &[1])),
                    Access { buf: 3, offset: 0, strides: vec![1] },
                    false,
                ),
                lp(&[6], None, un(UnaryOp::Relu, load(0, 0, &[1])), Access { buf: 4, offset: 0, strides: vec![1] }, false),
            ],
        );
        let x = [f32::NAN, 1.0, -0.0, 0.0, 3.0, f32::NAN];
        let y = [1.0, f32::NAN, 0.0, -0.0, -3.0, f32::NAN];
        for mut e in [crate::exec::Executor::interpreted(&p).unwrap(), crate::exec::Executor::new(&p, 1).unwrap()] {
            e.f32_mut(0).unwrap().copy_from_slice(&x);
            e.f32_mut(1).unwrap().copy_from_slice(&y);
            e.run("main").unwrap();
            let mx = e.f32(2).unwrap();
            let mn = e.f32(3).unwrap();
            let relu = e.f32(4).unwrap();
            assert!(mx[0].is_nan() && mx[1].is_nan() && mx[5].is_nan());
            assert!(mn[0].is_nan() && mn[1].is_nan() && mn[5].is_nan());
            assert_eq!((mx[2].to_bits(), mx[3].to_bits(), mx[4]), (0.0f32.to_bits(), 0.0f32.to_bits(), 3.0));
            assert_eq!((mn[2].to_bits(), mn[3].to_bits(), mn[4]), ((-0.0f32).to_bits(), (-0.0f32).to_bits(), -3.0));
            assert!(relu[0].is_nan());
            assert_eq!(&relu[1..5], &[1.0, 0.0, 0.0, 3.0]);
            assert_eq!(relu[2].to_bits(), 0.0f32.to_bits());
        }
    }

    #[test]
    fn reductions_over_trailing_axes_with_permuted_strides() {
        let shape = [3, 4, 5, 2];
        let n: usize = shape.iter().product();
        for op in REDUCE {
            for nred in 0..=4 {
                for perm in 0..4u64 {
                    let mut r = Rng::new(perm * 31 + nred as u64);
                    let strides = layout(&mut r, &shape, false);
                    let keep = 4 - nred;
                    let mut ostr = contiguous(&shape[..keep]);
                    ostr.resize(4, 0);
                    let out_len = shape[..keep].iter().product::<usize>();
                    for accumulate in [false, true] {
                        let x = Access { buf: 0, offset: 1, strides: strides.clone() };
                        let len = need(&x, &shape);
                        let body = bin(BinaryOp::Mul, ScalarExpr::Load(x), load(1, 0, &[0, 0, 1, 0]));
                        let p = program(
                            vec![buf("x", DType::F32, len.max(n)), buf("w", DType::F32, 5), buf("o", DType::F32, out_len)],
                            vec![lp(&shape, Some((op, nred)), body, Access { buf: 2, offset: 0, strides: ostr.clone() }, accumulate)],
                        );
                        check_jit_sums(&p, perm, 1, false, SUM_REL);
                    }
                }
            }
        }
    }

    #[test]
    fn interp_reductions_match_hand_computation() {
        // o[i] = sum_j x[i, j]; m[i] = max_j x[j, i] (transposed read); full min into s
        let x: Vec<f32> = (0..12).map(|v| ((v * 7) % 12) as f32 - 5.0).collect();
        let p = program(
            vec![buf("x", DType::F32, 12), buf("o", DType::F32, 3), buf("m", DType::F32, 4), buf("s", DType::F32, 1)],
            vec![
                lp(&[3, 4], Some((ReduceOp::Sum, 1)), load(0, 0, &[4, 1]), Access { buf: 1, offset: 0, strides: vec![1, 0] }, false),
                lp(&[4, 3], Some((ReduceOp::Max, 1)), load(0, 0, &[1, 4]), Access { buf: 2, offset: 0, strides: vec![1, 0] }, false),
                lp(&[3, 4], Some((ReduceOp::Min, 2)), load(0, 0, &[4, 1]), Access { buf: 3, offset: 0, strides: vec![0, 0] }, false),
            ],
        );
        for mut e in [crate::exec::Executor::interpreted(&p).unwrap(), crate::exec::Executor::new(&p, 1).unwrap()] {
            e.f32_mut(0).unwrap().copy_from_slice(&x);
            e.run("main").unwrap();
            let want_o: Vec<f32> = (0..3).map(|i| (0..4).map(|j| x[i * 4 + j]).sum()).collect();
            let want_m: Vec<f32> = (0..4).map(|i| (0..3).map(|j| x[j * 4 + i]).fold(f32::NEG_INFINITY, f32::max)).collect();
            assert_eq!(e.f32(1).unwrap(), &want_o[..]);
            assert_eq!(e.f32(2).unwrap(), &want_m[..]);
            assert_eq!(e.f32(3).unwrap()[0], x.iter().copied().fold(f32::INFINITY, f32::min));
        }
    }

    #[test]
    fn empty_reduction_gives_identity_and_rank0() {
        let p = program(
            vec![buf("x", DType::F32, 4), buf("o", DType::F32, 3), buf("s", DType::F32, 1)],
            vec![
                lp(&[3, 0], Some((ReduceOp::Max, 1)), load(0, 0, &[1, 1]), Access { buf: 1, offset: 0, strides: vec![1, 0] }, false),
                lp(
                    &[],
                    None,
                    bin(BinaryOp::Add, load(0, 2, &[]), ScalarExpr::Const(1.0)),
                    Access { buf: 2, offset: 0, strides: vec![] },
                    true,
                ),
            ],
        );
        let b = check_jit(&p, 9, 1, false, 0.0);
        assert_eq!(b.f32(1).unwrap(), &[f32::NEG_INFINITY; 3]);
    }

    #[test]
    fn index_i32_loads_and_i32_rounding() {
        // o[i, j] = ids[i] * 10 + j + 0.5 → i32 with ties to even
        let p = program(
            vec![buf("ids", DType::I32, 3), buf("o", DType::I32, 12), buf("f", DType::F32, 12)],
            vec![
                lp(
                    &[3, 4],
                    None,
                    bin(
                        BinaryOp::Add,
                        bin(BinaryOp::Add, bin(BinaryOp::Mul, load(0, 0, &[1, 0]), ScalarExpr::Const(10.0)), ScalarExpr::Index(1)),
                        ScalarExpr::Const(0.5),
                    ),
                    Access { buf: 1, offset: 0, strides: vec![4, 1] },
                    false,
                ),
                lp(&[3, 4], None, ScalarExpr::Index(0), Access { buf: 2, offset: 0, strides: vec![1, 3] }, false),
            ],
        );
        for mut e in [crate::exec::Executor::interpreted(&p).unwrap(), crate::exec::Executor::new(&p, 1).unwrap()] {
            e.i32_mut(0).unwrap().copy_from_slice(&[1, 2, -3]);
            e.run("main").unwrap();
            let want: Vec<i32> = [1, 2, -3]
                .iter()
                .flat_map(|&id| (0..4).map(move |j| (id as f32 * 10.0 + j as f32 + 0.5).round_ties_even() as i32))
                .collect();
            assert_eq!(e.i32(1).unwrap(), &want[..]);
            assert_eq!(e.i32(1).unwrap()[0], 10); // 10.5 → 10
            assert_eq!(e.i32(1).unwrap()[1], 12); // 11.5 → 12
            let f = e.f32(2).unwrap();
            assert_eq!(f, &[0.0, 1.0, 2.0, 0.0, 1.0, 2.0, 0.0, 1.0, 2.0, 0.0, 1.0, 2.0]);
        }
    }

    #[test]
    fn large_kernels_split_across_threads() {
        let (m, n) = (300, 200);
        let bufs = vec![
            buf("x", DType::F32, m * n),
            buf("y", DType::F32, n),
            buf("o", DType::F32, m * n),
            buf("s", DType::F32, m),
            buf("t", DType::F32, m * n),
            buf("z", DType::F32, 1),
        ];
        let ks = vec![
            // elementwise with broadcast
            lp(
                &[m, n],
                None,
                un(UnaryOp::Tanh, bin(BinaryOp::Add, load(0, 0, &[n, 1]), load(1, 0, &[0, 1]))),
                Access { buf: 2, offset: 0, strides: vec![n, 1] },
                false,
            ),
            // row reduction
            lp(&[m, n], Some((ReduceOp::Sum, 1)), load(2, 0, &[n, 1]), Access { buf: 3, offset: 0, strides: vec![1, 0] }, true),
            // transposed write
            lp(&[m, n], None, load(0, 0, &[n, 1]), Access { buf: 4, offset: 0, strides: vec![1, m] }, false),
            // in-place update
            lp(
                &[m, n],
                None,
                bin(BinaryOp::Mul, load(4, 0, &[n, 1]), ScalarExpr::Const(0.5)),
                Access { buf: 4, offset: 0, strides: vec![n, 1] },
                true,
            ),
            // full reduction
            lp(&[m, n], Some((ReduceOp::Max, 2)), load(4, 0, &[n, 1]), Access { buf: 5, offset: 0, strides: vec![0, 0] }, false),
        ];
        let p = program(bufs, ks);
        check_jit_sums(&p, 77, 4, false, SUM_REL);
        check_jit_sums(&p, 78, 2, true, SUM_REL);
    }

    /// The plan each kind of kernel gets (so the tests below do exercise vector code).
    #[test]
    fn vector_plans() {
        let plan = |k: &Kernel| {
            let Kernel::Loop(l) = k else { unreachable!() };
            let n = normalize(l);
            let mut acc = Vec::new();
            collect(&n.body, &mut acc);
            vec_plan(&n, &acc)
        };
        let o = |strides: &[usize]| Access { buf: 2, offset: 0, strides: strides.to_vec() };
        // elementwise, contiguous rows with broadcasts
        let body = bin(BinaryOp::Add, load(0, 0, &[37, 1]), load(1, 0, &[0, 1]));
        assert_eq!(plan(&lp(&[3, 37], None, body.clone(), o(&[37, 1]), false)), VecPlan::Lanes(1));
        // a transposed output: no lanes; rows too short: the outer axis
        assert_eq!(plan(&lp(&[3, 37], None, body.clone(), o(&[1, 3]), false)), VecPlan::Scalar);
        assert_eq!(plan(&lp(&[37, 3], None, load(0, 0, &[1, 37]), o(&[1, 37]), false)), VecPlan::Lanes(0));
        // row reduction: vector accumulators; column reduction: lanes over the kept axis
        assert_eq!(plan(&lp(&[3, 37], Some((ReduceOp::Sum, 1)), body.clone(), o(&[1, 0]), false)), VecPlan::ReduceInner);
        assert_eq!(plan(&lp(&[37, 3], Some((ReduceOp::Sum, 1)), load(0, 0, &[1, 37]), o(&[1, 0]), false)), VecPlan::Lanes(0));
        assert_eq!(plan(&lp(&[37], Some((ReduceOp::Max, 1)), load(0, 0, &[1]), o(&[0]), false)), VecPlan::ReduceInner);
        // the output read through another view (a running sum): scalar
        let body = bin(BinaryOp::Add, load(2, 0, &[1]), ScalarExpr::Const(1.0));
        assert_eq!(plan(&lp(&[20], None, body, Access { buf: 2, offset: 1, strides: vec![1] }, false)), VecPlan::Scalar);
    }

    /// Every op in vector code with a tail (odd rows), unaligned and broadcast loads,
    /// indices along and across the lanes, i32 loads and outputs, accumulation.
    #[test]
    fn vector_elementwise_every_op_with_tails() {
        let (m, n) = (3, 23);
        let x = || load(0, 1, &[n, 1]);
        let y = || load(1, 0, &[0, 1]);
        let z = || load(1, 2, &[1, 0]);
        let ids = || load(3, 0, &[n, 1]);
        let mut bodies = Vec::new();
        for op in UNARY {
            bodies.push(un(op, x()));
        }
        for op in BINARY {
            bodies.push(bin(op, x(), y()));
            bodies.push(bin(op, z(), x()));
            bodies.push(bin(op, x(), un(UnaryOp::Neg, un(UnaryOp::Neg, x()))));
        }
        bodies.push(ScalarExpr::Select(Box::new(bin(BinaryOp::Gt, x(), y())), Box::new(x()), Box::new(z())));
        bodies.push(ScalarExpr::Select(Box::new(x()), Box::new(ScalarExpr::Index(1)), Box::new(ScalarExpr::Index(0))));
        bodies.push(bin(BinaryOp::Mul, ScalarExpr::Index(1), bin(BinaryOp::Add, ids(), ScalarExpr::Const(0.25))));
        bodies.push(bin(BinaryOp::Add, bin(BinaryOp::Mul, x(), ScalarExpr::Const(3.0)), ScalarExpr::Index(0)));
        let bufs = vec![
            buf("x", DType::F32, m * n + 1),
            buf("y", DType::F32, n + 2),
            buf("o", DType::F32, m * n),
            buf("ids", DType::I32, m * n),
            buf("q", DType::I32, m * n + 3),
        ];
        for (b, body) in bodies.into_iter().enumerate() {
            for accumulate in [false, true] {
                let ks = vec![
                    lp(&[m, n], None, body.clone(), Access { buf: 2, offset: 0, strides: vec![n, 1] }, accumulate),
                    lp(&[m, n], None, body.clone(), Access { buf: 4, offset: 3, strides: vec![n, 1] }, accumulate),
                ];
                let p = program(bufs.clone(), ks);
                let k = b as u64 * 2 + accumulate as u64;
                check_jit(&p, k, 1, true, 0.0);
                check_jit(&p, k + 1000, 1, false, 0.0);
                // one row: the vector loop runs on the (split) outermost axis
                let p = program(
                    bufs.clone(),
                    vec![lp(&[m * n], None, ScalarExpr::Index(0), Access { buf: 2, offset: 0, strides: vec![1] }, accumulate)],
                );
                check_jit(&p, k, 2, false, 0.0);
            }
        }
    }

    /// Reductions: rows in vector accumulators (every length around the 4- and 8-point
    /// steps), columns in lanes over the kept axis (exact, also for `Sum`).
    #[test]
    fn vector_reductions_with_tails() {
        for op in REDUCE {
            for n in [1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 33] {
                let m = 3;
                let x = load(0, 1, &[n, 1]);
                let bodies = [
                    x.clone(),
                    bin(BinaryOp::Mul, x.clone(), load(1, 0, &[0, 1])),
                    bin(BinaryOp::Add, x.clone(), ScalarExpr::Index(1)),
                    bin(BinaryOp::Sub, load(1, 0, &[1, 0]), un(UnaryOp::Exp, x.clone())),
                    bin(BinaryOp::Max, x.clone(), load(3, 0, &[n, 1])),
                ];
                for body in bodies {
                    for accumulate in [false, true] {
                        let bufs = vec![
                            buf("x", DType::F32, m * n + 1),
                            buf("w", DType::F32, n.max(m)),
                            buf("o", DType::F32, m),
                            buf("ids", DType::I32, m * n),
                            buf("q", DType::I32, m),
                            buf("s", DType::F32, 1),
                        ];
                        let ks = vec![
                            lp(&[m, n], Some((op, 1)), body.clone(), Access { buf: 2, offset: 0, strides: vec![1, 0] }, accumulate),
                            lp(&[m, n], Some((op, 1)), body.clone(), Access { buf: 4, offset: 0, strides: vec![1, 0] }, accumulate),
                            lp(&[m, n], Some((op, 2)), body.clone(), Access { buf: 5, offset: 0, strides: vec![0, 0] }, accumulate),
                        ];
                        let p = program(bufs, ks);
                        let seed = n as u64 * 10 + accumulate as u64;
                        if op == ReduceOp::Sum {
                            check_jit_sums(&p, seed, 1, true, SUM_REL);
                            check_jit_sums(&p, seed + 1, 1, false, SUM_REL);
                        } else {
                            check_jit(&p, seed, 1, true, 0.0);
                            check_jit(&p, seed + 1, 1, false, 0.0);
                        }
                    }
                }
                // columns: o[j] = op_i x[i, j] (lanes along j), exact for every op
                let bufs = vec![buf("x", DType::F32, 5 * n + 1), buf("w", DType::F32, 5), buf("o", DType::F32, n)];
                let body = bin(BinaryOp::Mul, load(0, 1, &[1, n]), load(1, 0, &[0, 1]));
                let p = program(bufs, vec![lp(&[n, 5], Some((op, 1)), body, Access { buf: 2, offset: 0, strides: vec![1, 0] }, true)]);
                check_jit(&p, n as u64, 1, true, 0.0);
                check_jit(&p, n as u64, 2, false, 0.0);
            }
        }
    }

    /// Outputs read through another view stay in point order.
    #[test]
    fn vector_code_respects_output_aliasing() {
        let n = 21;
        let p = program(
            vec![buf("x", DType::F32, n + 1)],
            vec![
                // running sum: x[i + 1] = x[i] + x[i + 1]
                lp(&[n], None, load(0, 0, &[1]), Access { buf: 0, offset: 1, strides: vec![1] }, true),
                // shift down: x[i] = x[i + 1] * 2
                lp(
                    &[n],
                    None,
                    bin(BinaryOp::Mul, load(0, 1, &[1]), ScalarExpr::Const(2.0)),
                    Access { buf: 0, offset: 0, strides: vec![1] },
                    false,
                ),
            ],
        );
        check_jit(&p, 3, 1, false, 0.0);
    }

    /// The shared polynomial `exp`/`tanh` stay within 2 ulp of the exact (f64) values,
    /// keep the special values, and the JIT (vector and scalar code) matches them bit
    /// for bit over the whole range.
    #[test]
    fn exp_and_tanh_accuracy_and_jit_equality() {
        let ulps = |got: f32, want: f64| {
            let w = want as f32;
            if got == w {
                return 0.0;
            }
            // one ulp of the exact value (at least the smallest normal's)
            let ulp = (w.abs().max(f32::MIN_POSITIVE) as f64) * f32::EPSILON as f64;
            (got as f64 - want).abs() / ulp
        };
        let mut xs = Vec::new();
        let mut x = -110.0f32;
        while x < 95.0 {
            xs.push(x);
            x += 0.000_37 * (1.0 + x.abs());
        }
        for k in 0..20_000 {
            xs.push(k as f32 * 1e-4 - 1.0);
        }
        xs.extend([0.0, -0.0, 1e-30, -1e-30, 0.625, -0.625, 0.624_999_94, 88.72, 88.73, -87.3, -103.9, 44.0, 9.0, -9.0]);
        let (mut worst_exp, mut worst_tanh) = (0.0f64, 0.0f64);
        for &x in &xs {
            let e = interp::bm_exp(x);
            let want = (x as f64).exp();
            if want > f32::MIN_POSITIVE as f64 && want < f32::MAX as f64 {
                worst_exp = worst_exp.max(ulps(e, want));
            } else if want >= f32::MAX as f64 {
                assert_eq!(e, f32::INFINITY, "exp({x})");
            } else {
                assert!((e as f64 - want).abs() <= f32::MIN_POSITIVE as f64 * 1e-6 + 1e-45, "exp({x}) = {e:e}");
            }
            let t = interp::bm_tanh(x);
            worst_tanh = worst_tanh.max(ulps(t, (x as f64).tanh()));
        }
        assert!(worst_exp <= 2.0, "exp: {worst_exp} ulp");
        assert!(worst_tanh <= 2.0, "tanh: {worst_tanh} ulp");
        assert!(interp::bm_exp(f32::NAN).is_nan() && interp::bm_tanh(f32::NAN).is_nan());
        assert_eq!(interp::bm_exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(interp::bm_exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(interp::bm_exp(0.0), 1.0);
        assert_eq!(interp::bm_tanh(f32::INFINITY), 1.0);
        assert_eq!(interp::bm_tanh(f32::NEG_INFINITY), -1.0);
        assert_eq!(interp::bm_tanh(-0.0).to_bits(), (-0.0f32).to_bits());

        // the JIT on the same values (scaled loads so the vector code sees them too)
        let n = xs.len();
        for op in [UnaryOp::Exp, UnaryOp::Tanh, UnaryOp::Sigmoid] {
            let p = program(
                vec![buf("x", DType::F32, n), buf("o", DType::F32, n)],
                vec![lp(&[n], None, un(op, load(0, 0, &[1])), Access { buf: 1, offset: 0, strides: vec![1] }, false)],
            );
            let mut a = crate::exec::Executor::interpreted(&p).unwrap();
            let mut b = crate::exec::Executor::new(&p, 1).unwrap();
            a.f32_mut(0).unwrap().copy_from_slice(&xs);
            b.f32_mut(0).unwrap().copy_from_slice(&xs);
            a.run("main").unwrap();
            b.run("main").unwrap();
            assert_same(a.buffers(), b.buffers(), 0.0, &format!("{op:?}"));
        }
    }

    #[test]
    fn normalize_only_when_needed() {
        let k = LoopKernel {
            shape: vec![2, 3],
            reduce: Some(ReduceOp::Sum),
            reduced_dims: 2,
            body: ScalarExpr::Index(1),
            out: Access { buf: 0, offset: 0, strides: vec![0, 0] },
            accumulate: false,
            side: vec![],
            sums: vec![],
        };
        let n = normalize(&k);
        assert_eq!(n.shape, vec![1, 2, 3]);
        assert_eq!(n.body, ScalarExpr::Index(2));
        assert_eq!(n.out.strides, vec![0, 0, 0]);
        let k2 = LoopKernel { reduced_dims: 1, ..k };
        assert!(matches!(normalize(&k2), Cow::Borrowed(_)));
    }
}

#[cfg(test)]
mod row_timing {
    use crate::exec::test_support::*;
    use crate::kir::*;

    /// Row functions against the inline 4-lane code on the same elements:
    /// `cargo test --release -p bm-runtime jit::row_timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn rows_vs_inline() {
        let n = 1 << 21;
        for op in [UnaryOp::Exp, UnaryOp::GeluTanh, UnaryOp::GeluTanhGrad] {
            for inner in [512, 8192] {
                let shape = vec![n / inner, inner];
                let k = Kernel::Loop(LoopKernel {
                    shape: shape.clone(),
                    reduce: None,
                    reduced_dims: 0,
                    body: ScalarExpr::Unary(op, Box::new(ScalarExpr::Load(Access { buf: 0, offset: 0, strides: vec![inner, 1] }))),
                    out: Access { buf: 1, offset: 0, strides: vec![inner, 1] },
                    accumulate: false,
                    side: vec![],
                    sums: vec![],
                });
                let p = program(vec![buf("x", DType::F32, n), buf("y", DType::F32, n)], vec![k]);
                let mut e = crate::exec::Executor::new(&p, 1).unwrap();
                fill(e.buffers_mut(), 1, false);
                let mut best = f64::MAX;
                for _ in 0..15 {
                    let t = std::time::Instant::now();
                    e.run("main").unwrap();
                    best = best.min(t.elapsed().as_secs_f64());
                }
                let how = if inner <= super::MAX_ROW { "row function" } else { "inline" };
                println!("{op:?} {how}: {:.3} ns/element", best * 1e9 / n as f64);
            }
        }
    }
}
