"""The `tvr-bench` command: Lightning's CLI (fit/validate/test/bench) plus data and report tools."""

from __future__ import annotations

import inspect
import json
import os
import pickle
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from tvr_bench.backbones.clip import WeightsUnavailableError
from tvr_bench.callbacks.evaluator import RetrievalEvaluator
from tvr_bench.callbacks.leaderboard import LeaderboardWriter, canonical_backbone, dataset_name
from tvr_bench.data.datamodule import RetrievalDataModule
from tvr_bench.data.shards import INDEX_FILE
from tvr_bench.loggers import OfflineWandbLogger, RunConfigCallback, finish_wandb
from tvr_bench.methods.base import RetrievalModule

#: Kept for compatibility: the config callback that writes `<run dir>/config.yaml` and fills the W&B config.
LoggerSaveConfigCallback = RunConfigCallback

#: Exit codes of `tvr-bench` (besides 0): a wrong command line or configuration (as jsonargparse uses),
#: missing or damaged input files (shards, samples, a checkpoint), a NaN/inf training loss.
EXIT_CONFIG = 2
EXIT_DATA = 3
EXIT_NONFINITE = 4

#: Subcommands handled outside LightningCLI: name -> "module:function" taking argv and returning an exit code.
TOOL_COMMANDS: dict[str, str] = {
    "synth": "tvr_bench.data.commands:synth_main",
    "prepare": "tvr_bench.prepare_cli:prepare_main",
    "verify": "tvr_bench.data.commands:verify_main",
    "leaderboard": "tvr_bench.report:leaderboard_main",
    "compare": "tvr_bench.compare:compare_main",
    "perf": "tvr_bench.perf.run:perf_main",
    "features": "tvr_bench.features.cli:features_main",
    "index": "tvr_bench.search.cli:index_main",
    "search": "tvr_bench.search.cli:search_main",
    "audit": "tvr_bench.audit:audit_main",
    "pretrain": "tvr_bench.pretrain:pretrain_main",
}


#: The one-line description of each subcommand in ``tvr-bench --help`` (a tool missing here shows the first
#: line of its function's docstring; Lightning's own lines are cut mid-sentence, so each has one here).
SUBCOMMAND_SUMMARIES: dict[str, str] = {
    "fit": "Train a method on a benchmark (recipes given with --config), validating and checkpointing as configured.",
    "validate": "Score a model once on the validation split: retrieval metrics in both directions.",
    "test": "Score a checkpoint on the test split: metrics with 95% intervals, the result JSON, the leaderboard "
            "and the qualitative page.",
    "bench": "Fit, then test the best checkpoint in the same process (what `make bench` runs).",
    "synth": "Generate the synthetic benchmark's videos and captions (then `tvr-bench prepare synthetic`).",
    "prepare": "Convert a benchmark's official release (videos and annotations) into frame shards, checked against "
               "the protocol's split sizes.",
    "verify": "Re-hash and re-read every shard of a prepared dataset and report the damaged or missing ones.",
    "leaderboard": "Rebuild runs/leaderboard.{csv,md,png} from the result files and print the ranking.",
    "compare": "Tell whether two runs on the same test set really differ: paired intervals, p-values and a verdict.",
    "perf": "Measure speed and memory against baselines of the same run and write a JSON and Markdown report.",
    "features": "Encode a prepared dataset once with a frozen CLIP into cached features, to train heads fast.",
    "index": "Index a folder of your own videos (files or prepared shards) with a trained method, for search.",
    "search": "Find the videos of an index that best match a text query: table, JSON or an HTML page of frames.",
    "audit": "Audit every method's scoring (labels, other queries, gallery, order, noise) and class each number.",
    "pretrain": "Pretrain the tiny CLIP on single frames of the synthetic training videos: the synthetic recipes' "
                "backbone.",
}


def cli_description() -> str:
    """What tvr-bench is, for the top of ``tvr-bench --help`` (the built-in methods read from the recipes)."""
    from tvr_bench.recipes import method_recipes

    return (
        "tvr-bench trains and evaluates text-video retrieval methods under one data pipeline, one CLIP backbone and "
        f"one retrieval metric. Built-in methods: {', '.join(method_recipes())} (recipes/methods/). Typical run: "
        "tvr-bench bench --config recipes/base.yaml --config recipes/methods/<method>.yaml --config "
        "recipes/data/<dataset>.yaml (or `make bench METHOD=<method> DATA=<dataset>`)."
    )


#: The folder name of the pretrained synthetic backbone (`tvr-bench pretrain`, recipes/data/synthetic.yaml).
PRETRAINED_SYNTHETIC = "tiny-pretrained"

#: Data init args a method's ``DATA_PROTOCOL`` fills when the data config leaves them unset.
PROTOCOL_KEYS: tuple[str, ...] = ("sampling", "train_stream", "augment", "last_batch")


def _import_class(class_path: str) -> type | None:
    """The class a config's ``class_path`` names (None when it cannot be imported)."""
    module_name, _, class_name = str(class_path).rpartition(".")
    try:
        value = getattr(__import__(module_name, fromlist=[class_name]), class_name, None)
    except ImportError:
        return None
    return value if isinstance(value, type) else None


def fill_data_protocol(init: Any, data_cls: type | None, model_cls: type | None) -> dict[str, str]:
    """Set each unset (None or absent) ``sampling``/``train_stream``/``augment``/``last_batch`` data init arg that the
    data class accepts from the model class's ``DATA_PROTOCOL``; explicit values win. Returns what was set."""
    protocol = getattr(model_cls, "DATA_PROTOCOL", None) or {}
    if data_cls is None or not protocol:
        return {}
    try:
        accepted = inspect.signature(data_cls.__init__).parameters
    except (TypeError, ValueError):
        return {}
    filled: dict[str, str] = {}
    for key in PROTOCOL_KEYS:
        if key in accepted and key in protocol and init.get(key) is None:
            init[key] = protocol[key]
            filled[key] = protocol[key]
    return filled


def command_line_model_args(argv: list[str]) -> list[str]:
    """Model init-arg names set by `--model.init_args.NAME` (or `--model.NAME`) flags in `argv`."""
    names = []
    for token in argv:
        if not token.startswith("--model."):
            continue
        key = token[len("--model."):].split("=", 1)[0]
        key = key[len("init_args."):] if key.startswith("init_args.") else key
        if key and "." not in key and key not in ("class_path", "init_args", "help"):
            names.append(key)
    return names


def _is_local(root: str) -> bool:
    """Whether a shard root is a local directory path (not an URL or a ``pipe:`` command)."""
    return "://" not in root and not root.startswith("pipe:")


def unprepared_shards_message(cls: Any, init: Any, model_cls: type | None = None) -> str | None:
    """One line naming the exact ``tvr-bench prepare`` command when the shards a benchmark run reads are
    missing or were prepared with another sampling or fewer frames; None when they look ready."""
    sampling = init.get("sampling")
    num_frames = init.get("num_frames") or cls.NUM_FRAMES
    explicit = init.get("root")
    root = explicit or cls.default_root(sampling, num_frames)
    if not _is_local(str(root)):
        return None
    who = f"{model_cls.__name__} " if model_cls is not None and sampling else ""
    want = f"{who}needs {sampling or cls.SAMPLING} frames ({num_frames} per video)"
    command = cls.prepare_command(sampling, num_frames, out=str(root))
    where = f"See data_cards/{cls.NAME}.md; --videos/--annotations are where you unpacked the release."
    if not Path(root).is_dir():
        return (
            f"the {cls.NAME} shards are not prepared: {str(root)!r} does not exist ({want}). "
            f"Run `{command}`. {where}"
        )
    for index_path in sorted(Path(root).glob(f"*/{INDEX_FILE}")):
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # a damaged index is reported by the DataModule, with its own message
        have_sampling, have_frames = index.get("sampling"), index.get("num_frames")
        wrong_sampling = sampling is not None and have_sampling not in (None, sampling)
        too_few = isinstance(have_frames, int) and have_frames < num_frames
        if wrong_sampling or too_few:
            fix = cls.prepare_command(sampling, num_frames) if explicit else f"{command} --overwrite"
            drop = " and remove data.init_args.root" if explicit else ""
            return (
                f"{str(root)!r} holds {cls.NAME} shards prepared with {have_sampling} sampling and {have_frames} "
                f"frames, but this run {want}. Run `{fix}`{drop}. {where}"
            )
    return None


def missing_weights_message(config: Any) -> str | None:
    """Why the configured model's CLIP weights or tokenizer cannot be had (``weights_problem`` of its
    ``backbone`` init arg: a hub name neither cached nor downloadable now), None when they can or none is set."""
    model = config.get("model") if config is not None else None
    init = model.get("init_args") if model is not None and hasattr(model, "get") else None
    backbone = init.get("backbone") if init is not None and hasattr(init, "get") else None
    if not isinstance(backbone, str) or not backbone:
        return None
    from tvr_bench.backbones.clip import weights_problem

    problem = weights_problem(backbone)
    if problem is not None and backbone.rstrip("/").endswith(PRETRAINED_SYNTHETIC):
        problem += " (the synthetic recipe's pretrained backbone: build it with `tvr-bench pretrain --size default` or `make bench`)"
    return problem


def _stop_on(weights: str | None, shards: str | None) -> None:
    """Print one ``error:`` line per missing piece (CLIP weights, then shards) and exit: 2 when the weights are
    missing, 3 when only the shards are; return when nothing is missing."""
    for message in (weights, shards):
        if message is not None:
            print(f"error: {message}", file=sys.stderr)
    if weights is not None or shards is not None:
        raise SystemExit(EXIT_CONFIG if weights is not None else EXIT_DATA)


class TVRBenchCLI(LightningCLI):
    """LightningCLI with the shared evaluator and leaderboard writer always attached and a `bench` subcommand."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Force the shared RetrievalEvaluator (`evaluator:`) and LeaderboardWriter (`leaderboard:`) callbacks."""
        parser.add_lightning_class_args(RetrievalEvaluator, "evaluator")
        parser.add_lightning_class_args(LeaderboardWriter, "leaderboard")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, remembering the model arguments given on the command line (`_parse_ckpt_path` keeps them)."""
        argv = list(sys.argv[1:] if args is None else args) if args is None or isinstance(args, (list, tuple)) else []
        self.command_line_model_args = command_line_model_args(argv)
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """With `--ckpt_path`, Lightning replaces the model's init args by the checkpoint's hyper-parameters,
        command-line flags included. Keep that for the recipes' values, but give back the model arguments
        written on the command line: `tvr-bench test --ckpt_path X --model.init_args.pairing reference`
        rescores a checkpoint with another scoring option instead of silently using the saved one."""
        subcommand = self.config.get("subcommand")
        model = self.config.get(subcommand, {}).get("model") if subcommand else None
        init = getattr(model, "init_args", None)
        given = {k: init.get(k) for k in getattr(self, "command_line_model_args", ()) if init is not None and k in init}
        super()._parse_ckpt_path()
        if given:
            after = self.config[subcommand]["model"]["init_args"]
            for key, value in given.items():
                after[key] = value

    def before_instantiate_classes(self) -> None:
        """Fill the data protocol the method asks for (frame sampling, training stream, augmentation) where
        the data config leaves it unset, then stop early, naming the exact prepare command, when a real
        benchmark's shards for that protocol are not prepared."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if config is not None and "weights_only" in config and config.get("weights_only") is None:
            config["weights_only"] = True  # `--ckpt_path`: tensors and plain types only, never arbitrary pickles
        # the CLIP weights first (a hub name not in the cache, no network), before any data work, so that a
        # user missing both the weights and the shards learns of both at once
        weights = missing_weights_message(config)
        data = config.get("data") if config is not None else None
        if data is None or not getattr(data, "class_path", None):
            _stop_on(weights, None)
            return
        from jsonargparse import Namespace

        from tvr_bench.data.benchmarks.common import BenchmarkDataModule

        cls = _import_class(data.class_path)
        if not isinstance(data.get("init_args"), Namespace):
            data["init_args"] = Namespace()
        init = data.init_args
        model = config.get("model")
        model_cls = _import_class(model.class_path) if getattr(model, "class_path", None) else None
        fill_data_protocol(init, cls, model_cls)
        shards = None
        if isinstance(cls, type) and issubclass(cls, BenchmarkDataModule):
            shards = unprepared_shards_message(cls, init, model_cls)
        _stop_on(weights, shards)

    def instantiate_classes(self) -> None:
        """Instantiate the configured classes; a rejected value ends with its message, not a traceback."""
        try:
            super().instantiate_classes()
        except Exception as err:  # jsonargparse wraps the constructor's own error
            root = err
            while root.__cause__ is not None:
                if isinstance(root, WeightsUnavailableError):
                    break  # its own message says it all; what caused it is in that line
                root = root.__cause__
            if isinstance(root, WeightsUnavailableError):
                print(f"error: {root}", file=sys.stderr)
                raise SystemExit(EXIT_CONFIG) from None
            if isinstance(root, (ValueError, TypeError, FileNotFoundError, OSError)):
                print(f"error: invalid configuration: {type(root).__name__}: {root}", file=sys.stderr)
                raise SystemExit(EXIT_CONFIG) from None
            raise

    def after_instantiate_classes(self) -> None:
        """Name the W&B run (group, tags, job type, folder) from method and dataset before it starts."""
        hparams = getattr(self.model, "hparams", {}) or {}
        seed = os.environ.get("PL_GLOBAL_SEED")
        for logger in self.trainer.loggers:
            if isinstance(logger, OfflineWandbLogger):
                logger.describe(
                    method=str(getattr(self.model, "method_name", type(self.model).__name__.lower())),
                    dataset=dataset_name(self.datamodule),
                    backbone=canonical_backbone(hparams.get("backbone") if hasattr(hparams, "get") else None),
                    seed=int(seed) if seed else None,
                    job_type=self.subcommand,
                    save_dir=self.trainer.default_root_dir,
                )

    def _run_subcommand(self, subcommand: str) -> None:
        """Run the subcommand, then close its W&B run so a later run in this process gets its own."""
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            finish_wandb(self.trainer.loggers, exit_code=1)
            raise
        finish_wandb(self.trainer.loggers)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """Lightning's parser, whose ``--help`` opens with what tvr-bench is (subcommand parsers keep their own)."""
        kwargs.setdefault("description", cli_description())
        return super().init_parser(**kwargs)

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        """Lightning's subcommands with whole one-line descriptions, plus one help entry per TOOL_COMMANDS tool so
        ``--help`` lists them all (the tools themselves are dispatched by :func:`main` before Lightning parses)."""
        for name in self.subcommands():
            if name in SUBCOMMAND_SUMMARIES:
                kwargs.setdefault(name, {}).setdefault("description", SUBCOMMAND_SUMMARIES[name])
        super()._add_subcommands(parser, **kwargs)
        action = parser._subcommands_action
        if action is None:
            return
        for choice in action._choices_actions:  # Lightning's help= is its docstring's first line, cut at a width
            if choice.dest in SUBCOMMAND_SUMMARIES:
                choice.help = SUBCOMMAND_SUMMARIES[choice.dest]
        for name in TOOL_COMMANDS:
            if name in self._subcommand_parsers:
                continue
            summary = SUBCOMMAND_SUMMARIES.get(name) or tool_summary(name)
            action.add_subcommand(name, LightningArgumentParser(description=summary, add_help=False), help=summary)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's fit, validate and test plus `bench` (fit, then test the best checkpoint). Lightning's
        `predict` is left out: no method defines a predict step and no DataModule a predict split."""
        commands = {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}
        commands["bench"] = {"model", "train_dataloaders", "val_dataloaders", "datamodule"}
        return commands


def _bench(trainer: Any, model: Any, datamodule: Any = None, **_: Any) -> None:
    """Fit, then test with the best checkpoint (or the final weights when none was saved)."""
    ckpt = trainer.checkpoint_callback
    trainer.fit(model, datamodule=datamodule)
    best = getattr(ckpt, "best_model_path", "") if ckpt is not None else ""
    # our checkpoints hold tensors and plain types only (tests/test_reliability.py): no pickle is executed
    trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=True, verbose=False)


def tool_summary(name: str) -> str:
    """One line for ``tvr-bench --help``: the first docstring line of the tool's function (its module's
    when the function has none), or where it lives when it cannot be imported."""
    module_name, func_name = TOOL_COMMANDS[name].split(":")
    try:
        module = __import__(module_name, fromlist=[func_name])
    except Exception as exn:  # noqa: BLE001 - help must list the tool even when it is broken
        return f"({TOOL_COMMANDS[name]}; cannot be imported: {type(exn).__name__})"
    func = getattr(module, func_name, None)
    for doc in (getattr(func, "__doc__", None), module.__doc__):
        line = (doc or "").strip().splitlines()[0].strip() if (doc or "").strip() else ""
        if line:
            return line
    return f"see `tvr-bench {name} --help`"


def _dispatch_tool(name: str, argv: list[str]) -> int:
    module_name, func_name = TOOL_COMMANDS[name].split(":")
    module = __import__(module_name, fromlist=[func_name])
    return int(getattr(module, func_name)(argv) or 0)


def cli_main(args: list[str] | None = None, run: bool = True) -> TVRBenchCLI:
    """Run the Lightning part of the CLI (testable: pass `args`; `run=False` parses and instantiates only)."""
    os.environ.setdefault("WANDB_SILENT", "true")
    import lightning.pytorch as pl

    if not hasattr(pl.Trainer, "bench"):
        pl.Trainer.bench = _bench  # type: ignore[attr-defined]
    return TVRBenchCLI(
        RetrievalModule,
        RetrievalDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=RunConfigCallback,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def _message(exn: BaseException) -> str:
    """The exception's own message, without the worker traceback a DataLoader worker wraps around it."""
    text = str(exn)
    marker = f"{type(exn).__name__}: "
    if "Original Traceback" in text and marker in text:
        text = text.rsplit(marker, 1)[1]
    return text.strip()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `tvr-bench` console script: exit codes 2 (configuration), 3 (data), 4 (NaN loss)."""
    from tvr_bench.data.shards import ShardError
    from tvr_bench.methods.base import NonFiniteLossError

    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in TOOL_COMMANDS:
        return _dispatch_tool(args[0], args[1:])
    try:
        cli_main(None if argv is None else args)
    except WeightsUnavailableError as exn:  # CLIP weights or tokenizer neither local, cached nor downloadable
        print(f"error: {exn}", file=sys.stderr)
        return EXIT_CONFIG
    except (FileNotFoundError, ShardError) as exn:  # MissingShardsError, a missing --ckpt_path
        print(f"error: {_message(exn)}", file=sys.stderr)
        return EXIT_DATA
    except pickle.UnpicklingError as exn:
        first = str(exn).strip().splitlines()[0] if str(exn).strip() else type(exn).__name__
        print(
            f"error: refused to load the checkpoint: it holds more than tensors and plain values "
            f"(read with weights_only=True; `--weights_only false` loads it, for a file you trust only): {first}",
            file=sys.stderr,
        )
        return EXIT_DATA
    except NonFiniteLossError as exn:
        print(f"error: {_message(exn)}", file=sys.stderr)
        return EXIT_NONFINITE
    return 0


if __name__ == "__main__":
    sys.exit(main())
