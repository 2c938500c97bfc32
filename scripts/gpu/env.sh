# Sourced by the scripts in scripts/gpu: install the carried wheels, set the environment, and make
# $W (work folder under $OUT) plus `finish`, which packs $W into $OUT/results.tgz (one file back).
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
W=$OUT/w
mkdir -p "$W"
if [ ! -f /tmp/site/.installed ]; then  # once per machine: scripts may source this file again
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed: run ../shared/device/wheels.sh and carry .whl"; exit 1; }
  touch /tmp/site/.installed
fi
export PYTHONPATH=/tmp/site:$PWD/src TIKTOKEN_ENCODINGS_BASE=$PWD/.vocab PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache  # runs of one call share compiled kernels
{
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
} > "$W/versions.txt" 2>&1
cat "$W/versions.txt"

bench() { python3 -m gptoss_tune bench "$@"; }

finish() {  # logs, tables and metrics only: checkpoints and adapters of big models stay behind
  (cd "$OUT" && find w -type f \( -name '*.log' -o -name '*.md' -o -name '*.json' -o -name '*.txt' \
    -o -name 'metrics.jsonl' \) -size -20M | tar czf results.tgz -T -) && rm -rf "$W"
}
