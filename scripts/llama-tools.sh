#!/usr/bin/env bash
# Builds stock llama.cpp's tools (llama-bench, llama-cli, llama-completion, llama-server,
# llama-perplexity, ggml-rpc-server) for exactly the llama.cpp DSpark links, as shared
# libraries that load DSpark's plugin, and prints the folder of the binaries (last line).
#
# The build (~5-10 min on 2 cores) is cached outside the clone, in
# ${DSPARK_CACHE:-~/.cache/dspark}/llama-tools-<key>, keyed by the tools' tarball, the build
# script, the llama-cpp-sys-2 version and this CPU's flags: a second run skips it.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
here=third_party/llama-tools
crate=$(grep -A1 '^name = "llama-cpp-sys-2"' Cargo.lock | sed -n 's/^version = "\(.*\)"/\1/p')
key=$( { sha256sum "$here/llama-b11434-tools.tar.gz" "$here/build.sh"; echo "$crate"; grep -m1 '^flags' /proc/cpuinfo; } | sha256sum | cut -c1-16)
work=${DSPARK_CACHE:-$HOME/.cache/dspark}/llama-tools-$key
bin=$work/build/bin
if [ -f "$work/done" ] && [ -x "$bin/llama-completion" ]; then
    echo "llama-tools: cached in $work" >&2
else
    log=$work.log
    echo "llama-tools: building into $work (llama.cpp tools for llama-cpp-sys-2 $crate; several minutes; log: $log)" >&2
    cargo fetch --quiet
    rm -rf "$work"
    mkdir -p "$work"
    if ! WORK=$work bash "$here/build.sh" > "$log" 2>&1; then
        tail -n 40 "$log" >&2
        echo "llama-tools: the build failed; the whole log is $log" >&2
        exit 1
    fi
    grep '^== built in' "$log" >&2 || true
    rm -rf "$work/src/.git" "$work/tools-src"
    touch "$work/done"
fi
echo "$bin"
