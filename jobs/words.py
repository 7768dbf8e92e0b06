"""Small wording helpers shared by every command's output (one place, so no "1 chunks")."""
from __future__ import annotations


def plural(n: int, word: str, many: str | None = None) -> str:
    """``plural(1, "chunk")`` -> ``1 chunk``; ``plural(3, "chunk")`` -> ``3 chunks``;
    ``many``: the plural where it is not ``word + "s"`` (``plural(2, "was", "were")``)."""
    return f"{n} {word if n == 1 else many or word + 's'}"
