"""What one night costs as the history grows: ingest a month, split, train within the window, on
raw histories of 1M, 10M and 100M rows, against the in-memory steps they replaced, in one run.

History: the real flights (the flights project, nycflights13 via ``pipelines.data.replay``),
January to November 2013 as they are, then all of 2013 again and again with new ids (``flight_id``
plus a multiple of ``ID_STRIDE``) and ``time_hour`` moved back by whole years (1, 2, ... years
before 2013: the ``month`` and ``day`` features stay true of the moved dates), the newest
``--sizes`` rows of that. Written straight into the raw data's layout (``pipelines.data.raw``:
``<raw_path>/<batch>.parquet``, rows typed as ingestion types them, each with its ``BATCH``) in
parts of ``PART_ROWS`` rows, as a backfill of that many batches would leave it; for the old
implementation the same rows as the one raw parquet file it kept (a pyarrow ``ParquetWriter``,
streaming, part after part). Then the previous night's ``version_split`` (untimed; it is where
DVC hashes the whole history the first time, and its state database remembers it), and
December 2013 (the newest real month, later than all history) lands with ``replay.land``.

The night, each step in a process of its own that reports its seconds (the step's call, after
its imports; the process's start and imports are printed beside) and its peak resident memory
(``ru_maxrss`` of the process, or of a process it started and waited for if that was larger:
the split stage that DVC runs; the old steps import ``bench/inmemory.py``, and with it torch
and Lightning, about 0.5 GiB of their figure):

* **new**: ``ingest``: ``pipelines.data.ingest.ingest_landing`` (validation, typing, the batch
  written as its part, the anti-join on ids, archiving); ``split``:
  ``pipelines.data.versioning.version_split`` (the DVC stage: hashes, ``dvc repro`` running
  ``pipelines.data.split`` on ``split.window``, cache and push); ``train``:
  ``pipelines.training.train.train`` on that data version (the streaming DataModule).
* **old** (``bench/inmemory.py``), up to ``--old-max`` rows of history: ``ingest``: the batch
  read and validated as ingestion does (``BatchValidator``, ``schema.typed``), then the old
  ``append_to_raw`` on the one file; ``split``: the file read whole, the old ``split`` (no
  window: it had none), its parts written, and the MD5 of the raw file, which DVC computed every
  night as the file was rewritten (the DVC cache and push of the outputs are not counted: a lower
  bound); ``train``: ``pipelines.training.train.fit`` with the old ``InMemoryDataModule``.

Settings (``throwaway_project``): ``split.window`` ``--window`` (3 months), ``train.max_epochs``
``--epochs`` (2). Targets printed against: the night at the largest size costs at most 1.5 times
the night at the smallest, and no step's peak memory exceeds 2 GiB at any size.

    nice -n 10 .venv/bin/python bench/history_scale.py [--sizes 1M 10M 100M] [--old-max 10M]
        [--window "3 months"] [--epochs 2] [--quick]

``--quick`` (for tests/bench): histories of 30k and 120k rows, old at both, 3,000 flights of
December, 1 epoch, no previous night's split, and a night's steps in one process, new then old
(each step's memory is then the process's peak so far).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.project import PROJECT, QUICK_NOTE, REPO, print_ratio, throwaway_project  # noqa: E402

NIGHT = "2013-12"  # the month a night lands: the newest real one, later than all history
PART_ROWS = 1_000_000  # rows a backfilled part of history
ID_STRIDE = 1_000_000  # a copy's ids: the real ids (below 336,777) plus its number times this
PEAK_TARGET_MIB = 2048
NIGHT_TARGET = 1.5
STEPS = ("ingest", "split", "train")
OLD = "old"  # the old implementation's folder in the project home: raw.parquet, the night's CSV, split/, candidate/
DATA_VERSION = "data_version.json"  # the new split's data version, in the project home, for the train step


def rows_count(text: str) -> int:
    """``30k``, ``1M``, ``100M``, ``2_500_000`` as a number of rows; ArgumentTypeError otherwise."""
    match = re.fullmatch(r"\s*([0-9][0-9_,]*(?:\.[0-9]+)?)\s*([kKmM]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a row count such as 30k, 1M or 2500000")
    return int(float(match[1].replace("_", "").replace(",", "")) * {"": 1, "k": 1e3, "m": 1e6}[match[2].lower()])


def short(rows: int) -> str:
    return f"{rows / 1e6:g}M" if rows >= 1_000_000 else f"{rows / 1e3:g}k" if rows >= 1000 else str(rows)


# ---------------------------------------------------------------- history


def real_flights(dataset):
    """All arrived flights of 2013 typed as ingestion types a batch (``schema.typed``), ordered
    by (time, id), as a pandas frame; ``ValueError`` if they do not type (they always do)."""
    from pipelines.data.replay import flights
    from pipelines.data.schema import typed

    frame, problems = typed(flights(), dataset)
    if problems:
        raise ValueError(f"the real flights do not type: {problems}")
    return frame[dataset.columns].sort_values([dataset.time_column, dataset.key], kind="stable").reset_index(drop=True)


def copies(dataset, history_rows: int):
    """The history's rows, oldest first, as Arrow tables of one copy each (the oldest cut to its
    newest rows): copy k >= 1 is all of 2013 moved back k years with ids + k * ID_STRIDE; copy 0 is
    January-November 2013 as it is. Typed as raw parts are; ``BATCH`` is left empty."""
    import pandas as pd
    import pyarrow as pa

    from pipelines.config import BATCH
    from pipelines.data.raw import schema_of

    year = real_flights(dataset)
    latest = year[year["month"] != int(NIGHT[-2:])].reset_index(drop=True)
    schema = schema_of(year.assign(**{BATCH: ""}), dataset)  # BATCH is set part by part
    table = {k: pa.Table.from_pandas(rows.assign(**{BATCH: ""}), schema=schema, preserve_index=False) for k, rows in ((0, latest), (1, year))}
    oldest = 0 if history_rows <= len(latest) else math.ceil((history_rows - len(latest)) / len(year))
    if max(year[dataset.time_column]).year - oldest < 1678:
        raise ValueError(f"{history_rows:,} rows of history reach back {oldest} years, before the nanosecond timestamps' range (1677-2262)")
    left = history_rows
    ids, times = dataset.key, dataset.time_column
    planned = []
    for k in range(oldest + 1):  # newest first, to know how much of the oldest copy to keep
        n = min(left, (len(latest) if k == 0 else len(year)))
        planned.append((k, n))
        left -= n
    for k, n in reversed(planned):
        base = table[0 if k == 0 else 1]
        if k:
            moved = pd.DatetimeIndex(year[times]) - pd.DateOffset(years=k)
            base = base.set_column(base.schema.get_field_index(ids), ids, pa.array(year[ids].to_numpy() + k * ID_STRIDE))
            base = base.set_column(base.schema.get_field_index(times), times, pa.array(moved, type=base.schema.field(times).type))
        yield base.slice(base.num_rows - n)


def build_history(config, history_rows: int, old: bool) -> dict:
    """Write ``history_rows`` rows of history as raw parts (and, if ``old``, as the old single raw
    file); returns seconds, parts, and MiB on disk of each layout."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.config import BATCH
    from pipelines.data.raw import ROW_GROUP_ROWS, part_path

    started = time.perf_counter()
    dataset = config.dataset
    old_file = config.home / OLD / "raw.parquet"
    old_file.parent.mkdir(parents=True, exist_ok=True)
    writer = None
    pending: list = []
    held = 0
    written = 0

    def flush(rows: int) -> None:
        nonlocal pending, held, writer, written
        joined = pa.concat_tables(pending)
        part, rest = joined.slice(0, rows), joined.slice(rows)
        pending, held = ([rest] if rest.num_rows else []), rest.num_rows
        batch = f"history-{written + 1:04d}"
        part = part.set_column(part.schema.get_field_index(BATCH), BATCH, pa.array([batch] * part.num_rows, pa.string()))
        path = part_path(dataset, batch)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(part, path, row_group_size=ROW_GROUP_ROWS)
        if old:
            writer = writer or pq.ParquetWriter(old_file, part.schema)
            writer.write_table(part, row_group_size=ROW_GROUP_ROWS)
        written += 1

    for table in copies(dataset, history_rows):
        pending.append(table)
        held += table.num_rows
        while held >= PART_ROWS:
            flush(PART_ROWS)
    if held:
        flush(held)
    if writer is not None:
        writer.close()
    mib = sum(p.stat().st_size for p in dataset.raw_path.iterdir()) / 2**20
    return {"seconds": time.perf_counter() - started, "parts": written, "mib": mib, "old_mib": old_file.stat().st_size / 2**20 if old else None}


# ---------------------------------------------------------------- steps (each in its own process)


def new_ingest(config) -> dict:
    from pipelines.data.ingest import ingest_landing

    summary = ingest_landing(config)
    if summary["passed"] != [f"{NIGHT}.csv"]:
        raise RuntimeError(f"the night's batch {NIGHT}.csv was not ingested: {summary}")
    return {"rows": summary["rows_ingested"], "raw_rows": summary["raw_rows"]}


def new_split(config) -> dict:
    from pipelines.data.versioning import version_split

    versioned = version_split(config)
    (config.home / DATA_VERSION).write_text(json.dumps(versioned["data_version"]))
    summary = json.loads((config.split.output_dir / "summary.json").read_text())
    return {"cache_hit": versioned["cache_hit"], "split_rows": {part: summary[part]["rows"] for part in summary}}


def new_train(config) -> dict:
    from pipelines.training.train import train

    trained = train(config, json.loads((config.home / DATA_VERSION).read_text()))
    return {"best_val_loss": trained["best_val_loss"], "epochs": trained["epochs"]}


def old_ingest(config) -> dict:
    from bench.inmemory import append_to_raw
    from pipelines.data.schema import read_batch_file, typed
    from pipelines.data.validation import BatchValidator

    dataset = config.dataset
    batch = read_batch_file(config.home / OLD / f"{NIGHT}.csv")
    outcome = BatchValidator(dataset, config.home).validate(batch, NIGHT)
    frame, problems = typed(batch, dataset)
    if not outcome.success or problems:
        raise RuntimeError(f"the night's batch failed validation: {outcome.failures} {problems}")
    return {"rows": len(frame), "raw_rows": append_to_raw(config.home / OLD / "raw.parquet", dataset, frame, f"{NIGHT}.csv")}


def old_split(config) -> dict:
    import pandas as pd

    from bench.inmemory import split
    from pipelines.data.split import split_paths

    raw_file = config.home / OLD / "raw.parquet"
    parts = split(pd.read_parquet(raw_file), config.dataset, config.split)
    for name, path in split_paths(config.home / OLD / "split").items():
        path.parent.mkdir(parents=True, exist_ok=True)
        parts[name].to_parquet(path, index=False)
    digest = hashlib.md5()
    with raw_file.open("rb") as stream:
        while chunk := stream.read(2**20):
            digest.update(chunk)
    return {"split_rows": {name: len(part) for name, part in parts.items()}, "raw_md5": digest.hexdigest()}


def old_train(config) -> dict:
    from bench.inmemory import InMemoryDataModule
    from pipelines import tracking
    from pipelines.data.split import split_paths
    from pipelines.training import data
    from pipelines.training.train import fit

    class Old(InMemoryDataModule):
        """The old DataModule where ``fit`` builds the streaming one (its extra settings unused)."""

        def __init__(self, paths, dataset, batch_size, *_, **__):
            super().__init__(paths, dataset, batch_size)

        @property
        def train_rows(self) -> dict[str, int]:
            return {"split": len(self.splits["train"]), "trained": len(self.splits["train"])}

    data.TabularDataModule = Old  # type: ignore[misc]
    folder = config.home / OLD / "candidate"
    tracked = tracking.open_run(config.tracking, config.name, folder, "old", {}, {})
    record = fit(config.train, config.model, config.dataset, split_paths(config.home / OLD / "split"), folder, tracked, config.tracking.timeout_s)
    return {"best_val_loss": record["best_val_loss"], "epochs": record["epochs"]}


CALLS = {
    "previous-split": new_split,
    "new-ingest": new_ingest,
    "new-split": new_split,
    "new-train": new_train,
    "old-ingest": old_ingest,
    "old-split": old_split,
    "old-train": old_train,
}
IMPORTS = {  # what a step imports before its clock starts: the same cost at every size
    "previous-split": ["pipelines.data.versioning", "dvc.repo"],
    # label_check imports the gate (and with it Lightning) even when no version is served
    "new-ingest": ["pipelines.data.ingest", "pipelines.data.validation", "great_expectations", "pipelines.evaluation.gate"],
    "new-split": ["pipelines.data.versioning", "dvc.repo"],
    "new-train": ["pipelines.training.train", "pipelines.training.data", "pipelines.training.model"],
    "old-ingest": ["bench.inmemory", "pipelines.data.validation", "great_expectations"],
    "old-split": ["bench.inmemory", "pipelines.data.split"],
    "old-train": ["bench.inmemory", "pipelines.training.train", "pipelines.training.model"],
}


def steps(names: list[str], out: Path) -> None:
    """Run the steps ``names`` in order on the project of ``$FLYWHEEL_HOME`` in this process;
    write each one's seconds, the process's peak memory so far and its result to ``out``."""
    import importlib

    from pipelines.config import load_config

    config = load_config(PROJECT, Path(os.environ["FLYWHEEL_HOME"]))
    figures = {}
    for name in names:
        for module in IMPORTS[name]:
            importlib.import_module(module)
        started = time.perf_counter()
        result = CALLS[name](config)
        seconds = time.perf_counter() - started
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        # The largest waited-for child (DVC's split stage); a child forked from this process (git)
        # counts this process's pages at the fork, so it never raises the peak above this one's.
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        figures[name] = {"seconds": seconds, "self_mib": own, "children_mib": children, "peak_mib": max(own, children), **result}
    out.write_text(json.dumps(figures))


def run_steps(names: list[str], home: Path) -> dict[str, dict]:
    """``steps(names)`` in a fresh Python process; the figures of each step."""
    out = home / f"steps-{names[0]}.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--steps", *names, "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"steps {names} exited {done.returncode}:\n{(done.stdout + done.stderr)[-6000:]}")
    process_seconds = time.perf_counter() - started
    return {name: figures | {"process_seconds": process_seconds} for name, figures in json.loads(out.read_text()).items()}


# ---------------------------------------------------------------- the bench


def describe(name: str, result: dict) -> str:
    """A step's figures in a line."""
    what = {
        "ingest": f"raw rows {result.get('raw_rows', 0):,}",
        "split": f"split rows {result.get('split_rows')}",
        "train": f"best val_loss {result.get('best_val_loss', float('nan')):.4f} after {result.get('epochs')} epoch(s)",
    }[name]
    memory = f"peak {result['peak_mib']:,.0f} MiB (the process {result['self_mib']:,.0f}, a child {result['children_mib']:,.0f})"
    return f"{result['seconds']:.1f} s (its process {result['process_seconds']:.1f} s with start and imports), {memory}; {what}"


def night(history_rows: int, old: bool, args) -> dict:
    """Build a history of ``history_rows`` rows in a throwaway project, run the previous night's
    split, land the night's month, run the new night's steps (and the old's); figures by step."""
    import shutil

    from pipelines.data.replay import land

    changes = {"split": {"window": args.window}, "train": {"max_epochs": args.epochs}}
    with throwaway_project([], None, changes) as config:
        built = build_history(config, history_rows, old)
        print(
            f"\n{history_rows:,} rows of history: {built['parts']} parts, {built['mib']:,.0f} MiB"
            + (f" (old single file {built['old_mib']:,.0f} MiB)" if old else "")
            + f", built in {built['seconds']:.1f} s",
            flush=True,
        )
        if not args.quick:  # the night's split then hashes only the night's part (and redoes the first DVC setup in --quick)
            previous = run_steps(["previous-split"], config.home)["previous-split"]
            print(f"  the previous night's split (DVC's first hash of the history; not part of the night): {describe('split', previous)}", flush=True)
        landed = land(config.dataset, NIGHT, args.night_rows)
        shutil.copyfile(landed, config.home / OLD / landed.name)
        names = [f"{implementation}-{name}" for implementation in ("new", "old")[: 2 if old else 1] for name in STEPS]
        groups = [names] if args.quick else [[name] for name in names]  # --quick: one process for the night's steps, new then old
        figures: dict[str, dict] = {"new": {}, "old": {}}
        for group in groups:
            for name, result in run_steps(group, config.home).items():
                implementation, step = name.split("-")
                figures[implementation][step] = result
                print(f"  {implementation} {step}: {describe(step, result)}", flush=True)
        return figures


def table(results: dict[int, dict]) -> None:
    print(f"\n{'history':>9} {'step':>7} {'new s':>8} {'new MiB':>8} {'old s':>8} {'old MiB':>8}  (MiB: the step's peak ru_maxrss)")
    for rows, figures in results.items():
        for name in (*STEPS, "night"):
            cells = []
            for implementation in ("new", "old"):
                steps = figures[implementation]
                if not steps:
                    cells.append(f"{'-':>8} {'-':>8}")
                elif name == "night":
                    cells.append(f"{sum(s['seconds'] for s in steps.values()):>8.1f} {max(s['peak_mib'] for s in steps.values()):>8,.0f}")
                else:
                    cells.append(f"{steps[name]['seconds']:>8.1f} {steps[name]['peak_mib']:>8,.0f}")
            print(f"{short(rows) if name == STEPS[0] else '':>9} {name:>7} {' '.join(cells)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=rows_count, default=None, help="rows of history (default: 1M 10M 100M)")
    parser.add_argument("--old-max", type=rows_count, default=None, help="the largest history the old steps run on (default 10M: they need ~6 GB there; 0: none)")
    parser.add_argument("--window", default="3 months", help="split.window")
    parser.add_argument("--epochs", type=int, default=2, help="train.max_epochs")
    parser.add_argument("--night-rows", type=int, default=None, help="flights of the night's month landed (default: all, about 27,000)")
    parser.add_argument("--quick", action="store_true", help=QUICK_NOTE)
    parser.add_argument("--steps", nargs="+", choices=sorted(CALLS), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps:
        steps(args.steps, args.out)
        return 0
    if args.quick:
        args.sizes, args.epochs, args.night_rows = args.sizes or [30_000, 120_000], 1, args.night_rows or 3000
        print(QUICK_NOTE)
    sizes = sorted(args.sizes or [1_000_000, 10_000_000, 100_000_000])
    if sizes[0] < 1:
        parser.error("--sizes: a history needs at least one row")
    old_max = args.old_max if args.old_max is not None else (sizes[-1] if args.quick else 10_000_000)
    print(
        f"one night ({NIGHT} landed: {'all' if args.night_rows is None else f'{args.night_rows:,}'} flights) on histories of "
        f"{', '.join(short(s) for s in sizes)} rows; split.window {args.window!r}, {args.epochs} epoch(s); old steps up to {short(old_max)}",
        flush=True,
    )
    results = {rows: night(rows, rows <= old_max, args) for rows in sizes}
    table(results)

    def night_s(rows: int, implementation: str) -> float:
        return sum(s["seconds"] for s in results[rows][implementation].values())

    smallest, largest = sizes[0], sizes[-1]
    peak = max(s["peak_mib"] for figures in results.values() for s in figures["new"].values())
    print_ratio(f"new night seconds, {short(largest)} / {short(smallest)} rows of history (target <= {NIGHT_TARGET})", night_s(largest, "new") / night_s(smallest, "new"))
    print_ratio(f"largest new step peak memory / {PEAK_TARGET_MIB / 1024:g} GiB, any size (target <= 1)", peak / PEAK_TARGET_MIB)
    for rows in sizes:
        if results[rows]["old"]:
            print_ratio(f"new night seconds / old night seconds at {short(rows)} rows", night_s(rows, "new") / night_s(rows, "old"))
            old_peak = max(s["peak_mib"] for s in results[rows]["old"].values())
            new_peak = max(s["peak_mib"] for s in results[rows]["new"].values())
            print_ratio(f"new night peak memory / old night peak memory at {short(rows)} rows", new_peak / old_peak)
    return 0


if __name__ == "__main__":
    sys.exit(main())
