#!/usr/bin/env bash
# Creates .venv (if missing) and installs this project with its test extras into it. pip's
# output goes to .venv/setup.log, and to the console only if the installation fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
LOG=.venv/setup.log
install() { .venv/bin/python -m pip install --disable-pip-version-check "$@"; }
if ! { install --upgrade pip && install -e ".[test]"; } >"$LOG" 2>&1; then
    tail -n 25 "$LOG" >&2
    echo "setup.sh: installing into .venv failed; the whole log is $LOG" >&2
    exit 1
fi
echo "set up .venv: $(.venv/bin/python --version), $(.venv/bin/digits --version) (pip's log: $LOG)"
