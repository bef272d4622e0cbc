"""Released SOLO, Decoupled SOLO and SOLOv2 checkpoints (issue 18): file layouts, key maps, the
released models' configs, and a deterministic fill for comparing this project with mmdetection.

    model, class_names, cfg = load_released("solov2_r50_fpn_3x_coco_20220512_125856-fed092d4.pth")
    results = model.predict(images, metas)            # as any model of this project

A released file is read with `torch.load(weights_only=True)` (nothing in it runs), its layout
is recognised (`detect_format`), its keys are renamed onto this project's modules one to one
(`to_project_keys`, a table of prefix rules per layout, shapes unchanged), the model is built
with the released architecture and test settings read off the keys and shapes
(`released_config`), and loaded strictly: a missing, unexpected or mis-shaped key is one
`errors.ModelFileError` naming the layout it was read as and the keys.

Layouts (`FORMATS`):
- "mmdet": mmdetection 2.x / 3.x model zoo, `{"meta", "state_dict"}` with `backbone.`, `neck.`,
  `mask_head.` (SOLOHead, DecoupledSOLOHead, DecoupledSOLOLightHead, SOLOV2Head).
- "solo_authors": the authors' WXinlong/SOLO files (mmdetection 1.x), `{"meta", "state_dict"}`
  with `backbone.`, `neck.`, `bbox_head.` and, for SOLOv2, `mask_feat_head.`.
- "adelaidet": AdelaiDet's SOLOv2 (detectron2), `{"model"}` with `backbone.bottom_up.`,
  `backbone.fpn_*`, `ins_head.`, `mask_head.`. Two conventions differ from the others and are
  converted exactly: detectron2's input is BGR in 0..255 minus the pixel mean with std 1
  (folded into the first conv, `fold_detectron2_input`), and its MSRA ResNet-50/101 put each
  stage's stride in the first 1x1 conv (RESNETS.STRIDE_IN_1X1), which the config records
  (`Config.stride_in_1x1`, `backbone.set_stride_in_1x1`), so such a model converts and
  fine-tunes as the others do.
- "project": this project's own checkpoint (config, model, class_names).
Any of them may carry DataParallel's `module.` prefix. ResNeXt and deformable-conv (DCN)
variants are refused with one line saying so.

Fine-tuning (`main_train.py --init-from FILE`): `finetune_config` gives the run the file's
architecture, input and test settings, frozen batch norm and `FINETUNE_SCHEDULE` for every
flag not given; `init_from_file` loads the weights at the start of a new run (a resumed one
takes them from its checkpoint), all but the category output conv, which keeps the head's own
init, or with `keep_classes` the file's rows of the data's class names (`class_rows`).

The check against mmdetection (tools/make_mmdet_reference.py, tests/data/mmdet_reference/):
`fill_tensor(name, shape, seed)` gives every parameter and buffer a value that depends only on
its mmdetection name, shape and a seed; `fill_project_model` fills this project's model with
the same values through the key map, and `reference_image` is the fixed input both run on.

Shape legend: S grid size of a level, C classes, E mask-kernel channels (SOLOv2), D tower width.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import re
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from backbone import freeze_layers
from config import CIS680, Config, model_config, scale_ranges_for, validate
from conventions import IMAGENET_MEAN, IMAGENET_STD
from errors import DataError, ModelFileError
from model import SOLOModel, build_model, config_of

# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------

FORMATS = {
    "mmdet": "an mmdetection 2.x/3.x checkpoint",
    "solo_authors": "a WXinlong/SOLO (mmdetection 1.x) checkpoint",
    "adelaidet": "an AdelaiDet (detectron2) checkpoint",
    "project": "a checkpoint of this project",
}

# mmdetection's CocoDataset.METAINFO["classes"]: the 80 COCO categories in category-id order,
# which is the order of every released model's category outputs (label k <-> channel k).
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

# COCO's own category ids of COCO_CLASSES, in the same order: instances_*.json numbers them 1..90
# and leaves ten unused, and a COCO results file (the evaluation server, pycocotools against the
# official json) gives those ids, not 1..80.
COCO_UNUSED_IDS = frozenset({12, 26, 29, 30, 45, 66, 68, 69, 71, 83})
COCO_CATEGORY_IDS = tuple(i for i in range(1, 91) if i not in COCO_UNUSED_IDS)

# The released models' test settings: the same in mmdetection's configs (test_cfg), the
# authors' (test_cfg) and AdelaiDet's (MODEL.SOLOV2.*): score_thr, mask_thr, nms_pre,
# max_per_img, kernel, sigma, update_thr / filter_thr.
RELEASED_TEST = dict(
    cate_thresh=0.1,
    ins_thresh=0.5,
    pre_nms_num=500,
    keep_instance=100,
    nms_kernel="gaussian",
    nms_sigma=2.0,
    update_thresh=0.05,
)
# Per released model: scale ranges (sqrt(w h) in input pixels; training only) and the test
# input (short side, long-side cap): 1333 x 800 keep-ratio, the light models smaller
# (mmdetection and the authors alike: Decoupled-SOLO-light Resize (852, 512), SOLOv2-light
# (768, 448)).
RELEASED_SCALE_RANGES = {
    "full": ((1, 96), (48, 192), (96, 384), (192, 768), (384, 2048)),
    "decoupled_solo_light": ((1, 64), (32, 128), (64, 256), (128, 512), (256, 2048)),
    "solov2_light": ((1, 56), (28, 112), (56, 224), (112, 448), (224, 896)),
}
RELEASED_INPUT = {
    "full": (800, 1333),
    "decoupled_solo_light": (512, 852),
    "solov2_light": (448, 768),
}
# SOLOv2's grids leave no trace in its weights (one kernel conv serves every level); every
# released SOLOv2 uses these (mmdetection, the authors, AdelaiDet's MODEL.SOLOV2.NUM_GRIDS).
RELEASED_SOLOV2_GRIDS = (40, 36, 24, 16, 12)

# --- fine-tuning (`finetune_config`, `init_from_file`) ---------------------------------------
# What a fine-tuning run takes from the file for every field not given on the command line:
# the architecture, which the weights must fit, the input and the test settings it was
# released with. An --input-size given without --scale-ranges rescales the file's ranges.
FINETUNE_FROM_FILE = (
    "model", "depth", "backbone_width", "stride_in_1x1", "fpn_channels", "seg_feat_channels",
    "stacked_convs", "strides", "num_grids", "scale_ranges", "kernel_channels",
    "mask_feat_channels", "mask_loss_stride", "epsilon", "input_size", "cate_thresh",
    "ins_thresh", "pre_nms_num", "keep_instance", "nms_kernel", "nms_sigma", "update_thresh",
)  # fmt: skip
# The fine-tuning schedule, for every field not given: 12 epochs of a few hundred images on a
# CPU or a Colab GPU. From mmdetection's fine-tuning tutorial (docs/tutorials/finetune.md of
# 2.x, "smaller learning rate and less training epochs": SGD, momentum 0.9, weight decay 1e-4,
# linear warm-up from lr x 0.001, a step near the end) and its 1x schedule (12 epochs, lr / 10
# after epochs 8 and 11: `finetune_lr_steps`). The learning rate is the released SOLO models'
# 0.01 for 16 images a batch, scaled linearly to the batch (`FINETUNE_LR_PER_16`; batch 2:
# 0.00125, which a CPU and a Colab GPU hold at 800 x 1333). Warm-up 100 iterations, not the
# tutorial's 500: a few hundred images at batch 2 are 100-150 iterations an epoch, and 500
# would be a third of the run. Gradient clipping at 35 as in the authors' configs; no time
# budget (the step schedule counts epochs). A recipe from those sources, not measured here.
FINETUNE_SCHEDULE = dict(
    optimizer="sgd",
    momentum=0.9,
    weight_decay=1e-4,
    batch_size=2,
    epochs=12,
    lr_schedule="step",
    warmup_iters=100,
    warmup_ratio=0.001,
    kernel_lr_mult=1.0,
    grad_clip=35.0,
    time_budget_min=0.0,
)
FINETUNE_LR_PER_16 = 0.01  # SGD lr for 16 images a batch (the released SOLO / SOLOv2 configs)
# ResNet stages that train when fine-tuning: the stem and layer1 stay frozen, as with ImageNet
# weights (backbone.build_backbone, torchvision's detection default) and as in the released
# models' own training (mmdetection's frozen_stages=1).
FINETUNE_TRAINABLE_LAYERS = 3

# ResNet depth <-> blocks per stage (torchvision's resnet18 ... resnet101) and block type.
RESNET_BLOCKS = {
    (2, 2, 2, 2, False): 18,
    (3, 4, 6, 3, False): 34,
    (3, 4, 6, 3, True): 50,
    (3, 4, 23, 3, True): 101,
}
# detectron2's input convention for MSRA weights (MODEL.PIXEL_MEAN / PIXEL_STD, BGR, 0..255).
DETECTRON2_PIXEL_MEAN_BGR = (103.530, 116.280, 123.675)
DETECTRON2_PIXEL_STD_BGR = (1.0, 1.0, 1.0)

# --- key maps ---------------------------------------------------------------------------------
# A rule is (this project's key prefix, the layout's key prefix); "{i}", "{j}", "{k}" stand for
# the same number on both sides and the rest of the key (weight, bias, running_mean, ...) is
# kept. The first rule whose prefix matches wins, in both directions; a key no rule matches
# keeps its name, so that the strict load names it as unexpected.
Rule = tuple[str, str]


def _conv_norm(project: str, source: str, conv: str, norm: str) -> list[Rule]:
    """The conv (".0.") and norm (".1.") of one of this project's conv-GN-ReLU blocks."""
    return [(project + "0.", source + conv), (project + "1.", source + norm)]


def _mmdet_like(head: str, towers: dict[str, str], outputs: dict[str, str]) -> list[Rule]:
    """mmdetection 1.x-3.x: torchvision's ResNet names under `backbone.`, ConvModule FPN
    (`.conv.`), ConvModule towers (`.conv.` / `.gn.`) under `head`."""
    rules = [
        ("backbone.net.fpn.inner_blocks.{i}.0.", "neck.lateral_convs.{i}.conv."),
        ("backbone.net.fpn.layer_blocks.{i}.0.", "neck.fpn_convs.{i}.conv."),
        ("backbone.net.body.", "backbone."),
    ]
    for ours, theirs in towers.items():
        rules += _conv_norm(f"head.{ours}.{{i}}.", f"{head}.{theirs}.{{i}}.", "conv.", "gn.")
    return rules + [(f"head{ours}", f"{head}{theirs}") for ours, theirs in outputs.items()]


MMDET_RULES = [
    *_mmdet_like(
        "mask_head",
        {
            "cate_convs": "cls_convs",
            "mask_convs": "mask_convs",
            "mask_convs_x": "mask_convs_x",
            "mask_convs_y": "mask_convs_y",
            "kernel_convs": "kernel_convs",
        },
        {
            ".cate_out.": ".conv_cls.",
            ".kernel_out.": ".conv_kernel.",
            ".mask_out.{i}.": ".conv_mask_list.{i}.",
            ".mask_out_x.{i}.": ".conv_mask_list_x.{i}.",
            ".mask_out_y.{i}.": ".conv_mask_list_y.{i}.",
        },
    ),
    *_conv_norm(
        "head.mask_feat_branch.level_convs.{i}.{j}.",
        "mask_head.mask_feature_head.convs_all_levels.{i}.conv{j}.",
        "conv.",
        "gn.",
    ),
    *_conv_norm(
        "head.mask_feat_branch.out.", "mask_head.mask_feature_head.conv_pred.", "conv.", "gn."
    ),
]
# WXinlong/SOLO: SOLO and SOLOv2 call the category output `solo_cate`, Decoupled SOLO
# `dsolo_cate` (AUTHORS_DECOUPLED_RULES, tried first for a decoupled model's keys).
AUTHORS_RULES = [
    *_mmdet_like(
        "bbox_head",
        {
            "cate_convs": "cate_convs",
            "mask_convs": "ins_convs",
            "mask_convs_x": "ins_convs_x",
            "mask_convs_y": "ins_convs_y",
            "kernel_convs": "kernel_convs",
        },
        {
            ".cate_out.": ".solo_cate.",
            ".kernel_out.": ".solo_kernel.",
            ".mask_out.{i}.": ".solo_ins_list.{i}.",
            ".mask_out_x.{i}.": ".dsolo_ins_list_x.{i}.",
            ".mask_out_y.{i}.": ".dsolo_ins_list_y.{i}.",
        },
    ),
    ("head.cate_out.", "bbox_head.dsolo_cate."),
    *_conv_norm(
        "head.mask_feat_branch.level_convs.{i}.{j}.",
        "mask_feat_head.convs_all_levels.{i}.conv{j}.",
        "conv.",
        "gn.",
    ),
    *_conv_norm("head.mask_feat_branch.out.", "mask_feat_head.conv_pred.0.", "conv.", "gn."),
]
AUTHORS_DECOUPLED_RULES = [("head.cate_out.", "bbox_head.dsolo_cate.")]

# detectron2: stages res2..res5 = layer1..layer4, FPN levels 2..5 = torchvision's 0..3, and
# AdelaiDet's towers are flat Sequentials (conv 3k, GN 3k+1, ReLU 3k+2) where this project
# nests them (k.0, k.1), so these rules are spelled out per stage, level and tower conv.
MAX_TOWER_CONVS = 8


def _detectron2_stage(stage: int) -> list[Rule]:
    """torchvision's layer{stage} <-> detectron2's res{stage + 1}: conv k / its norm, shortcut."""
    ours, theirs = (
        f"backbone.net.body.layer{stage}.{{i}}.",
        f"backbone.bottom_up.res{stage + 1}.{{i}}.",
    )
    return [
        (ours + "bn{j}.", theirs + "conv{j}.norm."),
        (ours + "conv{j}.", theirs + "conv{j}."),
        (ours + "downsample.1.", theirs + "shortcut.norm."),
        (ours + "downsample.0.", theirs + "shortcut."),
    ]


ADELAIDET_RULES = [
    ("backbone.net.body.bn1.", "backbone.bottom_up.stem.conv1.norm."),
    ("backbone.net.body.conv1.", "backbone.bottom_up.stem.conv1."),
    *[rule for stage in range(1, 5) for rule in _detectron2_stage(stage)],
    *[(f"backbone.net.fpn.inner_blocks.{n}.0.", f"backbone.fpn_lateral{n + 2}.") for n in range(4)],
    *[(f"backbone.net.fpn.layer_blocks.{n}.0.", f"backbone.fpn_output{n + 2}.") for n in range(4)],
    *[
        (f"head.{ours}.{k}.{part}.", f"ins_head.{theirs}.{3 * k + part}.")
        for ours, theirs in (("cate_convs", "cate_tower"), ("kernel_convs", "kernel_tower"))
        for k in range(MAX_TOWER_CONVS)
        for part in (0, 1)
    ],
    ("head.cate_out.", "ins_head.cate_pred."),
    ("head.kernel_out.", "ins_head.kernel_pred."),
    ("head.mask_feat_branch.level_convs.{i}.{j}.", "mask_head.convs_all_levels.{i}.conv{j}."),
    ("head.mask_feat_branch.out.", "mask_head.conv_pred."),
]
RULES: dict[str, list[Rule]] = {
    "mmdet": MMDET_RULES,
    "solo_authors": AUTHORS_RULES,
    "adelaidet": ADELAIDET_RULES,
    "project": [],
}
# Key prefixes that tell the layouts apart (in `detect_format`'s order of checks).
SIGNATURES = {
    "adelaidet": ("backbone.bottom_up.", "ins_head."),
    "solo_authors": ("bbox_head.",),
    "mmdet": ("mask_head.",),
}

# --------------------------------------------------------------------------------------------
# pure functions: the file's layout
# --------------------------------------------------------------------------------------------


def _first_keys(keys, n: int = 4) -> str:
    keys = list(keys)
    shown = ", ".join(repr(str(k)) for k in keys[:n])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > n else shown or "none"


def weights_of(state) -> dict[str, Tensor]:
    """The weights a loaded file holds: its "state_dict" (mmdetection) or "model"
    (detectron2, this project), or the file itself when it is a bare state dict; DataParallel's
    `module.` prefix removed. Not a dict of tensors: {}."""
    if not isinstance(state, Mapping):
        return {}
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), Mapping):
            state = state[key]
            break
    return {str(k).removeprefix("module."): v for k, v in state.items() if isinstance(v, Tensor)}


def detect_format(state, path) -> str:
    """The layout (a key of FORMATS) of `state`, what torch.load returned for `path`.

    This project's checkpoint is told by its keys (config, model, class_names); a released
    file by its weights' prefixes (`SIGNATURES`), with or without `module.`. Anything else is
    one ModelFileError naming the file and its first keys.
    """
    if isinstance(state, Mapping) and {"config", "model", "class_names"} <= set(state):
        return "project"
    weights = weights_of(state)
    for fmt, prefixes in SIGNATURES.items():
        if any(k.startswith(prefixes) for k in weights):
            return fmt
    if not isinstance(state, Mapping):
        what = f"holds a {type(state).__name__}"
    elif weights and all(k.startswith(("backbone.net.", "head.")) for k in weights):
        what = (
            "holds this project's weights without the config they were trained with "
            f"(keys {_first_keys(weights)})"
        )
    else:
        what = f"has keys {_first_keys(weights or state)}"
    raise ModelFileError(
        f"{path}: not a SOLO checkpoint layout this project reads: it {what}; expected "
        "mmdetection 2.x/3.x (backbone., neck., mask_head.), WXinlong/SOLO (bbox_head.), "
        "AdelaiDet (backbone.bottom_up., ins_head.) or a checkpoint of main_train.py "
        "(config, model, class_names)"
    )


# --------------------------------------------------------------------------------------------
# pure functions: key maps
# --------------------------------------------------------------------------------------------


@functools.cache
def _prefix_regex(template: str) -> re.Pattern:
    """A rule's prefix template as a regex: literal text, "{name}" a number (named group)."""
    parts = re.split(r"\{(\w+)\}", template)  # literal, name, literal, name, ...
    pattern = "".join(
        re.escape(part) if n % 2 == 0 else rf"(?P<{part}>\d+)" for n, part in enumerate(parts)
    )
    return re.compile(pattern)


def rename_key(key: str, rules: list[Rule], to_project: bool = True) -> str:
    """`key` under the first matching rule (layout -> project, or back); unchanged if none."""
    src, dst = (1, 0) if to_project else (0, 1)
    for rule in rules:
        found = _prefix_regex(rule[src]).match(key)
        if found:
            return rule[dst].format(**found.groupdict()) + key[found.end() :]
    return key


def _renamed(state: Mapping[str, Tensor], rules: list[Rule], to_project: bool, what: str):
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        new = rename_key(key, rules, to_project)
        if new in out:
            raise ModelFileError(f"{what}: two keys map onto {new!r} (one is {key!r})")
        out[new] = value
    return out


def to_project_keys(state: Mapping[str, Tensor], fmt: str) -> dict[str, Tensor]:
    """`state` (weights under layout `fmt`'s names, `module.` removed) under this project's
    names, one to one, the same tensors. A key no rule knows keeps its name."""
    return _renamed(state, RULES[fmt], True, FORMATS[fmt])


def from_project_keys(state: Mapping[str, Tensor], fmt: str) -> dict[str, Tensor]:
    """The inverse of `to_project_keys`: this project's weights under layout `fmt`'s names
    (for the tests' files in each layout and for `fill_project_model`)."""
    rules = RULES[fmt]
    if fmt == "solo_authors" and any(k.startswith("head.mask_out_x.") for k in state):
        rules = AUTHORS_DECOUPLED_RULES + rules
    return _renamed(state, rules, False, FORMATS[fmt])


def fold_detectron2_input(conv1_weight: Tensor) -> Tensor:
    """detectron2's first conv (out, 3, 7, 7), made for BGR 0..255 minus its pixel mean (std 1),
    as the first conv of this project's input (RGB, (x / 255 - mean) / std, conventions.py).

    The two inputs differ by a per-channel factor and the channel order: x_d2[2 - c] =
    255 std_c x_ours[c] (the means agree: 255 x IMAGENET_MEAN is detectron2's PIXEL_MEAN), and
    a conv without bias is linear, so scaling and reordering its input channels is exact (the
    zero padding is zero in both)."""
    mean_rgb = torch.tensor(DETECTRON2_PIXEL_MEAN_BGR[::-1], dtype=torch.float64)
    if not torch.allclose(mean_rgb, 255 * torch.tensor(IMAGENET_MEAN, dtype=torch.float64)):
        raise ValueError("detectron2's pixel mean is not 255 x IMAGENET_MEAN: cannot fold it")
    std_rgb = torch.tensor(DETECTRON2_PIXEL_STD_BGR[::-1], dtype=torch.float64)
    scale = 255.0 * torch.tensor(IMAGENET_STD, dtype=torch.float64) / std_rgb  # (3,)
    folded = conv1_weight.double().flip(1) * scale.view(1, 3, 1, 1)  # BGR -> RGB inputs
    return folded.to(conv1_weight.dtype)


def to_project_state(state: Mapping[str, Tensor], fmt: str) -> dict[str, Tensor]:
    """`to_project_keys`, and the one value this project computes differently: AdelaiDet's
    first conv (`fold_detectron2_input`)."""
    out = to_project_keys(state, fmt)
    if fmt == "adelaidet" and "backbone.net.body.conv1.weight" in out:
        out["backbone.net.body.conv1.weight"] = fold_detectron2_input(
            out["backbone.net.body.conv1.weight"]
        )
    return out


# --------------------------------------------------------------------------------------------
# pure functions: the released model's config
# --------------------------------------------------------------------------------------------


def _indices(weights: Mapping[str, Tensor], prefix: str) -> list[int]:
    """The distinct numbers n of keys `prefix` + "n." (tower convs, blocks), sorted."""
    found = {int(m[1]) for k in weights if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return sorted(found)


def _shape(weights: Mapping[str, Tensor], key: str, what: str) -> tuple[int, ...]:
    if key not in weights:
        raise ModelFileError(f"{what}: has no {key!r} (under this project's names)")
    return tuple(weights[key].shape)


def head_kind(weights: Mapping[str, Tensor]) -> str:
    """config.MODELS entry of the head in project-named `weights`, or "" for none."""
    if "head.kernel_out.weight" in weights:
        return "solov2"
    if "head.mask_out_x.0.weight" in weights:
        shared_tower = "head.mask_convs_x.0.0.weight" not in weights
        return "decoupled_solo_light" if shared_tower else "decoupled_solo"
    if "head.mask_out.0.weight" in weights:
        return "solo"
    return ""


def resnet_depth(weights: Mapping[str, Tensor], what: str) -> int:
    """ResNet depth from the blocks per stage of project-named `weights` (18/34/50/101).

    Grouped 3x3 convs (ResNeXt) and other block counts are a ModelFileError."""
    body = "backbone.net.body."
    blocks = tuple(len(_indices(weights, f"{body}layer{s}.")) for s in range(1, 5))
    bottleneck = f"{body}layer1.0.conv3.weight" in weights
    for key, value in weights.items():
        if key.startswith(body) and key.endswith("conv2.weight") and value.dim() == 4:
            out_ch, in_per_group = value.shape[:2]
            if bottleneck and out_ch != in_per_group:
                raise ModelFileError(
                    f"{what}: a ResNeXt backbone (grouped 3x3 convs: {key} {tuple(value.shape)})"
                    "; ResNeXt models are not supported, only ResNet-18/34/50/101"
                )
    depth = RESNET_BLOCKS.get((*blocks, bottleneck))
    if depth is None:
        kind = "bottleneck" if bottleneck else "basic"
        raise ModelFileError(
            f"{what}: a ResNet with {blocks} {kind} blocks per stage; supported are "
            "ResNet-18/34/50/101 (torchvision's)"
        )
    return depth


def strides_in_1x1(fmt: str, depth: int) -> bool:
    """Whether a file in layout `fmt` of a ResNet-`depth` has its ResNet strides in the 1x1
    convs: AdelaiDet's bottleneck ResNets (detectron2's STRIDE_IN_1X1)."""
    return fmt == "adelaidet" and depth >= 50


def released_config(state, fmt: str, path) -> Config:
    """The architecture and test settings of the released model `state` (what torch.load
    returned for `path`, in layout `fmt`) holds, as this project's Config.

    Read off the keys and shapes: the head (SOLO, Decoupled SOLO, its light variant, SOLOv2;
    SOLOv2 with 2 tower convs is SOLOv2-light), ResNet depth (blocks per stage), FPN width,
    tower width and depth, grids (SOLO: S^2 mask channels per level; Decoupled SOLO: S),
    E (the kernel output's channels) and the mask-feature branch's width. Not in the weights,
    taken from the released configs: SOLOv2's grids (`RELEASED_SOLOV2_GRIDS`), the scale ranges
    and test input per model, the post-processing (`RELEASED_TEST`). Backbone batch norm is
    frozen (the released models keep it in eval mode). A checkpoint of this project gives
    its stored config. ResNeXt, DCN and unknown heads are a ModelFileError.
    """
    if fmt == "project":
        try:
            return config_of(state)
        except (TypeError, ValueError) as err:
            raise ModelFileError(
                f"{path}: its stored config does not fit this code: {err}"
            ) from err
    what = f"{path} ({FORMATS[fmt]})"
    source = weights_of(state)
    deformable = [k for k in source if "offset" in k]
    if deformable:
        raise ModelFileError(
            f"{what}: has deformable convolutions (DCN: {deformable[0]!r}, {len(deformable)} "
            "offset tensors); DCN models are not supported (no deformable conv here)"
        )
    weights = to_project_keys(source, fmt)
    model = head_kind(weights)
    if not model:
        raise ModelFileError(
            f"{what}: no SOLO, Decoupled SOLO or SOLOv2 head in its keys "
            f"({_first_keys(k for k in source if not k.startswith(('backbone.', 'neck.')))})"
        )
    tower = "head.cate_convs."
    depth = resnet_depth(weights, what)
    settings = dict(
        depth=depth,
        stride_in_1x1=strides_in_1x1(fmt, depth),
        fpn_channels=_shape(weights, "backbone.net.fpn.inner_blocks.0.0.weight", what)[0],
        seg_feat_channels=_shape(weights, tower + "0.0.weight", what)[0],
        stacked_convs=len(_indices(weights, tower)),
    )
    if model == "solo":
        squares = [_shape(weights, f"head.mask_out.{lvl}.weight", what)[0] for lvl in range(5)]
        grids = tuple(math.isqrt(n) for n in squares)
        if [s * s for s in grids] != squares:
            raise ModelFileError(f"{what}: SOLO mask outputs of {squares} channels, not S^2")
    elif model.startswith("decoupled"):
        grids = tuple(_shape(weights, f"head.mask_out_x.{lvl}.weight", what)[0] for lvl in range(5))
    else:
        grids = RELEASED_SOLOV2_GRIDS
        settings["kernel_channels"] = _shape(weights, "head.kernel_out.weight", what)[0]
        feat = "head.mask_feat_branch.level_convs.0.0.0.weight"
        settings["mask_feat_channels"] = _shape(weights, feat, what)[0]
        if settings["stacked_convs"] == 2:
            model = "solov2_light"
    recipe = model if model in RELEASED_INPUT else "full"
    cfg = dataclasses.replace(
        model_config(CIS680, model),
        **settings,
        num_grids=grids,
        strides=(8, 8, 16, 32, 32),
        scale_ranges=RELEASED_SCALE_RANGES[recipe],
        input_size=RELEASED_INPUT[recipe],
        epsilon=0.2,
        mask_loss_stride=4,
        norm="frozen_bn",
        backbone_weights="",
        backbone_width=64,
        cis680_classes=False,  # its classes are COCO's 80: COCO data keeps its categories
        preset="released",  # for the record, and main_infer evaluates every image with it
        **RELEASED_TEST,
    )
    return validate(cfg)


def released_class_names(state, num_classes: int) -> tuple[str, ...]:
    """Class names of a released file: its meta's (mmdetection 3.x dataset_meta.classes, 2.x
    and 1.x CLASSES) when they fit `num_classes`, else the 80 COCO names for 80 outputs, else
    "class_1", "class_2", ..."""
    meta = state.get("meta") if isinstance(state, Mapping) else None
    names = None
    if isinstance(meta, Mapping):
        dataset_meta = meta.get("dataset_meta")
        names = dataset_meta.get("classes") if isinstance(dataset_meta, Mapping) else None
        names = names if names is not None else meta.get("CLASSES")
    if isinstance(names, (list, tuple)) and len(names) == num_classes:
        names = tuple(str(n) for n in names)
        return COCO_CLASSES if is_coco(names) else names  # mmdet 1.x: "traffic_light"
    if num_classes == len(COCO_CLASSES):
        return COCO_CLASSES
    return tuple(f"class_{k + 1}" for k in range(num_classes))


def class_key(name: str) -> str:
    """A class name as compared across files: lower case, "_" as a space. mmdetection 1.x
    (and so the authors' WXinlong/SOLO files) spells COCO's "traffic light" "traffic_light"."""
    return " ".join(str(name).replace("_", " ").lower().split())


def class_positions(class_names: Sequence[str]) -> dict[str, int]:
    """`class_key` -> the position of the first name with that key in `class_names`."""
    positions: dict[str, int] = {}
    for k, name in enumerate(class_names):
        positions.setdefault(class_key(name), k)
    return positions


def is_coco(class_names: Sequence[str]) -> bool:
    """Whether `class_names` are COCO's 80 categories in COCO's order (as `class_key`s)."""
    return [class_key(n) for n in class_names] == [class_key(n) for n in COCO_CLASSES]


def category_ids(class_names: Sequence[str]) -> dict[int, int]:
    """label (1..C) -> the category id a results file gives it when no annotation file says:
    COCO's own ids (COCO_CATEGORY_IDS, 1..90) for a model of the 80 COCO classes (a released
    model, or one fine-tuned keeping them all), else the label itself."""
    if is_coco(class_names):
        return dict(enumerate(COCO_CATEGORY_IDS, start=1))
    return {k: k for k in range(1, len(class_names) + 1)}


# --------------------------------------------------------------------------------------------
# pure functions: the deterministic fill and the reference image
# --------------------------------------------------------------------------------------------

# Output biases of the fill. Category: with the towers' unit-variance GroupNorm features the
# category logits spread with a std near 0.7, so a bias of -3.3 lets a few entries in a
# hundred pass score 0.1 (logit -2.2): on the reference image 1.5-3 % of the C x S^2 entries
# of a level after point NMS (tests/data/mmdet_reference/, "num_above_score_thr").
# Masks: shifted down so that a mask covers a part of the image rather than most of it (SOLO's
# mask logits spread with a std near 0.6, and -0.8 still left final masks of 10 % of the image
# and more; Decoupled SOLO's mask is a product of two sigmoids; SOLOv2's kernel bias b adds
# b x sum(features), about b x 0.4 E, so -5 / E shifts its logits by about -2), which also keeps
# the reference files' RLE small.
FILL_CATE_BIAS = -3.3
FILL_SOLO_MASK_BIAS = -1.6
FILL_DECOUPLED_MASK_BIAS = -0.4
FILL_KERNEL_BIAS_TIMES_E = -5.0
CATE_OUTPUTS = re.compile(r"(conv_cls|solo_cate|dsolo_cate|cate_pred|cate_out)\.bias$")
KERNEL_OUTPUTS = re.compile(r"(conv_kernel|solo_kernel|kernel_pred|kernel_out)\.(weight|bias)$")
SOLO_MASK_OUTPUTS = re.compile(r"(conv_mask_list|solo_ins_list|mask_out)\.\d+\.bias$")
DECOUPLED_MASK_OUTPUTS = re.compile(r"(conv_mask_list|dsolo_ins_list|mask_out)_[xy]\.\d+\.bias$")


def _seed_of(name: str, seed: int) -> int:
    """A 63-bit seed from the key name and `seed` (sha256: the same in every process, unlike
    Python's salted hash())."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def fill_tensor(name: str, shape, seed: int = 0) -> Tensor:
    """A deterministic value for the parameter or buffer `name` (the layout's key) of `shape`.

    Made to keep a random network's forward pass sensitive to every weight:
    - conv weights (4-D) N(0, 1/fan_in), so activations keep their scale layer to layer;
      SOLOv2's kernel output N(0, 8 / (E fan_in)), so the dynamic masks' logits spread with a
      std near 2 rather than saturating;
    - batch-norm running mean N(0, 0.1^2), running var U(0.5, 1.5) (> 0);
    - norm weights (1-D "weight") 1 + U(-0.1, 0.1), biases U(-0.1, 0.1); the output convs'
      biases shifted (FILL_CATE_BIAS: some cells pass score 0.1; the mask outputs': masks
      that cover a part of the image);
    - num_batches_tracked 0 (int64).
    """
    shape = tuple(int(s) for s in shape)
    if name.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=torch.int64)
    gen = torch.Generator().manual_seed(_seed_of(name, seed))
    if name.endswith("running_mean"):
        return 0.1 * torch.randn(shape, generator=gen)
    if len(shape) == 4:
        fan_in = shape[1] * shape[2] * shape[3]
        variance = 8.0 / (shape[0] * fan_in) if KERNEL_OUTPUTS.search(name) else 1.0 / fan_in
        return math.sqrt(variance) * torch.randn(shape, generator=gen)
    uniform = torch.rand(shape, generator=gen) * 2 - 1  # U(-1, 1)
    if name.endswith("running_var"):
        return 1.0 + 0.5 * uniform
    if CATE_OUTPUTS.search(name):
        return FILL_CATE_BIAS + 0.25 * uniform
    if KERNEL_OUTPUTS.search(name):
        return FILL_KERNEL_BIAS_TIMES_E / shape[0] * (1.0 + 0.1 * uniform)
    if SOLO_MASK_OUTPUTS.search(name):
        return FILL_SOLO_MASK_BIAS + 0.1 * uniform
    if DECOUPLED_MASK_OUTPUTS.search(name):
        return FILL_DECOUPLED_MASK_BIAS + 0.1 * uniform
    if name.endswith("weight"):
        return 1.0 + 0.1 * uniform
    return 0.1 * uniform


def reference_config(record: Mapping) -> Config:
    """The config of a tests/data/mmdet_reference record's model: `released_config` from the
    mmdetection key shapes the record stores (no weights needed)."""
    shapes = {k: torch.empty(s, device="meta") for k, s in record["state_dict_shapes"].items()}
    return released_config({"state_dict": shapes}, "mmdet", record["model"])


def fill_project_model(model: nn.Module, fmt: str = "mmdet", seed: int = 0) -> None:
    """Fill this project's `model` with `fill_tensor` of each tensor's name in layout `fmt`,
    as loading a file of that layout filled with it would (`to_project_state`): the weights
    mmdetection's model gets from tools/make_mmdet_reference.py with the same seed."""
    own = model.state_dict()
    source = {}
    for key, name in zip(own, from_project_keys(own, fmt), strict=True):
        source[name] = fill_tensor(name, own[key].shape, seed).to(own[key].dtype)
    model.load_state_dict(to_project_state(source, fmt), strict=True)


def reference_image(h: int = 800, w: int = 1216) -> np.ndarray:
    """A fixed constructed RGB image (h, w, 3) uint8: colour gradients, discs, boxes, a
    triangle and stripes, placed relative to the size (numpy only, no randomness).

    The default 800 x 1216 needs no resize at 1333 x 800 keep-ratio (the short side is 800
    and 1216 < 1333) and no padding at size divisor 32; for the light models' test inputs
    (852, 512) and (768, 448), 512 x 832 and 448 x 768 do the same.
    """
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    u, v = xs / max(w - 1, 1), ys / max(h - 1, 1)  # (h, w) in [0, 1]
    img = np.stack([60 + 120 * u, 80 + 100 * v, 170 - 110 * u * v], axis=-1)  # (h, w, 3)
    img += 12 * np.sin(2 * np.pi * (6 * u + 3 * v))[..., None]  # a wave texture
    shapes = [
        ((u - 0.22) ** 2 / 0.012 + (v - 0.3) ** 2 / 0.03 < 1, (230, 40, 40)),  # ellipse
        ((u - 0.7) ** 2 + ((v - 0.65) * h / w) ** 2 < 0.018, (30, 200, 60)),  # disc
        ((abs(u - 0.45) < 0.08) & (abs(v - 0.72) < 0.18), (250, 220, 30)),  # box
        ((abs(u - 0.85) < 0.06) & (abs(v - 0.2) < 0.1), (20, 20, 20)),  # small box
        ((v > 0.45) & (v < 0.95) & (abs(u - 0.12) < 0.5 * (v - 0.45)), (140, 60, 200)),  # triangle
        ((u > 0.55) & (u < 0.95) & (v > 0.05) & (v < 0.4) & (np.sin(40 * u) > 0), (255,) * 3),
    ]  # fmt: skip
    for mask, colour in shapes:
        img[mask] = colour
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def read_released(path) -> object:
    """What torch.load(weights_only=True) gives for `path`; a missing file is a
    FileNotFoundError, anything torch.load cannot read or refuses one ModelFileError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # whatever the bytes made torch.load raise
        forbidden = re.search(r"GLOBAL (\S+)", str(err))
        if forbidden:
            reason = (
                f"refused: its pickle asks for {forbidden.group(1)}, which no checkpoint "
                "needs (read with weights_only=True, so nothing was executed)"
            )
        else:
            what = " ".join(str(err).split())[:200]  # torch's several lines, as one
            reason = f"torch.load cannot read it ({type(err).__name__}: {what})"
        raise ModelFileError(
            f"{path}: {reason}; expected a released SOLO / SOLOv2 .pth or this project's .pt"
        ) from err


def _few(items: list[str], n: int = 4) -> str:
    shown = ", ".join(items[:n])
    return f"{len(items)} ({shown}{', ...' if len(items) > n else ''})"


def load_strict(
    model: nn.Module, weights: Mapping[str, Tensor], fmt: str, path, source_name=None
) -> None:
    """`model.load_state_dict(weights)` with every mismatch in one ModelFileError: the layout
    the file was read as, and the missing, unexpected and mis-shaped keys (a few of each, with
    counts) under the file's own names (`source_name` maps a project key to it). The batch
    norm counters (`num_batches_tracked`) of a model with frozen batch norm are dropped."""
    name = source_name or (lambda key: key)
    expected = model.state_dict()
    weights = {
        k: v for k, v in weights.items() if k in expected or not k.endswith(".num_batches_tracked")
    }
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    misshaped = [
        k for k in weights if k in expected and tuple(weights[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or misshaped:
        problems = []
        if missing:
            problems.append("missing " + _few([f"{name(k)!r} (ours {k})" for k in missing]))
        if unexpected:
            problems.append("unexpected " + _few([repr(name(k)) for k in unexpected]))
        if misshaped:
            problems.append(
                "mis-shaped "
                + _few(
                    [
                        f"{name(k)!r} {tuple(weights[k].shape)} for {tuple(expected[k].shape)}"
                        for k in misshaped
                    ]
                )
            )
        raise ModelFileError(
            f"{path}: read as {FORMATS[fmt]}, but its weights do not fit the model built for "
            f"it: {'; '.join(problems)}"
        )
    model.load_state_dict(weights, strict=True)


def build_released(state, fmt: str, path) -> tuple[SOLOModel, tuple[str, ...], Config]:
    """(model in eval mode, class names, config) from a loaded file `state` in layout `fmt`."""
    cfg = released_config(state, fmt, path)
    if fmt == "project":
        class_names = tuple(state["class_names"])
        weights = weights_of(state)
    else:
        weights = to_project_state(weights_of(state), fmt)
        class_names = released_class_names(state, int(weights["head.cate_out.bias"].shape[0]))
    model = build_model(cfg, num_classes=len(class_names))
    rules = RULES[fmt]
    load_strict(model, weights, fmt, path, lambda key: rename_key(key, rules, to_project=False))
    return model.eval(), class_names, cfg


def load_released(path) -> tuple[SOLOModel, tuple[str, ...], Config]:
    """A released SOLO / Decoupled SOLO / SOLOv2 file, or this project's checkpoint, as
    (model in eval mode on the CPU, class names, config); see the module docstring."""
    state = read_released(path)
    return build_released(state, detect_format(state, path), path)


# --------------------------------------------------------------------------------------------
# fine-tuning: a new run that starts from a file's weights (main_train.py --init-from)
# --------------------------------------------------------------------------------------------


def finetune_lr_steps(epochs: int) -> tuple[int, int]:
    """The step schedule's epochs (1-based, `Config.lr_steps`) for a fine-tuning run of
    `epochs`: where mmdetection's 1x schedule steps, after 8 and 11 of 12 epochs, scaled.

    >>> finetune_lr_steps(12), finetune_lr_steps(4)
    ((9, 12), (4, 5))
    """
    return round(epochs * 8 / 12) + 1, round(epochs * 11 / 12) + 1


def finetune_source(path) -> tuple[object, str, Config]:
    """(what torch.load gave, its layout, its config) for the --init-from `path`: a released
    file, this project's checkpoint or a run folder (its last.pt)."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    state = read_released(path)
    fmt = detect_format(state, path)
    cfg = released_config(state, fmt, path)
    return state, fmt, cfg


def finetune_config(cfg: Config, given: Collection[str] = ()) -> Config:
    """`cfg` for a run that starts from the weights of `cfg.init_from` (`cfg` itself without
    one): every field of `FINETUNE_FROM_FILE` and `FINETUNE_SCHEDULE` not named in `given`
    (the flags the user gave, `config.config_and_given`) comes from the file and the schedule.

    - The architecture, the input size and the test settings are the file's (a released
      file's, `released_config`, or a checkpoint's own); an `input_size` given without
      `scale_ranges` rescales the file's ranges (as `config.model_config` does).
    - `norm` frozen_bn: the file's batch-norm statistics stay as trained, as with ImageNet
      weights (a GroupNorm backbone of this project keeps gn: it has no statistics).
    - `cis680_classes` off: COCO-json data keeps its own categories (the hand-out's mapping
      onto vehicle / person / animal would drop the rest, and `keep_classes` goes by name).
    - The schedule `FINETUNE_SCHEDULE`, lr `FINETUNE_LR_PER_16` x batch / 16 and the steps of
      `finetune_lr_steps(epochs)`, given values kept.
    """
    if not cfg.init_from:
        return cfg
    _, _, source = finetune_source(cfg.init_from)
    changes = {name: getattr(source, name) for name in FINETUNE_FROM_FILE if name not in given}
    if "input_size" in given and "scale_ranges" not in given:
        changes["scale_ranges"] = scale_ranges_for(
            source.scale_ranges, source.input_size, cfg.input_size
        )
    if "norm" not in given:
        changes["norm"] = "gn" if source.norm == "gn" else "frozen_bn"
    if "cis680_classes" not in given:  # a COCO json keeps its own categories' names
        changes["cis680_classes"] = False
    changes |= {name: value for name, value in FINETUNE_SCHEDULE.items() if name not in given}
    tuned = dataclasses.replace(cfg, **changes)
    scaled = {
        "lr": FINETUNE_LR_PER_16 * tuned.batch_size / 16,
        "lr_steps": finetune_lr_steps(tuned.epochs),
    }
    scaled = {name: value for name, value in scaled.items() if name not in given}
    return validate(dataclasses.replace(tuned, **scaled))


def class_rows(file_names: Sequence[str], class_names: Sequence[str], path) -> list[int]:
    """The file's category rows of `class_names`, in their order (`--keep-classes`): label k of
    the data is output channel rows[k - 1] of the file; names compare as `class_key`s (case
    and "_" against " " aside). A name the file lacks is one DataError listing the missing
    names and a few of the file's."""
    rows = class_positions(file_names)
    missing = [name for name in class_names if class_key(name) not in rows]
    if missing:
        raise DataError(
            f"{path}: --keep-classes needs each class of the data among the file's "
            f"{len(file_names)} classes, and {', '.join(map(repr, missing))} are not (the file "
            f"has {_few([repr(n) for n in file_names], 6)}); rename the data's classes to the "
            "file's names or leave out --keep-classes"
        )
    return [rows[class_key(name)] for name in class_names]


def freeze_pretrained_stages(model: SOLOModel) -> None:
    """Freeze the ResNet stages that do not train when fine-tuning (the stem and layer1,
    `FINETUNE_TRAINABLE_LAYERS`), on a new and a resumed run alike: the optimiser's
    parameters must be the ones its checkpoint saved."""
    freeze_layers(model.backbone.net.body, FINETUNE_TRAINABLE_LAYERS)


def init_from_file(
    model: SOLOModel, path, keep_classes: bool = False, class_names: Sequence[str] = ()
) -> list[str]:
    """Load the weights of `path` (as `finetune_source` reads it) into `model`, built for
    `class_names`; returns the layers left as the model initialised them.

    Every tensor maps strictly as in `load_strict`, but the category output conv
    (`head.cate_out`, C x D x 3 x 3): without `keep_classes` it keeps the head's own init
    (normal(0, 0.01), bias at the focal prior -log(99)), since the data's label k is not the
    file's; with `keep_classes` it takes the file's rows of `class_names` (`class_rows`).
    Trainable batch norm (a given --norm bn) gets its own zero counters where the file has
    none. A tensor of another shape (a flag that changed the architecture) is one
    ModelFileError naming the keys.
    """
    state, fmt, _ = finetune_source(path)
    if fmt == "project":
        weights = dict(weights_of(state))
        file_names = tuple(str(name) for name in state["class_names"])
    else:
        weights = to_project_state(weights_of(state), fmt)
        num_outputs = int(_shape(weights, "head.cate_out.bias", f"{path} ({FORMATS[fmt]})")[0])
        file_names = released_class_names(state, num_outputs)
    own = model.state_dict()
    category = [key for key in own if key.startswith("head.cate_out.")]  # weight, bias
    reinitialised = []
    if keep_classes:
        rows = class_rows(file_names, class_names, path)
        for key in category:
            if key in weights:
                weights[key] = weights[key][rows]  # (C_file, ...) -> (C, ...)
    else:
        weights.update({key: own[key] for key in category})
        reinitialised.append("head.cate_out")
    for key in own:
        if key.endswith(".num_batches_tracked"):
            weights.setdefault(key, own[key])
    rules = RULES[fmt]
    try:
        load_strict(model, weights, fmt, path, lambda key: rename_key(key, rules, False))
    except ModelFileError as err:
        raise ModelFileError(
            f"{err}; a fine-tuning run takes its architecture from the file: leave out the "
            "flags that change it (--model, --depth, --fpn-channels, ...)"
        ) from err
    return reinitialised
