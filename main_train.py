"""Train SOLO: `python main_train.py` (the CPU preset on the built-in data when there is no GPU).

    python main_train.py                                # preset "auto": cpu without a GPU
    python main_train.py --preset cis680 --data PATH/train   # CIS680 files PATH/train_*_comp_zlib.*
    python main_train.py --data ann.json --coco-images imgs/ # COCO-format json + image folder
    python main_train.py --data my_photos/              # a folder of LabelMe json files
    python main_train.py --overfit 16 --data instances.json --coco-images images/  # fit 16 images
    torchrun --nproc_per_node=2 main_train.py ...       # DistributedDataParallel (gloo on CPU)

Every flag of `config.Config` is available (`python main_train.py --help`). The run folder
(`--out`) receives `last.pt` after every epoch (written atomically), `loss.csv` and `loss.png`
(total, focal and dice loss against iterations), `metrics.json` and the held-out COCO mask AP,
which is printed at the end. `resume_train.py RUN` continues an interrupted run.

A new run never overwrites another: when `--out` already holds a checkpoint, the run goes to
the next free `OUT2`, `OUT3`, ... (printed; `--exist-ok` trains into `--out` on purpose).
Bad input, a full disk and Ctrl-C end the command with one line on stderr (cli.py).

Shape legend: B batch, N instances, H x W padded input.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from matplotlib.figure import Figure
from torch.utils.data import DataLoader, DistributedSampler

import dataset as ds
from config import Config, add_config_args, config_from_args, config_to_dict
from dataset import CachedSamples, Repeated, augmentation, build_data  # noqa: F401
from errors import NonFiniteLossError  # noqa: F401  (main_train.NonFiniteLossError)
from evaluation import evaluate_model, format_table

# Checkpoint writing and reading live beside the model; their names stay importable from here.
from model import (  # noqa: F401
    atomic_save,
    build_model,
    config_of,
    load_checkpoint,
    remove_partial_saves,
    resolve_device,
    rng_states,
    save_checkpoint,
    saved_epoch,
    set_rng_states,
)

# --------------------------------------------------------------------------------------------
# small pure helpers
# --------------------------------------------------------------------------------------------


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says where the run stood, what its last checkpoint
    is and how to continue it."""


def numbered_run_dir(out: str | Path, number: int) -> Path:
    """`out` for number 1, else `out` with the number appended to its name (runs/exp ->
    runs/exp2, as Ultralytics numbers its runs)."""
    out = Path(out)
    if number == 1:
        return out
    base = out if out.name else out.resolve()  # "." has no name to number
    return base.with_name(f"{base.name}{number}")


def free_run_number(out: str | Path) -> int:
    """1 when the folder `out` holds no checkpoint (`last.pt`), else the first n >= 2 whose
    `numbered_run_dir(out, n)` holds none: a new run never overwrites another one."""
    number = 1
    while (numbered_run_dir(out, number) / "last.pt").exists():
        number += 1
    return number


def checkpoint_note(path: str | Path, epoch: int | None = None) -> str:
    """For messages: `last checkpoint: PATH (epoch M)`, or that none was written yet; `epoch`
    when the caller has read it already (`saved_epoch`)."""
    epoch = saved_epoch(path) if epoch is None else epoch
    if epoch is None:
        return "no checkpoint was written yet"
    return f"last checkpoint: {path} (epoch {epoch})"


def interrupted_message(state: dict) -> str:
    """The one line for a Ctrl-C during `train` with the run's `state`."""
    run_dir = state.get("run_dir")
    if run_dir is None:
        return "interrupted before training started; no checkpoint was written"
    if state.get("final_evaluation"):
        where = "during the final evaluation"
    else:
        where = f"at epoch {state['epoch'] + 1}, iteration {state['iteration']}"
    epoch = saved_epoch(run_dir / "last.pt")  # read once: it maps the whole checkpoint
    message = f"interrupted {where}; {checkpoint_note(run_dir / 'last.pt', epoch)}"
    if epoch is not None:
        message += f"; continue with `python resume_train.py {run_dir}`"
    return message


def lr_at(cfg: Config, it: int, epoch: int, total_iters: int) -> float:
    """Learning rate at iteration `it` (0-based) of epoch `epoch` (0-based).

    Linear warm-up from lr x warmup_ratio over `warmup_iters` (the authors: 1/3 over 500
    iterations), then either the
    hand-out's step schedule (/10 at each epoch in `lr_steps`, counted 1-based as the hand-out
    does: "at the 27th epoch") or a cosine decay to zero over `total_iters`.
    """
    if cfg.lr_schedule == "step":
        factor = 0.1 ** sum(epoch + 1 >= step for step in cfg.lr_steps)
    else:
        progress = min(it / max(total_iters, 1), 1.0)
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    if it < cfg.warmup_iters:
        warm = cfg.warmup_ratio + (1.0 - cfg.warmup_ratio) * it / cfg.warmup_iters
        factor *= warm
    return cfg.lr * factor


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------
# data and model
# --------------------------------------------------------------------------------------------


class BudgetProbe:
    """Fixes how many iterations fit a wall-time budget from the speed of the first ones.

    With a time budget (`time_budget_min`, counted from the start of the run: data, training,
    validation), the cosine schedule needs its length before it is far along. After
    `PROBE_ITERS` iterations the measured time per iteration (the first `SKIP` excluded: they
    pay one-off costs) gives the iterations that fit, counting each epoch's validation pass as
    a third of a training step per batch. The last epoch may be cut short: whole epochs only
    would leave up to one epoch of the budget unused (measured: 4 epochs of 3.9 min in a
    17.5 min budget ended training 1.3 min early). The number is stored in the checkpoint, so
    a resumed run keeps the same schedule.
    """

    SKIP = 3
    PROBE_ITERS = 20

    def __init__(self, cfg: Config, t_start: float, iters_per_epoch: int, val_batches: int):
        self.budget = cfg.time_budget_min * 60.0
        self.max_epochs = cfg.epochs
        self.t_start = t_start
        self.iters_per_epoch = iters_per_epoch
        self.val_batches = val_batches
        self.t_skip = None

    def step(self, done: int, iteration: int) -> int:
        """Call after each iteration (`done` counted in this process, `iteration` the run's);
        0 until it decides, then the run's total iterations."""
        if done == self.SKIP:
            self.t_skip = time.time()
        if done < self.PROBE_ITERS or self.t_skip is None:
            return 0
        per_iter = (time.time() - self.t_skip) / (done - self.SKIP)
        return self.iterations_that_fit(per_iter, iteration, time.time() - self.t_start)

    def iterations_that_fit(self, per_iter: float, iteration: int, elapsed: float) -> int:
        """Total iterations for `per_iter` seconds per iteration, `iteration` done after
        `elapsed` seconds: at least one more, at most `max_epochs` epochs."""
        per_epoch = per_iter * (self.iters_per_epoch + self.val_batches / 3.0)
        return self._total(per_epoch, iteration, elapsed, at_least=iteration + 1)

    def replan(self, iteration: int, per_iter: float, val_seconds: float, elapsed: float) -> int:
        """At an epoch's end: the run's total iterations again, from the last epoch's measured
        seconds per iteration and validation pass (the first probe's 20 iterations misjudged
        the rest by 5 %, measured: about 18.4 min for a 17.5 min budget). Can end the run now."""
        per_epoch = per_iter * self.iters_per_epoch + val_seconds
        return self._total(per_epoch, iteration, elapsed, at_least=iteration)

    def _total(self, per_epoch: float, iteration: int, elapsed: float, at_least: int) -> int:
        """`iteration` plus the iterations of the epochs (`per_epoch` seconds each, fractions
        kept) that fit the budget's time left; in [at_least, max_epochs epochs]."""
        more_epochs = max(self.budget - elapsed, 0.0) / per_epoch
        total = int(iteration + more_epochs * self.iters_per_epoch)
        return max(at_least, min(self.max_epochs * self.iters_per_epoch, total))

    def finish(self, epochs_done: int) -> int:
        """Fallback when an epoch is shorter than the probe: decide from whole epochs; returns
        the run's total iterations."""
        elapsed = time.time() - self.t_start
        per_epoch = elapsed / max(epochs_done, 1)
        fit = epochs_done + int((self.budget - elapsed) // per_epoch)
        return max(epochs_done, min(self.max_epochs, fit)) * self.iters_per_epoch


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    # No weight decay on norm layers and biases (standard for both SGD and AdamW recipes).
    # SOLOv2's dynamic-kernel output conv may take a smaller learning rate (`kernel_lr_mult`):
    # each mask logit sums E kernel weights times non-negative features, so Adam's
    # equal-sized steps on every weight move the logits E times faster than one weight.
    by_kind: dict[tuple[bool, float], list] = {}  # (decayed, lr multiplier) -> parameters
    for name, p in model.named_parameters():
        if p.requires_grad:
            mult = cfg.kernel_lr_mult if ".kernel_out." in f".{name}" else 1.0
            by_kind.setdefault((p.ndim > 1, mult), []).append(p)
    groups = [
        {"params": params, "weight_decay": cfg.weight_decay if decay else 0.0, "lr_mult": mult}
        for (decay, mult), params in by_kind.items()
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    # The fused kernel: one pass over all parameters instead of a loop of small tensor ops
    # (measured on the CPU preset: the optimiser step 25 -> 13 ms, 4 % of a training step).
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=True)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The scheduled lr on every group, times the group's `lr_mult` (see `build_optimizer`)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


# --------------------------------------------------------------------------------------------
# logging
# --------------------------------------------------------------------------------------------

LOSS_KEYS = ("total", "cate", "mask")


def write_loss_logs(run_dir: Path, history: list[dict], val_history: list[dict]) -> None:
    """loss.csv (one row per logged point) and loss.png (total, focal, dice vs iteration)."""
    with open(run_dir / "loss.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["iteration", "epoch", "total", "focal", "dice", "lr"])
        for row in history:
            writer.writerow(
                [row["iter"], row["epoch"], *(f"{row[k]:.6f}" for k in LOSS_KEYS), row["lr"]]
            )

    fig = Figure(figsize=(12, 3.6))
    titles = {"total": "total loss", "cate": "focal (category) loss", "mask": "dice (mask) loss"}
    for k, key in enumerate(LOSS_KEYS):
        ax = fig.add_subplot(1, 3, k + 1)
        if history:
            ax.plot([r["iter"] for r in history], [r[key] for r in history], label="train")
        if val_history:
            ax.plot(
                [r["iter"] for r in val_history],
                [r[key] for r in val_history],
                "o-",
                label="validation",
            )
        ax.set_title(titles[key])
        ax.set_xlabel("iteration")
        ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "loss.png", dpi=90)


def write_learning_curve(run_dir: Path, points: list[dict]) -> None:
    """learning_curve.csv and learning_curve.png: held-out AP and AP50 against minutes of run
    time (evaluation excluded), one point per `--eval-at-min` mark and one at the end."""
    with open(run_dir / "learning_curve.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(points[0]))
        writer.writeheader()
        writer.writerows(points)

    fig = Figure(figsize=(5.5, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    minutes = [0.0] + [p["mark_min"] for p in points]
    for key in ("AP", "AP50"):
        values = [0.0] + [p[key] for p in points]
        ax.plot(minutes, values, "o-", label=f"mask {key}")
        for x, y in zip(minutes[1:], values[1:], strict=True):
            ax.annotate(f"{y:.3f}", (x, y), textcoords="offset points", xytext=(0, 5), ha="center")
    ax.set_xlabel("minutes of training (data and training; evaluation excluded)")
    ax.set_ylabel("held-out mask AP")
    ax.set_title("learning curve")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(run_dir / "learning_curve.png", dpi=90)


# --------------------------------------------------------------------------------------------
# the training loop
# --------------------------------------------------------------------------------------------


def _dist_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def make_loader(dataset, cfg: Config, epoch: int, shuffle: bool, rank: int, world: int):
    """A DataLoader whose order (and workers' augmentation seeds) depend only on seed and epoch,
    so a run resumed at epoch k sees exactly the batches of the run that never stopped."""
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    sampler = None
    if world > 1:
        sampler = DistributedSampler(
            dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=cfg.seed
        )
        sampler.set_epoch(epoch)
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=cfg.num_workers,
        collate_fn=ds.collate_fn,
        generator=generator,
        drop_last=shuffle and len(dataset) >= cfg.batch_size * world,
        persistent_workers=False,
    )


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True where oneDNN runs bf16 natively (AVX-512 BF16 or AMX). Elsewhere (AVX2 only)
    bf16 is emulated: the CPU preset's training step measured 16.2x slower in bf16 than in
    float32 on a 2-core AMD EPYC (8.9 s against 0.55 s; docs/cpu_preset.md, "bf16 needs a
    CPU that has it"), where on a CPU with AVX-512 BF16 it was 1.56x faster."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(probe()) if probe is not None else False


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast precision of a run: float16 on CUDA with `amp`, bfloat16 on a CPU with
    `cpu_bf16` that runs bf16 natively (`cpu_has_native_bf16`), else None (float32)."""
    if device.type == "cuda" and cfg.amp:
        return torch.float16
    if device.type == "cpu" and cfg.cpu_bf16 and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def _autocast(cfg: Config, device: torch.device):
    dtype = autocast_dtype(cfg, device)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _to_device(batch, device, channels_last=False):
    imgs, labels, masks, boxes, metas = batch
    imgs = imgs.to(device, non_blocking=True)
    if channels_last:
        imgs = imgs.contiguous(memory_format=torch.channels_last)
    labels = [x.to(device) for x in labels]
    masks = [x.to(device) for x in masks]
    boxes = [x.to(device) for x in boxes]
    return imgs, labels, masks, boxes, metas


@torch.no_grad()
def validation_loss(model, loader, cfg: Config, device) -> dict:
    """Mean losses over the held-out split, with the network in eval mode (BN running stats)."""
    model.eval()
    sums = dict.fromkeys(LOSS_KEYS, 0.0)
    count = 0
    for batch in loader:
        imgs, labels, masks, boxes, _ = _to_device(batch, device, cfg.channels_last)
        with _autocast(cfg, device):
            losses = model(imgs, labels, masks, boxes)
        for k in LOSS_KEYS:
            sums[k] += float(losses[k]) * imgs.shape[0]
        count += imgs.shape[0]
    model.train()
    return {k: v / max(count, 1) for k, v in sums.items()}


def train(cfg: Config, checkpoint: dict | None = None, stop_after_epoch: int | None = None):
    """Train with `cfg`; continue from `checkpoint` (a loaded last.pt) when given.

    Returns the final held-out metrics dict (rank 0) or None. `stop_after_epoch` ends the run
    after that many epochs have been completed (used to test resume equivalence).

    A new run never overwrites another: when `cfg.out` holds a checkpoint it goes to the next
    free numbered folder (`free_run_number`; printed, and recorded in config.json and the
    checkpoint) unless `cfg.exist_ok`. A resumed run writes into `cfg.out` as given. Ctrl-C
    becomes a `TrainingInterrupted` whose message says where the run stood and how to go on.
    """
    state = {
        "epoch": 0,
        "iteration": 0,
        "history": [],
        "val_history": [],
        "ap_history": [],
        "epochs_total": 0,
        "iters_total": 0,
    }
    try:
        return _train(cfg, checkpoint, stop_after_epoch, state)
    except KeyboardInterrupt as err:
        raise TrainingInterrupted(interrupted_message(state)) from err


def _train(cfg: Config, checkpoint: dict | None, stop_after_epoch: int | None, state: dict):
    """`train`'s body; `state` (the schedule's position, histories, and the run folder once
    chosen) is filled in as the run goes, so that an interruption can say where it stood."""
    rank, world, local_rank = _dist_info()
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo"
        dist.init_process_group(backend)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    is_main = rank == 0
    if checkpoint is None and not cfg.exist_ok:
        # Rank 0 looks at the disk and decides; every rank takes its number.
        number = _rank0_value(free_run_number(cfg.out) if is_main else 0, world, device)
        if number > 1:
            chosen = numbered_run_dir(cfg.out, number)
            if is_main:
                print(
                    f"{cfg.out} holds a run (last.pt): this run goes to {chosen} "
                    "(--exist-ok trains into the folder given)"
                )
            cfg = replace(cfg, out=str(chosen))
    run_dir = Path(cfg.out)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for path in remove_partial_saves(run_dir):
            print(f"removed {path}, a partial checkpoint left by an interrupted write")
        (run_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
    state["run_dir"] = run_dir

    t_start = time.time()
    seed_everything(cfg.seed)
    train_set, val_set = build_data(cfg)
    if is_main and device.type == "cpu" and cfg.cpu_bf16 and autocast_dtype(cfg, device) is None:
        print("bf16 autocast off: this CPU has no native bf16 (AVX-512 BF16 or AMX), where it is")
        print("emulated and many times slower; training in float32")
    if is_main:
        print(
            f"data: {len(train_set)} training and {len(val_set)} held-out images "
            f"({cfg.data}), classes {train_set.class_names}"
        )
    model = build_model(cfg, num_classes=len(train_set.class_names)).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.amp)

    state["class_names"] = list(train_set.class_names)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if "scaler" in checkpoint and checkpoint["scaler"]:
            scaler.load_state_dict(checkpoint["scaler"])
        state.update(
            epoch=checkpoint["epoch"],
            iteration=checkpoint["iteration"],
            history=list(checkpoint["history"]),
            val_history=list(checkpoint["val_history"]),
            ap_history=list(checkpoint.get("ap_history", [])),
            epochs_total=checkpoint["epochs_total"],
            iters_total=checkpoint.get("iters_total", 0),
        )
        set_rng_states(checkpoint["rng"])
        if is_main:
            print(f"resumed at epoch {state['epoch']}, iteration {state['iteration']}")
    epochs_total = state["epochs_total"] or cfg.epochs

    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )

    iters_per_epoch = max(len(make_loader(train_set, cfg, 0, True, rank, world)), 1)
    # The schedule's length; a time budget may end the last epoch early (BudgetProbe).
    iters_total = state["iters_total"] or epochs_total * iters_per_epoch
    val_loss_set = val_set
    if 0 < cfg.val_loss_images < len(val_set):
        val_loss_set = val_set.subset(list(range(cfg.val_loss_images)))
    val_loader = make_loader(val_loss_set, cfg, 0, False, 0, 1)
    # Learning-curve marks (minutes of run time, evaluation excluded) not yet reached.
    done = {point["mark_min"] for point in state["ap_history"]}
    marks = [m for m in sorted(cfg.eval_at_min) if m not in done] if len(val_set) else []
    eval_seconds = 0.0
    start_iter = state["iteration"]
    budget_probe = None
    if cfg.time_budget_min > 0 and state["epochs_total"] == 0:
        val_batches = math.ceil(len(val_loss_set) / cfg.batch_size) if len(val_set) else 0
        budget_probe = BudgetProbe(cfg, t_start, iters_per_epoch, val_batches)
    epoch = state["epoch"]
    while epoch < epochs_total:
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            break
        # Seeds per epoch: an epoch's randomness depends on (seed, epoch) only, never on
        # what ran before, so resuming gives the same numbers as the uninterrupted run.
        seed_everything(cfg.seed * 1000 + epoch + 1)
        loader = make_loader(train_set, cfg, epoch, True, rank, world)
        net.train()
        t_epoch = time.time()
        eval_before, iter_before = eval_seconds, state["iteration"]
        epoch_losses = []
        progress = _progress(loader, is_main, f"epoch {epoch + 1}/{epochs_total}")
        for imgs, labels, masks, boxes, _ in (
            _to_device(b, device, cfg.channels_last) for b in progress
        ):
            it = state["iteration"]
            if it >= iters_total:
                break
            lr = lr_at(cfg, it, epoch, iters_total)
            set_lr(optimizer, lr)
            with _autocast(cfg, device):
                losses = net(imgs, labels, masks, boxes)
            values = {k: float(losses[k].detach()) for k in LOSS_KEYS}
            if not all(math.isfinite(v) for v in values.values()):
                raise NonFiniteLossError(
                    f"non-finite loss at epoch {epoch + 1}, iteration {it}: "
                    + ", ".join(f"{k}={v}" for k, v in values.items())
                    + f"; {checkpoint_note(run_dir / 'last.pt')}"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses["total"]).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            state["iteration"] = it + 1
            epoch_losses.append(values)
            if (it + 1) % cfg.log_every == 0:
                window = epoch_losses[-cfg.log_every :]
                point = {k: sum(v[k] for v in window) / len(window) for k in LOSS_KEYS}
                state["history"].append({"iter": it + 1, "epoch": epoch + 1, "lr": lr, **point})
            if budget_probe is not None and state["epochs_total"] == 0:
                decided = _rank0_value(
                    budget_probe.step(it + 1 - start_iter, it + 1), world, device
                )
                if decided:
                    iters_total = state["iters_total"] = decided
                    epochs_total = state["epochs_total"] = math.ceil(decided / iters_per_epoch)
                    if is_main:
                        print(
                            f"\ntime budget {cfg.time_budget_min:g} min: {decided} iterations "
                            f"fit ({decided / iters_per_epoch:.2f} epochs)"
                        )
            if marks and (time.time() - t_start - eval_seconds) / 60.0 >= marks[0]:
                eval_seconds += _learning_curve_point(
                    model, val_set, cfg, device, state, marks.pop(0), is_main, run_dir
                )
            if is_main and hasattr(progress, "set_postfix"):
                progress.set_postfix(
                    {k: f"{np.mean([v[k] for v in epoch_losses[-20:]]):.3f}" for k in LOSS_KEYS}
                )
        epoch += 1
        loop_seconds = time.time() - t_epoch - (eval_seconds - eval_before)
        t_val = time.time()
        val = validation_loss(model, val_loader, cfg, device) if len(val_set) else None
        val_seconds = time.time() - t_val
        if val is not None:
            state["val_history"].append({"iter": state["iteration"], "epoch": epoch, **val})
        if budget_probe is not None and state["epochs_total"] == 0:  # epoch shorter than probe
            iters_total = budget_probe.finish(epoch)
            epochs_total = iters_total // iters_per_epoch
            if is_main:
                print(f"time budget {cfg.time_budget_min:g} min: {epochs_total} epochs fit")
        elif budget_probe is not None and epoch < epochs_total:
            done_now = state["iteration"] - iter_before
            planned = budget_probe.replan(
                state["iteration"],
                loop_seconds / max(done_now, 1),
                val_seconds,
                time.time() - t_start - eval_seconds,
            )
            planned = _rank0_value(planned, world, device)
            if planned != iters_total and is_main:
                print(f"time budget: {planned} iterations now fit (planned {iters_total})")
            iters_total = planned
            epochs_total = max(epoch, math.ceil(planned / iters_per_epoch))
        state["epoch"] = epoch
        state["epochs_total"] = epochs_total
        state["iters_total"] = iters_total
        if is_main:
            mean = {k: np.mean([v[k] for v in epoch_losses]) for k in LOSS_KEYS}
            msg = ", ".join(f"{k} {mean[k]:.4f}" for k in LOSS_KEYS)
            if val is not None:
                msg += " | val " + ", ".join(f"{k} {val[k]:.4f}" for k in LOSS_KEYS)
            print(f"epoch {epoch}/{epochs_total}: {msg} ({time.time() - t_epoch:.0f} s)")
            save_checkpoint(run_dir / "last.pt", cfg, model, optimizer, scaler, state)
            write_loss_logs(run_dir, state["history"], state["val_history"])
        if world > 1:
            dist.barrier()

    metrics = None
    finished = epoch >= epochs_total
    if is_main and finished and len(val_set):
        state["final_evaluation"] = True
        minutes = (time.time() - t_start - eval_seconds) / 60.0  # before this evaluation
        metrics = evaluate_model(model, val_set, cfg, device)
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        if cfg.eval_at_min:  # the end of the run is the learning curve's last point
            point = {"mark_min": round(minutes, 2), "iteration": state["iteration"], **metrics}
            state["ap_history"].append(point)
            write_learning_curve(run_dir, state["ap_history"])

        what = "training (overfit)" if cfg.overfit else "held-out"
        print(f"COCO mask AP on the {len(val_set)} {what} images:")
        print(format_table(metrics))
        print(f"total wall time {(time.time() - t_start) / 60:.1f} min; run folder {run_dir}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return metrics


def _rank0_value(value: int, world: int, device) -> int:
    """Rank 0's `value` on every rank (the schedule every rank must follow); `value` alone
    without torchrun."""
    if world == 1:
        return value
    tensor = torch.tensor([value], device=device)
    dist.broadcast(tensor, 0)
    return int(tensor.item())


def _learning_curve_point(model, val_set, cfg, device, state, mark, is_main, run_dir) -> float:
    """Held-out AP now (a learning-curve point); returns the seconds it took."""
    t0 = time.time()
    if is_main:
        metrics = evaluate_model(model, val_set, cfg, device)
        point = {"mark_min": mark, "iteration": state["iteration"], **metrics}
        state["ap_history"].append(point)
        write_learning_curve(run_dir, state["ap_history"])
        print(
            f"\n[{mark:g} min] mask AP {metrics['AP']:.4f} (AP50 {metrics['AP50']:.4f}) "
            f"on the {len(val_set)} evaluation images"
        )
    model.train()
    return time.time() - t0


def _progress(loader, enabled: bool, desc: str):
    if not enabled:
        return loader
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is in requirements; stay usable without it
        return loader
    return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, file=sys.stdout)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_args(parser)
    return parser


def main(argv: list[str] | None = None):
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    return train(cfg)


if __name__ == "__main__":
    from cli import run

    run(main)
