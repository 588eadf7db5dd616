//! Sinking matrix products: a linear layer's backward is `dX = dY W`, `dW = dYᵀ X`, and
//! then the kernel that consumes `dX` (a GELU's or a LayerNorm's backward). The weight
//! gradient's product in between keeps the runtime from running `dX`'s product and its
//! consumer as one row group (`bm_runtime::groups`: the consumer as the product's
//! epilogue, on rows still in cache); after memory planning the consumer may even
//! reuse the storage the weight gradient reads. This pass moves such a product after
//! the consumer.
//!
//! Kernel-level pass over the lowered program, run before memory planning (so every
//! temporary still has its own buffer). In each entry, a matrix product at position
//! `i` swaps with the kernel at `i + 1` when that kernel reads something the kernel at
//! `i - 1` writes (a producer and its consumer, which the product separates) and the
//! two are independent: neither writes a buffer the other reads or writes. Each
//! product moves at most one place, so lifetimes grow by one kernel at most.

use bm_runtime::kir::{BufId, Kernel, Program};

/// Whether kernels `a` and `b` may run in either order.
fn independent(a: &Kernel, b: &Kernel) -> bool {
    let (ra, wa, rb, wb) = (a.reads(), a.writes(), b.reads(), b.writes());
    let touches = |r: &[BufId], w: &[BufId], x: &BufId| r.contains(x) || w.contains(x);
    !wa.iter().any(|x| touches(&rb, &wb, x)) && !wb.iter().any(|x| ra.contains(x))
}

pub fn sink_products(p: &mut Program) {
    for e in 0..p.entries.len() {
        let mut order = p.entries[e].kernels.clone();
        let mut i = 1;
        while i + 1 < order.len() {
            let (before, here, after) = (&p.kernels[order[i - 1]], &p.kernels[order[i]], &p.kernels[order[i + 1]]);
            let consumes = before.writes().iter().any(|b| after.reads().contains(b));
            if matches!(here, Kernel::MatMul(_)) && !matches!(after, Kernel::MatMul(_)) && consumes && independent(here, after) {
                order.swap(i, i + 1);
                i += 2;
            } else {
                i += 1;
            }
        }
        p.entries[e].kernels = order;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bm_runtime::kir::{Access, BufKind, Buffer, DType, Entry, LoopKernel, MatMulKernel, MatOperand, ScalarExpr};

    fn buf(name: &str) -> Buffer {
        Buffer { name: name.into(), dtype: DType::F32, shape: vec![16], kind: BufKind::Temp }
    }
    fn copy(from: BufId, to: BufId) -> Kernel {
        let at = |buf| Access { buf, offset: 0, strides: vec![1] };
        Kernel::Loop(LoopKernel::elementwise(vec![16], ScalarExpr::Load(at(from)), at(to)))
    }
    fn product(a: BufId, b: BufId, c: BufId) -> Kernel {
        let op = |buf| MatOperand { buf, offset: 0, batch_strides: vec![], row_stride: 4, col_stride: 1 };
        Kernel::MatMul(MatMulKernel { batch: vec![], m: 4, n: 4, k: 4, a: op(a), b: op(b), c: op(c), accumulate: false, bf16: false })
    }
    fn run(kernels: Vec<Kernel>) -> Vec<usize> {
        let n = kernels.len();
        let mut p = Program {
            buffers: (0..8).map(|i| buf(&format!("t{i}"))).collect(),
            kernels,
            entries: vec![Entry { name: "train_step".into(), kernels: (0..n).collect(), results: vec![] }],
            params: vec![],
        };
        sink_products(&mut p);
        p.entries[0].kernels.clone()
    }

    #[test]
    fn a_weight_gradient_moves_after_the_input_gradients_consumer() {
        // dX = b0·b1 → b2; dW = b0·b3 → b4; consumer b2 → b5.
        assert_eq!(run(vec![product(0, 1, 2), product(0, 3, 4), copy(2, 5)]), vec![0, 2, 1]);
    }

    #[test]
    fn a_dependent_or_unrelated_kernel_does_not_overtake() {
        // The consumer reads the weight gradient's output.
        assert_eq!(run(vec![product(0, 1, 2), product(0, 3, 4), copy(4, 5)]), vec![0, 1, 2]);
        // The next kernel writes what the product reads.
        assert_eq!(run(vec![copy(6, 2), product(0, 3, 4), copy(2, 3)]), vec![0, 1, 2]);
        // The next kernel does not consume the previous one's output: nothing to gain.
        assert_eq!(run(vec![product(0, 1, 2), product(0, 3, 4), copy(6, 5)]), vec![0, 1, 2]);
    }
}
