"""JSON Schema checks of the YAML files operators write (the platform file, the API-key file).

`problem(instance, schema, root)` validates with `jsonschema` and turns the first error into a message
that names the field the way the rest of InferGrid does (`listener.port: expected int, got str 'x'`,
`models.m.versions[0]: unknown key(s) wieght`), or returns "" when the instance fits. Within one object the
schema's keywords are checked in the order they are written: put `additionalProperties` before
`properties` so that an unknown key is reported before the values under it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError

# As Python means it: 8080.0 is not an integer (JSON Schema would accept it), True is not a number.
_Validator = validators.extend(
    Draft202012Validator,
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool)
    ),
)

# JSON Schema types by the Python names the messages use.
_TYPE_NAMES = {
    "integer": "int",
    "number": "int or float",
    "string": "str",
    "boolean": "bool",
    "object": "dict",
    "array": "list",
    "null": "None",
}


def field_path(root: str, path: Sequence[str | int]) -> str:
    """`root` for the top level, else `listener.port`, `keys[0].tenant` (root left out)."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or root


def _message(error: ValidationError, root: str) -> str:
    where = field_path(root, list(error.absolute_path))
    value, kind = error.instance, error.validator
    if kind == "type":
        types = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        names = " or ".join(_TYPE_NAMES.get(str(t), str(t)) for t in types)
        return f"{where}: expected {names}, got {type(value).__name__} {value!r}"
    if kind == "additionalProperties":
        known = set(error.schema.get("properties", {}))
        unknown = sorted(str(key) for key in value if key not in known)
        return f"{where}: unknown key(s) {', '.join(unknown)}"
    if kind == "required":
        missing = next(key for key in error.validator_value if key not in value)
        return f"{field_path(root, [*error.absolute_path, missing])}: required"
    if kind == "enum":
        return f"{where}: expected one of {', '.join(map(str, error.validator_value))}, got {value!r}"
    if kind == "minLength":
        return f"{where}: must not be empty"
    if kind == "pattern":
        return f"{where}: {error.schema.get('description', 'does not match ' + error.validator_value)}"
    return f"{where}: {error.message}"


def problem(instance: Any, schema: dict[str, Any], root: str) -> str:
    """The first thing wrong with `instance` under `schema`, naming the field; "" when it fits."""
    for error in _Validator(schema).iter_errors(instance):
        return _message(error, root)
    return ""
