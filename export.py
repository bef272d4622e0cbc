"""Export a SOLO, Decoupled SOLO or SOLOv2 checkpoint to ONNX, check it, run it with ONNX Runtime.

    python export.py --checkpoint runs/solo_cpu/last.pt --format onnx   # runs/solo_cpu/solo.onnx
    python export.py --checkpoint runs/solo_cpu --output solo.onnx --max-instances 30
    python main_infer.py --onnx runs/solo_cpu/solo.onnx --images photo.jpg   # pictures + json

The graph takes one image, batch 1, at a fixed padded size H x W (the config's input size
padded to `pad_to`, or `--size H W`), normalised as the data set does (dataset.preprocess),
and holds the whole inference path up to the kept instances' soft masks: backbone, head
(sigmoid, point NMS), the masks of the candidate (cell, class) entries, binarisation at
ins_thresh, the small-mask filter, maskness, the top pre_nms_num, Matrix NMS (through
`postprocess.matrix_nms_decay_sorted`, the function the PyTorch path calls), update_thresh and
the top `max_instances`. Its outputs, padded to K = max_instances rows (real rows first):

    masks           (K, Hf, Wf) float32  soft masks (probabilities) at the mask-feature size;
                                         logits for SOLOv2 with mask_loss_stride < 4
                                         (metadata "mask_values")
    scores          (K,) float32         decreasing; 0 on padding rows
    labels          (K,) int64           class ids 1..C; 0 on padding rows
    count           () int64             how many rows are real
    num_candidates  () int64             (cell, class) entries above cate_thresh
    exact           () bool              the graph provably kept the PyTorch path's candidates

Static shapes. The PyTorch path (`InstanceHead.PostProcessImg`, `postprocess.finish_single`) keeps
every entry above cate_thresh, a number that depends on the image. The graph takes the
M = max_candidates highest entries instead (one TopK), puts them back into the PyTorch path's
(cell, class) order and gives those at or below the threshold no weight; every later step then
has static shapes, and the sorts are TopKs, which break ties by position as the PyTorch path's
stable sorts do. When at most M entries pass (num_candidates <= M, default M = pre_nms_num),
the graph's candidates are exactly the PyTorch path's and so are its results. When more pass,
the results are still the same if pre_nms_num of the graph's candidates score (after maskness)
above the best entry left out, whose score maskness can only lower. `exact` says whether one
of the two holds; `main_infer.py --onnx` warns for each image where neither does.

Outside the graph (`finish_outputs`, with the PyTorch path's `postprocess.resize_masks`): the
resize of the kept soft masks to the original image size (x4 bilinear upsampling, the crop of
the bottom/right padding, the bilinear resize to the original size, as one pair of
interpolation matrices), the threshold
at ins_thresh and the drop of masks left empty at that size. The crop and the last resize
depend on each image's own size before padding and original size, which a fixed-size graph
does not see, and the final masks' size differs per image; a graph output at that size would
need dynamic shapes for no gain (the step is two small matrix products per mask).

The check. Before it reports success, `main` runs ONNX Runtime and the PyTorch path
(`model.head.PostProcess`, with keep_instance = max_instances) on the same inputs: the
checkpoint's validation images when they can be read, constructed images (synthetic.py's
generator) otherwise. Every image must give the same instances (labels, order), mask IoU >= 0.99,
scores within 1e-3, `exact` true and the same number of candidates as the PyTorch path. A
failed check deletes the file and exits with the differences listed.

Knife edges. Binarisation at ins_thresh and the selection at cate_thresh are steps: a value
that lies within float rounding of the threshold (2e-6 apart between 1 and 2 PyTorch threads,
measured) falls on either side depending on the order of a sum, in PyTorch as in ONNX Runtime.
One such mask pixel changes the area, hence the maskness of a small mask, by more than 1e-3
(measured: a Decoupled SOLO pixel at 0.4999998 in one run and 0.5000001 in the other moved a
score from 0.6145 to 0.6017). No export can promise equality there, so an image whose PyTorch
candidates hold a mask value within `EDGE_TOL` of ins_thresh or a category score within it of
cate_thresh, and whose results differ, is reported as inconclusive rather than failed; the check
passes only with at least one conclusive image and no failed one.

Cost of static shapes: the graph always computes its M candidate masks and a P x P Matrix
NMS, also for an image where few entries pass, where the PyTorch path computes only those; and
SOLO's candidate masks are one product over all L levels' stacked mask features (the other
levels' weights zeroed), L times the multiply-adds of the PyTorch path's per-level products.

Exporter: the TorchScript-based `torch.onnx.export(..., dynamo=False)`, opset 17. Compared with
torch 2.14.1 on the test models: both exporters give graphs that pass the check and run at the
same speed in ONNX Runtime, but the dynamo-based one (`--dynamo`; it needs onnxscript, which
the requirements leave out) took 17-180 s per export where the TorchScript one took 1-4 s.

Shape legend: H x W padded input, Hf x Wf = H/4 x W/4 the mask-feature size, C classes without
background, S grid size of a level, M candidate slots, P = min(pre_nms_num, M) Matrix NMS slots,
K kept-instance slots, k real instances, h x w input before padding, h0 x w0 original size.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import dataset as ds
import postprocess
import synthetic
from config import Config, config_from_dict, config_to_dict
from dataset import IMAGENET_MEAN, IMAGENET_STD, build_data, padded_size
from errors import ModelFileError
from model import load_model

# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------

FORMAT_VERSION = 1  # of the metadata below; bumped when the outputs change
OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAMES = ("masks", "scores", "labels", "count", "num_candidates", "exact")
MASK_STRIDE = 4  # the masks come out at H/4 x W/4 (every head's mask-feature size)
IOU_MIN = 0.99  # the check: mask IoU of every instance at the original size ...
SCORE_TOL = 1e-3  # ... and score difference
CHECK_IMAGES = 4  # images the check compares by default
EDGE_TOL = 1e-5  # a value this close to a threshold is a knife edge (see "Knife edges")
CHECK_SEED = 680  # synthetic.py seed of the constructed check images

# --------------------------------------------------------------------------------------------
# pure functions: the numpy finishing and the comparison
# --------------------------------------------------------------------------------------------


def finish_outputs(
    outputs: dict[str, np.ndarray],
    input_size: tuple[int, int],
    padded_size: tuple[int, int],
    orig_size: tuple[int, int],
    ins_thresh: float,
) -> dict[str, np.ndarray]:
    """The graph's padded outputs -> one image's instances, as the end of
    `postprocess.finish_single` makes them: the kept soft masks (k, Hf, Wf) through
    `postprocess.resize_masks` (bilinear to (H, W), crop to (h, w), bilinear to (h0, w0),
    > ins_thresh), and the masks empty at the original size dropped.

    Args:
        outputs: the graph's outputs by name (`OUTPUT_NAMES`).
        input_size: (h, w) before padding; padded_size: (H, W); orig_size: (h0, w0).
        ins_thresh: the threshold on the "masks" output: the head's ins_thresh, or its logit
            when the graph gives logits (`OnnxSOLO.mask_threshold`, metadata "mask_values").
    Returns:
        dict(masks (k, h0, w0) uint8, labels (k,) int64, scores (k,) float32), decreasing scores.
    """
    count = int(outputs["count"])
    probs = torch.from_numpy(np.asarray(outputs["masks"][:count], dtype=np.float32))  # (k,Hf,Wf)
    masks = postprocess.resize_masks(probs, padded_size, input_size, orig_size, ins_thresh)
    labels = torch.from_numpy(np.asarray(outputs["labels"][:count]))
    scores = torch.from_numpy(np.asarray(outputs["scores"][:count]))
    result = postprocess.drop_empty(masks, labels, scores)  # (k, h0, w0) uint8 masks ...
    return {key: value.numpy() for key, value in result.items()}


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two binary (h, w) masks; 1 for two empty ones."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def _numpy(result: dict) -> dict[str, np.ndarray]:
    return {
        k: v.cpu().numpy() if isinstance(v, Tensor) else np.asarray(v) for k, v in result.items()
    }


def compare_results(
    reference: dict, candidate: dict, iou_min: float = IOU_MIN, score_tol: float = SCORE_TOL
) -> list[str]:
    """Differences between two results of one image (dicts of masks (k, h0, w0), labels (k,),
    scores (k,); tensors or arrays); [] when they hold the same instances.

    Same instances: the same count and, row by row, the same label, scores within score_tol and
    mask IoU >= iou_min. A row that does not match its namesake may match another unmatched
    row of the same label within the tolerances (two scores closer than the rounding of two
    runtimes may swap places).
    """
    ref, cand = _numpy(reference), _numpy(candidate)
    n_ref, n_cand = len(ref["scores"]), len(cand["scores"])
    if n_ref != n_cand:
        return [f"{n_ref} instances in PyTorch, {n_cand} in ONNX Runtime"]
    if n_ref and ref["masks"].shape != cand["masks"].shape:
        return [f"mask shapes differ: {ref['masks'].shape} vs {cand['masks'].shape}"]

    def matches(i: int, j: int) -> bool:
        return (
            ref["labels"][i] == cand["labels"][j]
            and abs(float(ref["scores"][i]) - float(cand["scores"][j])) <= score_tol
            and mask_iou(ref["masks"][i], cand["masks"][j]) >= iou_min
        )

    problems, free = [], set(range(n_cand))
    for i in range(n_ref):
        j = i if i in free and matches(i, i) else next((j for j in free if matches(i, j)), None)
        if j is None:
            iou = mask_iou(ref["masks"][i], cand["masks"][i])
            problems.append(
                f"instance {i}: PyTorch label {int(ref['labels'][i])} score "
                f"{float(ref['scores'][i]):.5f}, ONNX label {int(cand['labels'][i])} score "
                f"{float(cand['scores'][i]):.5f}, mask IoU {iou:.4f}"
            )
        else:
            free.discard(j)
    return problems


def fit_size(size: tuple[int, int], frame: tuple[int, int]) -> tuple[int, int]:
    """`size` (h, w), scaled down (aspect kept) until it fits in `frame` (H, W) if it does not."""
    h, w = size
    H, W = frame
    if h <= H and w <= W:
        return int(h), int(w)
    scale = min(H / h, W / w)
    return max(1, math.floor(h * scale)), max(1, math.floor(w * scale))


def graph_input(
    img: Tensor, meta: dict, frame: tuple[int, int], pad_to: int, raw_image=None
) -> tuple[Tensor, dict]:
    """One data-set image (3, Hi, Wi) and its meta -> the graph's (1, 3, H, W) input and meta.

    An image that fits is zero-padded at the bottom/right to the frame, as `collate_fn` pads a
    batch (the PyTorch path sees the same tensor). One that does not (a portrait image for a
    landscape frame) is preprocessed again from `raw_image` (3, h0, w0) uint8, or a function
    that returns it, at the largest size that fits (`fit_size`): its result then differs from
    the PyTorch path's at its own size.
    """
    H, W = frame
    Hi, Wi = img.shape[-2:]
    if Hi > H or Wi > W:
        if raw_image is None:
            raise ValueError(
                f"{meta.get('file_name', 'image')}: padded size {(Hi, Wi)} does not fit the "
                f"exported input {(H, W)} and no original image was given to resize it"
            )
        raw_image = torch.as_tensor(raw_image() if callable(raw_image) else raw_image)
        h0, w0 = raw_image.shape[-2:]
        size = fit_size(tuple(meta["input_size"]), (H, W))
        img, _, _, parts = ds.preprocess(
            raw_image, torch.zeros((0, h0, w0), dtype=torch.uint8), torch.zeros(0, 4), size, pad_to
        )
        meta = {**meta, **parts}
        Hi, Wi = img.shape[-2:]
        if Hi > H or Wi > W:
            raise ValueError(
                f"{meta.get('file_name', 'image')}: padded to {(Hi, Wi)} by pad_to {pad_to}, "
                f"larger than the exported input {(H, W)}"
            )
    return F.pad(img, (0, W - Wi, 0, H - Hi))[None].contiguous(), meta


# --------------------------------------------------------------------------------------------
# modules: the exported graph
# --------------------------------------------------------------------------------------------


class InferenceGraph(nn.Module):
    """Backbone, head and static-shape post-processing of one image, for `torch.onnx.export`.

    `forward(image (1, 3, H, W))` -> (masks (K, Hf, Wf), scores (K,), labels (K,), count (),
    num_candidates (), exact ()); see the module docstring. The thresholds, grids and sizes of
    the head are read when the graph is traced and become constants of it.
    """

    def __init__(self, model: nn.Module, max_candidates: int, max_instances: int):
        super().__init__()

        self.model = model
        head = model.head
        grids = tuple(head.num_grids)
        num_cells = sum(S * S for S in grids)
        self.num_entries = num_cells * head.cate_out_channels
        if max_candidates < 1 or max_instances < 1:
            raise ValueError(
                f"max_candidates ({max_candidates}) and max_instances ({max_instances}) must be "
                f">= 1"
            )
        self.max_candidates = min(int(max_candidates), self.num_entries)  # M
        self.nms_slots = min(int(head.pre_nms_num), self.max_candidates)  # P
        self.max_instances = min(int(max_instances), self.nms_slots)  # K
        # SOLOv2 trained with an upsampled mask loss gives its kept masks as logits, which the
        # finishing resizes as `postprocess.finish_single` does with mask_logits.
        self.mask_values = "logits" if head.resize_logits else "probs"
        # Each cell's level's stride (cells numbered level by level, row-major, as the PyTorch
        # path numbers them), for the small-mask filter.
        level = torch.repeat_interleave(
            torch.arange(len(grids)), torch.tensor([S * S for S in grids])
        )  # (cells,)
        self.register_buffer(
            "cell_stride", torch.tensor(head.strides, dtype=torch.float32)[level], persistent=False
        )

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        head = self.model.head
        preds = head(self.model.backbone(image), eval=True)
        C = head.cate_out_channels
        # per level (1, C, S, S) -> (S*S, C), all levels, then entry e = cell * C + class index:
        # the row-major (cell, class) order of the PyTorch path's candidates
        flat = torch.cat([c[0].permute(1, 2, 0).reshape(-1, C) for c in preds[0]]).reshape(-1)
        M = self.max_candidates
        num_candidates = (flat > head.cate_thresh).sum()
        if M < self.num_entries:
            values, entries = flat.topk(M + 1)  # descending; ties: lower entry first
            best_left_out = values[M]
            values, entries = values[:M], entries[:M]
        else:
            values, entries = flat.topk(M)
            best_left_out = flat.new_full((), -1.0)
        entries, order = entries.sort()  # back to (cell, class) order
        cand_scores = values[order]  # (M,)
        cell, labels = entries // C, entries % C + 1
        passed = cand_scores > head.cate_thresh

        probs, logits = head.candidate_masks(preds, cell, static=True)  # (M, Hf, Wf) each
        binary = probs > head.ins_thresh
        area = binary.sum(dim=(1, 2)).to(probs.dtype)  # (M,)
        keep = passed & (area > 0)
        if head.filter_small_masks:
            keep = keep & (area > self.cell_stride[cell])
        maskness = (probs * binary).sum(dim=(1, 2)) / area.clamp(min=1.0)
        scores = torch.where(keep, cand_scores * maskness, -1.0)  # dropped ones sort last
        # scores <= category scores, so nothing left out can beat this many of the kept ones
        above_left_out = (scores > best_left_out).sum()
        exact = (num_candidates <= M) | (above_left_out >= head.pre_nms_num)

        # The top pre_nms_num, in the PyTorch path's order (a stable sort of (cell, class)
        # order); the dropped candidates come after every kept one and decay none of them.
        nms_scores, nms_rows = scores.topk(self.nms_slots)  # (P,)
        nms_keep = keep[nms_rows]
        decay = postprocess.matrix_nms_decay_sorted(
            binary[nms_rows], labels[nms_rows], head.nms_kernel, head.nms_sigma, area[nms_rows]
        )
        decayed = nms_scores * decay
        final_keep = nms_keep & (decayed >= head.update_thresh)
        out_scores, out_rows = torch.where(final_keep, decayed, -1.0).topk(self.max_instances)
        out_keep = final_keep[out_rows]  # (K,), the real rows first
        rows = nms_rows[out_rows]  # rows of the M candidates
        soft = logits if self.mask_values == "logits" else probs
        masks = soft[rows] * out_keep[:, None, None].to(soft.dtype)  # (K, Hf, Wf)
        out_scores = torch.where(out_keep, out_scores, 0.0)
        out_labels = torch.where(out_keep, labels[rows], 0)
        return masks, out_scores, out_labels, out_keep.sum(), num_candidates, exact


# --------------------------------------------------------------------------------------------
# running an exported model
# --------------------------------------------------------------------------------------------


# What a runner reads from the metadata (export_onnx writes more, for the record).
METADATA_KEYS = ("config", "class_names", "input_hw", "ins_thresh", "max_candidates")


def read_metadata(session, path: str | Path = "this ONNX file") -> dict:
    """The export's metadata (json values under `metadata_props`) of an ONNX Runtime session
    for the file `path`; `errors.ModelFileError` when they are missing, unreadable, incomplete
    or of a newer format."""
    props = session.get_modelmeta().custom_metadata_map
    if "solo_format_version" not in props:
        raise ModelFileError(
            f"{path}: an ONNX model, but without this project's metadata "
            "(solo_format_version, config, class_names, ...); expected a file made by export.py"
        )
    try:
        meta = {k: json.loads(v) for k, v in props.items()}
    except json.JSONDecodeError as err:
        raise ModelFileError(f"{path}: its export metadata are not valid json ({err})") from err
    version = meta["solo_format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: export metadata format {version!r}; this code reads format "
            f"{FORMAT_VERSION} and older (export the checkpoint again)"
        )
    missing = [key for key in METADATA_KEYS if key not in meta]
    if missing:
        raise ModelFileError(
            f"{path}: its export metadata lack {', '.join(missing)}; expected a file made by "
            "export.py"
        )
    return meta


class OnnxSOLO:
    """An exported model in ONNX Runtime on the CPU, with the settings from its metadata.

    `runner.run(x)` -> the graph's outputs by name for x (1, 3, H, W); `runner.predict(img,
    meta)` -> (meta, result) for one data-set image, result as `SOLOModel.predict` gives it
    (torch tensors: masks (k, h0, w0) uint8, labels (k,) int64, scores (k,) float32).
    """

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort  # here: only an ONNX run needs it, and it is slow to load

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        # No spinning after a run: the resize of the kept masks (PyTorch) follows on the same
        # cores (see runtime.py).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such ONNX file")
        try:
            self.session = ort.InferenceSession(
                str(self.path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # ONNX Runtime's own exception types, one per status code
            reason = str(err).rpartition("failed:")[2].strip() or type(err).__name__
            raise ModelFileError(
                f"{self.path}: not a readable ONNX model ({reason}); expected a file made by "
                "export.py"
            ) from err
        self.meta = read_metadata(self.session, self.path)
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [INPUT_NAME] or outputs != list(OUTPUT_NAMES):
            raise ModelFileError(
                f"{self.path}: the graph has inputs {inputs} and outputs {outputs}; expected "
                f"[{INPUT_NAME!r}] and {list(OUTPUT_NAMES)} (a file made by export.py)"
            )
        try:
            self.cfg: Config = config_from_dict(self.meta["config"])
        except (TypeError, ValueError) as err:
            message = f"{self.path}: its stored config does not fit this code: {err}"
            raise ModelFileError(message) from err
        self.class_names = tuple(self.meta["class_names"])
        self.frame = tuple(self.meta["input_hw"])  # (H, W)
        self.ins_thresh = float(self.meta["ins_thresh"])
        # What the "masks" output holds (exports before this key: probabilities) and so the
        # threshold the finishing applies to it.
        self.mask_values = self.meta.get("mask_values", "probs")
        if self.mask_values not in ("probs", "logits"):
            raise ValueError(
                f"{self.path}: metadata mask_values must be 'probs' or 'logits', got "
                f"{self.mask_values!r}"
            )
        self.mask_threshold = (
            postprocess.logit(self.ins_thresh) if self.mask_values == "logits" else self.ins_thresh
        )
        self.max_candidates = int(self.meta["max_candidates"])

    def run(self, x) -> dict[str, np.ndarray]:
        x = x.numpy() if isinstance(x, Tensor) else x
        outputs = self.session.run(None, {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})
        return dict(zip(OUTPUT_NAMES, outputs, strict=True))

    def predict(self, img: Tensor, meta: dict, raw_image=None) -> tuple[dict, dict, dict]:
        """(meta of the graph's input, result as torch tensors, the raw outputs)."""
        x, meta = graph_input(img, meta, self.frame, self.cfg.pad_to, raw_image)
        outputs = self.run(x)
        result = finish_outputs(
            outputs, meta["input_size"], self.frame, meta["orig_size"], self.mask_threshold
        )
        return meta, {k: torch.from_numpy(v) for k, v in result.items()}, outputs


# --------------------------------------------------------------------------------------------
# export and check
# --------------------------------------------------------------------------------------------


def export_onnx(
    model: nn.Module,
    cfg: Config,
    class_names: tuple[str, ...],
    path: str | Path,
    max_candidates: int | None = None,
    max_instances: int | None = None,
    size: tuple[int, int] | None = None,
    dynamo: bool = False,
) -> Path:
    """Write `model` (eval mode, CPU, its head's settings) as an ONNX graph with metadata.

    max_candidates: M (default the head's pre_nms_num); max_instances: K (default the head's
    keep_instance); size: the padded input (H, W) (default the config's input size, padded).
    The metadata hold the config (with keep_instance = K), the class names and the settings a
    runner needs, as json strings under `metadata_props`.
    """
    import onnx  # here: only an export needs it, and it is slow to load

    head = model.head
    H, W = tuple(size) if size else padded_size(tuple(cfg.input_size), cfg.pad_to)
    if H % 32 or W % 32:
        raise ValueError(f"export: the input size must be multiples of 32, got {(H, W)}")
    graph = InferenceGraph(
        model,
        max_candidates or head.pre_nms_num,
        max_instances or head.keep_instance,
    ).eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, 3, H, W)
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about Python branches on tensor shapes (the head's resize checks):
        # they are fixed with the input size, and the check compares the result with PyTorch.
        # The TorchScript-based exporter also announces that it is no longer the default.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            opset_version=OPSET if not dynamo else max(OPSET, 18),
            dynamo=dynamo,
            **({"external_data": False} if dynamo else {}),
        )
    proto = onnx.load(str(path))
    metadata = {
        "solo_format_version": FORMAT_VERSION,
        "model": cfg.model,
        "class_names": list(class_names),
        "config": config_to_dict(replace(cfg, keep_instance=graph.max_instances)),
        "input_hw": [H, W],
        "mask_hw": [H // MASK_STRIDE, W // MASK_STRIDE],
        "pad_to": cfg.pad_to,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "cate_thresh": head.cate_thresh,
        "ins_thresh": head.ins_thresh,
        "mask_values": graph.mask_values,
        "update_thresh": head.update_thresh,
        "pre_nms_num": head.pre_nms_num,
        "nms_kernel": head.nms_kernel,
        "nms_sigma": head.nms_sigma,
        "max_candidates": graph.max_candidates,
        "nms_slots": graph.nms_slots,
        "max_instances": graph.max_instances,
        "outputs": list(OUTPUT_NAMES),
    }
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def check_samples(cfg: Config, count: int) -> tuple[str, list[tuple[Tensor, dict, Tensor]]]:
    """(description, [(img (3, Hi, Wi), meta, raw image (3, h0, w0) uint8)]) for the check.

    The first `count` validation images of the config's data when they can be read (the
    built-in set only when already generated), constructed images otherwise: synthetic.py's
    shapes on clutter, preprocessed to the config's input size.
    """
    val = None
    builtin_ready = cfg.data != "builtin" or all(
        p.is_file()
        for p in ds.cis680_paths(
            synthetic.builtin_prefix(synthetic.default_data_root(), cfg.num_images, cfg.data_seed)
        ).values()
    )
    if builtin_ready:
        try:
            _, val = build_data(replace(cfg, augment=False, overfit=0))
        except (OSError, ValueError, KeyError) as err:
            print(f"check: validation data not readable ({err}); using constructed images")
    if val is not None and len(val) > 0:
        samples = []
        for i in range(min(count, len(val))):
            img, _, _, _, meta = val[i]
            samples.append((img, meta, torch.as_tensor(val.raw(i)[0])))
        return f"{len(samples)} validation images of {cfg.data}", samples
    samples = []
    for i in range(count):
        image, _, _, _ = synthetic.generate_sample(CHECK_SEED, i)
        raw = torch.from_numpy(image)
        h0, w0 = raw.shape[-2:]
        img, _, _, parts = ds.preprocess(
            raw,
            torch.zeros((0, h0, w0), dtype=torch.uint8),
            torch.zeros(0, 4),
            tuple(cfg.input_size),
            cfg.pad_to,
        )
        samples.append((img, {**parts, "image_id": i, "file_name": f"constructed#{i}"}, raw))
    return f"{count} constructed images (synthetic.py, seed {CHECK_SEED})", samples


@torch.no_grad()
def check_export(
    model: nn.Module, runner: OnnxSOLO, samples: list[tuple[Tensor, dict, Tensor]]
) -> tuple[list[str], dict]:
    """Compare ONNX Runtime with the PyTorch path on `samples`; (problems, summary).

    The PyTorch side is `model.head.PostProcess` on the same padded input; `model.head` must
    carry the exported settings (keep_instance = max_instances). Per image: the instances
    (`compare_results`), `exact`, and the number of candidates of both sides, which proves
    that the graph's static top-M held the PyTorch path's candidate set.
    """
    head = model.head
    problems, inconclusive, n_instances, n_candidates = [], [], 0, []
    for img, meta, raw in samples:
        x, meta_x = graph_input(img, meta, runner.frame, runner.cfg.pad_to, raw)
        preds = head(model.backbone(x), eval=True)
        (reference,) = head.PostProcess(preds, [meta_x], padded_size=tuple(x.shape[-2:]))
        cells = head.candidates([c[0] for c in preds[0]])[0]
        torch_candidates = cells.numel()
        _, result, outputs = runner.predict(img, meta, raw)
        name = meta.get("file_name", meta.get("image_id"))
        onnx_candidates = int(outputs["num_candidates"])
        if not bool(outputs["exact"]):
            problems.append(
                f"{name}: {onnx_candidates} entries pass cate_thresh, more than max_candidates "
                f"{runner.max_candidates}; export again with --max-candidates {onnx_candidates}"
            )
        found = []
        if onnx_candidates != torch_candidates:
            found.append(
                f"{torch_candidates} candidates in PyTorch, {onnx_candidates} in the graph"
            )
        found += compare_results(reference, result)
        edges = knife_edges(model, preds, cells) if found else 0
        if found and edges:
            inconclusive.append(
                f"{name}: inconclusive, {edges} values within {EDGE_TOL:g} of a threshold "
                f"(first difference: {found[0]})"
            )
        else:
            problems += [f"{name}: {p}" for p in found]
        n_instances += len(reference["scores"])
        n_candidates.append(torch_candidates)
    if len(inconclusive) == len(samples) and samples:
        problems.append(
            f"no conclusive image: every one has a value on a threshold's knife edge "
            f"({len(samples)} compared); check with more images (--check-images)"
        )
    summary = {
        "images": len(samples),
        "instances": n_instances,
        "candidates": n_candidates,
        "inconclusive": inconclusive,
    }
    return problems, summary


def knife_edges(model: nn.Module, preds: tuple, cells: Tensor) -> int:
    """How many of one image's values lie within EDGE_TOL of a threshold, where float rounding
    decides the side: the category scores (all entries) against cate_thresh and the soft masks
    of the candidate cells `cells` against ins_thresh. preds: the head's eval outputs, batch 1."""
    head = model.head
    edges = sum(_near(c, head.cate_thresh) for c in preds[0])
    if cells.numel():
        edges += _near(head.candidate_masks(preds, cells.unique())[0], head.ins_thresh)
    return edges


def _near(values: Tensor, threshold: float) -> int:
    """Values within EDGE_TOL of `threshold` but not on it: a value exactly on it comes from an
    exact zero (SOLOv2: sigmoid(0) = 0.5 where the mask features are all 0), on both sides."""
    gap = (values - threshold).abs()
    return int(((gap <= EDGE_TOL) & (gap > 0)).sum())


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="run folder or checkpoint file")
    parser.add_argument("--format", default="onnx", choices=["onnx"])
    parser.add_argument("--output", default=None, help="ONNX file (default RUN/<model>.onnx)")
    parser.add_argument(
        "--max-instances", type=int, default=None, help="K kept instances (default keep_instance)"
    )
    parser.add_argument(
        "--max-candidates", type=int, default=None, help="M candidate slots (default pre_nms_num)"
    )
    parser.add_argument(
        "--size", type=int, nargs=2, default=None, metavar=("H", "W"), help="padded input size"
    )
    parser.add_argument("--check-images", type=int, default=CHECK_IMAGES)
    parser.add_argument(
        "--dynamo", action="store_true", help="the torch.export-based exporter (needs onnxscript)"
    )
    args = parser.parse_args(argv)
    if args.check_images < 1:
        parser.error("--check-images must be at least 1: the export is always checked")

    model, cfg, class_names = load_model(args.checkpoint, torch.device("cpu"))
    if args.max_instances is not None:
        model.head.keep_instance = args.max_instances
    ckpt = Path(args.checkpoint)
    run_dir = ckpt if ckpt.is_dir() else ckpt.parent
    path = Path(args.output) if args.output else run_dir / f"{cfg.model}.onnx"
    export_onnx(
        model,
        cfg,
        class_names,
        path,
        max_candidates=args.max_candidates,
        max_instances=args.max_instances,
        size=tuple(args.size) if args.size else None,
        dynamo=args.dynamo,
    )
    runner = OnnxSOLO(path)
    model.head.keep_instance = runner.meta["max_instances"]  # the PyTorch side of the check
    what, samples = check_samples(cfg, args.check_images)
    problems, summary = check_export(model, runner, samples)
    if problems:
        path.unlink()
        print(f"export check FAILED on {what}; {path} deleted:", file=sys.stderr)
        print("\n".join(f"  {p}" for p in problems), file=sys.stderr)
        raise SystemExit(1)
    H, W = runner.frame
    print(
        f"{path}: {cfg.model}, input 1 x 3 x {H} x {W}, {runner.max_candidates} candidate "
        f"slots, up to {runner.meta['max_instances']} instances; ONNX Runtime equals PyTorch on "
        f"{what} ({summary['instances']} instances, candidates per image "
        f"{summary['candidates']})"
    )
    for line in summary["inconclusive"]:
        print(f"note: {line}")
    if summary["instances"] == 0:
        print(
            "note: no instance on the check images (nothing above cate_thresh): only empty "
            "results were compared"
        )
    return path


if __name__ == "__main__":
    from cli import run

    run(main)
