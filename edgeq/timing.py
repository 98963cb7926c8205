"""Wall-clock time per pipeline stage, for the report and the CLI summary."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Stages:
    def __init__(self, on_start: Callable[[str], None] | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.current: str | None = None
        #: told each stage's name as it starts (a progress line)
        self.on_start = on_start

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.current = name
        if self.on_start is not None:
            self.on_start(name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self.current = None

    @property
    def total(self) -> float:
        return sum(self.seconds.values())
