"""CPU time per image of SOLOv2: PyTorch eager beside its ONNX export in ONNX Runtime, one run.

Two settings in the same run, each with its preset's SOLOv2 (`--model` picks another type):
- `cpu`: ResNet-18 FPN 128, towers 2 x 64, E = 256, at the preset's input, 192 x 256;
- `cis680`: ResNet-50 FPN 256, towers 4 x 512, E = 256, at 800 x 1088 (`--size` changes it).
Batch 1, CPU, the same number of threads for both runtimes (torch.get_num_threads(); ONNX
Runtime's intra-op threads are set to it). The images are the first built-in ones resized to
the input size (bench_infer.py's `load_images`: the masks come back at the input size).

- PyTorch eager: the network (backbone + head, eval=True) and `head.PostProcess`, under
  torch.inference_mode, as bench_infer.py times them.
- ONNX: `export.export_onnx`'s graph in ONNX Runtime, then `export.finish_outputs` (the numpy
  resize of the kept masks to the output size, which follows the graph).
Fair timing as in bench_infer.py: per setting, `--warmup` untimed passes of both, then
`--repeats` rounds over the images, the two runtimes alternating image by image, their order
swapped at every step; the table gives medians, the ratio is eager's median over ONNX's.

The same work for both. Untrained weights would skip eager's post-processing (no category
score passes the threshold), while the exported graph, whose shapes are static, always
computes all of its `max_candidates` slots. So, as in bench_infer.py, eager is made to do a
trained model's work: per image the category threshold is set just below the
`--candidates`-th (default 100) score, pre_nms_num = keep_instance = `--candidates`,
update_thresh 0 (SOLOv2's untrained masks are noise around p = 0.5 and pass the filters). The
graph is exported with max_candidates = max_instances = `--candidates` at the median of those
thresholds: its time does not depend on the threshold (every slot is computed whether it
passes or not), only how many of its rows are real, which the table shows.

Run (about 5 minutes on 2 cores, most of it the 800 x 1088 model):
    python benchmarks/bench_onnx.py
    python benchmarks/bench_onnx.py --images 3 --repeats 3 --threads 2 --out onnx.json
    python benchmarks/bench_onnx.py --only cpu --images 1 --repeats 1      # smoke test

Shape legend: H x W padded input.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_infer import (  # noqa: E402
    flat_cate_scores,
    load_images,
    peak_rss_mb,
    rotated,
    solo_thresholds,
)

from config import model_config, preset  # noqa: E402

# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------

NUM_CLASSES = 3  # built-in data: vehicle, person, animal
CLASS_NAMES = ("vehicle", "person", "animal")
SETTINGS = (("cpu", None), ("cis680", (800, 1088)))  # (preset, input; None: the preset's own)

# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------


def build_untrained(preset_name: str, model_name: str, candidates: int):
    """(untrained model of the preset in eval mode, its config), post-processing opened up to
    `candidates` instances as bench_infer.py does."""
    from model import build_model

    cfg = model_config(preset(preset_name), model_name)
    cfg = replace(cfg, pre_nms_num=candidates, keep_instance=candidates, update_thresh=0.0)
    torch.manual_seed(0)
    return build_model(cfg, NUM_CLASSES).eval(), cfg


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------


@torch.inference_mode()
def run_eager(model, img, meta, threshold: float) -> tuple[float, float, int]:
    """One image: (network s, post-processing s, detections)."""
    model.head.cate_thresh = threshold
    x = img[None]  # (3, H, W) -> (1, 3, H, W)
    t0 = time.perf_counter()
    preds = model.head(model.backbone(x), eval=True)
    t1 = time.perf_counter()
    results = model.head.PostProcess(preds, [meta], padded_size=tuple(x.shape[-2:]))
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, len(results[0]["scores"])


def run_onnx(runner, img, meta) -> tuple[float, float, int]:
    """One image: (graph s, numpy finishing s, detections)."""
    import export

    x, meta_x = export.graph_input(img, meta, runner.frame, runner.cfg.pad_to)
    x = x.numpy()
    t0 = time.perf_counter()
    outputs = runner.run(x)
    t1 = time.perf_counter()
    result = export.finish_outputs(
        outputs, meta_x["input_size"], runner.frame, meta_x["orig_size"], runner.mask_threshold
    )
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, len(result["scores"])


def medians(samples: list[tuple[float, float, int]]) -> dict:
    first = [1000 * s[0] for s in samples]
    second = [1000 * s[1] for s in samples]
    total = [a + b for a, b in zip(first, second, strict=True)]
    return {
        "part1_ms": statistics.median(first),
        "part2_ms": statistics.median(second),
        "total_ms": statistics.median(total),
        "total_min_ms": min(total),
        "total_max_ms": max(total),
        "detections": statistics.mean(s[2] for s in samples),
    }


def bench_setting(preset_name: str, size, args, workdir: Path) -> dict:
    """Export, then time eager and ONNX interleaved on the same images; one table row."""
    import export
    from dataset import padded_size

    model, cfg = build_untrained(preset_name, args.model, args.candidates)
    size = tuple(size) if size else padded_size(tuple(cfg.input_size), cfg.pad_to)
    images = load_images(args.images, size)
    device = torch.device("cpu")
    thresholds = solo_thresholds(model, images, device, args.candidates)
    with torch.inference_mode():
        candidates = [
            int((flat_cate_scores(model.head(model.backbone(img[None]), eval=True)[0]) > t).sum())
            for (img, _), t in zip(images, thresholds, strict=True)
        ]

    model.head.cate_thresh = statistics.median(thresholds)
    path = workdir / f"{args.model}_{preset_name}_{size[0]}x{size[1]}.onnx"
    t0 = time.perf_counter()
    export.export_onnx(
        model,
        replace(cfg, cate_thresh=model.head.cate_thresh),
        CLASS_NAMES,
        path,
        max_candidates=args.candidates,
        max_instances=args.candidates,
        size=size,
    )
    export_s = time.perf_counter() - t0
    runner = export.OnnxSOLO(path, threads=torch.get_num_threads())

    runs = {
        "eager": lambda i: run_eager(model, *images[i], thresholds[i]),
        "onnx": lambda i: run_onnx(runner, *images[i]),
    }
    samples = {name: [] for name in runs}
    for step in range(args.warmup):
        for name in rotated(list(runs), step):
            runs[name](step % len(images))
    for step in range(args.repeats * len(images)):
        for name in rotated(list(runs), args.warmup + step):
            samples[name].append(runs[name](step % len(images)))
    eager, onnx = medians(samples["eager"]), medians(samples["onnx"])
    return {
        "preset": preset_name,
        "model": args.model,
        "input_size": list(size),
        "backbone": f"ResNet-{cfg.depth} FPN {cfg.fpn_channels}",
        "eager_candidates": statistics.mean(candidates),
        "eager": eager,  # part1: network, part2: post-processing
        "onnx": onnx,  # part1: graph, part2: numpy finishing
        "export_s": export_s,
        "ratio_eager_over_onnx": eager["total_ms"] / onnx["total_ms"],
    }


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'setting':<38}{'eager':>9}{'net':>8}{'post':>7}{'ONNX':>9}{'graph':>8}{'numpy':>7}"
        f"{'eager/ONNX':>12}{'dets eager/ONNX':>17}"
    )
    lines = [head, f"{'':<38}{'ms':>9}{'ms':>8}{'ms':>7}{'ms':>9}{'ms':>8}{'ms':>7}"]
    for r in rows:
        e, o = r["eager"], r["onnx"]
        name = f"{r['preset']}: {r['backbone']}, {r['input_size'][0]}x{r['input_size'][1]}"
        dets = f"{e['detections']:.0f} / {o['detections']:.0f}"
        lines.append(
            f"{name:<38}{e['total_ms']:>9.1f}{e['part1_ms']:>8.1f}{e['part2_ms']:>7.1f}"
            f"{o['total_ms']:>9.1f}{o['part1_ms']:>8.1f}{o['part2_ms']:>7.1f}"
            f"{r['ratio_eager_over_onnx']:>11.2f}x{dets:>17}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="solov2", help="model type (config.MODELS)")
    parser.add_argument("--images", type=int, default=3, help="distinct images")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds over the images")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes of each runtime")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument(
        "--size", type=int, nargs=2, default=None, metavar=("H", "W"), help="the large input"
    )
    parser.add_argument("--only", choices=[p for p, _ in SETTINGS], default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--out", default="", help="also write the table as json here")
    args = parser.parse_args(argv)
    if args.images < 1 or args.repeats < 1 or args.warmup < 0 or args.candidates < 1:
        parser.error("--images, --repeats and --candidates must be >= 1, --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset_name, size in SETTINGS:
            if args.only and preset_name != args.only:
                continue
            if preset_name == "cis680" and args.size:
                size = tuple(args.size)
            rows.append(bench_setting(preset_name, size, args, Path(tmp)))

    print(
        f"{args.model} inference, CPU, batch 1, {torch.get_num_threads()} threads for both "
        f"runtimes, {args.images} images x {args.repeats} repeats after {args.warmup} warm-up "
        f"pass(es), eager and ONNX interleaved; untrained weights doing {args.candidates} "
        f"candidates' work (eager: per-image threshold; ONNX: {args.candidates} static slots)"
    )
    print("median ms / image; eager = net + post, ONNX = graph + numpy (medians of the sums)")
    print(format_table(rows))
    for r in rows:
        print(
            f"{r['preset']}: export {r['export_s']:.1f} s; eager candidates / image "
            f"{r['eager_candidates']:.0f}; total min-max eager "
            f"{r['eager']['total_min_ms']:.0f}-{r['eager']['total_max_ms']:.0f} ms, ONNX "
            f"{r['onnx']['total_min_ms']:.0f}-{r['onnx']['total_max_ms']:.0f} ms"
        )
    print(f"peak RSS of this process: {peak_rss_mb():.0f} MiB")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
