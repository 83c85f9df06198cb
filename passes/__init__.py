"""Graph rewrite passes: each takes a model (and arrays) and returns a new model; none touches files."""
from spdy_onnx.passes.prune import magnitude_prune, write_weights, sparsity_of
from spdy_onnx.passes.metadata import set_metadata, get_metadata

__all__ = ["magnitude_prune", "write_weights", "sparsity_of", "set_metadata", "get_metadata"]
