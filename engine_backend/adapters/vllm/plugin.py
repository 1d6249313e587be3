"""``vllm.general_plugins`` entry point ``engine_backend``: registers ``CUSTOM``.

vLLM runs every general plugin in each of its processes (API server, engine core, workers)
before a backend is chosen, so ``register`` must be cheap, repeatable and free of CUDA:
it only records the dotted path of the backend class in vLLM's registry, and sends the
package's log messages through vLLM's logging. The backend module itself is imported by vLLM
when ``--attention-backend CUSTOM`` is selected.
"""

from __future__ import annotations

from ...log import logger, use

BACKEND_CLASS_PATH = "engine_backend.adapters.vllm.backend.EngineBackendAttentionBackend"
# A child of vLLM's "vllm" logger: vLLM's handler and VLLM_LOGGING_LEVEL (or its logging
# config file) govern our messages, the JIT's build progress included, like vLLM's own.
LOGGER_NAME = "vllm.engine_backend"


def register() -> None:
    """Point ``AttentionBackendEnum.CUSTOM`` at our backend, unless another plugin already
    claimed it (then keep theirs and say so: overriding would depend on plugin order)."""
    from vllm.logger import init_logger
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    use(init_logger(LOGGER_NAME))
    custom = AttentionBackendEnum.CUSTOM
    if custom.is_overridden():
        current = custom.get_path()
        if current != BACKEND_CLASS_PATH:
            logger().warning(
                "engine_backend: AttentionBackendEnum.CUSTOM is already registered to %s; "
                "leaving it (engine_backend's backend is %s)",
                current,
                BACKEND_CLASS_PATH,
            )
        return
    register_backend(custom, BACKEND_CLASS_PATH)
