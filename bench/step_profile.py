"""Where a training step's time goes, read from a run's TensorFlow profile (`digits train
--profile-steps`): per worker, over the traced steps, the step's wall time; the time TensorFlow's
compute threads spent in the model's ops; the time the all-reduces took from their start to their
end (the bytes on the wire and the wait for the other worker); and each kind of thread's CPU time
(the run's threads.json). Per step, in milliseconds."""

from __future__ import annotations

import json
from pathlib import Path

# What TensorFlow names the threads the ops run on, and the events of an op (not of the executor
# around it): "scope/name:OpType".
COMPUTE_THREADS, COLLECTIVE_THREADS = "tf_Compute", "collective_ops"
COLLECTIVE_OPS = ("CollectiveReduceV2", "CollectiveGatherV2", "CollectiveBcastSendV2", "CollectiveBcastRecvV2")


def breakdown(run_dir: Path) -> dict:
    """{rank: the step's parts} for every worker the run's newest profile holds."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    [newest] = sorted((run_dir / "tensorboard" / "plugins" / "profile").iterdir())[-1:]
    found = {}
    for trace in sorted(newest.glob("*.xplane.pb")):
        record = json.loads(trace.with_name(trace.name.replace(".xplane.pb", ".threads.json")).read_text())
        steps = record["steps"][1] - record["steps"][0] + 1
        space = xplane_pb2.XSpace.FromString(trace.read_bytes())
        [host] = [plane for plane in space.planes if plane.name == "/host:CPU"]
        compute_ps = collective_ps = collectives = 0
        for line in host.lines:
            for event in line.events:
                name = host.event_metadata[event.metadata_id].name
                op_type = name.rpartition(":")[2] if ":" in name and "::" not in name else None
                if op_type in COLLECTIVE_OPS and line.name.startswith(COLLECTIVE_THREADS):
                    collective_ps += event.duration_ps
                    collectives += 1
                elif op_type and op_type not in COLLECTIVE_OPS and line.name.startswith(COMPUTE_THREADS):
                    compute_ps += event.duration_ps
        cpu = record["thread_cpu_seconds"]
        rank = trace.name.removesuffix(".xplane.pb").rpartition("-rank")[2]
        found[rank] = {
            "steps": steps,
            "step_ms": 1e3 * record["seconds"] / steps,
            "compute_ms": compute_ps / 1e9 / steps,
            "collective_ms": collective_ps / 1e9 / steps,
            "collectives_per_step": collectives / steps,
            "cpu_ms": {kind: 1e3 * seconds / steps for kind, seconds in _thread_kinds(cpu).items()},
        }
    return found


def _thread_kinds(cpu: dict) -> dict:
    """CPU seconds by what the threads do: TensorFlow's compute, its collectives, gRPC (which
    carries the collectives' bytes), the rest."""
    kinds = {"compute": 0.0, "collectives": 0.0, "grpc": 0.0, "other": 0.0}
    for name, seconds in cpu.items():
        if name.startswith(COMPUTE_THREADS) or "Eigen" in name:
            kinds["compute"] += seconds
        elif name.startswith(COLLECTIVE_THREADS):
            kinds["collectives"] += seconds
        elif "grpc" in name.lower() or name.startswith(("event_engine", "tf_GrpcWorker")):
            kinds["grpc"] += seconds
        else:
            kinds["other"] += seconds
    return kinds
