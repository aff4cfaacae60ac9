#!/usr/bin/env bash
# Runs DSpark's tests: installs what is missing (apt packages, the default model), builds
# llama.cpp and DSpark for this CPU, and runs every unit, property and end-to-end test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
cargo test --release "$@"
