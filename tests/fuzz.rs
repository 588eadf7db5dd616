//! No input makes the compiler panic or hang: random token soups, random mutations of
//! real models, and hand-picked nasty inputs go through `bmc::driver::load`,
//! `compile(.., Stage::Kernels)` and the decode pass. Each may succeed or fail with a
//! diagnostic; a panic or a run over the time limit fails the test and prints the input.

use bmc::driver::{self, FileSource, Options, Stage};
use proptest::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Per-input limit; a debug build compiles the models here in well under a second.
const LIMIT: Duration = Duration::from_secs(20);
/// Cases per property; `BM_FUZZ_CASES=5000` for a longer hunt.
fn config() -> ProptestConfig {
    let cases = std::env::var("BM_FUZZ_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

fn digits_csv() -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/data/digits.csv");
    p.canonicalize().unwrap().to_string_lossy().into_owned()
}

fn scratch() -> &'static Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap()).path()
}

/// Writes `text` (bytes) to a fresh file and compiles it; returns whether it compiled.
/// Panics (with the input) if the compiler panicked or took longer than `LIMIT`.
fn compile_bytes(text: &[u8]) -> bool {
    static N: AtomicUsize = AtomicUsize::new(0);
    let path = scratch().join(format!("case{}.bm", N.fetch_add(1, Ordering::Relaxed)));
    std::fs::write(&path, text).unwrap();
    let r = compile_path(&path, text);
    let _ = std::fs::remove_file(&path);
    r
}

// The closure's error is a whole diagnostic; it is only ever inspected, never moved around.
#[allow(clippy::result_large_err)]
fn compile_path(path: &Path, text: &[u8]) -> bool {
    let p = path.to_string_lossy().into_owned();
    let (tx, rx) = std::sync::mpsc::channel();
    let start = Instant::now();
    // The same stack as `bmc`'s main thread (test threads get 2 MiB).
    std::thread::Builder::new()
        .stack_size(8 << 20)
        .spawn(move || {
            let r = std::panic::catch_unwind(|| {
                let loaded = driver::load(&p, &FileSource::Disk)?;
                let c = driver::compile(&loaded, &Options::default(), Stage::Kernels)?;
                // What compiles is a valid program: every kernel in bounds, every fused
                // sum and side store well formed (a pass bug is an internal error here).
                if let Err(e) = bm_runtime::exec::validate(&c.program) {
                    panic!("the compiler produced an invalid program: {e}");
                }
                // The decode pass (`sample`'s KV cache) runs on the batch-1 graph; it may
                // refuse the model, but never panic.
                let one = Options { batch: Some(1), ..Options::default() };
                let _ = driver::decode_program(&driver::compile(&loaded, &one, Stage::Graph)?);
                Ok::<(), bm_grammar::Diagnostic>(())
            });
            let _ = tx.send(r.map(|r| r.is_ok()));
        })
        .unwrap();
    let shown = String::from_utf8_lossy(text);
    match rx.recv_timeout(LIMIT) {
        Ok(Ok(ok)) => ok,
        Ok(Err(_)) => panic!("the compiler panicked on this input:\n-----\n{shown}\n-----"),
        Err(_) => panic!("the compiler took over {:?} on this input:\n-----\n{shown}\n-----", start.elapsed()),
    }
}

fn compile_text(text: &str) -> bool {
    compile_bytes(text.as_bytes())
}

fn mlp_source() -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/mlp.bm");
    std::fs::read_to_string(p).unwrap().replace("\"data/digits.csv\"", &format!("{:?}", digits_csv()))
}

/// A small transformer-like classifier of digit images (8 rows of 8 pixels as tokens):
/// blocks, `repeat`, an `if` member, unfused attention, reshape/transpose, LayerNorm.
fn tiny_source() -> String {
    format!(
        r#"# a tiny transformer over the rows of each digit
config {{
  d      = 16
  heads  = 2
  layers = 2
}}

block Attention(d, heads) {{
  qkv  = Linear(d, 3 * d)
  proj = Linear(d, d)
  forward(x: [B, T, d]) -> [B, T, d] {{
    let q, k, v = split(qkv(x), 3, axis = -1)
    let q = q.reshape([B, T, heads, d / heads]).transpose(1, 2)
    let k = k.reshape([B, T, heads, d / heads]).transpose(1, 2)
    let v = v.reshape([B, T, heads, d / heads]).transpose(1, 2)
    let att = softmax(q @ k.T / sqrt(d / heads) + causal_mask(T), axis = -1)
    proj((att @ v).transpose(1, 2).reshape([B, T, d]))
  }}
}}

block Mlp(d, mult = 2) {{
  fc   = Linear(d, mult * d)
  proj = Linear(mult * d, d)
  forward(x) {{ proj(gelu(fc(x))) }}
}}

block Layer(d, heads) {{
  ln1  = LayerNorm(d)
  attn = Attention(d, heads)
  ln2  = LayerNorm(d)
  if d > 8 {{
    mlp = Mlp(d)
  }} else {{
    mlp = Mlp(d, mult = 1)
  }}
  forward(x) {{
    let x = x + attn(ln1(x))
    x + mlp(ln2(x))
  }}
}}

model Tiny {{
  embed = Linear(8, d)
  param pos: [8, d] = normal(0, 0.02)
  h     = repeat(layers, Layer(d, heads))
  ln_f  = LayerNorm(d)
  head  = Linear(d, 10, bias = false)

  input x: f32[B, 64]
  input y: i32[B]

  forward {{
    let t = embed(x.reshape([B, 8, 8])) + pos
    let z = ln_f(h(t))
    output logits = head(mean(z, axis = 1))
    loss cross_entropy(logits, y)
  }}
}}

train {{
  data      = csv({:?}, scale = 1.0 / 16)
  batch     = 16
  steps     = 10
  optimizer = AdamW(lr = 1e-3, weight_decay = 0.1)
  schedule  = cosine(warmup = 2, min_lr = 1e-4)
  clip_grad = 1.0
  seed      = 7
}}
"#,
        digits_csv()
    )
}

#[test]
fn the_seed_models_compile() {
    assert!(compile_text(&mlp_source()), "models/mlp.bm does not compile");
    assert!(compile_text(&tiny_source()), "the tiny transformer does not compile");
}

// ---------------------------------------------------------------------------------------
// (a) token soups

const VOCAB: &[&str] = &[
    // keywords
    "config",
    "block",
    "model",
    "train",
    "forward",
    "input",
    "param",
    "let",
    "loss",
    "output",
    "repeat",
    "if",
    "else",
    "import",
    "true",
    "false",
    "none",
    // names: blocks, builtins, locals, dims, dtypes, train fields
    "Linear",
    "LayerNorm",
    "Embedding",
    "RMSNorm",
    "Dropout",
    "Conv2d",
    "M",
    "A",
    "relu",
    "gelu",
    "softmax",
    "log_softmax",
    "reshape",
    "transpose",
    "permute",
    "split",
    "concat",
    "slice",
    "sum",
    "mean",
    "max",
    "var",
    "arange",
    "zeros",
    "ones",
    "full",
    "causal_mask",
    "one_hot",
    "embedding",
    "attention",
    "cross_entropy",
    "mse",
    "sqrt",
    "exp",
    "where",
    "x",
    "y",
    "h",
    "d",
    "fc",
    "B",
    "T",
    "f32",
    "i32",
    "bf16",
    "bool",
    "axis",
    "keepdim",
    "data",
    "csv",
    "text",
    "batch",
    "steps",
    "optimizer",
    "AdamW",
    "SGD",
    "schedule",
    "cosine",
    "every",
    "eval",
    "seed",
    "normal",
    "kaiming_uniform",
    // numbers
    "0",
    "1",
    "2",
    "3",
    "8",
    "64",
    "-1",
    "-2",
    "1e-3",
    "0.5",
    "1.0",
    "100000000",
    "99999999999999999999",
    "1e308",
    "1e999",
    // strings
    "\"a.bm\"",
    "\"\"",
    "\"digits.csv\"",
    "\"chars\"",
    // operators and punctuation
    "+",
    "-",
    "*",
    "/",
    "@",
    "=",
    "==",
    "!=",
    "<",
    "<=",
    ">",
    ">=",
    ".",
    ",",
    ":",
    ";",
    "->",
    "...",
    ".T",
    "#",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    "\n",
    "\n",
    "\n",
];

fn soup(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(VOCAB), 0..max).prop_map(|t| t.join(" "))
}

/// A valid model around `body`, so that soups reach elaboration and shape checking.
fn model_with_body(body: &str) -> String {
    format!(
        "config {{\n  d = 8\n}}\nblock A(d) {{\n  fc = Linear(d, d)\n  forward(x: [..., d]) {{ relu(fc(x)) }}\n}}\nmodel M {{\n  fc = Linear(64, 10)\n  a = A(64)\n  input x: f32[B, 64]\n  input y: i32[B]\n  forward {{\n    let h = a(x)\n{body}\n    loss cross_entropy(fc(h), y)\n  }}\n}}\ntrain {{\n  data = csv({:?}, scale = 1.0 / 16)\n  batch = 4\n}}\n",
        digits_csv()
    )
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn token_soup_files(s in soup(120)) {
        compile_text(&s);
    }

    #[test]
    fn token_soup_in_a_forward(s in soup(24)) {
        compile_text(&model_with_body(&format!("    let r = {s}")));
    }

    #[test]
    fn token_soup_in_a_block(s in soup(24)) {
        let text = model_with_body("").replace("  fc = Linear(d, d)\n", &format!("  fc = Linear(d, d)\n  {s}\n"));
        compile_text(&text);
    }
}

// ---------------------------------------------------------------------------------------
// (b) mutations of real models

/// Splits source into tokens (identifiers, numbers, strings, single punctuation) and
/// the whitespace between them, so that joining gives the source back.
fn tokens(src: &str) -> Vec<String> {
    let c: Vec<char> = src.chars().collect();
    let mut out = vec![];
    let mut i = 0;
    while i < c.len() {
        let start = i;
        if c[i].is_alphanumeric() || c[i] == '_' || c[i] == '.' && c.get(i + 1).is_some_and(|d| d.is_ascii_digit()) {
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_' || c[i] == '.') {
                i += 1;
            }
        } else if c[i] == '"' {
            i += 1;
            while i < c.len() && c[i] != '"' {
                i += 1;
            }
            i = (i + 1).min(c.len());
        } else if c[i].is_whitespace() && c[i] != '\n' {
            while i < c.len() && c[i].is_whitespace() && c[i] != '\n' {
                i += 1;
            }
        } else {
            i += 1;
        }
        out.push(c[start..i].iter().collect());
    }
    out
}

fn is_word(t: &str) -> bool {
    t.chars().next().is_some_and(|c| c.is_alphabetic() || c == '_')
}
fn is_number(t: &str) -> bool {
    t.chars().next().is_some_and(|c| c.is_ascii_digit())
}
fn is_space(t: &str) -> bool {
    t.chars().all(char::is_whitespace)
}

const NUMBERS: &[&str] = &["0", "-1", "1", "99999999999999999999", "4611686018427387904", "100000000", "1e308", "0.0", "4096"];

/// One mutation: (kind, a, b, c) interpreted modulo the sizes.
fn mutate(src: &str, (kind, a, b, c): (u8, usize, usize, usize)) -> String {
    match kind % 10 {
        // line edits
        k @ 0..=3 => {
            let mut lines: Vec<&str> = src.split('\n').collect();
            let n = lines.len();
            let (i, j) = (a % n, b % n);
            match k {
                0 => {
                    lines.remove(i);
                }
                1 => lines.insert(i, lines[j]),
                2 => lines.swap(i, j),
                _ => lines.insert(i, lines[i]),
            }
            lines.join("\n")
        }
        // token edits
        k => {
            let mut t = tokens(src);
            let solid: Vec<usize> = (0..t.len()).filter(|&i| !is_space(&t[i])).collect();
            if solid.is_empty() {
                return src.to_string();
            }
            let i = solid[a % solid.len()];
            let j = solid[b % solid.len()];
            match k {
                4 => {
                    t.remove(i);
                }
                5 => t.insert(i, format!(" {} ", VOCAB[c % VOCAB.len()])),
                6 => t.swap(i, j),
                7 => t.insert(i, t[i].clone() + " "),
                8 => {
                    let nums: Vec<usize> = solid.iter().copied().filter(|&i| is_number(&t[i])).collect();
                    if let Some(&n) = nums.get(a % nums.len().max(1)) {
                        t[n] = NUMBERS[c % NUMBERS.len()].to_string();
                    }
                }
                _ => {
                    // Rename an identifier: one occurrence, or all of them.
                    let words: Vec<usize> = solid.iter().copied().filter(|&i| is_word(&t[i])).collect();
                    if let Some(&w) = words.get(a % words.len().max(1)) {
                        let old = t[w].clone();
                        let new = VOCAB.iter().copied().filter(|v| is_word(v)).nth(c % 60).unwrap_or("zz").to_string();
                        if b % 2 == 0 {
                            t[w] = new;
                        } else {
                            for x in t.iter_mut().filter(|x| **x == old) {
                                *x = new.clone();
                            }
                        }
                    }
                }
            }
            t.concat()
        }
    }
}

fn mutations() -> impl Strategy<Value = Vec<(u8, usize, usize, usize)>> {
    prop::collection::vec((any::<u8>(), any::<usize>(), any::<usize>(), any::<usize>()), 1..5)
}

#[test]
fn tokens_round_trip() {
    for src in [mlp_source(), tiny_source()] {
        assert_eq!(tokens(&src).concat(), src);
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn mutated_mlp(ms in mutations()) {
        let mut s = mlp_source();
        for m in ms {
            s = mutate(&s, m);
        }
        compile_text(&s);
    }

    /// Small numbers in place of the transformer's: odd shapes that often still compile,
    /// so the later stages (autodiff, fusion, lowering) see them.
    #[test]
    fn renumbered_transformer(picks in prop::collection::vec((any::<usize>(), 0usize..10), 1..4)) {
        let mut t = tokens(&tiny_source());
        let nums: Vec<usize> = (0..t.len()).filter(|&i| is_number(&t[i])).collect();
        for (i, v) in picks {
            t[nums[i % nums.len()]] = v.to_string();
        }
        compile_text(&t.concat());
    }

    #[test]
    fn mutated_transformer(ms in mutations()) {
        let mut s = tiny_source();
        for m in ms {
            s = mutate(&s, m);
        }
        compile_text(&s);
    }
}

// ---------------------------------------------------------------------------------------
// hand-picked nasty inputs

fn mlp_with(members: &str, body: &str) -> String {
    model_with_body(body).replace("  a = A(64)\n", &format!("  a = A(64)\n{members}\n"))
}

#[test]
fn huge_dims_are_errors_not_allocations() {
    assert!(!compile_text(&mlp_with("  big = Linear(100000000, 100000000)", "")));
    assert!(!compile_text(&mlp_with("  param p: [9223372036854775807, 2]", "")));
    assert!(!compile_text(&mlp_with("  param p: [-1, 2]", "")));
    assert!(!compile_text(&mlp_with("  e = Embedding(4611686018427387904, 4611686018427387904)", "")));
    // Activations too, even unused ones, and shapes whose element count overflows usize.
    assert!(!compile_text(&model_with_body("    output w = full([10000000000, 10000000000], 1) * sum(x)")));
    assert!(!compile_text(&model_with_body("    output w = zeros([100000, 100000, 100000, 100000]) + 1")));
    assert!(!compile_text(&model_with_body("    let w = sum(full([3000000000, 3000000000], 1))")));
    assert!(!compile_text(&model_with_body("    let w = x.reshape([100000000000, 100000000000, -1])")));
    assert!(!compile_text(&model_with_body("    let w = x.reshape([100000000000, 100000000000, 100000000000])")));
    assert!(!compile_text(&model_with_body("    let w = x.reshape([B, 64, 1]) @ ones([1, 10000000000])")));
    assert!(!compile_text(&model_with_body("    let w = arange(100000000000000)")));
    assert!(!compile_text(&model_with_body("    let w = causal_mask(10000000)")));
    assert!(!compile_text(&model_with_body("    let w = one_hot(y, 100000000000000)")));
    // A batch too large, and inputs too large for the batch.
    assert!(!compile_text(&model_with_body("").replace("batch = 4", "batch = 100000000")));
    assert!(!compile_text(&mlp_with("  input z: f32[B, 100000000000]", "")));
}

#[test]
fn zero_and_negative_dims() {
    for body in [
        "    let w = x.reshape([0, -1])",
        "    let w = x.reshape([B, 0, 64])",
        "    let w = x.reshape([-1, -1])",
        "    let w = x.reshape([-2, 128])",
        "    let w = x.reshape([])",
        "    let w = x.reshape([0])",
        "    let w = zeros([0, 3]).sum(axis = 0)",
        "    let w = mean(zeros([0, 3]))",
        "    let w = softmax(zeros([4, 0]), axis = -1)",
        "    let w = zeros([0]).reshape([0, 0, 0, 0])",
        "    let w = split(x, 0, axis = -1)",
        "    let w = split(x, 3, axis = -1)",
        "    let w = slice(x, 1, 10, 2)",
        "    let w = slice(x, 1, -100, 100)",
        "    let w = arange(-5)",
        "    let w = arange(0)",
        "    let w = causal_mask(0)",
        "    let w = one_hot(y, 0)",
        "    let w = concat([], axis = 0)",
        "    let w = sum(x, axis = [0, 0, 5])",
        "    let w = permute(x, [0, 0])",
        "    let w = x.transpose(5, 7)",
        "    let w = x / 0",
        "    let w = 1 / 0",
        "    let w = 9223372036854775807 + 1",
        "    let w = -9223372036854775807 - 2",
        "    let w = 9223372036854775807 * 9223372036854775807",
        "    let w = (-9223372036854775807 - 1) / -1",
        "    let w = x.reshape([B, 64 / 0])",
        "    let w = x.reshape([B, 65 / 2])",
        "    let w = x.reshape([B, 9223372036854775807 + 1])",
        "    let w = squeeze(x, 7)",
        "    let w = unsqueeze(x, -9)",
        "    let w = flatten(x, start_axis = 9)",
        "    let w = attention(x, x, x)",
        "    let w = embedding(x, y)",
        "    let w = cross_entropy(x, x)",
        "    let w = gelu(x, approximate = \"bogus\")",
        "    let w = max_pool2d(x.reshape([B, 1, 8, 8]), 0)",
        "    let w = conv2d(x.reshape([B, 1, 8, 8]), zeros([1, 1, 20, 20]), zeros([1]))",
    ] {
        compile_text(&model_with_body(body));
    }
    compile_text(&mlp_with("  e = Embedding(0, 4)", "    let w = e(y)"));
    compile_text(&mlp_with("  l = Linear(0, 0)", ""));
    compile_text(&mlp_with("  h2 = repeat(0, Linear(64, 64))", ""));
    compile_text(&mlp_with("  h2 = repeat(-1, Linear(64, 64))", ""));
    compile_text(&mlp_with("  ln = LayerNorm(64, eps = -1)", "    let w = ln(x)"));
    compile_text(&model_with_body("").replace("batch = 4", "batch = 0"));
    compile_text(&model_with_body("").replace("batch = 4", "batch = -1"));
    compile_text(&model_with_body("").replace("batch = 4", "batch = 4\n  steps = 0\n  epochs = 0"));
    compile_text(&model_with_body("").replace("batch = 4", "batch = 4\n  eval = every(0, batches = 0)"));
    compile_text(&model_with_body("").replace("scale = 1.0 / 16", "scale = 1.0 / 16, split = 0"));
    compile_text(&model_with_body("").replace("scale = 1.0 / 16", "scale = 1.0 / 16, split = 1.5, label = 1000"));
    compile_text(&model_with_body("").replace("scale = 1.0 / 16", "label = -65"));
}

#[test]
fn deep_nesting() {
    // Parentheses, brackets, unary minus, chains and `if` members nested 10k deep: a
    // "nested too deeply" error, never a stack overflow (which would abort the process).
    for n in [100, 250, 300, 10_000] {
        compile_text(&model_with_body(&format!("    let w = {}x{}", "(".repeat(n), ")".repeat(n))));
        compile_text(&model_with_body(&format!("    let w = {}x{}", "[".repeat(n), "]".repeat(n))));
        compile_text(&model_with_body(&format!("    let w = {}x", "-".repeat(n))));
        compile_text(&model_with_body(&format!("    let w = x{}", " + x".repeat(n))));
        compile_text(&model_with_body(&format!("    let w = x{}", ".T".repeat(n))));
        compile_text(&model_with_body(&format!("    let w = {}x{}", "relu(".repeat(n), ")".repeat(n))));
        compile_text(&model_with_body(&format!("    let w = {}x{}", "if true { ".repeat(n), " } else { x }".repeat(n))));
        compile_text(&mlp_with(&format!("{}  deep = Linear(2, 2)\n{}", "  if true {\n".repeat(n), "  }\n".repeat(n)), ""));
        compile_text(&format!("config {{\n  a = {}1{}\n}}\n", "(".repeat(n), ")".repeat(n)));
        compile_text(&"(".repeat(n));
        compile_text(&"{".repeat(n));
    }
    // Blocks calling blocks a long way down, and recursion through forward calls.
    let mut chain = String::new();
    for i in 0..200 {
        chain.push_str(&format!("block C{i} {{\n  c = C{}()\n  forward(x) {{ c(x) }}\n}}\n", i + 1));
    }
    chain.push_str("block C200 {\n  forward(x) { x }\n}\n");
    compile_text(&(chain + &mlp_with("  c = C0()", "    let w = c(x)")));
    compile_text(&format!(
        "block A {{\n  b = B()\n  forward(x) {{ b(x) }}\n}}\nblock B {{\n  a = A()\n  forward(x) {{ a(x) }}\n}}\n{}",
        mlp_with("  r = A()", "")
    ));
}

#[test]
fn instance_and_node_explosions() {
    // 4096 × 4096 × 4096 block instances: an error, not hours and gigabytes.
    let src = "block E {\n  forward(x) { x }\n}\nblock A {\n  e = repeat(4096, E())\n  forward(x) { x }\n}\nblock C {\n  a = repeat(4096, A())\n  forward(x) { x }\n}\n";
    let started = Instant::now();
    assert!(!compile_text(&format!("{src}{}", mlp_with("  c = repeat(4096, C())", "    let w = c(x)"))));
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
}

#[test]
fn thousands_of_layers_are_an_error_in_time() {
    // A repeat count inside its range that still makes a graph too large to lower in
    // reasonable time and memory (found by `mutated_transformer`: 4096 layers took
    // minutes and over 20 GiB). An error naming the limit, quickly.
    let started = Instant::now();
    assert!(!compile_text(&tiny_source().replace("layers = 2", "layers = 4096")));
    assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
}

#[test]
fn deep_models_keep_their_expressions_shallow() {
    // A sum with a term per parameter (the global gradient norm) or per user of a value
    // (autodiff's gradient contributions) was built as a chain `((a + b) + c) + …`: as
    // deep as it is long, so lowering was quadratic in the layer count and every
    // recursive pass after it (fusion, code generation) recursed once per term. Now a
    // balanced tree (`ops::add_all`).
    let path = scratch().join("deep.bm");
    std::fs::write(&path, tiny_source().replace("layers = 2", "layers = 64")).unwrap();
    let loaded = driver::load(&path.to_string_lossy(), &FileSource::Disk).unwrap();
    let program = driver::compile(&loaded, &Options::default(), Stage::Kernels).unwrap().program;
    fn depth(e: &bm_runtime::kir::ScalarExpr) -> usize {
        use bm_runtime::kir::ScalarExpr::*;
        1 + match e {
            Load(_) | Const(_) | Index(_) => 0,
            Unary(_, a) => depth(a),
            Binary(_, a, b) => depth(a).max(depth(b)),
            Select(c, a, b) => depth(c).max(depth(a)).max(depth(b)),
        }
    }
    let deepest = program
        .kernels
        .iter()
        .filter_map(|k| match k {
            bm_runtime::kir::Kernel::Loop(l) => Some(
                std::iter::once(&l.body)
                    .chain(l.side.iter().map(|s| &s.value))
                    .chain(l.sums.iter().map(|s| &s.value))
                    .map(depth)
                    .max()
                    .unwrap(),
            ),
            _ => None,
        })
        .max()
        .unwrap();
    // 64 layers have ≈ 900 parameter tensors: a chain would be that deep.
    assert!(deepest <= 48, "an expression {deepest} deep");
}

#[test]
fn odd_files() {
    // Empty, blank, comments only, a lone keyword.
    for s in ["", "\n", "   ", "# just a comment", "model", "model M", "model M {", "model M {}", "}", "train {}", "config {}"] {
        assert!(!compile_text(s), "{s:?} compiled");
    }
    // Binary garbage and invalid UTF-8.
    let mut garbage: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    assert!(!compile_bytes(&garbage));
    garbage.splice(0..0, b"model M {\n".iter().copied());
    assert!(!compile_bytes(&garbage));
    assert!(!compile_bytes(&[0xff, 0xfe, 0xfd]));
    assert!(!compile_bytes(b"model M {\0}"));
    assert!(!compile_text("model \u{1F600} {\n}\n"));
    assert!(!compile_text(&mlp_source().replace("fc1", "f\u{0301}c1").replace("hidden", "hïdden")));
    // Lone surrogates can't be in a str; NUL bytes, CR line ends and tabs can.
    compile_text(&mlp_source().replace('\n', "\r\n"));
    compile_text(&mlp_source().replace("  ", "\t"));
    compile_text(&mlp_source().replace("fc1", "fc1\u{0}"));
    // Strings: unterminated, escapes, huge.
    compile_text(&mlp_source().replace("\"/", "\"\\q/"));
    compile_text(&mlp_source().replace(&format!("{:?}", digits_csv()), "\"unterminated"));
    compile_text(&mlp_source().replace(&format!("{:?}", digits_csv()), &format!("\"{}\"", "a".repeat(100_000))));
    // A long file of many small items.
    compile_text(&(0..2000).map(|i| format!("block B{i} {{\n  forward(x) {{ x }}\n}}\n")).collect::<String>());
}

#[test]
fn imports_and_data_that_point_at_themselves() {
    let dir = scratch().join("self");
    std::fs::create_dir_all(&dir).unwrap();
    let file = |name: &str, text: &str| -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    // Self-import, mutual imports, a missing import, importing a directory.
    let p = file("selfimport.bm", &format!("import \"selfimport.bm\"\n{}", mlp_source()));
    assert!(!compile_path(&p, b"selfimport"));
    file("a.bm", "import \"b.bm\"\nblock A {\n  forward(x) { x }\n}\n");
    file("b.bm", "import \"a.bm\"\nblock B {\n  forward(x) { x }\n}\n");
    let p = file("mutual.bm", &format!("import \"a.bm\"\n{}", mlp_source()));
    assert!(!compile_path(&p, b"mutual"));
    let p = file("missing.bm", &format!("import \"nope.bm\"\n{}", mlp_source()));
    assert!(!compile_path(&p, b"missing"));
    let p = file("dir.bm", &format!("import \".\"\n{}", mlp_source()));
    assert!(!compile_path(&p, b"dir"));
    let p = file("garbage_import.bm", &format!("import \"garbage.bin\"\n{}", mlp_source()));
    std::fs::write(dir.join("garbage.bin"), [0xffu8, 0, 1, 2]).unwrap();
    assert!(!compile_path(&p, b"garbage import"));
    // A chain of 100 imports.
    for i in 0..100 {
        file(&format!("chain{i}.bm"), &format!("import \"chain{}.bm\"\n", i + 1));
    }
    file("chain100.bm", "");
    let p = file("chain.bm", &format!("import \"chain0.bm\"\n{}", mlp_source()));
    compile_path(&p, b"chain");

    // The data file is the .bm file itself, in every data format.
    let me = dir.join("selfdata.bm");
    let me_str = format!("{:?}", me.to_string_lossy());
    for data in [
        format!("csv({me_str})"),
        format!("csv({me_str}, header = false)"),
        format!("safetensors({me_str})"),
        format!("tokens({me_str}, ctx = 8)"),
        format!("text({me_str}, ctx = 8)"),
        format!("text({me_str}, ctx = 100000)"),
        format!("csv({:?})", dir.to_string_lossy()),
    ] {
        let text = mlp_source().replace(&format!("csv({:?}, scale = 1.0 / 16)", digits_csv()), &data);
        assert!(text.contains(&data));
        std::fs::write(&me, &text).unwrap();
        assert!(!compile_path(&me, text.as_bytes()), "compiled with data = {data}");
    }
}
