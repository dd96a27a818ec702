"""promptlit benchmark: a grid of tasks x methods x seeds at a fixed budget, beside Hugging Face PEFT.

    python benchmark.py --config configs/benchmark/quick.yaml

Every cell is an ordinary ``train.py`` run of ``configs/<task>/<method>.yaml`` with the grid's
budget written over it (the cell's resolved config is kept in ``<out>/cells/<cell>/config.yaml``);
PEFT cells swap the model for :class:`prompt_methods.PeftPeer` and keep everything else. Cells run
one at a time, each in its own process by default; a finished cell leaves ``row.json`` and is
skipped when the command is run again, so an interrupted benchmark resumes where it stopped.
After each cell the report is rewritten: ``results.csv``, ``results.json``, ``table.md`` and, with
matplotlib, ``score_vs_params.png`` and ``throughput.png``; at the end a W&B summary run holds
the table. Grid keys: see ``configs/benchmark/quick.yaml``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent
# benchmark method name -> (config file under configs/<task>/, subcommand, model overrides)
METHODS = {
    "zero_shot": ("hard_prompt", "test", {}),
    "soft_prompt": ("soft_prompt", "fit", {}),
    "prefix_tuning": ("prefix_tuning", "fit", {}),
    "p_tuning": ("p_tuning", "fit", {}),
    "lm_bff": ("hard_prompt", "fit", {"tune_backbone": True}),
    "fine_tuning": ("fine_tuning", "fit", {}),
}
PEFT_METHODS = ("soft_prompt", "prefix_tuning", "p_tuning")
#: ``data.init_args.max_length`` where a config leaves it out (``PromptDataModule``'s default)
DEFAULT_MAX_LENGTH = 256
#: the model keys of a method's config that its PEFT peer keeps: the method's, the optimizer's, and how the
#: backbone is loaded and label words scored (not promptlit's speed settings: the peer runs PEFT's defaults)
PEFT_KEYS = ("num_virtual_tokens", "lr", "weight_decay", "warmup_ratio", "init", "init_text", "init_seed",
             "init_vocab_ids", "encoder", "encoder_hidden", "reparameterize", "mlp_hidden", "backbone", "precision",
             "backbone_kind", "trust_remote_code", "length_norm")
GRID_KEYS = {"name", "backbone", "tasks", "methods", "peft", "seeds", "budget", "precision", "overrides",
             "configs", "out", "isolate", "keep_checkpoints", "wandb_project"}
BUDGET_KEYS = {"steps", "batch_size", "few_shot_k", "val_examples", "eval_examples"}


class CellsFailed(RuntimeError):
    """Some cells of a grid failed (the others' results are written)."""


class GridError(ValueError):
    pass


def load_grid(path: str) -> dict:
    """Read and check a grid config; errors name the file and key."""
    if not Path(path).is_file():
        raise GridError(f"--config: {path} does not exist")
    try:
        grid = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise GridError(f"--config: {path} is not valid YAML ({err})") from None
    if not isinstance(grid, dict):
        raise GridError(f"{path}: a grid config must be a YAML mapping")
    unknown = set(grid) - GRID_KEYS
    if unknown:
        raise GridError(f"{path}: unknown key(s) {sorted(unknown)}; known: {sorted(GRID_KEYS)}")
    for key in ("name", "tasks", "methods", "seeds"):
        if not grid.get(key):
            raise GridError(f"{path}: '{key}' is required")
    for key in ("tasks", "methods", "seeds", "peft"):
        if key in grid and not isinstance(grid[key] or [], list):
            raise GridError(f"{path}: '{key}' must be a list, e.g. {key}: [{grid[key]}]")
    if not all(isinstance(seed, int) and not isinstance(seed, bool) for seed in grid["seeds"]):
        raise GridError(f"{path}: seeds must be integers, not {grid['seeds']}")
    if not isinstance(grid.get("budget") or {}, dict):
        raise GridError(f"{path}: 'budget' must be a mapping (steps, batch_size, ...)")
    bad = [m for m in grid["methods"] if m not in METHODS]
    if bad:
        raise GridError(f"{path}: methods {bad} are not among {list(METHODS)}")
    bad = [m for m in grid.get("peft") or [] if m not in PEFT_METHODS]
    if bad:
        raise GridError(f"{path}: peft {bad} are not among {list(PEFT_METHODS)}")
    bad = [m for m in grid.get("peft") or [] if m not in grid["methods"]]
    if bad:
        raise GridError(f"{path}: peft {bad} are not among the grid's methods {grid['methods']}; a PEFT peer runs "
                        "beside promptlit's cell of the same method")
    budget = grid["budget"] = grid.get("budget") or {}
    if set(budget) - BUDGET_KEYS:
        raise GridError(f"{path}: unknown budget key(s) {sorted(set(budget) - BUDGET_KEYS)}; known: {sorted(BUDGET_KEYS)}")
    if "steps" not in budget:
        raise GridError(f"{path}: budget.steps must be a positive integer")
    for key, value in sorted(budget.items()):  # steps is required; the others may be left null
        if (key == "steps" or value is not None) and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise GridError(f"{path}: budget.{key} must be a positive integer, not {value!r}")
    configs = ROOT / grid.get("configs", "configs")
    for task in grid["tasks"]:
        for method in grid["methods"]:
            if not (configs / task / f"{METHODS[method][0]}.yaml").is_file():
                raise GridError(f"{path}: no config {configs / task / METHODS[method][0]}.yaml for task '{task}'")
    grid.setdefault("out", f"outputs/benchmark/{grid['name']}")
    return grid


#: budget keys a grid may leave out, and what they then are; ``null`` leaves the value to each task's config
BUDGET_DEFAULTS = {"eval_examples": 256, "val_examples": 64}


def budget_value(grid: dict, key: str):
    """The budget's ``key``: its value, the default where the grid leaves it out, None (per config) where null."""
    return grid["budget"].get(key, BUDGET_DEFAULTS.get(key))


def grid_setup(grid: dict) -> dict:
    """What makes two recordings of a grid one experiment: backbone, precision, budget and overrides.
    Kept in every row (``setup``), so that ``--resume-from`` takes rows of the same experiment only."""
    return {"backbone": grid.get("backbone"), "precision": grid.get("precision"),
            "budget": {k: budget_value(grid, k) for k in sorted(BUDGET_KEYS)}, "overrides": grid.get("overrides") or {}}


def setup_difference(row_setup: dict, grid: dict, method: str) -> str | None:
    """How a row's recorded ``setup`` differs from the grid's (the first differing key), or None. A
    method that trains nothing (zero-shot) ignores the training budget."""
    now = grid_setup(grid)
    if METHODS[method][1] != "fit":
        untrained = lambda s: {**s, "budget": {k: v for k, v in s["budget"].items()  # noqa: E731
                                               if k not in ("steps", "batch_size", "few_shot_k")}}
        row_setup, now = untrained(row_setup), untrained(now)
    return _first_difference(row_setup, now, "setup")


def text_answers(task: str) -> bool:
    spec = ROOT / "tasks" / f"{task}.yaml"
    return spec.is_file() and (yaml.safe_load(spec.read_text()) or {}).get("answer_type") == "text"


def cell_key(task: str, method: str, impl: str, seed: int) -> str:
    """A cell's name: its folder under ``<out>/cells`` and its W&B run name."""
    return f"{task}-{method}-{impl}-s{seed}"


def cells_of(grid: dict) -> list[dict]:
    """Every (task, method, impl, seed). PEFT peers run on label-word tasks only (PEFT has no generation loop here).
    A method's PEFT peer runs right after it, seed by seed, so that a slow spell of the machine
    falls on both sides of a throughput ratio rather than on one."""
    cells = []
    for task in grid["tasks"]:
        for method in grid["methods"]:
            peer = method in (grid.get("peft") or []) and not text_answers(task)
            impls = ["promptlit"] + (["peft"] if peer else [])
            for seed in grid["seeds"]:
                for impl in impls:
                    cells.append({"task": task, "method": method, "impl": impl, "seed": seed,
                                  "key": cell_key(task, method, impl, seed)})
    return cells


def set_dotted(cfg: dict, key: str, value) -> None:
    node = cfg
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def cell_config(grid: dict, cell: dict, cell_dir: Path) -> tuple[dict, str]:
    """The cell's train.py config: the shipped task/method config with the budget written over it."""
    base, sub, model_over = METHODS[cell["method"]]
    cfg = yaml.safe_load((ROOT / grid.get("configs", "configs") / cell["task"] / f"{base}.yaml").read_text())
    budget = grid["budget"]
    data = cfg["data"].setdefault("init_args", {})
    model = cfg["model"].setdefault("init_args", {})
    if budget.get("batch_size") is not None:
        data["batch_size"] = budget["batch_size"]
    if budget.get("few_shot_k") is not None:
        data["few_shot_k"] = budget["few_shot_k"]
    data["seed"] = cell["seed"]
    for key, budget_key in (("max_eval_samples", "eval_examples"), ("max_val_samples", "val_examples")):
        if budget_value(grid, budget_key) is not None:  # N examples, picked by the task's eval_sample; null: the config's
            data[key] = budget_value(grid, budget_key)
    model.update(model_over)
    if grid.get("backbone"):
        model["backbone"] = grid["backbone"]
    for key, value in (grid.get("overrides") or {}).items():  # the method's config as the grid runs it; the peer
        if key.split(".")[0] in ("data", "model"):  # below is built from it (template, length, method keys)
            set_dotted(cfg, key, value)
    data, model = cfg["data"]["init_args"], cfg["model"]["init_args"]
    if cell["impl"] == "peft":
        kept = {k: v for k, v in model.items() if k in PEFT_KEYS}
        if cell["method"] == "prefix_tuning":  # PEFT's prefix has no text init
            kept = {k: v for k, v in kept.items() if k not in ("init", "init_text")}
        cfg["model"] = {"class_path": "prompt_methods.PeftPeer", "init_args": {"peft_method": cell["method"], **kept}}
        if data.get("template"):  # PEFT prepends its tokens: drop the template's {soft} slots, and
            slots = sum(int(n or 1) for n in re.findall(r"\{soft(?::(\d+))?\}", data["template"]))
            data["template"] = re.sub(r"\s*\{soft(:\d+)?\}", "", data["template"]).strip()
            if slots:  # leave the tokens they held out of the text's budget, as they are out of ours
                data["max_length"] = data.get("max_length", DEFAULT_MAX_LENGTH) - slots
    from prompt_methods.callbacks import wandb_offline

    trainer = cfg.setdefault("trainer", {})
    trainer.update({
        "max_steps": budget["steps"], "val_check_interval": budget["steps"], "check_val_every_n_epoch": None,
        "enable_progress_bar": False,
        "logger": {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {
            "project": grid.get("wandb_project", "promptlit"), "save_dir": str(cell_dir), "group": grid["name"],
            "name": cell["key"], "tags": sorted({grid["name"], cell["task"], cell["method"], cell["impl"]}),
            "offline": wandb_offline()}},
        "callbacks": [
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {
                "dirpath": str(cell_dir / "checkpoints"), "monitor": "val/score", "mode": "max", "save_top_k": 1}},
            {"class_path": "prompt_methods.callbacks.Throughput"},
            {"class_path": "prompt_methods.callbacks.PeakMemory"},
        ],
    })
    if grid.get("precision"):
        trainer["precision"] = grid["precision"]
    cfg["seed_everything"] = cell["seed"]
    for key, value in (grid.get("overrides") or {}).items():  # the trainer's and the rest
        if key.split(".")[0] not in ("data", "model"):
            set_dotted(cfg, key, value)
    return cfg, sub


def run_cell(grid: dict, cell: dict, out: Path) -> dict:
    """Train and test one cell in this process; return its row."""
    import torch
    import transformers

    import train
    from prompt_methods.callbacks import PeakMemory, Throughput, atomic_write_text

    import wandb

    if wandb.run is not None:  # Lightning's WandbLogger would log this cell into a run still open
        wandb.finish()
    cell_dir = out / "cells" / cell["key"]
    cfg, sub = cell_config(grid, cell, cell_dir)
    cfg_path = cell_dir / "config.yaml"
    atomic_write_text(cfg_path, yaml.safe_dump(cfg, sort_keys=False))
    commit, probe = code_version(), cpu_probe()  # the code and machine as the cell starts
    start = time.perf_counter()
    cli = train.main([sub, "--config", str(cfg_path)])
    trainer = cli.trainer
    scalars = lambda: {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}  # noqa: E731
    fitted = scalars()  # test() resets the logged metrics, the validation score among them
    if sub == "fit":  # the final weights, no checkpoint selection
        trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    wall = time.perf_counter() - start
    cb = {type(c).__name__: c for c in trainer.callbacks}
    speed = cb["Throughput"].summary() if isinstance(cb.get("Throughput"), Throughput) else {}
    peak = cb["PeakMemory"].measure(trainer) if isinstance(cb.get("PeakMemory"), PeakMemory) else float("nan")
    metrics = {**fitted, **scalars()}
    ckpts = sorted((cell_dir / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    ckpt_bytes = ckpts[-1].stat().st_size if ckpts else 0  # this attempt's (a retried cell may find an earlier one's)
    if not grid.get("keep_checkpoints", False):
        for path in ckpts:
            path.unlink()
    if "test/score" not in metrics:  # a row without its score would count as finished and never run again
        raise RuntimeError(f"{cell['key']}: the run logged no test/score (logged: {sorted(metrics)})")
    params = list(cli.model.parameters())
    row = {
        "task": cell["task"], "method": cell["method"], "impl": cell["impl"], "seed": cell["seed"],
        "metric": cli.model.metric, "value": metrics["test/score"],
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "total_params": sum(p.numel() for p in params),
        "train_samples_per_s": speed.get("train_samples_per_s", float("nan")),
        "eval_samples_per_s": speed.get("test_samples_per_s", float("nan")),
        "peak_mem_mb": peak, "wall_s": wall, "checkpoint_bytes": ckpt_bytes,
        "steps": trainer.global_step, "val_score": metrics.get("val/score", float("nan")),
        "device": str(trainer.strategy.root_device), "torch": torch.__version__,
        "transformers": transformers.__version__, "commit": commit, "finished": utc_now(), "cpu_gflops": probe,
        "cell": cell["key"], "setup": grid_setup(grid),
        "test_metrics": {k: v for k, v in metrics.items() if k.startswith("test/")},  # e.g. SQuAD's EM beside its F1
    }
    if trainer.logger is not None:
        trainer.logger.log_metrics({f"bench/{k}": v for k, v in row.items() if isinstance(v, (int, float))})
        trainer.logger.experiment.finish()
    del cli, trainer
    gc.collect()
    return row


#: config keys that are not part of the experiment: the cell's own folder, which may move with the
#: output folder, and whether W&B logs offline (it follows WANDB_MODE, WANDB_API_KEY or a stored login)
LOCAL_KEYS = frozenset({"save_dir", "dirpath", "offline"})


def _first_difference(old, new, key: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new), key=str):
            if k in LOCAL_KEYS:
                continue
            at = f"{key}.{k}" if key else str(k)
            if k not in old or k not in new:
                return f"{at}: {old.get(k, '(unset)')!r} then, {new.get(k, '(unset)')!r} now"
            found = _first_difference(old[k], new[k], at)
            if found:
                return found
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return next((d for i, (a, b) in enumerate(zip(old, new)) if (d := _first_difference(a, b, f"{key}[{i}]"))), None)
    return None if old == new else f"{key}: {old!r} then, {new!r} now"


def config_change(grid: dict, cell: dict, out: Path) -> str | None:
    """How a finished cell's recorded config differs from the one the grid gives it now (the first
    differing key), or None. A cell seeded from a recording (``--resume-from``) has no config; its
    row's ``setup`` is compared instead (a row recorded before rows kept one counts as unchanged)."""
    path = out / "cells" / cell["key"] / "config.yaml"
    if not path.is_file():
        row = json.loads((out / "cells" / cell["key"] / "row.json").read_text())
        return setup_difference(row["setup"], grid, cell["method"]) if "setup" in row else None
    now, _ = cell_config(grid, cell, path.parent)
    return _first_difference(yaml.safe_load(path.read_text()), yaml.safe_load(yaml.safe_dump(now, sort_keys=False)))


def cpu_probe(bursts: int = 10, seconds: float = 0.1, size: int = 512) -> float:
    """GFLOP/s of fp32 ``size`` x ``size`` matmuls on this process's threads: the median of
    ``bursts`` bursts of ``seconds`` each, after a warm-up burst. Run before each cell and kept in
    its row (``cpu_gflops``): on a shared VM the machine's speed drifts from one hour to the next,
    and this says how fast it was when the cell's throughput was measured (cells with a slower
    probe ran on a slower machine, not slower code). On this 2-core VM, idle, 8 fresh processes
    spread by 4% with the median, 17% with one 0.5 s burst."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)

    def burst(length: float) -> float:
        n, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < length:
            a @ b
            n += 1
        return 2 * size ** 3 * n / elapsed / 1e9

    burst(2 * seconds)
    return statistics.median(burst(seconds) for _ in range(bursts))


def code_version() -> str | None:
    """The checkout's commit (short), with ``+dirty`` when tracked files differ from it; None outside
    a git checkout. Kept in every row, so a table whose cells ran over several sessions says which
    code each came from."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "--short=10", "HEAD")
        if head.returncode != 0:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def seed_from_results(grid: dict, path: str, log=print) -> int:
    """Give the grid's unfinished cells the rows of an earlier recording of it (a ``results.json``
    written by this runner, e.g. the one committed under ``benchmarks/results/``), so that the run
    extends that recording instead of repeating it. Returns how many cells were seeded. A row for
    a cell the grid does not have, one whose step count is not the grid's budget, or one whose
    recorded ``setup`` (backbone, precision, budget, overrides) is not the grid's, is refused, and
    then no row is seeded."""
    source = Path(path)
    if not source.is_file():
        raise GridError(f"--resume-from: {path} does not exist")
    try:
        rows = json.loads(source.read_text())
    except json.JSONDecodeError as err:
        raise GridError(f"--resume-from: {path} is not JSON ({err})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise GridError(f"--resume-from: {path} is not a list of benchmark rows (a results.json)")
    cells = {c["key"] for c in cells_of(grid)}
    out, seeded, steps = Path(grid["out"]), 0, grid["budget"]["steps"]
    for i, row in enumerate(rows):  # every row is checked before any is seeded: a bad file seeds nothing
        missing = [k for k in ("task", "method", "impl", "seed", "value", "steps") if k not in row]
        if missing:
            raise GridError(f"--resume-from: {path}, row {i}: no {', '.join(missing)}; not a benchmark row")
        key = cell_key(row["task"], row["method"], row["impl"], row["seed"])
        if key not in cells:
            raise GridError(f"--resume-from: {path}, row {i} ({key}) is not a cell of grid '{grid['name']}'")
        if METHODS[row["method"]][1] == "fit" and row["steps"] != steps:
            raise GridError(f"--resume-from: {path}, row {i} ({key}) trained {row['steps']} steps; "
                            f"grid '{grid['name']}' gives budget.steps {steps}")
        diff = setup_difference(row["setup"], grid, row["method"]) if "setup" in row else None
        if diff:
            raise GridError(f"--resume-from: {path}, row {i} ({key}) ran another experiment than grid "
                            f"'{grid['name']}' ({diff})")
    for row in rows:
        key = cell_key(row["task"], row["method"], row["impl"], row["seed"])
        target = out / "cells" / key / "row.json"
        if not target.is_file():
            write_row(target, {**row, "cell": key})
            seeded += 1
    log(f"--resume-from {path}: {seeded} of its {len(rows)} rows seeded into {out / 'cells'}")
    return seeded


def write_row(path: Path, row: dict) -> None:
    from prompt_methods.callbacks import atomic_write_text

    atomic_write_text(path, json.dumps(row, indent=1))


def run_grid(grid: dict, log=print, only: dict | None = None) -> list[dict]:
    """Run every unfinished cell (of those whose task/method/seed is in ``only``'s lists, when given);
    return all rows of the grid (finished earlier or now). The report covers every finished cell."""
    from benchmarks.report import write_report

    out = Path(grid["out"])
    cells = cells_of(grid)
    grid = {**grid, "planned": len(cells)}
    done = lambda c: (out / "cells" / c["key"] / "row.json").is_file()  # noqa: E731
    chosen = [c for c in cells if all(c[key] in values for key, values in (only or {}).items())]
    todo = [c for c in chosen if not done(c)]
    stale = [(c["key"], diff) for c in chosen if done(c) and (diff := config_change(grid, c, out))]
    if stale:
        key, diff = stale[0]
        raise SystemExit(
            f"error: {len(stale)} finished cell(s) in {out} ran with another config than {grid['name']} gives now, "
            f"so resuming would mix two experiments in one table (first: {key}, {diff}). Run into a new --out "
            f"folder, or delete those cells' folders under {out / 'cells'} to run them again here.")
    part = f" ({len(chosen)} chosen)" if only else ""
    log(f"benchmark {grid['name']}: {len(cells)} cells{part}, {len(chosen) - len(todo)} done, {len(todo)} to run -> {out}")
    times, failed = [], []
    for i, cell in enumerate(todo, 1):
        eta = f", about {sum(times) / len(times) * (len(todo) - i + 1) / 60:.0f} min left" if times else ""
        log(f"[{i}/{len(todo)}] {cell['key']}{eta}")
        row_path = out / "cells" / cell["key"] / "row.json"
        t0 = time.perf_counter()
        if grid.get("isolate", True):
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--cell", json.dumps(cell),
                                   "--grid-json", json.dumps(grid)], cwd=ROOT)
            if proc.returncode != 0 and not row_path.is_file():
                log(f"  {cell['key']} failed (exit {proc.returncode}); see its log above")
        else:
            try:
                write_row(row_path, run_cell(grid, cell, out))
            except Exception as err:  # one failed cell does not stop the grid
                traceback.print_exc()
                write_row(out / "cells" / cell["key"] / "error.json", {**cell, "error": f"{type(err).__name__}: {err}"})
                log(f"  {cell['key']} failed: {type(err).__name__}: {err}")
        times.append(time.perf_counter() - t0)
        if not row_path.is_file():
            failed.append(cell["key"])
        else:
            row = json.loads(row_path.read_text())
            log(f"  {row['metric']} {row['value']:.4f}, {row['train_samples_per_s']:.2f} train samples/s, "
                f"{row['peak_mem_mb']:.0f} MiB peak, {row['wall_s']:.0f} s")
        write_report(grid, collect(out, cells))
    rows = collect(out, cells)
    write_report(grid, rows, summary_run=True)
    if failed:  # the table holds the cells that finished; the exit status says the grid did not
        raise CellsFailed(f"{len(failed)} of {len(todo)} cell(s) failed: {', '.join(failed)} (see the log above); the "
                          f"table holds the rest. Run the same command again to retry them.")
    return rows


def collect(out: Path, cells: list[dict]) -> list[dict]:
    rows = []
    for cell in cells:
        path = out / "cells" / cell["key"] / "row.json"
        if path.is_file():
            rows.append(json.loads(path.read_text()))
    return rows


def main(argv: list[str] | None = None) -> list[dict] | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="grid config, e.g. configs/benchmark/quick.yaml")
    parser.add_argument("--out", help="output folder (default: the grid's 'out', else outputs/benchmark/<name>)")
    parser.add_argument("--tasks", nargs="+", help="run only these of the grid's tasks (the table keeps every finished cell)")
    parser.add_argument("--methods", nargs="+", help="run only these of the grid's methods")
    parser.add_argument("--seeds", nargs="+", type=int, help="run only these of the grid's seeds")
    parser.add_argument("--resume-from", metavar="RESULTS_JSON",
                        help="first take the finished cells of an earlier recording of this grid (its results.json, "
                             "e.g. benchmarks/results/full/results.json) and run only the rest")
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    parser.add_argument("--grid-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from prompt_methods.callbacks import wandb_offline

    if wandb_offline():
        os.environ.setdefault("WANDB_MODE", "offline")
    if args.cell:  # a child process runs one cell
        grid, cell = json.loads(args.grid_json), json.loads(args.cell)
        sys.argv = sys.argv[:1]  # the cell's train.py arguments are passed to the CLI directly
        out = Path(grid["out"])
        try:
            write_row(out / "cells" / cell["key"] / "row.json", run_cell(grid, cell, out))
        except Exception as err:
            write_row(out / "cells" / cell["key"] / "error.json", {**cell, "error": f"{type(err).__name__}: {err}"})
            raise
        return None
    if not args.config:
        parser.error("--config is required")
    try:
        grid = load_grid(args.config)
    except GridError as err:
        sys.exit(f"error: {err}")
    only = {}
    for key, chosen in (("task", args.tasks), ("method", args.methods), ("seed", args.seeds)):
        if chosen:
            unknown = [c for c in chosen if c not in grid[key + "s"]]
            if unknown:
                sys.exit(f"error: --{key}s {' '.join(map(str, unknown))}: not in the grid's {key}s "
                         f"({', '.join(map(str, grid[key + 's']))}) in {args.config}")
            only[key] = chosen
    if args.out:
        grid["out"] = args.out
    grid["out"] = str(Path(grid["out"]).resolve())
    if args.resume_from:
        try:
            seed_from_results(grid, args.resume_from)
        except GridError as err:
            sys.exit(f"error: {err}")
    try:
        return run_grid(grid, only=only)
    except CellsFailed as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
