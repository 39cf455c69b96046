"""Cost of the feedback join: ``pipelines.feedback.labels.join_inference_log`` (DuckDB, out of
core) matching labels to an inference log by request id, against the obvious baseline: the same
log partitions read into pandas (through pyarrow) and ``merge``d with the labels, in one run.

Data: a fabricated inference log in the server's layout (``<model>/date=YYYY-MM-DD/part-*.parquet``,
the columns of ``pipelines.serving``'s log: the flights project's 10 features as Triton receives
them, drawn from real 2013 flights, ``prediction``, ``label``, ``request_id`` (32 hex),
``model``, ``model_version``, ``served_at``, ``latency_ms``), ``--log-rows`` rows over
``--days`` day partitions, in chunks of ``--chunk-rows`` rows a file (default 100,000: the
server writes a chunk per ``serving.log.flush_rows``, 1,000, so a busy log holds 100 times more,
smaller files). Labels: ``--labels`` request ids drawn from the log (1% unknown), each observed
1 to 36 hours after its answer.

* **DuckDB** (the project's join) at full size: seconds, labels a second, and the peak resident
  memory of the process that ran it (``ru_maxrss``; each measurement runs in a fresh process,
  after its imports, so the data's fabrication does not count).
* **Baseline** at ``--baseline-log-rows`` (pandas holds the whole log in memory): pyarrow reads
  the log into pandas and ``merge`` joins the labels; DuckDB again at that size. Their matched
  rows must agree (the same served row for every label) before any time is printed; the ratio
  is DuckDB's seconds over pandas' at that size.

    .venv/bin/python bench/feedback_join.py [--log-rows 10000000] [--labels 1000000] [--days 30]
        [--chunk-rows 100000] [--baseline-log-rows 2000000] [--quick]

``--quick``: 200,000 log rows, 20,000 labels, 50,000 rows a baseline; for tests/bench.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START = datetime(2026, 3, 1, tzinfo=timezone.utc)
MODEL = "flights_delay"
HORIZON_HOURS = 168.0  # feedback.horizon_hours' default
UNKNOWN_SHARE = 0.01


def peak_rss_mib() -> float:
    """The peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssSampler:
    """The highest resident memory of this process while the block runs, sampled every 5 ms
    (psutil): the join's own peak, apart from the process's before it."""

    def __enter__(self) -> RssSampler:
        import psutil

        self.process, self.peak, self.done = psutil.Process(), 0, threading.Event()
        self.before = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def fabricate(folder: Path, log_rows: int, labels: int, days: int, chunk_rows: int, seed: int) -> tuple[Path, Path, int]:
    """Write the log under ``folder/log/<model>/`` and the labels to ``folder/labels.parquet``;
    returns the log folder, the labels file and the number of log files. One day at a time, so
    memory stays near one day's rows."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.config import FeatureType, load_config
    from pipelines.data.replay import flights

    project = load_config("flights", REPO)
    real = flights()
    rng = np.random.default_rng(seed)
    log_folder = folder / "log" / MODEL
    picked, files, logged = [], 0, 0
    known_total = int(round(labels * (1 - UNKNOWN_SHARE)))
    for day in range(days):
        n = log_rows // days + (1 if day < log_rows % days else 0)
        sample = real.iloc[rng.integers(0, len(real), n)]
        columns = {
            f.name: pa.array(sample[f.name].astype(str).to_numpy() if f.type == FeatureType.categorical else sample[f.name].to_numpy("float32"))
            for f in project.dataset.features
        }
        prediction = rng.uniform(0, 1, n).astype("float32")
        start_us = int((START + timedelta(days=day)).timestamp() * 1e6)
        served = np.sort(rng.integers(start_us, start_us + 86_400_000_000, n))
        columns |= {
            "prediction": pa.array(prediction),
            "label": pa.array((prediction >= 0.5).astype("int32")),
            "request_id": hex_ids(rng, n),
            "model": pa.array(np.full(n, MODEL, dtype=object), pa.string()),
            "model_version": pa.array(np.full(n, 3, dtype="int64")),
            "served_at": pa.array(served, pa.timestamp("us", tz="UTC")),
            "latency_ms": pa.array(rng.gamma(2.0, 1.5, n)),
        }
        table = pa.table(columns)
        day_folder = log_folder / f"date={(START + timedelta(days=day)):%Y-%m-%d}"
        day_folder.mkdir(parents=True)
        for offset in range(0, n, chunk_rows):
            pq.write_table(table.slice(offset, chunk_rows), day_folder / f"part-{offset // chunk_rows:06d}.parquet")
            files += 1
        known = known_total * (logged + n) // log_rows - known_total * logged // log_rows  # exactly known_total in all
        logged += n
        chosen = rng.choice(n, known, replace=False)
        observed = served[chosen] + rng.integers(3_600_000_000, 36 * 3_600_000_000, known)
        picked.append(pa.table({"request_id": table.column("request_id").take(chosen), "observed_at": pa.array(observed, pa.timestamp("us", tz="UTC"))}))
    unknown = labels - sum(t.num_rows for t in picked)
    observed = rng.integers(int(START.timestamp() * 1e6), int((START + timedelta(days=days)).timestamp() * 1e6), unknown)
    picked.append(pa.table({"request_id": hex_ids(rng, unknown), "observed_at": pa.array(observed, pa.timestamp("us", tz="UTC"))}))
    everything = pa.concat_tables(picked)
    labels_file = folder / "labels.parquet"
    pq.write_table(everything.take(rng.permutation(everything.num_rows)), labels_file)
    return log_folder, labels_file, files


def hex_ids(rng, n: int):
    """``n`` random 32-hex-digit request ids (as a uuid4 hex the server makes), built as one Arrow buffer."""
    import numpy as np
    import pyarrow as pa

    data = rng.bytes(16 * n).hex().encode()
    offsets = np.arange(0, 32 * n + 1, 32, dtype=np.int32)
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def measure(method: str, log_folder: Path, labels_file: Path, out: Path) -> None:
    """One join in this (fresh) process; writes seconds, peak memory and the matched rows to ``out``."""
    import duckdb  # noqa: F401 - imported before the clock starts, as pandas and pyarrow are
    import pandas as pd
    import pyarrow.dataset as ds

    from pipelines.feedback.labels import join_inference_log

    labels = pd.read_parquet(labels_file)
    rows = pd.DataFrame({"_row": range(len(labels)), "request_id": labels["request_id"], "observed_at": labels["observed_at"]})
    with RssSampler() as memory:
        started = time.perf_counter()
        if method == "duckdb":
            empty = out.parent / "labelled-none"
            joined = join_inference_log(log_folder, empty, rows, HORIZON_HOURS, "part-none.parquet")
            served = joined.column("served_at").to_pandas()
        else:
            log = ds.dataset(log_folder, format="parquet", partitioning="hive").to_table().to_pandas()
            merged = rows.merge(log, on="request_id", how="left", suffixes=("", "_log"))
            served = merged["served_at"]
        seconds = time.perf_counter() - started
    matched = pd.DataFrame({"request_id": rows["request_id"], "served_at": served}).dropna().sort_values("request_id")
    matched.to_parquet(out.with_suffix(".parquet"), index=False)
    figures = {"seconds": seconds, "join_mib": (memory.peak - memory.before) / 2**20, "before_mib": memory.before / 2**20, "process_peak_mib": peak_rss_mib()}
    out.write_text(json.dumps({**figures, "labels": len(rows), "matched": len(matched)}))


def run_measure(method: str, log_folder: Path, labels_file: Path, out: Path) -> dict:
    """``measure`` in a fresh Python process (so its peak memory is the join's own)."""
    command = [sys.executable, __file__, "--measure", method, "--log", str(log_folder), "--labels-file", str(labels_file), "--out", str(out)]
    subprocess.run(command, check=True, cwd=REPO)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-rows", type=int, default=None, help="inference log rows (default 10,000,000; --quick: 200,000)")
    parser.add_argument("--labels", type=int, default=None, help="labels joined (default 1,000,000; --quick: 20,000)")
    parser.add_argument("--days", type=int, default=30, help="day partitions of the log")
    parser.add_argument("--chunk-rows", type=int, default=100_000, help="rows a log file")
    parser.add_argument("--baseline-log-rows", type=int, default=None, help="log rows of the pandas comparison (default 2,000,000; --quick: 50,000)")
    parser.add_argument("--quick", action="store_true", help="small data: a check that this benchmark runs")
    parser.add_argument("--measure", choices=["duckdb", "pandas"], help=argparse.SUPPRESS)
    parser.add_argument("--log", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--labels-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    if args.measure:
        measure(args.measure, args.log, args.labels_file, args.out)
        return
    args.log_rows = args.log_rows or (200_000 if args.quick else 10_000_000)
    args.labels = args.labels or (20_000 if args.quick else 1_000_000)
    args.baseline_log_rows = args.baseline_log_rows or (50_000 if args.quick else 2_000_000)
    baseline_labels = args.labels * args.baseline_log_rows // args.log_rows

    from project import QUICK_NOTE, print_ratio

    work = Path(tempfile.mkdtemp(prefix="flywheel-bench-feedback-"))
    try:
        started = time.perf_counter()
        small_log, small_labels, _ = fabricate(work / "baseline", args.baseline_log_rows, baseline_labels, args.days, args.chunk_rows, seed=1)
        log_folder, labels_file, files = fabricate(work / "full", args.log_rows, args.labels, args.days, args.chunk_rows, seed=2)
        size = sum(p.stat().st_size for p in log_folder.rglob("*.parquet")) / 2**20
        print(
            f"log: {args.log_rows:,} rows over {args.days} day partitions, {files:,} files ({size:,.0f} MiB); "
            f"labels: {args.labels:,} ({UNKNOWN_SHARE:.0%} unknown); fabricated in {time.perf_counter() - started:.1f} s",
            flush=True,
        )

        pandas_small = run_measure("pandas", small_log, small_labels, work / "pandas-small.json")
        duckdb_small = run_measure("duckdb", small_log, small_labels, work / "duckdb-small.json")
        import pandas as pd

        same = pd.read_parquet(work / "pandas-small.parquet").reset_index(drop=True)
        ours = pd.read_parquet(work / "duckdb-small.parquet").reset_index(drop=True)
        if not same.equals(ours):
            sys.exit(f"DuckDB matched {len(ours):,} labels, pandas {len(same):,}, or to other served rows: the join is wrong")
        full = run_measure("duckdb", log_folder, labels_file, work / "duckdb-full.json")
        expected = int(round(args.labels * (1 - UNKNOWN_SHARE)))
        if full["matched"] != expected:
            sys.exit(f"DuckDB matched {full['matched']:,} of the {expected:,} known labels")

        def line(name: str, figures: dict) -> str:
            return (
                f"{name}: {figures['seconds']:.2f} s, {figures['labels'] / figures['seconds']:,.0f} labels/s, "
                f"memory: +{figures['join_mib']:,.0f} MiB RSS at the join's peak over the {figures['before_mib']:,.0f} MiB before it "
                f"(process peak {figures['process_peak_mib']:,.0f} MiB)"
            )

        print(line(f"DuckDB join, {args.labels:,} labels x {args.log_rows:,} log rows", full))
        print(f"baseline, {baseline_labels:,} labels x {args.baseline_log_rows:,} log rows (matched rows identical):")
        print("  " + line("pandas (pyarrow read + merge)", pandas_small))
        print("  " + line("DuckDB join", duckdb_small))
        if args.quick:
            print(QUICK_NOTE)
        print_ratio(f"DuckDB join seconds / pandas merge seconds at {args.baseline_log_rows:,} log rows", duckdb_small["seconds"] / pandas_small["seconds"])
        during = {name: figures["before_mib"] + figures["join_mib"] for name, figures in (("duckdb", duckdb_small), ("pandas", pandas_small))}
        print_ratio(f"DuckDB RSS / pandas RSS at the join's peak at {args.baseline_log_rows:,} log rows", during["duckdb"] / during["pandas"])
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
