"""Replays a saved latency table: the whole flow runs (and is tested) without the engine."""
from __future__ import annotations

from spdy_onnx.tables import LatencyTable


class TableRuntime:
    name = "table"

    def __init__(self, latency_table: str | None = None, **_ignored):
        self.table = LatencyTable.load(latency_table) if latency_table else None
        self.pattern = self.table.pattern if self.table else "unstructured"

    def default_levels(self) -> list[float]:
        return list(self.table.levels) if self.table else [0.0]

    def check_model(self, model) -> None:
        return None

    def fingerprint(self) -> dict:
        return {"engine": "table"}

    def measure(self, model_path, sites, **_ignored) -> LatencyTable:
        if self.table is None:
            from spdy_onnx.errors import SpdyError
            raise SpdyError("--runtime table replays a saved latency table and measures nothing: give the table "
                            "with --latency-table TABLE.json (written by `spdy-onnx profile`)")
        return self.table

    def compare(self, baseline_path, candidate_path, **_ignored):
        return None  # nothing to run: the end-to-end check is reported as not measured
