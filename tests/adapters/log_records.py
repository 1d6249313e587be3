"""A log handler that keeps what it is handed, for tests that check what the package logs and where."""

from __future__ import annotations

import logging


class Records(logging.Handler):
    """Every record a logger handles, whatever its level and propagation."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self) -> list[str]:
        return [record.getMessage() for record in self.records]
