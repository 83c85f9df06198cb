"""spdy-onnx: prune an ONNX model to a speedup measured on a real inference engine (SPDY)."""
import os

# DeepSparse/SparseZoo phone home on import with no timeout; on a closed network that hangs forever.
# This must run before anything imports them, so it sits at the very top of the package.
os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
# onnxruntime (1.29 on) uploads usage events from Linux too, and writes a device id under ~/.cache and a
# session file in TMPDIR. It reads this once, when it is imported: ort_session.py covers a late import.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"

from spdy_onnx.errors import SpdyError, InfeasibleTarget, TargetMissed  # noqa: E402

__all__ = ["SpdyError", "InfeasibleTarget", "TargetMissed", "__version__"]

_API = ("optimize", "profile", "benchmark")
__all__ += list(_API)


def __getattr__(name):
    """`spdy_onnx.optimize` and friends, imported on first use: `import spdy_onnx` stays light."""
    if name in _API:
        from spdy_onnx import api
        return getattr(api, name)
    raise AttributeError(f"module 'spdy_onnx' has no attribute '{name}'")


def __dir__():
    return sorted(set(globals()) | set(_API))
