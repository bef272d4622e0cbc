"""Continue an interrupted training run: `python resume_train.py RUN_FOLDER_OR_CHECKPOINT`.

The model, optimiser, schedule position, random states and loss history come from the
checkpoint (a run folder's `last.pt`, or a .pt file), and the model is rebuilt from the config
stored in it, not from today's defaults. With the same seed on the CPU, resuming after epoch k
gives the same losses as the run that never stopped.

    python resume_train.py runs/solo_cpu
    python resume_train.py runs/solo_cpu/last.pt --epochs 48   # extend the run
    python resume_train.py runs/solo_cpu --out runs/solo_cpu_more  # continue into a new folder
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from config import validate
from main_train import config_of, load_checkpoint, train

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
    cfg = validate(replace(cfg, **changes))
    if "epochs" in changes:
        # An explicit epoch count overrides the one a time budget fixed in the first epoch.
        checkpoint["epochs_total"] = cfg.epochs
        checkpoint["iters_total"] = 0  # whole epochs again
    return train(cfg, checkpoint=checkpoint)


if __name__ == "__main__":
    main()
