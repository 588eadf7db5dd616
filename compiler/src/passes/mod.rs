//! Graph-to-graph passes, one job per file.

pub mod attention;
pub mod autodiff;
pub mod cse;
pub mod dce;
pub mod decode;
pub mod metrics;
pub mod optimizer;
pub mod pads;
