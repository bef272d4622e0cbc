"""Convert a released SOLO / Decoupled SOLO / SOLOv2 checkpoint into this project's own.

    python convert_checkpoint.py solov2_r50_fpn_3x_coco_20220512_125856-fed092d4.pth --out solov2.pt
    python main_infer.py --checkpoint solov2.pt --images photo.jpg

The file is read as `zoo.load_released` reads it (mmdetection 2.x/3.x, the authors'
WXinlong/SOLO, AdelaiDet, with or without DataParallel's `module.` prefix; weights_only), the
model built with the released architecture and test settings and loaded strictly. The output
holds what every script of this project takes from a checkpoint (`model.CHECKPOINT_KEYS`):
the config, the weights under this project's names and the class names, plus `epoch` 0 and
`source` (the input's file name and layout). It has no optimiser state: it is for inference
and as a start for training, not for `resume_train.py`. Written with `model.atomic_save`.

Refused with one line (exit status 2): a file in no known layout, a ResNeXt or DCN model, and
a mismatch between the file and the model built for it. AdelaiDet's ResNet-50/101, with their
strides in the 1x1 convs, keep that in the config (`stride_in_1x1`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from config import config_to_dict
from model import atomic_save
from zoo import FORMATS, build_released, detect_format, read_released

# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> Path:
    """Convert IN to OUT; returns OUT."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path, help="released .pth file")
    parser.add_argument("--out", type=Path, required=True, help="this project's .pt to write")
    args = parser.parse_args(argv)

    state = read_released(args.checkpoint)
    fmt = detect_format(state, args.checkpoint)
    model, class_names, cfg = build_released(state, fmt, args.checkpoint)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(
        {
            "config": config_to_dict(cfg),
            "model": model.state_dict(),
            "class_names": list(class_names),
            "epoch": 0,
            "source": {"file": args.checkpoint.name, "format": fmt},
        },
        args.out,
    )
    print(
        f"{args.out}: {cfg.model} ResNet-{cfg.depth}, {len(class_names)} classes, "
        f"input {cfg.input_size[0]} (long side up to {cfg.input_size[1]}), from {FORMATS[fmt]}"
    )
    return args.out


if __name__ == "__main__":
    from cli import run

    run(main)
