"""API keys: a file of sha256 hashes (never the keys), a lookup, and the CLI that mints keys.

The file sits next to the platform file (`api_keys_file`) and looks like:

    keys:
      - {name: demo, tenant: demo, sha256: 9f86d0...}

A key is shown once, when it is minted; afterwards only its hash exists.

    python -m services.edge.keys add --tenant demo --name demo [--key-from-env INFERGRID_DEMO_API_KEY]
    python -m services.edge.keys ensure --tenant demo --name demo --key-from-env INFERGRID_DEMO_API_KEY
    python -m services.edge.keys list
    python -m services.edge.keys remove --name demo
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from libs.platform import PlatformConfigError, load_platform

KEY_PREFIX = "ig_"
_HEADER = (
    "# InferGrid API keys: sha256 of each key, never the key. Written by `python -m services.edge.keys`.\n"
)


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
    if not isinstance(raw, dict) or not isinstance(raw.get("keys", []), list):
        raise KeyFileError("expected a mapping with a `keys` list")
    out: dict[str, ApiKey] = {}
    for i, entry in enumerate(raw.get("keys") or []):
        if not isinstance(entry, dict):
            raise KeyFileError(f"keys[{i}]: expected a mapping")
        values = {f: entry.get(f) for f in ("name", "tenant", "sha256")}
        for name, value in values.items():
            if not isinstance(value, str) or not value:
                raise KeyFileError(f"keys[{i}].{name}: required string")
        digest = str(values["sha256"]).lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise KeyFileError(f"keys[{i}].sha256: expected 64 hex digits")
        out[digest] = ApiKey(name=str(values["name"]), tenant=str(values["tenant"]), sha256=digest)
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


def main(argv: Sequence[str] | None = None) -> int:
    """The `keys` CLI; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m services.edge.keys", description=__doc__.split("\n")[0])
    parser.add_argument("--platform", type=Path, default=Path("deploy/local/platform.yaml"))
    parser.add_argument("--keys-file", type=Path, help="default: the platform's api_keys_file")
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="mint (or register) a key and print it once")
    add.add_argument("--tenant", required=True)
    add.add_argument("--name", required=True)
    add.add_argument("--key-from-env", metavar="VAR", help="register the key in this variable when it is set")
    ensure = sub.add_parser(
        "ensure", help="like add, but a key of that name that exists is kept (printed only when minted)"
    )
    ensure.add_argument("--tenant", required=True)
    ensure.add_argument("--name", required=True)
    ensure.add_argument("--key-from-env", metavar="VAR")
    sub.add_parser("list", help="names, tenants and hash prefixes")
    remove = sub.add_parser("remove", help="revoke a key by name")
    remove.add_argument("--name", required=True)
    args = parser.parse_args(argv)
    try:
        path = args.keys_file or keys_file_for(args.platform)
        if args.command == "ensure":
            supplied = os.environ.get(args.key_from_env, "") if args.key_from_env else ""
            existing = {k.name: k for k in load_keys(path).values()}
            if supplied:
                if existing.get(args.name) is None or existing[args.name].sha256 != hash_key(supplied):
                    add_key(path, args.tenant, args.name, supplied)
                print(f"key {args.name!r} (tenant {args.tenant}) is the one in ${args.key_from_env}")
            elif args.name in existing:
                print(
                    f"key {args.name!r} (tenant {existing[args.name].tenant}) exists; only its hash is kept"
                )
            else:
                key = new_key()
                add_key(path, args.tenant, args.name, key)
                print(f"new API key {args.name!r} for tenant {args.tenant} (shown once): {key}")
        elif args.command == "add":
            platform = load_platform(args.platform)
            if args.tenant not in platform.tenants:
                print(f"warning: tenant {args.tenant!r} is not in {args.platform}", file=sys.stderr)
            supplied = os.environ.get(args.key_from_env, "") if args.key_from_env else ""
            key = supplied or new_key()
            add_key(path, args.tenant, args.name, key)
            if supplied:
                print(f"registered the key from ${args.key_from_env} as {args.name!r} (tenant {args.tenant})")
            else:
                print(key)
                print(
                    f"(key {args.name!r} for tenant {args.tenant}; shown once, only its hash is kept)",
                    file=sys.stderr,
                )
        elif args.command == "list":
            for k in load_keys(path).values():
                print(f"{k.name}\ttenant={k.tenant}\tsha256={k.sha256[:12]}…")
        else:
            keys = list(load_keys(path).values())
            left = [k for k in keys if k.name != args.name]
            if len(left) == len(keys):
                print(f"no key named {args.name!r}", file=sys.stderr)
                return 1
            write_keys(path, left)
    except (KeyFileError, PlatformConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
