"""What an ingestion run reports for Prometheus (``flywheel_validation_*``, job ``validate``),
in the textfile form (no Pushgateway configured); the live path is in test_live_alerts."""

from __future__ import annotations

import logging

import pytest

from pipelines.data.ingest import BatchValidationError, ingest_landing
from pipelines.data.replay import land
from tests.conftest import free_ports, make_project

ROWS = 200


def samples(config) -> dict[str, float]:
    """``name{labels}`` -> value of the validate job's textfile (the timestamp left out)."""
    text = (config.path(config.metrics.textfile_dir) / "validate.prom").read_text()
    lines = [line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")]
    return {key: float(value) for key, value in lines if not key.startswith("flywheel_validate_last_run")}


def test_a_mixed_night_reports_rows_and_batches_passed_and_quarantined(project):
    model = project.model.name
    land(project.dataset, "2013-02", rows=ROWS)
    land(project.dataset, "2013-03", rows=ROWS)
    land(project.dataset, "2013-04", rows=ROWS, broken=True)

    with pytest.raises(BatchValidationError):
        ingest_landing(project)

    assert samples(project) == {
        f'flywheel_validation_rows{{model="{model}",project="flights",result="passed"}}': 2 * ROWS,
        f'flywheel_validation_rows{{model="{model}",project="flights",result="quarantined"}}': ROWS,
        f'flywheel_validation_batches{{model="{model}",project="flights",result="passed"}}': 2,
        f'flywheel_validation_batches{{model="{model}",project="flights",result="quarantined"}}': 1,
    }
    assert "flywheel_validate_last_run_timestamp_seconds" in (project.path(project.metrics.textfile_dir) / "validate.prom").read_text()


def test_a_night_with_nothing_landed_leaves_the_last_verdict_in_place(project):
    # Given a night that quarantined a batch
    land(project.dataset, "2013-04", rows=ROWS, broken=True)
    with pytest.raises(BatchValidationError):
        ingest_landing(project)
    reported = samples(project)

    # When ingestion runs again with nothing landed (a drift-triggered retrain, say)
    ingest_landing(project)

    # Then the quarantine stays reported (so its alert holds) until batches are validated again
    assert samples(project) == reported


def test_an_unreachable_pushgateway_does_not_hide_the_validation_failure(tmp_path, caplog):
    (closed,) = free_ports(1)
    config = make_project(tmp_path / "project", {"metrics": {"pushgateway": f"127.0.0.1:{closed}"}})
    land(config.dataset, "2013-04", rows=ROWS, broken=True)

    with caplog.at_level(logging.ERROR, logger="pipelines.data.ingest"), pytest.raises(BatchValidationError):
        ingest_landing(config)

    assert "could not report the validation metrics" in caplog.text
