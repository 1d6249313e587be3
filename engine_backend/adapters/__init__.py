"""Engine adapters: attention backends for vLLM (``adapters.vllm``) and SGLang (``adapters.sglang``).

Each registers through its engine's own plugin interface and only translates the engine's
metadata into ``BSR`` plus plan/run calls; nothing engine-specific lives outside its folder, and
what both share (the kernel wrappers per layer shape, the deliberate fault, index helpers) lives
once in ``adapters.common``.
"""
