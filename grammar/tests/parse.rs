//! Tests of the `.bm` parser: the reference example, every construct, syntax errors
//! with their messages and positions, and robustness (fuzzing, deep nesting).

use bm_grammar::ast::*;
use bm_grammar::{Diagnostic, SourceFile, parse};
use proptest::prelude::*;
use std::time::{Duration, Instant};

const EXAMPLE: &str = r#"# models/gpt.bm — character-level GPT
config {
  vocab  = 65
  ctx    = 256
  d      = 384
  heads  = 6
  layers = 6
}

block Attention(d, heads) {
  qkv  = Linear(d, 3 * d)
  proj = Linear(d, d)

  forward(x: [B, T, d]) -> [B, T, d] {
    let q, k, v = split(qkv(x), 3, axis = -1)
    let q = q.reshape([B, T, heads, d / heads]).transpose(1, 2)
    let k = k.reshape([B, T, heads, d / heads]).transpose(1, 2)
    let v = v.reshape([B, T, heads, d / heads]).transpose(1, 2)
    let att = softmax(q @ k.T / sqrt(d / heads) + causal_mask(T), axis = -1)
    proj((att @ v).transpose(1, 2).reshape([B, T, d]))
  }
}

block Mlp(d) {
  fc   = Linear(d, 4 * d)
  proj = Linear(4 * d, d)
  forward(x) { proj(gelu(fc(x))) }
}

block Layer(d, heads) {
  ln1  = LayerNorm(d)
  attn = Attention(d, heads)
  ln2  = LayerNorm(d)
  mlp  = Mlp(d)
  forward(x) {
    let x = x + attn(ln1(x))
    x + mlp(ln2(x))
  }
}

model Gpt {
  wte  = Embedding(vocab, d)
  wpe  = Embedding(ctx, d)
  h    = repeat(layers, Layer(d, heads))
  ln_f = LayerNorm(d)
  head = Linear(d, vocab, bias = false)

  input tokens:  i32[B, ctx]
  input targets: i32[B, ctx]

  forward {
    let x = wte(tokens) + wpe(arange(ctx))
    let logits = head(ln_f(h(x)))
    output logits
    loss cross_entropy(logits, targets)
  }
}

train {
  data       = text("data/input.txt", ctx = ctx, tokenizer = "chars")
  batch      = 64
  steps      = 5000
  optimizer  = AdamW(lr = 1e-3, betas = (0.9, 0.99), weight_decay = 0.1)
  schedule   = cosine(warmup = 100, min_lr = 1e-4)
  clip_grad  = 1.0
  eval       = every(250, batches = 20)
  checkpoint = every(1000)
  seed       = 1337
}
"#;

// ------------------------------------------------------------------ helpers

fn ok(src: &str) -> File {
    let f = SourceFile::new("t.bm", src);
    match parse(&f) {
        Ok(ast) => ast,
        Err(d) => panic!("unexpected error:\n{}", d.render(false)),
    }
}

fn err(src: &str) -> Diagnostic {
    let f = SourceFile::new("t.bm", src);
    match parse(&f) {
        Ok(ast) => panic!("expected an error, got {ast:?}"),
        Err(d) => d,
    }
}

/// Asserts the message and the 1-based line/column of a syntax error.
#[track_caller]
fn check_err(src: &str, message: &str, line: usize, col: usize) -> Diagnostic {
    let d = err(src);
    assert_eq!(d.message, message, "\n{}", d.render(false));
    let (_, l, c) = d.location().expect("a location");
    assert_eq!((l, c), (line, col), "\n{}", d.render(false));
    let p = d.primary.as_ref().unwrap();
    assert!(p.span.end > p.span.start, "empty primary span");
    // Rendering never panics.
    let _ = d.render(false);
    d
}

fn text(src: &str, sp: Span) -> &str {
    &src[sp.start..sp.end]
}

fn model(file: &File) -> &BlockDef {
    file.items
        .iter()
        .find_map(|i| match i {
            Item::Model(b) => Some(b),
            _ => None,
        })
        .expect("a model")
}

fn block<'a>(file: &'a File, name: &str) -> &'a BlockDef {
    file.items
        .iter()
        .find_map(|i| match i {
            Item::Block(b) if b.name.name == name => Some(b),
            _ => None,
        })
        .expect("the block")
}

fn forward(b: &BlockDef) -> &Forward {
    b.members
        .iter()
        .find_map(|m| match m {
            Member::Forward(f) => Some(f),
            _ => None,
        })
        .expect("a forward")
}

fn fields(file: &File, train: bool) -> &[Field] {
    file.items
        .iter()
        .find_map(|i| match (i, train) {
            (Item::Config { entries, .. }, false) => Some(entries.as_slice()),
            (Item::Train { fields, .. }, true) => Some(fields.as_slice()),
            _ => None,
        })
        .expect("the section")
}

fn field<'a>(fs: &'a [Field], name: &str) -> &'a Expr {
    &fs.iter().find(|f| f.name.name == name).expect("the field").value
}

/// The expression of a one-line `let x = <src>` in a model's forward.
fn expr(src: &str) -> (String, Expr) {
    let program = format!("model M {{\n  forward {{\n    let x = {src}\n  }}\n}}\n");
    let file = ok(&program);
    let f = forward(model(&file));
    match &f.body.stmts[0] {
        Stmt::Let { value, .. } => (program.clone(), value.clone()),
        s => panic!("{s:?}"),
    }
}

fn name(e: &Expr) -> &str {
    match &e.kind {
        ExprKind::Name(n) => n,
        k => panic!("not a name: {k:?}"),
    }
}

// ------------------------------------------------------------------ the example

#[test]
fn example_parses() {
    let file = ok(EXAMPLE);
    assert_eq!(file.items.len(), 6);
    assert!(matches!(file.items[0], Item::Config { .. }));
    assert!(matches!(file.items[5], Item::Train { .. }));
    assert_eq!(fields(&file, false).len(), 5);
    assert_eq!(fields(&file, true).len(), 9);

    let att = block(&file, "Attention");
    assert_eq!(att.params.len(), 2);
    assert!(!att.is_model);
    assert_eq!(att.members.len(), 3);
    assert!(matches!(&att.members[0], Member::Child { name, .. } if name.name == "qkv"));
    assert!(matches!(&att.members[1], Member::Child { name, .. } if name.name == "proj"));
    let f = forward(att);
    let params = f.params.as_ref().unwrap();
    assert_eq!(params[0].name.name, "x");
    assert_eq!(params[0].ty.as_ref().unwrap().dims.as_ref().unwrap().len(), 3);
    assert_eq!(f.ret.as_ref().unwrap().dims.as_ref().unwrap().len(), 3);
    assert_eq!(f.body.stmts.len(), 5);
    assert!(f.body.tail.is_some());

    // let q, k, v = split(qkv(x), 3, axis = -1)
    match &f.body.stmts[0] {
        Stmt::Let { names, value, span } => {
            let ns: Vec<&str> = names.iter().map(|n| n.name.as_str()).collect();
            assert_eq!(ns, ["q", "k", "v"]);
            assert_eq!(text(EXAMPLE, names[1].span), "k");
            assert_eq!(text(EXAMPLE, *span), "let q, k, v = split(qkv(x), 3, axis = -1)");
            let ExprKind::Call { callee, args } = &value.kind else { panic!() };
            assert_eq!(callee.name, "split");
            assert_eq!(args.len(), 3);
            assert_eq!(args[2].name.as_ref().unwrap().name, "axis");
            assert_eq!(args[2].value.kind, ExprKind::Int(-1));
            assert_eq!(text(EXAMPLE, args[2].value.span), "-1");
            assert!(matches!(&args[0].value.kind, ExprKind::Call { callee, .. } if callee.name == "qkv"));
        }
        s => panic!("{s:?}"),
    }
    // q @ k.T / ... : k.T is Field(Name k, T)
    let Stmt::Let { value, .. } = &f.body.stmts[4] else { panic!() };
    let ExprKind::Call { args, .. } = &value.kind else { panic!() };
    let ExprKind::Binary(BinaryOp::Add, lhs, _) = &args[0].value.kind else { panic!() };
    let ExprKind::Binary(BinaryOp::Div, mm, _) = &lhs.kind else { panic!() };
    let ExprKind::Binary(BinaryOp::MatMul, q, kt) = &mm.kind else { panic!() };
    assert_eq!(name(q), "q");
    let ExprKind::Field(k, t) = &kt.kind else { panic!() };
    assert_eq!((name(k), t.name.as_str()), ("k", "T"));
    assert_eq!(text(EXAMPLE, kt.span), "k.T");
    assert_eq!(text(EXAMPLE, mm.span), "q @ k.T");

    // The tail: a method chain on a parenthesised expression.
    let tail = f.body.tail.as_ref().unwrap();
    assert_eq!(text(EXAMPLE, tail.span), "proj((att @ v).transpose(1, 2).reshape([B, T, d]))");
    let ExprKind::Call { args, .. } = &tail.kind else { panic!() };
    let ExprKind::Method { receiver, method, args: rargs } = &args[0].value.kind else { panic!() };
    assert_eq!(method.name, "reshape");
    assert!(matches!(&rargs[0].value.kind, ExprKind::List(l) if l.len() == 3));
    let ExprKind::Method { receiver: inner, method, .. } = &receiver.kind else { panic!() };
    assert_eq!(method.name, "transpose");
    assert_eq!(text(EXAMPLE, receiver.span), "(att @ v).transpose(1, 2)");
    assert!(matches!(inner.kind, ExprKind::Binary(BinaryOp::MatMul, _, _)));

    // Mlp's one-line forward.
    let mlp = forward(block(&file, "Mlp"));
    assert!(mlp.body.stmts.is_empty());
    assert_eq!(text(EXAMPLE, mlp.body.tail.as_ref().unwrap().span), "proj(gelu(fc(x)))");

    // The model.
    let m = model(&file);
    assert!(m.is_model);
    assert_eq!(m.name.name, "Gpt");
    assert_eq!(m.members.len(), 8);
    let Member::Child { value, .. } = &m.members[2] else { panic!() };
    let ExprKind::Call { callee, args } = &value.kind else { panic!() };
    assert_eq!(callee.name, "repeat");
    assert!(matches!(&args[1].value.kind, ExprKind::Call { callee, .. } if callee.name == "Layer"));
    let Member::Input { name, ty, .. } = &m.members[5] else { panic!() };
    assert_eq!(name.name, "tokens");
    assert_eq!(ty.dtype.as_ref().unwrap().name, "i32");
    assert_eq!(text(EXAMPLE, ty.span), "i32[B, ctx]");
    let mf = forward(m);
    assert!(mf.params.is_none());
    assert!(mf.ret.is_none());
    assert!(matches!(&mf.body.stmts[2], Stmt::Output { name, value: None, .. } if name.name == "logits"));
    assert!(matches!(&mf.body.stmts[3], Stmt::Loss { .. }));
    assert!(mf.body.tail.is_none());

    // train
    let t = fields(&file, true);
    let ExprKind::Call { args, .. } = &field(t, "optimizer").kind else { panic!() };
    assert_eq!(args[0].value.kind, ExprKind::Float(1e-3));
    assert!(matches!(&args[1].value.kind, ExprKind::Tuple(v) if v.len() == 2 && v[1].kind == ExprKind::Float(0.99)));
    assert_eq!(field(t, "seed").kind, ExprKind::Int(1337));
    assert_eq!(field(t, "clip_grad").kind, ExprKind::Float(1.0));
}

#[test]
fn weight_tying_expression() {
    let (src, e) = expr("x @ wte.weight.T");
    let ExprKind::Binary(BinaryOp::MatMul, x, rhs) = &e.kind else { panic!("{e:?}") };
    assert_eq!(name(x), "x");
    let ExprKind::Field(inner, t) = &rhs.kind else { panic!() };
    assert_eq!(t.name, "T");
    assert_eq!(text(&src, t.span), "T");
    let ExprKind::Field(wte, weight) = &inner.kind else { panic!() };
    assert_eq!((name(wte), weight.name.as_str()), ("wte", "weight"));
    assert_eq!(text(&src, inner.span), "wte.weight");
    assert_eq!(text(&src, rhs.span), "wte.weight.T");
    assert_eq!(text(&src, e.span), "x @ wte.weight.T");
}

// ------------------------------------------------------------------ constructs

#[test]
fn config_values() {
    let src = "config {\n  a = 3; b = 3.0; c = 1e-3\n  d = -2\n  e = \"hi \\\"there\\\" \\\\\"\n  f = true\n  g = false\n  h = 2 * a + 1\n  i = 1.5e3\n}\n";
    let file = ok(src);
    let c = fields(&file, false);
    assert_eq!(c.len(), 9);
    assert_eq!(field(c, "a").kind, ExprKind::Int(3));
    assert_eq!(field(c, "b").kind, ExprKind::Float(3.0));
    assert_eq!(field(c, "c").kind, ExprKind::Float(1e-3));
    assert_eq!(field(c, "d").kind, ExprKind::Int(-2));
    assert_eq!(field(c, "e").kind, ExprKind::Str("hi \"there\" \\".into()));
    assert_eq!(field(c, "f").kind, ExprKind::Bool(true));
    assert_eq!(field(c, "g").kind, ExprKind::Bool(false));
    assert!(matches!(field(c, "h").kind, ExprKind::Binary(BinaryOp::Add, _, _)));
    assert_eq!(field(c, "i").kind, ExprKind::Float(1500.0));
    assert_eq!(text(src, c[0].span), "a = 3");
    assert_eq!(text(src, c[0].name.span), "a");
}

#[test]
fn negative_literals_fold() {
    assert_eq!(expr("-2").1.kind, ExprKind::Int(-2));
    assert_eq!(expr("- 2.5").1.kind, ExprKind::Float(-2.5));
    assert_eq!(expr("-9223372036854775808").1.kind, ExprKind::Int(i64::MIN));
    let (src, e) = expr("-x.T");
    let ExprKind::Unary(UnaryOp::Neg, inner) = &e.kind else { panic!() };
    assert!(matches!(inner.kind, ExprKind::Field(..)));
    assert_eq!(text(&src, e.span), "-x.T");
    // `a - -1`
    let (_, e) = expr("a - -1");
    let ExprKind::Binary(BinaryOp::Sub, _, r) = &e.kind else { panic!() };
    assert_eq!(r.kind, ExprKind::Int(-1));
}

#[test]
fn precedence() {
    let (_, e) = expr("a + b * c - d");
    // (a + (b * c)) - d
    let ExprKind::Binary(BinaryOp::Sub, l, d) = &e.kind else { panic!() };
    assert_eq!(name(d), "d");
    let ExprKind::Binary(BinaryOp::Add, a, bc) = &l.kind else { panic!() };
    assert_eq!(name(a), "a");
    assert!(matches!(bc.kind, ExprKind::Binary(BinaryOp::Mul, _, _)));
    // comparisons are lowest
    let (_, e) = expr("a + 1 < b * 2");
    let ExprKind::Binary(BinaryOp::Lt, l, r) = &e.kind else { panic!() };
    assert!(matches!(l.kind, ExprKind::Binary(BinaryOp::Add, _, _)));
    assert!(matches!(r.kind, ExprKind::Binary(BinaryOp::Mul, _, _)));
    for (op, b) in [
        ("<", BinaryOp::Lt),
        ("<=", BinaryOp::Le),
        (">", BinaryOp::Gt),
        (">=", BinaryOp::Ge),
        ("==", BinaryOp::Eq),
        ("!=", BinaryOp::Ne),
        ("@", BinaryOp::MatMul),
        ("/", BinaryOp::Div),
    ] {
        let (src, e) = expr(&format!("a {op} b"));
        assert!(matches!(e.kind, ExprKind::Binary(x, _, _) if x == b), "{op}");
        assert_eq!(text(&src, e.span), format!("a {op} b"));
    }
    // parentheses
    let (_, e) = expr("(a + b) * c");
    let ExprKind::Binary(BinaryOp::Mul, l, _) = &e.kind else { panic!() };
    assert!(matches!(l.kind, ExprKind::Binary(BinaryOp::Add, _, _)));
}

#[test]
fn tuples_lists_calls_methods() {
    assert!(matches!(expr("(1, 2)").1.kind, ExprKind::Tuple(ref v) if v.len() == 2));
    assert!(matches!(expr("(1,)").1.kind, ExprKind::Tuple(ref v) if v.len() == 1));
    assert!(matches!(expr("()").1.kind, ExprKind::Tuple(ref v) if v.is_empty()));
    assert_eq!(expr("(1)").1.kind, ExprKind::Int(1));
    assert!(matches!(expr("[a, b, 3,]").1.kind, ExprKind::List(ref v) if v.len() == 3));
    assert!(matches!(expr("[]").1.kind, ExprKind::List(ref v) if v.is_empty()));
    let (src, e) = expr("f(a, b = 2, c = [1, 2])");
    let ExprKind::Call { callee, args } = &e.kind else { panic!() };
    assert_eq!(text(&src, callee.span), "f");
    assert!(args[0].name.is_none());
    assert_eq!(args[1].name.as_ref().unwrap().name, "b");
    assert!(matches!(args[2].value.kind, ExprKind::List(_)));
    // a comparison as a positional argument is not a keyword argument
    let (_, e) = expr("f(a == b)");
    let ExprKind::Call { args, .. } = &e.kind else { panic!() };
    assert!(args[0].name.is_none());
    // method chains
    let (src, e) = expr("x.reshape([B, -1]).sum(axis = 1).T.mean()");
    let ExprKind::Method { receiver, method, args } = &e.kind else { panic!() };
    assert_eq!(method.name, "mean");
    assert!(args.is_empty());
    assert_eq!(text(&src, receiver.span), "x.reshape([B, -1]).sum(axis = 1).T");
    assert!(matches!(receiver.kind, ExprKind::Field(_, ref t) if t.name == "T"));
    assert_eq!(expr("f()").1.kind, ExprKind::Call { callee: Ident { name: "f".into(), span: Span::new(34, 35) }, args: vec![] });
    // none is a plain name
    assert_eq!(expr("none").1.kind, ExprKind::Name("none".into()));
}

#[test]
fn if_expressions() {
    let (src, e) = expr("if d > 4 { a } else { b + 1 }");
    let ExprKind::If { cond, then, otherwise } = &e.kind else { panic!() };
    assert!(matches!(cond.kind, ExprKind::Binary(BinaryOp::Gt, _, _)));
    assert_eq!(name(then.tail.as_ref().unwrap()), "a");
    assert_eq!(text(&src, otherwise.span), "{ b + 1 }");
    assert_eq!(text(&src, e.span), "if d > 4 { a } else { b + 1 }");
    let (src, e) = expr("if a { 1 } else if b { 2 } else { 3 }");
    let ExprKind::If { otherwise, .. } = &e.kind else { panic!() };
    let inner = otherwise.tail.as_ref().unwrap();
    assert_eq!(text(&src, inner.span), "if b { 2 } else { 3 }");
    assert!(matches!(inner.kind, ExprKind::If { .. }));
    // multi-line bodies, `else` on the next line
    let src = "model M {\n  forward {\n    let y = if a {\n      let t = 1\n      t + 1\n    }\n    else {\n      2\n    }\n    output y\n  }\n}\n";
    let file = ok(src);
    let Stmt::Let { value, .. } = &forward(model(&file)).body.stmts[0] else { panic!() };
    let ExprKind::If { then, .. } = &value.kind else { panic!() };
    assert_eq!(then.stmts.len(), 1);
    assert!(then.tail.is_some());
}

#[test]
fn members_of_all_kinds() {
    let src = r#"
import "lib/blocks.bm"
import "other.bm"

block Thing(d, hidden = 4 * d, act = "gelu", bias = true) {
  param w: [d, hidden] = normal(0, 0.02)
  param b: f32[hidden] = zeros()
  param o: [hidden] = ones()
  param u: bf16[d, d] = uniform(-0.1, 0.1)
  param k: [d, d] = kaiming_uniform(d)
  param x: [d, d] = xavier_uniform()
  param c: [d] = constant(0.5)
  param s: f32
  param e: []

  if bias {
    lin = Linear(d, d)
  } else if d > 8 {
    lin = Linear(d, d, bias = false)
  } else {
    lin = Linear(d, 1)
  }
  if d == 1 { one = Linear(1, 1) }

  forward(x: [..., d], mask: bool[B, T], ids: i32[B], y) -> [..., hidden] {
    x @ w + b
  }
}

model M {
  layers = repeat(3, Thing(8))
  input tokens: i32[B, 16]
  input pixels: f32[B, 3, 28, 28]
  input scalar: f32
  forward {
    let h = layers(pixels)
    output h
    output probs = softmax(h, axis = -1)
    loss mse(h, h)
  }
}
"#;
    let file = ok(src);
    assert_eq!(file.items.len(), 4);
    assert!(
        matches!(&file.items[0], Item::Import { path, span } if path == "lib/blocks.bm" && text(src, *span) == "import \"lib/blocks.bm\"")
    );
    let t = block(&file, "Thing");
    assert_eq!(t.params.len(), 4);
    assert!(t.params[0].default.is_none());
    assert!(matches!(t.params[1].default.as_ref().unwrap().kind, ExprKind::Binary(BinaryOp::Mul, _, _)));
    assert_eq!(t.params[2].default.as_ref().unwrap().kind, ExprKind::Str("gelu".into()));
    let params: Vec<_> = t
        .members
        .iter()
        .filter_map(|m| match m {
            Member::Param { name, ty, init, span } => Some((name, ty, init, span)),
            _ => None,
        })
        .collect();
    assert_eq!(params.len(), 9);
    let inits: Vec<String> = params
        .iter()
        .filter_map(|p| match &p.2.as_ref()?.kind {
            ExprKind::Call { callee, .. } => Some(callee.name.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(inits, ["normal", "zeros", "ones", "uniform", "kaiming_uniform", "xavier_uniform", "constant"]);
    assert!(params[0].1.dtype.is_none());
    assert_eq!(params[1].1.dtype.as_ref().unwrap().name, "f32");
    assert_eq!(text(src, *params[0].3), "param w: [d, hidden] = normal(0, 0.02)");
    // bare dtype and empty shape
    assert!(params[7].2.is_none());
    assert_eq!(params[7].1.dims, None);
    assert_eq!(params[8].1.dims, Some(vec![]));
    // if / else if / else
    let ifs: Vec<_> = t.members.iter().filter(|m| matches!(m, Member::If { .. })).collect();
    assert_eq!(ifs.len(), 2);
    let Member::If { cond, then, otherwise, .. } = ifs[0] else { panic!() };
    assert_eq!(name(cond), "bias");
    assert_eq!(then.len(), 1);
    assert_eq!(otherwise.len(), 1);
    let Member::If { then, otherwise, span, .. } = &otherwise[0] else { panic!() };
    assert!(text(src, *span).starts_with("if d > 8 {"));
    assert_eq!(then.len(), 1);
    assert!(matches!(&otherwise[0], Member::Child { name, .. } if name.name == "lin"));
    let Member::If { otherwise, .. } = ifs[1] else { panic!() };
    assert!(otherwise.is_empty());
    // forward params
    let f = forward(t);
    let ps = f.params.as_ref().unwrap();
    assert_eq!(ps.len(), 4);
    let dims = ps[0].ty.as_ref().unwrap().dims.as_ref().unwrap();
    assert!(matches!(dims[0], Dim::Ellipsis(sp) if text(src, sp) == "..."));
    assert!(matches!(&dims[1], Dim::Expr(e) if name(e) == "d"));
    assert_eq!(ps[1].ty.as_ref().unwrap().dtype.as_ref().unwrap().name, "bool");
    assert_eq!(ps[2].ty.as_ref().unwrap().dtype.as_ref().unwrap().name, "i32");
    assert!(ps[3].ty.is_none());
    assert!(matches!(f.ret.as_ref().unwrap().dims.as_ref().unwrap()[0], Dim::Ellipsis(_)));
    // model
    let m = model(&file);
    let inputs: Vec<_> = m.members.iter().filter(|m| matches!(m, Member::Input { .. })).collect();
    assert_eq!(inputs.len(), 3);
    let mf = forward(m);
    assert!(matches!(&mf.body.stmts[2], Stmt::Output { name, value: Some(_), .. } if name.name == "probs"));
    assert_eq!(mf.body.stmts.len(), 4);
}

#[test]
fn empty_forward_params_and_no_block_params() {
    let file = ok("block B {\n  forward() { 1 }\n}\nblock C() {}\n");
    let b = block(&file, "B");
    assert!(b.params.is_empty());
    assert_eq!(forward(b).params, Some(vec![]));
    assert!(block(&file, "C").members.is_empty());
}

#[test]
fn every_train_field() {
    let src = r#"train {
  data       = csv("data/iris.csv", label = -1, header = true, scale = 1.0, split = 0.9, shuffle = false)
  batch      = 32
  epochs     = 10
  steps      = 1000
  optimizer  = Adam(lr = 3e-4, betas = (0.9, 0.99), eps = 1e-8, weight_decay = 0, decay = "matrices")
  schedule   = step(100, 0.5)
  clip_grad  = none
  eval       = every(250, batches = 20)
  checkpoint = every(1000)
  seed       = 1337
  precision  = "bf16"
  device     = "cuda"
}
"#;
    let file = ok(src);
    let t = fields(&file, true);
    assert_eq!(t.len(), 12);
    assert_eq!(field(t, "clip_grad").kind, ExprKind::Name("none".into()));
    let ExprKind::Call { callee, args } = &field(t, "eval").kind else { panic!() };
    assert_eq!(callee.name, "every");
    assert_eq!(args[0].value.kind, ExprKind::Int(250));
    assert_eq!(args[1].name.as_ref().unwrap().name, "batches");
    let ExprKind::Call { args, .. } = &field(t, "optimizer").kind else { panic!() };
    let betas = args.iter().find(|a| a.name.as_ref().is_some_and(|n| n.name == "betas")).unwrap();
    assert_eq!(
        betas.value.kind,
        ExprKind::Tuple(vec![
            Expr { kind: ExprKind::Float(0.9), span: betas.value.span_of_first() },
            Expr { kind: ExprKind::Float(0.99), span: betas.value.span_of_second() },
        ])
    );
    assert_eq!(field(t, "precision").kind, ExprKind::Str("bf16".into()));
    for data in
        ["text(\"a.txt\", ctx = 8, tokenizer = \"bytes\", split = 0.9)", "tokens(\"t.bin\", 1024)", "safetensors(\"d.safetensors\")"]
    {
        let file = ok(&format!("train {{ data = {data} }}"));
        assert!(matches!(fields(&file, true)[0].value.kind, ExprKind::Call { .. }));
    }
    for sched in ["constant()", "cosine(warmup = 100, min_lr = 1e-4)", "linear(warmup = 0, end_lr = 0)"] {
        ok(&format!("train {{\n schedule = {sched}\n}}"));
    }
    for opt in ["SGD(lr = 0.1, momentum = 0.9, nesterov = true)", "RMSprop(lr = 0.01, alpha = 0.99)", "AdamW(lr = 1e-3)"] {
        ok(&format!("train {{\n optimizer = {opt}\n}}"));
    }
}

trait TupleSpans {
    fn span_of_first(&self) -> Span;
    fn span_of_second(&self) -> Span;
}
impl TupleSpans for Expr {
    fn span_of_first(&self) -> Span {
        match &self.kind {
            ExprKind::Tuple(v) => v[0].span,
            _ => panic!(),
        }
    }
    fn span_of_second(&self) -> Span {
        match &self.kind {
            ExprKind::Tuple(v) => v[1].span,
            _ => panic!(),
        }
    }
}

#[test]
fn comments_separators_and_multiline_arguments() {
    let src = "# header comment\n\n\nconfig { d = 4; heads = 2 }  # trailing\n# between items\n\nmodel M {\n  # a comment line\n\n  lin = Linear(\n    d,      # the input width\n    2 * d,\n    bias = false,\n  ); ln = LayerNorm(d)\n  input x: [\n    B,\n    d\n  ]\n  forward {\n    let y = (lin(x) +\n      lin(\n        x\n      ))\n    let z = (y\n      + 1\n      * 2)\n    output y; loss mean(z)\n  }\n}\n# the end";
    let file = ok(src);
    assert_eq!(file.items.len(), 2);
    let c = fields(&file, false);
    assert_eq!(c.len(), 2);
    let m = model(&file);
    assert_eq!(m.members.len(), 4);
    let Member::Child { value, .. } = &m.members[0] else { panic!() };
    let ExprKind::Call { args, .. } = &value.kind else { panic!() };
    assert_eq!(args.len(), 3);
    assert_eq!(text(src, args[1].value.span), "2 * d");
    let f = forward(m);
    assert_eq!(f.body.stmts.len(), 4);
    let Stmt::Let { value, .. } = &f.body.stmts[0] else { panic!() };
    assert!(matches!(value.kind, ExprKind::Binary(BinaryOp::Add, _, _)));
    let Stmt::Let { value, .. } = &f.body.stmts[1] else { panic!() };
    assert!(matches!(value.kind, ExprKind::Binary(BinaryOp::Add, _, _)));
    // Windows line endings
    let crlf = EXAMPLE.replace('\n', "\r\n");
    assert_eq!(ok(&crlf).items.len(), 6);
    // An empty file and a comment-only file are valid.
    assert!(ok("").items.is_empty());
    assert!(ok("# nothing\n\n").items.is_empty());
    // Strings containing `#` and brackets are not comments or brackets.
    let file = ok("config {\n  s = \"# ( [ {\"\n}\n");
    assert_eq!(fields(&file, false)[0].value.kind, ExprKind::Str("# ( [ {".into()));
}

#[test]
fn unicode_in_comments_and_strings() {
    let src = "# modèle — ünïcode\nconfig { s = \"héllo\" }\n";
    let file = ok(src);
    let f = &fields(&file, false)[0];
    assert_eq!(text(src, f.value.span), "\"héllo\"");
}

// ------------------------------------------------------------------ errors

#[test]
fn error_missing_close_paren() {
    let d = check_err("model M {\n  x = Linear(d, 3 * d\n  proj = Linear(d, d)\n}\n", "expected `,` or `)`, found `proj`", 3, 3);
    assert_eq!(d.secondary.len(), 1);
    assert_eq!(d.secondary[0].span, Span::new(22, 23));
    assert!(d.help.as_ref().unwrap().contains("line 2, column 13"), "{:?}", d.help);
}

#[test]
fn error_unclosed_brace() {
    let d = check_err("model M {\n  x = Linear(1, 2)\n", "expected a member or `}`, found end of file", 2, 19);
    assert!(d.help.as_ref().unwrap().contains("`}`"));
    assert_eq!(d.secondary[0].span, Span::new(8, 9));
    check_err("block A(d) {\n  forward(x) {\n    x\n}\nblock B(d) {\n}\n", "expected a member or `}`, found `block`", 5, 1);
}

#[test]
fn error_stray_token() {
    let d = check_err("model M {\n  x = Linear(1, 2) )\n}\n", "expected a newline or `}`, found `)`", 2, 20);
    assert!(d.help.unwrap().contains("no matching `(`"));
    check_err("config {\n  a = 1 $\n}\n", "expected a newline or `}`, found `$`", 2, 9);
    check_err("model M {\n  forward {\n    let x = f(1 2)\n  }\n}\n", "expected `,` or `)`, found `2`", 3, 17);
}

#[test]
fn error_bad_numbers() {
    check_err("config {\n  batch = 1e\n}\n", "invalid number literal `1e`", 2, 11);
    check_err("config {\n  batch = 12ab\n}\n", "invalid number literal `12ab`", 2, 11);
    check_err("config {\n  batch = 1.2.3\n}\n", "invalid number literal `1.2.3`", 2, 11);
    check_err(
        "config {\n  batch = 99999999999999999999\n}\n",
        "integer literal `99999999999999999999` does not fit in a 64-bit integer",
        2,
        11,
    );
    check_err(
        "config {\n  batch = -9223372036854775809\n}\n",
        "integer literal `-9223372036854775809` does not fit in a 64-bit integer",
        2,
        12,
    );
    check_err("config {\n  big = 1e999\n}\n", "float literal `1e999` is out of range", 2, 9);
}

#[test]
fn error_let_without_eq() {
    check_err("block B(d) {\n  forward(x) {\n    let y 3\n    y\n  }\n}\n", "expected `=` or `,`, found `3`", 3, 11);
    check_err("model M {\n  forward {\n    let x = \n  }\n}\n", "expected an expression, found a newline", 3, 13);
}

#[test]
fn error_missing_member_name() {
    let d = check_err("block B(d) {\n  = Linear(d, d)\n}\n", "expected a member or `}`, found `=`", 2, 3);
    assert!(d.help.unwrap().contains("needs a name"));
    let d = check_err("block B(d) {\n  let x = 1\n}\n", "expected a member or `}`, found `let`", 2, 3);
    assert!(d.help.unwrap().contains("inside a `forward"));
}

#[test]
fn error_unknown_item() {
    let d = check_err("modle Foo {\n}\n", "expected an item (`import`, `config`, `block`, `model` or `train`), found `modle`", 1, 1);
    assert_eq!(d.help.as_deref(), Some("did you mean `model`?"));
    let d = check_err(
        "config { a = 1 }\nfoo\n",
        "expected an item (`import`, `config`, `block`, `model` or `train`) or end of file, found `foo`",
        2,
        1,
    );
    assert!(d.help.is_some());
}

#[test]
fn error_unterminated_string() {
    let d = check_err("import \"foo.bm\n", "unterminated string literal", 1, 8);
    assert!(d.help.unwrap().contains("closing"));
    check_err("config {\n  s = \"abc\\\"\n}\n", "unterminated string literal", 2, 7);
    check_err("config {\n  s = \"a\\qb\"\n}\n", "unknown escape `\\q` in string", 2, 9);
}

#[test]
fn error_helps() {
    let d = check_err("config {\n  vocab 65\n}\n", "expected `=`, found `65`", 2, 9);
    assert!(d.help.unwrap().contains("name = value"));
    let d = check_err("block B(d) {\n  if d = 3 {\n    x = Linear(d, d)\n  }\n}\n", "expected `{`, found `=`", 2, 8);
    assert!(d.help.unwrap().contains("=="));
    let d = check_err("model M {\n  forward {\n    let model = 3\n  }\n}\n", "expected an identifier, found `model`", 3, 9);
    assert!(d.help.unwrap().contains("keyword"));
    let d = check_err("model M {\n  forward {\n    let x = a < b < c\n  }\n}\n", "expected a newline or `}`, found `<`", 3, 19);
    assert!(d.help.unwrap().contains("chain"));
    check_err("model M {\n  forward x {\n  }\n}\n", "expected `(`, `->` or `{`, found `x`", 2, 11);
    check_err("model M {\n  forward {\n    let x = 1 +\n 2\n  }\n}\n", "expected an expression, found a newline", 3, 16);
    check_err("model M {\n  input x: f32 y\n}\n", "expected a newline or `}`, found `y`", 2, 16);
    check_err("model M {\n  forward {\n    let x = f(a]\n  }\n}\n", "expected `,` or `)`, found `]`", 3, 16);
    check_err("model M {\n  x = [1, ...]\n}\n", "expected an expression or `]`, found `...`", 2, 11);
    check_err("model M(d) {\n}\n", "expected `{`, found `(`", 1, 8);
}

#[test]
fn error_duplicate_sections() {
    for (kw, body) in [("config", "{ a = 1 }"), ("model", "M { }"), ("train", "{ seed = 1 }")] {
        let src = format!("{kw} {body}\nblock B() {{}}\n{kw} {body}\n");
        let d = check_err(&src, &format!("a file may contain only one `{kw}` item"), 3, 1);
        assert_eq!(d.secondary.len(), 1);
        assert_eq!(d.secondary[0].span, Span::new(0, kw.len()));
    }
    // blocks and imports may repeat
    ok("import \"a.bm\"\nimport \"b.bm\"\nblock A() {}\nblock B() {}\n");
}

// ------------------------------------------------------------------ robustness

#[test]
fn deep_nesting_is_an_error_not_a_crash() {
    for open in ["(", "[", "{", "f(", "if a {"] {
        let src = format!("model M {{\n  x = {}\n}}\n", open.repeat(10_000));
        let d = err(&src);
        assert!(d.message.contains("nested too deeply"), "{open}: {}", d.message);
    }
    // Long chains of operators, unary minus, fields and else-ifs.
    for e in [
        "-".repeat(100_000) + "x",
        vec!["a"; 100_000].join(" + "),
        "x".to_string() + &".f".repeat(100_000),
        "if a { 1 }".to_string() + &" else if a { 1 }".repeat(10_000) + " else { 2 }",
    ] {
        let src = format!("model M {{\n  forward {{\n    let y = {e}\n  }}\n}}\n");
        let d = err(&src);
        assert!(d.message.contains("nested too deeply"), "{}", d.message);
    }
    let src = format!("model M {{\n  {} }}\n", "if a { x = L() } else ".repeat(10_000) + "{ x = L() }");
    let d = err(&src);
    assert!(d.message.contains("too many `else if`") || d.message.contains("nested too deeply"), "{}", d.message);
}

#[test]
fn failing_deep_input_is_fast() {
    for e in [
        "f(".repeat(250) + "x y",
        "[(".repeat(125) + "x y",
        "(if a { ".repeat(120) + "1 +",
        "g(a = ".repeat(250) + "x ==",
        "if a { 1 } else ".repeat(5000),
    ] {
        let src = format!("model M {{\n  forward {{\n    let y = {e}\n  }}\n}}\n");
        let t = Instant::now();
        let d = err(&src);
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}: {}", t.elapsed(), d.message);
    }
}

#[test]
fn nesting_within_the_limit_parses() {
    let e = "(".repeat(200) + "x" + &")".repeat(200);
    let (_, p) = expr(&e);
    assert_eq!(p.kind, ExprKind::Name("x".into()));
    let e = vec!["a"; 400].join(" + ");
    expr(&e);
    let e = "f(".repeat(200) + "x" + &")".repeat(200);
    expr(&e);
}

#[test]
fn large_input_is_linear() {
    let big = EXAMPLE.replace("block ", "block X");
    let mut src = String::new();
    for i in 0..300 {
        src.push_str(
            &big.replace("model Gpt", &format!("block G{i}()"))
                .replace("config {", &format!("block C{i}() {{"))
                .replace("train {", &format!("block T{i}() {{"))
                .replace(" = text(", " = t(")
                .replace("input ", "param ")
                .replace("output logits", "logits"),
        );
    }
    let t = Instant::now();
    let f = SourceFile::new("big.bm", src.clone());
    if let Err(d) = parse(&f) {
        panic!("{}", d.render(false));
    }
    assert!(t.elapsed() < Duration::from_secs(20), "{:?} for {} bytes", t.elapsed(), src.len());
}

fn mutate(src: &str, ops: &[(u8, usize, usize)]) -> String {
    const TOKENS: [&str; 24] = [
        "(",
        ")",
        "[",
        "]",
        "{",
        "}",
        ",",
        "=",
        "==",
        "\n",
        ";",
        "#",
        "\"",
        "...",
        "->",
        ".",
        "@",
        "-",
        "let",
        "if",
        "else",
        "model",
        "1e",
        "99999999999999999999",
    ];
    let mut s: Vec<char> = src.chars().collect();
    for &(kind, at, which) in ops {
        if s.is_empty() {
            break;
        }
        let at = at % s.len();
        match kind % 4 {
            0 => {
                s.remove(at);
            }
            1 => {
                let tok = TOKENS[which % TOKENS.len()];
                for (k, c) in tok.chars().enumerate() {
                    s.insert(at + k, c);
                }
            }
            2 => s[at] = TOKENS[which % TOKENS.len()].chars().next().unwrap(),
            _ => {
                // delete a short run
                let end = (at + which % 8).min(s.len());
                s.drain(at..end);
            }
        }
    }
    s.into_iter().collect()
}

fn parse_quickly(src: String) {
    let f = SourceFile::new("fuzz.bm", src);
    let t = Instant::now();
    let r = parse(&f);
    assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
    if let Err(d) = r {
        let _ = d.render(false);
        let _ = d.location();
        if let Some(p) = &d.primary {
            assert!(p.span.start <= f.text.len().max(1));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_strings_never_panic(s in "\\PC{0,200}") {
        parse_quickly(s);
    }

    #[test]
    fn random_token_soup_never_panics(s in "([(){}\\[\\],;=#\"\\n .@+*/<>!-]|let|if|else|model|block|forward|x|1|2.5){0,120}") {
        parse_quickly(s);
    }

    #[test]
    fn mutations_of_the_example_never_panic(ops in proptest::collection::vec((0u8..4, 0usize..100_000, 0usize..100), 1..6)) {
        parse_quickly(mutate(EXAMPLE, &ops));
    }
}

#[test]
fn project_bm_files_parse() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for rel in ["models/mlp.bm", "compiler/src/elaborate/prelude.bm"] {
        // Skipped when another part of the project moved the file.
        let Ok(src) = std::fs::read_to_string(root.join(rel)) else { continue };
        let f = SourceFile::new(rel, src);
        if let Err(d) = parse(&f) {
            panic!("{rel}:\n{}", d.render(false));
        }
    }
}
