"""The model card of one version of a tabular project's model: the evidence an approver sees
before a challenger goes to canary and to full traffic, and the record of it beside the version.

Written into the version's folder of the model repository, beside ``lineage.json``::

    model_repository/<model>/<N>/model_card.json   the card, JSON-able
    model_repository/<model>/<N>/model_card.html   the same content as one page: no script, no
                                                   asset from elsewhere, every value escaped

Seven sections, each always present; one whose data is missing says ``not available: <why>``
(``available`` false, ``reason``) instead of being left out, and so does any single value:

1. ``identity``: project, model, version, when it was made, its status, whether it serves, and
   the champion it is compared with: the served version when that is another one, else the
   version the gate compared it with.
2. ``data``: the data version (DVC's digests from the lineage) and the rows of each split, read
   from the split file only while its MD5 is still the one the lineage records, plus the row
   counts the lineage itself records (the gate's test rows, the threshold's validation rows,
   the drift reference).
3. ``gate``: the offline gate's metric, challenger and champion, the interval of their
   difference and how it was computed (paired bootstrap), the decision and reason, and every
   slice with its difference and whether it refused the challenger.
4. ``rollout``: the record the rollout DAG passes in (per stage the sequential test's record,
   traffic, agreement, latency), as given; None: not available, no rollout yet.
5. ``drift``: this version's training sample (``reference.parquet``) against the champion's,
   column by column, with the drift check's own calibrated test (``drift.judge`` on the
   champion's stored nulls, at ``monitoring.false_alarm_rate``).
6. ``lineage``: code version, the Airflow run, the candidate, training params and overrides,
   training and export facts (opset, parity gap, threshold).
7. ``limitations``: ``rollout.limitations`` from the config, then what the data shows: a forced
   gate, slices too small to be checked (fewer labelled test rows than ``gate.min_slice_rows``),
   slices the gate skipped, a gate without a champion or without seed noise, a version Triton
   refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jinja2

from pipelines.artifacts import REFERENCE_FILE
from pipelines.config import FeatureType, ProjectConfig
from pipelines.lineage import Record
from pipelines.serving import repository

CARD_JSON, CARD_HTML = "model_card.json", "model_card.html"
FORMAT = 1  # the card's layout; bumped when a section changes shape
SECTIONS = {
    "identity": "Identity",
    "data": "Data",
    "gate": "Offline gate",
    "rollout": "Rollout",
    "drift": "Training data drift against the champion",
    "lineage": "Lineage",
    "limitations": "Known limitations",
}
NOT_AVAILABLE = "not available: "
SMALL_SLICES_SHOWN = 8  # values named per column in the small-slices limitation; the rest are counted


class CardError(LookupError):
    """No card can be built: the version is not in the model repository, or has no lineage."""


def not_available(why: str) -> str:
    """The value of something the card cannot show, and why."""
    return NOT_AVAILABLE + why


def _missing(why: str) -> Record:
    """A section the card cannot fill."""
    return {"available": False, "reason": not_available(why)}


def model_card(config: ProjectConfig, version: int, rollout: Record | None = None) -> Record:
    """The card of ``version`` of the project's model (see the module's docstring for its
    sections), JSON-able: non-finite numbers become null. ``rollout``: the rollout DAG's record
    of this version (None: no rollout yet). Reads the version's lineage and ``reference.parquet``,
    the champion's reference and calibrated drift nulls, and the split files. ``CardError`` when
    the version is not in the model repository or has no ``lineage.json``."""
    model_dir = config.model_dir
    versions = repository.versions(model_dir)
    if version not in versions:
        raise CardError(f"no version {version} of {config.model.name} in {model_dir}; its versions are {versions}")
    try:
        lineage = repository.lineage_of(model_dir, version)
    except FileNotFoundError as missing:
        raise CardError(f"version {version} of {config.model.name} has no lineage.json in {model_dir / str(version)}: nothing to build its card from") from missing
    served = repository.served_version(model_dir)
    gate: Record = lineage.get("gate") or {}
    champion, champion_why = _champion(version, served, gate, versions)
    splits = _split_files(config, lineage)
    card: Record = {
        "card": {"format": FORMAT, "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "sections": SECTIONS},
        "identity": _identity(config, version, lineage, served, champion, champion_why),
        "data": _data(lineage, splits),
        "gate": _gate(lineage),
        "rollout": _missing("no rollout yet") if rollout is None else {"available": True, "record": rollout},
        "drift": _drift(config, version, champion, champion_why),
        "lineage": _lineage(lineage),
        "limitations": _limitations(config, lineage, splits),
    }
    clean: Record = _jsonable(card)
    return clean


def write_model_card(config: ProjectConfig, version: int, rollout: Record | None = None) -> dict[str, Path]:
    """Build the card of ``version`` (``model_card``) and write it beside the version as
    ``model_card.json`` and ``model_card.html``; returns their paths by kind (``json``, ``html``).

    Both are rendered first, then each written beside and renamed into place: a failure leaves
    the previous card (or none) and no partial file. ``CardError`` as ``model_card``."""
    card = model_card(config, version, rollout)
    texts = {"json": json.dumps(card, indent=2, allow_nan=False) + "\n", "html": render_html(card)}
    folder = config.model_dir / str(version)
    paths = {"json": folder / CARD_JSON, "html": folder / CARD_HTML}
    partials = {kind: path.with_name(f".{path.name}.partial") for kind, path in paths.items()}
    try:
        for kind, text in texts.items():
            partials[kind].write_text(text, encoding="utf-8")
        for kind, path in paths.items():
            os.replace(partials[kind], path)
    finally:
        for partial in partials.values():
            partial.unlink(missing_ok=True)
    return paths


# --- sections ------------------------------------------------------------------------------


def _champion(version: int, served: int | None, gate: Record, versions: list[int]) -> tuple[int | None, str]:
    """The version this one is compared with, and why that one (or why there is none)."""
    if served is not None and served != version:
        return served, "the served version"
    compared = gate.get("champion_version")
    if isinstance(compared, int) and compared != version and compared in versions:
        return compared, "the version the gate compared it with" + (" (this version serves now)" if served == version else "")
    if served is None:
        return None, "no champion (no version serves)"
    return None, "no champion (the first version: the gate compared it with none)"


def _identity(config: ProjectConfig, version: int, lineage: Record, served: int | None, champion: int | None, champion_why: str) -> Record:
    status = lineage.get("status", "published")
    return {
        "available": True,
        "project": config.name,
        "model": config.model.name,
        "version": version,
        "created_at": lineage.get("created_at") or not_available("the lineage records no creation time"),
        "status": f"{status}: {lineage['rejected_reason']}" if lineage.get("rejected_reason") else status,
        "serving": version == served,
        "served_version": served if served is not None else not_available("no version serves"),
        "champion": {"version": champion, "why": champion_why} if champion is not None else not_available(champion_why),
        "routing": _routing(config, version),
    }


def _routing(config: ProjectConfig, version: int) -> str:
    """The rollout the served model routes now (``repository.route_of``), in words."""
    route = repository.route_of(config.model_dir)
    if route is None:
        return "no rollout in progress"
    role = "this version" if route.challenger == version else f"version {route.challenger}"
    return f"{role} is the challenger, in {route.mode}" + (f", answering {route.share:.0%} of requests" if route.mode == repository.CANARY else "")


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _split_file(path: Path, name: str, recorded: str | None) -> Path | str:
    """``path`` if it still holds what the lineage recorded (DVC's MD5 of the file), else why not."""
    if not recorded:
        return not_available(f"the lineage records no digest of {name}")
    if not path.is_file():
        return not_available(f"{name} is gone")
    now = _md5(path)
    if now != recorded:
        return not_available(f"{name} has changed since (its MD5 is now {now[:8]}, the lineage records {recorded[:8]})")
    return path


SplitFiles = dict[str, tuple[str, str | None, Path | str]]  # part -> (file as the lineage names it, its digest, the file or why not)


def _split_files(config: ProjectConfig, lineage: Record) -> SplitFiles:
    """Per split part: its file (as the lineage names it), its recorded digest, and the file
    itself while unchanged since this version was trained, else why not."""
    from pipelines.data.split import split_paths

    data_version: Mapping[str, str] = lineage.get("data_version") or {}
    found = {}
    for part, path in split_paths(config.path(config.split.output_dir)).items():
        name = config.portable(path)
        found[part] = (name, data_version.get(name), _split_file(path, name, data_version.get(name)))
    return found


def _recorded(record: Any, *keys: str) -> Any:
    for key in keys:
        record = record.get(key) if isinstance(record, dict) else None
    return record


def _data(lineage: Record, files: SplitFiles) -> Record:
    import pyarrow.parquet as pq

    data_version = lineage.get("data_version")
    if not data_version:
        return _missing("the lineage records no data version")
    splits = []
    for part, (name, digest, file) in files.items():
        rows = pq.ParquetFile(file).metadata.num_rows if isinstance(file, Path) else file
        splits.append({"split": part, "file": name, "digest": digest or not_available("not in the data version"), "rows": rows})
    calibration = lineage.get("drift_calibration") or {}
    counts = [
        ("test rows the gate scored", ("gate", "test_rows")),
        ("labelled test rows (performance reference)", ("performance_reference", "test_rows")),
        ("labelled validation rows the decision threshold was chosen on", ("export", "threshold", "validation", "rows")),
        ("test rows of the export's parity check", ("export", "parity_rows")),
        ("training rows sampled into reference.parquet", ("drift_calibration", "reference_rows")),
    ]
    recorded = []
    for what, keys in counts:
        rows = _recorded(lineage, *keys)
        recorded.append({"what": what, "rows": rows if rows is not None else not_available(f"the lineage has no {'.'.join(keys)}"), "source": ".".join(keys)})
    if calibration.get("pool_rows"):
        recorded.append({"what": "training rows beside the reference (the drift null's pool)", "rows": calibration["pool_rows"], "source": "drift_calibration.pool_rows"})
    return {
        "available": True,
        "data_version": data_version,
        "splits": splits,
        "splits_note": "rows read from each split file while its MD5 is the one the lineage records",
        "recorded_rows": recorded,
    }


def _gate(lineage: Record) -> Record:
    gate: Record | None = lineage.get("gate")
    if not gate:
        return _missing("the lineage records no gate decision")
    metric = gate.get("metric")
    challenger, champion = gate.get("challenger") or {}, gate.get("champion")
    names = sorted({n for record in (challenger, champion or {}) for n, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool)}, key=lambda n: (n != metric, n))
    no_champion = not_available("there was no champion when it was gated")
    interval = gate.get("interval")
    settings = _recorded(lineage, "params", "gate") or {}
    section: Record = {
        "available": True,
        "metric": metric,
        "decision": gate.get("decision"),
        "reason": gate.get("reason"),
        "forced": bool(gate.get("forced")),
        "challenger": challenger.get(metric, not_available(f"the gate records no {metric}")),
        "champion": champion.get(metric) if champion else no_champion,
        "champion_version": gate.get("champion_version") if champion else no_champion,
        "test_rows": gate.get("test_rows", not_available("the gate records no test rows")),
        "metrics": [{"metric": n, "challenger": challenger.get(n), "champion": champion.get(n) if champion else no_champion} for n in names],
        "settings": {f"gate.{k}": settings[k] for k in ("floor", "min_improvement", "confidence", "resamples", "seed_noise", "min_slice_rows", "max_slice_regression") if k in settings},
    }
    if not isinstance(interval, dict):
        why = "there was no champion to compare with: the gate checked the floor only" if not champion else "the gate recorded no interval (a decision made before the gate tested significance)"
        return section | {"difference": not_available(why), "interval": not_available(why), "method": not_available(why), "slices": not_available(why)}
    method = f"{gate.get('method')}: {gate.get('resamples')} resamples of the test rows, seed {gate.get('seed')}"
    method += f", widened by seed noise {gate['seed_noise']:g}" if gate.get("seed_noise") else ", no seed noise added (gate.seed_noise not set)"
    slices = [
        {
            "slice": s.get("slice"),
            "rows": s.get("rows"),
            "challenger": s.get("challenger"),
            "champion": s.get("champion"),
            "difference": s.get("difference"),
            "low": (s.get("interval") or {}).get("low"),
            "high": (s.get("interval") or {}).get("high"),
            "refused": bool(s.get("refused")),
            "skipped": s.get("skipped"),
        }
        for s in gate.get("slices") or []
    ]
    return section | {
        "difference": gate.get("difference"),
        "interval": {"low": interval.get("low"), "high": interval.get("high"), "confidence": gate.get("confidence")},
        "method": method,
        "slice_confidence": gate.get("slice_confidence"),
        "slices": slices or not_available(f"no slice: no categorical value had {settings.get('min_slice_rows', 'gate.min_slice_rows')} labelled test rows and no gate.slices query was set"),
    }


def _drift(config: ProjectConfig, version: int, champion: int | None, champion_why: str) -> Record:
    import pandas as pd

    from pipelines.monitoring.check import monitored_columns, read_nulls
    from pipelines.monitoring.drift import DriftCheckError, dataset_verdict, judge

    if champion is None:
        return _missing(champion_why)
    ours, theirs = (config.model_dir / str(v) for v in (version, champion))
    for number, folder in ((version, ours), (champion, theirs)):
        if not (folder / REFERENCE_FILE).is_file():
            return _missing(f"version {number} has no {REFERENCE_FILE}")
    current, reference = pd.read_parquet(ours / REFERENCE_FILE), pd.read_parquet(theirs / REFERENCE_FILE)
    monitored = monitored_columns(config.dataset, config.monitoring)
    compared = {c: k for c, k in monitored.items() if c in current.columns and c in reference.columns}
    if not compared:
        return _missing(f"the two references share none of the monitored columns {sorted(monitored)}")
    rate = config.monitoring.false_alarm_rate
    try:
        nulls = read_nulls(theirs, reference, compared, config.monitoring)
        uncalibrated = [c for c in compared if c not in nulls]
        verdicts = judge(reference, current, {c: k for c, k in compared.items() if c in nulls}, rate, nulls)
    except DriftCheckError as error:
        return _missing(str(error))
    columns: list[Record] = []
    for column in monitored:
        if column in verdicts:
            v = verdicts[column]
            columns.append(
                {
                    "column": column,
                    "kind": v.kind,
                    "method": v.method,
                    "score": v.score,
                    "threshold": v.threshold,
                    "p_value": v.p_value,
                    "missing_share": v.missing_share,
                    "champion_missing_share": v.reference_missing_share,
                    "drifted": v.drifted,
                    "reason": v.reason,
                }
            )
        else:
            where = "the champion's calibration has no null for it" if column in uncalibrated else f"only one of the two references has it (features changed between versions {champion} and {version})"
            columns.append({"column": column, "kind": monitored[column].value, "drifted": not_available(where)})
    p_values = [verdicts[c].p_value for c in verdicts]
    return {
        "available": True,
        "champion_version": champion,
        "rows": {"this version": len(current), "champion": len(reference)},
        "method": (
            "the drift check's calibrated per-column test (pipelines.monitoring.drift.judge): normed Wasserstein distance (numeric) or "
            "Jensen-Shannon distance (categorical) against the champion's null calibrated per sample size, and Fisher's exact test on "
            f"the share of missing values, Bonferroni over the two; a column drifts at p <= monitoring.false_alarm_rate {rate:g}"
        ),
        "false_alarm_rate": rate,
        "columns": columns,
        "drifted_columns": [c for c, v in verdicts.items() if v.drifted],
        "dataset_drift": dataset_verdict(p_values, config.monitoring.drift_share, rate) if p_values else not_available("no column compared"),
        "note": "both samples come from training splits that may share rows (a retrain on data that grew), which makes a shift less likely to show",
    }


def _lineage(lineage: Record) -> Record:
    airflow = lineage.get("airflow") or {}
    params = lineage.get("params") or {}
    export = lineage.get("export") or {}
    threshold = export.get("threshold") or {}
    opset = _recorded(params, "export", "opset")
    return {
        "available": True,
        "code_version": lineage.get("code_version") or not_available("the lineage records no code version"),
        "dag_id": airflow.get("dag_id") or not_available("the lineage records no Airflow run"),
        "run_id": airflow.get("run_id") or not_available("the lineage records no Airflow run"),
        "run_type": airflow.get("run_type") or not_available("the lineage records no run type"),
        "logical_date": airflow.get("logical_date"),
        "trigger": airflow.get("trigger"),
        "candidate": lineage.get("candidate") or not_available("the lineage names no candidate folder"),
        "params": params or not_available("the lineage records no params"),
        "overrides": lineage.get("overrides") or {},
        "training": lineage.get("training") or not_available("the lineage records no training facts"),
        "export": {
            "onnx": export.get("onnx", not_available("the export record names no file")),
            "opset": opset if opset is not None else not_available("the lineage's params record no export.opset"),
            "parity_rows": export.get("parity_rows", not_available("the export record has no parity_rows")),
            "parity_gap": export.get("max_abs_diff", export.get("parity_max_difference", not_available("the export record has no parity gap (max_abs_diff)"))),
            "parity_tolerance": _recorded(params, "export", "parity_tolerance"),
            "threshold": threshold.get("value", not_available("no decision threshold (a regression, or exported before thresholds)")),
            "threshold_objective": threshold.get("objective"),
            "tensorrt": export.get("tensorrt"),
            "int8": export.get("int8"),
        },
        "drift_calibration": lineage.get("drift_calibration"),
        "performance_reference": lineage.get("performance_reference"),
        "live": lineage.get("live"),
    }


def _small_slices(config: ProjectConfig, lineage: Record, files: SplitFiles) -> list[Record]:
    """The categorical values of the labelled test rows left out of the slice check: fewer rows
    than ``gate.min_slice_rows`` (as the gate was set when it ran), one limitation per column."""
    import pandas as pd

    _, _, test = files["test"]
    if not isinstance(test, Path):
        return [{"source": "data", "text": f"the slices too small for the gate's slice check cannot be listed: {test.removeprefix(NOT_AVAILABLE)}"}]
    smallest = _recorded(lineage, "params", "gate", "min_slice_rows") or config.gate.min_slice_rows
    features = _recorded(lineage, "params", "dataset", "features") or [f.model_dump(mode="json") for f in config.dataset.features]
    label = _recorded(lineage, "params", "dataset", "label", "column") or config.dataset.label.column
    categorical = [f["name"] for f in features if f.get("type") == FeatureType.categorical.value]
    frame = pd.read_parquet(test, columns=[*categorical, label])
    labelled = frame[frame[label].notna()]
    found = []
    for column in categorical:
        counts = labelled[column].value_counts()
        small = counts[counts < smallest]  # largest first: the nearest to being a slice
        if small.empty:
            continue
        named = ", ".join(f"{value} ({rows})" for value, rows in small.head(SMALL_SLICES_SHOWN).items())
        more = f" and {len(small) - SMALL_SLICES_SHOWN} more" if len(small) > SMALL_SLICES_SHOWN else ""
        text = (
            f"{column}: {len(small)} values with fewer than {smallest} labelled test rows (gate.min_slice_rows) were left out of the slice check, "
            f"{int(small.sum())} of {len(labelled)} labelled test rows: {named}{more}"
        )
        found.append({"source": "data", "text": text})
    return found


def _limitations(config: ProjectConfig, lineage: Record, files: SplitFiles) -> Record:
    items: list[Record] = [{"source": "config (rollout.limitations)", "text": text} for text in config.rollout.limitations]
    gate: Record = lineage.get("gate") or {}
    if gate.get("forced"):
        reason = str(gate.get("reason") or "")
        # the gate's reason of a forced decision: "forced: <force_reason> (the gate said: <its own reason>)"
        why = reason.removeprefix("forced: ") if reason.startswith("forced: ") else f"{(lineage.get('overrides') or {}).get('force_reason')} (the gate said: {reason})"
        items.append({"source": "gate", "text": f"forced through the offline gate (force_publish), because: {why}"})
    if lineage.get("status") == "rejected":
        items.append({"source": "serving", "text": f"Triton refused this version at its smoke test: {lineage.get('rejected_reason')}"})
    if gate and not gate.get("champion"):
        items.append({"source": "gate", "text": "gated against the floor only: there was no champion to compare with"})
    elif isinstance(gate.get("interval"), dict) and not gate.get("seed_noise"):
        items.append({"source": "gate", "text": "the gate's interval leaves out seed-to-seed noise of training (gate.seed_noise not set: flywheel seed-noise measures it)"})
    for s in gate.get("slices") or []:
        if s.get("skipped"):
            items.append({"source": "gate", "text": f"slice {s.get('slice')} ({s.get('rows')} rows) was not compared: {s['skipped']}"})
    if lineage.get("data_version"):
        items.extend(_small_slices(config, lineage, files))
    return {"available": True, "items": items, "none": not_available("none configured in rollout.limitations and none found in the data") if not items else None}


# --- JSON and HTML -------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """``value`` with plain JSON types only: non-finite numbers null, numpy scalars as numbers,
    paths and anything else as text."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | str | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item"):  # a numpy scalar
        return _jsonable(value.item())
    return str(value)


def shown(value: Any) -> str:
    """A card value as the page writes it: a float to 4 decimals (4 significant digits below 0.001
    or from 10,000), yes or no, a dash for null, compact JSON for a record or a list."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e4 else f"{value:.4g}"
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def signed(value: Any) -> str:
    """A difference as the page writes it: ``shown``, with a sign when it is a positive number."""
    number = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
    return ("+" if number else "") + shown(value)


def flattened(record: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """A nested record as (dotted key, value) rows, in its order; a list stays one value."""
    rows: list[tuple[str, Any]] = []
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            rows.extend(flattened(value, f"{name}."))
        else:
            rows.append((name, value))
    return rows


def rollout_tables(record: Mapping[str, Any]) -> list[tuple[str | None, list[tuple[str, Any]]]]:
    """The rollout record as tables: one a stage (a key whose value is a record), titled by it,
    then one untitled table of the other keys (traffic, agreement, latency given at the top)."""
    stages = [(str(k), flattened(v)) for k, v in record.items() if isinstance(v, Mapping) and v]
    rest = [(str(k), v) for k, v in record.items() if not (isinstance(v, Mapping) and v)]
    return stages + ([(None, rest)] if rest else [])


def is_missing(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(NOT_AVAILABLE)


TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Model card: {{ identity.model }} version {{ identity.version }}</title>
<style>
  body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328; margin: 0; padding: 16px 24px 40px; max-width: 1200px; }
  h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 28px 0 8px; border-bottom: 1px solid #d1d9e0; padding-bottom: 4px; }
  h3 { font-size: 14px; margin: 14px 0 6px; }
  table { border-collapse: collapse; margin: 4px 0 8px; } th, td { text-align: left; vertical-align: top; padding: 4px 10px; border-bottom: 1px solid #d1d9e0; }
  th { background: #f6f8fa; font-size: 12px; color: #59636e; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
  .muted, .na { color: #59636e; } .na { font-style: italic; } .mono, td.key { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; }
  .bad { color: #b42318; font-weight: 600; } .good { color: #067647; font-weight: 600; } tr.refused td, tr.drifted td { background: #fee4e2; }
  td.value { word-break: break-word; max-width: 60em; }
</style>
</head>
<body>
{% macro v(x) %}{% if is_missing(x) %}<span class="na">{{ x }}</span>{% else %}{{ shown(x) }}{% endif %}{% endmacro %}
{% macro d(x) %}{% if is_missing(x) %}<span class="na">{{ x }}</span>{% else %}{{ signed(x) }}{% endif %}{% endmacro %}
{% macro kv(rows) %}<table class="kv">{% for key, value in rows %}<tr><td class="key">{{ key }}</td><td class="value">{{ v(value) }}</td></tr>{% endfor %}</table>{% endmacro %}
{% macro missing(section) %}<p class="na">{{ section.reason }}</p>{% endmacro %}
<h1>Model card: {{ identity.model }} version {{ identity.version }}</h1>
<p class="muted">Project {{ identity.project }} · built {{ card.built_at }} · the evidence for approving this version; JSON twin: model_card.json beside it.</p>

<section id="identity"><h2>{{ titles.identity }}</h2>
{{ kv([("project", identity.project), ("model", identity.model), ("version", identity.version), ("created at", identity.created_at),
       ("status", identity.status), ("serving", identity.serving), ("served version", identity.served_version), ("rollout in progress", identity.routing),
       ("champion", identity.champion if is_missing(identity.champion) else "version %s (%s)" % (identity.champion.version, identity.champion.why))]) }}
</section>

<section id="data"><h2>{{ titles.data }}</h2>
{% if not data.available %}{{ missing(data) }}{% else %}
<h3>Data version</h3>
<table><tr><th>file</th><th>digest (MD5, DVC)</th></tr>
{% for path, digest in data.data_version.items() %}<tr><td class="mono">{{ path }}</td><td class="mono">{{ digest }}</td></tr>{% endfor %}</table>
<h3>Rows per split</h3>
<table id="splits"><tr><th>split</th><th>file</th><th>rows</th></tr>
{% for s in data.splits %}<tr><td>{{ s.split }}</td><td class="mono">{{ s.file }}</td><td class="num">{{ v(s.rows) }}</td></tr>{% endfor %}</table>
<p class="muted">{{ data.splits_note }}</p>
<h3>Rows the lineage records</h3>
<table><tr><th>rows</th><th>what</th><th>lineage key</th></tr>
{% for r in data.recorded_rows %}<tr><td class="num">{{ v(r.rows) }}</td><td>{{ r.what }}</td><td class="mono">{{ r.source }}</td></tr>{% endfor %}</table>
{% endif %}
</section>

<section id="gate"><h2>{{ titles.gate }}</h2>
{% if not gate.available %}{{ missing(gate) }}{% else %}
<p><span class="{{ 'good' if gate.decision == 'promoted' else 'bad' }}">{{ gate.decision }}</span>{% if gate.forced %} <span class="bad">forced</span>{% endif %}: {{ gate.reason }}</p>
{{ kv([("metric", gate.metric), ("challenger", gate.challenger), ("champion", gate.champion), ("champion version", gate.champion_version), ("test rows", gate.test_rows),
       ("difference (challenger - champion, positive is better)", gate.difference if is_missing(gate.difference) else signed(gate.difference)),
       ("interval", gate.interval if is_missing(gate.interval) else "[%s, %s] at %s" % (shown(gate.interval.low), shown(gate.interval.high), shown(gate.interval.confidence))),
       ("computed by", gate.method)] + (gate.settings.items() | list)) }}
<h3>Metrics</h3>
<table id="gate-metrics"><tr><th>metric</th><th>challenger</th><th>champion</th></tr>
{% for m in gate.metrics %}<tr><td>{{ m.metric }}</td><td class="num">{{ v(m.challenger) }}</td><td class="num">{{ v(m.champion) }}</td></tr>{% endfor %}</table>
<h3>Slices</h3>
{% if is_missing(gate.slices) %}<p class="na">{{ gate.slices }}</p>{% else %}
<p class="muted">Each slice's interval at {{ shown(gate.slice_confidence) }} (Bonferroni over the slices); refused when it lies wholly below -max_slice_regression.</p>
<table id="gate-slices"><tr><th>slice</th><th>rows</th><th>challenger</th><th>champion</th><th>difference</th><th>interval</th><th>refused</th></tr>
{% for s in gate.slices %}<tr{% if s.refused %} class="refused"{% endif %}><td class="mono">{{ s.slice }}</td><td class="num">{{ s.rows }}</td>
{% if s.skipped %}<td colspan="5" class="na">skipped: {{ s.skipped }}</td>{% else %}
<td class="num">{{ v(s.challenger) }}</td><td class="num">{{ v(s.champion) }}</td><td class="num">{{ d(s.difference) }}</td>
<td class="num">[{{ v(s.low) }}, {{ v(s.high) }}]</td><td>{{ v(s.refused) }}</td>{% endif %}</tr>{% endfor %}</table>
{% endif %}
{% endif %}
</section>

<section id="rollout"><h2>{{ titles.rollout }}</h2>
{% if not rollout.available %}{{ missing(rollout) }}{% else %}
{% for title, rows in rollout_tables(rollout.record) %}{% if title %}<h3>{{ title }}</h3>{% endif %}{{ kv(rows) }}{% else %}<p class="na">not available: the rollout record is empty</p>{% endfor %}
{% endif %}
</section>

<section id="drift"><h2>{{ titles.drift }}</h2>
{% if not drift.available %}{{ missing(drift) }}{% else %}
<p>This version's training sample ({{ drift.rows["this version"] }} rows) against version {{ drift.champion_version }}'s ({{ drift.rows.champion }} rows):
{% if drift.drifted_columns %}<span class="bad">{{ drift.drifted_columns | length }} columns drifted</span>{% else %}<span class="good">no column drifted</span>{% endif %};
dataset drift: {{ v(drift.dataset_drift) }}.</p>
<p class="muted">{{ drift.method }}. Note: {{ drift.note }}.</p>
<table id="drift-columns"><tr><th>column</th><th>kind</th><th>method</th><th>score</th><th>threshold</th><th>p-value</th><th>missing (this / champion)</th><th>drifted</th></tr>
{% for c in drift.columns %}<tr{% if c.drifted is sameas true %} class="drifted"{% endif %}><td class="mono">{{ c.column }}</td><td>{{ c.kind }}</td>
{% if is_missing(c.drifted) %}<td colspan="6" class="na">{{ c.drifted }}</td>{% else %}
<td>{{ c.method }}</td><td class="num">{{ v(c.score) }}</td><td class="num">{{ v(c.threshold) }}</td><td class="num">{{ v(c.p_value) }}</td>
<td class="num">{{ v(c.missing_share) }} / {{ v(c.champion_missing_share) }}</td>
<td>{{ v(c.drifted) }}{% if c.reason %} <span class="muted">{{ c.reason }}</span>{% endif %}</td>{% endif %}</tr>{% endfor %}</table>
{% endif %}
</section>

<section id="lineage"><h2>{{ titles.lineage }}</h2>
{{ kv([("code version", lineage.code_version), ("Airflow DAG", lineage.dag_id), ("Airflow run", lineage.run_id), ("run type", lineage.run_type), ("logical date", lineage.logical_date),
       ("trigger", lineage.trigger), ("candidate folder", lineage.candidate)]) }}
<h3>Export</h3>{{ kv(flattened(lineage.export)) }}
<h3>Overrides (the run's Params)</h3>{% if lineage.overrides %}{{ kv(flattened(lineage.overrides)) }}{% else %}<p class="muted">none</p>{% endif %}
<h3>Training</h3>{% if is_missing(lineage.training) %}<p class="na">{{ lineage.training }}</p>{% else %}{{ kv(flattened(lineage.training)) }}{% endif %}
<h3>Training params</h3>{% if is_missing(lineage.params) %}<p class="na">{{ lineage.params }}</p>{% else %}{{ kv(flattened(lineage.params)) }}{% endif %}
{% if lineage.drift_calibration %}<h3>Drift calibration</h3>{{ kv(flattened(lineage.drift_calibration)) }}{% endif %}
{% if lineage.live %}<h3>Going live</h3>{{ kv(flattened(lineage.live)) }}{% endif %}
</section>

<section id="limitations"><h2>{{ titles.limitations }}</h2>
{% if limitations.items_ %}<table id="limitation-items"><tr><th>from</th><th>limitation</th></tr>
{% for item in limitations.items_ %}<tr><td>{{ item.source }}</td><td>{{ item.text }}</td></tr>{% endfor %}</table>
{% else %}<p class="na">{{ limitations.none }}</p>{% endif %}
</section>
</body>
</html>
"""


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.globals.update(shown=shown, signed=signed, flattened=flattened, rollout_tables=rollout_tables, is_missing=is_missing)
    return env


def render_html(card: Record) -> str:
    """The card (``model_card``) as one self-contained HTML page: a heading and tables per
    section, every value escaped (Jinja2 autoescape), no script, nothing loaded from elsewhere."""
    sections = {name: card[name] for name in SECTIONS}
    # ``items`` is a dict method to Jinja2: the limitations' list goes in under another name
    sections["limitations"] = {**card["limitations"], "items_": card["limitations"]["items"]}
    return _environment().from_string(TEMPLATE).render(card=card["card"], titles=SECTIONS, **sections)
