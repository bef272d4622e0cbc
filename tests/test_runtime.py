"""Tests of runtime.py: the network part in ONNX Runtime against PyTorch, and main_infer's
--runtime.

The models are test_export.py's tiny ones, made lively (dozens of candidates, decisive masks),
so equal detections mean the whole post-processing saw the same numbers.
Run: python -m pytest -q tests/test_runtime.py
"""

import numpy as np
import pytest
import torch
from test_export import assert_same_detections, detections, save_checkpoint, tiny_model

import export
import main_infer
import runtime
from config import MODELS

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def no_builtin_data(tmp_path, monkeypatch):
    monkeypatch.setenv("SOLO_DATA_DIR", str(tmp_path / "data"))


def test_flatten_and_unflatten_round_trip():
    a, b, c, d = (torch.full((1,), float(i)) for i in range(4))
    flat, structure = runtime.flatten(([a, b], c, [d]))
    assert structure == [2, -1, 1] and [float(t) for t in flat] == [0, 1, 2, 3]
    back = runtime.unflatten(flat, structure)
    assert isinstance(back, tuple) and back[0] == [a, b] and back[1] is c and back[2] == [d]


@pytest.mark.parametrize("name", MODELS)
def test_onnx_network_equals_pytorch_at_any_size_and_batch(name):
    model, _ = tiny_model(name)
    net = runtime.OnnxNetwork(model, check_size=(64, 96))
    for shape in [(1, 3, 64, 96), (2, 3, 96, 64), (1, 3, 128, 160)]:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected, structure = runtime.flatten(model.network(x))
        got, got_structure = runtime.flatten(net(x))
        assert got_structure == structure
        for e, g in zip(expected, got, strict=True):
            assert g.dtype == torch.float32 and g.shape == e.shape
            torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ("solo", "decoupled_solo", "solov2"))
def test_predict_through_onnx_runtime_gives_the_pytorch_detections(name):
    model, _ = tiny_model(name)
    net = runtime.OnnxNetwork(model, check_size=(64, 96))
    gen = torch.Generator().manual_seed(2)
    images = torch.randn(2, 3, 64, 96, generator=gen)
    metas = [
        {"input_size": (64, 90), "orig_size": (80, 112)},
        {"input_size": (60, 96), "orig_size": (60, 96)},
    ]
    with torch.no_grad():
        expected = model.predict(images, metas)
        got = model.predict(images, metas, network=net)
    assert sum(len(r["scores"]) for r in expected) > 10  # a real post-processing
    for e, g in zip(expected, got, strict=True):
        assert export.compare_results(e, g) == []


def test_a_graph_that_differs_from_pytorch_is_refused(monkeypatch):
    import onnxruntime as ort

    model, _ = tiny_model("solov2")
    real_run = ort.InferenceSession.run

    def perturbed(self, names, feeds):
        return [o + 0.01 for o in real_run(self, names, feeds)]

    monkeypatch.setattr(ort.InferenceSession, "run", perturbed)
    with pytest.raises(RuntimeError, match="differ from PyTorch's by .* --runtime torch"):
        runtime.OnnxNetwork(model, check_size=(64, 96))


def test_choose_the_runtime():
    cpu, gpu, many = torch.device("cpu"), torch.device("cuda"), runtime.AUTO_MIN_IMAGES
    assert runtime.choose("auto", cpu, many) == "onnxruntime"
    assert runtime.choose("auto", cpu, many - 1) == "torch"  # the export would not pay
    assert runtime.choose("auto", gpu, many) == "torch"
    assert runtime.choose("torch", cpu, many) == "torch"
    assert runtime.choose("onnxruntime", cpu, 1) == "onnxruntime"
    with pytest.raises(ValueError, match="--device cpu"):
        runtime.choose("onnxruntime", gpu, many)
    with pytest.raises(ValueError, match="unknown runtime"):
        runtime.choose("openvino", cpu, many)


def test_main_infer_runtimes_write_the_same_detections(tmp_path, capsys):
    from PIL import Image

    import synthetic

    model, cfg = tiny_model("solov2")
    ckpt = save_checkpoint(tmp_path / "last.pt", model, cfg)
    photos = tmp_path / "photos"  # two frames: landscape 64 x 96 and portrait 96 x 64
    photos.mkdir()
    for i, (h, w) in enumerate([(90, 120), (120, 90), (90, 120)]):
        image = synthetic.generate_sample(7, i, h, w)[0].transpose(1, 2, 0)
        Image.fromarray(np.ascontiguousarray(image)).save(photos / f"p{i}.png")
    common = ["--checkpoint", str(ckpt), "--images", str(photos), "--score-min", "0"]
    main_infer.main([*common, "--out", str(tmp_path / "pt"), "--runtime", "torch"])
    main_infer.main(
        [*common, "--out", str(tmp_path / "ort"), "--runtime", "onnxruntime", "--workers", "1"]
    )
    out = capsys.readouterr().out
    assert "network in ONNX Runtime" in out and "images/s" in out
    assert len(detections(tmp_path / "pt")) > 3
    assert_same_detections(detections(tmp_path / "pt"), detections(tmp_path / "ort"))


def test_auto_goes_on_in_pytorch_when_the_onnx_network_fails(monkeypatch, capsys):
    model, _ = tiny_model("solov2")

    def broken(model):
        raise RuntimeError("OnnxNetwork: ONNX Runtime's outputs differ from PyTorch's")

    monkeypatch.setattr(main_infer, "OnnxNetwork", broken)
    assert main_infer.onnx_network(model, forced=False) is None
    assert "network stays in PyTorch" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="differ from PyTorch"):
        main_infer.onnx_network(model, forced=True)
