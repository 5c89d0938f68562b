#!/usr/bin/env bash
# Sets up the project and runs the whole test suite (real TensorFlow, real local Ray).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
