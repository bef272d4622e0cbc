"""CPU inference against the peers: this project's SOLOv2 in each runtime beside Ultralytics
YOLO11n-seg and torchvision's Mask R-CNN, end to end, in one run.

Two settings, each a table of medians (ms per image, batch 1) and ratios:

1. The CPU preset's size (`--checkpoint`, default runs/solo_cpu: the trained model of
   `python main_train.py`, input 192 x 256). The first `--images` held-out images of its data
   are written as PNG files, and every entry starts from the file: read and decode, preprocess,
   network, post-processing, masks at the original size (300 x 400 for the built-in data).
   - SOLOv2, PyTorch eager: `SOLOModel.network` then `head.PostProcess`.
   - SOLOv2, ONNX Runtime: `runtime.OnnxNetwork` (what `main_infer.py --runtime auto` uses on
     a CPU), then the same `head.PostProcess`.
   - SOLOv2, the whole ONNX graph of `export.py` (`export.OnnxSOLO`: network and static
     post-processing in the graph, the resize after it), exported with enough candidate slots
     for every timed image (more slots cost time, fewer would change results).
   - SOLOv2, its network in OpenVINO (when installed; measured, not shipped: runtime.py), then
     the same `head.PostProcess`.
   - YOLO11n-seg, Ultralytics' own PyTorch predictor (`YOLO(...).predict(file, imgsz=256,
     retina_masks=True)`: masks at the original size as for SOLO; its other settings are its
     defaults: conf 0.25, iou 0.7, its batch-norm fusion). `--yolo FILE` times trained weights
     (`tools/train_yolo_peer.py` trains them, on the same data and budget); without it an
     untrained YOLO11n-seg from its yaml is timed and the table says so: it then keeps almost
     no detection, so its post-processing and mask time are a lower bound. Ultralytics is
     optional: install it beside the project's requirements to get this row (`YOLO_OFFLINE=1`
     is set; it needs nothing from the internet with plots off).
   The held-out AP column is read from the runs' metrics.json (the checkpoint's, and
   `--yolo`'s folder's from tools/train_yolo_peer.py), not measured here.
   Throughput: `main_infer.py`'s loop over the files (DataLoader, batch `--batch-size`,
   `--workers` decoding processes) with each SOLOv2 runtime, as images/s.

2. The released models' test size (`--large`, default 800 x 1333, padded to 800 x 1344):
   SOLOv2 R50-FPN (the mmdetection release's architecture and test settings, `zoo`), in PyTorch
   eager and with its network in ONNX Runtime, beside Mask R-CNN R50-FPN in PyTorch eager (what
   its users run). From tensors (the read is a few ms of several seconds here): network and
   post-processing, masks at 800 x 1333. Untrained weights, so as in bench_infer.py every model
   is made to do a trained model's work: 100 candidates and masks for SOLOv2 (threshold set below
   each image's 100th category score, mask probabilities near 0.5), box_score_thresh 0 and its
   100 detections for Mask R-CNN. SOLOv2's untrained masks are noise over the whole image, so its
   resize is the worst case (a trained mask is resized in its own box only, postprocess.py).

Fair timing as in bench_infer.py: warm-up passes first, then `--repeats` rounds over the images,
every entry running the same image in turn, the order rotated at every step; medians of the
per-image times. Threads: `--threads` (default 2) for PyTorch, ONNX Runtime and Ultralytics.

Run (about 5 minutes on 2 cores, most of it the 800 x 1333 models):
    python benchmarks/bench_vs_peers.py --yolo runs/yolo_peer/yolo11n-seg.pt
    python benchmarks/bench_vs_peers.py --skip-large --images 20           # the small size only
    python benchmarks/bench_vs_peers.py --images 2 --repeats 1 --large 256 320   # smoke test

Shape legend: H x W padded input.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_infer import (  # noqa: E402
    build_maskrcnn,
    build_released_untrained,
    flat_cate_scores,
    load_images,
    peak_rss_mb,
    rotated,
    run_maskrcnn,
    solo_thresholds,
)

LARGE_MODEL = "solov2_r50_fpn_ms-3x_coco"  # tests/data/mmdet_reference: the released architecture
YOLO_IMGSZ = 256


@dataclass
class Runner:
    """One timed entry: `run(index)` -> (parts in s, detections) for image `index`."""

    name: str
    run: object
    samples: list = field(default_factory=list)  # (dict of part -> s, detections) per pass

    def summary(self, parts: tuple[str, ...]) -> dict:
        out = {"name": self.name, "passes": len(self.samples)}
        for part in parts:
            out[part] = 1000 * statistics.median(s[0].get(part, 0.0) for s in self.samples)
        out["total"] = 1000 * statistics.median(sum(s[0].values()) for s in self.samples)
        out["dets"] = statistics.mean(s[1] for s in self.samples)
        return out


def time_interleaved(runners: list[Runner], count: int, warmup: int, repeats: int) -> None:
    for step in range(warmup):
        for r in rotated(runners, step):
            r.run(step % count)
    for step in range(repeats * count):
        for r in rotated(runners, warmup + step):
            r.samples.append(r.run(step % count))


def table(
    rows: list[dict], parts: tuple[str, ...], reference: str | None, label: str = "", extra=()
) -> str:
    """One line per entry: parts, total, detections, the post-processing's share and the
    total over `reference`'s (headed `label`)."""
    ref = next((r["total"] for r in rows if r["name"] == reference), None)
    head = f"{'entry':<48}" + "".join(f"{p:>10}" for p in parts)
    head += f"{'total':>10}{'dets':>7}{'post %':>8}" + (f"{label:>12}" if ref else "")
    head += "".join(f"{name:>10}" for name, _ in extra)
    lines = [head]
    for r in rows:
        line = f"{r['name']:<48}" + "".join(f"{r[p]:>10.1f}" for p in parts)
        share = 100 * r.get("post", 0.0) / r["total"] if "post" in parts else float("nan")
        line += f"{r['total']:>10.1f}{r['dets']:>7.1f}{share:>7.0f}%"
        if ref:
            line += f"{r['total'] / ref:>11.2f}x"
        line += "".join(f"{fmt(r):>10}" for _, fmt in extra)
        lines.append(line)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# 1. the CPU preset's size, from files
# --------------------------------------------------------------------------------------------


def write_images(dataset, count: int, folder: Path) -> list[Path]:
    """The first `count` images of `dataset` (original size) as PNG files in `folder`."""
    from PIL import Image

    files = []
    for i in range(min(count, len(dataset))):
        image = dataset.raw(i)[0]  # (3, h0, w0) uint8
        path = folder / f"{i:04d}.png"
        Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0))).save(path)
        files.append(path)
    return files


@torch.inference_mode()
def network_and_post(model, network, img, meta) -> tuple[dict, int]:
    """One image (3, H, W) through `network` and `head.PostProcess`: ({"network": s,
    "post": s}, detections)."""
    x = img[None]
    t0 = time.perf_counter()
    preds = network(x)
    t1 = time.perf_counter()
    result = model.head.PostProcess(preds, [meta], padded_size=tuple(x.shape[-2:]))[0]
    t2 = time.perf_counter()
    return {"network": t1 - t0, "post": t2 - t1}, len(result["scores"])


def solo_runner(name: str, model, data, network) -> Runner:
    """Read + preprocess (`ImageFiles`), then `network_and_post`."""

    def run(i):
        t0 = time.perf_counter()
        img, _, _, _, meta = data[i]
        read = time.perf_counter() - t0
        parts, dets = network_and_post(model, network, img, meta)
        return {"read+pre": read, **parts}, dets

    return Runner(name, run)


def graph_runner(name: str, onnx_solo, data) -> Runner:
    """The whole exported graph: read + preprocess, the graph, the resize after it."""
    import export

    def run(i):
        t0 = time.perf_counter()
        img, _, _, _, meta = data[i]
        x, meta_x = export.graph_input(img, meta, onnx_solo.frame, onnx_solo.cfg.pad_to)
        t1 = time.perf_counter()
        outputs = onnx_solo.run(x)
        t2 = time.perf_counter()
        result = export.finish_outputs(
            outputs,
            meta_x["input_size"],
            onnx_solo.frame,
            meta_x["orig_size"],
            onnx_solo.mask_threshold,
        )
        t3 = time.perf_counter()
        parts = {"read+pre": t1 - t0, "network": t2 - t1, "post": t3 - t2}
        return parts, len(result["scores"])  # "network": the graph, its post-processing too

    return Runner(name, run)


def yolo_runner(weights: str | None, files: list[Path]) -> Runner | None:
    """Ultralytics' predictor on the file; parts from its own `speed` (ms), the read is the
    rest of the wall time. None when Ultralytics is not installed."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    try:
        from ultralytics import YOLO
    except ImportError:
        return None
    model = YOLO(weights or "yolo11n-seg.yaml", task="segment")
    name = "YOLO11n-seg, PyTorch (Ultralytics)" + ("" if weights else " UNTRAINED")
    # Its first predict sets up the predictor, which sets torch's threads to cores - 1
    # (Ultralytics' NUM_THREADS); the caller sets them back to --threads after this.
    model.predict(str(files[0]), imgsz=YOLO_IMGSZ, retina_masks=True, verbose=False)

    def run(i):
        t0 = time.perf_counter()
        r = model.predict(str(files[i]), imgsz=YOLO_IMGSZ, retina_masks=True, verbose=False)[0]
        total = time.perf_counter() - t0
        net, post = (r.speed[k] / 1000 for k in ("inference", "postprocess"))
        parts = {"read+pre": total - net - post, "network": net, "post": post}
        return parts, len(r.boxes)

    return Runner(name, run)


def openvino_network(onnx_net, folder: Path, threads: int):
    """`onnx_net`'s graph in OpenVINO's CPU plugin (latency hint, `threads` threads), callable
    like it; None when OpenVINO is not installed. Measured, not shipped (runtime.py says why)."""
    try:
        import openvino as ov
    except ImportError:
        return None
    import runtime

    path = folder / "network.onnx"
    path.write_bytes(onnx_net.onnx_bytes)
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    request = core.compile_model(core.read_model(str(path)), "CPU", config).create_infer_request()

    def network(images):
        outputs = request.infer({0: np.ascontiguousarray(images.numpy(), dtype=np.float32)})
        flat = [torch.from_numpy(np.array(outputs[port])) for port in request.model_outputs]
        return runtime.unflatten(flat, onnx_net.structure)

    return network


def throughput(model, data, network, batch_size: int, workers: int) -> float:
    """images/s of main_infer.py's loop (`evaluation.predict_batches`) over `data`."""
    from evaluation import data_loader, predict_batches

    start = time.perf_counter()
    with torch.inference_mode():
        predictions = predict_batches(model, data_loader(data, batch_size, workers), "cpu", network)
    return len(predictions) / (time.perf_counter() - start)


def read_ap(folder: Path) -> float | None:
    try:
        return float(json.loads((folder / "metrics.json").read_text())["AP"])
    except (OSError, KeyError, ValueError):
        return None


def small_setting(args) -> dict:
    import export
    import main_infer
    import runtime
    from dataset import build_data
    from samples import without_augment

    model, cfg, class_names = main_infer.load_model(args.checkpoint, "cpu")
    _, val = build_data(cfg)
    folder = Path(tempfile.mkdtemp(prefix="bench_vs_peers_"))
    files = write_images(without_augment(val), args.images, folder)
    data = main_infer.ImageFiles(files, tuple(cfg.input_size), cfg.pad_to)
    onnx_net = runtime.OnnxNetwork(model)

    # the whole graph: enough candidate slots for every timed image
    with torch.inference_mode():
        counts = []
        for i in range(len(data)):
            preds = model.network(data[i][0][None])
            counts.append(int((flat_cate_scores(preds[0]) > model.head.cate_thresh).sum()))
    slots = max(model.head.pre_nms_num, 50 * -(-max(counts) // 50))
    graph_path = export.export_onnx(
        model,
        cfg,
        class_names,
        folder / "solo.onnx",
        max_candidates=slots,
        max_instances=model.head.keep_instance,
    )
    graph = export.OnnxSOLO(graph_path, threads=torch.get_num_threads())

    runners = [
        solo_runner("SOLOv2 CPU preset, PyTorch eager", model, data, model.network),
        solo_runner("SOLOv2 CPU preset, ONNX Runtime network", model, data, onnx_net),
        graph_runner(f"SOLOv2 CPU preset, whole ONNX graph ({slots} slots)", graph, data),
    ]
    openvino = openvino_network(onnx_net, folder, args.threads)
    if openvino is not None:
        runners.append(solo_runner("SOLOv2 CPU preset, OpenVINO network", model, data, openvino))
    yolo = yolo_runner(args.yolo, files)
    if yolo is not None:
        runners.append(yolo)
    # Ultralytics' predictor set torch's threads to cores - 1: every entry gets --threads.
    torch.set_num_threads(args.threads)
    time_interleaved(runners, len(files), args.warmup, args.repeats)
    parts = ("read+pre", "network", "post")
    rows = [r.summary(parts) for r in runners]
    solo_ap = read_ap(
        Path(args.checkpoint) if Path(args.checkpoint).is_dir() else Path(args.checkpoint).parent
    )
    yolo_ap = read_ap(Path(args.yolo).parent) if args.yolo else None
    for row in rows:
        row["AP"] = yolo_ap if row["name"].startswith("YOLO") else solo_ap
    reference = yolo.name if yolo is not None else None
    extra = [("AP", lambda r: "-" if r["AP"] is None else f"{r['AP']:.3f}")]
    print(
        f"\n1. CPU preset size: {args.checkpoint} ({cfg.model}, input {tuple(cfg.input_size)}),"
        f" {len(files)} held-out images x {args.repeats}, from PNG files, masks at the original"
        f" size, {torch.get_num_threads()} threads"
    )
    print(table(rows, parts, reference, "/ YOLO", extra))
    if yolo is None:
        print("(Ultralytics is not installed: no YOLO11n-seg row; pip install ultralytics)")
    elif not args.yolo:
        print("(YOLO11n-seg is UNTRAINED here: speed only, with almost no detection to process)")

    rates = {}
    for workers in sorted({0, args.workers}):
        for name, network in (("PyTorch eager", None), ("ONNX Runtime network", onnx_net)):
            throughput(model, data, network, args.batch_size, workers)  # warm-up
            rate = throughput(model, data, network, args.batch_size, workers)
            rates[f"{name}, {workers} workers"] = rate
    print(
        f"throughput over the {len(files)} files, batch {args.batch_size} (images/s): "
        + ", ".join(f"{k} {v:.1f}" for k, v in rates.items())
    )
    return {"rows": rows, "throughput": rates, "candidate_slots": slots}


# --------------------------------------------------------------------------------------------
# 2. the released size, from tensors
# --------------------------------------------------------------------------------------------


def large_setting(args) -> dict:
    import runtime

    size = tuple(args.large)
    images = load_images(args.large_images, size)  # masks back at the input size (800 x 1333)
    bench_args = argparse.Namespace(candidates=100)
    solo = build_released_untrained(LARGE_MODEL, bench_args, torch.device("cpu"))
    thresholds = solo_thresholds(solo.model, images, torch.device("cpu"), 100)
    onnx_net = runtime.OnnxNetwork(solo.model, check_size=(256, 320))
    mrcnn = build_maskrcnn(80, size, torch.device("cpu"))

    def solo_run(network):
        def run(i):
            img, meta = images[i]
            solo.model.head.cate_thresh = thresholds[i]
            return network_and_post(solo.model, network, img, meta)

        return run

    def mrcnn_run(i):
        img, meta = images[i]
        net, post, _, dets = run_maskrcnn(mrcnn, img, meta, i, torch.device("cpu"))
        return {"network": net, "post": post}, dets

    runners = [
        Runner("SOLOv2 R50-FPN, PyTorch eager", solo_run(solo.model.network)),
        Runner("SOLOv2 R50-FPN, ONNX Runtime network", solo_run(onnx_net)),
        Runner("Mask R-CNN R50-FPN, PyTorch eager", mrcnn_run),
    ]
    time_interleaved(runners, len(images), 1, args.repeats)
    parts = ("network", "post")
    rows = [r.summary(parts) for r in runners]
    print(
        f"\n2. Released size: input {size} (padded {tuple(images[0][0].shape[-2:])}), untrained,"
        f" 100 candidates / detections, {len(images)} images x {args.repeats},"
        f" {torch.get_num_threads()} threads"
    )
    print(table(rows, parts, "Mask R-CNN R50-FPN, PyTorch eager", "/ Mask R-CNN"))
    return {"rows": rows, "resize_ms_by_extent": resize_by_extent(size)}


def resize_by_extent(size: tuple[int, int], count: int = 100, repeats: int = 3) -> dict:
    """ms of `postprocess.resize_masks` for `count` masks at `size` (feature size / 4, padded
    to 32) whose pixels above 0.5 fill a box of 5 %, 20 % or 100 % of the image: a trained
    mask covers its object, an untrained one (the table above) the whole image."""
    import postprocess
    from dataset import padded_size

    H, W = padded_size(size, 32)
    h4, w4 = H // 4, W // 4
    gen = torch.Generator().manual_seed(0)
    out = {}
    for share in (0.05, 0.2, 1.0):
        bh, bw = max(1, round(h4 * share**0.5)), max(1, round(w4 * share**0.5))
        probs = torch.rand(count, h4, w4, generator=gen) * 0.5  # all below the threshold ...
        for m in range(count):  # ... but a box at a random place
            y = int(torch.randint(0, h4 - bh + 1, (1,), generator=gen))
            x = int(torch.randint(0, w4 - bw + 1, (1,), generator=gen))
            probs[m, y : y + bh, x : x + bw] += 0.5
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            postprocess.resize_masks(probs, (H, W), size, size)
            times.append(time.perf_counter() - start)
        out[f"{share:.0%}"] = 1000 * statistics.median(times)
    print(
        f"resize of {count} masks to {size} whose pixels above the threshold fill a box of "
        + ", ".join(f"{k} of the image: {v:.0f} ms" for k, v in out.items())
    )
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="runs/solo_cpu", help="the CPU preset's run")
    parser.add_argument("--yolo", default=None, help="trained YOLO11n-seg weights (.pt)")
    parser.add_argument("--images", type=int, default=40, help="held-out images, setting 1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4, help="throughput: batch")
    parser.add_argument(
        "--workers", type=int, default=1, help="throughput: decoding workers (and 0)"
    )
    parser.add_argument("--large", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"))
    parser.add_argument("--large-images", type=int, default=3)
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--skip-small", action="store_true")
    parser.add_argument("--out", default=None, help="also write the numbers as json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    record = {"threads": args.threads}
    if not args.skip_small:
        record["small"] = small_setting(args)
    if not args.skip_large:
        record["large"] = large_setting(args)
    print(f"peak RSS {peak_rss_mb():.0f} MiB")
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2, default=str))
    return record


if __name__ == "__main__":
    main()
