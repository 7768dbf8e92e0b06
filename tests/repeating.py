"""Tasks that fail the same way on every chunk (or not), for the fail-fast tests (run by real
agent workers). Each execution appends a ``start`` line to ``marks`` (``tests.faulty.tally``)."""
from __future__ import annotations

import os
import sys
import time

from tests.faulty import mark

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliett"]


def fails(chunk_id: int, marks: str, how: str, ok: list[int] | None = None, pause: float = 0.0,
          gate: str | None = None) -> int:
    """Chunk ``chunk_id`` fails by ``how`` (or returns, if it is in ``ok``):

    * ``path``: a wrong data path, ``FileNotFoundError`` naming ``/data/chunk_<id>.npy``;
    * ``runtime``: a ``RuntimeError`` with one message on every chunk;
    * ``varied``: a ``ValueError`` whose message names another word on every chunk.

    ``gate``: first wait until that file exists."""
    mark(marks, "start", chunk_id)
    while gate and not os.path.exists(gate):
        time.sleep(0.02)
    if pause:
        time.sleep(pause)
    if chunk_id in (ok or []):
        return chunk_id
    if how == "path":
        return len(open(f"/data/chunk_{chunk_id}.npy", "rb").read())
    if how == "runtime":
        raise RuntimeError("the config has no section 'model'")
    if how == "varied":
        raise ValueError(f"bad row in {WORDS[chunk_id % len(WORDS)]}.csv")
    raise AssertionError(how)


if __name__ == "__main__":  # a script job: the same error on every chunk, by its traceback's last line
    args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
    fails(int(args["--chunk_id"]), args["--marks"], args["--how"], pause=float(args.get("--pause", 0)))
