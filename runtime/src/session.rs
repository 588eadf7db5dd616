//! A model loaded for running: its program on an [`Engine`] (CPU or GPU), parameter and
//! optimiser-state I/O, batch feeding and the runtime scalars. The training loop
//! and the binary's other commands are built on it.

use crate::bundle::Bundle;
use crate::checkpoint::{self, Checkpoint};
use crate::data::{Batch, TensorData};
use crate::engine::{Device, Engine};
use crate::error::{Error, Result};
use crate::kir::{BufKind, DType};
use crate::rng::Rng;
use std::collections::BTreeMap;
use std::path::Path;

/// Something holding CPU sessions (a `&mut Session`, an evaluator's session), lent to
/// the pool's worker by [`Session::on_workers`] while the lending thread waits for it.
pub(crate) struct OnCpu<T>(pub(crate) T);

// SAFETY: a session is `Send` but for the GPU engine's CUDA handles, and `on_workers`
// moves its closure (and the `OnCpu` values it holds) to another thread only for a CPU
// session, whose companions (an evaluator's session) run on the same device; the lending
// thread blocks in `install` until the closure is done with them.
unsafe impl<T> Send for OnCpu<T> {}

impl<T> OnCpu<T> {
    /// The value; taking it by value makes a closure capture the whole wrapper (not
    /// just its field, which is not `Send`).
    pub(crate) fn into_inner(self) -> T {
        self.0
    }
}

pub struct Session {
    pub bundle: Bundle,
    pub exec: Engine,
}

impl Session {
    /// The program on the CPU with `threads` threads.
    pub fn new(bundle: Bundle, threads: usize) -> Result<Session> {
        Session::on(bundle, Device::Cpu, threads)
    }

    pub fn on(bundle: Bundle, device: Device, threads: usize) -> Result<Session> {
        let exec = Engine::new(&bundle.program, device, threads)?;
        Ok(Session { bundle, exec })
    }

    /// Runs `f` on this session from a worker of the CPU executor's thread pool (here
    /// on the GPU or with one thread), for a loop of many steps: each step's
    /// [`Executor::run`](crate::exec::Executor::run) then starts on a worker that is
    /// already running instead of handing the step to the pool and sleeping until it
    /// ends (a futex wake-up of the calling thread per step).
    pub fn on_workers<R: Send>(&mut self, f: impl FnOnce(&mut Session) -> R + Send) -> R {
        let Some(pool) = self.exec.cpu().and_then(|e| e.workers()) else { return f(self) };
        let lent = OnCpu(self);
        pool.install(move || f(lent.into_inner()))
    }

    fn buffers_of(&self, kind: BufKind) -> Vec<(usize, String, Vec<usize>, DType)> {
        self.bundle
            .program
            .buffers
            .iter()
            .enumerate()
            .filter(|(_, b)| b.kind == kind)
            .map(|(i, b)| (i, b.name.clone(), b.shape.clone(), b.dtype))
            .collect()
    }

    /// Fills every parameter from its initialiser (deterministic from seed and name).
    pub fn init_params(&mut self, seed: u64) -> Result<()> {
        let specs = self.bundle.program.params.clone();
        for p in specs {
            let shape = self.bundle.program.buffers[p.buf].shape.clone();
            // On the executor's threads: drawn in parallel on rayon's global pool, the
            // parameters used every core whatever `--threads` said.
            let draw = || crate::init::init_param(&p.init, &shape, &p.name, seed);
            let v = match self.exec.cpu() {
                Some(e) => e.on_pool(draw),
                None => draw(),
            };
            self.exec.write_f32(p.buf, 0, &v)?;
        }
        Ok(())
    }

    /// Parameters as (name, shape, data), in declaration order (the checkpoint order).
    pub fn params(&self) -> Result<Vec<(String, Vec<usize>, TensorData)>> {
        self.tensors_of(BufKind::Param)
    }

    pub fn opt_state(&self) -> Result<Vec<(String, Vec<usize>, TensorData)>> {
        self.tensors_of(BufKind::OptState)
    }

    fn tensors_of(&self, kind: BufKind) -> Result<Vec<(String, Vec<usize>, TensorData)>> {
        let mut out = vec![];
        for (i, name, shape, _) in self.buffers_of(kind) {
            out.push((name, shape, TensorData::F32(self.exec.f32(i)?.into_owned())));
        }
        Ok(out)
    }

    /// Loads every parameter from a checkpoint (ours, or a PyTorch `state_dict`
    /// saved with `safetensors.torch.save_file`).
    pub fn load_params(&mut self, ck: &Checkpoint) -> Result<()> {
        self.load_kind(ck, BufKind::Param)
    }

    pub fn load_opt_state(&mut self, ck: &Checkpoint) -> Result<()> {
        self.load_kind(ck, BufKind::OptState)
    }

    fn load_kind(&mut self, ck: &Checkpoint, kind: BufKind) -> Result<()> {
        for (i, name, shape, _) in self.buffers_of(kind) {
            let data = ck.expect_tensor(&name, &shape, DType::F32)?;
            match data {
                TensorData::F32(v) => self.exec.write_f32(i, 0, v)?,
                TensorData::I32(_) => {
                    return Err(Error::user(format!("tensor `{name}` in `{}` must be floating point", ck.path.display())));
                }
            }
        }
        Ok(())
    }

    /// Copies every parameter from another session of the same model (e.g. one
    /// specialised for another batch size).
    pub fn copy_params_from(&mut self, other: &Session) -> Result<()> {
        for (i, name, _, _) in self.buffers_of(BufKind::Param) {
            let src = other.bundle.program.buffer_named(&name).ok_or_else(|| Error::internal(format!("parameter `{name}` missing")))?;
            let data = other.exec.f32(src)?.into_owned();
            self.exec.write_f32(i, 0, &data)?;
        }
        Ok(())
    }

    /// Copies a batch into the input buffers, checking names, dtypes and shapes.
    pub fn feed(&mut self, batch: &Batch, source: &str) -> Result<()> {
        for (i, name, shape, dtype) in self.buffers_of(BufKind::Input) {
            let Some((_, data)) = batch.iter().find(|(n, _)| *n == name) else {
                let have: Vec<&str> = batch.iter().map(|(n, _)| n.as_str()).collect();
                return Err(Error::user(format!(
                    "{source} has no tensor `{name}` for the model's input `{name}` (it has: {})",
                    have.join(", ")
                )));
            };
            let want: usize = shape.iter().product();
            if data.len() != want {
                return Err(Error::user(format!(
                    "{source}: `{name}` has {} elements, the model's input needs {want} ({shape:?})",
                    data.len()
                )));
            }
            match (dtype, data) {
                (DType::F32, TensorData::F32(v)) => self.exec.write_f32(i, 0, v)?,
                (DType::I32, TensorData::I32(v)) => self.exec.write_i32(i, 0, v)?,
                (DType::F32, TensorData::I32(v)) => {
                    let v: Vec<f32> = v.iter().map(|&x| x as f32).collect();
                    self.exec.write_f32(i, 0, &v)?;
                }
                (DType::I32, TensorData::F32(_)) => {
                    return Err(Error::user(format!("{source}: `{name}` is f32, the model's input is i32")));
                }
            }
        }
        Ok(())
    }

    /// Sets the runtime scalars: `step`, `total_steps`, `training`, and fresh
    /// dropout noise (`rand.N`) drawn from `rng`.
    pub fn set_hypers(&mut self, step: u64, total: u64, training: bool, rng: &mut Rng) -> Result<()> {
        for (i, name, shape, _) in self.buffers_of(BufKind::Hyper) {
            let value = match name.as_str() {
                "step" => vec![step as f32],
                "total_steps" => vec![total as f32],
                "training" => vec![if training { 1.0 } else { 0.0 }],
                n if n.starts_with("rand.") => (0..shape.iter().product::<usize>()).map(|_| rng.uniform() as f32).collect(),
                other => return Err(Error::internal(format!("unknown runtime scalar `{other}`"))),
            };
            self.exec.write_f32(i, 0, &value)?;
        }
        Ok(())
    }

    /// One training step on `batch` (read from `source`, for errors): the inputs, the
    /// runtime scalars of step `step` of `total`, then the `train_step` entry.
    pub fn train_step(&mut self, batch: &Batch, source: &str, step: u64, total: u64, rng: &mut Rng) -> Result<()> {
        self.feed(batch, source)?;
        self.set_hypers(step, total, true, rng)?;
        self.run("train_step")
    }

    /// Runs an entry and returns its named scalar results' first elements.
    pub fn run(&mut self, entry: &str) -> Result<()> {
        self.exec.run(entry)
    }

    pub fn result(&self, entry: &str, name: &str) -> Result<Vec<f32>> {
        let e = self.bundle.program.entry(entry).ok_or_else(|| Error::internal(format!("no entry `{entry}`")))?;
        let (_, b) =
            e.results.iter().find(|(n, _)| n == name).ok_or_else(|| Error::internal(format!("entry `{entry}` has no result `{name}`")))?;
        Ok(self.exec.f32(*b)?.into_owned())
    }

    pub fn scalar(&self, entry: &str, name: &str) -> Result<f64> {
        Ok(self.result(entry, name)?.first().copied().unwrap_or(f32::NAN) as f64)
    }

    pub fn results(&self, entry: &str) -> Result<Vec<(String, Vec<usize>, TensorData)>> {
        let e = self.bundle.program.entry(entry).ok_or_else(|| Error::internal(format!("no entry `{entry}`")))?;
        let mut out = vec![];
        for (name, b) in &e.results {
            let shape = self.bundle.program.buffers[*b].shape.clone();
            out.push((name.clone(), shape, TensorData::F32(self.exec.f32(*b)?.into_owned())));
        }
        Ok(out)
    }

    /// The first parameter holding a non-finite value, if any.
    pub fn first_non_finite_param(&self) -> Option<String> {
        for (i, name, _, _) in self.buffers_of(BufKind::Param) {
            if self.exec.f32(i).ok()?.iter().any(|x| !x.is_finite()) {
                return Some(name);
            }
        }
        None
    }

    /// Checkpoint metadata: model, step, config, and anything extra.
    pub fn metadata(&self, step: u64, extra: &[(String, String)]) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        m.insert("format".into(), "bmc".into());
        m.insert("model".into(), self.bundle.model.clone());
        m.insert("step".into(), step.to_string());
        m.insert("config".into(), serde_json::to_string(&self.bundle.config).unwrap_or_default());
        for (k, v) in extra {
            m.insert(k.clone(), v.clone());
        }
        m
    }

    pub fn save_params(&self, path: &Path, step: u64, extra: &[(String, String)]) -> Result<()> {
        checkpoint::save_atomic(path, &self.params()?, &self.metadata(step, extra))
    }
}
