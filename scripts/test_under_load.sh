#!/usr/bin/env bash
# `make test-under-load`: the whole suite while other processes keep every core busy.
# A test that passes only on a quiet machine fails CI at random; this is how to find one.
# LOAD (default: cores + 1) spinning processes run beside `make test`; they stop with it.
set -euo pipefail
cd "$(dirname "$0")/.."
load=${LOAD:-$(( $(nproc) + 1 ))}
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
for _ in $(seq "$load"); do
    python3 -c 'while True: pass' &
    pids+=($!)
done
echo "test-under-load: $load busy process(es) on $(nproc) core(s)"
start=$(date +%s)
make test
echo "test-under-load: passed in $(( $(date +%s) - start ))s"
