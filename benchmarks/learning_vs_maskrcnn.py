"""What the CPU preset learns in a fixed wall time, beside torchvision's Mask R-CNN.

Both models train from scratch on the same built-in data (the CPU preset's `build_data`: the
same 80/20 split, the same augmentation, batch 8) for the same wall time, `--minutes` each
(default 20), counted from the start of each model's training; the data set is generated
once before either starts, so its generation counts for neither. Both are then scored with
the same COCOeval (`evaluation.score`) on the same held-out split, and one table prints
both APs.

- SOLO: `training.train(replace(preset("cpu"), time_budget_min=minutes, out=DIR/solo))`,
  exactly the CPU preset (SOLOv2, ResNet-18 of width 32 with FPN 64, 192 x 256, mask loss at
  stride 2, AdamW 3e-3 with the kernel output conv at x 0.25, warm-up + cosine, bf16
  autocast); its budget covers its data loading, epochs and per-epoch
  validation loss, and fixes the number of iterations as it goes (`training.TimeBudget`).
- Mask R-CNN: torchvision's `MaskRCNN` on a ResNet-18 FPN (`backbone.build_backbone(18, C,
  width=W)`: trainable batch norm, from scratch, P2..P6) with C = `--maskrcnn-fpn` channels,
  default 128, and W = `--maskrcnn-width`, default torchvision's 64: the widths its figures in
  docs/benchmarks.md were measured with (the preset's FPN 64 and ResNet width 32 are speed choices
  measured for SOLOv2), num_classes 4 (with background),
  min_size 192 / max_size 256 (the preset's input: its transform does not resize), ImageNet
  mean / std. Its inputs are the preset's batches converted: the normalised image
  de-normalised to [0, 1] and cropped to meta["input_size"], targets dict(boxes, labels, masks
  cropped likewise); images without instances stay in the batches as negatives (torchvision
  accepts empty targets). Settings chosen to give it a fair run at this size and budget:
  * fewer sampled RoIs: rpn_batch_size_per_image 128 (default 256), box_batch_size_per_image
    128 (default 512), rpn_pre / post_nms_top_n_train 600 / 300 (default 2000 / 2000);
    box_detections_per_img 30 (the preset's keep_instance);
  * anchors scaled with the input, as the preset scales the hand-out's scale ranges by 0.24:
    sizes 8, 16, 32, 64, 128 on P2..P6, x 0.25 of torchvision's 32..512 (made for 800-pixel
    images; objects here are about 6 to 210 pixels);
  * mask head 4 x 3x3 convs of 128 channels, its FPN width (torchvision's default is 256 for
    its 256-channel FPN; 128 is the same design at this backbone's width, 4x fewer FLOPs);
    `--maskrcnn-mask-head 256` restores the default;
  * AdamW lr `--maskrcnn-lr` (default 1e-3; 2e-3 measured better (docs/benchmarks.md); run a few
    values with `--skip-solo`, pass the best), weight decay `--maskrcnn-weight-decay` (default
    1e-4, the value of its measurements; not on norms and biases, as
    `build_optimizer`), linear warm-up from lr / 3 over the preset's 100 iterations, then
    cosine to zero over the elapsed fraction of the time budget; gradient clipping at the
    preset's norm 35; batch 8 (`--maskrcnn-batch`);
  * bf16 autocast on the CPU, like the preset, around the convolution / FC bulk (backbone +
    FPN, box head, mask head); anchors, box coding, RoIAlign, predictors and losses stay in
    float32, as the SOLO model keeps its losses in float32. If the first bf16 step raises, it
    falls back to float32 and says so (`--no-maskrcnn-bf16` asks for float32).
  Evaluation: eval mode, float32; each kept detection's mask probabilities (k, 1, h, w) at the
  input size are resized bilinearly to meta["orig_size"] and thresholded at 0.5 (the
  order SOLO uses), then `evaluation.results_to_coco` / `evaluation.score`.

Run (2 x 20 minutes plus data generation and evaluation):
    python benchmarks/learning_vs_maskrcnn.py
    python benchmarks/learning_vs_maskrcnn.py --minutes 20 --out runs/learning_vs_maskrcnn
    python benchmarks/learning_vs_maskrcnn.py --minutes 0.3 --num-images 40     # smoke test
The table is also written to DIR/comparison.json; DIR/solo is SOLO's run folder, DIR/maskrcnn
holds Mask R-CNN's loss.csv and metrics.json.

Shape legend: B batch, N instances, H x W padded input, h x w input before padding,
h0 x w0 original image, k detections.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import Config, preset  # noqa: E402

# --------------------------------------------------------------------------------------------
# config: Mask R-CNN's settings for the preset's data (see the docstring for the reasons)
# --------------------------------------------------------------------------------------------

ANCHOR_SIZES = ((8,), (16,), (32,), (64,), (128,))  # P2..P6; torchvision: 32..512
ASPECT_RATIOS = ((0.5, 1.0, 2.0),) * 5  # torchvision's default
RPN_BATCH = 128  # anchors sampled per image for the RPN loss (torchvision: 256)
BOX_BATCH = 128  # RoIs sampled per image for the box and mask losses (torchvision: 512)
RPN_TRAIN_TOP_N = (600, 300)  # proposals before / after NMS in training (torchvision: 2000)
LOG_EVERY = 20  # iterations per logged loss point


# --------------------------------------------------------------------------------------------
# pure helpers
# --------------------------------------------------------------------------------------------


def lr_factor(it: int, elapsed_fraction: float, warmup_iters: int) -> float:
    """Linear warm-up from 1/3 over `warmup_iters` iterations (as training.lr_at), times a
    cosine from 1 to 0 over the elapsed fraction of the time budget."""
    factor = 0.5 * (1.0 + math.cos(math.pi * min(max(elapsed_fraction, 0.0), 1.0)))
    if it < warmup_iters:
        factor *= 1.0 / 3.0 + (1.0 - 1.0 / 3.0) * it / warmup_iters
    return factor


def to_maskrcnn_inputs(batch, device) -> tuple[list[torch.Tensor], list[dict]]:
    """A collated batch of the data-set contract -> torchvision's (images, targets).

    images: per image (3, h, w) in [0, 1], cropped to meta["input_size"] (no padding);
    targets: per image dict(boxes (N, 4) float32 x1y1x2y2, labels (N,) int64 in 1..C,
    masks (N, h, w) uint8), N may be 0.
    """
    from dataset import IMAGENET_MEAN, IMAGENET_STD

    imgs, labels, masks, boxes, metas = batch
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    images, targets = [], []
    for img, img_labels, img_masks, img_boxes, meta in zip(
        imgs, labels, masks, boxes, metas, strict=True
    ):
        h, w = meta["input_size"]
        images.append((img[:, :h, :w] * std + mean).clamp(0, 1).to(device))
        targets.append(
            {
                "boxes": img_boxes.float().reshape(-1, 4).to(device),
                "labels": img_labels.to(torch.int64).to(device),
                "masks": img_masks[:, :h, :w].to(torch.uint8).to(device),
            }
        )
    return images, targets


def masks_at_orig_size(probs: torch.Tensor, orig_size: tuple[int, int]) -> torch.Tensor:
    """(k, 1, h, w) mask probabilities at the input size -> (k, h0, w0) uint8, resized
    bilinearly, then thresholded at 0.5."""
    if probs.shape[0] == 0:
        return torch.zeros((0, *orig_size), dtype=torch.uint8)
    resized = F.interpolate(probs.float(), size=tuple(orig_size), mode="bilinear")
    return (resized[:, 0] > 0.5).to(torch.uint8)  # (k, 1, h0, w0) -> (k, h0, w0)


# --------------------------------------------------------------------------------------------
# modules: Mask R-CNN on the preset's backbone
# --------------------------------------------------------------------------------------------


class Autocast(nn.Module):
    """Runs `module` under autocast (when `enabled`) and hands back float32 outputs, so that
    what follows (anchors, box coding, RoIAlign, losses) stays in float32."""

    def __init__(self, module: nn.Module, dtype: torch.dtype, device_type: str):
        super().__init__()
        self.module = module
        self.dtype = dtype
        self.device_type = device_type
        self.enabled = True
        if hasattr(module, "out_channels"):
            self.out_channels = module.out_channels  # MaskRCNN reads backbone.out_channels

    def forward(self, x):
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled):
            out = self.module(x)
        if isinstance(out, dict):
            return OrderedDict((k, v.float()) for k, v in out.items())
        return out.float()


def build_maskrcnn(
    cfg: Config,
    num_classes: int,
    mask_width: int,
    device: torch.device,
    low_precision: bool,
    fpn_channels: int = 128,
    backbone_width: int = 64,
):
    """torchvision MaskRCNN on a ResNet FPN of the preset's depth, with the settings of the
    docstring."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    from backbone import build_backbone
    from dataset import IMAGENET_MEAN, IMAGENET_STD

    body = build_backbone(
        depth=cfg.depth, out_channels=fpn_channels, norm="bn", width=backbone_width
    ).net
    h, w = cfg.input_size
    model = MaskRCNN(
        body,
        num_classes=num_classes + 1,
        min_size=min(h, w),
        max_size=max(h, w),
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        rpn_anchor_generator=AnchorGenerator(ANCHOR_SIZES, ASPECT_RATIOS),
        rpn_pre_nms_top_n_train=RPN_TRAIN_TOP_N[0],
        rpn_post_nms_top_n_train=RPN_TRAIN_TOP_N[1],
        rpn_batch_size_per_image=RPN_BATCH,
        box_batch_size_per_image=BOX_BATCH,
        box_detections_per_img=cfg.keep_instance,
    )
    model.roi_heads.mask_head = MaskRCNNHeads(fpn_channels, (mask_width,) * 4, 1)
    model.roi_heads.mask_predictor = MaskRCNNPredictor(mask_width, mask_width, num_classes + 1)
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    model.backbone = Autocast(model.backbone, dtype, device.type)
    model.roi_heads.box_head = Autocast(model.roi_heads.box_head, dtype, device.type)
    model.roi_heads.mask_head = Autocast(model.roi_heads.mask_head, dtype, device.type)
    set_low_precision(model, low_precision)
    return model.to(device)


def set_low_precision(model: nn.Module, enabled: bool) -> None:
    for module in model.modules():
        if isinstance(module, Autocast):
            module.enabled = enabled


def build_optimizer(model: nn.Module, lr: float, weight_decay: float):
    """AdamW, no weight decay on norms and biases (as training.build_optimizer)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr)


# --------------------------------------------------------------------------------------------
# training and evaluation
# --------------------------------------------------------------------------------------------


def train_solo(cfg: Config, out_dir: Path) -> dict:
    from model import load_checkpoint
    from training import train

    t0 = time.time()
    # exist_ok: the benchmark reads out_dir/last.pt back; a rerun with the same --out replaces it
    metrics = train(replace(cfg, out=str(out_dir), exist_ok=True))
    ckpt_path = out_dir / "last.pt"
    # last.pt is written at the end of the last epoch, before the final evaluation.
    train_s = ckpt_path.stat().st_mtime - t0
    iterations = int(load_checkpoint(ckpt_path)["iteration"])
    images = iterations * cfg.batch_size  # drop_last: every training batch is full
    return {
        "model": "SOLO (cpu preset)",
        "iterations": iterations,
        "images": images,
        "train_s": train_s,
        "img_per_s": images / max(train_s, 1e-9),
        "precision": precision_of_preset(cfg),
        "metrics": metrics,
    }


def precision_of_preset(cfg: Config) -> str:
    from model import resolve_device
    from training import autocast_dtype

    dtype = autocast_dtype(cfg, resolve_device(cfg.device))
    names = {
        torch.float16: "fp16 autocast, fp32 losses",
        torch.bfloat16: "bf16 autocast, fp32 losses",
    }
    return names.get(dtype, "fp32")


def train_maskrcnn(cfg: Config, args, out_dir: Path) -> dict:
    from dataset import build_data
    from model import resolve_device
    from training import autocast_dtype, make_loader, seed_everything

    out_dir.mkdir(parents=True, exist_ok=True)
    budget_s = args.minutes * 60.0
    t_start = time.time()  # like SOLO's budget: data sets, model and training
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    train_set, val_set = build_data(cfg)
    num_classes = len(train_set.class_names)
    # Low precision where the preset uses it (amp): bf16 on a CPU that has it, fp16 on CUDA.
    low_precision = args.maskrcnn_bf16 and autocast_dtype(cfg, device) is not None
    model = build_maskrcnn(
        cfg,
        num_classes,
        args.maskrcnn_mask_head,
        device,
        low_precision,
        args.maskrcnn_fpn,
        args.maskrcnn_width,
    )
    optimizer = build_optimizer(model, args.maskrcnn_lr, args.maskrcnn_weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and low_precision)
    mcfg = replace(cfg, batch_size=args.maskrcnn_batch)
    print(
        f"Mask R-CNN: {len(train_set)} training images, batch {mcfg.batch_size}, lr "
        f"{args.maskrcnn_lr}, mask head {args.maskrcnn_mask_head}, "
        f"{precision_name(low_precision, device)}, budget {args.minutes} min",
        flush=True,
    )

    it, images, epoch, history, window = 0, 0, 0, [], []
    precision_note = ""
    done = False
    model.train()
    while not done:
        seed_everything(cfg.seed * 1000 + epoch + 1)  # as training: per-epoch randomness
        for batch in make_loader(train_set, mcfg, epoch, True, 0, 1):
            elapsed = time.time() - t_start
            if elapsed >= budget_s:
                done = True
                break
            lr = args.maskrcnn_lr * lr_factor(it, elapsed / budget_s, cfg.warmup_iters)
            for group in optimizer.param_groups:
                group["lr"] = lr
            inputs, targets = to_maskrcnn_inputs(batch, device)
            try:
                losses = model(inputs, targets)
            except RuntimeError as err:
                if not (low_precision and it == 0):
                    raise
                low_precision = False
                set_low_precision(model, False)
                precision_note = f"bf16 failed ({str(err).splitlines()[0]}); fp32"
                print(f"Mask R-CNN: {precision_note}", flush=True)
                losses = model(inputs, targets)
            total = sum(losses.values())
            values = {k: float(v.detach()) for k, v in losses.items()}
            if not math.isfinite(float(total.detach())):
                raise FloatingPointError(
                    f"Mask R-CNN: non-finite loss at iteration {it}: {values}; try a smaller "
                    "--maskrcnn-lr"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            it += 1
            images += len(inputs)
            window.append({"total": float(total.detach()), **values})
            if it % LOG_EVERY == 0:
                point = {k: sum(v[k] for v in window) / len(window) for k in window[0]}
                history.append({"iter": it, "elapsed_s": time.time() - t_start, "lr": lr, **point})
                window = []
                print(
                    f"Mask R-CNN it {it}: {time.time() - t_start:.0f} s, "
                    f"{images / (time.time() - t_start):.2f} img/s, loss {point['total']:.3f}",
                    flush=True,
                )
        epoch += 1
    train_s = time.time() - t_start
    if window:  # the last, partial window of iterations
        point = {k: sum(v[k] for v in window) / len(window) for k in window[0]}
        history.append({"iter": it, "elapsed_s": train_s, "lr": lr, **point})
    write_history(out_dir / "loss.csv", history)

    set_low_precision(model, False)  # evaluate in float32, as SOLO's evaluate_model does
    metrics = evaluate_maskrcnn(model, val_set, device, mcfg.batch_size)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return {
        "model": "Mask R-CNN R18-FPN (torchvision)",
        "iterations": it,
        "images": images,
        "train_s": train_s,
        "img_per_s": images / max(train_s, 1e-9),
        "precision": precision_note or precision_name(low_precision, device),
        "metrics": metrics,
    }


def precision_name(low_precision: bool, device: torch.device) -> str:
    if not low_precision:
        return "fp32"
    return ("bf16" if device.type == "cpu" else "fp16") + " autocast (bulk), fp32 losses"


def write_history(path: Path, history: list[dict]) -> None:
    if not history:
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


@torch.no_grad()
def evaluate_maskrcnn(model, val_set, device, batch_size: int) -> dict:
    """COCO mask AP of Mask R-CNN on `val_set`, scored exactly as SOLO's (evaluation.score)."""
    from torch.utils.data import DataLoader

    import dataset as ds
    from evaluation import detections_of, score

    if val_set.augment is not None:
        raise ValueError("learning_vs_maskrcnn: the held-out split must not be augmented")
    model.eval()
    loader = DataLoader(val_set, batch_size=batch_size, shuffle=False, collate_fn=ds.collate_fn)
    predictions = []
    for batch in loader:
        images, _ = to_maskrcnn_inputs(batch, device)
        outputs = model(images)
        for meta, out in zip(batch[4], outputs, strict=True):
            result = {
                "masks": masks_at_orig_size(out["masks"].cpu(), tuple(meta["orig_size"])),
                "labels": out["labels"].cpu().to(torch.int64),
                "scores": out["scores"].cpu().float(),
            }
            predictions.append((meta, result))
    return score(val_set, detections_of(predictions, val_set))


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'model':<34}{'iterations':>11}{'images':>9}{'train s':>9}{'img/s':>8}"
        f"{'AP':>8}{'AP50':>8}{'AP75':>8}  precision"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        m = r["metrics"] or {}
        ap = [f"{m[k]:.4f}" if k in m else "n/a" for k in ("AP", "AP50", "AP75")]
        lines.append(
            f"{r['model']:<34}{r['iterations']:>11}{r['images']:>9}{r['train_s']:>9.0f}"
            f"{r['img_per_s']:>8.2f}{ap[0]:>8}{ap[1]:>8}{ap[2]:>8}  {r['precision']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    cpu = preset("cpu")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="wall time for each model")
    parser.add_argument("--out", default="runs/learning_vs_maskrcnn", help="output folder")
    parser.add_argument("--num-images", type=int, default=cpu.num_images)
    parser.add_argument("--maskrcnn-lr", type=float, default=1e-3)
    parser.add_argument(
        "--maskrcnn-weight-decay",
        type=float,
        default=1e-4,
        help="AdamW weight decay for Mask R-CNN (default 1e-4, the value its figures were "
        "measured with; the CPU preset has used 0.1 since run N)",
    )
    parser.add_argument("--maskrcnn-batch", type=int, default=cpu.batch_size)
    parser.add_argument(
        "--maskrcnn-fpn", type=int, default=128, help="Mask R-CNN's FPN channels (measured: 128)"
    )
    parser.add_argument(
        "--maskrcnn-width",
        type=int,
        default=64,
        help="Mask R-CNN's ResNet stem / first-stage channels (measured: torchvision's 64)",
    )
    parser.add_argument(
        "--maskrcnn-mask-head",
        type=int,
        default=128,
        help="channels of Mask R-CNN's 4 mask-head convs (torchvision: 256)",
    )
    parser.add_argument(
        "--maskrcnn-bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bf16 autocast for Mask R-CNN on the CPU when the preset uses it",
    )
    parser.add_argument("--skip-solo", action="store_true")
    parser.add_argument("--skip-maskrcnn", action="store_true")
    parser.add_argument("--device", default=cpu.device, choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        parser.error("--minutes must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)

    from synthetic import ensure_builtin_dataset

    cfg = replace(cpu, num_images=args.num_images, time_budget_min=args.minutes, device=args.device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Generated once, here, so that neither model's budget pays for it.
    ensure_builtin_dataset(num_images=cfg.num_images, seed=cfg.data_seed)

    rows = []
    if not args.skip_solo:
        rows.append(train_solo(cfg, out_dir / "solo"))
    if not args.skip_maskrcnn:
        rows.append(train_maskrcnn(cfg, args, out_dir / "maskrcnn"))

    print(
        f"\nsame data ({cfg.num_images} built-in images, {cfg.input_size[0]} x "
        f"{cfg.input_size[1]}), {args.minutes} min of training each, {torch.get_num_threads()} "
        "threads, COCO mask AP on the same held-out split"
    )
    print(format_table(rows))
    print(
        f"Mask R-CNN settings: lr {args.maskrcnn_lr} (AdamW, warm-up {cfg.warmup_iters} it, "
        f"cosine over the budget), batch {args.maskrcnn_batch}, RPN / box sampled per image "
        f"{RPN_BATCH} / {BOX_BATCH}, proposals {RPN_TRAIN_TOP_N[0]} / {RPN_TRAIN_TOP_N[1]}, "
        f"anchors {[s[0] for s in ANCHOR_SIZES]}, mask head 4 x {args.maskrcnn_mask_head}"
    )
    table = {"minutes": args.minutes, "num_images": cfg.num_images, "rows": rows}
    if len(rows) == 2 and all(r["metrics"] for r in rows):
        solo_ap, mrcnn_ap = rows[0]["metrics"]["AP"], rows[1]["metrics"]["AP"]
        higher = rows[0]["model"] if solo_ap > mrcnn_ap else rows[1]["model"]
        if solo_ap == mrcnn_ap:
            higher = "neither (equal)"
        print(f"higher AP: {higher} ({solo_ap:.4f} vs {mrcnn_ap:.4f})")
        table["higher"] = higher
    (out_dir / "comparison.json").write_text(json.dumps(table, indent=2))
    return table


if __name__ == "__main__":
    main()
