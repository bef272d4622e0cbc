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

Refused with one line (exit status 2): a file in no known layout, a ResNeXt or DCN model, a
mismatch between the file and the model built for it, and AdelaiDet's ResNet-50/101, whose
stride-in-1x1 blocks no Config field holds yet (`zoo.convertible`; `zoo.load_released` runs
them exactly in memory).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from config import config_to_dict
from errors import ModelFileError
from model import atomic_save
from zoo import FORMATS, build_released, convertible, detect_format, read_released

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
    if not convertible(model):
        raise ModelFileError(
            f"{args.checkpoint}: {FORMATS[fmt]} whose ResNet has its strides in the 1x1 convs "
            "(detectron2's STRIDE_IN_1X1); this project's config cannot record that yet, so "
            "it cannot be written as this project's checkpoint (zoo.load_released runs it)"
        )
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
