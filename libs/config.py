"""Typed configuration read once from environment variables into frozen dataclasses.

A service declares one frozen dataclass; `load_config` fills each field from
`<PREFIX><FIELD_NAME>` (upper-cased), converting to the field's type, and fails
naming the variable when a value is malformed or a required one is missing.
Nested dataclass fields are read with the same prefix (they group settings, they
do not namespace them). Secrets come from files: a field marked `secret()` may be
given as `<VAR>_FILE=/path` (a file nobody but its owner and group may read: mode 0600, 0640 or 0440,
as Kubernetes mounts a Secret with `defaultMode`), and `redacted()` hides its value for logging, as
well as the password of any `scheme://user:password@host` URL among the other values. A field declared
`setting(default, minimum=..., maximum=..., positive=..., choices=...)` in a `Bounded` section is checked when the
section is built; the loader's error names its variable and the bad value.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import stat
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

T = TypeVar("T")

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_REDACTED = "***"
# The password of a URL's userinfo: `scheme://user:password@host` → `scheme://user:***@host`.
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:@/\s]*:)[^@/\s]+(?=@)")


class ConfigError(ValueError):
    """A configuration value is missing or malformed; the message names the variable."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


def secret(default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """Declares a secret field: readable from `<VAR>_FILE`, never printed by `redacted()`."""
    metadata = {**kwargs.pop("metadata", {}), "secret": True}
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def env_var(name: str, default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """Declares a field read from an explicitly named variable instead of `<PREFIX><FIELD>`."""
    metadata = {**kwargs.pop("metadata", {}), "env": name}
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def section(cls: type[T], **defaults: Any) -> Any:
    """Declares a nested section whose fields default to `defaults` (a service's own port) instead of the
    class's; the loader and the README tables use them."""
    return dataclasses.field(
        default_factory=functools.partial(cls, **defaults), metadata={"defaults": defaults}
    )


def setting(default: Any = dataclasses.MISSING, **bounds: Any) -> Any:
    """Declares a field with bounds, checked when its `Bounded` section is built: `minimum` and `maximum`
    (inclusive), `positive` (above 0) or `choices`."""
    return dataclasses.field(default=default, metadata={"bounds": bounds})


class BoundError(ValueError):
    """A `setting` is out of its bounds; `field` names it (the loader names its variable)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} must {problem}")
        self.field = field


class Bounded:
    """Base of a frozen config section: its `setting(...)` fields are checked on construction (a subclass
    with checks of its own calls `super().__post_init__()` first)."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            if "bounds" in field.metadata and (problem := _out_of_bounds(value, **field.metadata["bounds"])):
                raise BoundError(field.name, f"{problem}, got {value!r}")


def _out_of_bounds(
    value: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    positive: bool = False,
    choices: tuple[Any, ...] = (),
) -> str:
    """What `value` breaks of its bounds; "" when nothing."""
    if choices and value not in choices:
        return f"be one of {choices}"
    if positive and not value > 0:
        return "be positive"
    if minimum is not None and maximum is not None and not minimum <= value <= maximum:
        return f"be {minimum}..{maximum}"
    if minimum is not None and value < minimum:
        return "not be negative" if minimum == 0 else f"be at least {minimum}"
    if maximum is not None and value > maximum:
        return f"be at most {maximum}"
    return ""


def _convert(variable: str, raw: str, kind: Any) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return None if raw == "" else _convert(variable, raw, args[0])
    if kind is str:
        return raw
    if kind is bool:
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(variable, f"{raw!r} is not a boolean (use true/false)")
    if kind in (int, float):
        try:
            return kind(raw.strip())
        except ValueError:
            noun = "an integer" if kind is int else "a number"
            raise ConfigError(variable, f"{raw!r} is not {noun}") from None
    if kind is Path:
        if not raw.strip():
            raise ConfigError(variable, "is empty; expected a path")
        return Path(raw.strip())
    if origin is tuple:
        (item,) = typing.get_args(kind)[:1]
        parts = [p.strip() for p in raw.split(",") if p.strip()]
        return tuple(_convert(variable, p, item) for p in parts)
    raise TypeError(f"unsupported config field type {kind!r} for {variable}")


def _read_secret_file(variable: str, path: str) -> str:
    """The secret in `path`, stripped; refused when the file is missing, empty or readable by others."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ConfigError(variable, f"cannot read secret file {path!r}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise ConfigError(variable, f"secret file {path!r} is not a regular file")
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        raise ConfigError(
            variable,
            f"secret file {path!r} is readable or writable by others (mode {stat.S_IMODE(mode):04o}); "
            "allow its owner (and group) only, e.g. chmod 600",
        )
    try:
        value = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(variable, f"cannot read secret file {path!r}: {exc.strerror}") from None
    if not value:
        raise ConfigError(variable, f"secret file {path!r} is empty")
    return value


def url_with_credentials(url: str, username: str, password: str) -> str:
    """`url` with `username` and `password` (URL-quoted) as its userinfo, for clients that take credentials
    only in the URL (redis://user:password@host:port/db). The result holds a secret: pass it to the
    client, never to a log.

    `url` itself when both are empty, or when it carries credentials of its own (they win, as in
    redis-py's `from_url`).
    """
    parts = urlsplit(url)
    if (not username and not password) or parts.username is not None or parts.password is not None:
        return url
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    userinfo = quote(username, safe="")
    if password:
        userinfo += ":" + quote(password, safe="")
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{netloc}"))


@dataclass(frozen=True)
class RedisClientConfig(Bounded):
    """A Redis and its ACL user: a section's base (its fields read as <PREFIX>REDIS_URL, ...)."""

    # The Redis, without credentials (redis[s]://host:port/db).
    redis_url: str = "redis://127.0.0.1:6379/0"
    # The Redis ACL user and its password; both empty: no AUTH. Kept out of the URL so the URL can be logged.
    redis_username: str = ""
    redis_password: str = secret("")

    def redis_client_url(self) -> str:
        """`redis_url` with the credentials in it, for the client only (never log it)."""
        return url_with_credentials(self.redis_url, self.redis_username, self.redis_password)


def hide_url_password(text: str) -> str:
    """`text` with the password of every `scheme://user:password@` URL in it replaced by '***'."""
    return _URL_PASSWORD.sub(lambda m: m["head"] + _REDACTED, text)


def load_config(cls: type[T], environ: Mapping[str, str], prefix: str, defaults: Mapping[str, Any] = {}) -> T:
    """Builds `cls` from `environ`.

    Args:
        cls: A (frozen) dataclass type whose fields are typed and defaulted.
        environ: The environment to read, e.g. `os.environ` (a parameter, so tests pass a dict).
        prefix: The variable prefix, e.g. "INFERGRID_FEATURES_".
        defaults: Field values used where `environ` has none, instead of the class's defaults.

    Returns:
        The filled dataclass.

    Raises:
        ConfigError: A value is malformed or a required value is missing; names the variable.
    """
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = dict(defaults)
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        kind = hints[field.name]
        if dataclasses.is_dataclass(kind):
            nested = field.metadata.get("defaults", {})
            values[field.name] = load_config(kind, environ, prefix, nested)  # type: ignore[arg-type]
            continue
        variable = field.metadata.get("env", f"{prefix}{field.name.upper()}")
        raw = environ.get(variable)
        if raw is None and field.metadata.get("secret") and f"{variable}_FILE" in environ:
            raw = _read_secret_file(f"{variable}_FILE", environ[f"{variable}_FILE"])
        if raw is None:
            missing = dataclasses.MISSING
            if field.name not in values and field.default is missing and field.default_factory is missing:
                raise ConfigError(variable, "is required but not set")
            continue
        values[field.name] = _convert(variable, raw, kind)
    try:
        return cls(**values)
    except BoundError as exc:
        field = next(f for f in dataclasses.fields(cls) if f.name == exc.field)  # type: ignore[arg-type]
        raise ConfigError(field.metadata.get("env", f"{prefix}{exc.field.upper()}"), str(exc)) from None
    except ValueError as exc:  # the cross-field checks of __post_init__
        raise ConfigError(prefix + "*", str(exc)) from None


def redacted(config: Any) -> dict[str, Any]:
    """Returns the config as a dict for logging, with secret fields replaced by '***'."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            out[field.name] = redacted(value)
        elif field.metadata.get("secret"):
            out[field.name] = _REDACTED if value else ""
        elif isinstance(value, str):
            out[field.name] = hide_url_password(value)
        else:
            out[field.name] = str(value) if isinstance(value, Path) else value
    return out


def load_config_or_exit(cls: type[T], environ: Mapping[str, str], prefix: str) -> T:
    """`load_config` for `__main__`: on a bad value prints the problem and exits with status 2."""
    try:
        return load_config(cls, environ, prefix)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
