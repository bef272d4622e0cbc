"""Inference time per image: SOLO, Decoupled SOLO, SOLOv2 and Mask R-CNN R50-FPN in one run.

Every model sees the same images at the same input size (default 800 x 1088, the cis680
preset's padded input), batch 1, in eval mode under torch.inference_mode. The images are the
first `--images` ones of the built-in data set (`synthetic.py`), resized to the input size;
masks come back at that size from every model (SOLO's `meta["orig_size"]` is set to the input
size, as Mask R-CNN pastes its masks into the image it was given), so none saves work by
returning smaller masks.

Fair timing, in one process:
- Interleaved: the timed passes go round-robin over the models, image by image and repeat by
  repeat, the models' order rotated by one at every step; drift of the machine (other jobs,
  heat, frequency) therefore falls on every model alike.
- Warm-up: `--warmup` untimed passes of every model first (same rotation), not counted.
- Each model gets `--repeats` x `--images` timed passes; the table gives the MEDIAN ms per image
  of the network, of the post-processing and of their sum (the median of the per-pass sums, so
  the parts need not add up to it exactly) and the min-max range of the total.
- Ratios: each model's median total over SOLO's and over Mask R-CNN's (below 1 = faster).

The models:
- SOLO models (`--models`, default solo decoupled_solo solov2): `build_model(cfg, 3)` with the
  cis680 preset and that model's own settings (`config.model_config(CIS680, M)`, as
  `main_train.py --preset cis680 --model M` builds it: ResNet-50 FPN 256; SOLO and Decoupled
  SOLO towers 7 x 256, SOLOv2 towers 4 x 512 with E = 256). Timed in two parts: the network
  (backbone + head forward with eval=True: sigmoid, point NMS, the mask features or kernels)
  and the post-processing (`head.PostProcess`: the candidates' masks, maskness, Matrix NMS,
  resize to the output size).
- `maskrcnn`: torchvision's `maskrcnn_resnet50_fpn(weights=None, weights_backbone=None,
  num_classes=4)` with min_size / max_size equal to the input's short / long side (its
  transform does not resize) and box_score_thresh 0, so that with random weights it keeps its
  usual up-to-100 detections and its mask head runs on, and pastes, all of them. Its network
  part is transform + backbone + RPN + RoI heads (box NMS and the 28 x 28 mask head included),
  run as `GeneralizedRCNN.forward` runs them; its post-processing is `transform.postprocess`
  (pasting the masks into the image). The two parts split differently from SOLO's (SOLO's
  mask prediction is in its post-processing), so compare the totals; the parts show where the
  time goes.

The same number of candidates for every SOLO model. Untrained weights would skip most of the
post-processing (every category score sits near the prior 0.01, below cate_thresh) and the
models' own settings differ (SOLO: cate_thresh 0.2, 50 before / 5 after Matrix NMS; the
authors' later models: 0.1, 500 / 100). So, for every untrained SOLO model alike:
- per image, cate_thresh is set just below the `--candidates`-th (default 100) largest
  category score, found by one eval forward of that model on that image before any timing:
  exactly that many (cell, class) candidates get a mask, go through maskness and Matrix NMS
  (pre_nms_num = `--candidates`) and are kept and resized (keep_instance = `--candidates`,
  the COCO-evaluation cap, as Mask R-CNN's 100 detections);
- the mask probabilities are put near 0.5 (`open_untrained_masks`; at the prior bias every
  SOLO mask probability is ~0.01, every binary mask empty and dropped before Matrix NMS); the
  masks are then noise around p = 0.5, which costs what real masks cost;
- update_thresh is 0 (decayed untrained scores are far below the preset's 0.05).
`--pre-nms-num` / `--keep-instance` override the two caps for every SOLO model. The table's
"masks" column (masks computed per image) and "dets" column (detections returned) show what
each model did.

Trained models: `--checkpoint RUN` (repeatable) times the run's model (its config names the
model type, which replaces that untrained model or is added) with its own thresholds and
settings, unless `--pre-nms-num` / `--keep-instance` are given. Mask R-CNN stays untrained.

Run (CPU, 800 x 1088, 3 images x 3 repeats + 1 warm-up: about 4 minutes on 2 cores, most of
it the 40 timed and warm-up passes of about 3-6 s each; the four models and their activations
stay well under 20 GB, the peak RSS is printed at the end):
    python benchmarks/bench_infer.py
    python benchmarks/bench_infer.py --models solo solov2 maskrcnn --repeats 5 --out infer.json
    python benchmarks/bench_infer.py --checkpoint runs/solo --checkpoint runs/solov2
    python benchmarks/bench_infer.py --size 128 160 --images 1 --repeats 1   # smoke test

Shape legend: H x W input (multiples of 32), k kept instances, C classes without background.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import CIS680, MODELS, model_config, preset  # noqa: E402

# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------

NUM_CLASSES = 3  # built-in data: vehicle, person, animal (Mask R-CNN adds the background)
MASKRCNN = "maskrcnn"
CHOICES = (*MODELS, MASKRCNN)
DEFAULT_MODELS = ("solo", "decoupled_solo", "solov2", MASKRCNN)
LABELS = {
    "solo": "SOLO",
    "decoupled_solo": "Decoupled SOLO",
    "solov2": "SOLOv2",
    "decoupled_solo_light": "Decoupled SOLO light",
    "solov2_light": "SOLOv2 light",
    MASKRCNN: "Mask R-CNN R50-FPN",
}

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


def rotated(items: list, step: int) -> list:
    """items started at position step % len: [a, b, c] at step 1 -> [b, c, a]."""
    k = step % len(items)
    return items[k:] + items[:k]


def cis680_config(model: str):
    """The cis680 preset with `model`'s own settings, as `--preset cis680 --model M` gives."""
    return model_config(CIS680, model)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------------------------
# inputs and models
# --------------------------------------------------------------------------------------------


def load_images(count: int, size: tuple[int, int]) -> list[tuple[torch.Tensor, dict]]:
    """`count` built-in images resized to `size` (h, w): [(normalised (3, H, W), meta)], with
    meta["orig_size"] = meta["input_size"] so that the masks come back at the input size."""
    from dataset import build_data

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


@dataclass
class Entry:
    """One timed model and its samples."""

    name: str  # a config.MODELS name or "maskrcnn"
    model: torch.nn.Module
    weights: str  # "untrained" or the checkpoint path
    details: str  # backbone / head / settings, for the header
    thresholds: list[float] | None = None  # untrained SOLO: cate_thresh per image
    # (network s, post-processing s, masks computed, detections) per timed pass
    samples: list[tuple[float, float, int, int]] = field(default_factory=list)


def untrained_entry(name: str, cfg, num_classes: int, args, device: torch.device) -> Entry:
    """`cfg`'s model with untrained weights, made to do a trained model's work (module
    docstring): masks near 0.5, no update_thresh, `--candidates` before and after NMS."""
    from model import build_model

    torch.manual_seed(0)
    model = build_model(cfg, num_classes).to(device).eval()
    open_untrained_masks(model.head)
    model.head.update_thresh = 0.0
    model.head.pre_NMS_num = args.candidates
    model.head.keep_instance = args.candidates
    return Entry(name, model, "untrained", describe(cfg))


def build_solo_untrained(name: str, args, device: torch.device) -> Entry:
    return untrained_entry(name, cis680_config(name), NUM_CLASSES, args, device)


RELEASED = Path(__file__).resolve().parents[1] / "tests" / "data" / "mmdet_reference"


def released_names() -> list[str]:
    """The released mmdetection architectures this project maps (their reference files)."""
    return sorted(p.stem for p in RELEASED.glob("*.json"))


def build_released_untrained(name: str, args, device: torch.device) -> Entry:
    """A released architecture (`zoo.reference_config`: mmdetection's recorded key shapes, 80
    COCO classes, its released test settings) with untrained weights, set up for timing as
    the other untrained SOLO models."""
    import zoo

    cfg = zoo.reference_config(json.loads((RELEASED / f"{name}.json").read_text()))
    LABELS[name] = name
    return untrained_entry(name, cfg, len(zoo.COCO_CLASSES), args, device)


def build_solo_checkpoint(path: str, device: torch.device) -> Entry:
    from model import load_model

    model, cfg, _ = load_model(path, device)
    return Entry(cfg.model, model, path, describe(cfg))


def describe(cfg) -> str:
    towers = f"towers {cfg.stacked_convs} x {cfg.seg_feat_channels}"
    if cfg.model.startswith("solov2"):
        towers += f", E {cfg.kernel_channels}"
    return f"ResNet-{cfg.depth} FPN {cfg.fpn_channels}, {towers}"


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


def build_maskrcnn(num_classes: int, size: tuple[int, int], device: torch.device) -> Entry:
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    H, W = size
    torch.manual_seed(0)
    model = maskrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=num_classes + 1,
        min_size=min(H, W),  # short side already at min_size and long side at max_size:
        max_size=max(H, W),  # GeneralizedRCNNTransform keeps the size (scale 1)
        box_score_thresh=0.0,
    )
    details = "ResNet-50 FPN 256 (torchvision), box_score_thresh 0, up to 100 detections"
    return Entry(MASKRCNN, model.to(device).eval(), "untrained", details)


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
def run_solo(entry: Entry, img, meta, index: int, device) -> tuple[float, float, int, int]:
    """One image: (network s, post-processing s, masks computed, detections)."""
    model = entry.model
    if entry.thresholds is not None:
        model.head.cate_thresh = entry.thresholds[index]
    x = img[None].to(device)  # (1, 3, H, W)
    sync(device)
    t0 = time.perf_counter()
    preds = model.head(model.backbone(x), eval=True)
    sync(device)
    t1 = time.perf_counter()
    results = model.head.PostProcess(preds, [meta], padded_size=tuple(x.shape[-2:]))
    sync(device)
    t2 = time.perf_counter()
    masks = int((flat_cate_scores(preds[0]) > model.head.cate_thresh).sum())
    return t1 - t0, t2 - t1, masks, len(results[0]["scores"])


@torch.inference_mode()
def run_maskrcnn(entry: Entry, img, meta, index: int, device) -> tuple[float, float, int, int]:
    """One image, split as `GeneralizedRCNN.forward` runs it in eval mode: (network s,
    paste s, masks computed (= detections before pasting), detections)."""
    model = entry.model
    x = denormalised(img, meta).to(device)  # (3, h, w) in [0, 1]
    original_sizes = [tuple(x.shape[-2:])]
    sync(device)
    t0 = time.perf_counter()
    image_list, _ = model.transform([x])
    features = model.backbone(image_list.tensors)
    proposals, _ = model.rpn(image_list, features)
    detections, _ = model.roi_heads(features, proposals, image_list.image_sizes)
    sync(device)
    t1 = time.perf_counter()
    detections = model.transform.postprocess(detections, image_list.image_sizes, original_sizes)
    sync(device)
    t2 = time.perf_counter()
    kept = len(detections[0]["scores"])
    return t1 - t0, t2 - t1, kept, kept


def run_once(entry: Entry, images, index: int, device) -> tuple[float, float, int, int]:
    img, meta = images[index]
    run = run_maskrcnn if entry.name == MASKRCNN else run_solo
    return run(entry, img, meta, index, device)


def time_interleaved(entries: list[Entry], images, device, warmup: int, repeats: int) -> None:
    """Warm-up passes, then `repeats` rounds over the images; at every step each model runs
    the same image once, in an order rotated by one per step. Fills `entry.samples`."""
    for step in range(warmup):
        for entry in rotated(entries, step):
            run_once(entry, images, step % len(images), device)
    for step in range(repeats * len(images)):
        for entry in rotated(entries, warmup + step):
            entry.samples.append(run_once(entry, images, step % len(images), device))


def summary(entry: Entry) -> dict:
    """Medians (ms per image) over the timed passes, and what the model computed."""
    net = [1000 * s[0] for s in entry.samples]
    post = [1000 * s[1] for s in entry.samples]
    total = [a + b for a, b in zip(net, post, strict=True)]
    return {
        "model": entry.name,
        "weights": entry.weights,
        "details": entry.details,
        "passes": len(total),
        "network_ms": statistics.median(net),
        "post_ms": statistics.median(post),
        "total_ms": statistics.median(total),
        "total_min_ms": min(total),
        "total_max_ms": max(total),
        "masks_per_image": statistics.mean(s[2] for s in entry.samples),
        "detections_per_image": statistics.mean(s[3] for s in entry.samples),
    }


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def format_table(rows: list[dict]) -> str:
    """One line per model; ratios are its median total over SOLO's and Mask R-CNN's."""
    head = (
        f"{'model':<22}{'network':>9}{'post':>8}{'total':>9}{'min-max total':>16}"
        f"{'masks':>7}{'dets':>7}{'/ SOLO':>8}{'/ Mask R-CNN':>14}"
    )
    lines = [head, f"{'':<22}{'ms':>9}{'ms':>8}{'ms':>9}{'ms':>16}"]
    for r in rows:
        spread = f"{r['total_min_ms']:.0f}-{r['total_max_ms']:.0f}"
        vs_solo = f"{r['vs_solo']:.2f}x" if r["vs_solo"] is not None else "-"
        vs_mrcnn = f"{r['vs_maskrcnn']:.2f}x" if r["vs_maskrcnn"] is not None else "-"
        lines.append(
            f"{LABELS.get(r['model'], r['model']):<22}{r['network_ms']:>9.1f}{r['post_ms']:>8.1f}"
            f"{r['total_ms']:>9.1f}{spread:>16}{r['masks_per_image']:>7.1f}"
            f"{r['detections_per_image']:>7.1f}{vs_solo:>8}{vs_mrcnn:>14}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models",
        nargs="+",
        default=list(DEFAULT_MODELS),
        choices=CHOICES,
        help="models to time side by side (default: solo decoupled_solo solov2 maskrcnn)",
    )
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="input size, multiples of 32 (default: the cis680 preset's padded 800 1088)",
    )
    parser.add_argument("--images", type=int, default=3, help="distinct images")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds over the images")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes of each model")
    parser.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="RUN",
        help="time this trained run (folder or file) instead of its untrained model type; "
        "repeatable, one per model type",
    )
    parser.add_argument(
        "--candidates",
        type=int,
        default=100,
        help="untrained SOLO models: candidates per image let through cate_thresh, and the "
        "pre-NMS and kept caps",
    )
    parser.add_argument(
        "--released",
        nargs="+",
        default=[],
        choices=released_names(),
        metavar="NAME",
        help="also time these released mmdetection architectures (untrained, 80 classes): "
        + ", ".join(released_names()),
    )
    parser.add_argument("--pre-nms-num", type=int, default=None, help="override, all SOLO")
    parser.add_argument("--keep-instance", type=int, default=None, help="override, all SOLO")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--out", default="", help="also write the table as json here")
    return parser


def build_entries(args, size, device) -> list[Entry]:
    """The models in `--models` order, checkpoints replacing (or added after) their type."""
    trained = {}
    for path in args.checkpoint:
        entry = build_solo_checkpoint(path, device)
        if entry.name in trained:
            raise SystemExit(f"bench_infer: two --checkpoint runs of model {entry.name!r}")
        trained[entry.name] = entry
    names = list(dict.fromkeys(args.models))
    names += [name for name in trained if name not in names]
    entries = []
    for name in names:
        if name == MASKRCNN:
            continue  # built last, with the SOLO models' class count
        entries.append(trained.get(name) or build_solo_untrained(name, args, device))
    entries += [build_released_untrained(name, args, device) for name in args.released]
    for entry in entries:
        if args.pre_nms_num is not None:
            entry.model.head.pre_NMS_num = args.pre_nms_num
        if args.keep_instance is not None:
            entry.model.head.keep_instance = args.keep_instance
    if MASKRCNN in names:
        num_classes = NUM_CLASSES
        if trained:
            num_classes = next(iter(trained.values())).model.head.num_classes - 1
        if args.released:
            num_classes = 80  # COCO's, as the released models
        entries.insert(names.index(MASKRCNN), build_maskrcnn(num_classes, size, device))
    return entries


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.images < 1 or args.repeats < 1 or args.warmup < 0 or args.candidates < 1:
        parser.error("--images, --repeats and --candidates must be >= 1, --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    from dataset import padded_size
    from model import resolve_device

    device = resolve_device(args.device)
    size = tuple(args.size) if args.size else padded_size(tuple(CIS680.input_size), CIS680.pad_to)
    entries = build_entries(args, size, device)
    images = load_images(args.images, size)
    H, W = images[0][0].shape[-2:]
    for entry in entries:
        if entry.name != MASKRCNN and entry.weights == "untrained":
            entry.thresholds = solo_thresholds(entry.model, images, device, args.candidates)

    time_interleaved(entries, images, device, args.warmup, args.repeats)

    rows = [summary(entry) for entry in entries]
    by_name = {r["model"]: r for r in rows}
    for r in rows:
        for key, ref in (("vs_solo", "solo"), ("vs_maskrcnn", MASKRCNN)):
            r[key] = r["total_ms"] / by_name[ref]["total_ms"] if ref in by_name else None

    print(
        f"inference, batch 1, {H} x {W}, {args.images} images x {args.repeats} repeats after "
        f"{args.warmup} warm-up pass(es), models interleaved, {device}, "
        f"{torch.get_num_threads()} threads"
    )
    for entry in entries:
        print(f"  {LABELS.get(entry.name, entry.name)}: {entry.weights}, {entry.details}")
    if any(e.thresholds is not None for e in entries):
        caps = (
            f"pre_nms_num {args.pre_nms_num or args.candidates}, "
            f"keep_instance {args.keep_instance or args.candidates}"
        )
        print(
            f"  untrained SOLO models made to do a trained model's work alike: per image "
            f"cate_thresh just below the {args.candidates}th category score, {caps}, mask "
            "probabilities near 0.5, update_thresh 0"
        )
    print(
        "median ms / image over the timed passes (total: median of network + post per pass); "
        "masks: masks computed / image; dets: detections returned / image; ratios: total / "
        "the reference's total"
    )
    print(format_table(rows))
    for r in rows:
        if r["model"] != MASKRCNN and r["detections_per_image"] == 0:
            print(
                f"WARNING: no {r['model']} detection came out ({r['masks_per_image']:.0f} masks "
                "computed / image): its post-processing time leaves out Matrix NMS and the resize"
            )
    if "solov2" in by_name:
        v2 = by_name["solov2"]
        checks = [
            f"{ref_label} {v2[key]:.2f}x ({'faster' if v2[key] < 1 else 'NOT faster'})"
            for key, ref_label in (("vs_solo", "SOLO"), ("vs_maskrcnn", "Mask R-CNN"))
            if v2[key] is not None
        ]
        if checks:
            print("SOLOv2 total time per image vs " + ", vs ".join(checks))
    print(f"peak RSS of this process: {peak_rss_mb():.0f} MiB")

    table = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "input_size": [int(H), int(W)],
        "images": args.images,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "candidates": args.candidates,
        "models": rows,
        "peak_rss_mb": peak_rss_mb(),
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(table, indent=2))
    return table


if __name__ == "__main__":
    main()
