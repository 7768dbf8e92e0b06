#!/usr/bin/env python3
"""OctoRun-style chunk script: load the shared .npz (a full copy) and sum it, per chunk."""
import argparse
import os

import numpy as np

p = argparse.ArgumentParser()
p.add_argument("--gpu_id", type=int, required=True)
p.add_argument("--chunk_id", type=int, required=True)
p.add_argument("--total_chunks", type=int, required=True)
p.add_argument("--path", required=True)
p.add_argument("--out_dir", required=True)
a = p.parse_args()
with np.load(a.path, allow_pickle=False) as z:
    s = float(z["W"].sum(dtype=np.float64))
with open(os.path.join(a.out_dir, f"{a.chunk_id:06d}.txt"), "w") as f:
    f.write(repr(s))
