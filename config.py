"""Every hyper-parameter of the project in one dataclass, its command-line flags, and the presets.

A default lives in exactly one place: the field of `Config`. `add_config_args` turns the fields
into `--flags` (`num_grids` -> `--num-grids 40 36 24 16 12`), `config_from_args` reads them back
on top of a preset (`config_and_given` also names the fields given, which `--init-from`'s
`zoo.finetune_config` leaves alone), and every checkpoint stores `asdict(config)` so that
resume and inference rebuild the model the run was trained with, not today's defaults.

Presets:
- `cis680`: the hand-out's recipe (ResNet-50 FPN 256, 800x1088, SGD 0.01 x batch/16, 36 epochs,
  lr / 10 at 27 and 33) with the authors' warm-up and gradient clipping. For a GPU.
- `cpu`: a small model and input that learns the built-in data set in minutes on a laptop CPU
  (see docs/cpu_preset.md for the measurements behind each choice).

Usage:
    cfg = preset("cpu")
    cfg = dataclasses.replace(cfg, epochs=2)
    cfg = model_config(CIS680, "solov2")  # another model: with its MODEL_DEFAULTS, as --model

Build a config for another model with `model_config`, not `dataclasses.replace(cfg, model=...)`:
`replace` keeps the preset's settings for the old model (SOLOv2 on cis680 would get SOLO's
towers and post-processing), so it builds another model than `--model` does.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Collection
from dataclasses import dataclass, fields

import torch

from backbone import check_settings
from errors import ConfigError

# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    # --- data ---
    data: str = "builtin"  # "builtin", a CIS680 file prefix (".../x" for x_img_comp_zlib.h5...)
    #                        or a COCO json (then --coco-images is its image folder)
    coco_images: str = ""  # image folder of a COCO json; default: "images" beside the json
    num_images: int = 400  # built-in data set: images generated (issue: a few hundred)
    data_seed: int = 0  # built-in data set: generator seed
    val_fraction: float = 0.2  # held-out share (hand-out: 80/20)
    split_seed: int = 0  # seed of the 80/20 split
    split_file: str = ""  # json {"train": [...], "val": [...]} of indices; overrides the split
    input_size: tuple[int, int] = (800, 1066)  # (h, w) resize before padding (hand-out);
    #                                             COCO data: (short side, long-side cap)
    pad_to: int = 32  # pad H, W up to a multiple of this (hand-out: 800x1066 -> 800x1088)
    cis680_classes: bool = True  # COCO data: map categories onto vehicle/person/animal
    augment: bool = True  # flip, colour jitter, scale, crop on the training split
    aug_scale: tuple[float, float] = (0.8, 1.2)  # random rescale range; (1, 1): no scale/crop
    aug_color: float = 0.2  # brightness and contrast factors in 1 +- this; 0: none
    overfit: int = 0  # >0: train on this many training images and evaluate on the same ones

    # --- model ---
    model: str = "solo"  # one of MODELS: solo, decoupled_solo, solov2, decoupled_solo_light,
    #                      solov2_light; `--model` also applies MODEL_DEFAULTS (see there):
    #                      in code, `model_config(preset, model)`, not `replace(model=...)`
    depth: int = 50  # ResNet depth: 10, 18, 34, 50, 101 (10: one block per stage, no weights)
    backbone_width: int = 64  # ResNet stem / first-stage channels, doubled per stage
    #                           (torchvision: 64; other widths train from scratch only)
    stride_in_1x1: bool = False  # ResNet-50/101: each stage's stride in its first 1x1 conv,
    #                              not the 3x3 (detectron2's MSRA ResNet: AdelaiDet's files)
    fpn_channels: int = 256  # FPN output channels (hand-out: 256)
    backbone_weights: str = ""  # "", "imagenet" (torchvision hub) or a local state-dict file
    norm: str = "auto"  # backbone norm: auto (frozen BN with weights, trainable BN without),
    #                     bn, frozen_bn, gn
    seg_feat_channels: int = 256  # head tower width (hand-out: 256); SOLOv2: kernel and
    #                               category towers (authors: 512, light 256)
    stacked_convs: int = 7  # head tower depth (hand-out: 7; SOLOv2 authors: 4, light 2)
    strides: tuple[int, ...] = (8, 8, 16, 32, 32)  # after NewFPN (hand-out)
    scale_ranges: tuple[tuple[int, int], ...] = (
        (1, 96),
        (48, 192),
        (96, 384),
        (192, 768),
        (384, 2048),
    )  # sqrt(w*h) in padded-input pixels per level (hand-out); `--input-size` without
    #    `--scale-ranges` scales them with the input (`scale_ranges_for`)
    num_grids: tuple[int, ...] = (40, 36, 24, 16, 12)  # S per level (hand-out)
    epsilon: float = 0.2  # centre-region scale (paper sec. 3.3.1, hand-out)
    mask_loss_weight: float = 3.0  # lambda in L = L_cate + lambda L_mask (paper, hand-out)
    focal_alpha: float = 0.25  # focal loss alpha (paper)
    focal_gamma: float = 2.0  # focal loss gamma (paper)
    focal_norm: str = "positives"  # "positives": sum / (num_pos + 1) (authors);
    #                                "entries": mean over S*S*C entries (hand-out)
    init: str = "authors"  # "authors": normal(0, 0.01), prior bias -log(99); "xavier": hand-out
    kernel_channels: int = 256  # SOLOv2: E, mask-feature channels = weights of one 1x1
    #                             dynamic kernel (authors: 256, light 128)
    mask_feat_channels: int = 128  # SOLOv2: width of the mask-feature branch (authors: 128)
    mask_loss_stride: int = 4  # SOLOv2: input pixels per pixel of the masks the dice loss
    #                            compares: 4 (authors, the mask features' stride), 2 or 1
    #                            (logits upsampled first; inference resizes logits)

    # --- post-processing (hand-out 6.10) ---
    cate_thresh: float = 0.2  # category score threshold
    ins_thresh: float = 0.5  # mask binarisation threshold
    pre_nms_num: int = 50  # candidates kept before Matrix NMS
    keep_instance: int = 5  # instances kept after Matrix NMS (hand-out: 5; COCO eval: 100)
    nms_kernel: str = "gaussian"  # Matrix NMS kernel: gaussian or linear
    nms_sigma: float = 2.0  # gaussian kernel sigma (authors' form exp(-sigma iou^2))
    update_thresh: float = 0.05  # drop decayed scores below this (authors)

    # --- optimisation (hand-out 7.1, authors' warm-up and clipping) ---
    optimizer: str = "sgd"  # sgd or adamw
    lr: float = 0.00125  # 0.01 x batch / 16 with batch 2 (hand-out)
    momentum: float = 0.9  # SGD momentum (hand-out)
    weight_decay: float = 1e-4  # (hand-out)
    batch_size: int = 2  # images per step (per process under torchrun)
    epochs: int = 36  # (hand-out)
    lr_schedule: str = "step"  # step: / 10 at lr_steps; cosine: to 0 over the run
    lr_steps: tuple[int, ...] = (27, 33)  # epochs where the step schedule divides lr by 10
    warmup_iters: int = 500  # linear warm-up over this many iterations (authors: 500)
    warmup_ratio: float = 1.0 / 3.0  # warm-up starts at lr x this (authors' SGD: 1/3)
    kernel_lr_mult: float = 1.0  # SOLOv2: lr multiplier of the dynamic-kernel output conv
    grad_clip: float = 35.0  # max gradient norm (authors); 0 disables
    time_budget_min: float = 0.0  # >0: stop training after this many minutes (CPU preset)
    amp: bool = True  # mixed precision: fp16 autocast on CUDA, bf16 on a CPU that runs bf16
    #                   natively (`training.cpu_has_native_bf16`), float32 elsewhere. It
    #                   replaces `cpu_bf16`: before, amp was CUDA's only and a CPU took bf16
    #                   from cpu_bf16 (the cpu preset's); now cis680 on such a CPU runs bf16
    #                   too, and --no-amp means float32 on the CPU as well
    num_workers: int = 2  # DataLoader workers
    cache_data: bool = False  # keep the preprocessed training samples in memory after their
    #                           first read (augmentation still runs on every read); with
    #                           num_workers 0 only (workers would each fill their own copy)
    seed: int = 0  # torch / numpy / python seeds
    device: str = "auto"  # auto, cpu, cuda
    log_every: int = 20  # iterations between logged loss points
    val_loss_images: int = 0  # >0: the per-epoch validation loss uses only this many
    #                           held-out images (the final AP always uses all of them)
    eval_at_min: tuple[float, ...] = ()  # also evaluate held-out AP after these minutes of
    #                                      the run (a learning curve; evaluation time excluded)
    out: str = "runs/solo"  # run folder: checkpoints, loss curves, results
    exist_ok: bool = False  # reuse the folder on purpose: a new run into an `out` that holds
    #                         a checkpoint otherwise goes to out2, out3, ... (as Ultralytics)
    preset: str = "auto"  # the preset this config started from (for the record)

    # --- fine-tuning (issue 18) ---
    init_from: str = ""  # a released SOLO / SOLOv2 .pth (any layout zoo.py reads) or this
    #                      project's checkpoint / run folder: a new run starts from its weights,
    #                      with its architecture and zoo.FINETUNE_SCHEDULE for every flag not
    #                      given (`zoo.finetune_config`); the category output is re-initialised
    keep_classes: bool = False  # with init_from: keep the file's category rows of the data's
    #                             class names (COCO's "person", "car", ...) instead


# --------------------------------------------------------------------------------------------
# presets
# --------------------------------------------------------------------------------------------

CIS680 = Config(preset="cis680")

# A small model for the CPU. It trains the backbone from scratch (no weights can be fetched),
# so its batch norm trains; the runs behind each choice: docs/cpu_preset.md (cited by section).
CPU = Config(
    preset="cpu",
    # SOLOv2: its masks come from one stride-4 feature map shared by all cells, and learn
    # far faster from scratch than SOLO's S^2 per-cell output channels (held-out AP 0.141
    # against SOLO's 0.054 in the same 17.5 minutes; SOLO's masks of large objects are also at
    # stride 16, 12 x 16 pixels at this input). See docs/cpu_preset.md, the bar and the runs.
    model="solov2",
    num_images=2500,
    input_size=(192, 256),
    depth=18,
    # ResNet-18 at half torchvision's width (stages 32, 64, 128, 256): 1.6x the training speed
    # of the full width, and in the same 5 minutes of training more held-out AP (0.089 after
    # 668 iterations against 0.067 after 493; width 48: 0.072, width 24: 0.087).
    # See docs/cpu_preset.md, round three.
    backbone_width=32,
    # FPN 64 channels (was 128): same AP after 500 iterations (0.075), epochs 20 % shorter
    # (docs/cpu_preset.md, round two).
    fpn_channels=64,
    seg_feat_channels=64,
    stacked_convs=2,
    num_grids=(24, 20, 16, 12, 8),
    scale_ranges=((1, 24), (12, 48), (24, 96), (48, 192), (96, 2048)),  # hand-out's x 0.24
    # The mask-feature branch at half the authors' width (64 channels, E = 128): at the same
    # iterations it learned as much (held-out AP 0.070 against 0.065 after 500) and trains
    # faster (docs/cpu_preset.md, round one).
    kernel_channels=128,
    mask_feat_channels=64,
    # The dice loss on the mask logits upsampled 2x (stride 2), and inference resizing logits:
    # the held-out ground truth itself scores only AP 0.51 through stride-4 masks, 0.73 through
    # stride-2 ones. Held-out AP 0.297 against 0.264 at stride 4 in the same 18 minutes;
    # stride 1 (the input's resolution) made each step 1.4x slower and reached 0.283.
    # See docs/cpu_preset.md, round four.
    mask_loss_stride=2,
    optimizer="adamw",
    # AdamW lr 3e-3 with SOLOv2's kernel output conv at lr x 0.25: held-out AP 0.325 in 18
    # minutes against 0.297 at lr 2e-3 (docs/cpu_preset.md, the learning rate again). lr 3e-3
    # alone stalls the mask loss (AP 0.033 after 500 iterations, docs/cpu_preset.md, round
    # one): Adam moves each of a dynamic kernel's weights by about lr, and the kernel sums
    # E = 128 of them.
    lr=3e-3,
    kernel_lr_mult=0.25,
    # AdamW's decoupled decay (norm layers and biases excluded): by the last epochs the
    # training loss fell well below the held-out one (0.57 against 0.80). Held-out AP
    # 0.330 / 0.340 / 0.355 with 1e-4 / 0.05 / 0.1 (docs/cpu_preset.md, weight decay).
    weight_decay=0.1,
    batch_size=8,
    # A cap above what the time budget fits (a run fitted 3000 iterations, 12 epochs, in 17.6
    # minutes and stopped there; docs/cpu_preset.md, the learning rate again): the budget, not
    # the epochs, ends the run.
    epochs=16,
    lr_schedule="cosine",
    # Flips only: measured when about four epochs fitted the budget, scale / crop / colour
    # jitter slowed learning (docs/cpu_preset.md, the bar and the runs). Now that 13 epochs
    # fit, the training loss ends well below the held-out one; weight decay closed part of
    # that gap, and augmentation has not been measured again.
    aug_scale=(1.0, 1.0),
    aug_color=0.0,
    warmup_iters=100,
    # Adam's first steps move every weight by about lr whatever the gradient's size; summed
    # over a 1x1 dynamic kernel's inputs that saturates every mask at once (measured: SOLOv2's
    # mask logits jumped from -2 to +28 in one step and its dice loss never moved again), so
    # the warm-up starts from almost zero (docs/cpu_preset.md, the warm-up).
    warmup_ratio=0.001,
    grad_clip=35.0,
    # Data generation and training; with the final evaluation and start-up 19:21 to 19:26
    # of wall time (docs/cpu_preset.md, round five), under the 20.
    time_budget_min=19.0,
    # Mixed precision (Config's default, said here for the record): bf16 autocast on a CPU that
    # runs it natively, 1.56x the float32 speed (docs/cpu_preset.md, training speed).
    amp=True,
    num_workers=0,
    # Reading and preprocessing a sample (HDF5 decompression, resizing) took about 7 ms, 10 %
    # of a training step; kept in memory it is read once (about 1.5 GB for 2,000 samples).
    cache_data=True,
    # The per-epoch validation loss on 100 of the 500 held-out images: about 3 s instead of
    # 16 s per epoch, about 75 s of the budget back for training (the final AP uses all 500).
    val_loss_images=100,
    cate_thresh=0.1,
    pre_nms_num=100,
    keep_instance=30,
    out="runs/solo_cpu",
)

PRESETS = {"cis680": CIS680, "cpu": CPU}

MODELS = ("solo", "decoupled_solo", "solov2", "decoupled_solo_light", "solov2_light")

# The light models' scale ranges (authors' SOLOv2-Light configs, for a 448-pixel short side).
LIGHT_SCALE_RANGES = ((1, 56), (28, 112), (56, 224), (112, 448), (224, 896))
# The authors' test_cfg for all their models (score_thr 0.1, nms_pre 500, max_per_img 100;
# update_thr 0.05 is already the default); SOLO keeps the hand-out's 0.2 / 50 / 5.
_AUTHORS_POSTPROCESS = {"cate_thresh": 0.1, "pre_nms_num": 500, "keep_instance": 100}
_LIGHT = {
    "seg_feat_channels": 256,  # 2 tower convs of 256 (SOLOv2-Light)
    "stacked_convs": 2,
    "scale_ranges": LIGHT_SCALE_RANGES,
    "input_size": (448, 597),  # the hand-out's 800 x 1066 at the authors' 448 short side
}

# Settings a model brings with it, per preset: `model_config` applies them (for `--model`,
# through `config_from_args`) to every field the user did not set with its own flag. The
# checkpoint stores the resulting config, so resume and inference rebuild the same model.
# - cis680 (the paper-size preset): the authors' models. SOLOv2: kernel and category towers
#   of 4 x 512, E = 256. Light variants: towers 2 x 256, E = 128, the light scale ranges and a
#   smaller input (the authors' Decoupled-SOLO-Light keeps 4 convs and ranges from 64 at a
#   512 short side; the issue asks for one light recipe, so both light models share it).
#   The new models use the authors' post-processing.
# - cpu: the preset's towers (2 x 64), input and ranges are already below the light models',
#   so the models keep them (a like-for-like comparison with SOLO); the light variants only
#   halve E (128 -> 64).
MODEL_DEFAULTS: dict[str, dict[str, dict]] = {
    "cis680": {
        "decoupled_solo": dict(_AUTHORS_POSTPROCESS),
        "solov2": {"seg_feat_channels": 512, "stacked_convs": 4, **_AUTHORS_POSTPROCESS},
        "decoupled_solo_light": {**_LIGHT, **_AUTHORS_POSTPROCESS},
        "solov2_light": {**_LIGHT, "kernel_channels": 128, **_AUTHORS_POSTPROCESS},
    },
    "cpu": {
        "solov2_light": {"kernel_channels": 64},
    },
}


def preset(name: str) -> Config:
    """The named preset; "auto" is `cis680` when a CUDA GPU is present and `cpu` otherwise."""
    if name == "auto":
        name = "cis680" if torch.cuda.is_available() else "cpu"
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)} or 'auto'")
    return PRESETS[name]


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_pairs(values: list[str]) -> tuple[tuple[int, int], ...]:
    """`["1,96", "48,192"]` -> ((1, 96), (48, 192))."""
    pairs = []
    for text in values:
        lo, sep, hi = text.partition(",")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected LOW,HIGH pairs, got {text!r}")
        pairs.append((int(lo), int(hi)))
    return tuple(pairs)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """Add one `--flag` per Config field, all defaulting to None (= keep the preset's value)."""
    group = parser.add_argument_group("configuration (defaults come from --preset)")
    group.add_argument("--preset", default="auto", choices=["auto", *PRESETS])
    hints = typing.get_type_hints(Config)
    for f in fields(Config):
        if f.name == "preset":
            continue
        hint = hints[f.name]
        flag = _flag(f.name)
        if hint is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif f.name == "scale_ranges":
            group.add_argument(flag, nargs="+", default=None, metavar="LOW,HIGH")
        elif typing.get_origin(hint) is tuple:
            elem = typing.get_args(hint)[0]
            group.add_argument(flag, nargs="+", type=elem, default=None)
        else:
            group.add_argument(flag, type=hint, default=None)


def config_from_args(args: argparse.Namespace) -> Config:
    """The preset named by `args.preset`, with every flag the user gave applied on top and the
    model's own defaults under them (`model_config`)."""
    return config_and_given(args)[0]


def config_and_given(args: argparse.Namespace) -> tuple[Config, frozenset[str]]:
    """`config_from_args(args)` and the names of the fields the user gave a flag for (what a
    later step, such as `zoo.finetune_config`, must leave as given)."""
    base = preset(args.preset)
    changes = {}
    for f in fields(Config):
        if f.name == "preset":
            continue
        value = getattr(args, f.name, None)
        if value is None:
            continue
        if f.name == "scale_ranges":
            value = _parse_pairs(value)
        elif isinstance(value, list):
            value = tuple(value)
        changes[f.name] = value
    cfg = dataclasses.replace(base, **changes)
    return model_config(cfg, cfg.model, given=changes), frozenset(changes)


def model_config(base: Config, model: str, given: Collection[str] = ()) -> Config:
    """`base` for `model`: `MODEL_DEFAULTS[base.preset][model]` applied to every field not
    named in `given` (the fields the caller set on purpose), the one place that does it for
    the command line, the notebook, the heads' demo and the benchmarks.

    `base` is a preset, or a preset whose `given` fields were changed. Scale ranges are in
    input pixels: an `input_size` in `given` without `scale_ranges` rescales the ranges of the
    input size they were made for (the model's own ranges and input, else the preset's) with
    the short side (`scale_ranges_for`).

    >>> model_config(CIS680, "solov2").stacked_convs  # the authors' 4 x 512 towers
    4
    """
    model_defaults = MODEL_DEFAULTS.get(base.preset, {}).get(model, {})
    changes = {k: v for k, v in model_defaults.items() if k not in given}
    if "input_size" in given and "scale_ranges" not in given:
        made = PRESETS.get(base.preset, Config())  # the preset's ranges, made for its input
        ranges, made_for = made.scale_ranges, made.input_size
        if "scale_ranges" in model_defaults:  # the model's ranges, made for its input
            ranges = model_defaults["scale_ranges"]
            made_for = model_defaults.get("input_size", made_for)
        changes["scale_ranges"] = scale_ranges_for(ranges, made_for, base.input_size)
    return validate(dataclasses.replace(base, model=model, **changes))


def scale_ranges_for(
    ranges: tuple[tuple[int, int], ...], made_for: tuple[int, int], size: tuple[int, int]
) -> tuple[tuple[int, int], ...]:
    """`ranges` (sqrt(w h) bounds in input pixels, made for input `made_for`) at input `size`:
    both bounds times the ratio of the short sides; a lower bound of 1 (the finest level
    takes every small object) stays 1.

    >>> scale_ranges_for(((1, 24), (12, 48), (96, 2048)), (192, 256), (384, 512))
    ((1, 48), (24, 96), (192, 4096))
    """
    factor = min(size) / min(made_for)
    return tuple(
        (lo if lo <= 1 else max(1, round(lo * factor)), max(1, round(hi * factor)))
        for lo, hi in ranges
    )


def validate(cfg: Config) -> Config:
    """Raise a ValueError naming the field when settings contradict each other."""
    if cfg.model not in MODELS:
        raise ConfigError(f"model must be one of {MODELS}, got {cfg.model!r}")
    n_levels = len(cfg.strides)
    if len(cfg.num_grids) != n_levels or len(cfg.scale_ranges) != n_levels:
        raise ConfigError(
            f"num_grids ({len(cfg.num_grids)}), scale_ranges ({len(cfg.scale_ranges)}) and "
            f"strides ({n_levels}) must have one entry per pyramid level"
        )
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.focal_norm not in ("positives", "entries"):
        raise ConfigError(f"focal_norm must be 'positives' or 'entries', got {cfg.focal_norm!r}")
    if cfg.init not in ("authors", "xavier"):
        raise ConfigError(f"init must be 'authors' or 'xavier', got {cfg.init!r}")
    if cfg.optimizer not in ("sgd", "adamw"):
        raise ConfigError(f"optimizer must be 'sgd' or 'adamw', got {cfg.optimizer!r}")
    if cfg.lr_schedule not in ("step", "cosine"):
        raise ConfigError(f"lr_schedule must be 'step' or 'cosine', got {cfg.lr_schedule!r}")
    if len(cfg.aug_scale) != 2 or not 0.0 < cfg.aug_scale[0] <= cfg.aug_scale[1]:
        raise ConfigError(f"aug_scale must be two factors 0 < low <= high, got {cfg.aug_scale}")
    if not 0.0 <= cfg.aug_color < 1.0:
        raise ConfigError(f"aug_color must be in [0, 1), got {cfg.aug_color}")
    if cfg.mask_loss_stride not in (1, 2, 4):
        raise ConfigError(f"mask_loss_stride must be 1, 2 or 4, got {cfg.mask_loss_stride!r}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {cfg.device!r}")
    if cfg.keep_classes and not cfg.init_from:
        raise ConfigError("keep_classes needs init_from: the file whose category rows to keep")
    if cfg.init_from and cfg.backbone_weights:
        raise ConfigError(
            f"init_from and backbone_weights both given ({cfg.init_from!r}, "
            f"{cfg.backbone_weights!r}): the file's weights replace the whole backbone"
        )
    # The backbone's own checks last, after the messages about how settings combine.
    check_settings(cfg.depth, cfg.backbone_width, cfg.backbone_weights, cfg.norm, cfg.stride_in_1x1)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    """Plain python types only (tuples as lists), safe for json and `weights_only` checkpoints."""

    def plain(value):
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


# Fields that older checkpoints' configs hold and this code no longer has: `cpu_bf16` became
# `amp` (one flag for mixed precision), `channels_last` was measured no faster in float32 and
# much slower with bf16 (docs/cpu_preset.md, training speed) and went. `config_from_dict`
# drops them, so those checkpoints still load; any other unknown field stays an error.
RETIRED_FIELDS = ("cpu_bf16", "channels_last")


def config_from_dict(data: dict) -> Config:
    """Inverse of `config_to_dict`; unknown keys (from a newer version) are an error, the
    `RETIRED_FIELDS` of older versions are dropped."""
    data = {k: v for k, v in data.items() if k not in RETIRED_FIELDS}
    known = {f.name for f in fields(Config)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"checkpoint config has unknown fields {sorted(unknown)}")

    def as_tuple(value):
        if isinstance(value, list):
            return tuple(as_tuple(v) for v in value)
        return value

    return validate(Config(**{k: as_tuple(v) for k, v in data.items()}))
