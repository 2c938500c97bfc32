#!/usr/bin/env bash
# FlashAttention-4 for the GPU machine, which has no registry: run here, once per checkout. Its CuTe
# DSL compiler (nvidia-cutlass-dsl-libs-cu13, ~92 MB as a wheel) does not fit one call's 64 MiB
# carry beside .whl, so it travels in two calls on one warm machine:
#   .fa4a/  part one of the compiler's files (xz)     call 1: carry [".fa4a"], run `bash scripts/gpu/fa4_stage.sh`
#   .fa4b/  part two and the small wheels             call 2 (within the 30 s the machine stays warm):
#                                                     carry [".whl", ".vocab", ".fa4b"]; env.sh assembles and installs
# Usage: bash scripts/gpu/fa4_bundle.sh
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
for d in /.fa4a/ /.fa4b/; do grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d "$work/wheels" flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
  nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 'apache-tvm-ffi<0.2' \
  torch-c-dlpack-ext quack-kernels==0.6.5
mkdir -p "$work/cu13"
(cd "$work/cu13" && unzip -q "$work"/wheels/nvidia_cutlass_dsl_libs_cu13-*.whl)
rm "$work"/wheels/nvidia_cutlass_dsl_libs_cu13-*.whl
(cd "$work/cu13" && tar cf - . | xz -9e -T2 > "$work/cu13.tar.xz")
rm -rf .fa4a .fa4b
mkdir -p .fa4a .fa4b
head -c 38M "$work/cu13.tar.xz" > .fa4a/cu13.tar.xz.part1
tail -c +$((38 * 1024 * 1024 + 1)) "$work/cu13.tar.xz" > .fa4b/cu13.tar.xz.part2
cp "$work"/wheels/*.whl .fa4b/
du -sh .fa4a .fa4b
