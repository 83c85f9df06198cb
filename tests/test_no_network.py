"""No network (issue #5, item 6): spdy_onnx sets NM_DISABLE_ANALYTICS=1 itself, before DeepSparse or
SparseZoo are imported, and importing and running the tool opens no network connection.

Runs in a fresh interpreter started WITHOUT NM_DISABLE_ANALYTICS, with every way of reaching the
network (connect, connect_ex, create_connection, getaddrinfo) replaced by a function that records
the attempt and raises.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import onnx
import pytest
import tiny

ROOT = Path(__file__).resolve().parents[1]

GUARD = textwrap.dedent("""
    import json, os, socket, sys
    attempts = []

    def _blocked(what):
        def fn(*args, **kwargs):
            attempts.append([what, repr(args[1:] if what.startswith("socket.") else args)[:200]])
            raise OSError(101, "network disabled by test_no_network")
        return fn

    socket.socket.connect = _blocked("socket.connect")
    socket.socket.connect_ex = _blocked("socket.connect_ex")
    socket.create_connection = _blocked("create_connection")
    socket.getaddrinfo = _blocked("getaddrinfo")
    assert "NM_DISABLE_ANALYTICS" not in os.environ

    def report(**extra):
        print("RESULT " + json.dumps({"attempts": attempts, **extra}))
""")


def run_guarded(body: str, tmp_path: Path, timeout: int = 240) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "NM_DISABLE_ANALYTICS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "models"), env.get("PYTHONPATH", "")])
    env["HOME"] = str(tmp_path / "home")   # no cached state from the real home
    proc = subprocess.run([sys.executable, "-c", GUARD + textwrap.dedent(body)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=timeout)
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert results, f"the child crashed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return {"exit": proc.returncode, "stderr": proc.stderr, **json.loads(results[-1][len("RESULT "):])}


def test_import_sets_the_variable_before_anything_else(tmp_path):
    out = run_guarded("""
        import spdy_onnx
        set_by_package = os.environ.get("NM_DISABLE_ANALYTICS")
        import spdy_onnx.cli, spdy_onnx.api
        report(value=set_by_package, deepsparse_loaded="deepsparse" in sys.modules,
               sparsezoo_loaded="sparsezoo" in sys.modules)
    """, tmp_path)
    assert out["value"] == "1"
    assert not out["deepsparse_loaded"] and not out["sparsezoo_loaded"]   # engines load lazily
    assert out["attempts"] == []


@pytest.mark.deepsparse
def test_optimize_on_deepsparse_opens_no_socket(tmp_path):
    pytest.importorskip("deepsparse")
    model = tmp_path / "mlp.onnx"
    onnx.save(tiny.mlp(width=512, depth=4, seq=64), str(model))
    out = run_guarded(f"""
        import spdy_onnx
        value = os.environ.get("NM_DISABLE_ANALYTICS")
        import deepsparse
        from spdy_onnx.cli import main
        code = main(["optimize", {str(model)!r}, "--target", "1.2x", "--cores", "1", "--levels", "0.5,0.9",
                     "--repeats", "1", "--margin", "-0.4", "--max-attempts", "1", "-q",
                     "--cache-dir", {str(tmp_path / "cache")!r}, "-o", {str(tmp_path / "out.onnx")!r}])
        report(value=value, code=code)
    """, tmp_path)
    assert out["value"] == "1"
    assert out["attempts"] == [], out["attempts"]
    assert "Traceback" not in out["stderr"], out["stderr"][-3000:]
    assert out["code"] in (0, 3), out["stderr"][-3000:]   # 3: target missed on a busy machine; never a crash
    assert (tmp_path / "out.onnx").exists() == (out["code"] == 0)


@pytest.mark.deepsparse
def test_guard_sees_deepsparse_phoning_home_without_the_variable(tmp_path):
    """Control: without spdy_onnx setting the variable, importing DeepSparse does try the network
    (a GeoIP lookup), so the guard above is not vacuous."""
    pytest.importorskip("deepsparse")
    out = run_guarded("""
        import deepsparse
        report()
    """, tmp_path)
    assert out["attempts"], "DeepSparse made no network attempt; the control no longer shows the guard works"
