"""Writes a file of random u16 tokens (the `tokens(...)` data layout) for benchmarks.

usage: python3 bench/make_tokens.py OUT VOCAB [COUNT]   (COUNT default 2,000,000)
"""
import random
import struct
import sys

out, vocab = sys.argv[1], int(sys.argv[2])
count = int(sys.argv[3]) if len(sys.argv) > 3 else 2_000_000
rng = random.Random(1234)
with open(out, "wb") as f:
    for start in range(0, count, 65536):
        n = min(65536, count - start)
        f.write(struct.pack(f"<{n}H", *(rng.randrange(vocab) for _ in range(n))))
print(f"{out}: {count} tokens below {vocab}")
