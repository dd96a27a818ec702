"""Callbacks the CLI wires in: prediction files and the resolved config sent to the logger."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.cli import SaveConfigCallback


def umask_mode(mode: int = 0o666) -> int:
    """``mode`` less the process's umask: what ``open`` would give a new file (``0o777`` for a folder).
    ``mkstemp``/``mkdtemp`` make their files private (0600/0700) whatever the umask. Read from
    /proc where it can be (setting the umask to read it would hold 0 for an instant, for every thread)."""
    try:
        status = Path("/proc/self/status").read_text()
        mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0)
        os.umask(mask)
    return mode & ~mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file so that a crash leaves either the old file or the whole new one; it gets the
    permissions a plain write would (readable by colleagues under the usual umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, umask_mode())
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def wandb_settings_files() -> dict[str, str]:
    """``mode`` and ``base_url`` as W&B's settings files hold them: ``wandb login --host URL`` and
    ``wandb offline``/``online`` write there. The global file (``$WANDB_CONFIG_DIR/settings``, else
    ``~/.config/wandb/settings``), then the workspace's (``wandb/settings``, or ``.wandb/settings``
    where that folder exists, under ``$WANDB_DIR`` or the working directory), which wins, as in wandb."""
    import configparser

    config_dir = os.environ.get("WANDB_CONFIG_DIR")
    root = Path(os.environ.get("WANDB_DIR") or ".").expanduser()
    files = [Path(config_dir).expanduser() / "settings" if config_dir else Path("~/.config/wandb/settings").expanduser(),
             root / (".wandb" if (root / ".wandb").exists() else "wandb") / "settings"]
    found: dict[str, str] = {}
    for path in files:
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read(path)
        except (OSError, configparser.Error):  # unreadable: wandb treats it as empty too
            continue
        if parser.has_section("default"):
            found.update({k: v.strip() for k, v in parser.items("default") if k in ("mode", "base_url") and v.strip()})
    return found


def wandb_offline() -> bool:
    """Whether runs log to W&B offline: yes when ``WANDB_MODE`` (or, without it, the ``mode`` that
    ``wandb offline`` saved) says offline (or disabled); no when it says online, when
    ``WANDB_API_KEY`` is set, or when ``wandb login`` stored a key (in the netrc file, for the W&B
    host: ``WANDB_BASE_URL``, else the ``base_url`` that ``wandb login --host`` saved, else
    api.wandb.ai); otherwise offline, so that nothing waits on the network."""
    import netrc
    from urllib.parse import urlparse

    saved = wandb_settings_files()
    mode = (os.environ.get("WANDB_MODE") or saved.get("mode", "")).lower()
    if mode in ("offline", "dryrun", "disabled"):
        return True
    if mode == "online" or os.environ.get("WANDB_API_KEY"):
        return False
    url = urlparse(os.environ.get("WANDB_BASE_URL") or saved.get("base_url") or "https://api.wandb.ai")
    try:
        stored = netrc.netrc(os.environ.get("NETRC"))
    except (OSError, netrc.NetrcParseError):
        return True
    # wandb names the machine by host and port (netloc); plain host as well
    return all(stored.authenticators(host) is None for host in {url.netloc, url.hostname} if host)


def run_dir(trainer) -> Path:
    """The folder of this run: ``<save_dir>/<project>/<run id>`` with a logger (where checkpoints go)."""
    logger = trainer.logger
    if logger is None or logger.save_dir is None:
        return Path(trainer.default_root_dir)
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return Path(logger.save_dir) / str(logger.name) / version


class PredictionWriter(BasePredictionWriter):
    """Writes ``predict`` output as JSON lines: id, predicted label, gold label (if any), probabilities.

    Args:
        output_file: where to write; default ``<log_dir>/predictions.jsonl``.
    """

    def __init__(self, output_file: str | None = None):
        super().__init__(write_interval="epoch")
        self.output_file = output_file

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices):
        labels = trainer.datamodule.labels
        lines = []
        for batch in predictions:
            for i, ident in enumerate(batch["id"]):
                if "answer" in batch:  # generated text answers
                    row = {"id": ident, "answer": batch["answer"][i]}
                    if batch.get("gold"):
                        row["gold"] = batch["gold"][i]
                    lines.append(json.dumps(row))
                    continue
                row = {"id": ident, "pred": labels[batch["pred"][i]],
                       "probs": {lab: round(p, 6) for lab, p in zip(labels, batch["probs"][i])}}
                if "label" in batch:
                    row["label"] = labels[batch["label"][i]]
                lines.append(json.dumps(row))
        # rank 0's folder for every rank: the other ranks' loggers have no run (a W&B logger's version is None there)
        path = Path(self.output_file or trainer.strategy.broadcast(str(run_dir(trainer) / "predictions.jsonl")))
        if trainer.world_size > 1:
            path = path.with_suffix(f".rank{trainer.global_rank}.jsonl")
        atomic_write_text(path, "\n".join(lines) + "\n")
        print(f"wrote {len(lines)} predictions to {path}")


class LoggedSaveConfig(SaveConfigCallback):
    """Saves the resolved config in the run's folder and sends it to the logger as hyperparameters."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        atomic_write_text(run_dir(trainer) / self.config_filename, self.parser.dump(self.config, skip_none=False))
        if trainer.logger is not None:
            cfg = self.parser.dump(self.config, skip_none=False, format="json")
            trainer.logger.log_hyperparams({"config": json.loads(cfg)})


class Throughput(Callback):
    """Logs ``train/samples_per_s`` (optimizer steps only, validation excluded), ``val/samples_per_s``
    and ``test/samples_per_s``."""

    def __init__(self):
        self.seen = {"train": 0, "val": 0, "test": 0}
        self.seconds = {"train": 0.0, "val": 0.0, "test": 0.0}
        self._start = 0.0

    def _begin(self, *_):
        self._start = time.perf_counter()

    def _end(self, split, trainer, batch):
        self.seconds[split] += time.perf_counter() - self._start
        self.seen[split] += len(batch["ids"])

    on_train_batch_start = _begin
    on_validation_batch_start = _begin
    on_test_batch_start = _begin

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._end("train", trainer, batch)
        if self.seconds["train"] > 0 and trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            pl_module.log("train/samples_per_s", self.seen["train"] / self.seconds["train"])

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self._end("val", trainer, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._end("test", trainer, batch)

    def on_validation_epoch_end(self, trainer, pl_module):
        if self.seconds["val"] > 0 and not trainer.sanity_checking:
            pl_module.log("val/samples_per_s", self.seen["val"] / self.seconds["val"])

    def on_test_epoch_end(self, trainer, pl_module):
        if self.seconds["test"] > 0:
            pl_module.log("test/samples_per_s", self.seen["test"] / self.seconds["test"])

    def summary(self) -> dict:
        return {f"{k}_samples_per_s": self.seen[k] / self.seconds[k] for k in self.seen if self.seconds[k] > 0}


def _rss_peak_mb() -> float:
    """This process's peak resident memory (VmHWM) in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakMemory(Callback):
    """Peak memory from the start of fit (or of a test-only run) on: CUDA allocated memory on a GPU,
    else the process's peak resident memory, its high-water mark reset at the start (Linux)."""

    def __init__(self):
        self.peak_mb: float | None = None
        self._started = False

    def _reset(self, trainer, *_):
        if self._started:
            return
        self._started = True
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            pass

    on_fit_start = _reset
    on_test_start = _reset

    def measure(self, trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(trainer.strategy.root_device) / 2**20
        else:
            self.peak_mb = _rss_peak_mb()
        return self.peak_mb


class LastCheckpoint(Callback):
    """Writes ``last.ckpt`` after every validation during fit (and every ``every_n_train_steps`` steps,
    and at the end), beside the best checkpoint. Lightning's own ``save_last`` refreshes it only when
    the monitored metric improves, which would make a killed run lose every step since its best one.
    A fit without validation (``limit_val_batches: 0``, no validation split) writes it where a
    validation would have run (``val_check_interval``), or at each epoch's end.
    Writes go through the trainer's checkpoint IO (atomic by default)."""

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int | None = None):
        self.dirpath, self.every_n_train_steps = dirpath, every_n_train_steps
        self._saved_step, self._saved_after_validation = -1, False

    def _folder(self, trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath)
        best = trainer.checkpoint_callback
        if best is not None and best.dirpath:
            return Path(best.dirpath)
        return run_dir(trainer) / "checkpoints"

    def save(self, trainer, after_validation: bool = False) -> None:
        # a step saved at its batch's end is saved again after that step's validation, which the
        # checkpoint must include (scores, the best-checkpoint tracker, the loop's validation state)
        done = trainer.global_step == self._saved_step and (self._saved_after_validation or not after_validation)
        if done or trainer.sanity_checking or trainer.state.fn != "fit" or trainer.fast_dev_run:
            return  # Lightning writes no checkpoints in a fast_dev_run either
        trainer.save_checkpoint(self._folder(trainer) / "last.ckpt", weights_only=False)  # the whole state: it resumes a fit
        self._saved_step, self._saved_after_validation = trainer.global_step, after_validation

    def setup(self, trainer, pl_module, stage):
        # run after every checkpoint callback (Lightning moves those to the end of the list), so that
        # last.ckpt holds the best-checkpoint tracker's state after this validation, not before it; a
        # new list, as Lightning is iterating over the old one to call this very hook
        trainer.callbacks = [c for c in trainer.callbacks if c is not self] + [self]

    def on_validation_end(self, trainer, pl_module):
        self.save(trainer, after_validation=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        every = self.every_n_train_steps
        if not every and not trainer.enable_validation and isinstance(trainer.val_check_interval, int):
            every = trainer.val_check_interval  # in steps: where a validation would have saved it
        if every and trainer.global_step % every == 0:
            self.save(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        if not trainer.enable_validation:
            self.save(trainer)

    def on_train_end(self, trainer, pl_module):
        self.save(trainer)
