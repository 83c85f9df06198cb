"""The OBS database built in a child process while the engine profiles the model.

Why: profiling is one engine compile per level and a short timing of it; the compile runs on one core, so
on a 2-core machine the other core idled for most of profiling (MiniLM-L6: 99 s of profiling, about
55 s of it compiles; BERT-base size: 439 s). The Hessians and the OBS database need no latency table,
only the levels and the sites, so they are built meanwhile. The child is stopped (SIGSTOP) whenever an
engine times, and continued when it compiles again (runtimes/cpu_load.stopped, run by the engine's own
process), so the table is timed on a machine as quiet as before. When profiling ends the child gets
every core. The database lands in the cache, where the run then finds it; whatever the child did not
finish (it failed, it was cut short, the run chose other sites) is built as before, in the run itself.

Linux only (it needs /proc and SIGSTOP), with --data, --reconstruct obs and at least two usable cores.
"""
from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
import time

from spdy_onnx.runtimes.cpu_load import usable_cpus

log = logging.getLogger(__name__)

CHILD = ("import os\n"
         "os.environ.setdefault('NM_DISABLE_ANALYTICS', '1')\n"
         "os.environ.setdefault('ORT_DISABLE_TELEMETRY', '1')\n"
         "from spdy_onnx.early_database import serve\n"
         "serve()\n")
# the child's BLAS threads while profiling compiles (the compile takes one core); all usable ones after
WIDEN = signal.SIGUSR1


def possible() -> bool:
    """This platform can stop and continue a child, and has a core to spare while one compiles."""
    return sys.platform.startswith("linux") and os.path.exists("/proc/self/stat") and bool(sys.executable) \
        and hasattr(signal, "SIGSTOP") and usable_cpus() >= 2


class EarlyDatabase:
    """The child building the database; `identity` is what the engine stops while it times."""

    def __init__(self, job: dict, progress: bool = False):
        from spdy_onnx.runtimes.cpu_load import identity
        self.progress = progress
        self.sites = (0, len(job["sites"]))   # (sites built, sites to build), as the child reports them
        self._err = tempfile.TemporaryFile()
        self.t0 = time.perf_counter()
        # the child starts with WIDEN blocked (a blocked signal mask survives exec) and unblocks it once its
        # handler is in place: a WIDEN sent before that waits instead of killing it
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {WIDEN})
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=self._err, close_fds=True)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        self.identity = identity(self.proc.pid)
        self._result: dict | None = None
        self._reader = threading.Thread(target=self._send_and_read, args=(job,), daemon=True)
        self._reader.start()

    def _send_and_read(self, job: dict) -> None:
        try:
            pickle.dump(job, self.proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self.proc.stdin.flush()
        except Exception as exc:  # noqa: BLE001 - a job that cannot be sent: the run builds the database itself
            self._result = {"error": f"the job could not be sent ({type(exc).__name__})"}
            try:
                self.proc.stdin.close()   # the child's read ends, and with it the child
            except OSError:
                pass
            return
        try:
            while True:
                kind, value = pickle.load(self.proc.stdout)
                if kind == "sites":
                    self.sites = value
                    continue
                self._result = value
                break
        except Exception:  # noqa: BLE001 - it died on the way (see wait)
            self._result = None

    def _continue(self) -> None:
        """SIGCONT: the engine's process stops the child only around its timings, but it may have died
        in the middle of one."""
        from spdy_onnx.runtimes.cpu_load import identity
        if self.identity is not None and identity(self.proc.pid) == self.identity:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
            except OSError:
                pass

    def wait(self) -> dict | None:
        """Let the child use every core, wait for it, and return its timings (None if it failed)."""
        self._continue()
        try:
            os.kill(self.proc.pid, WIDEN)
        except OSError:
            pass
        t0 = time.perf_counter()
        self._reader.join(timeout=0.5)
        if self._reader.is_alive():
            log.info("waiting for the OBS database, built in a child process since profiling began")
            self._wait_with_bar()
        code = self.proc.wait()
        self.close()
        result = self._result
        if code != 0 or not isinstance(result, dict) or "error" in (result or {}):
            why = (result or {}).get("error") if isinstance(result, dict) else f"exit status {code}"
            log.info("the database built during profiling did not finish (%s); the rest is built now", why)
            return None
        result["waited_s"] = time.perf_counter() - t0
        result["wall_s"] = time.perf_counter() - self.t0
        return result

    def _wait_with_bar(self) -> None:
        """The child's sites done, as a progress bar, until it ends (its Hessians come first, at 0)."""
        from tqdm.auto import tqdm
        done, total = self.sites
        bar = tqdm(total=max(1, total), initial=done, desc="OBS database (begun during profiling)", unit="site",
                   disable=not self.progress, leave=False)
        try:
            while self._reader.is_alive():
                self._reader.join(timeout=0.5)
                done, total = self.sites
                bar.total = max(1, total)
                bar.update(done - bar.n)
        finally:
            bar.close()

    def cancel(self) -> None:
        """The run ended early (an error, Ctrl-C): the child goes with it."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.close()

    def close(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        if self._err is not None:
            self._err.seek(0)
            text = self._err.read().decode(errors="replace").strip()
            if text:
                log.debug("the database child's output:\n%s", text[-4000:])
            self._err.close()
            self._err = None


def start(prep, sites, levels, data: dict, *, pattern: str, cache_dir, progress: bool = False) -> EarlyDatabase | None:
    """Start the child, or None where it cannot run here (then the run builds the database itself)."""
    from spdy_onnx import modelio
    if not possible() or not sites or modelio.over_two_gb(prep.calibration_model):
        return None   # (a model over 2 GB cannot be pickled whole: it is built after profiling)
    from spdy_onnx import graph
    job = {"model": prep.calibration_model, "digest": prep.digest, "batch_size": prep.batch_size,
           "sites": list(sites), "sources": graph.read_weights(prep.model, sites), "levels": list(levels), "data": data, "pattern": pattern,
           "cache_dir": None if cache_dir is None else str(cache_dir), "threads": usable_cpus()}
    try:
        early = EarlyDatabase(job, progress=progress)
    except OSError as exc:
        log.info("cannot start a child process for the database (%s): it is built after profiling", exc)
        return None
    log.info("building the OBS database in a child process while the engine profiles")
    return early


def _narrow(threads: int) -> None:
    from spdy_onnx import blas, ort_session
    ort_session.DEFAULT_THREADS = threads
    blas.set_threads(threads)


def serve() -> None:
    """The child: one job in (pickled on stdin); ("sites", (done, total)) as it goes and ("result", its
    timings or {"error": ...}) out (pickled on stdout); then exit."""
    protocol = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)

    def send(kind, value) -> None:
        pickle.dump((kind, value), protocol, protocol=pickle.HIGHEST_PROTOCOL)
        protocol.flush()

    job = pickle.load(sys.stdin.buffer)
    full = max(1, int(job["threads"]))
    _narrow(max(1, full - 1))
    signal.signal(WIDEN, lambda *_: _narrow(full))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {WIDEN})

    def orphaned() -> None:   # our parent is gone (its end of the pipe closed): so is the point of this
        sys.stdin.buffer.read()
        os._exit(1)
    threading.Thread(target=orphaned, daemon=True).start()

    from types import SimpleNamespace

    from spdy_onnx.reconstruct import build_database
    try:
        prep = SimpleNamespace(calibration_model=job["model"], digest=job["digest"], batch_size=job["batch_size"])
        sites, sources = job["sites"], job["sources"]
        timings: dict = {}
        t0 = time.perf_counter()
        build_database(prep, sites, sources, job["levels"], job["data"], method="obs", pattern=job["pattern"],
                       cache_dir=job["cache_dir"], progress=False, timings=timings,
                       on_site=lambda done, total: send("sites", (done, total)))
        timings["database_s"] = time.perf_counter() - t0
        result = timings
    except Exception as exc:  # noqa: BLE001 - the run builds what is missing itself; this is only a head start
        text = str(exc).strip()
        result = {"error": f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"}
    send("result", result)
    os._exit(0)
