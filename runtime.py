"""Where inference runs: a SOLO model's network part in PyTorch or in ONNX Runtime.

    net = OnnxNetwork(model)          # export and check, once: 1 s (CPU preset), ~10 s (R50)
    results = model.predict(images, metas, network=net)
    python main_infer.py --checkpoint runs/solo_cpu --runtime onnxruntime --images photos/

Only the network part moves (`SOLOModel.network`: backbone and head with eval=True, i.e. the
convolutions, the sigmoid and the point NMS). Its outputs go to the head's own `PostProcess`,
as PyTorch's do, so every later step (the candidates above cate_thresh, however many, their
masks, Matrix NMS, the resize) is the same code on the same numbers up to float rounding
(measured: outputs within 1e-5 of PyTorch's at 192 x 256). Unlike `export.py`'s whole graph,
nothing here has a static shape: the batch and the input size are free (one export serves every
frame) and no candidate is capped.

Why ONNX Runtime: it fuses each batch norm into its convolution and runs convolutions in its
own blocked layout; on this project's 2-core x86 test machine the CPU preset's network ran in
0.6 x PyTorch's time alone (20 against 34 ms) and 0.7 x in the interleaved benchmark, SOLOv2
R50's in 0.7 x (`benchmarks/bench_vs_peers.py`, docs/benchmarks.md). OpenVINO, which reads
the same graph, was measured there and not added: no faster than ONNX Runtime at 192 x 256 or
at 800 x 1344 on that machine.

The check. `OnnxNetwork` runs PyTorch and ONNX Runtime on one constructed input when it is made
and raises `RuntimeError` when an output differs by more than `CHECK_TOL` (relative to the
output's largest value), so a graph that does not compute the model is never used.

Shape legend: B batch, H x W padded input (multiples of 32).
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

RUNTIMES = ("auto", "torch", "onnxruntime")  # main_infer.py --runtime
AUTO_MIN_IMAGES = 20  # --runtime auto: ONNX Runtime on the CPU from this many images (`choose`)
CHECK_TOL = 1e-4  # largest |ONNX Runtime - PyTorch| / (1 + largest |PyTorch|) of any output
EDGE_FRACTION = 0.01  # of an output's values that may be zero in one runtime only (`check`)
OPSET = 17
INPUT_NAME = "image"


def flatten(preds) -> tuple[list[Tensor], list[int]]:
    """A head's eval outputs (a tuple of tensors and per-level lists of tensors) -> (the
    tensors in order, the structure: -1 for a tensor, n for a list of n)."""
    flat, structure = [], []
    for part in preds:
        if isinstance(part, Tensor):
            flat.append(part)
            structure.append(-1)
        else:
            flat.extend(part)
            structure.append(len(part))
    return flat, structure


def unflatten(flat: Sequence[Tensor], structure: Sequence[int]) -> tuple:
    """The inverse of `flatten`."""
    out, start = [], 0
    for n in structure:
        if n < 0:
            out.append(flat[start])
            start += 1
        else:
            out.append(list(flat[start : start + n]))
            start += n
    return tuple(out)


class _Network(nn.Module):
    """`model.network` with flat outputs, for the exporter."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        return tuple(flatten(self.model.network(images))[0])


def choose(runtime: str, device: torch.device, num_images: int) -> str:
    """`--runtime auto` -> onnxruntime on the CPU for `AUTO_MIN_IMAGES` images or more (fewer
    would not win back the export and its check: 1 s for the CPU preset's model, about 10 s for
    a ResNet-50 one, on 2 cores), torch otherwise and on a GPU; other names stay."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose one of {RUNTIMES}")
    on_cpu = torch.device(device).type == "cpu"
    if runtime == "auto":
        return "onnxruntime" if on_cpu and num_images >= AUTO_MIN_IMAGES else "torch"
    if runtime == "onnxruntime" and not on_cpu:
        raise ValueError("--runtime onnxruntime runs on the CPU; use --device cpu with it")
    return runtime


class OnnxNetwork:
    """`model.network` (a `SOLOModel` on the CPU, eval mode) exported to ONNX in memory and run
    by ONNX Runtime; callable like `model.network`: images (B, 3, H, W) -> the head's eval
    outputs, as float32 torch tensors.

    check_size: (H, W) of the two constructed inputs, the one the export traces and the one the
    check compares on (the CPU preset's input by default; any multiple of 32 works, the graph
    takes every size).
    threads: ONNX Runtime's intra-op threads (default: torch's, so both runtimes use the same
    cores).
    """

    def __init__(
        self,
        model: nn.Module,
        threads: int | None = None,
        check_size: tuple[int, int] = (192, 256),
    ):
        import onnxruntime as ort  # here: only this runtime needs it, and it is slow to load

        if next(model.parameters()).device.type != "cpu":
            raise ValueError("OnnxNetwork: the model must be on the CPU (ONNX Runtime runs there)")
        self.model = model.eval()
        # The check compares on another constructed input than the one the export traces (a
        # graph fixed to its trace's values would fail there); PyTorch's outputs on it also
        # give the outputs' structure.
        x = torch.randn(1, 3, *check_size, generator=torch.Generator().manual_seed(0))
        example = torch.randn(1, 3, *check_size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected, self.structure = flatten(model.network(x))
        buffer = io.BytesIO()
        with torch.no_grad(), warnings.catch_warnings():
            # The tracer warns about Python branches on shapes (the heads' size checks); the
            # check below compares the graph with PyTorch. The TorchScript-based exporter
            # also announces that it is no longer the default (export.py says why it is used).
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                _Network(model).eval(),  # the exporter restores the mode it finds
                (example,),
                buffer,
                input_names=[INPUT_NAME],
                opset_version=OPSET,
                dynamic_axes={INPUT_NAME: {0: "batch", 2: "height", 3: "width"}},
                dynamo=False,
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        # No spinning when a run ends: PyTorch's post-processing comes next on the same cores,
        # and spinning threads slowed it (measured: 54 against 40 ms an image on 2 cores).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.onnx_bytes = buffer.getvalue()  # the graph, for another runtime or a file
        self.session = ort.InferenceSession(
            self.onnx_bytes, options, providers=["CPUExecutionProvider"]
        )
        self.check(x, expected)

    def __call__(self, images: Tensor) -> tuple:
        x = np.ascontiguousarray(images.detach().cpu().float().numpy())
        outputs = self.session.run(None, {INPUT_NAME: x})
        return unflatten([torch.from_numpy(o) for o in outputs], self.structure)

    def check(self, x: Tensor, expected: Sequence[Tensor]) -> float:
        """The largest relative difference of this graph's outputs on `x` (1, 3, H, W) from
        `expected`, PyTorch's flattened outputs on it; raises RuntimeError above `CHECK_TOL`.

        A category score that point NMS zeroes in one runtime only (two neighbours within
        float rounding of each other, common in untrained weights) is a knife edge, not a
        difference: up to `EDGE_FRACTION` of an output's values may be one-sided zeros."""
        got = flatten(self(x))[0]
        worst = 0.0
        for i, (e, g) in enumerate(zip(expected, got, strict=True)):
            e = e.float()
            if e.shape != g.shape:
                raise RuntimeError(
                    f"OnnxNetwork: output {i} is {tuple(g.shape)}, not {tuple(e.shape)}"
                )
            one_sided = (e == 0) ^ (g == 0)
            if one_sided.sum() > EDGE_FRACTION * e.numel():
                worst = math.inf
                break
            diff = (g - e).abs()[~one_sided]
            if diff.numel():
                worst = max(worst, float(diff.max()) / (1.0 + float(e.abs().max())))
        if worst > CHECK_TOL:
            raise RuntimeError(
                f"OnnxNetwork: ONNX Runtime's outputs differ from PyTorch's by {worst:.2e} "
                f"(relative; at most {CHECK_TOL:g} is allowed) at input {tuple(x.shape[-2:])}; "
                "run with --runtime torch"
            )
        return worst
