"""W&B glue: an offline-by-default WandbLogger that names its run from the method and dataset, and a
SaveConfigCallback that writes `config.yaml` into each run's own directory (no clash between runs)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.exceptions import MisconfigurationException

__all__ = ["OfflineWandbLogger", "RunConfigCallback", "run_directory", "finish_wandb", "slug", "staging_in_run",
           "wandb_run_folder"]


def slug(text: str) -> str:
    """A file- and tag-safe lower-case form of `text` (`ViT-B/32` -> `vit-b-32`)."""
    return re.sub(r"[^a-z0-9._-]+", "-", str(text).lower()).strip("-") or "none"


def wandb_run_folder(run: Any) -> Path | None:
    """The folder of a live W&B run (`<dir>/wandb/offline-run-<time>-<id>/`, the parent of `run.dir`); None for a
    disabled run or an object without one."""
    if run is None or getattr(run, "disabled", False):
        return None
    try:
        files = getattr(run, "dir", None)
    except Exception:  # noqa: BLE001 - a finished or dummy run
        return None
    return Path(files).parent if isinstance(files, (str, os.PathLike)) and str(files) else None


@contextmanager
def staging_in_run(run: Any) -> Iterator[None]:
    """Within the block, W&B stages what is logged into the run's own folder (`<run folder>/artifacts/staging`).

    Every logged table is also an artifact (its JSON and, for the qualitative table, its images), and wandb copies
    an artifact's files into a staging area before upload: by default `~/.local/share/wandb/artifacts/staging`
    (WANDB_DATA_DIR), outside the run folder, so a run folder copied elsewhere before `wandb sync` lost them. The
    staging area is read from WANDB_DATA_DIR when a file is staged; it is pointed into the run folder for the
    block and restored after it."""
    folder = wandb_run_folder(run)
    if folder is None:
        yield
        return
    before = os.environ.get("WANDB_DATA_DIR")
    os.environ["WANDB_DATA_DIR"] = str(folder)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("WANDB_DATA_DIR", None)
        else:
            os.environ["WANDB_DATA_DIR"] = before


class OfflineWandbLogger(WandbLogger):
    """WandbLogger that runs offline unless the user set `WANDB_MODE`, and that describes its run.

    `offline=None` (the default) means: offline when `WANDB_MODE` is not set in the environment, otherwise
    whatever `WANDB_MODE` says (`online`, `offline`, `disabled`); `True`/`False` force it. The mode is passed to
    `wandb.init(mode=...)`, so the process environment is never modified. `save_dir=None` means the trainer's
    `default_root_dir` (filled in by `describe`), so that every run's W&B files sit in its own run folder.
    `describe` fills `group` (the dataset: every run on one dataset lands in one W&B group, so the run comparer and
    parallel coordinates line methods up), `tags`, `name` and `job_type` unless the user gave them, and puts
    method, dataset, backbone and seed into the run config. What a run logs stays inside its run folder,
    artifact staging included (:func:`staging_in_run`), so the folder can be copied elsewhere before `wandb sync`.
    """

    def __init__(
        self,
        name: str | None = None,
        save_dir: str | None = None,
        version: str | None = None,
        offline: bool | None = None,
        id: str | None = None,
        project: str | None = None,
        log_model: bool | str = False,
        prefix: str = "",
        checkpoint_name: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        job_type: str | None = None,
        **kwargs: Any,
    ) -> None:
        # the CLI passes every wandb.init argument it knows, mostly as None: None means "not set"
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if offline is None:
            offline = "WANDB_MODE" not in os.environ and "mode" not in kwargs
        if offline and log_model:
            raise MisconfigurationException(
                f"log_model={log_model} needs an online run; set offline: false (or WANDB_MODE=online) to log models"
            )
        for key, value in (("group", group), ("tags", tags), ("job_type", job_type)):
            if value is not None:
                kwargs[key] = list(value) if key == "tags" else value
        if offline:
            kwargs.setdefault("mode", "offline")
        super().__init__(
            name=name,
            save_dir=save_dir,  # type: ignore[arg-type]
            version=version,
            offline=False,  # the mode travels in wandb.init(mode=...) instead of os.environ
            id=id,
            project=project,
            log_model=log_model,  # type: ignore[arg-type]
            prefix=prefix,
            checkpoint_name=checkpoint_name,
            **kwargs,
        )
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)  # wandb warns about the setting even when it is None
        self.offline_mode = bool(offline)
        self._user_set = {k for k in ("name", "group", "tags", "job_type") if self._wandb_init.get(k) is not None}
        self._user_set |= {"dir"} if save_dir is not None or "dir" in kwargs else set()

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Lightning's log_metrics (which log_table, log_text and log_image go through), with whatever the values
        stage kept inside the run's folder (:func:`staging_in_run`)."""
        with staging_in_run(self.experiment):
            super().log_metrics(metrics, step)

    def describe(
        self,
        method: str | None = None,
        dataset: str | None = None,
        backbone: str | None = None,
        seed: int | None = None,
        job_type: str | None = None,
        save_dir: str | None = None,
    ) -> None:
        """Fill run name, group, tags, job type and save dir (before the run starts) or update the live run."""
        parts = [p for p in (method, dataset, backbone) if p]
        fields: dict[str, Any] = {}
        if parts:
            fields["group"] = slug(dataset) if dataset else "-".join(slug(p) for p in parts)
            fields["name"] = "-".join(slug(p) for p in parts) + (f"-seed{seed}" if seed is not None else "")
            fields["tags"] = [str(p) for p in parts] + ([f"seed{seed}"] if seed is not None else [])
        if job_type:
            fields["job_type"] = job_type
        if self._experiment is None:
            for key, value in fields.items():
                if key not in self._user_set:
                    self._wandb_init[key] = value
            identity = {k: v for k, v in (("method", method), ("dataset", dataset), ("backbone", backbone),
                                          ("seed", seed)) if v is not None}
            config = dict(self._wandb_init.get("config") or {})
            self._wandb_init["config"] = {**identity, **config}
            if save_dir is not None and "dir" not in self._user_set:
                self._save_dir = os.fspath(save_dir)
                self._wandb_init["dir"] = self._save_dir
            if self._save_dir is not None:
                os.makedirs(self._save_dir, exist_ok=True)
            return
        self._update_live_run(fields, method=method, dataset=dataset, backbone=backbone, seed=seed)

    def _update_live_run(self, fields: dict[str, Any], **config: Any) -> None:
        run = self._experiment
        if run is None or not hasattr(run, "config"):
            return
        if "tags" in fields and "tags" not in self._user_set:
            try:
                run.tags = tuple(dict.fromkeys([*(run.tags or ()), *fields["tags"]]))
            except Exception:  # a disabled run has no settable tags
                pass
        # group and job_type are fixed once a run has started: keep them findable in the config
        extra = {k: v for k, v in config.items() if v is not None}
        extra.update({f"wandb_{k}": fields[k] for k in ("group", "job_type") if k in fields})
        run.config.update(extra, allow_val_change=True)


def run_directory(trainer: Any) -> str:
    """This run's own folder: where Lightning puts `checkpoints/` (`save_dir/name/version`), on every rank."""
    if not trainer.loggers:
        return os.fspath(trainer.default_root_dir)
    logger: Logger = trainer.loggers[0]
    save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
    name, version = logger.name, logger.version
    name, version = trainer.strategy.broadcast((name, version))
    version = version if isinstance(version, str) else f"version_{version}"
    return os.path.join(os.fspath(save_dir), str(name), version)


class RunConfigCallback(SaveConfigCallback):
    """Save the resolved config to `<run dir>/config.yaml` and into every logger's hyperparameters.

    Lightning's SaveConfigCallback writes to `trainer.log_dir`, which for a WandbLogger is the shared
    `save_dir`, so a second run finds the first run's `config.yaml` and aborts (Lightning #7679). Here the file
    goes next to the run's `checkpoints/` (`save_dir/<project>/<run id>/` for W&B, `.../version_N/` for CSV),
    which is unique per run, and the same config is copied into the W&B run config.
    """

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Write the config once per run, on rank 0, into the run's own directory."""
        if self.already_saved:
            return
        if self.save_to_log_dir:
            run_dir = run_directory(trainer)  # collective: every rank calls it
            config_path = os.path.join(run_dir, self.config_filename)
            fs = get_filesystem(run_dir)
            exists = fs.isfile(config_path) if trainer.is_global_zero else False
            if trainer.strategy.broadcast(exists) and not self.overwrite:
                raise RuntimeError(f"{config_path} already exists: this run id was used before (pass overwrite=True)")
            if trainer.is_global_zero:
                fs.makedirs(run_dir, exist_ok=True)
                self.parser.save(
                    self.config, config_path, skip_none=False, overwrite=self.overwrite, multifile=self.multifile
                )
            self.config_path = config_path
        if trainer.is_global_zero:
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)

    def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Copy the full resolved config into every logger (W&B: the run config, under `cli`)."""
        import yaml

        resolved = yaml.safe_load(self.parser.dump(self.config, skip_none=False, format="yaml"))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update({"cli": resolved}, allow_val_change=True)


def finish_wandb(loggers: list[Any], exit_code: int = 0) -> None:
    """Close the W&B runs of these loggers so that the next run in this process starts a fresh one."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and getattr(logger, "_experiment", None) is not None:
            run = logger._experiment
            if hasattr(run, "finish"):
                run.finish(exit_code=exit_code)
            logger._experiment = None
