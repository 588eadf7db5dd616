//! Numerics against PyTorch: the peer workload W1 ("mlp-digits",
//! ../shared/bench/peers/models.md) trained from its bit-exact initial parameters must
//! reproduce PyTorch's loss values for steps 0–4, and the MLP's forward and gradients
//! must match the fixtures `tests/fixtures/make_fixtures.py` computed with PyTorch.

use bm_runtime::bundle::Bundle;
use bm_runtime::checkpoint;
use bm_runtime::cli::{TrainArgs, train};
use bm_runtime::data::TensorData;
use bm_runtime::init::init_param_stream;
use bm_runtime::kir::Init;
use bmc::driver::{self, FileSource, Options, Stage};
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn compile(src: &str, dir: &Path) -> Bundle {
    let path = dir.join("model.bm");
    std::fs::write(&path, src).unwrap();
    let loaded = driver::load(path.to_str().unwrap(), &FileSource::Disk).unwrap_or_else(|d| panic!("{d}"));
    let opts = Options::default();
    let c = driver::compile(&loaded, &opts, Stage::Kernels).unwrap_or_else(|d| panic!("{d}"));
    driver::bundle(&loaded, &opts, &c)
}

fn respec(s: &bm_runtime::bundle::Sources, b: usize, e: &[(String, String)]) -> bm_runtime::Result<Bundle> {
    driver::respecialise(s, b, e)
}

/// W1's model with W1's optimiser and data order (file order, no split, no shuffle).
fn w1_source() -> String {
    let csv = repo().join("models/data/digits.csv");
    format!(
        r#"
model Mlp {{
  fc1 = Linear(64, 256)
  fc2 = Linear(256, 256)
  fc3 = Linear(256, 10)
  input x: f32[B, 64]
  input y: i32[B]
  forward {{
    let logits = fc3(relu(fc2(relu(fc1(x)))))
    loss cross_entropy(logits, y)
  }}
}}
train {{
  data = csv("{}", scale = 1.0 / 16, split = 1.0, shuffle = false)
  batch = 128
  optimizer = AdamW(lr = 3e-4, betas = (0.9, 0.95), eps = 1e-8, weight_decay = 0.1)
  eval = every(1000)
}}
"#,
        csv.display()
    )
}

/// W1's initial parameters (models.md: stream = canonical index, W stored [in, out]),
/// in PyTorch's layout ([out, in]).
fn w1_params() -> Vec<(String, Vec<usize>, TensorData)> {
    let layers = [("fc1", 64, 256), ("fc2", 256, 256), ("fc3", 256, 10)];
    let mut out = vec![];
    for (l, (name, fan_in, fan_out)) in layers.iter().enumerate() {
        let a = 1.0 / (*fan_in as f64).sqrt();
        let u = Init::Uniform { low: -a, high: a };
        let w = init_param_stream(&u, &[*fan_in, *fan_out], 2 * l as u64);
        let mut wt = vec![0f32; w.len()];
        for i in 0..*fan_in {
            for o in 0..*fan_out {
                wt[o * fan_in + i] = w[i * fan_out + o];
            }
        }
        let b = init_param_stream(&u, &[*fan_out], 2 * l as u64 + 1);
        out.push((format!("{name}.weight"), vec![*fan_out, *fan_in], TensorData::F32(wt)));
        out.push((format!("{name}.bias"), vec![*fan_out], TensorData::F32(b)));
    }
    out
}

#[test]
fn w1_init_matches_the_reference_bits() {
    let p = w1_params();
    let TensorData::F32(w) = &p[0].2 else { panic!() };
    // fc1.w[0, 0:3] in the [in, out] layout is fc1.weight[0:3, 0] in PyTorch's.
    let bits: Vec<u32> = (0..3).map(|o| w[o * 64].to_bits()).collect();
    assert_eq!(bits, vec![0x3dc44150, 0xbc8c3b0d, 0xbdf27746]);
}

#[test]
fn w1_losses_match_pytorch_for_five_steps() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = compile(&w1_source(), dir.path());
    let init = dir.path().join("init.safetensors");
    checkpoint::save_atomic(&init, &w1_params(), &Default::default()).unwrap();
    let out = dir.path().join("run");
    let args = TrainArgs { steps: Some(5), threads: Some(1), out: Some(out.clone()), init_from: Some(init), ..Default::default() };
    train(bundle, &args, &respec).unwrap();
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap()).collect();
    let pytorch = [2.298667, 2.290944, 2.282559, 2.287085, 2.274528];
    assert_eq!(losses.len(), 5);
    for (i, (ours, theirs)) in losses.iter().zip(pytorch).enumerate() {
        assert!((ours - theirs).abs() < 1e-5, "step {i}: bmc {ours:.7} vs PyTorch {theirs:.7}\nall: {losses:?}");
    }
}
