//! The `bmc` command (CLI.md). The same executable is also the runtime of every
//! training binary: `bmc compile` appends the compiled model to a copy of itself, and
//! at start-up an executable carrying such a payload runs as that training binary.

use bm_runtime::bundle;
use bm_runtime::cli::{TrainArgs, binary_main, parse_kv};
use bmc::driver::{self, FileSource, Options, Stage};
use bmc::emit::{EmitStage, Format, emit};
use bmc::timings::timed;
use clap::{Parser, Subcommand, ValueEnum};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(name = "bmc", version, about = "Compiles declarative .bm deep-learning models into self-contained training binaries")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Check, optimise and lower a model and write its training binary
    Compile {
        model: PathBuf,
        /// Output path (default: the file's stem, ./mlp for mlp.bm)
        #[arg(short, long)]
        out: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = Target::Cpu)]
        target: Target,
        #[arg(long = "set", value_name = "K=V", value_parser = parse_kv)]
        set: Vec<(String, String)>,
    },
    /// Parse and type/shape-check a model; print diagnostics
    Check {
        model: PathBuf,
        #[arg(long = "set", value_name = "K=V", value_parser = parse_kv)]
        set: Vec<(String, String)>,
    },
    /// Print one intermediate form of a model
    Emit {
        model: PathBuf,
        #[arg(long, value_enum)]
        stage: EmitStage,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        #[arg(long = "set", value_name = "K=V", value_parser = parse_kv)]
        set: Vec<(String, String)>,
    },
    /// Compile in memory and train at once (takes the training binary's train flags)
    Train {
        model: PathBuf,
        #[command(flatten)]
        args: TrainArgs,
    },
    /// Time training steps (median ms/step, throughput, GFLOP/s, peak memory)
    Bench {
        model: PathBuf,
        #[arg(long, default_value_t = 20)]
        warmup: usize,
        #[arg(long, default_value_t = 200)]
        steps: usize,
        /// Worker threads (default: all cores)
        #[arg(long)]
        threads: Option<usize>,
        /// Batches prepared before timing and cycled through
        #[arg(long, default_value_t = 8)]
        batches: usize,
        /// Print one JSON line instead of text
        #[arg(long)]
        json: bool,
        /// cpu or cuda
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long = "set", value_name = "K=V", value_parser = parse_kv)]
        set: Vec<(String, String)>,
        /// Also time every kernel of the timed steps and list the slowest (CPU only)
        #[arg(long)]
        profile: bool,
    },
    /// Parameter counts, FLOPs per step, memory and kernel count
    Info {
        model: PathBuf,
        #[arg(long = "set", value_name = "K=V", value_parser = parse_kv)]
        set: Vec<(String, String)>,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum Target {
    Cpu,
    Cuda,
}

/// A failure and its exit code (1: user error, 3: internal error).
struct Failure {
    message: String,
    code: u8,
}

impl From<bm_grammar::Diagnostic> for Failure {
    fn from(d: bm_grammar::Diagnostic) -> Self {
        Failure { message: d.render(std::io::stderr().is_terminal()), code: 1 }
    }
}

impl From<bm_runtime::Error> for Failure {
    fn from(e: bm_runtime::Error) -> Self {
        Failure { message: e.to_string(), code: e.exit_code() as u8 }
    }
}

fn respecialise(sources: &bundle::Sources, spec: &bm_runtime::cli::Specialise) -> bm_runtime::Result<bundle::Bundle> {
    driver::respecialise(sources, spec)
}

fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        eprintln!("internal error: {info}\nThis is a bug in bmc; please report it with the command and the .bm file that caused it.");
        std::process::exit(3);
    }));
}

fn main() -> ExitCode {
    install_panic_hook();
    match bundle::own_payload() {
        Some(Ok(b)) => return ExitCode::from(binary_main(b, &respecialise) as u8),
        Some(Err(e)) => {
            eprintln!("{e}");
            return ExitCode::from(e.exit_code() as u8);
        }
        None => {}
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprint!("{}", f.message);
            if !f.message.ends_with('\n') {
                eprintln!();
            }
            ExitCode::from(f.code)
        }
    }
}

fn path_str(p: &std::path::Path) -> String {
    p.to_string_lossy().into_owned()
}

fn run(cli: Cli) -> Result<(), Failure> {
    match cli.cmd {
        Cmd::Check { model, set } => {
            let loaded = driver::load(&path_str(&model), &FileSource::Disk)?;
            let opts = Options { overrides: set, ..Default::default() };
            let c = driver::compile(&loaded, &opts, Stage::Train)?;
            println!(
                "{}: ok (model {}, {} parameters)",
                model.display(),
                c.model_name,
                c.graph.params.iter().map(|p| c.graph.shape(p.node).iter().product::<usize>()).sum::<usize>()
            );
            Ok(())
        }
        Cmd::Info { model, set } => {
            let loaded = driver::load(&path_str(&model), &FileSource::Disk)?;
            let opts = Options { overrides: set, ..Default::default() };
            let c = driver::compile(&loaded, &opts, Stage::Kernels)?;
            print!("{}", bmc::info::report(&c));
            Ok(())
        }
        Cmd::Emit { model, stage, format, set } => {
            let loaded = driver::load(&path_str(&model), &FileSource::Disk)?;
            let opts = Options { overrides: set, ..Default::default() };
            print!(
                "{}",
                emit(&loaded, &opts, stage, format).map_err(|e| match e {
                    bmc::emit::EmitError::Source(d) => Failure::from(*d),
                    bmc::emit::EmitError::Runtime(r) => Failure::from(r),
                    bmc::emit::EmitError::Usage(m) => Failure { message: format!("error: {m}\n"), code: 1 },
                })?
            );
            Ok(())
        }
        Cmd::Bench { model, warmup, steps, threads, batches, json, device, set, profile } => {
            let loaded = driver::load(&path_str(&model), &FileSource::Disk)?;
            let opts = Options { overrides: set, ..Default::default() };
            let c = driver::compile(&loaded, &opts, Stage::Kernels)?;
            let b = driver::bundle(&loaded, &opts, &c);
            let threads = threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
            let device = bm_runtime::engine::Device::parse(&device)?;
            let opts = bm_runtime::bench::BenchOptions { warmup, steps: steps.max(1), threads, batches, device, profile };
            let r = bm_runtime::bench::run(b, &opts)?;
            if json {
                println!("{}", serde_json::to_string(&r).unwrap_or_default());
            } else {
                println!(
                    "{}: {:.3} ms/step median (min {:.3}, p90 {:.3}) over {steps} steps after {warmup} warm-up; {:.0} items/s; {:.1} GFLOP/s matmul; batch {}; {} threads; JIT {:.0} ms; peak RSS {:.0} MiB",
                    r.model, r.median_ms, r.min_ms, r.p90_ms, r.items_per_s, r.gflops, r.batch, r.threads, r.jit_ms, r.peak_rss_mib
                );
                if !r.profile.is_empty() {
                    println!("slowest kernels (ms per step, share of kernel time; GFLOP/s of matrix products):");
                    for k in r.profile.iter().take(profile_rows()) {
                        let rate = k.gflops.map(|g| format!("  {g:.1} GFLOP/s")).unwrap_or_default();
                        println!("  {:8.3} ms {:5.1}%  {}{rate}", k.ms_per_step, k.percent, k.kernel);
                    }
                    let rest: f64 = r.profile.iter().skip(profile_rows()).map(|k| k.ms_per_step).sum();
                    println!("  {rest:8.3} ms in the other {} kernels", r.profile.len().saturating_sub(profile_rows()));
                    // By kind: the word after `k<i>: ` (matmul, loop, attention, ...).
                    let mut kinds: Vec<(String, f64, usize)> = vec![];
                    for k in &r.profile {
                        let kind = k.kernel.split_whitespace().nth(1).unwrap_or("?").to_string();
                        match kinds.iter_mut().find(|x| x.0 == kind) {
                            Some(x) => {
                                x.1 += k.ms_per_step;
                                x.2 += 1;
                            }
                            None => kinds.push((kind, k.ms_per_step, 1)),
                        }
                    }
                    kinds.sort_by(|a, b| b.1.total_cmp(&a.1));
                    let by_kind: Vec<String> = kinds.iter().map(|(k, ms, n)| format!("{k} {ms:.1} ms ({n})")).collect();
                    println!("by kind: {}", by_kind.join(", "));
                }
            }
            Ok(())
        }
        Cmd::Compile { model, out, target, set } => {
            let loaded = driver::load(&path_str(&model), &FileSource::Disk)?;
            let opts = Options { overrides: set, ..Default::default() };
            let c = driver::compile(&loaded, &opts, Stage::Kernels)?;
            // Every kernel access is checked against its buffer now; the JIT itself runs
            // when the binary starts (tests/snapshots.rs JITs every model in models/), which
            // keeps `bmc compile` at the pipeline's speed (issue 4: W3 in ≤ 0.3 s).
            timed("validate", || bm_runtime::exec::validate(&c.program))?;
            let mut b = timed("bundle", || driver::bundle(&loaded, &opts, &c));
            if target == Target::Cuda {
                // The binary trains on the GPU by default. Where NVRTC is at hand, compile
                // the generated CUDA C now: a kernel NVRTC rejects fails here, and the PTX
                // cache is warm for the first run on this machine.
                b.train.device = "cuda".into();
                let module = bm_runtime::cuda::codegen::generate(&c.program);
                if bm_runtime::cuda::nvrtc::available().is_ok() {
                    bm_runtime::cuda::nvrtc::cached(&module.source, bm_runtime::cuda::nvrtc::DEFAULT_ARCH)?;
                }
            }
            let out = out.unwrap_or_else(|| {
                PathBuf::from(model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into()))
            });
            let runtime = bundle::own_runtime()?;
            timed("write binary", || b.write_binary(&runtime, &out))?;
            println!("wrote {} (model {}; run `{} train`)", out.display(), c.model_name, display_cmd(&out));
            Ok(())
        }
        Cmd::Train { model, args } => {
            let loaded = driver::load(&path_str(&model), &FileSource::Disk)?;
            let opts = Options { overrides: args.set.clone(), batch: args.batch, data: args.data.clone(), data_shapes: None };
            let c = driver::compile(&loaded, &opts, Stage::Kernels)?;
            let b = driver::bundle(&loaded, &opts, &c);
            // The overrides are already compiled in.
            let args = TrainArgs { set: vec![], batch: None, ..args };
            bm_runtime::cli::train(b, &args, &respecialise)?;
            Ok(())
        }
    }
}

fn display_cmd(out: &std::path::Path) -> String {
    if out.components().count() == 1 { format!("./{}", out.display()) } else { out.display().to_string() }
}

/// How many kernels `bmc bench --profile` lists (`BMC_PROFILE_ROWS`, default 25).
fn profile_rows() -> usize {
    std::env::var("BMC_PROFILE_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(25)
}
