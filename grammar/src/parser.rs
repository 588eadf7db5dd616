//! The `.bm` parser: pest (`bm.pest`) for the syntax, then a builder that turns pest
//! pairs into the [`ast`](crate::ast) with exact byte spans.
//!
//! Robustness: the source first goes through a length-preserving pre-pass (comments
//! blanked, newlines inside `( )`/`[ ]` turned into spaces, bracket nesting limited to
//! [`MAX_NESTING`]); pest runs on a thread with a large stack and its stack guard on;
//! the builder limits expression depth to [`MAX_EXPR_DEPTH`] so that later recursive
//! passes (and `Drop`) over the AST stay shallow. The grammar has no exponential
//! backtracking (each alternative is decided by its first token), so parsing is linear.

// `parse` returns `Result<_, Diagnostic>` by contract; a diagnostic is rare and cheap to move.
#![allow(clippy::result_large_err)]

use crate::ast::*;
use crate::diagnostic::{Diagnostic, SourceFile, suggest};
use pest::Parser as _;
use pest::iterators::Pair;
use std::sync::Arc;

#[derive(pest_derive::Parser)]
#[grammar = "bm.pest"]
struct BmParser;

/// The deepest allowed nesting of `(`, `[` and `{`.
pub const MAX_NESTING: usize = 256;
/// The deepest allowed expression tree (operators, calls, fields, ... all count).
pub const MAX_EXPR_DEPTH: u32 = 512;
/// The most `else if` branches one `if` may have.
pub const MAX_ELSE_IF: usize = 256;

const ITEM_KEYWORDS: [&str; 5] = ["import", "config", "block", "model", "train"];
const KEYWORDS: [&str; 16] = [
    "config", "block", "model", "train", "forward", "input", "param", "let", "loss", "output", "repeat", "if", "else", "import", "true",
    "false",
];

type PResult<T> = Result<T, Diagnostic>;

/// Parses one `.bm` file. Never panics; every failure is a [`Diagnostic`] pointing
/// into `file`.
pub fn parse(file: &Arc<SourceFile>) -> Result<File, Diagnostic> {
    let run = || parse_on_this_thread(file);
    let result = std::thread::scope(|s| {
        std::thread::Builder::new().name("bm-parse".into()).stack_size(256 << 20).spawn_scoped(s, run).map(|h| h.join())
    });
    match result {
        Ok(Ok(r)) => r,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        // Could not spawn a thread: parse here (the limits still apply).
        Err(_) => parse_on_this_thread(file),
    }
}

fn parse_on_this_thread(file: &Arc<SourceFile>) -> Result<File, Diagnostic> {
    let src = file.text.as_str();
    let scan = scan(src, src.len());
    if let Some(pos) = scan.too_deep {
        return Err(Diagnostic::at(
            file,
            Span::new(pos, pos + 1),
            format!("brackets nested too deeply (more than {MAX_NESTING} levels)"),
            "nested too deeply",
        ));
    }
    let prepared = String::from_utf8(scan.out).unwrap_or_else(|_| src.to_string());
    let pairs = match BmParser::parse(Rule::file, &prepared) {
        Ok(p) => p,
        Err(e) => return Err(syntax_error(file, e)),
    };
    let b = Builder { file };
    let Some(top) = pairs.into_iter().next() else {
        return Err(Diagnostic::at(file, Span::new(0, 0), "internal parser error: no parse tree", ""));
    };
    b.file(top)
}

// ------------------------------------------------------------------ pre-pass

struct Scan {
    /// The source with comments blanked and bracketed newlines replaced by spaces.
    out: Vec<u8>,
    /// Brackets open at the stop position: (byte, offset).
    stack: Vec<(u8, usize)>,
    /// Offset of the first bracket nested deeper than `MAX_NESTING`.
    too_deep: Option<usize>,
}

/// Walks `src` up to byte `stop`, tracking strings, comments and brackets.
fn scan(src: &str, stop: usize) -> Scan {
    let bytes = src.as_bytes();
    let stop = stop.min(bytes.len());
    let mut out = bytes.to_vec();
    let mut stack: Vec<(u8, usize)> = Vec::new();
    let mut too_deep = None;
    let mut i = 0;
    while i < stop {
        match bytes[i] {
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' && bytes[i] != b'\n' {
                    if bytes[i] == b'\\' && i + 1 < bytes.len() && bytes[i + 1] != b'\n' {
                        i += 1;
                    }
                    i += 1;
                }
                if i < bytes.len() && bytes[i] == b'"' {
                    i += 1;
                }
            }
            b'#' => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    // Keep a lone `\r` of a `\r\n` ending intact (it is whitespace anyway).
                    out[i] = b' ';
                    i += 1;
                }
            }
            c @ (b'(' | b'[' | b'{') => {
                stack.push((c, i));
                if stack.len() > MAX_NESTING && too_deep.is_none() {
                    too_deep = Some(i);
                }
                i += 1;
            }
            c @ (b')' | b']' | b'}') => {
                let open = opener_of(c);
                if let Some(k) = stack.iter().rposition(|&(o, _)| o == open) {
                    stack.truncate(k);
                }
                i += 1;
            }
            b'\n' => {
                if matches!(stack.last(), Some((b'(' | b'[', _))) {
                    out[i] = b' ';
                }
                i += 1;
            }
            _ => i += 1,
        }
    }
    Scan { out, stack, too_deep }
}

fn opener_of(close: u8) -> u8 {
    match close {
        b')' => b'(',
        b']' => b'[',
        _ => b'{',
    }
}

fn closer_of(open: u8) -> u8 {
    match open {
        b'(' => b')',
        b'[' => b']',
        _ => b'}',
    }
}

// ------------------------------------------------------------------ syntax errors

/// The token at byte `pos` of `src`: its span (at least one character; the last
/// character at end of input) and how to name it in "found ...".
fn token_at(src: &str, pos: usize) -> (Span, String) {
    if pos >= src.len() {
        let start = src.char_indices().next_back().map(|(i, _)| i).unwrap_or(0);
        return (Span::new(start, src.len()), "end of file".to_string());
    }
    let pos = (0..=pos).rev().find(|&p| src.is_char_boundary(p)).unwrap_or(0);
    let rest = &src[pos..];
    let c = rest.chars().next().unwrap_or(' ');
    let word_len = |pred: &dyn Fn(char) -> bool| rest.char_indices().find(|&(_, ch)| !pred(ch)).map_or(rest.len(), |(i, _)| i);
    let len = if c == '\n' || rest.starts_with("\r\n") {
        let l = if c == '\n' { 1 } else { 2 };
        return (Span::new(pos, pos + l), "a newline".to_string());
    } else if c.is_ascii_alphanumeric() || c == '_' {
        if c.is_ascii_digit() {
            word_len(&|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '.')
        } else {
            word_len(&|ch| ch.is_ascii_alphanumeric() || ch == '_')
        }
    } else if c == '"' {
        let mut end = rest.len();
        let mut escaped = false;
        for (i, ch) in rest.char_indices().skip(1) {
            if ch == '\n' {
                end = i;
                break;
            }
            if escaped {
                escaped = false;
            } else if ch == '\\' {
                escaped = true;
            } else if ch == '"' {
                end = i + 1;
                break;
            }
        }
        end
    } else if ["...", "==", "!=", "<=", ">=", "->"].iter().any(|op| rest.starts_with(op)) {
        if rest.starts_with("...") { 3 } else { 2 }
    } else {
        c.len_utf8()
    };
    let len = len.max(c.len_utf8());
    let text = &rest[..len];
    let shown: String =
        if text.chars().count() > 40 { format!("{}...", text.chars().take(40).collect::<String>()) } else { text.to_string() };
    (Span::new(pos, pos + len), format!("`{shown}`"))
}

/// How a rule is named in "expected ...", with a rank that orders the list.
fn describe(rule: Rule) -> Option<(u8, &'static str)> {
    use Rule::*;
    Some(match rule {
        item | file => (0, "an item (`import`, `config`, `block`, `model` or `train`)"),
        member => (1, "a member"),
        stmt => (2, "a statement"),
        expr | sum | product | unary | postfix | call_or_name | paren | list | if_expr | expr_stmt | boolean | neg => (3, "an expression"),
        arg => (4, "an argument"),
        dim => (5, "a dimension"),
        ty => (6, "a type"),
        shape => (7, "a shape `[...]`"),
        ident | field_name | block_param | forward_param | field => (8, "an identifier"),
        number => (9, "a number"),
        string => (10, "a string"),
        kw_import => (11, "`import`"),
        kw_config => (11, "`config`"),
        kw_block => (11, "`block`"),
        kw_model => (11, "`model`"),
        kw_train => (11, "`train`"),
        kw_forward => (11, "`forward`"),
        kw_input => (11, "`input`"),
        kw_param => (11, "`param`"),
        kw_let => (11, "`let`"),
        kw_loss => (11, "`loss`"),
        kw_output => (11, "`output`"),
        kw_repeat => (11, "`repeat`"),
        kw_if => (11, "`if`"),
        kw_else | else_if_member | else_member | else_if_expr => (11, "`else`"),
        assign => (12, "`=`"),
        colon => (13, "`:`"),
        arrow => (15, "`->`"),
        lparen | params_open | block_params | forward_params | call_args => (14, "`(`"),
        lbracket => (16, "`[`"),
        lbrace | member_list | field_list | body => (17, "`{`"),
        comma => (18, "`,`"),
        ellipsis => (19, "`...`"),
        dot | postfix_op => (20, "`.`"),
        cmp_op | add_op | mul_op => (21, "an operator"),
        rparen => (22, "`)`"),
        rbracket => (23, "`]`"),
        rbrace => (24, "`}`"),
        sep => (21, "a newline"),
        EOI => (26, "end of file"),
        _ => return None,
    })
}

/// Tokens that could merely continue what came before (`x` → `x.f`, `x(..)`, `x + y`);
/// they are left out of "expected" when something that ends or separates is expected.
fn is_continuation(rule: Rule) -> bool {
    matches!(
        rule,
        Rule::dot
            | Rule::postfix_op
            | Rule::cmp_op
            | Rule::add_op
            | Rule::mul_op
            | Rule::lparen
            | Rule::call_args
            | Rule::lbracket
            | Rule::shape
    )
}

fn human_list(items: &[&str]) -> String {
    match items {
        [] => "something else".to_string(),
        [a] => a.to_string(),
        [init @ .., last] => format!("{} or {}", init.join(", "), last),
    }
}

fn syntax_error(file: &Arc<SourceFile>, e: pest::error::Error<Rule>) -> Diagnostic {
    let src = file.text.as_str();
    let pos = match e.location {
        pest::error::InputLocation::Pos(p) => p,
        pest::error::InputLocation::Span((s, _)) => s,
    };
    let (span, found) = token_at(src, pos);
    let positives = match e.variant {
        pest::error::ErrorVariant::ParsingError { positives, .. } => positives,
        pest::error::ErrorVariant::CustomError { .. } => {
            // pest's stack guard or call limit: only reachable through extreme input.
            return Diagnostic::at(file, span, "input nested too deeply to parse", "nested too deeply")
                .with_help("split the expression into several `let` statements");
        }
    };
    let enders = positives.iter().any(|&r| !is_continuation(r));
    // Inside an argument list `=` (a keyword argument) is rarely what was meant.
    let in_args = positives.contains(&Rule::rparen) && positives.contains(&Rule::comma);
    let mut words: Vec<(u8, &str)> = positives
        .iter()
        .filter(|&&r| !(enders && is_continuation(r) || in_args && r == Rule::assign))
        .filter_map(|&r| describe(r))
        .collect();
    words.sort();
    words.dedup_by(|a, b| a.1 == b.1);
    let words: Vec<&str> = words.into_iter().map(|(_, w)| w).collect();
    let message = format!("expected {}, found {}", human_list(&words), found);
    let label = if words.len() == 1 { format!("expected {} here", words[0]) } else { "unexpected here".to_string() };
    let mut d = Diagnostic::at(file, span, message, label);

    let word = src.get(span.start..span.end).unwrap_or("");
    let at_eof = pos >= src.len();
    let has = |r: Rule| positives.contains(&r);
    let line_start = src[..pos.min(src.len())].rfind('\n').map_or(0, |i| i + 1);
    let line_before = &src[line_start..pos.min(src.len())];
    let open = scan(src, pos).stack;
    let innermost = open.last().copied();

    // An unclosed bracket.
    if let Some((o, opos)) = innermost {
        let closer = closer_of(o);
        let closer_expected = match closer {
            b')' => has(Rule::rparen),
            b']' => has(Rule::rbracket),
            _ => has(Rule::rbrace),
        };
        let earlier_line = src[opos..pos.min(src.len())].contains('\n');
        let brace_case = o != b'{' || at_eof || ITEM_KEYWORDS.contains(&word) && line_before.trim().is_empty();
        if closer_expected && (at_eof || earlier_line) && brace_case {
            let (l, c) = file.line_col(opos);
            d = d
                .with_secondary(file, Span::new(opos, opos + 1), format!("this `{}` is never closed", o as char))
                .with_help(format!("add a `{}` to close the `{}` opened at line {l}, column {c}", closer as char, o as char));
            return d;
        }
    }
    // A closing bracket with nothing to close.
    if matches!(word, ")" | "]" | "}") {
        let o = opener_of(word.as_bytes()[0]);
        if !open.iter().any(|&(x, _)| x == o) {
            return d.with_help(format!("this `{word}` has no matching `{}`", o as char));
        }
    }
    // `if x = 3 {`
    if word == "=" && line_before.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).any(|w| w == "if") {
        return d.with_help("to compare two values, use `==`");
    }
    // `= Linear(d)` without a name
    if word == "=" && has(Rule::member) {
        return d.with_help("a child member needs a name: `name = Block(args)`");
    }
    // `vocab 65` in config/train
    if has(Rule::assign)
        && let Some((b'{', opos)) = innermost
    {
        let before = src[..opos].trim_end();
        let kw = before.rsplit(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).next().unwrap_or("");
        if kw == "config" || kw == "train" {
            return d.with_help(format!("each `{kw}` field is written `name = value`"));
        }
    }
    // `a < b < c`
    if matches!(word, "<" | "<=" | ">" | ">=" | "==" | "!=") {
        return d.with_help("comparisons do not chain; combine them with parentheses");
    }
    // `let` outside a `forward`
    if has(Rule::member) && matches!(word, "let" | "output" | "loss") {
        return d.with_help(format!("`{word}` statements belong inside a `forward {{ ... }}` body"));
    }
    // `modle Foo {`
    if (has(Rule::item) || has(Rule::file)) && !word.is_empty() && word.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        let anagram = |k: &&&str| {
            let (mut a, mut b): (Vec<char>, Vec<char>) = (word.chars().collect(), k.chars().collect());
            a.sort_unstable();
            b.sort_unstable();
            a == b
        };
        return match suggest(word, ITEM_KEYWORDS).or_else(|| ITEM_KEYWORDS.iter().find(anagram).copied()) {
            Some(s) => d.with_help(format!("did you mean `{s}`?")),
            None => d.with_help("a `.bm` file contains `import`, `config`, `block`, `model` and `train` items"),
        };
    }
    // A keyword where a name was expected.
    if (has(Rule::ident) || has(Rule::member) || has(Rule::stmt)) && KEYWORDS.contains(&word) {
        return d.with_help(format!("`{word}` is a keyword and cannot be used as a name"));
    }
    d
}

// ------------------------------------------------------------------ AST builder

/// The span of a pair, without the whitespace pest's implicit skipping may leave at
/// its end (`a ~ b*` keeps the whitespace skipped before a failed `b`).
fn span(p: &Pair<Rule>) -> Span {
    let s = p.as_span();
    let trimmed = s.as_str().trim_end_matches([' ', '\t', '\r']);
    Span::new(s.start(), s.start() + trimmed.len())
}

fn is_token(r: Rule) -> bool {
    use Rule::*;
    matches!(
        r,
        lparen
            | params_open
            | rparen
            | lbracket
            | rbracket
            | lbrace
            | rbrace
            | comma
            | colon
            | arrow
            | dot
            | assign
            | sep
            | kw_import
            | kw_config
            | kw_block
            | kw_model
            | kw_train
            | kw_forward
            | kw_input
            | kw_param
            | kw_let
            | kw_loss
            | kw_output
            | kw_if
            | kw_else
    )
}

/// The meaningful children of a pair (punctuation and keywords skipped).
fn kids<'i>(p: Pair<'i, Rule>) -> impl Iterator<Item = Pair<'i, Rule>> {
    p.into_inner().filter(|c| !is_token(c.as_rule()))
}

struct Builder<'a> {
    file: &'a Arc<SourceFile>,
}

impl Builder<'_> {
    fn err(&self, sp: Span, message: impl Into<String>, label: impl Into<String>) -> Diagnostic {
        let sp = if sp.end > sp.start { sp } else { Span::new(sp.start, sp.start + 1) };
        Diagnostic::at(self.file, sp, message, label)
    }

    fn internal(&self, sp: Span) -> Diagnostic {
        self.err(sp, "internal parser error: unexpected parse tree shape", "here")
    }

    fn next<'i>(&self, it: &mut impl Iterator<Item = Pair<'i, Rule>>, parent: Span) -> PResult<Pair<'i, Rule>> {
        it.next().ok_or_else(|| self.internal(parent))
    }

    fn file(&self, p: Pair<Rule>) -> PResult<File> {
        let mut items = Vec::new();
        let mut seen: [Option<Span>; 3] = [None; 3];
        for item in kids(p) {
            if item.as_rule() != Rule::item {
                continue;
            }
            let isp = span(&item);
            let inner = self.next(&mut item.into_inner(), isp)?;
            let kind = match inner.as_rule() {
                Rule::config_item => Some((0, "config")),
                Rule::model_item => Some((1, "model")),
                Rule::train_item => Some((2, "train")),
                _ => None,
            };
            if let Some((k, word)) = kind {
                let kw = inner.clone().into_inner().next().map(|p| span(&p)).unwrap_or(isp);
                if let Some(first) = seen[k] {
                    return Err(self
                        .err(kw, format!("a file may contain only one `{word}` item"), format!("second `{word}` here"))
                        .with_secondary(self.file, first, format!("first `{word}` here"))
                        .with_help(format!("merge the two `{word}` items into one")));
                }
                seen[k] = Some(kw);
            }
            items.push(self.item(inner)?);
        }
        Ok(File { items })
    }

    fn item(&self, p: Pair<Rule>) -> PResult<Item> {
        let sp = span(&p);
        match p.as_rule() {
            Rule::import_item => {
                let s = self.next(&mut kids(p), sp)?;
                Ok(Item::Import { path: self.string(&s)?, span: sp })
            }
            Rule::config_item => Ok(Item::Config { entries: self.fields(self.next(&mut kids(p), sp)?)?, span: sp }),
            Rule::train_item => Ok(Item::Train { fields: self.fields(self.next(&mut kids(p), sp)?)?, span: sp }),
            Rule::block_item | Rule::model_item => {
                let is_model = p.as_rule() == Rule::model_item;
                let mut it = kids(p);
                let name = self.ident(&self.next(&mut it, sp)?);
                let mut params = Vec::new();
                let mut members = Vec::new();
                for c in it {
                    match c.as_rule() {
                        Rule::block_params => {
                            for bp in kids(c) {
                                let bsp = span(&bp);
                                let mut bi = kids(bp);
                                let name = self.ident(&self.next(&mut bi, bsp)?);
                                let default = match bi.next() {
                                    Some(e) => Some(self.expr(e)?.0),
                                    None => None,
                                };
                                params.push(BlockParam { name, default });
                            }
                        }
                        Rule::member_list => members = self.members(c)?,
                        _ => return Err(self.internal(span(&c))),
                    }
                }
                Ok(if is_model {
                    Item::Model(BlockDef { name, params, members, is_model, span: sp })
                } else {
                    Item::Block(BlockDef { name, params, members, is_model, span: sp })
                })
            }
            _ => Err(self.internal(sp)),
        }
    }

    fn fields(&self, p: Pair<Rule>) -> PResult<Vec<Field>> {
        let mut out = Vec::new();
        for f in kids(p) {
            let fsp = span(&f);
            let mut it = kids(f);
            let name = self.ident(&self.next(&mut it, fsp)?);
            let value = self.expr(self.next(&mut it, fsp)?)?.0;
            out.push(Field { name, value, span: fsp });
        }
        Ok(out)
    }

    fn ident(&self, p: &Pair<Rule>) -> Ident {
        Ident { name: p.as_str().to_string(), span: span(p) }
    }

    // -------------------------------------------------------------- members

    fn members(&self, p: Pair<Rule>) -> PResult<Vec<Member>> {
        let mut out = Vec::new();
        for m in kids(p) {
            let msp = span(&m);
            let inner = self.next(&mut m.into_inner(), msp)?;
            out.push(self.member(inner)?);
        }
        Ok(out)
    }

    fn member(&self, p: Pair<Rule>) -> PResult<Member> {
        let sp = span(&p);
        let rule = p.as_rule();
        let mut it = kids(p);
        match rule {
            Rule::child_member => {
                let name = self.ident(&self.next(&mut it, sp)?);
                let value = self.expr(self.next(&mut it, sp)?)?.0;
                Ok(Member::Child { name, value, span: sp })
            }
            Rule::param_member => {
                let name = self.ident(&self.next(&mut it, sp)?);
                let ty = self.ty(self.next(&mut it, sp)?)?;
                let init = match it.next() {
                    Some(e) => Some(self.expr(e)?.0),
                    None => None,
                };
                Ok(Member::Param { name, ty, init, span: sp })
            }
            Rule::input_member => {
                let name = self.ident(&self.next(&mut it, sp)?);
                let ty = self.ty(self.next(&mut it, sp)?)?;
                Ok(Member::Input { name, ty, span: sp })
            }
            Rule::forward_member => {
                let mut params = None;
                let mut ret = None;
                let mut body = None;
                for c in it {
                    match c.as_rule() {
                        Rule::forward_params => {
                            let mut ps = Vec::new();
                            for fp in kids(c) {
                                let fsp = span(&fp);
                                let mut fi = kids(fp);
                                let name = self.ident(&self.next(&mut fi, fsp)?);
                                let ty = match fi.next() {
                                    Some(t) => Some(self.ty(t)?),
                                    None => None,
                                };
                                ps.push(ForwardParam { name, ty });
                            }
                            params = Some(ps);
                        }
                        Rule::ty => ret = Some(self.ty(c)?),
                        Rule::body => body = Some(self.body(c)?.0),
                        _ => return Err(self.internal(span(&c))),
                    }
                }
                let body = body.ok_or_else(|| self.internal(sp))?;
                Ok(Member::Forward(Forward { params, ret, body, span: sp }))
            }
            Rule::if_member => {
                let cond = self.expr(self.next(&mut it, sp)?)?.0;
                let then = self.members(self.next(&mut it, sp)?)?;
                let mut else_ifs = Vec::new();
                let mut otherwise = Vec::new();
                for c in it {
                    match c.as_rule() {
                        Rule::else_if_member => {
                            if else_ifs.len() >= MAX_ELSE_IF {
                                return Err(self.err(
                                    span(&c),
                                    format!("too many `else if` branches (more than {MAX_ELSE_IF})"),
                                    "too many branches",
                                ));
                            }
                            // The nested `if` spans from its `if` keyword to the end of the chain.
                            let kw_if = c.clone().into_inner().find(|x| x.as_rule() == Rule::kw_if).map(|x| span(&x).start);
                            let start = kw_if.unwrap_or(span(&c).start);
                            let mut ci = kids(c.clone());
                            let cond = self.expr(self.next(&mut ci, span(&c))?)?.0;
                            let then = self.members(self.next(&mut ci, span(&c))?)?;
                            else_ifs.push((start, cond, then));
                        }
                        Rule::else_member => {
                            let csp = span(&c);
                            otherwise = self.members(self.next(&mut kids(c), csp)?)?;
                        }
                        _ => return Err(self.internal(span(&c))),
                    }
                }
                for (start, cond, then) in else_ifs.into_iter().rev() {
                    otherwise = vec![Member::If { cond, then, otherwise, span: Span::new(start, sp.end) }];
                }
                Ok(Member::If { cond, then, otherwise, span: sp })
            }
            _ => Err(self.internal(sp)),
        }
    }

    fn ty(&self, p: Pair<Rule>) -> PResult<TensorType> {
        let sp = span(&p);
        let mut dtype = None;
        let mut dims = None;
        for c in kids(p) {
            match c.as_rule() {
                Rule::ident => dtype = Some(self.ident(&c)),
                Rule::shape => {
                    let mut ds = Vec::new();
                    for d in kids(c) {
                        let dsp = span(&d);
                        let inner = self.next(&mut d.into_inner(), dsp)?;
                        ds.push(match inner.as_rule() {
                            Rule::ellipsis => Dim::Ellipsis(span(&inner)),
                            _ => Dim::Expr(self.expr(inner)?.0),
                        });
                    }
                    dims = Some(ds);
                }
                _ => return Err(self.internal(span(&c))),
            }
        }
        Ok(TensorType { dtype, dims, span: sp })
    }

    // -------------------------------------------------------------- statements

    /// A `{ ... }` body and the depth of its deepest expression.
    fn body(&self, p: Pair<Rule>) -> PResult<(Body, u32)> {
        let sp = span(&p);
        let mut stmts = Vec::new();
        let mut depth = 0;
        for s in kids(p) {
            let ssp = span(&s);
            let inner = self.next(&mut s.into_inner(), ssp)?;
            let isp = span(&inner);
            let rule = inner.as_rule();
            let mut it = kids(inner);
            let stmt = match rule {
                Rule::let_stmt => {
                    let mut names = Vec::new();
                    let mut value = None;
                    for c in it {
                        match c.as_rule() {
                            Rule::ident => names.push(self.ident(&c)),
                            _ => {
                                let (e, d) = self.expr(c)?;
                                depth = depth.max(d);
                                value = Some(e);
                            }
                        }
                    }
                    let value = value.ok_or_else(|| self.internal(isp))?;
                    Stmt::Let { names, value, span: isp }
                }
                Rule::output_stmt => {
                    let name = self.ident(&self.next(&mut it, isp)?);
                    let value = match it.next() {
                        Some(e) => {
                            let (e, d) = self.expr(e)?;
                            depth = depth.max(d);
                            Some(e)
                        }
                        None => None,
                    };
                    Stmt::Output { name, value, span: isp }
                }
                Rule::loss_stmt => {
                    let (value, d) = self.expr(self.next(&mut it, isp)?)?;
                    depth = depth.max(d);
                    Stmt::Loss { value, span: isp }
                }
                Rule::expr_stmt => {
                    let (e, d) = self.expr(self.next(&mut it, isp)?)?;
                    depth = depth.max(d);
                    Stmt::Expr(e)
                }
                _ => return Err(self.internal(isp)),
            };
            stmts.push(stmt);
        }
        let tail = match stmts.last() {
            Some(Stmt::Expr(_)) => match stmts.pop() {
                Some(Stmt::Expr(e)) => Some(Box::new(e)),
                _ => None,
            },
            _ => None,
        };
        Ok((Body { stmts, tail, span: sp }, depth))
    }

    // -------------------------------------------------------------- expressions

    fn check_depth(&self, d: u32, sp: Span) -> PResult<u32> {
        if d > MAX_EXPR_DEPTH {
            Err(self
                .err(sp, format!("expression nested too deeply (more than {MAX_EXPR_DEPTH} levels)"), "nested too deeply")
                .with_help("split it into several `let` statements"))
        } else {
            Ok(d)
        }
    }

    /// An expression (any of the precedence levels) and its tree depth.
    fn expr(&self, p: Pair<Rule>) -> PResult<(Expr, u32)> {
        let sp = span(&p);
        match p.as_rule() {
            Rule::expr | Rule::sum | Rule::product => {
                let mut it = p.into_inner();
                let (mut lhs, mut depth) = self.expr(self.next(&mut it, sp)?)?;
                while let Some(op) = it.next() {
                    let op = match op.as_str() {
                        "+" => BinaryOp::Add,
                        "-" => BinaryOp::Sub,
                        "*" => BinaryOp::Mul,
                        "/" => BinaryOp::Div,
                        "@" => BinaryOp::MatMul,
                        "<" => BinaryOp::Lt,
                        "<=" => BinaryOp::Le,
                        ">" => BinaryOp::Gt,
                        ">=" => BinaryOp::Ge,
                        "==" => BinaryOp::Eq,
                        "!=" => BinaryOp::Ne,
                        _ => return Err(self.internal(span(&op))),
                    };
                    let (rhs, rd) = self.expr(self.next(&mut it, sp)?)?;
                    let esp = lhs.span.to(rhs.span);
                    depth = self.check_depth(depth.max(rd) + 1, esp)?;
                    lhs = Expr { kind: ExprKind::Binary(op, Box::new(lhs), Box::new(rhs)), span: esp };
                }
                Ok((lhs, depth))
            }
            Rule::unary => self.unary(p),
            Rule::postfix => self.postfix(p),
            _ => self.primary(p),
        }
    }

    fn unary(&self, p: Pair<Rule>) -> PResult<(Expr, u32)> {
        let sp = span(&p);
        let mut negs = Vec::new();
        let mut operand = None;
        for c in p.into_inner() {
            match c.as_rule() {
                Rule::neg => negs.push(span(&c).start),
                _ => operand = Some(c),
            }
        }
        let operand = operand.ok_or_else(|| self.internal(sp))?;
        self.check_depth(negs.len() as u32, sp)?;
        // A negated number literal folds into the literal: `-2` is `Int(-2)`.
        let literal = {
            let mut inner = operand.clone().into_inner();
            match (inner.next(), inner.next()) {
                (Some(n), None) if n.as_rule() == Rule::number => Some(n),
                _ => None,
            }
        };
        if let Some(n) = literal
            && !negs.is_empty()
        {
            let negative = negs.len() % 2 == 1;
            let kind = self.number(&n, negative)?;
            return Ok((Expr { kind, span: sp }, 1));
        }
        let (mut e, mut depth) = self.postfix(operand)?;
        for start in negs.into_iter().rev() {
            depth += 1;
            let esp = Span::new(start, e.span.end);
            e = Expr { kind: ExprKind::Unary(UnaryOp::Neg, Box::new(e)), span: esp };
        }
        let depth = self.check_depth(depth, sp)?;
        Ok((e, depth))
    }

    fn postfix(&self, p: Pair<Rule>) -> PResult<(Expr, u32)> {
        let sp = span(&p);
        let start = sp.start;
        let mut it = p.into_inner();
        let (mut e, mut depth) = self.primary(self.next(&mut it, sp)?)?;
        for op in it {
            let osp = span(&op);
            let esp = Span::new(start, osp.end);
            let mut oi = kids(op);
            let name = self.ident(&self.next(&mut oi, osp)?);
            e = match oi.next() {
                Some(args) => {
                    let (args, ad) = self.args(args)?;
                    depth = depth.max(ad);
                    Expr { kind: ExprKind::Method { receiver: Box::new(e), method: name, args }, span: esp }
                }
                None => Expr { kind: ExprKind::Field(Box::new(e), name), span: esp },
            };
            depth = self.check_depth(depth + 1, esp)?;
        }
        Ok((e, depth))
    }

    fn args(&self, p: Pair<Rule>) -> PResult<(Vec<Arg>, u32)> {
        let mut out = Vec::new();
        let mut depth = 0;
        for a in kids(p) {
            let asp = span(&a);
            let mut name = None;
            let mut value = None;
            for c in kids(a) {
                match c.as_rule() {
                    Rule::ident => name = Some(self.ident(&c)),
                    _ => {
                        let (e, d) = self.expr(c)?;
                        depth = depth.max(d);
                        value = Some(e);
                    }
                }
            }
            let value = value.ok_or_else(|| self.internal(asp))?;
            out.push(Arg { name, value });
        }
        Ok((out, depth))
    }

    fn exprs(&self, p: Pair<Rule>) -> PResult<(Vec<Expr>, u32, bool)> {
        let mut out = Vec::new();
        let mut depth = 0;
        let mut comma = false;
        for c in p.into_inner() {
            match c.as_rule() {
                Rule::comma => comma = true,
                r if is_token(r) => {}
                _ => {
                    let (e, d) = self.expr(c)?;
                    depth = depth.max(d);
                    out.push(e);
                }
            }
        }
        Ok((out, depth, comma))
    }

    fn primary(&self, p: Pair<Rule>) -> PResult<(Expr, u32)> {
        let sp = span(&p);
        let leaf = |kind| Ok((Expr { kind, span: sp }, 1));
        match p.as_rule() {
            Rule::number => leaf(self.number(&p, false)?),
            Rule::string => leaf(ExprKind::Str(self.string(&p)?)),
            Rule::boolean => leaf(ExprKind::Bool(p.as_str() == "true")),
            Rule::call_or_name => {
                let mut it = p.into_inner();
                let callee = self.ident(&self.next(&mut it, sp)?);
                match it.next() {
                    Some(args) => {
                        let (args, d) = self.args(args)?;
                        let d = self.check_depth(d + 1, sp)?;
                        Ok((Expr { kind: ExprKind::Call { callee, args }, span: sp }, d))
                    }
                    None => leaf(ExprKind::Name(callee.name)),
                }
            }
            Rule::paren => {
                let (mut es, d, comma) = self.exprs(p)?;
                if es.len() == 1 && !comma {
                    let e = es.pop().ok_or_else(|| self.internal(sp))?;
                    return Ok((e, d));
                }
                let d = self.check_depth(d + 1, sp)?;
                Ok((Expr { kind: ExprKind::Tuple(es), span: sp }, d))
            }
            Rule::list => {
                let (es, d, _) = self.exprs(p)?;
                let d = self.check_depth(d + 1, sp)?;
                Ok((Expr { kind: ExprKind::List(es), span: sp }, d))
            }
            Rule::if_expr => {
                let mut it = kids(p);
                let (cond, cd) = self.expr(self.next(&mut it, sp)?)?;
                let (then, td) = self.body(self.next(&mut it, sp)?)?;
                let mut depth = cd.max(td);
                let mut else_ifs = Vec::new();
                let mut otherwise = None;
                for c in it {
                    match c.as_rule() {
                        Rule::else_if_expr => {
                            let csp = span(&c);
                            let start = c.clone().into_inner().find(|x| x.as_rule() == Rule::kw_if).map_or(csp.start, |x| span(&x).start);
                            let mut ci = kids(c);
                            let (ec, ecd) = self.expr(self.next(&mut ci, csp)?)?;
                            let (eb, ebd) = self.body(self.next(&mut ci, csp)?)?;
                            depth = depth.max(ecd).max(ebd);
                            else_ifs.push((start, csp, ec, eb));
                        }
                        Rule::body => {
                            let (b, bd) = self.body(c)?;
                            depth = depth.max(bd);
                            otherwise = Some(b);
                        }
                        _ => return Err(self.internal(span(&c))),
                    }
                }
                let mut otherwise = otherwise.ok_or_else(|| self.internal(sp))?;
                depth += 1;
                for (start, csp, cond, then) in else_ifs.into_iter().rev() {
                    let e = Expr {
                        kind: ExprKind::If { cond: Box::new(cond), then: Box::new(then), otherwise: Box::new(otherwise) },
                        span: Span::new(start, sp.end),
                    };
                    depth = self.check_depth(depth + 1, sp)?;
                    otherwise = Body { stmts: vec![], tail: Some(Box::new(e)), span: Span::new(csp.start, sp.end) };
                }
                let depth = self.check_depth(depth, sp)?;
                let kind = ExprKind::If { cond: Box::new(cond), then: Box::new(then), otherwise: Box::new(otherwise) };
                Ok((Expr { kind, span: sp }, depth))
            }
            Rule::expr | Rule::sum | Rule::product | Rule::unary | Rule::postfix => self.expr(p),
            _ => Err(self.internal(sp)),
        }
    }

    /// A number literal, negated if `negative`.
    fn number(&self, p: &Pair<Rule>, negative: bool) -> PResult<ExprKind> {
        let text = p.as_str();
        let sp = span(p);
        if text.bytes().all(|b| b.is_ascii_digit()) {
            let too_big = || {
                self.err(
                    sp,
                    format!("integer literal `{}{text}` does not fit in a 64-bit integer", if negative { "-" } else { "" }),
                    "too large",
                )
                .with_note(format!("the largest integer is {}", i64::MAX))
            };
            let mag: i128 = text.parse::<u64>().map_err(|_| too_big())? as i128;
            let v = if negative { -mag } else { mag };
            return i64::try_from(v).map(ExprKind::Int).map_err(|_| too_big());
        }
        if !is_float_syntax(text) {
            return Err(self
                .err(sp, format!("invalid number literal `{text}`"), "not a number")
                .with_help("numbers are written like `3`, `3.0`, `1e-3` or `2.5e4`"));
        }
        match text.parse::<f64>() {
            Ok(f) if f.is_finite() => Ok(ExprKind::Float(if negative { -f } else { f })),
            _ => Err(self.err(sp, format!("float literal `{text}` is out of range"), "out of range")),
        }
    }

    fn string(&self, p: &Pair<Rule>) -> PResult<String> {
        let text = p.as_str();
        let sp = span(p);
        let mut out = String::new();
        let mut chars = text.char_indices().skip(1);
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => return Ok(out),
                '\\' => match chars.next() {
                    Some((_, '"')) => out.push('"'),
                    Some((_, '\\')) => out.push('\\'),
                    Some((_, 'n')) => out.push('\n'),
                    Some((_, 't')) => out.push('\t'),
                    Some((_, other)) => {
                        let at = sp.start + i;
                        return Err(self
                            .err(
                                Span::new(at, at + 1 + other.len_utf8()),
                                format!("unknown escape `\\{other}` in string"),
                                "unknown escape",
                            )
                            .with_help("the escapes are `\\\"`, `\\\\`, `\\n` and `\\t`"));
                    }
                    None => break,
                },
                _ => out.push(c),
            }
        }
        Err(self
            .err(Span::new(sp.start, sp.start + 1), "unterminated string literal", "this string is never closed")
            .with_help("add a closing `\"` before the end of the line"))
    }
}

/// `digits ('.' digits)? ([eE] [+-]? digits)?`
fn is_float_syntax(t: &str) -> bool {
    let b = t.as_bytes();
    let mut i = 0;
    let digits = |i: &mut usize| {
        let s = *i;
        while *i < b.len() && b[*i].is_ascii_digit() {
            *i += 1;
        }
        *i > s
    };
    if !digits(&mut i) {
        return false;
    }
    if i < b.len() && b[i] == b'.' {
        i += 1;
        if !digits(&mut i) {
            return false;
        }
    }
    if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
        i += 1;
        if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
            i += 1;
        }
        if !digits(&mut i) {
            return false;
        }
    }
    i == b.len()
}
