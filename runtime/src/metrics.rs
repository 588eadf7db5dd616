//! What a run logs into its output directory:
//!
//! - `metrics.jsonl`: one JSON object per logged step, keys in this order: `step`, `loss`,
//!   `lr`, `grad_norm`, `throughput`, `elapsed_s`, and on evaluation steps `eval_loss` and
//!   (classification) `eval_accuracy`. Non-finite numbers are written as `null`. The file
//!   is appended to (a resumed run in the same directory continues it) and flushed after
//!   each line.
//! - `events.out.tfevents.<unix seconds>.<host>`: a TensorBoard event file (TFRecord
//!   framing with masked CRC32C; first record `file_version = "brain.Event:2"`, then one
//!   Event per logged step whose Summary has one simple_value per scalar, tagged with the
//!   same names as the JSON keys). A new file per writer, as TensorBoard expects.
//! - `loss.svg`: a self-contained line chart of train loss (and eval loss) against step,
//!   rewritten by [`MetricsWriter::write_svg`] (at each checkpoint and at the end).

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The scalars of one logged step.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Examples or tokens per second.
    pub throughput: f64,
    pub elapsed_s: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_accuracy: Option<f64>,
}

impl StepMetrics {
    /// (tag, value) pairs in JSON key order, eval values only when present.
    pub fn scalars(&self) -> Vec<(&'static str, f64)> {
        let mut v = vec![
            ("loss", self.loss),
            ("lr", self.lr),
            ("grad_norm", self.grad_norm),
            ("throughput", self.throughput),
            ("elapsed_s", self.elapsed_s),
        ];
        if let Some(x) = self.eval_loss {
            v.push(("eval_loss", x));
        }
        if let Some(x) = self.eval_accuracy {
            v.push(("eval_accuracy", x));
        }
        v
    }
}

/// Writes `metrics.jsonl`, a TensorBoard event file and `loss.svg` into a run directory.
pub struct MetricsWriter {
    dir: PathBuf,
    jsonl: File,
    events: File,
    events_path: PathBuf,
    train: Vec<(u64, f64)>,
    eval: Vec<(u64, f64)>,
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::user(format!("cannot {what} `{}`: {e}", path.display()))
}

fn hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .unwrap_or_default();
    let h: String = raw.trim().chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')).collect();
    if h.is_empty() { "localhost".into() } else { h }
}

fn now_s() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

impl MetricsWriter {
    /// Opens the writers in `dir` (created if needed). An existing `metrics.jsonl` is
    /// appended to and its losses seed the chart.
    pub fn create(dir: &Path) -> Result<MetricsWriter> {
        std::fs::create_dir_all(dir).map_err(|e| io_err("create the output directory", dir, e))?;
        let jpath = dir.join("metrics.jsonl");
        let (mut train, mut eval) = (Vec::new(), Vec::new());
        if let Ok(f) = File::open(&jpath) {
            for line in BufReader::new(f).lines().map_while(|l| l.ok()) {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                let Some(step) = v.get("step").and_then(|s| s.as_u64()) else {
                    continue;
                };
                if let Some(l) = v.get("loss").and_then(|x| x.as_f64()) {
                    train.push((step, l));
                }
                if let Some(l) = v.get("eval_loss").and_then(|x| x.as_f64()) {
                    eval.push((step, l));
                }
            }
        }
        let jsonl = OpenOptions::new().create(true).append(true).open(&jpath).map_err(|e| io_err("open", &jpath, e))?;
        let secs = now_s() as u64;
        let host = hostname();
        let mut events_path = dir.join(format!("events.out.tfevents.{secs}.{host}"));
        if events_path.exists() {
            events_path = dir.join(format!("events.out.tfevents.{secs}.{host}.{}", std::process::id()));
        }
        let events = File::create(&events_path).map_err(|e| io_err("create", &events_path, e))?;
        let mut w = MetricsWriter { dir: dir.to_path_buf(), jsonl, events, events_path, train, eval };
        let first = encode_event(now_s(), 0, Some("brain.Event:2"), &[]);
        w.write_record(&first)?;
        Ok(w)
    }

    pub fn jsonl_path(&self) -> PathBuf {
        self.dir.join("metrics.jsonl")
    }

    pub fn events_path(&self) -> &Path {
        &self.events_path
    }

    pub fn svg_path(&self) -> PathBuf {
        self.dir.join("loss.svg")
    }

    fn write_record(&mut self, data: &[u8]) -> Result<()> {
        let rec = tf_record(data);
        self.events.write_all(&rec).and_then(|_| self.events.flush()).map_err(|e| io_err("write", &self.events_path, e))
    }

    /// Appends one step to `metrics.jsonl` and the event file (both flushed).
    pub fn log(&mut self, m: &StepMetrics) -> Result<()> {
        let mut line = serde_json::to_string(m).map_err(|e| Error::internal(format!("metrics json: {e}")))?;
        line.push('\n');
        let jpath = self.jsonl_path();
        self.jsonl.write_all(line.as_bytes()).and_then(|_| self.jsonl.flush()).map_err(|e| io_err("write", &jpath, e))?;
        let ev = encode_event(now_s(), m.step as i64, None, &m.scalars());
        self.write_record(&ev)?;
        // A resumed run restarts from an earlier step: drop the abandoned future.
        self.train.retain(|&(s, _)| s < m.step);
        self.eval.retain(|&(s, _)| s < m.step);
        self.train.push((m.step, m.loss));
        if let Some(e) = m.eval_loss {
            self.eval.push((m.step, e));
        }
        Ok(())
    }

    /// Rewrites `loss.svg` (via a temp file and rename).
    pub fn write_svg(&self) -> Result<()> {
        let svg = render_svg(&self.train, &self.eval);
        let path = self.svg_path();
        let tmp = self.dir.join(format!(".loss.svg.tmp.{}", std::process::id()));
        std::fs::write(&tmp, svg).map_err(|e| io_err("write", &tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io_err("write", &path, e)
        })
    }
}

// ---------------------------------------------------------------- TFRecord / protobuf

const CRC32C_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// CRC-32C (Castagnoli), as TFRecord uses.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c = CRC32C_TABLE[((c ^ b as u32) & 0xFF) as usize] ^ (c >> 8);
    }
    !c
}

/// TFRecord's masked CRC.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let c = crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord: u64 length, masked crc of the length, data, masked crc of the data.
pub fn tf_record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(out: &mut Vec<u8>, field: u64, wire: u64) {
    varint(out, (field << 3) | wire);
}

fn bytes_field(out: &mut Vec<u8>, field: u64, b: &[u8]) {
    key(out, field, 2);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// A `tensorflow.Event`: wall_time (1, double), step (2, int64), file_version (3,
/// string) or summary (5) with one `Summary.Value { tag (1), simple_value (2, float) }`
/// per scalar.
pub fn encode_event(wall_time: f64, step: i64, file_version: Option<&str>, scalars: &[(&str, f64)]) -> Vec<u8> {
    let mut out = Vec::new();
    key(&mut out, 1, 1);
    out.extend_from_slice(&wall_time.to_le_bytes());
    if step != 0 {
        key(&mut out, 2, 0);
        varint(&mut out, step as u64);
    }
    if let Some(v) = file_version {
        bytes_field(&mut out, 3, v.as_bytes());
    }
    if !scalars.is_empty() {
        let mut summary = Vec::new();
        for (tag, v) in scalars {
            let mut value = Vec::new();
            bytes_field(&mut value, 1, tag.as_bytes());
            key(&mut value, 2, 5);
            value.extend_from_slice(&(*v as f32).to_le_bytes());
            bytes_field(&mut summary, 1, &value);
        }
        bytes_field(&mut out, 5, &summary);
    }
    out
}

// ---------------------------------------------------------------- SVG

/// A "nice" tick spacing for about `n` ticks over `range`.
fn nice_step(range: f64, n: f64) -> f64 {
    let raw = (range / n).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let nice = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

fn fmt_num(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 { 0 } else { (-step.log10().floor()) as usize };
    format!("{v:.decimals$}")
}

fn thin(points: &[(u64, f64)], max: usize) -> Vec<(u64, f64)> {
    let pts: Vec<(u64, f64)> = points.iter().copied().filter(|p| p.1.is_finite()).collect();
    if pts.len() <= max {
        return pts;
    }
    let k = pts.len().div_ceil(max);
    let mut out: Vec<(u64, f64)> = pts.iter().copied().step_by(k).collect();
    if out.last() != pts.last() {
        out.push(*pts.last().unwrap());
    }
    out
}

/// A self-contained SVG line chart of train loss (blue) and eval loss (orange) vs step.
pub fn render_svg(train: &[(u64, f64)], eval: &[(u64, f64)]) -> String {
    let (w, h) = (800.0, 480.0);
    let (ml, mr, mt, mb) = (70.0, 20.0, 40.0, 50.0);
    let (pw, ph) = (w - ml - mr, h - mt - mb);
    let train = thin(train, 2000);
    let eval = thin(eval, 2000);
    let all: Vec<(u64, f64)> = train.iter().chain(eval.iter()).copied().collect();
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{}" y="24" text-anchor="middle" font-size="15">Loss</text>"#, w / 2.0);
    let (x0, x1) = match (all.iter().map(|p| p.0).min(), all.iter().map(|p| p.0).max()) {
        (Some(a), Some(b)) if b > a => (a as f64, b as f64),
        (Some(a), _) => (a as f64, a as f64 + 1.0),
        _ => (0.0, 1.0),
    };
    let lo = all.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let hi = all.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let (mut y0, mut y1) = if lo.is_finite() && hi.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    if y1 - y0 < 1e-12 {
        let d = (y0.abs() * 0.1).max(0.5);
        y0 -= d;
        y1 += d;
    } else {
        let pad = (y1 - y0) * 0.05;
        y0 -= pad;
        y1 += pad;
    }
    let sx = |x: f64| ml + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| mt + ph - (y - y0) / (y1 - y0) * ph;
    // grid, ticks and labels
    let ystep = nice_step(y1 - y0, 6.0);
    let mut t = (y0 / ystep).ceil() * ystep;
    while t <= y1 + ystep * 1e-9 {
        let y = sy(t);
        let _ = writeln!(s, r##"<line x1="{ml}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e5e5e5"/>"##, ml + pw);
        let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#, ml - 6.0, y + 4.0, fmt_num(t, ystep));
        t += ystep;
    }
    let xstep = nice_step(x1 - x0, 8.0).max(1.0);
    let mut t = (x0 / xstep).ceil() * xstep;
    while t <= x1 + xstep * 1e-9 {
        let x = sx(t);
        let _ = writeln!(s, r##"<line x1="{x:.1}" y1="{mt}" x2="{x:.1}" y2="{:.1}" stroke="#e5e5e5"/>"##, mt + ph);
        let _ = writeln!(s, r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#, mt + ph + 18.0, fmt_num(t, xstep));
        t += xstep;
    }
    let _ = writeln!(s, r##"<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##);
    let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">step</text>"#, ml + pw / 2.0, h - 12.0);
    let _ = writeln!(
        s,
        r#"<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">loss</text>"#,
        mt + ph / 2.0,
        mt + ph / 2.0
    );
    // series
    for (pts, color) in [(&train, "#1f77b4"), (&eval, "#ff7f0e")] {
        if pts.is_empty() {
            continue;
        }
        let coords: Vec<String> = pts.iter().map(|&(x, y)| format!("{:.1},{:.1}", sx(x as f64), sy(y))).collect();
        let _ = writeln!(s, r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#, coords.join(" "));
        if pts.len() <= 60 {
            for c in &coords {
                let (cx, cy) = c.split_once(',').unwrap();
                let _ = writeln!(s, r#"<circle cx="{cx}" cy="{cy}" r="2.5" fill="{color}"/>"#);
            }
        }
    }
    // legend
    let lx = ml + pw - 130.0;
    let mut ly = mt + 16.0;
    for (label, color, present) in [("train loss", "#1f77b4", !train.is_empty()), ("eval loss", "#ff7f0e", !eval.is_empty())] {
        if !present {
            continue;
        }
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{:.1}" x2="{}" y2="{:.1}" stroke="{color}" stroke-width="2"/><text x="{}" y="{:.1}">{label}</text>"#,
            ly - 4.0,
            lx + 24.0,
            ly - 4.0,
            lx + 30.0,
            ly
        );
        ly += 18.0;
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_varint(b: &[u8], i: &mut usize) -> u64 {
        let mut v = 0u64;
        let mut shift = 0;
        loop {
            let x = b[*i];
            *i += 1;
            v |= ((x & 0x7f) as u64) << shift;
            if x < 0x80 {
                return v;
            }
            shift += 7;
        }
    }

    #[derive(Debug, PartialEq)]
    enum F {
        Varint(u64),
        Fixed64([u8; 8]),
        Bytes(Vec<u8>),
        Fixed32([u8; 4]),
    }

    fn fields(b: &[u8]) -> Vec<(u64, F)> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            let k = read_varint(b, &mut i);
            let f = match k & 7 {
                0 => F::Varint(read_varint(b, &mut i)),
                1 => {
                    i += 8;
                    F::Fixed64(b[i - 8..i].try_into().unwrap())
                }
                2 => {
                    let n = read_varint(b, &mut i) as usize;
                    i += n;
                    F::Bytes(b[i - n..i].to_vec())
                }
                5 => {
                    i += 4;
                    F::Fixed32(b[i - 4..i].try_into().unwrap())
                }
                w => panic!("wire type {w}"),
            };
            out.push((k >> 3, f));
        }
        out
    }

    fn records(b: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            let len_bytes = &b[i..i + 8];
            let n = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            let crc = u32::from_le_bytes(b[i + 8..i + 12].try_into().unwrap());
            assert_eq!(crc, masked_crc32c(len_bytes));
            let data = &b[i + 12..i + 12 + n];
            let crc = u32::from_le_bytes(b[i + 12 + n..i + 16 + n].try_into().unwrap());
            assert_eq!(crc, masked_crc32c(data));
            out.push(data.to_vec());
            i += 16 + n;
        }
        out
    }

    #[test]
    fn crc32c_vectors() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
    }

    #[test]
    fn writes_jsonl_events_and_svg() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let mut w = MetricsWriter::create(&run).unwrap();
        for step in 0..5u64 {
            let m = StepMetrics {
                step,
                loss: 2.0 - step as f64 * 0.1,
                lr: 1e-3,
                grad_norm: 0.5,
                throughput: 1000.0,
                elapsed_s: step as f64,
                eval_loss: (step == 4).then_some(1.9),
                eval_accuracy: (step == 4).then_some(0.25),
            };
            w.log(&m).unwrap();
        }
        w.write_svg().unwrap();

        // JSON lines
        let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5);
        assert!(
            lines[0].starts_with(r#"{"step":0,"loss":2.0,"lr":0.001,"grad_norm":0.5,"throughput":1000.0,"elapsed_s":0.0}"#),
            "{}",
            lines[0]
        );
        let last: StepMetrics = serde_json::from_str(lines[4]).unwrap();
        assert_eq!(last.eval_accuracy, Some(0.25));
        assert!(!lines[3].contains("eval"));

        // TensorBoard records
        let name = w.events_path().file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        let bytes = std::fs::read(w.events_path()).unwrap();
        let recs = records(&bytes);
        assert_eq!(recs.len(), 6);
        let first = fields(&recs[0]);
        assert!(matches!(first[0], (1, F::Fixed64(_))));
        assert!(first.contains(&(3, F::Bytes(b"brain.Event:2".to_vec()))));
        let ev = fields(&recs[5]);
        assert!(matches!(ev[0], (1, F::Fixed64(t)) if f64::from_le_bytes(t) > 1.6e9));
        assert_eq!(ev[1], (2, F::Varint(4)));
        let (5, F::Bytes(summary)) = &ev[2] else { panic!("{ev:?}") };
        let values: Vec<(String, f32)> = fields(summary)
            .into_iter()
            .map(|(k, f)| {
                assert_eq!(k, 1);
                let F::Bytes(v) = f else { panic!() };
                let vf = fields(&v);
                let (1, F::Bytes(tag)) = &vf[0] else { panic!() };
                let (2, F::Fixed32(x)) = &vf[1] else { panic!() };
                (String::from_utf8(tag.clone()).unwrap(), f32::from_le_bytes(*x))
            })
            .collect();
        let tags: Vec<&str> = values.iter().map(|v| v.0.as_str()).collect();
        assert_eq!(tags, ["loss", "lr", "grad_norm", "throughput", "elapsed_s", "eval_loss", "eval_accuracy"]);
        assert_eq!(values[0].1, 1.6f32);
        assert_eq!(values[6].1, 0.25f32);
        // step 0 event omits the default step field
        let ev0 = fields(&recs[1]);
        assert!(ev0.iter().all(|(k, _)| *k != 2));

        // SVG
        let svg = std::fs::read_to_string(run.join("loss.svg")).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("train loss") && svg.contains("eval loss"));

        // a second writer (resume) appends and keeps the history for the chart
        drop(w);
        let mut w2 = MetricsWriter::create(&run).unwrap();
        assert_eq!(w2.train.len(), 5);
        w2.log(&StepMetrics { step: 3, loss: 1.0, ..Default::default() }).unwrap();
        assert_eq!(w2.train.len(), 4);
        w2.write_svg().unwrap();
        let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
        assert_eq!(text.lines().count(), 6);
    }

    #[test]
    fn svg_edge_cases() {
        for (t, e) in [
            (vec![], vec![]),
            (vec![(0u64, 1.0)], vec![]),
            (vec![(0, f64::NAN), (1, f64::INFINITY)], vec![(1, 2.0)]),
            ((0..10_000).map(|i| (i, 1.0 / (i + 1) as f64)).collect(), vec![(5000, 0.5)]),
            (vec![(5, 3.0), (5, 3.0)], vec![]),
        ] {
            let svg = render_svg(&t, &e);
            assert!(svg.ends_with("</svg>\n"));
            assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
            assert!(svg.len() < 200_000);
        }
    }
}
