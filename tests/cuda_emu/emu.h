// A CPU emulator for the CUDA C that bmc generates (tests/cuda.rs): just enough of
// CUDA's execution model to run the generated kernels on a machine without a GPU and
// compare them with the CPU backend. Each block runs with one OS thread per CUDA thread;
// __syncthreads is a block barrier and warp shuffles exchange through a per-block slot
// array between two warp barriers; a thread that returns early drops out of both
// barriers (as exited threads do on a GPU). Atomics take a global lock.
#include <barrier>
#include <cmath>
#include <math.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

struct bm_dim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local bm_dim3 threadIdx, blockIdx;
inline bm_dim3 blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static

inline float __int_as_float(unsigned x) {
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
inline float __uint_as_float(unsigned x) { return __int_as_float(x); }
inline unsigned __float_as_uint(float f) {
  unsigned x;
  std::memcpy(&x, &f, 4);
  return x;
}
// cvt.rni.s32.f32: round to nearest even, saturate, NaN to 0.
inline int __float2int_rn(float x) {
  if (x != x) return 0;
  double r = std::nearbyint((double)x);
  if (r >= 2147483647.0) return 2147483647;
  if (r <= -2147483648.0) return (-2147483647 - 1);
  return (int)r;
}
using std::signbit;

struct bm_block_sync {
  std::unique_ptr<std::barrier<>> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<float> slots;
};
inline bm_block_sync* bm_sync = nullptr;
inline std::mutex bm_atomic_lock;

inline unsigned bm_tid() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }
inline void __syncthreads() { bm_sync->block->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { bm_sync->warps[bm_tid() / 32]->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int o) {
  unsigned t = bm_tid();
  auto& w = *bm_sync->warps[t / 32];
  bm_sync->slots[t] = v;
  w.arrive_and_wait();
  float r = bm_sync->slots[t ^ (unsigned)o];
  w.arrive_and_wait();
  return r;
}
inline float atomicAdd(float* a, float v) {
  std::lock_guard<std::mutex> g(bm_atomic_lock);
  float old = *a;
  *a = old + v;
  return old;
}
inline int atomicCAS(int* a, int cmp, int val) {
  std::lock_guard<std::mutex> g(bm_atomic_lock);
  int old = *a;
  if (old == cmp) *a = val;
  return old;
}

typedef void (*bm_kernel)(float*, int*);

inline void bm_launch(bm_kernel f, bm_dim3 grid, bm_dim3 block, float* A, int* E) {
  gridDim = grid;
  blockDim = block;
  unsigned n = block.x * block.y * block.z;
  for (unsigned bz = 0; bz < grid.z; bz++)
    for (unsigned by = 0; by < grid.y; by++)
      for (unsigned bx = 0; bx < grid.x; bx++) {
        bm_block_sync s;
        s.block = std::make_unique<std::barrier<>>(n);
        for (unsigned w = 0; w < (n + 31) / 32; w++) s.warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, n - 32 * w)));
        s.slots.assign(n, 0.0f);
        bm_sync = &s;
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < n; t++) {
          threads.emplace_back([&, t] {
            blockIdx = {bx, by, bz};
            threadIdx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            f(A, E);
            bm_sync->warps[t / 32]->arrive_and_drop();
            bm_sync->block->arrive_and_drop();
          });
        }
        for (auto& th : threads) th.join();
      }
}

// A kernel that never synchronises (no __syncthreads, no shuffles) runs its threads one
// after another on this thread: same results, no thread spawns.
inline void bm_launch_serial(bm_kernel f, bm_dim3 grid, bm_dim3 block, float* A, int* E) {
  gridDim = grid;
  blockDim = block;
  for (unsigned bz = 0; bz < grid.z; bz++)
    for (unsigned by = 0; by < grid.y; by++)
      for (unsigned bx = 0; bx < grid.x; bx++)
        for (unsigned t = 0; t < block.x * block.y * block.z; t++) {
          blockIdx = {bx, by, bz};
          threadIdx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
          f(A, E);
        }
}

// cublasGemmEx with bf16 A and B (2-byte elements), f32 C and f32 accumulation.
inline void bm_gemm_bf16(bool ta, bool tb, long m, long n, long k, const unsigned short* a, long lda, const unsigned short* b, long ldb,
                         float* c, long ldc, bool acc) {
  auto f = [](unsigned short h) { return __uint_as_float((unsigned)h << 16); };
  for (long i = 0; i < m; i++)
    for (long j = 0; j < n; j++) {
      double s = 0;
      for (long l = 0; l < k; l++) {
        float x = f(ta ? a[l + i * lda] : a[i + l * lda]);
        float y = f(tb ? b[j + l * ldb] : b[l + j * ldb]);
        s += (double)x * (double)y;
      }
      c[i + j * ldc] = acc ? c[i + j * ldc] + (float)s : (float)s;
    }
}
// cuBLAS's column-major sgemm, by its specification.
inline void bm_sgemm(bool ta, bool tb, long m, long n, long k, const float* a, long lda, const float* b, long ldb, float* c, long ldc,
                     bool acc) {
  for (long i = 0; i < m; i++)
    for (long j = 0; j < n; j++) {
      double s = 0;
      for (long l = 0; l < k; l++) {
        float x = ta ? a[l + i * lda] : a[i + l * lda];
        float y = tb ? b[j + l * ldb] : b[l + j * ldb];
        s += (double)x * (double)y;
      }
      c[i + j * ldc] = acc ? c[i + j * ldc] + (float)s : (float)s;
    }
}
