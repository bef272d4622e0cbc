"""Train the peer of `benchmarks/bench_vs_peers.py`: Ultralytics YOLO11n-seg on the built-in data.

The same images, the same held-out split and the same wall-clock budget as the CPU preset's
`python main_train.py` (19 minutes on 2 cores): the training split is written out as a YOLO
segmentation data set (PNG images at their original size, one polygon per instance: the
outer contour of its mask, the largest one when a mask has several parts), YOLO11n-seg is built
from its yaml (no pretrained weights; nothing can be downloaded here) and trained with
Ultralytics' defaults but `imgsz=256` (the CPU preset's input is 192 x 256), `time` (the
budget), `val=False` (the held-out split is not used to pick a checkpoint) and `plots=False`
(plots want a font file from the internet), and `--threads` torch threads (2: Ultralytics
would take cores - 1). Then its COCO mask AP on the held-out split is
measured with this project's evaluation (`evaluation.score`, pycocotools), masks at the
original size (`retina_masks=True`), conf 0.001 and at most 100 detections, as COCO scores.

Ultralytics is a benchmark dependency, never a requirement of the project: run this in a
separate environment,

    python -m venv /tmp/peers && . /tmp/peers/bin/activate
    pip install torch==2.14.1 torchvision==0.29.1 && pip install -r requirements.txt ultralytics
    YOLO_OFFLINE=1 python tools/train_yolo_peer.py --out runs/yolo_peer --minutes 19

Writes OUT/yolo11n-seg.pt (the trained weights), OUT/metrics.json (the held-out AP) and OUT/data
(the exported data set and its data.yaml). `bench_vs_peers.py --yolo OUT/yolo11n-seg.pt` times it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import CPU  # noqa: E402
from dataset import build_data  # noqa: E402
from evaluation import detections_of, format_table, score  # noqa: E402
from samples import without_augment  # noqa: E402

os.environ.setdefault("YOLO_OFFLINE", "1")


def polygon(mask: np.ndarray) -> np.ndarray | None:
    """(h, w) {0, 1} mask -> (n, 2) x, y pixel corners of its largest outer contour, or None
    for a mask of fewer than 3 contour points."""
    import cv2  # Ultralytics' own dependency

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    largest = max(contours, key=cv2.contourArea).reshape(-1, 2)
    return largest if len(largest) >= 3 else None


def export_split(dataset, folder: Path, split: str) -> int:
    """Write `dataset`'s images (PNG) and YOLO polygon labels under folder/{images,labels}/split;
    returns the number of instances written."""
    from PIL import Image

    images, labels = folder / "images" / split, folder / "labels" / split
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    count = 0
    for i in range(len(dataset)):
        image, masks, classes, _ = dataset.raw(i)
        h0, w0 = image.shape[-2:]
        Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0))).save(
            images / f"{i:05d}.png"
        )
        lines = []
        for mask, label in zip(np.asarray(masks), np.asarray(classes), strict=True):
            points = polygon(mask)
            if points is None:
                continue
            xy = (points / np.array([w0, h0])).reshape(-1)
            lines.append(" ".join([str(int(label) - 1), *(f"{v:.5f}" for v in xy)]))
        (labels / f"{i:05d}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
        count += len(lines)
    return count


def yolo_predictions(model, dataset, conf: float, max_det: int, imgsz: int) -> list:
    """[(meta, result)] as `evaluation.predict_batches` gives them, from YOLO on each image of
    `dataset` (masks at the original size)."""
    out = []
    for i in range(len(dataset)):
        image = dataset.raw(i)[0]  # (3, h0, w0) RGB uint8
        bgr = np.ascontiguousarray(image.transpose(1, 2, 0)[:, :, ::-1])
        r = model.predict(
            bgr, imgsz=imgsz, conf=conf, max_det=max_det, retina_masks=True, verbose=False
        )[0]
        h0, w0 = image.shape[-2:]
        if r.masks is None:
            masks = torch.zeros((0, h0, w0), dtype=torch.uint8)
        else:
            masks = (r.masks.data > 0.5).to(torch.uint8).cpu()
        result = {
            "masks": masks,
            "labels": r.boxes.cls.cpu().to(torch.int64) + 1,
            "scores": r.boxes.conf.cpu().float(),
        }
        out.append(({"image_id": dataset.image_ids[i]}, result))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/yolo_peer", help="output folder")
    parser.add_argument("--minutes", type=float, default=19.0, help="training budget")
    parser.add_argument("--imgsz", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    import ultralytics.utils.torch_utils as yolo_torch_utils
    from ultralytics import YOLO

    # Ultralytics sets torch's threads to cores - 1 when it picks the device (1 on 2 cores);
    # the CPU preset trains with every core, and so does its peer.
    yolo_torch_utils.NUM_THREADS = args.threads
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    data_dir = out / "data"
    train_set, val_set = build_data(CPU)
    # the readers themselves, without augmentation (the CPU preset caches its training samples)
    train_set = without_augment(getattr(train_set, "dataset", train_set))
    val_set = without_augment(val_set)
    print(f"exporting {len(train_set)} training and {len(val_set)} held-out images to {data_dir}")
    n_train = export_split(train_set, data_dir, "train")
    n_val = export_split(val_set, data_dir, "val")
    names = dict(enumerate(train_set.class_names))  # YOLO class i is label i + 1
    yaml = data_dir / "data.yaml"
    yaml.write_text(
        f"path: {data_dir.resolve()}\ntrain: images/train\nval: images/val\nnames: {names}\n"
    )
    print(f"{n_train} training and {n_val} held-out polygons; names {names}")

    model = YOLO("yolo11n-seg.yaml", task="segment")
    start = time.time()
    model.train(
        data=str(yaml),
        imgsz=args.imgsz,
        time=args.minutes / 60,
        epochs=1000,  # `time` ends the run; Ultralytics fits its schedule to it
        device="cpu",
        val=False,
        plots=False,
        project=str(out.resolve()),
        name="train",
        exist_ok=True,
        verbose=False,
    )
    minutes = (time.time() - start) / 60
    weights = out / "train" / "weights" / "last.pt"
    shutil.copy(weights, out / "yolo11n-seg.pt")
    trained = YOLO(str(out / "yolo11n-seg.pt"), task="segment")
    predictions = yolo_predictions(trained, val_set, conf=0.001, max_det=100, imgsz=args.imgsz)
    metrics = score(val_set, detections_of(predictions, val_set))
    print(format_table(metrics))
    record = {"minutes": round(minutes, 2), "imgsz": args.imgsz, **metrics}
    (out / "metrics.json").write_text(json.dumps(record, indent=2))
    print(
        f"trained {minutes:.1f} minutes: {out / 'yolo11n-seg.pt'}, held-out AP {metrics['AP']:.3f}"
    )
    return record


if __name__ == "__main__":
    main()
