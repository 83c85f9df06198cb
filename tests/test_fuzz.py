"""Fuzzing (issue #5, item 5): mutated ONNX files and mutated calibration data never hang the tool,
never escape as an unhandled exception, and a failed run writes nothing.

Hypothesis, derandomized (the same examples every run), few examples, and a per-example alarm so a hang
fails the test instead of stalling the suite. Runs the real CLI on the replayed-table runtime.
"""
import io
import os
import signal
import tempfile
import traceback
import zipfile
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import numpy as np
import onnx
import pytest
import tiny
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from spdy_onnx import graph
from spdy_onnx.cli import main
from spdy_onnx.tables import LatencyTable

HANG_SECONDS = 20
FUZZ = settings(max_examples=100, derandomize=True, deadline=timedelta(seconds=10), database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture], print_blob=True)

MODEL = tiny.mlp(width=16, depth=2, seq=4)   # small, so mutations often land in the graph, not in weights
MODEL_BYTES = MODEL.SerializeToString()
SHAPE = (4, 16)                               # one sample of input x


@contextmanager
def alarm(seconds: int):
    def fire(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s: the tool hangs on this input")
    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# Crashes to tolerate while a fix is pending, as (exception type, function it escapes from) -> why.
# Empty: every crash the fuzzer found is fixed and pinned by a reproducer at the end of this file.
KNOWN_CRASHES: dict = {}
KNOWN = "known-crash"


def _known_crash(exc: BaseException) -> str | None:
    frames = {f.name for f in traceback.extract_tb(exc.__traceback__)}
    for (kind, where), why in KNOWN_CRASHES.items():
        if type(exc).__name__ == kind and where in frames:
            return why
    return None


def run_cli(argv: list):
    """The CLI's exit code; any exception escaping it (a crash) fails with its traceback."""
    try:
        with alarm(HANG_SECONDS):
            return main([str(a) for a in argv])
    except SystemExit as exc:   # argparse only; our arguments are always well formed
        pytest.fail(f"SystemExit({exc.code}) for {argv}")
    except Exception as exc:
        if _known_crash(exc):
            return KNOWN
        pytest.fail("unhandled exception (crash):\n" + traceback.format_exc())
    except BaseException:
        pytest.fail("unhandled exception (crash):\n" + traceback.format_exc())


def check_run(folder: Path, argv: list, out: Path, capsys):
    capsys.readouterr()
    before = listing(folder)
    code = run_cli(argv)
    err = capsys.readouterr().err
    if code == KNOWN:
        assert listing(folder) == before, "a crashed run wrote something"
        return code
    assert "Traceback" not in err
    assert code in (0, 2), (code, err[-2000:])
    if code == 0:
        assert out.exists()
        onnx.checker.check_model(onnx.load(str(out)))
    else:
        errors = [line for line in err.splitlines() if line.startswith("spdy-onnx: error")]
        assert len(errors) == 1, err[-2000:]
        assert listing(folder) == before, "a failed run wrote something"
    return code


def optimize_model_bytes(tmp: Path, data: bytes, capsys) -> tuple[Path, Path]:
    """Write `data` as the model and run optimize on it (replayed table); returns (folder, model path)."""
    folder, cache = tmp / "work", tmp / "cache"
    folder.mkdir()
    table = write_table(folder / "t.json")
    path = folder / "m.onnx"
    path.write_bytes(data)
    out = folder / "out.onnx"
    check_run(folder, ["optimize", path, "--target", "1.5x", "--runtime", "table", "--latency-table", table,
                       "-q", "--min-weights", "0", "--cache-dir", cache, "-o", out], out, capsys)
    return folder, path


def write_table(path: Path) -> Path:
    sites, _ = graph.find_sites(MODEL)
    return LatencyTable(levels=[0.0, 0.5, 0.9], times={s.name: [1.0, 0.6, 0.3] for s in sites},
                        dense_total_ms=2.5, runtime="table").save(path)


# --- byte mutations --------------------------------------------------------------------------------

def mutations(size: int):
    pos = st.integers(0, max(0, size - 1))
    one = st.one_of(
        st.tuples(st.just("flip"), pos, st.integers(1, 255)),
        st.tuples(st.just("set"), pos, st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF, 0x08, 0x12, 0x1A])),
        st.tuples(st.just("truncate"), pos),
        st.tuples(st.just("delete"), pos, st.integers(1, 64)),
        st.tuples(st.just("splice"), pos, pos, st.integers(1, 256)),
        st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=32)),
    )
    return st.lists(one, min_size=1, max_size=4)


def mutate(data: bytes, ops) -> bytes:
    buf = bytearray(data)
    for op in ops:
        if not buf:
            break
        kind, at = op[0], op[1] % len(buf)
        if kind == "flip":
            buf[at] ^= op[2]
        elif kind == "set":
            buf[at] = op[2]
        elif kind == "truncate":
            del buf[at:]
        elif kind == "delete":
            del buf[at:at + op[2]]
        elif kind == "splice":   # copy a chunk of the file over another place (duplicated fields, lengths)
            src = op[2] % len(buf)
            buf[at:at + op[3]] = buf[src:src + op[3]]
        elif kind == "insert":
            buf[at:at] = op[2]
    return bytes(buf)


@FUZZ
@given(ops=mutations(len(MODEL_BYTES)))
def test_mutated_onnx_never_crashes_and_writes_nothing_on_failure(ops, capsys):
    with tempfile.TemporaryDirectory() as tmp:
        folder, path = optimize_model_bytes(Path(tmp), mutate(MODEL_BYTES, ops), capsys)
        before = listing(folder)
        code = run_cli(["sites", path, "--min-weights", "0"])
        err = capsys.readouterr().err
        assert code in (0, 2) and "Traceback" not in err and listing(folder) == before
        assert code == 0 or len([line for line in err.splitlines() if line.startswith("spdy-onnx: error")]) == 1


# --- structure-aware mutations: valid protobufs with wrong shapes, types, ops and attributes --------

INT_VALUES = st.sampled_from([-1, 0, 1, 2, 3, 4, 16, 17, 64, 2**20, 2**31, 2**40, 2**62])
OPS = st.sampled_from(["MatMul", "Gemm", "Conv", "Transpose", "Cast", "Identity", "DequantizeLinear", "If",
                       "Loop", "Relu", "Add", "Constant", "FancyOp"])
TENSOR_NAMES = st.sampled_from(["x", "w0", "w1", "b0", "mm0", "add0", "relu0", "y", "", "nope"])


def proto_edits():
    idx = st.integers(0, 15)
    one = st.one_of(
        st.tuples(st.just("init_dims"), idx, idx, INT_VALUES),
        st.tuples(st.just("init_dtype"), idx, st.sampled_from([0, 1, 2, 3, 5, 7, 8, 9, 10, 11, 16, 17, 99])),
        st.tuples(st.just("init_drop_data"), idx),
        st.tuples(st.just("input_dim"), idx, INT_VALUES),
        st.tuples(st.just("input_dim_param"), idx),
        st.tuples(st.just("input_elem_type"), st.sampled_from([0, 1, 2, 7, 8, 9, 10, 11, 16, 99])),
        st.tuples(st.just("node_op"), idx, OPS),
        st.tuples(st.just("node_input"), idx, idx, TENSOR_NAMES),
        st.tuples(st.just("node_domain"), idx, st.sampled_from(["", "ai.onnx", "com.example"])),
        st.tuples(st.just("node_attr"), idx, st.sampled_from(["perm", "transB", "group", "to", "kernel_shape",
                                                             "axis", "then_branch"]),
                  st.one_of(INT_VALUES, st.lists(INT_VALUES, max_size=4))),
        st.tuples(st.just("opset"), st.sampled_from([1, 7, 11, 13, 18, 19, 22, 1000])),
        st.tuples(st.just("ir"), st.sampled_from([0, 3, 7, 8, 9, 10, 100])),
        st.tuples(st.just("dup_node"), idx),
        st.tuples(st.just("drop_node"), idx),
        st.tuples(st.just("graph_output"), TENSOR_NAMES),
    )
    return st.lists(one, min_size=1, max_size=4)


def edit(model: onnx.ModelProto, edits) -> bytes:
    from onnx import helper
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for e in edits:
        kind = e[0]
        if kind.startswith("init") and g.initializer:
            t = g.initializer[e[1] % len(g.initializer)]
            if kind == "init_dims":
                if t.dims:
                    t.dims[e[2] % len(t.dims)] = e[3]
                else:
                    t.dims.append(e[3])
            elif kind == "init_dtype":
                t.data_type = e[2]
            else:
                t.ClearField("raw_data")
        elif kind.startswith("input"):
            dims = g.input[0].type.tensor_type.shape.dim
            if kind == "input_elem_type":
                g.input[0].type.tensor_type.elem_type = e[1]
            elif dims:
                d = dims[e[1] % len(dims)]
                if kind == "input_dim":
                    d.dim_value = e[2]
                else:
                    d.dim_param = "N"
        elif kind.startswith("node") or kind in ("dup_node", "drop_node"):
            if not g.node:
                continue
            n = g.node[e[1] % len(g.node)]
            if kind == "node_op":
                n.op_type = e[2]
            elif kind == "node_input":
                if n.input:
                    n.input[e[2] % len(n.input)] = e[3]
                else:
                    n.input.append(e[3])
            elif kind == "node_domain":
                n.domain = e[2]
            elif kind == "node_attr":
                n.attribute.append(helper.make_attribute(e[2], e[3]))
            elif kind == "dup_node":
                g.node.insert(e[1] % len(g.node), n)
            else:
                g.node.remove(n)
        elif kind == "opset":
            m.opset_import[0].version = e[1]
        elif kind == "ir":
            m.ir_version = e[1]
        elif kind == "graph_output":
            g.output.append(helper.make_tensor_value_info(e[1], onnx.TensorProto.FLOAT, None))
    return m.SerializeToString()


@FUZZ
@given(edits=proto_edits())
def test_structurally_mutated_onnx_never_crashes_and_writes_nothing_on_failure(edits, capsys):
    with tempfile.TemporaryDirectory() as tmp:
        optimize_model_bytes(Path(tmp), edit(MODEL, edits), capsys)


# --- calibration data ------------------------------------------------------------------------------

DTYPES = st.sampled_from([np.float32, np.float64, np.float16, np.int32, np.int64, np.uint8, np.bool_,
                          np.complex64])
NAMES = st.sampled_from(["x", "x", "x", "y", "X", "input"])


@st.composite
def arrays_for_x(draw):
    """Mostly the right key and shape, often with the wrong dtype, shape, values or sample count."""
    n = draw(st.integers(0, 5))
    shape = draw(st.one_of(
        st.just((n,) + SHAPE), st.just((n, 1) + SHAPE), st.just(SHAPE),
        hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)))
    dtype = draw(st.one_of(st.just(np.float32), DTYPES))
    elements = None
    if np.issubdtype(dtype, np.floating):
        elements = st.floats(allow_nan=True, allow_infinity=True, width=np.dtype(dtype).itemsize * 8)
    return draw(hnp.arrays(dtype, shape, elements=elements))


@st.composite
def calibration_sets(draw):
    arrays = draw(st.dictionaries(NAMES, arrays_for_x(), min_size=0, max_size=3))
    layout = draw(st.sampled_from(["npz", "npz", "folder", "npy-mutated", "zip-mutated"]))
    ops = draw(mutations(2048)) if layout.endswith("mutated") else []
    return arrays, layout, ops


def npy_bytes(array) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asarray(array), allow_pickle=False)
    return buf.getvalue()


def write_calibration(folder: Path, arrays: dict, layout: str, ops) -> Path:
    if layout == "npz":
        path = folder / "calib.npz"
        np.savez(path, **arrays)
    elif layout == "folder":   # one sample per file
        path = folder / "calib"
        path.mkdir()
        for i in range(2):
            np.savez(path / f"{i:03d}.npz", **{k: (v[i] if np.ndim(v) and len(v) > i else v)
                                              for k, v in arrays.items()})
    elif layout == "npy-mutated":   # a well-formed zip holding a mutated .npy (header and data)
        path = folder / "calib.npz"
        with zipfile.ZipFile(path, "w") as z:
            for name, a in (arrays or {"x": np.zeros((2,) + SHAPE, np.float32)}).items():
                z.writestr(name + ".npy", mutate(npy_bytes(a), ops))
    else:   # mutated bytes of a whole valid .npz (CRC, zip structure)
        path = folder / "calib.npz"
        buf = io.BytesIO()
        np.savez(buf, x=np.random.default_rng(0).standard_normal((3,) + SHAPE).astype(np.float32))
        path.write_bytes(mutate(buf.getvalue(), ops))
    return path


@FUZZ
@given(case=calibration_sets())
def test_mutated_calibration_data_never_crashes_and_writes_nothing_on_failure(case, capsys):
    arrays, layout, ops = case
    with tempfile.TemporaryDirectory() as tmp:
        folder, cache = Path(tmp) / "work", Path(tmp) / "cache"
        folder.mkdir()
        table = write_table(folder / "t.json")
        path = folder / "m.onnx"
        onnx.save(MODEL, str(path))
        data = write_calibration(folder, arrays, layout, ops)
        out = folder / "out.onnx"
        check_run(folder, ["optimize", path, "--target", "1.5x", "--runtime", "table", "--latency-table", table,
                           "-q", "--min-weights", "0", "--data", data, "--search-budget", "20",
                           "--cache-dir", cache, "--no-cache", "-o", out], out, capsys)


# --- reproducers of crashes the fuzzer once found (now each is one clear error) --------

@pytest.fixture
def work(tmp_path):
    (tmp_path / "work").mkdir()
    return tmp_path / "work"


def _optimize_with_data(work: Path, capsys, data: Path):
    onnx.save(MODEL, str(work / "m.onnx"))
    table = write_table(work / "t.json")
    out = work / "out.onnx"
    return check_run(work, ["optimize", work / "m.onnx", "--target", "1.5x", "--runtime", "table",
                            "--latency-table", table, "-q", "--min-weights", "0", "--data", data,
                            "--search-budget", "20", "--cache-dir", work.parent / "cache", "-o", out],
                     out, capsys)


def test_npy_header_cut_inside_the_shape_is_one_error(work, capsys):
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 4, 16"
    header += " " * (64 - 10 - len(header) - 1) + "\n"
    npy = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode("latin1") + bytes(512)
    with zipfile.ZipFile(work / "calib.npz", "w") as z:
        z.writestr("x.npy", npy)
    assert _optimize_with_data(work, capsys, work / "calib.npz") == 2


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_calibration_values_overflowing_float32_are_one_error(work, capsys):
    np.savez(work / "calib.npz", x=np.full((8,) + SHAPE, 1e30, np.float32))
    assert _optimize_with_data(work, capsys, work / "calib.npz") == 2


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_float64_calibration_values_beyond_float32_are_one_error(work, capsys):
    np.savez(work / "calib.npz", x=np.full((8,) + SHAPE, 1e300, np.float64))
    assert _optimize_with_data(work, capsys, work / "calib.npz") == 2
