"""The benchmark's report: rows -> results.csv / results.json, table.md, plots, W&B summary.

Every file is written atomically, so a report read while a benchmark runs is whole.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
from collections import defaultdict
from pathlib import Path

from prompt_methods.callbacks import atomic_write_text

COLUMNS = ["task", "method", "impl", "seed", "metric", "value", "trainable_params", "total_params",
           "train_samples_per_s", "eval_samples_per_s", "peak_mem_mb", "wall_s", "checkpoint_bytes"]


def _number(value) -> float:
    """A row's number; None (how results.json stores a missing one, JSON having no NaN) is NaN."""
    return float("nan") if value is None else float(value)


def _numbers(values: list[float]) -> list[float]:
    return [v for v in values if v == v]  # drop NaN


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = _numbers(values)
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _params(n: float) -> str:
    return f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n:,.0f}"


def summarize(rows: list[dict]) -> list[dict]:
    """One entry per (task, method, impl): mean and std over seeds of every number, and the score's
    median and worst seed (a 100-step run can land far below the others; the mean alone hides which)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["task"], row["method"], row["impl"])].append(row)
    out = []
    for (task, method, impl), group in groups.items():
        scored = len(_numbers([_number(r["value"]) for r in group]))  # seeds with a score (a NaN one has none)
        entry = {"task": task, "method": method, "impl": impl, "metric": group[0]["metric"], "seeds": scored}
        for col in ("value", "trainable_params", "train_samples_per_s", "eval_samples_per_s", "peak_mem_mb",
                    "checkpoint_bytes", "wall_s"):
            entry[col], entry[col + "_std"] = _mean_std([_number(r[col]) for r in group])
        scores = _numbers([_number(r["value"]) for r in group])
        entry["value_median"] = statistics.median(scores) if scores else float("nan")
        entry["value_min"] = min(scores) if scores else float("nan")
        out.append(entry)
    return out


def peft_ratios(rows: list[dict]) -> list[dict]:
    """promptlit / PEFT for every (task, method) measured both ways, over the seeds both ran and
    scored (a partly run grid, or a seed without a score on one side, would otherwise set a mean over
    three seeds against another set of seeds)."""
    cells = {(r["task"], r["method"], r["impl"], r["seed"]): r for r in rows if _number(r["value"]) == _number(r["value"])}
    out = []
    for task, method in sorted({(t, m) for t, m, i, _ in cells if i == "peft"}):
        seeds = sorted({s for t, m, i, s in cells if (t, m, i) == (task, method, "promptlit")}
                       & {s for t, m, i, s in cells if (t, m, i) == (task, method, "peft")})
        if not seeds:
            continue
        paired = {e["impl"]: e for e in summarize([cells[(task, method, impl, s)]
                                                   for impl in ("promptlit", "peft") for s in seeds])}
        ours, peer = paired["promptlit"], paired["peft"]
        per_seed = _numbers([_number(cells[(task, method, "promptlit", s)]["train_samples_per_s"])
                             / _number(cells[(task, method, "peft", s)]["train_samples_per_s"]) for s in seeds])
        out.append({"task": task, "method": method, "seeds": len(seeds),
                    "throughput_ratio": ours["train_samples_per_s"] / peer["train_samples_per_s"],
                    "throughput_ratio_per_seed": per_seed,
                    "eval_throughput_ratio": ours["eval_samples_per_s"] / peer["eval_samples_per_s"],
                    "peak_mem_ratio": ours["peak_mem_mb"] / peer["peak_mem_mb"],
                    "value_diff": ours["value"] - peer["value"],
                    "value_median_diff": ours["value_median"] - peer["value_median"]})
    return out


def _span(values: list[float]) -> str:
    """``1.34–1.61x`` (one value: ``1.48x``; none: ``–``)."""
    if not values:
        return "–"
    lo, hi = min(values), max(values)
    return f"{lo:.2f}x" if len(values) == 1 else f"{lo:.2f}–{hi:.2f}x"


def _provenance(rows: list[dict]) -> str:
    """Which code the rows ran at (each row's ``commit``, counted), or nothing where no row names one."""
    commits = defaultdict(int)
    for row in rows:
        commits[row.get("commit")] += 1
    if set(commits) == {None}:
        return ""
    named = ", ".join(f"`{c}` ({n})" for c, n in sorted(commits.items(), key=lambda kv: -kv[1]) if c is not None)
    unnamed = f"; {commits[None]} recorded before rows named their commit" if commits.get(None) else ""
    return f" Code: {named}{unnamed}."


def _machine(rows: list[dict]) -> str:
    """The spread of the CPU probe taken before each cell (``cpu_gflops``), where rows have it."""
    probes = _numbers([_number(r.get("cpu_gflops")) for r in rows])
    if not probes:
        return ""
    lo, hi = min(probes), max(probes)
    return (f" CPU probe before each cell (fp32 matmul): {lo:.0f}–{hi:.0f} GFLOP/s over {len(probes)} cells"
            + (f": the machine's speed moved {hi / lo:.2f}x between cells, so compare the throughputs of cells "
               "with similar probes." if hi > 1.1 * lo else "."))


def markdown(grid: dict, rows: list[dict]) -> str:
    summary = summarize(rows)
    budget = grid.get("budget", {})
    lines = [
        f"# Benchmark `{grid['name']}`", "",
        f"Backbone `{grid.get('backbone') or 'per config'}`, precision `{grid.get('precision') or 'per config'}`, "
        f"{budget.get('steps')} steps x batch {budget.get('batch_size') or 'per config'}"
        + (f", {budget['few_shot_k']} examples per class" if budget.get("few_shot_k") else "")
        + (f", scored on {budget.get('eval_examples', 256)} test examples (each task's `eval_sample`: the first N, "
           f"or N drawn with `split_seed` where its file is grouped)" if budget.get("eval_examples", 256) is not None
           else ", scored on the test examples each task's config sets (`max_eval_samples`)")
        + f"; seeds {grid['seeds']}. "
        f"Score = test metric x 100, mean ± std over the seeds run; median and worst seed beside it. {len(rows)} runs"
        + (f" of the grid's {grid['planned']}." if grid.get("planned", len(rows)) > len(rows) else ".")
        + _provenance(rows) + _machine(rows), "",
        "| task | method | impl | metric | seeds | score | median | worst | trainable | train samples/s | eval samples/s "
        "| peak MiB | checkpoint |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in sorted(summary, key=lambda s: (s["task"], s["method"], s["impl"])):
        score = f"{100 * s['value']:.1f}" + (f" ± {100 * s['value_std']:.1f}" if s["seeds"] > 1 else "")  # one seed: no spread
        lines.append(
            f"| {s['task']} | {s['method']} | {s['impl']} | {s['metric']} | {s['seeds']} | {score} "
            f"| {100 * s['value_median']:.1f} | {100 * s['value_min']:.1f} | {_params(s['trainable_params'])} "
            f"| {s['train_samples_per_s']:.2f} | {s['eval_samples_per_s']:.2f} "
            f"| {s['peak_mem_mb']:.0f} | {_size(s['checkpoint_bytes'])} |"
        )
    ratios = peft_ratios(rows)
    if ratios:
        lines += ["", "## promptlit vs PEFT", "",
                  "Over the seeds both implementations ran; the train throughput ratio of the means, and beside it "
                  "the lowest and highest ratio of one seed's two cells, which ran back to back.", "",
                  "| task | method | seeds | train throughput (ours/PEFT) | per seed | eval throughput (ours/PEFT) | peak memory (ours/PEFT) | score diff (ours − PEFT) | median diff |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in ratios:
            lines.append(f"| {r['task']} | {r['method']} | {r['seeds']} | {r['throughput_ratio']:.2f}x | {_span(r['throughput_ratio_per_seed'])} "
                         f"| {r['eval_throughput_ratio']:.2f}x | {r['peak_mem_ratio']:.2f}x | {100 * r['value_diff']:+.1f} "
                         f"| {100 * r['value_median_diff']:+.1f} |")
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:  # a missing number is an empty cell, whether the row is fresh (NaN) or read back (None)
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    return buf.getvalue()


def plots(rows: list[dict], out: Path) -> list[Path]:
    """score_vs_params.png (per task, log-x) and throughput.png (per method and impl)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    summary = summarize(rows)
    tasks = sorted({s["task"] for s in summary})
    if not tasks:
        return []
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for s in (s for s in summary if s["task"] == task):
            x = max(s["trainable_params"], 1)
            ax.errorbar(x, 100 * s["value"], yerr=100 * s["value_std"], fmt="o" if s["impl"] == "promptlit" else "x",
                        capsize=3, label=f"{s['method']} ({s['impl']})")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (zero-shot at 1)")
        ax.set_ylabel(f"{next(s['metric'] for s in summary if s['task'] == task)} x 100")
        ax.set_title(task)
        ax.legend(fontsize=6)
    fig.tight_layout()
    paths = [_save(fig, out / "score_vs_params.png")]
    plt.close(fig)
    trained = [s for s in summary if s["train_samples_per_s"] == s["train_samples_per_s"]]
    fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(trained)), 3.8))
    labels = [f"{s['task']}\n{s['method']}\n{s['impl']}" for s in trained]
    ax.bar(range(len(trained)), [s["train_samples_per_s"] for s in trained],
           yerr=[s["train_samples_per_s_std"] for s in trained],
           color=["tab:blue" if s["impl"] == "promptlit" else "tab:orange" for s in trained])
    ax.set_xticks(range(len(trained)), labels, fontsize=6)
    ax.set_ylabel("train samples/s")
    ax.set_title("training throughput (blue: promptlit, orange: PEFT)")
    fig.tight_layout()
    paths.append(_save(fig, out / "throughput.png"))
    plt.close(fig)
    return paths


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")  # two reports into one folder do not share it
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    return path


def wandb_summary(grid: dict, rows: list[dict], out: Path) -> None:
    """One W&B run in the benchmark's group holding the results and the mean/std table."""
    import hashlib

    import wandb

    from prompt_methods.callbacks import wandb_offline

    offline = wandb_offline()
    # online, one summary run per output folder: running the command again (a resumed grid, another
    # slice of it) logs the whole table into the same run, not a new one beside it. Offline runs cannot
    # be resumed (each would be another folder, and two in one second the same one), so each is new
    same = {} if offline else {
        "id": f"{grid['name']}-summary-{hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:8]}",
        "resume": "allow"}
    mode = "offline" if offline and not os.environ.get("WANDB_MODE") else None  # WANDB_MODE, when set, is wandb's
    run = wandb.init(project=grid.get("wandb_project", "promptlit"), group=grid["name"], name=f"{grid['name']}-summary",
                     job_type="benchmark-summary", dir=str(out), config={"grid": grid}, mode=mode,
                     reinit="finish_previous", **same)
    table = wandb.Table(columns=COLUMNS, data=[[r[c] for c in COLUMNS] for r in rows])
    summary = summarize(rows)
    cols = ["task", "method", "impl", "metric", "seeds", "value", "value_std", "value_median", "value_min",
            "train_samples_per_s", "peak_mem_mb"]
    mean_table = wandb.Table(columns=cols, data=[[s[c] for c in cols] for s in summary])
    run.log({"results": table, "summary": mean_table})
    for r in peft_ratios(rows):
        for key, name in (("throughput_ratio", "throughput_vs_peft"), ("peak_mem_ratio", "peak_mem_vs_peft"),
                          ("value_diff", "score_diff_vs_peft")):
            run.summary[f"{r['task']}/{r['method']}/{name}"] = r[key]
    run.finish()


def write_report(grid: dict, rows: list[dict], summary_run: bool = False) -> None:
    out = Path(grid["out"])
    rows = sorted(rows, key=lambda r: (r["task"], r["method"], r["impl"], r["seed"]))
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]
    atomic_write_text(out / "results.json", json.dumps(clean, indent=1))
    atomic_write_text(out / "results.csv", _csv(rows))
    atomic_write_text(out / "table.md", markdown(grid, rows))
    plots(rows, out)
    if summary_run and rows:
        try:
            wandb_summary(grid, rows, out)
        except Exception as err:  # the results are written; a W&B failure (network, a deleted run) does not undo them
            print(f"warning: the W&B summary run was not logged ({type(err).__name__}: {err}); the results are in {out}")
