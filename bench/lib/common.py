"""Shared pieces of the benchmark runner: paths, child processes with their peak RSS, a local
broker per workload, and the markdown tables the older shell benchmarks print."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache/sieve/target"))

# Workload 6's bounded series: budgets the inputs outgrow from the smallest size on.
BOUNDED_FILES = "sieve antijoin files, 4 MiB budget"
BOUNDED_DEDUP_MB = 16
BOUNDED_DEDUP = f"sieve dedup, {BOUNDED_DEDUP_MB} MiB state memory (process)"


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def build():
    """Builds the binaries the workloads run and copies them aside, so a rebuild during a long
    run cannot replace them under a running workload."""
    log("building sieve and sieve-bench-core (dev profile, the hot crates at opt-level 3)")
    subprocess.run(["cargo", "build", "-q", "-p", "sieve", "--bin", "sieve",
                    "-p", "sieve-tests", "--bin", "sieve-bench-core"], cwd=REPO, check=True)
    bins = Path(tempfile.mkdtemp(prefix="sieve-bench-bin-"))
    for name in ("sieve", "sieve-bench-core"):
        shutil.copy2(TARGET / "debug" / name, bins / name)
    return bins


def port_free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(cmd, stdout=subprocess.DEVNULL, env=None, cwd=REPO):
    """Runs cmd to completion under GNU time: (seconds, peak RSS in MiB). Raises with the tail
    of stderr when it fails."""
    with tempfile.NamedTemporaryFile("r") as t, tempfile.TemporaryFile("w+") as err:
        p = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", t.name, *cmd], stdout=stdout,
                           stderr=err, env=env, cwd=cwd)
        if p.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{cmd[0]} failed ({p.returncode}): {err.read()[-600:]}")
        secs, kb = t.read().split()
    return float(secs), int(kb) / 1024


def proc_stat(pid):
    """(user+system CPU seconds, RSS MiB, peak RSS MiB) of a live process from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    status = Path(f"/proc/{pid}/status").read_text()
    kb = {k: int(v.split()[0]) for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(.*)$", status, re.M)}
    return cpu, kb.get("VmRSS", 0) / 1024, kb.get("VmHWM", 0) / 1024


def wait_until(what, deadline_s, check, every=0.5):
    end = time.monotonic() + deadline_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {deadline_s} s waiting for {what}")
        time.sleep(every)


class Broker:
    """Apache Kafka (scripts/broker.sh) in its own directory and port, with the pipeline's
    topics created."""

    engine = "Apache Kafka " + subprocess.run([REPO / "scripts/broker.sh", "version"],
                                              capture_output=True, text=True,
                                              check=True).stdout.strip()

    def __init__(self, sieve, work):
        # `broker.sh start PORT` puts the controller on PORT+1: both must be free.
        self.sieve, self.port = sieve, next(p for p in iter(free_port, None)
                                            if port_free(p + 1))
        self.addr = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, "SIEVE_BROKER_DIR": str(Path(work) / "broker")}

    def __enter__(self):
        subprocess.run([REPO / "scripts/broker.sh", "start", str(self.port)], env=self.env,
                       check=True, stdout=subprocess.DEVNULL)
        self.ctl("topics", "apply", "--file", str(REPO / "deploy/topics.toml"))
        return self

    def __exit__(self, *_):
        subprocess.run([REPO / "scripts/broker.sh", "stop"], env=self.env, check=False)

    def ctl(self, *args, stdin=None, prefix=()):
        """`sieve ctl ARGS --brokers ADDR`, its stdout."""
        cmd = [str(self.sieve), "ctl", *args, "--brokers", self.addr, *prefix]
        return subprocess.run(cmd, stdin=stdin, capture_output=True, text=True, check=True,
                              env={**os.environ, "RUST_LOG": "error"}).stdout.strip()

    def count(self, topic, distinct=False):
        extra = ["--distinct-keys"] if distinct else []
        return int(self.ctl("topics", "count", "--topic", topic, *extra))

    def lag(self, group, topic):
        try:
            return int(self.ctl("lag", "--group", group, "--topic", topic, "--total"))
        except (subprocess.CalledProcessError, ValueError):
            return None


def markdown_rows(text):
    """The rows of the first markdown table in text, as dicts keyed by its header."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    if len(lines) < 3:
        raise ValueError(f"no markdown table in: {text[-400:]}")
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return [dict(zip(cells[0], row)) for row in cells[2:]]


def number(text):
    """The first number in text (a table cell such as '12 345' or '3.2ms'), or None."""
    m = re.search(r"-?(?:\d[\d ]*(?:\.\d+)?|\.\d+)", text or "")  # bc prints .39
    return float(m.group().replace(" ", "")) if m else None


def write_json(path, doc):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
