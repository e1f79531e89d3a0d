#!/usr/bin/env bash
# Fuzzes every parser that takes outside input (fuzz/fuzz_targets/), each for a set time,
# from the committed seeds (fuzz/seeds/<target>) and the corpus kept between runs on this
# machine (fuzz/corpus/<target>, where new inputs go), and prints each target's executions.
#   fuzz/run.sh [seconds per target, default 60] [target ...]
# Needs nightly Rust (installed here) and cargo-fuzz (installed from crates.io if absent).
# FUZZ_TARGET_DIR: where the instrumented builds go (default fuzz/target); `make test-fuzz`
# keeps them under /var/cache/pimesh so that fresh clones reuse them.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
seconds=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cd "$here/fuzz_targets" && ls ./*.rs | sed 's|^\./||; s|\.rs$||')
fi
cargo +nightly --version >/dev/null 2>&1 || { echo "fuzz: nightly Rust is needed (rustup toolchain install nightly)" >&2; exit 1; }
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz
cd "$here"
target_dir=(--target-dir "${FUZZ_TARGET_DIR:-$here/target}")
cargo +nightly fuzz build "${target_dir[@]}"
status=0
for target in "${targets[@]}"; do
  mkdir -p "corpus/$target" "artifacts/$target"
  log=$(mktemp)
  if cargo +nightly fuzz run "${target_dir[@]}" "$target" "corpus/$target" "seeds/$target" -- \
      -max_total_time="$seconds" -print_final_stats=1 -rss_limit_mb=2048 \
      -artifact_prefix="artifacts/$target/" >"$log" 2>&1; then
    result=ok
  else
    result="FOUND A CRASH (see fuzz/artifacts/$target/)"
    status=1
    tail -30 "$log" >&2
  fi
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  corpus=$(find "corpus/$target" -type f | wc -l)
  printf 'fuzz %-26s %s s  %12s executions  corpus %5s  %s\n' "$target" "$seconds" "${execs:-?}" "$corpus" "$result"
  rm -f "$log"
done
exit $status
