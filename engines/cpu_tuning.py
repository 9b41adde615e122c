"""Rewrites of an ONNX graph into the same function in ops that onnxruntime's CPU kernels run fast.

On x86, onnxruntime runs a float convolution in MLAS's blocked NCHWc layout when its channel
counts are whole blocks, and otherwise in the plain NCHW layout (a depthwise convolution then
takes an im2col per channel), reordering tensors between the two; its PRelu is a slow broadcast
kernel that the blocked layout does not take either. Two rewrites, made on the protobuf wire
format (onnx_graph):

* Channel padding. A run of tensors whose channel count is not a whole block (the pruned
  MiniFASNets' 103, 231, 77, 13 ...) gets zero channels up to one: the convolutions that make
  them get zero filters and zero biases, those that read them zero weights for the new
  channels, per-channel constants zeros. The new channels hold zeros through the ops allowed in
  the run and are read only through zero weights, so the real channels get the same sums, in
  another order of summation (as between any two convolution kernels).
* PRelu. After a float convolution, as Relu(x) + (-slope) * Relu(-x): two Relus, two per-channel
  Muls and an Add, which onnxruntime runs as two blocked 1x1 depthwise convolutions with the
  second Relu and the Add fused in, so the next convolution reads the result without a reorder.
  Elsewhere (after a quantized convolution, or off x86) as Max(x, slope * x), for slopes up to 1.
  Both give PRelu's values: one of the two terms is zero.

A graph with subgraphs (If, Loop, Scan: their bodies read tensors by name) or with weights in
external files is left as it is. bench/FINDINGS.md ("PRelu", "channel padding") has the
measurements.
"""

from __future__ import annotations

import functools
import platform
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .onnx_graph import (
    BYTES,
    DEFAULT_DOMAINS,
    Buffer,
    bytes_field,
    default_opset,
    fields,
    float_tensor,
    float_values,
    fresh_name,
    graph_field,
    graph_names,
    has_subgraph,
    int_attribute,
    is_external,
    node_proto,
    tensor_dims,
    tensor_name,
    value_info_name,
    with_graph,
    with_int_attribute,
)

# Ops whose output channel c is a function of channel c of their inputs (and of scalar or
# per-channel constants) that maps zeros to finite values: padded channels may run through them.
_CHANNELWISE = frozenset(
    {
        "Relu",
        "PRelu",
        "LeakyRelu",
        "Sigmoid",
        "Tanh",
        "Clip",
        "Add",
        "Sub",
        "Mul",
        "Max",
        "Min",
        "GlobalAveragePool",
        "GlobalMaxPool",
        "MaxPool",
        "AveragePool",
    }
)
# Mul broadcasts numpy-style from opset 7 on (before, only with a `broadcast` attribute).
_MIN_OPSET_MUL_BROADCASTS = 7


@functools.lru_cache(maxsize=1)
def nchwc_block() -> int:
    """MLAS's NCHWc block on this CPU (MlasNchwcGetBlockSize): 16 with AVX-512, else 8 on x86;
    0 where onnxruntime has no blocked layout (other architectures)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return 0
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    return 16 if "avx512f" in flags else 8


def tuned_for_cpu(model: bytes) -> bytes:
    """`model` rewritten as above; a model with nothing to rewrite, or that does not parse, comes
    back unchanged (the same object: onnxruntime then says what is wrong with it)."""
    parts = tuned_for_cpu_parts(model)
    return model if parts is None else b"".join(parts)


def tuned_for_cpu_parts(model: Buffer) -> list[Buffer] | None:
    """tuned_for_cpu's file as consecutive pieces, most of them views of `model`, to be written
    out one by one; None where it leaves `model` as it is."""
    try:
        return _Rewrite(memoryview(model), nchwc_block()).run()
    except (ValueError, IndexError):
        return None


@dataclass
class _Node:
    encoding: Buffer
    op: str
    inputs: list[str]
    outputs: list[str]
    name: str

    @staticmethod
    def parse(payload: Buffer) -> _Node:
        values: dict[int, list[str]] = {1: [], 2: [], 3: [], 4: [], 7: []}
        for number, wire, _, text in fields(payload):
            if number in values and wire == BYTES:
                values[number].append(bytes(text).decode())
        default_domain = "".join(values[7]) in DEFAULT_DOMAINS
        op = "".join(values[4]) if default_domain else ""  # other domains' ops are opaque here
        return _Node(payload, op, values[1], values[2], "".join(values[3]))


class _UnionFind:
    """Tensor names joined into classes: tensors that must have the same channels."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def add(self, name: str) -> None:
        self.parent.setdefault(name, name)

    def find(self, name: str) -> str:
        self.add(name)
        root = name
        while root != self.parent[root]:
            root = self.parent[root]
        self.parent[name] = root
        return root

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


@dataclass
class _Rewrite:
    model: memoryview
    block: int  # nchwc_block(); 0: no padding, and PRelu only as Max
    nodes: list[_Node] = field(default_factory=list)
    constants: dict[str, Buffer] = field(default_factory=dict)  # initializers no caller may feed
    boundary: set[str] = field(default_factory=set)  # graph inputs and outputs
    # The rewrite: node index -> its replacement nodes; initializer -> new encoding (None drops
    # it); initializers added; tensors whose declared shape no longer holds.
    new_nodes: dict[int, list[bytes]] = field(default_factory=dict)
    new_constants: dict[str, bytes | None] = field(default_factory=dict)
    added: list[bytes] = field(default_factory=list)
    reshaped: set[str] = field(default_factory=set)
    taken: set[str] = field(default_factory=set)  # every name of the graph and every name given since
    uses: Counter[str] = field(default_factory=Counter)  # nodes reading each constant
    _original: dict[str, np.ndarray | None] = field(default_factory=dict)  # _values of the file's constants

    def run(self) -> list[Buffer] | None:
        graph = graph_field(self.model)
        if graph is None:
            return None
        initializers: dict[str, Buffer] = {}
        for number, _, _, payload in fields(graph):
            if number == 1:
                if has_subgraph(payload):
                    return None
                self.nodes.append(_Node.parse(payload))
            elif number == 5:
                if is_external(payload):
                    return None
                initializers[tensor_name(payload)] = payload
            elif number in (11, 12):
                self.boundary.add(value_info_name(payload))
        self.constants = {name: tensor for name, tensor in initializers.items() if name not in self.boundary}
        self.taken = graph_names(graph)
        self.uses = Counter(name for node in self.nodes for name in node.inputs if name in self.constants)
        if self.block:
            self._pad_channels()
        if default_opset(self.model) >= _MIN_OPSET_MUL_BROADCASTS:
            self._rewrite_prelus()
        if not self.new_nodes and not self.new_constants:
            return None
        return with_graph(self.model, self._graph_parts(graph))

    # -- helpers -------------------------------------------------------------------------------
    def _values(self, name: str) -> np.ndarray | None:
        """A float constant's values shaped by its dims, as rewritten so far; None otherwise."""
        if name in self.new_constants:
            tensor = self.new_constants[name]
            return None if tensor is None else _shaped(tensor)
        if name not in self._original:
            self._original[name] = _shaped(self.constants[name]) if name in self.constants else None
        return self._original[name]

    def _dims(self, name: str) -> tuple[int, ...]:
        """The dims of a constant of the file."""
        values = self._values(name)
        return tensor_dims(self.constants[name]) if values is None else values.shape

    def _replace_constant(self, name: str, values: np.ndarray) -> None:
        self.new_constants[name] = float_tensor(name, values)

    def _fresh(self, name: str) -> str:
        return fresh_name(name, self.taken)

    def _graph_parts(self, graph: Buffer) -> list[Buffer]:
        parts: list[Buffer] = []
        index = 0
        for number, _, whole, payload in fields(graph):
            if number == 1:
                replacement = self.new_nodes.get(index)
                index += 1
                parts += [whole] if replacement is None else [bytes_field(1, encoding) for encoding in replacement]
            elif number == 5 and (name := tensor_name(payload)) in self.new_constants:
                tensor = self.new_constants[name]
                if tensor is not None:
                    parts.append(bytes_field(5, tensor))
            elif number == 13 and value_info_name(payload) in self.reshaped:
                continue
            else:
                parts.append(whole)
        return parts + [bytes_field(5, tensor) for tensor in self.added]

    # -- channel padding -----------------------------------------------------------------------
    def _conv_kind(self, node: _Node) -> str | None:
        """The kind of a float convolution whose weights (and bias) are constants of its own:
        "dense" (group 1) or "depthwise" (a group per channel); None for any other node."""
        if node.op != "Conv" or len(node.inputs) < 2 or len(node.outputs) != 1 or node.inputs[0] in self.constants:
            return None
        weights, bias = node.inputs[1], (node.inputs[2] if len(node.inputs) > 2 else "")
        own = [name for name in (weights, bias) if name]
        if any(name not in self.constants or self.uses[name] != 1 or self._values(name) is None for name in own):
            return None
        dims = self._dims(weights)
        if len(dims) != 4 or (bias and self._dims(bias) != dims[:1]):
            return None
        group = int_attribute(node.encoding, "group") or 1
        if group == 1:
            return "dense"
        return "depthwise" if group == dims[0] and dims[1] == 1 else None

    def _pad_channels(self) -> None:
        classes = _UnionFind()
        cut = set(self.boundary)  # tensors whose channels must stay as they are
        conv_channels: dict[str, int] = {}  # a convolution's output -> its channels
        convs: list[tuple[int, _Node, str]] = []
        channelwise: list[tuple[int, _Node]] = []
        for index, node in enumerate(self.nodes):
            tensors = [name for name in (*node.inputs, *node.outputs) if name and name not in self.constants]
            kind = self._conv_kind(node)
            if kind is not None:
                conv_channels[node.outputs[0]] = self._dims(node.inputs[1])[0]
                # A depthwise convolution keeps each channel apart: its input and output are
                # padded together. A dense one mixes them: each side is padded on its own.
                if kind == "depthwise":
                    classes.union(node.inputs[0], node.outputs[0])
                classes.add(node.inputs[0])
                classes.add(node.outputs[0])
                convs.append((index, node, kind))
            elif node.op in _CHANNELWISE and len(node.outputs) == 1 and len(tensors) > 1:
                for name in tensors:
                    classes.union(name, node.outputs[0])
                channelwise.append((index, node))
            else:
                cut.update(tensors)
        channels: dict[str, set[int]] = {}
        for name, count in conv_channels.items():
            channels.setdefault(classes.find(name), set()).add(count)
        refused = {classes.find(name) for name in cut}
        for _, node in channelwise:
            root = classes.find(node.outputs[0])
            counts = channels.get(root, set())
            if len(counts) != 1 or not all(self._per_channel(name, max(counts)) for name in node.inputs):
                refused.add(root)
        padded: dict[str, int] = {}  # class -> its channels padded to whole blocks
        for root, counts in channels.items():
            count = max(counts)
            if root not in refused and len(counts) == 1 and count >= self.block and count % self.block:
                padded[root] = -(-count // self.block) * self.block
        if not padded:
            return
        for index, node, kind in convs:
            in_padded = padded.get(classes.find(node.inputs[0])) if kind == "dense" else None
            out_padded = padded.get(classes.find(node.outputs[0]))
            if in_padded is None and out_padded is None:
                continue
            weights = self._values(node.inputs[1])
            assert weights is not None
            if out_padded is not None:
                weights = _padded(weights, 0, out_padded)
                if len(node.inputs) > 2 and node.inputs[2]:
                    bias = self._values(node.inputs[2])
                    assert bias is not None
                    self._replace_constant(node.inputs[2], _padded(bias, 0, out_padded))
            if in_padded is not None:
                weights = _padded(weights, 1, in_padded)
            self._replace_constant(node.inputs[1], weights)
            if kind == "depthwise":
                self.new_nodes[index] = [with_int_attribute(node.encoding, "group", weights.shape[0])]
        for _, node in channelwise:
            size = padded.get(classes.find(node.outputs[0]))
            if size is None:
                continue
            for name in node.inputs:
                values = self._values(name) if name in self.constants else None
                if values is not None and values.size > 1:
                    self._replace_constant(name, _padded(values, values.ndim - 3, size))
        self.reshaped = {name for name in classes.parent if classes.find(name) in padded}

    def _per_channel(self, name: str, channels: int) -> bool:
        """Whether input `name` of a channelwise op can follow its tensors' padding: a tensor, a
        scalar constant, or a float constant of its own laid out per channel (C x 1 x 1)."""
        if not name or name not in self.constants:
            return True
        dims = self._dims(name)
        if int(np.prod(dims, dtype=np.int64)) == 1 and len(dims) <= 4:
            return True
        per_channel = len(dims) in (3, 4) and dims[-3] == channels and int(np.prod(dims)) == channels
        return per_channel and self.uses[name] == 1 and self._values(name) is not None

    # -- PRelu ---------------------------------------------------------------------------------
    def _rewrite_prelus(self) -> None:
        producers = {name: node for node in self.nodes for name in node.outputs}
        for index, node in enumerate(self.nodes):
            if node.op != "PRelu" or len(node.inputs) != 2 or len(node.outputs) != 1:
                continue
            x, slope = node.inputs
            slopes = self._values(slope) if slope in self.constants else None
            if slopes is None or not slopes.size or not np.all(np.isfinite(slopes)):
                continue
            producer = producers.get(x)
            name = node.name or node.outputs[0]
            if self.block and producer is not None and producer.op == "Conv":
                self.new_nodes[index] = self._relu_form(name, x, slopes, node.outputs[0])
                if self.uses[slope] == 1:
                    self.new_constants[slope] = None
            elif np.all(slopes <= 1.0):
                self.new_nodes[index] = self._max_form(name, x, slope, node.outputs[0])

    def _relu_form(self, name: str, x: str, slopes: np.ndarray, y: str) -> list[bytes]:
        """Relu(x) + (-slopes) * Relu(-x), -x as x times -1 per channel (a Neg or a Sub would
        leave the blocked layout)."""
        minus_one = self._fresh(f"{y}/prelu/minus_one")
        minus_slopes = self._fresh(f"{y}/prelu/minus_slopes")
        self.added += [float_tensor(minus_one, np.full_like(slopes, -1.0)), float_tensor(minus_slopes, -slopes)]
        positive, negated, negative, scaled = (
            self._fresh(f"{y}/prelu/{part}") for part in ("positive", "negated", "negative", "scaled")
        )
        return [
            node_proto("Relu", [x], positive, self._fresh(f"{name}/positive")),
            node_proto("Mul", [x, minus_one], negated, self._fresh(f"{name}/negated")),
            node_proto("Relu", [negated], negative, self._fresh(f"{name}/negative")),
            node_proto("Mul", [negative, minus_slopes], scaled, self._fresh(f"{name}/scaled")),
            node_proto("Add", [positive, scaled], y, self._fresh(f"{name}/sum")),
        ]

    def _max_form(self, name: str, x: str, slope: str, y: str) -> list[bytes]:
        """Max(x, slope * x): slope * x <= x exactly where x >= 0, as the slopes are <= 1."""
        scaled = self._fresh(f"{y}/prelu/scaled")
        return [
            node_proto("Mul", [x, slope], scaled, self._fresh(f"{name}/scaled")),
            node_proto("Max", [x, scaled], y, self._fresh(f"{name}/max")),
        ]


def _shaped(tensor: Buffer) -> np.ndarray | None:
    values = float_values(tensor)
    dims = tensor_dims(tensor)
    if values is None or values.size != int(np.prod(dims, dtype=np.int64)):
        return None
    return values.reshape(dims)


def _padded(values: np.ndarray, axis: int, size: int) -> np.ndarray:
    """`values` with zeros appended along `axis` up to `size`."""
    widths = [(0, 0)] * values.ndim
    widths[axis] = (0, size - values.shape[axis])
    return np.pad(values, widths)
