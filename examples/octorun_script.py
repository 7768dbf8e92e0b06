#!/usr/bin/env python3
"""An OctoRun-style chunk script, unmodified for the pool: argparse with --gpu_id, --chunk_id,
--total_chunks and its own flags. Writes chunk_<id>.npy into --out_dir.

    python examples/octorun_script.py --gpu_id 0 --chunk_id 3 --total_chunks 8 --out_dir /tmp/out
    python main.py --base BASE --script examples/octorun_script.py --chunks 8 --kwargs '{"out_dir": "/tmp/out"}'
"""
import argparse
import os

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gpu_id", type=int, required=True)
    p.add_argument("--chunk_id", type=int, required=True)
    p.add_argument("--total_chunks", type=int, required=True)
    p.add_argument("--out_dir", required=True)
    p.add_argument("--size", type=int, default=1000)
    args = p.parse_args()
    items = np.arange(args.size)
    mine = np.array_split(items, args.total_chunks)[args.chunk_id]
    os.makedirs(args.out_dir, exist_ok=True)
    np.save(os.path.join(args.out_dir, f"chunk_{args.chunk_id}.npy"), np.sqrt(mine.astype(np.float64)))
    print(f"gpu {args.gpu_id}: chunk {args.chunk_id}/{args.total_chunks} did {len(mine)} items")


if __name__ == "__main__":
    main()
