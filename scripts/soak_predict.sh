#!/usr/bin/env bash
# Scores TEST with RUN's model N times in a row, each on its own embedded Ray, and counts the
# crash dumps (a native abort's "RAW: Check ... failed", "SIGABRT", "*** Aborted at") that
# reached the console or any log of the Ray sessions those runs started.
# Usage: scripts/soak_predict.sh RUN_DIR TEST_CSV [N=20]
set -euo pipefail
RUN=$1 TEST=$2 N=${3:-20}
cd "$(dirname "$0")/.."
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
touch "$WORK/start"
DUMP='RAW: Check|SIGABRT|Aborted at|Fatal Python error'
failed=0
for i in $(seq 1 "$N"); do
    start=$(date +%s.%N)
    if ! .venv/bin/digits predict --run "$RUN" --input "$TEST" --out "$WORK/out$i" >"$WORK/console$i" 2>&1; then
        failed=$((failed + 1))
    fi
    printf 'run %2d: %5.1f s, %d console lines\n' "$i" "$(echo "$(date +%s.%N) - $start" | bc)" \
        "$(wc -l <"$WORK/console$i")"
    rm -rf "$WORK/out$i"
done
sessions=$(find /tmp/ray -maxdepth 1 -name 'session_2*' -newer "$WORK/start" | sort)
console_dumps=$(cat "$WORK"/console* | grep -cE "$DUMP" || true)
log_dumps=$( [ -z "$sessions" ] || { grep -rlE "$DUMP" $sessions || true; } | wc -l)
echo "runs: $N, failed: $failed, Ray sessions: $(echo "$sessions" | grep -c . || true)"
echo "crash dumps: console lines $console_dumps, log files $log_dumps"
[ "$failed" = 0 ] && [ "$console_dumps" = 0 ] && [ "$log_dumps" = 0 ]
