#!/usr/bin/env bash
# One GPU-machine call: install the carried wheels, run tests/gpu, then a short benchmark
# (ours vs stock vs cookbook on a 4-layer gpt-oss-20b) and print its table last.
#
# Once, on the development machine:  ../shared/device/wheels.sh
# Device call:  carry [".whl", ".vocab"], command: bash scripts/gpu_check.sh
# Everything is logged under $OUT (gpu-tests.log, bench.log, bench/bench.{json,md}, benchmarks.md).
# BENCH_ARGS overrides the benchmark options; TESTS_TIMEOUT / BENCH_TIMEOUT the phase limits (s).
set -uo pipefail

OUT=${OUT:-$(mktemp -d)}
BENCH_ARGS=${BENCH_ARGS:---preset 20b --layers 4 --steps 6 --warmup 2 --tokens-per-batch 16384 --components}
TESTS_TIMEOUT=${TESTS_TIMEOUT:-200}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-330}

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed: run ../shared/device/wheels.sh and carry .whl"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/src TIKTOKEN_ENCODINGS_BASE=$PWD/.vocab
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache  # the tests and the bench share compiled kernels

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
} 2>&1 | tee "$OUT/versions.txt"

echo "== tests/gpu (limit ${TESTS_TIMEOUT}s)"
timeout "$TESTS_TIMEOUT" python3 -m pytest tests/gpu -q -rfE --durations=8 -p no:cacheprovider \
  --junitxml="$OUT/gpu-tests.xml" > "$OUT/gpu-tests.log" 2>&1
tests_rc=$?
tail -n 40 "$OUT/gpu-tests.log"

echo "== gptoss-tune bench $BENCH_ARGS (limit ${BENCH_TIMEOUT}s)"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of options
timeout "$BENCH_TIMEOUT" python3 -m gptoss_tune bench $BENCH_ARGS --output "$OUT/bench" --record \
  > "$OUT/bench.log" 2> "$OUT/bench-progress.log"
bench_rc=$?
cp docs/benchmarks.md "$OUT/benchmarks.md" 2>/dev/null
grep -E "error|Error|OOM|out of memory|failed" "$OUT/bench-progress.log" | head -n 20
tail -n 5 "$OUT/bench-progress.log"
cat "$OUT/bench.log"

echo "== tests rc=$tests_rc bench rc=$bench_rc (124: hit the time limit)"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
