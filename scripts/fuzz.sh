#!/usr/bin/env bash
# Fuzz the frame parser (src/capture/parse.rs) for a bounded time: FUZZ_SECONDS (default 60).
# Installs cargo-fuzz if missing. Stable Rust: libFuzzer's sanitizer flags need nightly
# features, which RUSTC_BOOTSTRAP=1 unlocks on a stable toolchain.
# The committed seed corpus (fuzz/corpus/parse, real frames from lo and the `any` device) is
# read, never written: new inputs go to fuzz/target/corpus-work, crashes to fuzz/artifacts.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

need cc gcc
need c++ g++
ensure_libpcap_dev
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "==> installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

seconds=${FUZZ_SECONDS:-60}
work=fuzz/target/corpus-work
mkdir -p "$work"
echo "==> fuzzing the frame parser for ${seconds}s"
RUSTC_BOOTSTRAP=1 cargo fuzz run parse "$work" fuzz/corpus/parse -- \
    -max_total_time="$seconds" -max_len=512 -print_final_stats=1
