"""Peak training memory and images/s of SOLO, Decoupled SOLO and SOLOv2 at the cis680 settings.

Each model type trains a few iterations with the cis680 preset and that model's own settings
(`config.model_config(CIS680, M)`, as `main_train.py --preset cis680 --model M` builds it:
ResNet-50 FPN 256 from scratch, batch 2, 800 x 1066 padded to 800 x 1088, SGD, fp32 on the
CPU; SOLO and Decoupled SOLO towers 7 x 256, SOLOv2 towers 4 x 512 with E = 256) on real
batches of the built-in data set, augmentation on. The training step is bench_train.py's
(`bench_train.measure_training`): forward, losses, backward, gradient clipping, optimiser step;
the first `--warmup` iterations (default 1) are not timed, the next `--iters` (default 2) are.
The seeds are set again after each model is built, so every model sees the same batches.

Memory, measured properly on the CPU: every model trains in its own FRESH subprocess, so no
model's allocations (or the allocator's cache of them) pollute another's. In that process:
- "RSS before training": the resident set size once the data set, model and optimiser are
  built (Python, torch, weights, data), read from /proc/self/status;
- "peak RSS": the process's peak resident set size over its whole life
  (resource.getrusage(RUSAGE_SELF).ru_maxrss), which includes that baseline;
- "peak - before training": what training added on top (activations kept for backward,
  gradients, the optimiser's momentum, the loss's temporaries).
On CUDA the same rows hold torch.cuda.memory_allocated before training and
torch.cuda.max_memory_allocated.
Ratios are each model's value over SOLO's.

Run (CPU, 2 cores: the cis680 settings train at about 0.1 image/s, so 1 warm-up + 2 timed
iterations of batch 2 take about 1-2 minutes per model, 4-6 minutes for the three; peak RSS
several GB per model, one model at a time):
    python benchmarks/bench_train_memory.py
    python benchmarks/bench_train_memory.py --models solo solov2 --iters 3 --out mem.json
    python benchmarks/bench_train_memory.py --size 128 160 --iters 1   # smoke test

Shape legend: B batch, H x W padded input.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from config import CIS680, MODELS, model_config  # noqa: E402

# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------

DEFAULT_MODELS = ("solo", "decoupled_solo", "solov2")

# --------------------------------------------------------------------------------------------
# pure helpers
# --------------------------------------------------------------------------------------------


def bench_config(model: str, args):
    """The cis680 preset with `model`'s own settings (as `--preset cis680 --model M` gives),
    the benchmark's data and device, data loading in the measured process."""
    cfg = model_config(CIS680, model)
    cfg = replace(cfg, num_images=args.num_images, device=args.device, num_workers=0)
    if args.size:
        cfg = replace(cfg, input_size=tuple(args.size))
    return cfg


def towers_of(cfg) -> str:
    towers = f"{cfg.stacked_convs} x {cfg.seg_feat_channels}"
    if cfg.model.startswith("solov2"):
        towers += f", E {cfg.kernel_channels}"
    return towers


# --------------------------------------------------------------------------------------------
# the worker: one model in its own process
# --------------------------------------------------------------------------------------------


def worker(model: str, args) -> dict:
    from bench_train import measure_training

    cfg = bench_config(model, args)
    result = measure_training(cfg, args.warmup, args.iters, args.threads)
    return {"model_type": model, "towers": towers_of(cfg), **result}


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def format_table(results: dict[str, dict]) -> str:
    """Models side by side; a failed model's column says why."""
    names = list(results)
    solo = results.get("solo")

    def over_solo(key: str):
        def get(r):
            if solo is None or "failed" in solo:
                return "-"
            return f"{r[key] / solo[key]:.2f}x"

        return get

    rows = [
        ("model", lambda r: r["model"]),
        ("towers", lambda r: r["towers"]),
        ("input H x W", lambda r: f"{r['input'][0]} x {r['input'][1]}"),
        ("batch", lambda r: str(r["batch_size"])),
        ("optimiser / precision", lambda r: f"{r['optimizer']} / {r['precision']}"),
        ("warm-up + timed iterations", lambda r: f"{r['warmup']} + {r['iters']}"),
        ("s / iteration", lambda r: f"{r['s_per_iter']:.2f}"),
        ("images / s", lambda r: f"{r['img_per_s']:.3f}"),
        ("memory", lambda r: r["memory_kind"]),
        ("before training (MiB)", lambda r: f"{r['rss_before_mb']:.0f}"),
        ("peak (MiB)", lambda r: f"{r['peak_mb']:.0f}"),
        ("peak - before training (MiB)", lambda r: f"{r['training_mb']:.0f}"),
        ("peak / SOLO's", over_solo("peak_mb")),
        ("peak - before / SOLO's", over_solo("training_mb")),
        ("images / s / SOLO's", over_solo("img_per_s")),
        ("process wall time (s)", lambda r: f"{r['wall_s']:.0f}"),
    ]

    def cell(name: str, get) -> str:
        r = results[name]
        return r["failed"] if "failed" in r else get(r)

    width = max(len(label) for label, _ in rows)
    col = max(14, *(len(cell(n, get)) + 2 for n in names for _, get in rows))
    lines = [f"{'':<{width}}" + "".join(f"{n:>{col}}" for n in names)]
    for label, get in rows:
        lines.append(f"{label:<{width}}" + "".join(f"{cell(n, get):>{col}}" for n in names))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=MODELS)
    parser.add_argument("--iters", type=int, default=2, help="timed iterations per model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="input_size before padding (default: the cis680 preset's 800 1066)",
    )
    parser.add_argument("--num-images", type=int, default=64, help="built-in images generated")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--out", default="", help="also write the table as json here")
    parser.add_argument("--worker", choices=MODELS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        parser.error("--iters must be at least 1 and --warmup at least 0")
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return {}

    from synthetic import ensure_builtin_dataset

    ensure_builtin_dataset(num_images=args.num_images, seed=CIS680.data_seed)
    forwarded = sys.argv[1:] if argv is None else list(argv)
    results = {}
    for name in dict.fromkeys(args.models):
        command = [sys.executable, str(Path(__file__).resolve()), *forwarded, "--worker", name]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        wall_s = time.perf_counter() - start
        if done.returncode != 0:
            sys.stderr.write(done.stderr[-4000:])
            why = "killed (out of memory?)" if done.returncode < 0 else "error"
            results[name] = {"failed": f"exit {done.returncode}, {why}"}
            continue
        results[name] = {**json.loads(done.stdout.strip().splitlines()[-1]), "wall_s": wall_s}
        results[name]["warmup"] = args.warmup

    first = next((r for r in results.values() if "failed" not in r), None)
    where = f"{first['device']}, {first['threads']} threads" if first else args.device
    print(
        f"training at the cis680 settings, {args.warmup} warm-up + {args.iters} timed "
        f"iterations on built-in batches ({args.num_images} images), {where}; each model in "
        "its own fresh process"
    )
    print(format_table(results))
    table = {"models": results}
    v2, solo = results.get("solov2"), results.get("solo")
    if v2 and solo and "failed" not in v2 and "failed" not in solo:
        ratios = {
            "peak": v2["peak_mb"] / solo["peak_mb"],
            "training": v2["training_mb"] / solo["training_mb"],
            "img_per_s": v2["img_per_s"] / solo["img_per_s"],
        }
        print(
            f"SOLOv2 / SOLO: peak memory {ratios['peak']:.2f}x, memory added by training "
            f"{ratios['training']:.2f}x, images / s {ratios['img_per_s']:.2f}x"
        )
        table["solov2_over_solo"] = ratios
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(table, indent=2))
    return table


if __name__ == "__main__":
    main()
