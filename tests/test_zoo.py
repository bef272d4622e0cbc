"""zoo.py: released checkpoints in every layout load to the same tensors, strict errors name the
keys, unknown and unsafe files are refused, convert_checkpoint.py round-trips, and the
deterministic fill that the mmdetection comparison relies on.

No mmdetection here: a file in a layout is this project's model (ResNet-18, narrow head) with
its keys renamed to that layout's names by the inverse rules (`zoo.from_project_keys`) and
wrapped as that layout's files are; the names themselves are checked against mmdetection's
own state dicts (recorded in tests/data/mmdet_reference/ by tools/make_mmdet_reference.py) and
against names quoted from the authors' and AdelaiDet's code.
"""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import config
import convert_checkpoint
import zoo
from cli import run
from errors import ModelFileError
from model import build_model, load_model

COCO128 = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128"

REFERENCE = Path(__file__).parent / "data" / "mmdet_reference"
# The released architectures tools/make_mmdet_reference.py records (mmdetection 3.3.0).
REFERENCE_MODELS = {
    "solo_r50_fpn_3x_coco": ("solo", 50),
    "decoupled-solo_r50_fpn_3x_coco": ("decoupled_solo", 50),
    "decoupled-solo-light_r50_fpn_3x_coco": ("decoupled_solo_light", 50),
    "solov2_r50_fpn_ms-3x_coco": ("solov2", 50),
    "solov2_r101_fpn_ms-3x_coco": ("solov2", 101),
    "solov2-light_r18_fpn_ms-3x_coco": ("solov2_light", 18),
    "solov2-light_r34_fpn_ms-3x_coco": ("solov2_light", 34),
    "solov2-light_r50_fpn_ms-3x_coco": ("solov2_light", 50),
}
GRIDS = (12, 10, 8, 6, 4)  # small grids; SOLO / Decoupled SOLO read them off the weights


def small_config(model: str, depth: int = 18, stacked_convs: int = 2) -> config.Config:
    """A narrow head on ResNet-18 (the backbone width is torchvision's, as released)."""
    return dataclasses.replace(
        config.model_config(config.CIS680, model),
        depth=depth,
        fpn_channels=64,
        seg_feat_channels=64,
        stacked_convs=stacked_convs,
        num_grids=GRIDS,
        kernel_channels=32,
        mask_feat_channels=32,
        norm="frozen_bn",
    )


@pytest.fixture(scope="module")
def project_states():
    """model name -> this project's state dict of a small model, every tensor filled. SOLOv2
    with 3 tower convs (2 make it SOLOv2-light, as released)."""
    models = ("solo", "decoupled_solo", "decoupled_solo_light", "solov2", "solov2_light")
    return {
        name: filled_state(small_config(name, stacked_convs=3 if name == "solov2" else 2))
        for name in models
    }


def filled_state(cfg: config.Config, classes: int = 5) -> dict:
    net = build_model(cfg, classes)
    zoo.fill_project_model(net, "project", seed=1)  # random values in every tensor
    return net.state_dict()


def layout_file(state: dict, fmt: str, classes=None, prefix: str = "") -> dict:
    """`state` (this project's names) as a file of layout `fmt` would hold it."""
    weights = zoo.from_project_keys(state, fmt)
    if fmt in ("mmdet", "solo_authors"):  # their BatchNorm has a counter; ours is frozen
        for key in [k for k in weights if k.endswith("running_var")]:
            weights[key.replace("running_var", "num_batches_tracked")] = torch.tensor(7)
    weights = {prefix + k: v for k, v in weights.items()}
    if fmt == "mmdet":
        meta = {"mmdet_version": "3.3.0", "dataset_meta": {"classes": classes}}
        return {"meta": meta, "state_dict": weights}
    if fmt == "solo_authors":
        return {"meta": {"mmdet_version": "1.0rc0+", "CLASSES": classes}, "state_dict": weights}
    return {"model": weights, "iteration": 270000}


def saved(tmp_path: Path, obj, name: str = "released.pth") -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


def assert_same_tensors(model, state: dict, fmt: str) -> None:
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        expected = value
        if fmt == "adelaidet" and key == "backbone.net.body.conv1.weight":
            expected = zoo.fold_detectron2_input(value)
        assert torch.equal(loaded[key], expected), key


# --------------------------------------------------------------------------------------------
# every layout loads to the same tensors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, model",
    [
        ("mmdet", "solo"),
        ("mmdet", "decoupled_solo"),
        ("mmdet", "decoupled_solo_light"),
        ("mmdet", "solov2"),
        ("solo_authors", "solo"),
        ("solo_authors", "decoupled_solo"),
        ("solo_authors", "decoupled_solo_light"),
        ("solo_authors", "solov2_light"),
        ("adelaidet", "solov2"),
    ],
)
def test_a_file_in_each_layout_loads_to_the_same_tensors(tmp_path, project_states, fmt, model):
    state = project_states[model]
    names = ("cat", "dog", "car", "bus", "cup")
    path = saved(tmp_path, layout_file(state, fmt, classes=list(names)))
    net, class_names, cfg = zoo.load_released(path)
    assert_same_tensors(net, state, fmt)
    assert not net.training
    assert cfg.model == model and cfg.depth == 18 and cfg.fpn_channels == 64
    assert (cfg.seg_feat_channels, cfg.stacked_convs) == (64, 3 if model == "solov2" else 2)
    if model.startswith("solov2"):  # grids are not in SOLOv2's weights: the released ones
        assert cfg.num_grids == zoo.RELEASED_SOLOV2_GRIDS and cfg.kernel_channels == 32
        assert cfg.mask_feat_channels == 32
    else:
        assert cfg.num_grids == GRIDS
    # The released test settings (mmdetection's, the authors' and AdelaiDet's test_cfg).
    released = dict(cate_thresh=0.1, ins_thresh=0.5, pre_nms_num=500, keep_instance=100)
    released.update(nms_kernel="gaussian", nms_sigma=2.0, update_thresh=0.05, epsilon=0.2)
    assert {k: getattr(cfg, k) for k in released} == released
    light = {"decoupled_solo_light": (512, 852), "solov2_light": (448, 768)}
    assert cfg.input_size == light.get(model, (800, 1333))
    # Class names from the meta where the layout has them (AdelaiDet: none, 5 outputs).
    unnamed = tuple(f"class_{k}" for k in range(1, 6))
    assert class_names == (unnamed if fmt == "adelaidet" else names)


def test_the_module_prefix_of_data_parallel_is_removed(tmp_path, project_states):
    state = project_states["solo"]
    path = saved(tmp_path, layout_file(state, "mmdet", prefix="module."))
    assert zoo.detect_format(torch.load(path, weights_only=True), path) == "mmdet"
    net, _, _ = zoo.load_released(path)
    assert_same_tensors(net, state, "mmdet")


def test_this_projects_checkpoint_loads_with_its_own_config(tmp_path, project_states):
    cfg = small_config("solo")
    ckpt = {
        "config": config.config_to_dict(cfg),
        "model": project_states["solo"],
        "class_names": ["a", "b", "c", "d", "e"],
    }
    path = saved(tmp_path, ckpt, "last.pt")
    net, class_names, loaded_cfg = zoo.load_released(path)
    assert loaded_cfg == cfg and class_names == ("a", "b", "c", "d", "e")
    assert_same_tensors(net, project_states["solo"], "project")


def test_eighty_outputs_without_names_are_the_coco_classes():
    assert len(zoo.COCO_CLASSES) == 80 and zoo.COCO_CLASSES[0] == "person"
    assert zoo.COCO_CLASSES[-1] == "toothbrush" and len(set(zoo.COCO_CLASSES)) == 80
    assert zoo.released_class_names({"model": {}}, 80) == zoo.COCO_CLASSES
    assert zoo.released_class_names({"meta": {"CLASSES": ["x", "y"]}}, 2) == ("x", "y")
    # Names that do not fit the outputs are not used.
    assert zoo.released_class_names({"meta": {"CLASSES": ["x"]}}, 2) == ("class_1", "class_2")


def test_mmdetection_1x_underscored_coco_names_are_cocos():
    # mmdetection 1.x, which the authors' WXinlong/SOLO files come from, writes
    # "traffic_light": read as COCO's own names, the classes match a COCO json's by name.
    underscored = [name.replace(" ", "_") for name in zoo.COCO_CLASSES]
    assert "traffic_light" in underscored
    names = zoo.released_class_names({"meta": {"CLASSES": underscored}}, 80)
    assert names == zoo.COCO_CLASSES
    assert zoo.class_key("Traffic_Light") == zoo.class_key("traffic light") == "traffic light"
    assert zoo.is_coco(underscored) and not zoo.is_coco(zoo.COCO_CLASSES[::-1])
    assert not zoo.is_coco(zoo.COCO_CLASSES[:79])


def test_coco_category_ids_skip_cocos_ten_unused_ids():
    ids = zoo.COCO_CATEGORY_IDS
    assert len(ids) == 80 and ids[0] == 1 and ids[-1] == 90
    assert list(ids) == sorted(set(ids))
    assert set(range(1, 91)) - set(ids) == {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
    mapping = zoo.category_ids(zoo.COCO_CLASSES)
    assert mapping[zoo.COCO_CLASSES.index("stop sign") + 1] == 13  # the first after a gap
    assert mapping[80] == 90
    assert zoo.category_ids(("cat", "dog", "car")) == {1: 1, 2: 2, 3: 3}  # not COCO's 80


@pytest.mark.skipif(not COCO128.is_dir(), reason=f"coco128 not found at {COCO128}")
def test_coco_category_ids_are_the_official_jsons():
    annotations = json.loads((COCO128 / "annotations" / "instances_train2017.json").read_text())
    official = {c["id"]: c["name"] for c in annotations["categories"]}
    assert dict(zip(zoo.COCO_CATEGORY_IDS, zoo.COCO_CLASSES, strict=True)) == official


# --------------------------------------------------------------------------------------------
# the key names
# --------------------------------------------------------------------------------------------


# Names quoted from WXinlong/SOLO (mmdet/models/anchor_heads/solo_head.py, decoupled_solo_head.py,
# decoupled_solo_light_head.py, solov2_head.py, mask_heads/mask_feat_head.py; mmdetection 1.x
# ResNet and FPN) and AdelaiDet (adet/modeling/solov2/solov2.py; detectron2's ResNet and FPN).
AUTHORS_NAMES = {
    "solo": [
        "bbox_head.solo_ins_list.0.weight",
        "bbox_head.ins_convs.1.gn.weight",
        "bbox_head.cate_convs.0.conv.weight",
        "bbox_head.solo_cate.bias",
        "backbone.layer1.0.bn1.running_var",
        "neck.lateral_convs.3.conv.weight",
        "neck.fpn_convs.0.conv.bias",
    ],
    "decoupled_solo": [
        "bbox_head.ins_convs_x.0.conv.weight",
        "bbox_head.ins_convs_y.1.gn.bias",
        "bbox_head.dsolo_ins_list_x.4.weight",
        "bbox_head.dsolo_ins_list_y.0.bias",
        "bbox_head.dsolo_cate.weight",
    ],
    "decoupled_solo_light": ["bbox_head.ins_convs.0.conv.weight", "bbox_head.dsolo_cate.bias"],
    "solov2": [
        "bbox_head.kernel_convs.2.conv.weight",
        "bbox_head.solo_kernel.weight",
        "bbox_head.solo_cate.bias",
        "mask_feat_head.convs_all_levels.0.conv0.conv.weight",
        "mask_feat_head.convs_all_levels.3.conv2.gn.bias",
        "mask_feat_head.conv_pred.0.conv.weight",
        "mask_feat_head.conv_pred.0.gn.weight",
    ],
}
ADELAIDET_NAMES = [
    "backbone.bottom_up.stem.conv1.weight",
    "backbone.bottom_up.stem.conv1.norm.running_var",
    "backbone.bottom_up.res2.0.conv1.norm.weight",
    "backbone.bottom_up.res3.0.shortcut.weight",
    "backbone.bottom_up.res5.1.conv2.norm.bias",
    "backbone.bottom_up.res4.0.shortcut.norm.running_mean",
    "backbone.fpn_lateral2.weight",
    "backbone.fpn_output5.bias",
    "ins_head.cate_tower.0.weight",  # conv 0
    "ins_head.cate_tower.4.bias",  # GroupNorm of conv 1 (Sequential: conv, GN, ReLU, ...)
    "ins_head.kernel_tower.6.weight",
    "ins_head.kernel_tower.7.weight",
    "ins_head.cate_pred.bias",
    "ins_head.kernel_pred.weight",
    "mask_head.convs_all_levels.0.conv0.0.weight",
    "mask_head.convs_all_levels.3.conv2.1.bias",
    "mask_head.conv_pred.0.weight",
    "mask_head.conv_pred.1.bias",
]


def test_the_names_of_the_authors_and_adelaidet_code(project_states):
    for model, names in AUTHORS_NAMES.items():
        there = set(zoo.from_project_keys(project_states[model], "solo_authors"))
        assert set(names) <= there, set(names) - there
        assert not any(k.startswith(("head.", "backbone.net.")) for k in there)
    there = set(zoo.from_project_keys(project_states["solov2"], "adelaidet"))
    assert set(ADELAIDET_NAMES) <= there, set(ADELAIDET_NAMES) - there
    assert not any(k.startswith(("head.", "backbone.net.")) for k in there)


def test_the_maps_are_one_to_one_and_invert(project_states):
    for model, state in project_states.items():
        for fmt in ("mmdet", "solo_authors", "adelaidet"):
            if fmt == "adelaidet" and not model.startswith("solov2"):
                continue
            there = zoo.from_project_keys(state, fmt)
            assert len(there) == len(state)
            assert list(zoo.to_project_keys(there, fmt)) == list(state), (model, fmt)


def reference_files() -> list[Path]:
    return sorted(REFERENCE.glob("*.json"))


def test_the_reference_data_covers_the_released_models():
    assert {p.stem for p in reference_files()} == set(REFERENCE_MODELS)


@pytest.mark.parametrize("name", sorted(REFERENCE_MODELS))
def test_mmdetections_own_keys_map_one_to_one_onto_the_released_config(name):
    """Every key of mmdetection's state dict (recorded from the model its config builds) lands
    on this project's model that `released_config` builds, with the same shape."""
    record = json.loads((REFERENCE / f"{name}.json").read_text())
    shapes = record["state_dict_shapes"]
    weights = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    state = {"meta": {}, "state_dict": weights}
    assert zoo.detect_format(state, name) == "mmdet"
    cfg = zoo.released_config(state, "mmdet", name)
    assert (cfg.model, cfg.depth) == REFERENCE_MODELS[name]
    assert cfg.num_grids == (40, 36, 24, 16, 12) and cfg.fpn_channels == 256
    with torch.device("meta"):
        own = build_model(cfg, 80).state_dict()
    mapped = zoo.to_project_keys(weights, "mmdet")
    counters = {k for k in mapped if k.endswith("num_batches_tracked")}  # frozen BN: none
    assert set(mapped) - counters == set(own)
    assert all(tuple(mapped[k].shape) == tuple(own[k].shape) for k in own)
    assert set(zoo.from_project_keys(own, "mmdet")) == set(shapes) - {
        zoo.rename_key(k, zoo.MMDET_RULES, to_project=False) for k in counters
    }


# --------------------------------------------------------------------------------------------
# refusals: strict loading, unknown layouts, pickled code, ResNeXt and DCN
# --------------------------------------------------------------------------------------------


def test_a_missing_key_is_one_error_naming_it_and_the_layout(tmp_path, project_states):
    file = layout_file(project_states["solo"], "mmdet")
    del file["state_dict"]["mask_head.mask_convs.1.gn.weight"]
    with pytest.raises(ModelFileError) as err:
        zoo.load_released(saved(tmp_path, file))
    message = str(err.value)
    assert "read as an mmdetection 2.x/3.x checkpoint" in message
    assert (
        "missing 1 ('mask_head.mask_convs.1.gn.weight' (ours head.mask_convs.1.1.weight))"
        in message
    )
    assert "unexpected" not in message and "mis-shaped" not in message


def test_an_unexpected_key_is_one_error_naming_it(tmp_path, project_states):
    file = layout_file(project_states["solov2_light"], "solo_authors")
    file["state_dict"]["bbox_head.extra_conv.weight"] = torch.zeros(3)
    file["state_dict"]["bbox_head.other.bias"] = torch.zeros(3)
    with pytest.raises(ModelFileError) as err:
        zoo.load_released(saved(tmp_path, file))
    message = str(err.value)
    assert "WXinlong/SOLO" in message and "unexpected 2 (" in message
    assert "'bbox_head.extra_conv.weight'" in message and "missing" not in message


def test_a_wrong_shape_is_one_error_naming_both_shapes(tmp_path, project_states):
    file = layout_file(project_states["solov2"], "adelaidet")
    file["model"]["mask_head.conv_pred.1.weight"] = torch.ones(16)
    with pytest.raises(ModelFileError) as err:
        zoo.load_released(saved(tmp_path, file))
    message = str(err.value)
    assert "AdelaiDet" in message
    assert "mis-shaped 1 ('mask_head.conv_pred.1.weight' (16,) for (32,))" in message


def test_an_unknown_layout_names_the_file_and_its_first_keys(tmp_path):
    path = saved(
        tmp_path, {"state_dict": {"encoder.w": torch.zeros(1), "decoder.w": torch.zeros(1)}}
    )
    with pytest.raises(
        ModelFileError, match=r"not a SOLO checkpoint layout .*'encoder\.w', 'decoder\.w'"
    ):
        zoo.load_released(path)
    with pytest.raises(ModelFileError, match="holds a list"):
        zoo.load_released(saved(tmp_path, [torch.zeros(1)], "list.pt"))
    bare = {"backbone.net.body.conv1.weight": torch.zeros(1), "head.cate_out.bias": torch.zeros(1)}
    with pytest.raises(ModelFileError, match="without the config"):
        zoo.load_released(saved(tmp_path, bare, "bare.pt"))
    with pytest.raises(FileNotFoundError):
        zoo.load_released(tmp_path / "absent.pth")


class Payload:
    """A pickle that would create a file when unpickled without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_file_with_a_pickled_object_is_refused_unrun(tmp_path, project_states):
    marker = tmp_path / "ran"
    file = layout_file(project_states["solo"], "mmdet")
    file["meta"]["hook"] = Payload(marker)
    with pytest.raises(ModelFileError, match="refused: its pickle asks for .*weights_only=True"):
        zoo.load_released(saved(tmp_path, file))
    assert not marker.exists()


def meta_state(state: dict, fmt: str) -> dict:
    """`state` in layout `fmt`, as shapes only (meta tensors): for released_config."""
    return {
        k: torch.empty(v.shape, device="meta") for k, v in zoo.from_project_keys(state, fmt).items()
    }


def test_dcn_and_resnext_models_are_refused_with_one_line(project_states):
    weights = meta_state(project_states["solov2"], "mmdet")
    dcn = dict(
        weights, **{"mask_head.kernel_convs.0.conv.conv_offset.weight": torch.empty(27, 64, 3, 3)}
    )
    with pytest.raises(ModelFileError, match="deformable convolutions .*not supported"):
        zoo.released_config({"state_dict": dcn}, "mmdet", "dcn.pth")
    with torch.device("meta"):
        resnet50 = build_model(small_config("solov2", depth=50), 5).state_dict()
    resnext = meta_state(resnet50, "mmdet")
    resnext["backbone.layer1.0.conv2.weight"] = torch.empty(128, 4, 3, 3)  # 32 groups
    with pytest.raises(ModelFileError, match="ResNeXt .*not supported"):
        zoo.released_config({"state_dict": resnext}, "mmdet", "x101.pth")
    weights = {k: v for k, v in weights.items() if not k.startswith("backbone.layer4.1.")}
    with pytest.raises(ModelFileError, match=r"\(2, 2, 2, 1\) basic blocks"):
        zoo.released_config({"state_dict": weights}, "mmdet", "odd.pth")


def test_the_depth_and_grids_are_read_off_the_shapes(project_states):
    with torch.device("meta"):
        r34 = build_model(small_config("solo", depth=34), 5).state_dict()
        r101 = build_model(small_config("decoupled_solo", depth=101), 5).state_dict()
    cfg = zoo.released_config({"state_dict": meta_state(r34, "mmdet")}, "mmdet", "r34")
    assert (cfg.model, cfg.depth, cfg.num_grids) == ("solo", 34, GRIDS)
    cfg = zoo.released_config({"state_dict": meta_state(r101, "solo_authors")}, "solo_authors", "")
    assert (cfg.model, cfg.depth, cfg.num_grids) == ("decoupled_solo", 101, GRIDS)


# --------------------------------------------------------------------------------------------
# AdelaiDet's input convention and strides
# --------------------------------------------------------------------------------------------


def test_folding_detectron2s_input_into_the_first_conv_is_exact():
    torch.manual_seed(0)
    rgb = torch.randint(0, 256, (1, 3, 20, 24)).double()  # an image, 0..255
    weight = torch.randn(8, 3, 7, 7, dtype=torch.float64)
    bgr_mean = torch.tensor(zoo.DETECTRON2_PIXEL_MEAN_BGR, dtype=torch.float64).view(1, 3, 1, 1)
    bgr = rgb.flip(1) - bgr_mean  # detectron2's input: BGR, 0..255, minus the mean, std 1
    theirs = F.conv2d(bgr, weight, stride=2, padding=3)
    mean = torch.tensor(zoo.IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(zoo.IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    ours = F.conv2d(
        (rgb / 255 - mean) / std, zoo.fold_detectron2_input(weight), stride=2, padding=3
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-8)


def flat(outputs) -> list[torch.Tensor]:
    """The tensors of nested lists / tuples of tensors, in order."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    return [t for item in outputs for t in flat(item)]


def test_adelaidet_resnet50_strides_in_the_1x1_convs_and_converts(tmp_path):
    cfg = small_config("solov2", depth=50, stacked_convs=3)
    state = filled_state(cfg)
    path = saved(tmp_path, layout_file(state, "adelaidet"))
    net, _, loaded_cfg = zoo.load_released(path)
    assert loaded_cfg.depth == 50 and loaded_cfg.stride_in_1x1
    assert_same_tensors(net, state, "adelaidet")
    block = net.backbone.net.body.layer3[0]
    assert (block.conv1.stride, block.conv2.stride) == ((2, 2), (1, 1))
    # The block is detectron2's: conv1 (1x1, stride 2) -> conv2 (3x3) -> conv3, + shortcut.
    x = torch.randn(1, 512, 16, 16)
    with torch.no_grad():
        y = F.relu(block.bn1(F.conv2d(x, block.conv1.weight, stride=2)))
        y = F.relu(block.bn2(F.conv2d(y, block.conv2.weight, padding=1)))
        y = block.bn3(F.conv2d(y, block.conv3.weight)) + block.downsample(x)
        torch.testing.assert_close(block(x), F.relu(y))
    # The config records it, so this project's checkpoint rebuilds the same network.
    out = convert_checkpoint.main([str(path), "--out", str(tmp_path / "out.pt")])
    converted, conv_cfg, _ = load_model(out, "cpu")
    assert conv_cfg == loaded_cfg
    block = converted.backbone.net.body.layer3[0]
    assert (block.conv1.stride, block.conv2.stride) == ((2, 2), (1, 1))
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ours, theirs = converted.network(images), net.network(images)
    assert all(torch.equal(a, b) for a, b in zip(flat(ours), flat(theirs), strict=True))


# --------------------------------------------------------------------------------------------
# convert_checkpoint.py
# --------------------------------------------------------------------------------------------


def test_convert_checkpoint_round_trip_predicts_the_same(tmp_path, project_states):
    src = saved(tmp_path, layout_file(project_states["solov2"], "mmdet", classes=list("abcde")))
    out = convert_checkpoint.main([str(src), "--out", str(tmp_path / "conv" / "solov2.pt")])
    released, names, cfg = zoo.load_released(src)
    assert not cfg.stride_in_1x1  # torchvision's ResNet: strides in the 3x3 convs
    converted, conv_cfg, conv_names = load_model(out, "cpu")
    assert conv_cfg == cfg and conv_names == names == tuple("abcde")
    assert zoo.detect_format(torch.load(out, weights_only=True), out) == "project"
    torch.manual_seed(0)
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        (ours,), (theirs,) = converted.predict(images), released.predict(images)
    assert ours["labels"].numel() > 0
    for key in ("masks", "labels", "scores"):
        assert torch.equal(ours[key], theirs[key]), key


def test_convert_checkpoint_says_what_is_wrong_in_one_line(tmp_path, capsys):
    bad = saved(tmp_path, {"state_dict": {"x": torch.zeros(1)}}, "bad.pth")
    with pytest.raises(SystemExit) as exit_info:
        run(convert_checkpoint.main, [str(bad), "--out", str(tmp_path / "o.pt")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a SOLO checkpoint layout" in err


# --------------------------------------------------------------------------------------------
# the fill and the reference image
# --------------------------------------------------------------------------------------------


def test_fill_tensor_is_a_fixed_function_of_name_shape_and_seed():
    a = zoo.fill_tensor("neck.fpn_convs.0.conv.bias", (4,), 0)
    assert torch.equal(a, zoo.fill_tensor("neck.fpn_convs.0.conv.bias", (4,), 0))
    assert not torch.equal(a, zoo.fill_tensor("neck.fpn_convs.0.conv.bias", (4,), 1))
    assert not torch.equal(a, zoo.fill_tensor("neck.fpn_convs.1.conv.bias", (4,), 0))
    # Pinned: the reference files were made with these values (sha256 seeds, torch's CPU
    # generator); a change here invalidates tests/data/mmdet_reference/.
    pinned = [-0.01417536, 0.05071477, 0.08403125, -0.08131261]
    torch.testing.assert_close(a, torch.tensor(pinned), rtol=0, atol=1e-7)


def test_fill_tensor_values_keep_a_random_network_sensitive():
    conv = zoo.fill_tensor("backbone.layer3.0.conv2.weight", (256, 256, 3, 3), 0)
    assert abs(conv.std().item() * (256 * 9) ** 0.5 - 1) < 0.02 and abs(conv.mean()) < 1e-3
    kernel = zoo.fill_tensor("mask_head.conv_kernel.weight", (256, 512, 3, 3), 0)
    assert abs(kernel.std().item() - (8 / (256 * 512 * 9)) ** 0.5) < 1e-4
    var = zoo.fill_tensor("backbone.bn1.running_var", (1000,), 0)
    assert 0.5 <= var.min() and var.max() <= 1.5
    gn = zoo.fill_tensor("mask_head.cls_convs.0.gn.weight", (1000,), 0)
    assert 0.9 <= gn.min() < 0.92 and 1.08 < gn.max() <= 1.1
    bias = zoo.fill_tensor("mask_head.cls_convs.0.gn.bias", (1000,), 0)
    assert bias.abs().max() <= 0.1
    for name in ("mask_head.conv_cls.bias", "bbox_head.solo_cate.bias", "ins_head.cate_pred.bias"):
        cate = zoo.fill_tensor(name, (80,), 0)
        assert (cate - zoo.FILL_CATE_BIAS).abs().max() <= 0.25
    counter = zoo.fill_tensor("backbone.bn1.num_batches_tracked", (), 0)
    assert counter.dtype == torch.int64 and counter.item() == 0


def test_fill_project_model_gives_each_tensor_its_mmdet_names_value():
    net = build_model(small_config("solov2", stacked_convs=3), 80)
    zoo.fill_project_model(net, "mmdet", seed=3)
    pairs = {
        "backbone.net.body.layer1.0.conv1.weight": "backbone.layer1.0.conv1.weight",
        "backbone.net.body.bn1.running_var": "backbone.bn1.running_var",
        "backbone.net.fpn.inner_blocks.2.0.bias": "neck.lateral_convs.2.conv.bias",
        "head.cate_out.bias": "mask_head.conv_cls.bias",
        "head.kernel_convs.2.1.weight": "mask_head.kernel_convs.2.gn.weight",
        "head.mask_feat_branch.level_convs.3.2.0.weight": (
            "mask_head.mask_feature_head.convs_all_levels.3.conv2.conv.weight"
        ),
        "head.mask_feat_branch.out.1.bias": "mask_head.mask_feature_head.conv_pred.gn.bias",
    }
    state = net.state_dict()
    for ours, theirs in pairs.items():
        assert torch.equal(state[ours], zoo.fill_tensor(theirs, state[ours].shape, 3)), ours


def test_reference_image_is_fixed_and_needs_no_resize_or_padding():
    img = zoo.reference_image()
    assert img.shape == (800, 1216, 3) and img.dtype.name == "uint8"
    assert (img == zoo.reference_image()).all()
    assert len({tuple(p) for p in img[::8, ::8].reshape(-1, 3)}) > 1000  # gradients, shapes
    assert 800 % 32 == 0 and 1216 % 32 == 0 and min(1333 / 1216, 800 / 800) == 1.0
    small = zoo.reference_image(448, 768)
    assert small.shape == (448, 768, 3) and tuple(small[290, 537]) == (30, 200, 60)  # the disc
