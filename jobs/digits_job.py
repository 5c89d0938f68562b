"""Ray job entrypoint: any `digits` command, run inside the cluster the job was submitted to.

    RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 \
        --runtime-env cluster/runtime_env.yaml -- \
        python jobs/digits_job.py train --model cnn --workers 4 --data s3://... --out s3://...

Inside a job Ray is already running (the job sets RAY_ADDRESS), so the command joins that
cluster instead of starting one. Ray keeps the entrypoint as typed (`ray job list`, the
dashboard), where the command's own redaction cannot reach: credentials go to the nodes' role
or environment, not into the entrypoint's URIs.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the job's working_dir

from digit_models.cli import entry_point  # noqa: E402

if __name__ == "__main__":
    entry_point()
