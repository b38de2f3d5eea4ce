"""External load generators, run pinned to the load-generator CPU and bounded in count and time.

- ghz (gRPC, any method, from the protoset `protos/generate.py` writes): per-request latencies from its
  JSON `details`, so p50/p99/p99.9 are exact;
- wrk (HTTP/JSON) with a Lua script that varies the body and prints exact percentiles in `done()`;
- perf_analyzer (KServe v2 gRPC, Triton's own tool) for the inference cross-check: its CSV report.

Each returns one "rep": a dict with the keys of bench.stats.REP_KEYS.
"""

from __future__ import annotations

import csv
import json
import re
import resource
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import stats
from bench.procs import loadgen_cpus, pinned

PROTOSET = Path(__file__).resolve().parents[1] / "build" / "gen" / "descriptors.pb"
# Hard cap on requests per second of wanted duration: far above what any system here reaches, so time binds.
MAX_RPS_CAP = 40_000


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_measured(
    command: Sequence[str],
    *,
    timeout: float,
    server_cpu: Callable[[], float] | None,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.CompletedProcess[str], float, float, float]:
    """Runs a load generator; returns (result, wall seconds, its CPU seconds, server CPU seconds)."""
    cpu0 = _children_cpu()
    server0 = server_cpu() if server_cpu else 0.0
    t0 = time.monotonic()
    result = subprocess.run(
        list(command), check=False, capture_output=True, text=True, timeout=timeout, env=env
    )
    wall = time.monotonic() - t0
    server1 = server_cpu() if server_cpu else 0.0
    return result, wall, _children_cpu() - cpu0, server1 - server0


@dataclass(frozen=True)
class Ghz:
    binary: str

    def run(
        self,
        *,
        target: str,
        call: str,
        data_file: Path,
        concurrency: int,
        duration_s: float,
        out_json: Path | None,
        connections: int | None = None,
        server_cpu: Callable[[], float] | None = None,
        metadata: dict[str, str] | None = None,
        pin: bool = True,
    ) -> dict[str, Any]:
        """One closed-loop run of `call` at `concurrency` for `duration_s` (and at most a request cap)."""
        conns = connections or max(1, min(concurrency, 8))
        command = [
            self.binary, "--insecure", "--protoset", str(PROTOSET), "--call", call,
            "-B", str(data_file), "-c", str(concurrency), "--connections", str(conns),
            "-n", str(int(MAX_RPS_CAP * duration_s)), "-x", f"{duration_s}s",
            "--cpus", "1" if pin else "2", "--timeout", "20s", "-O", "json", "--count-errors",
            "--duration-stop", "ignore",
        ]  # fmt: skip
        if metadata:
            command += ["-m", json.dumps(metadata)]
        command.append(target)
        result, wall, lg_cpu, srv_cpu = run_measured(
            pinned(command, loadgen_cpus() if pin else None), timeout=duration_s + 60, server_cpu=server_cpu
        )
        if result.returncode != 0 and not result.stdout.strip().startswith("{"):
            raise RuntimeError(f"ghz failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
        report = json.loads(result.stdout)
        if out_json is not None:
            slim = {k: v for k, v in report.items() if k != "details"}
            out_json.write_text(json.dumps(slim, indent=1))
        ok = [d["latency"] / 1e6 for d in report.get("details") or [] if d.get("status") == "OK"]
        errors = sum(1 for d in report.get("details") or [] if d.get("status") != "OK")
        duration = report.get("total", 0) / 1e9 or wall
        rep = stats.summarize(ok, errors=errors, duration_s=duration)
        rep["loadgen_cpu"] = lg_cpu / duration
        rep["server_cpu"] = srv_cpu / duration
        if errors:
            rep["error_kinds"] = report.get("errorDistribution") or {}
        return rep


WRK_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d, ' ..
    '"p50_us": %f, "p90_us": %f, "p99_us": %f, "p999_us": %f, "mean_us": %f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9), latency.mean))
end
"""


@dataclass(frozen=True)
class Wrk:
    binary: str

    def run(
        self,
        *,
        url: str,
        script: Path,
        concurrency: int,
        duration_s: float,
        server_cpu: Callable[[], float] | None = None,
        script_args: Sequence[str] = (),
    ) -> dict[str, Any]:
        """One closed-loop wrk run (1 thread, `concurrency` connections); the script must end with WRK_DONE."""
        command = [self.binary, "-t1", f"-c{concurrency}", f"-d{max(1, round(duration_s))}s", "--timeout", "10s",
                   "-s", str(script), url]  # fmt: skip
        if script_args:
            command += ["--", *script_args]
        result, wall, lg_cpu, srv_cpu = run_measured(
            pinned(command, loadgen_cpus()), timeout=duration_s + 60, server_cpu=server_cpu
        )
        line = next((ln for ln in reversed(result.stdout.splitlines()) if ln.startswith("{")), None)
        if result.returncode != 0 or line is None:
            raise RuntimeError(
                f"wrk failed ({result.returncode}): {result.stdout[-1000:]} {result.stderr[-1000:]}"
            )
        raw = json.loads(line)
        errors = raw["connect"] + raw["read"] + raw["write"] + raw["status"] + raw["timeout"]
        duration = raw["duration_us"] / 1e6 or wall
        ok = max(0, raw["requests"] - raw["status"])
        rep: dict[str, Any] = {
            "requests": float(ok),
            "errors": float(errors),
            "duration_s": duration,
            "rps": ok / duration,
            "p50_ms": raw["p50_us"] / 1000,
            "p90_ms": raw["p90_us"] / 1000,
            "p99_ms": raw["p99_us"] / 1000,
            "p999_ms": raw["p999_us"] / 1000,
            "mean_ms": raw["mean_us"] / 1000,
            "loadgen_cpu": lg_cpu / duration,
            "server_cpu": srv_cpu / duration,
        }
        if errors:
            rep["error_kinds"] = {
                k: raw[k] for k in ("connect", "read", "write", "status", "timeout") if raw[k]
            }
        return rep


def perf_analyzer(
    binary: str,
    env: dict[str, str],
    *,
    url: str,
    model: str,
    version: str,
    concurrency: int,
    interval_ms: int,
    csv_path: Path,
    streaming: bool = False,
    protocol: str = "grpc",
    shared_memory: bool = False,
    server_cpu: Callable[[], float] | None = None,
) -> dict[str, Any]:
    """Triton's perf_analyzer at one concurrency (its own stability loop: up to 5 windows of interval_ms).

    `protocol` "http" drives the KServe v2 REST API; `shared_memory` passes tensors through system shared
    memory (`--shared-memory system`) instead of the request body.
    """
    command = [binary, "-m", model, "-x", version, "-u", url, "-i", protocol, "-b", "1",
               "--concurrency-range", f"{concurrency}:{concurrency}", "-p", str(interval_ms), "-r", "10",
               "-s", "1000", "--percentile", "99", "-f", str(csv_path)]  # fmt: skip
    if shared_memory:
        command += ["--shared-memory", "system", "--output-shared-memory-size", "64"]
    if streaming:
        command.append("--streaming")
    else:
        command.append("--async")
    result, wall, lg_cpu, srv_cpu = run_measured(
        pinned(command, loadgen_cpus()), timeout=interval_ms / 1000 * 12 + 30, server_cpu=server_cpu, env=env
    )
    if result.returncode != 0 or not csv_path.exists():
        raise RuntimeError(
            f"perf_analyzer failed ({result.returncode}): {result.stdout[-1500:]} {result.stderr[-800:]}"
        )
    with csv_path.open() as f:
        row = next(csv.DictReader(f))
    return {
        "rps": float(row["Inferences/Second"]),
        "p50_ms": float(row["p50 latency"]) / 1000,
        "p90_ms": float(row["p90 latency"]) / 1000,
        "p99_ms": float(row["p99 latency"]) / 1000,
        "mean_ms": float(row.get("Avg latency", "nan")) / 1000,
        "errors": 0.0,
        "loadgen_cpu": lg_cpu / wall,
        "server_cpu": srv_cpu / wall,
        "duration_s": wall,
    }


def grpc_frame(message: bytes) -> bytes:
    """One gRPC length-prefixed message (uncompressed): what h2load sends as the request body."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


@dataclass(frozen=True)
class H2load:
    """h2load (nghttp2, C) driving a gRPC method with a hand-framed body: ~20-35 µs CPU per request, against
    ~120-140 µs for ghz, which on one core cannot drive a 6k req/s server (measured on this machine)."""

    binary: str

    def run(
        self,
        *,
        url: str,
        body_file: Path,
        concurrency: int,
        duration_s: float,
        response_frame_bytes: int,
        log_file: Path,
        server_cpu: Callable[[], float] | None = None,
        pin: bool = True,
        connections: int | None = None,
        extra_headers: Sequence[str] = (),
    ) -> dict[str, Any]:
        """One closed-loop run: `concurrency` streams over min(concurrency, 8) connections.

        gRPC errors come back as HTTP 200 with the status in trailers, which h2load does not read: a failed
        call is a trailers-only answer without DATA, so errors = responses - DATA bytes / response size.
        """
        conns = connections or max(1, min(concurrency, 8))
        streams = max(1, concurrency // conns)
        log_file.unlink(missing_ok=True)
        command = [self.binary, "-t1", f"-c{conns}", f"-m{streams}", "-D", str(max(1, round(duration_s))),
                   "-d", str(body_file), "-H", "content-type: application/grpc", "-H", "te: trailers",
                   "--log-file", str(log_file), url]  # fmt: skip
        for header in extra_headers:
            command[-1:-1] = ["-H", header]
        result, wall, lg_cpu, srv_cpu = run_measured(
            pinned(command, loadgen_cpus() if pin else None), timeout=duration_s + 60, server_cpu=server_cpu
        )
        text = result.stdout
        done = re.search(
            r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout",
            text,
        )
        data = re.search(r"traffic: .*?\((\d+)\) data", text)
        if result.returncode != 0 or done is None or data is None:
            raise RuntimeError(f"h2load failed ({result.returncode}): {text[-1500:]} {result.stderr[-800:]}")
        succeeded = int(done.group(2))
        http_errors = int(done.group(3)) + int(done.group(4)) + int(done.group(5))
        answered = round(int(data.group(1)) / response_frame_bytes) if response_frame_bytes else succeeded
        grpc_errors = max(0, succeeded - answered)
        latencies: list[float] = []
        with log_file.open() as f:
            for line in f:
                parts = line.split("\t")
                if len(parts) >= 3 and parts[1] == "200":
                    latencies.append(int(parts[2]) / 1000.0)
        log_file.unlink(missing_ok=True)
        duration = float(max(1, round(duration_s)))
        rep = stats.summarize(latencies, errors=http_errors + grpc_errors, duration_s=duration)
        if grpc_errors:  # the failed calls are among the latencies; remove their share from the throughput
            rep["rps"] = max(0.0, (len(latencies) - grpc_errors) / duration)
            rep["error_kinds"] = {"grpc (no DATA)": grpc_errors}
        if http_errors:
            rep.setdefault("error_kinds", {})["http"] = http_errors
        rep["loadgen_cpu"] = lg_cpu / duration
        rep["server_cpu"] = srv_cpu / duration
        del wall
        return rep

    def response_bytes(self, *, url: str, body_file: Path, extra_headers: Sequence[str] = ()) -> int:
        """DATA bytes of one answer to `body_file` (the successful response's frame size, checked by the caller)."""
        command = [self.binary, "-n1", "-c1", "-d", str(body_file), "-H", "content-type: application/grpc",
                   "-H", "te: trailers", url]  # fmt: skip
        for header in extra_headers:
            command[-1:-1] = ["-H", header]
        result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
        data = re.search(r"traffic: .*?\((\d+)\) data", result.stdout)
        if result.returncode != 0 or data is None or int(data.group(1)) == 0:
            raise RuntimeError(f"h2load probe of {url} failed: {result.stdout[-1000:]}")
        return int(data.group(1))
