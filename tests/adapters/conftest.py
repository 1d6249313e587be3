"""Shared setup of the adapter tests."""

from __future__ import annotations

import pytest

from engine_backend import log

from log_records import Records


@pytest.fixture(autouse=True)
def package_logger_restored():
    """A plugin's ``register()`` sends the package's messages to its engine's logger for the rest of
    the process; each test starts from, and leaves, the logger it found."""
    before = log.logger()
    yield
    log.use(before)


@pytest.fixture
def package_log():
    """The records of the logger the package writes to now (``engine_backend.log.logger()``)."""
    records, logger = Records(), log.logger()
    logger.addHandler(records)
    yield records
    logger.removeHandler(records)
