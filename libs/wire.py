"""Protobuf wire format, by hand where it pays: varints, tags and frames, and where a body goes wrong.

Writers (`varint`, `tag`, `frame`) serve the hot paths that pre-frame message parts instead of building
messages field by field (the gateway's log records, the feature service's responses); tags come from the
generated descriptors, and `libs/tests/test_wire.py` checks the bytes against `SerializeToString`.
Readers: `read_varint`, `length_delimited` (a message's top-level length-delimited fields), and `wire_problem`, which names the first field of a body that does not parse
(protobuf's own DecodeError says only "Error parsing message"; a caller needs the field).
"""

from __future__ import annotations

from collections.abc import Iterator

from google.protobuf.descriptor import Descriptor, FieldDescriptor

_VARINT, _I64, _LEN, _SGROUP, _EGROUP, _I32 = 0, 1, 2, 3, 4, 5
_WIRE_TYPE_NAMES = {_VARINT: "varint", _I64: "64-bit", _LEN: "length-delimited", _I32: "32-bit"}
# Nested messages deeper than this are not walked (protobuf's own recursion limit is 100).
_MAX_DEPTH = 64


_U64 = (1 << 64) - 1


class _Truncated(ValueError):
    pass


def _encode_varint(n: int) -> bytes:
    n &= _U64
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# Lengths and counts are mostly small: look them up.
_SMALL_VARINTS = tuple(_encode_varint(i) for i in range(1 << 14))


def varint(n: int) -> bytes:
    """Base-128 varint of an int64 or uint64 (a negative number takes ten bytes, as protobuf writes it)."""
    return _SMALL_VARINTS[n] if 0 <= n < 16384 else _encode_varint(n)


def tag(field: FieldDescriptor) -> bytes:
    """The key of one `field` entry: its number and wire type (length-delimited when packed)."""
    wire_type = _LEN if field.is_packed else _expected_wire_type(field)
    return varint(field.number << 3 | wire_type)


def frame(key: bytes, payload: bytes) -> bytes:
    """A length-delimited field: its tag `key`, the payload's length, the payload."""
    return key + varint(len(payload)) + payload


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


def length_delimited(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of each top-level length-delimited field of `data`, in wire order; other
    fields are skipped, not parsed. Raises ValueError, after yielding what came before, where `data` is cut
    short or holds a group."""
    pos = 0
    while pos < len(data):
        key, pos = read_varint(data, pos)
        wire_type = key & 7
        if wire_type == _VARINT:
            _, pos = read_varint(data, pos)
        elif wire_type in (_I64, _I32):
            pos += 8 if wire_type == _I64 else 4
        elif wire_type == _LEN:
            size, pos = read_varint(data, pos)
            yield key >> 3, pos, pos + size
            pos += size
        else:
            raise ValueError(f"wire type {wire_type} is not supported here")
        if pos > len(data):
            raise _Truncated


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
        payload = b""
        try:
            if wire_type == _VARINT:
                _, pos = read_varint(data, pos)
            elif wire_type in (_I64, _I32):
                size = 8 if wire_type == _I64 else 4
                if pos + size > len(data):
                    raise _Truncated
                pos += size
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
