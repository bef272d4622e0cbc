"""Tests of backbone.py: pyramid shapes and strides, normalisation choices, weight loading.

Nothing is downloaded: weights are None or a state-dict file the test writes, and the hub is
replaced by a function that fails as an unreachable network does.
Run: python -m pytest -q tests/test_backbone.py
"""

import urllib.error

import pytest
import torch
import torch.nn as nn
from torchvision.models import resnet18
from torchvision.ops import FrozenBatchNorm2d

import backbone
from backbone import FPN_STRIDES, build_backbone


def norm_types(model: nn.Module) -> set[type]:
    kinds = (nn.BatchNorm2d, FrozenBatchNorm2d, nn.GroupNorm)
    return {type(m) for m in model.net.body.modules() if isinstance(m, kinds)}


@pytest.mark.parametrize("depth, channels", [(18, 32), (50, 256)])
def test_five_levels_at_strides_4_to_64(depth, channels):
    torch.manual_seed(0)
    model = build_backbone(depth=depth, out_channels=channels).eval()
    H, W = 128, 192
    with torch.no_grad():
        feats = model(torch.randn(2, 3, H, W))
    assert isinstance(feats, list) and len(feats) == 5
    for feat, stride in zip(feats, FPN_STRIDES, strict=True):
        assert feat.shape == (2, channels, H // stride, W // stride)
    assert model.out_channels == channels


def test_from_scratch_trains_every_layer_and_its_batch_norm():
    model = build_backbone(depth=18, out_channels=32)
    assert norm_types(model) == {nn.BatchNorm2d}
    assert all(p.requires_grad for p in model.parameters())


def test_norm_choices():
    assert norm_types(build_backbone(18, 32, norm="gn")) == {nn.GroupNorm}
    assert norm_types(build_backbone(18, 32, norm="frozen_bn")) == {FrozenBatchNorm2d}
    with pytest.raises(ValueError, match="norm"):
        build_backbone(18, 32, norm="layer")
    with pytest.raises(ValueError, match="depth"):
        build_backbone(depth=42)


def test_trainable_layers_below_5_are_ignored_from_scratch():
    with pytest.warns(UserWarning, match="every backbone layer trains"):
        model = build_backbone(18, 32, trainable_layers=3)
    assert all(p.requires_grad for p in model.parameters())


@pytest.fixture
def weights_file(tmp_path):
    """A ResNet-18 state dict with recognisable (non-default) batch-norm statistics."""
    torch.manual_seed(1)
    reference = resnet18()
    with torch.no_grad():
        for m in reference.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    return path, reference.state_dict()


def test_local_weights_file_is_loaded_with_frozen_batch_norm(weights_file):
    path, state = weights_file
    model = build_backbone(depth=18, out_channels=32, weights=path)
    body = model.net.body
    assert norm_types(model) == {FrozenBatchNorm2d}
    assert torch.equal(body.conv1.weight, state["conv1.weight"])
    assert torch.equal(body.layer3[1].bn2.running_var, state["layer3.1.bn2.running_var"])
    # trainable_layers defaults to 3 with weights: stem and layer1 frozen, layer2..4 train.
    assert not body.conv1.weight.requires_grad
    assert not body.layer1[0].conv1.weight.requires_grad
    assert body.layer2[0].conv1.weight.requires_grad
    assert body.layer4[1].conv2.weight.requires_grad
    assert all(p.requires_grad for p in model.net.fpn.parameters())


def test_weights_file_checkpoint_dict_and_module_prefix(weights_file, tmp_path):
    path, state = weights_file
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, wrapped)
    model = build_backbone(depth=18, out_channels=32, weights=wrapped, norm="bn")
    assert norm_types(model) == {nn.BatchNorm2d}
    assert torch.equal(model.net.body.layer2[0].conv1.weight, state["layer2.0.conv1.weight"])


def test_weights_of_another_depth_are_refused(weights_file):
    path, _ = weights_file
    with pytest.raises(ValueError, match="do not fit"):
        build_backbone(depth=34, out_channels=32, weights=path)
    with pytest.raises(FileNotFoundError):
        build_backbone(depth=18, weights=path.parent / "missing.pth")
    with pytest.raises(ValueError, match="gn"):
        build_backbone(depth=18, weights=path, norm="gn")


def test_resnet10_and_narrow_widths_keep_the_pyramid():
    """ResNet-10 has one basic block per stage; width w makes stages w, 2w, 4w, 8w wide."""
    torch.manual_seed(0)
    cases = [(10, 64, [64, 128, 256, 512]), (18, 32, [32, 64, 128, 256]), (10, 48, [48, 96])]
    for depth, width, stage_channels in cases:
        model = build_backbone(depth=depth, out_channels=16, width=width).eval()
        body = model.net.body
        blocks = [len(getattr(body, f"layer{k}")) for k in range(1, 5)]
        assert blocks == ([1, 1, 1, 1] if depth == 10 else [2, 2, 2, 2])
        assert body.conv1.out_channels == width
        for k, channels in enumerate(stage_channels, start=1):
            assert getattr(body, f"layer{k}")[-1].conv2.out_channels == channels
        with torch.no_grad():
            feats = model(torch.randn(1, 3, 128, 192))
        assert [f.shape[-2:] for f in feats] == [(128 // s, 192 // s) for s in FPN_STRIDES]
        assert norm_types(model) == {nn.BatchNorm2d}
        # freshly initialised as torchvision does: every norm at weight 1, bias 0
        assert all(
            bool((m.weight == 1).all()) for m in body.modules() if isinstance(m, nn.BatchNorm2d)
        )
    narrow18 = build_backbone(depth=18, out_channels=16, width=32)
    full18 = build_backbone(depth=18, out_channels=16)
    count = lambda m: sum(p.numel() for p in m.net.body.parameters())  # noqa: E731
    assert count(narrow18) < count(full18) / 3  # convolution weights scale with width^2


def test_resnet10_and_narrow_widths_refuse_pretrained_weights(weights_file):
    path, _ = weights_file
    with pytest.raises(RuntimeError, match="no ImageNet weights for ResNet-10"):
        build_backbone(depth=10, weights="imagenet")
    with pytest.raises(ValueError, match="width 32 cannot take pretrained weights"):
        build_backbone(depth=18, weights=path, width=32)
    with pytest.raises(ValueError, match="multiple of 8"):
        build_backbone(depth=18, width=20)
    with pytest.raises(ValueError, match="divisible by 32"):
        build_backbone(depth=18, width=48, norm="gn")


def test_unreachable_hub_says_how_to_pass_a_file(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match="--backbone-weights PATH") as info:
        build_backbone(depth=18, weights="imagenet")
    assert "\n" not in str(info.value)


def test_main_prints_shapes(capsys):
    backbone.main(["--depth", "18", "--fpn-channels", "32", "--size", "64", "96"])
    out = capsys.readouterr().out
    assert "P6 stride 64: (1, 32, 1, 2)" in out


def test_stride_in_1x1_moves_each_stages_stride_and_keeps_the_weights():
    torch.manual_seed(0)
    ours = build_backbone(50, 32).eval()
    theirs = build_backbone(50, 32, stride_in_1x1=True).eval()
    theirs.load_state_dict(ours.state_dict())  # the same tensors fit: only strides moved
    for name in ("layer2", "layer3", "layer4"):
        block = getattr(theirs.net.body, name)[0]
        assert (block.conv1.stride, block.conv2.stride) == ((2, 2), (1, 1)), name
        assert block.downsample[0].stride == (2, 2)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    assert [p.shape for p in a] == [p.shape for p in b]  # the same pyramid
    assert not torch.allclose(a[1], b[1])  # another network
    with pytest.raises(ValueError, match="bottleneck ResNet"):
        build_backbone(18, 32, stride_in_1x1=True)
