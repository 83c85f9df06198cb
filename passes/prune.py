"""Write pruned weights into a graph, and the magnitude pruning every other method starts from."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper


def n_pruned(size: int, sparsity: float) -> int:
    """How many weights a level removes: round(sparsity * size), the same rule everywhere."""
    return int(round(float(sparsity) * size))


def magnitude_mask(weight: np.ndarray, sparsity: float) -> np.ndarray:
    """Boolean keep-mask removing exactly round(sparsity * size) smallest-magnitude weights.

    Ties are broken by position (stable sort), so the mask is deterministic.
    """
    flat = np.abs(np.asarray(weight, dtype=np.float64)).ravel()
    k = n_pruned(flat.size, sparsity)
    keep = np.ones(flat.size, dtype=bool)
    if k > 0:
        order = np.argsort(flat, kind="stable")
        keep[order[:k]] = False
    return keep.reshape(np.shape(weight))


def magnitude_prune(weight: np.ndarray, sparsity: float) -> np.ndarray:
    return np.where(magnitude_mask(weight, sparsity), weight, np.zeros((), dtype=weight.dtype)).astype(weight.dtype)


def sparsity_of(weight: np.ndarray) -> float:
    return float(np.count_nonzero(weight == 0)) / max(1, np.size(weight))


def write_weights(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of `model` with the named initializers replaced; shapes and dtypes must not change."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    remaining = dict(weights)
    for i, init in enumerate(out.graph.initializer):
        if init.name in remaining:
            new = np.asarray(remaining.pop(init.name))
            old_dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
            if tuple(new.shape) != tuple(init.dims):
                raise ValueError(f"shape of '{init.name}' changed: {tuple(init.dims)} -> {new.shape}")
            tensor = numpy_helper.from_array(new.astype(old_dtype), init.name)
            out.graph.initializer[i].CopyFrom(tensor)
    if remaining:
        raise KeyError(f"no initializer named {sorted(remaining)}")
    return out
