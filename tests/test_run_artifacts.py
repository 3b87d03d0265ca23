"""run_artifacts: atomic writes that never leave a half-written file, safe checkpoint loading and the schema."""
from __future__ import annotations

import pickle

import pytest
import torch

import run_artifacts


def test_json_and_checkpoints_round_trip_and_leave_no_temporary_files(tmp_path):
    run_artifacts.save_json({"a": [1, 2]}, tmp_path / "x.json")
    run_artifacts.save_checkpoint({"model": {"w": torch.arange(3)}, "metadata": {}}, tmp_path / "c.pt")
    assert run_artifacts.load_json(tmp_path / "x.json") == {"a": [1, 2]}
    assert torch.equal(run_artifacts.load_checkpoint(tmp_path / "c.pt")["model"]["w"], torch.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "x.json"]


def test_a_write_that_fails_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    path = tmp_path / "last.pt"
    run_artifacts.save_checkpoint({"epoch": 1}, path)
    with pytest.raises(Exception):
        run_artifacts.save_checkpoint({"epoch": 2, "bad": lambda: None}, path)  # torch.save cannot pickle it
    assert run_artifacts.load_checkpoint(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_writers_of_the_same_file_get_their_own_temporary_names(tmp_path):
    with run_artifacts.atomic_path(tmp_path / "f") as a, run_artifacts.atomic_path(tmp_path / "f") as b:
        assert a != b and a.parent == b.parent == tmp_path
        a.write_bytes(b"a")
        b.write_bytes(b"b")
    assert (tmp_path / "f").read_bytes() == b"a"  # the last rename wins, whole


class Payload:
    pass


def test_loading_refuses_pickled_objects(tmp_path):
    torch.save({"model": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError):
        run_artifacts.load_checkpoint(tmp_path / "evil.pt")


def test_the_schema_names_what_a_checkpoint_lacks():
    ckpt = {"model": {}, "metadata": {"arch": "x", "num_classes": 2, "classes": ["a", "b"], "transform": {}}}
    assert run_artifacts.check_checkpoint(ckpt) is ckpt
    with pytest.raises(run_artifacts.CheckpointError, match="it has no optimizer, scheduler, scaler, epoch"):
        run_artifacts.check_checkpoint(ckpt, resume=True)
    with pytest.raises(run_artifacts.CheckpointError, match="not a dict"):
        run_artifacts.check_checkpoint([1, 2])


def test_what_serving_needs_of_a_checkpoint_leaves_the_training_state_out():
    ckpt = {"model": {"w": torch.ones(1)}, "metadata": {"arch": "x"}, "hand_net": {"v": torch.ones(1)},
            "history": [{"epoch": 1}], "optimizer": {"state": {}}, "rng": {"torch": torch.ones(1)}, "epoch": 3}
    assert set(run_artifacts.for_serving(ckpt)) == {"model", "metadata", "hand_net", "history"}
    assert set(run_artifacts.for_serving({"model": {}, "metadata": {}})) == {"model", "metadata"}
