# Source at the start of a device-machine command: JIT cache inside the repo (carried as
# .jit-cache so kernels compiled here are reused), CUDA toolkit, unbuffered Python.
export ENGINE_BACKEND_CACHE_DIR="$PWD/.jit-cache"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
# SGLang's own kernels as benchmark peers (benchmarks/engine_peers.py), when .peers was carried.
for wheel in "$PWD"/.peers/sglang-*.zip; do
  if [ -f "$wheel" ]; then export ENGINE_BACKEND_SGLANG_WHEEL="${ENGINE_BACKEND_SGLANG_WHEEL:-$wheel}"; fi
done
