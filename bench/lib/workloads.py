"""The workloads of `bench/run`. Each takes the run's context and returns a JSON-able dict;
each checks its output counts (a figure is only valid where the counts are exact) and says
which broker engine it used."""

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import (BOUNDED_DEDUP_MB, BOUNDED_FILES, REPO, Broker, free_port, log,
                    markdown_rows, number, proc_stat, timed, wait_until)

SIZES = {
    "short": {
        "antijoin_files": [2_000, 20_000, 200_000],
        "stream_records": 20_000,
        "dedup_growth": [500, 5_000, 50_000],
        "ingest": (5_000, 3),
        "followers": 20_000,
        "scale_records": 10_000,
        "soak_seconds": 30,
    },
    "full": {
        "antijoin_files": [100_000, 1_000_000, 10_000_000],
        "stream_records": 1_000_000,
        "dedup_growth": [10_000, 100_000, 1_000_000],
        "ingest": (1_000_000, 10),
        "followers": 1_000_000,
        "scale_records": 200_000,
        "soak_seconds": 600,
    },
}


def peer(module, package):
    """Imports a peer tool, installing it from PyPI into this venv first; None when absent."""
    try:
        return importlib.import_module(module)
    except ImportError:
        log(f"installing {package} from PyPI into {sys.prefix}")
        if subprocess.run([sys.executable, "-m", "pip", "install", "-q", package]).returncode:
            log(f"SKIPPING {package}: pip could not install it")
            return None
        importlib.invalidate_caches()
        return importlib.import_module(module)


DUCKDB = """
import duckdb, sys
legacy, current, out = sys.argv[1:]
duckdb.connect().execute(f'''COPY (SELECT l.* FROM read_ndjson('{legacy}') l
  WHERE NOT EXISTS (SELECT 1 FROM read_ndjson('{current}') c WHERE c.id = l.id))
  TO '{out}' (FORMAT JSON)''')
"""

# The same question over CSV and Parquet files, and the conversion that makes them from the
# generated NDJSON (DuckDB writes both; sieve and DuckDB then read the same bytes).
DUCKDB_FORMATS = {
    "csv": ("read_csv", "(FORMAT CSV, HEADER)"),
    "parquet": ("read_parquet", "(FORMAT PARQUET)"),
}
DUCKDB_AS = """
import duckdb, sys
reader, options, legacy, current, out = sys.argv[1:]
duckdb.connect().execute(f'''COPY (SELECT l.* FROM {reader}('{legacy}') l
  WHERE NOT EXISTS (SELECT 1 FROM {reader}('{current}') c WHERE c.id = l.id))
  TO '{out}' {options}''')
"""
DUCKDB_CONVERT = """
import duckdb, sys
src, csv, parquet = sys.argv[1:]
con = duckdb.connect()
con.execute(f"COPY (SELECT * FROM read_ndjson('{src}')) TO '{csv}' (FORMAT CSV, HEADER)")
con.execute(f"COPY (SELECT * FROM read_ndjson('{src}')) TO '{parquet}' (FORMAT PARQUET)")
"""
DUCKDB_COUNT = """
import duckdb, sys
print(duckdb.sql(f"SELECT count(*) FROM read_parquet('{sys.argv[1]}')").fetchall()[0][0])
"""

# The JVM is a child of this script: closing its stdin ends it and the wait lets GNU time
# count its peak RSS (a waited-for child's) along with Python's.
SPARK = """
import sys
from pyspark.sql import SparkSession
from pyspark.sql.functions import broadcast
legacy, current, out = sys.argv[1:]
spark = (SparkSession.builder.master("local[*]").config("spark.driver.memory", "4g")
         .config("spark.ui.enabled", "false").getOrCreate())
spark.sparkContext.setLogLevel("ERROR")
left = spark.read.json(legacy)
right = spark.read.json(current).select("id")
left.join(broadcast(right), "id", "left_anti").write.mode("overwrite").json(out)
gateway = spark.sparkContext._gateway.proc
spark.stop()
gateway.stdin.close()
gateway.wait()
"""

NAIVE = """
import json, sys
legacy, current, out = sys.argv[1:]
legacy = json.load(open(legacy))
ids = {u['id'] for u in json.load(open(current))}
with open(out, 'w') as f:
    for u in legacy:
        if u['id'] not in ids:
            f.write(json.dumps(u) + '\\n')
"""


def lines(path):
    path = Path(path)
    files = sorted(path.glob("part-*")) if path.is_dir() else [path]
    return sum(sum(1 for _ in open(f, "rb")) for f in files)


def records(path, fmt):
    """Records in a tool's output: lines, less the CSV header, or Parquet's row count."""
    if fmt == "parquet":
        out = subprocess.run([sys.executable, "-c", DUCKDB_COUNT, path], check=True,
                             capture_output=True, text=True)
        return int(out.stdout)
    return lines(path) - (1 if fmt == "csv" else 0)


def antijoin_files(ctx):
    """Workload 1 (and 6 for the file side): legacy users minus current users, every tool on
    the same generated files, at 1x, 10x and 100x."""
    duck = peer("duckdb", "duckdb") is not None
    # PySpark's JVM start alone took minutes on the shared 2 cores: full mode only.
    spark = ctx.mode == "full" and peer("pyspark", "pyspark") is not None
    sizes = ctx.sizes["antijoin_files"]
    runs, failed = [], []
    for n in sizes:
        work = Path(tempfile.mkdtemp(dir=ctx.work))
        gen = [str(ctx.sieve), "ctl", "gen", "users"]
        for side, extra in (("legacy", ["--legacy", str(n)]), ("current", [])):
            for fmt, flag in (("ndjson", []), ("json", ["--array"])):
                subprocess.run([*gen, "--side", side, *extra, "--ids", str(n), *flag,
                                "--out", str(work / f"{side}.{fmt}")], check=True)
        nd = (str(work / "legacy.ndjson"), str(work / "current.ndjson"))
        arr = (str(work / "legacy.json"), str(work / "current.json"))
        tools = [("sieve antijoin files", "ndjson",
                  lambda o: [str(ctx.sieve), "antijoin", "files", "--left", nd[0], "--right",
                             nd[1], "--out", o, "--quiet"]),
                 ("sieve antijoin files", "json array",
                  lambda o: [str(ctx.sieve), "antijoin", "files", "--left", arr[0], "--right",
                             arr[1], "--out", o, "--quiet"]),
                 # Workload 6's bound: a budget the right side outgrows from 1x on.
                 (BOUNDED_FILES, "ndjson",
                  lambda o: [str(ctx.sieve), "antijoin", "files", "--left", nd[0], "--right",
                             nd[1], "--out", o, "--quiet", "--memory-budget-mb", "4"])]
        if duck:
            tools.append(("DuckDB NOT EXISTS over read_ndjson", "ndjson",
                          lambda o: [sys.executable, "-c", DUCKDB, *nd, o]))
            # CSV and Parquet: sieve and DuckDB on the same files, DuckDB writing them.
            for side in ("legacy", "current"):
                subprocess.run([sys.executable, "-c", DUCKDB_CONVERT, str(work / f"{side}.ndjson"),
                                str(work / f"{side}.csv"), str(work / f"{side}.parquet")],
                               check=True)
            for ext, (reader, options) in DUCKDB_FORMATS.items():
                files = (str(work / f"legacy.{ext}"), str(work / f"current.{ext}"))
                tools.append(("sieve antijoin files", ext,
                              lambda o, f=files: [str(ctx.sieve), "antijoin", "files", "--left",
                                                  f[0], "--right", f[1], "--out", o, "--quiet"]))
                tools.append((f"DuckDB NOT EXISTS over {reader}", ext,
                              lambda o, f=files, r=reader, opt=options:
                              [sys.executable, "-c", DUCKDB_AS, r, opt, *f, o]))
        if spark and n == sizes[-1]:
            tools.append(("PySpark local, broadcast + left_anti", "ndjson",
                          lambda o: [sys.executable, "-c", SPARK, *nd, o]))
        tools.append(("naive Python (json.load + set)", "json array",
                      lambda o: [sys.executable, "-c", NAIVE, *arr, o]))
        rows = []
        for i, (tool, fmt, cmd) in enumerate(tools):
            out = str(work / f"out-{i}")
            log(f"antijoin-files n={n}: {tool} ({fmt})")
            try:
                secs, rss = timed(cmd(out))
            except RuntimeError as e:  # a peer that fails is reported; sieve failing is fatal
                if tool.startswith("sieve"):
                    raise
                log(f"SKIPPING {tool} at n={n}: {e}")
                failed.append(f"{tool} at {n}: {str(e)[-300:]}")
                continue
            rows.append({"tool": tool, "input": fmt, "seconds": secs, "peak_rss_mib": rss,
                         "missing": records(out, fmt)})
        answers = {r["missing"] for r in rows}
        runs.append({"legacy_records": n, "current_ids": n // 10,
                     "legacy_mib": (work / "legacy.ndjson").stat().st_size / 2**20,
                     "tools": rows, "counts_agree": len(answers) == 1})
        subprocess.run(["rm", "-rf", str(work)])
        if len(answers) != 1:
            raise RuntimeError(f"antijoin-files n={n}: the tools disagree: {rows}")
    skipped = [p for p, ok in (("duckdb", duck), ("pyspark", spark)) if not ok]
    if ctx.mode != "full":
        skipped = [p if p != "pyspark" else "pyspark (runs only with --full)" for p in skipped]
    return {"engine": "none (files)", "runs": runs, "skipped": skipped, "failed": failed}


def bench_core(ctx, records, stages=None):
    out = Path(tempfile.mkdtemp(dir=ctx.work)) / "core.json"
    cmd = [str(ctx.bins / "sieve-bench-core"), "--records", str(records), "--partitions", "8",
           "--json", str(out)]
    if stages:
        cmd += ["--stages", ",".join(stages)]
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def stream_stages(ctx):
    """Workload 2 (and dedup's issue): raw pass-through vs the core loop, dedup, the stream
    anti-join and a naive HashSet dedup, one broker, one input."""
    doc = bench_core(ctx, ctx.sizes["stream_records"])
    doc["engine"] = Broker.engine
    return doc


def dedup_growth(ctx):
    """Workload 6 (stream side): peak RSS of `sieve dedup` in its own process as the input
    grows 1x, 10x, 100x; beside it sieve-bench-core's in-process stages (raw, dedup, naive
    HashSet dedup) for the rates, whose RSS also holds the harness's generated input."""
    runs = []
    for n in ctx.sizes["dedup_growth"]:
        run = bench_core(ctx, n, ["raw", "dedup", "naive-dedup"])
        run["process"] = dedup_process(ctx, n)
        run["process_bounded"] = dedup_process(ctx, n, BOUNDED_DEDUP_MB)
        runs.append(run)
    return {"engine": Broker.engine, "runs": runs}


def gen_events(ctx, broker, n):
    """n generated events (`ctl gen events`: 20 % retries, 1 % conflicts) on events.raw;
    returns how many are unique."""
    broker.ctl("gen", "events", "--count", str(n), "--topic", "events.raw")
    return int(subprocess.run([str(ctx.sieve), "ctl", "gen", "events", "--count", str(n),
                               "--summary"], capture_output=True, text=True,
                              check=True).stdout.split()[0])


def dedup_process(ctx, n, state_mb=None):
    """`sieve dedup` (default flags, 64 MiB state memory, or `state_mb`) as a child process on
    n generated events (`ctl gen events`: 20 % retries, 1 % conflicts) until its lag is 0."""
    work = Path(tempfile.mkdtemp(dir=ctx.work))
    argv = ["dedup"] + (["--state-memory-mb", str(state_mb)] if state_mb else [])
    with Broker(ctx.sieve, work) as broker:
        new = gen_events(ctx, broker, n)
        secs, inst = run_group(ctx, broker, work, argv, 1, "events.raw", 3600)
        out = broker.count("events.unique")
    if out != new:
        raise RuntimeError(f"growth: dedup wrote {out} records for {new} unique events")
    return {"records": n, "unique": new, "seconds": secs, "records_per_s": n / secs, **inst[0]}


def ingest(ctx):
    """Workload 3: bench/ingest.sh (raw produce, bulk file, HTTP under wrk)."""
    n, secs = ctx.sizes["ingest"]
    out = subprocess.run([REPO / "bench/ingest.sh", str(n), str(secs)], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    rows = []
    for r in markdown_rows(out):
        notes = r["notes"]
        rows.append({"path": r["path"], "records_per_s": number(r["records/s"]),
                     "ratio_to_raw": number(r["× raw"]), "notes": notes,
                     "p50_ms": latency_ms(notes, "p50"), "p99_ms": latency_ms(notes, "p99")})
    return {"engine": Broker.engine, "records": n, "http_seconds": secs, "rows": rows}


def latency_ms(notes, which):
    """wrk's latency ('p99 3.21ms', '1.02s', '850.00us') in ms, or None."""
    m = re.search(which + r" ([\d.]+)(us|ms|s)\b", notes)
    if not m:
        return None
    return float(m.group(1)) * {"us": 0.001, "ms": 1, "s": 1000}[m.group(2)]


def fanout(ctx):
    """Workload 4: scripts/demo.sh's fan-out (planner + deliverer) with P0 2FA codes sent
    while it runs; the demo checks its own counts and fails otherwise."""
    followers = ctx.sizes["followers"]
    env = {"SIEVE_DEMO_FOLLOWERS": str(followers), "SIEVE_DEMO_EVENTS": "2000",
           "SIEVE_DEMO_LEGACY": "2000", "SIEVE_DEMO_PORT": str(free_port())}
    out = subprocess.run([REPO / "scripts/demo.sh"], cwd=REPO, env={**os.environ, **env},
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"demo failed ({out.returncode}): {out.stdout[-1500:]}\n"
                           f"stderr: {out.stderr[-800:]}")
    text = out.stdout
    m = re.search(r"fan-out to (\d+) followers in ([\d.]+) s \((\d+) recipients/s\)", text)
    p0 = re.search(r"P0 latency:\s+p50 <= (\S+) ms, p99 <= (\S+) ms", text)
    at = re.search(r"fan-out stood at (\d+) of", text)
    if not (m and p0 and at):
        raise RuntimeError(f"demo summary not understood: {text[-800:]}")
    as_ms = lambda s: None if s == "over" else float(s)
    raw = raw_produce_rate(ctx, followers, "notify.out.inapp")
    return {"engine": Broker.engine, "followers": int(m.group(1)), "seconds": float(m.group(2)),
            "raw_produce_per_s": raw,
            "recipients_per_s": int(m.group(3)), "p0_codes": 10,
            "p0_p50_ms_le": as_ms(p0.group(1)), "p0_p99_ms_le": as_ms(p0.group(2)),
            "fanout_sent_when_p0_done": int(at.group(1)),
            "note": "P0 quantiles are histogram bucket upper bounds (created_at to decision)"}


def raw_produce_rate(ctx, n, topic):
    """The broker's ceiling for the fan-out's writes: n records produced by plain librdkafka
    (`ctl gen events`, one header as every sieve output has its id header) to `topic` of a
    fresh broker of the same engine; records/s."""
    work = Path(tempfile.mkdtemp(dir=ctx.work))
    with Broker(ctx.sieve, work) as broker:
        start = time.monotonic()
        broker.ctl("gen", "events", "--count", str(n), "--retry-rate", "0", "--conflict-rate",
                   "0", "--topic", topic)
        secs = time.monotonic() - start
        if broker.count(topic) != n:
            raise RuntimeError(f"raw produce: {broker.count(topic)} of {n} records landed")
    return n / secs


def spawn(ctx, broker, work, *args):
    state = Path(tempfile.mkdtemp(dir=work))
    cmd = [str(ctx.sieve), *args, "--brokers", broker.addr, "--state-dir", str(state),
           "--metrics-addr", "127.0.0.1:0"]
    log_file = open(state.with_suffix(".log"), "w")
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log_file, cwd=REPO,
                         env={**os.environ, "RUST_LOG": "warn"})
    return p, state


def du_mib(path):
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def run_group(ctx, broker, work, service, k, topic, deadline):
    """k instances of `service` (argv after `sieve`, with GROUP/PREFIX placeholders) in one
    group until its lag on topic is 0: seconds and per-instance CPU and state."""
    group = f"scale-{service[0]}-{k}"
    argv = [a.replace("PREFIX", f"k{k}.") for a in service] + ["--group", group]
    start = time.monotonic()
    procs = []
    try:
        procs = [spawn(ctx, broker, work, *argv) for _ in range(k)]
        wait_until(f"{group} lag 0", deadline, lambda: broker.lag(group, topic) == 0)
        secs = time.monotonic() - start
        instances = []
        for p, state in procs:
            cpu, _, peak = proc_stat(p.pid)
            instances.append({"cpu_seconds": cpu, "cpu_share": cpu / secs,
                              "peak_rss_mib": peak, "state_mib": du_mib(state)})
    finally:
        stop_all(p for p, _ in procs)
    return secs, instances


def stop_all(procs):
    procs = list(procs)
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()


def scale_out(ctx):
    """Workload 5: dedup and the stream anti-join with 1, 2 and 4 instances in one group on 8
    partitions (processes on this machine)."""
    n = ctx.sizes["scale_records"]
    work = Path(tempfile.mkdtemp(dir=ctx.work))
    results = {"engine": Broker.engine, "records": n, "partitions": 8, "dedup": [],
               "antijoin": []}
    with Broker(ctx.sieve, work) as broker:
        new = gen_events(ctx, broker, n)
        users = work / "users"
        users.mkdir()
        for side, extra in (("legacy", ["--legacy", str(n)]), ("current", [])):
            subprocess.run([str(ctx.sieve), "ctl", "gen", "users", "--side", side, *extra,
                            "--ids", str(n), "--out", str(users / side)], check=True)
            with open(users / side) as f:
                broker.ctl("produce", "--topic", f"users.{side}", "--key-pointer", "/id",
                           stdin=f)
        subprocess.run([str(ctx.sieve), "antijoin", "files", "--left", str(users / "legacy"),
                        "--right", str(users / "current"), "--keys-only", "--out",
                        str(users / "missing"), "--quiet"], check=True)
        missing = lines(users / "missing")
        for k in (1, 2, 4):
            broker.ctl("topics", "apply", "--file", str(REPO / "deploy/topics.toml"),
                       prefix=("--prefix", f"k{k}."))
            log(f"scale-out: dedup x{k}")
            secs, inst = run_group(ctx, broker, work, ["dedup", "--output", "PREFIXevents.unique",
                                                       "--dlq", "PREFIXdlq.dedup"],
                                   k, "events.raw", 1800)
            out = broker.count(f"k{k}.events.unique")
            results["dedup"].append({"instances": k, "seconds": secs, "records_per_s": n / secs,
                                     "outputs": out, "expected": new, "per_instance": inst})
            log(f"scale-out: antijoin x{k}")
            secs, inst = run_group(ctx, broker, work,
                                   ["antijoin", "stream", "--out", "PREFIXantijoin.out",
                                    "--dlq", "PREFIXdlq.antijoin"],
                                   k, "users.legacy", 1800)
            out = broker.count(f"k{k}.antijoin.out", distinct=True)
            results["antijoin"].append({"instances": k, "seconds": secs,
                                        "records_per_s": n / secs, "outputs": out,
                                        "expected": missing, "per_instance": inst})
    for row in results["dedup"] + results["antijoin"]:
        if row["outputs"] != row["expected"]:
            raise RuntimeError(f"scale-out: {row['outputs']} outputs, expected {row['expected']}")
    return results


def soak(ctx):
    """Issue 9's soak: dedup under a steady stream of new keys for soak_seconds, RSS sampled
    over time; every unique event must come out exactly once."""
    seconds = ctx.sizes["soak_seconds"]
    work = Path(tempfile.mkdtemp(dir=ctx.work))
    gen = [str(ctx.sieve), "ctl", "gen", "events", "--count", str(SOAK_BATCH)]
    base = subprocess.run(gen, capture_output=True, text=True, check=True).stdout
    new = int(subprocess.run([*gen, "--summary"], capture_output=True, text=True,
                             check=True).stdout.split()[0])
    with Broker(ctx.sieve, work) as broker:
        dedup, state = spawn(ctx, broker, work, "dedup", "--group", "soak", "--key-pointer",
                             "/event_id")
        try:
            samples, rounds = soak_run(ctx, broker, work, dedup, base, seconds)
            cpu, _, peak = proc_stat(dedup.pid)
        finally:
            stop_all([dedup])
        out = broker.count("events.unique")
    expected = rounds * new
    if out != expected:
        raise RuntimeError(f"soak: {out} unique events, expected {expected}")
    return {"engine": Broker.engine, "seconds": seconds, "rounds": rounds,
            "records": rounds * SOAK_BATCH, "unique": out, "expected": expected,
            "dedup_peak_rss_mib": peak, "dedup_cpu_seconds": cpu, "state_mib": du_mib(state),
            "samples": samples}


SOAK_BATCH = 20_000


def soak_run(ctx, broker, work, dedup, base, seconds):
    """Produces rounds of base (each with its own ids, so dedup's state keeps growing) for
    seconds while a thread samples RSS, then waits for dedup to catch up. A round is produced
    only once dedup is less than a round behind: a soak measures steady state, and a producer
    running flat out would only measure a growing backlog."""
    broker_pid = int((work / "broker/node-1/pid").read_text())
    samples, rounds = [], 0
    start = time.monotonic()
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            _, rss, _ = proc_stat(dedup.pid)
            _, brss, _ = proc_stat(broker_pid)
            samples.append({"t": time.monotonic() - start, "dedup_rss_mib": rss,
                            "broker_rss_mib": brss, "rounds_produced": rounds,
                            "lag": broker.lag("soak", "events.raw")})
            stop.wait(max(1.0, seconds / 120))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        produce = [str(ctx.sieve), "ctl", "produce", "--brokers", broker.addr, "--topic",
                   "events.raw", "--key-pointer", "/event_id"]
        while time.monotonic() - start < seconds:
            text = base.replace('"evt-', f'"evt-r{rounds}-')
            subprocess.run(produce, input=text, text=True, check=True, capture_output=True)
            rounds += 1
            wait_until("soak lag under a round", 300,
                       lambda: (broker.lag("soak", "events.raw") or 0) < SOAK_BATCH)
        wait_until("soak lag 0", 1800, lambda: broker.lag("soak", "events.raw") == 0)
    finally:
        stop.set()
        sampler.join()
    return samples, rounds


WORKLOADS = {
    "antijoin-files": antijoin_files,
    "stream": stream_stages,
    "ingest": ingest,
    "fanout": fanout,
    "scale-out": scale_out,
    "growth": dedup_growth,
    "soak": soak,
}
