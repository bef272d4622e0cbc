"""Training throughput and peak memory of the `cpu` and `cis680` presets, side by side.

Each preset trains for a few iterations on real batches of the built-in data set
(`dataset.build_data` with `--num-images` images, augmentation on, as in training) with its
own settings: model, input size, batch size, optimiser (`training.build_optimizer`: AdamW
for cpu, SGD for cis680), autocast (`training._autocast`, with amp: fp16 on CUDA, bf16 on a
CPU that runs it natively) and gradient clipping as configured; only
num_workers is 0, so that batches load in the measured process, timed apart. The first
`--warmup` iterations (default 2) are not timed; then `--iters` iterations are (default 5 for
cpu, 3 for cis680; `--iters-cpu` / `--iters-cis680` set one preset's). A timed step runs
from the batch on the device to the end of the optimiser step (forward, losses, backward,
clipping, step); loading and augmenting the batch is timed apart and not counted in images/s.

Each preset runs in a FRESH subprocess, so its peak memory is its own: on the CPU the peak
resident set size of that process (resource.getrusage ru_maxrss; it includes the Python,
torch and data-set baseline, printed apart as "RSS before training", the RSS once data, model
and optimiser are built; "peak - before training" is what training added: activations,
gradients, optimiser state), on CUDA torch.cuda.max_memory_allocated over the run (weights,
gradients, optimiser state and activations; "before" is the memory allocated then). The seeds
are set again after the model is built, so every run sees the same batches.

The data set is generated once, in the parent, before either preset starts.
`measure_training` is the worker's measurement, reused by bench_train_memory.py (the model
types side by side at the cis680 settings).

Run (CPU: a few minutes, most of it the cis680 preset's ResNet-50 at 800 x 1088):
    python benchmarks/bench_train.py
    python benchmarks/bench_train.py --device cuda --iters 20 --out train.json
    python benchmarks/bench_train.py --presets cpu --iters-cpu 3

Shape legend: B batch, H x W padded input.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import preset  # noqa: E402

# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------

PRESETS = ("cpu", "cis680")

# --------------------------------------------------------------------------------------------
# pure helpers
# --------------------------------------------------------------------------------------------


def current_rss_mb() -> float:
    """Resident set size of this process now (Linux /proc), MiB; nan elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    except OSError:
        pass
    return float("nan")


def batches(train_set, cfg):
    """Training batches without end: epoch after epoch, as training.make_loader gives them."""
    from training import make_loader

    epoch = 0
    while True:
        yield from make_loader(train_set, cfg, epoch, True, 0, 1)
        epoch += 1


# --------------------------------------------------------------------------------------------
# the worker: one preset in its own process
# --------------------------------------------------------------------------------------------


def worker(name: str, args) -> dict:
    iters = args.iters_cpu if name == "cpu" else args.iters_cis680
    cfg = replace(preset(name), num_images=args.num_images, device=args.device, num_workers=0)
    return {"preset": name, **measure_training(cfg, args.warmup, iters, args.threads)}


def measure_training(cfg, warmup: int, iters: int, threads: int | None = None) -> dict:
    """Train `cfg`'s model for `warmup` untimed + `iters` timed iterations in THIS process
    (call it in a fresh one) and return its speed and memory; see the module docstring.

    The seeds are set again after the model and optimiser are built, so models of different
    sizes (which draw different numbers of initial weights) see the same batches."""
    from dataset import build_data
    from model import build_model, resolve_device
    from training import (
        LOSS_KEYS,
        _autocast,
        _to_device,
        backward_and_step,
        build_optimizer,
        lr_at,
        seed_everything,
    )

    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    train_set, _ = build_data(cfg)
    model = build_model(cfg, num_classes=len(train_set.class_names)).to(device)
    model.train()
    optimizer = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.amp)
    seed_everything(cfg.seed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before_mb = torch.cuda.memory_allocated(device) / 2**20
    rss_before = current_rss_mb()

    step_s, data_s, images, losses_seen = [], [], 0, []
    stream = batches(train_set, cfg)
    for it in range(warmup + iters):
        t0 = time.perf_counter()
        imgs, labels, masks, boxes, _ = _to_device(next(stream), device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t1 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, it, 0, 10_000)
        with _autocast(cfg, device):
            losses = model(imgs, labels, masks, boxes)
        values = {k: float(losses[k].detach()) for k in LOSS_KEYS}  # as training: syncs
        backward_and_step(model, optimizer, scaler, losses["total"], cfg)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t2 = time.perf_counter()
        if it < warmup:
            continue
        data_s.append(t1 - t0)
        step_s.append(t2 - t1)
        images += imgs.shape[0]
        losses_seen.append(values["total"])

    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
        memory_kind = "peak CUDA memory allocated"
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        memory_kind = "peak RSS"
        before_mb = rss_before
    H, W = imgs.shape[-2:]
    return {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "model": f"{cfg.model} ResNet-{cfg.depth} FPN {cfg.fpn_channels}",
        "input": [int(H), int(W)],
        "batch_size": cfg.batch_size,
        "optimizer": cfg.optimizer,
        "precision": precision_of(cfg, device),
        "iters": iters,
        "images": images,
        "step_s": sum(step_s),
        "img_per_s": images / sum(step_s),
        "s_per_iter": sum(step_s) / len(step_s),
        "data_ms_per_img": 1000 * sum(data_s) / images,
        "peak_mb": peak_mb,
        "memory_kind": memory_kind,
        "rss_before_mb": rss_before,
        "training_mb": peak_mb - before_mb,
        "mean_loss": sum(losses_seen) / len(losses_seen),
    }


def precision_of(cfg, device: torch.device) -> str:
    from training import autocast_dtype

    dtype = autocast_dtype(cfg, device)
    return {torch.float16: "fp16 autocast", torch.bfloat16: "bf16 autocast"}.get(dtype, "fp32")


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def format_table(results: dict[str, dict]) -> str:
    names = list(results)
    rows = [
        ("model", lambda r: r["model"]),
        ("input H x W", lambda r: f"{r['input'][0]} x {r['input'][1]}"),
        ("batch", lambda r: str(r["batch_size"])),
        ("optimiser", lambda r: r["optimizer"]),
        ("precision", lambda r: r["precision"]),
        ("timed iterations", lambda r: str(r["iters"])),
        ("s / iteration", lambda r: f"{r['s_per_iter']:.3f}"),
        ("images / s", lambda r: f"{r['img_per_s']:.2f}"),
        ("data ms / image (apart)", lambda r: f"{r['data_ms_per_img']:.1f}"),
        ("memory", lambda r: r["memory_kind"]),
        ("peak memory (MiB)", lambda r: f"{r['peak_mb']:.0f}"),
        ("RSS before training (MiB)", lambda r: f"{r['rss_before_mb']:.0f}"),
        ("peak - before training (MiB)", lambda r: f"{r['training_mb']:.0f}"),
    ]
    width = max(len(label) for label, _ in rows)
    col = max(12, *(len(get(results[n])) + 2 for n in names for _, get in rows))
    lines = [f"{'':<{width}}" + "".join(f"{n:>{col}}" for n in names)]
    for label, get in rows:
        lines.append(f"{label:<{width}}" + "".join(f"{get(results[n]):>{col}}" for n in names))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument("--iters", type=int, default=None, help="timed iterations, both presets")
    parser.add_argument("--iters-cpu", type=int, default=5, help="timed iterations, cpu preset")
    parser.add_argument("--iters-cis680", type=int, default=3, help="timed iterations, cis680")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    parser.add_argument("--num-images", type=int, default=64, help="built-in images generated")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--out", default="", help="also write the table as json here")
    parser.add_argument("--worker", choices=PRESETS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.iters is not None:
        args.iters_cpu = args.iters_cis680 = args.iters
    if min(args.iters_cpu, args.iters_cis680) < 1 or args.warmup < 0:
        parser.error("--iters-* must be at least 1 and --warmup at least 0")
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return {}

    from synthetic import ensure_builtin_dataset

    ensure_builtin_dataset(num_images=args.num_images, seed=preset("cpu").data_seed)
    forwarded = sys.argv[1:] if argv is None else list(argv)
    results = {}
    for name in args.presets:
        command = [sys.executable, str(Path(__file__).resolve()), *forwarded, "--worker", name]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stderr)
            raise RuntimeError(f"the {name} preset's worker failed (exit {done.returncode})")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])

    first = results[args.presets[0]]
    print(
        f"training, {args.warmup} warm-up + timed iterations on built-in batches "
        f"({args.num_images} images), {first['device']}, {first['threads']} threads; "
        "each preset in its own process"
    )
    print(format_table(results))
    table = {"presets": results}
    if "cpu" in results and "cis680" in results:
        cpu, big = results["cpu"], results["cis680"]
        speed = cpu["img_per_s"] / big["img_per_s"]
        memory = big["peak_mb"] / cpu["peak_mb"]
        print(
            f"ratio cpu / cis680 images per second: {speed:.1f}x; "
            f"ratio cis680 / cpu peak memory: {memory:.1f}x"
        )
        table["ratio_img_per_s_cpu_over_cis680"] = speed
        table["ratio_peak_memory_cis680_over_cpu"] = memory
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(table, indent=2))
    return table


if __name__ == "__main__":
    main()
