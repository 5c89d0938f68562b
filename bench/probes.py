"""Measurements that need to look inside Ray's processes, each run in a fresh process of its
own and printing one JSON line.

`startup`: where a `digits predict`'s fixed seconds go: our imports, starting the embedded Ray
(as `digits` starts it), an actor's process, TensorFlow's import and the model load in it, and
stopping Ray.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def startup(args) -> dict:
    began = time.time()
    import ray

    from digit_models.ray_runtime import ray_session

    imported = time.time()
    with ray_session():
        started = time.time()

        @ray.remote(num_cpus=1)
        class Loader:
            def __init__(self):
                self.process_started = time.time()
                from digit_models.models import load_model_file
                from digit_models.tf_setup import configure_tensorflow

                self.tf_imported = time.time()
                configure_tensorflow(1)
                load_model_file(args.model_file)
                self.loaded = time.time()

            def times(self):
                return self.process_started, self.tf_imported, self.loaded

        process_started, tf_imported, loaded = ray.get(Loader.remote().times.remote())
        stopping = time.time()
    stopped = time.time()
    return {"imports": imported - began, "ray_start": started - imported,
            "actor_process_start": process_started - started,
            "actor_tensorflow_import": tf_imported - process_started,
            "actor_model_load": loaded - tf_imported, "ray_stop": stopped - stopping}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.probes")
    probes = parser.add_subparsers(dest="probe", required=True)
    probes.add_parser("startup").add_argument("--model-file", required=True)
    args = parser.parse_args()
    sys.stdout.write("BENCH " + json.dumps({"startup": startup}[args.probe](args)) + "\n")


if __name__ == "__main__":
    main()
