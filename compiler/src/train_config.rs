//! The `train` section (LANGUAGE.md §8): every field checked and resolved, with
//! PyTorch's defaults.

use crate::driver::Loaded;
use crate::elaborate::{CallValue, ElabInput, Elaborator, Scope, Value};
use crate::passes::optimizer::{Optimizer, OptimizerKind, Schedule};
use bm_grammar::ast::{Item, Span};
use bm_grammar::diagnostic::suggest;
use bm_grammar::{Diagnostic, SourceFile};
use bm_runtime::data::{DataSpec, Dataset, Tokenizer};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

#[derive(Clone, Debug)]
pub struct TrainSection {
    pub data: Option<DataSpec>,
    pub data_span: Span,
    pub batch: usize,
    pub steps: u64,
    pub epochs: Option<u64>,
    pub optimizer: Optimizer,
    pub schedule: Schedule,
    pub clip_grad: Option<f64>,
    pub eval_every: u64,
    pub eval_batches: usize,
    pub checkpoint_every: u64,
    pub seed: u64,
    pub precision: String,
    pub device: String,
    /// Field = value as written (after evaluation), for `info` and metadata.
    pub summary: Vec<(String, String)>,
}

const FIELDS: &[&str] =
    &["data", "batch", "steps", "epochs", "optimizer", "schedule", "clip_grad", "eval", "checkpoint", "seed", "precision", "device"];

impl TrainSection {
    /// Converts `epochs` into steps once the data's size is known.
    pub fn resolve_epochs(&mut self, ds: &Dataset) {
        if let Some(e) = self.epochs {
            self.steps = e * ds.steps_per_epoch(self.batch) as u64;
        }
    }
}

struct Ctx<'a> {
    file: &'a Arc<SourceFile>,
}

impl Ctx<'_> {
    fn err(&self, span: Span, msg: impl Into<String>, label: impl Into<String>) -> Diagnostic {
        Diagnostic::at(self.file, span, msg, label)
    }

    /// Binds a spec call's arguments to `params` (name, default); required when `None`.
    fn bind(&self, c: &CallValue, params: &[(&str, Option<Value>)]) -> Result<Vec<(Value, Span)>, Diagnostic> {
        let mut slots: Vec<Option<(Value, Span)>> = vec![None; params.len()];
        for (i, (v, s)) in c.positional.iter().enumerate() {
            if i >= params.len() {
                return Err(self.err(*s, format!("`{}` takes at most {} arguments", c.name, params.len()), "extra argument"));
            }
            slots[i] = Some((v.clone(), *s));
        }
        for (k, v, s) in &c.keyword {
            let Some(i) = params.iter().position(|(n, _)| n == k) else {
                let mut d = self.err(*s, format!("`{}` has no argument `{k}`", c.name), "unknown argument");
                if let Some(sug) = suggest(k, params.iter().map(|(n, _)| *n)) {
                    d = d.with_help(format!("did you mean `{sug}`?"));
                } else {
                    d = d.with_help(format!("{}({})", c.name, params.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")));
                }
                return Err(d);
            };
            if slots[i].is_some() {
                return Err(self.err(*s, format!("argument `{k}` is given twice"), "duplicate"));
            }
            slots[i] = Some((v.clone(), *s));
        }
        slots
            .into_iter()
            .zip(params)
            .map(|(s, (n, d))| match (s, d) {
                (Some(v), _) => Ok(v),
                (None, Some(d)) => Ok((d.clone(), c.span)),
                (None, None) => Err(self.err(c.span, format!("`{}` needs an argument `{n}`", c.name), "missing argument")),
            })
            .collect()
    }

    fn num(&self, v: &(Value, Span), what: &str) -> Result<f64, Diagnostic> {
        v.0.as_f64().ok_or_else(|| self.err(v.1, format!("{what} must be a number, found {}", v.0.text()), "not a number"))
    }

    fn count(&self, v: &(Value, Span), what: &str) -> Result<u64, Diagnostic> {
        match v.0.as_i64() {
            Some(i) if i >= 0 => Ok(i as u64),
            _ => Err(self.err(v.1, format!("{what} must be a non-negative integer, found {}", v.0.text()), "not a count")),
        }
    }

    fn positive(&self, v: &(Value, Span), what: &str) -> Result<u64, Diagnostic> {
        let n = self.count(v, what)?;
        if n == 0 {
            return Err(self.err(v.1, format!("{what} must be at least 1"), "zero"));
        }
        Ok(n)
    }

    fn boolean(&self, v: &(Value, Span), what: &str) -> Result<bool, Diagnostic> {
        match v.0 {
            Value::Bool(b) => Ok(b),
            _ => Err(self.err(v.1, format!("{what} must be true or false, found {}", v.0.text()), "not a bool")),
        }
    }

    fn string(&self, v: &(Value, Span), what: &str) -> Result<String, Diagnostic> {
        match &v.0 {
            Value::Str(s) => Ok(s.clone()),
            _ => Err(self.err(v.1, format!("{what} must be a string, found {}", v.0.text()), "not a string")),
        }
    }

    fn call<'v>(&self, v: &'v (Value, Span), field: &str, options: &[&str]) -> Result<&'v CallValue, Diagnostic> {
        match &v.0 {
            Value::Call(c) if options.contains(&c.name.as_str()) => Ok(c),
            Value::Call(c) => {
                let mut d = self.err(c.span, format!("unknown {field} `{}`", c.name), format!("not a {field}"));
                d = match suggest(&c.name, options.iter().copied()) {
                    Some(s) => d.with_help(format!("did you mean `{s}`?")),
                    None => d.with_help(format!("choose one of: {}", options.join(", "))),
                };
                Err(d)
            }
            other => Err(self.err(v.1, format!("`{field}` must be one of {}, found {}", options.join(", "), other.text()), "not a call")),
        }
    }
}

/// Evaluates and checks the `train` section (defaults when it is absent).
pub fn evaluate(loaded: &Loaded, config: &[(String, Value)]) -> Result<TrainSection, Diagnostic> {
    let file = &loaded.main;
    let cx = Ctx { file };
    let fields: Vec<&bm_grammar::ast::Field> =
        loaded.ast.items.iter().flat_map(|i| if let Item::Train { fields, .. } = i { fields.iter().collect() } else { vec![] }).collect();
    let blocks = HashMap::new();
    let input = ElabInput { model: None, blocks: &blocks, config, batch: 1, data_shapes: None };
    let mut el = Elaborator::new(&input);
    let scope = Scope { file: file.clone(), locals: vec![HashMap::new()], inst: None };
    let mut vals: HashMap<String, (Value, Span)> = HashMap::new();
    let mut summary = vec![];
    for f in &fields {
        if !FIELDS.contains(&f.name.name.as_str()) {
            let mut d = cx.err(f.name.span, format!("unknown train field `{}`", f.name.name), "not a train field");
            d = match suggest(&f.name.name, FIELDS.iter().copied()) {
                Some(s) => d.with_help(format!("did you mean `{s}`?")),
                None => d.with_help(format!("train fields: {}", FIELDS.join(", "))),
            };
            return Err(d);
        }
        if vals.contains_key(&f.name.name) {
            return Err(cx.err(f.name.span, format!("train field `{}` is set twice", f.name.name), "duplicate"));
        }
        let v = el.eval_spec(&f.value, &scope)?;
        summary.push((f.name.name.clone(), v.text()));
        vals.insert(f.name.name.clone(), (v, f.value.span));
    }
    if vals.contains_key("steps") && vals.contains_key("epochs") {
        return Err(cx.err(vals["epochs"].1, "set either `steps` or `epochs`, not both", "second length"));
    }
    // Data paths are made absolute at compile time, so a training binary finds its data
    // from any working directory on this machine (`--data` overrides it elsewhere).
    let base = Path::new(&file.path).parent().unwrap_or(Path::new("")).to_path_buf();
    let base = std::path::absolute(&base).unwrap_or(base);
    let resolve = |p: &str| -> String {
        let path = Path::new(p);
        if path.is_absolute() { p.to_string() } else { base.join(path).to_string_lossy().into_owned() }
    };
    let data_span = vals.get("data").map(|v| v.1).unwrap_or(Span::new(0, 0));
    let data = match vals.get("data") {
        None => None,
        Some(v) => {
            let c = cx.call(v, "data source", &["csv", "safetensors", "text", "tokens"])?;
            Some(match c.name.as_str() {
                "csv" => {
                    let a = cx.bind(
                        c,
                        &[
                            ("path", None),
                            ("label", Some(Value::Int(-1))),
                            ("header", Some(Value::Bool(true))),
                            ("scale", Some(Value::Float(1.0))),
                            ("split", Some(Value::Float(0.9))),
                            ("shuffle", Some(Value::Bool(true))),
                        ],
                    )?;
                    DataSpec::Csv {
                        path: resolve(&cx.string(&a[0], "the path")?),
                        label: a[1].0.as_i64().ok_or_else(|| cx.err(a[1].1, "`label` must be a column index", "not an integer"))?,
                        header: cx.boolean(&a[2], "`header`")?,
                        scale: cx.num(&a[3], "`scale`")?,
                        split: split(&cx, &a[4])?,
                        shuffle: cx.boolean(&a[5], "`shuffle`")?,
                    }
                }
                "safetensors" => {
                    let a = cx.bind(c, &[("path", None), ("split", Some(Value::Float(0.9))), ("shuffle", Some(Value::Bool(true)))])?;
                    DataSpec::Safetensors {
                        path: resolve(&cx.string(&a[0], "the path")?),
                        split: split(&cx, &a[1])?,
                        shuffle: cx.boolean(&a[2], "`shuffle`")?,
                    }
                }
                "text" => {
                    let a = cx.bind(
                        c,
                        &[
                            ("path", None),
                            ("ctx", None),
                            ("tokenizer", Some(Value::Str("bytes".into()))),
                            ("split", Some(Value::Float(0.9))),
                        ],
                    )?;
                    let tokenizer = match cx.string(&a[2], "`tokenizer`")?.as_str() {
                        "bytes" => Tokenizer::Bytes,
                        "chars" => Tokenizer::Chars,
                        other => {
                            return Err(cx
                                .err(a[2].1, format!("unknown tokenizer \"{other}\""), "not a tokenizer")
                                .with_help("use \"bytes\" or \"chars\""));
                        }
                    };
                    DataSpec::Text {
                        path: resolve(&cx.string(&a[0], "the path")?),
                        ctx: cx.positive(&a[1], "`ctx`")? as usize,
                        tokenizer,
                        split: split(&cx, &a[3])?,
                    }
                }
                _ => {
                    let a = cx.bind(c, &[("path", None), ("ctx", None), ("split", Some(Value::Float(0.9)))])?;
                    DataSpec::Tokens {
                        path: resolve(&cx.string(&a[0], "the path")?),
                        ctx: cx.positive(&a[1], "`ctx`")? as usize,
                        split: split(&cx, &a[2])?,
                    }
                }
            })
        }
    };
    let batch = match vals.get("batch") {
        Some(v) => cx.positive(v, "`batch`")? as usize,
        None => 32,
    };
    if batch > 1 << 24 {
        return Err(cx.err(vals["batch"].1, "`batch` is too large", "too large"));
    }
    let steps = match vals.get("steps") {
        Some(v) => cx.count(v, "`steps`")?,
        None => 1000,
    };
    let epochs = vals.get("epochs").map(|v| cx.positive(v, "`epochs`")).transpose()?;
    let optimizer = match vals.get("optimizer") {
        None => Optimizer {
            kind: OptimizerKind::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8, decoupled: true },
            lr: 1e-3,
            weight_decay: 0.01,
            decay_matrices_only: false,
        },
        Some(v) => optimizer(&cx, v)?,
    };
    let schedule = match vals.get("schedule") {
        None => Schedule::Constant,
        Some(v) => {
            let c = cx.call(v, "schedule", &["constant", "cosine", "linear", "step"])?;
            match c.name.as_str() {
                "constant" => {
                    cx.bind(c, &[])?;
                    Schedule::Constant
                }
                "cosine" => {
                    let a = cx.bind(c, &[("warmup", Some(Value::Int(0))), ("min_lr", Some(Value::Float(0.0)))])?;
                    Schedule::Cosine { warmup: cx.count(&a[0], "`warmup`")? as f64, min_lr: cx.num(&a[1], "`min_lr`")? }
                }
                "linear" => {
                    let a = cx.bind(c, &[("warmup", Some(Value::Int(0))), ("end_lr", Some(Value::Float(0.0)))])?;
                    Schedule::Linear { warmup: cx.count(&a[0], "`warmup`")? as f64, end_lr: cx.num(&a[1], "`end_lr`")? }
                }
                _ => {
                    let a = cx.bind(c, &[("every", None), ("gamma", None)])?;
                    Schedule::Step { every: cx.positive(&a[0], "`every`")? as f64, gamma: cx.num(&a[1], "`gamma`")? }
                }
            }
        }
    };
    let clip_grad = match vals.get("clip_grad") {
        None | Some((Value::None, _)) => None,
        Some(v) => {
            let x = cx.num(v, "`clip_grad`")?;
            if x <= 0.0 {
                return Err(cx.err(v.1, "`clip_grad` must be positive (or `none`)", "not positive"));
            }
            Some(x)
        }
    };
    let (eval_every, eval_batches) = match vals.get("eval") {
        None => (0, 10),
        Some(v) => {
            let c = cx.call(v, "eval", &["every"])?;
            let a = cx.bind(c, &[("n", None), ("batches", Some(Value::Int(10)))])?;
            (cx.positive(&a[0], "the eval interval")?, cx.positive(&a[1], "`batches`")? as usize)
        }
    };
    let checkpoint_every = match vals.get("checkpoint") {
        None => 0,
        Some(v) => {
            let c = cx.call(v, "checkpoint", &["every"])?;
            let a = cx.bind(c, &[("n", None)])?;
            cx.positive(&a[0], "the checkpoint interval")?
        }
    };
    let seed = match vals.get("seed") {
        Some(v) => cx.count(v, "`seed`")?,
        None => 0,
    };
    let precision = match vals.get("precision") {
        None => "f32".to_string(),
        Some(v) => match cx.string(v, "`precision`")?.as_str() {
            p @ ("f32" | "bf16") => p.to_string(),
            other => {
                return Err(cx
                    .err(v.1, format!("unknown precision \"{other}\""), "not a precision")
                    .with_help("use \"f32\" or \"bf16\" (bf16 matrix products, f32 master weights)"));
            }
        },
    };
    let device = match vals.get("device") {
        None => "cpu".to_string(),
        Some(v) => match cx.string(v, "`device`")?.as_str() {
            d @ ("cpu" | "cuda") => d.to_string(),
            other => return Err(cx.err(v.1, format!("unknown device \"{other}\""), "not a device").with_help("use \"cpu\" or \"cuda\"")),
        },
    };
    Ok(TrainSection {
        data,
        data_span,
        batch,
        steps,
        epochs,
        optimizer,
        schedule,
        clip_grad,
        eval_every,
        eval_batches,
        checkpoint_every,
        seed,
        precision,
        device,
        summary,
    })
}

fn split(cx: &Ctx, v: &(Value, Span)) -> Result<f64, Diagnostic> {
    let s = cx.num(v, "`split`")?;
    if !(s > 0.0 && s <= 1.0) {
        return Err(cx.err(v.1, format!("`split` must be in (0, 1], got {s}"), "out of range"));
    }
    Ok(s)
}

fn optimizer(cx: &Ctx, v: &(Value, Span)) -> Result<Optimizer, Diagnostic> {
    let c = cx.call(v, "optimizer", &["SGD", "Adam", "AdamW", "RMSprop"])?;
    let decay = |a: &(Value, Span)| -> Result<bool, Diagnostic> {
        match cx.string(a, "`decay`")?.as_str() {
            "all" => Ok(false),
            "matrices" => Ok(true),
            other => Err(cx
                .err(a.1, format!("unknown decay \"{other}\""), "bad value")
                .with_help("use \"all\" (PyTorch's default) or \"matrices\"")),
        }
    };
    let all = || Some(Value::Str("all".into()));
    let betas = |a: &(Value, Span)| -> Result<(f64, f64), Diagnostic> {
        match &a.0 {
            Value::Tuple(t) | Value::List(t) if t.len() == 2 => match (t[0].as_f64(), t[1].as_f64()) {
                (Some(x), Some(y)) if (0.0..1.0).contains(&x) && (0.0..1.0).contains(&y) => Ok((x, y)),
                _ => Err(cx.err(a.1, "`betas` must be two numbers in [0, 1)", "bad betas")),
            },
            _ => Err(cx.err(a.1, "`betas` must be a pair like (0.9, 0.999)", "not a pair")),
        }
    };
    let lr_of = |a: &(Value, Span)| -> Result<f64, Diagnostic> {
        let lr = cx.num(a, "`lr`")?;
        if lr < 0.0 || !lr.is_finite() {
            return Err(cx.err(a.1, format!("`lr` must be a non-negative number, got {lr}"), "bad lr"));
        }
        Ok(lr)
    };
    Ok(match c.name.as_str() {
        "SGD" => {
            let a = cx.bind(
                c,
                &[
                    ("lr", None),
                    ("momentum", Some(Value::Float(0.0))),
                    ("nesterov", Some(Value::Bool(false))),
                    ("weight_decay", Some(Value::Float(0.0))),
                    ("decay", all()),
                ],
            )?;
            let nesterov = cx.boolean(&a[2], "`nesterov`")?;
            let momentum = cx.num(&a[1], "`momentum`")?;
            if nesterov && momentum <= 0.0 {
                return Err(cx.err(a[2].1, "Nesterov momentum needs momentum > 0", "nesterov without momentum"));
            }
            Optimizer {
                kind: OptimizerKind::Sgd { momentum, nesterov },
                lr: lr_of(&a[0])?,
                weight_decay: cx.num(&a[3], "`weight_decay`")?,
                decay_matrices_only: decay(&a[4])?,
            }
        }
        "Adam" | "AdamW" => {
            let wd = if c.name == "AdamW" { 0.01 } else { 0.0 };
            let a = cx.bind(
                c,
                &[
                    ("lr", Some(Value::Float(1e-3))),
                    ("betas", Some(Value::Tuple(vec![Value::Float(0.9), Value::Float(0.999)]))),
                    ("eps", Some(Value::Float(1e-8))),
                    ("weight_decay", Some(Value::Float(wd))),
                    ("decay", all()),
                ],
            )?;
            let (beta1, beta2) = betas(&a[1])?;
            Optimizer {
                kind: OptimizerKind::Adam { beta1, beta2, eps: cx.num(&a[2], "`eps`")?, decoupled: c.name == "AdamW" },
                lr: lr_of(&a[0])?,
                weight_decay: cx.num(&a[3], "`weight_decay`")?,
                decay_matrices_only: decay(&a[4])?,
            }
        }
        _ => {
            let a = cx.bind(
                c,
                &[
                    ("lr", Some(Value::Float(1e-2))),
                    ("alpha", Some(Value::Float(0.99))),
                    ("eps", Some(Value::Float(1e-8))),
                    ("momentum", Some(Value::Float(0.0))),
                    ("weight_decay", Some(Value::Float(0.0))),
                    ("decay", all()),
                ],
            )?;
            Optimizer {
                kind: OptimizerKind::RmsProp {
                    alpha: cx.num(&a[1], "`alpha`")?,
                    eps: cx.num(&a[2], "`eps`")?,
                    momentum: cx.num(&a[3], "`momentum`")?,
                },
                lr: lr_of(&a[0])?,
                weight_decay: cx.num(&a[4], "`weight_decay`")?,
                decay_matrices_only: decay(&a[5])?,
            }
        }
    })
}
