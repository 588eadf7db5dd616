//! The pipeline end to end: read and parse the model and its imports, evaluate config
//! and the train section, load the data's shapes, elaborate the graph, append the
//! training step and lower it. Each stage's result is kept for `bmc emit`.

use crate::elaborate::{BlockSource, ElabInput, Elaborator, Scope, Value, parse_override};
use crate::graph::{DType, Graph};
use crate::passes::optimizer::{self, TrainSetup};
use crate::timings::timed;
use crate::train_config::{self, TrainSection};
use bm_grammar::ast::{self, Item};
use bm_grammar::diagnostic::suggest;
use bm_grammar::{Diagnostic, SourceFile};
use bm_runtime::bundle::{Bundle, Sources, TrainConfig};
use bm_runtime::data::Dataset;
use bm_runtime::kir::Program;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const PRELUDE: &str = include_str!("elaborate/prelude.bm");
const MAX_IMPORT_DEPTH: usize = 64;

/// Where source files come from: the disk, or the sources a training binary carries.
pub enum FileSource<'a> {
    Disk,
    Memory(&'a [(String, String)]),
}

impl FileSource<'_> {
    fn read(&self, path: &str) -> Option<String> {
        match self {
            FileSource::Disk => std::fs::read_to_string(path).ok(),
            FileSource::Memory(files) => files.iter().find(|(p, _)| p == path).map(|(_, t)| t.clone()),
        }
    }
}

/// The parsed model file with every block in scope.
pub struct Loaded {
    pub main: Arc<SourceFile>,
    pub ast: ast::File,
    pub blocks: HashMap<String, BlockSource>,
    /// Every user file read (main first), for bundling into binaries.
    pub files: Vec<Arc<SourceFile>>,
}

fn io_error(path: &str, e: &str) -> Diagnostic {
    Diagnostic::new(format!("cannot read `{path}`: {e}"))
}

/// Reads and parses `path` and everything it imports.
pub fn load(path: &str, source: &FileSource) -> Result<Loaded, Diagnostic> {
    let text = match source {
        FileSource::Disk => std::fs::read(path).map_err(|e| io_error(path, &e.to_string())).and_then(|b| {
            String::from_utf8(b).map_err(|_| Diagnostic::new(format!("`{path}` is not UTF-8 text")).with_help("a .bm file is plain text"))
        })?,
        FileSource::Memory(_) => source.read(path).ok_or_else(|| io_error(path, "not in the bundled sources"))?,
    };
    let main = SourceFile::new(path, text);
    let ast = bm_grammar::parse(&main)?;
    let mut blocks: HashMap<String, BlockSource> = HashMap::new();
    let prelude = SourceFile::new("<prelude>", PRELUDE);
    let prelude_ast = bm_grammar::parse(&prelude)?;
    add_blocks(&prelude_ast, &prelude, &mut blocks)?;
    let mut files = vec![main.clone()];
    let mut stack = vec![path.to_string()];
    resolve_imports(&ast, &main, source, &mut blocks, &mut files, &mut stack)?;
    add_blocks(&ast, &main, &mut blocks)?;
    Ok(Loaded { main, ast, blocks, files })
}

fn add_blocks(file_ast: &ast::File, file: &Arc<SourceFile>, blocks: &mut HashMap<String, BlockSource>) -> Result<(), Diagnostic> {
    for item in &file_ast.items {
        if let Item::Block(b) = item {
            if let Some(prev) = blocks.get(&b.name.name) {
                let mut d = Diagnostic::at(file, b.name.span, format!("block `{}` is defined twice", b.name.name), "defined again here");
                if prev.file.path == "<prelude>" {
                    d = d.with_help(format!("`{}` is a standard block; give yours another name", b.name.name));
                } else {
                    d = d.with_secondary(&prev.file, prev.def.name.span, "first defined here");
                }
                return Err(d);
            }
            blocks.insert(b.name.name.clone(), BlockSource { def: b.clone(), file: file.clone() });
        }
    }
    Ok(())
}

fn resolve_imports(
    file_ast: &ast::File,
    file: &Arc<SourceFile>,
    source: &FileSource,
    blocks: &mut HashMap<String, BlockSource>,
    files: &mut Vec<Arc<SourceFile>>,
    stack: &mut Vec<String>,
) -> Result<(), Diagnostic> {
    for item in &file_ast.items {
        let Item::Import { path, span } = item else { continue };
        let base = Path::new(&file.path).parent().unwrap_or(Path::new(""));
        let full = base.join(path).to_string_lossy().into_owned();
        if stack.contains(&full) {
            return Err(Diagnostic::at(
                file,
                *span,
                format!("import cycle: {} -> {full}", stack.join(" -> ")),
                "imports a file that imports this one",
            ));
        }
        if files.iter().any(|f| f.path == full) {
            continue;
        }
        if stack.len() > MAX_IMPORT_DEPTH {
            return Err(Diagnostic::at(file, *span, "imports are nested too deeply", "here"));
        }
        let Some(text) = source.read(&full) else {
            return Err(Diagnostic::at(file, *span, format!("cannot read the imported file `{full}`"), "imported here")
                .with_help("import paths are relative to the importing file"));
        };
        let f = SourceFile::new(full.clone(), text);
        let sub = bm_grammar::parse(&f)?;
        files.push(f.clone());
        stack.push(full);
        resolve_imports(&sub, &f, source, blocks, files, stack)?;
        stack.pop();
        add_blocks(&sub, &f, blocks)?;
    }
    Ok(())
}

/// Compile options from the command line.
#[derive(Clone, Debug, Default)]
pub struct Options {
    pub overrides: Vec<(String, String)>,
    pub batch: Option<usize>,
    /// Replaces the train section's data path.
    pub data: Option<PathBuf>,
    /// Per-example data shapes to use instead of reading the data (a training binary
    /// re-specialising itself carries them, as its data may live elsewhere).
    pub data_shapes: Option<Vec<(String, bm_runtime::kir::DType, Vec<usize>)>>,
}

/// Everything the pipeline produced, stage by stage.
pub struct Compiled {
    pub model_name: String,
    pub config: Vec<(String, Value)>,
    pub train: TrainSection,
    /// The shaped op graph of the model (forward and loss), as elaborated and cleaned up.
    pub graph: Graph,
    /// `graph` after the fusion passes (attention); what training is built from.
    pub fused: Graph,
    /// The whole training step.
    pub train_graph: Graph,
    pub program: Program,
    /// Per-example shapes of the data tensors the model was checked against.
    pub data_shapes: Vec<(String, (DType, Vec<usize>))>,
}

/// How far to run the pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    Graph,
    Train,
    Kernels,
}

pub fn find_model(loaded: &Loaded) -> Result<BlockSource, Diagnostic> {
    let models: Vec<&ast::BlockDef> = loaded.ast.items.iter().filter_map(|i| if let Item::Model(m) = i { Some(m) } else { None }).collect();
    match models.as_slice() {
        [m] => Ok(BlockSource { def: (*m).clone(), file: loaded.main.clone() }),
        [] => Err(Diagnostic::at(
            &loaded.main,
            ast::Span::new(0, 0),
            format!("`{}` has no model", loaded.main.path),
            "expected `model Name { ... }` in this file",
        )
        .with_help("a compiled file declares exactly one `model`; files with only blocks are imported by others")),
        [_, second, ..] => Err(Diagnostic::at(&loaded.main, second.name.span, "a file declares exactly one model", "second model")),
    }
}

/// Evaluates `config` with `--set` overrides applied.
pub fn eval_config(loaded: &Loaded, overrides: &[(String, String)]) -> Result<Vec<(String, Value)>, Diagnostic> {
    let mut entries: Vec<(String, Value)> = vec![];
    let blocks = HashMap::new();
    let fields: Vec<&ast::Field> = loaded
        .ast
        .items
        .iter()
        .flat_map(|i| if let Item::Config { entries, .. } = i { entries.iter().collect() } else { vec![] })
        .collect();
    for f in &fields {
        if entries.iter().any(|(n, _)| *n == f.name.name) {
            return Err(Diagnostic::at(&loaded.main, f.name.span, format!("config `{}` is defined twice", f.name.name), "duplicate"));
        }
        let v = match overrides.iter().rev().find(|(k, _)| *k == f.name.name) {
            Some((_, v)) => parse_override(v),
            None => {
                let input = ElabInput { model: None, blocks: &blocks, config: &entries, batch: 1, data_shapes: None };
                let mut el = Elaborator::new(&input);
                let scope = Scope { file: loaded.main.clone(), locals: vec![HashMap::new()], inst: None };
                el.eval_const(&f.value, &scope)?
            }
        };
        entries.push((f.name.name.clone(), v));
    }
    for (k, _) in overrides {
        if !entries.iter().any(|(n, _)| n == k) {
            let mut d = Diagnostic::new(format!("--set {k}=...: `{}` has no config constant `{k}`", loaded.main.path));
            if let Some(s) = suggest(k, entries.iter().map(|(n, _)| n.as_str())) {
                d = d.with_help(format!("did you mean `{s}`?"));
            } else if entries.is_empty() {
                d = d.with_help("the file has no `config { ... }` section");
            } else {
                d = d.with_help(format!("config constants: {}", entries.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")));
            }
            return Err(d);
        }
    }
    Ok(entries)
}

/// Runs the pipeline up to `stage`.
pub fn compile(loaded: &Loaded, opts: &Options, stage: Stage) -> Result<Compiled, Diagnostic> {
    let model = find_model(loaded)?;
    let config = eval_config(loaded, &opts.overrides)?;
    let mut train = train_config::evaluate(loaded, &config)?;
    if let Some(b) = opts.batch {
        train.batch = b;
    }
    if let Some(d) = &opts.data
        && let Some(spec) = &mut train.data
    {
        spec.set_path(d.to_string_lossy());
    }
    let to_graph_dtype = |d: bm_runtime::kir::DType| if d == bm_runtime::kir::DType::I32 { DType::I32 } else { DType::F32 };
    let mut dataset = None;
    let data_shapes = match (&train.data, &opts.data_shapes) {
        (Some(_), Some(known)) => {
            Some(known.iter().map(|(n, d, s)| (n.clone(), (to_graph_dtype(*d), s.clone()))).collect::<HashMap<_, _>>())
        }
        (Some(spec), None) => {
            let ds = Dataset::load(spec).map_err(|e| {
                let msg = match e {
                    bm_runtime::Error::User(m) | bm_runtime::Error::Internal(m) => m,
                };
                let mut d = Diagnostic::at(&loaded.main, train.data_span, format!("bad data: {msg}"), "data declared here");
                if !Path::new(spec.path()).exists() {
                    d = d.with_help("relative data paths are relative to the .bm file; pass --data PATH to use another file");
                }
                d
            })?;
            let shapes: HashMap<String, (DType, Vec<usize>)> =
                ds.names_and_shapes().into_iter().map(|(n, d, s)| (n, (to_graph_dtype(d), s))).collect();
            train.resolve_epochs(&ds);
            dataset = Some(ds);
            Some(shapes)
        }
        (None, _) => None,
    };
    let input =
        ElabInput { model: Some(&model), blocks: &loaded.blocks, config: &config, batch: train.batch, data_shapes: data_shapes.as_ref() };
    let mut graph = timed("elaborate", || Elaborator::new(&input).elaborate_model())?;
    if let Some(shapes) = &data_shapes {
        check_inputs_against_data(loaded, &model, &graph, shapes, &train)?;
    }
    if let (Some(ds), Some(l)) = (&dataset, labels(&graph))
        && let Some(bad) = ds.label_out_of_range(&l.input, l.classes, l.ignore_index)
    {
        let loss = graph.loss.and_then(|n| graph.node(n).origin.as_ref().map(|o| o.span)).unwrap_or(model.def.name.span);
        return Err(Diagnostic::at(&loaded.main, loss, l.message(ds.spec().path(), ds.is_stream(), bad), "this loss").with_secondary(
            &loaded.main,
            train.data_span,
            "data declared here",
        ));
    }
    crate::passes::metrics::append_accuracy(&mut graph);
    let graph = timed("simplify", || simplify(&graph));
    let mut fused = timed("fuse_attention", || crate::passes::attention::fuse_attention(&graph));
    let model_name = model.def.name.name.clone();
    let mut data_shapes: Vec<(String, (DType, Vec<usize>))> = data_shapes.unwrap_or_default().into_iter().collect();
    data_shapes.sort_by(|a, b| a.0.cmp(&b.0));
    let mut compiled = Compiled {
        model_name,
        config,
        train,
        graph,
        fused: fused.clone(),
        train_graph: Graph::new(),
        program: Program { buffers: vec![], kernels: vec![], entries: vec![], params: vec![] },
        data_shapes,
    };
    if stage == Stage::Graph {
        return Ok(compiled);
    }
    let setup = TrainSetup {
        optimizer: compiled.train.optimizer.clone(),
        schedule: compiled.train.schedule.clone(),
        clip_grad: compiled.train.clip_grad,
    };
    timed("training (autodiff, optimiser)", || optimizer::append_training(&mut fused, &setup))
        .map_err(|e| Diagnostic::new(format!("internal error while building the training step: {e}")))?;
    compiled.train_graph = timed("simplify", || simplify(&fused));
    if stage == Stage::Train {
        return Ok(compiled);
    }
    compiled.program =
        crate::lower::lower(&compiled.train_graph).map_err(|e| Diagnostic::new(format!("internal error while lowering: {e}")))?;
    crate::precision::apply(&mut compiled.program, &compiled.train.precision);
    Ok(compiled)
}

/// The clean-up passes run after elaboration and after the training passes.
fn simplify(g: &Graph) -> Graph {
    let g = crate::passes::cse::eliminate_common_subexpressions(g);
    let g = crate::passes::pads::concat_disjoint_pads(&g);
    crate::passes::dce::eliminate_dead_code(&g)
}

fn check_inputs_against_data(
    loaded: &Loaded,
    model: &BlockSource,
    g: &Graph,
    shapes: &HashMap<String, (DType, Vec<usize>)>,
    train: &TrainSection,
) -> Result<(), Diagnostic> {
    let gives = || {
        let mut v: Vec<String> = shapes.iter().map(|(n, (d, s))| format!("`{n}`: {}{s:?}", d.name())).collect();
        v.sort();
        v.join(", ")
    };
    for (name, id) in &g.inputs {
        let span = g.node(*id).origin.as_ref().map(|o| o.span).unwrap_or(model.def.name.span);
        let data_kind = train.data.as_ref().map(|d| d.kind()).unwrap_or("data");
        match shapes.get(name) {
            None => {
                let mut d = Diagnostic::at(
                    &loaded.main,
                    span,
                    format!("the model's input `{name}` is not given by the data: `{data_kind}` gives {}", gives()),
                    "declared here",
                )
                .with_secondary(&loaded.main, train.data_span, "data declared here");
                // Suggest among the data's tensors that no other input already takes.
                if let Some(s) = suggest(name, shapes.keys().map(String::as_str).filter(|k| !g.inputs.iter().any(|(n, _)| n == k))) {
                    d = d.with_help(format!("did you mean `{s}`?"));
                }
                return Err(d);
            }
            Some((dt, s)) => {
                let shape = g.shape(*id);
                if shape.get(1..) != Some(&s[..]) || *dt != g.dtype(*id) {
                    return Err(Diagnostic::at(
                        &loaded.main,
                        span,
                        format!(
                            "the model's input `{name}` is {}{:?} per example, but the data gives {}{s:?}",
                            g.dtype(*id).name(),
                            shape.get(1..).unwrap_or(&[]),
                            dt.name()
                        ),
                        "declared here",
                    )
                    .with_secondary(&loaded.main, train.data_span, "data declared here")
                    .with_note("the first dim of an input is the batch `B`; the rest must match one example of the data"));
                }
            }
        }
    }
    Ok(())
}

/// The input holding a classifier's labels, when the cross-entropy reads one directly.
fn labels(g: &Graph) -> Option<bm_runtime::bundle::Labels> {
    let (logits, targets, ignore_index) = g.classification?;
    let crate::graph::Op::Input(input) = &g.node(targets).op else { return None };
    let classes = *g.shape(logits).last()?;
    Some(bm_runtime::bundle::Labels { input: input.clone(), classes, ignore_index })
}

/// Packs a compiled model into what a training binary carries.
pub fn bundle(loaded: &Loaded, opts: &Options, c: &Compiled) -> Bundle {
    let train = TrainConfig {
        data: c.train.data.clone(),
        batch: c.train.batch,
        steps: c.train.steps,
        epochs: c.train.epochs,
        eval_every: c.train.eval_every,
        eval_batches: c.train.eval_batches,
        checkpoint_every: c.train.checkpoint_every,
        seed: c.train.seed,
        precision: c.train.precision.clone(),
        device: c.train.device.clone(),
        classification: c.train_graph.output("accuracy").is_some() || c.graph.output("accuracy").is_some(),
        labels: labels(&c.graph),
        summary: c.train.summary.clone(),
    };
    Bundle {
        model: c.model_name.clone(),
        program: c.program.clone(),
        train,
        sources: Sources {
            main: loaded.main.path.clone(),
            files: loaded.files.iter().map(|f| (f.path.clone(), f.text.clone())).collect(),
            overrides: opts.overrides.clone(),
            data_shapes: c
                .data_shapes
                .iter()
                .map(|(n, (d, s))| {
                    (n.clone(), if *d == DType::I32 { bm_runtime::kir::DType::I32 } else { bm_runtime::kir::DType::F32 }, s.clone())
                })
                .collect(),
        },
        info: crate::info::report(c),
        config: c.config.iter().map(|(k, v)| (k.clone(), v.text())).collect(),
    }
}

/// Re-runs the pipeline from bundled sources (inside a training binary): for another
/// batch size and overrides, or the one-token decode program of `passes::decode`.
pub fn respecialise(sources: &Sources, spec: &bm_runtime::cli::Specialise) -> bm_runtime::Result<Bundle> {
    // `Error::user` adds its own `error: ` prefix when displayed.
    let user = |d: Diagnostic| {
        let text = d.render(false);
        bm_runtime::Error::user(text.strip_prefix("error: ").unwrap_or(&text).trim_end().to_string())
    };
    let loaded = load(&sources.main, &FileSource::Memory(&sources.files)).map_err(user)?;
    let mut overrides = sources.overrides.clone();
    overrides.extend(spec.overrides.iter().cloned());
    let opts = Options { overrides, batch: Some(spec.batch), data: None, data_shapes: Some(sources.data_shapes.clone()) };
    if spec.decode {
        let c = compile(&loaded, &opts, Stage::Graph).map_err(user)?;
        let program = decode_program(&c).map_err(bm_runtime::Error::user)?;
        return Ok(Bundle { program, ..bundle(&loaded, &opts, &c) });
    }
    let c = compile(&loaded, &opts, Stage::Kernels).map_err(user)?;
    Ok(bundle(&loaded, &opts, &c))
}

/// The one-token decode program of a compiled causal language model (its `logits`),
/// or why there is none.
pub fn decode_program(c: &Compiled) -> Result<Program, String> {
    let g = crate::passes::decode::decode_graph(&c.fused, "logits")?;
    let mut p = crate::lower::lower(&g).map_err(|e| format!("internal error while lowering the decode graph: {e}"))?;
    crate::precision::apply(&mut p, &c.train.precision);
    Ok(p)
}
