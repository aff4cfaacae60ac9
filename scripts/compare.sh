#!/usr/bin/env bash
# Sets everything up and compares DSpark with stock llama.cpp on the default model.
# Extra arguments go to `dspark bench` (see `dspark bench --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release
./target/release/dspark info
./target/release/dspark bench --json bench.json "$@"
