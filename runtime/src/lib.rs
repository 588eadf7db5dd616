//! The bmc runtime: everything a training binary does at run time.
//!
//! - [`kir`]: the kernel IR, the contract with the compiler.
//! - [`exec`]: allocates a program's buffers and runs its entries, through
//!   [`jit`] (Cranelift) for loop kernels and [`gemm`] for matrix products;
//!   [`interp`] is the slow reference interpreter the JIT is tested against;
//!   [`attention`] holds the fused attention kernels, whose small per-block products
//!   are [`tiles`]'s; [`cpu`] picks the vector width of these hand-written kernels.
//!   [`groups`] schedules runs of row-local kernels (and matrix products) chunk by chunk.
//! - [`rng`] and [`init`]: deterministic random numbers and parameter initialisers.
//! - [`data`]: data sources (csv, safetensors, text, tokens) and batching.
//! - [`checkpoint`]: atomic safetensors checkpoints with PyTorch names.
//! - [`metrics`]: metrics.jsonl, TensorBoard event files, loss.svg.
//! - [`bundle`]: the payload a training binary carries; [`session`] runs it;
//!   [`cli`] is the training binary's command line and training loop.

pub mod attention;
pub mod bench;
pub mod bundle;
pub mod checkpoint;
pub mod cli;
pub mod cpu;
pub mod cuda;
pub mod data;
pub mod engine;
pub mod error;
pub mod exec;
pub mod formulas;
pub mod gemm;
pub mod groups;
pub mod init;
pub mod interp;
pub mod jit;
pub mod kir;
pub mod metrics;
pub mod rng;
pub mod rows;
pub mod sample;
pub mod session;
mod switch;
pub mod tiles;

pub use error::{Error, Result};
