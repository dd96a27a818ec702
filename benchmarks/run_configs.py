"""Run shipped configs one after another and record their final metrics and throughput.

    python benchmarks/run_configs.py --out benchmarks/results/sst2_methods.json \
        configs/sst2/hard_prompt.yaml:validate configs/sst2/soft_prompt.yaml ...

``config[:subcommand[:--key=value,...]]`` (default ``fit``; ``fit+test`` also tests the final weights), e.g.
``configs/sst2/hard_prompt.yaml:fit:--model.init_args.tune_backbone=true``; arguments after ``--``
go to every run. Each run is an
ordinary ``train.py`` run (same CLI, same logging); the JSON gets one row per run, rewritten
atomically after each one so an interrupted sweep keeps what finished.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402
from prompt_methods.callbacks import Throughput, atomic_write_text  # noqa: E402


def run_one(config: str, sub: str, extra: list[str]) -> dict:
    start = time.perf_counter()
    cli = train.main([sub.split("+")[0], "--config", config, *extra])
    metrics = {k: round(float(v), 4) for k, v in cli.trainer.callback_metrics.items() if v.numel() == 1}
    if sub == "fit+test":  # the final weights, no checkpoint selection
        cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
        metrics.update({k: round(float(v), 4) for k, v in cli.trainer.callback_metrics.items() if v.numel() == 1})
    wall = time.perf_counter() - start
    speed = next((cb.summary() for cb in cli.trainer.callbacks if isinstance(cb, Throughput)), {})
    trainable = sum(p.numel() for p in cli.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in cli.model.parameters())
    row = {"config": config, "args": extra, "subcommand": sub, "method": train.method_name(cli.model.__class__.__name__),
           "tune_backbone": cli.model.tune_backbone, "steps": cli.trainer.global_step, "metrics": metrics,
           **{k: round(v, 2) for k, v in speed.items()}, "trainable_params": trainable, "total_params": total,
           "wall_s": round(wall, 1)}
    if cli.trainer.logger is not None:
        cli.trainer.logger.experiment.finish()
    del cli
    gc.collect()
    return row


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="config[:subcommand]")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    rows = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else []
    for spec in args.runs:
        config, sub, overrides = (spec.split(":", 2) + ["", ""])[:3]
        row = run_one(config, sub or "fit", [*extra, *filter(None, overrides.split(","))])
        print(json.dumps(row), flush=True)
        rows.append(row)
        atomic_write_text(args.out, json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
