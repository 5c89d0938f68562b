"""Names of the files and folders the commands write, shared by writers and readers."""

# A run directory (`digits train --out`)
MODEL_FILE = "model.keras"  # the trained model, native Keras format
STARTED_FILE = "started.json"  # written first: configuration and data, for --resume
RUN_FILE = "run.json"  # written last: a run dir without it is unfinished
CHECKPOINTS_DIR = "checkpoints"  # Ray Train's per-epoch checkpoints
STATE_FILE = "state.json"  # inside each checkpoint: epochs done, history, stop reason

# A scoring output (`digits predict --out`)
PREDICTIONS_DIR = "predictions"  # Parquet
SUBMISSION_FILE = "submission.csv"  # Kaggle's ImageId,Label
SCORING_FILE = "scoring.json"  # what was scored, with what, how fast; written last
SCORING_UNDERWAY = "scoring.underway"  # remote outputs only: a run is (or was) writing here
EVALUATION_FILE = "evaluation.json"  # `digits evaluate`'s numbers
