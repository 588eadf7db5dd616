//! What a training binary carries: the kernel IR program, the train settings, and the
//! model's sources (so it can re-specialise for another batch size), appended to the
//! executable as a payload with a trailer.
//!
//! Layout of a training binary: `[executable bytes][payload JSON][u64 LE payload length][MAGIC]`.

use crate::data::DataSpec;
use crate::error::{Error, Result};
use crate::kir::Program;
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const MAGIC: &[u8; 8] = b"BMCPAYL1";

/// The `train` section, resolved.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub data: Option<DataSpec>,
    pub batch: usize,
    /// Steps to train; `epochs` (if set) wins and is converted with the data's size.
    pub steps: u64,
    pub epochs: Option<u64>,
    /// Evaluate every this many steps (0 = steps / 10).
    pub eval_every: u64,
    pub eval_batches: usize,
    /// Checkpoint every this many steps (0 = at the end only).
    pub checkpoint_every: u64,
    pub seed: u64,
    pub precision: String,
    pub device: String,
    /// The loss is a cross-entropy: evaluation reports accuracy.
    pub classification: bool,
    /// The data input holding the cross-entropy's class labels, when it is one: every
    /// label must index the logits (checked when data is loaded).
    #[serde(default)]
    pub labels: Option<Labels>,
    /// Human-readable settings for `info` and checkpoint metadata (optimizer, schedule, ...).
    pub summary: Vec<(String, String)>,
}

/// A classifier's label input: its name, the logits' class count and the ignored label.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Labels {
    pub input: String,
    pub classes: usize,
    pub ignore_index: i64,
}

impl Labels {
    /// A user error when the data holds a label outside `0..classes`.
    pub fn check(&self, ds: &crate::data::Dataset) -> crate::error::Result<()> {
        match ds.label_out_of_range(&self.input, self.classes, self.ignore_index) {
            None => Ok(()),
            Some(bad) => Err(crate::error::Error::user(self.message(ds.spec().path(), ds.is_stream(), bad))),
        }
    }

    /// What is wrong, where, and how to fix it, for `(example, label, largest label)`.
    pub fn message(&self, path: &str, stream: bool, (at, v, max): (usize, i64, i64)) -> String {
        let place = if stream { format!("token {at}") } else { format!("example {at}, counting from 0") };
        let valid = match self.classes {
            0 => "its logits have no classes".to_string(),
            c => format!("labels must be 0..={} (or the ignore_index {})", c - 1, self.ignore_index),
        };
        format!(
            "the data `{path}` has label {v} in `{}` ({place}), but the model's cross_entropy has {} classes: {valid}; the data's labels go up to {max}, so give the classifier {} outputs, or fix the data",
            self.input,
            self.classes,
            max.max(0) + 1
        )
    }
}

/// The model's source files, for re-specialisation inside the binary.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sources {
    /// Path of the main `.bm` file as given at compile time.
    pub main: String,
    /// Every file the model reads (main and imports): path and text.
    pub files: Vec<(String, String)>,
    /// `--set` overrides given at compile time.
    pub overrides: Vec<(String, String)>,
    /// Per-example shapes of the data tensors, as checked at compile time.
    pub data_shapes: Vec<(String, crate::kir::DType, Vec<usize>)>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Bundle {
    pub model: String,
    pub program: Program,
    pub train: TrainConfig,
    pub sources: Sources,
    /// The `info` report.
    pub info: String,
    /// Config constants after overrides (checkpoint metadata).
    pub config: Vec<(String, String)>,
}

impl Bundle {
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(|e| Error::internal(format!("cannot serialise the program: {e}")))
    }

    pub fn from_bytes(b: &[u8]) -> Result<Bundle> {
        // Fused loop bodies nest deeper than serde_json's default limit of 128 (W3's
        // AdamW update does); the compiler built them, so their depth is bounded.
        let corrupt = |e: serde_json::Error| Error::internal(format!("the embedded program is corrupt: {e}"));
        let mut de = serde_json::Deserializer::from_slice(b);
        de.disable_recursion_limit();
        let bundle = <Bundle as serde::Deserialize>::deserialize(&mut de).map_err(corrupt)?;
        de.end().map_err(corrupt)?;
        Ok(bundle)
    }

    /// Writes `exe` (the runtime executable) with this bundle appended to `out`,
    /// executable, atomically.
    pub fn write_binary(&self, exe: &[u8], out: &Path) -> Result<()> {
        let payload = self.to_bytes()?;
        let mut bytes = Vec::with_capacity(exe.len() + payload.len() + 16);
        bytes.extend_from_slice(exe);
        bytes.extend_from_slice(&payload);
        bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        bytes.extend_from_slice(MAGIC);
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::user(format!("cannot create `{}`: {e}", dir.display())))?;
        }
        crate::checkpoint::write_atomic(out, &bytes)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| Error::user(format!("cannot make `{}` executable: {e}", out.display())))?;
        }
        Ok(())
    }
}

/// Splits an executable into (runtime bytes, payload) if it carries one.
pub fn split_payload(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let n = bytes.len();
    if n < 16 || &bytes[n - 8..] != MAGIC {
        return None;
    }
    let len = u64::from_le_bytes(bytes[n - 16..n - 8].try_into().ok()?) as usize;
    let start = (n - 16).checked_sub(len)?;
    Some((&bytes[..start], &bytes[start..n - 16]))
}

/// The payload of the running executable, if it is a training binary (`None`: it is
/// plain `bmc`; `Some(Err)`: it carries a payload that cannot be read).
pub fn own_payload() -> Option<Result<Bundle>> {
    let exe = std::env::current_exe().ok()?;
    let bytes = std::fs::read(exe).ok()?;
    let (_, payload) = split_payload(&bytes)?;
    Some(Bundle::from_bytes(payload))
}

/// The bytes of the running executable without any payload (the runtime that
/// `bmc compile` copies into each training binary).
pub fn own_runtime() -> Result<Vec<u8>> {
    let exe = std::env::current_exe().map_err(|e| Error::internal(format!("cannot find the bmc executable: {e}")))?;
    let bytes = std::fs::read(&exe).map_err(|e| Error::internal(format!("cannot read `{}`: {e}", exe.display())))?;
    Ok(match split_payload(&bytes) {
        Some((rt, _)) => rt.to_vec(),
        None => bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trips() {
        let exe = b"\x7fELF fake runtime".to_vec();
        let mut bytes = exe.clone();
        let payload = b"{\"x\":1}".to_vec();
        bytes.extend_from_slice(&payload);
        bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        bytes.extend_from_slice(MAGIC);
        let (rt, p) = split_payload(&bytes).unwrap();
        assert_eq!(rt, &exe[..]);
        assert_eq!(p, &payload[..]);
        assert!(split_payload(&exe).is_none());
        // A corrupt length never reads out of bounds.
        let mut bad = bytes.clone();
        let n = bad.len();
        bad[n - 16..n - 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(split_payload(&bad).is_none());
    }
}
