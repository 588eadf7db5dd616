//! Transcendental unary operations over a contiguous row, called from JIT code.
//!
//! Cranelift's vectors are 128 bits wide; `exp` and GELU are compute-bound at 4 lanes. A
//! JIT kernel whose innermost axis reads an operand contiguously calls one of these once
//! per row (`jit.rs`, `RowCall`) and then reads the results from a stack buffer. The
//! functions are the interpreter's scalar formulas (`crate::interp`), so the results are
//! bit for bit the same; where the CPU has AVX2 the same code is compiled 8 lanes wide
//! (no FMA contraction: Rust does not contract `a * b + c`), and 16 lanes wide with
//! AVX-512F.

use crate::interp;
use crate::kir::UnaryOp;

/// A row function: `dst[i] = op(src[i])` for `i < n`.
pub type RowFn = unsafe extern "C" fn(src: *const f32, n: usize, dst: *mut f32);

/// The row function of `op`, for the operations worth a call.
pub fn row_fn(op: UnaryOp) -> Option<RowFn> {
    match op {
        UnaryOp::Exp => Some(bm_row_exp),
        UnaryOp::GeluTanh => Some(bm_row_gelu_tanh),
        UnaryOp::GeluTanhGrad => Some(bm_row_gelu_tanh_grad),
        _ => None,
    }
}

#[inline(always)]
fn map(f: impl Fn(f32) -> f32, src: &[f32], dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f(s);
    }
}

macro_rules! row {
    ($name:ident, $wide:ident, $widest:ident, $f:path) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        unsafe fn $wide(src: &[f32], dst: &mut [f32]) {
            map($f, src, dst)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f")]
        unsafe fn $widest(src: &[f32], dst: &mut [f32]) {
            map($f, src, dst)
        }

        /// # Safety
        /// `src` and `dst` must hold `n` floats and not overlap.
        pub unsafe extern "C" fn $name(src: *const f32, n: usize, dst: *mut f32) {
            // SAFETY: as documented.
            let (src, dst) = unsafe { (std::slice::from_raw_parts(src, n), std::slice::from_raw_parts_mut(dst, n)) };
            #[cfg(target_arch = "x86_64")]
            if crate::cpu::avx512() {
                // SAFETY: AVX-512F was detected.
                return unsafe { $widest(src, dst) };
            }
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") {
                // SAFETY: AVX2 was detected.
                return unsafe { $wide(src, dst) };
            }
            map($f, src, dst)
        }
    };
}

row!(bm_row_exp, exp_avx2, exp_avx512, interp::exp_core);
row!(bm_row_gelu_tanh, gelu_tanh_avx2, gelu_tanh_avx512, interp::gelu_tanh);
row!(bm_row_gelu_tanh_grad, gelu_tanh_grad_avx2, gelu_tanh_grad_avx512, interp::gelu_tanh_grad);

#[cfg(test)]
mod tests {
    use super::*;

    type Wide = unsafe fn(&[f32], &mut [f32]);

    /// Every width this CPU has (the dispatching entry point, and each wide variant
    /// directly) equals the interpreter bit for bit.
    #[test]
    fn rows_equal_the_interpreter_bit_for_bit() {
        let xs: Vec<f32> = (0..4099)
            .map(|i| (i as f32 - 2049.5) * 0.0537)
            .chain([f32::NAN, f32::INFINITY, -f32::INFINITY, 0.0, -0.0, 88.9, -104.5])
            .collect();
        #[cfg(target_arch = "x86_64")]
        let wide: [(UnaryOp, Wide, Wide); 3] = [
            (UnaryOp::Exp, exp_avx2, exp_avx512),
            (UnaryOp::GeluTanh, gelu_tanh_avx2, gelu_tanh_avx512),
            (UnaryOp::GeluTanhGrad, gelu_tanh_grad_avx2, gelu_tanh_grad_avx512),
        ];
        for op in [UnaryOp::Exp, UnaryOp::GeluTanh, UnaryOp::GeluTanhGrad] {
            let check = |out: &[f32], how: &str| {
                for (x, y) in xs.iter().zip(out) {
                    let want = interp::unary(op, *x);
                    assert!(want.to_bits() == y.to_bits() || (want.is_nan() && y.is_nan()), "{op:?}({x}) = {y} vs {want} ({how})");
                }
            };
            let f = row_fn(op).unwrap();
            let mut out = vec![0.0f32; xs.len()];
            // SAFETY: both hold xs.len() floats.
            unsafe { f(xs.as_ptr(), xs.len(), out.as_mut_ptr()) };
            check(&out, "dispatched");
            #[cfg(target_arch = "x86_64")]
            for &(o, avx2, avx512) in &wide {
                if o != op {
                    continue;
                }
                if std::is_x86_feature_detected!("avx2") {
                    // SAFETY: AVX2 was detected.
                    unsafe { avx2(&xs, &mut out) };
                    check(&out, "AVX2");
                }
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: AVX-512F was detected.
                    unsafe { avx512(&xs, &mut out) };
                    check(&out, "AVX-512");
                }
            }
        }
    }
}
