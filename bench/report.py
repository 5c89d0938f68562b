"""The benchmark results as headline ratios (each of two numbers measured side by side in the
same run), BENCHMARKS.md and a chart."""

from __future__ import annotations

import os
import statistics
from pathlib import Path

from bench import precision_accuracy

# The issues' targets on a 2-core CPU: (comparison, bound)
TARGETS = {
    "b/a": (">=", 0.95),
    "weak-scaling efficiency, cnn@32x1": (">=", 0.65),
    "weak-scaling efficiency, cnn@128x1": (">=", 0.80),
    "2-worker images/s / the same-Ray independent pair's, cnn@32": (">=", 0.85),
    "2-worker images/s / the same-Ray independent pair's, cnn@128": (">=", 0.95),
    "2-worker images/s with --sync-every 4 / the same-Ray independent pair's, cnn@32": (">=", 0.85),
    "2-worker images/s with --sync-every 4 / the same-Ray independent pair's, cnn@128": (">=", 0.95),
    "time to 99%, 2 workers / 1 worker (whole command": ("<=", 0.85),
    "time to 99%, 2 workers / 1 worker (training clock": ("<=", 0.7),
    "first step after the command starts": ("<=", 10.0),
    "predict wall / plain wall": ("<=", 2.0),
    "predict marginal images/s / plain model.predict": (">=", 0.9),
    "predict driver peak RSS, largest / 28k": ("<=", 1.25),
    "Ray's processes, share of the machine's CPU, 1-worker training (its epochs)": ("<=", 0.05),
    "training input,": ("<=", 1.25),
    "serve requests/s / plain server's, concurrency 32": (">=", 3.0),
    "`--preset fast` images/s, bfloat16 / float32": (">=", 1.5),
}


def ratios(results: dict) -> dict:
    out = {}
    training = results.get("training")
    if training:
        for key, entry in training["weak_scaling"].items():
            out[f"weak-scaling efficiency, {key}"] = entry["efficiency"]
        for model, entry in training["overhead"].items():
            out[f"b/a {model}"] = entry["b"] / entry["a"]
        to_99 = training["time_to_99"]
        one, two = to_99.get("1 worker"), to_99.get("2 workers")
        if one and two:
            # A repeat that missed 99% ran all its epochs: its time is not a time to 99%.
            missed = [
                f"{label} {entry['reached']} of {entry['repeats']}"
                for label, entry in (("1 worker", one), ("2 workers", two))
                if entry["reached"] < entry["repeats"]
            ]
            short = f"; {UNPROVEN} in {', '.join(missed)} repeats" if missed else ""
            out[f"time to 99%, 2 workers / 1 worker (whole command{short})"] = two["wall_s"] / one["wall_s"]
            out[f"time to 99%, 2 workers / 1 worker (training clock{short})"] = two["training_s"] / one["training_s"]
        if one:
            out["first step after the command starts (s, 1 worker)"] = one["first_step_s"]
    for key, entry in results.get("ceilings", {}).items():
        out[f"independent pair / twice one alone, without Ray, {key}"] = entry["plain_ceiling"]
        out[f"independent pair / twice one alone, on one shared Ray, {key}"] = entry["ray_ceiling"]
        out[f"2-worker images/s / the same-Ray independent pair's, {key}"] = entry["two_workers_of_ray_pair"]
        out[f"2-worker images/s / the independent pair's without Ray, {key}"] = entry["two_workers_of_plain_pair"]
        out[f"2-worker images/s with --sync-every {entry['sync_every']} / the same-Ray independent pair's, {key}"] = (
            entry["synced_less_of_ray_pair"]
        )
    scoring = results.get("scoring")
    if scoring:
        fixed = scoring["fixed_cost"]
        out["predict wall / plain wall"] = fixed["digits_wall_s"] / fixed["plain_wall_s"]
        out.update(_scale_ratios(scoring.get("scale", {}).get("rows", [])))
    used = results.get("footprint")
    if used:
        share = "Ray's processes, share of the machine's CPU"
        if "ray_share_training" in used["training"]:
            out[f"{share}, 1-worker training (its epochs)"] = used["training"]["ray_share_training"]
        out[f"{share}, 1-worker training (whole command)"] = used["training"]["ray_share"]
        out[f"{share}, scoring test.csv (whole command)"] = used["scoring"]["ray_share"]
    sizes = [size for size in results.get("training_input", []) if "not_run" not in size]
    if len(sizes) > 1:
        small, large = sizes[0], sizes[-1]
        span = f"{large['rows']:,} / {small['rows']:,} rows"
        out[f"training input, driver peak RSS, {span}"] = large["driver_peak_rss_mb"] / small["driver_peak_rss_mb"]
        out[f"training input, worker's mapped rows, {span}"] = (
            large["worker_peak_shared_mb"] / small["worker_peak_shared_mb"]
        )
    out.update(precision_accuracy.ratios(results.get("precision", {})))
    serving = results.get("serving")
    if serving:
        rate = {(row["server"], row["concurrency"]): row["requests_per_s"] for row in serving["rows"]}
        for concurrency in sorted({row["concurrency"] for row in serving["rows"]}):
            out[f"serve requests/s / plain server's, concurrency {concurrency}"] = (
                rate["serve", concurrency] / rate["plain", concurrency]
            )
    return out


def _scale_ratios(rows: list[dict]) -> dict:
    out = {}
    digits = [r for r in rows if r["path"].startswith("digits")]
    plain_rates = [r["predict_images_per_s"] for r in rows if r["path"] == "plain" and "predict_images_per_s" in r]
    if not digits:
        return out
    sizes = sorted({r["images"] for r in digits})
    for kind in ("parquet", "csv"):
        one_actor = {r["images"]: r for r in digits if r["format"] == kind and r["path"] == "digits, 1 actor(s)"}
        if len(sizes) >= 2 and sizes[-1] in one_actor and sizes[-2] in one_actor and plain_rates:
            big, small = one_actor[sizes[-1]], one_actor[sizes[-2]]
            marginal = (sizes[-1] - sizes[-2]) / (big["wall_s"] - small["wall_s"])
            out[f"predict marginal images/s / plain model.predict ({kind}, {sizes[-2]:,}->{sizes[-1]:,})"] = (
                marginal / max(plain_rates)
            )
        if sizes[0] in one_actor and len(sizes) > 1 and sizes[-1] in one_actor:
            out[f"predict driver peak RSS, largest / 28k ({kind}, {sizes[-1]:,} images)"] = (
                one_actor[sizes[-1]]["driver_peak_rss_mb"] / one_actor[sizes[0]]["driver_peak_rss_mb"]
            )
    return out


# Said of a time to 99% when some repeats ended short of it: the ratio is shown, not judged.
UNPROVEN = "99% reached"


def verdict(name: str, value: float) -> tuple[str, str]:
    for key, (comparison, bound) in TARGETS.items():
        if name.startswith(key):
            if UNPROVEN in name:
                return f"{comparison} {bound}", "unproven"
            met = value >= bound if comparison == ">=" else value <= bound
            return f"{comparison} {bound}", "met" if met else "**missed**"
    return "", ""


def markdown(results: dict, chart: str) -> str:
    peak = results["arithmetic"]["peak_gflops"]
    lines = [
        f"# Benchmarks ({results['date']}{', QUICK SMOKE RUN: numbers meaningless' if results['quick'] else ''})",
        "",
        f"`python -m bench` on {results['machine']['cpus']} CPUs "
        f"({results['machine']['platform']}; CPU flags {', '.join(results['machine'].get('cpu_flags') or ['none'])}; "
        f"a 2048x2048 float32 matmul in TensorFlow peaks at {peak:.0f} GFLOP/s here"
        + _bfloat16_peak(results["arithmetic"])
        + _load(results["machine"])
        + f"), {results['wall_s'] / 60:.0f} minutes, repeats "
        f"{results['settings']['repeats']}, sections: {', '.join(results['sections'])}." + _kept_note(results),
        "",
        "## Headline ratios",
        "",
        "| ratio | measured | target | |",
        "|---|---|---|---|",
    ]
    for name, value in results["ratios"].items():
        target, met = verdict(name, value)
        lines.append(f"| {name} | {value:.2f} | {target} | {met} |")
    if "scoring" in results:
        lines += _scoring_tables(results["scoring"])
    if "training" in results:
        lines += _training_tables(results)
    if "ceilings" in results:
        lines += _ceilings_table(results["ceilings"])
    if "footprint" in results:
        lines += _footprint_tables(results["footprint"], results["machine"]["cpus"])
    if "training_input" in results:
        lines += _training_input_table(results["training_input"])
    if "serving" in results:
        lines += _serving_tables(results["serving"])
    if "precision" in results:
        lines += precision_accuracy.table(results["precision"])
    lines += ["", f"![benchmark chart]({chart})", ""]
    return "\n".join(lines)


def _load(machine: dict) -> str:
    load = machine.get("load_average")
    if load is None:
        return ""
    # Above 1 on a 2-core machine, other work held half a core or more as the run began.
    return f"; load average {load[0]:.1f} at the start" + (", the machine shared" if load[0] > 1 else "")


def _bfloat16_peak(arithmetic: dict) -> str:
    bfloat16 = arithmetic.get("peak_gflops_bfloat16")
    return "" if bfloat16 is None else f", bfloat16 at {bfloat16:.0f}"


def kept_groups(results: dict) -> list[dict]:
    """The sections a run kept from earlier ones (`--update`), grouped by the run that measured
    them: each with its date, wall time, matmul peak and CPU flags. (Files written before the grouping
    hold one group as a mapping.)"""
    kept = results.get("kept") or []
    return [kept] if isinstance(kept, dict) else kept


def _kept_note(results: dict) -> str:
    return "".join(
        f" The {' and '.join(group['sections'])} section{'s' if len(group['sections']) > 1 else ''} "
        f"{'are' if len(group['sections']) > 1 else 'is'} kept from an earlier run ({group['date']}, "
        f"{group['wall_s'] / 60:.0f} minutes, matmul peak {group['peak_gflops']:.0f} GFLOP/s"
        f"{_flags_note(group)}; "
        "`--update`): compare its ratios, not its absolute numbers, with this run's."
        for group in kept_groups(results)
        if group["sections"]
    )


def _flags_note(group: dict) -> str:
    """The CPU flags of the machine that measured a kept group, where its run recorded them."""
    flags = group.get("cpu_flags")
    return "" if flags is None else f", CPU flags {', '.join(flags) or 'none'}"


def _scoring_tables(scoring: dict) -> list[str]:
    fixed = scoring["fixed_cost"]
    lines = [
        "",
        "## Scoring the Kaggle test set (28,000 rows of test.csv), whole commands",
        "",
        "Medians of the repeats, each a fresh process. The plain script: pandas reads test.csv, "
        "Keras predicts, pandas writes Parquet and submission.csv. "
        f"Submissions byte-identical: {fixed['identical_submissions']}.",
        "",
        "| | wall | seconds by phase |",
        "|---|---|---|",
        f"| plain script | {fixed['plain_wall_s']:.1f} s | "
        + ", ".join(f"{k} {v:.1f}" for k, v in fixed["plain_seconds"].items())
        + " |",
        f"| `digits predict`, 1 actor | {fixed['digits_wall_s']:.1f} s | "
        + ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in fixed["digits_seconds"].items())
        + " (from predict.json) |",
        "",
        "Where `digits predict`'s fixed seconds go (a probe doing the same steps, in seconds):",
        "",
        "| " + " | ".join(k.replace("_", " ") for k in fixed["startup"] if k != "process_s") + " |",
        "|" + "---|" * (len(fixed["startup"]) - 1),
        "| " + " | ".join(f"{v:.2f}" for k, v in fixed["startup"].items() if k != "process_s") + " |",
    ]
    cluster = scoring.get("two_node_cluster")
    if cluster:
        lines += [
            "",
            f"On `cluster/local_cluster.sh start 2` ({cluster['cluster_nodes']} nodes: a head "
            "without CPUs and two worker nodes of one CPU each), 2 actors scored test.csv in "
            f"{cluster['cluster_2_actors_wall_s']:.1f} s (the embedded Ray with 1 actor: "
            f"{cluster['embedded_1_actor_wall_s']:.1f} s); submission.csv byte-identical to the "
            f"embedded run's: {cluster['identical_submissions']}.",
        ]
    rows = scoring.get("scale", {}).get("rows", [])
    if rows:
        lines += [
            "",
            "## Scoring at scale",
            "",
            "The test set repeated to each size, in one file; 1 actor uses both CPUs, 2 actors "
            "one each. Images/s over the whole command, start-up included. Object-store peak: "
            "growth of /dev/shm, where Ray's object store lives.",
            "",
            "| images | format | path | wall | images/s | peak RSS of the driver (plain: the script) | object-store peak |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            if "not_run" in row:
                lines.append(
                    f"| {row['images']:,} | {row['format']} | {row['path']} | not run: {row['not_run']} | | | |"
                )
                continue
            rss = row.get("driver_peak_rss_mb", row.get("peak_rss_mb"))
            store = row.get("object_store_peak_mb")
            lines.append(
                f"| {row['images']:,} | {row['format']} | {row['path']} | {row['wall_s']:.1f} s | "
                f"{row['images_per_s']:,.0f} | {rss:,.0f} MB | "
                f"{'-' if store is None else f'{store:,.0f} MB'} |"
            )
    return lines


def _serving_tables(serving: dict) -> list[str]:
    lines = [
        "",
        "## Serving: `digits serve` against a plain HTTP server",
        "",
        f"The {serving['model']} model's model.keras behind `digits serve` (Ray Serve on an embedded Ray, one "
        "replica with 2 CPUs, requests batched: at most 32, waiting at most 1 ms) and behind the standard "
        "library's ThreadingHTTPServer (one process, each request's image through the model as it comes), "
        "both running side by side on loopback. Each load: that many clients sending single-image POST "
        f"/predict requests back to back on kept-alive connections, {serving['requests']:,} requests or "
        f"{serving['seconds']:.0f} s, whichever ends first; the best of the interleaved repeats. Same labels "
        f"from both: {serving['same_labels']}. CPU: {serving['cpu_flags']}.",
        "",
        "| server | concurrency | answered | failed | requests/s | p50 | p99 |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in sorted(serving["rows"], key=lambda row: (row["concurrency"], row["server"])):
        lines.append(
            f"| {'`digits serve`' if row['server'] == 'serve' else 'plain http.server'} | {row['concurrency']} | "
            f"{row['answered']:,} | {row['failed']} | {row['requests_per_s']:,.0f} | {row['p50_ms']:.1f} ms | "
            f"{row['p99_ms']:.1f} ms |"
        )
    lines += [
        "",
        "CPU time per answered request, by process, over each load above (read from /proc before and after "
        "it; the server's command is `driver`, the processes under 0.05 ms left out). On 2 CPUs, 2,000 ms "
        "of CPU a second divided by a request's total is the most requests/s that server could answer.",
        "",
        "| server | concurrency | total | by process |",
        "|---|---|---|---|",
    ]
    for row in sorted(serving["rows"], key=lambda row: (row["concurrency"], row["server"])):
        parts = sorted(row["cpu_ms_per_request"].items(), key=lambda item: -item[1])
        lines.append(
            f"| {'`digits serve`' if row['server'] == 'serve' else 'plain http.server'} | {row['concurrency']} | "
            f"{sum(row['cpu_ms_per_request'].values()):.2f} ms | "
            + ", ".join(f"{name} {ms:.2f}" for name, ms in parts if ms >= 0.05)
            + " |"
        )
    return lines


def _training_tables(results: dict) -> list[str]:
    training, arithmetic = results["training"], results["arithmetic"]
    # The peak of the run that measured the training section, which may be an earlier one's.
    peak = next(
        (group["peak_gflops"] for group in kept_groups(results) if "training" in group["sections"]),
        arithmetic["peak_gflops"],
    )
    lines = [
        "",
        "## Training: what a second worker adds",
        "",
        "Images/s of the epochs after the first (medians), the same per-worker batch; `xK`: "
        "`--accumulate K`. Efficiency: 2 workers x 1 CPU over twice 1 worker x 1 CPU. Between "
        "workers the gradients are summed in bfloat16.",
        "",
        "| model@batch x accumulate | 1 worker x 1 CPU | 2 workers x 1 CPU | efficiency | "
        "train MFLOP/image | 2-worker GFLOP/s | % of peak |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, entry in training["weak_scaling"].items():
        flops = arithmetic["models"][key.split("@")[0]]["train_flops"]
        gflops = flops * entry["two_workers"] / 1e9
        lines.append(
            f"| {key} | {entry['one_worker']:,.0f} | {entry['two_workers']:,.0f} | "
            f"{entry['efficiency']:.2f} | {flops / 1e6:.1f} | {gflops:.1f} | {100 * gflops / peak:.0f}% |"
        )
    lines += [
        "",
        "Where a step's time goes (bench/probes.py `steps`, ms per step of one batch, "
        "random images; parts timed alone, 16 steps per call):",
        "",
        "| workers x CPUs @ batch | forward + backward | all-reduce of the gradients, float32 | "
        "bfloat16 | input | Keras step | digits step (bfloat16) | 2 batches per all-reduce, per batch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, parts in training["step_parts"].items():
        whole = parts["ms_per_micro_batch"]
        lines.append(
            f"| {key} | {parts.get('compute_ms', 0):.1f} | {parts.get('all_reduce_ms', 0):.1f} | "
            f"{parts.get('all_reduce_bfloat16_ms', 0):.1f} | {parts.get('input_ms', 0):.1f} | "
            f"{whole['keras']:.1f} | {whole['bfloat16']:.1f} | {whole['bfloat16x2']:.1f} |"
        )
    to_99 = training["time_to_99"]
    lines += [
        "",
        "## Time to 99% validation accuracy (`--preset fast`, 1 CPU per worker)",
        "",
        "Medians over the repeats; whole command, training clock (first step to the end of the "
        "epoch that reached 99%), and the start-up before the first step.",
        "",
        "| workers | whole command | training | first step | epochs | reached 99% | final val_accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, entry in to_99.items():
        reached = f"{entry['reached']} of {entry['repeats']}"
        lines.append(
            f"| {name} | {entry['wall_s']:.0f} s | {entry['training_s']:.0f} s | "
            f"{entry['first_step_s']:.1f} s | {entry['epochs']:g} | "
            f"{reached if entry['reached'] == entry['repeats'] else f'**{reached}**'} | "
            f"{entry['val_accuracy']:.4f} |"
        )
    one = to_99.get("1 worker")
    if one:
        stages = {}
        for run in one["runs"]:
            for name, at in run["timeline"].items():
                stages.setdefault(name, []).append(at)
        lines += [
            "",
            "Start-up of the 1-worker runs, seconds after `train()` was called (medians; run.json's timeline):",
            "",
            "| " + " | ".join(name.replace("_", " ") for name in stages) + " |",
            "|" + "---|" * len(stages),
            "| " + " | ".join(f"{statistics.median(v):.1f}" for v in stages.values()) + " |",
        ]
    lines += [
        "",
        "## `digits train` against the seed's plain Keras script (batch 32, 1 worker, every CPU)",
        "",
        "| model | a: seed Keras images/s | b: digits images/s | b/a | a wall | b wall |",
        "|---|---|---|---|---|---|",
    ]
    for model, entry in training["overhead"].items():
        lines.append(
            f"| {model} | {entry['a']:,.0f} | {entry['b']:,.0f} | {entry['b'] / entry['a']:.2f} | "
            f"{entry['a_wall']:.0f} s | {entry['b_wall']:.0f} s |"
        )
    cluster = training.get("two_node_cluster")
    if cluster:
        lines += [
            "",
            f"On `cluster/local_cluster.sh start 2` (two worker nodes of one CPU each), "
            f"`--preset fast --workers 2`: {cluster['stop_reason']}, val_accuracy "
            f"{cluster['val_accuracy']:.4f}, {cluster['wall_s']:.0f} s in all, epochs at "
            + ", ".join(f"{v:,.0f}" for v in cluster["images_per_s"])
            + f" images/s; shards disjoint: {cluster['shards']['disjoint']}.",
        ]
    return lines


def _ceilings_table(ceilings: dict) -> list[str]:
    lines = [
        "",
        "## Training: a second worker against the machine's ceiling",
        "",
        "Images/s of the epochs after the first (medians), one CPU per worker, the same per-worker "
        "batch. Without Ray: a plain process training as one worker does (bench/probes.py "
        "`uncoupled`), alone and two at once. On one shared Ray: `digits train --workers 1` alone, "
        "two such runs at once, and one `--workers 2` run, then again with `--sync-every K` (each "
        "worker's own updates, the weights averaged every K batches). A pair's ceiling: its sum "
        "over twice the one alone.",
        "",
        "| model@batch | plain alone | plain pair | ceiling | Ray: 1 worker | Ray: pair | ceiling "
        "| 2 workers | of the Ray pair | of the plain pair | of twice 1 worker | 2 workers, --sync-every K "
        "| of the Ray pair |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, entry in ceilings.items():
        lines.append(
            f"| {key} | {entry['plain']:,.0f} | {entry['plain_pair']:,.0f} | {entry['plain_ceiling']:.2f} "
            f"| {entry['ray']:,.0f} | {entry['ray_pair']:,.0f} | {entry['ray_ceiling']:.2f} "
            f"| {entry['two_workers']:,.0f} | {entry['two_workers_of_ray_pair']:.2f} "
            f"| {entry['two_workers_of_plain_pair']:.2f} | {entry['efficiency']:.2f} "
            f"| {entry['two_workers_synced_less']:,.0f} (K={entry['sync_every']}) "
            f"| {entry['synced_less_of_ray_pair']:.2f} |"
        )
    lines += [
        "",
        "Where a step's time goes: one more run of each, every worker tracing 64 steps from the "
        "second epoch with TensorFlow's profiler (`--profile-steps`, read by bench/step_profile.py). "
        "Per step, in ms, per worker: the step's wall time; TensorFlow's compute threads in the "
        "model's ops; the all-reduces from start to end (the transfer and the wait for the other "
        "worker); and the CPU time of the threads that compute, that run the collectives, that "
        "carry gRPC, and the rest (the worker's Python, Ray's threads).",
        "",
        "| model@batch | run | rank | step | in ops | all-reduces (per step) | CPU: compute | collectives "
        "| gRPC | other |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, entry in ceilings.items():
        for run, ranks in entry["profile"].items():
            for rank, parts in ranks.items():
                cpu = parts["cpu_ms"]
                lines.append(
                    f"| {key} | {run.replace('_', ' ')} | {rank} | {parts['step_ms']:.1f} | {parts['compute_ms']:.1f} "
                    f"| {parts['collective_ms']:.1f} ({parts['collectives_per_step']:g}) | {cpu['compute']:.1f} "
                    f"| {cpu['collectives']:.1f} | {cpu['grpc']:.1f} | {cpu['other']:.1f} |"
                )
    return lines


def _footprint_tables(used: dict, cpus: int) -> list[str]:
    training, scoring = used["training"], used["scoring"]
    lines = [
        "",
        "## Ray's own processes (bench/footprint.py)",
        "",
        "CPU seconds of every process in the command's tree, read from /proc every half second, "
        "each an embedded Ray's: the driver, the training worker and Ray Data's tasks that read, "
        "score and write are ours; everything else is Ray's. Per minute of wall time; "
        f"{cpus} CPUs give {cpus * 60} CPU seconds a minute. Medians of the repeats.",
        "",
        "| command | wall | Ray's CPU s | Ray's CPU s / minute | Ray's share of the machine | ours CPU s |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in (("1-worker training", training), ("scoring test.csv, 1 actor", scoring)):
        lines.append(
            f"| {name} | {entry['wall_s']:.0f} s | {entry['ray_cpu_s']:.1f} | "
            f"{entry['ray_cpu_s_per_minute']:.1f} | {entry['ray_share']:.3f} | {entry['ours_cpu_s']:.1f} |"
        )
    runs = training["runs"]
    window = runs[-1].get("training")
    if window:
        lines += [
            "",
            f"CPU seconds per minute of each process during the training's epochs (its last run, "
            f"{window['seconds']:.0f} s from the first step to the end), and over the whole command:",
            "",
            "| process | during the epochs, CPU s / minute | whole command, CPU s |",
            "|---|---|---|",
        ]
        whole = runs[-1]["cpu_s_by_class"]
        for name, cpu_s in whole.items():
            lines.append(f"| {name} | {window['cpu_s_per_minute_by_class'].get(name, 0):.2f} | {cpu_s:.2f} |")
    return lines


def _training_input_table(sizes: list[dict]) -> list[str]:
    lines = [
        "",
        "## The training input at scale (bench/training_input.py)",
        "",
        "train.csv's rows repeated; `digits train --workers 1`, dense net, one epoch at batch "
        "1024, no validation split, embedded Ray. Rows held: the images and labels as arrays "
        "(785 bytes a row). Driver private: its own memory (the rows pass through it a chunk at "
        "a time, parsed and checked, to a spool on disk); driver shared: what it mapped of the "
        "object store (shared memory); putting task: the task on the driver's node that reads the "
        "spool into the store, its private memory and the store's pages it wrote; worker mapped: "
        "what the worker mapped from the store (zero-copy on one node); worker private: the rows "
        "joined into the array it trains from. Each a peak of its own.",
        "",
        "| rows | rows held | driver peak RSS | driver private | driver shared | putting task private | "
        "putting task shared | worker mapped | worker private | worker peak RSS | images/s | wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size in sizes:
        if "not_run" in size:
            lines.append(
                f"| {size['rows']:,} | {size['data_mb']:,.0f} MB | not run: {size['not_run']} | | | | | | | | | |"
            )
            continue
        lines.append(
            f"| {size['rows']:,} | {size['data_mb']:,.0f} MB | {size['driver_peak_rss_mb']:,.0f} MB | "
            f"{size['driver_peak_private_mb']:,.0f} MB | {size['driver_peak_shared_mb']:,.0f} MB | "
            f"{_sampled_mb(size['putter_peak_private_mb'])} | {_sampled_mb(size['putter_peak_shared_mb'])} | "
            f"{size['worker_peak_shared_mb']:,.0f} MB | "
            f"{size['worker_peak_private_mb']:,.0f} MB | {size['worker_peak_rss_mb']:,.0f} MB | "
            f"{size['images_per_s']:,.0f} | {size['wall_s']:.0f} s |"
        )
    return lines


def _sampled_mb(value: float | None) -> str:
    return NOT_SAMPLED if value is None else f"{value:,.0f} MB"


# A process that began and ended between two readings of /proc (bench/footprint.py).
NOT_SAMPLED = "over between two readings"


def chart(results: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    names = [name for name in results["ratios"] if "(s," not in name]
    values = [results["ratios"][name] for name in names]
    figure = Figure(figsize=(9, 0.45 * len(names) + 1.2), layout="constrained")
    axes = figure.subplots()
    colours = [
        {"met": "tab:green", "**missed**": "tab:red"}.get(verdict(n, v)[1], "tab:gray") for n, v in zip(names, values)
    ]
    axes.barh(range(len(names)), values, color=colours)
    for index, (name, value) in enumerate(zip(names, values)):
        target, _ = verdict(name, value)
        if target:
            bound = float(target.split()[1])
            axes.plot([bound, bound], [index - 0.4, index + 0.4], color="black", linewidth=2)
        axes.text(value, index, f" {value:.2f}", va="center", fontsize=8)
    axes.set_yticks(range(len(names)), names, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlim(0, max(values + [1.0]) * 1.2)
    axes.set_title("ratios measured side by side (black: target; green met, red missed)")
    figure.savefig(path.with_suffix(".tmp.png"), dpi=110)
    os.replace(path.with_suffix(".tmp.png"), path)
