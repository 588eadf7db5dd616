//! Fused attention: the `Attention` op against the unfused composition of primitives
//! (forward and gradients, in f64 through `eval` and in f32 through lowering and the
//! runtime), finite differences of the fused op, and the fusion pass on `.bm` sources:
//! every common spelling becomes one `Attention` node per layer, near-misses stay as
//! they are.

#![allow(clippy::needless_range_loop)]

use bm_runtime::kir::Init;
use bmc::driver::{self, FileSource, Options, Stage};
use bmc::eval::{Tensor, evaluate};
use bmc::graph::{DType, Graph, NodeId, Op, ParamInfo};
use bmc::ops;
use bmc::passes::autodiff::differentiate;
use std::collections::HashMap;

/// Test inputs from the runtime's SplitMix64 generator.
struct Rng(bm_runtime::rng::Rng);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(bm_runtime::rng::Rng::new(seed))
    }
    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.0.uniform()
    }
    fn tensor(&mut self, shape: &[usize], lo: f64, hi: f64) -> Tensor {
        Tensor::new(shape.to_vec(), (0..shape.iter().product()).map(|_| self.uniform(lo, hi)).collect())
    }
}

/// `softmax(q @ kᵀ · scale + mask) @ v` from primitive builders (what a user writes).
fn unfused_attention(g: &mut Graph, q: NodeId, k: NodeId, v: NodeId, mask: Option<NodeId>, causal: bool, scale: f64) -> NodeId {
    let kt = ops::transpose(g, k, -2, -1).unwrap();
    let s = ops::matmul(g, q, kt).unwrap();
    let mut s = ops::mul_scalar(g, s, scale);
    if causal {
        let t = *g.shape(q).iter().rev().nth(1).unwrap();
        let m = ops::causal_mask(g, t).unwrap();
        s = ops::add(g, s, m).unwrap();
    }
    if let Some(m) = mask {
        s = ops::add(g, s, m).unwrap();
    }
    let p = ops::softmax(g, s, -1).unwrap();
    ops::matmul(g, p, v).unwrap()
}

#[derive(Clone, Debug)]
struct Shape {
    batch: Vec<usize>,
    tq: usize,
    tk: usize,
    d: usize,
    dv: usize,
    causal: bool,
    /// The mask's shape (broadcastable to `[batch..., tq, tk]`), if any.
    mask: Option<Vec<usize>>,
}

fn with(batch: &[usize], a: usize, b: usize) -> Vec<usize> {
    let mut s = batch.to_vec();
    s.extend([a, b]);
    s
}

fn shapes() -> Vec<Shape> {
    let s = |batch: &[usize], tq, tk, d, dv, causal, mask: Option<Vec<usize>>| Shape { batch: batch.to_vec(), tq, tk, d, dv, causal, mask };
    vec![
        s(&[], 1, 1, 1, 1, false, None),
        s(&[], 1, 1, 3, 2, true, None),
        s(&[2], 7, 7, 3, 5, true, None),
        s(&[2], 7, 7, 4, 4, false, None),
        s(&[2, 3], 7, 7, 4, 3, true, Some(vec![2, 1, 7, 7])),
        s(&[2, 3], 33, 33, 4, 4, true, None),
        s(&[2, 3], 33, 33, 5, 3, false, Some(vec![33, 33])),
        s(&[3], 5, 9, 4, 2, false, None),
        s(&[3], 5, 9, 4, 2, false, Some(vec![3, 5, 9])),
        s(&[2, 3], 9, 70, 3, 4, false, Some(vec![2, 3, 1, 70])),
    ]
}

/// Mask values: uniform in [-1, 1), with some -inf entries (never a whole row).
fn mask_tensor(rng: &mut Rng, shape: &[usize]) -> Tensor {
    let cols = *shape.last().unwrap();
    let mut t = rng.tensor(shape, -1.0, 1.0);
    for (i, x) in t.data.iter_mut().enumerate() {
        let j = i % cols;
        if j != 0 && rng.next_u64().is_multiple_of(5) {
            *x = f64::NEG_INFINITY;
        }
    }
    t
}

/// A graph with params q, k, v (and input mask), `y` = attention (fused or not), loss
/// `sum(y * w)` and the gradients of q, k, v as outputs `grad.q` ...
struct Built {
    g: Graph,
    feeds: HashMap<String, Tensor>,
}

fn build(s: &Shape, fused: bool, seed: u64) -> Built {
    let mut rng = Rng::new(seed);
    let mut g = Graph::new();
    let mut feeds = HashMap::new();
    let mut params = vec![];
    for (name, shape) in [("q", with(&s.batch, s.tq, s.d)), ("k", with(&s.batch, s.tk, s.d)), ("v", with(&s.batch, s.tk, s.dv))] {
        let id = g.add(Op::Param(name.into()), &[], shape.clone(), DType::F32);
        g.params.push(ParamInfo { name: name.into(), node: id, init: Init::Zeros });
        feeds.insert(name.to_string(), rng.tensor(&shape, -1.5, 1.5));
        params.push(id);
    }
    let mask = s.mask.as_ref().map(|ms| {
        let id = g.add(Op::Input("mask".into()), &[], ms.clone(), DType::F32);
        g.inputs.push(("mask".into(), id));
        feeds.insert("mask".into(), mask_tensor(&mut rng, ms));
        id
    });
    let scale = 0.7;
    let y = if fused {
        ops::fused_attention(&mut g, params[0], params[1], params[2], mask, s.causal, scale).unwrap()
    } else {
        unfused_attention(&mut g, params[0], params[1], params[2], mask, s.causal, scale)
    };
    let ys = g.shape(y).to_vec();
    let w = g.add(Op::Input("w".into()), &[], ys.clone(), DType::F32);
    g.inputs.push(("w".into(), w));
    feeds.insert("w".into(), rng.tensor(&ys, -1.0, 1.0));
    let prod = ops::mul(&mut g, y, w).unwrap();
    let loss = ops::sum(&mut g, prod, &[], false).unwrap();
    g.loss = Some(loss);
    g.set_output("y", y);
    g.set_output("loss", loss);
    let grads = differentiate(&mut g, loss, &params).unwrap();
    for (name, gr) in ["q", "k", "v"].iter().zip(grads) {
        g.set_output(&format!("grad.{name}"), gr);
    }
    Built { g, feeds }
}

fn results_f64(b: &Built) -> HashMap<String, Vec<f64>> {
    let vals = evaluate(&b.g, &b.feeds).unwrap();
    b.g.outputs.iter().map(|(n, id)| (n.clone(), vals[id.index()].data.clone())).collect()
}

/// Every element within `rel` of the reference, relative to the larger of the element
/// and the reference tensor's largest magnitude times 1e-2 (so values that cancel to
/// near zero are not held to a relative bound they cannot meet: with `rel` = 1e-4 in
/// f32, 1e-3 of the largest magnitude allowed about one ulp of it, and a 33-term sum's
/// rounding in another order of additions (the JIT's four accumulators) was 1.007 of
/// that on one of the 990 elements of a `[2, 3] × 33 × 5` query gradient).
fn assert_close(got: &[f64], want: &[f64], rel: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(0f64, |m, x| m.max(x.abs()));
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        let tol = rel * b.abs().max(a.abs()).max(1e-2 * scale).max(1e-12);
        assert!(
            (a - b).abs() <= tol,
            "{what}[{i}]: {a} vs {b} (off by {:e}, tolerance {tol:e}, largest magnitude {scale:e})",
            (a - b).abs()
        );
    }
}

#[test]
fn fused_forward_and_gradients_equal_the_unfused_graph_in_f64() {
    for (i, s) in shapes().iter().enumerate() {
        let fused = build(s, true, 100 + i as u64);
        let plain = build(s, false, 100 + i as u64);
        assert_eq!(fused.g.node_ids().filter(|&n| matches!(fused.g.node(n).op, Op::Attention { .. })).count(), 1);
        let (a, b) = (results_f64(&fused), results_f64(&plain));
        for name in ["y", "loss", "grad.q", "grad.k", "grad.v"] {
            assert_close(&a[name], &b[name], 1e-5, &format!("{s:?} {name}"));
        }
    }
}

/// Lowers `b.g`, feeds it in f32 and runs `forward` and `grad` (`threads` workers).
fn results_f32(b: &Built, threads: usize) -> HashMap<String, Vec<f64>> {
    let program = bmc::lower::lower(&b.g).unwrap();
    let mut ex = bm_runtime::exec::Executor::new(&program, threads).unwrap();
    for (name, t) in &b.feeds {
        let id = program.buffer_named(name).unwrap();
        ex.f32_mut(id).unwrap().iter_mut().zip(&t.data).for_each(|(d, s)| *d = *s as f32);
    }
    let mut out = HashMap::new();
    for entry in ["forward", "grad"] {
        ex.run(entry).unwrap();
        for (n, buf) in &program.entry(entry).unwrap().results {
            out.insert(n.clone(), ex.f32(*buf).unwrap().iter().map(|&x| x as f64).collect());
        }
    }
    out
}

#[test]
fn fused_kernels_equal_the_unfused_graph_in_f32() {
    for (i, s) in shapes().iter().enumerate() {
        let fused = build(s, true, 200 + i as u64);
        let plain = build(s, false, 200 + i as u64);
        let program = bmc::lower::lower(&fused.g).unwrap();
        let text = program.to_text();
        assert!(text.contains("attention batch") && text.contains("attention_backward batch"), "{text}");
        let want = results_f64(&plain);
        let (a1, a4) = (results_f32(&fused, 1), results_f32(&fused, 4));
        let b = results_f32(&plain, 1);
        for name in ["y", "loss", "grad.q", "grad.k", "grad.v"] {
            assert_close(&a1[name], &want[name], 1e-4, &format!("{s:?} fused f32 {name}"));
            assert_close(&b[name], &want[name], 1e-4, &format!("{s:?} unfused f32 {name}"));
            // Bit-identical whatever the thread count.
            assert_eq!(a1[name], a4[name], "{s:?} {name}: 1 vs 4 threads");
        }
    }
}

#[test]
fn fused_gradients_match_finite_differences() {
    let cases = [
        Shape { batch: vec![2], tq: 4, tk: 4, d: 3, dv: 2, causal: true, mask: None },
        Shape { batch: vec![], tq: 3, tk: 5, d: 2, dv: 3, causal: false, mask: Some(vec![3, 5]) },
        Shape { batch: vec![2], tq: 5, tk: 5, d: 2, dv: 2, causal: true, mask: Some(vec![2, 1, 5]) },
    ];
    for (ci, s) in cases.iter().enumerate() {
        let b = build(s, true, 300 + ci as u64);
        let res = results_f64(&b);
        let loss_of = |feeds: &HashMap<String, Tensor>| {
            let vals = evaluate(&b.g, feeds).unwrap();
            vals[b.g.loss.unwrap().index()].data[0]
        };
        for p in ["q", "k", "v"] {
            let analytic = &res[&format!("grad.{p}")];
            for i in 0..b.feeds[p].len() {
                let h = 1e-6;
                let mut f = b.feeds.clone();
                f.get_mut(p).unwrap().data[i] += h;
                let up = loss_of(&f);
                f.get_mut(p).unwrap().data[i] -= 2.0 * h;
                let down = loss_of(&f);
                let fd = (up - down) / (2.0 * h);
                let a = analytic[i];
                assert!(
                    (a - fd).abs() <= 1e-6 * a.abs().max(fd.abs()).max(1.0),
                    "{s:?} d{p}[{i}]: autodiff {a} vs finite differences {fd}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// The fusion pass on `.bm` sources.

/// A two-layer model whose attention is `att` (an expression over `q`, `k`, `v` of
/// `[B, H, T, hd]`, `hd`, `T`, the input mask `m: [B, 1, T, T]` and the layer's
/// parameter `bias: [T, T]`), followed by `after` (over `y`, `att`).
fn source(att: &str) -> String {
    format!(
        "config {{
  T = 7
  D = 8
  H = 2
}}
block Layer(d, heads) {{
  qkv = Linear(d, 3 * d)
  param bias: [T, T] = zeros()
  forward(x: [B, T, d], m) -> [B, T, d] {{
    let q, k, v = split(qkv(x), 3, axis = -1)
    let q = q.reshape([B, T, heads, d / heads]).transpose(1, 2)
    let k = k.reshape([B, T, heads, d / heads]).transpose(1, 2)
    let v = v.reshape([B, T, heads, d / heads]).transpose(1, 2)
    let hd = d / heads
    {att}
    y.transpose(1, 2).reshape([B, T, d])
  }}
}}
model M {{
  l0 = Layer(D, H)
  l1 = Layer(D, H)
  input x: f32[B, T, D]
  input m: f32[B, 1, T, T]
  forward {{
    let y = l1(l0(x, m), m)
    output y
    loss mean(y * y)
  }}
}}
"
    )
}

struct Compiled {
    c: driver::Compiled,
}

fn compile(src: &str) -> Compiled {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.bm");
    std::fs::write(&path, src).unwrap();
    let loaded = driver::load(path.to_str().unwrap(), &FileSource::Disk).unwrap_or_else(|d| panic!("{d}"));
    let opts = Options { batch: Some(2), ..Options::default() };
    let c = driver::compile(&loaded, &opts, Stage::Kernels).unwrap_or_else(|d| panic!("{d}\n{src}"));
    Compiled { c }
}

fn attention_nodes(g: &Graph) -> Vec<Op> {
    g.node_ids().map(|n| g.node(n).op.clone()).filter(|o| matches!(o, Op::Attention { .. })).collect()
}

/// The graph before and after fusion compute the same loss and output (f64, random
/// parameters and inputs; the mask input gets -inf entries).
fn assert_fusion_preserves_values(c: &driver::Compiled, what: &str) {
    let mut rng = Rng::new(7);
    let mut feeds = HashMap::new();
    for (name, id) in &c.graph.inputs {
        let s = c.graph.shape(*id).to_vec();
        feeds.insert(name.clone(), if name == "m" { mask_tensor(&mut rng, &s) } else { rng.tensor(&s, -1.0, 1.0) });
    }
    for p in &c.graph.params {
        let s = c.graph.shape(p.node).to_vec();
        feeds.insert(p.name.clone(), rng.tensor(&s, -1.0, 1.0));
    }
    let (a, b) = (evaluate(&c.graph, &feeds).unwrap(), evaluate(&c.fused, &feeds).unwrap());
    for (name, id) in &c.graph.outputs {
        let other = c.fused.output(name).unwrap();
        assert_close(&b[other.index()].data, &a[id.index()].data, 1e-9, &format!("{what}: {name}"));
    }
}

#[test]
fn every_spelling_becomes_one_attention_per_layer() {
    let s2 = 1.0 / 2f64.sqrt() / 2.0;
    let cases: &[(&str, Op)] = &[
        ("let y = softmax(q @ k.T / sqrt(hd) + causal_mask(T), axis = -1) @ v", Op::Attention { causal: true, scale: 0.5, masked: false }),
        (
            "let y = softmax(q @ k.transpose(-2, -1) / sqrt(hd) + causal_mask(T), axis = -1) @ v",
            Op::Attention { causal: true, scale: 0.5, masked: false },
        ),
        ("let y = softmax(q @ k.transpose(2, 3) * 0.25, axis = -1) @ v", Op::Attention { causal: false, scale: 0.25, masked: false }),
        ("let y = softmax(q @ k.T * (1 / sqrt(hd)) + m, axis = -1) @ v", Op::Attention { causal: false, scale: 0.5, masked: true }),
        ("let y = softmax(m + q @ k.T / sqrt(hd), axis = -1) @ v", Op::Attention { causal: false, scale: 0.5, masked: true }),
        ("let y = softmax(q @ k.T, axis = -1) @ v", Op::Attention { causal: false, scale: 1.0, masked: false }),
        ("let y = softmax(causal_mask(T) + 0.5 * (q @ k.T), axis = -1) @ v", Op::Attention { causal: true, scale: 0.5, masked: false }),
        (
            "let y = softmax(q @ k.T / sqrt(hd) / sqrt(2) + causal_mask(T), axis = -1) @ v",
            Op::Attention { causal: true, scale: s2, masked: false },
        ),
        (
            "let att = softmax(q @ k.T / sqrt(hd) + causal_mask(T), axis = -1)\n    let y = att @ v",
            Op::Attention { causal: true, scale: 0.5, masked: false },
        ),
        ("let y = attention(q, k, v, causal = true)", Op::Attention { causal: true, scale: 0.5, masked: false }),
        ("let y = attention(q, k, v, scale = 0.3)", Op::Attention { causal: false, scale: 0.3, masked: false }),
    ];
    for (i, (att, want)) in cases.iter().enumerate() {
        let c = compile(&source(att)).c;
        insta::assert_snapshot!(format!("fused_spelling_{i}"), format!("# {att}\n{}", c.fused.to_text()));
        let ops = attention_nodes(&c.fused);
        assert_eq!(ops.len(), 2, "{att}\n{}", c.fused.to_text());
        for o in &ops {
            match (o, want) {
                (Op::Attention { causal, scale, masked }, Op::Attention { causal: wc, scale: ws, masked: wm }) => {
                    assert_eq!((causal, masked), (wc, wm), "{att}");
                    assert!((scale - ws).abs() < 1e-12, "{att}: scale {scale} vs {ws}");
                }
                _ => unreachable!(),
            }
        }
        // Nothing of the unfused softmax survives: no exp, no products of T×T scores.
        let text = c.fused.to_text();
        assert!(!text.contains("exp("), "{att}\n{text}");
        assert!(!text.contains("reduce_max"), "{att}\n{text}");
        // The training step differentiates the fused op.
        assert_eq!(c.train_graph.node_ids().filter(|&n| matches!(c.train_graph.node(n).op, Op::AttentionBackward { .. })).count(), 2);
        assert!(c.program.to_text().contains("attention_backward batch [2, 2] tq 7 tk 7 d 4 dv 4"), "{att}");
        assert_fusion_preserves_values(&c, att);
    }
}

#[test]
fn near_misses_are_left_alone() {
    let cases = [
        // softmax over the queries
        "let y = softmax(q @ k.T / sqrt(hd) + causal_mask(T), axis = -2) @ v",
        // the probabilities are also used elsewhere
        "let att = softmax(q @ k.T / sqrt(hd) + causal_mask(T), axis = -1)\n    let y = att @ v + sum(att, axis = -1, keepdim = true)",
        // so are the scores
        "let s = q @ k.T / sqrt(hd)\n    let y = softmax(s, axis = -1) @ v + slice(s, -1, 0, 4)",
        // a mask that depends on a parameter (it would need a gradient)
        "let y = softmax(q @ k.T / sqrt(hd) + bias, axis = -1) @ v",
        // the probabilities are scaled before the product
        "let y = (softmax(q @ k.T / sqrt(hd), axis = -1) * 2.0) @ v",
        // the scale is not a constant
        "let y = softmax(q @ k.T * m, axis = -1) @ v",
        // log_softmax, not softmax
        "let y = exp(log_softmax(q @ k.T, axis = -1)) @ v",
    ];
    for (i, att) in cases.iter().enumerate() {
        let src = source(att);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.bm");
        std::fs::write(&path, &src).unwrap();
        let loaded = driver::load(path.to_str().unwrap(), &FileSource::Disk).unwrap_or_else(|d| panic!("{d}"));
        let opts = Options { batch: Some(2), ..Options::default() };
        let c = match driver::compile(&loaded, &opts, Stage::Kernels) {
            Ok(c) => c,
            // A spelling this language does not accept is no test of the pass.
            Err(d) => panic!("{att}: {d}"),
        };
        insta::assert_snapshot!(format!("near_miss_{i}"), format!("# {att}\n{}", c.fused.to_text()));
        assert!(attention_nodes(&c.fused).is_empty(), "{att}\n{}", c.fused.to_text());
        assert_eq!(c.graph.len(), c.fused.len(), "{att}: the graph changed");
    }
}
