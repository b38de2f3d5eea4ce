"""The harness's run context: settings, the results document, warm-up + repetitions per point."""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import stats
from bench.backends import Backends
from bench.procs import ProcessSet
from bench.tools import say


@dataclass(frozen=True)
class Settings:
    quick: bool
    warmup_s: float
    rep_s: float
    reps: int
    inference_concurrency: tuple[int, ...]
    features_concurrency: tuple[int, ...]
    features_concurrency_100: tuple[int, ...]
    scaling_concurrency: tuple[int, ...]
    e2e_concurrency: tuple[int, ...]
    log_records: int

    @classmethod
    def make(cls, quick: bool) -> Settings:
        if quick:
            return cls(True, 1.0, 2.0, 1, (1, 32, 128), (1, 32), (1, 8), (32,), (1, 8, 32), 20_000)
        return cls(False, 1.0, 3.0, 3, (1, 8, 32, 128, 256), (1, 8, 32, 128), (1, 8, 32), (8, 32, 128), (1, 8, 32, 128), 50_000)  # fmt: skip


@dataclass
class Suite:
    name: str
    status: str = "not run"
    note: str = ""
    points: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    started: float = 0.0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "note": self.note, "seconds": round(self.seconds, 1),
                "points": self.points, "extra": self.extra}  # fmt: skip


RepFn = Callable[[float, int], dict[str, Any]]  # (duration_s, rep index; -1 = warm-up) -> rep


class Run:
    """One `python -m bench run`: where things go, what was measured, and the processes to stop."""

    def __init__(self, out_dir: Path, settings: Settings) -> None:
        self.out_dir = out_dir
        self.raw_dir = out_dir / "raw"
        self.work_dir = out_dir / "work"
        for d in (self.raw_dir, self.work_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self.procs = ProcessSet(out_dir / "logs")
        self.backends = Backends(self.work_dir / "stack", self.procs)
        self.suites: dict[str, Suite] = {}
        self.doc: dict[str, Any] = {}

    def suite(self, name: str) -> Suite:
        return self.suites.setdefault(name, Suite(name))

    def measure(
        self,
        suite: Suite,
        *,
        system: str,
        key: str,
        protocol: str,
        tool: str,
        params: dict[str, Any],
        rep: RepFn,
        warmup: bool = True,
        reps: int | None = None,
    ) -> dict[str, Any]:
        """Warm-up (discarded), then `reps` measured runs; the point keeps every rep and their medians."""
        point: dict[str, Any] = {"system": system, "key": key, "protocol": protocol, "tool": tool,
                                 "params": params, "reps": []}  # fmt: skip
        label = f"{suite.name}/{key} {params}"
        point["load_1m"] = round(os.getloadavg()[0], 2)  # how busy the machine was when the point started
        try:
            if warmup and self.settings.warmup_s > 0:
                rep(self.settings.warmup_s, -1)
            for i in range(reps or self.settings.reps):
                point["reps"].append(rep(self.settings.rep_s, i))
            point["median"] = stats.median_of_reps(point["reps"])
            point["spread"] = round(stats.spread(point["reps"]), 4)
            med = point["median"]
            say(f"{label}: {med.get('rps', 0):,.0f} req/s, p50 {med.get('p50_ms', float('nan')):.2f} ms, "
                f"p99 {med.get('p99_ms', float('nan')):.2f} ms, errors {med.get('errors', 0):.0f}")  # fmt: skip
        except Exception as exc:
            point["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            say(f"{label}: FAILED {point['error'][:300]}")
            (self.raw_dir / "failures.log").open("a").write(f"== {label}\n{traceback.format_exc()}\n")
        suite.points.append(point)
        self.save()
        return point

    def save(self) -> None:
        self.doc["suites"] = {name: s.to_json() for name, s in self.suites.items()}
        (self.out_dir / "results.json").write_text(json.dumps(self.doc, indent=1, default=str) + "\n")


def run_suite(run: Run, name: str, body: Callable[[Suite], None]) -> None:
    """Runs a suite body; a failure is recorded (with its reason) and the next suite still runs."""
    suite = run.suite(name)
    suite.started = time.monotonic()
    say(f"=== suite {name}")
    try:
        body(suite)
        if suite.status == "not run":
            suite.status = "ok"
    except Skipped as exc:
        suite.status = "skipped"
        suite.note = str(exc)
        say(f"suite {name} skipped: {exc}")
    except Exception as exc:
        suite.status = "failed"
        suite.note = f"{type(exc).__name__}: {exc}"[:2000]
        say(f"suite {name} FAILED: {suite.note[:500]}")
        (run.raw_dir / "failures.log").open("a").write(f"== suite {name}\n{traceback.format_exc()}\n")
    finally:
        suite.seconds = time.monotonic() - suite.started
        run.save()


class Skipped(Exception):
    """A suite cannot run here (its service has not landed yet); the message says why."""
