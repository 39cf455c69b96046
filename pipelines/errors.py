"""The one mark of a failure that a retry cannot fix.

A task that raises a ``NotRetryable`` error fails at once, without Airflow's retries: a bad
config, a batch that failed validation, a missing column, a suite that does not parse, a
model its smoke test refused. The same inputs would fail the same way, and the retries would
only delay the page. Every other error (Triton not reachable, a lock, a full disk) keeps the
task's retries. ``pipelines.steps`` turns this mark into Airflow's ``AirflowFailException``
for every DAG.
"""

from __future__ import annotations


class NotRetryable(Exception):
    """A failure that the same inputs would repeat; the message says what to change."""


class TritonUnavailable(RuntimeError):
    """Triton could not be started or reached: transient, the task's retries apply."""


class DataLocked(RuntimeError):
    """Another step holds a project's raw data (pipelines.data.batches.data_lock). Retryable: it lets go."""
