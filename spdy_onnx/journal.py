"""Append-only JSON-lines journals: what a killed run had finished is read back, a damaged line skipped.

Used to resume profiling (one line per engine run) and the search (one line per evaluated profile).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


class Journal:
    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path else None

    def read(self) -> list[dict]:
        if self.path is None or not self.path.exists():
            return []
        entries, bad = [], 0
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    bad += 1
                    continue
                if isinstance(entry, dict):
                    entries.append(entry)
                else:
                    bad += 1
        if bad:
            log.warning("skipped %d damaged line(s) in %s", bad, self.path)
        return entries

    def append(self, entry: dict) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()

    def remove(self) -> None:
        if self.path is not None and self.path.exists():
            self.path.unlink()
