"""The package's one logger.

Standalone (scripts, tests, ``python -m engine_backend``) messages go to stderr as
``[engine_backend] ...`` at INFO. Inside an engine the adapter hands the engine's own logger
to ``use()`` when the plugin registers (vLLM: ``vllm.logger.init_logger``; SGLang: a child of
its ``sglang`` logger), so the engine's log level and handlers govern every message of ours,
the JIT's build progress included.
"""

from __future__ import annotations

import logging
import sys

_default = logging.getLogger("engine_backend")
_current: logging.Logger | None = None


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the message (a redirected or captured
    stream included), not the stream that existed when the handler was made."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def _standalone() -> logging.Logger:
    if not _default.handlers:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("[engine_backend] %(message)s"))
        _default.addHandler(handler)
        _default.setLevel(logging.INFO)
        _default.propagate = False
    return _default


def logger() -> logging.Logger:
    """The logger every module of the package writes to."""
    return _current if _current is not None else _standalone()


def use(engine_logger: logging.Logger) -> None:
    """Send the package's messages through ``engine_logger`` from now on."""
    global _current
    _current = engine_logger
