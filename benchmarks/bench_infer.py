"""Inference time per image: this SOLO model beside torchvision's Mask R-CNN R50-FPN, one run.

Both models see the same images at the same input size (default 800 x 1088, the cis680
preset's padded input), batch 1, in eval mode under torch.inference_mode; one warm-up image,
then `--images` timed ones. The images are the first ones of the built-in data set
(`synthetic.py`), resized to the input size; their masks come back at that size from both
models (SOLO's `meta["orig_size"]` is set to the input size, as Mask R-CNN pastes its masks
into the image it was given), so neither saves work by returning a smaller mask.

- SOLO: `build_model(cfg, 3)` with the cis680 preset's model config (`--model` picks a later
  model type). Timed in two parts: the network (backbone + head forward, `eval=True`: sigmoid,
  point NMS, mask features) and the post-processing (`head.PostProcess`: candidate masks,
  maskness, Matrix NMS, resize to the output size); "total" is their sum.
- Mask R-CNN: `maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=4)`
  with min_size / max_size equal to the input's short / long side (its transform does not
  resize) and box_score_thresh 0, so that it keeps its usual up-to-100 detections with
  random weights and its mask head and mask pasting run on all of them.

Untrained SOLO weights would skip most of the post-processing: every category score sits
near the prior 0.01, below cate_thresh, so no candidate reaches the mask branch. To time the
work a trained model does, the benchmark (without `--checkpoint`)
- sets, per image, the head's cate_thresh just below the `--candidates`-th (default 100)
  largest category score, found by one eval forward of the head on that image before the
  timing, so that exactly that many candidates go through mask computation;
- puts the mask probabilities near 0.5 (`open_untrained_masks`: SOLO's mask output biases
  to 0; at the prior bias -log 99 every mask probability is ~0.01, every binary mask empty,
  and `finish_single` would drop them all before Matrix NMS); the masks are then noise
  around p = 0.5, which costs the same as real masks;
- sets update_thresh to 0 (the decayed untrained scores are far below the preset's 0.05)
  and pre_nms_num = keep_instance = `--candidates`, the COCO-evaluation setting (the hand-out's
  50 / 5 would resize only 5 masks where Mask R-CNN pastes 100); `--pre-nms-num` and
  `--keep-instance` override these.
With `--checkpoint RUN` a trained SOLO is timed as it is (its own thresholds and
post-processing settings unless `--pre-nms-num` / `--keep-instance` are given); Mask R-CNN
stays untrained with num_classes = the checkpoint's classes + 1.

Run (CPU: a couple of minutes at 800 x 1088):
    python benchmarks/bench_infer.py
    python benchmarks/bench_infer.py --size 800 1088 --images 5 --device cuda --out infer.json
    python benchmarks/bench_infer.py --checkpoint runs/solo_cpu --images 20

Shape legend: H x W input (multiples of 32), k kept instances, C classes without background.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import Config, preset  # noqa: E402

# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------

NUM_CLASSES = 3  # built-in data: vehicle, person, animal (Mask R-CNN adds the background)

# --------------------------------------------------------------------------------------------
# pure helpers
# --------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def threshold_for_top(scores: torch.Tensor, k: int) -> float:
    """A threshold t with exactly the k largest of `scores` strictly above it (ties aside):
    halfway between the k-th and (k+1)-th largest, or just below the k-th when they are equal
    or there is no (k+1)-th."""
    flat = scores.flatten().float()
    k = min(k, flat.numel())
    top = torch.topk(flat, min(k + 1, flat.numel())).values  # descending
    kth = top[k - 1]
    if top.numel() > k and top[k] < kth:
        return float((kth + top[k]) / 2)
    return float(torch.nextafter(kth, torch.tensor(-math.inf)))


def flat_cate_scores(lvl_cate_scores: list[torch.Tensor]) -> torch.Tensor:
    """Per level (1, C, S, S) after point NMS -> (sum S^2, C), the head's candidate order."""
    C = lvl_cate_scores[0].shape[1]
    # (1, C, S, S) -> (S*S, C) per level, then all levels
    return torch.cat([c[0].permute(1, 2, 0).reshape(-1, C) for c in lvl_cate_scores])


# --------------------------------------------------------------------------------------------
# inputs and models
# --------------------------------------------------------------------------------------------


def load_images(count: int, size: tuple[int, int]) -> list[tuple[torch.Tensor, dict]]:
    """`count` built-in images resized to `size` (h, w): [(normalised (3, H, W), meta)], with
    meta["orig_size"] = meta["input_size"] so that the masks come back at the input size."""
    from main_train import build_data

    num_images = max(8, math.ceil(count / 0.8) + 2)  # the 80 % training split holds `count`
    cfg = replace(
        preset("cpu"), data="builtin", num_images=num_images, input_size=size, augment=False
    )
    train_set, _ = build_data(cfg)
    out = []
    for i in range(count):
        img, _, _, _, meta = train_set[i]
        out.append((img, {**meta, "orig_size": tuple(meta["input_size"])}))
    return out


def denormalised(img: torch.Tensor, meta: dict) -> torch.Tensor:
    """Normalised padded image (3, H, W) -> [0, 1] image (3, h, w) cropped to input_size."""
    from dataset import IMAGENET_MEAN, IMAGENET_STD

    h, w = meta["input_size"]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (img[:, :h, :w] * std + mean).clamp(0, 1)


def build_solo(args, device: torch.device) -> tuple[torch.nn.Module, Config, int]:
    """(model in eval mode, its config, number of classes)."""
    if args.checkpoint:
        from main_infer import load_model

        model, cfg, class_names = load_model(args.checkpoint, device)
        num_classes = len(class_names)
    else:
        from model import build_model

        cfg = replace(preset("cis680"), model=args.model)
        torch.manual_seed(0)
        model = build_model(cfg, NUM_CLASSES).to(device).eval()
        num_classes = NUM_CLASSES
        open_untrained_masks(model.head)
        model.head.update_thresh = 0.0
        model.head.pre_NMS_num = args.candidates
        model.head.keep_instance = args.candidates
    if args.pre_nms_num is not None:
        model.head.pre_NMS_num = args.pre_nms_num
    if args.keep_instance is not None:
        model.head.keep_instance = args.keep_instance
    return model, cfg, num_classes


def open_untrained_masks(head: torch.nn.Module) -> None:
    """Put an untrained head's mask probabilities near 0.5, so that binary masks are not empty.

    At the prior bias -log(99) every SOLO mask probability is ~0.01: every binary mask would be
    empty at ins_thresh 0.5 and dropped before Matrix NMS. SOLO (p = sigmoid(logit)): biases 0.
    Decoupled SOLO (p = sigmoid(x) sigmoid(y)): biases logit(sqrt(0.5)) on both branches.
    SOLOv2's dynamic kernels have no bias and start at logits ~0 already.
    """
    half_root = math.log(math.sqrt(0.5) / (1 - math.sqrt(0.5)))  # sigmoid(b)^2 = 0.5
    for name, bias in (("mask_out", 0.0), ("mask_out_x", half_root), ("mask_out_y", half_root)):
        for conv in getattr(head, name, ()):
            torch.nn.init.constant_(conv.bias, bias)


def build_maskrcnn(num_classes: int, size: tuple[int, int], device: torch.device):
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    H, W = size
    model = maskrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=num_classes + 1,
        min_size=min(H, W),  # short side already at min_size and long side at max_size:
        max_size=max(H, W),  # GeneralizedRCNNTransform keeps the size (scale 1)
        box_score_thresh=0.0,
    )
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------


@torch.inference_mode()
def solo_thresholds(model, images, device, candidates: int) -> list[float]:
    """Per image, the cate_thresh that lets `candidates` (cell, class) entries through."""
    thresholds = []
    for img, _ in images:
        preds = model.head(model.backbone(img[None].to(device)), eval=True)  # cate scores first
        thresholds.append(threshold_for_top(flat_cate_scores(preds[0]), candidates))
    return thresholds


@torch.inference_mode()
def time_solo(model, images, device, thresholds: list[float] | None) -> dict:
    """Seconds per image of network and post-processing (first image: warm-up, not timed)."""
    net_s, post_s, kept, cands = [], [], [], []
    for i, (img, meta) in enumerate(images):
        if thresholds is not None:
            model.head.cate_thresh = thresholds[i]
        x = img[None].to(device)  # (1, 3, H, W)
        sync(device)
        t0 = time.perf_counter()
        preds = model.head(model.backbone(x), eval=True)
        sync(device)
        t1 = time.perf_counter()
        results = model.head.PostProcess(preds, [meta], padded_size=tuple(x.shape[-2:]))
        sync(device)
        t2 = time.perf_counter()
        if i == 0:
            continue
        net_s.append(t1 - t0)
        post_s.append(t2 - t1)
        kept.append(len(results[0]["scores"]))
        cands.append(int((flat_cate_scores(preds[0]) > model.head.cate_thresh).sum()))
    return {
        "network_ms": 1000 * sum(net_s) / len(net_s),
        "post_ms": 1000 * sum(post_s) / len(post_s),
        "total_ms": 1000 * (sum(net_s) + sum(post_s)) / len(net_s),
        "candidates": sum(cands) / len(cands),
        "detections": sum(kept) / len(kept),
    }


@torch.inference_mode()
def time_maskrcnn(model, images, device) -> dict:
    seconds, kept = [], []
    for i, (img, meta) in enumerate(images):
        x = denormalised(img, meta).to(device)  # (3, h, w) in [0, 1]
        sync(device)
        t0 = time.perf_counter()
        out = model([x])
        sync(device)
        t1 = time.perf_counter()
        if i == 0:
            continue
        seconds.append(t1 - t0)
        kept.append(len(out[0]["scores"]))
    return {
        "total_ms": 1000 * sum(seconds) / len(seconds),
        "detections": sum(kept) / len(kept),
    }


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def format_rows(rows: list[tuple[str, float, str]]) -> str:
    lines = [f"{'model / part':<26}{'ms / image':>12}  detections / image"]
    lines += [f"{name:<26}{ms:>12.1f}  {det}" for name, ms, det in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="input size (default: the model config's padded input, 800 1088)",
    )
    parser.add_argument("--images", type=int, default=5, help="timed images (after 1 warm-up)")
    parser.add_argument("--model", default="solo", help="model type of config.Config")
    parser.add_argument("--checkpoint", default="", help="time a trained SOLO run instead")
    parser.add_argument(
        "--candidates",
        type=int,
        default=100,
        help="untrained SOLO: candidates per image let through cate_thresh",
    )
    parser.add_argument("--pre-nms-num", type=int, default=None)
    parser.add_argument("--keep-instance", type=int, default=None)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--out", default="", help="also write the table as json here")
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error("--images must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from main_train import resolve_device

    device = resolve_device(args.device)

    solo, cfg, num_classes = build_solo(args, device)
    if args.size is not None:
        size = tuple(args.size)
    else:
        from dataset import padded_size

        size = padded_size(tuple(cfg.input_size), cfg.pad_to)
    maskrcnn = build_maskrcnn(num_classes, size, device)
    images = load_images(args.images + 1, size)
    H, W = images[0][0].shape[-2:]

    thresholds = None
    if not args.checkpoint:
        thresholds = solo_thresholds(solo, images, device, args.candidates)
    solo_t = time_solo(solo, images, device, thresholds)
    mrcnn_t = time_maskrcnn(maskrcnn, images, device)

    what = f"checkpoint {args.checkpoint}" if args.checkpoint else "untrained"
    print(
        f"inference, batch 1, {H} x {W}, {args.images} images after 1 warm-up, {device}, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"SOLO ({cfg.model}, ResNet-{cfg.depth} FPN {cfg.fpn_channels}, {what}): "
        f"{solo_t['candidates']:.0f} candidates / image, pre_nms_num {solo.head.pre_NMS_num}, "
        f"keep_instance {solo.head.keep_instance}; Mask R-CNN R50-FPN (torchvision, untrained, "
        f"box_score_thresh 0)"
    )
    if not args.checkpoint:
        print(
            "untrained SOLO made to do a trained model's work: per image cate_thresh just below "
            f"the {args.candidates}th category score, mask probabilities near 0.5, update_thresh 0"
        )
    rows = [
        ("SOLO total", solo_t["total_ms"], f"{solo_t['detections']:.1f}"),
        ("SOLO network", solo_t["network_ms"], ""),
        ("SOLO post-processing", solo_t["post_ms"], ""),
        ("Mask R-CNN total", mrcnn_t["total_ms"], f"{mrcnn_t['detections']:.1f}"),
    ]
    print(format_rows(rows))
    if not args.checkpoint and solo_t["detections"] == 0:
        print(
            f"WARNING: no {cfg.model} candidate survived to the end (empty masks?): its "
            "post-processing time above leaves out Matrix NMS and the resize"
        )
    ratio = mrcnn_t["total_ms"] / max(solo_t["total_ms"], 1e-9)
    print(f"ratio Mask R-CNN / SOLO (total time per image): {ratio:.2f}x")

    table = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "input_size": [int(H), int(W)],
        "images": args.images,
        "solo": {"model": cfg.model, "weights": what, **solo_t},
        "maskrcnn": mrcnn_t,
        "ratio_maskrcnn_over_solo": ratio,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(table, indent=2))
    return table


if __name__ == "__main__":
    main()
