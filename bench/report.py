"""The benchmark results as headline ratios (each of two numbers measured side by side in the
same run), BENCHMARKS.md and a chart."""

from __future__ import annotations

import os
from pathlib import Path

# The issues' targets on a 2-core CPU: (comparison, bound)
TARGETS = {
    "b/a": (">=", 0.95),
    "time_to_99 fast/seed": ("<=", 0.5),
    "predict wall / plain wall": ("<=", 2.0),
    "predict marginal images/s / plain model.predict": (">=", 0.9),
    "predict driver peak RSS, largest / 28k": ("<=", 1.25),
}


def ratios(results: dict) -> dict:
    out = {}
    training = results.get("training")
    if training:
        for key, entry in training.items():
            model = key.split("@")[0]
            if key.endswith("@32") and "a" in entry:
                out[f"b/a {model}"] = entry["b"] / entry["a"]
                out[f"wall b/a {model}"] = entry["b_wall"] / entry["a_wall"]
            out[f"c/b {key.replace('@', ', batch ')}"] = entry["c"] / entry["b"]
    to_99 = results.get("time_to_99") or {}
    fast, seed = to_99.get("fast"), to_99.get("seed")
    if fast and seed and fast["reached"] == fast["repeats"]:
        # A seed run that never got there is a lower bound on its time to 99%; a median with
        # one in it is too, so the ratio is then an upper bound on the true one.
        bound = (f" (upper bound: seed missed 99% in {seed['repeats'] - seed['reached']} of "
                 f"{seed['repeats']})" if seed["reached"] < seed["repeats"] else "")
        out[f"time_to_99 fast/seed{bound}"] = fast["wall_s"] / seed["wall_s"]
        out[f"training-clock time_to_99 fast/seed{bound}"] = fast["training_s"] / seed["training_s"]
    scoring = results.get("scoring")
    if scoring:
        fixed = scoring["fixed_cost"]
        out["predict wall / plain wall"] = fixed["digits_wall_s"] / fixed["plain_wall_s"]
        out.update(_scale_ratios(scoring.get("scale", {}).get("rows", [])))
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
            out[f"predict marginal images/s / plain model.predict ({kind}, "
                f"{sizes[-2]:,}->{sizes[-1]:,})"] = marginal / max(plain_rates)
        if sizes[0] in one_actor and len(sizes) > 1 and sizes[-1] in one_actor:
            out[f"predict driver peak RSS, largest / 28k ({kind}, {sizes[-1]:,} images)"] = \
                one_actor[sizes[-1]]["driver_peak_rss_mb"] / one_actor[sizes[0]]["driver_peak_rss_mb"]
    return out


def verdict(name: str, value: float) -> tuple[str, str]:
    for key, (comparison, bound) in TARGETS.items():
        if name.startswith(key):
            met = value >= bound if comparison == ">=" else value <= bound
            return f"{comparison} {bound}", "met" if met else "**missed**"
    return "", ""


def markdown(results: dict, chart: str) -> str:
    peak = results["arithmetic"]["peak_gflops"]
    lines = [f"# Benchmarks ({results['date']}{', QUICK SMOKE RUN: numbers meaningless' if results['quick'] else ''})",
             "", f"`python -m bench` on {results['machine']['cpus']} CPUs "
             f"({results['machine']['platform']}; a 2048x2048 float32 matmul in TensorFlow peaks at "
             f"{peak:.0f} GFLOP/s here), {results['wall_s'] / 60:.0f} minutes, repeats "
             f"{results['settings']['repeats']}, sections: {', '.join(results['sections'])}.", "",
             "## Headline ratios", "", "| ratio | measured | target | |", "|---|---|---|---|"]
    for name, value in results["ratios"].items():
        target, met = verdict(name, value)
        lines.append(f"| {name} | {value:.2f} | {target} | {met} |")
    if "scoring" in results:
        lines += _scoring_tables(results["scoring"])
    if "training" in results:
        lines += _training_tables(results)
    lines += ["", f"![benchmark chart]({chart})", ""]
    return "\n".join(lines)


def _scoring_tables(scoring: dict) -> list[str]:
    fixed = scoring["fixed_cost"]
    lines = ["", "## Scoring the Kaggle test set (28,000 rows of test.csv), whole commands", "",
             "Medians of the repeats, each a fresh process. The plain script: pandas reads test.csv, "
             "Keras predicts, pandas writes Parquet and submission.csv. "
             f"Submissions byte-identical: {fixed['identical_submissions']}.", "",
             "| | wall | seconds by phase |", "|---|---|---|",
             f"| plain script | {fixed['plain_wall_s']:.1f} s | "
             + ", ".join(f"{k} {v:.1f}" for k, v in fixed["plain_seconds"].items()) + " |",
             f"| `digits predict`, 1 actor | {fixed['digits_wall_s']:.1f} s | "
             + ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in fixed["digits_seconds"].items())
             + " (from predict.json) |", "",
             "Where `digits predict`'s fixed seconds go (a probe doing the same steps, in seconds):", "",
             "| " + " | ".join(k.replace("_", " ") for k in fixed["startup"] if k != "process_s") + " |",
             "|" + "---|" * (len(fixed["startup"]) - 1),
             "| " + " | ".join(f"{v:.2f}" for k, v in fixed["startup"].items() if k != "process_s") + " |"]
    cluster = scoring.get("two_node_cluster")
    if cluster:
        lines += ["", f"On `cluster/local_cluster.sh start 2` ({cluster['cluster_nodes']} nodes: a head "
                  "without CPUs and two worker nodes of one CPU each), 2 actors scored test.csv in "
                  f"{cluster['cluster_2_actors_wall_s']:.1f} s (the embedded Ray with 1 actor: "
                  f"{cluster['embedded_1_actor_wall_s']:.1f} s); submission.csv byte-identical to the "
                  f"embedded run's: {cluster['identical_submissions']}."]
    rows = scoring.get("scale", {}).get("rows", [])
    if rows:
        lines += ["", "## Scoring at scale", "",
                  "The test set repeated to each size, in one file; 1 actor uses both CPUs, 2 actors "
                  "one each. Images/s over the whole command, start-up included. Object-store peak: "
                  "growth of /dev/shm, where Ray's object store lives.", "",
                  "| images | format | path | wall | images/s | peak RSS of the driver (plain: the script) | object-store peak |",
                  "|---|---|---|---|---|---|---|"]
        for row in rows:
            if "not_run" in row:
                lines.append(f"| {row['images']:,} | {row['format']} | {row['path']} | not run: "
                             f"{row['not_run']} | | | |")
                continue
            rss = row.get("driver_peak_rss_mb", row.get("peak_rss_mb"))
            store = row.get("object_store_peak_mb")
            lines.append(f"| {row['images']:,} | {row['format']} | {row['path']} | {row['wall_s']:.1f} s | "
                         f"{row['images_per_s']:,.0f} | {rss:,.0f} MB | "
                         f"{'-' if store is None else f'{store:,.0f} MB'} |")
    return lines


def _training_tables(results: dict) -> list[str]:
    training, arithmetic = results["training"], results["arithmetic"]
    peak = arithmetic["peak_gflops"]
    lines = ["", "## Training throughput (images/s) and arithmetic", "",
             "Medians of the epochs after the first. a: the seed's plain Keras script; b: "
             "`digits train`, 1 worker with every CPU; c: `digits train`, 2 workers x 1 CPU.", "",
             "| model, per-worker batch | a: seed Keras | b: 1 worker | c: 2 workers | "
             "train MFLOP/image | b GFLOP/s | b % of peak |", "|---|---|---|---|---|---|---|"]
    for key, entry in training.items():
        model = key.split("@")[0]
        flops = arithmetic["models"][model]["train_flops"]
        gflops = flops * entry["b"] / 1e9
        lines.append(f"| {key.replace('@', ', ')} | {_fmt(entry.get('a'))} | {entry['b']:,.0f} | "
                     f"{entry['c']:,.0f} | {flops / 1e6:.1f} | {gflops:.1f} | {100 * gflops / peak:.0f}% |")
    to_99 = results.get("time_to_99") or {}
    if to_99:
        lines += ["", "## Time to 99% validation accuracy (CNN, 1 worker, wall time incl. start-up)", "",
                  "| settings | wall | training | epochs | reached 99% | final val_accuracy |",
                  "|---|---|---|---|---|---|"]
        for name, entry in to_99.items():
            reached = f"{entry['reached']} of {entry['repeats']}"
            lines.append(f"| {name} | {entry['wall_s']:.0f} s | {entry['training_s']:.0f} s | "
                         f"{entry['epochs']:g} | {reached if entry['reached'] == entry['repeats'] else f'**{reached}**'}"
                         f" | {entry['val_accuracy']:.4f} |")
    return lines


def _fmt(value) -> str:
    return "-" if value is None else f"{value:,.0f}"


def chart(results: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    names = [name for name in results["ratios"] if not name.startswith("wall")]
    values = [results["ratios"][name] for name in names]
    figure = Figure(figsize=(9, 0.45 * len(names) + 1.2), layout="constrained")
    axes = figure.subplots()
    colours = [{"met": "tab:green", "**missed**": "tab:red"}.get(verdict(n, v)[1], "tab:gray")
               for n, v in zip(names, values)]
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
