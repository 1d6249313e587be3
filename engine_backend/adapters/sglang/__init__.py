"""SGLang 0.5.16 attention backend ``engine_backend``.

Modules, one concept each:

* ``plugin``: the ``sglang.srt.plugins`` entry point (``register``): adds the backend name to
  SGLang's attention-backend choices and registry, and routes the package's log messages
  through SGLang's logging. Cheap: imports no kernels and no CUDA.
* ``compat``: what a model/server configuration must look like for this backend; refuses the
  rest with one message naming every problem.
* ``layout``: ForwardBatch -> ``BSR`` translation (pure torch, runs on CPU in tests).
* ``backend``: the ``AttentionBackend`` subclass SGLang's ModelRunner drives.

The kernel wrappers (one decode/prefill pair per distinct layer shape), the deliberate fault and
the other engine-independent parts live in ``adapters.common``.

Importing this package imports nothing from SGLang; each module imports what it needs.
"""

BACKEND_NAME = "engine_backend"
