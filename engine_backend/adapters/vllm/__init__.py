"""vLLM 0.26 attention backend: ``vllm serve MODEL --attention-backend CUSTOM``.

* ``plugin``: the ``vllm.general_plugins`` entry point; registers ``CUSTOM`` and routes the
  package's log messages through vLLM's logger (imports nothing heavy).
* ``backend``: the ``AttentionBackend`` class vLLM selects, and its configuration checks.
* ``kv_cache``: the KV-cache layout, block sizes and dtypes it asks vLLM for.
* ``capabilities``: what it supports, in the words every refusal uses.
* ``layout``: vLLM's per-step ``CommonAttentionMetadata`` -> decode and prefill ``BSR`` (pure).
* ``builder``: the metadata builder (layout + ``plan`` of the kernels, once per step).
* ``impl``: the per-layer ``AttentionImpl`` (KV-cache write, then decode and prefill ``run``).

The kernel wrappers, the deliberate fault and the other engine-independent parts live in
``adapters.common``. Nothing is imported here, so that loading the plugin stays cheap in every
vLLM process.
"""
