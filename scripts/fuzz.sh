#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for a bounded time each (libFuzzer via cargo-fuzz).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# SECONDS_PER_TARGET defaults to 60 (FUZZ_SECONDS works too); with no TARGET, every target
# runs. Seeds live in fuzz/corpus/<target>/seed-*; inputs the fuzzer finds are kept there
# too (ignored by git) and crashes go to fuzz/artifacts/<target>/. Exits non-zero on the
# first crash.
#
# cargo-fuzz needs a nightly toolchain (for -Zsanitizer). The script installs cargo-fuzz
# from crates.io if it is missing and tries `rustup toolchain install nightly --profile
# minimal` once if no nightly is present. Where neither can be fetched it says so and exits
# 2: build the targets elsewhere, or skip fuzzing (the regular test suite has property
# tests over the same decoders).
set -euo pipefail

cd "$(dirname "$0")/.."
seconds=${1:-${FUZZ_SECONDS:-60}}
shift || true

if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    echo "fuzz.sh: no nightly toolchain; trying rustup toolchain install nightly --profile minimal" >&2
    if ! rustup toolchain install nightly --profile minimal; then
        echo "fuzz.sh: cannot install a nightly toolchain here: cargo-fuzz needs one, not fuzzing" >&2
        exit 2
    fi
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    if ! cargo install cargo-fuzz --locked; then
        echo "fuzz.sh: cannot install cargo-fuzz, not fuzzing" >&2
        exit 2
    fi
fi

if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cd fuzz && cargo +nightly fuzz list)
fi

for target in "${targets[@]}"; do
    echo "== fuzzing $target for ${seconds}s" >&2
    mkdir -p "fuzz/corpus/$target"
    # -rss_limit_mb keeps a leak from eating the machine; -max_len covers a frame or command
    # well past the sizes the server accepts by default.
    (cd fuzz && cargo +nightly fuzz run "$target" "corpus/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=8192 -print_final_stats=1)
done
echo "fuzz.sh: ${#targets[@]} target(s), ${seconds}s each, no crash" >&2
