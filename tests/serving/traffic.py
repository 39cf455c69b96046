"""A client thread that keeps asking the served model while a test switches versions."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


class Traffic(threading.Thread):
    """Calls ``ask(client)`` without pause (``client`` from ``connect()``, made in the thread),
    recording every answer (version first) and every failure."""

    def __init__(self, connect: Callable[[], Any], ask: Callable[[Any], tuple]) -> None:
        super().__init__(daemon=True)
        self.connect, self.ask = connect, ask
        self.answers: list[tuple] = []
        self.failures: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        client = None
        while not self.done.is_set():
            try:
                client = client or self.connect()
                self.answers.append(self.ask(client))
            except Exception as exc:  # noqa: BLE001 - every failure is what the test counts
                self.failures.append(repr(exc))
        if hasattr(client, "close"):
            client.close()

    def __enter__(self) -> Traffic:
        self.start()
        while not self.answers and not self.failures:
            time.sleep(0.01)
        assert not self.failures, self.failures[:3]
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(0.3)  # answers from after the switch
        self.done.set()
        self.join()

    @property
    def versions(self) -> list[int]:
        """The versions that answered, in order, repeats collapsed."""
        seen = [answer[0] for answer in self.answers]
        return [v for i, v in enumerate(seen) if i == 0 or seen[i - 1] != v]
