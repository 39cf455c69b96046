"""The ``bench`` marker: the benchmarks in ``bench/``, run in their ``--quick`` mode by
``make test`` (the default pytest run selects it); ``-m "not bench"`` leaves them out."""

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "bench: runs a script of bench/ with --quick as a subprocess (a few minutes in all)")
