"""The cluster a chaos run uses: the running cluster profile (left running), or one it starts and stops.

A run calls as the demo tenant with an API key of its own, registered in the cluster's key file (the
gateway and the edge follow that file live), so it never needs the demo key `make up` printed once.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
from collections.abc import Callable, Iterator, Mapping

from chaos.cluster import ClusterHandle
from libs.apikeys import add_key
from stack import cluster
from stack.config import StackConfig
from stack.errors import StackError
from stack.lifecycle import down, up
from stack.services import DEMO_KEY_VARIABLE, keys_file

TENANT = "demo"


def handle(config: StackConfig) -> ClusterHandle:
    """The chaos handle on the cluster that `config` describes."""
    return ClusterHandle(config, cluster.components(config))


def register_key(config: StackConfig, name: str = "chaos") -> str:
    """Mints an API key of the demo tenant into the cluster's key file; returns it (never printed)."""
    key = f"ig_chaos_{secrets.token_urlsafe(24)}"
    add_key(keys_file(config), TENANT, name, key)
    return key


@contextlib.contextmanager
def cluster_session(
    env: Mapping[str, str], say: Callable[[str], None]
) -> Iterator[tuple[ClusterHandle, str]]:
    """Yields the cluster and an API key; starts the cluster profile (and stops it after) unless it runs."""
    config = cluster.cluster_config(env)
    running = cluster.components(config)[cluster.SUPERVISOR].record() is not None
    if running:
        say(f"using the running cluster in {config.state_dir}")
        key = register_key(config)
        yield handle(config), key
        return
    say("starting the cluster profile (make up PROFILE=cluster), stopped again at the end")
    key = f"ig_chaos_{secrets.token_urlsafe(24)}"
    previous = os.environ.get(DEMO_KEY_VARIABLE)
    os.environ[DEMO_KEY_VARIABLE] = key  # the edge's start registers it as the demo tenant's key
    try:
        up(config, [], sys.stdout)
        yield handle(config), key
    except StackError:
        raise
    finally:
        if previous is None:
            os.environ.pop(DEMO_KEY_VARIABLE, None)
        else:
            os.environ[DEMO_KEY_VARIABLE] = previous
        down(config, [], sys.stdout)
