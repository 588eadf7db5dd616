//! One test per class of user error, run through the real `bmc` executable (and a
//! compiled training binary): exit code, file name, `--> file:line:col`, message, hint.
//! CLI.md: 1 is a user error, 2 command-line usage, 3 a bug.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `bmc` executable of this workspace (`<target>/<profile>/bmc`), built first.
/// `cargo build` is a no-op when the binary is up to date, and rebuilds a stale one.
use bm_tests::bmc_exe;

fn digits_csv() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/data/digits.csv")
}

/// A scratch directory holding `digits.csv` and the test's files.
struct Dir(tempfile::TempDir);

impl Dir {
    fn new() -> Dir {
        let d = tempfile::tempdir().unwrap();
        std::fs::copy(digits_csv(), d.path().join("digits.csv")).unwrap();
        Dir(d)
    }
    fn path(&self) -> &Path {
        self.0.path()
    }
    fn write(&self, name: &str, text: &str) -> &Self {
        std::fs::write(self.path().join(name), text).unwrap();
        self
    }
    /// Runs `bmc args...` in this directory.
    fn bmc(&self, args: &[&str]) -> Output {
        Command::new(bmc_exe()).args(args).current_dir(self.path()).output().unwrap()
    }
    /// Runs an executable (a training binary) in this directory.
    fn exe(&self, exe: &str, args: &[&str]) -> Output {
        Command::new(self.path().join(exe)).args(args).current_dir(self.path()).output().unwrap()
    }
    /// `bmc check NAME` on `text`.
    fn check(&self, name: &str, text: &str) -> Output {
        self.write(name, text).bmc(&["check", name])
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Exit code 1 and every phrase in stderr.
#[track_caller]
fn assert_user_error(o: &Output, phrases: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "expected exit code 1\nstdout:\n{}\nstderr:\n{err}", String::from_utf8_lossy(&o.stdout));
    assert!(!err.contains("internal error"), "an internal error:\n{err}");
    assert!(!err.contains("error: error:"), "doubled prefix:\n{err}");
    for p in phrases {
        assert!(err.contains(p), "stderr lacks {p:?}:\n{err}");
    }
}

/// Exit code 1, `--> file:line:col` and every phrase.
#[track_caller]
fn assert_diag(o: &Output, file: &str, line: usize, col: usize, phrases: &[&str]) {
    assert_user_error(o, phrases);
    let header = format!("--> {file}:{line}:{col}\n");
    assert!(stderr(o).contains(&header), "stderr lacks {header:?}:\n{}", stderr(o));
}

/// A classifier on digits.csv with `members` and a forward body; the model starts at
/// line 1, members at line 2, and the forward body right after the inputs.
fn model(members: &str, body: &str) -> String {
    format!(
        "model M {{\n{members}\n  input x: f32[B, 64]\n  input y: i32[B]\n  forward {{\n{body}\n  }}\n}}\n\
         train {{\n  data = csv(\"digits.csv\", scale = 1.0 / 16)\n  batch = 8\n  steps = 2\n}}\n"
    )
}

const GOOD: &str = "model M {
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
  data = csv(\"digits.csv\", scale = 1.0 / 16)
  batch = 8
  steps = 2
}
";

#[test]
fn good_model_checks() {
    let d = Dir::new();
    let o = d.check("good.bm", GOOD);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn syntax_error_unclosed_paren() {
    let d = Dir::new();
    let src = model("  fc1 = Linear(64, 10", "    output logits = fc1(x)\n    loss cross_entropy(logits, y)");
    let o = d.check("syntax.bm", &src);
    // The parser stops at the next line's `input`; the hint points at the open `(`.
    assert_diag(&o, "syntax.bm", 3, 3, &["expected `,` or `)`, found `input`", "never closed", "add a `)`", "line 2, column 15"]);
}

#[test]
fn syntax_error_bad_token() {
    let d = Dir::new();
    let src = model("  fc1 = Linear(64, 10)", "    output logits = fc1(x) $\n    loss cross_entropy(logits, y)");
    let o = d.check("tok.bm", &src);
    assert_user_error(&o, &["tok.bm:6:"]);
}

#[test]
fn unknown_block_suggests() {
    let d = Dir::new();
    let src = model("  fc1 = Linear(64, 10)\n  ln = LayerNrom(10)", "    output logits = ln(fc1(x))\n    loss cross_entropy(logits, y)");
    let o = d.check("unknown.bm", &src);
    assert_diag(&o, "unknown.bm", 3, 8, &["unknown block `LayerNrom`", "did you mean `LayerNorm`?"]);
}

#[test]
fn unknown_local_suggests() {
    let d = Dir::new();
    let src = model("  fc1 = Linear(64, 10)", "    let h = fc1(x)\n    output logits = relu(hh)\n    loss cross_entropy(logits, y)");
    let o = d.check("local.bm", &src);
    assert_diag(&o, "local.bm", 7, 26, &["unknown name `hh`", "did you mean `h`?"]);
}

#[test]
fn shape_mismatch_shows_both_shapes_and_origins() {
    let d = Dir::new();
    let src = model("  fc1 = Linear(64, 32)\n  fc2 = Linear(16, 10)", "    output logits = fc2(fc1(x))\n    loss cross_entropy(logits, y)");
    let o = d.check("shape.bm", &src);
    assert_diag(
        &o,
        "shape.bm",
        7,
        25,
        &[
            "shape mismatch",
            "f32[8, 32]",           // the actual shape (B = batch = 8)
            "[..., in]",            // the declared one
            "`in` = 16",            // and its value
            "fc2 = Linear(16, 10)", // where `in` came from
            "`fc2` is made here",
            "this is f32[8, 32]",
        ],
    );
}

#[test]
fn bad_reshape_counts_elements() {
    let d = Dir::new();
    let src =
        model("  fc1 = Linear(64, 10)", "    let r = x.reshape([B, 7, 9])\n    output logits = fc1(x)\n    loss cross_entropy(logits, y)");
    let o = d.check("reshape.bm", &src);
    assert_diag(&o, "reshape.bm", 6, 13, &["cannot reshape", "512 elements", "504 elements", "use -1"]);
}

#[test]
fn missing_loss() {
    let d = Dir::new();
    let src = model("  fc1 = Linear(64, 10)", "    output logits = fc1(x)");
    let o = d.check("noloss.bm", &src);
    assert_diag(&o, "noloss.bm", 1, 7, &["model `M` has no `loss`", "loss cross_entropy"]);
}

#[test]
fn input_not_given_by_data() {
    let d = Dir::new();
    let src = GOOD.replace("input x:", "input z:").replace("fc1(x)", "fc1(z)");
    let o = d.check("inputz.bm", &src);
    assert_diag(
        &o,
        "inputz.bm",
        4,
        3,
        &["input `z` is not given by the data", "`x`: f32[64]", "`y`: i32[]", "data declared here", "did you mean `x`?"],
    );
}

#[test]
fn input_shape_differs_from_data() {
    let d = Dir::new();
    let src = GOOD.replace("f32[B, 64]", "f32[B, 63]").replace("Linear(64, 16)", "Linear(63, 16)");
    let o = d.check("input63.bm", &src);
    assert_diag(&o, "input63.bm", 4, 3, &["input `x` is f32[63] per example", "data gives f32[64]", "data declared here"]);
}

#[test]
fn duplicate_member() {
    let d = Dir::new();
    let src = model("  fc1 = Linear(64, 10)\n  fc1 = Linear(10, 10)", "    loss cross_entropy(fc1(x), y)");
    let o = d.check("dup.bm", &src);
    assert_diag(&o, "dup.bm", 3, 3, &["`fc1` is defined twice in `M`"]);
}

#[test]
fn duplicate_block() {
    let d = Dir::new();
    let src = format!("block A {{\n  forward(x) {{ x }}\n}}\nblock A {{\n  forward(x) {{ x }}\n}}\n{GOOD}");
    let o = d.check("dupblock.bm", &src);
    assert_diag(&o, "dupblock.bm", 4, 7, &["block `A` is defined twice", "first defined here"]);
}

#[test]
fn recursive_block() {
    let d = Dir::new();
    let src = format!(
        "block A {{\n  a = A()\n  forward(x) {{ a(x) }}\n}}\n{}",
        model("  a = A()\n  fc = Linear(64, 10)", "    loss cross_entropy(fc(a(x)), y)")
    );
    let o = d.check("rec.bm", &src);
    assert_diag(&o, "rec.bm", 2, 3, &["block `A` contains itself: M -> A -> A", "repeat(n, Block(..))"]);
}

#[test]
fn oversized_repeat() {
    let d = Dir::new();
    let src = model("  h = repeat(100000, Linear(64, 64))\n  fc = Linear(64, 10)", "    loss cross_entropy(fc(h(x)), y)");
    let o = d.check("rep.bm", &src);
    assert_diag(&o, "rep.bm", 2, 14, &["repeat count 100000 is out of range", "4096"]);
}

#[test]
fn oversized_parameter() {
    let d = Dir::new();
    let src = model("  fc = Linear(100000000, 100000000)", "    loss cross_entropy(fc(x), y)");
    let o = d.check("huge.bm", &src);
    // The error is in the standard `Linear`; the user's line that made it is labelled.
    assert_user_error(&o, &["too large", "[100000000, 100000000]", "huge.bm", "fc = Linear(100000000, 100000000)", "in `fc`, made here"]);
}

#[test]
fn bad_set_value_names_the_users_line() {
    let d = Dir::new();
    let src = format!(
        "config {{\n  hidden = 16\n}}\n{}",
        GOOD.replace("Linear(64, 16)", "Linear(64, hidden)").replace("Linear(16, 10)", "Linear(hidden, 10)")
    );
    d.write("setv.bm", &src);
    let o = d.bmc(&["check", "setv.bm", "--set", "hidden=abc"]);
    assert_user_error(&o, &["a dim must be an integer", "\"abc\"", "setv.bm", "fc1 = Linear(64, hidden)", "in `fc1`, made here"]);
}

#[test]
fn data_file_missing() {
    let d = Dir::new();
    let src = GOOD.replace("digits.csv", "nonexistent.csv");
    let o = d.check("nodata.bm", &src);
    assert_diag(&o, "nodata.bm", 12, 10, &["bad data", "`nonexistent.csv` does not exist", "--data"]);
}

#[test]
fn data_file_non_numeric_cell() {
    let d = Dir::new();
    let csv = std::fs::read_to_string(digits_csv()).unwrap();
    let mut lines: Vec<String> = csv.lines().take(40).map(String::from).collect();
    // Line 5 of the file, third cell.
    let mut cells: Vec<&str> = lines[4].split(',').collect();
    cells[2] = "abc";
    lines[4] = cells.join(",");
    d.write("bad.csv", &(lines.join("\n") + "\n"));
    let o = d.check("badcsv.bm", &GOOD.replace("digits.csv", "bad.csv"));
    assert_diag(&o, "badcsv.bm", 12, 10, &["bad data", "bad.csv", "line 5", "column 3", "`abc` is not a number"]);
}

#[test]
fn unknown_train_field_suggests() {
    let d = Dir::new();
    let o = d.check("field.bm", &GOOD.replace("  steps = 2", "  stpes = 2"));
    assert_diag(&o, "field.bm", 14, 3, &["unknown train field `stpes`", "did you mean `steps`?"]);
    let o = d.check("field2.bm", &GOOD.replace("  steps = 2", "  frobnicate = 2"));
    assert_diag(&o, "field2.bm", 14, 3, &["unknown train field `frobnicate`", "train fields: data, batch, steps"]);
}

#[test]
fn bad_set_name_suggests() {
    let d = Dir::new();
    let src = format!(
        "config {{\n  hidden = 16\n}}\n{}",
        GOOD.replace("Linear(64, 16)", "Linear(64, hidden)").replace("Linear(16, 10)", "Linear(hidden, 10)")
    );
    d.write("set.bm", &src);
    let ok = d.bmc(&["check", "set.bm", "--set", "hidden=8"]);
    assert_eq!(ok.status.code(), Some(0), "{}", stderr(&ok));
    let o = d.bmc(&["check", "set.bm", "--set", "hiden=8"]);
    assert_user_error(&o, &["set.bm", "no config constant `hiden`", "did you mean `hidden`?"]);
}

#[test]
fn bad_cli_usage_exits_2() {
    let d = Dir::new();
    d.write("good.bm", GOOD);
    for args in [
        &[][..],
        &["frobnicate", "good.bm"][..],
        &["check"][..],
        &["compile", "good.bm", "--bogus-flag"][..],
        &["emit", "good.bm", "--stage", "nonsense"][..],
        &["check", "good.bm", "--set", "no_equals_sign"][..],
    ] {
        let o = d.bmc(args);
        assert_eq!(o.status.code(), Some(2), "bmc {args:?}: {}", stderr(&o));
        assert!(!stderr(&o).is_empty(), "bmc {args:?} printed nothing");
    }
}

#[test]
fn unreadable_model_file() {
    let d = Dir::new();
    let o = d.bmc(&["check", "missing.bm"]);
    assert_user_error(&o, &["missing.bm"]);
    d.write("bin.bm", "");
    std::fs::write(d.path().join("bin.bm"), [0xff, 0xfe, 0x00, 0x80]).unwrap();
    let o = d.bmc(&["check", "bin.bm"]);
    assert_user_error(&o, &["bin.bm", "not UTF-8"]);
}

/// Compiles GOOD to `./good`, trains 2 steps into `run/`; returns the checkpoint path.
fn trained(d: &Dir) -> PathBuf {
    d.write("good.bm", GOOD);
    let o = d.bmc(&["compile", "good.bm", "-o", "good"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = d.exe("good", &["train", "--steps", "2", "--out", "run", "--threads", "1"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let ckpt = d.path().join("run/step-2.safetensors");
    assert!(ckpt.exists());
    ckpt
}

#[test]
fn bad_checkpoints_and_binary_usage() {
    let d = Dir::new();
    let ckpt = trained(&d);
    let good = d.exe("good", &["eval", "--checkpoint", "run/step-2.safetensors", "--threads", "1"]);
    assert_eq!(good.status.code(), Some(0), "{}", stderr(&good));

    // Not a checkpoint at all.
    d.write("garbage.safetensors", "this is not a safetensors file\n");
    let o = d.exe("good", &["eval", "--checkpoint", "garbage.safetensors"]);
    assert_user_error(&o, &["garbage.safetensors", "not a valid safetensors file"]);

    // Missing.
    let o = d.exe("good", &["eval", "--checkpoint", "nope.safetensors"]);
    assert_user_error(&o, &["nope.safetensors", "does not exist"]);

    // Truncated.
    let bytes = std::fs::read(&ckpt).unwrap();
    std::fs::write(d.path().join("trunc.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let o = d.exe("good", &["eval", "--checkpoint", "trunc.safetensors"]);
    assert_user_error(&o, &["trunc.safetensors", "truncated"]);

    // A tensor missing.
    let c = bm_runtime::checkpoint::load(&ckpt).unwrap();
    let kept: Vec<_> =
        c.tensors.iter().filter(|(n, _)| *n != "fc1.bias").map(|(n, t)| (n.clone(), t.shape.clone(), t.data.clone())).collect();
    assert_eq!(kept.len() + 1, c.tensors.len(), "expected a tensor fc1.bias in {:?}", c.tensors.keys());
    let bytes = bm_runtime::checkpoint::serialize(&kept, &c.metadata).unwrap();
    std::fs::write(d.path().join("partial.safetensors"), bytes).unwrap();
    let o = d.exe("good", &["eval", "--checkpoint", "partial.safetensors"]);
    assert_user_error(&o, &["partial.safetensors", "no tensor `fc1.bias`"]);

    // A tensor of the wrong shape.
    let mut wrong: Vec<_> = c.tensors.iter().map(|(n, t)| (n.clone(), t.shape.clone(), t.data.clone())).collect();
    for (n, s, _) in &mut wrong {
        if n == "fc2.weight" {
            s.reverse(); // [10, 16] -> [16, 10]: same element count
        }
    }
    let bytes = bm_runtime::checkpoint::serialize(&wrong, &c.metadata).unwrap();
    std::fs::write(d.path().join("wrong.safetensors"), bytes).unwrap();
    let o = d.exe("good", &["eval", "--checkpoint", "wrong.safetensors"]);
    assert_user_error(&o, &["wrong.safetensors", "fc2.weight", "[16, 10]", "[10, 16]"]);

    // Bad --set on the binary: a user error with a suggestion, not a doubled prefix.
    let o = d.exe("good", &["train", "--steps", "1", "--out", "run2", "--set", "hiden=3"]);
    assert_user_error(&o, &["no config constant `hiden`"]);

    // Bad data for the binary.
    let o = d.exe("good", &["eval", "--checkpoint", "run/step-2.safetensors", "--data", "nonexistent.csv"]);
    assert_user_error(&o, &["nonexistent.csv"]);

    // Usage errors of the binary exit 2.
    for args in [&[][..], &["bogus"][..], &["eval"][..], &["train", "--steps", "many"][..]] {
        let o = d.exe("good", args);
        assert_eq!(o.status.code(), Some(2), "good {args:?}: {}", stderr(&o));
    }
}

/// A label the logits cannot index: PyTorch's cross_entropy raises; a one-hot would count
/// it as zero loss. `bmc check` points at the loss; a compiled binary given such data
/// with `--data` refuses it too.
#[test]
fn labels_outside_the_classifier() {
    let d = Dir::new();
    let src = GOOD.replace("Linear(16, 10)", "Linear(16, 5)");
    let o = d.check("five.bm", &src);
    assert_diag(&o, "five.bm", 8, 10, &["has label 5 in `y`", "5 classes", "labels must be 0..=4", "go up to 9", "10 outputs"]);

    trained(&d);
    let mut csv = std::fs::read_to_string(d.path().join("digits.csv")).unwrap();
    let line = csv.lines().nth(3).unwrap().to_string(); // a header, then examples 0, 1, 2
    let bad = format!("{},12", line.rsplit_once(',').unwrap().0);
    csv = csv.replacen(&line, &bad, 1);
    d.write("bad.csv", &csv);
    let o = d.exe("good", &["eval", "--checkpoint", "run/step-2.safetensors", "--data", "bad.csv"]);
    assert_user_error(&o, &["bad.csv", "label 12 in `y`", "example 2", "10 classes", "13 outputs"]);
}
