#!/usr/bin/env bash
# From a fresh clone: set up, build the Kaggle files from real MNIST, and train the seed's CNN
# with one worker on an embedded local Ray.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
DATA=${DATA:-data}
RUN=${RUN:-runs/cnn-$(date +%Y%m%d-%H%M%S)}
.venv/bin/digits data --out "$DATA"
.venv/bin/digits train --model cnn --data "$DATA" --workers 1 --epochs "${EPOCHS:-10}" --out "$RUN"
