"""Run a trained SOLO checkpoint: pictures of the masks, a COCO results json, and mask AP.

    python main_infer.py --checkpoint runs/solo_cpu                 # the run's held-out split
    python main_infer.py --checkpoint runs/solo_cpu --eval          # + COCO mask AP table
    python main_infer.py --checkpoint runs/solo_cpu/last.pt --images photo.jpg folder/
    python main_infer.py --checkpoint solov2_r50_fpn_3x_coco.pth --images photo.jpg
    python main_infer.py --checkpoint solov2_r50_fpn_3x_coco.pth --eval \
        --data instances_val2017.json --coco-images val2017/

`--checkpoint` takes this project's run folders and checkpoints, and the released files of the
model zoos as they are downloaded (mmdetection, the authors' WXinlong/SOLO, AdelaiDet; `zoo.py`
reads them, builds the released architecture with its test settings and loads it strictly).
Predicted classes are matched to the evaluated data's by name (`align_labels`), so a COCO
model scores on a json that holds a subset of COCO's categories.

Pictures (`<image>_pred.png`: masks over the image in a colour per class, with class name and
score) and `results.json` (COCO results format, RLE masks) go to `--out` (default
`RUN/inference`). With `--images` there is no annotation file, so `images.json` beside it names
the images (ids, files, sizes) and the categories: `COCO("images.json").loadRes("results.json")`
reads them; a model of the 80 COCO classes gives COCO's own category ids (1..90).
The model is rebuilt from the config stored in the checkpoint.

`--runtime` says where a checkpoint's network runs (`runtime.py`): `auto` (the default) runs it
in ONNX Runtime on the CPU for 20 images or more, in PyTorch otherwise and on a GPU; `torch` and
`onnxruntime` force one. The network is exported in memory when the run starts (1 s for the
CPU preset's model, about 10 s for a ResNet-50 one) and checked against PyTorch; the
post-processing is PyTorch's in both, so the detections are the same up to float rounding.
`--workers N` decodes images in N processes beside the model.

    python main_infer.py --onnx runs/solo_cpu/solo.onnx [--images ...] [--eval]

runs a model exported by `export.py` with ONNX Runtime on the CPU instead, one image at a time
at the exported input size (its config, class names and thresholds come from the file's
metadata), and writes the same pictures and json (default folder: `inference_onnx` beside the
file). An image whose padded size differs from the exported one is zero-padded to it (or,
larger, resized to fit: see `export.graph_input`); the PyTorch path runs each image in its own
frame instead (`SOLOModel.predict`), so for a smaller image the two may differ.

Shape legend: B batch, k kept instances, h0 x w0 original image size, H x W padded input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import model as project_model
import zoo
from dataset import EVERY_IMAGE_HELD_OUT, build_data
from errors import ModelFileError
from evaluation import (
    data_loader,
    detections_of,
    format_table,
    images_json,
    predict_batches,
    score,
    write_json,
    write_results_json,
)
from export import OnnxSOLO
from model import resolve_device
from runtime import RUNTIMES, OnnxNetwork, choose
from samples import PhotoDataset, image_to_rgb8, without_augment
from visualize import draw_instances

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}

# --------------------------------------------------------------------------------------------
# running a model over data
# --------------------------------------------------------------------------------------------


def predict_onnx(runner, dataset, source) -> list[tuple[dict, dict]]:
    """[(meta, result)] for every image of `dataset` from an `export.OnnxSOLO`, one at a time;
    `source(i)` gives image i's original (3, h0, w0) uint8 (for an image that must be resized to
    fit the exported input). Warns for each image whose result may differ from the PyTorch
    path's: more candidates passed than the graph holds (see export.py, "Static shapes")."""
    out = []
    for i in range(len(dataset)):
        img, _, _, _, meta = dataset[i]
        meta, result, outputs = runner.predict(img, meta, lambda i=i: source(i))
        if not bool(outputs["exact"]):
            print(
                f"warning: {meta.get('file_name', i)}: {int(outputs['num_candidates'])} entries "
                f"passed cate_thresh, more than the graph's {runner.max_candidates}; the result "
                "may differ from the PyTorch model's (export again with a larger "
                "--max-candidates)",
                file=sys.stderr,
            )
        out.append((meta, result))
    return out


# --------------------------------------------------------------------------------------------
# loading a checkpoint and images
# --------------------------------------------------------------------------------------------


def load_model(path, device) -> tuple[torch.nn.Module, object, tuple[str, ...]]:
    """(model in eval mode on `device`, its config, class names) from a run folder, one of
    this project's checkpoints (`model.load_model`), or a released model zoo file (`zoo`).
    The file is read once.

    A file that is neither keeps this project's one-line ModelFileError, which then says that
    no released layout fits either; a released file whose weights do not fit gets zoo's."""
    path = Path(path)
    if path.is_dir():
        return project_model.load_model(path, device)
    neither = (
        "; nor is it a released SOLO / SOLOv2 file (mmdetection, WXinlong/SOLO or AdelaiDet layout)"
    )
    try:
        state = project_model.read_torch_file(path)
    except ModelFileError as ours:
        raise ModelFileError(f"{ours}{neither}") from ours
    try:
        project_model.check_contents(path, state)
    except ModelFileError as ours:
        try:
            fmt = zoo.detect_format(state, path)
        except ModelFileError:
            raise ModelFileError(f"{ours}{neither}") from ours
        if fmt == "project":  # ours, with a config this code cannot read
            raise
        net, class_names, cfg = zoo.build_released(state, fmt, path)
        names = f"{len(class_names)} classes"
        print(f"{path}: {zoo.FORMATS[fmt]}, {cfg.model} ResNet-{cfg.depth}, {names}")
        return net.to(device).eval(), cfg, class_names
    return project_model.model_of(state, path, device)


def onnx_network(model, forced: bool) -> OnnxNetwork | None:
    """`runtime.OnnxNetwork(model)`, timed. When its export or check fails, `--runtime auto`
    (forced False) says so and goes on in PyTorch; `--runtime onnxruntime` raises."""
    start = time.perf_counter()
    try:
        network = OnnxNetwork(model)
    except Exception as err:  # the exporter's and ONNX Runtime's own types, and the check's
        if forced:
            raise
        print(f"network stays in PyTorch: the ONNX Runtime one failed ({err})", file=sys.stderr)
        return None
    print(f"network in ONNX Runtime (exported and checked in {time.perf_counter() - start:.1f} s)")
    return network


def align_labels(
    predictions: list[tuple[dict, dict]], model_names, data_names
) -> list[tuple[dict, dict]]:
    """Predictions with the model's labels (1..C_model) turned into the data's (1..C_data) by
    class name (`zoo.class_key`: case and "_" against " " aside); instances of a class the data
    does not have are dropped. The same names in the same order change nothing.
    No name in common is a ValueError naming a few of each."""
    model_names, data_names = tuple(model_names), tuple(data_names)
    if model_names == data_names:
        return predictions
    in_data = zoo.class_positions(data_names)
    to_data = torch.zeros(len(model_names) + 1, dtype=torch.int64)  # 0: not in the data
    for k, name in enumerate(model_names, start=1):
        if zoo.class_key(name) in in_data:
            to_data[k] = in_data[zoo.class_key(name)] + 1
    if not to_data.any():
        raise ValueError(
            f"the model's classes ({', '.join(model_names[:5])}, ...) and the data's "
            f"({', '.join(data_names[:5])}, ...) have no name in common"
        )
    aligned = []
    for meta, result in predictions:
        labels = to_data[result["labels"]]
        keep = labels > 0
        aligned.append((meta, {**{k: v[keep] for k, v in result.items()}, "labels": labels[keep]}))
    return aligned


def list_images(paths: list[str]) -> list[Path]:
    """Image files named directly, or found (sorted) in named folders."""
    found = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such image file or folder")
    if not found:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {paths}")
    return found


class ImageFiles(PhotoDataset):
    """Plain image files in the sample contract, without objects, for inference: resized as the
    photo readers resize (`samples.PhotoDataset`), short side to input_size[0] unless the long
    side would pass input_size[1]; meta["image_id"] is the file's position in `files`."""

    def __init__(self, files: list[Path], input_size: tuple[int, int], pad_to: int):
        self.files = files
        self.short_side, self.max_side = input_size
        self.pad_to = pad_to
        self.indices = list(range(len(files)))
        self._warned: set = set()

    def load(self, i: int) -> torch.Tensor:
        """Image i as uint8 (3, h0, w0), decoded as the data sets do (16-bit scaled to 8)."""
        path = self.files[self.indices[i]]
        try:
            with Image.open(path) as im:
                array = image_to_rgb8(im, path)
        except OSError as err:
            raise OSError(f"{path}: cannot read the image ({err})") from err
        return torch.from_numpy(array)

    def raw(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        image = self.load(i).numpy()
        h0, w0 = image.shape[1:]
        no_masks = np.zeros((0, h0, w0), dtype=np.uint8)
        return image, no_masks, np.zeros((0,), np.int64), np.zeros((0, 4), np.float32)

    def num_instances(self, i: int) -> int:
        return 0

    def file_name(self, i: int) -> str:
        return str(self.files[self.indices[i]])


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def save_pictures(predictions, source, class_names, out_dir: Path, score_min: float) -> int:
    """One PNG per image: kept masks with score >= score_min over the original image."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for k, (meta, result) in enumerate(predictions):
        image = source(k)
        keep = result["scores"] >= score_min
        fig = draw_instances(
            image.permute(1, 2, 0).numpy() / 255.0,  # (3, h0, w0) -> (h0, w0, 3)
            result["masks"][keep],
            result["labels"][keep],
            class_names,
            scores=result["scores"][keep],
            title=Path(str(meta["file_name"])).name,
        )
        stem = Path(str(meta["file_name"]).replace("#", "_")).stem
        fig.savefig(out_dir / f"{k:04d}_{stem}_pred.png", dpi=80)
    return len(predictions)


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model_source = parser.add_mutually_exclusive_group(required=True)
    model_source.add_argument("--checkpoint", help="run folder or checkpoint file")
    model_source.add_argument("--onnx", help="an ONNX file from export.py (ONNX Runtime, CPU)")
    parser.add_argument("--images", nargs="+", help="image files or folders (default: val split)")
    parser.add_argument("--eval", action="store_true", help="COCO mask AP on the val split")
    parser.add_argument(
        "--out", default=None, help="output folder (default RUN/inference, or inference_onnx)"
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--runtime",
        default="auto",
        choices=RUNTIMES,
        help="where a checkpoint's network runs: auto (ONNX Runtime on the CPU for 20 images or "
        "more, else PyTorch), torch, or onnxruntime; the post-processing is PyTorch's either way",
    )
    parser.add_argument("--batch-size", type=int, default=4, help="checkpoints only (--onnx: 1)")
    parser.add_argument(
        "--workers", type=int, default=0, help="processes that decode images beside the model"
    )
    parser.add_argument("--max-pictures", type=int, default=20, help="PNGs to draw (0 = all)")
    parser.add_argument("--score-min", type=float, default=0.3, help="draw masks above this")
    parser.add_argument("--data", default=None, help="evaluate on other data than the run's")
    parser.add_argument("--coco-images", default=None, help="image folder of a --data COCO json")
    parser.add_argument(
        "--all-images",
        action="store_true",
        help="evaluate every image of the data, not its held-out split (a released model: always)",
    )
    args = parser.parse_args(argv)

    if args.onnx:
        runner = OnnxSOLO(args.onnx)
        cfg, class_names = runner.cfg, runner.class_names
        default_out = Path(args.onnx).parent / "inference_onnx"
    else:
        device = resolve_device(args.device)
        model, cfg, class_names = load_model(args.checkpoint, device)
        ckpt_path = Path(args.checkpoint)
        run_dir = ckpt_path if ckpt_path.is_dir() else ckpt_path.parent
        default_out = run_dir / "inference"
    out_dir = Path(args.out) if args.out else default_out
    out_dir.mkdir(parents=True, exist_ok=True)

    if args.images:
        if args.eval:
            parser.error("--eval needs ground truth: use it without --images (val split)")
        data = ImageFiles(list_images(args.images), tuple(cfg.input_size), cfg.pad_to)
        source = data.load
    else:
        if args.data:
            cfg = replace(cfg, data=args.data, coco_images=args.coco_images or cfg.coco_images)
        # A released model was not trained on this data: all of it is held out.
        every = args.all_images or cfg.preset == "released"
        _, data = build_data(cfg, split=EVERY_IMAGE_HELD_OUT if every else None)
        data = without_augment(data)

        def source(i):
            return torch.as_tensor(data.raw(i)[0])

    if args.onnx:
        predictions = predict_onnx(runner, data, source)
    else:
        network = None
        if choose(args.runtime, device, len(data)) == "onnxruntime":
            network = onnx_network(model, forced=args.runtime == "onnxruntime")
        loader = data_loader(data, args.batch_size, args.workers)
        start = time.perf_counter()
        predictions = predict_batches(model, loader, device, network)
        seconds = time.perf_counter() - start
        rate = len(predictions) / seconds
        print(f"{len(predictions)} images in {seconds:.1f} s ({rate:.1f} images/s)")
    if not args.images:
        predictions = align_labels(predictions, class_names, data.class_names)
        class_names = data.class_names
    if args.images:  # no annotation file: COCO's ids for a COCO model, and images.json
        label_to_id = zoo.category_ids(class_names)
        detections = detections_of(predictions, label_to_category_id=label_to_id)
        write_json(out_dir / "images.json", images_json(predictions, class_names, label_to_id))
    else:
        detections = detections_of(predictions, data)
    write_results_json(out_dir / "results.json", detections)
    n_pics = len(predictions) if args.max_pictures == 0 else args.max_pictures
    save_pictures(predictions[:n_pics], source, class_names, out_dir, args.score_min)
    print(f"{len(predictions)} images: pictures and results.json in {out_dir}")

    if args.eval:
        metrics = score(data, detections)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        print(format_table(metrics))
        return metrics
    return None


if __name__ == "__main__":
    from cli import run

    run(main)
