"""Scoring benchmarks: `digits predict` (Ray Data, streaming) against the plain one-process
script a user would write (bench/baselines.py `score`), both started as fresh processes.

- fixed cost: the Kaggle test set (28,000 rows of test.csv), whole commands, repeats interleaved;
  and where `digits predict`'s seconds go (its predict.json, and a probe of Ray's and an
  actor's start-up);
- scale: 28k, 280k and 2.8M images (the test set repeated), Parquet and CSV, 1 and 2 actors:
  wall time, images/s, the driver's peak RSS, the object store's peak, and the plain script's
  peak RSS where it fits in memory.
"""

from __future__ import annotations

import json
import shutil
import statistics
import threading
import time
from contextlib import nullcontext
from pathlib import Path

from bench.processes import Processes, local_cluster

PLAIN_MEMORY_LIMIT_MB = 16_000  # the plain script is not run where it would need more


def fixed_cost(run: Processes, model_file: Path, test_csv: Path, repeats: int) -> dict:
    samples = {"plain": [], "digits": []}
    for _ in range(repeats):
        samples["plain"].append(plain(run, model_file, test_csv))
        samples["digits"].append(digits(run, model_file.parent, test_csv, actors=1))
    same = (run.scratch / "plain-out" / "submission.csv").read_bytes() == (
        run.scratch / "digits-out" / "submission.csv"
    ).read_bytes()
    return {
        "plain_wall_s": statistics.median(s["wall_s"] for s in samples["plain"]),
        "digits_wall_s": statistics.median(s["wall_s"] for s in samples["digits"]),
        "digits_seconds": {
            key: statistics.median(s["seconds"][key] for s in samples["digits"])
            for key in samples["digits"][0]["seconds"]
        },
        "plain_seconds": {
            key: statistics.median(s["seconds"][key] for s in samples["plain"])
            for key in samples["plain"][0]["seconds"]
        },
        "startup": run.probe("startup", "--model-file", str(model_file)),
        "identical_submissions": same,
        "samples": samples,
    }


def scale(run: Processes, model_file: Path, test_csv: Path, sizes: list[int], actors: list[int]) -> dict:
    """Every size in both formats with every actor count; the plain script beside them."""
    rows = []
    for size in sizes:
        for kind in ("parquet", "csv"):
            source = scaled_input(test_csv, size, kind, run.scratch)
            for count in actors:
                rows.append(
                    {
                        "images": size,
                        "format": kind,
                        "path": f"digits, {count} actor(s)",
                        **digits(run, model_file.parent, source, actors=count, sample_store=True),
                    }
                )
            projected = _projected_plain_mb(rows, kind, size)
            if projected is None or projected < PLAIN_MEMORY_LIMIT_MB:
                rows.append({"images": size, "format": kind, "path": "plain", **plain(run, model_file, source)})
            else:
                rows.append(
                    {
                        "images": size,
                        "format": kind,
                        "path": "plain",
                        "not_run": f"projected peak RSS {projected / 1000:.0f} GB",
                    }
                )
            source.unlink()
    return {"rows": rows}


def two_node_cluster(run: Processes, run_dir: Path, test_csv: Path) -> dict:
    """`cluster/local_cluster.sh start 2` (a head and two worker nodes of one CPU each): 2
    actors, one on each node, against the 1-actor run on an embedded Ray."""
    embedded = digits(run, run_dir, test_csv, actors=1)
    expected = (run.scratch / "digits-out" / "submission.csv").read_bytes()
    with local_cluster(6391) as cluster:
        clustered = digits(run, run_dir, test_csv, actors=2, cpus_per_actor=1, env=cluster)
    nodes = clustered["nodes"]
    same = (run.scratch / "digits-out" / "submission.csv").read_bytes() == expected
    return {
        "embedded_1_actor_wall_s": embedded["wall_s"],
        "cluster_2_actors_wall_s": clustered["wall_s"],
        "cluster_nodes": nodes,
        "identical_submissions": same,
    }


def digits(
    run: Processes,
    run_dir: Path,
    source: Path,
    actors: int,
    sample_store: bool = False,
    cpus_per_actor: int | None = None,
    env: dict | None = None,
) -> dict:
    out = run.scratch / "digits-out"
    shutil.rmtree(out, ignore_errors=True)
    cpus = ["--cpus-per-actor", str(cpus_per_actor)] if cpus_per_actor else []
    with ObjectStoreSampler() if sample_store else nullcontext() as store:
        wall = run.digits(
            "predict",
            "--run",
            str(run_dir),
            "--input",
            str(source),
            "--out",
            str(out),
            "--actors",
            str(actors),
            *cpus,
            env=env,
        )
    record = json.loads((out / "predict.json").read_text())
    return {
        "wall_s": wall,
        "images_per_s": record["images"] / wall,
        "seconds": record["seconds"],
        "driver_peak_rss_mb": record["driver_peak_rss_mb"],
        "nodes": record["nodes"],
        "object_store_peak_mb": store.peak_mb if store else None,
    }


def plain(run: Processes, model_file: Path, source: Path) -> dict:
    out = run.scratch / "plain-out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    done = run.baseline("score", "--model-file", str(model_file), "--input", str(source), "--out", str(out))
    return {**done, "wall_s": done["process_s"], "images_per_s": done["images"] / done["process_s"]}


def scaled_input(test_csv: Path, size: int, kind: str, scratch: Path) -> Path:
    """The test set's rows repeated to `size` images, as one CSV or Parquet file (Kaggle's
    implicit ImageIds in both)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    header, *lines = test_csv.read_text().splitlines(keepends=True)
    path = scratch / f"input-{size}.{kind}"
    if kind == "csv":
        with open(path, "w") as target:
            target.write(header)
            for start in range(0, size, len(lines)):
                target.writelines(lines[: min(len(lines), size - start)])
        return path
    table = pacsv.read_csv(
        test_csv,
        convert_options=pacsv.ConvertOptions(column_types={name: pa.uint8() for name in header.strip().split(",")}),
    )
    with pq.ParquetWriter(path, table.schema) as writer:
        for start in range(0, size, table.num_rows):
            writer.write_table(table.slice(0, min(table.num_rows, size - start)))
    return path


def _projected_plain_mb(rows: list[dict], kind: str, size: int) -> float | None:
    """The plain script's peak RSS at `size`, extrapolated from the two largest runs below it."""
    measured = sorted(
        (r["images"], r["peak_rss_mb"])
        for r in rows
        if r["path"] == "plain" and r["format"] == kind and "peak_rss_mb" in r
    )
    if len(measured) < 2:
        return None
    (n1, m1), (n2, m2) = measured[-2:]
    return m2 + (m2 - m1) / (n2 - n1) * (size - n2)


class ObjectStoreSampler:
    """The object store's high-water mark: Ray's plasma store is a file in /dev/shm whose
    pages stay allocated once touched, so the filesystem's growth over the run is its peak."""

    def __enter__(self):
        self.before = shutil.disk_usage("/dev/shm").used
        self.peak, self.running = self.before, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, shutil.disk_usage("/dev/shm").used)
            time.sleep(0.2)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()

    @property
    def peak_mb(self) -> float:
        return (self.peak - self.before) / 2**20
