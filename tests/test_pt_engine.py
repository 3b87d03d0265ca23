"""pt_engine.CustomTrainer: learning, early stopping, checkpoints, exact resume and DDP metric agreement.

The engine does not care which network it trains, so these tests use a tiny CNN to stay fast; the CLI tests
train the real EfficientNet.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import data_loader as dl
import pt_engine
import run_artifacts
from conftest import requires_cuda
from pt_train import find_free_port

CFG = {"resize_size": 24, "crop_size": 24, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.25] * 3}


def tiny_net(num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Dropout(0.2), nn.Linear(8, num_classes))


def loaders(root: Path, rank: int = 0, world_size: int = 1, batch_size: int = 8, val_split: float = 0.25):
    images = dl.scan_image_folder(root)
    splits = dl.build_splits(images, CFG, val_split=val_split, seed=0, augment=False)
    kw = dict(rank=rank, world_size=world_size, num_workers=0, seed=0)
    return (dl.make_loader(splits.train, batch_size, train=True, **kw),
            dl.make_loader(splits.val, batch_size, train=False, **kw))


def make_trainer(root: Path, save_dir: Path, *, epochs: int = 4, lr: float = 0.05, patience: int = 10,
                 scheduler: str = "cosine", rank: int = 0, world_size: int = 1, gpu_id: int | None = None,
                 amp: bool = False) -> pt_engine.CustomTrainer:
    net = tiny_net()
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs) if scheduler == "cosine"
             else torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0))
    train, val = loaders(root, rank, world_size)
    return pt_engine.CustomTrainer(net, train, val, nn.CrossEntropyLoss(), opt, gpu_id, save_dir, patience, epochs,
                                   world_size, sched, num_classes=3, metadata={"classes": ["A", "B", "C"]}, amp=amp)


def test_trainer_learns_and_writes_checkpoints(synthetic_dir, tmp_path):
    history = make_trainer(synthetic_dir, tmp_path, epochs=6).train()
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert history[-1]["val_acc"] >= 0.9 > 1 / 3 + 0.2  # 3 classes: chance is 1/3
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert json.loads((tmp_path / "history.json").read_text()) == history
    ckpt = run_artifacts.load_checkpoint(tmp_path / "last.pt")  # weights_only=True: no arbitrary unpickling
    assert ckpt["epoch"] == 6 and ckpt["metadata"] == {"classes": ["A", "B", "C"]}
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "history"} <= set(ckpt)
    best = run_artifacts.load_checkpoint(tmp_path / "best.pt")
    assert best["best_val_loss"] == min(h["val_loss"] for h in history)
    assert not list(tmp_path.glob(".*.tmp"))


def test_early_stopping_stops_after_patience(synthetic_dir, tmp_path):
    # lr 0: the validation loss never improves after the first epoch
    trainer = make_trainer(synthetic_dir, tmp_path, epochs=10, lr=0.0, patience=2)
    history = trainer.train()
    assert len(history) == 3 and trainer.bad_epochs == 2
    assert run_artifacts.load_checkpoint(tmp_path / "best.pt")["epoch"] == 1


@pytest.mark.parametrize("scheduler", ["cosine", "plateau"])
def test_resume_continues_exactly_where_it_stopped(synthetic_dir, tmp_path, scheduler):
    full = make_trainer(synthetic_dir, tmp_path / "full", scheduler=scheduler)
    full.train()
    first = make_trainer(synthetic_dir, tmp_path / "split", epochs=4, scheduler=scheduler)
    first.max_epochs = 2  # as if the process died after epoch 2
    first.train()
    resumed = make_trainer(synthetic_dir, tmp_path / "split", scheduler=scheduler)
    resumed.resume(tmp_path / "split" / "last.pt")
    assert resumed.epoch == 2 and resumed.optimizer.param_groups[0]["lr"] == first.optimizer.param_groups[0]["lr"]
    history = resumed.train()
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert [h["lr"] for h in history] == [h["lr"] for h in full.history]
    for a, b in zip(full.raw_model.state_dict().values(), resumed.raw_model.state_dict().values()):
        assert torch.equal(a, b)


def _fp16_scaled(trainer: pt_engine.CustomTrainer) -> pt_engine.CustomTrainer:
    # float16 autocast with a GradScaler, as on a GPU without bf16, here on the CPU; growth every step so that
    # the scale changes during training and a resume has state to restore
    trainer.amp_dtype = torch.float16
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    return trainer


def test_an_amp_step_runs_in_bfloat16_on_the_cpu(synthetic_dir, tmp_path):
    trainer = make_trainer(synthetic_dir, tmp_path, amp=True)
    dtypes = []
    trainer.raw_model[0].register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    images, targets = next(iter(trainer.train_loader))
    before = [p.detach().clone() for p in trainer.raw_model.parameters()]
    loss = trainer.run_batch(images, targets)
    assert dtypes == [torch.bfloat16] and torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in trainer.raw_model.parameters())  # the weights stay float32
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.raw_model.parameters()))


@pytest.mark.parametrize("scaled", [False, True], ids=["bf16", "fp16 with GradScaler"])
def test_amp_training_resumes_exactly_with_its_scaler(synthetic_dir, tmp_path, scaled):
    prepare = _fp16_scaled if scaled else (lambda t: t)
    full = prepare(make_trainer(synthetic_dir, tmp_path / "full", amp=True))
    full.train()
    first = prepare(make_trainer(synthetic_dir, tmp_path / "split", amp=True))
    first.max_epochs = 2
    first.train()
    resumed = prepare(make_trainer(synthetic_dir, tmp_path / "split", amp=True))
    resumed.resume(tmp_path / "split" / "last.pt")
    assert resumed.scaler.state_dict() == first.scaler.state_dict()
    if scaled:
        assert resumed.scaler.get_scale() != 2.0**10  # restored, not the initial scale
    resumed.train()
    assert resumed.scaler.state_dict() == full.scaler.state_dict()
    for a, b in zip(full.raw_model.state_dict().values(), resumed.raw_model.state_dict().values()):
        assert torch.equal(a, b)


def _ddp_worker(rank: int, world_size: int, port: int, root: str, save_dir: str, out: str, lr: float = 0.05,
                epochs: int = 3) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        trainer = make_trainer(Path(root), Path(save_dir), epochs=epochs, patience=1, lr=lr, rank=rank,
                               world_size=world_size)
        history = trainer.train()
        torch.save({"history": history, "val_shard": len(trainer.val_loaders[""].sampler)}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_agree_on_exact_global_metrics(tmp_path):
    from conftest import make_image_folder
    # 3 classes x 13 images with val_split 0.25: 9 validation images, an odd count that padding would distort
    root = make_image_folder(tmp_path / "data", per_class=13)
    mp.spawn(_ddp_worker, args=(2, find_free_port(), str(root), str(tmp_path / "run"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    def figures(history):
        return [{k: v for k, v in h.items() if k != "time_s"} for h in history]
    assert figures(ranks[0]["history"]) == figures(ranks[1]["history"])  # every rank sees the global figures
    assert ranks[0]["val_shard"] + ranks[1]["val_shard"] == 9
    # the gathered figures equal a single-process evaluation of the saved weights on the whole validation set
    ckpt = run_artifacts.load_checkpoint(tmp_path / "run" / "last.pt")
    single = make_trainer(root, tmp_path / "single")
    single.raw_model.load_state_dict(ckpt["model"])
    expected = single.evaluate()
    last = ckpt["history"][-1]
    assert last["val_acc"] == pytest.approx(expected["acc"]) and last["val_f1"] == pytest.approx(expected["f1"])
    assert last["val_loss"] == pytest.approx(expected["loss"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(600)  # a rank left waiting for the other would hang here
def test_ddp_ranks_stop_early_at_the_same_epoch(tmp_path):
    from conftest import make_image_folder
    root = make_image_folder(tmp_path / "data", per_class=13)
    # lr 0: the weights never change, so the validation loss stops improving and patience 1 ends the run early
    mp.spawn(_ddp_worker, args=(2, find_free_port(), str(root), str(tmp_path / "run"), str(tmp_path), 0.0, 8),
             nprocs=2)
    histories = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True)["history"] for r in range(2)]
    epochs = [[h["epoch"] for h in history] for history in histories]
    assert epochs[0] == epochs[1] and 2 <= len(epochs[0]) < 8
    losses = [h["val_loss"] for h in histories[0]]
    assert losses[-1] >= min(losses[:-1]) and all(b < a for a, b in zip(losses, losses[1:-1]))  # stopped at the first non-improvement
    assert run_artifacts.load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == len(epochs[0])


@pytest.mark.gpu
@requires_cuda
def test_amp_step_on_gpu_runs_bf16_without_a_scaler(synthetic_dir, tmp_path):
    trainer = make_trainer(synthetic_dir, tmp_path, gpu_id=0, amp=True)
    assert trainer.amp_dtype == torch.bfloat16 and not trainer.scaler.is_enabled()  # any GPU since Ampere
    before = [p.detach().clone() for p in trainer.raw_model.parameters()]
    images, targets = next(iter(trainer.train_loader))
    with trainer._autocast():
        assert trainer.raw_model(images.cuda()).dtype == torch.bfloat16
    loss = trainer.run_batch(images, targets)
    assert loss.device.type == "cuda" and torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in trainer.raw_model.parameters())  # master weights stay fp32
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.raw_model.parameters()))


@pytest.mark.gpu
@requires_cuda
def test_resume_on_gpu_continues_where_it_stopped(synthetic_dir, tmp_path):
    first = make_trainer(synthetic_dir, tmp_path, gpu_id=0, amp=True)
    first.max_epochs = 2
    first.train()
    resumed = make_trainer(synthetic_dir, tmp_path, gpu_id=0, amp=True)
    resumed.resume(tmp_path / "last.pt")
    assert resumed.epoch == 2 and next(resumed.raw_model.parameters()).device.type == "cuda"
    for a, b in zip(first.raw_model.state_dict().values(), resumed.raw_model.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert [h["epoch"] for h in resumed.train()] == [1, 2, 3, 4]
