//! Runs a program on an NVIDIA GPU: the generated module ([`super::codegen`]) compiled
//! by NVRTC for the device's architecture, one device arena holding every buffer
//! (parameters, gradients and optimiser state stay on the device), cuBLAS for the
//! GEMMs the code generator planned, and the error words gathers and scatters set.
//!
//! An entry's launches are static (every shape, offset and grid is baked into the
//! module), so from an entry's second run on they are replayed as one CUDA graph: one
//! launch per step instead of one per kernel. The first run launches kernel by kernel
//! (cuBLAS sets itself up outside any capture); right after it, the same launches are
//! captured (recorded, not run). A capture the driver or cuBLAS refuses falls back to
//! launching kernel by kernel; `BMC_CUDA_GRAPHS=0` turns graphs off (for measurements).

use super::codegen::{self, CudaModule, GemmBatch, Launch};
use crate::error::{Error, Result};
use crate::kir::{BufId, Kernel, Program};
use cudarc::cublas::{CudaBlas, sys as blas_sys};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg, sys as driver_sys,
};
use std::collections::HashMap;
use std::sync::Arc;

/// The CUDA libraries a run needs, each checked before cudarc touches it (cudarc
/// panics when a library is missing).
pub fn check_libraries() -> Result<()> {
    // SAFETY: each only tries to dlopen the library's candidate names.
    let missing: Vec<&str> = [
        (unsafe { cudarc::driver::sys::is_culib_present() }, "the CUDA driver (libcuda.so.1, from the NVIDIA driver)"),
        (unsafe { cudarc::nvrtc::sys::is_culib_present() }, "NVRTC (libnvrtc.so.13: the CUDA toolkit or `pip install nvidia-cuda-nvrtc`)"),
        (unsafe { cudarc::cublas::sys::is_culib_present() }, "cuBLAS (libcublas.so.13: the CUDA toolkit or `pip install nvidia-cublas`)"),
    ]
    .into_iter()
    .filter(|(present, _)| !present)
    .map(|(_, what)| what)
    .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(Error::user(format!(
        "--device cuda: cannot load {}; add the folders holding them to LD_LIBRARY_PATH, or train on the CPU with --device cpu",
        missing.join(", ")
    )))
}

/// Whether a GPU can run programs here; the error says why not (for tests to print).
pub fn gpu_available() -> Result<()> {
    check_libraries()?;
    match CudaContext::device_count() {
        Ok(n) if n > 0 => Ok(()),
        Ok(_) => Err(Error::user("the CUDA driver reports no GPU")),
        Err(e) => Err(Error::user(format!("the CUDA driver cannot count GPUs: {e:?}"))),
    }
}

fn driver(e: impl std::fmt::Debug) -> Error {
    Error::internal(format!("CUDA: {e:?}"))
}

pub struct CudaExecutor {
    program: Program,
    module: CudaModule,
    stream: Arc<CudaStream>,
    /// Per kernel of the program, its generated kernels in launch order
    /// (`Launch::kernel_names`).
    functions: Vec<Vec<CudaFunction>>,
    arena: CudaSlice<f32>,
    errors: CudaSlice<i32>,
    blas: CudaBlas,
    entries: HashMap<String, usize>,
    /// Per entry, how its next run goes.
    replay: Vec<Replay>,
    pub device_name: String,
}

/// How an entry runs.
enum Replay {
    /// Kernel by kernel, then the graph is captured for the runs after.
    FirstRun,
    /// As this captured graph.
    Graph(CudaGraph),
    /// Kernel by kernel, always (graphs off, or the capture was refused).
    Launches,
}

/// Whether entries are replayed as CUDA graphs (`BMC_CUDA_GRAPHS=0` turns them off).
fn graphs_enabled() -> bool {
    std::env::var("BMC_CUDA_GRAPHS").map(|v| v != "0").unwrap_or(true)
}

impl CudaExecutor {
    pub fn new(program: &Program) -> Result<CudaExecutor> {
        check_libraries()?;
        crate::exec::validate(program)?;
        let count = CudaContext::device_count().map_err(driver)?;
        if count < 1 {
            return Err(Error::user("--device cuda: the CUDA driver reports no GPU; train on the CPU with --device cpu"));
        }
        let ctx = CudaContext::new(0).map_err(driver)?;
        let device_name = ctx.name().map_err(driver)?;
        let (major, minor) = ctx.compute_capability().map_err(driver)?;
        // NVRTC's option wants a 'static str; one per process and architecture.
        let arch: &'static str = Box::leak(format!("compute_{major}{minor}").into_boxed_str());
        let module = codegen::generate(program);
        let ptx = super::nvrtc::cached(&module.source, arch)?;
        let loaded = ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx)).map_err(driver)?;
        let mut functions = vec![];
        for l in &module.launches {
            functions.push(l.kernel_names().into_iter().map(|n| loaded.load_function(n).map_err(driver)).collect::<Result<Vec<_>>>()?);
        }
        // One stream, so no cross-stream events are needed; and not the legacy default
        // stream, which cannot be captured into a graph.
        // SAFETY: everything below runs on this one stream, in order.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(driver)?;
        let arena = stream.alloc_zeros::<f32>(module.layout.words.max(1)).map_err(driver)?;
        let errors = stream.alloc_zeros::<i32>(4).map_err(driver)?;
        let blas = CudaBlas::new(stream.clone()).map_err(driver)?;
        let entries = program.entries.iter().enumerate().map(|(i, e)| (e.name.clone(), i)).collect();
        let graphs = graphs_enabled();
        let replay = program.entries.iter().map(|_| if graphs { Replay::FirstRun } else { Replay::Launches }).collect();
        Ok(CudaExecutor { program: program.clone(), module, stream, functions, arena, errors, blas, entries, replay, device_name })
    }

    fn range(&self, buf: BufId) -> Result<std::ops::Range<usize>> {
        let b = self.program.buffers.get(buf).ok_or_else(|| Error::internal(format!("buffer b{buf} does not exist")))?;
        let at = self.module.layout.offsets[buf];
        Ok(at..at + b.len())
    }

    pub fn read_f32(&self, buf: BufId) -> Result<Vec<f32>> {
        let r = self.range(buf)?;
        let mut host = vec![0f32; r.len()];
        if !host.is_empty() {
            self.stream.memcpy_dtoh(&self.arena.slice(r), &mut host).map_err(driver)?;
        }
        Ok(host)
    }

    /// Writes `data` at element `offset` of buffer `buf` (4-byte words; i32 buffers
    /// take their values' bit patterns).
    pub fn write_words(&mut self, buf: BufId, offset: usize, data: &[f32]) -> Result<()> {
        let r = self.range(buf)?;
        if offset + data.len() > r.len() {
            return Err(Error::internal(format!("a write of {} at {offset} overruns b{buf} ({})", data.len(), r.len())));
        }
        if !data.is_empty() {
            let at = r.start + offset;
            self.stream.memcpy_htod(data, &mut self.arena.slice_mut(at..at + data.len())).map_err(driver)?;
        }
        Ok(())
    }

    pub fn run(&mut self, entry: &str) -> Result<()> {
        let e = *self.entries.get(entry).ok_or_else(|| Error::internal(format!("the program has no entry `{entry}`")))?;
        match &self.replay[e] {
            Replay::Graph(g) => g.launch().map_err(driver)?,
            Replay::Launches => self.launch_entry(e)?,
            Replay::FirstRun => {
                self.launch_entry(e)?;
                self.check_errors()?;
                self.replay[e] = match self.capture(e) {
                    Ok(g) => Replay::Graph(g),
                    Err(why) => {
                        if std::env::var_os("BMC_CUDA_DEBUG").is_some() {
                            eprintln!("bmc: entry `{entry}` runs kernel by kernel: {why}");
                        }
                        Replay::Launches
                    }
                };
                return Ok(());
            }
        }
        self.check_errors()
    }

    fn launch_entry(&mut self, e: usize) -> Result<()> {
        for k in self.program.entries[e].kernels.clone() {
            self.launch(k)?;
        }
        Ok(())
    }

    /// Captures entry `e`'s launches into a graph (nothing runs while capturing).
    fn capture(&mut self, e: usize) -> Result<CudaGraph> {
        use driver_sys::{CUgraphInstantiate_flags, CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL};
        self.stream.begin_capture(CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).map_err(driver)?;
        let launched = self.launch_entry(e);
        // Always end the capture, so the stream is usable whatever happened.
        let graph = self.stream.end_capture(CUgraphInstantiate_flags(0));
        launched?;
        let graph = graph.map_err(driver)?.ok_or_else(|| Error::internal("CUDA: the capture recorded nothing"))?;
        graph.upload().map_err(driver)?;
        Ok(graph)
    }

    fn launch(&mut self, k: usize) -> Result<()> {
        let (g, b) = match &self.module.launches[k] {
            Launch::Gemm(gemm) => {
                let gemm = gemm.clone();
                if let Some(c) = &gemm.bf16 {
                    self.launch_function(k, 0, c.grid, c.block)?;
                }
                return self.gemm(&gemm);
            }
            Launch::Seq(grids) => {
                for (at, g) in grids.clone().iter().enumerate() {
                    self.launch_function(k, at, g.grid, g.block)?;
                }
                return Ok(());
            }
            Launch::Grid { grid, block, .. } => (*grid, *block),
        };
        self.launch_function(k, 0, g, b)
    }

    /// Launches generated kernel `at` of program kernel `k` over the arena and error words.
    fn launch_function(&mut self, k: usize, at: usize, g: (u32, u32, u32), b: (u32, u32, u32)) -> Result<()> {
        let f = self.functions[k].get(at).ok_or_else(|| Error::internal(format!("kernel k{k} has no generated kernel {at}")))?;
        let cfg = LaunchConfig { grid_dim: g, block_dim: b, shared_mem_bytes: 0 };
        let mut args = self.stream.launch_builder(f);
        args.arg(&mut self.arena).arg(&mut self.errors);
        // SAFETY: the kernel was generated for this arena's layout from a validated
        // program; every access stays inside its buffer (the bf16 shadow included).
        unsafe { args.launch(cfg) }.map_err(driver)?;
        Ok(())
    }

    fn gemm(&mut self, g: &codegen::Gemm) -> Result<()> {
        use blas_sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        let op = |t: bool| if t { CUBLAS_OP_T } else { CUBLAS_OP_N };
        let (alpha, beta) = (1.0f32, if g.accumulate { 1.0f32 } else { 0.0f32 });
        let (base, _sync) = self.arena.device_ptr(&self.stream);
        let at = |words: usize| base + (words * 4) as u64;
        let handle = *self.blas.handle();
        let int = |x: usize| i32::try_from(x).map_err(|_| Error::internal(format!("GEMM size {x} exceeds cuBLAS's int")));
        let (m, n, k, lda, ldb, ldc) = (int(g.m)?, int(g.n)?, int(g.k)?, int(g.lda)?, int(g.ldb)?, int(g.ldc)?);
        // One strided-batched call covers a single product too (count 1).
        // Per call: operand offsets (a, b, c), the batch count and the batch strides.
        type Call = (usize, usize, usize, usize, (usize, usize, usize));
        let calls: Vec<Call> = match &g.batch {
            GemmBatch::Strided { count, stride_a, stride_b, stride_c } => vec![(0, 0, 0, *count, (*stride_a, *stride_b, *stride_c))],
            GemmBatch::Offsets(v) => v.iter().map(|&(a, b, c)| (a, b, c, 1, (0, 0, 0))).collect(),
        };
        for (da, db, dc, count, (sa, sb, sc)) in calls {
            let (ta, tb, count) = (op(g.trans_a), op(g.trans_b), int(count)?);
            let pc = at(g.c + dc) as *mut f32;
            // SAFETY: the pointers address the arena at offsets the code generator
            // computed from the validated operands (bf16: the same offsets in the
            // shadow, which the cast kernel just wrote).
            unsafe {
                match &g.bf16 {
                    None => {
                        let (pa, pb) = (at(g.a + da) as *const f32, at(g.b + db) as *const f32);
                        cudarc::cublas::result::sgemm_strided_batched(
                            handle, ta, tb, m, n, k, &alpha, pa, lda, sa as i64, pb, ldb, sb as i64, &beta, pc, ldc, sc as i64, count,
                        )
                    }
                    Some(cast) => {
                        use blas_sys::{cublasComputeType_t::CUBLAS_COMPUTE_32F, cudaDataType::CUDA_R_16BF, cudaDataType::CUDA_R_32F};
                        let half = |words: usize| (base + (cast.shadow * 4) as u64 + (words * 2) as u64) as *const std::ffi::c_void;
                        cudarc::cublas::result::gemm_strided_batched_ex(
                            handle,
                            ta,
                            tb,
                            m,
                            n,
                            k,
                            (&alpha as *const f32).cast(),
                            half(g.a + da),
                            CUDA_R_16BF,
                            lda,
                            sa as i64,
                            half(g.b + db),
                            CUDA_R_16BF,
                            ldb,
                            sb as i64,
                            (&beta as *const f32).cast(),
                            pc.cast(),
                            CUDA_R_32F,
                            ldc,
                            sc as i64,
                            count,
                            CUBLAS_COMPUTE_32F,
                            blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                        )
                    }
                }
            }
            .map_err(driver)?;
        }
        Ok(())
    }

    /// Turns the error words a gather or scatter set into the CPU's error message.
    fn check_errors(&mut self) -> Result<()> {
        let mut words = [0i32; 4];
        self.stream.memcpy_dtoh(&self.errors, &mut words).map_err(driver)?;
        if words[0] == 0 {
            return Ok(());
        }
        self.stream.memset_zeros(&mut self.errors).map_err(driver)?;
        let k = (words[0] - 1) as usize;
        let (pos, id) = (words[1], words[2]);
        Err(match self.program.kernels.get(k) {
            Some(Kernel::Gather(g)) => {
                Error::user(format!("embedding id {id} at position {pos} of `{}` is out of range 0..{}", g.what, g.rows))
            }
            Some(Kernel::ScatterAdd(s)) => Error::internal(format!("scatter-add: id {id} at position {pos} is outside 0..{}", s.rows)),
            _ => Error::internal(format!("kernel k{k} reported an error ({pos}, {id})")),
        })
    }
}
