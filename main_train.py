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

This file is the command line only: the loop, the time budget, run folders and logs are
`training.train` (training.py).
"""

from __future__ import annotations

import argparse

from config import add_config_args, config_from_args
from training import train


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
