//! `precision = "bf16"` on the kernel IR: every matrix product takes bfloat16 operands
//! (`MatMulKernel::bf16`: rounded to bf16, then f32 products, sums and results), as
//! PyTorch's autocast runs `matmul`/`linear` in bf16. Attention, elementwise work,
//! reductions, the loss and the optimiser stay f32, over f32 master weights. The CPU
//! rounds the operands (the same numbers, not a speed-up); the GPU runs these products
//! on tensor cores (cuBLAS, bf16 inputs, f32 accumulation).

use bm_runtime::kir::{Kernel, Program};

/// Marks the program's matrix products for `precision` (`"f32"` leaves it as it is).
pub fn apply(p: &mut Program, precision: &str) {
    if precision != "bf16" {
        return;
    }
    for k in &mut p.kernels {
        if let Kernel::MatMul(m) = k {
            m.bf16 = true;
        }
    }
}
