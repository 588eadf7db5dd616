"""Side-by-side training-step benchmark: bmc against PyTorch on this machine, in one run.

usage (from the repository root, with a Python that has the peers' packages, e.g. the
venv made by ../shared/bench/peers/setup_venv.sh):
    cargo build --release -p bmc
    ~/peers-venv/bin/python bench/compare.py [--workloads w1 w2 w3] [--modes eager eager-fused compile] [--reps 1] [--hogs 0]

Each configuration runs in a fresh process, alternating bmc and PyTorch, with the
warm-up and timed step counts of ../shared/bench/peers/models.md. Prints one JSON line
per run and a Markdown table for docs/PERFORMANCE.md: per implementation the median over
`--reps` rounds of its median ms/step, and bmc's ratio to it; with several rounds, also
bmc ÷ the best PyTorch mode within each round (back-to-back runs: this host's load
drifts by 20–40% over minutes). `--hogs N` runs N busy processes (one core each) for the
whole comparison: how each implementation copes when another process takes a core.
"""
import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PEERS = os.path.normpath(os.path.join(REPO, "..", "shared", "bench", "peers"))
BMC = os.path.join(REPO, "target", "release", "bmc")

WORKLOADS = {
    # name: (bmc model, peer workload, warm-up, timed steps, batches cycled)
    "w1": ("models/w1_mlp_digits.bm", "mlp-digits", 50, 500, 14),
    "w2": ("models/w2_gpt_tiny.bm", "gpt-tiny", 5, 30, 8),
    "w3": ("models/w3_gpt_small_cpu.bm", "gpt-small-cpu", 3, 20, 8),
}


def run_bmc(model, warmup, steps, batches, threads):
    out = subprocess.run([BMC, "bench", model, "--warmup", str(warmup), "--steps", str(steps), "--batches", str(batches),
                          "--threads", str(threads), "--json"], cwd=REPO, capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {"impl": "bmc", "median_ms": r["median_ms"], "items_per_s": r["items_per_s"], "gflops": r["gflops"],
            "peak_rss_mib": r["peak_rss_mib"], "compile_s": r["jit_ms"] / 1e3}


def run_torch(workload, mode, warmup, steps, threads):
    out = subprocess.run([sys.executable, os.path.join(PEERS, "bench_torch.py"), workload, mode, "--warmup", str(warmup),
                          "--steps", str(steps), "--threads", str(threads)], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {"impl": f"torch {mode}", "median_ms": r.get("median_ms"), "items_per_s": r.get("throughput"),
            "gflops": r.get("achieved_gflops"), "peak_rss_mib": r.get("peak_rss_mib"), "compile_s": r.get("compile_s"), "raw": r}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", nargs="+", default=["w1"], choices=list(WORKLOADS))
    ap.add_argument("--modes", nargs="+", default=["eager", "eager-fused"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--hogs", type=int, default=0, help="busy processes competing for the cores meanwhile")
    a = ap.parse_args()
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.hogs)]
    try:
        compare(a)
    finally:
        for h in hogs:
            h.kill()


def cpu():
    """The CPU, as far as /proc/cpuinfo tells: machines of one kind differ between sessions
    (AMD Zen 4 runs AVX-512 at half the width of Zen 5, so bmc's kernels there have
    PyTorch's AVX2 FMA rate), and ratios are only comparable on the same CPU."""
    try:
        info = open("/proc/cpuinfo").read().split("\n\n")[0]
    except OSError:
        return "unknown"
    field = {k.strip(): v for k, v in (l.split(":", 1) for l in info.splitlines() if ":" in l)}
    get = lambda k: field.get(k, "?").strip()
    avx512 = "avx512f" in get("flags").split()
    return f"{get('model name')}, family {get('cpu family')} model {get('model')}, avx512f {'yes' if avx512 else 'no'}, {os.cpu_count()} CPUs"


def compare(a):
    print(json.dumps({"cpu": cpu()}), flush=True)
    tagged = []  # (workload, round, result)
    for w in a.workloads:
        model, peer, warmup, steps, batches = WORKLOADS[w]
        for rep in range(a.reps):
            tagged.append((w, rep, run_bmc(model, warmup, steps, batches, a.threads)))
            print(json.dumps({"workload": w, "rep": rep, **tagged[-1][2]}), flush=True)
            for m in a.modes:
                tagged.append((w, rep, run_torch(peer, m, warmup, steps, a.threads)))
                print(json.dumps({"workload": w, "rep": rep, **{k: v for k, v in tagged[-1][2].items() if k != "raw"}}), flush=True)
    rows = [(w, r) for w, _, r in tagged]
    print("\n| workload | implementation | median ms/step | items/s | matmul GFLOP/s | peak RSS MiB | bmc / this |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for w in a.workloads:
        impls = list(dict.fromkeys(r["impl"] for ww, r in rows if ww == w))
        mine = median(r["median_ms"] for ww, r in rows if ww == w and r["impl"] == "bmc")
        for impl in impls:
            runs = [r for ww, r in rows if ww == w and r["impl"] == impl]
            ms = median(r["median_ms"] for r in runs)
            pick = lambda key: median(r[key] or 0 for r in runs)
            ratio = mine / ms if ms else float("nan")
            print(f"| {w} | {impl} | {ms:.3f} | {pick('items_per_s'):,.0f} | {pick('gflops'):.1f} | {pick('peak_rss_mib'):.0f} | {ratio:.2f}× |")
    if a.reps > 1:
        # The host's load drifts between runs: a ratio within one round (bmc and every
        # PyTorch mode run back to back) is steadier than one between rounds' medians.
        print("\nbmc ÷ best PyTorch mode, per round (median over rounds):")
        for w in a.workloads:
            ratios = []
            for rep in range(a.reps):
                got = [r for ww, rr, r in tagged if ww == w and rr == rep]
                bmc = [r["median_ms"] for r in got if r["impl"] == "bmc"][0]
                best = min(r["median_ms"] for r in got if r["impl"] != "bmc")
                ratios.append(bmc / best)
            print(f"  {w}: " + ", ".join(f"{x:.2f}×" for x in ratios) + f"  → median {median(ratios):.2f}×")


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return (xs[n // 2] + xs[(n - 1) // 2]) / 2 if n else float("nan")


if __name__ == "__main__":
    main()
