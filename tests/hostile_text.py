"""A task whose error and output hold terminal escape sequences (imported by real agent workers)."""
from __future__ import annotations

import sys

# retitles the terminal, clears the screen, then overwrites the line with a fake success
HOSTILE = "boom \x1b]0;pwned\x07\x1b[2J\rchunk 0 ok"


def shout(chunk_id: int) -> int:
    """Chunk 0 prints, then raises, text with escape sequences; the others are ok."""
    if chunk_id == 0:
        print(f"out: {HOSTILE}", flush=True)
        print(f"err: {HOSTILE}", file=sys.stderr, flush=True)
        raise ValueError(HOSTILE)
    return chunk_id
