"""The training engine: `CustomTrainer` runs epochs on one process or under DDP, evaluates after each epoch,
stops early, and keeps checkpoints that a killed run resumes from.

Every rank computes the same global metrics (torchmetrics syncs its states across processes), and rank 0 alone
writes files and reports, so one run produces one history, one log and one set of checkpoints.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from tqdm import tqdm

import run_artifacts
import terminal

log = logging.getLogger(__name__)

EpochCallback = Callable[[dict], None]


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


class CustomTrainer:
    """Train `model` for up to `max_epochs`, evaluating on `val_loader` after each epoch.

    `gpu_id` is a CUDA device index, or None for the CPU. Under DDP (`world_size > 1`) the process group must
    already be initialised; the trainer wraps the model itself. `metadata` (architecture, classes, transform
    settings, CLI arguments; JSON types only) is stored in every checkpoint so a checkpoint alone rebuilds
    the model. `callbacks` receive each epoch's record on rank 0 (used for live experiment tracking).
    `channels_last` stores the model and each batch NHWC, the layout oneDNN and cuDNN convolutions run fastest
    in (see bench.py); `compile_model` runs the training forward through `torch.compile`, while evaluation and
    checkpoints use the plain module.
    """

    def __init__(self, model: nn.Module, train_loader: DataLoader, val_loader: DataLoader | Mapping[str, DataLoader],
                 criterion: nn.Module,
                 optimizer: torch.optim.Optimizer, gpu_id: int | None, save_dir: str | os.PathLike, patience: int,
                 max_epochs: int, world_size: int = 1, scheduler=None, *, num_classes: int,
                 metadata: dict | None = None, amp: bool = False, callbacks: list[EpochCallback] | None = None,
                 channels_last: bool = False, compile_model: bool = False, progress: bool = True):
        self.device = torch.device("cuda", gpu_id) if gpu_id is not None else torch.device("cpu")
        self.world_size = world_size
        self.rank = dist.get_rank() if world_size > 1 else 0
        self.is_main = self.rank == 0
        self.memory_format = torch.channels_last if channels_last else torch.preserve_format
        self.raw_model = model.to(self.device, memory_format=self.memory_format)
        self.model = (DDP(model, device_ids=[gpu_id] if gpu_id is not None else None)
                      if world_size > 1 else model)
        if compile_model:
            self.model = torch.compile(self.model)
        self.train_loader = train_loader
        # several named loaders (one per training folder): their images make the validation figures together,
        # and each folder also gets its own accuracy, `val_acc/NAME` in the history
        self.val_loaders = dict(val_loader) if isinstance(val_loader, Mapping) else {"": val_loader}
        self.criterion, self.optimizer, self.scheduler = criterion, optimizer, scheduler
        self.save_dir = Path(save_dir)
        self.patience, self.max_epochs = patience, max_epochs
        self.progress = progress  # a progress bar per epoch; off for short epochs, where it is only noise
        self.metadata = metadata or {}
        self.callbacks = callbacks or []
        # bf16 needs no loss scaling; fp16 (older GPUs) does
        self.amp_dtype = (torch.bfloat16 if gpu_id is None or torch.cuda.is_bf16_supported() else torch.float16)
        self.amp = amp
        self.scaler = torch.amp.GradScaler(enabled=amp and self.amp_dtype == torch.float16)
        self.train_metrics = self._metrics(num_classes)
        self.val_metrics = self._metrics(num_classes)
        self.folder_acc = ({name: MulticlassAccuracy(num_classes, average="micro").to(self.device)
                            for name in self.val_loaders} if len(self.val_loaders) > 1 else {})
        self.epoch = 0  # epochs completed
        self.best_val_loss = math.inf
        self.bad_epochs = 0
        self.history: list[dict] = []

    def _metrics(self, num_classes: int) -> MetricCollection:
        # sync_on_compute (the default) all-gathers the states: every rank computes the global value
        return MetricCollection({
            "loss": MeanMetric(),
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
        }).to(self.device)

    def _autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _update(self, metrics: MetricCollection, logits: torch.Tensor, targets: torch.Tensor,
                loss: torch.Tensor) -> None:
        metrics["loss"].update(loss.detach().float(), weight=targets.numel())
        metrics["acc"].update(logits.detach().float(), targets)
        metrics["f1"].update(logits.detach().float(), targets)

    @staticmethod
    def _values(metrics: MetricCollection) -> dict[str, float]:
        values = {name: float(value) for name, value in metrics.compute().items()}
        metrics.reset()
        return values

    def _to_device(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (images.to(self.device, non_blocking=True, memory_format=self.memory_format),
                targets.to(self.device, non_blocking=True))

    def run_batch(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One optimisation step: forward, loss, backward, step. Returns the batch loss (detached, on the device:
        reading it forces a GPU sync, so the caller decides how often)."""
        images, targets = self._to_device(images, targets)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            logits = self.model(images)
            loss = self.criterion(logits, targets)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self._update(self.train_metrics, logits, targets, loss)
        return loss.detach()

    def run_epoch(self, epoch: int) -> dict[str, float]:
        """Train for one epoch and return the global training metrics."""
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)  # a different shuffle each epoch, the same on every rank and after resume
        self.model.train()
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{self.max_epochs}", leave=False,
                   disable=not (self.is_main and self.progress), dynamic_ncols=True,
                   mininterval=terminal.progress_interval())
        for step, (images, targets) in enumerate(bar):
            loss = self.run_batch(images, targets)
            if step % 20 == 0:  # not every step: .item() waits for the GPU to finish
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        return self._values(self.train_metrics)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Global metrics on the validation set (each rank scores its unpadded shard, the states are merged),
        with `acc/NAME` for each named validation loader when there are several."""
        # the raw model: a DDP forward may broadcast buffers, which would deadlock on uneven shards
        self._sync_buffers()
        self.raw_model.eval()
        for name, loader in self.val_loaders.items():
            for images, targets in loader:
                images, targets = self._to_device(images, targets)
                with self._autocast():
                    logits = self.raw_model(images)
                    loss = self.criterion(logits, targets)
                self._update(self.val_metrics, logits, targets, loss)
                if self.folder_acc:
                    self.folder_acc[name].update(logits.detach().float(), targets)
        folders = {f"acc/{name}": float(metric.compute()) for name, metric in self.folder_acc.items()}
        for metric in self.folder_acc.values():
            metric.reset()
        return {**self._values(self.val_metrics), **folders}

    def _sync_buffers(self) -> None:
        """Give every rank rank 0's BatchNorm statistics (each rank's last training step updated its own), so
        all ranks evaluate exactly the model that rank 0 saves."""
        if self.world_size > 1:
            for buffer in self.raw_model.buffers():
                dist.broadcast(buffer, src=0)

    def _lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _step_scheduler(self, val_loss: float) -> None:
        if self.scheduler is None:
            return
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(val_loss)
        else:
            self.scheduler.step()

    def _stop_agreed(self, stop: bool) -> bool:
        """Rank 0's early-stopping decision, broadcast so that no rank waits forever for the others."""
        if self.world_size == 1:
            return stop
        flag = torch.tensor([int(stop)], device=self.device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def state(self) -> dict:
        return {
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "best_val_loss": self.best_val_loss,
            "bad_epochs": self.bad_epochs,
            "history": self.history,
            "rng": _rng_state(),
            "metadata": self.metadata,
        }

    def resume(self, path: str | os.PathLike) -> None:
        """Continue from a checkpoint written by `state()`: weights, optimizer, scheduler, scaler, counters, RNG."""
        ckpt = run_artifacts.load_checkpoint(path, self.device)
        try:
            run_artifacts.check_checkpoint(ckpt, resume=True)
        except run_artifacts.CheckpointError as err:
            raise run_artifacts.CheckpointError(f"Cannot resume from {path}: {err}. Start afresh with "
                                                "--overwrite.") from None
        self.raw_model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None and ckpt["scheduler"] is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.best_val_loss = ckpt["epoch"], ckpt["best_val_loss"]
        self.bad_epochs, self.history = ckpt["bad_epochs"], ckpt["history"]
        _set_rng_state(ckpt["rng"])
        if self.is_main:
            log.info("Resumed from %s after epoch %d (best val loss %.4f)", path, self.epoch, self.best_val_loss)

    def _save(self, improved: bool) -> None:
        self.save_dir.mkdir(parents=True, exist_ok=True)
        state = self.state()
        run_artifacts.save_checkpoint(state, self.save_dir / "last.pt")
        if improved:
            run_artifacts.save_checkpoint(state, self.save_dir / "best.pt")
        run_artifacts.save_json(self.history, self.save_dir / "history.json")

    def train(self) -> list[dict]:
        """Train until `max_epochs` or early stopping; returns the per-epoch history."""
        while self.epoch < self.max_epochs:
            start = time.perf_counter()
            lr = self._lr()
            train = self.run_epoch(self.epoch)
            val = self.evaluate()
            self.epoch += 1
            improved = val["loss"] < self.best_val_loss
            self.best_val_loss = min(self.best_val_loss, val["loss"])
            self.bad_epochs = 0 if improved else self.bad_epochs + 1
            self._step_scheduler(val["loss"])
            record = {"epoch": self.epoch, "lr": lr, "time_s": round(time.perf_counter() - start, 2),
                      **{f"train_{k}": v for k, v in train.items()}, **{f"val_{k}": v for k, v in val.items()}}
            self.history.append(record)
            stop = self._stop_agreed(self.bad_epochs >= self.patience)
            if self.is_main:
                self._save(improved)
                log.info("epoch %d/%d  train loss %.4f acc %.4f f1 %.4f | val loss %.4f acc %.4f f1 %.4f | "
                         "lr %.2e | %.1fs%s%s", self.epoch, self.max_epochs, train["loss"], train["acc"],
                         train["f1"], val["loss"], val["acc"], val["f1"], lr, record["time_s"],
                         "  *best*" if improved else "",
                         "".join(f"\n  val acc {k[4:]}: {v:.4f}" for k, v in val.items() if k.startswith("acc/")))
                for callback in self.callbacks:
                    callback(record)
            if stop:
                if self.is_main:
                    log.info("Early stopping: no val loss improvement for %d epoch(s)", self.patience)
                break
        if self.world_size > 1:
            dist.barrier()  # rank 0 may still be writing files; nobody tears down the group before it is done
        return self.history
