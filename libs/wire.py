"""Protobuf wire format: where a request body that does not parse as its message goes wrong.

protobuf's own DecodeError says only "Error parsing message"; a caller needs the field. `wire_problem`
walks the bytes against the message's descriptor and names the first field that breaks it.
"""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor

_VARINT, _I64, _LEN, _SGROUP, _EGROUP, _I32 = 0, 1, 2, 3, 4, 5
_WIRE_TYPE_NAMES = {_VARINT: "varint", _I64: "64-bit", _LEN: "length-delimited", _I32: "32-bit"}
# Nested messages deeper than this are not walked (protobuf's own recursion limit is 100).
_MAX_DEPTH = 64


class _Truncated(ValueError):
    pass


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at `pos` and the position after it; ValueError when it is truncated or too long."""
    value, shift = 0, 0
    while True:
        if pos >= len(data) or shift > 63:
            raise _Truncated
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _expected_wire_type(field: FieldDescriptor) -> int:
    t = field.type
    if t in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_MESSAGE):
        return _LEN
    if t == FieldDescriptor.TYPE_GROUP:
        return _SGROUP
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64):
        return _I64
    if t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_SFIXED32):
        return _I32
    return _VARINT


def _field_name(descriptor: Descriptor, field: FieldDescriptor, prefix: str) -> str:
    if descriptor.GetOptions().map_entry:
        # A map entry's fields are `key` and `value`: say `entities.value`, the map's name first.
        return f"{prefix.rstrip('.')}.{field.name}" if prefix else field.name
    return f"{prefix}{field.name}"


def wire_problem(descriptor: Descriptor, data: bytes, prefix: str = "", depth: int = 0) -> str:
    """Names the first field of `data` that does not fit `descriptor`, and what is wrong with it.

    Args:
        descriptor: The message type the bytes should encode.
        data: The serialized message.
        prefix: The dotted path of the enclosing field (for nested messages).
        depth: Nesting depth so far.

    Returns:
        "field: what is wrong", or "" when no problem was found at the wire level.
    """
    where = prefix.rstrip(".") or "message"
    if depth > _MAX_DEPTH:
        return f"{where}: nested more than {_MAX_DEPTH} levels deep"
    pos = 0
    while pos < len(data):
        try:
            key, pos = read_varint(data, pos)
        except _Truncated:
            return f"{where}: truncated field tag"
        number, wire_type = key >> 3, key & 7
        field = descriptor.fields_by_number.get(number)
        name = _field_name(descriptor, field, prefix) if field is not None else f"{prefix}#{number}"
        if number == 0:
            return f"{where}: field number 0 is not valid"
        try:
            if wire_type == _VARINT:
                _, pos = read_varint(data, pos)
                payload = b""
            elif wire_type in (_I64, _I32):
                size = 8 if wire_type == _I64 else 4
                if pos + size > len(data):
                    raise _Truncated
                pos += size
                payload = b""
            elif wire_type == _LEN:
                size, pos = read_varint(data, pos)
                if pos + size > len(data):
                    raise _Truncated
                payload, pos = data[pos : pos + size], pos + size
            else:
                return f"{name}: unsupported wire type {wire_type}"
        except _Truncated:
            return f"{name}: truncated value"
        if field is None:
            continue  # unknown fields are kept, not refused
        expected = _expected_wire_type(field)
        packed = field.is_repeated and expected != _LEN and wire_type == _LEN
        if wire_type != expected and not packed:
            return (
                f"{name}: a {_WIRE_TYPE_NAMES.get(wire_type, wire_type)} value where a "
                f"{_WIRE_TYPE_NAMES.get(expected, expected)} one was expected (wrong type)"
            )
        if field.type == FieldDescriptor.TYPE_STRING:
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                return f"{name}: not valid UTF-8"
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            problem = wire_problem(field.message_type, payload, f"{name}.", depth + 1)
            if problem:
                return problem
    return ""
