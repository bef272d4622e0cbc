"""ResNet + FPN backbone for SOLO (hand-out section 5): torchvision parts, five pyramid levels.

`build_backbone(depth=50, out_channels=256, weights=None, norm="auto")` returns a module whose
`forward(images)` gives the list [P2, P3, P4, P5, P6] at strides 4, 8, 16, 32, 64, each with
`out_channels` channels. P2..P5 come from torchvision's FeaturePyramidNetwork over ResNet stages
layer1..layer4; P6 is torchvision's LastLevelMaxPool (a stride-2 subsample of P5), as in the
detection models.

Weights: None (train from scratch), "imagenet" (torchvision's weights enum; downloads through
the hub, as on Colab) or the path of a local ResNet state-dict file (`--backbone-weights PATH`,
e.g. the `resnet50-0676ba61.pth` that torchvision downloads, copied by hand).

Normalisation: "auto" is frozen batch norm with pretrained weights (the statistics are
ImageNet's and batches of two images would only spoil them) and trainable `nn.BatchNorm2d`
without (from scratch nothing would ever set frozen statistics: they stay 0 / 1). "bn",
"frozen_bn" and "gn" (GroupNorm, 32 groups) choose explicitly. From scratch every layer
trains; with weights the stem and layer1 stay frozen by default (trainable_layers=3), as in
torchvision's detection models.

Run `python backbone.py --depth 18 --size 800 1088` to print the pyramid shapes.

Shape legend: B batch, H x W padded input (multiples of 32), P_l level l of the pyramid with
`out_channels` channels at H / 2^l x W / 2^l.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
from torchvision.models import resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from errors import ConfigError, ModelFileError

# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------


def resnet10(*, weights: None = None, **kwargs) -> resnet.ResNet:
    """ResNet-10: ResNet-18's stem and stages with one basic block per stage instead of two
    (torchvision has no ImageNet weights for it)."""
    if weights is not None:
        raise ConfigError("torchvision has no ImageNet weights for ResNet-10")
    return resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], **kwargs)


# ResNet depth -> (torchvision builder, ImageNet weights enum entry or None).
RESNETS: dict[int, tuple[Callable[..., resnet.ResNet], resnet.WeightsEnum | None]] = {
    10: (resnet10, None),
    18: (resnet.resnet18, resnet.ResNet18_Weights.IMAGENET1K_V1),
    34: (resnet.resnet34, resnet.ResNet34_Weights.IMAGENET1K_V1),
    50: (resnet.resnet50, resnet.ResNet50_Weights.IMAGENET1K_V1),
    101: (resnet.resnet101, resnet.ResNet101_Weights.IMAGENET1K_V1),
}
NORMS = ("auto", "bn", "frozen_bn", "gn")
FPN_STRIDES = (4, 8, 16, 32, 64)  # P2..P6
GN_GROUPS = 32  # GroupNorm groups (Wu & He 2018; also the SOLO head's)

# --------------------------------------------------------------------------------------------
# pure functions
# --------------------------------------------------------------------------------------------


def norm_layer_for(norm: str) -> Callable[[int], nn.Module]:
    """The ResNet `norm_layer` for a norm name: a callable `num_channels -> nn.Module`."""
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm == "gn":
        return lambda num_channels: nn.GroupNorm(GN_GROUPS, num_channels)
    raise ConfigError(f"backbone norm must be one of {NORMS[1:]} (or 'auto'), got {norm!r}")


def imagenet_state_dict(depth: int) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet ResNet weights through the hub (cached in ~/.cache/torch/hub).

    Raises a RuntimeError with one line saying how to pass a local file when the hub cannot be
    reached (no network, as on this project's test machines).
    """
    weights = RESNETS[depth][1]
    if weights is None:
        raise RuntimeError(
            f"torchvision has no ImageNet weights for ResNet-{depth}; pass a local file with "
            "--backbone-weights PATH, or train from scratch without --backbone-weights"
        )
    try:
        return weights.get_state_dict(progress=True)
    except (OSError, RuntimeError, ValueError) as err:  # URLError is an OSError
        raise RuntimeError(
            f"cannot download the ImageNet ResNet-{depth} weights from {weights.url} "
            f"({type(err).__name__}: {err}); download that file elsewhere and pass it with "
            f"--backbone-weights PATH, or train from scratch without --backbone-weights"
        ) from None


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A ResNet state dict from a local file (plain, or under a "state_dict" / "model" key).

    A "module." prefix (DataParallel) is removed. Shapes: whatever the file holds.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelFileError(
            f"backbone weights file {path} holds a {type(state).__name__}, "
            "expected a ResNet state dict"
        )
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_resnet_weights(body: resnet.ResNet, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `body`; the classifier (`fc.*`) may be absent, nothing else may."""
    result = body.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("fc.")]
    unexpected = [k for k in result.unexpected_keys if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ModelFileError(
            f"backbone weights {source} do not fit this ResNet: missing {missing[:4]}"
            f"{'...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
            f"{'...' if len(unexpected) > 4 else ''} (is the depth right?)"
        )


def set_width(body: resnet.ResNet, width: int) -> resnet.ResNet:
    """Rebuild `body`'s stem and four stages `width` x (1, 2, 4, 8) channels wide instead of
    torchvision's 64 x (1, 2, 4, 8), same blocks and depth, freshly initialised as torchvision
    does (kaiming-normal convs, norm weight 1 and bias 0). From scratch only."""
    block = type(body.layer1[0])
    norm_layer = body._norm_layer
    body.inplanes = width
    body.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    body.bn1 = norm_layer(width)
    for k in range(4):
        stage = getattr(body, f"layer{k + 1}")
        layer = body._make_layer(block, width * 2**k, len(stage), stride=1 if k == 0 else 2)
        setattr(body, f"layer{k + 1}", layer)
    body.fc = nn.Linear(width * 8 * block.expansion, body.fc.out_features)
    for m in body.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    return body


def set_stride_in_1x1(body: resnet.ResNet) -> resnet.ResNet:
    """Move the stride of each strided bottleneck (the first block of layer2..layer4) from its
    3x3 conv (torchvision, "ResNet v1.5") to its first 1x1 conv (the original ResNet and
    detectron2's MSRA weights, RESNETS.STRIDE_IN_1X1 = True); the shortcut keeps its stride.
    The weights' shapes do not change. ResNet-10/18/34 (basic blocks) are a ValueError."""
    if not isinstance(body.layer2[0], resnet.Bottleneck):
        raise ConfigError("stride_in_1x1 needs a bottleneck ResNet (depth 50 or 101)")
    for block in (body.layer2[0], body.layer3[0], body.layer4[0]):
        block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)
    return body


def freeze_layers(body: resnet.ResNet, trainable_layers: int) -> None:
    """Freeze all but the last `trainable_layers` of conv1(+bn1), layer1..layer4 (0..5)."""
    if not 0 <= trainable_layers <= 5:
        raise ConfigError(f"trainable_layers must be in 0..5, got {trainable_layers}")
    # Same order and rule as torchvision's detection backbones.
    layers_to_train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        layers_to_train.append("bn1")
    for name, param in body.named_parameters():
        if not any(name.startswith(layer) for layer in layers_to_train):
            param.requires_grad_(False)


# --------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------


class Backbone(nn.Module):
    """ResNet body + FPN; `forward(images (B,3,H,W)) -> [P2..P6]`, P_l (B, out_channels, ...)."""

    def __init__(
        self, body_with_fpn: BackboneWithFPN, depth: int, norm: str, weights: str, width: int
    ):
        super().__init__()
        self.net = body_with_fpn
        self.out_channels = body_with_fpn.out_channels
        self.strides = FPN_STRIDES
        self.depth = depth
        self.norm = norm
        self.weights = weights
        self.width = width

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images (B,3,H,W) -> [P2 (B,F,H/4,W/4), P3 .../8, P4 .../16, P5 .../32, P6 .../64]."""
        feats = self.net(images)  # OrderedDict "0".."3", "pool"
        return list(feats.values())

    def extra_repr(self) -> str:
        return f"depth={self.depth}, width={self.width}, norm={self.norm}, weights={self.weights}"


def check_settings(
    depth: int, width: int, weights: str | Path | None, norm: str, stride_in_1x1: bool = False
) -> None:
    """Raise a ConfigError naming the setting when `build_backbone` could not build these
    (`config.validate` calls it too, so that a bad flag stops a run before its data)."""
    if depth not in RESNETS:
        raise ConfigError(f"backbone depth must be one of {sorted(RESNETS)}, got {depth}")
    if norm not in NORMS:
        raise ConfigError(f"backbone norm must be one of {NORMS}, got {norm!r}")
    pretrained = bool(weights)
    if width < 8 or width % 8:
        raise ConfigError(f"backbone width must be a positive multiple of 8, got {width}")
    if width != 64 and pretrained:
        raise ConfigError(
            f"backbone width {width} cannot take pretrained weights (made for width 64)"
        )
    if norm == "gn" and width % GN_GROUPS:
        raise ConfigError(f"backbone norm 'gn' needs a width divisible by {GN_GROUPS}, got {width}")
    if norm == "gn" and pretrained:
        raise ConfigError(
            "backbone norm 'gn' cannot take ImageNet weights (they hold batch-norm "
            "statistics); use norm 'frozen_bn' or 'bn' with weights"
        )
    if stride_in_1x1 and depth < 50:
        raise ConfigError(
            f"stride_in_1x1 needs a bottleneck ResNet (depth 50 or 101), got depth {depth}: "
            "ResNet-10/18/34 have their strides in a 3x3 conv in every convention"
        )


def build_backbone(
    depth: int = 50,
    out_channels: int = 256,
    weights: str | Path | None = None,
    norm: str = "auto",
    trainable_layers: int | None = None,
    width: int = 64,
    stride_in_1x1: bool = False,
) -> Backbone:
    """ResNet-`depth` + FPN with `out_channels` channels and outputs P2..P6 (strides 4..64).

    weights: None or "" (from scratch), "imagenet" (torchvision hub) or a state-dict path.
    norm: "auto" (frozen BN with weights, trainable BN without), "bn", "frozen_bn", "gn".
    trainable_layers: ResNet stages that train, 0..5; default 3 with weights (torchvision's
    detection default) and 5 without. From scratch every layer trains whatever is asked: a
    frozen random layer is useless, so a smaller number is overridden with a warning.
    width: channels of the stem and the first stage (torchvision: 64); the stages double it.
    Other widths train from scratch only.
    stride_in_1x1: a bottleneck ResNet (50, 101) with each stage's stride in its first 1x1
    conv instead of the 3x3 (`set_stride_in_1x1`; the same weights, another network).
    """
    check_settings(depth, width, weights, norm, stride_in_1x1)
    weights = str(weights) if weights else None
    pretrained = weights is not None
    if norm == "auto":
        norm = "frozen_bn" if pretrained else "bn"
    if trainable_layers is None:
        trainable_layers = 3 if pretrained else 5
    elif not pretrained and trainable_layers != 5:
        warnings.warn(
            f"trainable_layers={trainable_layers} ignored: without pretrained weights "
            "every backbone layer trains",
            stacklevel=2,
        )
        trainable_layers = 5

    builder = RESNETS[depth][0]
    body = builder(weights=None, norm_layer=norm_layer_for(norm))
    if width != 64:
        set_width(body, width)
    if stride_in_1x1:
        set_stride_in_1x1(body)
    if weights == "imagenet":
        load_resnet_weights(body, imagenet_state_dict(depth), f"ImageNet ResNet-{depth}")
    elif weights is not None:
        load_resnet_weights(body, load_state_dict_file(weights), f"file {weights}")
    freeze_layers(body, trainable_layers)

    # Channels of layer1..layer4: 64, 128, 256, 512 (x width / 64) times the block expansion.
    expansion = type(body.layer1[-1]).expansion
    in_channels_list = [width * expansion * 2**i for i in range(4)]
    return_layers = {f"layer{k}": str(k - 1) for k in range(1, 5)}
    fpn = BackboneWithFPN(
        body, return_layers, in_channels_list, out_channels, extra_blocks=LastLevelMaxPool()
    )
    return Backbone(fpn, depth=depth, norm=norm, weights=weights or "none", width=width)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", type=int, default=50, choices=sorted(RESNETS))
    parser.add_argument("--width", type=int, default=64, help="stem and first-stage channels")
    parser.add_argument("--fpn-channels", type=int, default=256)
    parser.add_argument("--backbone-weights", default="", help='"", "imagenet" or a file')
    parser.add_argument("--norm", default="auto", choices=NORMS)
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1088), metavar=("H", "W"))
    args = parser.parse_args(argv)
    try:
        model = build_backbone(
            args.depth, args.fpn_channels, args.backbone_weights, args.norm, width=args.width
        )
    except (RuntimeError, ValueError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    model.eval()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"{model.extra_repr()}: {total / 1e6:.1f} M parameters, {trainable / 1e6:.1f} M train")
    with torch.no_grad():
        feats = model(torch.zeros(1, 3, *args.size))
    for name, stride, feat in zip(("P2", "P3", "P4", "P5", "P6"), FPN_STRIDES, feats, strict=True):
        print(f"{name} stride {stride:2d}: {tuple(feat.shape)}")


if __name__ == "__main__":
    main()
