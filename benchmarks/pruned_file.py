"""Shared by table_check.py and mask_speed.py: a latency table profiled now for a dense model, and the
profile of a pruned file written from it (each site mapped to the table level nearest its sparsity)."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402

from spdy_onnx import api, graph, modelio  # noqa: E402
from spdy_onnx.levels import parse_levels  # noqa: E402
from spdy_onnx.passes.prune import sparsity_of  # noqa: E402


def parser(description: str) -> argparse.ArgumentParser:
    """The arguments both scripts take: the dense file, a pruned file written from it, cores, batch."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the dense ONNX file")
    p.add_argument("--pruned", required=True, help="a pruned file written by optimize from it")
    p.add_argument("--cores", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1)
    return p


@dataclass
class PrunedFile:
    prep: api.Prepared            # the dense model (close it when done)
    table: object                 # LatencyTable, one pass, measured now
    sites: list                   # the sites the table times
    feeds: dict
    model: object                 # the pruned ModelProto
    sparsity: dict                # site name -> actual sparsity in the pruned file
    profile: dict                 # site name -> index of the nearest table level


def load(model, pruned, *, cores: int, batch_size: int, levels=None) -> PrunedFile:
    prep = api.Prepared(model, runtime="deepsparse", batch_size=batch_size, cores=cores, input_shapes=None,
                        exclude=None, include=None, min_weights=0, progress=False, runtime_options={"repeats": 1})
    try:
        feeds = modelio.example_inputs(prep.specs)
        grid = parse_levels(levels) if levels else prep.runtime.default_levels()
        table = prep.runtime.measure(str(prep.dense_static()), prep.all_sites, levels=grid, batch_size=batch_size,
                                     feeds=feeds, aliases=graph.output_aliases(prep.model, prep.all_sites))
        sites = [s for s in prep.all_sites if s.name in table.times]
        pruned_model = graph.constants_to_initializers(modelio.load_model(Path(pruned)))
        sparsity = {n: sparsity_of(w) for n, w in graph.read_weights(pruned_model, sites).items()}
        profile = {n: int(np.argmin([abs(lv - s) for lv in grid])) for n, s in sparsity.items()}
    except BaseException:
        prep.close()
        raise
    return PrunedFile(prep, table, sites, feeds, pruned_model, sparsity, profile)
