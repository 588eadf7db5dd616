//! Elaboration: from the AST of a model (and the blocks it uses) to the shaped op graph.
//!
//! Blocks are instantiated recursively as members are visited (children, `repeat`,
//! compile-time `if`), creating `Param` nodes named like PyTorch's `state_dict`.
//! Then the model's `forward` is evaluated: compile-time values fold, tensor
//! expressions add nodes through `ops`, calls of children run their `forward` with the
//! signature checked against the argument shapes (symbolic dims bind on first use).

mod builtins;
mod expr;
mod value;

pub use value::{CallValue, Value, parse_override};

use crate::graph::{DType, Graph, NodeId, Op, Origin};
use crate::ops::shape_text;
use bm_grammar::ast::{self, BlockDef, Dim, ExprKind, Forward, Member, Span, TensorType};
use bm_grammar::diagnostic::suggest;
use bm_grammar::{Diagnostic, SourceFile};
use bm_runtime::kir::Init;
use std::collections::HashMap;
use std::sync::Arc;

/// Limits that keep malformed programs from exhausting time or memory.
pub const MAX_REPEAT: i64 = 4096;
pub const MAX_CALL_DEPTH: usize = 128;
/// Operations of the forward graph. The training graph is about three times as large,
/// and lowering and memory planning are not linear in it: at this size (about a thousand
/// small transformer layers) `bmc compile` already takes minutes. A larger graph is an
/// error within a second instead of minutes and gigabytes.
pub const MAX_NODES: usize = 100_000;
/// Block instances (nested `repeat`s multiply: `repeat(4096, A())` where `A` holds
/// `repeat(4096, E())` would be 16M instances).
pub const MAX_INSTANCES: usize = 1 << 18;
pub const MAX_ELEMENTS: u128 = 1 << 34;

/// A block definition and the file it was written in.
#[derive(Clone, Debug)]
pub struct BlockSource {
    pub def: BlockDef,
    pub file: Arc<SourceFile>,
}

/// Everything elaboration needs from the loaded files.
pub struct ElabInput<'a> {
    /// The model; `None` when only config and train values are evaluated.
    pub model: Option<&'a BlockSource>,
    pub blocks: &'a HashMap<String, BlockSource>,
    /// Config constants after `--set` overrides, in order.
    pub config: &'a [(String, Value)],
    /// The batch size, bound to the symbolic dim `B`.
    pub batch: usize,
    /// Per-example dtype and shape of each data tensor, when the data is known.
    pub data_shapes: Option<&'a HashMap<String, (DType, Vec<usize>)>>,
}

/// An error located only in the standard blocks (`<prelude>`) gets a label at `span` of
/// `file`, the user's code that led there, so that it names the user's file.
fn in_user_code(d: Diagnostic, file: &Arc<SourceFile>, span: Span, label: String) -> Diagnostic {
    let in_prelude = |l: &bm_grammar::diagnostic::Label| l.file.path == "<prelude>";
    if file.path != "<prelude>" && d.primary.as_ref().is_some_and(in_prelude) && d.secondary.iter().all(in_prelude) {
        d.with_secondary(file, span, label)
    } else {
        d
    }
}

pub struct Instance {
    pub path: String,
    pub block: String,
    pub file: Arc<SourceFile>,
    pub env: HashMap<String, Value>,
    pub children: HashMap<String, Value>,
    pub child_order: Vec<String>,
    pub params: HashMap<String, NodeId>,
    pub forward: Option<Forward>,
    pub span: Span,
}

pub struct Elaborator<'a> {
    pub g: Graph,
    input: &'a ElabInput<'a>,
    config: HashMap<String, Value>,
    pub instances: Vec<Instance>,
    instantiating: Vec<String>,
    call_depth: usize,
    noise_counter: usize,
}

/// A lexical scope inside a forward body.
pub struct Scope {
    pub file: Arc<SourceFile>,
    pub locals: Vec<HashMap<String, Value>>,
    pub inst: Option<usize>,
}

impl Scope {
    fn lookup_local(&self, name: &str) -> Option<&Value> {
        self.locals.iter().rev().find_map(|m| m.get(name))
    }
    fn bind(&mut self, name: &str, v: Value) {
        if let Some(top) = self.locals.last_mut() {
            top.insert(name.to_string(), v);
        }
    }
}

pub fn is_symbolic_name(name: &str) -> bool {
    name.chars().next().is_some_and(|c| c.is_ascii_uppercase())
}

impl<'a> Elaborator<'a> {
    pub fn new(input: &'a ElabInput<'a>) -> Self {
        let config = input.config.iter().cloned().collect();
        Elaborator { g: Graph::new(), input, config, instances: vec![], instantiating: vec![], call_depth: 0, noise_counter: 0 }
    }

    pub fn err(&self, file: &Arc<SourceFile>, span: Span, message: impl Into<String>, label: impl Into<String>) -> Diagnostic {
        Diagnostic::at(file, span, message, label)
    }

    /// A tensor may hold at most `MAX_ELEMENTS` elements.
    pub fn check_size(&self, file: &Arc<SourceFile>, span: Span, id: NodeId) -> Result<(), Diagnostic> {
        let shape = self.g.shape(id);
        let n = shape.iter().try_fold(1u128, |acc, &d| acc.checked_mul(d as u128));
        if n.is_none_or(|n| n > MAX_ELEMENTS) {
            let text = shape_text(self.g.dtype(id), shape);
            return Err(self
                .err(file, span, format!("tensor {text} is too large"), format!("this is {text}"))
                .with_note(format!("a tensor may have at most {MAX_ELEMENTS} elements")));
        }
        Ok(())
    }

    fn check_budget(&self, file: &Arc<SourceFile>, span: Span) -> Result<(), Diagnostic> {
        if self.g.len() > MAX_NODES {
            return Err(self.err(
                file,
                span,
                format!("the model is too large: more than {MAX_NODES} operations"),
                "while elaborating this",
            )
            .with_help("bmc compiles models of up to 100000 operations in the forward pass (about a thousand small transformer layers); use fewer layers or repeats"));
        }
        Ok(())
    }

    /// Builds the whole model graph: parameters, inputs, forward, outputs and loss.
    pub fn elaborate_model(mut self) -> Result<Graph, Diagnostic> {
        let model = self.input.model.ok_or_else(|| Diagnostic::new("no model to elaborate"))?;
        let file = model.file.clone();
        let root = self.instantiate(model, "", HashMap::new(), &model.file, model.def.span)?;
        // Inputs, in declaration order, with symbolic dims bound from batch and data.
        let mut symbols: HashMap<String, i64> = HashMap::new();
        symbols.insert("B".into(), self.input.batch as i64);
        let mut scope = Scope { file: file.clone(), locals: vec![HashMap::new()], inst: Some(root) };
        for m in flatten_inputs(&model.def.members) {
            if let Member::Input { name, ty, span } = m {
                let dtype = self.dtype_of(&file, ty)?;
                let shape = self.input_shape(&file, &name.name, ty, &mut symbols)?;
                if self.g.inputs.iter().any(|(n, _)| *n == name.name) {
                    return Err(self.err(&file, name.span, format!("input `{}` is declared twice", name.name), "declared again here"));
                }
                self.g.current_origin = Some(Origin { what: "input".into(), file: file.clone(), span: *span });
                let id = self.g.add(Op::Input(name.name.clone()), &[], shape, dtype);
                self.check_size(&file, *span, id)?;
                self.g.inputs.push((name.name.clone(), id));
                scope.bind(&name.name, Value::Tensor(id));
            }
        }
        for (k, v) in &symbols {
            scope.bind(k, Value::Int(*v));
        }
        let Some(fwd) = self.instances[root].forward.clone() else {
            return Err(self
                .err(&file, model.def.name.span, format!("model `{}` has no `forward`", model.def.name.name), "this model")
                .with_help("add `forward { ... loss <expr> }` to the model"));
        };
        if fwd.params.is_some() {
            return Err(self
                .err(&file, fwd.span, "a model's forward takes no arguments", "here")
                .with_help("write `forward { ... }`: inputs are declared with `input name: dtype[shape]`"));
        }
        let mut loss: Option<(NodeId, Span)> = None;
        for stmt in &fwd.body.stmts {
            match stmt {
                ast::Stmt::Output { name, value, span } => {
                    let v = match value {
                        Some(e) => self.eval(e, &mut scope)?,
                        None => scope.lookup_local(&name.name).cloned().ok_or_else(|| self.unknown_name(&scope, &name.name, name.span))?,
                    };
                    let Value::Tensor(id) = v else {
                        return Err(self.err(
                            &file,
                            *span,
                            format!("`output {}` must be a tensor, found {}", name.name, v.kind()),
                            "not a tensor",
                        ));
                    };
                    if self.g.output(&name.name).is_some() || name.name == "loss" {
                        return Err(self.err(&file, name.span, format!("output `{}` is defined twice", name.name), "duplicate output"));
                    }
                    self.g.set_output(&name.name, id);
                    scope.bind(&name.name, Value::Tensor(id));
                }
                ast::Stmt::Loss { value, span } => {
                    if let Some((_, first)) = loss {
                        return Err(self
                            .err(&file, *span, "a model has exactly one `loss`", "second loss here")
                            .with_secondary(&file, first, "first loss here")
                            .with_help("add the terms into one expression: `loss a + b`"));
                    }
                    let v = self.eval(value, &mut scope)?;
                    let Value::Tensor(id) = v else {
                        return Err(self.err(
                            &file,
                            value.span,
                            format!("the loss must be a scalar tensor, found {}", v.kind()),
                            "not a tensor",
                        ));
                    };
                    if !self.g.shape(id).is_empty() {
                        let shape = shape_text(self.g.dtype(id), self.g.shape(id));
                        return Err(self
                            .err(
                                &file,
                                value.span,
                                format!("the loss must be a scalar, but it has shape {shape}"),
                                format!("this is {shape}"),
                            )
                            .with_help("reduce it, e.g. `loss mean(...)`"));
                    }
                    if self.g.dtype(id) != DType::F32 {
                        return Err(self.err(&file, value.span, "the loss must be a floating-point scalar", "not f32"));
                    }
                    loss = Some((id, *span));
                }
                other => self.exec_stmt(other, &mut scope)?,
            }
        }
        if let Some(tail) = &fwd.body.tail {
            self.eval(tail, &mut scope)?;
        }
        let Some((loss, _)) = loss else {
            return Err(self
                .err(
                    &file,
                    model.def.name.span,
                    format!("model `{}` has no `loss`", model.def.name.name),
                    "this model needs a loss to train",
                )
                .with_help("end its forward with a line like `loss cross_entropy(logits, y)`"));
        };
        self.g.loss = Some(loss);
        self.g.set_output("loss", loss);
        self.g.current_origin = None;
        Ok(self.g)
    }

    fn dtype_of(&self, file: &Arc<SourceFile>, ty: &TensorType) -> Result<DType, Diagnostic> {
        match &ty.dtype {
            None => Ok(DType::F32),
            Some(d) => match d.name.as_str() {
                "f32" => Ok(DType::F32),
                "i32" => Ok(DType::I32),
                "bool" => Ok(DType::Bool),
                "bf16" | "f16" => Err(self
                    .err(file, d.span, format!("`{}` tensors are not supported yet", d.name), "unsupported dtype")
                    .with_help("declare it `f32`; reduced precision comes from `precision = \"bf16\"` in train")),
                other => {
                    let mut e = self.err(file, d.span, format!("unknown dtype `{other}`"), "not a dtype");
                    if let Some(s) = suggest(other, ["f32", "i32", "bool", "bf16", "f16"]) {
                        e = e.with_help(format!("did you mean `{s}`?"));
                    }
                    Err(e)
                }
            },
        }
    }

    fn input_shape(
        &mut self,
        file: &Arc<SourceFile>,
        name: &str,
        ty: &TensorType,
        symbols: &mut HashMap<String, i64>,
    ) -> Result<Vec<usize>, Diagnostic> {
        let dims = ty.dims.clone().unwrap_or_default();
        let data = self.input.data_shapes.and_then(|d| d.get(name));
        let mut out = vec![];
        for (i, d) in dims.iter().enumerate() {
            match d {
                Dim::Ellipsis(s) => {
                    return Err(self.err(file, *s, "`...` is not allowed in an input's shape", "inputs need concrete shapes"));
                }
                Dim::Expr(e) => {
                    if let ExprKind::Name(n) = &e.kind
                        && is_symbolic_name(n)
                        && !self.config.contains_key(n)
                    {
                        if let Some(v) = symbols.get(n) {
                            out.push(*v as usize);
                            continue;
                        }
                        // Bind from the data's per-example shape (axis i - 1 after the batch axis).
                        let from_data = data.and_then(|(_, s)| if i >= 1 { s.get(i - 1).copied() } else { None });
                        match from_data {
                            Some(v) => {
                                symbols.insert(n.clone(), v as i64);
                                out.push(v);
                            }
                            None => {
                                return Err(self
                                    .err(file, e.span, format!("cannot infer the size of `{n}` in input `{name}`"), "unknown size")
                                    .with_help("use `B` for the batch axis, a config constant, or a number"));
                            }
                        }
                        continue;
                    }
                    let scope = Scope {
                        file: file.clone(),
                        locals: vec![symbols.iter().map(|(k, v)| (k.clone(), Value::Int(*v))).collect()],
                        inst: None,
                    };
                    let v = self.eval_const(e, &scope)?;
                    out.push(self.dim_value(file, e.span, &v)?);
                }
            }
        }
        Ok(out)
    }

    pub fn dim_value(&self, file: &Arc<SourceFile>, span: Span, v: &Value) -> Result<usize, Diagnostic> {
        match v.as_i64() {
            Some(i) if i >= 0 => Ok(i as usize),
            Some(i) => Err(self.err(file, span, format!("a dim must not be negative, got {i}"), "negative dim")),
            None => Err(self.err(file, span, format!("a dim must be an integer, found {}", v.text()), "not an integer")),
        }
    }

    /// Creates an instance of `block` at `path` with its arguments bound, visiting its
    /// members (children, params, forward) in order.
    /// `span` (in `site_file`, the parent's file) is where the instance is made.
    fn instantiate(
        &mut self,
        block: &BlockSource,
        path: &str,
        env: HashMap<String, Value>,
        site_file: &Arc<SourceFile>,
        span: Span,
    ) -> Result<usize, Diagnostic> {
        let name = block.def.name.name.clone();
        if self.instantiating.contains(&name) {
            let chain = format!("{} -> {name}", self.instantiating.join(" -> "));
            return Err(self
                .err(site_file, span, format!("block `{name}` contains itself: {chain}"), "recursive instance")
                .with_help("a block cannot contain an instance of itself, directly or indirectly; use `repeat(n, Block(..))` for depth"));
        }
        self.check_budget(site_file, span)?;
        if self.instances.len() >= MAX_INSTANCES {
            return Err(self
                .err(site_file, span, format!("the model is too large: more than {MAX_INSTANCES} block instances"), "while making this")
                .with_help("nested `repeat`s multiply their counts"));
        }
        self.instantiating.push(name.clone());
        let idx = self.instances.len();
        self.instances.push(Instance {
            path: path.to_string(),
            block: name,
            file: block.file.clone(),
            env,
            children: HashMap::new(),
            child_order: vec![],
            params: HashMap::new(),
            forward: None,
            span,
        });
        let r = self.visit_members(idx, &block.def.members);
        self.instantiating.pop();
        r.map(|_| idx)
    }

    fn member_scope(&self, idx: usize) -> Scope {
        Scope { file: self.instances[idx].file.clone(), locals: vec![HashMap::new()], inst: Some(idx) }
    }

    fn prefixed(&self, idx: usize, name: &str) -> String {
        let p = &self.instances[idx].path;
        if p.is_empty() { name.to_string() } else { format!("{p}.{name}") }
    }

    fn check_new_member(&self, idx: usize, name: &ast::Ident) -> Result<(), Diagnostic> {
        let inst = &self.instances[idx];
        if inst.children.contains_key(&name.name) || inst.params.contains_key(&name.name) {
            return Err(self.err(&inst.file, name.span, format!("`{}` is defined twice in `{}`", name.name, inst.block), "duplicate name"));
        }
        Ok(())
    }

    fn visit_members(&mut self, idx: usize, members: &[Member]) -> Result<(), Diagnostic> {
        let file = self.instances[idx].file.clone();
        for m in members {
            match m {
                Member::Child { name, value, span } => {
                    self.check_new_member(idx, name)?;
                    let child = self.instantiate_child(idx, &name.name, value, *span)?;
                    let inst = &mut self.instances[idx];
                    inst.children.insert(name.name.clone(), child);
                    inst.child_order.push(name.name.clone());
                }
                Member::Param { name, ty, init, span } => {
                    self.check_new_member(idx, name)?;
                    let scope = self.member_scope(idx);
                    let dtype = self.dtype_of(&file, ty)?;
                    if dtype != DType::F32 {
                        return Err(self.err(&file, ty.span, "parameters must be f32", "not trainable"));
                    }
                    let mut shape = vec![];
                    for d in ty.dims.clone().unwrap_or_default() {
                        match d {
                            Dim::Ellipsis(s) => {
                                return Err(self.err(
                                    &file,
                                    s,
                                    "`...` is not allowed in a parameter's shape",
                                    "parameters need concrete shapes",
                                ));
                            }
                            Dim::Expr(e) => {
                                let v = self.eval_const(&e, &scope)?;
                                shape.push(self.dim_value(&file, e.span, &v)?);
                            }
                        }
                    }
                    if shape.iter().map(|&d| d as u128).product::<u128>() > MAX_ELEMENTS {
                        return Err(self.err(
                            &file,
                            ty.span,
                            format!("parameter `{}` is too large: {shape:?}", name.name),
                            "too many elements",
                        ));
                    }
                    let init = match init {
                        None => Init::Zeros,
                        Some(e) => self.eval_init(e, &scope, &shape)?,
                    };
                    let full = self.prefixed(idx, &name.name);
                    self.g.current_origin = Some(Origin { what: "param".into(), file: file.clone(), span: *span });
                    let id = self.g.add(Op::Param(full.clone()), &[], shape, DType::F32);
                    self.g.params.push(crate::graph::ParamInfo { name: full, node: id, init });
                    self.instances[idx].params.insert(name.name.clone(), id);
                }
                Member::Input { span, .. } => {
                    if !self.instances[idx].path.is_empty() || self.input.model.is_none_or(|m| self.instances[idx].block != m.def.name.name)
                    {
                        return Err(self
                            .err(&file, *span, "`input` is only allowed in the model", "inside a block")
                            .with_help("pass tensors to a block's forward as arguments"));
                    }
                }
                Member::Forward(f) => {
                    if self.instances[idx].forward.is_some() {
                        return Err(self.err(&file, f.span, format!("`{}` has two forwards", self.instances[idx].block), "second forward"));
                    }
                    self.instances[idx].forward = Some(f.clone());
                }
                Member::If { cond, then, otherwise, .. } => {
                    let scope = self.member_scope(idx);
                    let c = self.eval_const(cond, &scope)?;
                    let Value::Bool(b) = c else {
                        return Err(self.err(
                            &file,
                            cond.span,
                            format!("an `if` condition must be a compile-time bool, found {}", c.kind()),
                            "not a bool",
                        ));
                    };
                    self.visit_members(idx, if b { then } else { otherwise })?;
                }
            }
        }
        Ok(())
    }

    /// `Block(args)` or `repeat(n, Block(args))` as a member value.
    fn instantiate_child(&mut self, parent: usize, name: &str, value: &ast::Expr, span: Span) -> Result<Value, Diagnostic> {
        let file = self.instances[parent].file.clone();
        let ExprKind::Call { callee, args } = &value.kind else {
            return Err(self
                .err(&file, value.span, "a member must be a block instance: `name = Block(args)`", "not a block call")
                .with_help("compute values inside `forward`; use `param` for tensors"));
        };
        if callee.name == "repeat" {
            if args.len() != 2 || args.iter().any(|a| a.name.is_some()) {
                return Err(self.err(&file, value.span, "`repeat` takes two arguments: `repeat(n, Block(args))`", "bad repeat"));
            }
            let scope = self.member_scope(parent);
            let n = self.eval_const(&args[0].value, &scope)?;
            let Some(n) = n.as_i64() else {
                return Err(self.err(
                    &file,
                    args[0].value.span,
                    format!("the repeat count must be an integer, found {}", n.text()),
                    "not an integer",
                ));
            };
            if !(1..=MAX_REPEAT).contains(&n) {
                return Err(self
                    .err(&file, args[0].value.span, format!("repeat count {n} is out of range 1..={MAX_REPEAT}"), "too many or too few")
                    .with_help("use a count between 1 and 4096"));
            }
            let mut items = vec![];
            for i in 0..n {
                let path = self.prefixed(parent, &format!("{name}.{i}"));
                items.push(self.instantiate_call(parent, &path, &args[1].value, span)?);
            }
            return Ok(Value::Repeat(items));
        }
        let path = self.prefixed(parent, name);
        Ok(Value::Instance(self.instantiate_call(parent, &path, value, span)?))
    }

    fn instantiate_call(&mut self, parent: usize, path: &str, call: &ast::Expr, span: Span) -> Result<usize, Diagnostic> {
        let file = self.instances[parent].file.clone();
        let ExprKind::Call { callee, args } = &call.kind else {
            return Err(self.err(&file, call.span, "expected a block instance `Block(args)`", "not a block call"));
        };
        let Some(block) = self.input.blocks.get(&callee.name) else {
            let mut e = self.err(&file, callee.span, format!("unknown block `{}`", callee.name), "no block by this name");
            if let Some(s) = suggest(&callee.name, self.input.blocks.keys().map(String::as_str)) {
                e = e.with_help(format!("did you mean `{s}`?"));
            } else if builtins::is_builtin(&callee.name) {
                e = e.with_help(format!("`{}` is an operation: call it inside `forward`", callee.name));
            }
            return Err(e);
        };
        let scope = self.member_scope(parent);
        let params = &block.def.params;
        let mut env: HashMap<String, Value> = HashMap::new();
        let mut positional = 0;
        for a in args {
            let v = self.eval_const(&a.value, &scope)?;
            match &a.name {
                None => {
                    let Some(p) = params.get(positional) else {
                        return Err(self.err(
                            &file,
                            a.value.span,
                            format!("`{}` takes {} arguments, this is argument {}", callee.name, params.len(), positional + 1),
                            "too many arguments",
                        ));
                    };
                    env.insert(p.name.name.clone(), v);
                    positional += 1;
                }
                Some(k) => {
                    if !params.iter().any(|p| p.name.name == k.name) {
                        let mut e = self.err(&file, k.span, format!("`{}` has no parameter `{}`", callee.name, k.name), "unknown argument");
                        if let Some(s) = suggest(&k.name, params.iter().map(|p| p.name.name.as_str())) {
                            e = e.with_help(format!("did you mean `{s}`?"));
                        }
                        return Err(e);
                    }
                    if env.insert(k.name.clone(), v).is_some() {
                        return Err(self.err(&file, k.span, format!("argument `{}` is given twice", k.name), "duplicate argument"));
                    }
                }
            }
        }
        for p in params {
            if !env.contains_key(&p.name.name) {
                match &p.default {
                    Some(d) => {
                        let dscope = Scope { file: block.file.clone(), locals: vec![env.clone()], inst: None };
                        let v = self.eval_const(d, &dscope)?;
                        env.insert(p.name.name.clone(), v);
                    }
                    None => {
                        return Err(self
                            .err(&file, call.span, format!("`{}` needs an argument `{}`", callee.name, p.name.name), "missing argument")
                            .with_secondary(&block.file, p.name.span, "declared here"));
                    }
                }
            }
        }
        self.instantiate(block, path, env, &file, span).map_err(|d| in_user_code(d, &file, span, format!("in `{path}`, made here")))
    }

    /// Calls an instance's forward on `args`, checking the signature.
    pub fn call_instance(
        &mut self,
        idx: usize,
        args: Vec<(Value, Span)>,
        call_file: &Arc<SourceFile>,
        span: Span,
    ) -> Result<Value, Diagnostic> {
        if self.call_depth >= MAX_CALL_DEPTH {
            return Err(self.err(call_file, span, "calls are nested too deeply", "here"));
        }
        self.check_budget(call_file, span)?;
        let inst_file = self.instances[idx].file.clone();
        let block = self.instances[idx].block.clone();
        let Some(fwd) = self.instances[idx].forward.clone() else {
            return Err(self.err(call_file, span, format!("block `{block}` has no forward to call"), "called here"));
        };
        let params = fwd.params.clone().unwrap_or_default();
        if params.len() != args.len() {
            return Err(self
                .err(
                    call_file,
                    span,
                    format!("`{block}`'s forward takes {} argument(s), {} given", params.len(), args.len()),
                    "wrong number of arguments",
                )
                .with_secondary(&inst_file, fwd.span, "forward declared here"));
        }
        let mut symbols: HashMap<String, i64> = HashMap::new();
        let mut ellipsis: Option<Vec<usize>> = None;
        let mut scope = Scope { file: inst_file.clone(), locals: vec![HashMap::new()], inst: Some(idx) };
        for (p, (v, vspan)) in params.iter().zip(&args) {
            if let Some(ty) = &p.ty {
                let Value::Tensor(id) = v else {
                    return Err(self.err(
                        call_file,
                        *vspan,
                        format!("argument `{}` of `{block}` must be a tensor, found {}", p.name.name, v.kind()),
                        "not a tensor",
                    ));
                };
                self.check_shape(
                    *id,
                    ty,
                    &mut symbols,
                    &mut ellipsis,
                    &scope,
                    call_file,
                    *vspan,
                    &format!("argument `{}` of `{block}`", p.name.name),
                )
                .map_err(|d| {
                    // The declared dims come from the instance's arguments: show where it was made.
                    // (An instance is only called from its parent's forward, so its span is in `call_file`.)
                    let inst = &self.instances[idx];
                    if inst.path.is_empty() { d } else { d.with_secondary(call_file, inst.span, format!("`{}` is made here", inst.path)) }
                })?;
            }
            scope.bind(&p.name.name, v.clone());
        }
        for (k, v) in &symbols {
            scope.bind(k, Value::Int(*v));
        }
        self.call_depth += 1;
        let saved_origin = self.g.current_origin.clone();
        let r = self.eval_body(&fwd.body, &mut scope);
        self.g.current_origin = saved_origin;
        self.call_depth -= 1;
        let v = r.map_err(|d| in_user_code(d, call_file, span, format!("in `{block}`'s forward, called here")))?;
        if let Some(ret) = &fwd.ret {
            let Value::Tensor(id) = v else {
                return Err(self.err(
                    &inst_file,
                    fwd.body.span,
                    format!("`{block}`'s forward must return a tensor, it returns {}", v.kind()),
                    "returns this",
                ));
            };
            let ret_span = fwd.body.tail.as_ref().map(|t| t.span).unwrap_or(fwd.body.span);
            self.check_shape(id, ret, &mut symbols, &mut ellipsis, &scope, &inst_file, ret_span, &format!("the result of `{block}`"))?;
        }
        Ok(v)
    }

    /// Checks a tensor against a declared type, binding symbolic dims and `...`.
    #[allow(clippy::too_many_arguments)]
    fn check_shape(
        &mut self,
        id: NodeId,
        ty: &TensorType,
        symbols: &mut HashMap<String, i64>,
        ellipsis: &mut Option<Vec<usize>>,
        scope: &Scope,
        file: &Arc<SourceFile>,
        span: Span,
        what: &str,
    ) -> Result<(), Diagnostic> {
        let actual = self.g.shape(id).to_vec();
        let actual_text = shape_text(self.g.dtype(id), &actual);
        let decl_file = scope.file.clone();
        let mismatch = |me: &Self, detail: String| -> Diagnostic {
            let origin = me.g.node(id).origin.clone();
            let mut d = me
                .err(
                    file,
                    span,
                    format!("shape mismatch: {what} is {actual_text}, declared {}", type_text(&decl_file, ty)),
                    format!("this is {actual_text}"),
                )
                .with_secondary(&decl_file, ty.span, "declared here")
                .with_note(detail);
            if let Some(o) = origin {
                d = d.with_note(format!("the {actual_text} tensor comes from `{}` at {}", o.what, o.location()));
            }
            d
        };
        if let Some(dname) = &ty.dtype {
            let want = self.dtype_of(&decl_file, ty)?;
            if want != self.g.dtype(id) {
                return Err(mismatch(self, format!("expected dtype {}, found {}", dname.name, self.g.dtype(id).name())));
            }
        }
        let Some(dims) = &ty.dims else { return Ok(()) };
        let (lead, rest): (bool, &[Dim]) = match dims.first() {
            Some(Dim::Ellipsis(_)) => (true, &dims[1..]),
            _ => (false, &dims[..]),
        };
        if rest.iter().any(|d| matches!(d, Dim::Ellipsis(_))) {
            return Err(self.err(&decl_file, ty.span, "`...` may only come first in a shape", "misplaced `...`"));
        }
        if (!lead && actual.len() != rest.len()) || (lead && actual.len() < rest.len()) {
            return Err(mismatch(
                self,
                format!("expected rank {}{}, found rank {}", if lead { "at least " } else { "" }, rest.len(), actual.len()),
            ));
        }
        let offset = actual.len() - rest.len();
        if lead {
            let leading = actual[..offset].to_vec();
            match ellipsis {
                Some(prev) if *prev != leading => {
                    return Err(mismatch(self, format!("`...` was bound to {prev:?} earlier, here it is {leading:?}")));
                }
                _ => *ellipsis = Some(leading),
            }
        }
        for (i, d) in rest.iter().enumerate() {
            let Dim::Expr(e) = d else { continue };
            let got = actual[offset + i] as i64;
            if let ExprKind::Name(n) = &e.kind
                && is_symbolic_name(n)
                && scope.lookup_local(n).is_none()
                && !self.config.contains_key(n)
                && !self.instances[scope.inst.unwrap_or(0)].env.contains_key(n)
            {
                match symbols.get(n) {
                    Some(&v) if v != got => {
                        return Err(mismatch(self, format!("`{n}` was bound to {v} earlier, but dim {} here is {got}", offset + i)));
                    }
                    Some(_) => {}
                    None => {
                        symbols.insert(n.clone(), got);
                    }
                }
                continue;
            }
            let mut s2 = Scope { file: decl_file.clone(), locals: scope.locals.clone(), inst: scope.inst };
            s2.locals.push(symbols.iter().map(|(k, v)| (k.clone(), Value::Int(*v))).collect());
            let want = self.eval_const(e, &s2)?;
            let want = self.dim_value(&decl_file, e.span, &want)?;
            if want as i64 != got {
                let src = decl_file.text.get(e.span.start..e.span.end).unwrap_or("?");
                return Err(mismatch(self, format!("dim {} is {got}, but `{src}` = {want}", offset + i)));
            }
        }
        Ok(())
    }

    fn eval_init(&mut self, e: &ast::Expr, scope: &Scope, shape: &[usize]) -> Result<Init, Diagnostic> {
        let file = scope.file.clone();
        let ExprKind::Call { callee, args } = &e.kind else {
            return Err(self.err(&file, e.span, "an initialiser must be a call such as `normal(0, 0.02)`", "not an initialiser"));
        };
        let mut vals = vec![];
        for a in args {
            let v = self.eval_const(&a.value, scope)?;
            let Some(f) = v.as_f64() else {
                return Err(self.err(
                    &file,
                    a.value.span,
                    format!("initialiser arguments must be numbers, found {}", v.kind()),
                    "not a number",
                ));
            };
            vals.push((a.name.as_ref().map(|n| n.name.clone()), f, a.value.span));
        }
        let get = |names: &[&str], i: usize, default: Option<f64>| -> Result<f64, Diagnostic> {
            if let Some((_, v, _)) = vals.iter().find(|(n, _, _)| n.as_deref() == Some(names[i])) {
                return Ok(*v);
            }
            if let Some((_, v, _)) = vals.iter().filter(|(n, _, _)| n.is_none()).nth(i) {
                return Ok(*v);
            }
            default
                .ok_or_else(|| self.err(&file, e.span, format!("`{}` needs an argument `{}`", callee.name, names[i]), "missing argument"))
        };
        let fans = || -> (f64, f64) {
            let receptive: usize = shape.iter().skip(2).product();
            let fan_in = shape.get(1).copied().unwrap_or(shape.first().copied().unwrap_or(1)) * receptive.max(1);
            let fan_out = shape.first().copied().unwrap_or(1) * receptive.max(1);
            (fan_in as f64, fan_out as f64)
        };
        Ok(match callee.name.as_str() {
            "zeros" => Init::Zeros,
            "ones" => Init::Ones,
            "constant" => Init::Constant(get(&["v"], 0, None)?),
            "normal" => Init::Normal { mean: get(&["mean", "std"], 0, Some(0.0))?, std: get(&["mean", "std"], 1, Some(1.0))? },
            "uniform" => Init::Uniform { low: get(&["low", "high"], 0, Some(0.0))?, high: get(&["low", "high"], 1, Some(1.0))? },
            "kaiming_uniform" => {
                let fan_in = get(&["fan_in"], 0, Some(fans().0))?;
                if fan_in <= 0.0 {
                    return Err(self.err(&file, e.span, "kaiming_uniform needs a positive fan_in", "bad fan_in"));
                }
                let b = 1.0 / fan_in.sqrt();
                Init::Uniform { low: -b, high: b }
            }
            "xavier_uniform" => {
                let (fi, fo) = fans();
                let gain = get(&["gain"], 0, Some(1.0))?;
                let b = gain * (6.0 / (fi + fo)).sqrt();
                Init::Uniform { low: -b, high: b }
            }
            other => {
                let names = ["zeros", "ones", "constant", "normal", "uniform", "kaiming_uniform", "xavier_uniform"];
                let mut d = self.err(&file, callee.span, format!("unknown initialiser `{other}`"), "not an initialiser");
                if let Some(s) = suggest(other, names) {
                    d = d.with_help(format!("did you mean `{s}`?"));
                } else {
                    d = d.with_help(format!("initialisers are {}", names.join(", ")));
                }
                return Err(d);
            }
        })
    }

    pub fn next_noise_index(&mut self) -> usize {
        self.noise_counter += 1;
        self.noise_counter - 1
    }

    pub fn config_value(&self, name: &str) -> Option<&Value> {
        self.config.get(name)
    }
}

fn flatten_inputs(members: &[Member]) -> Vec<&Member> {
    members.iter().filter(|m| matches!(m, Member::Input { .. })).collect()
}

fn type_text(file: &SourceFile, ty: &TensorType) -> String {
    file.text.get(ty.span.start..ty.span.end).unwrap_or("?").to_string()
}
