"""Print a bench's Markdown result and append it to the results file (the benches' shared ending)."""
from __future__ import annotations

from typing import Optional


def emit(text: str, out: Optional[str]) -> None:
    print(text)
    if out:
        with open(out, "a", encoding="utf-8") as handle:
            handle.write(text + "\n")
