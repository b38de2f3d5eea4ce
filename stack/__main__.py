"""CLI: `python -m stack [--profile single|cluster] up|down|status|logs|clean-state|install [components...]`.

`supervise` runs the cluster profile's supervisor in the foreground (the `supervisor` component does).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from stack.config import PROFILE_VARIABLE, PROFILES, StackConfig
from stack.errors import StackError
from stack.lifecycle import clean_state, down, format_status, status, up
from stack.logs import follow, tail_lines
from stack.progress import Progress
from stack.registry import COMPONENTS, select


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m stack",
        description="The InferGrid local stack on loopback: Redis, Cassandra, Kafka, Jaeger, the services, Envoy.",
        epilog="Components: " + ", ".join(COMPONENTS) + " (all when none is named). Environment: "
        "INFERGRID_STATE_DIR, INFERGRID_CACHE_DIR, INFERGRID_JAVA_HOME, INFERGRID_<PORT NAME>_PORT.",
    )
    parser.add_argument(
        "--profile",
        choices=PROFILES,
        default=None,
        help=f"single (default) or cluster (state in .state/cluster); also {PROFILE_VARIABLE}",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("up", "install what is missing, start, wait until ready"),
        ("down", "stop (TERM, then KILL after a timeout)"),
        ("status", "one table: component, pid, port, health, uptime"),
        ("logs", "print the end of the log files"),
        ("clean-state", "stop and delete data and logs"),
        ("install", "install only (jars, binaries, packages) into the cache"),
    ):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("components", nargs="*", metavar="component")
        if name == "logs":
            sub.add_argument("-n", "--lines", type=int, default=40, help="lines per log (default 40)")
            sub.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    commands.add_parser("supervise", help="cluster profile: restart dead replicas, write discovery files")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        config = StackConfig.from_env(os.environ, profile=args.profile)
        if args.command == "supervise":
            if not config.is_cluster:
                raise StackError("supervise runs in the cluster profile only (--profile cluster)")
            from stack.supervisor import Supervisor

            Supervisor(config).run()
        elif args.command == "up":
            up(config, args.components, sys.stdout)
        elif args.command == "down":
            down(config, args.components, sys.stdout)
        elif args.command == "status":
            print(format_status(status(config, args.components)))
        elif args.command == "logs":
            paths = [component.log_path for component in select(config, args.components)]
            for path in paths:
                print(f"==> {path} <==\n{tail_lines(path, args.lines)}\n", flush=True)
            if args.follow:
                follow(paths)
        elif args.command == "clean-state":
            clean_state(config, args.components, sys.stdout)
        elif args.command == "install":
            for component in select(config, args.components):
                component.ensure_installed(Progress(component.name, sys.stdout))
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
