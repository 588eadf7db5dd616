//! `bmc emit`: the text, Graphviz or JSON form of one pipeline stage.

use crate::driver::{self, Loaded, Options, Stage};
use clap::ValueEnum;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum EmitStage {
    Ast,
    Graph,
    Fused,
    Train,
    /// The one-token decode graph `sample` runs with a KV cache (batch 1).
    Decode,
    Kernels,
    Clif,
    Cuda,
}

impl EmitStage {
    pub const ALL: [EmitStage; 8] = [
        EmitStage::Ast,
        EmitStage::Graph,
        EmitStage::Fused,
        EmitStage::Train,
        EmitStage::Decode,
        EmitStage::Kernels,
        EmitStage::Clif,
        EmitStage::Cuda,
    ];
    pub fn name(self) -> &'static str {
        match self {
            EmitStage::Ast => "ast",
            EmitStage::Graph => "graph",
            EmitStage::Fused => "fused",
            EmitStage::Train => "train",
            EmitStage::Decode => "decode",
            EmitStage::Kernels => "kernels",
            EmitStage::Clif => "clif",
            EmitStage::Cuda => "cuda",
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Format {
    Text,
    Dot,
    Json,
}

#[derive(Debug)]
pub enum EmitError {
    Source(Box<bm_grammar::Diagnostic>),
    Runtime(bm_runtime::Error),
    Usage(String),
}

impl From<bm_grammar::Diagnostic> for EmitError {
    fn from(d: bm_grammar::Diagnostic) -> Self {
        EmitError::Source(Box::new(d))
    }
}

/// The text of one stage, as `bmc emit` prints it. Text forms are stable and
/// deterministic: they are what the snapshot tests hold.
pub fn emit(loaded: &Loaded, opts: &Options, stage: EmitStage, format: Format) -> Result<String, EmitError> {
    let graph_out = |g: &crate::graph::Graph| match format {
        Format::Text => g.to_text(),
        Format::Dot => g.to_dot(),
        Format::Json => serde_json::to_string_pretty(&g.to_json()).unwrap_or_default() + "\n",
    };
    let no_dot = |what: &str| EmitError::Usage(format!("--format dot is for graph stages; `{what}` is not a graph"));
    Ok(match stage {
        EmitStage::Ast => match format {
            Format::Json => serde_json::to_string_pretty(&loaded.ast).unwrap_or_default() + "\n",
            Format::Text => format!("{:#?}\n", loaded.ast),
            Format::Dot => return Err(no_dot("ast")),
        },
        EmitStage::Graph => graph_out(&driver::compile(loaded, opts, Stage::Graph)?.graph),
        // After the fusion passes (attention).
        EmitStage::Fused => graph_out(&driver::compile(loaded, opts, Stage::Graph)?.fused),
        EmitStage::Train => graph_out(&driver::compile(loaded, opts, Stage::Train)?.train_graph),
        EmitStage::Decode => {
            let opts = Options { batch: Some(1), ..opts.clone() };
            let c = driver::compile(loaded, &opts, Stage::Graph)?;
            let g = crate::passes::decode::decode_graph(&c.fused, "logits")
                .map_err(|why| EmitError::Usage(format!("--stage decode: `{}` has no one-token decode graph: {why}", c.model_name)))?;
            graph_out(&g)
        }
        EmitStage::Kernels => {
            let c = driver::compile(loaded, opts, Stage::Kernels)?;
            match format {
                Format::Text => c.program.to_text(),
                Format::Json => serde_json::to_string_pretty(&c.program).unwrap_or_default() + "\n",
                Format::Dot => return Err(no_dot("kernels")),
            }
        }
        EmitStage::Clif => {
            let c = driver::compile(loaded, opts, Stage::Kernels)?;
            if format != Format::Text {
                return Err(EmitError::Usage("the clif stage is text only".into()));
            }
            bm_runtime::jit::clif_text(&c.program).map_err(EmitError::Runtime)?
        }
        EmitStage::Cuda => {
            let c = driver::compile(loaded, opts, Stage::Kernels)?;
            if format != Format::Text {
                return Err(EmitError::Usage("the cuda stage is text only".into()));
            }
            bm_runtime::cuda::codegen::generate(&c.program).source
        }
    })
}
