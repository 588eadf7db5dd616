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
        // Every model also as `precision = "bf16"` (its products' cast kernels).
        let mut bf16 = c.program.clone();
        bmc::precision::apply(&mut bf16, "bf16");
        let mut programs = vec![("train", c.program), ("train, bf16", bf16)];
        let one = Options { batch: Some(1), ..Options::default() };
        if let Ok(p) = driver::decode_program(&driver::compile(&loaded, &one, Stage::Graph).unwrap()) {
            programs.push(("decode", p));
        }
        for (what, program) in programs {
            let module = generate(&program);
            let ptx = nvrtc::compile(&module.source, nvrtc::DEFAULT_ARCH).unwrap_or_else(|e| panic!("{} ({what}): {e}", path.display()));
            for name in module.launches.iter().flat_map(|l| l.kernel_names()) {
                assert!(ptx.contains(&format!(".entry {name}(")), "{} ({what}): no kernel {name} in the PTX", path.display());
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
    // Every model in f32 (1e-4, then 1e-3 after optimiser steps), and the GPT in bf16
    // (both sides round the same operands to bf16: 2e-2).
    let gpt = models().into_iter().find(|p| p.ends_with("gpt.bm")).unwrap();
    let cases = models().into_iter().map(|p| (p, "f32")).chain([(gpt, "bf16")]);
    for (path, precision) in cases {
        let loaded = driver::load(path.to_str().unwrap(), &FileSource::Disk).unwrap_or_else(|d| panic!("{d}"));
        let c = driver::compile(&loaded, &Options::default(), Stage::Kernels).unwrap_or_else(|d| panic!("{d}"));
        let mut bundle = driver::bundle(&loaded, &Options::default(), &c);
        bmc::precision::apply(&mut bundle.program, precision);
        let ds = Dataset::load(bundle.train.data.as_ref().unwrap()).unwrap();
        let mut sessions: Vec<Session> =
            [Device::Cpu, Device::Cuda].into_iter().map(|d| Session::on(bundle.clone(), d, 2).unwrap()).collect();
        for s in &mut sessions {
            s.init_params(1).unwrap();
        }
        let name = format!("{} ({precision})", path.file_stem().unwrap().to_string_lossy());
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
                let rel = if precision == "bf16" {
                    2e-2
                } else if step == 0 {
                    1e-4
                } else {
                    1e-3
                };
                assert_close(g, c, rel, &format!("{name} step {step} {n}"));
            }
        }
        println!("{name}: loss and every gradient of 3 steps on the GPU match the CPU");
    }
}

// ---------------------------------------------------------------------------------------
// The generated CUDA C, run by a CPU emulator of CUDA's execution model
// (tests/cuda_emu/emu.h, compiled with the host C++ compiler), against the CPU backend.
// This checks what NVRTC cannot: that the kernels compute the right values.
// ---------------------------------------------------------------------------------------

use bm_runtime::cuda::codegen::{CudaModule, GemmBatch};
use bm_runtime::exec::Executor;
use bm_runtime::kir::{BufKind, DType, Kernel, Program};
use std::fmt::Write as _;
use std::process::Command;

/// The emulator program for `module`: its source, a dispatch table and a `main` that
/// reads the arena and a launch plan, runs it and writes the arena back.
fn emulator_source(module: &CudaModule) -> String {
    let mut s = String::from("#include \"emu.h\"\n");
    s.push_str(&module.source);
    s.push_str("\nstatic const struct { const char* name; bm_kernel f; } bm_table[] = {\n");
    for l in &module.launches {
        for name in l.kernel_names() {
            let _ = writeln!(s, "  {{\"{name}\", {name}}},");
        }
    }
    s.push_str(
        r#"  {nullptr, nullptr}};
int main(int argc, char** argv) {
  if (argc != 4) return 2;
  FILE* f = std::fopen(argv[1], "rb");
  std::vector<float> A;
  float x;
  while (std::fread(&x, 4, 1, f) == 1) A.push_back(x);
  std::fclose(f);
  int E[4] = {0, 0, 0, 0};
  FILE* p = std::fopen(argv[2], "r");
  char op[16];
  while (std::fscanf(p, "%15s", op) == 1) {
    std::string o = op;
    if (o == "grid" || o == "serial") {
      char name[64];
      unsigned g[3], b[3];
      std::fscanf(p, "%63s %u %u %u %u %u %u", name, &g[0], &g[1], &g[2], &b[0], &b[1], &b[2]);
      bm_kernel k = nullptr;
      for (int i = 0; bm_table[i].name; i++)
        if (std::string(bm_table[i].name) == name) k = bm_table[i].f;
      if (!k) return 3;
      (o == "grid" ? bm_launch : bm_launch_serial)(k, {g[0], g[1], g[2]}, {b[0], b[1], b[2]}, A.data(), E);
    } else if (o == "gemm") {
      int ta, tb, acc;
      long m, n, k, a, lda, b, ldb, c, ldc;
      std::fscanf(p, "%d %d %ld %ld %ld %ld %ld %ld %ld %ld %ld %d", &ta, &tb, &m, &n, &k, &a, &lda, &b, &ldb, &c, &ldc, &acc);
      bm_sgemm(ta, tb, m, n, k, A.data() + a, lda, A.data() + b, ldb, A.data() + c, ldc, acc);
    } else if (o == "gemm16") {
      int ta, tb, acc;
      long shadow, m, n, k, a, lda, b, ldb, c, ldc;
      std::fscanf(p, "%ld %d %d %ld %ld %ld %ld %ld %ld %ld %ld %ld %d", &shadow, &ta, &tb, &m, &n, &k, &a, &lda, &b, &ldb, &c, &ldc, &acc);
      const unsigned short* S = (const unsigned short*)(A.data() + shadow);
      bm_gemm_bf16(ta, tb, m, n, k, S + a, lda, S + b, ldb, A.data() + c, ldc, acc);
    } else {
      return 4;
    }
  }
  FILE* out = std::fopen(argv[3], "wb");
  std::fwrite(A.data(), 4, A.size(), out);
  std::fclose(out);
  return E[0] == 0 ? 0 : 10;
}
"#,
    );
    s
}

/// The launch plan of `entry` in the emulator's text form (strided GEMM batches
/// expanded into one call per matrix).
fn emulator_plan(module: &CudaModule, program: &Program, entry: &str) -> String {
    let mut s = String::new();
    for &k in &program.entry(entry).unwrap().kernels {
        // Kernels without any synchronisation can run their threads one by one.
        let sync_free = match &program.kernels[k] {
            Kernel::Loop(l) => l.reduce.is_none(),
            Kernel::Gather(_) | Kernel::ScatterAdd(_) => true,
            _ => false,
        };
        match &module.launches[k] {
            Launch::Grid { name, grid: g, block: b } => {
                let how = if sync_free { "serial" } else { "grid" };
                let _ = writeln!(s, "{how} {name} {} {} {} {} {} {}", g.0, g.1, g.2, b.0, b.1, b.2);
            }
            Launch::Seq(grids) => {
                for gr in grids {
                    let (g, b) = (gr.grid, gr.block);
                    let _ = writeln!(s, "grid {} {} {} {} {} {} {}", gr.name, g.0, g.1, g.2, b.0, b.1, b.2);
                }
            }
            Launch::Gemm(gm) => {
                let calls: Vec<(usize, usize, usize)> = match &gm.batch {
                    GemmBatch::Strided { count, stride_a, stride_b, stride_c } => {
                        (0..*count).map(|i| (i * stride_a, i * stride_b, i * stride_c)).collect()
                    }
                    GemmBatch::Offsets(v) => v.clone(),
                };
                let op = match &gm.bf16 {
                    Some(c) => {
                        let (g, b) = (c.grid, c.block);
                        let _ = writeln!(s, "serial {} {} {} {} {} {} {}", c.name, g.0, g.1, g.2, b.0, b.1, b.2);
                        format!("gemm16 {}", c.shadow)
                    }
                    None => "gemm".to_string(),
                };
                for (da, db, dc) in calls {
                    let _ = writeln!(
                        s,
                        "{op} {} {} {} {} {} {} {} {} {} {} {} {}",
                        gm.trans_a as u8,
                        gm.trans_b as u8,
                        gm.m,
                        gm.n,
                        gm.k,
                        gm.a + da,
                        gm.lda,
                        gm.b + db,
                        gm.ldb,
                        gm.c + dc,
                        gm.ldc,
                        gm.accumulate as u8
                    );
                }
            }
        }
    }
    s
}

/// Compiles the emulator for `module` into `dir/emu`.
fn build_emulator(module: &CudaModule, what: &str, dir: &Path) -> PathBuf {
    let exe = dir.join("emu");
    let src = dir.join("emu.cpp");
    std::fs::write(&src, emulator_source(module)).unwrap();
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda_emu");
    let o = Command::new("c++")
        .args(["-std=c++20", "-O1", "-pthread", "-w", "-I"])
        .arg(&include)
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("running the C++ compiler");
    assert!(o.status.success(), "{what}: the emulator does not compile:\n{}", String::from_utf8_lossy(&o.stderr));
    exe
}

/// Runs `entry` of `program` through the emulator `exe` and through the CPU executor
/// from the same buffers, and compares the parameters, optimiser state and the entry's
/// results afterwards within `rel`.
#[allow(clippy::too_many_arguments)]
fn emulate_and_compare(
    exe: &Path,
    module: &CudaModule,
    program: &Program,
    entry: &str,
    cpu: &mut Executor,
    rel: f32,
    what: &str,
    dir: &Path,
) {
    let mut arena = vec![0f32; module.layout.words];
    for (i, b) in program.buffers.iter().enumerate() {
        let at = module.layout.offsets[i];
        let words: Vec<f32> = match b.dtype {
            DType::F32 => cpu.f32(i).unwrap().to_vec(),
            DType::I32 => cpu.i32(i).unwrap().iter().map(|&x| f32::from_bits(x as u32)).collect(),
        };
        arena[at..at + words.len()].copy_from_slice(&words);
    }
    let bytes: Vec<u8> = arena.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(dir.join("arena.bin"), bytes).unwrap();
    std::fs::write(dir.join("plan.txt"), emulator_plan(module, program, entry)).unwrap();
    let o = Command::new(exe).arg(dir.join("arena.bin")).arg(dir.join("plan.txt")).arg(dir.join("out.bin")).output().unwrap();
    assert!(o.status.success(), "{what}: the emulated run failed ({:?}):\n{}", o.status.code(), String::from_utf8_lossy(&o.stderr));
    let out: Vec<f32> =
        std::fs::read(dir.join("out.bin")).unwrap().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    cpu.run(entry).unwrap();
    let mut compared = 0;
    for (i, b) in program.buffers.iter().enumerate() {
        if b.kind == BufKind::Temp && !program.entry(entry).unwrap().results.iter().any(|r| r.1 == i) {
            continue;
        }
        let at = module.layout.offsets[i];
        if b.dtype == DType::I32 {
            let want = cpu.i32(i).unwrap();
            let got: Vec<i32> = out[at..at + want.len()].iter().map(|x| x.to_bits() as i32).collect();
            assert_eq!(got, want, "{what}: {entry} buffer b{i} `{}`", b.name);
            compared += 1;
            continue;
        }
        let want = cpu.f32(i).unwrap();
        let got = &out[at..at + want.len()];
        let scale = want.iter().filter(|x| x.is_finite()).map(|x| x.abs()).fold(0.0f32, f32::max).max(1e-6);
        for (e, (g, w)) in got.iter().zip(want).enumerate() {
            let ok = g == w || (g - w).abs() <= rel * w.abs().max(scale * 1e-2) || (g.is_nan() && w.is_nan());
            assert!(ok, "{what}: {entry} buffer b{i} `{}`[{e}]: emulated CUDA {g} vs CPU {w}", b.name);
        }
        compared += 1;
    }
    assert!(compared > 0, "{what}: nothing compared");
    println!("{what}: {entry} on the emulated GPU matches the CPU ({compared} buffers)");
}

fn have_cxx() -> bool {
    match Command::new("c++").arg("--version").output() {
        Ok(o) if o.status.success() => true,
        _ => {
            if std::env::var_os("BMC_REQUIRE_NVRTC").is_some_and(|v| v == "1") {
                panic!("no C++ compiler (c++) for the CUDA emulator");
            }
            println!("skipped: no C++ compiler (c++) for the CUDA emulator");
            false
        }
    }
}

/// Small versions of the models (every kernel kind: loops, reductions, GEMMs planned for
/// cuBLAS, gather/scatter, attention forward and backward, the optimiser update).
#[test]
fn generated_cuda_computes_what_the_cpu_computes_in_an_emulator() {
    if !have_cxx() {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    // (model, overrides, batch, precision)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], usize, &'a str);
    let small_gpt: &[(&str, &str)] = &[("ctx", "8"), ("d", "32"), ("heads", "2"), ("layers", "1")];
    let cases: &[Case] =
        &[("models/gpt.bm", small_gpt, 3, "f32"), ("models/mlp.bm", &[], 5, "f32"), ("models/gpt.bm", small_gpt, 3, "bf16")];
    for (model, set, batch, precision) in cases {
        let dir = tempfile::tempdir().unwrap();
        let loaded = driver::load(root.join(model).to_str().unwrap(), &FileSource::Disk).unwrap_or_else(|d| panic!("{d}"));
        let opts = Options {
            overrides: set.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            batch: Some(*batch),
            ..Options::default()
        };
        let c = driver::compile(&loaded, &opts, Stage::Kernels).unwrap_or_else(|d| panic!("{d}"));
        let mut bundle = driver::bundle(&loaded, &opts, &c);
        bmc::precision::apply(&mut bundle.program, precision);
        let ds = Dataset::load(bundle.train.data.as_ref().unwrap()).unwrap();
        let mut s = Session::new(bundle, 1).unwrap();
        s.init_params(3).unwrap();
        let batch = Batcher::new(&ds, *batch, 5).unwrap().next_batch();
        s.feed(&batch, "test").unwrap();
        s.set_hypers(0, 10, true, &mut Rng::new(1)).unwrap();
        let program = s.bundle.program.clone();
        let module = generate(&program);
        assert_eq!(module.launches.iter().any(|l| matches!(l, Launch::Gemm(g) if g.bf16.is_some())), *precision == "bf16");
        let what = format!("{model} ({precision})");
        let exe = build_emulator(&module, &what, dir.path());
        let cpu = s.exec.cpu().unwrap();
        // Loss and gradients: 1e-4. Then a whole step: an optimiser update divides by
        // sqrt(v) of tiny gradients, which magnifies rounding differences, hence 2e-3.
        // bf16: both sides round the same operands, but a value that differs in its last
        // f32 bit can round to another bf16 in the next product: 2e-2 (the issue's bf16
        // tolerance).
        let (rel_grad, rel_step) = if *precision == "bf16" { (2e-2, 2e-2) } else { (1e-4, 2e-3) };
        emulate_and_compare(&exe, &module, &program, "grad", cpu, rel_grad, &what, dir.path());
        emulate_and_compare(&exe, &module, &program, "train_step", cpu, rel_step, &what, dir.path());
    }
}

/// Kernel shapes the models do not produce: a GEMM no cuBLAS call can express (the
/// tiled fallback), a loop whose output is not injective (the one-thread path), a long
/// reduction (a block per output), a min reduction stored into i32, and masked
/// non-causal attention with Tq ≠ Tk and d > 32, forward and backward.
#[test]
fn generated_cuda_fallback_paths_compute_what_the_cpu_computes() {
    use bm_runtime::kir::{
        Access, AttentionBackwardKernel, AttentionKernel, Buffer, Entry, LoopKernel, MatMulKernel, MatOperand, ReduceOp, ScalarExpr,
        UnaryOp,
    };
    if !have_cxx() {
        return;
    }
    let buf = |name: &str, dtype: DType, len: usize| Buffer { name: name.into(), dtype, shape: vec![len], kind: BufKind::Param };
    let op =
        |buf, offset, batch_strides: Vec<usize>, row_stride, col_stride| MatOperand { buf, offset, batch_strides, row_stride, col_stride };
    let (bq, tq, tk, d, dv) = (2, 5, 7, 40, 33);
    let att = AttentionKernel {
        batch: vec![bq],
        tq,
        tk,
        d,
        dv,
        q: op(7, 0, vec![tq * d], d, 1),
        k: op(8, 0, vec![tk * d], d, 1),
        v: op(9, 0, vec![tk * dv], 1, tk),     // transposed in memory
        mask: Some(op(10, 0, vec![0], tk, 1)), // broadcast over the batch
        causal: false,
        scale: 0.3,
        out: op(11, 0, vec![dv], bq * dv, 1), // the batch's rows interleaved, as heads are
        probs: None,
    };
    let program = Program {
        buffers: vec![
            buf("a", DType::F32, 3 * 2 * 6 * 9),
            buf("b", DType::F32, 3 * 9 * 4 * 2),
            buf("c", DType::F32, 3 * 6 * 4),
            buf("x", DType::F32, 3000 * 3),
            buf("sum", DType::F32, 3),
            buf("min_i32", DType::I32, 3),
            buf("total", DType::F32, 1),
            buf("q", DType::F32, bq * tq * d),
            buf("k", DType::F32, bq * tk * d),
            buf("v", DType::F32, bq * tk * dv),
            buf("mask", DType::F32, tq * tk),
            buf("att", DType::F32, bq * tq * dv),
            buf("dout", DType::F32, bq * tq * dv),
            buf("grads", DType::F32, bq * tq * d + bq * tk * d + bq * tk * dv),
        ],
        kernels: vec![
            // c[b] = a[b] @ b[b] with every operand's columns 2 apart: no cuBLAS layout.
            Kernel::MatMul(MatMulKernel {
                batch: vec![3],
                m: 6,
                n: 4,
                k: 9,
                a: op(0, 1, vec![2 * 6 * 9], 2 * 9, 2),
                b: op(1, 0, vec![9 * 4 * 2], 4 * 2, 2),
                c: op(2, 0, vec![6 * 4], 4, 1),
                accumulate: true,
                bf16: false,
            }),
            // sum[i] = Σ_j x[i, j] over 3000 (a block per output).
            Kernel::Loop(LoopKernel {
                shape: vec![3, 3000],
                reduce: Some(ReduceOp::Sum),
                reduced_dims: 1,
                body: ScalarExpr::Unary(UnaryOp::Tanh, Box::new(ScalarExpr::Load(Access { buf: 3, offset: 0, strides: vec![3000, 1] }))),
                out: Access { buf: 4, offset: 0, strides: vec![1, 0] },
                accumulate: false,
                side: vec![],
                sums: vec![],
            }),
            // min_i32[i] = round(min_j 10·x[i, j]).
            Kernel::Loop(LoopKernel {
                shape: vec![3, 50],
                reduce: Some(ReduceOp::Min),
                reduced_dims: 1,
                body: ScalarExpr::Binary(
                    bm_runtime::kir::BinaryOp::Mul,
                    Box::new(ScalarExpr::Load(Access { buf: 3, offset: 7, strides: vec![50, 1] })),
                    Box::new(ScalarExpr::Const(10.0)),
                ),
                out: Access { buf: 5, offset: 0, strides: vec![1, 0] },
                accumulate: false,
                side: vec![],
                sums: vec![],
            }),
            // total += c[i] for every i, in order (the output is not injective).
            Kernel::Loop(LoopKernel {
                shape: vec![72],
                reduce: None,
                reduced_dims: 0,
                body: ScalarExpr::Load(Access { buf: 2, offset: 0, strides: vec![1] }),
                out: Access { buf: 6, offset: 0, strides: vec![0] },
                accumulate: true,
                side: vec![],
                sums: vec![],
            }),
            Kernel::Attention(att.clone()),
            Kernel::AttentionBackward(AttentionBackwardKernel::packed(att, op(12, 0, vec![tq * dv], dv, 1), 13)),
        ],
        entries: vec![Entry { name: "main".into(), kernels: vec![0, 1, 2, 3, 4, 5], results: vec![] }],
        params: vec![],
    };
    let module = generate(&program);
    assert!(matches!(module.launches[0], Launch::Grid { .. }), "the strided GEMM should use the tiled kernel");
    assert!(matches!(module.launches[3], Launch::Grid { block: (1, 1, 1), .. }), "the non-injective loop should run on one thread");
    let dir = tempfile::tempdir().unwrap();
    let exe = build_emulator(&module, "synthetic", dir.path());
    let mut cpu = Executor::new(&program, 1).unwrap();
    let mut rng = Rng::new(9);
    for (i, b) in program.buffers.iter().enumerate() {
        if b.dtype == DType::F32 {
            let v: Vec<f32> = (0..b.len()).map(|_| (rng.uniform() * 2.0 - 1.0) as f32).collect();
            cpu.f32_mut(i).unwrap().copy_from_slice(&v);
        }
    }
    // Some masked keys (never a whole row).
    for (e, x) in cpu.f32_mut(10).unwrap().iter_mut().enumerate() {
        if e % tk != 0 && e % 3 == 0 {
            *x = f32::NEG_INFINITY;
        }
    }
    emulate_and_compare(&exe, &module, &program, "main", &mut cpu, 1e-4, "synthetic", dir.path());
    let mins = cpu.i32(5).unwrap().to_vec();
    assert!(mins.iter().all(|&m| (-10..=10).contains(&m)), "{mins:?}");
}

/// The attention paths and GEMM variants the models do not reach: causal attention over
/// several key tiles and row blocks (the tiled kernels), a head dimension too large for
/// their shared memory (the warp-per-row kernels), and a bf16 product with no cuBLAS
/// layout (the tiled GEMM rounding its operands).
#[test]
fn generated_cuda_attention_paths_and_bf16_tiled_gemm() {
    use bm_runtime::kir::{AttentionBackwardKernel, AttentionKernel, Buffer, Entry, MatMulKernel, MatOperand};
    if !have_cxx() {
        return;
    }
    let buf = |name: &str, len: usize| Buffer { name: name.into(), dtype: DType::F32, shape: vec![len], kind: BufKind::Param };
    let op =
        |buf, offset, batch_strides: Vec<usize>, row_stride, col_stride| MatOperand { buf, offset, batch_strides, row_stride, col_stride };
    let mut buffers = vec![];
    let mut kernels = vec![];
    // (batch, tq, tk, d, dv, causal): tiled causal; warp-per-row (d = 300)
    for (n, &(bq, tq, tk, d, dv, causal)) in
        [(2usize, 45usize, 45usize, 16usize, 16usize, true), (2, 3, 5, 300, 9, false)].iter().enumerate()
    {
        let base = buffers.len();
        buffers.extend([
            buf(&format!("q{n}"), bq * tq * d),
            buf(&format!("k{n}"), bq * tk * d),
            buf(&format!("v{n}"), bq * tk * dv),
            buf(&format!("att{n}"), bq * tq * (dv + 1) + 2),
            buf(&format!("dout{n}"), bq * tq * dv),
            buf(&format!("grads{n}"), bq * (tq * (d + 1) + tk * (d + 1) + tk * (dv + 1)) + 1),
        ]);
        let att = AttentionKernel {
            batch: vec![bq],
            tq,
            tk,
            d,
            dv,
            q: op(base, 0, vec![tq * d], d, 1),
            k: op(base + 1, 0, vec![tk * d], d, 1),
            v: op(base + 2, 0, vec![tk * dv], dv, 1),
            mask: None,
            causal,
            scale: 0.25,
            // The output laid out for a reader: the batch's rows interleaved (as heads
            // are), or rows padded apart.
            out: if n == 0 { op(base + 3, 0, vec![dv], bq * dv, 1) } else { op(base + 3, 2, vec![tq * (dv + 1)], dv + 1, 1) },
            probs: None,
        };
        kernels.push(Kernel::Attention(att.clone()));
        // The gradients where a reader wants them: dq, dk and dv rows side by side (as a
        // fused qkv product's gradient holds them; tq = tk), or each with rows padded.
        let mut bk = AttentionBackwardKernel::packed(att, op(base + 4, 0, vec![tq * dv], dv, 1), base + 5);
        if n == 0 {
            let row = d + d + dv;
            (bk.dq, bk.dk, bk.dv) = (
                op(base + 5, 0, vec![tq * row], row, 1),
                op(base + 5, d, vec![tk * row], row, 1),
                op(base + 5, 2 * d, vec![tk * row], row, 1),
            );
        } else {
            let (lq, lk) = (bq * tq * (d + 1), bq * tk * (d + 1));
            (bk.dq, bk.dk, bk.dv) = (
                op(base + 5, 1, vec![tq * (d + 1)], d + 1, 1),
                op(base + 5, 1 + lq, vec![tk * (d + 1)], d + 1, 1),
                op(base + 5, 1 + lq + lk, vec![tk * (dv + 1)], dv + 1, 1),
            );
        }
        kernels.push(Kernel::AttentionBackward(bk));
    }
    // A bf16 product whose operands' columns are 2 apart (no cuBLAS layout).
    let base = buffers.len();
    buffers.extend([buf("a", 2 * 6 * 9), buf("b", 9 * 4 * 2), buf("c", 6 * 4)]);
    kernels.push(Kernel::MatMul(MatMulKernel {
        batch: vec![],
        m: 6,
        n: 4,
        k: 9,
        a: op(base, 1, vec![], 2 * 9, 2),
        b: op(base + 1, 0, vec![], 4 * 2, 2),
        c: op(base + 2, 0, vec![], 4, 1),
        accumulate: false,
        bf16: true,
    }));
    let program = Program {
        buffers,
        entries: vec![Entry { name: "main".into(), kernels: (0..kernels.len()).collect(), results: vec![] }],
        kernels,
        params: vec![],
    };
    let module = generate(&program);
    assert!(matches!(module.launches[1], Launch::Seq(_)), "causal d = 16 attention backward should be the tiled kernels");
    assert!(
        matches!(&module.launches[3], Launch::Seq(g) if g.len() == 2 && g[0].name.ends_with("_zero")),
        "d = 300 should fall back to the warp-per-row kernels, dk and dv zeroed first"
    );
    assert!(matches!(module.launches[4], Launch::Grid { .. }), "the strided bf16 GEMM should use the tiled kernel");
    let dir = tempfile::tempdir().unwrap();
    let exe = build_emulator(&module, "attention paths", dir.path());
    let mut cpu = Executor::new(&program, 1).unwrap();
    let mut rng = Rng::new(11);
    for i in 0..program.buffers.len() {
        let v: Vec<f32> = (0..program.buffers[i].len()).map(|_| (rng.uniform() * 2.0 - 1.0) as f32).collect();
        cpu.f32_mut(i).unwrap().copy_from_slice(&v);
    }
    emulate_and_compare(&exe, &module, &program, "main", &mut cpu, 1e-4, "attention paths", dir.path());
}
