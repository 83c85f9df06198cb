"""The run's temporary folder (static copies of the model that engines compile), and those killed runs
left behind.

Why: Ctrl-C, SIGTERM and SIGHUP unwind and remove the folder, but SIGKILL (the kernel's out-of-memory
killer, `kill -9`, a CI job's hard timeout) cannot be caught, and each folder holds at least one copy of
the model: on a 400 MB encoder a few killed runs fill /tmp. The folder's name carries this machine's
name and the process id, so the next run on the same machine removes the folders of processes that no
longer exist, and never those of a live run or of another machine sharing the folder.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = "spdy-onnx-"


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:   # exists, owned by someone else
        return True
    return True


def remove_leftovers(root: str | os.PathLike | None = None) -> list[Path]:
    """Remove the folders of this machine's runs whose process is gone; returns what was removed."""
    root = Path(root or tempfile.gettempdir())
    pattern = re.compile(rf"^{re.escape(PREFIX)}{_host_tag()}-(\d+)-")
    removed = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if not match or int(match.group(1)) == os.getpid() or _alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            if not entry.exists():
                removed.append(entry)
    if removed:
        log.info("removed %d temporary folder(s) left by killed runs in %s", len(removed), root)
    return removed


def make_workdir() -> tempfile.TemporaryDirectory:
    """A fresh temporary folder for this run, after removing those killed runs left."""
    remove_leftovers()
    return tempfile.TemporaryDirectory(prefix=f"{PREFIX}{_host_tag()}-{os.getpid()}-")
