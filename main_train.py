"""Train SOLO: `python main_train.py` (the CPU preset on the built-in data when there is no GPU).

    python main_train.py                                # preset "auto": cpu without a GPU
    python main_train.py --preset cis680 --data PATH/train   # CIS680 files PATH/train_*_comp_zlib.*
    python main_train.py --data ann.json --coco-images imgs/ # COCO-format json + image folder
    python main_train.py --data my_photos/              # a folder of LabelMe json files
    python main_train.py --overfit 16 --data instances.json --coco-images images/  # fit 16 images
    python main_train.py --init-from solov2_r50_fpn_3x_coco.pth --data my_photos/  # fine-tune
    torchrun --nproc_per_node=2 main_train.py ...       # DistributedDataParallel (gloo on CPU)

Every flag of `config.Config` is available (`python main_train.py --help`). The run folder
(`--out`) receives `last.pt` after every epoch (written atomically), `loss.csv` and `loss.png`
(total, focal and dice loss against iterations), `metrics.json` and the held-out COCO mask AP,
which is printed at the end. `resume_train.py RUN` continues an interrupted run.

`--init-from FILE` (a released SOLO / SOLOv2 .pth, or a checkpoint or run folder of this
project) fine-tunes: the run takes the file's architecture, input size and test settings,
frozen batch norm and the fine-tuning schedule of `zoo.FINETUNE_SCHEDULE` for every flag not
given, and starts from its weights, all but the category output conv (re-initialised, or with
`--keep-classes` the file's rows of the data's class names). `zoo.finetune_config` does it.

A new run never overwrites another: when `--out` already holds a checkpoint, the run goes to
the next free `OUT2`, `OUT3`, ... (printed; `--exist-ok` trains into `--out` on purpose).
Bad input, a full disk and Ctrl-C end the command with one line on stderr (cli.py).

This file is the command line only: the loop, the time budget, run folders and logs are
`training.train` (training.py).
"""

from __future__ import annotations

import argparse

from config import add_config_args, config_and_given
from training import train
from zoo import finetune_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_args(parser)
    return parser


def main(argv: list[str] | None = None):
    args = build_parser().parse_args(argv)
    cfg, given = config_and_given(args)
    return train(finetune_config(cfg, given))


if __name__ == "__main__":
    from cli import run

    run(main)
