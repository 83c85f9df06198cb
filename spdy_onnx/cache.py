"""On-disk caches keyed by content: a second run does not re-measure or re-compute.

Every entry is validated when read; a damaged entry is discarded (and rebuilt by the caller).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from spdy_onnx.errors import SpdyError

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    env = os.environ.get("SPDY_ONNX_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "spdy-onnx"


def cache_key(**parts) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def load_cached(path: Path, loader):
    """loader(path) -> object, or None if absent; a corrupt entry is deleted and None returned."""
    if not path.exists():
        return None
    try:
        return loader(path)
    except (SpdyError, ValueError, KeyError, OSError, EOFError) as exc:
        log.warning("discarding damaged cache entry %s (%s)", path, exc)
        try:
            path.unlink()
        except OSError:
            pass
        return None
