//! `bmc bench`: times training steps the way ../shared/bench/peers does — batches
//! prepared in memory beforehand, each step (feed + forward + backward + optimiser
//! update) timed alone, median reported after warm-up.

use crate::bundle::Bundle;
use crate::data::{Batch, Batcher, Dataset};
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::session::Session;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub warmup: usize,
    pub steps: usize,
    pub threads: usize,
    /// Batches cycled through (prepared before timing).
    pub batches: usize,
    pub device: crate::engine::Device,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchResult {
    pub model: String,
    pub threads: usize,
    pub batch: usize,
    pub median_ms: f64,
    pub min_ms: f64,
    pub p90_ms: f64,
    pub items_per_s: f64,
    pub gflops: f64,
    pub matmul_flop_per_step: f64,
    pub jit_ms: f64,
    pub peak_rss_mib: f64,
    pub first_losses: Vec<f64>,
}

fn peak_rss_mib() -> f64 {
    // VmHWM in /proc/self/status (Linux); 0 where unavailable.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

pub fn run(bundle: Bundle, opts: &BenchOptions) -> Result<BenchResult> {
    let spec = bundle.train.data.clone().ok_or_else(|| Error::user("bench needs the model's data (a `data` field in train)"))?;
    let ds = Dataset::load(&spec)?;
    let mut batcher = Batcher::new(&ds, bundle.train.batch, bundle.train.seed)?;
    let batches: Vec<Batch> = (0..opts.batches.max(1)).map(|_| batcher.next_batch()).collect();
    // Language models count tokens (the per-example length of a `tokens` input or of a
    // token stream); everything else counts examples.
    let shapes = ds.names_and_shapes();
    let tokens = shapes.iter().find(|x| x.0 == "tokens").or(if ds.is_stream() { shapes.first() } else { None });
    let items = bundle.train.batch * tokens.and_then(|x| x.2.first().copied()).unwrap_or(1);
    let flop = matmul_flops(&bundle);
    let model = bundle.model.clone();
    let batch = bundle.train.batch;
    let seed = bundle.train.seed;
    let t = Instant::now();
    let mut s = Session::on(bundle, opts.device, opts.threads)?;
    let jit_ms = t.elapsed().as_secs_f64() * 1e3;
    s.init_params(seed)?;
    let mut rng = Rng::new(seed);
    let total = (opts.warmup + opts.steps) as u64;
    let mut times = vec![];
    let mut first_losses = vec![];
    for step in 0..total {
        let b = &batches[step as usize % batches.len()];
        let t0 = Instant::now();
        s.feed(b, "the benchmark data")?;
        s.set_hypers(step, total, true, &mut rng)?;
        s.run("train_step")?;
        let dt = t0.elapsed().as_secs_f64() * 1e3;
        if first_losses.len() < 5 {
            first_losses.push(s.scalar("train_step", "loss")?);
        }
        if step as usize >= opts.warmup {
            times.push(dt);
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let median = times[times.len() / 2];
    Ok(BenchResult {
        model,
        threads: opts.threads,
        batch,
        median_ms: median,
        min_ms: times[0],
        p90_ms: times[(times.len() * 9 / 10).min(times.len() - 1)],
        items_per_s: items as f64 / (median / 1e3),
        gflops: flop / (median / 1e3) / 1e9,
        matmul_flop_per_step: flop,
        jit_ms,
        peak_rss_mib: peak_rss_mib(),
        first_losses,
    })
}

fn matmul_flops(b: &Bundle) -> f64 {
    let p = &b.program;
    let Some(e) = p.entry("train_step") else { return 0.0 };
    e.kernels
        .iter()
        .filter_map(|&k| match &p.kernels[k] {
            crate::kir::Kernel::MatMul(m) => Some(2.0 * (m.m * m.n * m.k) as f64 * m.batch.iter().product::<usize>() as f64),
            _ => None,
        })
        .sum()
}
