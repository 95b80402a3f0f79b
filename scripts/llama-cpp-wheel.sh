#!/usr/bin/env bash
# Install llama-cpp-python into the venv of python "$1", built natively for this CPU with our
# patches (scripts/patch_llama_cpp.py: the AMX fix, flash attention by blocks, F16 products of a
# few sequences on AVX2), from a wheel cached per (version, CPU flags, compiler, patches): a wheel
# built with -march=native on one CPU is never installed on another, nor one built before the
# patches changed.
set -euo pipefail
PY=${1:?usage: llama-cpp-wheel.sh PYTHON}
VERSION=${LLAMA_CPP_VERSION:-0.3.36}
here=$(cd "$(dirname "$0")" && pwd)
# On CPUs with AVX512-FP16 (Intel Xeons since Sapphire Rapids), -march=native lets GCC compile
# llama.cpp's F16 code with those instructions, and its F16 paths (an F16 KV cache's attention,
# F16 weights) run ~2.5x slower than without them (measured on a Xeon with AMX, GCC 12): leave
# them out. Elsewhere nothing changes, nor does the cache key.
extra=""
if grep -m1 -E '^flags' /proc/cpuinfo 2>/dev/null | grep -qw avx512_fp16 \
  && echo | cc -mno-avx512fp16 -E - >/dev/null 2>&1; then
  extra="-DCMAKE_C_FLAGS=-mno-avx512fp16 -DCMAKE_CXX_FLAGS=-mno-avx512fp16"
fi
cpu=$( (grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null || uname -m; cc --version 2>/dev/null | head -1; if [ -n "$extra" ]; then echo "$extra"; fi; cat "$here/patch_llama_cpp.py" "$here/fa_rows.cpp" "$here/sgemm_few.cpp") | sha256sum | cut -c1-12)
wheels=${MAGPIE_CACHE_DIR:-$HOME/.cache/magpie}/wheels/llama-cpp-python-$VERSION-$cpu
if ! ls "$wheels"/*.whl >/dev/null 2>&1; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  echo "building llama-cpp-python $VERSION for this CPU (about 4 minutes on 2 cores, once)"
  "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$tmp"
  tar -xzf "$tmp"/llama_cpp_python-"$VERSION".tar.gz -C "$tmp"
  "$PY" "$here/patch_llama_cpp.py" "$tmp/llama_cpp_python-$VERSION"
  CMAKE_ARGS="${CMAKE_ARGS:-} $extra" "$PY" -m pip wheel -q --no-deps -w "$tmp/dist" \
    "$tmp/llama_cpp_python-$VERSION"
  mkdir -p "$wheels"
  mv "$tmp"/dist/*.whl "$wheels"/
fi
"$PY" -m pip install -q --no-deps --force-reinstall "$wheels"/*.whl
