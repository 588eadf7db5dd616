//! Gradient checks: for every primitive op and every high-level builder of `ops`, the
//! gradients that `passes::autodiff` appends to the graph, evaluated in f64 by `eval`,
//! must match central finite differences of the forward graph.

use bmc::eval::{Tensor, evaluate};
use bmc::graph::{BinaryOp, DType, Graph, NodeId, Op, ReduceOp, UnaryOp};
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
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        self.0.uniform()
    }
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }
    /// ± uniform in [0.1, 2): away from the kinks of relu, abs, step and recip.
    fn nonzero(&mut self) -> f64 {
        let m = self.uniform(0.1, 2.0);
        if self.next_u64() & 1 == 0 { m } else { -m }
    }
}

const H: f64 = 1e-6;
const RTOL: f64 = 1e-6;
const ATOL: f64 = 1e-7;

struct Check {
    g: Graph,
    rng: Rng,
    feeds: HashMap<String, Tensor>,
    params: Vec<(String, NodeId)>,
}

impl Check {
    fn new(seed: u64) -> Self {
        Check { g: Graph::new(), rng: Rng::new(seed), feeds: HashMap::new(), params: vec![] }
    }

    fn param_data(&mut self, shape: &[usize], data: Vec<f64>) -> NodeId {
        let name = format!("p{}", self.params.len());
        let id = self.g.add(Op::Param(name.clone()), &[], shape.to_vec(), DType::F32);
        self.feeds.insert(name.clone(), Tensor::new(shape.to_vec(), data));
        self.params.push((name, id));
        id
    }

    /// A parameter with values ±[0.1, 2).
    fn param(&mut self, shape: &[usize]) -> NodeId {
        let data = (0..shape.iter().product()).map(|_| self.rng.nonzero()).collect();
        self.param_data(shape, data)
    }

    /// A parameter with values uniform in [lo, hi).
    fn param_in(&mut self, shape: &[usize], lo: f64, hi: f64) -> NodeId {
        let data = (0..shape.iter().product()).map(|_| self.rng.uniform(lo, hi)).collect();
        self.param_data(shape, data)
    }

    /// A non-trainable input (not differentiated).
    fn input(&mut self, shape: &[usize], dtype: DType, data: Vec<f64>) -> NodeId {
        let name = format!("x{}", self.feeds.len());
        let id = self.g.add(Op::Input(name.clone()), &[], shape.to_vec(), dtype);
        self.feeds.insert(name, Tensor::new(shape.to_vec(), data));
        id
    }

    /// Checks the gradients of `sum(result * W)` with `W` a fixed random input.
    fn check(mut self, result: NodeId) -> Vec<Vec<f64>> {
        let r = ops::to_f32(&mut self.g, result);
        let s = self.g.shape(r).to_vec();
        let w: Vec<f64> = (0..s.iter().product()).map(|_| self.rng.uniform(-1.0, 1.0)).collect();
        let w = self.input(&s, DType::F32, w);
        let m = ops::mul(&mut self.g, r, w).unwrap();
        let loss = ops::sum(&mut self.g, m, &[], false).unwrap();
        self.check_loss(loss)
    }

    /// Checks the gradients of a scalar `loss` against central finite differences and
    /// returns the analytic gradients (one per parameter, in order).
    fn check_loss(mut self, loss: NodeId) -> Vec<Vec<f64>> {
        let forward = self.g.clone();
        let wrt: Vec<NodeId> = self.params.iter().map(|(_, id)| *id).collect();
        let grads = differentiate(&mut self.g, loss, &wrt).unwrap_or_else(|e| panic!("differentiate: {e}"));
        assert_eq!(grads.len(), wrt.len());
        let vals = evaluate(&self.g, &self.feeds).unwrap_or_else(|e| panic!("evaluate: {e}\n{}", self.g.to_text()));
        let l0 = vals[loss.index()].data[0];
        assert!(l0.is_finite(), "loss is {l0}");
        let mut out = vec![];
        for ((name, p), &gid) in self.params.iter().zip(&grads) {
            assert_eq!(self.g.shape(gid), self.g.shape(*p), "gradient shape of {name}");
            assert_eq!(self.g.dtype(gid), DType::F32, "gradient dtype of {name}");
            let analytic = vals[gid.index()].data.clone();
            for (j, &a) in analytic.iter().enumerate() {
                let mut feeds = self.feeds.clone();
                let base = feeds[name].data[j];
                feeds.get_mut(name).unwrap().data[j] = base + H;
                let lp = evaluate(&forward, &feeds).unwrap()[loss.index()].data[0];
                feeds.get_mut(name).unwrap().data[j] = base - H;
                let lm = evaluate(&forward, &feeds).unwrap()[loss.index()].data[0];
                let numeric = (lp - lm) / (2.0 * H);
                assert!(
                    (a - numeric).abs() <= RTOL * a.abs().max(numeric.abs()) + ATOL,
                    "d loss / d {name}[{j}]: autodiff {a}, finite differences {numeric}\n{}",
                    self.g.to_text()
                );
            }
            out.push(analytic);
        }
        out
    }
}

// ---------------------------------------------------------------------------------------
// Primitive ops
// ---------------------------------------------------------------------------------------

#[test]
fn unary_ops() {
    let all = [
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
        UnaryOp::GeluTanh,
        UnaryOp::GeluTanhGrad,
    ];
    for (i, op) in all.into_iter().enumerate() {
        let mut c = Check::new(100 + i as u64);
        let positive = matches!(op, UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Rsqrt);
        let x = if positive { c.param_in(&[2, 3], 0.2, 3.0) } else { c.param(&[2, 3]) };
        let y = ops::unary(&mut c.g, op, x);
        c.check(y);
    }
}

#[test]
fn erf_over_a_wide_range() {
    let mut c = Check::new(7);
    let x = c.param_data(&[8], vec![-3.5, -1.7, -0.9, -0.2, 0.05, 0.8, 1.3, 2.9]);
    let y = ops::unary(&mut c.g, UnaryOp::Erf, x);
    c.check(y);
}

#[test]
fn step_has_no_gradient() {
    let mut c = Check::new(8);
    let x = c.param(&[5]);
    let s = ops::unary(&mut c.g, UnaryOp::Step, x);
    let grads = c.check(s);
    assert!(grads[0].iter().all(|&v| v == 0.0));
}

#[test]
fn binary_ops_same_shape() {
    for (i, op) in
        [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div, BinaryOp::Max, BinaryOp::Min, BinaryOp::Pow].into_iter().enumerate()
    {
        let mut c = Check::new(200 + i as u64);
        let a = if op == BinaryOp::Pow { c.param_in(&[2, 3], 0.3, 2.0) } else { c.param(&[2, 3]) };
        let b = c.param(&[2, 3]);
        let y = ops::binary(&mut c.g, op, a, b).unwrap();
        c.check(y);
    }
}

#[test]
fn binary_ops_broadcasting() {
    let shapes: [(&[usize], &[usize]); 6] =
        [(&[3, 1], &[4]), (&[], &[2, 3]), (&[2, 3], &[]), (&[2, 1, 4], &[3, 1]), (&[1, 3], &[2, 1]), (&[4], &[2, 3, 4])];
    let mut seed = 300;
    for op in [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div, BinaryOp::Max, BinaryOp::Min, BinaryOp::Pow] {
        for (sa, sb) in shapes {
            seed += 1;
            let mut c = Check::new(seed);
            let a = if op == BinaryOp::Pow { c.param_in(sa, 0.3, 2.0) } else { c.param(sa) };
            let b = c.param(sb);
            let y = ops::binary(&mut c.g, op, a, b).unwrap();
            c.check(y);
        }
    }
}

#[test]
fn binary_with_constants_and_scalars() {
    let mut c = Check::new(9);
    let a = c.param(&[2, 3]);
    let y = ops::mul_scalar(&mut c.g, a, 3.5);
    let y = ops::add_scalar(&mut c.g, y, -1.0);
    let two = ops::scalar(&mut c.g, 2.0);
    let y = ops::binary(&mut c.g, BinaryOp::Pow, y, two).unwrap();
    let y = ops::div(&mut c.g, two, y).unwrap();
    c.check(y);
}

#[test]
fn pow_with_a_learned_exponent() {
    let mut c = Check::new(10);
    let base = c.param_in(&[3], 0.5, 2.5);
    let e = c.param_in(&[2, 1], -1.5, 2.5);
    let y = ops::binary(&mut c.g, BinaryOp::Pow, base, e).unwrap();
    c.check(y);
}

#[test]
fn max_min_ties_split_evenly() {
    // max(x, x) = x: each operand gets half of the gradient, the sum is exact.
    for op in [BinaryOp::Max, BinaryOp::Min] {
        let mut c = Check::new(11);
        let x = c.param(&[4]);
        let y = ops::binary(&mut c.g, op, x, x).unwrap();
        c.check(y);
    }
    // Ties against a constant: half the gradient (PyTorch's convention).
    let mut c = Check::new(12);
    let x = c.param_data(&[3], vec![1.0, 2.0, -1.0]);
    let one = ops::scalar(&mut c.g, 1.0);
    let y = ops::binary(&mut c.g, BinaryOp::Max, x, one).unwrap();
    let s = ops::sum(&mut c.g, y, &[], false).unwrap();
    let forward = c.g.clone();
    let p = c.params[0].1;
    let gr = differentiate(&mut c.g, s, &[p]).unwrap();
    let v = evaluate(&c.g, &c.feeds).unwrap();
    assert_eq!(v[gr[0].index()].data, vec![0.5, 1.0, 0.0]);
    assert_eq!(evaluate(&forward, &c.feeds).unwrap()[s.index()].data, vec![4.0]);
}

#[test]
fn comparisons_and_select() {
    let mut c = Check::new(13);
    let a = c.param(&[2, 3]);
    let b = c.param(&[3]);
    let gt = ops::binary(&mut c.g, BinaryOp::Gt, a, b).unwrap();
    let y = ops::select(&mut c.g, gt, a, b).unwrap();
    c.check(y);

    // A condition fed as data, broadcast values, and a scalar branch.
    let mut c = Check::new(14);
    let cond = c.input(&[2, 3], DType::Bool, vec![1.0, 0.0, 0.0, 1.0, 1.0, 0.0]);
    let a = c.param(&[3]);
    let b = c.param(&[]);
    let y = ops::select(&mut c.g, cond, a, b).unwrap();
    c.check(y);

    // A condition broadcast from [2, 1] and computed from a parameter (no gradient
    // flows into the condition).
    let mut c = Check::new(15);
    let p = c.param(&[2, 1]);
    let zero = ops::scalar(&mut c.g, 0.0);
    let cond = ops::binary(&mut c.g, BinaryOp::Le, p, zero).unwrap();
    let a = c.param(&[2, 3]);
    let b = ops::unary(&mut c.g, UnaryOp::Exp, a);
    let y = ops::select(&mut c.g, cond, a, b).unwrap();
    let grads = c.check(y);
    assert!(grads[0].iter().all(|&v| v == 0.0));
}

#[test]
fn reductions() {
    let axes_cases: [&[i64]; 7] = [&[], &[0], &[1], &[-1], &[0, 2], &[2, 0, 1], &[1, -1]];
    let mut seed = 400;
    for op in [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Min] {
        for axes in axes_cases {
            for keepdim in [false, true] {
                seed += 1;
                let mut c = Check::new(seed);
                let x = c.param(&[2, 3, 4]);
                let y = ops::reduce(&mut c.g, op, x, axes, keepdim).unwrap();
                c.check(y);
            }
        }
    }
}

#[test]
fn reduce_max_ties_share_the_gradient() {
    let mut c = Check::new(16);
    let x = c.param(&[2, 3]);
    let xx = ops::concat(&mut c.g, &[x, x], 1).unwrap();
    let y = ops::reduce(&mut c.g, ReduceOp::Max, xx, &[1], false).unwrap();
    c.check(y);

    let mut c = Check::new(17);
    let x = c.param_data(&[4], vec![1.0, 3.0, 3.0, 3.0]);
    let y = ops::reduce(&mut c.g, ReduceOp::Max, x, &[0], false).unwrap();
    let p = c.params[0].1;
    let gr = differentiate(&mut c.g, y, &[p]).unwrap();
    let v = evaluate(&c.g, &c.feeds).unwrap();
    let third = 1.0 / 3.0;
    assert_eq!(v[gr[0].index()].data, vec![0.0, third, third, third]);
}

#[test]
fn mean_var_logsumexp() {
    let axes_cases: [&[i64]; 5] = [&[], &[0], &[-1], &[0, 2], &[1]];
    let mut seed = 500;
    for which in 0..3 {
        for axes in axes_cases {
            for keepdim in [false, true] {
                seed += 1;
                let mut c = Check::new(seed);
                let x = c.param(&[2, 3, 4]);
                let y = match which {
                    0 => ops::mean(&mut c.g, x, axes, keepdim),
                    1 => ops::var(&mut c.g, x, axes, keepdim),
                    _ => ops::logsumexp(&mut c.g, x, axes, keepdim),
                }
                .unwrap();
                c.check(y);
            }
        }
    }
}

#[test]
fn softmax_and_log_softmax() {
    let mut seed = 600;
    for axis in [0, 1, 2, -1, -2] {
        for log in [false, true] {
            seed += 1;
            let mut c = Check::new(seed);
            let x = c.param(&[2, 3, 4]);
            let y = if log { ops::log_softmax(&mut c.g, x, axis) } else { ops::softmax(&mut c.g, x, axis) }.unwrap();
            c.check(y);
        }
    }
}

#[test]
fn shape_ops() {
    type Build = fn(&mut Graph, NodeId) -> NodeId;
    let cases: Vec<(&str, Build)> = vec![
        ("reshape", |g, x| ops::reshape(g, x, &[4, 6]).unwrap()),
        ("reshape -1", |g, x| ops::reshape_spec(g, x, &[3, -1, 2]).unwrap()),
        ("transpose", |g, x| ops::transpose(g, x, 0, -1).unwrap()),
        ("permute", |g, x| ops::permute(g, x, &[2, 0, 1]).unwrap()),
        ("permute 2", |g, x| ops::permute(g, x, &[1, 2, 0]).unwrap()),
        ("slice", |g, x| ops::slice(g, x, 1, 1, 3).unwrap()),
        ("slice negative", |g, x| ops::slice(g, x, -1, -3, -1).unwrap()),
        ("pad", |g, x| ops::pad(g, x, 2, 1, 2)),
        ("squeeze all", |g, x| {
            let s = ops::slice(g, x, 1, 0, 1).unwrap();
            ops::squeeze(g, s, None).unwrap()
        }),
        ("squeeze one", |g, x| {
            let s = ops::slice(g, x, 0, 1, 2).unwrap();
            ops::squeeze(g, s, Some(0)).unwrap()
        }),
        ("unsqueeze", |g, x| ops::unsqueeze(g, x, 1).unwrap()),
        ("unsqueeze last", |g, x| ops::unsqueeze(g, x, -1).unwrap()),
        ("flatten", |g, x| ops::flatten(g, x, 1).unwrap()),
        ("flatten all", |g, x| ops::flatten(g, x, 0).unwrap()),
        ("broadcast", |g, x| {
            let s = ops::slice(g, x, 1, 2, 3).unwrap();
            ops::broadcast_to(g, s, &[5, 2, 3, 4]).unwrap()
        }),
        ("cast f32", |g, x| g.add(Op::Cast(DType::F32), &[x], vec![2, 3, 4], DType::F32)),
        ("chain", |g, x| {
            let t = ops::transpose(g, x, 1, 2).unwrap();
            let r = ops::reshape(g, t, &[8, 3]).unwrap();
            let s = ops::slice(g, r, 0, 2, 7).unwrap();
            let e = ops::unary(g, UnaryOp::Tanh, s);
            ops::permute(g, e, &[1, 0]).unwrap()
        }),
    ];
    for (i, (name, build)) in cases.into_iter().enumerate() {
        eprintln!("shape op: {name}");
        let mut c = Check::new(700 + i as u64);
        let x = c.param(&[2, 3, 4]);
        let y = build(&mut c.g, x);
        c.check(y);
    }
}

#[test]
fn split_and_concat() {
    let mut c = Check::new(18);
    let x = c.param(&[2, 6]);
    let parts = ops::split(&mut c.g, x, 3, 1).unwrap();
    // Use the parts differently so each gets its own gradient.
    let a = ops::unary(&mut c.g, UnaryOp::Exp, parts[0]);
    let b = ops::unary(&mut c.g, UnaryOp::Square, parts[2]);
    let y = ops::concat(&mut c.g, &[b, parts[1], a], 1).unwrap();
    c.check(y);

    let mut c = Check::new(19);
    let a = c.param(&[2, 3]);
    let b = c.param(&[1, 3]);
    let d = c.param(&[4, 3]);
    let y = ops::concat(&mut c.g, &[a, b, d, a], 0).unwrap();
    c.check(y);

    let mut c = Check::new(20);
    let a = c.param(&[2, 1, 4]);
    let b = c.param(&[2, 2, 4]);
    let y = ops::concat(&mut c.g, &[a, b], -2).unwrap();
    c.check(y);
}

#[test]
fn matmul_variants() {
    let shapes: [(&[usize], &[usize]); 9] = [
        (&[3, 4], &[4, 5]),
        (&[2, 3, 4], &[2, 4, 5]),
        (&[2, 3, 4], &[4, 5]),
        (&[3, 4], &[2, 4, 2]),
        (&[1, 3, 4], &[2, 4, 2]),
        (&[4], &[4, 5]),
        (&[3, 4], &[4]),
        (&[4], &[4]),
        (&[2, 2, 3, 4], &[4]),
    ];
    for (i, (sa, sb)) in shapes.into_iter().enumerate() {
        let mut c = Check::new(800 + i as u64);
        let a = c.param(sa);
        let b = c.param(sb);
        let y = ops::matmul(&mut c.g, a, b).unwrap();
        c.check(y);
    }
    // x @ x.T uses x twice.
    let mut c = Check::new(810);
    let x = c.param(&[3, 4]);
    let xt = ops::transpose(&mut c.g, x, 0, 1).unwrap();
    let y = ops::matmul(&mut c.g, x, xt).unwrap();
    c.check(y);
}

#[test]
fn embedding_with_repeated_ids() {
    let mut c = Check::new(21);
    let table = c.param(&[5, 3]);
    let ids = c.input(&[2, 3], DType::I32, vec![4.0, 0.0, 4.0, 2.0, 4.0, 0.0]);
    let y = ops::embedding(&mut c.g, table, ids).unwrap();
    let grads = c.check(y);
    // Rows 1 and 3 are never picked.
    for j in 0..3 {
        assert_eq!(grads[0][3 + j], 0.0);
        assert_eq!(grads[0][9 + j], 0.0);
    }
}

#[test]
fn scatter_add_primitive() {
    let mut c = Check::new(22);
    let src = c.param(&[4, 2]);
    let ids = c.input(&[4], DType::I32, vec![1.0, 1.0, 0.0, 2.0]);
    let y = c.g.add(Op::ScatterAdd { rows: 3 }, &[src, ids], vec![3, 2], DType::F32);
    let y = ops::unary(&mut c.g, UnaryOp::Sin, y);
    c.check(y);
}

#[test]
fn one_hot_and_integer_paths() {
    let mut c = Check::new(23);
    let x = c.param(&[3, 4]);
    let ids = c.input(&[3], DType::I32, vec![2.0, 0.0, 3.0]);
    let hot = ops::one_hot(&mut c.g, ids, 4).unwrap();
    let y = ops::mul(&mut c.g, x, hot).unwrap();
    // An integer computation mixed in: (ids + ids) as f32, broadcast over columns.
    let twice = ops::add(&mut c.g, ids, ids).unwrap();
    let twice = ops::unsqueeze(&mut c.g, twice, 1).unwrap();
    let y = ops::mul(&mut c.g, y, twice).unwrap();
    let y = ops::add(&mut c.g, y, x).unwrap();
    c.check(y);
}

#[test]
fn gelu_silu() {
    for (i, exact) in [false, true].into_iter().enumerate() {
        let mut c = Check::new(24 + i as u64);
        let x = c.param(&[2, 5]);
        let y = ops::gelu(&mut c.g, x, exact).unwrap();
        c.check(y);
    }
    let mut c = Check::new(26);
    let x = c.param(&[2, 5]);
    let y = ops::silu(&mut c.g, x).unwrap();
    c.check(y);
}

#[test]
fn cross_entropy_losses() {
    // Plain, 2-D logits.
    let mut c = Check::new(27);
    let logits = c.param(&[4, 5]);
    let t = c.input(&[4], DType::I32, vec![1.0, 4.0, 0.0, 1.0]);
    let l = ops::cross_entropy(&mut c.g, logits, t, -100).unwrap();
    c.check(l);

    // 3-D logits with ignored positions.
    let mut c = Check::new(28);
    let logits = c.param(&[2, 3, 5]);
    let t = c.input(&[2, 3], DType::I32, vec![1.0, -100.0, 4.0, 0.0, 2.0, -100.0]);
    let l = ops::cross_entropy(&mut c.g, logits, t, -100).unwrap();
    let grads = c.check(l);
    // Ignored positions get no gradient.
    for j in 0..5 {
        assert_eq!(grads[0][5 + j], 0.0);
        assert_eq!(grads[0][25 + j], 0.0);
    }

    // ignore_index that is a real class.
    let mut c = Check::new(29);
    let logits = c.param(&[3, 4]);
    let t = c.input(&[3], DType::I32, vec![2.0, 3.0, 2.0]);
    let l = ops::cross_entropy(&mut c.g, logits, t, 3).unwrap();
    c.check_loss(l);
}

#[test]
fn mse_and_bce() {
    let mut c = Check::new(30);
    let a = c.param(&[3, 4]);
    let b = c.param(&[3, 4]);
    let l = ops::mse(&mut c.g, a, b).unwrap();
    c.check_loss(l);

    let mut c = Check::new(31);
    let x = c.param(&[3, 4]);
    let y = c.param_in(&[3, 4], 0.0, 1.0);
    let l = ops::bce_with_logits(&mut c.g, x, y).unwrap();
    c.check_loss(l);

    // Targets as data (the usual case).
    let mut c = Check::new(32);
    let x = c.param(&[5]);
    let y = c.input(&[5], DType::F32, vec![0.0, 1.0, 1.0, 0.0, 1.0]);
    let l = ops::bce_with_logits(&mut c.g, x, y).unwrap();
    c.check(l);
}

#[test]
fn attention_variants() {
    let shapes: [&[usize]; 3] = [&[4, 3], &[2, 4, 3], &[2, 2, 4, 3]];
    let mut seed = 900;
    for s in shapes {
        for causal in [false, true] {
            for scale in [None, Some(0.7)] {
                seed += 1;
                let mut c = Check::new(seed);
                let q = c.param(s);
                let k = c.param(s);
                let v = c.param(s);
                let y = ops::attention(&mut c.g, q, k, v, causal, scale).unwrap();
                c.check(y);
            }
        }
    }
    // Self-attention: the same projection feeds q, k and v.
    let mut c = Check::new(950);
    let x = c.param(&[4, 3]);
    let w = c.param(&[3, 3]);
    let h = ops::matmul(&mut c.g, x, w).unwrap();
    let y = ops::attention(&mut c.g, h, h, h, true, None).unwrap();
    c.check(y);
}

#[test]
fn causal_mask_added_to_scores() {
    let mut c = Check::new(33);
    let s = c.param(&[2, 4, 4]);
    let m = ops::causal_mask(&mut c.g, 4).unwrap();
    let y = ops::add(&mut c.g, s, m).unwrap();
    let p = ops::softmax(&mut c.g, y, -1).unwrap();
    let grads = c.check(p);
    // Masked scores get no gradient.
    assert_eq!(grads[0][1], 0.0);
    assert_eq!(grads[0][16 + 2], 0.0);
}

#[test]
fn dropout_in_and_out_of_training() {
    for training in [0.0, 1.0] {
        let mut c = Check::new(34);
        let x = c.param(&[2, 4]);
        let y = ops::dropout(&mut c.g, x, 0.25, 0).unwrap();
        c.feeds.insert("rand.0".into(), Tensor::new(vec![2, 4], vec![0.1, 0.5, 0.9, 0.2, 0.3, 0.7, 0.05, 0.6]));
        c.feeds.insert("training".into(), Tensor::scalar(training));
        let grads = c.check(y);
        if training == 1.0 {
            assert_eq!(grads[0][0], 0.0);
            assert_eq!(grads[0][3], 0.0);
        }
    }
}

#[test]
fn a_small_mlp() {
    let mut c = Check::new(35);
    let x = c.input(&[3, 4], DType::F32, (0..12).map(|i| (i as f64 * 0.37).sin()).collect());
    let w1 = c.param(&[4, 5]);
    let b1 = c.param(&[5]);
    let w2 = c.param(&[5, 3]);
    let h = ops::matmul(&mut c.g, x, w1).unwrap();
    let h = ops::add(&mut c.g, h, b1).unwrap();
    let h = ops::gelu(&mut c.g, h, false).unwrap();
    let m = ops::mean(&mut c.g, h, &[-1], true).unwrap();
    let v = ops::var(&mut c.g, h, &[-1], true).unwrap();
    let v = ops::add_scalar(&mut c.g, v, 1e-5);
    let r = ops::unary(&mut c.g, UnaryOp::Rsqrt, v);
    let d = ops::sub(&mut c.g, h, m).unwrap();
    let h = ops::mul(&mut c.g, d, r).unwrap();
    let o = ops::matmul(&mut c.g, h, w2).unwrap();
    let t = c.input(&[3], DType::I32, vec![0.0, 2.0, 1.0]);
    let l = ops::cross_entropy(&mut c.g, o, t, -100).unwrap();
    c.check_loss(l);
}

// ---------------------------------------------------------------------------------------
// Structure
// ---------------------------------------------------------------------------------------

#[test]
fn a_node_used_twice_sums_its_gradients() {
    let mut c = Check::new(36);
    let x = c.param_data(&[3], vec![0.5, -1.5, 2.0]);
    let y = ops::mul(&mut c.g, x, x).unwrap();
    let l = ops::sum(&mut c.g, y, &[], false).unwrap();
    let grads = c.check_loss(l);
    assert_eq!(grads[0], vec![1.0, -3.0, 4.0]);
}

#[test]
fn an_unused_parameter_gets_zeros() {
    let mut c = Check::new(37);
    let x = c.param(&[3]);
    let unused = c.param(&[2, 2]);
    let _dead = ops::unary(&mut c.g, UnaryOp::Exp, unused);
    let y = ops::unary(&mut c.g, UnaryOp::Tanh, x);
    let l = ops::sum(&mut c.g, y, &[], false).unwrap();
    let mut g2 = c.g.clone();
    let grads = c.check_loss(l);
    assert_eq!(grads[1], vec![0.0; 4]);
    let ids = differentiate(&mut g2, l, &[unused]).unwrap();
    assert_eq!(g2.node(ids[0]).op, Op::Const(0.0));
    assert_eq!(g2.shape(ids[0]), &[2, 2]);
}

#[test]
fn assign_const_and_iota_are_leaves() {
    let mut g = Graph::new();
    let p = g.add(Op::Param("p".into()), &[], vec![3], DType::F32);
    let a = g.add(Op::Assign("p".into()), &[p], vec![3], DType::F32);
    let i = ops::iota(&mut g, &[3], 0, DType::F32);
    let y = ops::mul(&mut g, a, i).unwrap();
    let l = ops::sum(&mut g, y, &[], false).unwrap();
    let gr = differentiate(&mut g, l, &[p, a]).unwrap();
    let mut feeds = HashMap::new();
    feeds.insert("p".to_string(), Tensor::new(vec![3], vec![1.0, 2.0, 3.0]));
    let v = evaluate(&g, &feeds).unwrap();
    assert_eq!(v[gr[0].index()].data, vec![0.0; 3]);
    assert_eq!(v[gr[1].index()].data, vec![0.0, 1.0, 2.0]);
}

#[test]
fn the_loss_must_be_an_f32_scalar() {
    let mut g = Graph::new();
    let p = g.add(Op::Param("p".into()), &[], vec![3], DType::F32);
    let e = ops::unary(&mut g, UnaryOp::Exp, p);
    assert!(differentiate(&mut g, e, &[p]).is_err());
    let zero = ops::scalar(&mut g, 0.0);
    let s = ops::sum(&mut g, e, &[], false).unwrap();
    let b = ops::binary(&mut g, BinaryOp::Gt, s, zero).unwrap();
    assert!(differentiate(&mut g, b, &[p]).is_err());
}

// ---------------------------------------------------------------------------------------
// Forward values of the high-level builders (against direct f64 formulas)
// ---------------------------------------------------------------------------------------

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * (1.0 + a.abs().max(b.abs()))
}

#[test]
fn high_level_forward_values() {
    let mut g = Graph::new();
    let xs = vec![0.3, -1.2, 2.0, 0.7, -0.4, 1.5];
    let x = g.add(Op::Input("x".into()), &[], vec![2, 3], DType::F32);
    let t = g.add(Op::Input("t".into()), &[], vec![2], DType::I32);
    let sm = ops::softmax(&mut g, x, -1).unwrap();
    let lse = ops::logsumexp(&mut g, x, &[1], false).unwrap();
    let var = ops::var(&mut g, x, &[1], false).unwrap();
    let mean = ops::mean(&mut g, x, &[0], true).unwrap();
    let ce = ops::cross_entropy(&mut g, x, t, -100).unwrap();
    let ge = ops::gelu(&mut g, x, true).unwrap();
    let gt = ops::gelu(&mut g, x, false).unwrap();
    let si = ops::silu(&mut g, x).unwrap();
    let y = g.add(Op::Input("y".into()), &[], vec![2, 3], DType::F32);
    let bce = ops::bce_with_logits(&mut g, x, y).unwrap();
    let mse = ops::mse(&mut g, x, y).unwrap();
    let mut feeds = HashMap::new();
    feeds.insert("x".to_string(), Tensor::new(vec![2, 3], xs.clone()));
    feeds.insert("t".to_string(), Tensor::new(vec![2], vec![2.0, 0.0]));
    let ys = vec![1.0, 0.0, 1.0, 0.0, 0.0, 1.0];
    feeds.insert("y".to_string(), Tensor::new(vec![2, 3], ys.clone()));
    let v = evaluate(&g, &feeds).unwrap();
    let row = |r: usize| &xs[r * 3..r * 3 + 3];
    for r in 0..2 {
        let l: f64 = row(r).iter().map(|v| v.exp()).sum::<f64>().ln();
        assert!(close(v[lse.index()].data[r], l));
        for j in 0..3 {
            assert!(close(v[sm.index()].data[r * 3 + j], (row(r)[j] - l).exp()));
        }
        let m = row(r).iter().sum::<f64>() / 3.0;
        let want = row(r).iter().map(|v| (v - m) * (v - m)).sum::<f64>() / 3.0;
        assert!(close(v[var.index()].data[r], want));
    }
    assert_eq!(v[mean.index()].shape, vec![1, 3]);
    for j in 0..3 {
        assert!(close(v[mean.index()].data[j], (xs[j] + xs[3 + j]) / 2.0));
    }
    let lse0: f64 = row(0).iter().map(|v| v.exp()).sum::<f64>().ln();
    let lse1: f64 = row(1).iter().map(|v| v.exp()).sum::<f64>().ln();
    assert!(close(v[ce.index()].data[0], ((lse0 - xs[2]) + (lse1 - xs[3])) / 2.0));
    let (mut b, mut m) = (0.0, 0.0);
    for i in 0..6 {
        let x = xs[i];
        let cdf = 0.5 * (1.0 + bmc::eval::erf(x / std::f64::consts::SQRT_2));
        assert!(close(v[ge.index()].data[i], x * cdf));
        let k = (2.0 / std::f64::consts::PI).sqrt();
        assert!(close(v[gt.index()].data[i], 0.5 * x * (1.0 + (k * (x + 0.044715 * x * x * x)).tanh())));
        assert!(close(v[si.index()].data[i], x / (1.0 + (-x).exp())));
        let p = 1.0 / (1.0 + (-x).exp());
        b += -(ys[i] * p.ln() + (1.0 - ys[i]) * (1.0 - p).ln()) / 6.0;
        m += (x - ys[i]) * (x - ys[i]) / 6.0;
    }
    assert!(close(v[bce.index()].data[0], b));
    assert!(close(v[mse.index()].data[0], m));
}

#[test]
fn attention_forward_matches_a_direct_computation() {
    let mut g = Graph::new();
    let mut rng = Rng::new(77);
    let (t, d) = (3, 2);
    let mk = |g: &mut Graph, n: &str| g.add(Op::Input(n.into()), &[], vec![t, d], DType::F32);
    let (q, k, v) = (mk(&mut g, "q"), mk(&mut g, "k"), mk(&mut g, "v"));
    let y = ops::attention(&mut g, q, k, v, true, None).unwrap();
    let mut feeds = HashMap::new();
    let mut data = HashMap::new();
    for n in ["q", "k", "v"] {
        let vals: Vec<f64> = (0..t * d).map(|_| rng.uniform(-1.0, 1.0)).collect();
        data.insert(n, vals.clone());
        feeds.insert(n.to_string(), Tensor::new(vec![t, d], vals));
    }
    let out = &evaluate(&g, &feeds).unwrap()[y.index()];
    for i in 0..t {
        let s: Vec<f64> =
            (0..=i).map(|j| (0..d).map(|c| data["q"][i * d + c] * data["k"][j * d + c]).sum::<f64>() / (d as f64).sqrt()).collect();
        let z: f64 = s.iter().map(|v| v.exp()).sum();
        for c in 0..d {
            let want: f64 = (0..=i).map(|j| s[j].exp() / z * data["v"][j * d + c]).sum();
            assert!(close(out.data[i * d + c], want), "attention[{i}, {c}]");
        }
    }
}

#[test]
fn casting_a_constant_converts_its_value() {
    let mut g = Graph::new();
    let c = ops::constant(&mut g, -2.7, &[2], DType::F32);
    let i = ops::cast(&mut g, c, DType::I32);
    assert_eq!(g.node(i).op, Op::Const(-2.0));
    let h = ops::constant(&mut g, 0.5, &[], DType::F32);
    let b = ops::cast(&mut g, h, DType::Bool);
    assert_eq!(g.node(b).op, Op::Const(1.0));
    let x = g.add(Op::Input("x".into()), &[], vec![3], DType::F32);
    let xi = ops::cast(&mut g, x, DType::I32);
    let xb = ops::cast(&mut g, x, DType::Bool);
    let mut feeds = HashMap::new();
    feeds.insert("x".to_string(), Tensor::new(vec![3], vec![-1.5, 0.0, 2.9]));
    let v = evaluate(&g, &feeds).unwrap();
    assert_eq!(v[xi.index()].data, vec![-1.0, 0.0, 2.0]);
    assert_eq!(v[xb.index()].data, vec![1.0, 0.0, 1.0]);
}
