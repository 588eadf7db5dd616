//! Appends the training step to a differentiated model graph: gradient norm and
//! clipping, the learning-rate schedule, and the optimiser's update of every parameter
//! (PyTorch's update rules), ending in `Assign` nodes. After this pass the graph is
//! the whole training step that `bmc emit --stage train` shows.
//!
//! The runtime sets two scalars before each step: `step` (updates done so far) and
//! `total_steps` (the run's length, for schedules).

use crate::graph::{BinaryOp, DType, Graph, NodeId, Op, ReduceOp, UnaryOp};
use crate::ops::{self, OpResult};
use crate::passes::autodiff::differentiate;

#[derive(Clone, Debug, PartialEq)]
pub enum OptimizerKind {
    Sgd {
        momentum: f64,
        nesterov: bool,
    },
    /// `decoupled`: AdamW's decoupled weight decay; otherwise Adam's L2 term.
    Adam {
        beta1: f64,
        beta2: f64,
        eps: f64,
        decoupled: bool,
    },
    RmsProp {
        alpha: f64,
        eps: f64,
        momentum: f64,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Optimizer {
    pub kind: OptimizerKind,
    pub lr: f64,
    pub weight_decay: f64,
    /// nanoGPT's choice: decay only parameters with 2 or more dims.
    pub decay_matrices_only: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Schedule {
    Constant,
    Cosine { warmup: f64, min_lr: f64 },
    Linear { warmup: f64, end_lr: f64 },
    Step { every: f64, gamma: f64 },
}

pub struct TrainSetup {
    pub optimizer: Optimizer,
    pub schedule: Schedule,
    pub clip_grad: Option<f64>,
}

fn hyper(g: &mut Graph, name: &str) -> NodeId {
    if let Some(id) = g.node_ids().find(|&n| g.node(n).op == Op::Hyper(name.into())) {
        return id;
    }
    g.add(Op::Hyper(name.into()), &[], vec![], DType::F32)
}

fn c(g: &mut Graph, v: f64) -> NodeId {
    ops::scalar(g, v)
}

/// The learning rate at the current step, as scalar graph ops.
fn learning_rate(g: &mut Graph, base: f64, schedule: &Schedule) -> OpResult {
    let step = hyper(g, "step");
    let total = hyper(g, "total_steps");
    let lr = c(g, base);
    // warmup: lr * (step + 1) / warmup while step < warmup; then `after`.
    let warm = |g: &mut Graph, warmup: f64, after: NodeId| -> OpResult {
        if warmup <= 0.0 {
            return Ok(after);
        }
        let s1 = ops::add_scalar(g, step, 1.0);
        let ramp = ops::mul_scalar(g, s1, base / warmup);
        let w = c(g, warmup);
        let in_warmup = ops::binary(g, BinaryOp::Lt, step, w)?;
        ops::select(g, in_warmup, ramp, after)
    };
    // progress in [0, 1] through the post-warmup part of the run.
    let progress = |g: &mut Graph, warmup: f64| -> OpResult {
        let w = c(g, warmup);
        let done = ops::sub(g, step, w)?;
        let span = ops::sub(g, total, w)?;
        let one = c(g, 1.0);
        let span = ops::binary(g, BinaryOp::Max, span, one)?;
        let p = ops::div(g, done, span)?;
        let zero = c(g, 0.0);
        let p = ops::binary(g, BinaryOp::Max, p, zero)?;
        ops::binary(g, BinaryOp::Min, p, one)
    };
    match *schedule {
        Schedule::Constant => Ok(lr),
        Schedule::Cosine { warmup, min_lr } => {
            let p = progress(g, warmup)?;
            let a = ops::mul_scalar(g, p, std::f64::consts::PI);
            let cosv = ops::unary(g, UnaryOp::Cos, a);
            let h = ops::add_scalar(g, cosv, 1.0);
            let h = ops::mul_scalar(g, h, 0.5 * (base - min_lr));
            let after = ops::add_scalar(g, h, min_lr);
            warm(g, warmup, after)
        }
        Schedule::Linear { warmup, end_lr } => {
            let p = progress(g, warmup)?;
            let d = ops::mul_scalar(g, p, end_lr - base);
            let after = ops::add_scalar(g, d, base);
            warm(g, warmup, after)
        }
        Schedule::Step { every, gamma } => {
            let e = c(g, every.max(1.0));
            let q = ops::div(g, step, e)?;
            let k = ops::unary(g, UnaryOp::Floor, q);
            let gm = c(g, gamma);
            let f = ops::binary(g, BinaryOp::Pow, gm, k)?;
            ops::mul(g, lr, f)
        }
    }
}

fn state(g: &mut Graph, kind: &str, param: &str, shape: &[usize]) -> NodeId {
    g.add(Op::State(format!("{kind}.{param}")), &[], shape.to_vec(), DType::F32)
}

fn assign(g: &mut Graph, name: String, value: NodeId) -> NodeId {
    let s = g.shape(value).to_vec();
    g.add(Op::Assign(name), &[value], s, DType::F32)
}

/// Differentiates the loss and appends clipping, the schedule and the updates.
pub fn append_training(g: &mut Graph, setup: &TrainSetup) -> Result<(), String> {
    let loss = g.loss.ok_or("the model has no loss")?;
    let params: Vec<(String, NodeId)> = g.params.iter().map(|p| (p.name.clone(), p.node)).collect();
    g.current_origin = None;
    let grads = differentiate(g, loss, &params.iter().map(|p| p.1).collect::<Vec<_>>())?;
    for ((name, _), &gr) in params.iter().zip(&grads) {
        g.set_output(&format!("grad.{name}"), gr);
    }
    append_update(g, setup, &params, &grads).map_err(|e| e.message)
}

fn append_update(g: &mut Graph, setup: &TrainSetup, params: &[(String, NodeId)], grads: &[NodeId]) -> OpResult<()> {
    // Global L2 norm of all gradients (always reported; used by clipping).
    let mut squares = vec![];
    for &gr in grads {
        let sq = ops::unary(g, UnaryOp::Square, gr);
        squares.push(ops::reduce(g, ReduceOp::Sum, sq, &[], false)?);
    }
    let norm = match squares.is_empty() {
        false => {
            let total = ops::add_all(g, &squares)?;
            ops::unary(g, UnaryOp::Sqrt, total)
        }
        true => c(g, 0.0),
    };
    g.set_output("grad_norm", norm);
    let mut grads = grads.to_vec();
    if let Some(max_norm) = setup.clip_grad {
        // torch.nn.utils.clip_grad_norm_: coef = min(max_norm / (norm + 1e-6), 1).
        let d = ops::add_scalar(g, norm, 1e-6);
        let m = c(g, max_norm);
        let coef = ops::div(g, m, d)?;
        let one = c(g, 1.0);
        let coef = ops::binary(g, BinaryOp::Min, coef, one)?;
        for gr in grads.iter_mut() {
            *gr = ops::mul(g, *gr, coef)?;
        }
    }
    let opt = &setup.optimizer;
    let lr = learning_rate(g, opt.lr, &setup.schedule)?;
    g.set_output("lr", lr);
    let step = hyper(g, "step");
    let t = ops::add_scalar(g, step, 1.0);
    for ((name, p), &gr) in params.iter().zip(&grads) {
        let shape = g.shape(*p).to_vec();
        let wd = if opt.decay_matrices_only && shape.len() < 2 { 0.0 } else { opt.weight_decay };
        let new_p = match opt.kind {
            OptimizerKind::Sgd { momentum, nesterov } => {
                let gr = l2(g, gr, *p, wd)?;
                let dir = if momentum != 0.0 {
                    let buf = state(g, "momentum_buffer", name, &shape);
                    let mb = ops::mul_scalar(g, buf, momentum);
                    let nb = ops::add(g, mb, gr)?;
                    assign(g, format!("momentum_buffer.{name}"), nb);
                    if nesterov {
                        let m = ops::mul_scalar(g, nb, momentum);
                        ops::add(g, gr, m)?
                    } else {
                        nb
                    }
                } else {
                    gr
                };
                let u = ops::mul(g, dir, lr)?;
                ops::sub(g, *p, u)?
            }
            OptimizerKind::Adam { beta1, beta2, eps, decoupled } => {
                let (p0, gr) = if decoupled {
                    // p = p * (1 - lr * wd)
                    let lw = ops::mul_scalar(g, lr, wd);
                    let one = c(g, 1.0);
                    let f = ops::sub(g, one, lw)?;
                    (if wd != 0.0 { ops::mul(g, *p, f)? } else { *p }, gr)
                } else {
                    (*p, l2(g, gr, *p, wd)?)
                };
                let m = state(g, "exp_avg", name, &shape);
                let v = state(g, "exp_avg_sq", name, &shape);
                // m.lerp_(g, 1 - beta1)
                let d = ops::sub(g, gr, m)?;
                let d = ops::mul_scalar(g, d, 1.0 - beta1);
                let m1 = ops::add(g, m, d)?;
                // v.mul_(beta2).addcmul_(g, g, value = 1 - beta2)
                let vb = ops::mul_scalar(g, v, beta2);
                let g2 = ops::mul(g, gr, gr)?;
                let g2 = ops::mul_scalar(g, g2, 1.0 - beta2);
                let v1 = ops::add(g, vb, g2)?;
                assign(g, format!("exp_avg.{name}"), m1);
                assign(g, format!("exp_avg_sq.{name}"), v1);
                let b1 = c(g, beta1);
                let b1t = ops::binary(g, BinaryOp::Pow, b1, t)?;
                let one = c(g, 1.0);
                let bc1 = ops::sub(g, one, b1t)?;
                let b2 = c(g, beta2);
                let b2t = ops::binary(g, BinaryOp::Pow, b2, t)?;
                let bc2 = ops::sub(g, one, b2t)?;
                let step_size = ops::div(g, lr, bc1)?;
                let bc2s = ops::unary(g, UnaryOp::Sqrt, bc2);
                let sv = ops::unary(g, UnaryOp::Sqrt, v1);
                let denom = ops::div(g, sv, bc2s)?;
                let denom = ops::add_scalar(g, denom, eps);
                let r = ops::div(g, m1, denom)?;
                let u = ops::mul(g, r, step_size)?;
                ops::sub(g, p0, u)?
            }
            OptimizerKind::RmsProp { alpha, eps, momentum } => {
                let gr = l2(g, gr, *p, wd)?;
                let sa = state(g, "square_avg", name, &shape);
                let a = ops::mul_scalar(g, sa, alpha);
                let g2 = ops::mul(g, gr, gr)?;
                let g2 = ops::mul_scalar(g, g2, 1.0 - alpha);
                let sa1 = ops::add(g, a, g2)?;
                assign(g, format!("square_avg.{name}"), sa1);
                let avg = ops::unary(g, UnaryOp::Sqrt, sa1);
                let avg = ops::add_scalar(g, avg, eps);
                let dir = ops::div(g, gr, avg)?;
                let dir = if momentum != 0.0 {
                    let buf = state(g, "momentum_buffer", name, &shape);
                    let mb = ops::mul_scalar(g, buf, momentum);
                    let nb = ops::add(g, mb, dir)?;
                    assign(g, format!("momentum_buffer.{name}"), nb);
                    nb
                } else {
                    dir
                };
                let u = ops::mul(g, dir, lr)?;
                ops::sub(g, *p, u)?
            }
        };
        assign(g, name.clone(), new_p);
    }
    Ok(())
}

/// Adam's and SGD's coupled weight decay: `g + wd * p`.
fn l2(g: &mut Graph, gr: NodeId, p: NodeId, wd: f64) -> OpResult {
    if wd == 0.0 {
        return Ok(gr);
    }
    let d = ops::mul_scalar(g, p, wd);
    ops::add(g, gr, d)
}
