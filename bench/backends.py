"""Redis, Cassandra and Kafka for the benchmarks: the project's own stack components (stack/), on free
loopback ports, state under the run's folder, pinned to the server CPU, stopped at the end of the run."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from bench.procs import ProcessSet, set_affinity
from stack.cassandra import Cassandra
from stack.component import Component
from stack.config import StackConfig
from stack.kafka import Kafka
from stack.ports import DEFAULT_PORTS, find_free_ports
from stack.progress import Progress
from stack.redis import Redis


class Backends:
    def __init__(self, state_dir: Path, procs: ProcessSet) -> None:
        base = StackConfig.from_env(os.environ)
        ports = find_free_ports(base.host, len(DEFAULT_PORTS))
        self.config = dataclasses.replace(
            base, state_dir=state_dir, ports=dict(zip(DEFAULT_PORTS, ports, strict=True))
        )
        self._running: dict[str, Component] = {}
        procs.on_stop(self.stop_all)

    def get(self, kind: str, cpus: str | None) -> Component:
        """The running component of `kind` (redis, cassandra, kafka), started (and pinned) on first use."""
        if kind in self._running:
            return self._running[kind]
        component: Component = {"redis": Redis, "cassandra": Cassandra, "kafka": Kafka}[kind](self.config)
        record = component.start(Progress(kind))
        set_affinity(record.pid, cpus)
        self._running[kind] = component
        return component

    def redis(self, cpus: str | None) -> Redis:
        component = self.get("redis", cpus)
        assert isinstance(component, Redis)
        return component

    def cassandra(self, cpus: str | None) -> Cassandra:
        component = self.get("cassandra", cpus)
        assert isinstance(component, Cassandra)
        return component

    def kafka(self, cpus: str | None) -> Kafka:
        component = self.get("kafka", cpus)
        assert isinstance(component, Kafka)
        return component

    def pids(self, *kinds: str) -> list[int]:
        out = []
        for kind in kinds:
            component = self._running.get(kind)
            record = component.record() if component else None
            if record is not None:
                out.append(record.pid)
        return out

    def stop(self, kind: str) -> None:
        component = self._running.get(kind)
        if component is not None:
            component.stop()
            self._running.pop(kind, None)

    def stop_all(self) -> None:
        """Stops every component; a failure to stop one does not skip the others (it is raised at the end)."""
        failed: BaseException | None = None
        for kind in list(reversed(list(self._running))):
            try:
                self.stop(kind)
            except BaseException as exc:
                failed = failed or exc
        if failed is not None:
            raise failed
