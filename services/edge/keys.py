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
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from libs.apikeys import KeyFileError, add_key, hash_key, keys_file_for, load_keys, new_key, write_keys
from libs.platform import PlatformConfigError, load_platform


def main(argv: Sequence[str] | None = None) -> int:
    """The `keys` CLI; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m services.edge.keys", description=__doc__.split("\n")[0])
    parser.add_argument("--platform", type=Path, default=Path("deploy/local/platform.yaml"))
    parser.add_argument("--keys-file", type=Path, help="default: the platform's api_keys_file")
    sub = parser.add_subparsers(dest="command", required=True)
    for command, help_text in (
        ("add", "mint (or register) a key and print it once"),
        ("ensure", "like add, but a key of that name that exists is kept (printed only when minted)"),
    ):
        minting = sub.add_parser(command, help=help_text)
        minting.add_argument("--tenant", required=True)
        minting.add_argument("--name", required=True)
        minting.add_argument(
            "--key-from-env", metavar="VAR", help="register the key in this variable when set"
        )
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
