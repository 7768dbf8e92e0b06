#!/usr/bin/env python3
"""OctoRun-style chunk script: fresh interpreter + import torch + CUDA init, one small matmul."""
import argparse
import os

import torch

p = argparse.ArgumentParser()
p.add_argument("--gpu_id", type=int, required=True)
p.add_argument("--chunk_id", type=int, required=True)
p.add_argument("--total_chunks", type=int, required=True)
p.add_argument("--size", type=int, default=256)
p.add_argument("--out_dir", required=True)
a = p.parse_args()
dev = f"cuda:{a.gpu_id}"
g = torch.Generator(device="cpu").manual_seed(a.chunk_id)
x = torch.randn(a.size, a.size, generator=g).to(dev)
y = torch.tanh(x @ x)
torch.cuda.synchronize()
with open(os.path.join(a.out_dir, f"{a.chunk_id:06d}.txt"), "w") as f:
    f.write(repr(float(y.sum().item())))
