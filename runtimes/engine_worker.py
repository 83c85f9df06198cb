"""The engine's end-to-end runs in a child process, so that an engine crash is one error, not the run's end.

Why: DeepSparse 1.8 segfaults on some pruned files of models it compiles and runs dense without complaint
(an OCR model whose convs and classifier were pruned to 80% together; each of them pruned alone ran). A
segfault in our own process ends the run on the spot, with a register dump and the minutes of work
before it. In a child it is one line, and the child is started again for the next run.

One child serves every request of this process (importing the engine costs about 3 s): requests and
results travel pickled over its stdin and a copy of its stdout; its stdout itself and its stderr go to a
file, which is passed on to ours after each request (less the engine's banner, which our own compiles
print once). The child exits when our end of its stdin closes, so it never outlives us.
"""
from __future__ import annotations

import atexit
import logging
import os
import pickle
import re
import signal
import subprocess
import sys
import tempfile
import threading

from spdy_onnx.errors import SpdyError

log = logging.getLogger(__name__)

CHILD = ("import os\n"
         "os.environ.setdefault('NM_DISABLE_ANALYTICS', '1')\n"
         "from spdy_onnx.runtimes.engine_worker import serve\n"
         "serve()\n")
BANNER = re.compile(r"DeepSparse(?: Engine)?, Copyright ")
CRASH = re.compile(r"Received signal: ([A-Za-z ]+)")


class EngineCrashed(SpdyError):
    """The child died while the engine compiled or ran a model (`how`: the signal, as the engine named it)."""

    def __init__(self, how: str):
        super().__init__(f"the engine crashed ({how})")
        self.how = how


class WorkerUnavailable(SpdyError):
    """The child process could not be started (no Python executable to run it with, no processes left)."""


class Worker:
    """The child process, started on first use and again after a crash."""

    def __init__(self, code: str = CHILD):
        self.code = code
        self.proc: subprocess.Popen | None = None
        self._err = None
        self._err_read = 0
        self._lock = threading.Lock()
        self._owner = 0   # the process that started the child: a forked copy of this object starts its own

    def _start(self) -> None:
        self._owner = os.getpid()
        self._err = tempfile.TemporaryFile()
        self._err_read = 0
        try:
            if not sys.executable:
                raise OSError("sys.executable is empty")
            self.proc = subprocess.Popen([sys.executable, "-c", self.code], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=self._err, close_fds=True)
        except OSError as exc:
            self._err.close()
            self._err = None
            raise WorkerUnavailable(f"cannot start a child process for the engine: {exc}") from None

    def call(self, method: str, kwargs: dict, on_progress=None):
        """Run `method` with `kwargs` in the child; its result, or its SpdyError raised here. Raises
        EngineCrashed when the child dies on the way."""
        with self._lock:
            if self._owner != os.getpid():   # inherited through fork: the pipes are the parent's
                self.proc, self._err = None, None
            if self.proc is None or self.proc.poll() is not None:
                self._start()
            try:
                pickle.dump((method, kwargs), self.proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
                self.proc.stdin.flush()
                while True:
                    kind, value = pickle.load(self.proc.stdout)
                    if kind == "progress":
                        if on_progress is not None:
                            on_progress(value)
                        continue
                    if kind == "log":   # the child's own log records, told as ours (our handlers, our level)
                        name, level, message = value
                        logging.getLogger(name).log(level, "%s", message)
                        continue
                    self._pass_on(self._new_stderr())
                    break
            except (EOFError, BrokenPipeError, pickle.UnpicklingError):
                code = self.proc.wait()
                text = self._new_stderr()
                self.proc = None
                found = CRASH.search(text)
                if found:
                    how = found.group(1).strip()
                elif code < 0:
                    try:
                        how = signal.Signals(-code).name
                    except ValueError:
                        how = f"signal {-code}"
                else:
                    how = f"exit status {code}"
                log.debug("engine child died (%s); its last output:\n%s", how, text[-4000:])
                raise EngineCrashed(how) from None
            except BaseException:   # Ctrl-C, a signal turned into an exception: the child's state is unknown
                self.close()
                raise
        if kind == "error":   # the engine's own error, worded in the child: the child goes on serving
            raise SpdyError(value)
        return value

    def _new_stderr(self) -> str:
        if self._err is None:
            return ""
        self._err.seek(self._err_read)
        data = self._err.read()
        self._err_read += len(data)
        return data.decode(errors="replace")

    @staticmethod
    def _pass_on(text: str) -> None:
        lines = [line for line in text.splitlines(keepends=True) if not BANNER.match(line)]
        if lines:
            sys.stderr.write("".join(lines))
            sys.stderr.flush()

    def close(self) -> None:
        if self._owner != os.getpid():   # not ours to stop (a forked copy), or never started
            self.proc, self._err = None, None
            return
        proc, self.proc = self.proc, None
        if proc is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._err is not None:
            self._err.close()
            self._err = None


WORKER = Worker()
atexit.register(WORKER.close)


def serve() -> None:
    """The child's loop: (method, kwargs) in, ("progress", n) and ("log", (logger, level, message)) any
    number of times, then ("result", value) or ("error", text) out."""
    protocol = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)   # whatever the engine prints goes with its log, not into the protocol

    def send(kind, value) -> None:
        pickle.dump((kind, value), protocol, protocol=pickle.HIGHEST_PROTOCOL)
        protocol.flush()

    class Forward(logging.Handler):
        """Our log records (profiling's notes on noise, say) go to the parent, which shows them as its own."""

        def emit(self, record):
            try:
                send("log", (record.name, record.levelno, record.getMessage()))
            except Exception:  # noqa: BLE001 - a note that cannot be sent is not worth the request
                pass

    ours = logging.getLogger("spdy_onnx")
    ours.addHandler(Forward())
    ours.setLevel(logging.INFO)
    ours.propagate = False

    import numpy as np

    from spdy_onnx.runtimes.deepsparse import DeepSparseRuntime
    requests = sys.stdin.buffer
    while True:
        try:
            method, kwargs = pickle.load(requests)
        except (EOFError, KeyboardInterrupt):
            return
        try:
            # an unpickled array keeps a copy of its dtype, and the engine takes only numpy's own
            # ("'x' has unsupported type 'float32'")
            kwargs["feeds"] = {k: np.asarray(v).astype(v.dtype.name) for k, v in kwargs["feeds"].items()}
            runtime = DeepSparseRuntime(**kwargs.pop("runtime"), progress=False, isolate=False)
            if method == "compare":
                value = runtime.compare_here(**kwargs, on_round=lambda: send("progress", 1))
            elif method == "analyse":
                value = runtime.analyse_here(**kwargs)
            elif method == "measure":
                value = runtime.measure_here(**kwargs, on_run=lambda: send("progress", 1))
            else:
                raise SpdyError(f"unknown engine request {method}")
            send("result", value)
        except SpdyError as exc:
            send("error", str(exc))
        except KeyboardInterrupt:
            return
        except Exception as exc:  # noqa: BLE001 - the engine's own errors, one line each
            text = str(exc).strip()
            send("error", f"DeepSparse failed: {text.splitlines()[0] if text else type(exc).__name__}")
