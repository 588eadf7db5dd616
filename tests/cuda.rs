//! The CUDA backend.
//!
//! Without a GPU: the CUDA C generated for every model in `models/` (training step, and
//! the decode program for language models) compiles to PTX with NVRTC, and every kernel
//! the launch plan names is in the PTX. NVRTC is loaded at run time; where it is missing
//! that test prints why and passes, unless `BMC_REQUIRE_NVRTC=1` (CI sets it after
//! `pip install nvidia-cuda-nvrtc`), so a kernel that does not compile fails CI.
//!
//! With a GPU (else they print why and pass): every model's loss, gradients and three
//! training steps on the GPU equal the CPU's within 1e-4 relative (`scripts/gpu-check.sh`
//! runs these with the rest of the GPU checks).

use bm_runtime::cuda::codegen::{Launch, generate};
use bm_runtime::cuda::nvrtc;
use bm_runtime::data::{Batcher, Dataset};
use bm_runtime::engine::Device;
use bm_runtime::rng::Rng;
use bm_runtime::session::Session;
use bmc::driver::{self, FileSource, Options, Stage};
use std::path::{Path, PathBuf};

fn models() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("models");
    let mut v: Vec<PathBuf> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "bm")).collect();
    v.sort();
    v
}

#[test]
fn generated_cuda_compiles_to_ptx_for_every_model() {
    if let Err(e) = nvrtc::available() {
        if std::env::var_os("BMC_REQUIRE_NVRTC").is_some_and(|v| v == "1") {
            panic!("BMC_REQUIRE_NVRTC=1 but NVRTC cannot be loaded: {e}");
        }
        println!("skipped: {e}");
        return;
    }
    for path in models() {
        let loaded = driver::load(path.to_str().unwrap(), &FileSource::Disk).unwrap_or_else(|d| panic!("{d}"));
        let c = driver::compile(&loaded, &Options::default(), Stage::Kernels).unwrap_or_else(|d| panic!("{d}"));
        let mut programs = vec![("train", c.program)];
        let one = Options { batch: Some(1), ..Options::default() };
        if let Ok(p) = driver::decode_program(&driver::compile(&loaded, &one, Stage::Graph).unwrap()) {
            programs.push(("decode", p));
        }
        for (what, program) in programs {
            let module = generate(&program);
            let ptx = nvrtc::compile(&module.source, nvrtc::DEFAULT_ARCH).unwrap_or_else(|e| panic!("{} ({what}): {e}", path.display()));
            for l in &module.launches {
                if let Launch::Grid { name, .. } | Launch::ZeroThen { name, .. } = l {
                    assert!(ptx.contains(&format!(".entry {name}(")), "{} ({what}): no kernel {name} in the PTX", path.display());
                }
            }
            println!("{} ({what}): {} kernels, {} bytes of PTX", path.display(), module.launches.len(), ptx.len());
        }
    }
}

/// `true` when a GPU is here; else prints why the calling test is skipped.
fn gpu() -> bool {
    match bm_runtime::cuda::device::gpu_available() {
        Ok(()) => true,
        Err(e) => {
            println!("skipped (no GPU): {e}");
            false
        }
    }
}

fn assert_close(gpu: &[f32], cpu: &[f32], rel: f64, what: &str) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths");
    let scale = cpu.iter().map(|x| x.abs() as f64).fold(0.0, f64::max).max(1e-6);
    for (i, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        let err = (*g as f64 - *c as f64).abs();
        assert!(err <= rel * (c.abs() as f64).max(scale * 1e-2), "{what}[{i}]: GPU {g} vs CPU {c}");
    }
}

#[test]
fn every_model_on_the_gpu_matches_the_cpu() {
    if !gpu() {
        return;
    }
    for path in models() {
        let loaded = driver::load(path.to_str().unwrap(), &FileSource::Disk).unwrap_or_else(|d| panic!("{d}"));
        let c = driver::compile(&loaded, &Options::default(), Stage::Kernels).unwrap_or_else(|d| panic!("{d}"));
        let bundle = driver::bundle(&loaded, &Options::default(), &c);
        let ds = Dataset::load(bundle.train.data.as_ref().unwrap()).unwrap();
        let mut sessions: Vec<Session> =
            [Device::Cpu, Device::Cuda].into_iter().map(|d| Session::on(bundle.clone(), d, 2).unwrap()).collect();
        for s in &mut sessions {
            s.init_params(1).unwrap();
        }
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let mut batcher = Batcher::new(&ds, bundle.train.batch, 7).unwrap();
        for step in 0..3u64 {
            let batch = batcher.next_batch();
            let mut results = vec![];
            for s in &mut sessions {
                s.feed(&batch, "test").unwrap();
                s.set_hypers(step, 3, true, &mut Rng::new(step)).unwrap();
                s.run("grad").unwrap();
                results.push(s.results("grad").unwrap());
                s.set_hypers(step, 3, true, &mut Rng::new(step)).unwrap();
                s.run("train_step").unwrap();
            }
            for ((n, _, cpu), (_, _, gpu)) in results[0].iter().zip(&results[1]) {
                let (bm_runtime::data::TensorData::F32(c), bm_runtime::data::TensorData::F32(g)) = (cpu, gpu) else { continue };
                assert_close(g, c, if step == 0 { 1e-4 } else { 1e-3 }, &format!("{name} step {step} {n}"));
            }
        }
        println!("{name}: loss and every gradient of 3 steps on the GPU match the CPU");
    }
}
