"""Training SOLO: `train(cfg)`, the loop behind `main_train.py` and `resume_train.py`.

    from training import train
    metrics = train(dataclasses.replace(preset("cpu"), epochs=1))      # a new run into cfg.out
    metrics = train(config_of(checkpoint), checkpoint=checkpoint)      # continue a loaded last.pt

A run takes its folder (never another run's: `free_run_number`), builds the data, model and
optimiser, then trains epoch after epoch; after each it computes the validation loss and
writes `last.pt` (atomically), `loss.csv` and `loss.png`; at the end the held-out COCO mask AP
goes to `metrics.json`. Under torchrun every process trains (DistributedDataParallel) and
rank 0 writes.

The pieces, each small enough to test alone:
- `RunState`: where a run stands; what `last.pt` stores beside the weights and a resumed run
  restores (`RunState.restore`).
- `TimeBudget`: the run's length under `--time-budget-min`, probed from the first iterations
  and planned again after every epoch.
- `LearningCurve`: held-out AP at the `--eval-at-min` marks and at the end, its time kept off
  the run's clock.
- `build_training`: model, optimiser and scaler, restored on resume; with `--init-from` a new
  run's weights come from that file (`zoo.init_from_file`, one line `init_note`).
- `lr_at`, `build_optimizer`, `set_lr`, `make_loader`, `autocast_dtype` (the one precision
  flag, `amp`), `validation_loss`, `write_loss_logs`, `write_learning_curve`.

Shape legend: B batch, N instances, H x W padded input.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from matplotlib.figure import Figure
from torch.utils.data import DataLoader, DistributedSampler

import dataset as ds
from cli import raise_if_interrupted
from config import Config, config_to_dict
from dataset import build_data
from errors import NonFiniteLossError
from evaluation import evaluate_model, format_table
from model import (
    build_model,
    remove_partial_saves,
    resolve_device,
    save_checkpoint,
    saved_epoch,
    set_rng_states,
)
from zoo import freeze_pretrained_stages, init_from_file

LOSS_KEYS = ("total", "cate", "mask")

# --------------------------------------------------------------------------------------------
# run folders and messages
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


def interrupted_message(run: RunState) -> str:
    """The one line for a Ctrl-C during `train` with the run at `run`."""
    if run.run_dir is None:
        return "interrupted before training started; no checkpoint was written"
    if run.final_evaluation:
        where = "during the final evaluation"
    else:
        where = f"at epoch {run.epoch + 1}, iteration {run.iteration}"
    epoch = saved_epoch(run.run_dir / "last.pt")  # read once: it maps the whole checkpoint
    message = f"interrupted {where}; {checkpoint_note(run.run_dir / 'last.pt', epoch)}"
    if epoch is not None:
        message += f"; continue with `python resume_train.py {run.run_dir}`"
    return message


# --------------------------------------------------------------------------------------------
# schedule, optimiser, precision
# --------------------------------------------------------------------------------------------


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


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True where oneDNN runs bf16 natively (AVX-512 BF16 or AMX). Elsewhere (AVX2 only)
    bf16 is emulated: the CPU preset's training step measured 16.2x slower in bf16 than in
    float32 on a 2-core AMD EPYC (8.9 s against 0.55 s; docs/cpu_preset.md, "bf16 needs a
    CPU that has it"), where on a CPU with AVX-512 BF16 it was 1.56x faster."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(probe()) if probe is not None else False


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast precision of a run with `amp`: float16 on CUDA, bfloat16 on a CPU that
    runs bf16 natively (`cpu_has_native_bf16`); None (float32) otherwise or without `amp`."""
    if not cfg.amp:
        return None
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def _autocast(cfg: Config, device: torch.device):
    dtype = autocast_dtype(cfg, device)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


# --------------------------------------------------------------------------------------------
# the pieces of a run: its state, its time budget, its learning curve
# --------------------------------------------------------------------------------------------

# What `last.pt` stores of a `RunState` (model.save_checkpoint adds weights, optimiser, scaler,
# random states and the config).
SAVED_FIELDS = (
    "epoch",
    "iteration",
    "epochs_total",
    "iters_total",
    "history",
    "val_history",
    "ap_history",
    "class_names",
)


@dataclass
class RunState:
    """Where a run stands, filled in as it goes: what its checkpoint stores beside the weights
    (`saved`), what a resumed run takes back (`restore`), and what a Ctrl-C message names."""

    epoch: int = 0  # epochs completed
    iteration: int = 0  # iterations completed: the schedule's position
    epochs_total: int = 0  # the run's epochs; 0 until fixed (`--epochs` or the time budget)
    iters_total: int = 0  # the schedule's length in iterations; 0 until fixed
    history: list[dict] = field(default_factory=list)  # a training-loss point per log_every
    val_history: list[dict] = field(default_factory=list)  # the validation loss per epoch
    ap_history: list[dict] = field(default_factory=list)  # the learning curve's points
    class_names: list[str] = field(default_factory=list)
    run_dir: Path | None = None  # once chosen
    final_evaluation: bool = False  # the run is in its final evaluation

    def saved(self) -> dict:
        """The `SAVED_FIELDS`, for `model.save_checkpoint`."""
        return {name: getattr(self, name) for name in SAVED_FIELDS}

    def restore(self, checkpoint: dict, model, optimizer, scaler) -> None:
        """Continue from `checkpoint` (a loaded last.pt): weights, optimiser, scaler, the
        schedule's position, the histories and the random states. Checkpoints from before the
        learning curve and the iteration-exact time budget have no `ap_history` and
        `iters_total`: none and 0 (whole epochs)."""
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        self.epoch = checkpoint["epoch"]
        self.iteration = checkpoint["iteration"]
        self.epochs_total = checkpoint["epochs_total"]
        self.iters_total = checkpoint.get("iters_total", 0)
        self.history = list(checkpoint["history"])
        self.val_history = list(checkpoint["val_history"])
        self.ap_history = list(checkpoint.get("ap_history", []))
        set_rng_states(checkpoint["rng"])


def _same(value: int) -> int:
    return value


@dataclass
class TimeBudget:
    """The run's length under a wall-time budget (`time_budget_min`), and where it changes.

    The budget counts from the start of the run (data, training, validation), and the cosine
    schedule needs its length before it is far along. After `PROBE_ITERS` iterations the
    measured time per iteration (the first `SKIP` excluded: they pay one-off costs) gives the
    iterations that fit, counting each epoch's validation pass as a third of a training step
    per batch (`after_iteration`). After every epoch the plan is made again from that epoch's
    measured speed (`after_epoch`). The last epoch may be cut short: whole epochs only would
    leave up to one epoch of the budget unused (measured: 4 epochs of 3.9 min in a 17.5 min
    budget ended training 1.3 min early). The totals are stored in the checkpoint, so a
    resumed run keeps the same schedule.

    `share` makes rank 0's number every rank's (torchrun); `verbose` prints the decisions.
    """

    SKIP = 3
    PROBE_ITERS = 20

    cfg: Config
    t_start: float
    iters_per_epoch: int
    val_batches: int
    start_iteration: int = 0
    share: Callable[[int], int] = _same
    verbose: bool = False
    t_skip: float | None = field(default=None, init=False)
    decided: bool = field(default=False, init=False)  # the probe or an epoch fixed the totals

    @property
    def minutes(self) -> float:
        return self.cfg.time_budget_min

    @property
    def budget(self) -> float:
        """Seconds."""
        return self.cfg.time_budget_min * 60.0

    @property
    def max_epochs(self) -> int:
        return self.cfg.epochs

    # --- the arithmetic ---

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

    # --- the loop's calls ---

    def after_iteration(self, run: RunState) -> None:
        """After each iteration until decided: once the probe's iterations are timed, fix
        `run.iters_total` and `run.epochs_total`."""
        if self.decided:
            return
        done = run.iteration - self.start_iteration  # in this process
        if done == self.SKIP:
            self.t_skip = time.time()
        total = 0
        if done >= self.PROBE_ITERS and self.t_skip is not None:
            per_iter = (time.time() - self.t_skip) / (done - self.SKIP)
            total = self.iterations_that_fit(per_iter, run.iteration, time.time() - self.t_start)
        total = self.share(total)
        if total:
            self.decided = True
            run.iters_total = total
            run.epochs_total = math.ceil(total / self.iters_per_epoch)
            self._say(
                f"\ntime budget {self.minutes:g} min: {total} iterations fit "
                f"({total / self.iters_per_epoch:.2f} epochs)"
            )

    def after_epoch(
        self, run: RunState, epochs_done: int, per_iter: float, val_seconds: float, elapsed: float
    ) -> None:
        """At the end of epoch `epochs_done` (its `per_iter` seconds per iteration and
        `val_seconds` of validation measured, `elapsed` seconds of the run's clock): the totals
        of `run` planned again; an epoch shorter than the probe decides here."""
        if not self.decided:
            run.iters_total = self.share(self.finish(epochs_done))
            run.epochs_total = run.iters_total // self.iters_per_epoch
            self.decided = True
            self._say(f"time budget {self.minutes:g} min: {run.epochs_total} epochs fit")
        elif epochs_done < run.epochs_total:
            planned = self.share(self.replan(run.iteration, per_iter, val_seconds, elapsed))
            if planned != run.iters_total:
                self._say(f"time budget: {planned} iterations now fit (planned {run.iters_total})")
            run.iters_total = planned
            run.epochs_total = max(epochs_done, math.ceil(planned / self.iters_per_epoch))

    def _say(self, message: str) -> None:
        if self.verbose:
            print(message)


class LearningCurve:
    """Held-out AP at `cfg.eval_at_min` minutes of the run and at its end: `learning_curve.csv`
    and `.png`, the points in `run.ap_history` (so a resumed run skips the marks it passed).

    The evaluations' time is kept off the run's clock (`run_seconds`), which the marks, the
    time budget and the final minutes all read.
    """

    def __init__(
        self, cfg: Config, model, val_set, run: RunState, t_start: float, procs: Processes
    ):
        done = {point["mark_min"] for point in run.ap_history}
        # marks (minutes) not yet reached
        self.marks = [m for m in sorted(cfg.eval_at_min) if m not in done] if len(val_set) else []
        self.cfg = cfg
        self.model = model
        self.val_set = val_set
        self.device = procs.device
        self.verbose = procs.is_main  # rank 0 evaluates, writes and prints
        self.run = run
        self.t_start = t_start
        self.eval_seconds = 0.0

    def run_seconds(self) -> float:
        """Seconds since the run started, the evaluations' time left out."""
        return time.time() - self.t_start - self.eval_seconds

    def after_iteration(self) -> None:
        """A point when the next mark is reached."""
        if not self.marks or self.run_seconds() / 60.0 < self.marks[0]:
            return
        t0 = time.time()
        mark = self.marks.pop(0)
        if self.verbose:
            metrics = evaluate_model(self.model, self.val_set, self.cfg, self.device)
            self._add(mark, metrics)
            print(
                f"\n[{mark:g} min] mask AP {metrics['AP']:.4f} (AP50 {metrics['AP50']:.4f}) "
                f"on the {len(self.val_set)} evaluation images"
            )
        self.model.train()
        self.eval_seconds += time.time() - t0

    def final_point(self, metrics: dict, minutes: float) -> None:
        """The end of the run, `minutes` in, as the curve's last point (with `eval_at_min`)."""
        if self.cfg.eval_at_min:
            self._add(round(minutes, 2), metrics)

    def _add(self, mark: float, metrics: dict) -> None:
        self.run.ap_history.append({"mark_min": mark, "iteration": self.run.iteration, **metrics})
        write_learning_curve(self.run.run_dir, self.run.ap_history)


# --------------------------------------------------------------------------------------------
# data, processes, validation
# --------------------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class Processes:
    """This process among torchrun's: rank 0 of 1 without torchrun."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0

    def share(self, value: int) -> int:
        """Rank 0's `value` on every rank (a number every rank must follow)."""
        if self.world == 1:
            return value
        tensor = torch.tensor([value], device=self.device)
        dist.broadcast(tensor, 0)
        return int(tensor.item())

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def start_processes(cfg: Config) -> Processes:
    """The process group under torchrun (from its environment: nccl on CUDA, gloo on the CPU)
    and this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo"
        dist.init_process_group(backend)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return Processes(rank, world, device)


def _to_device(batch, device):
    imgs, labels, masks, boxes, metas = batch
    imgs = imgs.to(device, non_blocking=True)
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
        imgs, labels, masks, boxes, _ = _to_device(batch, device)
        with _autocast(cfg, device):
            losses = model(imgs, labels, masks, boxes)
        for k in LOSS_KEYS:
            sums[k] += float(losses[k]) * imgs.shape[0]
        count += imgs.shape[0]
    model.train()
    return {k: v / max(count, 1) for k, v in sums.items()}


# --------------------------------------------------------------------------------------------
# logging
# --------------------------------------------------------------------------------------------


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


def _progress(loader, enabled: bool, desc: str):
    if not enabled:
        return loader
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is in requirements; stay usable without it
        return loader
    return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, file=sys.stdout)


# --------------------------------------------------------------------------------------------
# the training loop
# --------------------------------------------------------------------------------------------


def train(cfg: Config, checkpoint: dict | None = None, stop_after_epoch: int | None = None):
    """Train with `cfg`; continue from `checkpoint` (a loaded last.pt) when given.

    Returns the final held-out metrics dict (rank 0) or None. `stop_after_epoch` ends the run
    after that many epochs have been completed (used to test resume equivalence).

    A new run never overwrites another: when `cfg.out` holds a checkpoint it goes to the next
    free numbered folder (`free_run_number`; printed, and recorded in config.json and the
    checkpoint) unless `cfg.exist_ok`. A resumed run writes into `cfg.out` as given. Ctrl-C
    becomes a `TrainingInterrupted` whose message says where the run stood and how to go on.
    """
    run = RunState()
    try:
        return _train(cfg, checkpoint, stop_after_epoch, run)
    except KeyboardInterrupt as err:
        raise TrainingInterrupted(interrupted_message(run)) from err


def _train(cfg: Config, checkpoint: dict | None, stop_after_epoch: int | None, run: RunState):
    """`train`'s body; `run` is filled in as the run goes, so that an interruption can say
    where it stood."""
    procs = start_processes(cfg)
    device = procs.device
    t_start = time.time()
    seed_everything(cfg.seed)
    train_set, val_set = build_data(cfg)
    # The run's folder once the data is read: bad data leaves no folder behind.
    cfg = prepare_run_dir(cfg, checkpoint is not None, procs)
    run.run_dir = Path(cfg.out)
    if procs.is_main and device.type == "cpu" and cfg.amp and autocast_dtype(cfg, device) is None:
        print("bf16 autocast off: this CPU has no native bf16 (AVX-512 BF16 or AMX), where it is")
        print("emulated and many times slower; training in float32")
    if procs.is_main:
        print(
            f"data: {len(train_set)} training and {len(val_set)} held-out images "
            f"({cfg.data}), classes {train_set.class_names}"
        )
    run.class_names = list(train_set.class_names)
    model, net, optimizer, scaler = build_training(cfg, run, checkpoint, procs)

    iters_per_epoch = max(len(make_loader(train_set, cfg, 0, True, procs.rank, procs.world)), 1)
    val_loss_set = val_set
    if 0 < cfg.val_loss_images < len(val_set):
        val_loss_set = val_set.subset(list(range(cfg.val_loss_images)))
    val_loader = make_loader(val_loss_set, cfg, 0, False, 0, 1)
    budget = None
    if cfg.time_budget_min > 0 and run.epochs_total == 0:  # a new run: the budget fixes it
        val_batches = math.ceil(len(val_loss_set) / cfg.batch_size) if len(val_set) else 0
        budget = TimeBudget(
            cfg, t_start, iters_per_epoch, val_batches, run.iteration, procs.share, procs.is_main
        )
    # The schedule's length until the budget (if any) decides; it may end the last epoch early.
    run.epochs_total = run.epochs_total or cfg.epochs
    run.iters_total = run.iters_total or run.epochs_total * iters_per_epoch
    curve = LearningCurve(cfg, model, val_set, run, t_start, procs)

    while run.epoch < run.epochs_total:
        if stop_after_epoch is not None and run.epoch >= stop_after_epoch:
            break
        # Seeds per epoch: an epoch's randomness depends on (seed, epoch) only, never on
        # what ran before, so resuming gives the same numbers as the uninterrupted run.
        seed_everything(cfg.seed * 1000 + run.epoch + 1)
        loader = make_loader(train_set, cfg, run.epoch, True, procs.rank, procs.world)
        net.train()
        t_epoch, clock_before, iter_before = time.time(), curve.run_seconds(), run.iteration
        epoch_losses = _train_epoch(net, optimizer, scaler, loader, cfg, procs, run, budget, curve)
        loop_seconds = curve.run_seconds() - clock_before
        epochs_done = run.epoch + 1
        t_val = time.time()
        val = validation_loss(model, val_loader, cfg, device) if len(val_set) else None
        val_seconds = time.time() - t_val
        if val is not None:
            run.val_history.append({"iter": run.iteration, "epoch": epochs_done, **val})
        if budget is not None:
            per_iter = loop_seconds / max(run.iteration - iter_before, 1)
            budget.after_epoch(run, epochs_done, per_iter, val_seconds, curve.run_seconds())
        run.epoch = epochs_done
        if procs.is_main:
            mean = {k: np.mean([v[k] for v in epoch_losses]) for k in LOSS_KEYS}
            msg = ", ".join(f"{k} {mean[k]:.4f}" for k in LOSS_KEYS)
            if val is not None:
                msg += " | val " + ", ".join(f"{k} {val[k]:.4f}" for k in LOSS_KEYS)
            print(f"epoch {run.epoch}/{run.epochs_total}: {msg} ({time.time() - t_epoch:.0f} s)")
            save_checkpoint(run.run_dir / "last.pt", cfg, model, optimizer, scaler, run.saved())
            write_loss_logs(run.run_dir, run.history, run.val_history)
        procs.barrier()

    metrics = None
    if procs.is_main and run.epoch >= run.epochs_total and len(val_set):
        metrics = _final_evaluation(model, val_set, cfg, device, run, curve, t_start)
    if procs.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return metrics


def prepare_run_dir(cfg: Config, resumed: bool, procs: Processes) -> Config:
    """`cfg` with the run's folder: for a new run the next free numbered one when `cfg.out`
    holds a run (unless `exist_ok`; rank 0 decides, every rank follows). Rank 0 creates it,
    removes partial checkpoints an interrupted write left there and writes config.json."""
    if not resumed and not cfg.exist_ok:
        number = procs.share(free_run_number(cfg.out) if procs.is_main else 0)
        if number > 1:
            chosen = numbered_run_dir(cfg.out, number)
            if procs.is_main:
                print(
                    f"{cfg.out} holds a run (last.pt): this run goes to {chosen} "
                    "(--exist-ok trains into the folder given)"
                )
            cfg = replace(cfg, out=str(chosen))
    run_dir = Path(cfg.out)
    if procs.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for path in remove_partial_saves(run_dir):
            print(f"removed {path}, a partial checkpoint left by an interrupted write")
        (run_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
    return cfg


def build_training(cfg: Config, run: RunState, checkpoint: dict | None, procs: Processes):
    """(model, net, optimizer, scaler) for `run.class_names`: `net` is the model, or its
    DistributedDataParallel wrapper under torchrun; all restored from `checkpoint` if given.

    With `cfg.init_from` a new run starts from that file's weights (`zoo.init_from_file`,
    printing the layers it re-initialised); a resumed one takes them from its checkpoint, so
    the file may be gone by then. Either way the stem and layer1 stay frozen."""
    device = procs.device
    model = build_model(cfg, num_classes=len(run.class_names))
    if cfg.init_from:
        freeze_pretrained_stages(model)
        if checkpoint is None:
            fresh = init_from_file(model, cfg.init_from, cfg.keep_classes, run.class_names)
            if procs.is_main:
                print(init_note(cfg, fresh, run.class_names))
    model = model.to(device)
    optimizer = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.amp)
    if checkpoint is not None:
        run.restore(checkpoint, model, optimizer, scaler)
        if procs.is_main:
            print(f"resumed at epoch {run.epoch}, iteration {run.iteration}")
    net = model
    if procs.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )
    return model, net, optimizer, scaler


def init_note(cfg: Config, reinitialised: list[str], class_names: list[str]) -> str:
    """The one line a run started from `cfg.init_from` prints: what came from the file and
    which layers `zoo.init_from_file` re-initialised."""
    if reinitialised:
        how = "normal(0, 0.01), prior bias" if cfg.init == "authors" else "xavier"
        return (
            f"init from {cfg.init_from}: every layer loaded but {', '.join(reinitialised)}, "
            f"re-initialised ({how}) for the data's {len(class_names)} classes"
        )
    return (
        f"init from {cfg.init_from}: every layer loaded, head.cate_out from the file's rows "
        f"of {', '.join(class_names)} (--keep-classes)"
    )


def _train_epoch(net, optimizer, scaler, loader, cfg, procs, run, budget, curve) -> list[dict]:
    """One epoch's iterations (ending early at `run.iters_total`); the loss values of each."""
    epoch_losses = []
    progress = _progress(loader, procs.is_main, f"epoch {run.epoch + 1}/{run.epochs_total}")
    for imgs, labels, masks, boxes, _ in (_to_device(b, procs.device) for b in progress):
        if run.iteration >= run.iters_total:
            break
        raise_if_interrupted()
        lr = lr_at(cfg, run.iteration, run.epoch, run.iters_total)
        set_lr(optimizer, lr)
        values = _train_step(net, optimizer, scaler, (imgs, labels, masks, boxes), cfg, procs, run)
        run.iteration += 1
        epoch_losses.append(values)
        if run.iteration % cfg.log_every == 0:
            window = epoch_losses[-cfg.log_every :]
            point = {k: sum(v[k] for v in window) / len(window) for k in LOSS_KEYS}
            run.history.append({"iter": run.iteration, "epoch": run.epoch + 1, "lr": lr, **point})
        if budget is not None:
            budget.after_iteration(run)
        curve.after_iteration()
        if procs.is_main and hasattr(progress, "set_postfix"):
            progress.set_postfix(
                {k: f"{np.mean([v[k] for v in epoch_losses[-20:]]):.3f}" for k in LOSS_KEYS}
            )
    return epoch_losses


def _train_step(net, optimizer, scaler, batch, cfg, procs, run) -> dict[str, float]:
    """Forward, backward (gradients clipped at `grad_clip`) and the optimiser step on
    `batch` = (imgs (B, 3, H, W), labels, masks, boxes: lists of B); the loss values. A NaN or
    infinite loss stops the run before the step, naming the terms and the last checkpoint."""
    with _autocast(cfg, procs.device):
        losses = net(*batch)
    values = {k: float(losses[k].detach()) for k in LOSS_KEYS}
    if not all(math.isfinite(v) for v in values.values()):
        raise NonFiniteLossError(
            f"non-finite loss at epoch {run.epoch + 1}, iteration {run.iteration}: "
            + ", ".join(f"{k}={v}" for k, v in values.items())
            + f"; {checkpoint_note(run.run_dir / 'last.pt')}"
        )
    backward_and_step(net, optimizer, scaler, losses["total"], cfg)
    return values


def backward_and_step(net, optimizer, scaler, total: torch.Tensor, cfg: Config) -> None:
    """The backward pass of `total`, gradients clipped at `grad_clip` (0: not), and the
    optimiser step, through the (fp16) gradient scaler."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    if cfg.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()


def _final_evaluation(model, val_set, cfg, device, run, curve, t_start) -> dict:
    """Rank 0 at the end of a finished run: the held-out AP into metrics.json (and the
    learning curve's last point), printed as a table."""
    run.final_evaluation = True
    minutes = curve.run_seconds() / 60.0  # before this evaluation
    metrics = evaluate_model(model, val_set, cfg, device)
    (run.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    curve.final_point(metrics, minutes)
    what = "training (overfit)" if cfg.overfit else "held-out"
    print(f"COCO mask AP on the {len(val_set)} {what} images:")
    print(format_table(metrics))
    print(f"total wall time {(time.time() - t_start) / 60:.1f} min; run folder {run.run_dir}")
    return metrics
