"""Fine-tuning from a released model (`main_train.py --init-from`, zoo.finetune_config and
zoo.init_from_file): the run's architecture and test settings are the file's unless a flag is
given, the fine-tuning schedule, every tensor from the file but the category output conv (at
the head's prior init, or the file's rows of the data's classes with --keep-classes), frozen
batch norm, the errors, and a tiny run that trains, resumes without the file and is read back.

The released file is this project's SOLOv2-light ResNet-18 with a narrow head and random
weights, in mmdetection's layout (tests/test_zoo.py's helpers).
"""

import math
import shutil
from dataclasses import replace

import pytest
import torch
from PIL import Image
from test_zoo import filled_state, layout_file, small_config
from torchvision.ops import FrozenBatchNorm2d

import config
import main_infer
import main_train
import resume_train
import training
import zoo
from errors import DataError, ModelFileError
from model import build_model, load_checkpoint, load_model

FILE_CLASSES = ("cat", "animal", "dog", "person", "vehicle")
DATA_CLASSES = ["vehicle", "person", "animal"]  # the built-in data's, in label order
CATE = ("head.cate_out.weight", "head.cate_out.bias")
# A tiny run on the built-in data: seconds per epoch on two CPU cores.
TINY_RUN = ["--num-images", "24", "--input-size", "64", "96", "--batch-size", "4"]
TINY_RUN += ["--num-workers", "0", "--log-every", "1"]


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """(path of an mmdetection-layout file, its weights under this project's names)."""
    state = filled_state(small_config("solov2_light"), classes=len(FILE_CLASSES))
    path = tmp_path_factory.mktemp("released") / "solov2_light_r18.pth"
    torch.save(layout_file(state, "mmdet", classes=list(FILE_CLASSES)), path)
    return path, state


def finetune(argv: list[str]) -> config.Config:
    """What main_train.py makes of `argv` (on the cpu preset)."""
    args = main_train.build_parser().parse_args(["--preset", "cpu", *argv])
    return zoo.finetune_config(*config.config_and_given(args))


def new_run(cfg: config.Config, class_names: list[str]):
    """The model `training.build_training` makes for a new run of `cfg` on the CPU."""
    run = training.RunState(class_names=list(class_names))
    procs = training.Processes(rank=0, world=1, device=torch.device("cpu"))
    model, _, optimizer, _ = training.build_training(cfg, run, None, procs)
    return model, optimizer


# --------------------------------------------------------------------------------------------
# the run's config
# --------------------------------------------------------------------------------------------


def test_the_architecture_and_test_settings_come_from_the_file(released):
    cfg = finetune(["--init-from", str(released[0])])
    # The cpu preset's SOLOv2 (width 32, towers 2 x 64, E 128, stride-2 masks) gave way.
    assert (cfg.model, cfg.depth, cfg.backbone_width) == ("solov2_light", 18, 64)
    assert cfg.fpn_channels == 64
    assert (cfg.seg_feat_channels, cfg.stacked_convs) == (64, 2)
    assert (cfg.kernel_channels, cfg.mask_feat_channels, cfg.mask_loss_stride) == (32, 32, 4)
    assert cfg.num_grids == zoo.RELEASED_SOLOV2_GRIDS
    assert cfg.scale_ranges == zoo.RELEASED_SCALE_RANGES["solov2_light"]
    assert cfg.input_size == (448, 768)  # SOLOv2-light's released test input
    assert (cfg.cate_thresh, cfg.ins_thresh) == (0.1, 0.5)
    assert (cfg.pre_nms_num, cfg.keep_instance) == (500, 100)
    assert cfg.norm == "frozen_bn" and cfg.backbone_weights == ""
    assert not cfg.cis680_classes  # a COCO json keeps its categories (the preset maps them)


def test_a_given_flag_wins_and_a_given_input_rescales_the_files_ranges(released):
    argv = ["--init-from", str(released[0]), "--input-size", "64", "96"]
    cfg = finetune([*argv, "--keep-instance", "7", "--norm", "bn"])
    assert (cfg.input_size, cfg.keep_instance, cfg.norm) == ((64, 96), 7, "bn")
    # SOLOv2-light's ranges, made for a 448 short side, at 64: x 1/7 (a lower bound 1 stays).
    assert cfg.scale_ranges == ((1, 8), (4, 16), (8, 32), (16, 64), (32, 128))
    assert cfg.model == "solov2_light" and cfg.pre_nms_num == 500  # the rest from the file
    given_ranges = finetune([*argv, "--scale-ranges", "1,9", "5,17", "9,33", "17,65", "33,99"])
    assert given_ranges.scale_ranges == ((1, 9), (5, 17), (9, 33), (17, 65), (33, 99))


def test_the_fine_tuning_schedule_unless_given(released):
    path = str(released[0])
    cfg = finetune(["--init-from", path])
    assert (cfg.optimizer, cfg.momentum, cfg.weight_decay) == ("sgd", 0.9, 1e-4)
    assert cfg.grad_clip == 35.0
    assert cfg.batch_size == 2 and cfg.lr == pytest.approx(0.01 * 2 / 16)
    assert (cfg.epochs, cfg.lr_schedule, cfg.lr_steps) == (12, "step", (9, 12))
    assert (cfg.warmup_iters, cfg.warmup_ratio) == (100, 0.001)
    assert (cfg.time_budget_min, cfg.kernel_lr_mult) == (0.0, 1.0)  # the cpu preset's 19, 0.25
    # The lr follows a given batch, the steps a given epoch count; given values stay.
    scaled = finetune(["--init-from", path, "--batch-size", "8", "--epochs", "4"])
    assert scaled.lr == pytest.approx(0.005) and scaled.lr_steps == (4, 5)
    assert zoo.finetune_lr_steps(12) == (9, 12)  # mmdetection's 1x: / 10 after 8 and 11
    kept = finetune(["--init-from", path, "--lr", "0.02", "--lr-steps", "3", "--epochs", "5"])
    assert (kept.lr, kept.lr_steps, kept.epochs) == (0.02, (3,), 5)
    adam = finetune(["--init-from", path, "--optimizer", "adamw"])
    assert adam.optimizer == "adamw" and adam.batch_size == 2
    plain = config.preset("cpu")
    assert zoo.finetune_config(plain, ()) is plain  # no init_from: nothing changes


def test_keep_classes_needs_init_from_and_init_from_replaces_backbone_weights():
    with pytest.raises(ValueError, match="keep_classes needs init_from"):
        finetune(["--keep-classes"])
    with pytest.raises(ValueError, match="init_from and backbone_weights"):
        finetune(["--init-from", "x.pth", "--backbone-weights", "imagenet"])


def test_adelaidet_resnet50_fine_tunes_with_its_strides_in_the_1x1_convs(tmp_path):
    state = build_model(small_config("solov2", depth=50, stacked_convs=3), 5).state_dict()
    path = tmp_path / "adelaidet_r50.pth"
    torch.save(layout_file(state, "adelaidet"), path)
    cfg = finetune(["--init-from", str(path), "--input-size", "64", "96"])
    assert cfg.stride_in_1x1 and cfg.depth == 50
    model, _ = new_run(cfg, DATA_CLASSES)
    block = model.backbone.net.body.layer2[0]
    assert (block.conv1.stride, block.conv2.stride) == ((2, 2), (1, 1))
    # The run's weights are the file's (fill_tensor's, not the init's), in the same network.
    first = "backbone.net.body.layer2.0.conv1.weight"
    assert torch.equal(model.state_dict()[first], state[first])


# --------------------------------------------------------------------------------------------
# the weights of a new run
# --------------------------------------------------------------------------------------------


def test_a_new_run_holds_the_files_tensors_but_the_category_output(released):
    path, state = released
    cfg = finetune(["--init-from", str(path), "--input-size", "64", "96"])
    model, optimizer = new_run(cfg, DATA_CLASSES)
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for key, value in loaded.items():
        if key not in CATE:
            assert torch.equal(value, state[key]), key
    # The category conv as the head initialises it: normal(0, 0.01), bias the focal prior.
    weight, bias = loaded["head.cate_out.weight"], loaded["head.cate_out.bias"]
    assert weight.shape == (3, 64, 3, 3) and bias.shape == (3,)
    assert abs(weight.std().item() - 0.01) < 0.001 and abs(weight.mean().item()) < 0.001
    assert torch.allclose(bias, torch.full((3,), -math.log(99)))

    # Batch norm frozen, the stem and layer1 too (as with ImageNet weights); the rest trains.
    body = model.backbone.net.body
    norms = [m for m in body.modules() if "Norm" in type(m).__name__]
    assert norms and all(isinstance(m, FrozenBatchNorm2d) for m in norms)
    assert not any(p.requires_grad for p in [*body.conv1.parameters(), *body.layer1.parameters()])
    assert all(p.requires_grad for p in body.layer2.parameters())
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert id(body.conv1.weight) not in trained and id(body.layer2[0].conv1.weight) in trained


def test_the_printed_line_names_the_reinitialised_layer(released, capsys):
    cfg = finetune(["--init-from", str(released[0]), "--input-size", "64", "96"])
    new_run(cfg, DATA_CLASSES)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == (
        f"init from {released[0]}: every layer loaded but head.cate_out, re-initialised "
        "(normal(0, 0.01), prior bias) for the data's 3 classes"
    )


def test_keep_classes_takes_the_files_rows_of_the_data_classes(released, capsys):
    path, state = released
    cfg = finetune(["--init-from", str(path), "--keep-classes", "--input-size", "64", "96"])
    model, _ = new_run(cfg, DATA_CLASSES)
    rows = [4, 3, 1]  # vehicle, person, animal in FILE_CLASSES
    for key in CATE:
        assert torch.equal(model.state_dict()[key], state[key][rows]), key
    assert zoo.class_rows(FILE_CLASSES, DATA_CLASSES, "f") == rows
    # A COCO json's "traffic light" is mmdetection 1.x's "traffic_light".
    assert zoo.class_rows(("car", "traffic_light"), ("Traffic Light", "car"), "f") == [1, 0]
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "file's rows of vehicle, person, animal" in line


def test_a_class_the_file_lacks_is_one_error_naming_it(released):
    cfg = finetune(["--init-from", str(released[0]), "--keep-classes", "--input-size", "64", "96"])
    with pytest.raises(DataError, match=r"'truck', 'bus' are not \(the file has 5 \('cat'"):
        new_run(cfg, ["vehicle", "truck", "bus"])


def test_a_flag_that_changes_the_architecture_is_one_error_naming_the_keys(released):
    cfg = finetune(["--init-from", str(released[0]), "--fpn-channels", "32"])
    with pytest.raises(ModelFileError, match=r"mis-shaped .*neck\..*leave out the flags"):
        new_run(cfg, DATA_CLASSES)


# --------------------------------------------------------------------------------------------
# a tiny fine-tuning run
# --------------------------------------------------------------------------------------------


def test_a_tiny_fine_tune_trains_resumes_without_the_file_and_is_read_back(
    data_root, released, tmp_path
):
    path, state = released
    copy = tmp_path / "copy.pth"
    shutil.copy(path, copy)
    cfg = finetune(["--init-from", str(copy), *TINY_RUN, "--epochs", "2"])
    cfg = replace(cfg, out=str(tmp_path / "run"))
    training.train(cfg, stop_after_epoch=1)
    copy.unlink()  # a resumed run takes its weights from the checkpoint, not the file
    resume_train.main([cfg.out])

    checkpoint = load_checkpoint(cfg.out)
    assert checkpoint["epoch"] == 2 and checkpoint["config"]["init_from"] == str(copy)
    assert checkpoint["history"] and all(math.isfinite(r["total"]) for r in checkpoint["history"])
    key = "backbone.net.body.layer4.1.conv2.weight"
    assert not torch.equal(checkpoint["model"][key], state[key])  # it trained
    stem = "backbone.net.body.conv1.weight"
    assert torch.equal(checkpoint["model"][stem], state[stem])  # frozen

    model, run_cfg, names = load_model(cfg.out, "cpu")
    assert run_cfg.model == "solov2_light" and names == tuple(DATA_CLASSES)
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (120, 90), (100, 150, 200)).save(photos / "a.png")
    out = tmp_path / "infer"
    main_infer.main(["--checkpoint", cfg.out, "--images", str(photos), "--out", str(out)])
    assert (out / "results.json").is_file()

    # This project's run folder is a file to fine-tune from too: its config, its weights.
    again = finetune(["--init-from", cfg.out])
    assert (again.model, again.input_size) == ("solov2_light", (64, 96))
    assert again.num_grids == zoo.RELEASED_SOLOV2_GRIDS
    model, _ = new_run(again, ["vehicle", "person"])
    for key, value in model.state_dict().items():
        if key not in CATE:
            assert torch.equal(value, checkpoint["model"][key]), key
