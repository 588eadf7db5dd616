//! The decode pass (`passes::decode`): stepping the one-token decode graph through a
//! sequence with a KV cache gives, at every position, the logits the whole-window
//! forward graph gives there (f64, random parameters and tokens); models that mix
//! positions other than by causal attention are refused with a reason.

use bm_runtime::kir::DType as KDType;
use bm_runtime::rng::Rng;
use bmc::driver::{self, FileSource, Options, Stage};
use bmc::eval::{Tensor, evaluate};
use bmc::graph::Graph;
use bmc::passes::decode::decode_graph;
use std::collections::HashMap;

fn random(rng: &mut Rng, shape: &[usize], scale: f64) -> Tensor {
    Tensor::new(shape.to_vec(), (0..shape.iter().product()).map(|_| (rng.uniform() * 2.0 - 1.0) * scale).collect())
}

/// The fused forward graph of `path` (or of `src` written to a temp file) at batch 1.
fn fused_graph(path: &str, overrides: &[(&str, &str)], ctx: usize) -> Graph {
    let loaded = driver::load(path, &FileSource::Disk).unwrap_or_else(|d| panic!("{d}"));
    let shapes = vec![("tokens".to_string(), KDType::I32, vec![ctx]), ("targets".to_string(), KDType::I32, vec![ctx])];
    let opts = Options {
        overrides: overrides.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        batch: Some(1),
        data: None,
        data_shapes: Some(shapes),
    };
    driver::compile(&loaded, &opts, Stage::Graph).unwrap_or_else(|d| panic!("{d}")).fused
}

fn with_source(src: &str, ctx: usize) -> (tempfile::TempDir, Graph) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.bm");
    std::fs::write(&path, src).unwrap();
    let g = fused_graph(path.to_str().unwrap(), &[], ctx);
    (dir, g)
}

/// Logits of every position from the full graph, and from the decode graph stepped
/// position by position; they must agree to f64 rounding.
fn assert_decode_matches_forward(g: &Graph, vocab: usize, what: &str) {
    let d = decode_graph(g, "logits").unwrap_or_else(|e| panic!("{what}: {e}"));
    let mut rng = Rng::new(11);
    let mut feeds: HashMap<String, Tensor> = HashMap::new();
    for p in &g.params {
        feeds.insert(p.name.clone(), random(&mut rng, g.shape(p.node), 0.5));
    }
    let tok_shape = g.shape(g.inputs[0].1).to_vec();
    let t = tok_shape[1];
    let toks: Vec<f64> = (0..t).map(|_| rng.below(vocab as u64) as f64).collect();
    for (name, id) in &g.inputs {
        feeds.insert(name.clone(), Tensor::new(g.shape(*id).to_vec(), toks.clone()));
    }
    let full = evaluate(g, &feeds).unwrap();
    let logits = &full[g.output("logits").unwrap().index()].data;
    assert_eq!(logits.len(), t * vocab);

    for (name, id) in &d.inputs {
        if name.starts_with("@cache.") {
            feeds.insert(name.clone(), Tensor::full(d.shape(*id), 0.0));
        }
    }
    let mut keymask = vec![f64::NEG_INFINITY; t];
    for p in 0..t {
        keymask[p] = 0.0;
        let mut slot = vec![0.0; t];
        slot[p] = 1.0;
        feeds.insert("@tokens".into(), Tensor::new(vec![1, 1], vec![toks[p]]));
        feeds.insert("@pos".into(), Tensor::new(vec![1], vec![p as f64]));
        feeds.insert("@slot".into(), Tensor::new(vec![t], slot));
        feeds.insert("@keymask".into(), Tensor::new(vec![t], keymask.clone()));
        let vals = evaluate(&d, &feeds).unwrap_or_else(|e| panic!("{what}: {e}\n{}", d.to_text()));
        let got = &vals[d.output("logits").unwrap().index()].data;
        let want = &logits[p * vocab..(p + 1) * vocab];
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!((a - b).abs() <= 1e-9 * (1.0 + b.abs()), "{what}: position {p}, logit {i}: decode {a} vs forward {b}");
        }
        // Store this position's keys and values in the caches.
        for (name, id) in &d.outputs {
            let Some(which) = name.strip_prefix("new.") else { continue };
            let row = &vals[id.index()];
            let cache = feeds.get_mut(&format!("@cache.{which}")).unwrap();
            let width = *row.shape.last().unwrap();
            let rows = row.data.len() / width;
            for r in 0..rows {
                let at = (r * t + p) * width;
                cache.data[at..at + width].copy_from_slice(&row.data[r * width..(r + 1) * width]);
            }
        }
    }
}

#[test]
fn gpt_decodes_position_by_position() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/gpt.bm");
    let g = fused_graph(path, &[("ctx", "9"), ("d", "16"), ("heads", "2"), ("layers", "2")], 9);
    assert_decode_matches_forward(&g, 73, "gpt.bm");
    let d = decode_graph(&g, "logits").unwrap();
    let names: Vec<&str> = d.outputs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["logits", "new.k.0", "new.v.0", "new.k.1", "new.v.1"]);
}

#[test]
fn weight_tied_peer_model_decodes() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/w3_gpt_small_cpu.bm");
    let src = std::fs::read_to_string(path).unwrap();
    assert!(src.contains("ctx"), "w3 is configured by ctx");
    let g = fused_graph(path, &[("ctx", "6"), ("d", "16"), ("heads", "4"), ("layers", "1"), ("vocab", "11")], 6);
    assert_decode_matches_forward(&g, 11, "w3");
}

/// A model written with a learned position table added directly, sinusoid-free
/// `arange` arithmetic, gelu(erf) and the builtin attention.
#[test]
fn other_spellings_decode() {
    let src = "config { V = 13\n T = 7\n d = 8 }
model M {
  emb = Embedding(V, d)
  pos = Embedding(T, d)
  fc = Linear(d, V)
  input tokens: i32[B, T]
  input targets: i32[B, T]
  forward {
    let x = emb(tokens) + pos(arange(T)) * 0.5 + (arange(T) * 1.0).reshape([T, 1]) * 0.01
    let h = x.reshape([B, T, 2, 4]).transpose(1, 2)
    let a = attention(h * 0.7, tanh(h), gelu(h, approximate = \"none\"), causal = true)
    let logits = fc(a.transpose(1, 2).reshape([B, T, d]) + x)
    output logits
    loss cross_entropy(logits, targets)
  }
}
";
    let (_dir, g) = with_source(src, 7);
    assert_decode_matches_forward(&g, 13, "other spellings");
}

/// A learned position table added directly (`x + pos`), as `nn.Parameter(torch.zeros(T, d))`
/// models often do, instead of an embedding of `arange(T)`.
#[test]
fn a_position_parameter_added_directly_decodes() {
    let src = "config { V = 11\n T = 6\n d = 8 }
model M {
  emb = Embedding(V, d)
  param pos: [T, d] = normal(0, 0.5)
  fc = Linear(d, V)
  input tokens: i32[B, T]
  input targets: i32[B, T]
  forward {
    let x = emb(tokens) + pos
    let h = x.reshape([B, T, 2, 4]).transpose(1, 2)
    let logits = fc(attention(h, h, h, causal = true).transpose(1, 2).reshape([B, T, d]) + x)
    output logits
    loss cross_entropy(logits, targets)
  }
}
";
    let (_dir, g) = with_source(src, 6);
    assert_decode_matches_forward(&g, 11, "position parameter");
}

#[test]
fn models_that_mix_positions_are_refused_with_a_reason() {
    let model = |body: &str| {
        format!(
            "config {{ V = 5\n T = 6\n d = 4 }}
model M {{
  emb = Embedding(V, d)
  fc = Linear(d, V)
  input tokens: i32[B, T]
  input targets: i32[B, T]
  forward {{
    let x = emb(tokens)
    {body}
    output logits
    loss cross_entropy(logits, targets)
  }}
}}
"
        )
    };
    let cases = [
        ("let logits = fc(x - mean(x, axis = 1, keepdim = true))", "reduces over the positions"),
        (
            "let h = x.reshape([B, T, 1, d]).transpose(1, 2)\n let logits = fc(attention(h, h, h).transpose(1, 2).reshape([B, T, d]))",
            "not causal",
        ),
        ("let logits = fc(concat([slice(x, 1, 1, T), slice(x, 1, 0, 1)], axis = 1))", "along the positions"),
        ("let logits = fc(x + (targets * 1.0).reshape([B, T, 1]))", "several inputs"),
    ];
    for (body, why) in cases {
        let src = model(body);
        let (_dir, g) = with_source(&src, 6);
        let err = decode_graph(&g, "logits").err().unwrap_or_else(|| panic!("decoded: {body}"));
        assert!(err.contains(why), "{body}: {err}");
    }
}
