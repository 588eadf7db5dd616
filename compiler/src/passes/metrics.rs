//! Adds the evaluation metrics a user expects to a model graph: for a classifier
//! (a model whose loss is a cross-entropy), the `accuracy` output — the fraction of
//! non-ignored positions whose target logit is the largest.

use crate::graph::{BinaryOp, DType, Graph, ReduceOp};
use crate::ops;

pub fn append_accuracy(g: &mut Graph) {
    let Some((logits, targets, ignore)) = g.classification else { return };
    g.current_origin = None;
    let build = |g: &mut Graph| -> ops::OpResult {
        let classes = *g.shape(logits).last().unwrap_or(&1);
        let best = ops::reduce(g, ReduceOp::Max, logits, &[-1], false)?;
        let hot = ops::one_hot(g, targets, classes)?;
        let picked = ops::mul(g, logits, hot)?;
        let picked = ops::sum(g, picked, &[-1], false)?;
        let correct = ops::binary(g, BinaryOp::Ge, picked, best)?;
        let correct = ops::to_f32(g, correct);
        let ig = ops::constant(g, ignore as f64, &[], DType::I32);
        let keep = ops::binary(g, BinaryOp::Ne, targets, ig)?;
        let keep = ops::to_f32(g, keep);
        let hits = ops::mul(g, correct, keep)?;
        let hits = ops::sum(g, hits, &[], false)?;
        let n = ops::sum(g, keep, &[], false)?;
        let one = ops::scalar(g, 1.0);
        let n = ops::binary(g, BinaryOp::Max, n, one)?;
        ops::div(g, hits, n)
    };
    if let Ok(acc) = build(g) {
        g.set_output("accuracy", acc);
    }
}
