"""Tiny stand-ins for a retrieval method, a datamodule and the evaluator (leaderboard and W&B tests)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

TOY_METRICS = {
    "t2v/R@1": 40.0, "t2v/R@5": 70.0, "t2v/R@10": 80.0, "t2v/MdR": 2.0, "t2v/MnR": 10.0,
    "v2t/R@1": 38.0, "v2t/R@5": 68.0, "v2t/R@10": 79.0, "v2t/MdR": 2.0, "v2t/MnR": 11.0,
}


class ToyMethod(L.LightningModule):
    """A linear 'method' with the attributes the leaderboard reads (method_name, backbone, max_words)."""

    def __init__(self, backbone: str = "tiny", max_words: int = 8, lr: float = 0.1):
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(4, 3)

    @property
    def method_name(self) -> str:
        """Name used in the leaderboard."""
        return "toymethod"

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Mean output as the loss."""
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Nothing to collect."""

    def on_validation_epoch_end(self) -> None:
        """A validation recall that gets worse: 50, 30, ... (the W&B summary must keep the best)."""
        self.log("val/t2v/R@1", 50.0 - 20.0 * self.current_epoch)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Nothing to collect."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Plain SGD."""
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class ToyDataModule(L.LightningDataModule):
    """Random tensors; `dataset` and `num_frames` like RetrievalDataModule."""

    def __init__(self, dataset: str = "toyset", num_frames: int = 4, n: int = 24, batch_size: int = 8):
        super().__init__()
        self.save_hyperparameters()
        self.dataset = dataset
        self.num_frames = num_frames
        self.n = n
        self.batch_size = batch_size

    def _loader(self) -> DataLoader:
        data = torch.randn(self.n, 4, generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(data), batch_size=self.batch_size)

    def train_dataloader(self) -> DataLoader:
        """Training batches."""
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        """Validation batches."""
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        """Test batches."""
        return self._loader()


class FakeEvaluator(L.Callback):
    """Sets `last_metrics` / `last_counts` / `last_eval_seconds` at the end of each test, like RetrievalEvaluator."""

    def __init__(self, metrics: dict[str, float] | None = None, dsl: bool = False, shift: float = 0.0,
                 sim: torch.Tensor | None = None, text_to_video: torch.Tensor | None = None):
        """With `sim` and `text_to_video`, the metrics and per-query ranks are the real ones of that matrix."""
        super().__init__()
        self.metrics = dict(metrics or TOY_METRICS)
        self.sim = sim
        self.text_to_video = text_to_video
        self.last_per_query: dict[str, Any] | None = None
        self.dsl = dsl
        self.shift = shift
        self.last_metrics: dict[str, float] = {}
        self.last_counts: dict[str, int] = {}
        self.last_eval_seconds = 0.0
        self.last_audit = {"result_class": "pairwise"}  # the verdict the real evaluator's audit gives a plain scorer

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Publish the toy metrics."""
        if self.sim is not None:
            from tvr_bench.callbacks.evaluator import per_query_results
            from tvr_bench.metrics import dual_softmax, retrieval_metrics

            metrics = retrieval_metrics(self.sim, self.text_to_video)
            dsl_sim = dual_softmax(self.sim) if self.dsl else None
            if dsl_sim is not None:
                metrics.update({f"dsl/{k}": v for k, v in retrieval_metrics(dsl_sim, self.text_to_video).items()})
            video_keys = [f"video{i:03d}" for i in range(self.sim.shape[1])]
            counter: dict[int, int] = {}
            caption_keys = []
            for v in self.text_to_video.tolist():
                caption_keys.append(f"video{v:03d}#{counter.get(v, 0)}")
                counter[v] = counter.get(v, 0) + 1
            self.last_per_query = per_query_results(self.sim, self.text_to_video, video_keys, caption_keys, dsl_sim)
            self.last_metrics = metrics
            self.last_counts = {"texts": int(self.sim.shape[0]), "videos": int(self.sim.shape[1])}
            self.last_eval_seconds = 0.01
            return
        metrics = {k: v + self.shift for k, v in self.metrics.items()}
        if self.dsl:
            metrics.update({f"dsl/{k}": v + 1.0 for k, v in self.metrics.items()})
        self.last_metrics = metrics
        self.last_counts = {"texts": 24, "videos": 12}
        self.last_eval_seconds = 0.01


def toy_scores(n_video: int = 40, captions: int = 2, quality: float = 1.5, seed: int = 0,
               noise_seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A random (text x video) score matrix with `captions` captions per video; `quality` lifts the correct pairs.
    `noise_seed` changes the scores but not the queries (another method on the same test set)."""
    t2v = torch.arange(n_video).repeat_interleave(captions)
    g = torch.Generator().manual_seed(seed if noise_seed is None else 1000 + noise_seed)
    sim = torch.randn(len(t2v), n_video, generator=g)
    sim[torch.arange(len(t2v)), t2v] += quality
    return sim, t2v


def ranked_result(method: str, dataset: str, seed: int, quality: float, noise_seed: int, n_video: int = 40,
                  **extra: Any) -> tuple[dict[str, Any], Any]:
    """A result JSON whose metrics, intervals and per-query ranks come from a simulated score matrix."""
    from tvr_bench.callbacks.evaluator import per_query_results
    from tvr_bench.callbacks.leaderboard import per_query_ranks
    from tvr_bench.metrics import retrieval_metrics
    from tvr_bench.stats import bootstrap_intervals

    sim, t2v = toy_scores(n_video=n_video, quality=quality, noise_seed=noise_seed)
    video_keys = [f"video{i:03d}" for i in range(n_video)]
    caption_keys = [f"video{v:03d}#{j % 2}" for j, v in enumerate(t2v.tolist())]
    pq = per_query_ranks(per_query_results(sim, t2v, video_keys, caption_keys))
    result = fake_result(method, dataset, "tiny", seed, 0.0, **extra)
    result["metrics"] = retrieval_metrics(sim, t2v)
    result["intervals"] = {"resamples": 2000, "metrics": bootstrap_intervals([pq.directions()], 2000)}
    result["per_query"] = {"file": None}
    return result, pq


def fake_result(method: str, dataset: str, backbone: str, seed: int, t2v_r1: float, **extra: Any) -> dict[str, Any]:
    """A minimal valid result JSON as LeaderboardWriter writes it."""
    metrics = dict(TOY_METRICS, **{"t2v/R@1": t2v_r1, "v2t/R@1": t2v_r1 - 1.0})
    result = {
        "schema": "tvr-bench/result/v1",
        "method": method, "dataset": dataset, "backbone": backbone, "backbone_source": backbone,
        "frames": 12, "words": 32, "seed": seed,
        "metrics": metrics, "dsl_metrics": None,
        "params": {"total": 1_500_000, "trainable": 1_000_000},
        "train": {"seconds": 10.0 + seed, "pairs_per_s": 100.0 + seed},
        "eval": {"seconds": 2.0, "ms_per_query": 4.0, "texts": 500, "videos": 100},
        "git": {"commit": "0123456789abcdef0123456789abcdef01234567", "dirty": False},
        "timestamp": f"2026-01-0{seed + 1}T00:00:00+00:00",
        "device": {"name": "cpu"},
    }
    protocol = {"result_class": "pairwise", **(extra.pop("protocol", None) or {})}  # as an audited scoring writes it
    result.update(extra, protocol=protocol)
    return result


def write_results(runs: Path, results: list[dict[str, Any]], ranks: dict[int, Any] | None = None) -> None:
    """Write result dicts as runs/results/*.json (and `ranks[id(result)]`, a PerQuery, beside it)."""
    folder = runs / "results"
    folder.mkdir(parents=True, exist_ok=True)
    for r in results:
        name = f"{r['method']}__{r['dataset']}__{r['backbone'].replace('/', '-')}__seed{r['seed']}"
        if ranks is not None and id(r) in ranks:
            ranks[id(r)].save(str(folder / f"{name}.ranks.npz"))
            r["per_query"] = {"file": f"{name}.ranks.npz"}
        (folder / f"{name}.json").write_text(json.dumps(r))


def demo_leaderboard(out: Path) -> dict[str, Any]:
    """A leaderboard of simulated runs (4 methods, one with 2 seeds, one incomplete test set): docs/leaderboard.md's
    example figure. `python -m tests.leaderboard_toys OUT_DIR`."""
    from tvr_bench.report import build_leaderboard

    results, ranks = [], {}
    for method, quality, noise, seed in (("xpool", 3.0, 1, 0), ("xpool", 3.0, 5, 1), ("tmass", 2.9, 2, 0),
                                         ("drl", 2.7, 4, 0), ("clip4clip", 2.0, 3, 0)):
        result, pq = ranked_result(method, "simulated", seed, quality=quality, noise_seed=noise, n_video=150)
        results.append(result)
        ranks[id(result)] = pq
    result, pq = ranked_result("xpool", "simulated-partial", 0, quality=2.5, noise_seed=7, n_video=140,
                               protocol={"test_videos": 140, "protocol_videos": 150})
    results.append(result)
    ranks[id(result)] = pq
    write_results(out, results, ranks)
    return build_leaderboard(out)


if __name__ == "__main__":
    import sys

    print(demo_leaderboard(Path(sys.argv[1]))["paths"])
