"""Issue #19, case 9: a model's result for an image does not depend on the rest of its batch.

The cause, found by experiment: `collate_fn` pads a small image to the batch's largest one, and
in that frame the network sees the padding as image. SOLO's S x S category grids and its
CoordConv coordinates span the whole frame, and every feature's receptive field and GroupNorm
statistics take the padding in (a random TINY model, a 64 x 64 image in a 64 x 96 frame: its
P2 features differ by up to 3.7 even in the image's left half). A 1 x 1 image makes it plain:
its mask is the soft mask's value at the centre of its 64 x 64 input, so every detection
whose mask moves across that point appears or disappears. `SOLOModel.predict` runs each image
in its own frame (`solo_head.image_frame`) instead; these tests hold it to that for every head.
"""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import TINY as TRAIN_TINY

import dataset as ds
import evaluation
import main_infer
from model import build_model
from solo_head import image_frame

# test_train's tiny model, with a small SOLOv2 kernel branch and its masks at stride 4.
TINY = replace(TRAIN_TINY, kernel_channels=8, mask_feat_channels=8, mask_loss_stride=4)
HEADS = ("solo", "decoupled_solo", "solov2")


def random_model(name: str, seed: int = 0):
    """A TINY model of head `name` whose random head gives candidates and non-empty masks:
    every head conv normal(0, 0.3) with zero bias, the category output's bias 0 (p ~ 0.5,
    above cate_thresh wherever point NMS keeps a cell)."""
    torch.manual_seed(seed)
    model = build_model(replace(TINY, model=name), num_classes=3).eval()
    for module in model.head.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.normal_(module.weight, std=0.3)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
    return model


def sample(image: np.ndarray, size: tuple[int, int]) -> tuple:
    """A data-set item of an (h0, w0, 3) uint8 image resized to `size`, padded to 32."""
    h0, w0 = image.shape[:2]
    img, masks, boxes, meta = ds.preprocess(
        torch.from_numpy(image).permute(2, 0, 1),  # (h0, w0, 3) -> (3, h0, w0)
        torch.zeros((0, h0, w0), dtype=torch.uint8),
        torch.zeros((0, 4)),
        size,
        pad_to=32,
    )
    return img, torch.zeros(0, dtype=torch.int64), masks, boxes, {**meta, "image_id": 0}


def predict(model, samples: list[tuple]) -> list[dict]:
    """`model.predict` on the batch `collate_fn` makes of `samples`."""
    imgs, _, _, _, metas = ds.collate_fn(samples)
    return model.predict(imgs, metas)


def predict_in_batch_frame(model, samples: list[tuple]) -> list[dict]:
    """What `predict` did before the fix: the network on the whole padded batch."""
    imgs, _, _, _, metas = ds.collate_fn(samples)
    with torch.no_grad():
        preds = model.head(model.backbone(imgs), eval=True)
        return model.head.PostProcess(preds, metas, padded_size=tuple(imgs.shape[-2:]))


def assert_same(got: dict, expected: dict, knife_edge_pixels: int = 0) -> None:
    """Same labels and masks, scores equal to float tolerance. knife_edge_pixels: how many
    pixels of a mask may differ (images batched with others of their frame: the batched
    convolutions round differently, ~1e-5, and a pixel that close to ins_thresh can flip)."""
    assert torch.equal(got["labels"], expected["labels"])
    assert got["masks"].shape == expected["masks"].shape
    differ = (got["masks"] != expected["masks"]).flatten(1).sum(dim=1)  # (k, h0, w0) -> (k,)
    assert all(int(count) <= knife_edge_pixels for count in differ)
    torch.testing.assert_close(got["scores"], expected["scores"], rtol=1e-4, atol=1e-5)


def rng_image(seed: int, h0: int, w0: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h0, w0, 3), dtype=np.uint8)


# --- the frame of one image ------------------------------------------------------------------


def test_case_09_image_frame_is_the_input_size_padded_to_pad_to():
    assert image_frame({"input_size": (40, 50)}, (64, 96), 32) == (64, 64)
    assert image_frame({"input_size": (64, 96)}, (64, 96), 32) == (64, 96)
    assert image_frame({"input_size": (65, 33)}, (128, 96), 32) == (96, 64)
    assert image_frame({"input_size": (40, 50)}, (64, 96), 1) == (40, 50)  # no padding
    assert image_frame({"input_size": (70, 50)}, (64, 96), 32) == (64, 64)  # never beyond
    assert image_frame(None, (64, 96), 32) == (64, 96)  # no meta: the batch's frame
    assert image_frame({"orig_size": (5, 5)}, (64, 96), 32) == (64, 96)


# --- a known answer: the CoordConv coordinates span the frame --------------------------------


def coordconv_model():
    """A SOLO model whose masks are "CoordConv x < -0.3 std" (x = -1 at the frame's left edge,
    +1 at its right edge) on level 0 only, with class 1 at every cell and one instance kept.

    An image alone in its frame has x = 0 at its centre: outside the mask. The same image in
    the left part of a wider frame has its centre at x < 0: inside the mask.
    """
    torch.manual_seed(0)
    model = build_model(TINY, num_classes=3).eval()
    head = model.head
    head.keep_instance = 1
    with torch.no_grad():
        head.cate_out.weight.zero_()
        head.cate_out.bias.copy_(torch.tensor([5.0, -20.0, -20.0]))  # class 1, p = 0.993
        conv, norm = head.mask_convs[0][0], head.mask_convs[0][1]
        conv.weight.zero_()
        conv.weight[0, head.in_channels, 1, 1] = 1.0  # channel 0 = the x coordinate
        if conv.bias is not None:
            conv.bias.zero_()
        norm.weight.zero_()
        norm.bias.zero_()
        norm.weight[0] = -1.0  # after ReLU: relu(-x / std), larger to the left
        for level, out in enumerate(head.mask_out):
            out.weight.zero_()
            out.weight[:, 0] = 20.0
            out.bias.fill_(-20.0 * 0.3 if level == 0 else -100.0)  # the other levels: empty
    return model


def test_case_09_one_pixel_image_is_not_judged_in_the_batch_frame():
    model = coordconv_model()
    pixel = sample(np.full((1, 1, 3), 128, np.uint8), (64, 64))  # frame 64 x 64
    wide = sample(rng_image(1, 64, 96), (64, 96))  # frame 64 x 96
    # The report: in the 64 x 96 batch frame the 1 x 1 image's one pixel (the centre of its
    # 64 x 64 input) lies at x = -0.33, inside the mask: one detection; alone, none.
    assert len(predict_in_batch_frame(model, [pixel])[0]["labels"]) == 0
    assert len(predict_in_batch_frame(model, [pixel, wide])[0]["labels"]) == 1
    # Fixed: no detection whatever else is in the batch, and the wide image keeps its own.
    alone, wide_alone = predict(model, [pixel])[0], predict(model, [wide])[0]
    assert len(alone["labels"]) == 0 and len(wide_alone["labels"]) == 1
    for batch in ([pixel, wide], [wide, pixel]):
        results = predict(model, batch)
        got_pixel, got_wide = results if batch[0] is pixel else results[::-1]
        assert_same(got_pixel, alone)
        assert_same(got_wide, wide_alone)


# --- random models of every head -------------------------------------------------------------


@pytest.mark.parametrize("name", HEADS)
def test_case_09_result_is_the_same_alone_and_next_to_a_larger_image(name):
    torch.set_num_threads(1)  # one summation order for the comparisons below
    model = random_model(name)
    small = sample(rng_image(2, 30, 42), (40, 56))  # frame 64 x 64, padding inside it too
    large = sample(rng_image(3, 64, 96), (64, 96))  # frame 64 x 96
    other = sample(rng_image(4, 60, 90), (60, 90))  # frame 64 x 96, the same as `large`
    small_alone = predict(model, [small])[0]
    large_alone = predict(model, [large])[0]
    other_alone = predict(model, [other])[0]
    # The known cause: in the larger image's frame the small image's result changes.
    before = predict_in_batch_frame(model, [small, large])[0]
    assert len(small_alone["labels"]) > 0 and len(large_alone["labels"]) > 0
    assert not (
        torch.equal(before["labels"], small_alone["labels"])
        and torch.equal(before["masks"], small_alone["masks"])
    )
    expected = {id(small): small_alone, id(large): large_alone, id(other): other_alone}
    for batch in ([small, large], [large, small], [large, small, other]):
        results = predict(model, batch)
        for item, result in zip(batch, results, strict=True):
            assert result["masks"].shape[1:] == item[4]["orig_size"]
            # alone in its frame: the very computation of the image alone
            shares_frame = item is not small and len(batch) == 3
            assert_same(result, expected[id(item)], knife_edge_pixels=2 if shares_frame else 0)


@pytest.mark.parametrize("name", HEADS)
def test_case_09_one_pixel_image_gives_the_same_with_batch_size_1_and_2(name, tmp_path):
    torch.set_num_threads(1)
    model = random_model(name)
    Image.fromarray(np.full((1, 1, 3), 200, np.uint8)).save(tmp_path / "a_pixel.png")
    Image.fromarray(rng_image(5, 64, 96)).save(tmp_path / "b_photo.png")
    data = main_infer.ImageFiles(sorted(tmp_path.iterdir()), TINY.input_size, TINY.pad_to)
    runs = [
        evaluation.predict_batches(model, evaluation.data_loader(data, batch_size), "cpu")
        for batch_size in (1, 2)
    ]
    for (meta_1, result_1), (meta_2, result_2) in zip(*runs, strict=True):
        assert meta_1["file_name"] == meta_2["file_name"]
        assert_same(result_2, result_1)
    pixel_result = runs[0][0][1]
    assert pixel_result["masks"].shape[1:] == (1, 1)
