"""Edits of an ONNX file on the protobuf wire format itself: the `onnx` package (and its protobuf
classes) is not a runtime dependency, and these edits touch a few fields.

Field numbers from onnx.proto: ModelProto.graph = 7, opset_import = 8; OperatorSetIdProto.domain
= 1, version = 2; GraphProto.node = 1, initializer = 5, input = 11, output = 12, value_info = 13;
NodeProto.input = 1, output = 2, name = 3, op_type = 4, domain = 7; TensorProto.dims = 1,
data_type = 2, float_data = 4, name = 8, raw_data = 9; ValueInfoProto.name = 1, type = 2;
TypeProto.tensor_type = 1; TypeProto.Tensor.shape = 2; TensorShapeProto.dim = 1;
Dimension.dim_param = 2. (TensorShapeProto has no field but dim.)
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5
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


def _fields(data: Buffer) -> Iterator[tuple[int, int, Buffer, Buffer]]:
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
        elif wire == _BYTES:
            length, pos = _read_varint(data, pos)
            payload = data[pos : pos + length]
            pos += length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, data[start:pos], payload


def bytes_field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (a message, a string, bytes) in wire format."""
    return _varint(number << 3 | _BYTES) + _varint(len(payload)) + payload


def _replace(data: bytes, edits: dict[int, object]) -> bytes:
    """`data` with each length-delimited field whose number is in `edits` passed through
    edits[number] (payload -> new payload, or None to drop the field)."""
    out = bytearray()
    for number, wire, whole, payload in _fields(data):
        edit = edits.get(number)
        if edit is None or wire != _BYTES:
            out += whole
            continue
        new = edit(payload)  # type: ignore[operator]
        if new is not None:
            out += bytes_field(number, new)
    return bytes(out)


def _strings(message: Buffer, number: int) -> list[str]:
    """The values of a repeated (or single) string field."""
    return [bytes(p).decode() for n, w, _, p in _fields(message) if n == number and w == _BYTES]


def _varint_value(message: Buffer, number: int, default: int = 0) -> int:
    """The value of a varint field, or `default` when the message does not set it."""
    for n, w, whole, _ in _fields(message):
        if n == number and w == _VARINT:
            _, value_at = _read_varint(whole, 0)  # past the field's key
            return _read_varint(whole, value_at)[0]
    return default


def _name(value_info: Buffer) -> str:
    return "".join(_strings(value_info, 1))


def _free_dims(shape: bytes, names: dict[int, str] | None) -> bytes:
    """The dims `names` maps made symbolic; every dim unknown for None."""
    out = bytearray()
    dims = [whole for number, _, whole, _ in _fields(shape) if number == 1]
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
            if _name(value_info) != input_name:
                return value_info
            return _replace(value_info, {2: tensor_shape(lambda shape: _free_dims(shape, names))})

        def an_output(value_info: bytes) -> bytes:
            return _replace(value_info, {2: tensor_shape(lambda shape: _free_dims(shape, None))})

        return _replace(payload, {11: an_input, 12: an_output, 13: lambda value_info: None})

    return _replace(model, {7: graph})


def first_input_name(model: bytes) -> str:
    """The name of the model's first graph input that is not an initializer (older exports list
    the weights among the inputs too); GraphProto.initializer = 5, TensorProto.name = 8."""
    graph = next(payload for number, wire, _, payload in _fields(model) if number == 7 and wire == _BYTES)
    inputs, weights = [], set()
    for number, wire, _, payload in _fields(graph):
        if number == 11 and wire == _BYTES:
            inputs.append(_name(payload))
        elif number == 5 and wire == _BYTES:
            weights.add("".join(_strings(payload, 8)))
    return next(name for name in inputs if name not in weights)


def varint_field(number: int, value: int) -> bytes:
    """One varint protobuf field (an integer, a bool, an enum) in wire format."""
    return _varint(number << 3 | _VARINT) + _varint(value)


def float_value_info(name: str, dims: tuple[int, ...]) -> bytes:
    """A serialized ValueInfoProto: a float tensor `name` of shape `dims`."""
    shape = b"".join(bytes_field(1, varint_field(1, d)) for d in dims)
    tensor = varint_field(1, _FLOAT) + bytes_field(2, shape)
    return bytes_field(1, name.encode()) + bytes_field(2, bytes_field(1, tensor))


def identity_model() -> bytes:
    """A serialized ONNX model (IR 7, opset 13) whose output "y" is its input "x", a float[1]."""

    def value_info(name: str) -> bytes:
        return float_value_info(name, (1,))

    node = bytes_field(1, b"x") + bytes_field(2, b"y") + bytes_field(4, b"Identity")
    graph = (
        bytes_field(1, node)
        + bytes_field(2, b"identity")
        + bytes_field(11, value_info("x"))
        + bytes_field(12, value_info("y"))
    )
    opset = bytes_field(1, b"") + varint_field(2, 13)
    return varint_field(1, 7) + bytes_field(7, graph) + bytes_field(8, opset)


# TensorProto.DataType FLOAT.
_FLOAT = 1
# Mul broadcasts numpy-style from opset 7 on (before, only with a `broadcast` attribute).
_MIN_OPSET_MUL_BROADCASTS = 7
_DEFAULT_DOMAINS = ("", "ai.onnx")


def _float_values(tensor: Buffer) -> np.ndarray | None:
    """The values of a float TensorProto held in the file (raw_data or float_data, packed or
    not); None for any other type or for data stored outside the file."""
    if _varint_value(tensor, 2) != _FLOAT:
        return None
    parts = []
    for number, wire, whole, payload in _fields(tensor):
        if number in (4, 9) and wire == _BYTES:
            parts.append(np.frombuffer(payload, "<f4"))
        elif number == 4 and wire == _FIXED32:
            parts.append(np.frombuffer(whole[-4:], "<f4"))
    return np.concatenate(parts) if parts else None


def _default_opset(model: Buffer) -> int:
    for number, wire, _, payload in _fields(model):
        if number == 8 and wire == _BYTES and "".join(_strings(payload, 1)) in _DEFAULT_DOMAINS:
            return _varint_value(payload, 2)
    return 0


def prelu_as_max(model: bytes) -> bytes:
    """`model` with each PRelu whose slopes are constants no greater than 1 computed as
    Max(x, slope * x), the same function then (slope * x <= x exactly where x >= 0), value for
    value. onnxruntime's CPU PRelu is a slow broadcast kernel; Mul and Max take a fraction of
    its time (bench/FINDINGS.md, "PRelu").
    A model without such a PRelu, or that does not parse, comes back unchanged (the same object:
    onnxruntime then says what is wrong with it)."""
    parts = prelu_as_max_parts(model)
    return model if parts is None else b"".join(parts)


def prelu_as_max_parts(model: bytes) -> list[Buffer] | None:
    """prelu_as_max's file as consecutive pieces, most of them views of `model` (to be written
    out without joining them: a model is mostly weights); None where it leaves `model` as is."""
    try:
        return _prelu_as_max(model)
    except (ValueError, IndexError, UnicodeDecodeError):
        return None


def _is_prelu(node: Buffer) -> bool:
    return _strings(node, 4) == ["PRelu"] and "".join(_strings(node, 7)) in _DEFAULT_DOMAINS


def _prelu_as_max(model: bytes) -> list[Buffer] | None:
    if b"PRelu" not in model:
        return None
    view = memoryview(model)
    graph = next((p for n, w, _, p in _fields(view) if n == 7 and w == _BYTES), None)
    if graph is None or _default_opset(view) < _MIN_OPSET_MUL_BROADCASTS:
        return None
    nodes = [p for n, w, _, p in _fields(graph) if n == 1 and w == _BYTES]
    slopes = {_strings(node, 1)[1] for node in nodes if _is_prelu(node) and len(_strings(node, 1)) == 2}
    # A slope a caller may feed (listed among the graph inputs) is not a constant.
    fed = {_name(p) for n, w, _, p in _fields(graph) if n == 11 and w == _BYTES}
    taken = {name for node in nodes for name in _strings(node, 2)} | fed
    slopes_at_most_one = set()
    for number, wire, _, payload in _fields(graph):
        if number == 5 and wire == _BYTES:
            name = "".join(_strings(payload, 8))
            taken.add(name)
            if name in slopes and name not in fed:
                values = _float_values(payload)
                if values is not None and values.size and bool(np.all(values <= 1.0)):
                    slopes_at_most_one.add(name)
    rewritten = 0
    graph_parts: list[Buffer] = []
    for number, wire, whole, payload in _fields(graph):
        inputs = _strings(payload, 1) if number == 1 and wire == _BYTES else []
        if not inputs or not _is_prelu(payload) or len(inputs) != 2 or inputs[1] not in slopes_at_most_one:
            graph_parts.append(whole)
            continue
        rewritten += 1
        x, slope = inputs
        (y,) = _strings(payload, 2)
        scaled = f"{y}/prelu_as_max/scaled"
        while scaled in taken:
            scaled += "_"
        taken.add(scaled)
        name = "".join(_strings(payload, 3)) or f"prelu_as_max_{rewritten}"
        mul = bytes_field(1, x.encode()) + bytes_field(1, slope.encode()) + bytes_field(2, scaled.encode())
        mul += bytes_field(3, f"{name}/mul".encode()) + bytes_field(4, b"Mul")
        max_ = bytes_field(1, x.encode()) + bytes_field(1, scaled.encode()) + bytes_field(2, y.encode())
        max_ += bytes_field(3, f"{name}/max".encode()) + bytes_field(4, b"Max")
        graph_parts.append(bytes_field(1, mul) + bytes_field(1, max_))
    if not rewritten:
        return None
    parts: list[Buffer] = []
    for number, wire, whole, _ in _fields(view):
        if number == 7 and wire == _BYTES:
            parts += [_varint(7 << 3 | _BYTES), _varint(sum(len(part) for part in graph_parts)), *graph_parts]
        else:
            parts.append(whole)
    return parts
