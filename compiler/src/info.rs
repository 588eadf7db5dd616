//! `bmc info`: parameter counts per block, FLOPs per step, memory, kernels.

use crate::driver::Compiled;
use crate::lower::stats;
use std::fmt::Write as _;

pub fn report(c: &Compiled) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "model {}", c.model_name);
    let total: usize = c.graph.params.iter().map(|p| c.graph.shape(p.node).iter().product::<usize>()).sum();
    let _ = writeln!(s, "parameters: {total}");
    // Parameters grouped by their top-level member (`h`, `fc1`, ...), in order.
    let mut groups: Vec<(String, usize)> = vec![];
    for p in &c.graph.params {
        let top = p.name.split('.').next().unwrap_or(&p.name).to_string();
        let n: usize = c.graph.shape(p.node).iter().product();
        match groups.iter_mut().find(|(g, _)| *g == top) {
            Some(g) => g.1 += n,
            None => groups.push((top, n)),
        }
    }
    for (g, n) in &groups {
        let _ = writeln!(s, "  {g:<24} {n:>12}");
    }
    let st = stats(&c.program, "train_step");
    let _ = writeln!(s, "batch: {}", c.train.batch);
    let _ = writeln!(s, "matmul FLOPs per training step: {} ({:.3} GFLOP)", st.matmul_flops, st.matmul_flops as f64 / 1e9);
    let _ = writeln!(s, "activation and temporary memory: {:.2} MiB", st.temp_bytes as f64 / (1 << 20) as f64);
    let _ = writeln!(s, "parameter memory: {:.2} MiB (f32)", (st.param_count * 4) as f64 / (1 << 20) as f64);
    let _ = writeln!(s, "kernels per training step: {}", st.kernels);
    if let Some(steps) = bm_runtime::groups::schedule_entry(&c.program, "train_step") {
        use bm_runtime::groups::Step;
        let groups: Vec<usize> = steps.iter().filter_map(|s| s.group().map(|g| g.kernels.len())).collect();
        let beside = steps.iter().filter(|s| matches!(s, Step::Beside(..))).count();
        let _ = writeln!(
            s,
            "row groups on the CPU: {} groups run {} of those kernels chunk by chunk ({} steps in all; {beside} matrix products beside the step before them)",
            groups.len(),
            groups.iter().sum::<usize>(),
            steps.len()
        );
    }
    s
}
