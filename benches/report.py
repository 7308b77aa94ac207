"""Shared by the benchmarks: print a results table and save it with its JSON."""

import json
from pathlib import Path


def emit(table: str, doc: dict, out=None):
    """Prints `table`; with `out` (a path prefix) writes out.md (the table) and out.json (`doc`)."""
    print(table)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(str(out) + ".json").write_text(json.dumps(doc, indent=1))
        Path(str(out) + ".md").write_text(table + "\n")
