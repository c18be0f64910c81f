#!/usr/bin/env bash
# Build native llama.cpp for `mtpspec bench --llama-cpp-bin DEST`, offline apart from PyPI:
# the llama.cpp sources come vendored inside the llama-cpp-python sdist, so no git clone is needed.
#
#   scripts/build-llama-cpp.sh [DEST]     (default ~/.cache/mtpspec/llama.cpp/<version>)
#
# Env: PYTHON (default python3) runs pip; JOBS (default nproc) sets the build's parallelism;
# LLAMA_AMX=0 builds without llama.cpp's AMX backend (`-mno-amx-*`), which on some AMX machines
# segfaults in ggml_backend_amx_mul_mat on Q4_K_M files (llama.cpp issue 20824; it did on ours).
# DEST gets the three binaries the bench runs and build-info.json, which the bench reads to label
# its rows with the build's flags. About 8 to 12 minutes on 2 cores.
set -euo pipefail

# The version this script was tested with; the bench's output parser follows its log format.
VERSION=0.3.36
TARGETS=(llama-completion llama-lookup llama-speculative-simple)
DEST=${1:-$HOME/.cache/mtpspec/llama.cpp/$VERSION}
PYTHON=${PYTHON:-python3}
JOBS=${JOBS:-$(nproc)}
# Static libraries, so DEST holds self-contained binaries; no server, curl or TLS, which the
# bench does not need and which would need network-facing dependencies. (LLAMA_CURL is gone in
# this version: cmake only warns that it is deprecated, so it is not passed.)
CMAKE_FLAGS=(
  -DCMAKE_BUILD_TYPE=Release
  -DGGML_NATIVE=ON
  -DBUILD_SHARED_LIBS=OFF
  -DLLAMA_OPENSSL=OFF
  -DLLAMA_BUILD_SERVER=OFF
  -DLLAMA_BUILD_APP=OFF
  -DLLAMA_BUILD_TESTS=OFF
  -DLLAMA_BUILD_EXAMPLES=ON
  -DLLAMA_BUILD_TOOLS=ON
)
if [[ ${LLAMA_AMX:-1} == 0 ]]; then
  CMAKE_FLAGS+=("-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16")
fi

log() { echo "[build-llama-cpp $(date +%H:%M:%S)] $*"; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

log "downloading the llama-cpp-python $VERSION sdist"
"$PYTHON" -m pip download --quiet --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$VERSION"
tar -xzf "$work"/llama_cpp_python-"$VERSION".tar.gz -C "$work"
src="$work/llama_cpp_python-$VERSION/vendor/llama.cpp"

generator=()
if command -v ninja >/dev/null; then generator=(-G Ninja); fi
log "configuring: ${CMAKE_FLAGS[*]}"
cmake -S "$src" -B "$work/build" "${generator[@]}" "${CMAKE_FLAGS[@]}" >"$work/configure.log" \
  || { cat "$work/configure.log"; exit 1; }

log "building ${TARGETS[*]} with $JOBS jobs"
cmake --build "$work/build" --target "${TARGETS[@]}" -j "$JOBS"

mkdir -p "$DEST"
for target in "${TARGETS[@]}"; do
  cp "$work/build/bin/$target" "$DEST/"
done
cp "$work/build/CMakeCache.txt" "$DEST/"

# What the bench writes beside each llama.cpp row: versions, the cmake flags (GGML_NATIVE means
# -march=native, so the CPU it was built on matters too), the compiler and that CPU's SIMD flags.
# The full CMakeCache.txt stays beside it for anything else.
llama_version=$("$DEST/llama-completion" --version 2>&1 | sed -n 1p)  # sed, not head: no SIGPIPE
compiler=$(grep -m1 '^CMAKE_CXX_COMPILER:' "$work/build/CMakeCache.txt" | cut -d= -f2-)
compiler_version=$("$compiler" --version | sed -n 1p)
cpu_model=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || true)
cpu_flags=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx|fma|f16c|amx|sse4|neon|sve)' | tr '\n' ' ' || true)
"$PYTHON" - "$DEST/build-info.json" "$VERSION" "$llama_version" "$compiler_version" "$cpu_model" "$cpu_flags" \
  "${CMAKE_FLAGS[@]}" <<'PY'
import json, sys

out, version, llama_version, compiler, cpu, cpu_flags, *flags = sys.argv[1:]
info = {"llama_cpp_python": version, "llama_cpp": llama_version, "cmake_flags": flags,
        "compiler": compiler, "cpu": cpu, "cpu_flags": cpu_flags.split()}
json.dump(info, open(out, "w"), indent=2)
PY
log "done: $(ls "$DEST" | tr '\n' ' ')in $DEST"
