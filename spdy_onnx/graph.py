"""Which nodes can be pruned: Conv, Gemm and MatMul whose weight is a constant.

A Site names one prunable node and says where its weight lives (an initializer, possibly behind
Transpose/Cast/Identity) and how to view that weight as a matrix (outputs x reduction), which is the
form the reconstruction and the 2:4 pattern work in.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from spdy_onnx.errors import SpdyError
from spdy_onnx.modelio import printable

log = logging.getLogger(__name__)

PRUNABLE_OPS = ("Conv", "Gemm", "MatMul")
# ops with a constant weight that are listed as left dense, so that none is silently absent
UNPRUNED_WEIGHT_OPS = ("ConvTranspose", "ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "Einsum")
PASS_THROUGH_OPS = ("Transpose", "Cast", "Identity")
DEFAULT_MIN_WEIGHTS = 4096


@dataclass
class Site:
    name: str                      # stable key: node name (or its first output when unnamed)
    op_type: str
    output: str                    # the node's output tensor
    weight: str                    # initializer that holds the weight data
    weight_shape: tuple            # shape of the weight as the node consumes it
    source_shape: tuple            # shape of the initializer
    source_dtype: str
    chain: list = field(default_factory=list)   # [("Transpose", perm) | ("Cast", dtype) | ("Identity", None)], source -> node
    trans_b: bool = False          # Gemm transB
    trans_a: bool = False          # Gemm transA: the activation comes in as (K, M)
    group: int = 1                 # Conv groups
    kernel_shape: tuple = ()
    strides: tuple = ()
    pads: tuple = ()
    dilations: tuple = ()
    input: str = ""                # the activation input of the node

    @property
    def n_weights(self) -> int:
        return int(np.prod(self.weight_shape))

    @property
    def reduction_size(self) -> int:
        """Length of the dot products: in-channels x kernel for Conv, K for MatMul/Gemm."""
        if self.op_type == "Conv":
            return int(np.prod(self.weight_shape[1:]))
        if self.op_type == "Gemm" and self.trans_b:
            return int(self.weight_shape[1])
        return int(self.weight_shape[0])

    def to_dict(self) -> dict:
        return {"name": self.name, "op_type": self.op_type, "output": self.output, "weight": self.weight,
                "weight_shape": list(self.weight_shape), "n_weights": self.n_weights,
                "reduction_size": self.reduction_size, "group": self.group}

    # --- matrix view: rows = outputs, columns = reduction (channels-last for Conv) ---

    def consumed(self, source: np.ndarray) -> np.ndarray:
        """The weight as the node sees it, computed in float32."""
        w = np.asarray(source)
        for op, arg in self.chain:
            if op == "Transpose":
                w = np.transpose(w, arg)
        return w.astype(np.float32)

    def to_matrix(self, source: np.ndarray) -> np.ndarray:
        w = self.consumed(source)
        if self.op_type == "Conv":
            if self.group != 1:
                raise ValueError("matrix view of grouped convs is per group; not supported")
            return np.ascontiguousarray(np.moveaxis(w, 1, -1).reshape(w.shape[0], -1))
        if self.op_type == "Gemm" and self.trans_b:
            return np.ascontiguousarray(w)
        return np.ascontiguousarray(w.T)

    def from_matrix(self, matrix: np.ndarray) -> np.ndarray:
        """Inverse of to_matrix, back to the initializer's layout and dtype."""
        if self.op_type == "Conv":
            o = self.weight_shape[0]
            w = matrix.reshape((o,) + tuple(self.weight_shape[2:]) + (self.weight_shape[1],))
            w = np.moveaxis(w, -1, 1)
        elif self.op_type == "Gemm" and self.trans_b:
            w = matrix
        else:
            w = matrix.T
        for op, arg in reversed(self.chain):
            if op == "Transpose":
                w = np.transpose(w, np.argsort(arg))
        return np.ascontiguousarray(w).astype(self.source_dtype)


def _node_names(model: onnx.ModelProto) -> list[str]:
    """Unique, stable names for nodes: their own name when unique, else their first output."""
    names = [n.name for n in model.graph.node]
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    return [name if name and counts[name] == 1 else (node.output[0] if node.output else f"node_{i}")
            for i, (name, node) in enumerate(zip(names, model.graph.node))]


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def constants_to_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Turn Constant nodes holding tensors into initializers, so every weight lives in one place."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = []
    for node in out.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            attrs = {a.name: a for a in node.attribute}
            if "value" in attrs and attrs["value"].t is not None:
                tensor = onnx.TensorProto()
                tensor.CopyFrom(attrs["value"].t)
                tensor.name = node.output[0]
                out.graph.initializer.append(tensor)
                continue
        keep.append(node)
    del out.graph.node[:]
    out.graph.node.extend(keep)
    return out


def _subgraphs(node):
    for a in node.attribute:
        if a.HasField("g"):
            yield a.name, a.g
        for g in a.graphs:
            yield a.name, g


def _subgraph_reads(graph: onnx.GraphProto, counts: dict[str, int]) -> None:
    """Count every tensor name read anywhere inside `graph` (nested subgraphs too).

    ONNX names are unique across a graph and its subgraphs, so a name read inside a subgraph that is
    a main-graph tensor is that tensor (an implicit, outer-scope input).
    """
    for node in graph.node:
        for name in node.input:
            if name:
                counts[name] = counts.get(name, 0) + 1
        for _, sub in _subgraphs(node):
            _subgraph_reads(sub, counts)
    for out in graph.output:
        counts[out.name] = counts.get(out.name, 0) + 1


def _subgraph_nodes(graph: onnx.GraphProto, prefix: str):
    """(qualified name, node, container op) for every node inside subgraphs of `graph`'s nodes."""
    for i, node in enumerate(graph.node):
        label = node.name or (node.output[0] if node.output else f"node_{i}")
        for attr, sub in _subgraphs(node):
            inner = f"{prefix}{label}/{attr}/"
            for j, n in enumerate(sub.node):
                yield inner + (n.name or (n.output[0] if n.output else f"node_{j}")), n, node.op_type
            yield from _subgraph_nodes(sub, inner)


def find_sites(model: onnx.ModelProto) -> tuple[list[Site], dict[str, str]]:
    """All prunable sites, and {node name: reason} for constant-weight nodes that cannot be pruned.

    Only main-graph nodes are sites. Conv/Gemm/MatMul inside control-flow subgraphs (If/Loop/Scan) are
    left dense and listed with that reason. A weight that several nodes of one kind read as their weight,
    directly or through Identity nodes (ALBERT's layers, DeBERTa's shared key projection, a siamese tower), is a site at each of
    them, tied to one level and reconstructed once (shared_weight_groups). Any other weight read by more
    than one node (including reads from inside a subgraph) or that is also a graph output is left dense at
    every node that uses it: it is never pruned for one user and silently changed for another.
    """
    inits = {t.name: t for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, int] = {}
    readers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
            readers.setdefault(name, []).append(node)
    subgraph_reads: dict[str, int] = {}
    for node in model.graph.node:
        for _, sub in _subgraphs(node):
            _subgraph_reads(sub, subgraph_reads)
    graph_outputs = {o.name for o in model.graph.output}
    for name, count in subgraph_reads.items():
        consumers[name] = consumers.get(name, 0) + count
    for name in graph_outputs:
        consumers[name] = consumers.get(name, 0) + 1
    names = _node_names(model)

    sites: list[Site] = []
    unprunable: dict[str, str] = {}
    for node, name in zip(model.graph.node, names):
        if node.op_type in UNPRUNED_WEIGHT_OPS and any(i in inits for i in node.input[:2]):
            unprunable[name] = f"{node.op_type} is not pruned (only Conv, Gemm and MatMul are): left dense"
            continue
        if node.op_type not in PRUNABLE_OPS or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        chain = []
        tensor = node.input[1]
        stopped_at = None   # the op the weight comes through that is not followed
        seen = set()
        while tensor not in inits and tensor in producers and tensor not in seen:
            seen.add(tensor)
            prod = producers[tensor]
            if prod.op_type in PASS_THROUGH_OPS and prod.input:
                if prod.op_type == "Transpose":
                    perm = _attrs(prod).get("perm")
                    chain.append(("Transpose", tuple(perm) if perm is not None else None))
                else:
                    chain.append((prod.op_type, None))
                tensor = prod.input[0]
            else:
                stopped_at = prod
                break
        if tensor not in inits:
            if stopped_at is not None and stopped_at.op_type == "DequantizeLinear":
                if stopped_at.input and stopped_at.input[0] in inits:
                    unprunable[name] = "quantized weight (DequantizeLinear): left as is"
            elif stopped_at is not None and stopped_at.input and stopped_at.input[0] in inits:
                unprunable[name] = (f"the weight comes through a {stopped_at.op_type} of initializer "
                                    f"'{printable(stopped_at.input[0], 60)}', which is not followed: left dense")
            elif node.op_type in ("MatMul", "Gemm") and node.input[0] in inits:
                unprunable[name] = (f"the constant is the first input ({node.op_type} of W and x): only x @ W "
                                    "is pruned; left dense")
            continue
        init = inits[tensor]
        if init.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            unprunable[name] = f"weight '{printable(tensor, 80)}' is not a float tensor"
            continue
        chain.reverse()
        src_shape = tuple(int(d) for d in init.dims)
        shape = src_shape
        fixed_chain = []
        bad_perm = None
        for op, arg in chain:
            if op == "Transpose":
                perm = arg if arg is not None else tuple(reversed(range(len(shape))))
                if sorted(int(p) for p in perm) != list(range(len(shape))):
                    bad_perm = perm
                    break
                shape = tuple(shape[p] for p in perm)
                arg = tuple(int(p) for p in perm)
            fixed_chain.append((op, arg))
        if bad_perm is not None:
            unprunable[name] = (f"weight '{printable(tensor, 80)}' goes through a Transpose with perm "
                                f"{list(bad_perm)}, "
                                f"which does not fit its rank {len(src_shape)}: left dense")
            continue
        attrs = _attrs(node)
        if node.op_type == "MatMul" and len(shape) != 2:
            unprunable[name] = f"MatMul weight of rank {len(shape)} is not supported"
            continue
        if node.op_type == "Gemm" and len(shape) != 2:
            continue
        if node.op_type == "Conv" and len(shape) < 3:
            continue
        # a weight read by several nodes would have to be pruned once for all of them: left dense
        chain_tensors = [tensor] + _chain_tensors(node.input[1], producers, tensor)
        if any(t in graph_outputs for t in chain_tensors):
            unprunable[name] = f"weight '{printable(tensor, 80)}' is also a graph output: left dense"
            continue
        if any(subgraph_reads.get(t, 0) for t in chain_tensors):
            unprunable[name] = (f"weight '{printable(tensor, 80)}' is shared with a node inside a control-flow "
                                "subgraph: left dense")
            continue
        direct = all(op == "Identity" for op, _ in fixed_chain)   # a TorchScript export's later uses
        if any(consumers.get(t, 0) > 1 for t in chain_tensors) and not (
                direct and _read_alike(_through_identities(tensor, readers, graph_outputs, subgraph_reads))):
            unprunable[name] = (f"weight '{printable(tensor, 80)}' is shared by several nodes, not all of them "
                                f"{node.op_type}s reading it directly as their weight: left dense")
            continue
        site = Site(
            name=name, op_type=node.op_type, output=node.output[0], weight=tensor, weight_shape=shape,
            source_shape=src_shape, source_dtype=str(np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type))),
            chain=fixed_chain, input=node.input[0])
        if node.op_type == "Gemm":
            site.trans_b = bool(attrs.get("transB", 0))
            site.trans_a = bool(attrs.get("transA", 0))
        if node.op_type == "Conv":
            nd = len(shape) - 2
            site.group = int(attrs.get("group", 1))
            site.kernel_shape = tuple(attrs.get("kernel_shape", shape[2:]))
            site.strides = tuple(attrs.get("strides", [1] * nd))
            site.dilations = tuple(attrs.get("dilations", [1] * nd))
            site.pads = tuple(attrs.get("pads", [0] * (2 * nd)))
            if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                site.pads = ()  # resolved later from shapes; marks auto padding
        sites.append(site)
    for qualified, node, container in _subgraph_nodes(model.graph, ""):
        if node.op_type in PRUNABLE_OPS and node.domain in ("", "ai.onnx") and len(node.input) >= 2:
            unprunable[qualified] = (f"inside a control-flow subgraph ({printable(container, 40)}): nodes in "
                                     "subgraphs are not pruned")
    return sites, unprunable


# ops of a model quantized to integers: its weights are no longer float initializers to prune
QUANTIZED_OPS = ("ConvInteger", "MatMulInteger", "DequantizeLinear", "QLinearConv", "QLinearMatMul",
                 "DynamicQuantizeLinear")


def no_sites_message(name: str, model: onnx.ModelProto, unprunable: dict) -> str:
    """Why nothing can be pruned, in terms a user can act on: a quantized model, or the reasons given
    for each constant-weight node."""
    text = f"{name} has no prunable site (Conv, Gemm or MatMul with a constant float weight)"
    quantized = sorted({n.op_type for n in model.graph.node if n.op_type in QUANTIZED_OPS})
    if quantized:
        return (text + f": it is quantized ({', '.join(quantized)}). spdy-onnx prunes float models: prune the "
                "float model first, then quantize the file it writes")
    if unprunable:
        first = list(unprunable.items())[:3]
        text += "; every candidate is left dense: " + "; ".join(f"{printable(n, 60)}: {why}" for n, why in first)
        if len(unprunable) > len(first):
            text += f"; and {len(unprunable) - len(first)} more (`spdy-onnx sites` lists them all)"
    return text


def _chain_tensors(start: str, producers: dict, stop: str) -> list[str]:
    tensors = []
    t = start
    while t != stop and t in producers and t not in tensors and producers[t].input:
        tensors.append(t)
        t = producers[t].input[0]
    return tensors


def _through_identities(tensor: str, readers: dict, graph_outputs: set, subgraph_reads: dict) -> list | None:
    """[(node, the tensor it reads)] for the nodes that read `tensor`, looking through Identity nodes (a
    TorchScript export reads every use of a shared parameter after the first through one); None when an
    Identity's copy is a graph output or read inside a subgraph."""
    out, stack, seen = [], [tensor], {tensor}
    while stack:
        t = stack.pop()
        for node in readers.get(t, []):
            if node.op_type != "Identity":
                out.append((node, t))
                continue
            copy = node.output[0]
            if copy in graph_outputs or subgraph_reads.get(copy):
                return None
            if copy not in seen:
                seen.add(copy)
                stack.append(copy)
    return out


def _read_alike(reads) -> bool:
    """Whether the nodes that read one weight (`reads`: _through_identities) can share its pruning: all
    Conv, Gemm or MatMul of the same kind and attributes, each reading it once, as its weight (so one
    matrix view fits all)."""
    if not reads:
        return False
    kinds = {(n.op_type, n.domain, tuple(sorted((k, str(v)) for k, v in _attrs(n).items()))) for n, _ in reads}
    return (reads[0][0].op_type in PRUNABLE_OPS and len(kinds) == 1
            and all(len(n.input) >= 2 and n.input[1] == t and list(n.input).count(t) == 1 for n, t in reads))


def shared_weight_groups(sites: list[Site]) -> list[list[str]]:
    """Names of the sites that share one weight, per weight read by more than one: each group is pruned
    at one level (the solver ties them) from one reconstruction."""
    by_weight: dict[str, list[str]] = {}
    for s in sites:
        by_weight.setdefault(s.weight, []).append(s.name)
    return [names for names in by_weight.values() if len(names) > 1]


def repeated_sites(sites) -> set[int]:
    """Indices of the sites whose weight an earlier site shares: one pruning, priced once (on the first),
    because the solver sums the errors of a tied group. Sites without a weight (test doubles) repeat none."""
    weights = [getattr(site, "weight", None) for site in sites]
    first: dict = {}
    for i, w in enumerate(weights):
        first.setdefault(w, i)
    return {i for i, w in enumerate(weights) if w is not None and first[w] != i}


def select_sites(sites: list[Site], *, exclude: list[str] | None = None, include: list[str] | None = None,
                 min_weights: int = DEFAULT_MIN_WEIGHTS,
                 unprunable: dict[str, str] | None = None) -> tuple[list[Site], dict[str, str]]:
    """Apply default exclusions and the user's --exclude/--include patterns (`unprunable`: the nodes
    find_sites left dense, named when a pattern matches only those).

    Defaults leave dense what rarely pays to prune: grouped/depthwise convs (tiny reductions, no sparse
    speedup, large accuracy loss) and sites with fewer than `min_weights` weights. --include overrides
    the defaults; --exclude always wins. Patterns are exact names or regular expressions (fullmatch).
    """
    def compile_all(patterns):
        out = []
        for p in patterns or []:
            try:
                out.append(re.compile(p))
            except re.error as exc:
                raise SpdyError(f"bad pattern '{p}': {exc}") from None
        return out

    excl, incl = compile_all(exclude), compile_all(include)

    def matches(site, pats):
        return any(site.name == p.pattern or p.fullmatch(site.name) or p.fullmatch(site.output) for p in pats)

    if min_weights < 0:
        raise SpdyError(f"--min-weights must be >= 0, got {min_weights}")
    chosen, excluded = [], {}
    both = []
    for site in sites:
        if matches(site, excl):
            excluded[site.name] = "excluded by --exclude"
            if matches(site, incl):
                both.append(site.name)
        elif matches(site, incl):
            chosen.append(site)
        elif site.op_type == "Conv" and site.group > 1:
            excluded[site.name] = f"grouped conv (group={site.group}): left dense by default (--include to prune)"
        elif site.n_weights < min_weights:
            excluded[site.name] = f"tiny ({site.n_weights} weights < {min_weights}): left dense by default"
        else:
            chosen.append(site)
    # a weight shared with a node left dense stays dense everywhere: pruning it would change that node too
    chosen_names = {s.name for s in chosen}
    for group in shared_weight_groups(sites):
        dense = [n for n in group if n not in chosen_names]
        if dense and len(dense) < len(group):
            for n in group:
                if n in chosen_names:
                    excluded[n] = f"shares its weight with '{printable(dense[0], 60)}', which is left dense: left dense"
            chosen = [s for s in chosen if s.name not in excluded]
    if both:
        log.warning("%d site(s) match both --include and --exclude, and --exclude wins: %s", len(both),
                    ", ".join(printable(n, 60) for n in both[:5]) + (" ..." if len(both) > 5 else ""))
    for pats, flag in ((excl, "--exclude"), (incl, "--include")):
        for p in pats:
            if any(s.name == p.pattern or p.fullmatch(s.name) or p.fullmatch(s.output) for s in sites):
                continue
            dense = [(n, why) for n, why in (unprunable or {}).items() if n == p.pattern or p.fullmatch(n)]
            if dense:
                log.warning("%s pattern '%s' matches only node(s) that cannot be pruned: %d, such as '%s' (%s)",
                            flag, p.pattern, len(dense), printable(dense[0][0], 80), dense[0][1])
            elif p.pattern.startswith(".*") and p.pattern.endswith(".*"):
                log.warning("%s pattern '%s' matches no site (Conv/Gemm/MatMul with a constant weight; "
                            "`spdy-onnx sites MODEL` lists them)", flag, p.pattern)
            else:
                log.warning("%s pattern '%s' matches the whole name of no site (Conv/Gemm/MatMul with a "
                            "constant weight; `spdy-onnx sites MODEL` lists them); for a part of a name write "
                            "'.*%s.*'", flag, p.pattern, p.pattern)
    return chosen, excluded


def read_weights(model: onnx.ModelProto, sites: list[Site]) -> dict[str, np.ndarray]:
    """Source arrays (initializer layout and dtype) of each site's weight."""
    wanted = {s.weight for s in sites}
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in wanted}
    return {s.name: arrays[s.weight] for s in sites}


def _row_dims(site: Site, out_shape: list) -> list:
    """The dims of a site's output that count its rows (what a sparse kernel multiplies the weight by):
    all but the output channels (the last for MatMul/Gemm, the second for Conv)."""
    if site.op_type == "Conv":
        return out_shape[:1] + out_shape[2:]
    return out_shape[:-1]


def fixed_rows(model: onnx.ModelProto, sites: list[Site], specs: dict) -> dict[str, int]:
    """{site name: rows} for the sites whose rows the graph fixes whatever the batch (a Reshape to heads,
    beams or a constant count): a larger --batch-size gives those no more rows to pay for sparse kernels.
    Found by shape inference with the batch symbolic and the other input dims from `specs`; sites whose
    rows follow the batch, or whose shapes cannot be inferred, are left out."""
    from spdy_onnx.modelio import with_static_inputs
    m = with_static_inputs(model, specs)
    for value in m.graph.input:
        dims = value.type.tensor_type.shape.dim
        if len(dims):
            dims[0].dim_param = "batch"
    del m.graph.value_info[:]   # shapes an exporter recorded at its own batch (outputs of batch 1) would stick
    for value in m.graph.output:
        value.type.tensor_type.ClearField("shape")
    try:
        inferred = onnx.shape_inference.infer_shapes(m, strict_mode=False, data_prop=True).graph
    except Exception as exc:   # a model over 2 GB, an op the checker does not know: no claim either way
        log.debug("shape inference for the batch hint failed: %s", exc)
        return {}
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                       for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.value_info) + list(inferred.output) if v.type.tensor_type.HasField("shape")}
    rows = {}
    for site in sites:
        dims = _row_dims(site, shapes.get(site.output) or [])
        if dims and all(dims):
            rows[site.name] = int(np.prod(dims))
    return rows


FOLDABLE_OPS = ("Add", "Sub", "Mul", "Div", "BatchNormalization", "Relu", "Clip", "LeakyRelu", "Sigmoid",
                "HardSigmoid", "HardSwish", "Tanh", "Erf", "Identity")


def output_aliases(model: onnx.ModelProto, sites: list[Site]) -> dict[str, str]:
    """{tensor name: site name} for each site's output and the outputs of ops an engine may fold into it.

    Engines report a fused layer under the output of the last op they folded in (bias Add, BN, Mul,
    activation); following single-consumer elementwise chains attributes that time to the site.
    """
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    aliases: dict[str, str] = {}
    for site in sites:
        tensor = site.output
        aliases[tensor] = site.name
        for _ in range(4):
            users = consumers.get(tensor, [])
            if len(users) != 1 or users[0].op_type not in FOLDABLE_OPS or not users[0].output:
                break
            tensor = users[0].output[0]
            aliases.setdefault(tensor, site.name)
    return aliases
