//! `sample`: text generation from a model trained on `text` or `tokens` data.
//!
//! Tokens are generated one at a time by a [`Decoder`] that turns the sequence so far
//! into the logits of the next token:
//! - [`CachedDecoder`] runs the compiler's one-token decode program
//!   (`compiler/src/passes/decode.rs`) with a KV cache: each new token costs one
//!   position's forward pass, not a window's. When the cache is full (the sequence
//!   outgrows the model's context), it restarts from the last half window.
//! - [`WindowDecoder`] runs the ordinary forward pass at batch 1 over the last `ctx`
//!   tokens (placed at positions 0..n, the rest padded: with causal attention the logits
//!   at n-1 see only the real tokens). It is the fallback for models the decode pass
//!   cannot handle, and `--no-kv-cache` picks it.

use crate::bundle::Bundle;
use crate::checkpoint::{self, Checkpoint};
use crate::cli::{Respecialise, Specialise};
use crate::data::{DataSpec, TextCodec};
use crate::error::{Error, Result};
use crate::kir::{BufId, BufKind};
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
    /// Recompute the window for every token instead of using the decode program.
    pub no_kv_cache: bool,
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
    if o.temperature < 0.0 || !o.temperature.is_finite() {
        return Err(Error::user(format!("--temperature must be a non-negative number, got {}", o.temperature)));
    }
    let params = checkpoint::load(o.checkpoint)?;
    let codec = TextCodec::from_metadata(&params.metadata)?.unwrap_or(TextCodec::Bytes);
    let mut decoder: Box<dyn Decoder> = if o.no_kv_cache {
        Box::new(WindowDecoder::new(bundle, &params, respec)?)
    } else {
        match respec(&bundle.sources, &Specialise { batch: 1, overrides: vec![], decode: true }) {
            Ok(dec) => Box::new(CachedDecoder::new(dec, &params)?),
            Err(Error::User(why)) => {
                eprintln!("note: sampling without a KV cache (each token recomputes the window): {why}");
                Box::new(WindowDecoder::new(bundle, &params, respec)?)
            }
            Err(e) => return Err(e),
        }
    };
    let vocab = decoder.vocab();
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
        let logits = decoder.next_logits(&seq)?;
        let next = pick(&logits, o.temperature, o.top_k, &mut rng);
        seq.push(next as i32);
        let _ = write!(out, "{}", codec.decode(&[next as i32]));
        let _ = out.flush();
    }
    let _ = writeln!(out);
    Ok(())
}

/// Turns a token sequence into the logits of the token after it.
pub trait Decoder {
    fn vocab(&self) -> usize;
    /// The logits after `seq`, which extends the sequence of the previous call by
    /// appended tokens (or is the first call's prompt).
    fn next_logits(&mut self, seq: &[i32]) -> Result<Vec<f32>>;
}

fn result_buf(bundle: &Bundle, name: &str) -> Option<BufId> {
    bundle.program.entry("forward").and_then(|e| e.results.iter().find(|(n, _)| n == name).map(|r| r.1))
}

fn input_buf(bundle: &Bundle, name: &str) -> Option<BufId> {
    bundle.program.buffers.iter().position(|b| b.kind == BufKind::Input && b.name == name)
}

fn no_logits(bundle: &Bundle) -> Error {
    Error::user(format!("`sample` needs the model to mark its logits with `output logits`; `{}` has no such output", bundle.model))
}

/// The forward pass at batch 1 over the last `ctx` tokens, once per token.
pub struct WindowDecoder {
    session: Session,
    tokens: BufId,
    logits: BufId,
    ctx: usize,
    vocab: usize,
    noise: Rng,
}

impl WindowDecoder {
    pub fn new(bundle: Bundle, params: &Checkpoint, respec: Respecialise) -> Result<WindowDecoder> {
        let bundle = if bundle.train.batch == 1 { bundle } else { respec(&bundle.sources, &Specialise::batch(1))? };
        let logits = result_buf(&bundle, "logits").ok_or_else(|| no_logits(&bundle))?;
        let tokens = input_buf(&bundle, "tokens")
            .or_else(|| bundle.program.buffers.iter().position(|b| b.kind == BufKind::Input))
            .ok_or_else(|| Error::user("the model has no token input to sample with"))?;
        let ctx = bundle.program.buffers[tokens].shape.get(1).copied().unwrap_or(1);
        let vocab = *bundle.program.buffers[logits].shape.last().unwrap_or(&1);
        let mut session = Session::new(bundle, 1)?;
        session.load_params(params)?;
        Ok(WindowDecoder { session, tokens, logits, ctx, vocab, noise: Rng::new(0) })
    }
}

impl Decoder for WindowDecoder {
    fn vocab(&self) -> usize {
        self.vocab
    }

    fn next_logits(&mut self, seq: &[i32]) -> Result<Vec<f32>> {
        let window = &seq[seq.len().saturating_sub(self.ctx)..];
        let n = window.len();
        // Other inputs (targets) and the padding stay zero.
        let mut toks = vec![0i32; self.ctx];
        toks[..n].copy_from_slice(window);
        self.session.exec.write_i32(self.tokens, 0, &toks)?;
        self.session.set_hypers(0, 1, false, &mut self.noise)?;
        self.session.run("forward")?;
        Ok(self.session.exec.f32(self.logits)?[(n - 1) * self.vocab..n * self.vocab].to_vec())
    }
}

/// The decode program with a KV cache: one position's forward pass per token.
pub struct CachedDecoder {
    session: Session,
    tokens: BufId,
    pos: BufId,
    slot: BufId,
    keymask: BufId,
    logits: BufId,
    /// `(@cache.X.i, new.X.i, rows before the position axis, row length)` per cache.
    caches: Vec<(BufId, BufId, usize, usize)>,
    ctx: usize,
    vocab: usize,
    /// Index in the sequence of the cache's position 0, and positions filled.
    base: usize,
    filled: usize,
    noise: Rng,
}

impl CachedDecoder {
    pub fn new(bundle: Bundle, params: &Checkpoint) -> Result<CachedDecoder> {
        let logits = result_buf(&bundle, "logits").ok_or_else(|| no_logits(&bundle))?;
        let need =
            |name: &str| input_buf(&bundle, name).ok_or_else(|| Error::internal(format!("the decode program has no input `{name}`")));
        let (tokens, pos, slot, keymask) = (need("@tokens")?, need("@pos")?, need("@slot")?, need("@keymask")?);
        let ctx = bundle.program.buffers[slot].shape[0];
        let mut caches = vec![];
        for (name, new) in &bundle.program.entry("forward").map(|e| e.results.clone()).unwrap_or_default() {
            let Some(which) = name.strip_prefix("new.") else { continue };
            let cache = need(&format!("@cache.{which}"))?;
            let shape = &bundle.program.buffers[cache].shape;
            let (rows, row) = match shape.len() {
                r if r >= 2 && shape[r - 2] == ctx => (shape[..r - 2].iter().product(), shape[r - 1]),
                _ => return Err(Error::internal(format!("cache `{which}` has shape {shape:?}, not [..., {ctx}, D]"))),
            };
            caches.push((cache, *new, rows, row));
        }
        let vocab = *bundle.program.buffers[logits].shape.last().unwrap_or(&1);
        let mut session = Session::new(bundle, 1)?;
        session.load_params(params)?;
        let mut d =
            CachedDecoder { session, tokens, pos, slot, keymask, logits, caches, ctx, vocab, base: 0, filled: 0, noise: Rng::new(0) };
        d.reset(0)?;
        Ok(d)
    }

    fn reset(&mut self, base: usize) -> Result<()> {
        self.base = base;
        self.filled = 0;
        for &(cache, _, rows, row) in &self.caches {
            self.session.exec.write_f32(cache, 0, &vec![0.0; rows * self.ctx * row])?;
        }
        self.session.exec.write_f32(self.keymask, 0, &vec![f32::NEG_INFINITY; self.ctx])?;
        Ok(())
    }

    /// Runs position `self.filled` on `token` and stores its keys and values.
    fn step(&mut self, token: i32) -> Result<()> {
        let p = self.filled;
        let exec = &mut self.session.exec;
        exec.write_i32(self.tokens, 0, &[token])?;
        exec.write_i32(self.pos, 0, &[p as i32])?;
        let mut slot = vec![0.0; self.ctx];
        slot[p] = 1.0;
        exec.write_f32(self.slot, 0, &slot)?;
        exec.write_f32(self.keymask, p, &[0.0])?;
        self.session.set_hypers(0, 1, false, &mut self.noise)?;
        self.session.run("forward")?;
        let exec = &mut self.session.exec;
        for &(cache, new, rows, row) in &self.caches {
            let fresh = exec.f32(new)?.into_owned();
            for r in 0..rows {
                exec.write_f32(cache, (r * self.ctx + p) * row, &fresh[r * row..(r + 1) * row])?;
            }
        }
        self.filled += 1;
        Ok(())
    }
}

impl Decoder for CachedDecoder {
    fn vocab(&self) -> usize {
        self.vocab
    }

    fn next_logits(&mut self, seq: &[i32]) -> Result<Vec<f32>> {
        if seq.len() < self.base + self.filled || seq.len() - self.base > self.ctx {
            // A new sequence or a full cache: start again from the last window (the
            // whole context for a prompt, half of it while generating, so that the
            // restart is paid once per ctx/2 tokens).
            let keep = if self.filled == 0 { self.ctx } else { (self.ctx / 2).max(1) };
            self.reset(seq.len().saturating_sub(keep))?;
        }
        for &token in &seq[self.base + self.filled..] {
            self.step(token)?;
        }
        Ok(self.session.exec.f32(self.logits)?[..self.vocab].to_vec())
    }
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
