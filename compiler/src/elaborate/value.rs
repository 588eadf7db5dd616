//! Values during elaboration: compile-time constants, tensors (graph nodes), block
//! instances, and the tuples and lists built from them.

use crate::graph::NodeId;
use bm_grammar::ast::Span;

#[derive(Clone, Debug)]
pub enum Value {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    /// `none` (e.g. `clip_grad = none`).
    None,
    Tensor(NodeId),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    /// A child block instance (callable: runs its forward).
    Instance(usize),
    /// `repeat(n, Block(..))`: instances applied in sequence.
    Repeat(Vec<usize>),
    /// A call kept as data (train-section specs such as `AdamW(lr = 1e-3)`).
    Call(CallValue),
}

#[derive(Clone, Debug)]
pub struct CallValue {
    pub name: String,
    pub positional: Vec<(Value, Span)>,
    pub keyword: Vec<(String, Value, Span)>,
    pub span: Span,
}

impl Value {
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Bool(_) => "a bool",
            Value::Str(_) => "a string",
            Value::None => "`none`",
            Value::Tensor(_) => "a tensor",
            Value::Tuple(_) => "a tuple",
            Value::List(_) => "a list",
            Value::Instance(_) => "a block instance",
            Value::Repeat(_) => "a repeated block",
            Value::Call(_) => "a call",
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Float(f) if f.fract() == 0.0 && f.abs() < 9e15 => Some(*f as i64),
            _ => None,
        }
    }

    pub fn is_const(&self) -> bool {
        match self {
            Value::Int(_) | Value::Float(_) | Value::Bool(_) | Value::Str(_) | Value::None => true,
            Value::Tuple(v) | Value::List(v) => v.iter().all(Value::is_const),
            _ => false,
        }
    }

    /// The text form used in `emit` output and metadata.
    pub fn text(&self) -> String {
        match self {
            Value::Int(i) => i.to_string(),
            Value::Float(f) => format!("{f:?}"),
            Value::Bool(b) => b.to_string(),
            Value::Str(s) => format!("{s:?}"),
            Value::None => "none".into(),
            Value::Tuple(v) => format!("({})", v.iter().map(Value::text).collect::<Vec<_>>().join(", ")),
            Value::List(v) => format!("[{}]", v.iter().map(Value::text).collect::<Vec<_>>().join(", ")),
            Value::Call(c) => {
                let mut parts: Vec<String> = c.positional.iter().map(|(v, _)| v.text()).collect();
                parts.extend(c.keyword.iter().map(|(k, v, _)| format!("{k} = {}", v.text())));
                format!("{}({})", c.name, parts.join(", "))
            }
            other => other.kind().to_string(),
        }
    }
}

/// Parses a `--set name=value` right-hand side: int, float, bool or string.
pub fn parse_override(text: &str) -> Value {
    let t = text.trim();
    if let Ok(i) = t.parse::<i64>() {
        return Value::Int(i);
    }
    if let Ok(f) = t.parse::<f64>() {
        return Value::Float(f);
    }
    match t {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        "none" => Value::None,
        _ => Value::Str(t.trim_matches('"').to_string()),
    }
}
