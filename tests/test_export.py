"""Tests of export.py (ONNX graph, numpy finishing, the check) and main_infer.py --onnx.

Tiny untrained models of each type on a 64 x 96 input (masks at 16 x 24), their category and
mask outputs widened on purpose (`lively`) so that dozens of (cell, class) entries pass the
threshold with decisive masks: ONNX Runtime must give the PyTorch path's instances. Also: the
empty case, more candidates than the graph's slots (proved exact, or flagged), and the
command-line round trip (export, then pictures and results json from both runtimes).
Run: python -m pytest -q tests/test_export.py
"""

import json
from dataclasses import replace

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
import torch.nn.functional as F

import export
import main_infer
import postprocess
import solo_head
from config import CPU, config_to_dict
from model import build_model

H, W = 64, 96  # padded input; masks at 16 x 24
TINY = replace(
    CPU,
    num_images=10,
    input_size=(H, W),
    depth=18,
    fpn_channels=16,
    seg_feat_channels=16,
    stacked_convs=1,
    kernel_channels=8,
    mask_feat_channels=8,
    num_grids=(8, 6, 4, 3, 2),  # 129 cells, 387 (cell, class) entries
    scale_ranges=((1, 24), (12, 48), (24, 96), (48, 192), (96, 2048)),
    cate_thresh=0.6,
    pre_nms_num=50,
    keep_instance=50,  # all of them: update_thresh, not the top K, ends the list ...
    update_thresh=0.2,  # ... and drops a few Matrix NMS decayed (0.05 would drop none here)
)
CLASS_NAMES = ("vehicle", "person", "animal")
MODEL_TYPES = ("solo", "decoupled_solo", "solov2")


@pytest.fixture(autouse=True)
def no_builtin_data(tmp_path, monkeypatch):
    """An empty data folder: the check uses constructed images, nothing is generated."""
    monkeypatch.setenv("SOLO_DATA_DIR", str(tmp_path / "data"))


def lively(model):
    """Untrained weights made to act as a trained model's: category logits spread by the image
    (weights std 0.05, bias 0: about 30 of the 387 entries pass 0.6 after point NMS) and mask
    logits far from 0 (std 0.5), so that masks are decisive rather than noise around 0.5."""
    head = model.head
    with torch.no_grad():
        torch.nn.init.normal_(head.cate_out.weight, std=0.05)
        torch.nn.init.zeros_(head.cate_out.bias)
        for name in ("mask_out", "mask_out_x", "mask_out_y"):
            for conv in getattr(head, name, ()):
                torch.nn.init.normal_(conv.weight, std=0.5)
                torch.nn.init.zeros_(conv.bias)
        if hasattr(head, "kernel_out"):
            torch.nn.init.normal_(head.kernel_out.weight, std=0.5)
    return model


def tiny_model(name, live=True, **changes):
    torch.manual_seed(0)
    cfg = replace(TINY, model=name, **changes)
    model = build_model(cfg, num_classes=len(CLASS_NAMES)).eval()
    return (lively(model) if live else model), cfg


def export_and_check(model, cfg, path, samples=2, **kwargs):
    """(runner, problems, summary, [graph outputs per sample])."""
    export.export_onnx(model, cfg, CLASS_NAMES, path, **kwargs)
    runner = export.OnnxSOLO(path)
    model.head.keep_instance = runner.meta["max_instances"]
    _, images = export.check_samples(cfg, samples)
    problems, summary = export.check_export(model, runner, images)
    outputs = [
        runner.run(export.graph_input(img, meta, runner.frame, 32)[0]) for img, meta, _ in images
    ]
    return runner, problems, summary, outputs


# --- finishing and comparison -------------------------------------------------------------


@pytest.mark.parametrize(
    "input_size, orig_size", [((60, 90), (30, 45)), ((64, 96), (64, 96)), ((50, 80), (150, 240))]
)
def test_finish_outputs_equals_the_pytorch_resize(input_size, orig_size):
    # smooth soft masks (noise blurred by upsampling), many pixels near the threshold
    generator = torch.Generator().manual_seed(1)
    probs = torch.sigmoid(4 * F.interpolate(torch.randn(6, 1, 4, 6, generator=generator), (16, 24)))
    probs[5] = 0.2  # empty at every size: dropped by both
    outputs = {
        "masks": probs[:, 0].numpy(),
        "scores": np.linspace(0.9, 0.4, 6, dtype=np.float32),
        "labels": np.array([1, 2, 3, 1, 2, 3]),
        "count": np.array(6),
    }
    got = export.finish_outputs(outputs, input_size, (H, W), orig_size, 0.5)
    expected = postprocess.resize_masks(probs[:, 0], (H, W), input_size, orig_size, 0.5)
    assert got["masks"].shape == (5, *orig_size) and got["masks"].dtype == np.uint8
    assert got["labels"].tolist() == [1, 2, 3, 1, 2]
    differ = (got["masks"] != expected[:5].numpy()).mean()
    assert differ < 1e-4  # float rounding at the threshold only
    assert not expected[5].any()


def test_finish_outputs_of_nothing_is_empty():
    outputs = {
        "masks": np.zeros((4, 16, 24), np.float32),
        "scores": np.zeros(4, np.float32),
        "labels": np.zeros(4, np.int64),
        "count": np.array(0),
    }
    got = export.finish_outputs(outputs, (60, 90), (H, W), (30, 45), 0.5)
    assert got["masks"].shape == (0, 30, 45) and got["labels"].shape == (0,)
    assert got["scores"].dtype == np.float32 and got["labels"].dtype == np.int64


def test_compare_results_finds_each_kind_of_difference():
    masks = np.zeros((2, 10, 10), np.uint8)
    masks[0, :5], masks[1, 5:] = 1, 1
    ref = {"masks": masks, "labels": np.array([1, 2]), "scores": np.array([0.9, 0.8])}
    assert export.compare_results(ref, ref) == []
    # two near-equal scores in the other order still match
    swapped = {k: v[::-1].copy() for k, v in ref.items()}
    swapped["scores"] = np.array([0.8500, 0.8502])
    near = dict(ref, scores=np.array([0.8502, 0.8500]))
    assert export.compare_results(near, swapped) == []
    assert export.compare_results(ref, dict(ref, labels=np.array([1, 3])))
    assert export.compare_results(ref, dict(ref, scores=np.array([0.9, 0.798])))
    moved = masks.copy()
    moved[1, 5] = 0  # 10 of 50 pixels: IoU 0.8
    assert "IoU 0.8000" in export.compare_results(ref, dict(ref, masks=moved))[0]
    one = {k: v[:1] for k, v in ref.items()}
    assert export.compare_results(ref, one) == ["2 instances in PyTorch, 1 in ONNX Runtime"]


def test_graph_input_pads_and_fits_a_portrait_image():
    img = torch.randn(3, 64, 64)
    x, meta = export.graph_input(img, {"input_size": (64, 60), "orig_size": (64, 60)}, (H, W), 32)
    assert (
        x.shape == (1, 3, H, W) and torch.equal(x[0, :, :, :64], img) and not x[0, :, :, 64:].any()
    )
    raw = torch.randint(0, 256, (3, 120, 90), dtype=torch.uint8)
    portrait = torch.randn(3, 96, 64)  # resized to (85, 64): taller than the frame
    x, meta = export.graph_input(
        portrait, {"input_size": (85, 64), "orig_size": (120, 90)}, (H, W), 32, lambda: raw
    )
    assert x.shape == (1, 3, H, W) and meta["input_size"] == (64, 48)
    assert meta["orig_size"] == (120, 90)


# --- the graph against the PyTorch path -----------------------------------------------------


@pytest.mark.parametrize("name", MODEL_TYPES)
def test_onnx_equals_pytorch_with_many_candidates(name, tmp_path):
    model, cfg = tiny_model(name)
    runner, problems, summary, outputs = export_and_check(model, cfg, tmp_path / "m.onnx")
    assert problems == []
    # at most one image may be a knife edge (Decoupled SOLO's second is, with 2 threads)
    assert len(summary["inconclusive"]) < summary["images"]
    assert all(n > 1 for n in summary["candidates"]) and summary["instances"] > 2
    K = runner.meta["max_instances"]
    assert (runner.max_candidates, K) == (50, 50)
    for out in outputs:
        count = int(out["count"])
        assert 1 < int(out["num_candidates"]) <= 50 and bool(out["exact"]) and count > 1
        assert out["masks"].shape == (K, H // 4, W // 4) and out["masks"].dtype == np.float32
        assert out["labels"].dtype == np.int64 and out["scores"].dtype == np.float32
        assert (np.diff(out["scores"][:count]) <= 0).all() and (out["scores"][:count] > 0).all()
        assert not out["masks"][count:].any() and not out["labels"][count:].any()
        assert set(out["labels"][:count].tolist()) <= {1, 2, 3}


@pytest.mark.parametrize("stride, values", [(4, "probs"), (1, "logits")])
def test_solov2_gives_logits_when_its_loss_compared_upsampled_masks(stride, values, tmp_path):
    # TINY comes from the CPU preset (mask_loss_stride 2); the authors' stride 4 keeps the
    # probabilities. Either way the ONNX result must equal the PyTorch path's.
    model, cfg = tiny_model("solov2", mask_loss_stride=stride)
    runner, problems, summary, outputs = export_and_check(model, cfg, tmp_path / "m.onnx")
    assert problems == [] and summary["instances"] > 2
    assert runner.mask_values == values and runner.meta["mask_values"] == values
    kept = np.concatenate([out["masks"][: int(out["count"])].ravel() for out in outputs])
    if values == "logits":
        assert runner.mask_threshold == 0.0 and kept.min() < 0 and kept.max() > 1
    else:
        assert runner.mask_threshold == 0.5 and 0 <= kept.min() and kept.max() <= 1


@pytest.mark.parametrize("name", MODEL_TYPES)
def test_nothing_above_the_threshold_exports_and_runs(name, tmp_path):
    # untrained: every category score near the prior 0.01, none above 0.6
    model, cfg = tiny_model(name, live=False)
    runner, problems, summary, outputs = export_and_check(model, cfg, tmp_path / "e.onnx")
    assert problems == [] and summary["instances"] == 0 and summary["candidates"] == [0, 0]
    for out in outputs:
        assert int(out["count"]) == 0 and int(out["num_candidates"]) == 0 and bool(out["exact"])
        assert out["masks"].shape == (50, H // 4, W // 4) and not out["masks"].any()
        result = export.finish_outputs(out, (H, W), (H, W), (30, 45), 0.5)
        assert result["masks"].shape == (0, 30, 45)


def test_more_candidates_than_slots_is_proved_exact_or_flagged(tmp_path):
    # 20 slots, top 3 before Matrix NMS: about 30 entries pass, but with decisive masks
    # (maskness near 1) more than 3 of the 20 kept score above the best entry left out, so the
    # result is provably the PyTorch path's.
    model, cfg = tiny_model("solov2", pre_nms_num=3, keep_instance=3)
    with torch.no_grad():
        torch.nn.init.normal_(model.head.kernel_out.weight, std=2.0)
    _, problems, _, outputs = export_and_check(model, cfg, tmp_path / "a.onnx", max_candidates=20)
    assert problems == []
    assert all(int(o["num_candidates"]) > 20 and bool(o["exact"]) for o in outputs)
    # 2 slots cannot hold the 3 the PyTorch path takes: not exact, and the check says so
    model, cfg = tiny_model("solov2", pre_nms_num=3, keep_instance=3)
    runner, problems, _, outputs = export_and_check(
        model, cfg, tmp_path / "b.onnx", max_candidates=2
    )
    assert runner.meta["nms_slots"] == 2 and not any(bool(o["exact"]) for o in outputs)
    assert any("--max-candidates" in p for p in problems)


def test_knife_edges_counts_values_on_a_threshold():
    model, cfg = tiny_model("decoupled_solo")
    _, [(img, meta, _)] = export.check_samples(cfg, 1)
    head = model.head
    with torch.no_grad():
        preds = head(model.backbone(img[None]), eval=True)
    cells = head.candidates([c[0] for c in preds[0]])[0]
    assert cells.numel() > 0
    probs = head.candidate_masks(preds, cells.unique())[0]
    cate = torch.cat([c[0].flatten() for c in preds[0]])
    far = max((probs - head.ins_thresh).abs().min(), (cate - head.cate_thresh).abs().min())
    if far <= export.EDGE_TOL:
        pytest.skip("this image has a knife edge already")
    assert export.knife_edges(model, preds, cells) == 0
    head.ins_thresh = float(probs.flatten()[7]) + export.EDGE_TOL / 2  # one value on the edge
    assert export.knife_edges(model, preds, cells) >= 1
    head.ins_thresh = cfg.ins_thresh
    head.cate_thresh = float(cate.max()) - export.EDGE_TOL / 2  # the best entry on the edge
    assert export.knife_edges(model, preds, cells) >= 1


def test_a_difference_fails_unless_a_knife_edge_explains_it(tmp_path, monkeypatch):
    model, cfg = tiny_model("solov2")
    runner, problems, _, _ = export_and_check(model, cfg, tmp_path / "m.onnx")
    assert problems == []
    _, images = export.check_samples(cfg, 2)
    predict = runner.predict

    def off_by_one_percent(*args):
        meta, result, outputs = predict(*args)
        return meta, {**result, "scores": result["scores"] * 1.01}, outputs

    monkeypatch.setattr(runner, "predict", off_by_one_percent)
    problems, summary = export.check_export(model, runner, images)
    assert len(problems) > 2 and "score" in problems[0] and summary["inconclusive"] == []
    # the same difference on knife-edge images: inconclusive, and with none conclusive, failed
    monkeypatch.setattr(export, "knife_edges", lambda *args: 3)
    problems, summary = export.check_export(model, runner, images)
    assert len(summary["inconclusive"]) == 2 and "3 values within" in summary["inconclusive"][0]
    assert len(problems) == 1 and "no conclusive image" in problems[0]
    problems, summary = export.check_export(model, runner, images[:1] + images[:1])
    assert len(problems) == 1


# --- command line: export, then main_infer with both runtimes -------------------------------


def save_checkpoint(path, model, cfg):
    state = {"model": model.state_dict(), "config": config_to_dict(cfg), "class_names": CLASS_NAMES}
    torch.save(state, path)
    return path


def detections(folder):
    return json.loads((folder / "results.json").read_text())


def assert_same_detections(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert (x["image_id"], x["category_id"]) == (y["image_id"], y["category_id"])
        assert abs(x["score"] - y["score"]) <= 1e-3
        assert mask_util.iou([x["segmentation"]], [y["segmentation"]], [0])[0, 0] >= 0.99


def test_export_command_and_main_infer_onnx_write_what_pytorch_writes(tmp_path):
    from PIL import Image

    import synthetic

    model, cfg = tiny_model("solov2")
    ckpt = save_checkpoint(tmp_path / "last.pt", model, cfg)
    onnx_path = export.main(["--checkpoint", str(ckpt), "--check-images", "2"])
    assert onnx_path == tmp_path / "solov2.onnx" and onnx_path.is_file()

    photos = tmp_path / "photos"  # landscape 90 x 120: resized to 64 x 85, padded to 64 x 96
    photos.mkdir()
    for i in range(3):
        image = synthetic.generate_sample(7, i, 90, 120)[0].transpose(1, 2, 0)
        Image.fromarray(np.ascontiguousarray(image)).save(photos / f"p{i}.png")
    common = ["--images", str(photos), "--score-min", "0"]
    main_infer.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "pt"), *common])
    main_infer.main(["--onnx", str(onnx_path), *common])  # default folder: inference_onnx
    pt, ox = tmp_path / "pt", tmp_path / "inference_onnx"
    assert len(detections(pt)) > 3
    assert_same_detections(detections(pt), detections(ox))
    pictures = sorted(p.name for p in pt.glob("*_pred.png"))
    assert len(pictures) == 3 and pictures == sorted(p.name for p in ox.glob("*_pred.png"))

    # the validation split (generated here: 10 images, 2 held out) and --eval
    main_infer.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "pt_val")])
    metrics = main_infer.main(
        ["--onnx", str(onnx_path), "--out", str(tmp_path / "ox_val"), "--eval"]
    )
    assert set(metrics) >= {"AP", "AP50"} and len(detections(tmp_path / "pt_val")) > 0
    assert_same_detections(detections(tmp_path / "pt_val"), detections(tmp_path / "ox_val"))


def test_export_command_fails_and_deletes_the_file_when_the_check_fails(tmp_path, capsys):
    model, cfg = tiny_model("solo", pre_nms_num=5, keep_instance=5)
    ckpt = save_checkpoint(tmp_path / "last.pt", model, cfg)
    out = tmp_path / "x.onnx"
    argv = ["--checkpoint", str(ckpt), "--output", str(out), "--max-candidates", "3"]
    with pytest.raises(SystemExit):
        export.main([*argv, "--check-images", "1"])
    assert not out.exists()
    assert "export again with --max-candidates" in capsys.readouterr().err


@pytest.mark.parametrize("name", MODEL_TYPES)
def test_the_graphs_candidate_masks_are_the_pytorch_paths(name):
    # The graph's static form (every level computes every cell) keeps each cell's own level's
    # masks: the same values as the PyTorch path's per-level computation, in the same order.
    model, cfg = tiny_model(name)
    _, [(img, _, _)] = export.check_samples(cfg, 1)
    head = model.head
    with torch.no_grad():
        preds = head(model.backbone(img[None]), eval=True)
    cells = torch.cat([torch.arange(0, 30), torch.tensor([sum(S * S for S in head.num_grids) - 1])])
    cells = cells[torch.randperm(cells.numel(), generator=torch.Generator().manual_seed(0))]
    dynamic, dynamic_logits = head.candidate_masks(preds, cells)
    static, static_logits = head.candidate_masks(preds, cells, static=True)
    assert dynamic.shape == (cells.numel(), *preds[-1][0].shape[-2:])  # (n, H/4, W/4)
    torch.testing.assert_close(static, dynamic, atol=1e-6, rtol=0)
    assert (static_logits is None) == (dynamic_logits is None) == (not head.resize_logits)
    levels, _ = solo_head.cell_levels(cells, head.num_grids)
    assert levels.unique().numel() >= 2  # the cells span levels, so the selection is tested
