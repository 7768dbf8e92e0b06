#!/usr/bin/env python3
"""OctoRun-style chunk script that does nothing (the interpreter start is the whole cost)."""
import argparse

p = argparse.ArgumentParser()
p.add_argument("--gpu_id", type=int, required=True)
p.add_argument("--chunk_id", type=int, required=True)
p.add_argument("--total_chunks", type=int, required=True)
p.parse_args()
