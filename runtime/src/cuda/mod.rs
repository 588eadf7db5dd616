//! The CUDA backend: CUDA C generated from the kernel IR ([`codegen`]), compiled with
//! NVRTC at start-up and cached on disk ([`nvrtc`]).
//!
//! CUDA libraries are loaded at run time (cudarc's dynamic loading): a machine without
//! them builds and runs everything else, and asking for CUDA there is a clear error
//! naming the missing library. cudarc panics when a library is missing, so every entry
//! point checks presence first.

pub mod codegen;
pub mod device;
pub mod nvrtc;
