"""Peers: Ray Serve and BentoML doing what LitServe does in the e2e suite — one Redis MGET per batch (32 float32
features of an entity at `bench:feat:<id>`) and the demo fraud model in ONNX Runtime — over HTTP/JSON, no Envoy.

Set up as peers.md recorded them (one core: the servers and Redis pinned to CPU 0, wrk to CPU 1):
- Ray Serve 2.60.0 (`bench/servers/ray_server.py`): defaults, through the Serve proxy (key `ray-redis`); and
  RAY_SERVE_THROUGHPUT_OPTIMIZED=1 measured on the replica's own direct-ingress HTTP port (`ray-direct-redis`).
  Proxy and replica bind 127.0.0.1 only; Ray's temp dir and HOME (where it writes its auth token) are under the
  run's work dir; every process Ray started is stopped at the end (and checked for).
- BentoML 1.4.40 (`bench/servers/bento_service.py`, `bentoml serve`, adaptive batching), BENTOML_HOME under the
  work dir, tracking off (`bentoml-redis`).
Each answer is checked against ONNX Runtime before and after the load; a peer that fails is recorded in the
suite's extra and the others still run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from bench.core import Run, Suite
from bench.loadgen import WRK_DONE, Wrk
from bench.procs import Server, free_port, repo_env, server_cpus, set_affinity
from bench.suites import inference as inference_suite
from bench.suites.e2e import write_entity_table
from bench.tools import ensure_debian, ensure_venv, say

SERVERS = Path(__file__).resolve().parents[1] / "servers"
CHECK_IDS = (4242, 0, 9999)
RAY_SOCKET_SLACK = 64  # Ray's longest AF_UNIX path is <temp dir>/session_<stamp>_<pid>/sockets/plasma_store

WRK_ENTITY = """
math.randomseed(5)
function request()
  return wrk.format("POST", "/predict", {["Content-Type"] = "application/json"},
                    string.format('{"entity_id": %d}', math.random(0, 9999)))
end
"""

# BentoML's batchable api takes a batch in every request: {"entity_id": [id]}.
WRK_BENTO = """
math.randomseed(5)
function request()
  return wrk.format("POST", "/predict", {["Content-Type"] = "application/json"},
                    string.format('{"entity_id": [%d]}', math.random(0, 9999)))
end
"""


# -- processes -------------------------------------------------------------------------------------------------


def _start_time(pid: int) -> float | None:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).create_time()
    return None


def _pgid(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        return os.getpgid(pid)
    return None


def process_tree(pid: int) -> dict[int, float]:
    """`pid` and its live descendants (also those in other sessions: Ray's actors, BentoML's workers) -> start time."""
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        return {
            p.pid: t for p in [root, *root.children(recursive=True)] if (t := _start_time(p.pid)) is not None
        }
    return {}


def _using(path: str) -> dict[int, float]:
    """Live processes whose command line names `path` (Ray's daemons carry their session dir)."""
    return {
        p.pid: p.info["create_time"]
        for p in psutil.process_iter(["cmdline", "create_time"])
        if p.pid != os.getpid() and path in " ".join(p.info["cmdline"] or ())
    }


def _alive(procs: dict[int, float]) -> dict[int, float]:
    """The ones still running (same pid and start time; zombies count as gone)."""
    out = {}
    for pid, started in procs.items():
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            if p.create_time() == started and p.status() != psutil.STATUS_ZOMBIE:
                out[pid] = started
    return out


class Peer:
    """A peer's server and every process it spawned; `stop()` ends them all (graceful first) and reports leftovers."""

    def __init__(self, run: Run, server: Server, marker: str | None = None) -> None:
        self.run, self.server, self.marker = run, server, marker
        self.known: dict[int, float] = {}
        self.stopped = False
        run.procs.on_stop(self.cleanup)  # also on errors and interruptions

    def snapshot(self) -> None:
        """Remembers every process of the peer; those outside the leader's group count in its CPU as extra pids."""
        self.known.update(process_tree(self.server.pid))
        if self.marker:
            self.known.update(_using(self.marker))
        others = {p for p in _alive(self.known) if _pgid(p) not in (None, self.server.pid)}
        self.server.extra_pids = sorted(set(self.server.extra_pids) | others)

    def cpu_seconds(self) -> float:
        return self.server.cpu_seconds()

    def cleanup(self) -> None:
        self.stop()

    def stop(self, grace_s: float = 30.0) -> list[str]:
        """SIGTERM to the leader and a wait (Ray/BentoML shut down their own), then the group, then any survivor."""
        if self.stopped:
            return []
        self.stopped = True
        self.snapshot()
        if self.server.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.server.pid, signal.SIGTERM)
            with contextlib.suppress(Exception):
                self.server.proc.wait(timeout=grace_s)
        self.run.procs.stop(self.server)
        if self.marker:
            self.known.update(_using(self.marker))
        deadline = time.monotonic() + 10
        while (left := _alive(self.known)) and time.monotonic() < deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        out = []
        for pid in _alive(self.known):
            with contextlib.suppress(psutil.Error):
                out.append(f"{pid} {' '.join(psutil.Process(pid).cmdline())[:120]!r}")
        return out


# -- checks ----------------------------------------------------------------------------------------------------


def post_json(port: int, body: Any, timeout: float = 10.0) -> Any:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/predict", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def check_answers(name: str, ask: Callable[[int], float], repo: Path, table: Any) -> str:
    """The peer's answer for a few entities equals ONNX Runtime's on the same stored features."""
    expected = inference_suite.reference_outputs(repo, table[list(CHECK_IDS)])
    worst = 0.0
    for entity, want in zip(CHECK_IDS, expected, strict=True):
        got = ask(entity)
        worst = max(worst, abs(got - float(want)))
        if abs(got - float(want)) > 1e-5:
            raise RuntimeError(f"{name} answered {got} for entity {entity}, ONNX Runtime {float(want)}")
    return f"ids {list(CHECK_IDS)}: max |diff| {worst:.1e}"


def wait_answer(peer: Peer, ask: Callable[[], Any], name: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            ask()
            return
        except (OSError, ValueError, KeyError):
            if not peer.server.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not answer:\n{peer.server.log_tail()}") from None
            time.sleep(1)


def measure_wrk(run: Run, suite: Suite, *, wrk: Wrk, port: int, script: Path, peer: Peer, system: str,
                key: str) -> None:  # fmt: skip
    for c in run.settings.e2e_concurrency:

        def rep(duration: float, i: int, c: int = c) -> dict[str, Any]:
            return wrk.run(url=f"http://127.0.0.1:{port}", script=script, concurrency=c, duration_s=duration,
                           server_cpu=peer.cpu_seconds)  # fmt: skip

        run.measure(suite, system=system, key=key, protocol="HTTP/JSON", tool="wrk", params={"concurrency": c},
                    rep=rep)  # fmt: skip


# -- Ray Serve -------------------------------------------------------------------------------------------------


def ray_temp_dir(work: Path, name: str) -> tuple[Path, Path | None]:
    """Ray's temp dir: under the work dir, or a short one in /tmp (moved there at the end) when the work dir's path
    would make Ray's socket paths longer than AF_UNIX allows."""
    target = work / name
    if len(str(target)) + RAY_SOCKET_SLACK <= 107:
        return target, None
    return Path(tempfile.mkdtemp(prefix="ig-ray-")), target


def ray_serve(run: Run, suite: Suite, *, wrk: Wrk, redis_url: str, repo: Path, table: Any, redis_pids: list[int],
              direct: bool) -> None:  # fmt: skip
    venv = ensure_venv("ray")
    work = run.work_dir / "peers"
    name = "ray-direct" if direct else "ray"
    label = name.replace("-", "_")  # its entries in the suite's extra, like ray_direct_error
    temp, move_to = ray_temp_dir(work, f"{name}-tmp")
    home = work / f"{name}-home"  # Ray writes its auth token to $HOME/.ray
    home.mkdir(parents=True, exist_ok=True)
    ray_home_before = (Path.home() / ".ray").exists()
    port = free_port()
    direct_lo = free_port()
    direct_hi = min(direct_lo + 50, 65535)
    ready = work / f"{name}.ready.json"
    ready.unlink(missing_ok=True)
    env = {**repo_env(), "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("PYTHONPATH", None)
    command = [str(venv / "bin" / "python"), str(SERVERS / "ray_server.py"), "--onnx",
               str(repo / "fraud" / "1" / "model.onnx"), "--port", str(port), "--redis-url", redis_url,
               "--temp-dir", str(temp), "--ready-file", str(ready)]  # fmt: skip
    if direct:
        env.update({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
                    "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(direct_lo),
                    "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(direct_hi)})  # fmt: skip
        command += ["--direct-ports", f"{direct_lo}-{direct_hi}"]
    server = run.procs.start(name, command, env=env, cpus=server_cpus())
    server.extra_pids = list(redis_pids)
    peer = Peer(run, server, marker=str(temp))
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():
            if not server.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"Ray Serve did not start:\n{server.log_tail()}")
            peer.snapshot()  # Ray's actors leave the group: know them even if the start is cut short
            time.sleep(1)
        ports = json.loads(ready.read_text())
        target = int(ports["direct_port"] if direct else ports["proxy_port"])
        if direct and not ports.get("direct_port"):
            raise RuntimeError(f"no direct-ingress port answered in {direct_lo}-{direct_hi}")
        peer.snapshot()
        suite.extra[f"{label}_processes"] = len(peer.known)

        def ask(entity: int, port: int = target) -> float:
            return float(post_json(port, {"entity_id": entity})["fraud_probability"])

        wait_answer(peer, lambda: ask(4242), "Ray Serve")
        suite.extra[f"{label}_check"] = check_answers("Ray Serve", ask, repo, table)
        if direct:  # the proxy still answers the same
            check_answers("Ray Serve (proxy)", lambda e: ask(e, port), repo, table)
        lua = work / "entity.lua"
        lua.write_text(WRK_ENTITY + WRK_DONE)
        if direct:
            system = ("Ray Serve 2.60, RAY_SERVE_THROUGHPUT_OPTIMIZED=1, replica's direct ingress: Redis MGET + model, "
                      "@serve.batch (HTTP/JSON, no Envoy)")  # fmt: skip
        else:
            system = "Ray Serve 2.60 via its proxy: Redis MGET + model, @serve.batch (HTTP/JSON, no Envoy)"
        measure_wrk(run, suite, wrk=wrk, port=target, script=lua, peer=peer, system=system,
                    key="ray-direct-redis" if direct else "ray-redis")  # fmt: skip
        suite.extra[f"{label}_check_after"] = check_answers("Ray Serve", ask, repo, table)
    finally:
        left = peer.stop()
        if left:
            suite.extra[f"{label}_leftover_processes"] = left
            say(f"Ray processes left after stopping: {left}")
        if move_to is not None:  # keep Ray's logs with the run (not its sockets), drop the short dir
            with contextlib.suppress(OSError):
                shutil.copytree(temp, move_to, symlinks=True, ignore=shutil.ignore_patterns("sockets"),
                                dirs_exist_ok=True)  # fmt: skip
            shutil.rmtree(temp, ignore_errors=True)
        if not ray_home_before:  # an older Ray writing to the real $HOME despite ours: don't leave its token
            shutil.rmtree(Path.home() / ".ray", ignore_errors=True)


# -- BentoML ---------------------------------------------------------------------------------------------------


def bentoml_serve(run: Run, suite: Suite, *, wrk: Wrk, redis_url: str, repo: Path, table: Any,
                  redis_pids: list[int]) -> None:  # fmt: skip
    venv = ensure_venv("bentoml")
    work = run.work_dir / "peers"
    home = work / "bentoml-home"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**repo_env(), "HOME": str(home), "BENTOML_HOME": str(home / "bentoml"), "BENTOML_DO_NOT_TRACK": "true",
           "BENCH_ONNX": str(repo / "fraud" / "1" / "model.onnx"), "BENCH_REDIS_URL": redis_url}  # fmt: skip
    env.pop("PYTHONPATH", None)
    server = run.procs.start("bentoml", [str(venv / "bin" / "bentoml"), "serve", "bento_service:Fraud",
                                         "--working-dir", str(SERVERS), "--host", "127.0.0.1", "--port", str(port)],
                             env=env, cwd=SERVERS, cpus=server_cpus())  # fmt: skip
    server.extra_pids = list(redis_pids)
    peer = Peer(run, server)
    try:

        def ask(entity: int) -> float:
            return float(post_json(port, {"entity_id": [entity]})[0]["fraud_probability"])

        wait_answer(peer, lambda: ask(4242), "BentoML")
        peer.snapshot()
        suite.extra["bentoml_processes"] = len(peer.known)
        suite.extra["bentoml_check"] = check_answers("BentoML", ask, repo, table)
        lua = work / "bento.lua"
        lua.write_text(WRK_BENTO + WRK_DONE)
        measure_wrk(run, suite, wrk=wrk, port=port, script=lua, peer=peer,
                    system="BentoML 1.4.40: Redis MGET + model, adaptive batching (HTTP/JSON, no Envoy)",
                    key="bentoml-redis")  # fmt: skip
        suite.extra["bentoml_check_after"] = check_answers("BentoML", ask, repo, table)
    finally:
        left = peer.stop()
        if left:
            suite.extra["bentoml_leftover_processes"] = left
            say(f"BentoML processes left after stopping: {left}")


# -- the suite -------------------------------------------------------------------------------------------------


def body(run: Run, suite: Suite) -> None:
    cpus = server_cpus()
    (run.work_dir / "peers").mkdir(exist_ok=True)
    wrk = Wrk(ensure_debian("wrk", "wrk"))
    redis = run.backends.redis(cpus)
    redis_pids = run.backends.pids("redis")
    for pid in redis_pids:
        set_affinity(pid, cpus)
    repo, _ = inference_suite.prepare_repositories(run)
    table = write_entity_table(redis.url)
    peers: list[tuple[str, Callable[[], None]]] = [
        ("ray", lambda: ray_serve(run, suite, wrk=wrk, redis_url=redis.url, repo=repo, table=table,
                                  redis_pids=redis_pids, direct=False)),
        ("ray_direct", lambda: ray_serve(run, suite, wrk=wrk, redis_url=redis.url, repo=repo, table=table,
                                         redis_pids=redis_pids, direct=True)),
        ("bentoml", lambda: bentoml_serve(run, suite, wrk=wrk, redis_url=redis.url, repo=repo, table=table,
                                          redis_pids=redis_pids)),
    ]  # fmt: skip
    for name, measure in peers:
        say(f"peer {name}")
        try:
            measure()
        except Exception as exc:  # one peer failing never stops the others
            suite.extra[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:1500]
            say(f"{name} failed: {suite.extra[f'{name}_error'][:300]}")
    say("peers done")
