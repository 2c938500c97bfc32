# Sourced by the scripts in scripts/gpu: install the carried wheels, set the environment, and make
# $W (work folder under $OUT) plus `finish`, which packs $W into $OUT/results.tgz (one file back).
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
W=$OUT/w
mkdir -p "$W"
if [ ! -f /tmp/py/site-packages/.installed ]; then  # once per machine: scripts may source this file again
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/py/site-packages .whl/*.whl \
    || { echo "wheel install failed: run ../shared/device/wheels.sh and carry .whl"; exit 1; }
  touch /tmp/py/site-packages/.installed
fi
if [ -d .fa4b ] && [ ! -f /tmp/py/site-packages/.fa4 ]; then  # FlashAttention-4, carried in two calls (fa4_bundle.sh)
  if [ -f /tmp/fa4/cu13.tar.xz.part1 ]; then
    # the wheels first: pip --upgrade --target replaces the nvidia_cutlass_dsl folder the compiler joins
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/py/site-packages \
        .fa4b/*.whl \
      && cat /tmp/fa4/cu13.tar.xz.part1 .fa4b/cu13.tar.xz.part2 \
      | python3 -c "import sys, tarfile; tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz').extractall('/tmp/py/site-packages')" \
      && touch /tmp/py/site-packages/.fa4
  else
    echo "FlashAttention-4 not installed: part one is missing (run scripts/gpu/fa4_stage.sh in the call before)"
  fi
fi
export PYTHONPATH=/tmp/py/site-packages:/tmp/py/site-packages/nvidia_cutlass_dsl/dsl_packages:$PWD/src
export TIKTOKEN_ENCODINGS_BASE=$PWD/.vocab PYTHONUNBUFFERED=1
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
