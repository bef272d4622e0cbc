"""Drawing helpers: images with instance masks, boxes and scores, and the hand-out's PlotGT.

Every function takes tensors or numpy arrays and returns a matplotlib Figure built with
`matplotlib.figure.Figure` (no pyplot, no display), so it works headless, in CI and in Colab;
the caller saves it (`fig.savefig("x.png")`) or shows it.

Run (a look at the built-in data set, four images to a folder):
    python visualize.py --num 4 --out /tmp/synth_preview

Shapes: H x W image, N instances, L pyramid levels, S grid size of a level, P positive grid
cells of a level, Hf x Wf mask-feature size of a level (the level's masks are 2Hf x 2Wf).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

import synthetic
from conventions import IMAGENET_MEAN, IMAGENET_STD

# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------

# One colour per class id 1, 2, 3, ... (vehicle red, person green, animal blue), then more.
CLASS_COLORS = (
    (0.90, 0.10, 0.10),
    (0.10, 0.80, 0.20),
    (0.15, 0.35, 1.00),
    (1.00, 0.75, 0.00),
    (0.80, 0.20, 0.90),
    (0.00, 0.80, 0.80),
    (1.00, 0.50, 0.10),
    (0.55, 0.35, 0.15),
)
MASK_ALPHA = 0.5  # opacity of a mask drawn over the image

# --------------------------------------------------------------------------------------------
# pure functions
# --------------------------------------------------------------------------------------------


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def denormalize(img: torch.Tensor) -> np.ndarray:
    """Undo the ImageNet normalisation: (3, H, W) normalised -> (H, W, 3) float in [0, 1]."""
    x = _to_numpy(img).astype(np.float32)
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"denormalize: expected an image of shape (3, H, W), got {x.shape}")
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, dtype=np.float32)[:, None, None]
    return np.clip(x * std + mean, 0.0, 1.0).transpose(1, 2, 0)  # (3, H, W) -> (H, W, 3)


def class_color(label: int) -> tuple[float, float, float]:
    """The fixed rgb colour (floats in [0, 1]) of class id `label` (1..C)."""
    return CLASS_COLORS[(int(label) - 1) % len(CLASS_COLORS)]


def _as_rgb(image) -> np.ndarray:
    """A normalised (3, H, W) tensor or an (H, W, 3) array in [0, 1] -> (H, W, 3) float32."""
    if isinstance(image, torch.Tensor) and image.ndim == 3 and image.shape[0] == 3:
        return denormalize(image)
    x = _to_numpy(image).astype(np.float32)
    if x.ndim != 3 or x.shape[2] != 3:
        raise ValueError(
            f"image: expected a normalised (3, H, W) tensor or an (H, W, 3) array, got {x.shape}"
        )
    return np.clip(x, 0.0, 1.0)


def _resize_nearest(masks: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N, h, w) -> (N, height, width) by nearest neighbour (exact for integer factors)."""
    _, h, w = masks.shape
    rows = np.arange(height) * h // height
    cols = np.arange(width) * w // width
    return masks[:, rows][:, :, cols]


def overlay_masks(rgb: np.ndarray, masks: np.ndarray, colors: Sequence[tuple]) -> np.ndarray:
    """(H, W, 3) image with each (H, W) mask blended in its colour, later masks on top."""
    out = rgb.copy()
    for mask, color in zip(masks, colors, strict=True):
        m = mask > 0
        out[m] = (1.0 - MASK_ALPHA) * out[m] + MASK_ALPHA * np.asarray(color, dtype=np.float32)
    return out


# --------------------------------------------------------------------------------------------
# plotting
# --------------------------------------------------------------------------------------------


def _new_figure(
    num_panels: int, height: int, width: int, legend: bool = False
) -> tuple[Figure, list]:
    panel_w, title_h = 4.0, 0.25  # inches: panel width, room for a title
    legend_h = 0.35 if legend else 0.05
    fig_h = panel_w * height / width + title_h + legend_h
    fig = Figure(figsize=(panel_w * num_panels, fig_h), dpi=100)
    FigureCanvasAgg(fig)  # attach an Agg canvas: savefig and draw work without a display
    fig.subplots_adjust(
        left=0.005, right=0.995, bottom=legend_h / fig_h, top=1 - title_h / fig_h, wspace=0.02
    )
    axes = [fig.add_subplot(1, num_panels, k + 1) for k in range(num_panels)]
    return fig, axes


def draw_instances(
    image,
    masks,
    labels,
    class_names: Sequence[str],
    boxes=None,
    scores=None,
    ax=None,
    title: str | None = None,
) -> Figure:
    """One image with its instances: translucent masks, optional boxes, "name score" texts.

    image: normalised tensor (3, H, W) or array (H, W, 3) in [0, 1]; masks (N, H, W) {0, 1}
    (soft masks are cut at 0.5); labels (N,) in 1..C; boxes (N, 4) x1 y1 x2 y2; scores (N,).
    Draws on `ax` when given, else on a new Figure; returns the Figure.
    """
    rgb = _as_rgb(image)
    H, W, _ = rgb.shape
    labels = _to_numpy(labels).reshape(-1).astype(np.int64)
    masks = _to_numpy(masks).astype(np.float32).reshape(-1, *_to_numpy(masks).shape[-2:])
    if len(masks) != len(labels):
        raise ValueError(f"draw_instances: {len(masks)} masks but {len(labels)} labels")
    if len(masks) and masks.shape[1:] != (H, W):
        raise ValueError(
            f"draw_instances: masks are {masks.shape[1:]} but the image is {(H, W)}; "
            "pass masks in the image's frame"
        )
    colors = [class_color(c) for c in labels]
    if ax is None:
        fig, (ax,) = _new_figure(1, H, W)
    else:
        fig = ax.figure
    ax.imshow(overlay_masks(rgb, masks > 0.5, colors))
    box_arr = None if boxes is None else _to_numpy(boxes).reshape(-1, 4).astype(np.float32)
    score_arr = None if scores is None else _to_numpy(scores).reshape(-1).astype(np.float32)
    for k, (label, color) in enumerate(zip(labels, colors, strict=True)):
        name = class_names[label - 1] if 1 <= label <= len(class_names) else str(label)
        text = name if score_arr is None else f"{name} {score_arr[k]:.2f}"
        if box_arr is not None:
            x1, y1, x2, y2 = box_arr[k]
            ax.add_patch(
                Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=1.5)
            )
            anchor = (x1, y1)
        else:  # write the name at the mask's top-left corner
            rows, cols = np.nonzero(masks[k] > 0.5)
            anchor = (cols.min(), rows.min()) if len(rows) else (0.0, 0.0)
        ax.text(
            anchor[0],
            anchor[1],
            text,
            color="white",
            fontsize=8,
            verticalalignment="bottom",
            bbox={"facecolor": color, "alpha": 0.8, "pad": 1, "edgecolor": "none"},
        )
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.axis("off")
    if title is not None:
        ax.set_title(title, fontsize=9)
    return fig


def plot_gt_levels(
    img,
    lvl_ins_label: Sequence,
    lvl_ins_ind_label: Sequence,
    lvl_cate_label: Sequence,
    strides: Sequence[int],
    class_names: Sequence[str],
) -> Figure:
    """The hand-out's PlotGT (sec. 6.6) for one image: one panel per pyramid level.

    Each panel shows the image, the masks assigned to the level (upsampled to H x W, in the
    colour of their class) and the level's positive grid cells as squares.
    img: normalised tensor (3, H, W) or array (H, W, 3) in [0, 1]. Per level l:
    ins_label (P, 2Hf, 2Wf) {0,1}, the positive channels in increasing k = i*S + j;
    ins_ind_label (S*S,) bool; cate_label (S, S) int in 0..C (0 background).
    """
    rgb = _as_rgb(img)
    H, W, _ = rgb.shape
    L = len(lvl_cate_label)
    if not (len(lvl_ins_label) == len(lvl_ins_ind_label) == len(strides) == L):
        raise ValueError(
            f"plot_gt_levels: {len(lvl_ins_label)} ins_label, {len(lvl_ins_ind_label)} "
            f"ins_ind_label, {L} cate_label levels and {len(strides)} strides; expected equal"
        )
    fig, axes = _new_figure(L, H, W, legend=True)
    for level, ax in enumerate(axes):
        cate_label = _to_numpy(lvl_cate_label[level]).astype(np.int64)
        S = cate_label.shape[0]
        ins_ind = _to_numpy(lvl_ins_ind_label[level]).reshape(-1).astype(bool)
        ins_label = _to_numpy(lvl_ins_label[level])
        positives = np.flatnonzero(ins_ind)  # channels k = i*S + j, increasing
        if ins_ind.size != S * S or len(ins_label) != len(positives):
            raise ValueError(
                f"plot_gt_levels: level {level} has S = {S}, {ins_ind.size} ins_ind_label "
                f"entries ({len(positives)} positive) and {len(ins_label)} ins_label channels; "
                f"expected S*S entries and one channel per positive"
            )
        cell_labels = cate_label.reshape(-1)[positives]  # (S, S) -> (S*S,) -> (P,)
        masks = ins_label.reshape(len(positives), *ins_label.shape[-2:]) > 0
        if len(masks):
            masks = _resize_nearest(masks, H, W)
        ax.imshow(overlay_masks(rgb, masks, [class_color(c) for c in cell_labels]))
        cell_h, cell_w = H / S, W / S
        for k, label in zip(positives, cell_labels, strict=True):
            i, j = divmod(int(k), S)
            ax.add_patch(
                Rectangle(
                    (j * cell_w, i * cell_h),
                    cell_w,
                    cell_h,
                    facecolor=class_color(label),
                    edgecolor="white",
                    linewidth=0.5,
                    alpha=0.9,
                )
            )
        ax.set_xlim(0, W)
        ax.set_ylim(H, 0)
        ax.axis("off")
        ax.set_title(f"level {level}, stride {strides[level]}, S={S}, {len(positives)} cells")
    handles = [Patch(color=class_color(c), label=n) for c, n in enumerate(class_names, start=1)]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    return fig


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description="Draw images of the built-in data set.")
    parser.add_argument("--num", type=int, default=4, help="images to draw (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    parser.add_argument("--start", type=int, default=0, help="first image index (default 0)")
    parser.add_argument("--out", default="outputs/synthetic_preview", help="output folder")
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for index in range(args.start, args.start + args.num):
        image, masks, labels, boxes = synthetic.generate_sample(args.seed, index)
        fig = draw_instances(
            image.transpose(1, 2, 0) / 255.0,  # (3, H, W) uint8 -> (H, W, 3) in [0, 1]
            masks,
            labels,
            synthetic.CLASS_NAMES,
            boxes=boxes,
            title=f"seed {args.seed}, image {index}: {len(labels)} instance(s)",
        )
        path = out / f"synthetic_s{args.seed}_{index:05d}.png"
        fig.savefig(path)
        written.append(path)
    print(f"wrote {len(written)} images to {out}")
    return written


if __name__ == "__main__":
    main()
