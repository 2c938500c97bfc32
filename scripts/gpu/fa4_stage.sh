#!/usr/bin/env bash
# Call 1 of carrying FlashAttention-4 (see fa4_bundle.sh): keep part one on the machine, outside the
# checkout, for env.sh to assemble in the next call.
set -euo pipefail
mkdir -p /tmp/fa4
cp .fa4a/cu13.tar.xz.part1 /tmp/fa4/
ls -la /tmp/fa4
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
