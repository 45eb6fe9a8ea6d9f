"""bench/run: every workload with its baselines in one invocation on this machine, a JSON
result per workload, then docs/benchmarks.md's generated section and its plots.

  bench/run [--short|--full] [--only W,...] [--results DIR] [--docs|--no-docs]
  bench/run report DIR        regenerate the report from a results directory
"""

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import report
import workloads
from common import REPO, Broker, build, log, write_json


def git(*args):
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()


def machine(mode):
    meminfo = Path("/proc/meminfo").read_text().split("\n")[0].split()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "mode": mode,
        "cores": os.cpu_count(),
        "memory_gib": round(int(meminfo[1]) / 2**20, 1),
        "kernel": platform.release(),
        "load_average_at_start": os.getloadavg(),
        "commit": git("rev-parse", "--short", "HEAD") + (" (uncommitted changes)"
                                                           if git("status", "--porcelain") else ""),
        "broker": Broker.engine + " on loopback, one KRaft node (docs/broker.md)",
    }


class Ctx:
    def __init__(self, mode, bins, work):
        self.mode, self.sizes, self.bins, self.work = mode, workloads.SIZES[mode], bins, work
        self.sieve = bins / "sieve"


def run(args):
    mode = "full" if args.full else "short"
    names = args.only.split(",") if args.only else list(workloads.WORKLOADS)
    unknown = set(names) - set(workloads.WORKLOADS)
    if unknown:
        sys.exit(f"bench: unknown workloads {sorted(unknown)}; known: {list(workloads.WORKLOADS)}")
    day = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    results = Path(args.results or REPO / "bench/results" / f"{day}-{mode}")
    write_json(results / "machine.json", machine(mode))
    bins = build()
    failed = []
    with tempfile.TemporaryDirectory(prefix="sieve-bench-") as work:
        ctx = Ctx(mode, bins, Path(work))
        for name in names:
            log(f"== {name} ({mode})")
            started = time.monotonic()
            try:
                doc = workloads.WORKLOADS[name](ctx)
            except Exception as e:  # a failed workload is reported, the others still run
                traceback.print_exc()
                doc = {"error": f"{type(e).__name__}: {e}"}
                failed.append(name)
            doc["wall_seconds"] = round(time.monotonic() - started, 1)
            write_json(results / f"{name}.json", doc)
            log(f"== {name}: {doc['wall_seconds']} s{' FAILED' if name in failed else ''}")
    docs = args.docs if args.docs is not None else mode == "full"
    write_report(results, docs)
    if failed:
        sys.exit(f"bench: failed workloads: {', '.join(failed)} (see {results})")


def write_report(results, docs):
    """The report goes to docs/ for full runs (or --docs), else beside the results."""
    if docs:
        report.write(results, REPO / "docs/benchmarks.md", REPO / "docs/bench")
        log("wrote docs/benchmarks.md and docs/bench/*.png")
    else:
        report.write(results, results / "benchmarks.md", results)
        log(f"wrote {results}/benchmarks.md and its plots")


def main():
    # A timeout's SIGTERM unwinds like an exception, so brokers and services get stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench: terminated"))
    if sys.argv[1:2] == ["report"]:
        ap = argparse.ArgumentParser(prog="bench/run report")
        ap.add_argument("results")
        ap.add_argument("--docs", action=argparse.BooleanOptionalAction, default=True)
        args = ap.parse_args(sys.argv[2:])
        write_report(Path(args.results).resolve(), args.docs)
        return
    ap = argparse.ArgumentParser(prog="bench/run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--short", action="store_true", help="tiny sizes (the default; CI)")
    size.add_argument("--full", action="store_true", help="the issue's sizes (hours)")
    ap.add_argument("--only", help=f"comma-separated subset of {','.join(workloads.WORKLOADS)}")
    ap.add_argument("--results", help="directory for the JSON results")
    ap.add_argument("--docs", action=argparse.BooleanOptionalAction, default=None,
                    help="write docs/benchmarks.md and docs/bench/ (default: only --full)")
    run(ap.parse_args())


if __name__ == "__main__":
    main()
