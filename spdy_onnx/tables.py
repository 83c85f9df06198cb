"""LatencyTable: per-site times at each sparsity level, the contract between measuring and solving.

Model time = T_fixed + sum over prunable sites of t[site][level], where T_fixed is the dense total
minus the dense time of the sites being chosen for. Sites left dense (excluded) stay inside T_fixed.

`fused_groups` lists sites the engine ran as one fused kernel in some profiling run. The sum holds only
while such sites share one level: DeepSparse runs MobileNetV2's dense expand-depthwise-project blocks
as one kernel, and a profile predicted at 1.30x with some of them sparse and others dense measured
1.17x; tied, a profile with the same prediction measured 1.32x (benchmarks/results/fused_groups_mobilenetv2.txt).
A profiling run has every site at one level, so it cannot see kernels the engine forms only in a mixed
file: `tie` adds groups found fused in a pruned file written during a run (api.py, after a missed draft).

`level_factors` (one per level, empty meaning all 1) scale the sites' times at a level in the solver and
the prediction, never the dense total or the fixed time: a dense or lightly pruned site among pruned
ones costs more than the level's own run says (spdy_onnx.context measures by how much).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spdy_onnx.errors import SpdyError

SCHEMA = "spdy-onnx/latency-table/1"


def merge_groups(groups: list[list[str]], known: set[str]) -> list[list[str]]:
    """Overlapping groups merged (the solver's tied units), sites without times dropped, groups of one
    left out; sorted."""
    from spdy_onnx.solver import tied_units
    names = sorted({n for g in groups for n in g if n in known})
    index = {n: i for i, n in enumerate(names)}
    units = tied_units(len(names), [[index[n] for n in g if n in index] for g in groups])
    return sorted(sorted(names[i] for i in u) for u in units if len(u) > 1)


@dataclass
class LatencyTable:
    levels: list[float]                       # levels[0] == 0.0 is dense
    times: dict[str, list[float]]             # site name -> ms at each level
    dense_total_ms: float                     # whole model, dense, same engine and settings
    runtime: str
    pattern: str = "unstructured"
    meta: dict = field(default_factory=dict)  # engine version, cpu, cores, batch, shapes, model digest, spread
    fused_groups: list[list[str]] = field(default_factory=list)   # sites that must share one level
    level_factors: list[float] = field(default_factory=list)       # per level, empty: all 1 (see above)
    # where the cache keeps this table (set by api.latency_table; never saved, None for a user's file)
    cache_path: Path | None = field(default=None, repr=False, compare=False)
    # this run's sites that share one weight (graph.shared_weight_groups), tied like fused groups, and
    # sites the engine does not time that share a timed one's weight: no time of their own (never saved)
    shared_groups: list[list[str]] = field(default_factory=list, repr=False, compare=False)
    riders: set = field(default_factory=set, repr=False, compare=False)

    def validate(self) -> "LatencyTable":
        if not self.levels or self.levels[0] != 0.0:
            raise SpdyError("latency table: levels must start with 0.0 (dense)")
        if not (isinstance(self.dense_total_ms, (int, float)) and math.isfinite(self.dense_total_ms)
                and self.dense_total_ms > 0):
            raise SpdyError("latency table: dense_total_ms must be a positive number")
        for name, row in self.times.items():
            if len(row) != len(self.levels):
                raise SpdyError(f"latency table: site '{name}' has {len(row)} times for {len(self.levels)} levels")
            if not all(isinstance(t, (int, float)) and math.isfinite(t) and t >= 0 for t in row):
                raise SpdyError(f"latency table: site '{name}' has a negative or non-numeric time")
        if self.level_factors and (len(self.level_factors) != len(self.levels) or not all(
                isinstance(f, (int, float)) and math.isfinite(f) and f > 0 for f in self.level_factors)):
            raise SpdyError(f"latency table: level_factors must be {len(self.levels)} positive numbers")
        for group in self.fused_groups:
            unknown = [n for n in group if n not in self.times]
            if unknown:
                raise SpdyError(f"latency table: fused group names site(s) without times: {', '.join(unknown[:3])}")
        return self

    def matrix(self, sites: list[str]) -> np.ndarray:
        missing = [s for s in sites if s not in self.times]
        if missing:
            raise SpdyError(f"latency table has no times for site(s): {', '.join(missing[:5])}"
                            + (" ..." if len(missing) > 5 else ""))
        raw = np.array([self.times[s] for s in sites], dtype=np.float64).reshape(len(sites), len(self.levels))
        return raw * self.factors()

    def factors(self) -> np.ndarray:
        return np.asarray(self.level_factors, dtype=np.float64) if self.level_factors else np.ones(len(self.levels))

    def site_ms(self, site: str, j: int) -> float:
        """A site's time at level j as the solver counts it (level factor included)."""
        return float(self.times[site][j] * (self.level_factors[j] if self.level_factors else 1.0))

    def tied_groups(self, sites: list[str]) -> list[list[int]]:
        """The fused groups as indices into `sites`, members outside `sites` dropped (they stay dense
        with their own reason), groups of fewer than two left out."""
        index = {name: i for i, name in enumerate(sites)}
        groups = [[index[n] for n in group if n in index] for group in self.fused_groups + self.shared_groups]
        return [g for g in groups if len(g) > 1]

    def tie(self, groups: list[list[str]]) -> bool:
        """Merge groups of sites found fused elsewhere (a pruned file's own analysis) into fused_groups;
        whether they changed."""
        merged = merge_groups(list(self.fused_groups) + [list(g) for g in groups], set(self.times))
        if merged == merge_groups(self.fused_groups, set(self.times)):
            return False
        self.fused_groups = merged
        return True

    def fastest_picks(self, sites: list[str]) -> np.ndarray:
        """The fastest level of every site, tied sites at the fastest level of their group's summed time."""
        from spdy_onnx.solver import tied_units
        times = self.matrix(sites)
        picks = times.argmin(axis=1)
        for unit in tied_units(len(sites), self.tied_groups(sites)):
            picks[unit] = int(times[unit].sum(axis=0).argmin())
        return picks

    def fixed_ms(self, sites: list[str]) -> float:
        """Time of everything the solver does not choose for (excluded sites stay dense here)."""
        return self.dense_total_ms - float(sum(self.times[s][0] for s in sites))

    def budget_ms(self, sites: list[str], target: float) -> float:
        return self.dense_total_ms / target - self.fixed_ms(sites)

    def max_speedup(self, sites: list[str]) -> float:
        picks = self.fastest_picks(sites)
        fastest = self.fixed_ms(sites) + float(self.matrix(sites)[np.arange(len(sites)), picks].sum())
        return self.dense_total_ms / fastest if fastest > 0 else math.inf

    def scale_savings(self, j: int, share: float) -> None:
        """Keep only `share` (0..1) of what each site saves at level j against dense: what an end-to-end
        measurement of that level found the per-layer times to promise too much."""
        share = min(max(float(share), 0.0), 1.0)
        for name, row in self.times.items():
            if row[j] < row[0]:
                row[j] = row[0] - share * (row[0] - row[j])

    def predicted_ms(self, profile: dict[str, int]) -> float:
        return self.fixed_ms(list(profile)) + sum(self.site_ms(s, j) for s, j in profile.items())

    def predicted_speedup(self, profile: dict[str, int]) -> float:
        return self.dense_total_ms / self.predicted_ms(profile)

    def to_json(self) -> dict:
        data = {"schema": SCHEMA, "runtime": self.runtime, "pattern": self.pattern, "levels": self.levels,
                "dense_total_ms": self.dense_total_ms, "meta": self.meta,
                "times": {k: v for k, v in self.times.items() if k not in self.riders}}
        if self.fused_groups:
            data["fused_groups"] = self.fused_groups
        if self.level_factors:
            data["level_factors"] = self.level_factors
        return data

    def save(self, path: str | os.PathLike) -> Path:
        return write_json_atomic(path, self.to_json())

    @classmethod
    def from_json(cls, data: dict) -> "LatencyTable":
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise SpdyError(f"not a latency table (expected schema '{SCHEMA}')")
        try:
            table = cls(levels=[float(v) for v in data["levels"]],
                        times={str(k): [float(t) for t in v] for k, v in data["times"].items()},
                        dense_total_ms=float(data["dense_total_ms"]), runtime=str(data["runtime"]),
                        pattern=str(data.get("pattern", "unstructured")), meta=dict(data.get("meta", {})),
                        fused_groups=[[str(n) for n in g] for g in data.get("fused_groups", [])],
                        level_factors=[float(f) for f in data.get("level_factors", [])])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SpdyError(f"latency table is malformed: {exc!r}") from None
        return table.validate()

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatencyTable":
        return cls.from_json(read_json(path, what="latency table"))


def read_json(path: str | os.PathLike, *, what: str = "JSON file") -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise SpdyError(f"no such {what}: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpdyError(f"cannot read {what} {path}: {exc}") from None


def new_file_mode() -> int:
    """The mode open() gives a new file under this process's umask (mkstemp's own is 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_json_atomic(path: str | os.PathLike, data) -> Path:
    """Written whole to a temp file beside `path`, then renamed: a reader never sees half a report."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=False, default=_json_default)
            f.write("\n")
        os.chmod(tmp, new_file_mode())   # readable like the model written next to it
        os.replace(tmp, path)
    except OSError as exc:
        raise SpdyError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj)}")
