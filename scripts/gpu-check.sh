#!/usr/bin/env bash
# Builds, checks and times the CUDA path in one call, on any machine with an NVIDIA GPU:
#   bash scripts/gpu-check.sh            (from the repository root)
# 1. builds bmc (release) if cargo is here, else uses a carried target/release/bmc;
# 2. finds NVRTC and cuBLAS (the CUDA toolkit, or the pip wheels PyTorch brings) and
#    puts them on LD_LIBRARY_PATH;
# 3. runs the GPU tests: every model's loss and gradients on the GPU against the CPU,
#    W2's PyTorch losses on the GPU (tests/cuda.rs, tests/numerics.rs);
# 4. times training steps of W1–W3 on the GPU and the CPU (`bmc bench --device`), and on
#    the GPU with CUDA graphs off (BMC_CUDA_GRAPHS=0);
# 5. times the issue's bf16 targets against PyTorch on the same GPU: W3 (bench/w3_bf16.bm)
#    and GPT-2 124M's shape (bench/gpt2_124m.bm, random tokens), PyTorch through
#    bench/torch_gpt.py with torch.compile and bf16 autocast;
# 6. trains models/gpt.bm for a while on the GPU.
# Output also goes to $OUT/gpu-check.log when $OUT is set (the device tool sets it).
set -uo pipefail
cd "$(dirname "$0")/.."
log="${OUT:-/tmp}/gpu-check.log"
exec > >(tee "$log") 2>&1

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi: not found"

# CUDA libraries: the toolkit's, else any pip wheel folder holding libnvrtc.so.13.
if ! ldconfig -p 2>/dev/null | grep -q 'libnvrtc.so.13'; then
  for site in $(python3 -c 'import site, sys; print(" ".join(site.getsitepackages() + [site.getusersitepackages()]))' 2>/dev/null) /usr/local/lib/python3*/dist-packages; do
    lib=$(find "$site" -name 'libnvrtc.so.13' 2>/dev/null | head -n 1)
    if [ -n "$lib" ]; then
      export LD_LIBRARY_PATH="$(dirname "$lib")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
      break
    fi
  done
fi
echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"

if command -v cargo >/dev/null 2>&1; then
  cargo build --release -p bmc || exit 1
  echo "== GPU tests"
  BMC_REQUIRE_NVRTC=1 cargo test --release -p bm-tests --test cuda --test numerics -- --nocapture gpu 2>&1 | grep -v '^\s*$'
  BMC_REQUIRE_NVRTC=1 cargo test --release -p bm-tests --test cuda -- --nocapture ptx 2>&1 | grep -E 'bytes|skipped|test result|panicked|error'
fi
bmc=target/release/bmc
[ -x "$bmc" ] || { echo "no $bmc: build it (cargo build --release -p bmc) and carry target/release/bmc"; exit 1; }

echo "== bmc bench (ms/step, same run)"
for m in w1_mlp_digits w2_gpt_tiny w3_gpt_small_cpu; do
  for d in cuda cpu; do
    steps=50; [ "$d" = cpu ] && [ "$m" = w3_gpt_small_cpu ] && steps=5
    timeout 300 "$bmc" bench "models/$m.bm" --device "$d" --warmup 5 --steps "$steps" --json || echo "$m on $d: failed"
  done
done

echo "== CUDA graphs off (BMC_CUDA_GRAPHS=0: kernel by kernel), for the A/B with the runs above"
for m in w1_mlp_digits w2_gpt_tiny; do
  BMC_CUDA_GRAPHS=0 timeout 300 "$bmc" bench "models/$m.bm" --device cuda --warmup 5 --steps 50 --json || echo "$m on cuda without graphs: failed"
done
BMC_CUDA_DEBUG=1 timeout 120 "$bmc" bench models/w1_mlp_digits.bm --device cuda --warmup 2 --steps 5 2>&1 | grep -i 'kernel by kernel' || echo "every entry replayed as a CUDA graph"

echo "== the issue's GPU targets, bf16, bmc then PyTorch (torch.compile) on this GPU"
python3 bench/make_tokens.py bench/gpt2_tokens.bin 50304 || echo "make_tokens: failed"
timeout 600 "$bmc" bench bench/w3_bf16.bm --device cuda --warmup 5 --steps 50 --json || echo "w3 bf16 on cuda: failed"
timeout 900 python3 bench/torch_gpt.py --preset w3 --precision bf16 --mode compile --steps 50 || echo "torch w3 bf16: failed"
timeout 900 "$bmc" bench bench/gpt2_124m.bm --device cuda --warmup 3 --steps 20 --json || echo "gpt2-124m bf16 on cuda: failed"
timeout 900 python3 bench/torch_gpt.py --preset gpt2-124m --precision bf16 --mode compile --steps 20 || echo "torch gpt2-124m bf16: failed"
echo "(bmc's items/s are tokens/s; MFU = (6·params + 12·layers·ctx·d) FLOPs per token × tokens/s ÷ 989 TFLOPS)"

echo "== models/gpt.bm on the GPU (500 steps)"
timeout 600 "$bmc" train models/gpt.bm --device cuda --steps 500 --out /tmp/gpt-gpu 2>&1 | tail -n 3
echo "log: $log"
