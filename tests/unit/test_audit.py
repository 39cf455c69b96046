"""The audit trail (pipelines/audit.py): append-only JSON lines, one file a project, under a lock."""

from __future__ import annotations

import json
import multiprocessing
from datetime import datetime, timedelta, timezone

import pytest

from pipelines import audit
from pipelines.config import load_config
from tests.conftest import make_project

T0 = datetime(2026, 3, 2, 11, 0, tzinfo=timezone.utc)


@pytest.fixture
def flights(tmp_path):
    return make_project(tmp_path / "home")


def test_an_entry_round_trips_with_its_optional_fields_only_when_given(flights):
    first = audit.record(
        flights, action=audit.ROLLBACK, user="alice", reason="v4 drops 3 points on carrier=UA", outcome="triggered",
        dag_id="rollback__flights", run_id="manual__2026-03-02T11:00:00", details={"version": 3, "from": 4}, now=T0,
    )
    second = audit.record(flights, action=audit.APPROVAL, user="bob", reason="", outcome="approved", now=T0 + timedelta(minutes=5))

    entries, problems = audit.read(flights)

    assert problems == []
    assert entries == [first, second]
    assert first == {
        "time": "2026-03-02T11:00:00+00:00", "project": "flights", "action": "rollback", "user": "alice",
        "reason": "v4 drops 3 points on carrier=UA", "outcome": "triggered", "dag_id": "rollback__flights",
        "run_id": "manual__2026-03-02T11:00:00", "details": {"version": 3, "from": 4},
    }
    assert set(second) == {"time", "project", "action", "user", "reason", "outcome"}
    assert audit.audit_file(flights) == flights.artifacts_dir / "audit.jsonl"
    assert [json.loads(line) for line in audit.audit_file(flights).read_text().splitlines()] == [first, second]


def test_the_time_is_written_in_utc_whatever_the_zone_given(flights):
    paris = timezone(timedelta(hours=1))

    entry = audit.record(flights, action=audit.RETRAIN, user="alice", reason="drift", outcome="triggered", now=T0.astimezone(paris))

    assert entry["time"] == "2026-03-02T11:00:00+00:00"


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"action": "delete"}, "audit action 'delete': expected one of ['retrain', 'rollback', 'acknowledge', 'force_publish', 'approval']"),
        ({"user": " "}, "audit user is empty"),
        ({"outcome": ""}, "audit outcome of retrain is empty"),
        ({"reason": ""}, "audit reason of retrain is empty"),
        ({"details": {"at": T0}}, "audit details"),
        ({"now": datetime(2026, 3, 2, 11)}, "expected a timezone-aware time"),
    ],
)
def test_a_bad_entry_is_refused_naming_the_field_and_nothing_is_written(flights, changes, error):
    fields = {"action": audit.RETRAIN, "user": "alice", "reason": "drift", "outcome": "triggered", **changes}

    with pytest.raises(ValueError, match=error.replace("[", r"\[").replace("]", r"\]")):
        audit.record(flights, **fields)

    assert audit.read(flights) == ([], [])


def test_no_file_yet_is_an_empty_trail(flights):
    assert not audit.audit_file(flights).exists()
    assert audit.read(flights) == ([], [])


def test_a_torn_last_line_is_reported_and_the_next_entry_is_whole_on_a_line_of_its_own(flights):
    kept = audit.record(flights, action=audit.RETRAIN, user="alice", reason="drift", outcome="triggered", now=T0)
    with audit.audit_file(flights).open("ab") as file:  # a crash mid-append
        file.write(b'{"time": "2026-03-02T11:05:00+00:00", "project": "fli')

    entries, problems = audit.read(flights)

    assert entries == [kept]
    assert len(problems) == 1 and problems[0].startswith("line 2: not JSON") and '"project": "fli' in problems[0]

    after = audit.record(flights, action=audit.ROLLBACK, user="bob", reason="bad canary", outcome="triggered", now=T0 + timedelta(minutes=10))
    entries, problems = audit.read(flights)

    assert entries == [kept, after]
    assert len(problems) == 1 and problems[0].startswith("line 2: ")
    assert audit.audit_file(flights).read_text().endswith(json.dumps(after) + "\n")


def test_lines_that_are_not_entries_are_each_named_by_number(flights):
    audit.record(flights, action=audit.RETRAIN, user="alice", reason="drift", outcome="triggered", now=T0)
    with audit.audit_file(flights).open("a") as file:
        file.write("[1, 2]\n")
        file.write(json.dumps({"time": "2026-03-02T12:00:00+00:00", "project": "flights", "action": "retrain"}) + "\n")
        file.write(json.dumps({"time": "yesterday", "project": "flights", "action": "retrain", "user": "a", "reason": "r", "outcome": "o"}) + "\n")

    entries, problems = audit.read(flights)

    assert len(entries) == 1
    assert [p.split(":")[0] for p in problems] == ["line 2", "line 3", "line 4"]
    assert "not a JSON object" in problems[0]
    assert "missing user, reason, outcome" in problems[1]
    assert "time 'yesterday'" in problems[2]


def trail(flights) -> list[dict]:
    other = flights.model_copy(update={"name": "taxis"})
    rows = [
        (flights, audit.RETRAIN, "alice", 0),
        (flights, audit.ROLLBACK, "bob", 60),
        (other, audit.RETRAIN, "bob", 120),
        (flights, audit.ACKNOWLEDGE, "alice", 180),
        (flights, audit.RETRAIN, "carol", 180),  # the same second as the acknowledgement, appended after it
    ]
    for config, action, user, minutes in rows:
        audit.record(config, action=action, user=user, reason="why", outcome="done", now=T0 + timedelta(minutes=minutes))
    return audit.read(flights)[0]


def test_select_filters_and_puts_the_newest_first(flights):
    entries = trail(flights)
    users = lambda selected: [(e["project"], e["action"], e["user"]) for e in selected]  # noqa: E731

    assert users(audit.select(entries)) == [
        ("flights", "retrain", "carol"), ("flights", "acknowledge", "alice"), ("taxis", "retrain", "bob"),
        ("flights", "rollback", "bob"), ("flights", "retrain", "alice"),
    ]
    assert users(audit.select(entries, project="flights", action="retrain")) == [("flights", "retrain", "carol"), ("flights", "retrain", "alice")]
    assert users(audit.select(entries, user="bob")) == [("taxis", "retrain", "bob"), ("flights", "rollback", "bob")]
    # since and until are inclusive
    assert users(audit.select(entries, since=T0 + timedelta(minutes=60), until=T0 + timedelta(minutes=120))) == [("taxis", "retrain", "bob"), ("flights", "rollback", "bob")]
    assert audit.select(entries, project="nope") == []


def test_select_refuses_an_unknown_action_and_a_naive_time(flights):
    with pytest.raises(ValueError, match="audit action 'rolback'"):
        audit.select([], action="rolback")
    with pytest.raises(ValueError, match="since 2026-03-02T11:00:00: expected a timezone-aware time"):
        audit.select([], since=datetime(2026, 3, 2, 11))


def test_jsonl_export_is_one_entry_a_line_in_the_order_given(flights):
    entries = audit.select(trail(flights), project="flights")

    exported = audit.to_jsonl(entries)

    assert exported.endswith("\n") and exported.count("\n") == 4
    assert [json.loads(line) for line in exported.splitlines()] == entries
    assert audit.to_jsonl([]) == ""


def append_many(home: str, worker: int, count: int) -> None:
    config = load_config("flights", home)
    for i in range(count):
        # long reasons: each line is far beyond what one small write would keep whole by luck
        audit.record(config, action=audit.RETRAIN, user=f"worker{worker}", reason=f"{i} " + "x" * 5000, outcome="triggered")


def test_concurrent_appends_from_processes_keep_every_line_whole(flights):
    workers, count = 4, 25
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=append_many, args=(str(flights.home), w, count)) for w in range(workers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)

    assert [p.exitcode for p in processes] == [0] * workers
    entries, problems = audit.read(flights)
    assert problems == []
    assert len(entries) == workers * count
    for w in range(workers):  # each worker's entries in the order it appended them
        assert [int(e["reason"].split()[0]) for e in entries if e["user"] == f"worker{w}"] == list(range(count))
