"""The whole model: backbone + FPN + head, built from a `config.Config`.

    model = build_model(cfg, num_classes=3)
    losses = model(images, labels_list, masks_list, boxes_list)   # dict(total, cate, mask)
    results = model.predict(images, metas)                        # per image masks/labels/scores

`forward` returns losses so that DistributedDataParallel (which wraps `forward`) sees the whole
training computation. Checkpoints store the config, and `build_model` rebuilds the exact model
from it.

`cfg.model` picks the head (config.MODELS): `solo` (solo_head.SOLOHead), `decoupled_solo` and
`decoupled_solo_light` (decoupled_head.DecoupledSOLOHead with separate or shared X/Y towers),
`solov2` and `solov2_light` (solov2_head.SOLOv2Head; light only differs in its config
defaults, config.MODEL_DEFAULTS). Every head has the same `forward(feats, eval)`, `loss` and
`PostProcess` interface; only the tuple of predictions between them differs.

Checkpoints live here too: `save_checkpoint` / `atomic_save` write them so that a failure at
any moment (an error, a full disk, Ctrl-C) leaves the previous file or the new complete one,
and `load_checkpoint` reads them with `weights_only=True`, turning any file that is not one
of ours into one `ModelFileError` line.

    checkpoint = load_checkpoint("runs/solo_cpu")                 # a run folder or a .pt file
    model = build_model(config_of(checkpoint), len(checkpoint["class_names"]))

Shape legend: B batch, N instances, H x W padded input, k kept instances, h0 x w0 original size.
"""

from __future__ import annotations

import errno
import io
import os
import random
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from backbone import build_backbone
from config import MODELS, Config, config_from_dict, config_to_dict
from decoupled_head import DecoupledSOLOHead
from errors import CheckpointWriteError, ModelFileError
from solo_head import SOLOHead, head_config, image_frame
from solov2_head import SOLOv2Head

# config.MODELS -> head; the light variants differ only in their settings (config.MODEL_DEFAULTS,
# and `head_config` gives decoupled_solo_light its shared X/Y tower).
HEADS = {
    "solo": SOLOHead,
    "decoupled_solo": DecoupledSOLOHead,
    "decoupled_solo_light": DecoupledSOLOHead,
    "solov2": SOLOv2Head,
    "solov2_light": SOLOv2Head,
}


def _float(preds):
    """Every tensor of a (nested) tuple / list of predictions in float32."""
    if isinstance(preds, Tensor):
        return preds.float()
    return type(preds)(_float(p) for p in preds)


class SOLOModel(nn.Module):
    """Backbone + head; `pad_to` is the data's (`Config.pad_to`), which `predict` needs to
    find each image's own frame inside a padded batch."""

    def __init__(self, backbone: nn.Module, head: nn.Module, pad_to: int = Config.pad_to):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.pad_to = pad_to

    def forward(
        self,
        images: Tensor,
        labels_list: list[Tensor],
        masks_list: list[Tensor],
        boxes_list: list[Tensor],
    ) -> dict[str, Tensor]:
        """Training losses of a batch: images (B, 3, H, W); per image labels (N,), masks
        (N, H, W) and boxes (N, 4) in padded-input pixels. Returns dict(total, cate, mask)."""
        preds = self.head(self.backbone(images), eval=False)  # the head's tuple of outputs
        # Losses in float32 even under autocast (bf16 on the CPU, fp16 on CUDA): the focal
        # loss sums ~10^4 small terms and the dice loss sums over whole masks.
        with torch.autocast(images.device.type, enabled=False):
            preds = _float(preds)
            losses = self.head.loss(
                preds, boxes_list, labels_list, masks_list, padded_size=tuple(images.shape[-2:])
            )
        return {k: losses[k] for k in ("total", "cate", "mask")}

    def network(self, images: Tensor) -> tuple:
        """The network part of inference: backbone and head with eval=True, (B, 3, H, W) -> the
        head's eval outputs (what `head.PostProcess` takes)."""
        return self.head(self.backbone(images), eval=True)

    @torch.no_grad()
    def predict(
        self,
        images: Tensor,
        metas: list[dict] | None = None,
        network: Callable[[Tensor], tuple] | None = None,
    ) -> list[dict[str, Tensor]]:
        """Instances per image: dict(masks (k, h0, w0) uint8, labels (k,) in 1..C, scores (k,)).

        metas (from the data set) give each image's input and original size; without them the
        masks stay at the padded size. network: what runs the network part (default
        `self.network`, PyTorch; `runtime.OnnxNetwork` runs it in ONNX Runtime); the
        post-processing is the head's either way.

        An image's result does not depend on the rest of its batch: each image is run in its
        own frame (`solo_head.image_frame`: its input size padded to `self.pad_to`, the tensor the
        data set gave it before `collate_fn` padded it to the batch's largest image), and the
        images that share a frame run together. In the batch's frame the network would see
        the extra zero padding as image: the S x S category grids and the CoordConv
        coordinates span the whole frame, and every feature's receptive field and GroupNorm
        statistics take it in, so cells, masks and scores all change (tests/
        test_batch_independence.py). What remains is float rounding: a batch of several images
        of one frame runs other convolution kernels than one image alone (features differ by
        ~1e-5), so a mask pixel or category score within that of its threshold can fall on
        either side, as between two thread counts (export.py, "Knife edges").
        """
        B, _, H, W = images.shape
        frames = [image_frame(metas[b] if metas else None, (H, W), self.pad_to) for b in range(B)]
        results: list[dict[str, Tensor] | None] = [None] * B
        for frame in dict.fromkeys(frames):  # distinct frames, in order of appearance
            idx = [b for b in range(B) if frames[b] == frame]
            group = images
            if len(idx) < B or frame != (H, W):
                group = images[idx, :, : frame[0], : frame[1]].contiguous()  # (B_g,3,h_f,w_f)
            preds = (network or self.network)(group)
            group_metas = [metas[b] for b in idx] if metas else None
            group_results = self.head.PostProcess(preds, group_metas, padded_size=frame)
            for b, result in zip(idx, group_results, strict=True):
                results[b] = result
        return results


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA GPU")
    return torch.device(name)


def build_model(cfg: Config, num_classes: int) -> SOLOModel:
    """The model of `cfg` for `num_classes` object classes (background not counted)."""
    head = build_head(cfg, num_classes)
    backbone = build_backbone(
        depth=cfg.depth,
        out_channels=cfg.fpn_channels,
        weights=cfg.backbone_weights or None,
        norm=cfg.norm,
        width=cfg.backbone_width,
        stride_in_1x1=cfg.stride_in_1x1,
    )
    return SOLOModel(backbone, head, pad_to=cfg.pad_to)


def build_head(cfg: Config, num_classes: int) -> nn.Module:
    """The head of `cfg.model` for `num_classes` object classes (background not counted)."""
    if cfg.model not in HEADS:
        raise ValueError(f"unknown model {cfg.model!r}; choose one of {MODELS}")
    return HEADS[cfg.model](num_classes + 1, head_config(cfg))


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------

CHECKPOINT_KEYS = ("config", "model", "class_names")  # what resume and inference need
PARTIAL_SUFFIX = ".tmp"  # atomic_save writes `last.pt.tmp`, then renames it to `last.pt`


def _write_all(f, data: memoryview, chunk: int = 1 << 24) -> None:
    """`data` into the open file `f` with plain writes, 16 MiB at a time."""
    for start in range(0, len(data), chunk):
        f.write(data[start : start + chunk])


def saved_epoch(path: str | Path) -> int | None:
    """The `epoch` (epochs completed) of the checkpoint at `path`; None when there is none or
    it cannot be read. Memory-mapped: the tensors are not read."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(checkpoint["epoch"])
    except Exception:  # any unreadable file: the caller says there is no usable checkpoint
        return None


def previous_state(path: str | Path) -> str:
    """What is at `path` before a write replaces it, for messages: "the previous checkpoint
    (epoch N) is intact", or "no checkpoint was written yet"."""
    path = Path(path)
    if not path.exists():
        return "no checkpoint was written yet"
    epoch = saved_epoch(path)
    return f"the previous {'file' if epoch is None else f'checkpoint (epoch {epoch})'} is intact"


def atomic_save(obj, path: str | Path) -> None:
    """torch.save `obj` to `path` so that a failure at any moment (an error, a full disk,
    Ctrl-C, a crash) leaves either the previous file or the new complete one.

    The object is serialised in memory first (a buffer of the checkpoint's size), then written
    to `path.tmp` with plain file writes, flushed to disk and renamed over `path` (atomic on
    POSIX). Written this way a full disk arrives as itself (OSError ENOSPC), not as torch.save's
    `RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos`; it becomes a
    `CheckpointWriteError` saying what is left. The partial .tmp is removed on any failure.
    """
    path = Path(path)
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getbuffer()
    try:
        with open(tmp, "wb") as f:
            _write_all(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:  # KeyboardInterrupt too: no partial file stays behind
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointWriteError(
                f"no space left on device writing {path}: {previous_state(path)}"
            ) from err
        raise
    finally:
        data.release()


def remove_partial_saves(folder: str | Path) -> list[Path]:
    """Delete the `*.pt.tmp` files an interrupted `atomic_save` left in `folder` (a process
    killed mid-write); returns them."""
    stale = sorted(Path(folder).glob(f"*.pt{PARTIAL_SUFFIX}"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def rng_states() -> dict:
    """Random states in types `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
    }


def set_rng_states(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], 0, 0.0))
    random.setstate((state["python_version"], tuple(state["python"]), None))


def save_checkpoint(path: Path, cfg: Config, model, optimizer, scaler, state: dict) -> None:
    """`last.pt`: weights, optimiser and scaler, the schedule's position (`state`), the loss
    histories, random states, the config and the class names; written with `atomic_save`."""
    atomic_save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "epoch": state["epoch"],
            "iteration": state["iteration"],
            "epochs_total": state["epochs_total"],
            "iters_total": state["iters_total"],
            "history": state["history"],
            "val_history": state["val_history"],
            "ap_history": state["ap_history"],
            "rng": rng_states(),
            "config": config_to_dict(cfg),
            "class_names": state["class_names"],
        },
        path,
    )


def _unreadable(path: Path, err: Exception) -> str:
    """Why torch.load could not read `path`, in words."""
    expected = "expected a .pt file written by main_train.py"
    size = path.stat().st_size
    if size == 0:
        return f"an empty file, not a checkpoint; {expected}"
    forbidden = re.search(r"GLOBAL (\S+)", str(err))
    if forbidden:
        return (
            f"refused: its pickle asks for {forbidden.group(1)}, which no checkpoint holds "
            f"(read with weights_only=True, so nothing was executed); {expected}"
        )
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":  # torch.save's zip archive
        text = re.sub(r"\[enforce fail at [^\]]*\]\s*\.?\s*", "", str(err))  # torch's C++ origin
        reason = " ".join(text.split(". ")[0].split())
        return f"a zip archive as a PyTorch checkpoint is, but damaged ({reason}); {expected}"
    return f"not a PyTorch checkpoint ({size} bytes torch.load cannot read); {expected}"


def check_contents(path: Path, checkpoint) -> None:
    """Raise ModelFileError unless `checkpoint` has what resume and inference read."""
    if not isinstance(checkpoint, dict):
        raise ModelFileError(
            f"{path}: a PyTorch file holding a {type(checkpoint).__name__}, not a checkpoint "
            f"written by main_train.py; expected a dict with {', '.join(CHECKPOINT_KEYS)}"
        )
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        shown = ", ".join(repr(str(k)) for k in list(checkpoint)[:5])
        if len(checkpoint) > 5:
            shown += f", ... ({len(checkpoint)} in all)"
        raise ModelFileError(
            f"{path}: a PyTorch file, but not a checkpoint written by main_train.py: it has keys "
            f"{shown or 'none'}; expected {', '.join(CHECKPOINT_KEYS)}"
        )
    try:
        config_from_dict(dict(checkpoint["config"]))
    except (TypeError, ValueError) as err:
        raise ModelFileError(f"{path}: its stored config does not fit this code: {err}") from err


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint file, or the `last.pt` of a run folder, read with weights_only=True.

    Raises FileNotFoundError when there is none, and ModelFileError (one line) for a file
    that is not one of ours: random bytes, an empty or truncated file, a plain state_dict or
    another dict without config / model / class_names, or a pickle asking for code (refused
    before anything runs).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    checkpoint = read_torch_file(path)
    check_contents(path, checkpoint)
    return checkpoint


def read_torch_file(path: Path) -> object:
    """What torch.load(weights_only=True) gives for the file `path`, whatever it holds; a
    missing file is a FileNotFoundError, one torch.load cannot read or refuses (a pickle asking
    for code) one ModelFileError."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint there (expected a .pt file or run folder)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # whatever the bytes made torch.load raise
        raise ModelFileError(f"{path}: {_unreadable(path, err)}") from err


def config_of(checkpoint: dict) -> Config:
    """The config a checkpoint was trained with."""
    return config_from_dict(checkpoint["config"])


def load_model(checkpoint_path, device) -> tuple[torch.nn.Module, Config, tuple[str, ...]]:
    """(model in eval mode, its config, class names) from a run folder or checkpoint file.

    A file that is not one of ours, or whose weights do not fit the model its own config
    builds, raises `errors.ModelFileError` (one line naming the file)."""
    return model_of(load_checkpoint(checkpoint_path), checkpoint_path, device)


def model_of(checkpoint: dict, checkpoint_path, device) -> tuple[torch.nn.Module, Config, tuple]:
    """`load_model` for a checkpoint already read (and checked) from `checkpoint_path`."""
    cfg = config_of(checkpoint)
    class_names = tuple(checkpoint["class_names"])
    model = build_model(cfg, num_classes=len(class_names))
    try:
        model.load_state_dict(checkpoint["model"])
    except (RuntimeError, TypeError, AttributeError) as err:  # missing / unexpected / resized
        what = " ".join(str(err).split())  # torch's several lines, as one
        what = what if len(what) <= 300 else what[:297] + "..."
        raise ModelFileError(
            f"{checkpoint_path}: its weights do not fit the model its config builds: {what}"
        ) from err
    return model.to(device).eval(), cfg, class_names
