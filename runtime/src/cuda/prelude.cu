// Device helpers shared by every generated kernel. The semantics follow the kernel IR
// (runtime/src/kir.rs) and the CPU interpreter (runtime/src/interp.rs):
// - max/min are IEEE 754-2019 maximum/minimum: a NaN operand gives NaN, -0 < +0;
// - comparisons and step give 1.0f or 0.0f; select evaluates both sides;
// - storing into an i32 buffer rounds to nearest even, saturating, NaN to 0
//   (PTX cvt.rni.sat semantics, which __float2int_rn has).
#define BM_INF __int_as_float(0x7f800000)
#define BM_NAN __int_as_float(0x7fc00000)

__device__ __forceinline__ float bm_max(float a, float b) {
  if (a != a || b != b) return BM_NAN;
  if (a == b) return signbit(a) ? b : a;
  return a > b ? a : b;
}
__device__ __forceinline__ float bm_min(float a, float b) {
  if (a != a || b != b) return BM_NAN;
  if (a == b) return signbit(a) ? a : b;
  return a < b ? a : b;
}
__device__ __forceinline__ float bm_relu(float x) { return bm_max(x, 0.0f); }
__device__ __forceinline__ float bm_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ float bm_square(float x) { return x * x; }
__device__ __forceinline__ float bm_rsqrt(float x) { return 1.0f / sqrtf(x); }
__device__ __forceinline__ float bm_recip(float x) { return 1.0f / x; }
__device__ __forceinline__ float bm_step(float x) { return x > 0.0f ? 1.0f : 0.0f; }
// interp::round_bf16 as bf16 bits: nearest even; NaN stays (a quiet) NaN.
__device__ __forceinline__ unsigned short bm_bf16_bits(float x) {
  unsigned u = __float_as_uint(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
  return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
__device__ __forceinline__ float bm_round_bf16(float x) { return __uint_as_float(((unsigned)bm_bf16_bits(x)) << 16); }
// interp::gelu_tanh's operations, in its order (1/2 (1 + tanh s) = 1 / (1 + exp(-2s))).
__device__ __forceinline__ float bm_gelu_tanh(float x) {
  float x3 = x * x * x;
  float s = (x + x3 * 0.044715f) * 0.797884583f;
  return x / (expf(-(s + s)) + 1.0f);
}
// interp::gelu_tanh_grad's operations, in its order.
__device__ __forceinline__ float bm_gelu_tanh_grad(float x) {
  x = x < -20.0f ? -20.0f : x;
  x = x > 20.0f ? 20.0f : x;
  float x2 = x * x;
  float s = (x + x2 * x * 0.044715f) * 0.797884583f;
  float sig = 1.0f / (expf(-(s + s)) + 1.0f);
  float ds = (x2 * 0.134145007f + 1.0f) * 1.59576917f;
  return sig + x * ds * (sig * (1.0f - sig));
}
__device__ __forceinline__ float bm_lt(float a, float b) { return a < b ? 1.0f : 0.0f; }
__device__ __forceinline__ float bm_le(float a, float b) { return a <= b ? 1.0f : 0.0f; }
__device__ __forceinline__ float bm_gt(float a, float b) { return a > b ? 1.0f : 0.0f; }
__device__ __forceinline__ float bm_ge(float a, float b) { return a >= b ? 1.0f : 0.0f; }
__device__ __forceinline__ float bm_eq(float a, float b) { return a == b ? 1.0f : 0.0f; }
__device__ __forceinline__ float bm_ne(float a, float b) { return a != b ? 1.0f : 0.0f; }
__device__ __forceinline__ float bm_select(float c, float a, float b) { return c != 0.0f ? a : b; }
__device__ __forceinline__ int bm_to_i32(float x) { return __float2int_rn(x); }

__device__ __forceinline__ float bm_warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Reduction of one value per thread over groups of G consecutive threads (G a power of
// two, 32 or a multiple of 32 up to the block size); `op` 0 = sum, 1 = max, 2 = min.
// Every thread of a group gets the result. `scratch` holds blockDim.x / 32 floats.
template <int OP>
__device__ __forceinline__ float bm_combine(float a, float b) {
  return OP == 0 ? a + b : (OP == 1 ? bm_max(a, b) : bm_min(a, b));
}
template <int OP, int G>
__device__ float bm_group_reduce(float v, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) v = bm_combine<OP>(v, __shfl_xor_sync(0xffffffffu, v, o));
  if (G > 32) {
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int per = G / 32;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int first = warp - warp % per;
    v = scratch[first];
    for (int w = 1; w < per; w++) v = bm_combine<OP>(v, scratch[first + w]);
  }
  return v;
}
