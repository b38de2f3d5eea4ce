"""API keys: a file of sha256 hashes (never the keys), the lookup, and its live reload.

The file sits next to the platform file (`api_keys_file`) and looks like:

    keys:
      - {name: demo, tenant: demo, sha256: 9f86d0...}

A key is shown once, when it is minted (`python -m services.edge.keys`); afterwards only its hash exists.
Whoever authenticates callers (the edge service behind Envoy's ext_authz, or the gateway itself, as the
platform's `admission.placement` says) reads the file through this module.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from libs.platform import PlatformConfig, file_stamp, load_platform
from libs.schema import problem

log = logging.getLogger(__name__)

# Credentials never travel past whoever checks them.
CREDENTIAL_HEADERS = ("x-api-key", "authorization")

KEY_PREFIX = "ig_"
_HEADER = (
    "# InferGrid API keys: sha256 of each key, never the key. Written by `python -m services.edge.keys`.\n"
)


# The key file: `keys`, a list of {name, tenant, sha256}; other keys of an entry are kept for people.
_KEY_FILE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "keys": {
            "type": ["array", "null"],
            "items": {
                "type": "object",
                "required": ["name", "tenant", "sha256"],
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "tenant": {"type": "string", "minLength": 1},
                    "sha256": {
                        "type": "string",
                        "pattern": "^[0-9a-fA-F]{64}$",
                        "description": "expected 64 hex digits",
                    },
                },
            },
        }
    },
}


class KeyFileError(ValueError):
    """The key file is unreadable or malformed; the message names the entry."""


@dataclass(frozen=True)
class ApiKey:
    """A key's identity: who it belongs to. The key itself is not kept."""

    name: str
    tenant: str
    sha256: str


def hash_key(key: str) -> str:
    """The hex sha256 of a key, as stored in the key file."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random key (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def parse_keys(text: str) -> dict[str, ApiKey]:
    """Parses a key file into {sha256: ApiKey}.

    Raises:
        KeyFileError: invalid YAML or an entry without name/tenant/sha256 (names the entry).
    """
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise KeyFileError(f"not valid YAML: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("keys", []), (list, type(None))):
        raise KeyFileError("expected a mapping with a `keys` list")
    error = problem(raw, _KEY_FILE_SCHEMA, "key file")
    if error:
        raise KeyFileError(error)
    out: dict[str, ApiKey] = {}
    for entry in raw.get("keys") or []:
        digest = entry["sha256"].lower()
        out[digest] = ApiKey(name=entry["name"], tenant=entry["tenant"], sha256=digest)
    return out


def load_keys(path: Path) -> dict[str, ApiKey]:
    """Reads a key file; a missing file is no keys."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {exc.strerror}") from None
    return parse_keys(text)


def write_keys(path: Path, keys: Sequence[ApiKey]) -> None:
    """Writes the key file atomically, readable by its owner only."""
    body: dict[str, Any] = {"keys": [{"name": k.name, "tenant": k.tenant, "sha256": k.sha256} for k in keys]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(_HEADER + yaml.safe_dump(body, sort_keys=False))
    tmp.chmod(0o600)
    tmp.replace(path)


def add_key(path: Path, tenant: str, name: str, key: str) -> ApiKey:
    """Registers `key` under `name` (replacing an older key of that name); returns the entry."""
    entry = ApiKey(name=name, tenant=tenant, sha256=hash_key(key))
    kept = [k for k in load_keys(path).values() if k.name != name and k.sha256 != entry.sha256]
    write_keys(path, [*kept, entry])
    return entry


def keys_file_for(platform_file: Path) -> Path:
    """The key file the platform config names, relative to the platform file."""
    return platform_file.parent / load_platform(platform_file).api_keys_file


def keys_path(platform_file: Path, platform: PlatformConfig, override: str | Path | None = None) -> Path:
    """The key file: `override` when given, else the platform's `api_keys_file` next to the platform file."""
    if override:
        return Path(override)
    return platform_file.parent / platform.api_keys_file


def presented_key(headers: Mapping[str, str]) -> str:
    """The API key from `x-api-key` or `authorization: Bearer <key>` ("" when there is none)."""
    key = headers.get("x-api-key", "").strip()
    if key:
        return key
    scheme, _, token = headers.get("authorization", "").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


async def watch_keys(path: Path, apply: Callable[[Mapping[str, ApiKey]], None], interval: float) -> None:
    """Calls `apply(keys)` whenever the key file changes; a broken file keeps the last good keys."""
    stamp: tuple[int, int] | None = None
    while True:
        current = file_stamp(path)
        if current != stamp:
            stamp = current
            try:
                keys = load_keys(path)
            except KeyFileError as exc:
                log.error("key file %s rejected, keeping the last good keys: %s", path, exc)
            else:
                apply(keys)
                log.info("key file %s loaded: %d key(s)", path, len(keys))
        await asyncio.sleep(interval)
