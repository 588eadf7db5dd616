//! Safetensors files: atomic checkpoint writes and tolerant, never-panicking reads.
//!
//! Writing ([`save_atomic`]) stores `F32` and `I32` tensors plus string metadata in a temp
//! file next to the target (`.<name>.tmp.<pid>`), fsyncs it, renames it over the target
//! and fsyncs the directory: a run killed at any moment leaves the file whole or absent.
//!
//! Reading ([`load`], [`load_file`], [`parse`]) accepts `F32`, `F16`, `BF16`, `F64` and
//! `U8` (converted to f32) and `I32`, `I64` (range-checked to i32). Every problem is an
//! [`Error::User`] naming the file: missing, unreadable, truncated, corrupt header,
//! unsupported dtype. Files written by `safetensors.torch.save_file` load the same way.

use crate::data::TensorData;
use crate::error::{Error, Result};
use crate::kir::DType;
use safetensors::{Dtype, SafeTensorError, SafeTensors, View};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// One tensor read from a file.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: TensorData,
    /// The dtype as stored in the file (`"F32"`, `"BF16"`, `"I64"`, …).
    pub stored_dtype: String,
}

/// A safetensors file read into memory.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub path: PathBuf,
    /// What the file is called in messages: `"checkpoint"`, `"data file"`, …
    pub what: String,
    pub tensors: BTreeMap<String, Tensor>,
    /// The `__metadata__` strings (empty when the file has none).
    pub metadata: BTreeMap<String, String>,
}

impl Checkpoint {
    fn file(&self) -> String {
        format!("{} `{}`", self.what, self.path.display())
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// The tensor `name`, which must have exactly `shape` and `dtype`; errors read
    /// "checkpoint `x.safetensors` has no tensor `fc1.weight`" and
    /// "tensor `fc1.weight` in `x.safetensors` has shape [10, 64], the model needs [64, 10]".
    pub fn expect_tensor(&self, name: &str, shape: &[usize], dtype: DType) -> Result<&TensorData> {
        let Some(t) = self.tensors.get(name) else {
            let mut msg = format!("{} has no tensor `{name}`", self.file());
            if let Some(s) = similar_name(name, self.tensors.keys()) {
                msg.push_str(&format!(" (it has `{s}`)"));
            } else if self.tensors.is_empty() {
                msg.push_str(" (it holds no tensors)");
            }
            return Err(Error::user(msg));
        };
        if t.shape != shape {
            return Err(Error::user(format!(
                "tensor `{name}` in `{}` has shape {:?}, the model needs {:?}",
                self.path.display(),
                t.shape,
                shape
            )));
        }
        if t.data.dtype() != dtype {
            return Err(Error::user(format!(
                "tensor `{name}` in `{}` has dtype {} (stored as {}), the model needs {}",
                self.path.display(),
                t.data.dtype().name(),
                t.stored_dtype,
                dtype.name()
            )));
        }
        Ok(&t.data)
    }

    /// The metadata value `key`, or an error naming the file.
    pub fn expect_metadata(&self, key: &str) -> Result<&str> {
        self.metadata.get(key).map(|s| s.as_str()).ok_or_else(|| Error::user(format!("{} has no metadata entry `{key}`", self.file())))
    }
}

/// A name among `names` that differs from `name` only by case or a separator, or that
/// ends with it (e.g. a `model.` prefix), to suggest in a message.
fn similar_name<'a>(name: &str, names: impl Iterator<Item = &'a String>) -> Option<&'a String> {
    let norm = |s: &str| s.to_ascii_lowercase().replace(['_', '-'], ".");
    let n = norm(name);
    names.into_iter().find(|k| norm(k) == n || k.ends_with(&format!(".{name}")))
}

struct Raw<'a> {
    dtype: Dtype,
    shape: &'a [usize],
    bytes: Cow<'a, [u8]>,
}

impl View for &Raw<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn f32_bytes(v: &[f32]) -> Cow<'_, [u8]> {
    #[cfg(target_endian = "little")]
    {
        // SAFETY: f32 has no padding or invalid bit patterns, u8 has alignment 1, and
        // the length in bytes is exactly 4 * v.len().
        Cow::Borrowed(unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 4) })
    }
    #[cfg(not(target_endian = "little"))]
    {
        Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
}

fn i32_bytes(v: &[i32]) -> Cow<'_, [u8]> {
    #[cfg(target_endian = "little")]
    {
        // SAFETY: as in f32_bytes.
        Cow::Borrowed(unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 4) })
    }
    #[cfg(not(target_endian = "little"))]
    {
        Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
}

/// The bytes of a safetensors file holding `tensors` and `metadata`.
pub fn serialize(tensors: &[(String, Vec<usize>, TensorData)], metadata: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    let mut seen = HashSet::new();
    let mut raws = Vec::with_capacity(tensors.len());
    for (name, shape, data) in tensors {
        if !seen.insert(name.as_str()) {
            return Err(Error::internal(format!("checkpoint tensor `{name}` written twice")));
        }
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::internal(format!(
                "checkpoint tensor `{name}` has shape {shape:?} ({n} elements) but {} values",
                data.len()
            )));
        }
        let (dtype, bytes) = match data {
            TensorData::F32(v) => (Dtype::F32, f32_bytes(v)),
            TensorData::I32(v) => (Dtype::I32, i32_bytes(v)),
        };
        raws.push((name.clone(), Raw { dtype, shape, bytes }));
    }
    let bytes = safetensors::serialize(raws.iter().map(|(n, r)| (n.as_str(), r)), None::<HashMap<String, String>>)
        .map_err(|e| Error::internal(format!("serialising a checkpoint: {e}")))?;
    if metadata.is_empty() {
        return Ok(bytes);
    }
    // safetensors takes the metadata as a HashMap and writes it in that map's (random)
    // order; add it here in sorted order so that equal checkpoints are equal bytes.
    let bad = |e: serde_json::Error| Error::internal(format!("serialising a checkpoint header: {e}"));
    let n = u64::from_le_bytes(bytes[..8].try_into().map_err(|_| Error::internal("short safetensors buffer"))?) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n]).map_err(bad)?;
    header.insert("__metadata__".into(), serde_json::to_value(metadata).map_err(bad)?);
    let mut head = serde_json::to_vec(&header).map_err(bad)?;
    // Keep the data 8-byte aligned, as safetensors does (padding with spaces).
    head.resize(head.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + head.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(head.len() as u64).to_le_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(&bytes[8 + n..]);
    Ok(out)
}

/// Writes `bytes` to `path` atomically: temp file in the same directory, fsync, rename,
/// fsync of the directory. Errors name `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |what: &str, e: std::io::Error| Error::user(format!("cannot {what} `{}`: {e}", path.display()));
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let fname = path.file_name().ok_or_else(|| Error::user(format!("`{}` is not a file path", path.display())))?;
    let tmp = dir.join(format!(".{}.tmp.{}", fname.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp).map_err(|e| io("create a temporary file for", e))?;
        f.write_all(bytes).map_err(|e| io("write", e))?;
        f.sync_all().map_err(|e| io("sync", e))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| io("rename the temporary file onto", e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return result;
    }
    // Make the rename durable. Opening a directory for reading works on Unix; elsewhere
    // this is best effort.
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Writes a safetensors file atomically (see [`write_atomic`]).
pub fn save_atomic(path: &Path, tensors: &[(String, Vec<usize>, TensorData)], metadata: &BTreeMap<String, String>) -> Result<()> {
    let bytes = serialize(tensors, metadata)?;
    write_atomic(path, &bytes)
}

/// Reads a checkpoint (messages call it "checkpoint `path`").
pub fn load(path: &Path) -> Result<Checkpoint> {
    load_file(path, "checkpoint")
}

/// Reads any safetensors file; `what` names it in messages ("data file", "inputs file").
pub fn load_file(path: &Path, what: &str) -> Result<Checkpoint> {
    let bytes = std::fs::read(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::user(format!("{what} `{}` does not exist", path.display()))
        } else {
            Error::user(format!("cannot read {what} `{}`: {e}", path.display()))
        }
    })?;
    parse(&bytes, path, what)
}

/// Why a byte buffer is not a valid safetensors file, in words.
fn describe(bytes: &[u8], e: &SafeTensorError) -> String {
    use SafeTensorError::*;
    let len = bytes.len();
    match e {
        HeaderTooSmall => {
            format!("it is truncated: {len} bytes, shorter than the 8-byte header length")
        }
        InvalidHeaderLength => {
            let n = u64::from_le_bytes(bytes.get(..8).and_then(|b| b.try_into().ok()).unwrap_or([0; 8]));
            format!(
                "it is truncated or not a safetensors file: the header says {n} bytes of JSON follow, the file has {} after the length",
                len.saturating_sub(8)
            )
        }
        HeaderTooLarge => "its header length is implausibly large (not a safetensors file?)".into(),
        InvalidHeader(_) => "its header is not valid UTF-8 (not a safetensors file?)".into(),
        InvalidHeaderDeserialization(e) | JsonError(e) => {
            format!("its JSON header is invalid: {e}")
        }
        MetadataIncompleteBuffer => {
            let n = u64::from_le_bytes(bytes.get(..8).and_then(|b| b.try_into().ok()).unwrap_or([0; 8])) as usize;
            match n.checked_add(8).and_then(|e| bytes.get(8..e)).and_then(declared_data_end) {
                Some(end) if end.saturating_add(8 + n) > len => {
                    format!("it is truncated: its tensors need {} bytes of data, only {} are there", end, len.saturating_sub(8 + n))
                }
                Some(end) => {
                    format!("it has {} bytes of unexpected data after its {} bytes of tensors", len.saturating_sub(8 + n + end), end)
                }
                None => "its tensor data does not match the file size".into(),
            }
        }
        TensorNotFound(n) => format!("tensor `{n}` not found"),
        TensorInvalidInfo => "a tensor's shape and dtype do not match its data offsets".into(),
        InvalidOffset(n) => format!("tensor `{n}` has invalid data offsets"),
        ValidationOverflow => "a tensor's shape is too large".into(),
        MisalignedSlice => "a tensor's size is not a whole number of bytes".into(),
        other => other.to_string(),
    }
}

fn declared_data_end(header: &[u8]) -> Option<usize> {
    let v: serde_json::Value = serde_json::from_slice(header).ok()?;
    let mut end = 0usize;
    for (k, t) in v.as_object()? {
        if k == "__metadata__" {
            continue;
        }
        let e = t.get("data_offsets")?.get(1)?.as_u64()?;
        end = end.max(usize::try_from(e).ok()?);
    }
    Some(end)
}

/// Parses safetensors bytes (never panics); `path` and `what` name the file in messages.
pub fn parse(bytes: &[u8], path: &Path, what: &str) -> Result<Checkpoint> {
    let file = format!("{what} `{}`", path.display());
    let bad = |e: SafeTensorError| Error::user(format!("{file} is not a valid safetensors file: {}", describe(bytes, &e)));
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(bad)?;
    let st = SafeTensors::deserialize(bytes).map_err(bad)?;
    let metadata: BTreeMap<String, String> =
        meta.metadata().as_ref().map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default();
    let mut tensors = BTreeMap::new();
    for (name, view) in st.iter() {
        let shape = view.shape().to_vec();
        let data = convert(view.dtype(), view.data()).map_err(|why| Error::user(format!("tensor `{name}` in {file} {why}")))?;
        tensors.insert(name.to_string(), Tensor { shape, data, stored_dtype: format!("{:?}", view.dtype()) });
    }
    Ok(Checkpoint { path: path.to_path_buf(), what: what.to_string(), tensors, metadata })
}

/// Converts raw little-endian tensor bytes; the error completes "tensor `x` in file …".
fn convert(dtype: Dtype, b: &[u8]) -> std::result::Result<TensorData, String> {
    fn words<const N: usize>(b: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
        b.chunks_exact(N).map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            a
        })
    }
    Ok(match dtype {
        Dtype::F32 => TensorData::F32(words::<4>(b).map(f32::from_le_bytes).collect()),
        Dtype::F16 => TensorData::F32(words::<2>(b).map(|w| half::f16::from_le_bytes(w).to_f32()).collect()),
        Dtype::BF16 => TensorData::F32(words::<2>(b).map(|w| half::bf16::from_le_bytes(w).to_f32()).collect()),
        Dtype::F64 => TensorData::F32(words::<8>(b).map(|w| f64::from_le_bytes(w) as f32).collect()),
        Dtype::U8 => TensorData::F32(b.iter().map(|&x| x as f32).collect()),
        Dtype::I32 => TensorData::I32(words::<4>(b).map(i32::from_le_bytes).collect()),
        Dtype::I64 => {
            let mut out = Vec::with_capacity(b.len() / 8);
            for (i, w) in words::<8>(b).enumerate() {
                let x = i64::from_le_bytes(w);
                let y = i32::try_from(x).map_err(|_| format!("has value {x} at flat index {i}, which does not fit in i32"))?;
                out.push(y);
            }
            TensorData::I32(out)
        }
        other => {
            return Err(format!("has dtype {other:?}; supported are F32, F16, BF16, F64, U8 (read as f32) and I32, I64 (read as i32)"));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type Named = Vec<(String, Vec<usize>, TensorData)>;

    fn sample() -> (Named, BTreeMap<String, String>) {
        let tensors = vec![
            ("fc1.weight".to_string(), vec![2, 3], TensorData::F32(vec![1.0, -2.0, 3.5, 0.0, f32::MIN_POSITIVE, 7.0])),
            ("fc1.bias".to_string(), vec![2], TensorData::F32(vec![0.5, -0.5])),
            ("step".to_string(), vec![], TensorData::I32(vec![42])),
            ("ids".to_string(), vec![3], TensorData::I32(vec![-1, 0, i32::MAX])),
        ];
        let mut meta = BTreeMap::new();
        meta.insert("step".to_string(), "42".to_string());
        meta.insert("vocab".to_string(), "\n !abc\"{}".to_string());
        (tensors, meta)
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("step-42.safetensors");
        let (tensors, meta) = sample();
        save_atomic(&path, &tensors, &meta).unwrap();
        // no temp files left behind
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let ck = load(&path).unwrap();
        assert_eq!(ck.metadata, meta);
        assert_eq!(ck.tensors.len(), tensors.len());
        for (name, shape, data) in &tensors {
            let got = ck.expect_tensor(name, shape, data.dtype()).unwrap();
            assert_eq!(got, data);
        }
        // overwrite in place
        save_atomic(&path, &tensors[..1], &BTreeMap::new()).unwrap();
        let ck = load(&path).unwrap();
        assert_eq!(ck.tensors.len(), 1);
        assert!(ck.metadata.is_empty());
    }

    #[test]
    fn expect_tensor_messages() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let (tensors, meta) = sample();
        save_atomic(&path, &tensors, &meta).unwrap();
        let ck = load(&path).unwrap();
        let e = ck.expect_tensor("fc2.weight", &[2, 3], DType::F32).unwrap_err().to_string();
        assert!(e.contains("has no tensor `fc2.weight`") && e.contains("x.safetensors"), "{e}");
        let e = ck.expect_tensor("fc1.weight", &[3, 2], DType::F32).unwrap_err().to_string();
        assert!(e.contains("has shape [2, 3], the model needs [3, 2]"), "{e}");
        let e = ck.expect_tensor("ids", &[3], DType::F32).unwrap_err().to_string();
        assert!(e.contains("dtype i32"), "{e}");
        let e = ck.expect_tensor("FC1_weight", &[3, 2], DType::F32).unwrap_err().to_string();
        assert!(e.contains("(it has `fc1.weight`)"), "{e}");
        assert!(ck.expect_metadata("nope").is_err());
        assert_eq!(ck.expect_metadata("step").unwrap(), "42");
    }

    #[test]
    fn missing_truncated_and_garbage_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gone.safetensors");
        let e = load(&path).unwrap_err();
        assert!(matches!(e, Error::User(_)));
        assert!(e.to_string().contains("does not exist"), "{e}");

        let (tensors, meta) = sample();
        let bytes = serialize(&tensors, &meta).unwrap();
        let e = parse(&bytes[..bytes.len() - 3], &path, "checkpoint").unwrap_err().to_string();
        assert!(e.contains("truncated") && e.contains("gone.safetensors"), "{e}");
        let e = parse(&bytes[..20], &path, "checkpoint").unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        let e = parse(&bytes[..5], &path, "checkpoint").unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        let mut extra = bytes.clone();
        extra.extend_from_slice(b"junk");
        let e = parse(&extra, &path, "checkpoint").unwrap_err().to_string();
        assert!(e.contains("unexpected data"), "{e}");
        let e = parse(b"hello world, this is not a tensor file", &path, "checkpoint").unwrap_err();
        assert!(matches!(e, Error::User(_)));
    }

    #[test]
    fn converts_other_dtypes() {
        let header = serde_json::json!({
            "h": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]},
            "b": {"dtype": "BF16", "shape": [1], "data_offsets": [4, 6]},
            "u": {"dtype": "U8", "shape": [2], "data_offsets": [6, 8]},
            "l": {"dtype": "I64", "shape": [1], "data_offsets": [8, 16]},
            "d": {"dtype": "F64", "shape": [1], "data_offsets": [16, 24]},
        });
        let mut data = Vec::new();
        data.extend(half::f16::from_f32(1.5).to_le_bytes());
        data.extend(half::f16::from_f32(-2.0).to_le_bytes());
        data.extend(half::bf16::from_f32(3.0).to_le_bytes());
        data.extend([7u8, 255]);
        data.extend((-5i64).to_le_bytes());
        data.extend(0.25f64.to_le_bytes());
        let bytes = with_header(&header, &data);
        let ck = parse(&bytes, Path::new("t.safetensors"), "checkpoint").unwrap();
        assert_eq!(ck.tensors["h"].data, TensorData::F32(vec![1.5, -2.0]));
        assert_eq!(ck.tensors["h"].stored_dtype, "F16");
        assert_eq!(ck.tensors["b"].data, TensorData::F32(vec![3.0]));
        assert_eq!(ck.tensors["u"].data, TensorData::F32(vec![7.0, 255.0]));
        assert_eq!(ck.tensors["l"].data, TensorData::I32(vec![-5]));
        assert_eq!(ck.tensors["d"].data, TensorData::F32(vec![0.25]));

        let header = serde_json::json!({"l": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}});
        let bytes = with_header(&header, &(1i64 << 40).to_le_bytes());
        let e = parse(&bytes, Path::new("t.safetensors"), "checkpoint").unwrap_err().to_string();
        assert!(e.contains("does not fit in i32"), "{e}");
        let header = serde_json::json!({"l": {"dtype": "BOOL", "shape": [1], "data_offsets": [0, 1]}});
        let bytes = with_header(&header, &[1]);
        let e = parse(&bytes, Path::new("t.safetensors"), "checkpoint").unwrap_err().to_string();
        assert!(e.contains("dtype BOOL"), "{e}");
    }

    pub(crate) fn with_header(header: &serde_json::Value, data: &[u8]) -> Vec<u8> {
        let h = serde_json::to_vec(header).unwrap();
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend(h);
        out.extend(data);
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse(&bytes, Path::new("r.safetensors"), "checkpoint");
        }

        #[test]
        fn truncations_and_flips_never_panic(cut in 0usize..400, flip in 0usize..400, bit in 0u8..8) {
            let (tensors, meta) = sample();
            let mut bytes = serialize(&tensors, &meta).unwrap();
            if flip < bytes.len() {
                bytes[flip] ^= 1u8 << bit;
            }
            let cut = cut.min(bytes.len());
            let flipped = flip < bytes.len();
            let r = parse(&bytes[..cut], Path::new("r.safetensors"), "checkpoint");
            if cut < bytes.len() && !flipped {
                prop_assert!(matches!(r, Err(Error::User(_))));
            }
        }

        #[test]
        fn random_headers_never_panic(shape in proptest::collection::vec(0usize..1usize << 40, 0..4),
                                      end in 0u64..64, dt in 0usize..6, len in 0usize..64) {
            let dts = ["F32", "I64", "U8", "BF16", "F64", "C64"];
            let header = serde_json::json!({"t": {"dtype": dts[dt], "shape": shape, "data_offsets": [0, end]}});
            let bytes = with_header(&header, &vec![0u8; len]);
            let _ = parse(&bytes, Path::new("r.safetensors"), "checkpoint");
        }
    }
}
