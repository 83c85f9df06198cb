"""Sparsity level grids: dense first, then levels equally spaced in log-density (SPDY's grid)."""
from __future__ import annotations

import numpy as np

from spdy_onnx.errors import SpdyError

DEFAULT_N_LEVELS = 12
DEFAULT_MIN_SPARSITY = 0.4
DEFAULT_MAX_SPARSITY = 0.97
# every level is one profiling run per repeat: more than this takes hours and buys nothing (the grid's
# steps are then finer than the engine's timing noise)
MAX_LEVELS = 48


def log_density_grid(n: int = DEFAULT_N_LEVELS, lo: float = DEFAULT_MIN_SPARSITY,
                     hi: float = DEFAULT_MAX_SPARSITY) -> list[float]:
    """[0.0] + n sparsities from lo to hi, each step removing the same fraction of what remains."""
    if n < 1 or not (0.0 < lo <= hi < 1.0):
        raise SpdyError(f"bad level grid: need n >= 1 and 0 < lo <= hi < 1, got n={n}, lo={lo}, hi={hi}")
    densities = np.exp(np.linspace(np.log(1 - lo), np.log(1 - hi), n)) if n > 1 else np.array([1 - hi])
    return [0.0] + [round(float(1 - d), 4) for d in densities]


def parse_levels(text: str | None) -> list[float]:
    """'12' -> default grid with 12 levels; '0.5,0.7,0.9' -> exactly those (dense always added)."""
    if text is None or text == "":
        return log_density_grid()
    text = str(text).strip()
    if "," not in text and "." not in text:
        try:
            n = int(text)
        except ValueError:
            raise SpdyError(f"bad --levels '{text}': give a count (12) or a list (0.5,0.7,0.9)") from None
        if n > MAX_LEVELS:
            raise SpdyError(f"--levels {n}: at most {MAX_LEVELS} levels (each is a profiling run of the whole model)")
        return log_density_grid(n)
    try:
        values = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise SpdyError(f"bad --levels '{text}': give a count (12) or a list (0.5,0.7,0.9)") from None
    if any(not 0.0 <= v < 1.0 for v in values):
        raise SpdyError(f"bad --levels '{text}': every sparsity must be in [0, 1)")
    sparse = [v for v in values if v > 0.0]
    if not sparse:
        raise SpdyError(f"bad --levels '{text}': give at least one sparsity above 0 (dense is always included)")
    if len(sparse) > MAX_LEVELS:
        raise SpdyError(f"--levels: at most {MAX_LEVELS} levels (each is a profiling run of the whole model)")
    return [0.0] + sparse
