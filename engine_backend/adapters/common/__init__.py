"""What both engine adapters share; nothing here knows about vLLM or SGLang. One concept per module:

* ``kernels``: ``LayerShape`` (what a layer's kernels are specialised on), ``KernelLimits`` (the sizes
  they are allocated for), ``LayerKernels`` (one decode and one prefill wrapper, planned every step)
  and ``KernelsByShape`` (one ``LayerKernels`` per distinct shape of a model's layers);
* ``variant``: an engine's per-layer attention options as a ``Variant``;
* ``indptr``: persistent row-pointer tensors the per-step builders slice instead of allocating;
* ``queries``: an engine's query tensor as the kernels' ``[tokens, heads, head_dim]`` rows;
* ``faults``: the opt-in deliberate fault end-to-end checks use to prove they can fail.

Page tables become a ``BSR`` through ``engine_backend.format``'s constructors, used as they are.
Nothing is imported here: each adapter imports the module it needs.
"""
