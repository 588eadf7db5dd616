//! Data sources (csv, safetensors, text, tokens), train/held-out splits and batching.
//!
//! # Sources
//! - `csv`: comma-separated numbers, one example per line; blank lines are skipped, a
//!   UTF-8 BOM and `\r\n` endings are accepted, a cell may be wrapped in double quotes.
//!   The `label` column (negative counts from the end) becomes `y: i32` (its cells must be
//!   whole numbers), the other columns in order become `x: f32[features]` multiplied by
//!   `scale`. Every cell must be a finite number.
//! - `safetensors`: every tensor by name, first axis = examples (all tensors must agree);
//!   F32/F16/BF16/F64/U8 become f32, I32/I64 become i32 (range-checked).
//! - `text`: `bytes` (each byte a token, vocabulary 256) or `chars` (the file must be
//!   UTF-8; the vocabulary is the sorted distinct characters of the whole file, kept as a
//!   string, see [`TextCodec`]). Gives `tokens: i32[ctx]` and `targets: i32[ctx]`.
//! - `tokens`: a flat little-endian u16 file (nanoGPT / llm.c `.bin`), same two inputs.
//!
//! # Splits
//! The first `floor(split · n)` examples (file order), or tokens of the stream, are the
//! training set; the rest is held out. `split` must be in `(0, 1]` and the training set
//! non-empty (for streams: at least `ctx + 1` tokens), else [`Error::User`].
//! With nothing held out (`split = 1`, or a held-out stream shorter than `ctx + 1`
//! tokens) [`Dataset::has_eval`] is false and [`Dataset::eval_batches`] is an
//! `Error::User` naming the file; a trainer should skip its periodic evaluation then
//! (saying so once) and `eval` should report the error.
//!
//! # Batches
//! [`Batcher`] yields training batches. Example data visits the training examples in
//! an order shuffled per epoch from `(seed, epoch)` (file order with `shuffle = false`);
//! a batch is always full and continues into the next epoch's order. Stream data draws
//! `batch` windows of `ctx + 1` tokens at offsets uniform in the training part, from a
//! seeded [`Rng`]. [`BatcherState`] (epoch, position, rng state) restores exactly.
//!
//! Evaluation uses the held-out split in file order: example `j·batch + r` (mod the
//! held-out count) for batch `j`; streams cut the held-out tokens into consecutive
//! windows `[s, s + ctx]` with stride `ctx`. At most `ceil(held-out / batch)` batches
//! are used (fewer than asked when the held-out set is small, so that no example is
//! counted twice except to fill the last batch).

use crate::error::{Error, Result};
use crate::kir::DType;
use crate::rng::Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Tokenizer {
    Bytes,
    Chars,
}

/// The `data` field of a `train` section, with defaults filled in.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum DataSpec {
    Csv {
        path: String,
        /// Label column; negative counts from the end (-1 = last).
        label: i64,
        header: bool,
        scale: f64,
        split: f64,
        shuffle: bool,
    },
    Safetensors {
        path: String,
        split: f64,
        shuffle: bool,
    },
    Text {
        path: String,
        ctx: usize,
        tokenizer: Tokenizer,
        split: f64,
    },
    Tokens {
        path: String,
        ctx: usize,
        split: f64,
    },
}

impl DataSpec {
    pub fn path(&self) -> &str {
        match self {
            DataSpec::Csv { path, .. }
            | DataSpec::Safetensors { path, .. }
            | DataSpec::Text { path, .. }
            | DataSpec::Tokens { path, .. } => path,
        }
    }

    /// Replaces the path (`--data`, or resolving it against the `.bm` file's directory).
    pub fn set_path(&mut self, new: impl Into<String>) {
        match self {
            DataSpec::Csv { path, .. }
            | DataSpec::Safetensors { path, .. }
            | DataSpec::Text { path, .. }
            | DataSpec::Tokens { path, .. } => *path = new.into(),
        }
    }

    pub fn split(&self) -> f64 {
        match self {
            DataSpec::Csv { split, .. }
            | DataSpec::Safetensors { split, .. }
            | DataSpec::Text { split, .. }
            | DataSpec::Tokens { split, .. } => *split,
        }
    }

    /// The source kind as written in `.bm` (`"csv"`, `"safetensors"`, `"text"`, `"tokens"`).
    pub fn kind(&self) -> &'static str {
        match self {
            DataSpec::Csv { .. } => "csv",
            DataSpec::Safetensors { .. } => "safetensors",
            DataSpec::Text { .. } => "text",
            DataSpec::Tokens { .. } => "tokens",
        }
    }

    fn file(&self) -> String {
        let what = match self {
            DataSpec::Csv { .. } => "csv file",
            DataSpec::Safetensors { .. } => "data file",
            DataSpec::Text { .. } => "text file",
            DataSpec::Tokens { .. } => "tokens file",
        };
        format!("{what} `{}`", self.path())
    }
}

/// A flat tensor of one of the runtime's dtypes.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    I32(Vec<i32>),
}

impl TensorData {
    pub fn len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
            TensorData::I32(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn dtype(&self) -> DType {
        match self {
            TensorData::F32(_) => DType::F32,
            TensorData::I32(_) => DType::I32,
        }
    }
    pub fn as_f32(&self) -> Option<&[f32]> {
        match self {
            TensorData::F32(v) => Some(v),
            TensorData::I32(_) => None,
        }
    }
    pub fn as_i32(&self) -> Option<&[i32]> {
        match self {
            TensorData::I32(v) => Some(v),
            TensorData::F32(_) => None,
        }
    }
    fn empty_like(&self, cap: usize) -> TensorData {
        match self {
            TensorData::F32(_) => TensorData::F32(Vec::with_capacity(cap)),
            TensorData::I32(_) => TensorData::I32(Vec::with_capacity(cap)),
        }
    }
    /// Appends `self[start..start + n]` to `out` (same variant).
    fn copy_range(&self, start: usize, n: usize, out: &mut TensorData) {
        match (self, out) {
            (TensorData::F32(a), TensorData::F32(o)) => o.extend_from_slice(&a[start..start + n]),
            (TensorData::I32(a), TensorData::I32(o)) => o.extend_from_slice(&a[start..start + n]),
            _ => unreachable!("copy_range between different dtypes"),
        }
    }
}

/// One batch: each input by name, flat, shape `[batch, ...per-example shape]`.
pub type Batch = Vec<(String, TensorData)>;

/// Text tokenizer with its vocabulary, as stored in checkpoints for `sample`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TextCodec {
    /// Token = byte value, vocabulary 256.
    Bytes,
    /// Token = index of the character in this sorted list.
    Chars(Vec<char>),
}

impl TextCodec {
    pub fn vocab_size(&self) -> usize {
        match self {
            TextCodec::Bytes => 256,
            TextCodec::Chars(c) => c.len(),
        }
    }

    /// Tokens of `text`; a character outside a `chars` vocabulary is an `Error::User`.
    pub fn encode(&self, text: &str) -> Result<Vec<i32>> {
        match self {
            TextCodec::Bytes => Ok(text.bytes().map(|b| b as i32).collect()),
            TextCodec::Chars(chars) => text
                .chars()
                .map(|c| {
                    chars.binary_search(&c).map(|i| i as i32).map_err(|_| {
                        Error::user(format!("the character {c:?} is not in the model's vocabulary of {} characters", chars.len()))
                    })
                })
                .collect(),
        }
    }

    /// Text of `ids`; ids out of range become U+FFFD, invalid UTF-8 bytes likewise.
    pub fn decode(&self, ids: &[i32]) -> String {
        match self {
            TextCodec::Bytes => {
                let bytes: Vec<u8> = ids.iter().map(|&i| if (0..256).contains(&i) { i as u8 } else { 0xFF }).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
            TextCodec::Chars(chars) => {
                ids.iter().map(|&i| usize::try_from(i).ok().and_then(|i| chars.get(i).copied()).unwrap_or('\u{FFFD}')).collect()
            }
        }
    }

    /// Checkpoint metadata entries: `tokenizer` = `bytes` | `chars`, and for chars
    /// `vocab` = the characters in token order.
    pub fn to_metadata(&self) -> Vec<(String, String)> {
        match self {
            TextCodec::Bytes => vec![("tokenizer".into(), "bytes".into())],
            TextCodec::Chars(c) => vec![("tokenizer".into(), "chars".into()), ("vocab".into(), c.iter().collect())],
        }
    }

    /// Reads [`TextCodec::to_metadata`]'s entries back; `Ok(None)` when there is no
    /// `tokenizer` entry.
    pub fn from_metadata(meta: &BTreeMap<String, String>) -> Result<Option<TextCodec>> {
        match meta.get("tokenizer").map(|s| s.as_str()) {
            None => Ok(None),
            Some("bytes") => Ok(Some(TextCodec::Bytes)),
            Some("chars") => {
                let v = meta.get("vocab").ok_or_else(|| Error::user("checkpoint metadata has tokenizer `chars` but no `vocab`"))?;
                let chars: Vec<char> = v.chars().collect();
                if chars.windows(2).any(|w| w[0] >= w[1]) {
                    return Err(Error::user("checkpoint metadata `vocab` is not a sorted list of distinct characters"));
                }
                Ok(Some(TextCodec::Chars(chars)))
            }
            Some(other) => Err(Error::user(format!("checkpoint metadata has unknown tokenizer `{other}`"))),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
struct Field {
    name: String,
    /// Per-example shape.
    shape: Vec<usize>,
    /// All examples, flat.
    data: TensorData,
}

impl Field {
    fn stride(&self) -> usize {
        self.shape.iter().product()
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Source {
    Examples { fields: Vec<Field>, n: usize, shuffle: bool },
    Stream { tokens: Vec<i32>, ctx: usize, codec: Option<TextCodec> },
}

/// A loaded data source with its split.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    spec: DataSpec,
    source: Source,
    /// Training examples, or training tokens for streams.
    n_train: usize,
}

fn split_point(n: usize, split: f64) -> usize {
    ((split * n as f64 + 1e-9).floor() as usize).min(n)
}

impl Dataset {
    /// Reads and checks the file `spec.path()` (used as given: the caller resolves a
    /// relative path against the `.bm` file's directory).
    pub fn load(spec: &DataSpec) -> Result<Dataset> {
        let bytes = std::fs::read(spec.path()).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::user(format!("{} does not exist", spec.file()))
            } else {
                Error::user(format!("cannot read {}: {e}", spec.file()))
            }
        })?;
        Dataset::from_bytes(spec, &bytes)
    }

    /// As [`Dataset::load`], from the file's bytes (never panics).
    pub fn from_bytes(spec: &DataSpec, bytes: &[u8]) -> Result<Dataset> {
        let file = spec.file();
        let split = spec.split();
        if !(split > 0.0 && split <= 1.0) {
            return Err(Error::user(format!("data split must be in (0, 1], got {split}")));
        }
        let source = match spec {
            DataSpec::Csv { label, header, scale, shuffle, .. } => {
                let (x, y, n, f) = parse_csv(bytes, &file, *label, *header, *scale)?;
                Source::Examples {
                    fields: vec![
                        Field { name: "x".into(), shape: vec![f], data: TensorData::F32(x) },
                        Field { name: "y".into(), shape: vec![], data: TensorData::I32(y) },
                    ],
                    n,
                    shuffle: *shuffle,
                }
            }
            DataSpec::Safetensors { shuffle, .. } => {
                let ck = crate::checkpoint::parse(bytes, Path::new(spec.path()), "data file")?;
                let (fields, n) = example_fields(ck, &file)?;
                Source::Examples { fields, n, shuffle: *shuffle }
            }
            DataSpec::Text { ctx, tokenizer, .. } => {
                let (tokens, codec) = match tokenizer {
                    Tokenizer::Bytes => (bytes.iter().map(|&b| b as i32).collect(), TextCodec::Bytes),
                    Tokenizer::Chars => {
                        let text = std::str::from_utf8(bytes).map_err(|e| {
                            Error::user(format!(
                                "{file} is not valid UTF-8 (at byte {}); use tokenizer = \"bytes\" for binary text",
                                e.valid_up_to()
                            ))
                        })?;
                        let mut chars: Vec<char> = text.chars().collect();
                        chars.sort_unstable();
                        chars.dedup();
                        let codec = TextCodec::Chars(chars);
                        (codec.encode(text)?, codec)
                    }
                };
                Source::Stream { tokens, ctx: *ctx, codec: Some(codec) }
            }
            DataSpec::Tokens { ctx, .. } => {
                if !bytes.len().is_multiple_of(2) {
                    return Err(Error::user(format!(
                        "{file} has {} bytes, an odd number: a tokens file is a flat array of little-endian u16",
                        bytes.len()
                    )));
                }
                let tokens = bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as i32).collect();
                Source::Stream { tokens, ctx: *ctx, codec: None }
            }
        };
        let n_train = match &source {
            Source::Examples { n, .. } => {
                let t = split_point(*n, split);
                if t == 0 {
                    return Err(Error::user(format!("{file} has {n} example(s); split = {split} leaves no training examples")));
                }
                t
            }
            Source::Stream { tokens, ctx, .. } => {
                if *ctx == 0 {
                    return Err(Error::user("data ctx must be at least 1"));
                }
                if tokens.is_empty() {
                    return Err(Error::user(format!("{file} is empty")));
                }
                let t = split_point(tokens.len(), split);
                if t < ctx + 1 {
                    return Err(Error::user(format!(
                        "{file} has {} tokens; its training part (split = {split}) has {t}, fewer than one window of ctx + 1 = {} tokens",
                        tokens.len(),
                        ctx + 1
                    )));
                }
                t
            }
        };
        Ok(Dataset { spec: spec.clone(), source, n_train })
    }

    pub fn spec(&self) -> &DataSpec {
        &self.spec
    }

    /// Each input the data gives, with its dtype and per-example shape (no batch axis):
    /// csv `x: f32[F]`, `y: i32[]`; safetensors every tensor (sorted by name); text and
    /// tokens `tokens: i32[ctx]`, `targets: i32[ctx]`.
    pub fn names_and_shapes(&self) -> Vec<(String, DType, Vec<usize>)> {
        match &self.source {
            Source::Examples { fields, .. } => fields.iter().map(|f| (f.name.clone(), f.data.dtype(), f.shape.clone())).collect(),
            Source::Stream { ctx, .. } => vec![("tokens".into(), DType::I32, vec![*ctx]), ("targets".into(), DType::I32, vec![*ctx])],
        }
    }

    /// The first class label of input `name` outside `0..classes` (and not `ignore`), as
    /// (example, or token position for streams; label). Labels index a classifier's
    /// logits: PyTorch's `cross_entropy` raises on these, and a one-hot would silently
    /// count them as zero loss.
    /// Also the largest label of the input (what the classifier would need).
    pub fn label_out_of_range(&self, name: &str, classes: usize, ignore: i64) -> Option<(usize, i64, i64)> {
        let bad = |v: i32| (v as i64) != ignore && (v < 0 || v as i64 >= classes as i64);
        let (values, per_example): (&[i32], usize) = match &self.source {
            Source::Examples { fields, .. } => {
                let f = fields.iter().find(|f| f.name == name)?;
                let TensorData::I32(v) = &f.data else { return None };
                (v, f.stride().max(1))
            }
            Source::Stream { tokens, .. } if name == "targets" || name == "tokens" => (tokens, 1),
            Source::Stream { .. } => return None,
        };
        let i = values.iter().position(|&v| bad(v))?;
        let max = values.iter().map(|&v| v as i64).filter(|&v| v != ignore).max().unwrap_or(0);
        Some((i / per_example, values[i] as i64, max))
    }

    /// True for text and tokens data.
    pub fn is_stream(&self) -> bool {
        matches!(self.source, Source::Stream { .. })
    }

    /// Number of examples, or of tokens for streams.
    pub fn len(&self) -> usize {
        match &self.source {
            Source::Examples { n, .. } => *n,
            Source::Stream { tokens, .. } => tokens.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Training examples (or tokens for streams).
    pub fn train_len(&self) -> usize {
        self.n_train
    }

    /// Held-out examples (or tokens for streams).
    pub fn eval_len(&self) -> usize {
        self.len() - self.n_train
    }

    /// The text tokenizer (text data only).
    pub fn codec(&self) -> Option<&TextCodec> {
        match &self.source {
            Source::Stream { codec, .. } => codec.as_ref(),
            Source::Examples { .. } => None,
        }
    }

    /// Vocabulary size for streams: the tokenizer's, or the largest token + 1 for a
    /// tokens file.
    pub fn vocab_size(&self) -> Option<usize> {
        match &self.source {
            Source::Stream { codec: Some(c), .. } => Some(c.vocab_size()),
            Source::Stream { tokens, .. } => tokens.iter().max().map(|&m| m as usize + 1),
            Source::Examples { .. } => None,
        }
    }

    /// Batches in one pass over the training set: `ceil(train / batch)` for examples,
    /// `ceil(train tokens / (batch · ctx))` for streams (at least 1).
    pub fn steps_per_epoch(&self, batch: usize) -> usize {
        let batch = batch.max(1);
        match &self.source {
            Source::Examples { .. } => self.n_train.div_ceil(batch),
            Source::Stream { ctx, .. } => self.n_train.div_ceil(batch * ctx),
        }
        .max(1)
    }

    fn eval_windows(&self) -> usize {
        match &self.source {
            Source::Examples { .. } => self.eval_len(),
            Source::Stream { ctx, .. } => self.eval_len().saturating_sub(1) / ctx,
        }
    }

    /// Whether there is held-out data to evaluate on.
    pub fn has_eval(&self) -> bool {
        self.eval_windows() > 0
    }

    /// How many eval batches [`Dataset::eval_batches`] gives: `min(max_batches,
    /// ceil(held-out / batch))` (0 when nothing is held out).
    pub fn eval_batch_count(&self, batch: usize, max_batches: usize) -> usize {
        self.eval_windows().div_ceil(batch.max(1)).min(max_batches)
    }

    /// Eval batch `j` (deterministic, file order, wrapping within the held-out set).
    /// Panics if nothing is held out; check [`Dataset::has_eval`] first.
    pub fn eval_batch(&self, batch: usize, j: usize) -> Batch {
        let m = self.eval_windows();
        assert!(m > 0, "eval_batch without held-out data");
        match &self.source {
            Source::Examples { fields, .. } => {
                let idx: Vec<usize> = (0..batch).map(|r| self.n_train + (j * batch + r) % m).collect();
                gather(fields, &idx)
            }
            Source::Stream { tokens, ctx, .. } => {
                let starts: Vec<usize> = (0..batch).map(|r| self.n_train + ((j * batch + r) % m) * ctx).collect();
                windows(tokens, *ctx, &starts)
            }
        }
    }

    /// The first [`Dataset::eval_batch_count`] eval batches; an `Error::User` naming the
    /// file when nothing is held out.
    pub fn eval_batches(&self, batch: usize, max_batches: usize) -> Result<Vec<Batch>> {
        if !self.has_eval() {
            let why = match &self.source {
                Source::Examples { .. } => {
                    format!("split = {} holds out no examples", self.spec.split())
                }
                Source::Stream { ctx, .. } => format!(
                    "split = {} holds out {} tokens, fewer than one window of ctx + 1 = {}",
                    self.spec.split(),
                    self.eval_len(),
                    ctx + 1
                ),
            };
            return Err(Error::user(format!("cannot evaluate on {}: {why}", self.spec.file())));
        }
        if batch == 0 {
            return Err(Error::user("batch must be at least 1"));
        }
        Ok((0..self.eval_batch_count(batch, max_batches)).map(|j| self.eval_batch(batch, j)).collect())
    }
}

fn gather(fields: &[Field], idx: &[usize]) -> Batch {
    fields
        .iter()
        .map(|f| {
            let s = f.stride();
            let mut out = f.data.empty_like(s * idx.len());
            for &i in idx {
                f.data.copy_range(i * s, s, &mut out);
            }
            (f.name.clone(), out)
        })
        .collect()
}

fn windows(tokens: &[i32], ctx: usize, starts: &[usize]) -> Batch {
    let mut x = Vec::with_capacity(starts.len() * ctx);
    let mut y = Vec::with_capacity(starts.len() * ctx);
    for &s in starts {
        x.extend_from_slice(&tokens[s..s + ctx]);
        y.extend_from_slice(&tokens[s + 1..s + ctx + 1]);
    }
    vec![("tokens".into(), TensorData::I32(x)), ("targets".into(), TensorData::I32(y))]
}

/// Safetensors data: every tensor, first axis = examples.
fn example_fields(ck: crate::checkpoint::Checkpoint, file: &str) -> Result<(Vec<Field>, usize)> {
    let mut fields = Vec::new();
    let mut n: Option<(usize, String)> = None;
    for (name, t) in ck.tensors {
        let Some((&first, rest)) = t.shape.split_first() else {
            return Err(Error::user(format!("tensor `{name}` in {file} is a scalar; every tensor needs a first axis of examples")));
        };
        match &n {
            None => n = Some((first, name.clone())),
            Some((m, other)) if *m != first => {
                return Err(Error::user(format!(
                    "tensors in {file} disagree on the number of examples (first axis): `{other}` has {m}, `{name}` has {first}"
                )));
            }
            _ => {}
        }
        fields.push(Field { name, shape: rest.to_vec(), data: t.data });
    }
    let Some((n, _)) = n else {
        return Err(Error::user(format!("{file} holds no tensors")));
    };
    if n == 0 {
        return Err(Error::user(format!("{file} has 0 examples (first axis)")));
    }
    Ok((fields, n))
}

fn show_cell(s: &str) -> String {
    if s.chars().count() > 40 { format!("{}…", s.chars().take(40).collect::<String>()) } else { s.to_string() }
}

/// Returns (features row-major [n, f], labels [n], n, f).
fn parse_csv(bytes: &[u8], file: &str, label: i64, header: bool, scale: f64) -> Result<(Vec<f32>, Vec<i32>, usize, usize)> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut ncols: Option<(usize, usize)> = None; // (columns, line they came from)
    let mut label_col = 0usize;
    let mut header_pending = header;
    let mut x = Vec::new();
    let mut y = Vec::new();
    let mut n = 0usize;
    let mut cells: Vec<&str> = Vec::new();
    for (lineno, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let lineno = lineno + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let line = std::str::from_utf8(raw).map_err(|_| Error::user(format!("{file}, line {lineno}: not valid UTF-8 text")))?;
        if line.trim().is_empty() {
            continue;
        }
        cells.clear();
        cells.extend(line.split(','));
        let c = cells.len();
        match ncols {
            None => {
                if c < 2 {
                    let hint = if line.contains(';') || line.contains('\t') { " (the file must be comma-separated)" } else { "" };
                    return Err(Error::user(format!(
                        "{file}, line {lineno}: found 1 column, need at least 2 (features and a label){hint}"
                    )));
                }
                let idx = if label < 0 { c as i64 + label } else { label };
                if idx < 0 || idx >= c as i64 {
                    return Err(Error::user(format!(
                        "{file}: label column {label} is out of range, the file has {c} columns (line {lineno})"
                    )));
                }
                label_col = idx as usize;
                ncols = Some((c, lineno));
            }
            Some((k, from)) if k != c => {
                return Err(Error::user(format!("{file}, line {lineno}: found {c} columns, expected {k} (as on line {from})")));
            }
            _ => {}
        }
        if header_pending {
            header_pending = false;
            continue;
        }
        for (ci, cell) in cells.iter().enumerate() {
            let t = cell.trim();
            let t = t.strip_prefix('"').and_then(|t| t.strip_suffix('"')).unwrap_or(t).trim();
            let col = ci + 1;
            if t.is_empty() {
                return Err(Error::user(format!("{file}, line {lineno}, column {col}: empty cell")));
            }
            let v: f64 =
                t.parse().map_err(|_| Error::user(format!("{file}, line {lineno}, column {col}: `{}` is not a number", show_cell(t))))?;
            if !v.is_finite() {
                return Err(Error::user(format!("{file}, line {lineno}, column {col}: `{}` is not a finite number", show_cell(t))));
            }
            if ci == label_col {
                if v.fract() != 0.0 || v < i32::MIN as f64 || v > i32::MAX as f64 {
                    return Err(Error::user(format!(
                        "{file}, line {lineno}, column {col}: label `{}` is not an integer (labels are class indices)",
                        show_cell(t)
                    )));
                }
                y.push(v as i32);
            } else {
                let s = v * scale;
                if !s.is_finite() {
                    return Err(Error::user(format!(
                        "{file}, line {lineno}, column {col}: `{}` times scale {scale} is not finite",
                        show_cell(t)
                    )));
                }
                x.push(s as f32);
            }
        }
        n += 1;
    }
    if n == 0 {
        let what = if ncols.is_some() { "no data rows (only a header)" } else { "no data (it is empty)" };
        return Err(Error::user(format!("{file} has {what}")));
    }
    let f = ncols.map(|(k, _)| k - 1).unwrap_or(0);
    Ok((x, y, n, f))
}

/// A [`Batcher`]'s position, enough to continue exactly after a restart.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatcherState {
    /// Epoch of the current order (examples; 0 for streams).
    pub epoch: u64,
    /// Next position in the current epoch's order (examples).
    pub pos: u64,
    /// Window rng state (streams).
    pub rng: u64,
    /// Batches drawn so far.
    pub batches: u64,
    /// Training examples (or tokens) of the data the state was taken on, checked on restore.
    pub train_len: u64,
}

impl BatcherState {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("BatcherState serialises")
    }
    pub fn from_json(s: &str) -> Result<BatcherState> {
        serde_json::from_str(s).map_err(|e| Error::user(format!("invalid data position in checkpoint: {e}")))
    }
}

const EPOCH_STREAM: u64 = 0xE90C_0000_0000;
const WINDOW_STREAM: u64 = 0x0057_1D0E;

/// Yields training batches from a [`Dataset`].
pub struct Batcher<'a> {
    ds: &'a Dataset,
    batch: usize,
    seed: u64,
    epoch: u64,
    pos: usize,
    order: Vec<usize>,
    rng: Rng,
    batches: u64,
}

impl<'a> Batcher<'a> {
    pub fn new(ds: &'a Dataset, batch: usize, seed: u64) -> Result<Batcher<'a>> {
        if batch == 0 {
            return Err(Error::user("batch must be at least 1"));
        }
        let mut b =
            Batcher { ds, batch, seed, epoch: 0, pos: 0, order: Vec::new(), rng: Rng::with_stream(seed, WINDOW_STREAM), batches: 0 };
        b.order = b.epoch_order(0);
        Ok(b)
    }

    /// The visiting order of epoch `e`.
    fn epoch_order(&self, e: u64) -> Vec<usize> {
        match &self.ds.source {
            Source::Examples { shuffle, .. } => {
                let mut order: Vec<usize> = (0..self.ds.n_train).collect();
                if *shuffle {
                    Rng::with_stream(self.seed, EPOCH_STREAM.wrapping_add(e)).shuffle(&mut order);
                }
                order
            }
            Source::Stream { .. } => Vec::new(),
        }
    }

    /// The epoch the next example comes from (examples), or the fraction of the training
    /// tokens drawn so far (streams, as whole passes).
    pub fn epoch(&self) -> u64 {
        match &self.ds.source {
            Source::Examples { .. } => self.epoch + (self.pos >= self.ds.n_train) as u64,
            Source::Stream { ctx, .. } => self.batches * (self.batch * ctx) as u64 / self.ds.n_train as u64,
        }
    }

    pub fn next_batch(&mut self) -> Batch {
        self.batches += 1;
        match &self.ds.source {
            Source::Examples { fields, .. } => {
                let mut idx = Vec::with_capacity(self.batch);
                while idx.len() < self.batch {
                    if self.pos >= self.ds.n_train {
                        self.epoch += 1;
                        self.pos = 0;
                        self.order = self.epoch_order(self.epoch);
                    }
                    idx.push(self.order[self.pos]);
                    self.pos += 1;
                }
                gather(fields, &idx)
            }
            Source::Stream { tokens, ctx, .. } => {
                let span = (self.ds.n_train - ctx) as u64;
                let starts: Vec<usize> = (0..self.batch).map(|_| self.rng.below(span) as usize).collect();
                windows(tokens, *ctx, &starts)
            }
        }
    }

    pub fn state(&self) -> BatcherState {
        BatcherState {
            epoch: self.epoch,
            pos: self.pos as u64,
            rng: self.rng.state(),
            batches: self.batches,
            train_len: self.ds.n_train as u64,
        }
    }

    /// Continues from `s`; an `Error::User` when it was taken on different data.
    pub fn restore(&mut self, s: &BatcherState) -> Result<()> {
        if s.train_len != self.ds.n_train as u64 || s.pos > s.train_len {
            return Err(Error::user(format!(
                "the checkpoint's data position was taken on data with {} training {}, {} has {}; resume with the same data and split",
                s.train_len,
                if self.ds.is_stream() { "tokens" } else { "examples" },
                self.ds.spec.file(),
                self.ds.n_train
            )));
        }
        self.epoch = s.epoch;
        self.pos = s.pos as usize;
        self.rng = Rng::from_state(s.rng);
        self.batches = s.batches;
        self.order = self.epoch_order(self.epoch);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn csv(label: i64, header: bool, shuffle: bool, split: f64) -> DataSpec {
        DataSpec::Csv { path: "d.csv".into(), label, header, scale: 1.0, split, shuffle }
    }

    fn err(spec: &DataSpec, bytes: &[u8]) -> String {
        match Dataset::from_bytes(spec, bytes) {
            Err(Error::User(m)) => m,
            other => panic!("expected a user error, got {other:?}"),
        }
    }

    #[test]
    fn csv_basic() {
        let text = "\u{feff}a,b,label\r\n1,2,0\r\n3,4,1\n\n5,6,2\n7,8,3\n9,10,4\n";
        let spec = DataSpec::Csv { path: "d.csv".into(), label: -1, header: true, scale: 0.5, split: 0.8, shuffle: false };
        let ds = Dataset::from_bytes(&spec, text.as_bytes()).unwrap();
        assert_eq!(ds.len(), 5);
        assert_eq!(ds.train_len(), 4);
        assert_eq!(ds.eval_len(), 1);
        assert_eq!(ds.names_and_shapes(), vec![("x".into(), DType::F32, vec![2]), ("y".into(), DType::I32, vec![])]);
        let mut b = Batcher::new(&ds, 3, 0).unwrap();
        let b1 = b.next_batch();
        assert_eq!(b1[0].1, TensorData::F32(vec![0.5, 1.0, 1.5, 2.0, 2.5, 3.0]));
        assert_eq!(b1[1].1, TensorData::I32(vec![0, 1, 2]));
        let b2 = b.next_batch(); // wraps into epoch 1
        assert_eq!(b2[1].1, TensorData::I32(vec![3, 0, 1]));
        assert_eq!(b.epoch(), 1);
        let ev = ds.eval_batches(3, 10).unwrap();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0][1].1, TensorData::I32(vec![4, 4, 4]));
        // label in the first column, no header
        let ds = Dataset::from_bytes(&csv(0, false, false, 1.0), b"7, 1.5, \"2\"\n8,3,4").unwrap();
        let mut b = Batcher::new(&ds, 2, 0).unwrap();
        let bt = b.next_batch();
        assert_eq!(bt[0].1, TensorData::F32(vec![1.5, 2.0, 3.0, 4.0]));
        assert_eq!(bt[1].1, TensorData::I32(vec![7, 8]));
        assert!(!ds.has_eval());
        assert!(ds.eval_batches(2, 1).unwrap_err().to_string().contains("holds out no examples"));
    }

    #[test]
    fn csv_errors() {
        let s = csv(-1, true, true, 0.9);
        let e = err(&s, b"a,b\n1,2\n3,x\n");
        assert!(e.contains("d.csv") && e.contains("line 3, column 2") && e.contains("`x` is not a number"), "{e}");
        let e = err(&s, b"a,b\n1,2\n3,4,5\n");
        assert!(e.contains("line 3: found 3 columns, expected 2"), "{e}");
        assert!(err(&s, b"").contains("empty"));
        assert!(err(&s, b"a,b\n").contains("only a header"));
        let e = err(&s, b"a,b\n1,2.5\n");
        assert!(e.contains("not an integer"), "{e}");
        let e = err(&csv(5, true, true, 0.9), b"a,b\n1,2\n");
        assert!(e.contains("label column 5 is out of range"), "{e}");
        let e = err(&s, b"a;b\n1;2\n");
        assert!(e.contains("comma-separated"), "{e}");
        let e = err(&s, b"a,b\n1,\n");
        assert!(e.contains("empty cell"), "{e}");
        let e = err(&s, b"a,b\nnan,1\n");
        assert!(e.contains("not a finite number"), "{e}");
        let e = err(&csv(-1, true, true, 0.0), b"a,b\n1,1\n");
        assert!(e.contains("split"), "{e}");
        let e = err(&csv(-1, false, true, 0.5), b"1,1\n");
        assert!(e.contains("no training examples"), "{e}");
        let e = err(&s, b"a,b\n\xff,1\n");
        assert!(e.contains("UTF-8"), "{e}");
    }

    #[test]
    fn shuffled_epochs_are_permutations_and_resume_exactly() {
        let rows: String = (0..10).map(|i| format!("{i},{i}\n")).collect();
        let ds = Dataset::from_bytes(&csv(-1, false, true, 1.0), rows.as_bytes()).unwrap();
        let mut b = Batcher::new(&ds, 5, 7).unwrap();
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.extend_from_slice(b.next_batch()[1].1.as_i32().unwrap());
        }
        let (e0, e1) = seen.split_at(10);
        assert_ne!(e0, (0..10).collect::<Vec<_>>());
        assert_ne!(e0, e1);
        for e in [e0, e1] {
            let mut s = e.to_vec();
            s.sort();
            assert_eq!(s, (0..10).collect::<Vec<_>>());
        }
        // batch 3 straddles epochs; restore mid-way and compare
        let mut a = Batcher::new(&ds, 3, 7).unwrap();
        a.next_batch();
        a.next_batch();
        a.next_batch();
        let st = BatcherState::from_json(&a.state().to_json()).unwrap();
        let mut c = Batcher::new(&ds, 3, 7).unwrap();
        c.restore(&st).unwrap();
        for _ in 0..10 {
            assert_eq!(a.next_batch(), c.next_batch());
        }
        // different seed, different order
        let mut d = Batcher::new(&ds, 10, 8).unwrap();
        assert_ne!(d.next_batch()[1].1.as_i32().unwrap(), e0);
        // restoring on other data fails
        let ds2 = Dataset::from_bytes(&csv(-1, false, true, 0.5), rows.as_bytes()).unwrap();
        let mut e = Batcher::new(&ds2, 3, 7).unwrap();
        assert!(e.restore(&st).is_err());
    }

    #[test]
    fn text_bytes_and_chars() {
        let text = "hello world, hello bmc! ".repeat(10);
        let spec = DataSpec::Text { path: "t.txt".into(), ctx: 8, tokenizer: Tokenizer::Chars, split: 0.9 };
        let ds = Dataset::from_bytes(&spec, text.as_bytes()).unwrap();
        let codec = ds.codec().unwrap().clone();
        let TextCodec::Chars(chars) = &codec else { panic!() };
        assert_eq!(chars.iter().collect::<String>(), " !,bcdehlmorw");
        assert_eq!(ds.vocab_size(), Some(13));
        assert_eq!(ds.names_and_shapes()[0], ("tokens".into(), DType::I32, vec![8]));
        let meta: BTreeMap<String, String> = codec.to_metadata().into_iter().collect();
        assert_eq!(TextCodec::from_metadata(&meta).unwrap(), Some(codec.clone()));
        let mut b = Batcher::new(&ds, 4, 1).unwrap();
        for _ in 0..20 {
            let bt = b.next_batch();
            let x = bt[0].1.as_i32().unwrap();
            let y = bt[1].1.as_i32().unwrap();
            assert_eq!(x.len(), 32);
            for r in 0..4 {
                assert_eq!(&x[r * 8 + 1..r * 8 + 8], &y[r * 8..r * 8 + 7]);
                // a window is a substring of the training text
                let s = codec.decode(&x[r * 8..r * 8 + 8]);
                let full: String = codec.decode(&y[r * 8..r * 8 + 8]);
                assert!(text[..ds.train_len()].contains(&s), "{s:?}");
                assert!(text[..ds.train_len()].contains(&full));
            }
        }
        let st = b.state();
        let next = b.next_batch();
        let mut c = Batcher::new(&ds, 4, 1).unwrap();
        c.restore(&st).unwrap();
        assert_eq!(c.next_batch(), next);
        // eval: consecutive windows of the held-out tail, stride ctx
        assert_eq!(ds.eval_len(), 24);
        assert_eq!(ds.eval_batch_count(2, 10), 1); // (24-1)/8 = 2 windows -> 1 batch of 2
        let ev = ds.eval_batches(2, 10).unwrap();
        assert_eq!(ev.len(), 1);
        let x = ev[0][0].1.as_i32().unwrap();
        assert_eq!(codec.decode(x), text[216..232]);
        assert!(codec.encode("zz").unwrap_err().to_string().contains("vocabulary"));

        let spec = DataSpec::Text { path: "t.txt".into(), ctx: 4, tokenizer: Tokenizer::Bytes, split: 1.0 };
        let ds = Dataset::from_bytes(&spec, b"\xff\x00abcdef").unwrap();
        assert_eq!(ds.vocab_size(), Some(256));
        assert!(!ds.has_eval());
        let spec = DataSpec::Text { path: "t.txt".into(), ctx: 4, tokenizer: Tokenizer::Chars, split: 1.0 };
        assert!(err(&spec, b"\xff\x00abcdef").contains("UTF-8"));
        assert!(err(&spec, b"abc").contains("fewer than one window"));
        assert!(err(&spec, b"").contains("empty"));
    }

    #[test]
    fn tokens_file() {
        let toks: Vec<u16> = (0..100).map(|i| (i * 7 % 50) as u16).collect();
        let bytes: Vec<u8> = toks.iter().flat_map(|t| t.to_le_bytes()).collect();
        let spec = DataSpec::Tokens { path: "t.bin".into(), ctx: 5, split: 0.9 };
        let ds = Dataset::from_bytes(&spec, &bytes).unwrap();
        assert_eq!(ds.len(), 100);
        assert_eq!(ds.train_len(), 90);
        assert_eq!(ds.vocab_size(), Some(50));
        assert!(ds.codec().is_none());
        let ev = ds.eval_batches(1, 5).unwrap();
        assert_eq!(ev.len(), 1); // (10-1)/5 = 1 window
        assert_eq!(ev[0][0].1, TensorData::I32(toks[90..95].iter().map(|&t| t as i32).collect()));
        assert_eq!(ev[0][1].1, TensorData::I32(toks[91..96].iter().map(|&t| t as i32).collect()));
        assert!(err(&spec, &bytes[..5]).contains("odd"));
        assert_eq!(ds.steps_per_epoch(2), 9);
    }

    #[test]
    fn safetensors_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.safetensors");
        let img: Vec<f32> = (0..4 * 2 * 3).map(|i| i as f32).collect();
        crate::checkpoint::save_atomic(
            &path,
            &[("image".into(), vec![4, 2, 3], TensorData::F32(img.clone())), ("label".into(), vec![4], TensorData::I32(vec![9, 8, 7, 6]))],
            &BTreeMap::new(),
        )
        .unwrap();
        let spec = DataSpec::Safetensors { path: path.to_string_lossy().into(), split: 0.5, shuffle: false };
        let ds = Dataset::load(&spec).unwrap();
        assert_eq!(ds.names_and_shapes(), vec![("image".into(), DType::F32, vec![2, 3]), ("label".into(), DType::I32, vec![])]);
        let mut b = Batcher::new(&ds, 3, 0).unwrap();
        let bt = b.next_batch();
        assert_eq!(bt[1].1, TensorData::I32(vec![9, 8, 9]));
        assert_eq!(bt[0].1.as_f32().unwrap()[6..12], img[6..12]);
        assert_eq!(bt[0].1.as_f32().unwrap()[12..18], img[0..6]);
        let ev = ds.eval_batches(4, 3).unwrap();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0][1].1, TensorData::I32(vec![7, 6, 7, 6]));

        crate::checkpoint::save_atomic(
            &path,
            &[("a".into(), vec![4, 2], TensorData::F32(vec![0.0; 8])), ("b".into(), vec![3], TensorData::I32(vec![0; 3]))],
            &BTreeMap::new(),
        )
        .unwrap();
        let e = Dataset::load(&spec).unwrap_err().to_string();
        assert!(e.contains("disagree") && e.contains("`a` has 4") && e.contains("`b` has 3"), "{e}");
        crate::checkpoint::save_atomic(&path, &[("s".into(), vec![], TensorData::F32(vec![1.0]))], &BTreeMap::new()).unwrap();
        assert!(Dataset::load(&spec).unwrap_err().to_string().contains("scalar"));
        let missing = DataSpec::Csv {
            path: dir.path().join("nope.csv").to_string_lossy().into(),
            label: -1,
            header: true,
            scale: 1.0,
            split: 0.9,
            shuffle: true,
        };
        assert!(Dataset::load(&missing).unwrap_err().to_string().contains("does not exist"));
    }

    #[test]
    fn spec_serde_round_trip() {
        let mut s = DataSpec::Text { path: "a.txt".into(), ctx: 64, tokenizer: Tokenizer::Chars, split: 0.9 };
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<DataSpec>(&j).unwrap(), s);
        s.set_path("b.txt");
        assert_eq!(s.path(), "b.txt");
        assert_eq!(s.kind(), "text");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn fuzz_sources_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200),
                                    label in -4i64..4, header: bool, ctx in 1usize..8,
                                    split in 0.0f64..1.2, batch in 1usize..5) {
            let specs = [
                DataSpec::Csv { path: "f.csv".into(), label, header, scale: 2.0, split, shuffle: true },
                DataSpec::Safetensors { path: "f.st".into(), split, shuffle: true },
                DataSpec::Text { path: "f.txt".into(), ctx, tokenizer: Tokenizer::Chars, split },
                DataSpec::Text { path: "f.txt".into(), ctx, tokenizer: Tokenizer::Bytes, split },
                DataSpec::Tokens { path: "f.bin".into(), ctx, split },
            ];
            for spec in &specs {
                if let Ok(ds) = Dataset::from_bytes(spec, &bytes) {
                    let mut b = Batcher::new(&ds, batch, 3).unwrap();
                    for _ in 0..3 { b.next_batch(); }
                    let _ = ds.eval_batches(batch, 3);
                } else if let Err(e) = Dataset::from_bytes(spec, &bytes) {
                    prop_assert!(matches!(e, Error::User(_)));
                }
            }
        }

        #[test]
        fn fuzz_csv_like_text(rows in proptest::collection::vec(
                proptest::collection::vec(prop_oneof!["-?[0-9]{1,3}", "[0-9]\\.[0-9]", "x", ""], 1..4), 0..6),
                batch in 1usize..4) {
            let text: String = rows.iter().map(|r| r.join(",") + "\n").collect();
            let spec = DataSpec::Csv { path: "f.csv".into(), label: -1, header: false, scale: 1.0, split: 0.5, shuffle: true };
            if let Ok(ds) = Dataset::from_bytes(&spec, text.as_bytes()) {
                let mut b = Batcher::new(&ds, batch, 0).unwrap();
                let bt = b.next_batch();
                let f = ds.names_and_shapes()[0].2[0];
                prop_assert_eq!(bt[0].1.len(), batch * f);
                prop_assert_eq!(bt[1].1.len(), batch);
            }
        }
    }
}
