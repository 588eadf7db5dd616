//! The bmc compiler: from a parsed `.bm` file to a kernel IR program.
//!
//! Pipeline (see ARCHITECTURE.md): `elaborate` builds the shaped op [`graph`] from the
//! AST, using the builders in [`ops`]; [`passes`] turn it into the training graph
//! (autodiff, optimiser); [`lower`] produces the runtime's kernel IR. [`eval`] is an
//! f64 reference evaluator of graphs used by the gradient tests.

// Errors carry a whole `Diagnostic` (spans, labels, notes): large, but only on the
// cold path that ends compilation, so boxing them would buy nothing.
#![allow(clippy::result_large_err)]

pub mod driver;
pub mod elaborate;
pub mod emit;
pub mod eval;
pub mod fuse_chains;
pub mod fuse_sums;
pub mod graph;
pub mod info;
pub mod inplace;
pub mod lower;
pub mod ops;
pub mod passes;
pub mod plan;
pub mod points;
pub mod precision;
pub mod sink;
pub mod timings;
pub mod train_config;
