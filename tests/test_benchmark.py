"""benchmark.py on a tiny grid: every output is written and well formed, PEFT peers run beside the
native methods, W&B gets one run per cell in the benchmark's group plus a summary, and a second
run of the same command resumes (runs nothing already finished)."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
from pathlib import Path

import pytest
import yaml

import benchmark
from benchmarks.report import COLUMNS
from wandb_reader import read_run

pytest.importorskip("peft")


@pytest.fixture()
def grid_file(tiny, family_files, tmp_path):
    files = family_files["sst2"]
    grid = {
        "name": "tinybench", "tasks": ["sst2"], "methods": ["zero_shot", "soft_prompt"], "peft": ["soft_prompt"],
        "seeds": [1, 2], "precision": "32-true", "isolate": False, "out": str(tmp_path / "bench"),
        "budget": {"steps": 2, "batch_size": 3, "val_examples": 3, "eval_examples": 6},
        "overrides": {"model.init_args.backbone": tiny("llama"), "data.init_args.train_file": files["train"],
                      "data.init_args.validation_file": files["validation"], "data.init_args.test_file": files["test"],
                      "data.init_args.eval_batch_size": 3},
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def test_tiny_benchmark_outputs_and_resume(grid_file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(benchmark.ROOT)
    out = tmp_path / "bench"
    rows = benchmark.main(["--config", str(grid_file)])
    # zero_shot and soft_prompt per seed, plus the PEFT soft prompt per seed
    assert sorted((r["method"], r["impl"], r["seed"]) for r in rows) == [
        ("soft_prompt", "peft", 1), ("soft_prompt", "peft", 2), ("soft_prompt", "promptlit", 1),
        ("soft_prompt", "promptlit", 2), ("zero_shot", "promptlit", 1), ("zero_shot", "promptlit", 2)]
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 6 and list(table[0]) == COLUMNS
    for row in table:
        assert 0.0 <= float(row["value"]) <= 1.0 and row["metric"] == "accuracy"
        assert float(row["peak_mem_mb"]) > 0 and float(row["wall_s"]) > 0 and int(row["total_params"]) > 0
        assert float(row["eval_samples_per_s"]) > 0
        if row["method"] == "zero_shot":
            assert int(row["trainable_params"]) == 0 and int(row["checkpoint_bytes"]) == 0
        else:
            assert 0 < int(row["trainable_params"]) < int(row["total_params"])
            assert float(row["train_samples_per_s"]) > 0 and int(row["checkpoint_bytes"]) > 0
    # the validation score of the trained cells survives the test run that follows fit
    assert all(math.isfinite(r["val_score"]) for r in rows if r["method"] != "zero_shot")
    assert all(r["test_metrics"]["test/score"] == r["value"] == r["test_metrics"]["test/acc"] for r in rows)  # SST-2: accuracy
    # both implementations train the same number of prompt parameters (20 tokens x hidden)
    trainable = {(r["impl"]): int(r["trainable_params"]) for r in table if r["method"] == "soft_prompt"}
    assert trainable["promptlit"] == trainable["peft"]
    md = (out / "table.md").read_text()
    assert "| sst2 | soft_prompt | peft |" in md and "| sst2 | zero_shot | promptlit |" in md
    assert "promptlit vs PEFT" in md and "x |" in md
    for png in ("score_vs_params.png", "throughput.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "results.json").read_text())[0]["task"] == "sst2"
    # W&B: one run per cell in the benchmark's group, and a summary run with the tables
    runs = [read_run(p) for p in sorted(out.rglob("run-*.wandb"))]
    cells = [r for r in runs if r["name"] != "tinybench-summary"]
    assert len(cells) == 6 and all(r["group"] == "tinybench" for r in runs)
    assert all("tinybench" in r["tags"] for r in cells)
    summary = next(r for r in runs if r["name"] == "tinybench-summary")
    assert summary["summary"]["results/nrows"] == 6 and summary["summary"]["results/ncols"] == len(COLUMNS)
    assert summary["summary"]["summary/nrows"] == 3  # (zero_shot, promptlit), (soft_prompt, promptlit), (soft_prompt, peft)
    assert any(k.endswith("throughput_vs_peft") and math.isfinite(v) for k, v in summary["summary"].items())
    # every cell keeps the config it ran with, a train.py config
    cfg = yaml.safe_load((out / "cells" / "sst2-soft_prompt-peft-s1" / "config.yaml").read_text())
    assert cfg["model"]["class_path"] == "prompt_methods.PeftPeer" and cfg["seed_everything"] == 1
    # validation on val_examples drawn as the task's eval_sample says (limit_val_batches would keep the longest)
    assert cfg["data"]["init_args"]["max_val_samples"] == 3 and "limit_val_batches" not in cfg["trainer"]

    # resume: a finished grid runs nothing; a removed cell is run again, the others are kept
    before = (out / "cells" / "sst2-zero_shot-promptlit-s1" / "row.json").read_text()
    (out / "cells" / "sst2-soft_prompt-promptlit-s2" / "row.json").unlink()
    capsys.readouterr()
    rows = benchmark.main(["--config", str(grid_file)])
    log = capsys.readouterr().out
    assert "5 done, 1 to run" in log and "[1/1] sst2-soft_prompt-promptlit-s2" in log
    assert len(rows) == 6
    assert (out / "cells" / "sst2-zero_shot-promptlit-s1" / "row.json").read_text() == before

    # a slice of the grid: only the chosen seed's unfinished cells run; the table keeps every finished cell
    for seed in (1, 2):
        (out / "cells" / f"sst2-zero_shot-promptlit-s{seed}" / "row.json").unlink()
    capsys.readouterr()
    rows = benchmark.main(["--config", str(grid_file), "--seeds", "1"])
    log = capsys.readouterr().out
    assert "(3 chosen)" in log and "2 done, 1 to run" in log and "[1/1] sst2-zero_shot-promptlit-s1" in log
    assert len(rows) == 5 and "5 runs of the grid's 6." in (out / "table.md").read_text()
    with pytest.raises(SystemExit, match="--seeds 9: not in the grid's seeds"):
        benchmark.main(["--config", str(grid_file), "--seeds", "9"])

    # a changed budget does not resume onto cells run with the old one; a moved output folder still resumes
    grid = yaml.safe_load(grid_file.read_text())
    grid["budget"]["steps"] = 3
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(grid))
    with pytest.raises(SystemExit, match=r"5 finished cell\(s\).*trainer.max_steps: 2 then, 3 now"):
        benchmark.main(["--config", str(changed)])
    moved = tmp_path / "moved"
    out.rename(moved)
    capsys.readouterr()
    assert len(benchmark.main(["--config", str(grid_file), "--out", str(moved), "--seeds", "1"])) == 5
    assert "3 done, 0 to run" in capsys.readouterr().out
    # whether W&B logs offline follows WANDB_API_KEY, not the experiment: a key set later still resumes
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert len(benchmark.main(["--config", str(grid_file), "--out", str(moved), "--seeds", "1"])) == 5
    assert "3 done, 0 to run" in capsys.readouterr().out


def test_grid_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "tasks": ["sst2"], "methods": ["soft_prompt", "magic"], "seeds": [1],
                                   "budget": {"steps": 1}}))
    with pytest.raises(benchmark.GridError, match="magic"):
        benchmark.load_grid(str(bad))
    bad.write_text(yaml.safe_dump({"name": "x", "tasks": ["sst2"], "methods": ["soft_prompt"], "seeds": [1],
                                   "budget": {"step": 1}}))
    with pytest.raises(benchmark.GridError, match="budget"):
        benchmark.load_grid(str(bad))
    bad.write_text(yaml.safe_dump({"name": "x", "tasks": ["nosuchtask"], "methods": ["soft_prompt"], "seeds": [1],
                                   "budget": {"steps": 1}}))
    with pytest.raises(benchmark.GridError, match="nosuchtask"):
        benchmark.load_grid(str(bad))
    with pytest.raises(benchmark.GridError, match="does not exist"):
        benchmark.load_grid(str(tmp_path / "missing.yaml"))
    base = {"name": "x", "tasks": ["sst2"], "methods": ["soft_prompt"], "seeds": [1], "budget": {"steps": 1}}
    for change, message in (({"seeds": 13}, "'seeds' must be a list, e.g. seeds: [13]"),
                            ({"tasks": "sst2"}, "'tasks' must be a list"),
                            ({"seeds": ["a"]}, "seeds must be integers"),
                            ({"budget": [1]}, "'budget' must be a mapping"),
                            ({"budget": {"steps": 1, "batch_size": 0}}, "budget.batch_size must be a positive integer, not 0"),
                            ({"budget": {"steps": 1, "eval_examples": "all"}}, "budget.eval_examples must be a positive integer"),
                            ({"budget": {"batch_size": 2}}, "budget.steps must be a positive integer"),
                            ({"peft": ["prefix_tuning"]}, "peft ['prefix_tuning'] are not among the grid's methods")):
        bad.write_text(yaml.safe_dump({**base, **change}))
        with pytest.raises(benchmark.GridError, match=re.escape(message)):
            benchmark.load_grid(str(bad))
    bad.write_text("name: x\ntasks: [sst2\n")
    with pytest.raises(benchmark.GridError, match="bad.yaml is not valid YAML"):
        benchmark.load_grid(str(bad))
    bad.write_text("- sst2\n")
    with pytest.raises(benchmark.GridError, match="a grid config must be a YAML mapping"):
        benchmark.load_grid(str(bad))


def test_shipped_grids_load():
    for path in sorted((benchmark.ROOT / "configs" / "benchmark").glob("*.yaml")):
        grid = benchmark.load_grid(str(path))
        assert benchmark.cells_of(grid)
        assert (benchmark.ROOT / path).read_text().startswith("# python benchmark.py --config configs/benchmark/")


def test_peft_peer_runs_beside_each_seed():
    """A method's PEFT cell follows its promptlit cell of the same seed; text-answer tasks get no peer."""
    grid = {"tasks": ["sst2", "squad"], "methods": ["soft_prompt", "fine_tuning"], "peft": ["soft_prompt"], "seeds": [1, 2]}
    order = [(c["task"], c["method"], c["impl"], c["seed"]) for c in benchmark.cells_of(grid)]
    assert order[:4] == [("sst2", "soft_prompt", "promptlit", 1), ("sst2", "soft_prompt", "peft", 1),
                         ("sst2", "soft_prompt", "promptlit", 2), ("sst2", "soft_prompt", "peft", 2)]
    assert len(order) == 4 + 2 + 2 + 2 and not any(t == "squad" and i == "peft" for t, _, i, _ in order)
    assert len({c["key"] for c in benchmark.cells_of(grid)}) == len(order)


def test_table_shows_median_and_worst_seed():
    """One seed far below the others drags the mean; the table and the PEFT comparison also show the
    median and the worst seed, so a reader can tell a collapsed run from a method that is worse, and
    the throughput ratio of each seed's pair of cells (lowest to highest) beside the ratio of the means."""
    from benchmarks.report import markdown, summarize

    def row(impl, seed, value):
        return {"task": "sst2", "method": "soft_prompt", "impl": impl, "seed": seed, "metric": "acc", "value": value,
                "trainable_params": 100, "total_params": 1000,
                "train_samples_per_s": 10.0 if impl == "peft" else {1: 15.0, 2: 12.0, 3: 18.0}[seed],
                "eval_samples_per_s": 20.0, "peak_mem_mb": 500.0, "wall_s": 60.0, "checkpoint_bytes": 4096}

    rows = [row("promptlit", s, v) for s, v in ((1, 0.84), (2, 0.66), (3, 0.82))]
    rows += [row("peft", s, v) for s, v in ((1, 0.83), (2, 0.86), (3, 0.84))]
    ours = next(s for s in summarize(rows) if s["impl"] == "promptlit")
    assert ours["value_median"] == 0.82 and ours["value_min"] == 0.66
    md = markdown({"name": "t", "seeds": [1, 2, 3], "budget": {"steps": 10}}, rows)
    assert "| sst2 | soft_prompt | promptlit | acc | 3 | 77.3 ± 9.9 | 82.0 | 66.0 |" in md
    assert "| sst2 | soft_prompt | peft | acc | 3 | 84.3 ± 1.5 | 84.0 | 83.0 |" in md
    assert "| 1.50x | 1.20–1.80x | 1.00x | 1.00x | -7.0 | -2.0 |" in md  # per-seed ratios; mean diff, then median diff
    assert "| peak MiB | checkpoint |" in md and "| 500 | 4.0 KiB |" in md  # sizes in units of 1024 bytes
    assert "| sst2 | soft_prompt | 3 | 1.50x |" in md
    # PEFT ran seed 1 only (an interrupted grid): the comparison pairs that seed, not three seeds against one
    md = markdown({"name": "t", "seeds": [1, 2, 3], "budget": {"steps": 10}}, rows[:3] + rows[3:4])
    assert "| sst2 | soft_prompt | 1 | 1.50x | 1.50x | 1.00x | 1.00x | +1.0 | +1.0 |" in md
    assert "| sst2 | soft_prompt | peft | acc | 1 | 83.0 | 83.0 | 83.0 |" in md  # one seed has no ± (it is not 0.0)
    # a seed without a score (NaN; None read back from results.json) is not counted as a seed, and the
    # comparison pairs the seeds scored on both sides
    for missing in (float("nan"), None):
        gap = rows[:5] + [{**rows[5], "value": missing}]  # PEFT's seed 3
        gap[1] = {**gap[1], "value": missing}  # promptlit's seed 2
        md = markdown({"name": "t", "seeds": [1, 2, 3], "budget": {"steps": 10}}, gap)
        assert "| sst2 | soft_prompt | promptlit | acc | 2 | 83.0 ± 1.4 |" in md
        assert "| sst2 | soft_prompt | peft | acc | 2 | 84.5 ± 2.1 |" in md
        assert "| sst2 | soft_prompt | 1 | 1.50x | 1.50x | 1.00x | 1.00x | +1.0 | +1.0 |" in md  # seed 1 only


def test_report_reads_back_its_own_results_json(tmp_path):
    """results.json stores a missing number (a zero-shot run's train throughput, NaN) as null: rows
    read back from it, e.g. to rebuild a table from a recorded results file, make the same table."""
    from benchmarks.report import markdown, write_report

    def row(method, seed, train):
        return {"task": "sst2", "method": method, "impl": "promptlit", "seed": seed, "metric": "acc", "value": 0.8,
                "trainable_params": 0, "total_params": 1000, "train_samples_per_s": train, "eval_samples_per_s": 20.0,
                "peak_mem_mb": 500.0, "wall_s": 60.0, "checkpoint_bytes": 0}

    grid = {"name": "t", "out": str(tmp_path), "seeds": [1, 2], "budget": {"steps": 10}}
    rows = [row("zero_shot", s, float("nan")) for s in (1, 2)] + [row("soft_prompt", s, 15.0) for s in (1, 2)]
    write_report(grid, rows)
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored[-1]["train_samples_per_s"] is None  # zero_shot sorts last
    assert markdown(grid, stored) == markdown(grid, rows)
    fresh = (tmp_path / "results.csv").read_text()
    write_report(grid, stored)
    assert (tmp_path / "results.csv").read_text() == fresh  # a missing number is an empty cell either way
    with open(tmp_path / "results.csv") as f:
        assert [r["train_samples_per_s"] for r in csv.DictReader(f)] == ["15.0", "15.0", "", ""]


def _recorded_row(task, method, impl, seed, steps):
    return {"task": task, "method": method, "impl": impl, "seed": seed, "metric": "accuracy", "value": 0.5,
            "trainable_params": 0 if method == "zero_shot" else 10, "total_params": 1000,
            "train_samples_per_s": None if method == "zero_shot" else 5.0, "eval_samples_per_s": 20.0,
            "peak_mem_mb": 500.0, "wall_s": 9.0, "checkpoint_bytes": 0, "steps": steps}


def test_resume_from_a_recorded_results_json(grid_file, tmp_path, monkeypatch, capsys):
    """A fresh checkout has the recorded results.json but not the cell folders: --resume-from seeds the
    grid's cells from it and runs only the rest; rows that do not belong to the grid are refused."""
    monkeypatch.chdir(benchmark.ROOT)
    recorded = tmp_path / "results.json"
    setup = benchmark.grid_setup(benchmark.load_grid(str(grid_file)))
    rows = [_recorded_row("sst2", "zero_shot", "promptlit", s, 0) for s in (1, 2)]
    rows += [_recorded_row("sst2", "soft_prompt", impl, s, 2) for impl in ("promptlit", "peft") for s in (1, 2)]
    recorded.write_text(json.dumps(rows[:-1]))  # all but the PEFT soft prompt of seed 2
    out = tmp_path / "extended"
    got = benchmark.main(["--config", str(grid_file), "--out", str(out), "--resume-from", str(recorded)])
    log = capsys.readouterr().out
    assert "5 of its 5 rows seeded" in log and "5 done, 1 to run" in log and "[1/1] sst2-soft_prompt-peft-s2" in log
    assert len(got) == 6 and "6 runs." in (out / "table.md").read_text()
    fresh = json.loads((out / "cells" / "sst2-soft_prompt-peft-s2" / "row.json").read_text())
    kept = json.loads((out / "cells" / "sst2-zero_shot-promptlit-s1" / "row.json").read_text())
    assert kept["wall_s"] == 9.0 and fresh["wall_s"] != 9.0  # the recorded row is kept, the missing one ran
    # the new row says which code it ran at and when; the table names that code
    assert fresh["finished"].endswith("Z") and fresh["transformers"] and fresh["cpu_gflops"] > 0
    assert "CPU probe before each cell (fp32 matmul):" in (out / "table.md").read_text()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=benchmark.ROOT, capture_output=True, text=True)
    if head.returncode == 0:
        assert head.stdout.startswith(fresh["commit"].removesuffix("+dirty"))
        assert f"`{fresh['commit']}` (1); 5 recorded before rows named their commit." in (out / "table.md").read_text()
    # a second seeding changes nothing already there
    benchmark.main(["--config", str(grid_file), "--out", str(out), "--resume-from", str(recorded)])
    assert "0 of its 5 rows seeded" in capsys.readouterr().out

    for bad, message in (
        ([_recorded_row("sst2", "soft_prompt", "promptlit", 1, 7)], r"row 0 \(sst2-soft_prompt-promptlit-s1\) trained 7 steps.*budget.steps 2"),
        ([_recorded_row("trec", "soft_prompt", "promptlit", 1, 2)], r"row 0 \(trec-soft_prompt-promptlit-s1\) is not a cell of grid 'tinybench'"),
        ([{"task": "sst2"}], "row 0: no method, impl, seed, value, steps"),
        # good rows before a bad one: nothing is seeded (the last assertion below)
        (rows[:2] + [_recorded_row("sst2", "soft_prompt", "promptlit", 1, 7)], r"row 2 .* trained 7 steps"),
        # a row that names its experiment: another eval budget (zero-shot rows train no steps) is refused
        ([{**rows[0], "setup": {**setup, "budget": {**setup["budget"], "eval_examples": 128}}}],
         r"row 0 \(sst2-zero_shot-promptlit-s1\) ran another experiment .*setup.budget.eval_examples: 128 then, 6 now"),
        ({"rows": []}, "not a list of benchmark rows"),
    ):
        recorded.write_text(json.dumps(bad))
        with pytest.raises(SystemExit, match=r"--resume-from: .*" + message):
            benchmark.main(["--config", str(grid_file), "--out", str(tmp_path / "other"), "--resume-from", str(recorded)])
    with pytest.raises(SystemExit, match="--resume-from: .*nothing.json does not exist"):
        benchmark.main(["--config", str(grid_file), "--out", str(tmp_path / "other"), "--resume-from", str(tmp_path / "nothing.json")])
    assert not (tmp_path / "other" / "cells").exists()  # a refused file seeds nothing
    # the rows it ran name their experiment; a seeded cell is not resumed onto by a changed grid
    assert fresh["setup"] == setup
    recorded.write_text(json.dumps([fresh]))
    third = {**benchmark.load_grid(str(grid_file)), "out": str(tmp_path / "third")}
    assert benchmark.seed_from_results(third, str(recorded)) == 1
    grid = yaml.safe_load(grid_file.read_text())
    grid["budget"]["eval_examples"] = 12
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(grid))
    with pytest.raises(SystemExit, match=r"ran with another config .*setup.budget.eval_examples: 6 then, 12 now"):
        benchmark.main(["--config", str(changed), "--out", str(tmp_path / "third")])


def test_failed_cells_make_the_command_fail(grid_file, tmp_path):
    """A grid whose cells fail still writes its table of the cells that finished, but exits non-zero
    naming the failed cells, so a script or CI does not take it for a finished benchmark."""
    grid = yaml.safe_load(grid_file.read_text())
    grid["methods"], grid["peft"], grid["seeds"] = ["zero_shot"], [], [1, 2]
    grid["overrides"]["data.init_args.test_file"] = str(tmp_path / "missing.tsv")
    grid_file.write_text(yaml.safe_dump(grid))
    recorded = tmp_path / "results.json"  # seed 1 finished earlier; seed 2 fails now
    recorded.write_text(json.dumps([{**_recorded_row("sst2", "zero_shot", "promptlit", 1, 0), "value": 0.625}]))
    with pytest.raises(SystemExit, match=r"error: 1 of 1 cell\(s\) failed: sst2-zero_shot-promptlit-s2"):
        benchmark.main(["--config", str(grid_file), "--resume-from", str(recorded)])
    table = (Path(grid["out"]) / "table.md").read_text()
    assert "1 runs of the grid's 2." in table
    assert any(line.startswith("| sst2 |") and "62.5" in line for line in table.splitlines()), table


def test_p_tuning_peer_config_keeps_the_text_budget(tmp_path):
    """The peer's template loses its {soft} slots (PEFT prepends its tokens outside max_length), so its
    max_length loses them too: both sides read the same input text."""
    import inspect

    from datamodules.base import PromptDataModule

    assert benchmark.DEFAULT_MAX_LENGTH == inspect.signature(PromptDataModule.__init__).parameters["max_length"].default
    grid = {"name": "x", "budget": {"steps": 1}}
    cell = lambda method, impl: {"task": "boolq", "method": method, "impl": impl, "seed": 1,  # noqa: E731
                                 "key": benchmark.cell_key("boolq", method, impl, 1)}
    ours, _ = benchmark.cell_config(grid, cell("p_tuning", "promptlit"), tmp_path)
    peer, _ = benchmark.cell_config(grid, cell("p_tuning", "peft"), tmp_path)
    template = ours["data"]["init_args"]["template"]
    assert "{soft" in template and "{soft" not in peer["data"]["init_args"]["template"]
    ours_length = ours["data"]["init_args"].get("max_length", benchmark.DEFAULT_MAX_LENGTH)
    assert peer["data"]["init_args"]["max_length"] == ours_length - 6 == ours_length - ours["model"]["init_args"]["num_virtual_tokens"]
    soft, _ = benchmark.cell_config(grid, cell("soft_prompt", "peft"), tmp_path)
    assert "max_length" not in soft["data"]["init_args"]  # no slots: its prompt is outside max_length on both sides


def test_peer_keeps_how_label_words_are_scored(tmp_path):
    """A method config's scoring and loading keys reach its PEFT peer; promptlit's speed settings do not."""
    import shutil

    configs = tmp_path / "configs"
    shutil.copytree(benchmark.ROOT / "configs" / "sst2", configs / "sst2")
    path = configs / "sst2" / "soft_prompt.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["model"]["init_args"].update({"length_norm": True, "share_prompt": False})
    path.write_text(yaml.safe_dump(cfg))
    grid = {"name": "x", "budget": {"steps": 1}, "configs": str(configs)}
    cell = {"task": "sst2", "method": "soft_prompt", "impl": "peft", "seed": 1, "key": benchmark.cell_key("sst2", "soft_prompt", "peft", 1)}
    peer, _ = benchmark.cell_config(grid, cell, tmp_path)
    assert peer["model"]["init_args"]["length_norm"] is True and "share_prompt" not in peer["model"]["init_args"]


def test_grid_overrides_reach_the_peer_as_its_method_config(tmp_path):
    """A grid's data/model overrides are part of the method's config that the PEFT peer is built from:
    a shorter max_length still leaves out the peer's {soft} slots, a template override loses its slots
    for the peer, and promptlit's own speed settings stay promptlit's. Trainer overrides reach both."""
    overrides = {"data.init_args.max_length": 128, "model.init_args.attn_implementation": "eager",
                 "trainer.max_epochs": 3}
    grid = {"name": "x", "budget": {"steps": 1}, "overrides": overrides}
    cell = lambda method, impl: {"task": "boolq", "method": method, "impl": impl, "seed": 1,  # noqa: E731
                                 "key": benchmark.cell_key("boolq", method, impl, 1)}
    ours, _ = benchmark.cell_config(grid, cell("p_tuning", "promptlit"), tmp_path)
    peer, _ = benchmark.cell_config(grid, cell("p_tuning", "peft"), tmp_path)
    assert ours["data"]["init_args"]["max_length"] == 128 and peer["data"]["init_args"]["max_length"] == 122
    assert ours["model"]["init_args"]["attn_implementation"] == "eager"
    assert "attn_implementation" not in peer["model"]["init_args"]
    assert ours["trainer"]["max_epochs"] == peer["trainer"]["max_epochs"] == 3
    grid["overrides"] = {"data.init_args.template": "{soft:2} Q: {question} {soft:2} A: {mask}"}
    peer, _ = benchmark.cell_config(grid, cell("soft_prompt", "peft"), tmp_path)
    assert peer["data"]["init_args"]["template"] == "Q: {question} A: {mask}"
    assert peer["data"]["init_args"]["max_length"] == benchmark.DEFAULT_MAX_LENGTH - 4


def test_eval_budget_left_out_or_null(tmp_path):
    """Left out, the evaluated examples are the runner's defaults; null leaves them to each task's config
    (as a null batch_size does), and the table says so."""
    from benchmarks.report import markdown

    cell = {"task": "squad", "method": "soft_prompt", "impl": "promptlit", "seed": 1,
            "key": benchmark.cell_key("squad", "soft_prompt", "promptlit", 1)}
    shipped = yaml.safe_load((benchmark.ROOT / "configs" / "squad" / "soft_prompt.yaml").read_text())["data"]["init_args"]
    assert shipped.get("max_val_samples")  # the config's own value, which null keeps
    left_out, _ = benchmark.cell_config({"name": "x", "budget": {"steps": 1}}, cell, tmp_path)
    assert left_out["data"]["init_args"]["max_eval_samples"] == 256 and left_out["data"]["init_args"]["max_val_samples"] == 64
    null = {"name": "x", "seeds": [1], "budget": {"steps": 1, "eval_examples": None, "val_examples": None}}
    cfg, _ = benchmark.cell_config(null, cell, tmp_path)
    for key in ("max_eval_samples", "max_val_samples"):
        assert cfg["data"]["init_args"].get(key) == shipped.get(key)
    assert "scored on the test examples each task's config sets" in markdown(null, [])
    assert "None" not in markdown(null, []).split("\n")[2]
