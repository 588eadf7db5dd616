//! The training binary's commands (CLI.md): `train`, `eval`, `sample`, `forward`,
//! `grad`, `init`, `info`. `bmc train` runs the same `train` function in process.

use crate::bundle::{Bundle, Sources};
use crate::checkpoint;
use crate::data::{Batch, Batcher, BatcherState, Dataset, TensorData};
use crate::engine::Device;
use crate::error::{Error, Result};
use crate::metrics::{MetricsWriter, StepMetrics};
use crate::rng::Rng;
use crate::session::Session;
use clap::{Args, Parser, Subcommand};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Re-runs the compiler for another batch size, extra `--set` overrides or the one-token
/// decode program (the compiler is linked into every training binary; see
/// ARCHITECTURE.md).
pub type Respecialise<'a> = &'a dyn Fn(&Sources, &Specialise) -> Result<Bundle>;

/// What a re-specialised program is for.
#[derive(Clone, Debug, Default)]
pub struct Specialise {
    pub batch: usize,
    pub overrides: Vec<(String, String)>,
    /// The decode program of a causal language model (`sample`'s KV cache) instead of
    /// the training step; the compiler errs when the model cannot be decoded.
    pub decode: bool,
}

impl Specialise {
    pub fn batch(batch: usize) -> Specialise {
        Specialise { batch, ..Specialise::default() }
    }
}

#[derive(Args, Debug, Clone, Default)]
pub struct TrainArgs {
    /// Data file (overrides the train section's path)
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Number of training steps
    #[arg(long)]
    pub steps: Option<u64>,
    /// Batch size (the model is re-specialised for it)
    #[arg(long)]
    pub batch: Option<usize>,
    /// cpu or cuda
    #[arg(long)]
    pub device: Option<String>,
    /// Worker threads (default: all cores)
    #[arg(long)]
    pub threads: Option<usize>,
    /// Output directory (default: runs/<model>-<time>)
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Resume from a checkpoint `step-N.safetensors` (its `.optim.safetensors` beside it)
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Start from these parameters (a checkpoint or a PyTorch state_dict) with fresh
    /// optimiser state, at step 0 (fine-tuning)
    #[arg(long, conflicts_with = "resume")]
    pub init_from: Option<PathBuf>,
    /// Override a config constant: --set name=value
    #[arg(long = "set", value_name = "K=V", value_parser = parse_kv)]
    pub set: Vec<(String, String)>,
}

pub fn parse_kv(s: &str) -> std::result::Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(format!("expected name=value, got `{s}`")),
    }
}

#[derive(Parser, Debug)]
#[command(about = "A training binary compiled by bmc", disable_help_subcommand = true)]
struct BinCli {
    #[command(subcommand)]
    cmd: BinCmd,
}

#[derive(Subcommand, Debug)]
enum BinCmd {
    /// Train the model as its train section says
    Train(TrainArgs),
    /// Loss (and accuracy) on the held-out split
    Eval {
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long)]
        data: Option<PathBuf>,
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Generate text (models trained on text or tokens data)
    Sample {
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long)]
        prompt: Option<String>,
        #[arg(long, default_value_t = 256)]
        tokens: usize,
        #[arg(long, default_value_t = 1.0)]
        temperature: f64,
        #[arg(long)]
        top_k: Option<usize>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Recompute the whole window for every token instead of using a KV cache
        #[arg(long)]
        no_kv_cache: bool,
    },
    /// Run the model on given inputs; write every output and the loss
    Forward(RunArgs),
    /// Write the loss and every parameter's gradient for one batch (no update)
    Grad(RunArgs),
    /// Write the initial parameters
    Init {
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Parameter counts, FLOPs, memory and kernels of the compiled model
    Info,
}

#[derive(Args, Debug)]
struct RunArgs {
    #[arg(long)]
    checkpoint: PathBuf,
    #[arg(long)]
    inputs: PathBuf,
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    threads: Option<usize>,
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Entry point of a training binary. Returns the process exit code.
pub fn binary_main(bundle: Bundle, respec: Respecialise) -> i32 {
    let cli = match BinCli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    let r = match cli.cmd {
        BinCmd::Train(a) => train(bundle, &a, respec),
        BinCmd::Eval { checkpoint, data, threads } => eval_cmd(bundle, &checkpoint, data.as_deref(), threads, respec),
        BinCmd::Sample { checkpoint, prompt, tokens, temperature, top_k, seed, no_kv_cache } => crate::sample::sample(
            bundle,
            &crate::sample::SampleOptions {
                checkpoint: &checkpoint,
                prompt: prompt.as_deref(),
                tokens,
                temperature,
                top_k,
                seed,
                no_kv_cache,
            },
            respec,
        ),
        BinCmd::Forward(a) => run_on_inputs(bundle, &a, "forward", respec),
        BinCmd::Grad(a) => run_on_inputs(bundle, &a, "grad", respec),
        BinCmd::Init { out, seed } => init_cmd(bundle, &out, seed),
        BinCmd::Info => {
            print!("{}", bundle.info);
            Ok(())
        }
    };
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{e}");
            e.exit_code()
        }
    }
}

fn load_dataset(bundle: &Bundle, data: Option<&Path>) -> Result<Dataset> {
    let mut spec = bundle.train.data.clone().ok_or_else(|| {
        Error::user(format!(
            "model `{}` has no data: add `data = csv(\"...\")` (or another source) to its train section, or pass --data",
            bundle.model
        ))
    })?;
    if let Some(d) = data {
        spec.set_path(d.to_string_lossy());
    }
    Dataset::load(&spec)
}

fn check_data_matches(bundle: &Bundle, ds: &Dataset) -> Result<()> {
    if let Some(l) = &bundle.train.labels {
        l.check(ds)?;
    }
    let shapes = ds.names_and_shapes();
    for b in &bundle.program.buffers {
        if b.kind != crate::kir::BufKind::Input {
            continue;
        }
        let Some((_, dt, s)) = shapes.iter().find(|(n, _, _)| *n == b.name) else {
            let have: Vec<String> = shapes.iter().map(|(n, d, s)| format!("`{n}`: {}{s:?}", d.name())).collect();
            return Err(Error::user(format!(
                "the data `{}` gives {}, but the model's input `{}` is not among them",
                ds.spec().path(),
                have.join(", "),
                b.name
            )));
        };
        if b.shape.get(1..) != Some(&s[..]) || *dt != b.dtype {
            return Err(Error::user(format!(
                "the data `{}` gives `{}` as {}{s:?} per example, but the model's input is {}{:?} per example",
                ds.spec().path(),
                b.name,
                dt.name(),
                b.dtype.name(),
                b.shape.get(1..).unwrap_or(&[])
            )));
        }
    }
    Ok(())
}

/// Items (examples or tokens) in one batch, for throughput.
fn items_per_batch(bundle: &Bundle, ds: &Dataset) -> usize {
    let ctx = if ds.is_stream() { ds.names_and_shapes().first().and_then(|(_, _, s)| s.first().copied()).unwrap_or(1) } else { 1 };
    bundle.train.batch * ctx
}

fn optim_path(ckpt: &Path) -> PathBuf {
    let s = ckpt.to_string_lossy();
    match s.strip_suffix(".safetensors") {
        Some(stem) => PathBuf::from(format!("{stem}.optim.safetensors")),
        None => PathBuf::from(format!("{s}.optim")),
    }
}

struct Evaluation {
    loss: f64,
    accuracy: Option<f64>,
}

/// Most examples evaluated in one batch.
const MAX_EVAL_BATCH: usize = 4096;

/// Evaluates on the held-out split. Example datasets are evaluated exactly: the first
/// `min(held-out, batch × eval batches, 4096)` held-out examples in one batch, with the
/// model re-specialised for that batch size when it differs; token streams use
/// `eval_batches` batches of windows at the training batch size.
struct Evaluator {
    /// A session specialised for the eval batch (None: use the training session).
    session: Option<Session>,
    batches: Vec<Batch>,
}

impl Evaluator {
    fn new(bundle: &Bundle, ds: &Dataset, device: Device, threads: usize, respec: Respecialise) -> Result<Option<Evaluator>> {
        if !ds.has_eval() {
            return Ok(None);
        }
        let batch = bundle.train.batch;
        if ds.is_stream() {
            return Ok(Some(Evaluator { session: None, batches: ds.eval_batches(batch, bundle.train.eval_batches.max(1))? }));
        }
        let n = ds.eval_len().min(batch * bundle.train.eval_batches.max(1)).clamp(1, MAX_EVAL_BATCH);
        let session = if n == batch { None } else { Some(Session::on(respec(&bundle.sources, &Specialise::batch(n))?, device, threads)?) };
        Ok(Some(Evaluator { session, batches: vec![ds.eval_batch(n, 0)] }))
    }

    fn run(&mut self, train: &mut Session, step: u64, total: u64, rng: &mut Rng) -> Result<Evaluation> {
        let session = match &mut self.session {
            Some(s) => {
                s.copy_params_from(train)?;
                s
            }
            None => train,
        };
        let has_acc = session.bundle.program.entry("forward").is_some_and(|e| e.results.iter().any(|(n, _)| n == "accuracy"));
        let (mut loss, mut acc) = (0.0, 0.0);
        for b in &self.batches {
            session.feed(b, "the held-out data")?;
            session.set_hypers(step, total, false, rng)?;
            session.run("forward")?;
            loss += session.scalar("forward", "loss")?;
            if has_acc {
                acc += session.scalar("forward", "accuracy")?;
            }
        }
        let n = self.batches.len().max(1) as f64;
        Ok(Evaluation { loss: loss / n, accuracy: has_acc.then_some(acc / n) })
    }
}

/// Trains as the bundle's train section says, with flags overriding it.
pub fn train(mut bundle: Bundle, args: &TrainArgs, respec: Respecialise) -> Result<()> {
    let batch = args.batch.unwrap_or(bundle.train.batch);
    if batch == 0 {
        return Err(Error::user("--batch must be at least 1"));
    }
    if !args.set.is_empty() || batch != bundle.train.batch {
        bundle = respec(&bundle.sources, &Specialise { batch, overrides: args.set.clone(), decode: false })?;
    }
    let device = Device::parse(args.device.as_deref().unwrap_or(&bundle.train.device))?;
    if device == Device::Cuda {
        crate::cuda::device::check_libraries()?;
    }
    let ds = load_dataset(&bundle, args.data.as_deref())?;
    check_data_matches(&bundle, &ds)?;
    let cfg = bundle.train.clone();
    let steps = match (args.steps, cfg.epochs) {
        (Some(s), _) => s,
        (None, Some(e)) => e * ds.steps_per_epoch(cfg.batch) as u64,
        (None, None) => cfg.steps,
    };
    let threads = args.threads.unwrap_or_else(default_threads).max(1);
    let items = items_per_batch(&bundle, &ds);
    let model = bundle.model.clone();
    let mut evaluator = Evaluator::new(&bundle, &ds, device, threads, respec)?;
    let mut session = Session::on(bundle, device, threads)?;
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from("runs").join(format!("{}-{}", model.to_lowercase(), timestamp())));
    std::fs::create_dir_all(&out).map_err(|e| Error::user(format!("cannot create the output directory `{}`: {e}", out.display())))?;
    let mut batcher = Batcher::new(&ds, cfg.batch, cfg.seed)?;
    let mut rng = Rng::new(cfg.seed ^ 0xD00D_5EED);
    let mut start = 0;
    if let Some(ck) = &args.resume {
        let params = checkpoint::load(ck)?;
        session.load_params(&params)?;
        let opath = optim_path(ck);
        let opt = checkpoint::load_file(&opath, "optimizer checkpoint")?;
        session.load_opt_state(&opt)?;
        start = opt
            .expect_metadata("step")?
            .parse::<u64>()
            .map_err(|_| Error::user(format!("optimizer checkpoint `{}` has a bad `step`", opath.display())))?;
        batcher.restore(&BatcherState::from_json(opt.expect_metadata("data_position")?)?)?;
        let rs = opt
            .expect_metadata("rng")?
            .parse::<u64>()
            .map_err(|_| Error::user(format!("optimizer checkpoint `{}` has a bad `rng`", opath.display())))?;
        rng = Rng::from_state(rs);
    } else if let Some(ck) = &args.init_from {
        session.load_params(&checkpoint::load(ck)?)?;
    } else {
        session.init_params(cfg.seed)?;
    }
    let mut metrics = MetricsWriter::create(&out)?;
    let eval_every = if cfg.eval_every == 0 { (steps / 10).max(1) } else { cfg.eval_every };
    let interactive = std::io::stderr().is_terminal();
    let bar = if interactive {
        let b = indicatif::ProgressBar::new(steps);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_position(start);
        Some(b)
    } else {
        None
    };
    let log_every = (steps / 20).max(1);
    let t0 = Instant::now();
    let codec_meta: Vec<(String, String)> = ds.codec().map(|c| c.to_metadata()).unwrap_or_default();
    let mut last_eval: Option<Evaluation> = None;
    eprintln!("training {model} for {steps} steps (batch {}, {threads} threads) into {}", cfg.batch, out.display());
    // On the executor's workers: each step starts on a running worker rather than
    // waking one and sleeping until it ends (`Session::on_workers`).
    // The evaluator's session is on the training session's device (see `OnCpu`).
    let lent = crate::session::OnCpu(&mut evaluator);
    session.on_workers(|session| -> Result<()> {
        let evaluator = lent.into_inner();
        for step in start..steps {
            let ts = Instant::now();
            let b: Batch = batcher.next_batch();
            session.train_step(&b, "the training data", step, steps, &mut rng)?;
            let loss = session.scalar("train_step", "loss")?;
            let lr = session.scalar("train_step", "lr")?;
            let grad_norm = session.scalar("train_step", "grad_norm")?;
            if !loss.is_finite() || !grad_norm.is_finite() {
                let what = session.first_non_finite_param().map(|p| format!("; parameter `{p}` is no longer finite")).unwrap_or_default();
                return Err(Error::user(format!(
                    "training stopped: the loss became {loss} (gradient norm {grad_norm}) at step {}{what}; the last good checkpoint in `{}` is kept. Try a lower learning rate or clip_grad.",
                    step + 1,
                    out.display()
                )));
            }
            let dt = ts.elapsed().as_secs_f64();
            let done = step + 1;
            let mut m = StepMetrics {
                step: done,
                loss,
                lr,
                grad_norm,
                throughput: items as f64 / dt.max(1e-9),
                elapsed_s: t0.elapsed().as_secs_f64(),
                ..Default::default()
            };
            if (done % eval_every == 0 || done == steps)
                && let Some(ev) = evaluator.as_mut().map(|e| e.run(session, step, steps, &mut rng)).transpose()?
            {
                m.eval_loss = Some(ev.loss);
                m.eval_accuracy = ev.accuracy;
                let acc = ev.accuracy.map(|a| format!(" eval_accuracy {a:.4}")).unwrap_or_default();
                let line = format!("step {done}/{steps} eval_loss {:.4}{acc}", ev.loss);
                match &bar {
                    Some(b) => b.println(line),
                    None => eprintln!("{line}"),
                }
                last_eval = Some(ev);
            }
            metrics.log(&m)?;
            match &bar {
                Some(b) => {
                    b.set_position(done);
                    b.set_message(format!(
                        "loss {loss:.4} lr {lr:.2e} {:.0} {}/s",
                        m.throughput,
                        if ds.is_stream() { "tok" } else { "samples" }
                    ));
                }
                None if done % log_every == 0 || done == steps || done == start + 1 => {
                    eprintln!("step {done}/{steps} loss {loss:.4} lr {lr:.3e} grad_norm {grad_norm:.3} {:.0} items/s", m.throughput);
                }
                None => {}
            }
            let ckpt_due = (cfg.checkpoint_every > 0 && done % cfg.checkpoint_every == 0) || done == steps;
            if ckpt_due {
                save_checkpoint(session, &out, done, &batcher, &rng, &codec_meta)?;
                metrics.write_svg()?;
            }
        }
        Ok(())
    })?;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    metrics.write_svg()?;
    let summary = match &last_eval {
        Some(ev) => format!(
            "done: {steps} steps in {:.1}s; eval_loss {:.4}{}",
            t0.elapsed().as_secs_f64(),
            ev.loss,
            ev.accuracy.map(|a| format!(", eval_accuracy {a:.4}")).unwrap_or_default()
        ),
        None => format!("done: {steps} steps in {:.1}s", t0.elapsed().as_secs_f64()),
    };
    println!("{summary}");
    println!("checkpoint: {}", out.join(format!("step-{steps}.safetensors")).display());
    Ok(())
}

fn save_checkpoint(session: &Session, out: &Path, step: u64, batcher: &Batcher, rng: &Rng, codec: &[(String, String)]) -> Result<()> {
    session.save_params(&out.join(format!("step-{step}.safetensors")), step, codec)?;
    let mut meta = session.metadata(step, codec);
    meta.insert("data_position".into(), batcher.state().to_json());
    meta.insert("rng".into(), rng.state().to_string());
    checkpoint::save_atomic(&out.join(format!("step-{step}.optim.safetensors")), &session.opt_state()?, &meta)
}

fn timestamp() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    // UTC date and time from the Unix time (civil-from-days).
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}{m:02}{d:02}-{:02}{:02}{:02}", rem / 3600, (rem / 60) % 60, rem % 60)
}

fn eval_cmd(bundle: Bundle, ckpt: &Path, data: Option<&Path>, threads: Option<usize>, respec: Respecialise) -> Result<()> {
    let ds = load_dataset(&bundle, data)?;
    check_data_matches(&bundle, &ds)?;
    if !ds.has_eval() {
        return Err(Error::user(format!("the data `{}` has no held-out split (split = 1.0)", ds.spec().path())));
    }
    let params = checkpoint::load(ckpt)?;
    let seed = bundle.train.seed;
    let threads = threads.unwrap_or_else(default_threads);
    // On the device the train section names (`device = "cuda"`), like training.
    let device = Device::parse(&bundle.train.device)?;
    let mut evaluator = Evaluator::new(&bundle, &ds, device, threads, respec)?;
    let mut session = Session::on(bundle, device, threads)?;
    session.load_params(&params)?;
    let mut rng = Rng::new(seed);
    if let Some(ev) = evaluator.as_mut().map(|e| e.run(&mut session, 0, 1, &mut rng)).transpose()? {
        let acc = ev.accuracy.map(|a| format!(" eval_accuracy {a:.4}")).unwrap_or_default();
        println!("eval_loss {:.6}{acc}", ev.loss);
    }
    Ok(())
}

fn init_cmd(bundle: Bundle, out: &Path, seed: Option<u64>) -> Result<()> {
    let seed = seed.unwrap_or(bundle.train.seed);
    let mut session = Session::new(bundle, 1)?;
    session.init_params(seed)?;
    session.save_params(out, 0, &[("seed".into(), seed.to_string())])?;
    println!("wrote {}", out.display());
    Ok(())
}

fn run_on_inputs(mut bundle: Bundle, a: &RunArgs, entry: &str, respec: Respecialise) -> Result<()> {
    let inputs = checkpoint::load_file(&a.inputs, "inputs file")?;
    let input_names: Vec<String> =
        bundle.program.buffers.iter().filter(|b| b.kind == crate::kir::BufKind::Input).map(|b| b.name.clone()).collect();
    let Some(first) = input_names.iter().find_map(|n| inputs.get(n)) else {
        return Err(Error::user(format!(
            "inputs file `{}` has none of the model's inputs ({})",
            a.inputs.display(),
            input_names.join(", ")
        )));
    };
    let batch = first.shape.first().copied().unwrap_or(1);
    if batch == 0 {
        return Err(Error::user(format!("inputs file `{}`: the batch axis is empty", a.inputs.display())));
    }
    if batch != bundle.train.batch {
        bundle = respec(&bundle.sources, &Specialise::batch(batch))?;
    }
    let params = checkpoint::load(&a.checkpoint)?;
    let mut b: Batch = vec![];
    for name in &input_names {
        let t = inputs.get(name).ok_or_else(|| Error::user(format!("inputs file `{}` has no tensor `{name}`", a.inputs.display())))?;
        let want = bundle.program.buffers.iter().find(|x| x.name == *name).map(|x| x.shape.clone()).unwrap_or_default();
        if t.shape != want {
            return Err(Error::user(format!(
                "tensor `{name}` in `{}` has shape {:?}, the model needs {want:?}",
                a.inputs.display(),
                t.shape
            )));
        }
        b.push((name.clone(), t.data.clone()));
    }
    let seed = bundle.train.seed;
    let mut session = Session::new(bundle, a.threads.unwrap_or_else(default_threads))?;
    session.load_params(&params)?;
    session.feed(&b, &format!("inputs file `{}`", a.inputs.display()))?;
    let mut rng = Rng::new(seed);
    session.set_hypers(0, 1, false, &mut rng)?;
    session.run(entry)?;
    let results = session.results(entry)?;
    let meta = session.metadata(0, &[]);
    checkpoint::save_atomic(&a.out, &results, &meta)?;
    if let Some((_, _, TensorData::F32(l))) = results.iter().find(|(n, _, _)| n == "loss") {
        println!("loss {:.6}", l.first().copied().unwrap_or(f32::NAN));
    }
    println!("wrote {}", a.out.display());
    Ok(())
}
