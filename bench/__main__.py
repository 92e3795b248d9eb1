"""`python -m bench [--quick] [--only b1,o1] [--peers] [--json PATH]`: see bench/__init__.py."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import uvloop

from bench.measure import DEFAULT_PLAN, QUICK_PLAN
from bench.report import render, to_json
from bench.runner import run
from bench.scenarios import SCENARIOS, select


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure gpuproxy's command path against baselines measured in the same run.",
        epilog="scenarios: "
        + "; ".join(
            f"{s.name} = {s.title}{' (on request)' if s.on_request else ''}" for s in SCENARIOS
        )
        + ". Exit status 1 when a scenario fails (a wrong answer or a timeout); a missed "
        "target alone is not a failure.",
    )
    parser.add_argument("--quick", action="store_true", help="few calls: a smoke test for CI")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    parser.add_argument("--only", metavar="NAME[,NAME]", help="run only these scenarios")
    parser.add_argument(
        "--peers",
        action="store_true",
        help="also run the LiteLLM proxy on the same load (installed once from PyPI into "
        "~/.cache/gpuproxy-bench, which takes minutes), and I0 and I1 beside it",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines, the report only")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        scenarios = select(args.only, peers=args.peers)
    except ValueError as exc:
        print(f"bench: --only: {exc}", file=sys.stderr)
        return 2
    plan = QUICK_PLAN if args.quick else DEFAULT_PLAN
    mode = "quick" if args.quick else "default"
    try:
        report = uvloop.run(run(scenarios, plan, mode=mode, progress=not args.quiet))
    except KeyboardInterrupt:
        print("bench: interrupted; every server and child process was stopped", file=sys.stderr)
        return 130
    except asyncio.CancelledError:
        # SIGTERM: the runner cancelled itself and has stopped everything it started.
        print("bench: terminated; every server and child process was stopped", file=sys.stderr)
        return 143
    print(render(report), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(to_json(report), indent=2) + "\n")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
