#!/usr/bin/env bash
# From a fresh clone: set up, build the Kaggle files from real MNIST, train the seed's CNN with
# one worker on an embedded local Ray (the `fast` preset's batch and schedule, run to its end
# rather than stopped at 99%: a warm-up and cosine decay over 30 epochs, or over as many as fit
# in MINUTES, keeping time to score the test set; on augmented images, without which the CNN
# fits its training images exactly halfway through and learns nothing more; keeping the last
# epoch's model, the schedule's low-rate end, rather than the epoch of the best validation
# accuracy, which can be a lucky one halfway: docs/accuracy.md's "Which epoch to keep"), score
# the 28,000-image test set on Ray Data, and check the submission against the true labels.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
DATA=${DATA:-data}
RUN=${RUN:-runs/cnn-$(date +%Y%m%d-%H%M%S)}
OUT=${OUT:-$RUN/scored}
.venv/bin/digits data --out "$DATA"
.venv/bin/digits train --preset fast --augment --target 1.0 --keep last --epochs "${EPOCHS:-30}" --time-budget "${MINUTES:-5}" \
    --scoring-reserve 28000 --data "$DATA" --workers 1 --out "$RUN"
.venv/bin/digits predict --run "$RUN" --input "$DATA/test.csv" --out "$OUT"
.venv/bin/digits evaluate --predictions "$OUT" --labels "$DATA/test_labels.csv"
echo
echo "submission: $OUT/submission.csv"
echo "accuracy:   $(.venv/bin/python -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"{r['accuracy']:.4f} on all {r['images']:,} test images, {r['official_mnist_test']['accuracy']:.4f} on the 10,000 official MNIST test images\")" "$OUT/evaluation.json")"
