//! The built-in operations of LANGUAGE.md §6: argument binding (positional and
//! keyword, with PyTorch's defaults) and dispatch to the builders in `ops`.

use super::expr::describe;
use super::{Elaborator, Scope, Value};
use crate::graph::{BinaryOp, DType, NodeId, ReduceOp, UnaryOp};
use crate::ops::{self, OpError};
use bm_grammar::Diagnostic;
use bm_grammar::ast::{Ident, Span};
use bm_grammar::diagnostic::suggest;

/// A parameter of a built-in: its name and default (`None`: required).
type ParamSpec = (&'static str, Option<ArgDefault>);

#[derive(Clone, Copy)]
enum ArgDefault {
    Int(i64),
    Bool(bool),
    Str(&'static str),
    None,
}

impl ArgDefault {
    fn value(self) -> Value {
        match self {
            ArgDefault::Int(i) => Value::Int(i),
            ArgDefault::Bool(b) => Value::Bool(b),
            ArgDefault::Str(s) => Value::Str(s.to_string()),
            ArgDefault::None => Value::None,
        }
    }
}

const UNARY: &[(&str, UnaryOp)] = &[
    ("exp", UnaryOp::Exp),
    ("log", UnaryOp::Log),
    ("sqrt", UnaryOp::Sqrt),
    ("rsqrt", UnaryOp::Rsqrt),
    ("abs", UnaryOp::Abs),
    ("tanh", UnaryOp::Tanh),
    ("sigmoid", UnaryOp::Sigmoid),
    ("relu", UnaryOp::Relu),
    ("sin", UnaryOp::Sin),
    ("cos", UnaryOp::Cos),
    ("square", UnaryOp::Square),
];

/// Every built-in's parameter list.
fn signature(name: &str) -> Option<&'static [ParamSpec]> {
    use ArgDefault as D;
    const X: ParamSpec = ("x", None);
    Some(match name {
        "exp" | "log" | "sqrt" | "rsqrt" | "abs" | "tanh" | "sigmoid" | "relu" | "sin" | "cos" | "square" | "silu" => &[X],
        "gelu" => &[X, ("approximate", Some(D::Str("tanh")))],
        "pow" => &[X, ("p", None)],
        "maximum" | "minimum" | "mse" | "bce_with_logits" => &[("a", None), ("b", None)],
        "where" => &[("c", None), ("a", None), ("b", None)],
        "sum" | "mean" | "max" | "min" | "var" | "logsumexp" => &[X, ("axis", Some(D::None)), ("keepdim", Some(D::Bool(false)))],
        "softmax" | "log_softmax" => &[X, ("axis", Some(D::Int(-1)))],
        "reshape" => &[X, ("shape", None)],
        "transpose" => &[X, ("a", None), ("b", None)],
        "permute" => &[X, ("dims", None)],
        "split" => &[X, ("n", None), ("axis", Some(D::Int(0)))],
        "concat" => &[("tensors", None), ("axis", Some(D::Int(0)))],
        "slice" => &[X, ("axis", None), ("start", None), ("end", None)],
        "squeeze" => &[X, ("axis", Some(D::None))],
        "unsqueeze" => &[X, ("axis", None)],
        "flatten" => &[X, ("start_axis", Some(D::Int(1)))],
        "embedding" => &[("table", None), ("ids", None)],
        "one_hot" => &[("ids", None), ("n", None)],
        "arange" => &[("n", None)],
        "zeros" | "ones" => &[("shape", None)],
        "full" => &[("shape", None), ("v", None)],
        "causal_mask" => &[("T", None)],
        "attention" => &[("q", None), ("k", None), ("v", None), ("causal", Some(D::Bool(false))), ("scale", Some(D::None))],
        "dropout" => &[X, ("p", None)],
        "cross_entropy" => &[("logits", None), ("targets", None), ("ignore_index", Some(D::Int(-100)))],
        "conv2d" => &[X, ("w", None), ("b", None), ("stride", Some(D::Int(1))), ("padding", Some(D::Int(0)))],
        "max_pool2d" | "avg_pool2d" => &[X, ("k", None), ("stride", Some(D::None))],
        _ => return None,
    })
}

pub fn is_builtin(name: &str) -> bool {
    signature(name).is_some()
}

const ALL: &[&str] = &[
    "exp",
    "log",
    "sqrt",
    "rsqrt",
    "abs",
    "tanh",
    "sigmoid",
    "relu",
    "sin",
    "cos",
    "square",
    "silu",
    "gelu",
    "pow",
    "maximum",
    "minimum",
    "where",
    "sum",
    "mean",
    "max",
    "min",
    "var",
    "logsumexp",
    "softmax",
    "log_softmax",
    "reshape",
    "transpose",
    "permute",
    "split",
    "concat",
    "slice",
    "squeeze",
    "unsqueeze",
    "flatten",
    "embedding",
    "one_hot",
    "arange",
    "zeros",
    "ones",
    "full",
    "causal_mask",
    "attention",
    "dropout",
    "cross_entropy",
    "mse",
    "bce_with_logits",
    "conv2d",
    "max_pool2d",
    "avg_pool2d",
];

struct Bound {
    vals: Vec<(Value, Span)>,
}

impl Bound {
    fn get(&self, i: usize) -> &Value {
        &self.vals[i].0
    }
    fn span(&self, i: usize) -> Span {
        self.vals[i].1
    }
}

fn bind(
    el: &Elaborator,
    name: &str,
    sig: &[ParamSpec],
    args: Vec<(Option<Ident>, Value, Span)>,
    scope: &Scope,
    span: Span,
) -> Result<Bound, Diagnostic> {
    let mut slots: Vec<Option<(Value, Span)>> = vec![None; sig.len()];
    let mut pos = 0;
    for (k, v, s) in args {
        match k {
            None => {
                if pos >= sig.len() {
                    return Err(el.err(&scope.file, s, format!("`{name}` takes at most {} arguments", sig.len()), "extra argument"));
                }
                slots[pos] = Some((v, s));
                pos += 1;
            }
            Some(k) => {
                let Some(i) = sig.iter().position(|(n, _)| *n == k.name) else {
                    let mut d = el.err(&scope.file, k.span, format!("`{name}` has no argument `{}`", k.name), "unknown argument");
                    if let Some(sug) = suggest(&k.name, sig.iter().map(|(n, _)| *n)) {
                        d = d.with_help(format!("did you mean `{sug}`?"));
                    }
                    return Err(d);
                };
                if slots[i].is_some() {
                    return Err(el.err(&scope.file, k.span, format!("argument `{}` is given twice", k.name), "duplicate"));
                }
                slots[i] = Some((v, s));
            }
        }
    }
    let mut vals = vec![];
    for (i, slot) in slots.into_iter().enumerate() {
        match slot {
            Some(v) => vals.push(v),
            None => match sig[i].1 {
                Some(d) => vals.push((d.value(), span)),
                None => {
                    let params: Vec<&str> = sig.iter().map(|(n, _)| *n).collect();
                    return Err(el
                        .err(&scope.file, span, format!("`{name}` needs an argument `{}`", sig[i].0), "missing argument")
                        .with_help(format!("{name}({})", params.join(", "))));
                }
            },
        }
    }
    Ok(Bound { vals })
}

pub fn call(
    el: &mut Elaborator,
    name: &str,
    name_span: Span,
    args: Vec<(Option<Ident>, Value, Span)>,
    scope: &Scope,
    span: Span,
) -> Result<Value, Diagnostic> {
    let Some(sig) = signature(name) else {
        if el.input.blocks.contains_key(name) {
            return Err(el
                .err(&scope.file, name_span, format!("`{name}` is a block; blocks are instantiated as members"), "cannot call a block here")
                .with_help(format!("declare `child = {name}(...)` in the block or model, then call `child(x)` in forward")));
        }
        let mut d = el.err(&scope.file, name_span, format!("unknown function `{name}`"), "not an operation");
        if let Some(s) = suggest(name, ALL.iter().copied()) {
            d = d.with_help(format!("did you mean `{s}`?"));
        }
        return Err(d);
    };
    let b = bind(el, name, sig, args, scope, span)?;
    el.set_origin(name, scope, span);
    let r = dispatch(el, name, &b, scope, span);
    r.map_err(|e| match e {
        Failure::Diag(d) => *d,
        Failure::Op(e) => {
            let operands: Vec<(Option<NodeId>, Span)> =
                b.vals.iter().map(|(v, s)| (if let Value::Tensor(t) = v { Some(*t) } else { None }, *s)).collect();
            el.op_error(e, scope, span, &operands)
        }
    })
}

enum Failure {
    Diag(Box<Diagnostic>),
    Op(OpError),
}

impl From<OpError> for Failure {
    fn from(e: OpError) -> Self {
        Failure::Op(e)
    }
}
impl From<Diagnostic> for Failure {
    fn from(d: Diagnostic) -> Self {
        Failure::Diag(Box::new(d))
    }
}

fn dispatch(el: &mut Elaborator, name: &str, b: &Bound, scope: &Scope, span: Span) -> Result<Value, Failure> {
    let file = scope.file.clone();
    let tensor = |el: &mut Elaborator, i: usize| -> Result<NodeId, Failure> { Ok(el.tensor_of(b.get(i), scope, b.span(i))?) };
    let int = |el: &Elaborator, i: usize| -> Result<i64, Failure> {
        b.get(i).as_i64().ok_or_else(|| {
            Failure::Diag(Box::new(el.err(
                &file,
                b.span(i),
                format!("expected an integer, found {}", describe(el, b.get(i))),
                "not an integer",
            )))
        })
    };
    let float = |el: &Elaborator, i: usize| -> Result<f64, Failure> {
        b.get(i).as_f64().ok_or_else(|| {
            Failure::Diag(Box::new(el.err(
                &file,
                b.span(i),
                format!("expected a number, found {}", describe(el, b.get(i))),
                "not a number",
            )))
        })
    };
    let boolean = |el: &Elaborator, i: usize| -> Result<bool, Failure> {
        match b.get(i) {
            Value::Bool(v) => Ok(*v),
            other => Err(Failure::Diag(Box::new(el.err(
                &file,
                b.span(i),
                format!("expected true or false, found {}", describe(el, other)),
                "not a bool",
            )))),
        }
    };
    let int_list = |el: &Elaborator, i: usize| -> Result<Vec<i64>, Failure> {
        match b.get(i) {
            Value::List(items) | Value::Tuple(items) => items
                .iter()
                .map(|v| {
                    v.as_i64().ok_or_else(|| {
                        Failure::Diag(Box::new(el.err(
                            &file,
                            b.span(i),
                            format!("expected a list of integers, found an element that is {}", v.text()),
                            "not integers",
                        )))
                    })
                })
                .collect(),
            v if v.as_i64().is_some() => Ok(vec![v.as_i64().unwrap_or(0)]),
            other => Err(Failure::Diag(Box::new(el.err(
                &file,
                b.span(i),
                format!("expected a list of integers, found {}", describe(el, other)),
                "not a list",
            )))),
        }
    };
    let axes = |el: &Elaborator, i: usize| -> Result<Vec<i64>, Failure> {
        match b.get(i) {
            Value::None => Ok(vec![]),
            _ => int_list(el, i),
        }
    };
    let shape = |el: &Elaborator, i: usize| -> Result<Vec<usize>, Failure> {
        let l = int_list(el, i)?;
        l.iter()
            .map(|&d| {
                if d >= 0 {
                    Ok(d as usize)
                } else {
                    Err(Failure::Diag(Box::new(el.err(&file, b.span(i), format!("dims must not be negative, got {d}"), "negative dim"))))
                }
            })
            .collect()
    };
    let t = Value::Tensor;

    if let Some((_, op)) = UNARY.iter().find(|(n, _)| *n == name) {
        if let Some(x) = b.get(0).as_f64() {
            return Ok(Value::Float(fold_unary(*op, x)));
        }
        let x = tensor(el, 0)?;
        return Ok(t(ops::unary(&mut el.g, *op, x)));
    }

    Ok(match name {
        "silu" => {
            let x = tensor(el, 0)?;
            t(ops::silu(&mut el.g, x)?)
        }
        "gelu" => {
            let exact = match b.get(1) {
                Value::Str(s) if s == "tanh" => false,
                Value::Str(s) if s == "none" => true,
                Value::None => true,
                other => {
                    return Err(Failure::Diag(Box::new(el.err(
                        &file,
                        b.span(1),
                        format!("gelu's `approximate` is \"tanh\" or \"none\", found {}", other.text()),
                        "bad value",
                    ))));
                }
            };
            let x = tensor(el, 0)?;
            t(ops::gelu(&mut el.g, x, exact)?)
        }
        "pow" => {
            if let (Some(x), Some(p)) = (b.get(0).as_f64(), b.get(1).as_f64()) {
                return Ok(Value::Float(x.powf(p)));
            }
            let (x, p) = (tensor(el, 0)?, tensor(el, 1)?);
            t(ops::binary(&mut el.g, BinaryOp::Pow, x, p)?)
        }
        "maximum" | "minimum" => {
            let op = if name == "maximum" { BinaryOp::Max } else { BinaryOp::Min };
            let (x, y) = (tensor(el, 0)?, tensor(el, 1)?);
            t(ops::binary(&mut el.g, op, x, y)?)
        }
        "where" => {
            let (c, x, y) = (tensor(el, 0)?, tensor(el, 1)?, tensor(el, 2)?);
            t(ops::select(&mut el.g, c, x, y)?)
        }
        "sum" | "mean" | "max" | "min" | "var" | "logsumexp" => {
            let ax = axes(el, 1)?;
            let keep = boolean(el, 2)?;
            let x = tensor(el, 0)?;
            let g = &mut el.g;
            t(match name {
                "sum" => ops::sum(g, x, &ax, keep)?,
                "mean" => ops::mean(g, x, &ax, keep)?,
                "max" => ops::reduce(g, ReduceOp::Max, x, &ax, keep)?,
                "min" => ops::reduce(g, ReduceOp::Min, x, &ax, keep)?,
                "var" => ops::var(g, x, &ax, keep)?,
                _ => ops::logsumexp(g, x, &ax, keep)?,
            })
        }
        "softmax" | "log_softmax" => {
            let a = int(el, 1)?;
            let x = tensor(el, 0)?;
            t(if name == "softmax" { ops::softmax(&mut el.g, x, a)? } else { ops::log_softmax(&mut el.g, x, a)? })
        }
        "reshape" => {
            let s = int_list(el, 1)?;
            let x = tensor(el, 0)?;
            t(ops::reshape_spec(&mut el.g, x, &s)?)
        }
        "transpose" => {
            let (a, c) = (int(el, 1)?, int(el, 2)?);
            let x = tensor(el, 0)?;
            t(ops::transpose(&mut el.g, x, a, c)?)
        }
        "permute" => {
            let dims = int_list(el, 1)?;
            let x = tensor(el, 0)?;
            let rank = el.g.shape(x).len();
            let perm = dims.iter().map(|&d| ops::norm_axis(d, rank)).collect::<Result<Vec<_>, _>>()?;
            t(ops::permute(&mut el.g, x, &perm)?)
        }
        "split" => {
            let n = int(el, 1)?;
            let a = int(el, 2)?;
            if n <= 0 {
                return Err(OpError::new(format!("split(): the number of parts must be positive, got {n}")).into());
            }
            let x = tensor(el, 0)?;
            Value::Tuple(ops::split(&mut el.g, x, n as usize, a)?.into_iter().map(Value::Tensor).collect())
        }
        "concat" => {
            let items = match b.get(0) {
                Value::List(v) | Value::Tuple(v) => v.clone(),
                other => {
                    return Err(Failure::Diag(Box::new(el.err(
                        &file,
                        b.span(0),
                        format!("concat() takes a list of tensors `[a, b]`, found {}", describe(el, other)),
                        "not a list",
                    ))));
                }
            };
            let mut ts = vec![];
            for v in &items {
                ts.push(el.tensor_of(v, scope, b.span(0))?);
            }
            let a = int(el, 1)?;
            t(ops::concat(&mut el.g, &ts, a)?)
        }
        "slice" => {
            let (a, s, e) = (int(el, 1)?, int(el, 2)?, int(el, 3)?);
            let x = tensor(el, 0)?;
            t(ops::slice(&mut el.g, x, a, s, e)?)
        }
        "squeeze" => {
            let a = match b.get(1) {
                Value::None => None,
                _ => Some(int(el, 1)?),
            };
            let x = tensor(el, 0)?;
            t(ops::squeeze(&mut el.g, x, a)?)
        }
        "unsqueeze" => {
            let a = int(el, 1)?;
            let x = tensor(el, 0)?;
            t(ops::unsqueeze(&mut el.g, x, a)?)
        }
        "flatten" => {
            let a = int(el, 1)?;
            let x = tensor(el, 0)?;
            t(ops::flatten(&mut el.g, x, a)?)
        }
        "embedding" => {
            let (tb, ids) = (tensor(el, 0)?, tensor(el, 1)?);
            t(ops::embedding(&mut el.g, tb, ids)?)
        }
        "one_hot" => {
            let n = int(el, 1)?;
            if n <= 0 {
                return Err(OpError::new(format!("one_hot(): n must be positive, got {n}")).into());
            }
            let ids = tensor(el, 0)?;
            t(ops::one_hot(&mut el.g, ids, n as usize)?)
        }
        "arange" => {
            let n = int(el, 0)?;
            if n < 0 {
                return Err(OpError::new(format!("arange(): n must not be negative, got {n}")).into());
            }
            t(ops::arange(&mut el.g, n as usize))
        }
        "zeros" | "ones" | "full" => {
            let s = shape(el, 0)?;
            let v = match name {
                "zeros" => 0.0,
                "ones" => 1.0,
                _ => float(el, 1)?,
            };
            t(ops::constant(&mut el.g, v, &s, DType::F32))
        }
        "causal_mask" => {
            let n = int(el, 0)?;
            if n <= 0 {
                return Err(OpError::new(format!("causal_mask(): T must be positive, got {n}")).into());
            }
            t(ops::causal_mask(&mut el.g, n as usize)?)
        }
        "attention" => {
            let causal = boolean(el, 3)?;
            let scale = match b.get(4) {
                Value::None => None,
                _ => Some(float(el, 4)?),
            };
            let (q, k, v) = (tensor(el, 0)?, tensor(el, 1)?, tensor(el, 2)?);
            t(ops::attention(&mut el.g, q, k, v, causal, scale)?)
        }
        "dropout" => {
            let p = float(el, 1)?;
            let x = tensor(el, 0)?;
            let idx = el.next_noise_index();
            t(ops::dropout(&mut el.g, x, p, idx)?)
        }
        "cross_entropy" => {
            let ii = int(el, 2)?;
            let (l, tg) = (tensor(el, 0)?, tensor(el, 1)?);
            let r = ops::cross_entropy(&mut el.g, l, tg, ii)?;
            el.g.classification = Some((l, tg, ii));
            t(r)
        }
        "mse" => {
            let (x, y) = (tensor(el, 0)?, tensor(el, 1)?);
            t(ops::mse(&mut el.g, x, y)?)
        }
        "bce_with_logits" => {
            let (x, y) = (tensor(el, 0)?, tensor(el, 1)?);
            t(ops::bce_with_logits(&mut el.g, x, y)?)
        }
        "conv2d" | "max_pool2d" | "avg_pool2d" => {
            return Err(Failure::Diag(Box::new(
                el.err(&file, span, format!("`{name}` (the vision group) is not implemented yet"), "not supported yet")
                    .with_help("see docs/LANGUAGE-STATUS.md for what is supported"),
            )));
        }
        _ => {
            return Err(Failure::Diag(Box::new(el.err(&file, span, format!("`{name}` is not implemented"), "here"))));
        }
    })
}

/// Compile-time numbers fold with the f64 reference semantics of every unary op.
fn fold_unary(op: UnaryOp, x: f64) -> f64 {
    crate::eval::unary(op, x)
}
