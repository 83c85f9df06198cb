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


def usable_dir(cache_dir) -> Path:
    """`cache_dir` (or the default) when files can be written there; else a temporary folder, removed at
    exit, with a warning: a read-only cache (a shared one, a read-only mount) must not stop a run
    halfway with a traceback, and every stage writes its cache as it goes."""
    import atexit
    import shutil
    import tempfile
    folder = Path(cache_dir or default_cache_dir())
    nearest = folder   # nothing is created here: a run that caches nothing leaves no folder behind
    while not nearest.exists() and nearest.parent != nearest:
        nearest = nearest.parent
    if nearest.is_dir() and os.access(nearest, os.W_OK | os.X_OK):   # access() sees read-only mounts
        return folder
    why = "not a folder" if nearest.exists() and not nearest.is_dir() else "not writable"
    temporary = Path(tempfile.mkdtemp(prefix="spdy-onnx-cache-"))
    atexit.register(shutil.rmtree, temporary, ignore_errors=True)
    log.warning("the cache folder %s cannot be written (%s is %s): this run caches in %s, which is removed "
                "at exit, so the next run measures again; give a writable --cache-dir to keep the work", folder,
                nearest, why, temporary)
    return temporary


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
