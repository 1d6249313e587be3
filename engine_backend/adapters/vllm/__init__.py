"""vLLM 0.26 attention backend: ``vllm serve MODEL --attention-backend CUSTOM``.

* ``plugin``: the ``vllm.general_plugins`` entry point; registers ``CUSTOM`` (imports nothing heavy).
* ``backend``: the ``AttentionBackend`` class vLLM selects, and its configuration checks.
* ``layout``: vLLM's per-step ``CommonAttentionMetadata`` -> decode and prefill ``BSR`` (pure).
* ``builder``: the metadata builder (layout + ``plan`` of the kernels, once per step).
* ``impl``: the per-layer ``AttentionImpl`` (KV-cache write, then decode and prefill ``run``).

Nothing is imported here, so that loading the plugin stays cheap in every vLLM process.
"""
