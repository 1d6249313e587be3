"""Entry point of the ``sglang.srt.plugins`` group (declared in pyproject.toml).

SGLang calls ``load_plugins()`` in every process that matters before it reads any argument:
``sglang serve`` and ``python -m sglang.launch_server`` before parsing the command line,
``sglang.Engine`` before building ServerArgs, and each scheduler process (where the model and
the attention backend live) when it starts. ``register`` therefore only touches two module
level tables of SGLang and sends the package's log messages through SGLang's logging; the
backend class itself is imported when a ModelRunner builds it.
"""

from __future__ import annotations

import logging

from ...log import use
from . import BACKEND_NAME

# A child of SGLang's "sglang" logger, like SGLang's own module loggers: whatever configures
# those (``--log-level`` through ``configure_logger``'s root logger, or SGLANG_LOGGING_CONFIG_PATH)
# governs our messages too, the JIT's build progress included.
LOGGER_NAME = "sglang.engine_backend"


def create_backend(model_runner):
    """Factory stored in SGLang's attention registry; called by the ModelRunner."""
    from .backend import EngineBackendAttnBackend

    return EngineBackendAttnBackend(model_runner)


def register() -> None:
    """Make ``--attention-backend engine_backend`` valid. Idempotent; no CUDA, no kernels."""
    from sglang.srt import server_args
    from sglang.srt.layers.attention import attention_registry

    use(logging.getLogger(LOGGER_NAME))
    # One list backs --attention-backend, --prefill-attention-backend and
    # --decode-attention-backend, so a single entry serves all three flags.
    if BACKEND_NAME not in server_args.ATTENTION_BACKEND_CHOICES:
        server_args.add_attention_backend_choices([BACKEND_NAME])
    if attention_registry.ATTENTION_BACKENDS.get(BACKEND_NAME) is not create_backend:
        attention_registry.register_attention_backend(BACKEND_NAME)(create_backend)
