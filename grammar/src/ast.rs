//! The abstract syntax tree of a `.bm` file. Every node carries the byte span it was
//! parsed from, so later stages (elaboration, shape checking) can point at source.

use serde::Serialize;

/// A half-open byte range `[start, end)` into the source text of one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

impl Span {
    pub fn new(start: usize, end: usize) -> Self {
        Span { start, end }
    }
    /// The smallest span covering both.
    pub fn to(self, other: Span) -> Span {
        Span { start: self.start.min(other.start), end: self.end.max(other.end) }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

/// A whole `.bm` file: its items in source order.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct File {
    pub items: Vec<Item>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Item {
    /// `import "path.bm"`
    Import { path: String, span: Span },
    /// `config { name = expr ... }`
    Config { entries: Vec<Field>, span: Span },
    /// `block Name(params) { members }`
    Block(BlockDef),
    /// `model Name { members }` (a `BlockDef` with no parameters and `is_model = true`)
    Model(BlockDef),
    /// `train { field = value ... }`
    Train { fields: Vec<Field>, span: Span },
}

/// `name = value`, used by `config` and `train`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Field {
    pub name: Ident,
    pub value: Expr,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BlockDef {
    pub name: Ident,
    pub params: Vec<BlockParam>,
    pub members: Vec<Member>,
    pub is_model: bool,
    pub span: Span,
}

/// A block parameter `p` or `p = default`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BlockParam {
    pub name: Ident,
    pub default: Option<Expr>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Member {
    /// `name = Block(args)` or `name = repeat(n, Block(args))`; `value` is the call expression.
    Child { name: Ident, value: Expr, span: Span },
    /// `param name: dtype[shape] = init` (`init` absent means zeros()).
    Param { name: Ident, ty: TensorType, init: Option<Expr>, span: Span },
    /// `input name: dtype[shape]`
    Input { name: Ident, ty: TensorType, span: Span },
    /// `forward(args) -> type { body }`; a model's `forward { body }` has `params: None`.
    Forward(Forward),
    /// `if cond { members } else { members }`; `else if` nests another `If` as the only else member.
    If { cond: Expr, then: Vec<Member>, otherwise: Vec<Member>, span: Span },
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Forward {
    /// `None` for the argument-less `forward { ... }` of a model.
    pub params: Option<Vec<ForwardParam>>,
    pub ret: Option<TensorType>,
    pub body: Body,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ForwardParam {
    pub name: Ident,
    pub ty: Option<TensorType>,
}

/// `dtype[dims]`, `[dims]` or a bare `dtype` (a scalar).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TensorType {
    pub dtype: Option<Ident>,
    /// `None` for a bare dtype; `Some(vec![])` for `[]`.
    pub dims: Option<Vec<Dim>>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Dim {
    /// `...`: any number of leading dims.
    Ellipsis(Span),
    /// An integer expression over literals, config constants, block arguments and symbolic dims.
    Expr(Expr),
}

/// Statements followed by an optional tail expression (the block's value).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Body {
    pub stmts: Vec<Stmt>,
    pub tail: Option<Box<Expr>>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Stmt {
    /// `let a = e` or `let a, b, c = e` (destructuring a tuple).
    Let { names: Vec<Ident>, value: Expr, span: Span },
    /// `output name` (value `None`) or `output name = expr`.
    Output { name: Ident, value: Option<Expr>, span: Span },
    /// `loss expr`
    Loss { value: Expr, span: Span },
    /// An expression evaluated for its value (only meaningful as a block's last line).
    Expr(Expr),
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum ExprKind {
    Int(i64),
    Float(f64),
    Str(String),
    Bool(bool),
    /// Any identifier, including `none`, block names and symbolic dims.
    Name(String),
    /// `a.b`; `x.T` is `Field(x, "T")`; `wte.weight` names a child's parameter.
    Field(Box<Expr>, Ident),
    /// `f(args)`
    Call {
        callee: Ident,
        args: Vec<Arg>,
    },
    /// `x.f(args)`, which means `f(x, args)`
    Method {
        receiver: Box<Expr>,
        method: Ident,
        args: Vec<Arg>,
    },
    Unary(UnaryOp, Box<Expr>),
    Binary(BinaryOp, Box<Expr>, Box<Expr>),
    /// `[a, b, c]`
    List(Vec<Expr>),
    /// `(a, b)` (a parenthesised single expression is just that expression)
    Tuple(Vec<Expr>),
    /// `if c { a } else { b }` on compile-time values
    If {
        cond: Box<Expr>,
        then: Box<Body>,
        otherwise: Box<Body>,
    },
}

/// A positional (`name: None`) or keyword (`axis = -1`) argument.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Arg {
    pub name: Option<Ident>,
    pub value: Expr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum UnaryOp {
    Neg,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    MatMul,
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

impl BinaryOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinaryOp::Add => "+",
            BinaryOp::Sub => "-",
            BinaryOp::Mul => "*",
            BinaryOp::Div => "/",
            BinaryOp::MatMul => "@",
            BinaryOp::Lt => "<",
            BinaryOp::Le => "<=",
            BinaryOp::Gt => ">",
            BinaryOp::Ge => ">=",
            BinaryOp::Eq => "==",
            BinaryOp::Ne => "!=",
        }
    }
}
