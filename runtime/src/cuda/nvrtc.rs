//! NVRTC: generated CUDA C → PTX, cached on disk by a hash of the source and options
//! so that a binary's second start skips compilation.

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::path::PathBuf;

/// The virtual architecture PTX is generated for: Hopper (H100/H200). PTX for it JITs
/// on any later GPU too.
pub const DEFAULT_ARCH: &str = "compute_90";

/// Whether NVRTC can be loaded; the error names the library and how to provide it.
pub fn available() -> Result<()> {
    // SAFETY: only tries to dlopen the candidate library names.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::user(
            "the CUDA backend needs NVRTC (libnvrtc.so.13), which was not found: install the CUDA toolkit or \
             `pip install nvidia-cuda-nvrtc` and add its lib folder (…/site-packages/nvidia/cu13/lib) to LD_LIBRARY_PATH",
        ))
    }
}

/// Compiles `source` to PTX for `arch` (e.g. `compute_90`).
pub fn compile(source: &str, arch: &'static str) -> Result<String> {
    available()?;
    // Warning 177 (an unused index variable) is expected in generated code.
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        options: vec!["--std=c++17".into(), "--diag-suppress=177".into()],
        ..Default::default()
    };
    match cudarc::nvrtc::compile_ptx_with_opts(source, opts) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(cudarc::nvrtc::CompileError::CompileError { log, .. }) => {
            Err(Error::internal(format!("NVRTC rejected the generated CUDA C:\n{}", log.to_string_lossy())))
        }
        Err(e) => Err(Error::internal(format!("NVRTC failed: {e}"))),
    }
}

/// Where compiled PTX is cached: `$BMC_CACHE_DIR`, else `$XDG_CACHE_HOME/bmc`, else
/// `~/.cache/bmc`.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("BMC_CACHE_DIR") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("bmc"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("bmc"))
}

/// [`compile`] through the disk cache. A cache that cannot be read or written only
/// costs a compilation.
pub fn cached(source: &str, arch: &'static str) -> Result<String> {
    let mut h = Sha256::new();
    h.update(arch.as_bytes());
    h.update([0]);
    h.update(source.as_bytes());
    let key: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let path = cache_dir().map(|d| d.join("cuda").join(format!("{key}.ptx")));
    if let Some(p) = &path
        && let Ok(ptx) = std::fs::read_to_string(p)
    {
        return Ok(ptx);
    }
    let ptx = compile(source, arch)?;
    if let Some(p) = &path {
        if let Some(dir) = p.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &ptx).is_ok() {
            let _ = std::fs::rename(&tmp, p);
        }
    }
    Ok(ptx)
}
