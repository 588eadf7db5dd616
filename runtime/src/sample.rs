//! `sample`: text generation from a model trained on `text` or `tokens` data.
//!
//! The model is re-specialised for batch 1 and run on the last `ctx` tokens; the
//! sequence is placed at positions 0..n (the rest padded), so with causal attention the
//! logits at position n-1 depend only on the real tokens. Each new token costs one
//! forward pass over the window (no KV cache yet: see the issue notes).

use crate::bundle::Bundle;
use crate::checkpoint;
use crate::cli::Respecialise;
use crate::data::{DataSpec, TensorData, TextCodec};
use crate::error::{Error, Result};
use crate::kir::BufKind;
use crate::rng::Rng;
use crate::session::Session;
use std::io::Write;
use std::path::Path;

pub struct SampleOptions<'a> {
    pub checkpoint: &'a Path,
    pub prompt: Option<&'a str>,
    pub tokens: usize,
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub seed: u64,
}

pub fn sample(bundle: Bundle, o: &SampleOptions, respec: Respecialise) -> Result<()> {
    let stream = matches!(bundle.train.data, Some(DataSpec::Text { .. } | DataSpec::Tokens { .. }));
    if !stream {
        return Err(Error::user(format!(
            "`sample` generates text from models trained on `text` or `tokens` data; `{}` is trained on {} data",
            bundle.model,
            bundle.train.data.as_ref().map(|d| d.kind()).unwrap_or("no")
        )));
    }
    if !(o.temperature >= 0.0) || !o.temperature.is_finite() {
        return Err(Error::user(format!("--temperature must be a non-negative number, got {}", o.temperature)));
    }
    let params = checkpoint::load(o.checkpoint)?;
    let codec = TextCodec::from_metadata(&params.metadata)?.unwrap_or(TextCodec::Bytes);
    let bundle = if bundle.train.batch == 1 { bundle } else { respec(&bundle.sources, 1, &[])? };
    let inputs: Vec<(String, Vec<usize>)> =
        bundle.program.buffers.iter().filter(|b| b.kind == BufKind::Input).map(|b| (b.name.clone(), b.shape.clone())).collect();
    let (tok_name, ctx) = inputs
        .iter()
        .find(|(n, _)| n == "tokens")
        .or_else(|| inputs.first())
        .map(|(n, s)| (n.clone(), s.get(1).copied().unwrap_or(1)))
        .ok_or_else(|| Error::user("the model has no token input to sample with"))?;
    let logits_buf =
        bundle.program.entry("forward").and_then(|e| e.results.iter().find(|(n, _)| n == "logits").map(|r| r.1)).ok_or_else(|| {
            Error::user(format!("`sample` needs the model to mark its logits with `output logits`; `{}` has no such output", bundle.model))
        })?;
    let vocab = *bundle.program.buffers[logits_buf].shape.last().unwrap_or(&1);
    let mut session = Session::new(bundle, 1)?;
    session.load_params(&params)?;
    let mut seq: Vec<i32> = match o.prompt {
        Some(p) if !p.is_empty() => codec.encode(p)?,
        _ => codec.encode("\n").unwrap_or_else(|_| vec![0]),
    };
    if let Some(bad) = seq.iter().find(|&&t| t < 0 || t as usize >= vocab) {
        return Err(Error::user(format!("the prompt's token {bad} is outside the model's vocabulary of {vocab}")));
    }
    let mut rng = Rng::new(o.seed);
    let mut out = std::io::stdout().lock();
    let _ = write!(out, "{}", codec.decode(&seq));
    for _ in 0..o.tokens {
        let start = seq.len().saturating_sub(ctx);
        let window = &seq[start..];
        let n = window.len();
        let mut toks = vec![0i32; ctx];
        toks[..n].copy_from_slice(window);
        let batch: Vec<(String, TensorData)> = inputs
            .iter()
            .map(|(name, s)| (name.clone(), TensorData::I32(if *name == tok_name { toks.clone() } else { vec![0; s.iter().product()] })))
            .collect();
        session.feed(&batch, "the prompt")?;
        session.set_hypers(0, 1, false, &mut rng)?;
        session.run("forward")?;
        let logits = &session.exec.f32(logits_buf)?[(n - 1) * vocab..n * vocab];
        let next = pick(logits, o.temperature, o.top_k, &mut rng);
        seq.push(next as i32);
        let _ = write!(out, "{}", codec.decode(&[next as i32]));
        let _ = out.flush();
    }
    let _ = writeln!(out);
    Ok(())
}

/// Samples an index from logits with temperature (0 = greedy) and top-k.
fn pick(logits: &[f32], temperature: f64, top_k: Option<usize>, rng: &mut Rng) -> usize {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if temperature == 0.0 {
        return idx[0];
    }
    let k = top_k.unwrap_or(idx.len()).clamp(1, idx.len());
    let top = &idx[..k];
    let m = logits[top[0]] as f64;
    let w: Vec<f64> = top.iter().map(|&i| ((logits[i] as f64 - m) / temperature).exp()).collect();
    let total: f64 = w.iter().sum();
    let mut u = rng.uniform() * total;
    for (j, &wi) in w.iter().enumerate() {
        if u < wi {
            return top[j];
        }
        u -= wi;
    }
    top[k - 1]
}
