//! The op graph: a petgraph `DiGraph` of primitive operations on statically shaped
//! tensors. Elaboration builds it, passes rewrite it, lowering turns it into kernel IR.
//!
//! Invariants:
//! - Node indices are a topological order: a node is only added after its operands.
//!   Passes that need to reorder build a new graph.
//! - Edges run operand → user; the edge weight is the operand's position.
//! - `Binary` and `Select` operands have exactly the node's shape (the builders in
//!   `ops` insert explicit `Broadcast` nodes), so every VJP rule is shape-local.
//! - High-level operations (softmax, cross-entropy, LayerNorm, ...) are expanded into
//!   primitives when built; `Node::origin` remembers what each came from.

use bm_grammar::SourceFile;
use bm_grammar::ast::Span;
pub use bm_runtime::kir::{BinaryOp, Init, ReduceOp, UnaryOp};
use petgraph::Direction;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;
use std::fmt::Write as _;
use std::sync::Arc;

pub type NodeId = NodeIndex<u32>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    I32,
    Bool,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::I32 => "i32",
            DType::Bool => "bool",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// A tensor fed from the data.
    Input(String),
    /// A trainable parameter, by its PyTorch `state_dict` name.
    Param(String),
    /// Optimiser state (`exp_avg.<param>` ...), created by the optimiser pass.
    State(String),
    /// A scalar set by the runtime before each run (`step`, `training`) or a tensor it
    /// fills (`rand.N`: uniform [0, 1) noise for dropout).
    Hyper(String),
    /// Every element equals the value.
    Const(f64),
    /// Every element equals its index along the axis.
    Iota(usize),
    Unary(UnaryOp),
    Binary(BinaryOp),
    /// `where(cond, a, b)`
    Select,
    /// Reduces the listed axes (sorted, removed from the shape).
    Reduce(ReduceOp, Vec<usize>),
    /// NumPy broadcast of the operand (right-aligned) to the node's shape.
    Broadcast,
    /// Same elements in row-major order, the node's shape.
    Reshape,
    /// `out.shape[i] = in.shape[perm[i]]`
    Permute(Vec<usize>),
    Slice {
        axis: usize,
        start: usize,
        end: usize,
    },
    /// Zero padding along one axis (the VJP of `Slice`).
    Pad {
        axis: usize,
        before: usize,
        after: usize,
    },
    Concat(usize),
    /// `[..., m, k] @ [..., k, n]` with equal batch dims.
    MatMul,
    /// Rows of a `[rows, d]` table picked by ids `[...]`: `[..., d]`.
    Gather,
    /// `out[rows, d]` = Σ of `src[..., d]` rows into `ids[...]` (the VJP of `Gather`).
    ScatterAdd {
        rows: usize,
    },
    Cast(DType),
    /// Fused `softmax(q @ kᵀ · scale + mask) @ v` over the last two axes. Operands
    /// `q [..., Tq, D]`, `k [..., Tk, D]`, `v [..., Tk, Dv]` (equal batch dims) and, when
    /// `masked`, an additive mask broadcastable to `[..., Tq, Tk]`; the node is
    /// `[..., Tq, Dv]`. `causal` hides keys after each query (Tq = Tk). Built by
    /// `ops::attention` and the attention fusion pass (`passes::attention`).
    Attention {
        causal: bool,
        scale: f64,
        masked: bool,
    },
    /// The gradient of an `Attention` with the same fields: operands are its operands
    /// followed by the upstream gradient `[..., Tq, Dv]` and the `Attention` node itself
    /// (whose kernel keeps its probabilities for this one); the node is one flat f32 vector
    /// holding dq, dk and dv in that order (autodiff slices them apart). No gradient
    /// flows into the mask.
    AttentionBackward {
        causal: bool,
        scale: f64,
        masked: bool,
    },
    /// Writes the operand into the parameter or optimiser state of that name at the
    /// end of a training step.
    Assign(String),
}

/// Where a node came from in the source: the operation's name and its span.
#[derive(Clone, Debug)]
pub struct Origin {
    pub what: String,
    pub file: Arc<SourceFile>,
    pub span: Span,
}

impl Origin {
    pub fn location(&self) -> String {
        let (l, c) = self.file.line_col(self.span.start);
        let name = std::path::Path::new(&self.file.path)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.file.path.clone());
        format!("{name}:{l}:{c}")
    }
}

#[derive(Clone, Debug)]
pub struct Node {
    pub op: Op,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub origin: Option<Origin>,
}

#[derive(Clone, Debug)]
pub struct ParamInfo {
    pub name: String,
    pub node: NodeId,
    pub init: Init,
}

#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub g: DiGraph<Node, u32>,
    /// Data inputs, in declaration order.
    pub inputs: Vec<(String, NodeId)>,
    /// Trainable parameters, in declaration order (the checkpoint order).
    pub params: Vec<ParamInfo>,
    /// Named results the runtime reads: `loss`, the model's `output`s, and after the
    /// train passes `grad.<param>`, `lr`, `grad_norm`.
    pub outputs: Vec<(String, NodeId)>,
    /// The scalar being minimised.
    pub loss: Option<NodeId>,
    /// `(logits, targets, ignore_index)` of the last `cross_entropy` built: the model is a
    /// classifier and evaluation reports accuracy.
    pub classification: Option<(NodeId, NodeId, i64)>,
    /// The origin stamped on nodes added from now on (set by the elaborator).
    pub current_origin: Option<Origin>,
}

impl Graph {
    pub fn new() -> Self {
        Graph::default()
    }

    /// Adds a node; operands must already exist (this keeps indices topological).
    pub fn add(&mut self, op: Op, operands: &[NodeId], shape: Vec<usize>, dtype: DType) -> NodeId {
        let origin = self.current_origin.clone();
        let id = self.g.add_node(Node { op, shape, dtype, origin });
        for (pos, &o) in operands.iter().enumerate() {
            debug_assert!(o < id, "operands must precede their user");
            self.g.add_edge(o, id, pos as u32);
        }
        id
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.g[id]
    }

    pub fn shape(&self, id: NodeId) -> &[usize] {
        &self.g[id].shape
    }

    pub fn dtype(&self, id: NodeId) -> DType {
        self.g[id].dtype
    }

    /// Operands of a node in position order.
    pub fn operands(&self, id: NodeId) -> Vec<NodeId> {
        let mut es: Vec<(u32, NodeId)> = self.g.edges_directed(id, Direction::Incoming).map(|e| (*e.weight(), e.source())).collect();
        es.sort_by_key(|(p, _)| *p);
        es.into_iter().map(|(_, n)| n).collect()
    }

    /// Users of a node (each once, in index order).
    pub fn users(&self, id: NodeId) -> Vec<NodeId> {
        let mut us: Vec<NodeId> = self.g.neighbors_directed(id, Direction::Outgoing).collect();
        us.sort();
        us.dedup();
        us
    }

    pub fn node_ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.g.node_indices()
    }

    pub fn len(&self) -> usize {
        self.g.node_count()
    }

    pub fn is_empty(&self) -> bool {
        self.g.node_count() == 0
    }

    pub fn output(&self, name: &str) -> Option<NodeId> {
        self.outputs.iter().find(|(n, _)| n == name).map(|(_, id)| *id)
    }

    pub fn set_output(&mut self, name: &str, id: NodeId) {
        if let Some(slot) = self.outputs.iter_mut().find(|(n, _)| n == name) {
            slot.1 = id;
        } else {
            self.outputs.push((name.to_string(), id));
        }
    }

    /// A new graph's bookkeeping (inputs, params, outputs, loss, classification) from
    /// this one's, through `map` from old node ids to new ones. Passes that rebuild the
    /// graph (CSE, DCE) add the nodes, then call this.
    pub fn remapped_metadata(&self, out: &mut Graph, map: impl Fn(NodeId) -> NodeId) {
        out.inputs = self.inputs.iter().map(|(n, id)| (n.clone(), map(*id))).collect();
        out.params = self.params.iter().map(|p| ParamInfo { node: map(p.node), ..p.clone() }).collect();
        out.outputs = self.outputs.iter().map(|(n, id)| (n.clone(), map(*id))).collect();
        out.loss = self.loss.map(&map);
        out.classification = self.classification.map(|(l, t, i)| (map(l), map(t), i));
        out.current_origin = None;
    }

    /// Nodes reachable backwards from `roots` (their transitive operands and themselves).
    pub fn ancestors(&self, roots: &[NodeId]) -> Vec<bool> {
        let mut seen = vec![false; self.len()];
        let mut stack: Vec<NodeId> = roots.to_vec();
        while let Some(n) = stack.pop() {
            if std::mem::replace(&mut seen[n.index()], true) {
                continue;
            }
            stack.extend(self.operands(n));
        }
        seen
    }

    /// The stable text form of `bmc emit --stage graph|train`.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        for id in self.node_ids() {
            let n = &self.g[id];
            let args: Vec<String> = self.operands(id).iter().map(|o| format!("%{}", o.index())).collect();
            let _ = write!(s, "%{} = {}", id.index(), op_text(&n.op));
            if !args.is_empty() {
                let _ = write!(s, "({})", args.join(", "));
            }
            let _ = write!(s, " : {}{:?}", n.dtype.name(), n.shape);
            if let Some(o) = &n.origin {
                let _ = write!(s, "  # {} @ {}", o.what, o.location());
            }
            s.push('\n');
        }
        for p in &self.params {
            let _ = writeln!(s, "param {} = %{} init {}", p.name, p.node.index(), init_text(&p.init));
        }
        for (name, id) in &self.outputs {
            let _ = writeln!(s, "output {name} = %{}", id.index());
        }
        if let Some(l) = self.loss {
            let _ = writeln!(s, "loss = %{}", l.index());
        }
        s
    }

    /// Graphviz form for `--format dot`.
    pub fn to_dot(&self) -> String {
        let mut s = String::from("digraph bm {\n  node [shape=box, fontname=monospace];\n");
        for id in self.node_ids() {
            let n = &self.g[id];
            let label = format!("%{} {}\\n{}{:?}", id.index(), op_text(&n.op).replace('"', "\\\""), n.dtype.name(), n.shape);
            let _ = writeln!(s, "  n{} [label=\"{}\"];", id.index(), label);
        }
        for e in self.g.edge_references() {
            let _ = writeln!(s, "  n{} -> n{} [label=\"{}\"];", e.source().index(), e.target().index(), e.weight());
        }
        for (name, id) in &self.outputs {
            let _ = writeln!(s, "  out_{0} [label=\"{1}\", shape=ellipse];\n  n{2} -> out_{0};", sanitize(name), name, id.index());
        }
        s.push_str("}\n");
        s
    }

    /// A JSON form for `--format json`.
    pub fn to_json(&self) -> serde_json::Value {
        let nodes: Vec<serde_json::Value> = self
            .node_ids()
            .map(|id| {
                let n = &self.g[id];
                serde_json::json!({
                    "id": id.index(),
                    "op": op_text(&n.op),
                    "operands": self.operands(id).iter().map(|o| o.index()).collect::<Vec<_>>(),
                    "dtype": n.dtype.name(),
                    "shape": n.shape,
                    "origin": n.origin.as_ref().map(|o| format!("{} @ {}", o.what, o.location())),
                })
            })
            .collect();
        serde_json::json!({
            "nodes": nodes,
            "params": self.params.iter().map(|p| serde_json::json!({"name": p.name, "node": p.node.index(), "init": init_text(&p.init)})).collect::<Vec<_>>(),
            "outputs": self.outputs.iter().map(|(n, id)| serde_json::json!({"name": n, "node": id.index()})).collect::<Vec<_>>(),
            "loss": self.loss.map(|l| l.index()),
        })
    }
}

fn sanitize(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect()
}

pub fn init_text(init: &Init) -> String {
    match init {
        Init::Zeros => "zeros()".into(),
        Init::Ones => "ones()".into(),
        Init::Constant(v) => format!("constant({v})"),
        Init::Normal { mean, std } => format!("normal({mean}, {std})"),
        Init::Uniform { low, high } => format!("uniform({low}, {high})"),
    }
}

fn attention_flags(causal: bool, masked: bool) -> &'static str {
    match (causal, masked) {
        (true, true) => "causal, masked, ",
        (true, false) => "causal, ",
        (false, true) => "masked, ",
        (false, false) => "",
    }
}

pub fn op_text(op: &Op) -> String {
    match op {
        Op::Input(n) => format!("input \"{n}\""),
        Op::Param(n) => format!("param \"{n}\""),
        Op::State(n) => format!("state \"{n}\""),
        Op::Hyper(n) => format!("hyper \"{n}\""),
        Op::Const(v) => format!("const {v}"),
        Op::Iota(a) => format!("iota[{a}]"),
        Op::Unary(u) => format!("{u:?}").to_lowercase(),
        Op::Binary(b) => format!("{b:?}").to_lowercase(),
        Op::Select => "select".into(),
        Op::Reduce(r, axes) => format!("reduce_{}{axes:?}", format!("{r:?}").to_lowercase()),
        Op::Broadcast => "broadcast".into(),
        Op::Reshape => "reshape".into(),
        Op::Permute(p) => format!("permute{p:?}"),
        Op::Slice { axis, start, end } => format!("slice[axis {axis}, {start}..{end}]"),
        Op::Pad { axis, before, after } => format!("pad[axis {axis}, {before}, {after}]"),
        Op::Concat(a) => format!("concat[axis {a}]"),
        Op::MatMul => "matmul".into(),
        Op::Gather => "gather".into(),
        Op::ScatterAdd { rows } => format!("scatter_add[rows {rows}]"),
        Op::Cast(d) => format!("cast[{}]", d.name()),
        Op::Attention { causal, scale, masked } => format!("attention[{}scale {scale}]", attention_flags(*causal, *masked)),
        Op::AttentionBackward { causal, scale, masked } => {
            format!("attention_backward[{}scale {scale}]", attention_flags(*causal, *masked))
        }
        Op::Assign(n) => format!("assign \"{n}\""),
    }
}
