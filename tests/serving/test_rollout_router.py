"""The router in a real Triton (the tritonserver bundled in nvidia-pytriton): a promoted
challenger answers nothing in shadow while its answers are logged, answers a sticky share of
request ids as a canary, and every change of stage (and its end) is applied with zero failed
requests."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from pipelines.artifacts import MODEL_FILE, MODEL_VERSION, OUTPUT, REQUEST_ID
from pipelines.data.split import split_paths
from pipelines.data.versioning import version_split
from pipelines.evaluation.gate import evaluate, predict_onnx
from pipelines.export.onnx import export
from pipelines.launch.triton import TritonServer
from pipelines.serving import live, repository, rollout
from pipelines.serving.client import log_dir
from pipelines.serving.publish import publish
from pipelines.serving.repository import CANARY, SHADOW, Route
from pipelines.serving.rollback import rollback
from pipelines.training.train import train
from tests.conftest import free_ports, make_project
from tests.serving.traffic import Traffic
from tests.unit.test_split import write_raw

pytestmark = pytest.mark.e2e
pytest.importorskip("pytriton", reason="nvidia-pytriton (the tritonserver binary) installs on x86_64 Linux only")
FLUSH_SECONDS = 0.2
SHARE = 0.2


def run(run_id: str) -> dict:
    return {"dag_id": "retrain", "run_id": run_id, "run_type": "manual", "logical_date": None}


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    """A project with rollout on: version 1 serves, version 2 was published into shadow."""
    http, grpc, metrics = free_ports(3)
    triton = {"url": f"127.0.0.1:{http}", "http_port": http, "grpc_port": grpc, "metrics_port": metrics}
    config = make_project(
        tmp_path_factory.mktemp("rollout"),
        {"serving": {"triton": triton, "log": {"flush_seconds": FLUSH_SECONDS}}, "rollout": {"enabled": True, "canary_share": SHARE}},
    )
    write_raw(config, "2013-01", "2013-02", rows=3000)
    data_version = version_split(config)["data_version"]
    candidates = [train(config, data_version, {"max_epochs": 1, "learning_rate": 1e-3})["candidate"], train(config, data_version)["candidate"]]
    for candidate in candidates:
        export(config, candidate)
    rows = pd.read_parquet(split_paths(config.split.output_dir)["test"]).head(200)
    with TritonServer(config):
        first = publish(config, candidates[0], evaluate(config, candidates[0], force_publish=True, force_reason="test: champion"), data_version, run("night1"))
        second = publish(config, candidates[1], evaluate(config, candidates[1], force_publish=True, force_reason="test: challenger"), data_version, run("night2"))
        yield config, rows, first, second, candidates


def ask(client, config, rows: pd.DataFrame, request_id: str):
    """One request with ``request_id``: (answering version per row, predictions); the version is
    an output during a rollout, else the version Triton served."""
    import tritonclient.http as http

    response = client.infer(config.model.name, live.request_inputs(config.dataset, rows, http), request_id=request_id)
    versions = response.as_numpy(MODEL_VERSION)
    versions = versions[:, 0] if versions is not None else np.full(len(rows), int(response.get_response()["model_version"]))
    return versions, response.as_numpy(OUTPUT)[:, 0]


def logged(folder, keys: set[str], timeout: float = 15) -> pd.DataFrame:
    """The rows of ``keys`` in the log ``folder`` once all are there, by key."""
    from pipelines.monitoring.check import read_window

    deadline = time.monotonic() + timeout
    while True:
        rows = read_window(folder, pd.Timestamp("2000-01-01", tz="UTC").to_pydatetime(), pd.Timestamp.now(tz="UTC").to_pydatetime() + pd.Timedelta(hours=1))
        rows = rows[rows[REQUEST_ID].isin(keys)] if len(rows) else rows
        if len(rows) and keys <= set(rows[REQUEST_ID]):
            return rows.drop_duplicates(REQUEST_ID).set_index(REQUEST_ID)
        assert time.monotonic() < deadline, f"{len(keys - set(rows[REQUEST_ID] if len(rows) else []))} of {len(keys)} keys not in {folder} after {timeout} s"
        time.sleep(0.1)


def test_in_shadow_the_champion_answers_and_the_challengers_answers_are_logged(routed):
    config, rows, first, second, _ = routed
    assert first["version"] == 1 and first["rollout"] is None  # a first version serves in full
    assert second["version"] == 2 and second["rollout"] == 2 and second["served_version"] == 1
    assert repository.route_of(config.model_dir) == Route(2, SHADOW, 0.0)

    client = live.connect(config.serving.triton)
    keys = [f"shadow-{i}" for i in range(40)]
    answers = [ask(client, config, rows.iloc[[i]], key) for i, key in enumerate(keys)]

    assert all(versions[0] == 1 for versions, _ in answers)  # the client only ever sees the champion
    champion, challenger = (predict_onnx(config.model_dir / str(v) / MODEL_FILE, rows.head(40)) for v in (1, 2))
    np.testing.assert_allclose([p[0] for _, p in answers], champion, atol=1e-6)
    assert not np.allclose(champion, challenger, atol=1e-3)  # else the test could not tell them apart
    main = logged(log_dir(config.serving, config.served_model), set(keys)).loc[keys]
    shadow = logged(rollout.shadow_log_dir(config), set(keys)).loc[keys]
    assert set(main["model_version"]) == {1} and set(shadow["model_version"]) == {2}
    np.testing.assert_allclose(shadow[OUTPUT], challenger, atol=1e-6)
    np.testing.assert_allclose(main[OUTPUT], champion, atol=1e-6)


def test_shadow_adds_little_to_the_clients_latency(routed):
    """p50 of one-row requests with shadow on vs off, alternating rounds on the same server; the
    bound is loose (2 shared cores, where the mirror thread competes with the next request)."""
    config, rows, *_ = routed
    client = live.connect(config.serving.triton)
    timings: dict[bool, list[float]] = {True: [], False: []}
    for round_ in range(4):
        shadow_on = round_ % 2 == 0
        live.route(config, Route(2, SHADOW, 0.0) if shadow_on else None, run(f"latency-{round_}"), event=SHADOW if shadow_on else "abort")
        for i in range(150):
            started = time.perf_counter()
            ask(client, config, rows.iloc[[i % len(rows)]], f"latency-{round_}-{i}")
            timings[shadow_on].append(time.perf_counter() - started)
    on, off = (float(np.median(timings[flag])) * 1000 for flag in (True, False))
    print(f"p50 one-row latency: shadow on {on:.2f} ms, off {off:.2f} ms ({on / off:.2f}x)")
    assert on <= 1.5 * off + 1.0, (on, off)
    live.route(config, Route(2, SHADOW, 0.0), run("latency-end"), event=SHADOW)


def test_a_canary_answers_its_share_of_request_ids_each_always_by_the_same_version(routed):
    config, rows, *_ = routed
    with Traffic(lambda: live.connect(config.serving.triton), lambda client: ask(client, config, rows.head(3), "")) as traffic:
        rollout.advance(config, 2, CANARY, run("canary"), reason="test")
    assert traffic.failures == [], traffic.failures[:3]
    assert repository.route_of(config.model_dir) == Route(2, CANARY, SHARE)

    client = live.connect(config.serving.triton)
    keys = [f"flight-{i}" for i in range(1500)]
    first = [int(ask(client, config, rows.iloc[[i % len(rows)]], key)[0][0]) for i, key in enumerate(keys)]
    share = np.mean(np.array(first) == 2)
    tolerance = 4 * np.sqrt(SHARE * (1 - SHARE) / len(keys))  # 4 sd of a binomial share: a false failure 1 in 15,000
    assert abs(share - SHARE) <= tolerance, (share, tolerance)
    again = [int(ask(client, config, rows.iloc[[(i + 7) % len(rows)]], key)[0][0]) for i, key in enumerate(keys[:300])]
    assert again == first[:300]  # sticky: the same id, the same version, whatever the rows
    # each answer is logged under its version, and the other version's in the shadow log
    main = logged(log_dir(config.serving, config.served_model), set(keys[:300]))
    shadow = logged(rollout.shadow_log_dir(config), set(keys[:300]))
    np.testing.assert_array_equal(main.loc[keys[:300], "model_version"], first[:300])
    np.testing.assert_array_equal(shadow.loc[keys[:300], "model_version"], [3 - v for v in first[:300]])
    # the router's counts on Triton's metrics endpoint, the failures exported from 0 (what the canary alerts read)
    counts = router_counts(config)
    assert counts[("flywheel_router_requests_total", "2", "challenger")] >= first.count(2) + again.count(2)
    assert counts[("flywheel_router_failures_total", "2", "challenger")] == counts[("flywheel_router_failures_total", "1", "champion")] == 0


def router_counts(config) -> dict[tuple[str, str, str], float]:
    """``flywheel_router_*_total`` of the project on Triton's metrics endpoint, by (name, version, role)."""
    import re
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{config.serving.triton.metrics_port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    counts = {}
    for name, labels, value in re.findall(r"^(flywheel_router_\w+_total)\{([^}]*)\} (\S+)$", text, re.M):
        label = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if label.get("project") == config.name:
            counts[(name, label["version"], label["role"])] = float(value)
    return counts


def test_full_rollout_and_an_alerts_rollback_switch_with_zero_failed_requests(routed):
    config, rows, *_ = routed
    with Traffic(lambda: live.connect(config.serving.triton), lambda client: ask(client, config, rows.head(3), "")) as traffic:
        rollout.advance(config, 2, rollout.FULL, run("full"), reason="test")
    assert traffic.failures == [], traffic.failures[:3]
    assert repository.served_version(config.model_dir) == 2 and repository.route_of(config.model_dir) is None
    lineage = repository.lineage_of(config.model_dir, 2)["rollout"]
    assert lineage["outcome"] == "full" and {SHADOW, CANARY, "full"} <= set(lineage["stages"])

    # a third version goes into shadow, then an alert's rollback (no version) ends its rollout
    config, rows, _, _, candidates = routed
    third = publish(config, candidates[0], evaluate(config, candidates[0], force_publish=True, force_reason="test: third"), {}, run("night3"))
    assert third["rollout"] == 3 and repository.route_of(config.model_dir) == Route(3, SHADOW, 0.0)
    with Traffic(lambda: live.connect(config.serving.triton), lambda client: ask(client, config, rows.head(3), "")) as traffic:
        result = rollback(config, None, run("alert"), reason="FlywheelCanaryErrors")
    assert traffic.failures == [], traffic.failures[:3]
    assert result["ended_rollout"] == 3 and repository.served_version(config.model_dir) == 2 and repository.route_of(config.model_dir) is None
    assert repository.lineage_of(config.model_dir, 3)["rollout"]["outcome"] == "aborted"
    # with no rollout in progress, the alert's rollback serves the version served before
    assert rollback(config, None, run("alert2"), reason="test")["version"] == 1
