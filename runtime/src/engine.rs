//! Where a session's program runs: the CPU executor (buffers in host memory) or a CUDA
//! GPU (buffers in one device arena). Everything above — the training loop, evaluation,
//! checkpoints, sampling — reads and writes buffers through this interface only.

use crate::cuda::device::CudaExecutor;
use crate::error::{Error, Result};
use crate::exec::Executor;
use crate::kir::{BufId, Program};
use std::borrow::Cow;

/// A device name as `--device` and `device = ...` spell it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
}

impl Device {
    pub fn parse(name: &str) -> Result<Device> {
        match name {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            other => Err(Error::user(format!("unknown device `{other}`: use cpu or cuda"))),
        }
    }
}

// One engine per session: the CPU executor's size does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Engine {
    Cpu(Executor),
    Cuda(Box<CudaExecutor>),
}

impl Engine {
    pub fn new(program: &Program, device: Device, threads: usize) -> Result<Engine> {
        Ok(match device {
            Device::Cpu => Engine::Cpu(Executor::new(program, threads)?),
            Device::Cuda => Engine::Cuda(Box::new(CudaExecutor::new(program)?)),
        })
    }

    pub fn device(&self) -> Device {
        match self {
            Engine::Cpu(_) => Device::Cpu,
            Engine::Cuda(_) => Device::Cuda,
        }
    }

    pub fn run(&mut self, entry: &str) -> Result<()> {
        match self {
            Engine::Cpu(e) => e.run(entry),
            Engine::Cuda(e) => e.run(entry),
        }
    }

    /// An f32 buffer's values (borrowed on the CPU, copied from the GPU).
    pub fn f32(&self, buf: BufId) -> Result<Cow<'_, [f32]>> {
        match self {
            Engine::Cpu(e) => e.f32(buf).map(Cow::Borrowed),
            Engine::Cuda(e) => e.read_f32(buf).map(Cow::Owned),
        }
    }

    /// Writes `data` into f32 buffer `buf` from element `offset`.
    pub fn write_f32(&mut self, buf: BufId, offset: usize, data: &[f32]) -> Result<()> {
        match self {
            Engine::Cpu(e) => write_into(e.f32_mut(buf)?, buf, offset, data),
            Engine::Cuda(e) => e.write_words(buf, offset, data),
        }
    }

    /// Writes `data` into i32 buffer `buf` from element `offset`.
    pub fn write_i32(&mut self, buf: BufId, offset: usize, data: &[i32]) -> Result<()> {
        match self {
            Engine::Cpu(e) => write_into(e.i32_mut(buf)?, buf, offset, data),
            Engine::Cuda(e) => {
                let bits: Vec<f32> = data.iter().map(|&x| f32::from_bits(x as u32)).collect();
                e.write_words(buf, offset, &bits)
            }
        }
    }

    /// The CPU executor, for tools that drive its kernels directly.
    pub fn cpu(&mut self) -> Option<&mut Executor> {
        match self {
            Engine::Cpu(e) => Some(e),
            Engine::Cuda(_) => None,
        }
    }
}

fn write_into<T: Copy>(dst: &mut [T], buf: BufId, offset: usize, data: &[T]) -> Result<()> {
    let end = offset + data.len();
    if end > dst.len() {
        return Err(Error::internal(format!("a write of {} at {offset} overruns b{buf} ({})", data.len(), dst.len())));
    }
    dst[offset..end].copy_from_slice(data);
    Ok(())
}
