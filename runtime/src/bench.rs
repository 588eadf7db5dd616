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
    /// Time every kernel of the timed steps (CPU only): `BenchResult::profile`.
    pub profile: bool,
}

/// One kernel's share of the timed steps (`bmc bench --profile`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct KernelTime {
    /// `k<i>` and the first line of its kernel IR text.
    pub kernel: String,
    pub ms_per_step: f64,
    pub percent: f64,
    /// For matrix products, the rate they ran at.
    pub gflops: Option<f64>,
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
    /// With `--profile`: every kernel of the timed steps, slowest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub profile: Vec<KernelTime>,
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
    // Profiling starts after the warm-up (so at least one step of it).
    let warmup = if opts.profile { opts.warmup.max(1) } else { opts.warmup };
    let total = (warmup + opts.steps) as u64;
    let mut times = vec![];
    let mut first_losses = vec![];
    // `BMC_BENCH_AB=row-groups` (or `packed-panels`, `avx512`, `formulas`, `beside`,
    // `tiled-products`, `long-sums`, `kept-probabilities`):
    // steps alternate without and with row groups (or a group's products through the
    // register tiles, AVX-512 in the hand-written kernels, known formulas' wide code,
    // products beside the step before them, standalone products through the register
    // tiles), so that both see the same load on a shared host
    // (compared across processes minutes apart, this host's drift hides differences of
    // 10%).
    let ab = std::env::var("BMC_BENCH_AB").ok().filter(|v| {
        ["row-groups", "packed-panels", "avx512", "formulas", "beside", "tiled-products", "long-sums", "kept-probabilities"]
            .contains(&v.as_str())
    });
    s.on_workers(|s| -> Result<()> {
        for step in 0..total {
            let b = &batches[step as usize % batches.len()];
            if let (Some(what), Some(e)) = (&ab, s.exec.cpu()) {
                match what.as_str() {
                    "row-groups" => e.set_row_groups(step % 2 == 1),
                    "avx512" => crate::cpu::set_avx512(step % 2 == 1),
                    "formulas" => e.set_formulas(step % 2 == 1),
                    "beside" => e.set_beside(step % 2 == 1),
                    "tiled-products" => crate::gemm::set_tiled_products(step % 2 == 1),
                    "long-sums" => crate::gemm::set_long_sums_to_crate(step % 2 == 1),
                    "kept-probabilities" => crate::attention::set_kept_probabilities(step % 2 == 1),
                    _ => e.set_packed_panels(step % 2 == 1),
                }
            }
            let t0 = Instant::now();
            s.train_step(b, "the benchmark data", step, total, &mut rng)?;
            let dt = t0.elapsed().as_secs_f64() * 1e3;
            if first_losses.len() < 5 {
                first_losses.push(s.scalar("train_step", "loss")?);
            }
            if step as usize >= warmup {
                times.push(dt);
            }
            if opts.profile && step as usize + 1 == warmup {
                s.exec.cpu().ok_or_else(|| Error::user("--profile times kernels on the CPU only"))?.set_profiling(true);
            }
        }
        Ok(())
    })?;
    let profile = match (opts.profile, s.exec.cpu()) {
        (true, Some(e)) => kernel_times(e, opts.steps),
        (true, None) => return Err(Error::user("--profile times kernels on the CPU only; drop it or use --device cpu")),
        _ => vec![],
    };
    if let Some(what) = &ab {
        eprintln!("{}", ab_summary(what, &times, warmup));
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
        profile,
    })
}

/// Medians of the steps without (even) and with (odd) `what`, and how many adjacent
/// pairs the second won; `times[i]` is step `warmup + i`.
fn ab_summary(what: &str, times: &[f64], warmup: usize) -> String {
    let (mut off, mut on): (Vec<f64>, Vec<f64>) = (vec![], vec![]);
    for (i, &t) in times.iter().enumerate() {
        if (warmup + i).is_multiple_of(2) { off.push(t) } else { on.push(t) }
    }
    let wins = off.iter().zip(&on).filter(|(a, b)| b < a).count();
    let pairs = off.len().min(on.len());
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    format!(
        "alternating steps: without {what} {:.3} ms, with {:.3} ms (medians); with faster in {wins} of {pairs} adjacent pairs",
        median(&mut off),
        median(&mut on)
    )
}

/// The kernels of the profiled steps, slowest first.
fn kernel_times(e: &crate::exec::Executor, steps: usize) -> Vec<KernelTime> {
    let Some(p) = e.profile() else { return vec![] };
    let total: f64 = p.iter().map(|x| x.1).sum::<f64>().max(1e-12);
    // A step of several kernels (a row group, a product beside a step) is timed as a
    // whole: list it once, under its first kernel.
    let followers: std::collections::HashSet<usize> = e.steps().flat_map(|s| s.kernels().into_iter().skip(1)).collect();
    let head = |k: usize| {
        let line = crate::kir::kernel_text(&e.program().kernels[k]).lines().next().unwrap_or("").to_string();
        match e.formula(k) {
            Some(f) => format!("{line} ({})", f.describe()),
            None => line,
        }
    };
    let mut v: Vec<KernelTime> = p
        .iter()
        .enumerate()
        .filter(|(k, (n, _))| *n > 0 && !followers.contains(k))
        .map(|(k, &(_, secs))| {
            let kernel = &e.program().kernels[k];
            let (head, gflops) = match (e.step_led_by(k), kernel) {
                (Some(step), _) => (describe(step, &head, true), None),
                (None, crate::kir::Kernel::MatMul(m)) => (head(k), Some(m.flop() as f64 * steps as f64 / secs.max(1e-12) / 1e9)),
                (None, _) => (head(k), None),
            };
            KernelTime {
                kernel: format!("k{k}: {head}"),
                ms_per_step: secs * 1e3 / steps.max(1) as f64,
                percent: 100.0 * secs / total,
                gflops,
            }
        })
        .collect();
    v.sort_by(|a, b| b.ms_per_step.total_cmp(&a.ms_per_step));
    v
}

/// A step as the profile lists it; `lead`: without its first kernel's `k<i>` (the
/// listing puts it in front).
fn describe(step: &crate::groups::Step, head: &dyn Fn(usize) -> String, lead: bool) -> String {
    use crate::groups::Step;
    match step {
        Step::One(k) if lead => head(*k),
        Step::One(k) => format!("k{k} {}", head(*k)),
        Step::Group(g) => {
            let heads: Vec<String> = g.kernels.iter().map(|&k| format!("k{k} {}", head(k))).collect();
            format!("group of {}: {}", g.kernels.len(), heads.join("; "))
        }
        Step::Beside(s, k) => format!("{} ‖ beside it: k{k} {}", describe(s, head, lead), head(*k)),
    }
}

fn matmul_flops(b: &Bundle) -> f64 {
    let p = &b.program;
    let Some(e) = p.entry("train_step") else { return 0.0 };
    e.kernels
        .iter()
        .filter_map(|&k| match &p.kernels[k] {
            crate::kir::Kernel::MatMul(m) => Some(m.flop() as f64),
            _ => None,
        })
        .sum()
}
