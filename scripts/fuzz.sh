#!/usr/bin/env bash
# Fuzz the frame parser (src/capture/parse.rs) for a bounded time: FUZZ_SECONDS (default 60),
# then the packed-layout decoder (src/layout/packed.rs) for half that.
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

# The packed-layout decoder reads bytes from Redis that anyone with write access could have put
# there: it gets half the time (it is small, and starts from nothing).
packed_work=fuzz/target/corpus-packed
mkdir -p "$packed_work"
echo "==> fuzzing the packed-layout decoder for $((seconds / 2 + 1))s"
RUSTC_BOOTSTRAP=1 cargo fuzz run packed "$packed_work" -- \
    -max_total_time="$((seconds / 2 + 1))" -max_len=4096 -print_final_stats=1
