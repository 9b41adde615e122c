"""Edits of an ONNX file on the protobuf wire format itself: the `onnx` package (and its protobuf
classes) is not a runtime dependency, and these edits touch a few fields.

Field numbers from onnx.proto: ModelProto.graph = 7, opset_import = 8; OperatorSetIdProto.domain
= 1, version = 2; GraphProto.node = 1, initializer = 5, input = 11, output = 12, value_info = 13,
sparse_initializer = 15; SparseTensorProto.values = 1;
NodeProto.input = 1, output = 2, name = 3, op_type = 4, attribute = 5, domain = 7;
AttributeProto.name = 1, i = 3, type = 20; TensorProto.dims = 1, data_type = 2, float_data = 4,
name = 8, raw_data = 9, data_location = 14; ValueInfoProto.name = 1, type = 2;
TypeProto.tensor_type = 1; TypeProto.Tensor.elem_type = 1, shape = 2; TensorShapeProto.dim = 1;
Dimension.dim_param = 2. (TensorShapeProto has no field but dim.)
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator

import numpy as np

_VARINT, _FIXED64, BYTES, _FIXED32 = 0, 1, 2, 5
Buffer = bytes | memoryview


def _read_varint(data: Buffer, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def fields(data: Buffer) -> Iterator[tuple[int, int, Buffer, Buffer]]:
    """(field number, wire type, the field's whole encoding, its payload for length-delimited
    fields) of each field of a serialized message, in order; slices of a memoryview are views,
    not copies (a model's weights are most of its bytes)."""
    pos = 0
    while pos < len(data):
        start = pos
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        payload: Buffer = b""
        if wire == _VARINT:
            _, pos = _read_varint(data, pos)
        elif wire == _FIXED64:
            pos += 8
        elif wire == _FIXED32:
            pos += 4
        elif wire == BYTES:
            length, pos = _read_varint(data, pos)
            payload = data[pos : pos + length]
            pos += length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(data):
            raise ValueError("truncated protobuf message")
        yield number, wire, data[start:pos], payload


def bytes_field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (a message, a string, bytes) in wire format."""
    return _varint(number << 3 | BYTES) + _varint(len(payload)) + payload


def _replace(data: bytes, edits: dict[int, object]) -> bytes:
    """`data` with each length-delimited field whose number is in `edits` passed through
    edits[number] (payload -> new payload, or None to drop the field)."""
    out = bytearray()
    for number, wire, whole, payload in fields(data):
        edit = edits.get(number)
        if edit is None or wire != BYTES:
            out += whole
            continue
        new = edit(payload)  # type: ignore[operator]
        if new is not None:
            out += bytes_field(number, new)
    return bytes(out)


def strings(message: Buffer, number: int) -> list[str]:
    """The values of a repeated (or single) string field."""
    return [bytes(p).decode() for n, w, _, p in fields(message) if n == number and w == BYTES]


def varint_value(message: Buffer, number: int, default: int = 0) -> int:
    """The value of a varint field, or `default` when the message does not set it."""
    for n, w, whole, _ in fields(message):
        if n == number and w == _VARINT:
            return _field_varint(whole)
    return default


def _field_varint(whole: Buffer) -> int:
    """The value of one varint field, given its whole encoding."""
    _, value_at = _read_varint(whole, 0)  # past the field's key
    return _read_varint(whole, value_at)[0]


def value_info_name(value_info: Buffer) -> str:
    return "".join(strings(value_info, 1))


def tensor_name(tensor: Buffer) -> str:
    return "".join(strings(tensor, 8))


def _free_dims(shape: bytes, names: dict[int, str] | None) -> bytes:
    """The dims `names` maps made symbolic; every dim unknown for None."""
    out = bytearray()
    dims = [whole for number, _, whole, _ in fields(shape) if number == 1]
    for index, whole in enumerate(dims):
        if names is None:
            out += bytes_field(1, b"")
        else:
            out += bytes_field(1, bytes_field(2, names[index].encode())) if index in names else whole
    return bytes(out)


def with_free_dims(model: bytes, input_name: str, names: dict[int, str]) -> bytes:
    """`model` (a serialized ONNX ModelProto) with the dimensions `names` maps (index -> symbol)
    of input `input_name` made symbolic, the outputs' dims unknown and the shapes declared for the
    intermediate values (which follow from a fixed input) dropped: the graph itself must already
    work for any size (reshapes to -1, resizes by scale), as onnxruntime then checks it."""

    def tensor_shape(edit):
        return lambda type_: _replace(type_, {1: lambda tensor: _replace(tensor, {2: edit})})

    def graph(payload: bytes) -> bytes:
        def an_input(value_info: bytes) -> bytes:
            if value_info_name(value_info) != input_name:
                return value_info
            return _replace(value_info, {2: tensor_shape(lambda shape: _free_dims(shape, names))})

        def an_output(value_info: bytes) -> bytes:
            return _replace(value_info, {2: tensor_shape(lambda shape: _free_dims(shape, None))})

        return _replace(payload, {11: an_input, 12: an_output, 13: lambda value_info: None})

    return _replace(model, {7: graph})


# TensorProto.DataType
_FLOAT, _UINT8 = 1, 2


def with_uint8_input(model: bytes, input_name: str) -> bytes:
    """`model` (a serialized ModelProto) fed 8-bit values: its float input `input_name` becomes a
    uint8 input of the same shape (named `<input_name>_uint8`, or a free variant of it), which a
    Cast node in front of the graph turns into the float tensor `input_name` the graph reads (the
    same values: every uint8 is a float32). ValueError if there is no such float tensor input."""

    def graph(payload: bytes) -> bytes:
        taken = graph_names(payload)
        uint8_name = fresh_name(f"{input_name}_uint8", taken)
        cast_name = fresh_name(f"{input_name}_as_float", taken)
        element_types: list[int] = []

        def as_uint8(tensor: bytes) -> bytes:
            element_types.append(varint_value(tensor, 1))
            kept = b"".join(whole for number, wire, whole, _ in fields(tensor) if not (number == 1 and wire == _VARINT))
            return varint_field(1, _UINT8) + kept

        def an_input(value_info: bytes) -> bytes:
            if value_info_name(value_info) != input_name:
                return value_info
            return _replace(
                value_info, {1: lambda _: uint8_name.encode(), 2: lambda type_: _replace(type_, {1: as_uint8})}
            )

        edited = _replace(payload, {11: an_input})
        if element_types != [_FLOAT]:
            kind = "is not a float tensor" if element_types else "is not a tensor input of the graph"
            raise ValueError(f"{input_name} {kind}")
        cast = with_int_attribute(node_proto("Cast", [uint8_name], input_name, cast_name), "to", _FLOAT)
        # Nodes run in the order the repeated field lists them, which other fields between them do
        # not change: written first, the Cast is the first node.
        return bytes_field(1, cast) + edited

    return _replace(model, {7: graph})


def graph_names(graph: Buffer) -> set[str]:
    """Every name a serialized GraphProto uses: its inputs, outputs, value infos, initializers
    (sparse ones too), and its nodes' inputs, outputs and names."""
    names: set[str] = set()
    for number, wire, _, payload in fields(graph):
        if wire != BYTES:
            continue
        if number in (11, 12, 13):
            names.add(value_info_name(payload))
        elif number == 5:
            names.add(tensor_name(payload))
        elif number == 15:  # a sparse initializer: named by its values tensor (field 1)
            names.update(tensor_name(values) for n, w, _, values in fields(payload) if n == 1 and w == BYTES)
        elif number == 1:
            names.update(strings(payload, 1), strings(payload, 2), strings(payload, 3))
    return names


def fresh_name(name: str, taken: set[str]) -> str:
    """`name`, with "_" appended until no name in `taken` is the same; taken then holds it."""
    while name in taken:
        name += "_"
    taken.add(name)
    return name


def first_input_name(model: Buffer) -> str:
    """The name of the model's first graph input that is not an initializer (older exports list
    the weights among the inputs too)."""
    graph = graph_field(model)
    if graph is None:
        raise ValueError("not an ONNX model: no graph")
    inputs, weights = [], set()
    for number, wire, _, payload in fields(graph):
        if number == 11 and wire == BYTES:
            inputs.append(value_info_name(payload))
        elif number == 5 and wire == BYTES:
            weights.add(tensor_name(payload))
    name = next((name for name in inputs if name not in weights), None)
    if name is None:
        raise ValueError("the graph has no input that is not an initializer")
    return name


def varint_field(number: int, value: int) -> bytes:
    """One varint protobuf field (an integer, a bool, an enum) in wire format."""
    return _varint(number << 3 | _VARINT) + _varint(value)


def float_value_info(name: str, dims: tuple[int, ...]) -> bytes:
    """A serialized ValueInfoProto: a float tensor `name` of shape `dims`."""
    shape = b"".join(bytes_field(1, varint_field(1, d)) for d in dims)
    tensor = varint_field(1, _FLOAT) + bytes_field(2, shape)
    return bytes_field(1, name.encode()) + bytes_field(2, bytes_field(1, tensor))


def node_proto(op: str, inputs: list[str], output: str, name: str = "") -> bytes:
    """A serialized NodeProto of the default domain with one output."""
    encoding = b"".join(bytes_field(1, value.encode()) for value in inputs) + bytes_field(2, output.encode())
    return encoding + (bytes_field(3, name.encode()) if name else b"") + bytes_field(4, op.encode())


def model(graph: bytes, opset: int = 13) -> bytes:
    """A serialized ModelProto (IR 7) of the serialized GraphProto `graph`, importing the default
    operator set at `opset`."""
    return varint_field(1, 7) + bytes_field(7, graph) + bytes_field(8, bytes_field(1, b"") + varint_field(2, opset))


def identity_model() -> bytes:
    """A serialized ONNX model (IR 7, opset 13) whose output "y" is its input "x", a float[1]."""
    graph = bytes_field(1, node_proto("Identity", ["x"], "y")) + bytes_field(2, b"identity")
    graph += bytes_field(11, float_value_info("x", (1,))) + bytes_field(12, float_value_info("y", (1,)))
    return model(graph)


DEFAULT_DOMAINS = ("", "ai.onnx")


def float_values(tensor: Buffer) -> np.ndarray | None:
    """The values of a float TensorProto held in the file (raw_data or float_data, packed or
    not), a read-only view of `tensor` where they are stored in one piece; None for any other
    type or for data stored outside the file."""
    if varint_value(tensor, 2) != _FLOAT:
        return None
    parts = []
    for number, wire, whole, payload in fields(tensor):
        if number in (4, 9) and wire == BYTES:
            parts.append(np.frombuffer(payload, "<f4"))
        elif number == 4 and wire == _FIXED32:
            parts.append(np.frombuffer(whole[-4:], "<f4"))
    if len(parts) > 1:
        return np.concatenate(parts)
    return parts[0] if parts else None


def tensor_dims(tensor: Buffer) -> tuple[int, ...]:
    """A TensorProto's dims (field 1, packed or one varint each)."""
    dims: list[int] = []
    for number, wire, whole, payload in fields(tensor):
        if number != 1:
            continue
        if wire == BYTES:
            pos = 0
            while pos < len(payload):
                value, pos = _read_varint(payload, pos)
                dims.append(value)
        elif wire == _VARINT:
            dims.append(_field_varint(whole))
    return tuple(dims)


def float_tensor(name: str, values: np.ndarray) -> bytes:
    """A serialized float TensorProto `name` holding `values` (its shape as dims) as raw_data."""
    dims = b"".join(varint_field(1, d) for d in values.shape)
    data = bytes_field(9, values.astype("<f4").tobytes())
    return dims + varint_field(2, _FLOAT) + bytes_field(8, name.encode()) + data


def default_opset(model: Buffer) -> int:
    """The version of the default ONNX operator set a ModelProto imports (0 when none)."""
    for number, wire, _, payload in fields(model):
        if number == 8 and wire == BYTES and "".join(strings(payload, 1)) in DEFAULT_DOMAINS:
            return varint_value(payload, 2)
    return 0


# AttributeProto.type: INT, GRAPH, GRAPHS.
_ATTRIBUTE_INT, _ATTRIBUTE_GRAPH, _ATTRIBUTE_GRAPHS = 2, 5, 10


def _is_attribute(number: int, wire: int, payload: Buffer, name: str | None = None) -> bool:
    """Whether a NodeProto field is an attribute (named `name`, when given)."""
    return number == 5 and wire == BYTES and (name is None or "".join(strings(payload, 1)) == name)


def int_attribute(node: Buffer, name: str) -> int | None:
    """The integer attribute `name` of a NodeProto, None when the node does not set it."""
    found = (varint_value(p, 3) for number, wire, _, p in fields(node) if _is_attribute(number, wire, p, name))
    return next(found, None)


def with_int_attribute(node: Buffer, name: str, value: int) -> bytes:
    """A NodeProto with its integer attribute `name` set to `value`."""
    out = bytearray()
    for number, wire, whole, payload in fields(node):
        if not _is_attribute(number, wire, payload, name):
            out += whole
    attribute = bytes_field(1, name.encode()) + varint_field(3, value) + varint_field(20, _ATTRIBUTE_INT)
    return bytes(out + bytes_field(5, attribute))


def has_subgraph(node: Buffer) -> bool:
    """Whether a NodeProto carries a graph (If, Loop, Scan): its body may read any tensor of the
    enclosing graph by name, without listing it among the node's inputs."""
    return any(
        _is_attribute(number, wire, payload) and varint_value(payload, 20) in (_ATTRIBUTE_GRAPH, _ATTRIBUTE_GRAPHS)
        for number, wire, _, payload in fields(node)
    )


def is_external(tensor: Buffer) -> bool:
    """Whether a TensorProto's data lies in another file (data_location = 14, EXTERNAL = 1): an
    edited model, loaded from memory, could not find it."""
    return varint_value(tensor, 14) == 1


# ExternalDataInfo's first entry as an exporter writes it: StringStringEntryProto field 1 (key),
# "location", the file the data is in.
_EXTERNAL_LOCATION_KEY = b"\x0a\x08location"


def names_external_data(model: bytes | mmap.mmap) -> bool:
    """Whether the serialized model may keep tensor data in other files. A byte scan, not a parse
    (an initializer, a Constant's attribute or a sparse tensor may hold the reference): it can
    say True of a model that does not, never False of one that does."""
    return model.find(_EXTERNAL_LOCATION_KEY) != -1


def graph_field(model: Buffer) -> Buffer | None:
    """The serialized GraphProto of a ModelProto, None when there is none or (legal, but never
    written by an exporter) when it comes in several pieces to be merged."""
    graphs = [payload for number, wire, _, payload in fields(model) if number == 7 and wire == BYTES]
    return graphs[0] if len(graphs) == 1 else None


def with_graph(model: Buffer, graph_parts: list[Buffer]) -> list[Buffer]:
    """The ModelProto `model` with its graph replaced by the concatenation of `graph_parts`, as
    consecutive pieces."""
    parts: list[Buffer] = []
    for number, wire, whole, _ in fields(model):
        if number == 7 and wire == BYTES:
            parts += [_varint(7 << 3 | BYTES), _varint(sum(len(part) for part in graph_parts)), *graph_parts]
        else:
            parts.append(whole)
    return parts
