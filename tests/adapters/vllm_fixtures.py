"""What vLLM's model runner hands the backend, for the vLLM adapter's tests: attention layers
registered in a real ``VllmConfig`` the way vLLM registers its ``Attention`` modules, each with
the impl vLLM would build and, once "bound", a KV cache of the backend's own layout."""

from __future__ import annotations

import torch
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

from engine_backend.adapters.vllm.backend import EngineBackendAttentionBackend


class StubLayer(AttentionLayerBase):
    """What vLLM's Attention layer offers the backend: the impl, the KV scales and (after vLLM's
    ``bind_kv_cache``) ``kv_cache``; before binding vLLM leaves an empty placeholder there."""

    def __init__(self, impl, device: str = "cpu"):
        self.impl = impl
        self._k_scale = torch.ones((), device=device)
        self._v_scale = torch.ones((), device=device)
        self.kv_cache = torch.tensor([])

    def get_attn_backend(self):
        return EngineBackendAttentionBackend

    def get_kv_cache_spec(self, vllm_config):
        return None


def make_impl(dtype: torch.dtype = torch.bfloat16, **kwargs):
    """The backend's impl as vLLM builds it: with the model dtype as torch's default dtype."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return EngineBackendAttentionBackend.get_impl_cls()(**kwargs)
    finally:
        torch.set_default_dtype(previous)


def register_layer(vllm_config, name: str, layer: StubLayer) -> StubLayer:
    """Put ``layer`` where vLLM keeps its attention layers (the config's static forward context)."""
    vllm_config.compilation_config.static_forward_context[name] = layer
    return layer
