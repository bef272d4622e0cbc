"""mmdetection's own outputs for the released SOLO / SOLOv2 architectures, as small test data.

For each supported model the script builds mmdetection's model from the config shipped in the
mmdet wheel (`mmdet/.mim/configs/solo*/`), fills every parameter and buffer with
`zoo.fill_tensor(mmdet_key, shape, seed)` (a function of the key's name, shape and the seed
only), runs mmdetection's predict on `zoo.reference_image` through the config's test pipeline
and data preprocessor (so resizing, normalisation and padding are mmdetection's), and writes
`tests/data/mmdet_reference/<name>.json`: the network outputs at a few fixed cells and pixels
of every level, the final instances (labels, scores, masks as COCO RLE), and the mmdetection
state-dict keys and shapes. Never weights: the test rebuilds them with the same function
through `zoo.fill_project_model`.

It needs mmdetection, which the project never does: run it in a scratch environment with the
repository on the path (it inserts it itself):

    python3 -m venv /tmp/mmvenv && . /tmp/mmvenv/bin/activate
    pip install torch==2.14.1 torchvision==0.29.1
    pip install mmdet==3.3.0 mmcv-lite==2.1.0 mmengine==0.10.7 pycocotools h5py
    python tools/make_mmdet_reference.py                 # all models, seed 0
    python tools/make_mmdet_reference.py --models solov2_r50_fpn_ms-3x_coco --seed 1

mmcv-lite has no compiled ops (`mmcv._ext`); a stand-in whose functions raise when called is
put in its place, which the models here never call (no DCN, no RoI ops).

What a file holds (labels are mmdetection's, 0-based: this project's label is one more):
- "outputs": per level the category scores after sigmoid and point NMS at `cells` (all C
  classes) and their maximum over classes on the whole S x S grid; SOLO: mask probabilities
  (sigmoid, resized to H/4 x W/4) of `cells` at `pixels`; Decoupled SOLO: the X and Y maps'
  probabilities of `channels` at `pixels`; SOLOv2: the kernels of `cells` (`kernel_channels`)
  and, once, the mask features at `pixels` (`feat_channels`).
- "instances": labels, scores, mask areas and boxes of all instances in mmdetection's order
  (score descending), and RLE masks at the image's size (each with its instance's `index`):
  the first ALWAYS_STORED, then the others from the shortest RLE up, as RLE_BUDGET allows.

Shape legend: S grid size of a level, C classes, E kernel channels, H x W the padded input.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import zoo  # noqa: E402  (the repository, put on the path above)
from conventions import IMAGENET_MEAN, IMAGENET_STD, masks_to_boxes  # noqa: E402

# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------

# name -> config under mmdet/.mim/configs (the released R50/R101/R18/R34 models without DCN;
# the 1x configs build the same networks as the 3x ones).
MODELS = {
    "solo_r50_fpn_3x_coco": "solo/solo_r50_fpn_3x_coco.py",
    "decoupled-solo_r50_fpn_3x_coco": "solo/decoupled-solo_r50_fpn_3x_coco.py",
    "decoupled-solo-light_r50_fpn_3x_coco": "solo/decoupled-solo-light_r50_fpn_3x_coco.py",
    "solov2_r50_fpn_ms-3x_coco": "solov2/solov2_r50_fpn_ms-3x_coco.py",
    "solov2_r101_fpn_ms-3x_coco": "solov2/solov2_r101_fpn_ms-3x_coco.py",
    "solov2-light_r18_fpn_ms-3x_coco": "solov2/solov2-light_r18_fpn_ms-3x_coco.py",
    "solov2-light_r34_fpn_ms-3x_coco": "solov2/solov2-light_r34_fpn_ms-3x_coco.py",
    "solov2-light_r50_fpn_ms-3x_coco": "solov2/solov2-light_r50_fpn_ms-3x_coco.py",
}
OUT = ROOT / "tests" / "data" / "mmdet_reference"
MAX_WIDTH = 1216  # widest reference image (zoo.reference_image's default)
DIGITS = 7  # significant digits stored: 1e-7 relative, far below the test's 1e-4
# RLE characters stored per file (`masks_to_store`): keeps each file under 200 KB; every
# instance keeps its label, score, area and box.
RLE_BUDGET = 80_000
ALWAYS_STORED = 5  # the first (highest-scoring) instances whose masks are always stored

# --------------------------------------------------------------------------------------------
# pure functions
# --------------------------------------------------------------------------------------------


def install_mmcv_ext_stub() -> None:
    """Put a stand-in `mmcv._ext` in sys.modules when mmcv has none (mmcv-lite): importing
    works, calling one of its compiled ops raises."""
    try:
        import mmcv._ext  # noqa: F401  (present in a full mmcv build)
    except ImportError:
        stub = types.ModuleType("mmcv._ext")

        def missing(name):
            def call(*args, **kwargs):
                raise RuntimeError(f"mmcv._ext.{name}: mmcv-lite has no compiled ops")

            return call

        stub.__getattr__ = lambda name: missing(name)  # module-level __getattr__ (PEP 562)
        sys.modules["mmcv._ext"] = stub


def image_size_for(scale: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a reference image that mmdetection's keep-ratio Resize to `scale` leaves
    as it is (short side = the scale's short side, long side not above its long side) and
    that needs no padding (multiples of 32), at most MAX_WIDTH wide to keep the run short:
    (1333, 800) -> (800, 1216), (852, 512) -> (512, 832), (768, 448) -> (448, 768)."""
    short, long = min(scale), max(scale)
    return short, min(long // 32 * 32, MAX_WIDTH)


def fixed_cells(S: int) -> list[tuple[int, int]]:
    """Four grid cells (row, col) of an S x S level: off-centre, centre, lower right, corner."""
    return [(S // 4, S // 3), (S // 2, S // 2), (3 * S // 4, 2 * S // 3), (S - 1, 0)]


def fixed_pixels(h: int, w: int) -> list[tuple[int, int]]:
    """Four pixels (y, x) of an h x w map."""
    return [(h // 4, w // 4), (h // 2, w // 2), (3 * h // 4, 3 * w // 5), (h // 10, 9 * w // 10)]


def rounded(values) -> list:
    """Tensor / array values as nested lists of floats with DIGITS significant digits."""
    array = np.asarray(values, dtype=np.float64)
    return np.vectorize(lambda v: float(f"{v:.{DIGITS}g}"), otypes=[float])(array).tolist()


def point_nms_scores(cls_logits: torch.Tensor) -> torch.Tensor:
    """mmdetection's eval category scores: sigmoid, then keep 2x2 local maxima (point NMS);
    (B, C, S, S) -> (B, C, S, S). SOLOv2's forward returns logits and its predict_by_feat does
    this; SOLO's forward does it itself."""
    scores = cls_logits.sigmoid()
    local_max = F.max_pool2d(scores, 2, stride=1, padding=1)
    return scores * (local_max[:, :, :-1, :-1] == scores)


def level_outputs(kind: str, head_out: tuple, num_grids: list[int]) -> dict:
    """The stored network outputs of one image (batch of one) from the mask head's forward."""
    if kind == "solov2":
        kernels, cls_logits, mask_feats = head_out
        cls_scores = [point_nms_scores(c) for c in cls_logits]
    elif kind == "solo":
        masks, cls_scores = head_out
    else:
        masks_x, masks_y, cls_scores = head_out
    h4, w4 = (head_out[2] if kind == "solov2" else head_out[0][0]).shape[-2:]
    pixels = fixed_pixels(h4, w4)
    levels = []
    for lvl, S in enumerate(num_grids):
        cells = fixed_cells(S)
        scores = cls_scores[lvl][0]  # (C, S, S)
        entry = {
            "S": S,
            "cells": cells,
            "cate_scores": rounded([scores[:, i, j] for i, j in cells]),  # (4, C)
            "cate_max": rounded(scores.max(0).values),  # (S, S)
            "num_above_score_thr": int((scores > 0.1).sum()),
        }
        if kind == "solo":
            entry["pixels"] = pixels
            entry["mask_probs"] = rounded(
                [[masks[lvl][0, i * S + j, y, x] for y, x in pixels] for i, j in cells]
            )  # (4 cells, 4 pixels)
        elif kind == "solov2":
            E = kernels[lvl].shape[1]
            channels = [0, 1, E // 2, E - 1]
            entry["kernel_channels"] = channels
            entry["kernels"] = rounded(
                [[kernels[lvl][0, e, i, j] for e in channels] for i, j in cells]
            )  # (4 cells, 4 channels)
        else:
            channels = [S // 3, S // 2, 2 * S // 3]
            entry["pixels"] = pixels
            entry["channels"] = channels
            entry["x_probs"] = rounded(
                [[masks_x[lvl][0, c, y, x] for y, x in pixels] for c in channels]
            )
            entry["y_probs"] = rounded(
                [[masks_y[lvl][0, c, y, x] for y, x in pixels] for c in channels]
            )
        levels.append(entry)
    out = {"mask_size": [int(h4), int(w4)], "levels": levels}
    if kind == "solov2":
        E = mask_feats.shape[1]
        channels = [0, 1, E // 2, E - 1]
        out["feat_channels"] = channels
        out["pixels"] = pixels
        out["mask_feats"] = rounded(
            [[mask_feats[0, e, y, x] for y, x in pixels] for e in channels]
        )  # (4 channels, 4 pixels)
    return out


def masks_to_store(rles: list[dict]) -> list[int]:
    """Indices of the instances whose RLE is stored: the first ALWAYS_STORED, then the rest
    from the shortest RLE up while the total stays within RLE_BUDGET; increasing."""
    first = list(range(min(ALWAYS_STORED, len(rles))))
    rest = sorted(range(len(first), len(rles)), key=lambda k: len(rles[k]["counts"]))
    chosen, used = [], 0
    for k in first + rest:
        used += len(rles[k]["counts"])
        if k not in first and used > RLE_BUDGET:
            break
        chosen.append(k)
    return sorted(chosen)


def mask_boxes(masks: np.ndarray) -> list[list[int]]:
    """(k, h, w) bool -> per mask [x1, y1, x2, y2], pixel edges (conventions.masks_to_boxes)."""
    return masks_to_boxes(masks).astype(int).tolist()


def encode_masks(masks: np.ndarray) -> list[dict]:
    """(k, h, w) bool -> COCO RLE dicts with str counts (pycocotools takes (h, w, k))."""
    rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": list(r["size"]), "counts": r["counts"].decode("ascii")} for r in rles]


# --------------------------------------------------------------------------------------------
# mmdetection
# --------------------------------------------------------------------------------------------


def run_model(name: str, rel: str, seed: int) -> dict:
    """Build `rel`, fill it, run it on the reference image; the JSON record."""
    # Imported here, after `install_mmcv_ext_stub`: mmdet's models import mmcv's compiled ops.
    import mmdet
    from mmcv.transforms import Compose
    from mmdet.registry import MODELS as REGISTRY
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    register_all_modules()
    cfg = Config.fromfile(Path(mmdet.__file__).parent / ".mim" / "configs" / rel)
    model = REGISTRY.build(cfg.model).eval()
    own = model.state_dict()
    model.load_state_dict(
        {k: zoo.fill_tensor(k, v.shape, seed).to(v.dtype) for k, v in own.items()}, strict=True
    )
    head_cfg = cfg.model.mask_head
    kind = {"SOLOHead": "solo", "SOLOV2Head": "solov2"}.get(head_cfg.type, "decoupled")

    resize = next(t for t in cfg.test_pipeline if t["type"] == "Resize")
    h, w = image_size_for(tuple(resize["scale"]))
    image = zoo.reference_image(h, w)  # RGB
    pipeline = Compose(
        [
            dict(type="mmdet.LoadImageFromNDArray"),
            dict(type="mmdet.Resize", scale=tuple(resize["scale"]), keep_ratio=True),
            dict(
                type="mmdet.PackDetInputs",
                meta_keys=("img_id", "ori_shape", "img_shape", "scale_factor"),
            ),
        ]
    )
    data = pipeline(dict(img=np.ascontiguousarray(image[..., ::-1]), img_id=0))  # BGR, as read
    batch = {"inputs": [data["inputs"]], "data_samples": [data["data_samples"]]}

    captured = {}

    def keep(module, args, output):  # a copy: SOLOv2's predict rewrites the list in place
        captured["out"] = tuple(
            [t.clone() for t in o] if isinstance(o, list) else o.clone() for o in output
        )

    hook = model.mask_head.register_forward_hook(keep)
    with torch.no_grad():
        pre = model.data_preprocessor(batch, False)
        results = model.predict(pre["inputs"], pre["data_samples"])
    hook.remove()

    # The input tensor mmdetection ran is this project's normalisation of the image.
    ours = (
        torch.from_numpy(image).permute(2, 0, 1).float() / 255
        - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    ) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    input_diff = float((pre["inputs"][0] - ours).abs().max())
    meta = pre["data_samples"][0].metainfo
    if tuple(pre["inputs"].shape[-2:]) != (h, w) or input_diff > 1e-5:
        raise RuntimeError(f"{name}: the input was resized or padded ({meta}, diff {input_diff})")

    inst = results[0].pred_instances
    masks = inst.masks.cpu().numpy().astype(bool)
    rles = encode_masks(masks)
    return {
        "model": name,
        "config": f"mmdet/.mim/configs/{rel}",
        "mmdet_version": mmdet.__version__,
        "torch_version": torch.__version__,
        "seed": seed,
        "head": head_cfg.type,
        "image_size": [h, w],
        "input_max_abs_diff_to_project_normalisation": input_diff,
        "scale_factor": list(meta["scale_factor"]),
        "label_base": 0,
        "test_cfg": dict(cfg.model.test_cfg),
        "outputs": level_outputs(kind, captured["out"], list(head_cfg.num_grids)),
        "instances": {
            "labels": inst.labels.tolist(),
            "scores": rounded(inst.scores),
            "areas": masks.reshape(len(masks), -1).sum(1).tolist(),
            "boxes": mask_boxes(masks),
            "masks": [dict(index=k, **rles[k]) for k in masks_to_store(rles)],
        },
        "state_dict_shapes": {k: list(v.shape) for k, v in own.items()},
    }


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    install_mmcv_ext_stub()
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in args.models:
        record = run_model(name, MODELS[name], args.seed)
        path = args.out / f"{name}.json"
        path.write_text(json.dumps(record, separators=(",", ":")) + "\n")
        passed = [level["num_above_score_thr"] for level in record["outputs"]["levels"]]
        print(
            f"{path}: {len(record['instances']['labels'])} instances, "
            f"{path.stat().st_size / 1024:.0f} KB, entries above score 0.1 per level {passed}"
        )
        written.append(path)
    return written


if __name__ == "__main__":
    main()
