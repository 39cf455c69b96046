"""The model card of a version: two versions of a real project trained, gated and published
without Triton (the second one forced through the gate), then every section of their cards
checked against the lineage, the split files and the drift check; the HTML escaped and
self-contained, the files written whole or not at all; the on-call plugin serving the card."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
from fastapi import FastAPI, HTTPException, Request
from fastapi.testclient import TestClient

from pipelines.artifacts import REFERENCE_FILE
from pipelines.config import load_config
from pipelines.data.split import split_paths
from pipelines.data.versioning import version_split
from pipelines.evaluation.gate import evaluate
from pipelines.export.onnx import export
from pipelines.monitoring.check import monitored_columns, read_nulls
from pipelines.monitoring.drift import judge
from pipelines.serving import model_card as cards
from pipelines.serving import repository
from pipelines.serving.model_card import CARD_HTML, CARD_JSON, SECTIONS, CardError, model_card, render_html, write_model_card
from pipelines.serving.publish import publish
from pipelines.training.train import train
from tests.conftest import REPO, make_project
from tests.unit.test_split import write_raw

if str(REPO / "plugins") not in sys.path:
    sys.path.append(str(REPO / "plugins"))

from flywheel_oncall import app as oncall  # noqa: E402

HOSTILE = "<script>alert('card')</script> flights from New York only"
LIMITATIONS = ["Trained on 2013 flights from the three New York airports only.", HOSTILE]
FORCE_REASON = "test: a challenger forced through the gate"
ROLLOUT = {
    "shadow": {
        "decision": "promote",
        "reason": "lower bound -0.0040 above -margin 0.01",
        "rows": 812,
        "mean": 0.0031,
        "lower": -0.004,
        "upper": 0.0102,
        "alpha": 0.05,
        "tau": 0.01,
        "margin": 0.01,
        "traffic": {"1": 5120, "2": 0},
        "agreement": 0.947,
        "latency_ms": {"p50": 2.4, "p99": 9.8},
    },
    "canary": {"decision": "continue", "rows": 57, "traffic": {"1": 4096, "2": 1024}},
}


def run(run_id: str) -> dict:
    return {"dag_id": "retrain__flights", "run_id": run_id, "run_type": "manual", "logical_date": None}


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """Version 1 trained on January and February and published with no champion (its card
    written then), version 2 trained on January to March, forced through the gate and published
    over it; nothing of Triton."""
    config = make_project(tmp_path_factory.mktemp("card") / "home", {"rollout": {"limitations": LIMITATIONS}})
    write_raw(config, "2013-01", "2013-02", rows=3000)
    data_version = version_split(config)["data_version"]
    first = train(config, data_version)
    export(config, first["candidate"])
    assert publish(config, first["candidate"], evaluate(config, first["candidate"]), data_version, run("manual__1"), {"force_publish": False})["version"] == 1
    first_card = model_card(config, 1)

    write_raw(config, "2013-01", "2013-02", "2013-03", rows=3000)
    data_version = version_split(config)["data_version"]
    second = train(config, data_version, {"max_epochs": 1})
    export(config, second["candidate"])
    forced = evaluate(config, second["candidate"], force_publish=True, force_reason=FORCE_REASON)
    overrides = {"force_publish": True, "force_reason": FORCE_REASON, "max_epochs": 1}
    assert publish(config, second["candidate"], forced, data_version, run("manual__2"), overrides)["version"] == 2
    return config, first_card


@pytest.fixture
def home_copy(published, tmp_path):
    """The published deployment copied, for a test that changes its files."""
    config, _ = published
    shutil.copytree(config.home, tmp_path / "home")
    return load_config(config.name, tmp_path / "home")


def test_every_section_is_present_with_the_lineages_values(published):
    config, _ = published
    lineage = repository.lineage_of(config.model_dir, 2)

    card = model_card(config, 2, ROLLOUT)

    assert list(card) == ["card", *SECTIONS] and all(card[name]["available"] for name in SECTIONS)
    identity = card["identity"]
    assert (identity["project"], identity["model"], identity["version"], identity["status"]) == ("flights", "flights_delay", 2, "published")
    assert identity["serving"] is True and identity["created_at"] == lineage["created_at"]
    assert identity["champion"]["version"] == 1  # version 2 serves: the version the gate compared it with
    assert identity["routing"] == "no rollout in progress"
    # data: the DVC digests, the rows of each split read from its (unchanged) file
    data = card["data"]
    assert data["data_version"] == lineage["data_version"]
    files = split_paths(config.split.output_dir)
    assert {s["split"]: s["rows"] for s in data["splits"]} == {part: len(pd.read_parquet(path)) for part, path in files.items()}
    assert {r["source"]: r["rows"] for r in data["recorded_rows"]}["gate.test_rows"] == lineage["gate"]["test_rows"]
    # gate: the lineage's decision, metric, interval and slices
    gate, recorded = card["gate"], lineage["gate"]
    assert gate["metric"] == recorded["metric"] == "roc_auc"
    assert (gate["challenger"], gate["champion"]) == (recorded["challenger"]["roc_auc"], recorded["champion"]["roc_auc"])
    assert gate["interval"]["low"] == recorded["interval"]["low"] and gate["interval"]["high"] == recorded["interval"]["high"]
    assert gate["difference"] == recorded["difference"] and gate["forced"] is True and gate["decision"] == "promoted"
    assert gate["method"].startswith("paired bootstrap") and "1000 resamples" in gate["method"]
    assert [(s["slice"], s["difference"], s["refused"]) for s in gate["slices"]] == [(s["slice"], s["difference"], s["refused"]) for s in recorded["slices"]]
    assert gate["slices"] and gate["metrics"][0]["metric"] == "roc_auc"
    # rollout: the record as given
    assert card["rollout"]["record"] == ROLLOUT
    # lineage: code, run, candidate, params, overrides, export facts
    facts = card["lineage"]
    assert (facts["code_version"], facts["run_id"], facts["dag_id"], facts["run_type"]) == (lineage["code_version"], "manual__2", "retrain__flights", "manual")
    assert facts["candidate"] == lineage["candidate"] and facts["params"] == lineage["params"]
    assert facts["overrides"]["force_reason"] == FORCE_REASON
    assert facts["export"]["opset"] == config.export.opset and facts["export"]["parity_gap"] == lineage["export"]["max_abs_diff"]
    assert facts["export"]["threshold"] == lineage["export"]["threshold"]["value"]
    json.dumps(card, allow_nan=False)  # JSON-able as it is


def test_the_drift_section_is_the_drift_checks_own_test_one_row_per_monitored_feature(published):
    config, _ = published
    ours, theirs = (pd.read_parquet(config.model_dir / v / REFERENCE_FILE) for v in ("2", "1"))
    columns = monitored_columns(config.dataset, config.monitoring)

    drift = model_card(config, 2)["drift"]

    assert [c["column"] for c in drift["columns"]] == list(columns)  # month and day are excluded by the project's monitoring
    assert "month" not in [c["column"] for c in drift["columns"]] and drift["champion_version"] == 1
    expected = judge(theirs, ours, columns, config.monitoring.false_alarm_rate, read_nulls(config.model_dir / "1", theirs, columns, config.monitoring))
    assert {c["column"]: (c["score"], c["p_value"], c["drifted"]) for c in drift["columns"]} == {c: (v.score, v.p_value, v.drifted) for c, v in expected.items()}
    assert drift["rows"] == {"this version": len(ours), "champion": len(theirs)}
    assert "calibrated" in drift["method"] and "Wasserstein" in drift["method"]


def test_a_shifted_training_sample_shows_as_drift_of_that_column_only(home_copy):
    # Given version 2's training sample with every distance doubled
    reference = home_copy.model_dir / "2" / REFERENCE_FILE
    frame = pd.read_parquet(reference)
    frame.assign(distance=frame["distance"] * 2).to_parquet(reference, index=False)

    drift = model_card(home_copy, 2)["drift"]

    assert drift["drifted_columns"] == ["distance"]
    (distance,) = (c for c in drift["columns"] if c["column"] == "distance")
    assert distance["drifted"] is True and "wasserstein" in distance["reason"]


def test_the_first_version_has_no_champion_and_each_section_says_what_is_missing(published):
    _, first = published

    assert list(first) == ["card", *SECTIONS]
    assert first["drift"] == {"available": False, "reason": "not available: no champion (the first version: the gate compared it with none)"}
    assert first["rollout"] == {"available": False, "reason": "not available: no rollout yet"}
    assert first["identity"]["champion"].startswith("not available: no champion")
    assert first["gate"]["available"] and first["gate"]["champion"] == "not available: there was no champion when it was gated"
    assert first["gate"]["interval"].startswith("not available: ") and first["gate"]["slices"].startswith("not available: ")
    assert any(item["text"].startswith("gated against the floor only") for item in first["limitations"]["items"])


def test_an_older_version_is_compared_with_the_served_one(published):
    config, _ = published

    card = model_card(config, 1)

    assert card["identity"]["serving"] is False and card["identity"]["champion"] == {"version": 2, "why": "the served version"}
    assert card["drift"]["champion_version"] == 2


def test_limitations_come_from_the_config_the_forced_gate_and_the_small_slices(published):
    config, _ = published
    lineage = repository.lineage_of(config.model_dir, 2)

    items = model_card(config, 2)["limitations"]["items"]

    assert [i["text"] for i in items[:2]] == LIMITATIONS and items[0]["source"] == "config (rollout.limitations)"
    (forced,) = (i for i in items if i["text"].startswith("forced through the offline gate"))
    assert FORCE_REASON in forced["text"] and "the gate said" in forced["text"]
    # the test split's categorical values below gate.min_slice_rows, which no slice checked
    test = pd.read_parquet(split_paths(config.split.output_dir)["test"])
    small = test["dest"].value_counts()
    small = small[small < config.gate.min_slice_rows]
    (dest,) = (i for i in items if i["text"].startswith("dest: "))
    assert dest["text"].startswith(f"dest: {len(small)} values with fewer than {config.gate.min_slice_rows} labelled test rows")
    assert f"{small.index[0]} ({small.iloc[0]})" in dest["text"]  # the one nearest to a slice named first
    assert not any(s["slice"].startswith("dest=") and s["rows"] < config.gate.min_slice_rows for s in lineage["gate"]["slices"])


def test_a_split_file_changed_since_training_gives_no_rows_and_says_why(home_copy):
    test = split_paths(home_copy.split.output_dir)["test"]
    pd.read_parquet(test).head(10).to_parquet(test, index=False)

    card = model_card(home_copy, 2)

    rows = {s["split"]: s["rows"] for s in card["data"]["splits"]}
    assert rows["test"].startswith("not available: data/flights/split/test.parquet has changed since")
    assert isinstance(rows["train"], int)
    assert any("cannot be listed: data/flights/split/test.parquet has changed" in i["text"] for i in card["limitations"]["items"])


def test_the_html_has_every_section_and_escapes_what_it_shows(published):
    config, _ = published

    html = render_html(model_card(config, 2, {**ROLLOUT, "note": "<img src=x onerror=alert(1)>"}))

    for name, title in SECTIONS.items():
        assert f'<section id="{name}"><h2>{title}</h2>' in html
    assert "<script" not in html and "&lt;script&gt;alert(&#39;card&#39;)&lt;/script&gt; flights from New York only" in html
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "src=" not in html.replace("&lt;img src=", "") and "<link" not in html and "http://" not in html and "https://" not in html  # nothing loaded from elsewhere
    assert "<h3>shadow</h3>" in html and "latency_ms.p99" in html and "0.9470" in html  # the rollout record, as tables
    assert f"{model_card(config, 2)['gate']['challenger']:.4f}" in html


def test_write_puts_both_files_beside_the_version(published):
    config, _ = published

    paths = write_model_card(config, 2, ROLLOUT)

    assert paths == {"json": config.model_dir / "2" / CARD_JSON, "html": config.model_dir / "2" / CARD_HTML}
    written = json.loads(paths["json"].read_text())
    assert {k: v for k, v in written.items() if k != "card"} == {k: v for k, v in model_card(config, 2, ROLLOUT).items() if k != "card"}
    assert paths["html"].read_text().startswith("<!doctype html>") and paths["html"].read_text().rstrip().endswith("</html>")
    assert not list((config.model_dir / "2").glob(".*partial"))


def test_a_failed_write_keeps_the_previous_card_and_leaves_no_partial_file(home_copy, monkeypatch):
    before = write_model_card(home_copy, 2)
    kept = {kind: path.read_bytes() for kind, path in before.items()}
    real = Path.write_text

    def disk_full(path, text, *args, **kwargs):
        if path.name.endswith(f"{CARD_HTML}.partial"):
            real(path, text[:100], *args, **kwargs)  # a torn write, then the error
            raise OSError(28, "No space left on device")
        return real(path, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_model_card(home_copy, 2, ROLLOUT)

    assert {kind: path.read_bytes() for kind, path in before.items()} == kept
    assert not list((home_copy.model_dir / "2").glob(".*partial"))


def test_a_failed_render_writes_nothing(home_copy, monkeypatch):
    def broken(card):
        raise RuntimeError("template error")

    folder = home_copy.model_dir / "2"
    for card in (CARD_JSON, CARD_HTML):
        (folder / card).unlink(missing_ok=True)  # a card an earlier test wrote
    monkeypatch.setattr(cards, "render_html", broken)
    with pytest.raises(RuntimeError):
        write_model_card(home_copy, 2)

    assert not [p.name for p in folder.iterdir() if "card" in p.name]


def test_a_version_that_does_not_exist_is_a_clear_error(published):
    config, _ = published

    with pytest.raises(CardError, match=r"no version 7 of flights_delay in .*; its versions are \[1, 2\]"):
        model_card(config, 7)


# --- the on-call plugin ----------------------------------------------------------------------


class Allowed(oncall.Access):
    """A logged-in user the auth manager lets read every DAG but ``refused``."""

    refused: set[str] = set()

    def require(self, dag_id: str, method: str = "GET", entity=None) -> None:
        if dag_id in self.refused:
            raise HTTPException(403, "Forbidden")


@pytest.fixture
def plugin(home_copy, monkeypatch):
    """The plugin mounted as the api-server mounts it, over the copied deployment."""
    monkeypatch.setenv("FLYWHEEL_HOME", str(home_copy.home))
    app = oncall.create_app()
    root = FastAPI()
    root.mount(oncall.URL_PREFIX, app)
    return app, TestClient(root)


def log_in(app, refused: set[str] = frozenset()) -> None:
    class Caller(Allowed):
        pass

    Caller.refused = set(refused)

    def caller(request: Request) -> oncall.Access:
        return Caller(request, "viewer")

    app.dependency_overrides = {oncall.access: caller}


def test_the_plugin_serves_a_versions_card_and_the_models_page_links_it(plugin, home_copy):
    app, client = plugin
    write_model_card(home_copy, 2, ROLLOUT)
    url = "/flywheel/projects/flights/versions/2/card"

    assert client.get(url).status_code == 401  # no Airflow login
    log_in(app, refused={"retrain__flights"})
    assert client.get(url).status_code == 403  # as the Models page: the retrain DAG's read permission
    log_in(app)
    page = client.get(url)
    models = client.get("/flywheel/projects/flights/models").text
    missing = client.get("/flywheel/projects/flights/versions/1/card")

    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert all(f"<h2>{title}</h2>" in page.text for title in SECTIONS.values())
    assert f'href="{url}">card</a>' in models and 'href="/flywheel/projects/flights/versions/1/card"' not in models
    assert missing.status_code == 404 and "version 1 of flights_delay has no model card yet" in missing.json()["detail"]
    assert client.get("/flywheel/projects/flights/versions/9/card").json()["detail"].startswith("flights has no version 9")
    assert client.get("/flywheel/projects/flights/versions/..%2F1/card").status_code in (404, 422)
