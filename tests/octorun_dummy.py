#!/usr/bin/env python3
"""An OctoRun-style chunk script for the tests, written like OctoRun's own tests/dummy_script.py
(argparse, ``--fail_chunk_ids``, ``--sleep_time``, exit 1 for a failing chunk), plus what the
tests look at: every start of a chunk leaves ``<record_dir>/chunk_<id>.<pid>.json`` (its
arguments, its pid and the variables named by ``--env_names``), and ``--gate FILE`` makes
a chunk wait until FILE exists. Unknown flags are accepted (and recorded)."""
import argparse
import json
import os
import sys
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gpu_id", type=int, required=True)
    p.add_argument("--chunk_id", type=int, required=True)
    p.add_argument("--total_chunks", type=int, required=True)
    p.add_argument("--fail_chunk_ids", default="", help="comma-separated chunk ids that fail")
    p.add_argument("--fail_code", type=int, default=1, help="the exit code of a failing chunk")
    p.add_argument("--exit_codes", default="", help="chunk:code,...: these chunks exit with that code")
    p.add_argument("--sleep_time", type=float, default=0.0)
    p.add_argument("--gate", default="", help="wait until this file exists")
    p.add_argument("--record_dir", default="")
    p.add_argument("--env_names", default="", help="comma-separated variables to record")
    args, extra = p.parse_known_args()
    if args.record_dir:
        os.makedirs(args.record_dir, exist_ok=True)
        env = {k: os.environ.get(k) for k in args.env_names.split(",") if k}
        rec = {"argv": sys.argv[1:], "extra": extra, "pid": os.getpid(), "gpu_id": args.gpu_id, "env": env}
        final = os.path.join(args.record_dir, f"chunk_{args.chunk_id}.{os.getpid()}.json")
        with open(final + ".tmp", "w") as f:  # renamed into place: the test reads these while it polls
            json.dump(rec, f)
        os.replace(final + ".tmp", final)
    print(f"Starting processing: GPU {args.gpu_id}, Chunk {args.chunk_id}/{args.total_chunks}", flush=True)
    while args.gate and not os.path.exists(args.gate):
        time.sleep(0.05)
    time.sleep(args.sleep_time)
    failing = {int(c) for c in args.fail_chunk_ids.split(",") if c.strip()}
    codes = dict(tuple(map(int, pair.split(":"))) for pair in args.exit_codes.split(",") if pair.strip())
    if args.chunk_id in codes:
        sys.exit(codes[args.chunk_id])
    if args.chunk_id in failing:
        print(f"ERROR: Chunk {args.chunk_id} failed!", flush=True)
        sys.exit(args.fail_code)
    print(f"SUCCESS: Chunk {args.chunk_id} completed successfully on GPU {args.gpu_id}")


if __name__ == "__main__":
    main()
