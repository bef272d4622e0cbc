"""Time and peak memory of the SOLO mask loss: all S^2 channels (hand-out) vs positives only.

The hand-out's mask branch ends in a 1x1 conv with S^2 output channels per level, evaluated at
the mask resolution: for one 800 x 1088 image that is 1600 + 1296 channels at 200 x 272 plus
576 at 100 x 136 and 256 + 144 at 50 x 68, about 166 M floats before the sigmoid, its
gradient and the autograd copies. `solo_head.mask_logits_for_cells` evaluates only the rows of
the 1x1 conv that belong to positive cells, so memory grows with the number of instances.

Each way runs forward + backward of the mask loss (sigmoid, dice, mean over the positive cells)
from the same random mask-tower features. "full" is the authors' order: the 1x1 conv over all
S^2 channels, pick the positive channels, then the sigmoid (a Sigmoid layer inside the network,
as the hand-out draws it, would add another S^2-channel tensor). Each way runs in a FRESH
subprocess, so that its peak resident
memory (resource.getrusage ru_maxrss; tracemalloc does not see torch's allocations) is its own.
A third process ("inputs") only builds the inputs: its peak is subtracted to give each way's
own cost. On CUDA (`--device cuda`) the peak is torch.cuda.max_memory_allocated instead.

Run (CPU, about a minute or two):
    python benchmarks/bench_mask_memory.py
    python benchmarks/bench_mask_memory.py --size 800 1088 --batch 2 --positives 40

Shape legend: B batch, D tower width, S grid size, K positive cells, h x w mask size of a level.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from solo_head import NUM_GRIDS, STRIDES, dice_loss, mask_logits_for_cells  # noqa: E402

WAYS = ("inputs", "full", "positives")


def make_inputs(args, device):
    """Per level: features (B, D, h, w), 1x1 conv weight (S^2, D, 1, 1) and bias (S^2,),
    positive (img, cell) pairs and their binary targets (K_l, h, w); seeded, equal in each way."""
    generator = torch.Generator().manual_seed(0)
    H, W = args.size
    B, D = args.batch, args.channels
    levels = []
    for level, (S, stride) in enumerate(zip(NUM_GRIDS, STRIDES, strict=True)):
        h, w = 2 * H // stride, 2 * W // stride
        feat = torch.randn(B, D, h, w, generator=generator).to(device).requires_grad_()
        weight = (0.01 * torch.randn(S * S, D, 1, 1, generator=generator)).to(device)
        bias = torch.full((S * S,), -4.6).to(device)
        weight.requires_grad_()
        bias.requires_grad_()
        # Spread the positives over the two finest levels, where the cost is (as in practice
        # the objects of a data set sit on every level; these are the levels that matter).
        k = args.positives // 2 if level < 2 else 2
        img_idx = torch.randint(0, B, (k,), generator=generator).to(device)
        cell_idx = torch.randperm(S * S, generator=generator)[:k].to(device)
        targets = (torch.rand(k, h, w, generator=generator) > 0.7).to(torch.uint8).to(device)
        levels.append((feat, weight, bias, img_idx, cell_idx, targets))
    return levels


def mask_loss(levels, way):
    dices = []
    for feat, weight, bias, img_idx, cell_idx, targets in levels:
        if way == "full":
            logits = torch.nn.functional.conv2d(feat, weight, bias)  # (B, S^2, h, w)
            picked = logits[img_idx, cell_idx]  # (K, h, w)
        else:
            picked = mask_logits_for_cells(feat, img_idx, cell_idx, weight, bias)  # (K, h, w)
        dices.append(dice_loss(torch.sigmoid(picked), targets))
    return torch.cat(dices).mean()


def worker(args) -> dict:
    device = torch.device(args.device)
    levels = make_inputs(args, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    loss_value, seconds = float("nan"), 0.0
    if args.worker != "inputs":
        start = time.perf_counter()
        for _ in range(args.repeat):
            loss = mask_loss(levels, args.worker)
            loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / args.repeat
        loss_value = float(loss)
    if device.type == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    grad_sum = float(sum(lv[0].grad.abs().sum() for lv in levels if lv[0].grad is not None))
    return {"seconds": seconds, "peak_mb": peak_mb, "loss": loss_value, "grad_abs": grad_sum}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1088), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--channels", type=int, default=256, help="tower width D")
    parser.add_argument("--positives", type=int, default=30, help="positive cells, levels 0-1")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", choices=WAYS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return

    H, W = args.size
    floats = sum(
        args.batch * S * S * (2 * H // s) * (2 * W // s)
        for S, s in zip(NUM_GRIDS, STRIDES, strict=True)
    )
    print(
        f"mask loss, forward + backward, {args.batch} x {H} x {W}, D = {args.channels}, "
        f"grids {NUM_GRIDS}, {args.positives // 2 * 2 + 6} positive cells, {args.device}"
    )
    print(
        f"all S^2 mask logits: {floats / 1e6:.1f} M floats ({floats * 4 / 2**20:.0f} MiB "
        "in float32)"
    )
    forwarded = sys.argv[1:] if argv is None else list(argv)
    results = {}
    for way in WAYS:
        command = [sys.executable, __file__, *forwarded, "--worker", way]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[way] = json.loads(out.strip().splitlines()[-1])
    base = results["inputs"]["peak_mb"] if args.device == "cpu" else 0.0
    memory_kind = "peak RSS" if args.device == "cpu" else "peak CUDA memory"
    feat_floats = sum(args.batch * args.channels * (2 * H // s) * (2 * W // s) for s in STRIDES)
    print(
        f"inputs alone: {memory_kind} {results['inputs']['peak_mb']:.0f} MiB; both ways also "
        f"hold the features' gradient, {feat_floats * 4 / 2**20:.0f} MiB"
    )
    print(f"{'way':<12}{'time (s)':>10}{'extra ' + memory_kind + ' (MiB)':>32}{'loss':>12}")
    for way in ("full", "positives"):
        r = results[way]
        print(f"{way:<12}{r['seconds']:>10.2f}{r['peak_mb'] - base:>32.0f}{r['loss']:>12.6f}")
    full, pos = results["full"], results["positives"]
    print(
        f"ratio full / positives: time {full['seconds'] / max(pos['seconds'], 1e-9):.1f}x, "
        f"memory {(full['peak_mb'] - base) / max(pos['peak_mb'] - base, 1e-9):.1f}x; "
        f"same loss: {abs(full['loss'] - pos['loss']) < 1e-5}, "
        f"same feature gradients: "
        f"{abs(full['grad_abs'] - pos['grad_abs']) <= 1e-4 * abs(full['grad_abs'])}"
    )


if __name__ == "__main__":
    main()
