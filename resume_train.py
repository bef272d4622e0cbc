"""Continue an interrupted training run: `python resume_train.py RUN_FOLDER_OR_CHECKPOINT`.

The model, optimiser, schedule position, random states and loss history come from the
checkpoint (a run folder's `last.pt`, or a .pt file), and the model is rebuilt from the config
stored in it, not from today's defaults. With the same seed on the CPU, resuming after epoch k
gives the same losses as the run that never stopped.

The run continues in the folder it was pointed at (the folder itself, or the folder of the .pt
file), whatever folder the checkpoint was first trained in: resuming a copied run folder leaves
the original untouched. `--out` continues into another folder on purpose; one that holds
another run's checkpoint is not overwritten (the next free `out2`, `out3`, ... is taken).

    python resume_train.py runs/solo_cpu
    python resume_train.py runs/solo_cpu/last.pt --epochs 48   # extend the run
    python resume_train.py runs/solo_cpu --out runs/solo_cpu_more  # continue into a new folder
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from config import validate
from model import config_of, load_checkpoint
from training import free_run_number, numbered_run_dir, train

# Settings that may change when resuming; everything else (model, data, schedule shape)
# comes from the checkpoint.
RESUMABLE = {"epochs": int, "out": str, "device": str, "num_workers": int, "time_budget_min": float}


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="run folder (uses its last.pt) or checkpoint file")
    for name, kind in RESUMABLE.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None)
    args = parser.parse_args(argv)

    checkpoint = load_checkpoint(args.checkpoint)
    cfg = config_of(checkpoint)
    changes = {k: getattr(args, k) for k in RESUMABLE if getattr(args, k) is not None}
    changes["out"] = str(resume_folder(Path(args.checkpoint), args.out))
    cfg = validate(replace(cfg, **changes))
    if "epochs" in changes:
        # An explicit epoch count overrides the one a time budget fixed in the first epoch.
        checkpoint["epochs_total"] = cfg.epochs
        checkpoint["iters_total"] = 0  # whole epochs again
    return train(cfg, checkpoint=checkpoint)


def resume_folder(source: Path, out: str | None) -> Path:
    """Where a resumed run writes: the run folder `source` names (a folder, or the folder of
    its `last.pt`); with `out`, that folder. A folder whose `last.pt` is not the checkpoint
    being resumed (`out` holding another run, or `source` an older .pt beside a `last.pt`)
    is never overwritten: the next free numbered folder is taken instead."""
    run_dir = source if source.is_dir() else source.parent
    target = Path(out) if out is not None else run_dir
    last = target / "last.pt"
    resumed = source / "last.pt" if source.is_dir() else source
    if not last.exists() or last.resolve() == resumed.resolve():
        return target
    chosen = numbered_run_dir(target, free_run_number(target))
    print(f"{target} holds another run (last.pt) than {resumed}: the resumed run goes to {chosen}")
    return chosen


if __name__ == "__main__":
    from cli import run

    run(main)
