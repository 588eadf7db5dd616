//! User-facing errors about `.bm` source: a message, a primary span with a label,
//! optional secondary spans (e.g. "this shape came from here"), notes and a fix hint.
//! Rendered with ariadne, without colour when the output is not a terminal.

use crate::ast::Span;
use std::fmt;
use std::sync::Arc;

/// One source file, shared by every diagnostic that points into it.
#[derive(Debug, PartialEq, Eq)]
pub struct SourceFile {
    /// The path as the user gave it (or as resolved for imports), shown in messages.
    pub path: String,
    pub text: String,
}

impl SourceFile {
    pub fn new(path: impl Into<String>, text: impl Into<String>) -> Arc<SourceFile> {
        Arc::new(SourceFile { path: path.into(), text: text.into() })
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let mut line = 1;
        let mut line_start = 0;
        for (i, b) in self.text.bytes().enumerate() {
            if i >= offset {
                break;
            }
            if b == b'\n' {
                line += 1;
                line_start = i + 1;
            }
        }
        let col = self.text.get(line_start..offset).map(|s| s.chars().count()).unwrap_or(offset - line_start) + 1;
        (line, col)
    }
}

#[derive(Clone, Debug)]
pub struct Label {
    pub file: Arc<SourceFile>,
    pub span: Span,
    pub message: String,
}

#[derive(Clone, Debug)]
pub struct Diagnostic {
    pub message: String,
    /// The primary location. `None` only for errors with no place in a `.bm` file.
    pub primary: Option<Label>,
    pub secondary: Vec<Label>,
    pub notes: Vec<String>,
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn new(message: impl Into<String>) -> Self {
        Diagnostic { message: message.into(), primary: None, secondary: vec![], notes: vec![], help: None }
    }

    /// An error at `span` of `file`, labelled with `label`.
    pub fn at(file: &Arc<SourceFile>, span: Span, message: impl Into<String>, label: impl Into<String>) -> Self {
        let mut d = Diagnostic::new(message);
        d.primary = Some(Label { file: file.clone(), span, message: label.into() });
        d
    }

    pub fn with_secondary(mut self, file: &Arc<SourceFile>, span: Span, message: impl Into<String>) -> Self {
        self.secondary.push(Label { file: file.clone(), span, message: message.into() });
        self
    }

    pub fn with_note(mut self, note: impl Into<String>) -> Self {
        self.notes.push(note.into());
        self
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    /// `path:line:col` of the primary label, if any.
    pub fn location(&self) -> Option<(String, usize, usize)> {
        let p = self.primary.as_ref()?;
        let (l, c) = p.file.line_col(p.span.start);
        Some((p.file.path.clone(), l, c))
    }

    /// Renders the diagnostic: `error: message`, `--> file:line:col`, then the source
    /// lines with each span underlined, then notes and help.
    pub fn render(&self, color: bool) -> String {
        use ariadne::{Config, IndexType, Label as ALabel, Report, ReportKind};
        let mut out = String::new();
        let Some(primary) = &self.primary else {
            out.push_str(&format!("error: {}\n", self.message));
            for n in &self.notes {
                out.push_str(&format!("  = note: {n}\n"));
            }
            if let Some(h) = &self.help {
                out.push_str(&format!("  = help: {h}\n"));
            }
            return out;
        };
        let (line, col) = primary.file.line_col(primary.span.start);
        out.push_str(&format!("error: {}\n  --> {}:{}:{}\n", self.message, primary.file.path, line, col));
        let clamp = |f: &SourceFile, s: Span| {
            let start = s.start.min(f.text.len());
            let end = s.end.clamp(start, f.text.len());
            start..end
        };
        let id = |f: &SourceFile| f.path.clone();
        let mut report = Report::build(ReportKind::Error, (id(&primary.file), clamp(&primary.file, primary.span)))
            .with_config(Config::default().with_color(color).with_index_type(IndexType::Byte))
            .with_message(&self.message)
            .with_label(ALabel::new((id(&primary.file), clamp(&primary.file, primary.span))).with_message(&primary.message));
        for l in &self.secondary {
            report = report.with_label(ALabel::new((id(&l.file), clamp(&l.file, l.span))).with_message(&l.message));
        }
        for n in &self.notes {
            report = report.with_note(n);
        }
        if let Some(h) = &self.help {
            report = report.with_help(h);
        }
        let mut files: Vec<(String, String)> = vec![(id(&primary.file), primary.file.text.clone())];
        for l in &self.secondary {
            if !files.iter().any(|(p, _)| *p == l.file.path) {
                files.push((id(&l.file), l.file.text.clone()));
            }
        }
        let mut buf = Vec::new();
        if report.finish().write(ariadne::sources(files), &mut buf).is_ok() {
            out.push_str(&String::from_utf8_lossy(&buf));
        }
        out
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render(false))
    }
}

impl std::error::Error for Diagnostic {}

/// The closest candidate to `name` by edit distance, for "did you mean" hints.
pub fn suggest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let mut best: Option<(usize, &str)> = None;
    for c in candidates {
        let d = edit_distance(&name.to_lowercase(), &c.to_lowercase());
        let limit = (name.len().max(c.len()) / 3).max(1);
        if d <= limit && best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, c));
        }
    }
    best.map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // Optimal string alignment distance: a swap of two neighbours (`stpes`) counts one edit.
    let mut prev2: Vec<usize> = vec![0; b.len() + 1];
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut cur = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            cur[j] = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                cur[j] = cur[j].min(prev2[j - 2] + 1);
            }
        }
        prev2 = std::mem::replace(&mut prev, cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        let f = SourceFile::new("a.bm", "ab\ncd\n");
        assert_eq!(f.line_col(0), (1, 1));
        assert_eq!(f.line_col(4), (2, 2));
    }

    #[test]
    fn suggests_close_names() {
        assert_eq!(suggest("LayerNrom", ["Linear", "LayerNorm", "RMSNorm"]), Some("LayerNorm"));
        assert_eq!(suggest("zzz", ["Linear"]), None);
        assert_eq!(suggest("stpes", ["steps", "seed"]), Some("steps"));
    }

    #[test]
    fn renders_location_and_underline() {
        let f = SourceFile::new("m.bm", "model M {\n  x = Foo(3)\n}\n");
        let d = Diagnostic::at(&f, Span::new(16, 19), "unknown block `Foo`", "not defined").with_help("did you mean `Bar`?");
        let r = d.render(false);
        assert!(r.contains("m.bm:2:7"), "{r}");
        assert!(r.contains("did you mean"), "{r}");
    }
}
