#!/usr/bin/env python3
"""OctoRun-style chunk script: the 64x64 matmul of bench.tasks.matmul64, saved to --out_dir."""
import argparse
import os

import numpy as np

p = argparse.ArgumentParser()
p.add_argument("--gpu_id", type=int, required=True)
p.add_argument("--chunk_id", type=int, required=True)
p.add_argument("--total_chunks", type=int, required=True)
p.add_argument("--out_dir", required=True)
a = p.parse_args()
x = np.random.default_rng(a.chunk_id).standard_normal((64, 64))
np.save(os.path.join(a.out_dir, f"{a.chunk_id:06d}.npy"), x @ x.T)
