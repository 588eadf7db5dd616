//! Expression evaluation: compile-time folding and tensor expressions.

use super::{Elaborator, Scope, Value, builtins, is_symbolic_name};
use crate::graph::{BinaryOp as GBin, DType, NodeId, Origin};
use crate::ops::{self, OpError, shape_text};
use bm_grammar::Diagnostic;
use bm_grammar::ast::{self, BinaryOp, Body, Expr, ExprKind, Span, Stmt, UnaryOp};
use bm_grammar::diagnostic::suggest;

impl Elaborator<'_> {
    /// Evaluates an expression that must be a compile-time constant (shapes, config,
    /// block arguments, initialisers).
    pub fn eval_const(&mut self, e: &Expr, scope: &Scope) -> Result<Value, Diagnostic> {
        let mut s = Scope { file: scope.file.clone(), locals: scope.locals.clone(), inst: scope.inst };
        let nodes_before = self.g.len();
        let v = self.eval(e, &mut s)?;
        if !v.is_const() || self.g.len() != nodes_before {
            return Err(self.err(
                &scope.file,
                e.span,
                format!("expected a compile-time value, found {}", v.kind()),
                "not known at compile time",
            ));
        }
        Ok(v)
    }

    pub fn eval_body(&mut self, body: &Body, scope: &mut Scope) -> Result<Value, Diagnostic> {
        scope.locals.push(Default::default());
        let r = (|| {
            for s in &body.stmts {
                self.exec_stmt(s, scope)?;
            }
            match &body.tail {
                Some(t) => self.eval(t, scope),
                None => Ok(Value::None),
            }
        })();
        scope.locals.pop();
        r
    }

    pub fn exec_stmt(&mut self, s: &Stmt, scope: &mut Scope) -> Result<(), Diagnostic> {
        match s {
            Stmt::Let { names, value, .. } => {
                let v = self.eval(value, scope)?;
                if names.len() == 1 {
                    scope.bind(&names[0].name, v);
                } else {
                    let items = match v {
                        Value::Tuple(items) | Value::List(items) => items,
                        other => {
                            return Err(self.err(
                                &scope.file,
                                value.span,
                                format!("cannot destructure {} into {} names", other.kind(), names.len()),
                                "not a tuple",
                            ));
                        }
                    };
                    if items.len() != names.len() {
                        return Err(self.err(
                            &scope.file,
                            value.span,
                            format!("this gives {} values, but {} names are bound", items.len(), names.len()),
                            "wrong count",
                        ));
                    }
                    for (n, v) in names.iter().zip(items) {
                        scope.bind(&n.name, v);
                    }
                }
                Ok(())
            }
            Stmt::Expr(e) => self.eval(e, scope).map(|_| ()),
            Stmt::Output { span, .. } | Stmt::Loss { span, .. } => Err(self
                .err(&scope.file, *span, "`output` and `loss` are only allowed in the model's forward", "inside a block")
                .with_help("return the value from the block's forward instead")),
        }
    }

    pub fn unknown_name(&self, scope: &Scope, name: &str, span: Span) -> Diagnostic {
        let mut candidates: Vec<String> = scope.locals.iter().flat_map(|m| m.keys().cloned()).collect();
        if let Some(i) = scope.inst {
            let inst = &self.instances[i];
            candidates.extend(inst.params.keys().cloned());
            candidates.extend(inst.children.keys().cloned());
            candidates.extend(inst.env.keys().cloned());
        }
        candidates.extend(self.input.config.iter().map(|(k, _)| k.clone()));
        let mut d = self.err(&scope.file, span, format!("unknown name `{name}`"), "not defined here");
        if let Some(s) = suggest(name, candidates.iter().map(String::as_str)) {
            d = d.with_help(format!("did you mean `{s}`?"));
        } else if is_symbolic_name(name) {
            d = d.with_help(format!("symbolic dims like `{name}` are bound by a forward's argument types, e.g. `forward(x: [{name}, d])`"));
        }
        d
    }

    fn lookup(&self, scope: &Scope, name: &str) -> Option<Value> {
        if let Some(v) = scope.lookup_local(name) {
            return Some(v.clone());
        }
        if let Some(i) = scope.inst {
            let inst = &self.instances[i];
            if let Some(&p) = inst.params.get(name) {
                return Some(Value::Tensor(p));
            }
            if let Some(c) = inst.children.get(name) {
                return Some(c.clone());
            }
            if let Some(v) = inst.env.get(name) {
                return Some(v.clone());
            }
        }
        if let Some(v) = self.config_value(name) {
            return Some(v.clone());
        }
        match name {
            "true" => Some(Value::Bool(true)),
            "false" => Some(Value::Bool(false)),
            "none" => Some(Value::None),
            _ => None,
        }
    }

    pub fn set_origin(&mut self, what: &str, scope: &Scope, span: Span) {
        self.g.current_origin = Some(Origin { what: what.to_string(), file: scope.file.clone(), span });
    }

    /// Converts an `OpError` into a diagnostic at `span`, labelling the operands.
    pub fn op_error(&self, e: OpError, scope: &Scope, span: Span, operands: &[(Option<NodeId>, Span)]) -> Diagnostic {
        let mut d = self.err(&scope.file, span, e.message.clone(), "in this operation");
        for &i in &e.operands {
            if let Some((Some(id), s)) = operands.get(i) {
                let text = shape_text(self.g.dtype(*id), self.g.shape(*id));
                d = d.with_secondary(&scope.file, *s, format!("this is {text}"));
                if let Some(o) = &self.g.node(*id).origin {
                    d = d.with_note(format!("the {text} operand comes from `{}` at {}", o.what, o.location()));
                }
            }
        }
        if let Some(h) = e.help {
            d = d.with_help(h);
        }
        d
    }

    /// A tensor for a value (numbers become scalar constants).
    pub fn tensor_of(&mut self, v: &Value, scope: &Scope, span: Span) -> Result<NodeId, Diagnostic> {
        match v {
            Value::Tensor(id) => Ok(*id),
            Value::Int(i) => Ok(ops::constant(&mut self.g, *i as f64, &[], DType::I32)),
            Value::Float(f) => Ok(ops::constant(&mut self.g, *f, &[], DType::F32)),
            Value::Bool(b) => Ok(ops::constant(&mut self.g, f64::from(u8::from(*b)), &[], DType::Bool)),
            other => Err(self.err(&scope.file, span, format!("expected a tensor or a number, found {}", other.kind()), "not a tensor")),
        }
    }

    /// Evaluates an expression; a tensor result must stay within `MAX_ELEMENTS`, so that
    /// later stages (lowering, memory planning) never overflow or allocate absurdly.
    pub fn eval(&mut self, e: &Expr, scope: &mut Scope) -> Result<Value, Diagnostic> {
        let v = self.eval_unchecked(e, scope)?;
        let mut tensors = vec![&v];
        while let Some(t) = tensors.pop() {
            match t {
                Value::Tensor(id) => self.check_size(&scope.file, e.span, *id)?,
                Value::Tuple(items) | Value::List(items) => tensors.extend(items),
                _ => {}
            }
        }
        Ok(v)
    }

    fn eval_unchecked(&mut self, e: &Expr, scope: &mut Scope) -> Result<Value, Diagnostic> {
        match &e.kind {
            ExprKind::Int(i) => Ok(Value::Int(*i)),
            ExprKind::Float(f) => Ok(Value::Float(*f)),
            ExprKind::Str(s) => Ok(Value::Str(s.clone())),
            ExprKind::Bool(b) => Ok(Value::Bool(*b)),
            ExprKind::Name(n) => self.lookup(scope, n).ok_or_else(|| self.unknown_name(scope, n, e.span)),
            ExprKind::Tuple(items) => Ok(Value::Tuple(items.iter().map(|i| self.eval(i, scope)).collect::<Result<_, _>>()?)),
            ExprKind::List(items) => Ok(Value::List(items.iter().map(|i| self.eval(i, scope)).collect::<Result<_, _>>()?)),
            ExprKind::If { cond, then, otherwise } => {
                let c = self.eval(cond, scope)?;
                let Value::Bool(b) = c else {
                    return Err(self
                        .err(
                            &scope.file,
                            cond.span,
                            format!("an `if` condition must be a compile-time bool, found {}", c.kind()),
                            "not a bool",
                        )
                        .with_help("use `where(c, a, b)` to choose between tensors elementwise"));
                };
                self.eval_body(if b { then } else { otherwise }, scope)
            }
            ExprKind::Field(base, field) => self.eval_field(base, field, scope),
            ExprKind::Unary(UnaryOp::Neg, inner) => {
                let v = self.eval(inner, scope)?;
                match v {
                    Value::Int(i) => {
                        Ok(Value::Int(i.checked_neg().ok_or_else(|| self.err(&scope.file, e.span, "integer overflow", "here"))?))
                    }
                    Value::Float(f) => Ok(Value::Float(-f)),
                    Value::Tensor(id) => {
                        self.set_origin("-", scope, e.span);
                        let id = if self.g.dtype(id) == DType::I32 {
                            let z = ops::constant(&mut self.g, 0.0, &[], DType::I32);
                            ops::sub(&mut self.g, z, id).map_err(|er| self.op_error(er, scope, e.span, &[]))?
                        } else {
                            ops::neg(&mut self.g, id)
                        };
                        Ok(Value::Tensor(id))
                    }
                    other => Err(self.err(&scope.file, inner.span, format!("cannot negate {}", other.kind()), "not a number")),
                }
            }
            ExprKind::Binary(op, a, b) => {
                let va = self.eval(a, scope)?;
                let vb = self.eval(b, scope)?;
                self.binary(*op, va, vb, scope, e.span, a.span, b.span)
            }
            ExprKind::Call { callee, args } => {
                if let Some(v) = self.lookup(scope, &callee.name) {
                    return self.call_value(v, args, scope, e.span, &callee.name);
                }
                let mut evaluated = vec![];
                for a in args {
                    let v = self.eval(&a.value, scope)?;
                    evaluated.push((a.name.clone(), v, a.value.span));
                }
                builtins::call(self, &callee.name, callee.span, evaluated, scope, e.span)
            }
            ExprKind::Method { receiver, method, args } => {
                let r = self.eval(receiver, scope)?;
                let mut evaluated = vec![(None, r, receiver.span)];
                for a in args {
                    let v = self.eval(&a.value, scope)?;
                    evaluated.push((a.name.clone(), v, a.value.span));
                }
                builtins::call(self, &method.name, method.span, evaluated, scope, e.span)
            }
        }
    }

    fn call_value(&mut self, v: Value, args: &[ast::Arg], scope: &mut Scope, span: Span, name: &str) -> Result<Value, Diagnostic> {
        let mut vals = vec![];
        for a in args {
            if let Some(k) = &a.name {
                return Err(self.err(&scope.file, k.span, "a block's forward takes positional arguments only", "keyword argument"));
            }
            vals.push((self.eval(&a.value, scope)?, a.value.span));
        }
        let file = scope.file.clone();
        match v {
            Value::Instance(i) => self.call_instance(i, vals, &file, span),
            Value::Repeat(items) => {
                let mut cur = vals;
                for i in items {
                    let out = self.call_instance(i, cur, &file, span)?;
                    cur = vec![(out, span)];
                }
                Ok(cur.pop().map(|(v, _)| v).unwrap_or(Value::None))
            }
            other => Err(self.err(&file, span, format!("`{name}` is {}, not something that can be called", other.kind()), "not callable")),
        }
    }

    fn eval_field(&mut self, base: &Expr, field: &ast::Ident, scope: &mut Scope) -> Result<Value, Diagnostic> {
        let v = self.eval(base, scope)?;
        match v {
            Value::Tensor(id) if field.name == "T" => {
                self.set_origin(".T", scope, field.span);
                let r = ops::transpose(&mut self.g, id, -2, -1).map_err(|e| {
                    self.op_error(e.help("`.T` swaps the last two axes and needs rank ≥ 2"), scope, field.span, &[(Some(id), base.span)])
                })?;
                Ok(Value::Tensor(r))
            }
            Value::Instance(i) => {
                let inst = &self.instances[i];
                if let Some(&p) = inst.params.get(&field.name) {
                    return Ok(Value::Tensor(p));
                }
                if let Some(c) = inst.children.get(&field.name) {
                    return Ok(c.clone());
                }
                let mut names: Vec<&str> = inst.params.keys().map(String::as_str).collect();
                names.extend(inst.children.keys().map(String::as_str));
                let mut d = self.err(
                    &scope.file,
                    field.span,
                    format!("`{}` (a `{}`) has no parameter or child `{}`", inst.path, inst.block, field.name),
                    "unknown member",
                );
                if let Some(s) = suggest(&field.name, names.iter().copied()) {
                    d = d.with_help(format!("did you mean `{s}`?"));
                }
                Err(d)
            }
            Value::Repeat(items) => match field.name.parse::<usize>().ok().and_then(|i| items.get(i)) {
                Some(&i) => Ok(Value::Instance(i)),
                None => Err(self.err(
                    &scope.file,
                    field.span,
                    format!("a repeat has members 0 to {}", items.len().saturating_sub(1)),
                    "no such member",
                )),
            },
            other => Err(self
                .err(&scope.file, field.span, format!("{} has no field `{}`", other.kind(), field.name), "unknown field")
                .with_help(if field.name == "t" {
                    "did you mean `.T` (transpose)?"
                } else {
                    "fields exist on block instances (`child.param`) and `.T` on tensors"
                })),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn binary(&mut self, op: BinaryOp, a: Value, b: Value, scope: &Scope, span: Span, sa: Span, sb: Span) -> Result<Value, Diagnostic> {
        // Compile-time folding of numbers.
        if let (Some(x), Some(y)) = (num(&a), num(&b)) {
            return self.fold(op, x, y, scope, span, sb);
        }
        if let (Value::Bool(x), Value::Bool(y)) = (&a, &b) {
            return match op {
                BinaryOp::Eq => Ok(Value::Bool(x == y)),
                BinaryOp::Ne => Ok(Value::Bool(x != y)),
                _ => Err(self.err(&scope.file, span, format!("`{}` is not defined on bools", op.symbol()), "here")),
            };
        }
        if let (Value::Str(x), Value::Str(y)) = (&a, &b) {
            return match op {
                BinaryOp::Eq => Ok(Value::Bool(x == y)),
                BinaryOp::Ne => Ok(Value::Bool(x != y)),
                _ => Err(self.err(&scope.file, span, format!("`{}` is not defined on strings", op.symbol()), "here")),
            };
        }
        let ta = self.tensor_of(&a, scope, sa)?;
        let tb = self.tensor_of(&b, scope, sb)?;
        self.set_origin(op.symbol(), scope, span);
        let operands = [(Some(ta), sa), (Some(tb), sb)];
        let r = match op {
            BinaryOp::MatMul => ops::matmul(&mut self.g, ta, tb),
            BinaryOp::Add => ops::binary(&mut self.g, GBin::Add, ta, tb),
            BinaryOp::Sub => ops::binary(&mut self.g, GBin::Sub, ta, tb),
            BinaryOp::Mul => ops::binary(&mut self.g, GBin::Mul, ta, tb),
            BinaryOp::Div => ops::binary(&mut self.g, GBin::Div, ta, tb),
            BinaryOp::Lt => ops::binary(&mut self.g, GBin::Lt, ta, tb),
            BinaryOp::Le => ops::binary(&mut self.g, GBin::Le, ta, tb),
            BinaryOp::Gt => ops::binary(&mut self.g, GBin::Gt, ta, tb),
            BinaryOp::Ge => ops::binary(&mut self.g, GBin::Ge, ta, tb),
            BinaryOp::Eq => ops::binary(&mut self.g, GBin::Eq, ta, tb),
            BinaryOp::Ne => ops::binary(&mut self.g, GBin::Ne, ta, tb),
        };
        r.map(Value::Tensor).map_err(|e| self.op_error(e, scope, span, &operands))
    }

    fn fold(&self, op: BinaryOp, a: Num, b: Num, scope: &Scope, span: Span, sb: Span) -> Result<Value, Diagnostic> {
        let overflow = || self.err(&scope.file, span, "integer overflow in a compile-time expression", "overflows i64");
        if let (Num::I(x), Num::I(y)) = (a, b) {
            return Ok(match op {
                BinaryOp::Add => Value::Int(x.checked_add(y).ok_or_else(overflow)?),
                BinaryOp::Sub => Value::Int(x.checked_sub(y).ok_or_else(overflow)?),
                BinaryOp::Mul => Value::Int(x.checked_mul(y).ok_or_else(overflow)?),
                BinaryOp::Div => {
                    if y == 0 {
                        return Err(self.err(&scope.file, sb, "division by zero in a compile-time expression", "this is 0"));
                    }
                    // `i64::MIN / -1` overflows.
                    let q = x.checked_div(y).ok_or_else(overflow)?;
                    if q * y == x { Value::Int(q) } else { Value::Float(x as f64 / y as f64) }
                }
                BinaryOp::MatMul => {
                    return Err(self.err(&scope.file, span, "`@` needs tensors, not numbers", "numbers here"));
                }
                BinaryOp::Lt => Value::Bool(x < y),
                BinaryOp::Le => Value::Bool(x <= y),
                BinaryOp::Gt => Value::Bool(x > y),
                BinaryOp::Ge => Value::Bool(x >= y),
                BinaryOp::Eq => Value::Bool(x == y),
                BinaryOp::Ne => Value::Bool(x != y),
            });
        }
        let (x, y) = (a.f(), b.f());
        Ok(match op {
            BinaryOp::Add => Value::Float(x + y),
            BinaryOp::Sub => Value::Float(x - y),
            BinaryOp::Mul => Value::Float(x * y),
            BinaryOp::Div => {
                if y == 0.0 {
                    return Err(self.err(&scope.file, sb, "division by zero in a compile-time expression", "this is 0"));
                }
                Value::Float(x / y)
            }
            BinaryOp::MatMul => {
                return Err(self.err(&scope.file, span, "`@` needs tensors, not numbers", "numbers here"));
            }
            BinaryOp::Lt => Value::Bool(x < y),
            BinaryOp::Le => Value::Bool(x <= y),
            BinaryOp::Gt => Value::Bool(x > y),
            BinaryOp::Ge => Value::Bool(x >= y),
            BinaryOp::Eq => Value::Bool(x == y),
            BinaryOp::Ne => Value::Bool(x != y),
        })
    }
}

#[derive(Clone, Copy)]
enum Num {
    I(i64),
    F(f64),
}

impl Num {
    fn f(self) -> f64 {
        match self {
            Num::I(i) => i as f64,
            Num::F(f) => f,
        }
    }
}

fn num(v: &Value) -> Option<Num> {
    match v {
        Value::Int(i) => Some(Num::I(*i)),
        Value::Float(f) => Some(Num::F(*f)),
        _ => None,
    }
}

/// Describes a value for messages: shapes for tensors.
pub fn describe(el: &Elaborator, v: &Value) -> String {
    match v {
        Value::Tensor(id) => shape_text(el.g.dtype(*id), el.g.shape(*id)),
        other => other.kind().to_string(),
    }
}

impl Elaborator<'_> {
    /// Evaluates a `train` field or `config` value: like `eval_const`, but calls of
    /// unknown functions (`AdamW(lr = 1e-3)`, `every(100)`) are kept as data.
    pub fn eval_spec(&mut self, e: &Expr, scope: &Scope) -> Result<Value, Diagnostic> {
        match &e.kind {
            ExprKind::Call { callee, args } if !builtins::is_builtin(&callee.name) => {
                let mut c = super::CallValue { name: callee.name.clone(), positional: vec![], keyword: vec![], span: e.span };
                for a in args {
                    let v = self.eval_spec(&a.value, scope)?;
                    match &a.name {
                        Some(k) => c.keyword.push((k.name.clone(), v, a.value.span)),
                        None => c.positional.push((v, a.value.span)),
                    }
                }
                Ok(Value::Call(c))
            }
            ExprKind::Tuple(items) => Ok(Value::Tuple(items.iter().map(|i| self.eval_spec(i, scope)).collect::<Result<_, _>>()?)),
            _ => self.eval_const(e, scope),
        }
    }
}
