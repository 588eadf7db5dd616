"""PyTorch's training step of the GPT in models/lib/gpt_blocks.bm, for side-by-side GPU
numbers with `bmc bench` (scripts/gpu-check.sh runs both).

usage: python3 bench/torch_gpt.py --preset gpt2-124m|w3 [--device cuda|cpu]
           [--precision bf16|f32] [--mode compile|eager] [--warmup N] [--steps N]
           [--set key=value ...]        (override vocab, ctx, d, heads, layers, batch)

The same network as bmc's (pre-LayerNorm blocks, biases, tanh GELU, causal attention
through scaled_dot_product_attention, weight-tied head), AdamW (fused on the GPU),
random tokens made before timing; bf16 is autocast (bf16 compute, f32 master weights),
as bmc's `precision = "bf16"`. Prints one JSON line: median ms/step, tokens/s, and the
model FLOPs utilisation against --peak-tflops (default: H100/H200 SXM dense bf16, 989).
"""
import argparse
import json
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PRESETS = {
    "gpt2-124m": dict(vocab=50304, ctx=1024, d=768, heads=12, layers=12, batch=16),
    "w3": dict(vocab=512, ctx=256, d=384, heads=6, layers=6, batch=8),
}


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d, eps=1e-5)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d, eps=1e-5)
        self.fc = nn.Linear(d, 4 * d)
        self.fc_proj = nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.heads
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, h, d // h).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.fc_proj(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, vocab, ctx, d, heads, layers):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(ctx, d)
        self.h = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d, eps=1e-5)
        for m in self.modules():  # GPT-2's initialisation
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, tokens, targets):
        t = tokens.shape[1]
        x = self.wte(tokens) + self.wpe(torch.arange(t, device=tokens.device))
        for blk in self.h:
            x = blk(x)
        logits = self.ln_f(x) @ self.wte.weight.T
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=sorted(PRESETS), default="gpt2-124m")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precision", choices=["bf16", "f32"], default="bf16")
    ap.add_argument("--mode", choices=["compile", "eager"], default="compile")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    a = ap.parse_args()
    cfg = dict(PRESETS[a.preset])
    for kv in a.set:
        k, v = kv.split("=", 1)
        cfg[k] = int(v)
    dev = torch.device(a.device)
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = GPT(cfg["vocab"], cfg["ctx"], cfg["d"], cfg["heads"], cfg["layers"]).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                            fused=dev.type == "cuda")
    step_model = torch.compile(model) if a.mode == "compile" else model
    b, t = cfg["batch"], cfg["ctx"]
    batches = [torch.randint(0, cfg["vocab"], (b, t + 1), device=dev) for _ in range(4)]
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.precision == "bf16")

    def step(i):
        x = batches[i % len(batches)]
        with autocast:
            loss = step_model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for i in range(a.warmup):
        step(i)
    sync()
    warm_s = time.perf_counter() - t0
    times = []
    for i in range(a.steps):
        t1 = time.perf_counter()
        loss = step(a.warmup + i)
        sync()
        times.append(time.perf_counter() - t1)
    med = statistics.median(times)
    params = sum(p.numel() for p in model.parameters())
    tokens = b * t
    # PaLM's model FLOPs per token: 6N plus attention's 12·L·T·d.
    flops_per_token = 6 * params + 12 * cfg["layers"] * t * cfg["d"]
    out = dict(impl=f"torch {a.mode} {a.precision}", preset=a.preset, device=str(dev), config=cfg,
               median_ms=med * 1e3, tokens_per_s=tokens / med,
               mfu=flops_per_token * tokens / med / (a.peak_tflops * 1e12),
               warmup_s=warm_s, params=params, final_loss=float(loss), torch=torch.__version__)
    if not math.isfinite(out["final_loss"]):
        raise SystemExit(f"non-finite loss: {out}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
