//! End-to-end tests of CLI.md through the real executables: `bmc compile` writes a
//! self-contained training binary that trains `models/mlp.bm` to ≥ 95% held-out accuracy
//! from an empty directory; resume is bit-exact; the binary's other commands (`init`,
//! `eval`, `forward`, `grad`, `info`, `sample`, `--device`, `--batch`) behave; `bmc train`,
//! `bmc info` and `bmc emit` work; a non-finite loss stops training cleanly; and no
//! run leaves a temporary file behind (checkpoints are written atomically).

use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

// ---------------------------------------------------------------------------------------
// Locating and running the executables
// ---------------------------------------------------------------------------------------

use bm_tests::{bmc_exe, workspace};

fn mlp_bm() -> PathBuf {
    workspace().join("models/mlp.bm")
}

fn digits_csv() -> PathBuf {
    workspace().join("models/data/digits.csv")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Everything a command printed, for failure messages.
fn show(o: &Output) -> String {
    format!("exit {:?}\n--- stdout\n{}\n--- stderr\n{}", o.status.code(), text(&o.stdout), text(&o.stderr))
}

#[track_caller]
fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

#[track_caller]
fn ok(o: Output) -> Output {
    assert_eq!(o.status.code(), Some(0), "expected success\n{}", show(&o));
    o
}

/// Exit code 1 (a user error, not a crash or a bug) with every phrase in stderr.
#[track_caller]
fn user_error(o: &Output, phrases: &[&str]) {
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "expected exit code 1\n{}", show(o));
    assert!(!err.contains("internal error") && !err.contains("panicked"), "not a clean user error\n{}", show(o));
    for p in phrases {
        assert!(err.contains(p), "stderr lacks {p:?}\n{}", show(o));
    }
}

/// `bmc args...` in `dir`.
fn bmc(dir: &Path, args: &[&str]) -> Output {
    run(Command::new(bmc_exe()).args(args).current_dir(dir))
}

/// A training binary `exe` run with `args` in `dir`.
fn exe(exe: &Path, dir: &Path, args: &[&str]) -> Output {
    run(Command::new(exe).args(args).current_dir(dir))
}

/// Compiles `models/mlp.bm` into `dir/mlp` and returns its path.
fn compile_mlp(dir: &Path) -> PathBuf {
    let out = dir.join("mlp");
    ok(bmc(dir, &["compile", mlp_bm().to_str().unwrap(), "-o", out.to_str().unwrap()]));
    assert!(out.is_file(), "bmc compile wrote no {}", out.display());
    out
}

fn s(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

// ---------------------------------------------------------------------------------------
// Files a run writes
// ---------------------------------------------------------------------------------------

/// A safetensors file: tensors as (dtype, shape, f64 values) and the metadata.
struct St {
    tensors: BTreeMap<String, (Dtype, Vec<usize>, Vec<f64>)>,
    /// The exact f32 bits of every F32 tensor, for bit-exact comparisons.
    bits: BTreeMap<String, Vec<u32>>,
    metadata: HashMap<String, String>,
}

impl St {
    #[track_caller]
    fn shape(&self, name: &str) -> &[usize] {
        &self.get(name).1
    }
    #[track_caller]
    fn get(&self, name: &str) -> &(Dtype, Vec<usize>, Vec<f64>) {
        self.tensors.get(name).unwrap_or_else(|| panic!("no tensor `{name}`; have {:?}", self.tensors.keys().collect::<Vec<_>>()))
    }
    #[track_caller]
    fn values(&self, name: &str) -> &[f64] {
        &self.get(name).2
    }
    #[track_caller]
    fn scalar(&self, name: &str) -> f64 {
        let v = self.values(name);
        assert_eq!(v.len(), 1, "`{name}` is not a scalar");
        v[0]
    }
}

#[track_caller]
fn load(path: &Path) -> St {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{} is not a safetensors file: {e}", path.display()));
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let mut tensors = BTreeMap::new();
    let mut bits = BTreeMap::new();
    for (name, t) in st.tensors() {
        let values: Vec<f64> = match t.dtype() {
            Dtype::F32 => {
                let b: Vec<u32> = t.data().chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
                let v = b.iter().map(|&x| f32::from_bits(x) as f64).collect();
                bits.insert(name.clone(), b);
                v
            }
            Dtype::I32 => t.data().chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
            other => panic!("{}: tensor `{name}` has dtype {other:?}", path.display()),
        };
        tensors.insert(name, (t.dtype(), t.shape().to_vec(), values));
    }
    St { tensors, bits, metadata: meta.metadata().clone().unwrap_or_default() }
}

enum Data {
    F32(Vec<f32>),
    I32(Vec<i32>),
}

/// Writes a safetensors file with the `safetensors` crate (as PyTorch's `save_file` would).
fn save(path: &Path, tensors: &[(&str, Vec<usize>, Data)]) {
    let raw: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, shape, d)| match d {
            Data::F32(v) => (n.to_string(), Dtype::F32, shape.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            Data::I32(v) => (n.to_string(), Dtype::I32, shape.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        })
        .collect();
    let views: Vec<(String, TensorView)> =
        raw.iter().map(|(n, dt, shape, b)| (n.clone(), TensorView::new(*dt, shape.clone(), b).unwrap())).collect();
    let bytes = safetensors::serialize(views, None).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// Writes every tensor of `st` (all F32 here: parameters) back out, with `edit` applied.
fn save_params(path: &Path, st: &St, edit: impl Fn(&str, &mut Vec<f32>)) {
    let mut ts = vec![];
    for (name, (dt, shape, _)) in &st.tensors {
        assert_eq!(*dt, Dtype::F32, "parameter `{name}`");
        let mut v: Vec<f32> = st.bits[name].iter().map(|&b| f32::from_bits(b)).collect();
        edit(name, &mut v);
        ts.push((name.as_str(), shape.clone(), Data::F32(v)));
    }
    save(path, &ts);
}

/// The lines of `metrics.jsonl`, parsed.
#[track_caller]
fn metrics(dir: &Path) -> Vec<serde_json::Map<String, Value>> {
    let p = dir.join("metrics.jsonl");
    let t = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()));
    t.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| match serde_json::from_str::<Value>(l) {
            Ok(Value::Object(m)) => m,
            other => panic!("{}: line {l:?} is not a JSON object: {other:?}", p.display()),
        })
        .collect()
}

#[track_caller]
fn num(m: &serde_json::Map<String, Value>, key: &str) -> f64 {
    m.get(key).and_then(Value::as_f64).unwrap_or_else(|| panic!("metrics line {m:?} has no number `{key}`"))
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() { stack.push(p) } else { out.push(p) }
        }
    }
    out.sort();
    out
}

/// No temporary file (an interrupted or leaked atomic write) remains anywhere under `dir`.
#[track_caller]
fn assert_no_tmp_files(dir: &Path) {
    let tmp: Vec<PathBuf> = files_under(dir)
        .into_iter()
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.contains(".tmp") || n.ends_with('~')))
        .collect();
    assert!(tmp.is_empty(), "temporary files left behind: {tmp:?}");
}

/// `eval_loss` and `eval_accuracy` from a line such as
/// `done: 1500 steps in 5.0s; eval_loss 0.1984, eval_accuracy 0.9556`.
fn parse_eval(out: &str) -> Option<(f64, f64)> {
    let line = out.lines().rev().find(|l| l.contains("eval_loss") && l.contains("eval_accuracy"))?;
    let after = |key: &str| -> Option<f64> {
        let rest = &line[line.find(key)? + key.len()..];
        rest.split(|c: char| c.is_whitespace() || c == ',' || c == ';').find(|t| !t.is_empty())?.parse().ok()
    };
    Some((after("eval_loss")?, after("eval_accuracy")?))
}

const PARAMS: [(&str, &[usize]); 6] = [
    ("fc1.weight", &[256, 64]),
    ("fc1.bias", &[256]),
    ("fc2.weight", &[256, 256]),
    ("fc2.bias", &[256]),
    ("fc3.weight", &[10, 256]),
    ("fc3.bias", &[10]),
];

// ---------------------------------------------------------------------------------------
// 1. The compiled binary is self-contained and trains the MLP to ≥ 95%
// ---------------------------------------------------------------------------------------

#[test]
fn compiled_binary_is_self_contained_and_trains_mlp() {
    let build = tempfile::tempdir().unwrap();
    std::fs::create_dir(build.path().join("bin")).unwrap();
    let built = build.path().join("bin/mlp");
    let o = ok(bmc(build.path(), &["compile", s(&mlp_bm()), "-o", s(&built)]));
    assert!(text(&o.stdout).contains("wrote"), "{}", show(&o));

    // Only the binary, in an empty directory, with an environment that knows nothing of
    // the source tree or cargo.
    let here = tempfile::tempdir().unwrap();
    let bin = here.path().join("mlp");
    std::fs::copy(&built, &bin).unwrap();
    drop(build);
    let home = tempfile::tempdir().unwrap();
    let o = run(Command::new(&bin)
        .args(["train", "--data", s(&digits_csv())])
        .current_dir(here.path())
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", home.path())
        .env("TMPDIR", here.path()));
    let o = ok(o);

    // The run directory: runs/mlp-<time>/ under the working directory.
    let runs: Vec<PathBuf> = std::fs::read_dir(here.path().join("runs")).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(runs.len(), 1, "expected one run directory, found {runs:?}");
    let run_dir = &runs[0];
    let name = run_dir.file_name().unwrap().to_str().unwrap();
    assert!(name.starts_with("mlp-") && name.len() > "mlp-".len(), "run directory {name}");

    // Final held-out accuracy, from the summary line and from metrics.jsonl.
    let printed = format!("{}\n{}", text(&o.stdout), text(&o.stderr));
    let (eval_loss, acc) = parse_eval(&printed).unwrap_or_else(|| panic!("no eval_accuracy printed\n{}", show(&o)));
    assert!(acc >= 0.95, "held-out accuracy {acc} < 0.95 (eval_loss {eval_loss})\n{}", show(&o));

    let lines = metrics(run_dir);
    assert_eq!(lines.len(), 1500, "one metrics line per step (the MLP logs every step)");
    for (i, m) in lines.iter().enumerate() {
        for k in ["step", "loss", "lr", "grad_norm", "throughput", "elapsed_s"] {
            let v = num(m, k);
            assert!(v.is_finite(), "line {i}: `{k}` = {v}");
        }
        assert_eq!(num(m, "step") as usize, i + 1, "steps in order");
        if m.contains_key("eval_loss") || m.contains_key("eval_accuracy") {
            num(m, "eval_loss");
            let a = num(m, "eval_accuracy");
            assert!((0.0..=1.0).contains(&a), "eval_accuracy {a}");
        }
    }
    let evals: Vec<usize> = lines.iter().filter(|m| m.contains_key("eval_loss")).map(|m| num(m, "step") as usize).collect();
    assert_eq!(evals, vec![250, 500, 750, 1000, 1250, 1500], "eval = every(250)");
    let last = lines.last().unwrap();
    let last_acc = num(last, "eval_accuracy");
    assert!(last_acc >= 0.95, "final eval_accuracy in metrics.jsonl {last_acc}");
    assert!((last_acc - acc).abs() < 1e-3, "printed {acc} vs metrics.jsonl {last_acc}");
    assert!(num(last, "loss") < 0.1, "final training loss {}", num(last, "loss"));
    let elapsed: Vec<f64> = lines.iter().map(|m| num(m, "elapsed_s")).collect();
    assert!(elapsed.windows(2).all(|w| w[0] <= w[1]), "elapsed_s never decreases");

    // The other files.
    let files: Vec<String> = std::fs::read_dir(run_dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    for f in ["step-1500.safetensors", "step-1500.optim.safetensors", "metrics.jsonl", "loss.svg"] {
        assert!(files.iter().any(|x| x == f), "run directory lacks {f}: {files:?}");
    }
    assert!(files.iter().any(|f| f.starts_with("events.out.tfevents.")), "no TensorBoard event file: {files:?}");
    let svg = std::fs::read_to_string(run_dir.join("loss.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.trim_end().ends_with("</svg>"), "loss.svg is not an SVG document");
    let ev = std::fs::read(files.iter().find(|f| f.starts_with("events.out.tfevents.")).map(|f| run_dir.join(f)).unwrap()).unwrap();
    assert!(ev.len() > 1000, "the event file holds 1500 steps of scalars, it has {} bytes", ev.len());

    // The checkpoint: PyTorch names and layouts, f32, metadata.
    let ck = load(&run_dir.join("step-1500.safetensors"));
    let names: Vec<&str> = ck.tensors.keys().map(String::as_str).collect();
    let mut want: Vec<&str> = PARAMS.iter().map(|(n, _)| *n).collect();
    want.sort();
    assert_eq!(names, want);
    for (n, shape) in PARAMS {
        let (dt, sh, v) = ck.get(n);
        assert_eq!(*dt, Dtype::F32, "{n}");
        assert_eq!(sh.as_slice(), shape, "{n}");
        assert!(v.iter().all(|x| x.is_finite()), "{n} is not finite");
        assert!(v.iter().any(|x| *x != 0.0), "{n} is all zeros");
    }
    assert_eq!(ck.metadata.get("step").map(String::as_str), Some("1500"), "metadata {:?}", ck.metadata);
    assert_eq!(ck.metadata.get("model").map(String::as_str), Some("Mlp"), "metadata {:?}", ck.metadata);
    let optim = load(&run_dir.join("step-1500.optim.safetensors"));
    assert!(!optim.tensors.is_empty(), "the optimiser checkpoint holds no state");
    assert_eq!(optim.metadata.get("step").map(String::as_str), Some("1500"));
    for k in ["data_position", "rng"] {
        assert!(optim.metadata.contains_key(k), "the optimiser checkpoint's metadata lacks `{k}`: {:?}", optim.metadata);
    }

    // The checkpoint evaluates to the same accuracy through `eval`.
    let o = ok(exe(&bin, here.path(), &["eval", "--checkpoint", s(&run_dir.join("step-1500.safetensors")), "--data", s(&digits_csv())]));
    let (_, acc2) = parse_eval(&text(&o.stdout)).unwrap_or_else(|| panic!("eval printed no accuracy\n{}", show(&o)));
    assert!((acc2 - acc).abs() < 1e-3, "eval gives {acc2}, training ended at {acc}");

    assert_no_tmp_files(here.path());
}

// ---------------------------------------------------------------------------------------
// 2. Resume is exact
// ---------------------------------------------------------------------------------------

#[test]
fn resume_is_bit_exact() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let bin = compile_mlp(dir);
    let data = digits_csv();
    let train = |args: &[&str]| {
        let mut a = vec!["train", "--data", s(&data), "--threads", "1"];
        a.extend_from_slice(args);
        ok(exe(&bin, dir, &a))
    };
    train(&["--steps", "20", "--out", "X"]);
    train(&["--steps", "10", "--out", "Y"]);
    assert!(dir.join("Y/step-10.safetensors").is_file() && dir.join("Y/step-10.optim.safetensors").is_file());
    let o = train(&["--steps", "20", "--resume", "Y/step-10.safetensors", "--out", "Y"]);
    // The resumed run starts at step 11.
    assert!(!text(&o.stderr).contains("step 1/20 "), "the resumed run restarted from step 1\n{}", show(&o));

    let x = metrics(&dir.join("X"));
    let y = metrics(&dir.join("Y"));
    assert_eq!(x.len(), 20);
    assert!(y.len() >= 10, "Y/metrics.jsonl has {} lines", y.len());
    let y_last = &y[y.len() - 10..];
    for (mx, my) in x[10..].iter().zip(y_last) {
        let step = num(mx, "step");
        assert_eq!(num(my, "step"), step);
        for k in ["loss", "lr", "grad_norm"] {
            let (a, b) = (num(mx, k), num(my, k));
            assert_eq!(a.to_bits(), b.to_bits(), "step {step}: `{k}` {a} (straight) vs {b} (resumed)");
        }
    }
    // The eval at the end matches as well.
    for k in ["eval_loss", "eval_accuracy"] {
        assert_eq!(num(&x[19], k).to_bits(), num(&y_last[9], k).to_bits(), "`{k}` at step 20");
    }
    // If the resumed run appended, the first ten lines are the first run's, equal to X's.
    if y.len() == 20 {
        for (mx, my) in x[..10].iter().zip(&y[..10]) {
            assert_eq!(num(mx, "loss").to_bits(), num(my, "loss").to_bits(), "step {}", num(mx, "step"));
        }
    }

    // Final parameters and optimiser state, exactly.
    for f in ["step-20.safetensors", "step-20.optim.safetensors"] {
        let (a, b) = (load(&dir.join("X").join(f)), load(&dir.join("Y").join(f)));
        assert_eq!(a.tensors.keys().collect::<Vec<_>>(), b.tensors.keys().collect::<Vec<_>>(), "{f}");
        for (n, bits) in &a.bits {
            assert_eq!(a.shape(n), b.shape(n), "{f}: {n}");
            let diff = bits.iter().zip(&b.bits[n]).filter(|(p, q)| p != q).count();
            assert_eq!(diff, 0, "{f}: {diff} elements of `{n}` differ between the straight and the resumed run");
        }
        assert_eq!(a.metadata, b.metadata, "{f}: metadata");
    }
    // Checkpoints are deterministic bytes, too.
    let (a, b) = (std::fs::read(dir.join("X/step-20.safetensors")).unwrap(), std::fs::read(dir.join("Y/step-20.safetensors")).unwrap());
    assert!(a == b, "X/step-20.safetensors and Y/step-20.safetensors hold the same tensors but differ as bytes");

    assert_no_tmp_files(dir);
}

// ---------------------------------------------------------------------------------------
// 3. The binary's other commands
// ---------------------------------------------------------------------------------------

/// The first `n` examples of digits.csv (64 pixels / 16, then the label).
fn digits(n: usize) -> (Vec<f32>, Vec<i32>) {
    let t = std::fs::read_to_string(digits_csv()).unwrap();
    let (mut x, mut y) = (vec![], vec![]);
    for line in t.lines().filter(|l| l.chars().next().is_some_and(|c| c.is_ascii_digit())).take(n) {
        let cells: Vec<f64> = line.split(',').map(|c| c.trim().parse().unwrap()).collect();
        assert_eq!(cells.len(), 65, "a digits.csv row");
        x.extend(cells[..64].iter().map(|v| (v / 16.0) as f32));
        y.push(cells[64] as i32);
    }
    assert_eq!(y.len(), n);
    (x, y)
}

/// The MLP's forward pass in f64 from PyTorch-layout parameters: logits and mean
/// cross-entropy.
fn reference_forward(p: &St, x: &[f32], y: &[i32]) -> (Vec<f64>, f64) {
    fn linear(w: &St, name: &str, x: &[f64], n: usize) -> Vec<f64> {
        let sh = w.shape(&format!("{name}.weight")).to_vec();
        let (out, inp) = (sh[0], sh[1]);
        let (wv, bv) = (w.values(&format!("{name}.weight")), w.values(&format!("{name}.bias")));
        let mut r = vec![0.0; n * out];
        for i in 0..n {
            for o in 0..out {
                r[i * out + o] = bv[o] + (0..inp).map(|k| x[i * inp + k] * wv[o * inp + k]).sum::<f64>();
            }
        }
        r
    }
    let n = y.len();
    let relu = |v: Vec<f64>| v.into_iter().map(|a| a.max(0.0)).collect::<Vec<_>>();
    let x: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let h = relu(linear(p, "fc1", &x, n));
    let h = relu(linear(p, "fc2", &h, n));
    let logits = linear(p, "fc3", &h, n);
    let mut loss = 0.0;
    for i in 0..n {
        let row = &logits[i * 10..(i + 1) * 10];
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        loss += lse - row[y[i] as usize];
    }
    (logits, loss / n as f64)
}

#[test]
fn binary_commands() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let bin = compile_mlp(dir);
    let data = digits_csv();

    // init: deterministic in the seed, byte for byte.
    let init = |out: &str, seed: &str| {
        let o = ok(exe(&bin, dir, &["init", "--out", out, "--seed", seed]));
        std::fs::read(dir.join(out)).unwrap_or_else(|e| panic!("init wrote no {out}: {e}\n{}", show(&o)))
    };
    let (a, b, c) = (init("p.safetensors", "3"), init("p2.safetensors", "3"), init("p4.safetensors", "4"));
    assert!(a == b, "init --seed 3 twice gives different files");
    assert!(a != c, "init --seed 3 and --seed 4 give the same file");
    let p = load(&dir.join("p.safetensors"));
    let p4 = load(&dir.join("p4.safetensors"));
    for (n, shape) in PARAMS {
        assert_eq!(p.shape(n), shape, "{n}");
        assert_eq!(p.get(n).0, Dtype::F32, "{n}");
    }
    assert_ne!(p.values("fc1.weight"), p4.values("fc1.weight"));
    assert_eq!(p.metadata.get("step").map(String::as_str), Some("0"));
    assert_eq!(p.metadata.get("model").map(String::as_str), Some("Mlp"));
    // Initial weights are small and not degenerate (PyTorch's Linear init: |w| ≤ 1/sqrt(fan_in)).
    let w = p.values("fc1.weight");
    assert!(w.iter().all(|v| v.abs() <= 1.0 / 8.0 + 1e-6), "fc1.weight outside ±1/sqrt(64)");
    assert!(w.iter().any(|v| *v != 0.0));

    // eval: loss and accuracy on the held-out split; untrained, about ln 10.
    let o = ok(exe(&bin, dir, &["eval", "--checkpoint", "p.safetensors", "--data", s(&data)]));
    let out = text(&o.stdout);
    assert!(out.contains("eval_loss") && out.contains("eval_accuracy"), "{}", show(&o));
    let (l, acc) = parse_eval(&out).unwrap();
    assert!((1.5..4.0).contains(&l), "untrained eval_loss {l}");
    assert!((0.0..=0.5).contains(&acc), "untrained eval_accuracy {acc}");

    // forward on a batch of 5 (the binary is compiled for 64: it re-specialises).
    let (x, y) = digits(5);
    save(&dir.join("in.safetensors"), &[("x", vec![5, 64], Data::F32(x.clone())), ("y", vec![5], Data::I32(y.clone()))]);
    let forward = |ckpt: &str, out: &str| -> St {
        let o = ok(exe(&bin, dir, &["forward", "--checkpoint", ckpt, "--inputs", "in.safetensors", "--out", out, "--threads", "1"]));
        assert!(text(&o.stdout).contains("loss"), "{}", show(&o));
        load(&dir.join(out))
    };
    let f = forward("p.safetensors", "out.safetensors");
    assert_eq!(f.shape("logits"), &[5, 10]);
    assert_eq!(f.shape("loss"), &[] as &[usize]);
    assert_eq!(f.get("logits").0, Dtype::F32);
    // The same numbers as PyTorch's layout computed by hand.
    let (ref_logits, ref_loss) = reference_forward(&p, &x, &y);
    for (i, (a, b)) in f.values("logits").iter().zip(&ref_logits).enumerate() {
        assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "logits[{i}] = {a}, reference {b}");
    }
    let loss0 = f.scalar("loss");
    assert!((loss0 - ref_loss).abs() <= 1e-4 * (1.0 + ref_loss.abs()), "loss {loss0}, reference {ref_loss}");

    // grad: the loss and a gradient for every parameter, with its shape.
    let o = ok(exe(
        &bin,
        dir,
        &["grad", "--checkpoint", "p.safetensors", "--inputs", "in.safetensors", "--out", "g.safetensors", "--threads", "1"],
    ));
    let g = load(&dir.join("g.safetensors"));
    assert_eq!(g.shape("loss"), &[] as &[usize], "{}", show(&o));
    assert_eq!(g.scalar("loss").to_bits(), loss0.to_bits(), "grad's loss equals forward's");
    for (n, shape) in PARAMS {
        let gn = format!("grad.{n}");
        assert_eq!(g.shape(&gn), shape, "{gn}");
        assert!(g.values(&gn).iter().all(|v| v.is_finite()), "{gn} not finite");
    }
    assert!(g.values("grad.fc3.bias").iter().any(|v| *v != 0.0), "an all-zero gradient");
    // d loss / d fc3.bias = mean over the batch of softmax − onehot: sums to zero.
    let sb: f64 = g.values("grad.fc3.bias").iter().sum();
    assert!(sb.abs() < 1e-5, "grad.fc3.bias sums to {sb}");

    // The gradient against a central difference of forward's loss, for the largest
    // gradient element of three parameters (perturbed by ±1e-2 in the checkpoint).
    let h = 1e-2f32;
    for name in ["fc3.weight", "fc2.bias", "fc1.weight"] {
        let gv = g.values(&format!("grad.{name}"));
        let (idx, &want) = gv.iter().enumerate().max_by(|a, b| a.1.abs().total_cmp(&b.1.abs())).unwrap();
        assert!(want.abs() > 1e-4, "grad.{name} is tiny everywhere ({want})");
        let mut ls = [0.0; 2];
        for (k, sign) in [1.0f32, -1.0].into_iter().enumerate() {
            let ck = format!("pert-{name}-{k}.safetensors");
            save_params(&dir.join(&ck), &p, |n, v| {
                if n == name {
                    v[idx] += sign * h;
                }
            });
            ls[k] = forward(&ck, &format!("pert-out-{k}.safetensors")).scalar("loss");
        }
        let fd = (ls[0] - ls[1]) / (2.0 * h as f64);
        assert!((fd - want).abs() <= 2e-2 * want.abs() + 2e-4, "d loss / d {name}[{idx}]: grad {want}, central difference {fd}");
    }

    // A PyTorch-style state_dict (written by the safetensors crate, no metadata) loads too.
    save_params(&dir.join("torch.safetensors"), &p, |_, _| {});
    let ft = forward("torch.safetensors", "out-torch.safetensors");
    assert_eq!(ft.scalar("loss").to_bits(), loss0.to_bits());

    // info: the parameter count.
    let o = ok(exe(&bin, dir, &["info"]));
    assert!(text(&o.stdout).contains("85002"), "info lacks the parameter count 85002\n{}", show(&o));

    // --device cuda without a GPU: a clear user error naming the missing library, and
    // nothing trained (tests/cuda.rs trains on a GPU where there is one).
    if bm_runtime::cuda::device::check_libraries().is_err() {
        let o = exe(&bin, dir, &["train", "--device", "cuda", "--data", s(&data), "--out", "cuda-run"]);
        user_error(&o, &["--device cuda", "libcuda", "--device cpu"]);
        assert!(!dir.join("cuda-run").join("metrics.jsonl").exists(), "--device cuda trained anyway");
    }
    let o = exe(&bin, dir, &["train", "--device", "tpu", "--data", s(&data), "--out", "tpu-run"]);
    user_error(&o, &["tpu"]);

    // sample on a classifier: a clear user error.
    let o = exe(&bin, dir, &["sample", "--checkpoint", "p.safetensors"]);
    user_error(&o, &["sample", "text"]);

    // train with another batch size (re-specialised).
    let o = ok(exe(&bin, dir, &["train", "--steps", "3", "--batch", "16", "--data", s(&data), "--out", "b16", "--threads", "1"]));
    assert!(text(&o.stderr).contains("batch 16"), "{}", show(&o));
    let m = metrics(&dir.join("b16"));
    assert_eq!(m.len(), 3);
    assert!(m.iter().all(|l| num(l, "loss").is_finite()));
    let ck = load(&dir.join("b16/step-3.safetensors"));
    assert_eq!(ck.metadata.get("step").map(String::as_str), Some("3"));
    assert!(dir.join("b16/step-3.optim.safetensors").is_file());

    // Usage errors exit 2.
    let o = exe(&bin, dir, &["train", "--steps", "many"]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    let o = exe(&bin, dir, &["frobnicate"]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));

    assert_no_tmp_files(dir);
}

/// `sample` on a small character GPT: the KV-cache decoder and `--no-kv-cache` (a
/// window forward per token) print the same greedy text while the sequence fits the
/// context; generation past the context, temperature, top-k and seeds work; bad options
/// are user errors.
#[test]
fn sample_generates_text_with_a_kv_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let corpus = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n".repeat(20);
    std::fs::write(dir.join("tiny.txt"), corpus).unwrap();
    let gpt = workspace().join("models/gpt.bm");
    // vocab: the compile checks the model's own data (Shakespeare, 73 character ids).
    let set = ["--set", "ctx=24", "--set", "d=32", "--set", "layers=2", "--set", "heads=2", "--set", "vocab=73"];
    let mut args = vec!["compile", s(&gpt), "-o", "gpt"];
    args.extend(set);
    ok(bmc(dir, &args));
    let bin = dir.join("gpt");
    ok(exe(&bin, dir, &["train", "--data", "tiny.txt", "--steps", "40", "--batch", "8", "--out", "run", "--threads", "1"]));
    let ck = "run/step-40.safetensors";
    let greedy = |extra: &[&str]| {
        let mut a = vec!["sample", "--checkpoint", ck, "--prompt", "To be", "--tokens", "15", "--temperature", "0"];
        a.extend(extra);
        text(&ok(exe(&bin, dir, &a)).stdout)
    };
    let cached = greedy(&[]);
    assert_eq!(cached.trim_end_matches('\n').chars().count(), 5 + 15, "{cached:?}");
    assert!(cached.starts_with("To be"), "{cached:?}");
    assert_eq!(cached, greedy(&["--no-kv-cache"]), "the KV cache changed the greedy text");
    // Past the context (24), with temperature and top-k: reproducible per seed.
    let long = |seed: &str| {
        let a = ["sample", "--checkpoint", ck, "--tokens", "100", "--temperature", "0.8", "--top-k", "5", "--seed", seed];
        text(&ok(exe(&bin, dir, &a)).stdout)
    };
    let (a, b) = (long("1"), long("1"));
    assert_eq!(a, b, "the same seed gave different text");
    assert_eq!(a.trim_end_matches('\n').chars().count(), 1 + 100, "{a:?}");
    // Errors.
    user_error(&exe(&bin, dir, &["sample", "--checkpoint", ck, "--prompt", "Zebra"]), &["vocabulary"]);
    user_error(&exe(&bin, dir, &["sample", "--checkpoint", ck, "--temperature=-1"]), &["--temperature"]);
    user_error(&exe(&bin, dir, &["sample", "--checkpoint", "missing.safetensors"]), &["missing.safetensors"]);
}

// ---------------------------------------------------------------------------------------
// 4. bmc train / info / emit
// ---------------------------------------------------------------------------------------

#[test]
fn bmc_train_info_and_emit() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let model = mlp_bm();

    // In process, from another directory: the data path resolves against the .bm file.
    let o = ok(bmc(dir, &["train", s(&model), "--steps", "5", "--out", "run", "--threads", "1"]));
    let ck = load(&dir.join("run/step-5.safetensors"));
    assert_eq!(ck.metadata.get("step").map(String::as_str), Some("5"), "{}", show(&o));
    assert_eq!(ck.shape("fc1.weight"), &[256, 64]);
    assert!(dir.join("run/step-5.optim.safetensors").is_file());
    assert_eq!(metrics(&dir.join("run")).len(), 5);
    assert!(text(&o.stdout).contains("done: 5 steps"), "{}", show(&o));

    let o = ok(bmc(dir, &["info", s(&model)]));
    assert!(text(&o.stdout).contains("85002"), "{}", show(&o));
    // The MLP's softmax/cross-entropy chain and its gradient run as row groups.
    assert!(text(&o.stdout).lines().any(|l| l.starts_with("row groups on the CPU: ") && !l.contains(": 0 groups")), "{}", show(&o));

    for stage in ["ast", "graph", "fused", "train", "kernels", "clif"] {
        let o = ok(bmc(dir, &["emit", s(&model), "--stage", stage]));
        assert!(!o.stdout.is_empty(), "emit --stage {stage} printed nothing");
        // Deterministic.
        let o2 = ok(bmc(dir, &["emit", s(&model), "--stage", stage]));
        assert!(o.stdout == o2.stdout, "emit --stage {stage} differs between two runs");
    }
    let o = ok(bmc(dir, &["emit", s(&model), "--stage", "graph", "--format", "dot"]));
    assert!(text(&o.stdout).trim_start().starts_with("digraph"), "{}", show(&o));
    let o = ok(bmc(dir, &["emit", s(&model), "--stage", "graph", "--format", "json"]));
    let j: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("emit --format json is not JSON: {e}\n{}", show(&o)));
    assert!(j.is_object() || j.is_array());

    assert_no_tmp_files(dir);
}

// ---------------------------------------------------------------------------------------
// 5. A non-finite loss stops training
// ---------------------------------------------------------------------------------------

const EXPLODING: &str = r#"# Two layers and an absurd learning rate: the loss overflows on the second step.
model Exploding {
  fc1 = Linear(64, 16)
  fc2 = Linear(16, 10)

  input x: f32[B, 64]
  input y: i32[B]

  forward {
    output logits = fc2(relu(fc1(x)))
    loss cross_entropy(logits, y)
  }
}

train {
  data       = csv("digits.csv", scale = 1.0 / 16)
  batch      = 32
  steps      = 20
  optimizer  = SGD(lr = 1e30)
  checkpoint = every(1)
}
"#;

#[test]
fn non_finite_loss_stops_training() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    std::fs::copy(digits_csv(), dir.join("digits.csv")).unwrap();
    std::fs::write(dir.join("exploding.bm"), EXPLODING).unwrap();

    let check = |o: &Output, run: &Path| {
        user_error(o, &["step 2", "fc1.weight"]);
        let err = text(&o.stderr);
        assert!(err.contains("NaN") || err.contains("inf"), "the message names the bad value\n{err}");
        // The last good checkpoint is step 1; nothing of step 2 remains, whole or partial.
        let files: Vec<String> = std::fs::read_dir(run).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        assert!(files.iter().any(|f| f == "step-1.safetensors") && files.iter().any(|f| f == "step-1.optim.safetensors"), "{files:?}");
        assert!(!files.iter().any(|f| f.contains("step-2")), "a checkpoint of the failed step: {files:?}");
        let ck = load(&run.join("step-1.safetensors"));
        assert_eq!(ck.metadata.get("step").map(String::as_str), Some("1"));
        for (n, (_, _, v)) in &ck.tensors {
            assert!(v.iter().all(|x| x.is_finite()), "the kept checkpoint's `{n}` is not finite");
        }
        let m = metrics(run);
        assert_eq!(m.len(), 1, "only the good step is logged");
        assert!(num(&m[0], "loss").is_finite());
        assert_no_tmp_files(run);
    };

    let o = bmc(dir, &["train", "exploding.bm", "--out", "run", "--threads", "1"]);
    check(&o, &dir.join("run"));

    ok(bmc(dir, &["compile", "exploding.bm", "-o", "exploding"]));
    let o = exe(&dir.join("exploding"), dir, &["train", "--out", "run2", "--threads", "1"]);
    check(&o, &dir.join("run2"));

    assert_no_tmp_files(dir);
}

// ---------------------------------------------------------------------------------------
// Helpers' own checks
// ---------------------------------------------------------------------------------------

#[test]
fn parse_eval_reads_summary_lines() {
    assert_eq!(parse_eval("done: 1500 steps in 5.0s; eval_loss 0.1984, eval_accuracy 0.9556\n"), Some((0.1984, 0.9556)));
    assert_eq!(parse_eval("eval_loss 2.098113 eval_accuracy 0.6278\n"), Some((2.098113, 0.6278)));
    assert_eq!(parse_eval("done: 3 steps\n"), None);
}

/// Every model's training binary payload survives the round trip (deeply fused loop
/// bodies once exceeded the JSON parser's nesting limit: W3's binary could not start),
/// the benchmark models in bench/ (GPT-2 124M's shape, bf16) included.
#[test]
fn every_model_bundle_round_trips() {
    use bmc::driver::{self, FileSource, Options, Stage};
    let dirs = [workspace().join("models"), workspace().join("bench")];
    let tokens = tempfile::tempdir().unwrap();
    for entry in dirs.iter().flat_map(|d| std::fs::read_dir(d).unwrap()) {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "bm") {
            continue;
        }
        let loaded = driver::load(path.to_str().unwrap(), &FileSource::Disk).unwrap_or_else(|d| panic!("{d}"));
        // bench/gpt2_124m.bm reads a generated token file (bench/make_tokens.py): a small
        // stand-in here.
        let opts = if std::fs::read_to_string(&path).unwrap().contains("tokens(") {
            let f = tokens.path().join("tokens.bin");
            let ids: Vec<u8> = (0..5000u32).flat_map(|i| ((i * 7919 % 50000) as u16).to_le_bytes()).collect();
            std::fs::write(&f, ids).unwrap();
            Options { data: Some(f), ..Options::default() }
        } else {
            Options::default()
        };
        let c = driver::compile(&loaded, &opts, Stage::Kernels).unwrap_or_else(|d| panic!("{}: {d}", path.display()));
        let b = driver::bundle(&loaded, &opts, &c);
        let back = bm_runtime::bundle::Bundle::from_bytes(&b.to_bytes().unwrap()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // Exactly: f32 constants and f64 scales must survive (serde_json's `float_roundtrip`).
        for (i, (x, y)) in back.program.kernels.iter().zip(&b.program.kernels).enumerate() {
            assert!(x == y, "{}: kernel k{i} changed in the round trip", path.display());
        }
        assert!(back.program == b.program, "{}: the program changed in the round trip", path.display());
    }
}

/// `bmc bench --profile` times the kernels: the slowest listed with the GFLOP/s of the
/// matrix products, then the time by kind; on a device without CUDA, a clear error.
#[test]
fn bench_profile_lists_kernels() {
    let root = workspace();
    let o = bmc(&root, &["bench", "models/mlp.bm", "--warmup", "1", "--steps", "3", "--threads", "1", "--profile"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", show(&o));
    let kinds = out.lines().find(|l| l.starts_with("by kind: ")).unwrap_or_default();
    assert!(
        out.contains("slowest kernels") && out.contains("GFLOP/s") && kinds.contains("matmul") && kinds.contains("group"),
        "{}",
        show(&o)
    );
    let o = bmc(&root, &["bench", "models/mlp.bm", "--steps", "2", "--profile", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}\n{}", show(&o)));
    let kernels = json["profile"].as_array().expect("a profile array");
    assert!(kernels.iter().any(|k| k["kernel"].as_str().unwrap().contains("matmul")), "{json}");
}
