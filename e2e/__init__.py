"""End-to-end assets (model directory, ShareGPT slice) and the serving-benchmark harness.

Nothing here is imported by the ``engine_backend`` package; these modules drive vLLM / SGLang servers as
separate processes and need neither engine to be importable in the interpreter that runs them.
"""
