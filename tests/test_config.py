"""Config flags, presets and the checkpoint round trip of the config."""

import argparse
import dataclasses

import pytest
import torch

from config import (
    CIS680,
    CPU,
    MODEL_DEFAULTS,
    MODELS,
    RETIRED_FIELDS,
    Config,
    add_config_args,
    config_and_given,
    config_from_args,
    config_from_dict,
    config_to_dict,
    model_config,
    scale_ranges_for,
)
from model import config_of, load_checkpoint


def parse(argv):
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    return config_from_args(parser.parse_args(argv))


def test_handout_defaults_live_in_the_dataclass():
    cfg = Config()
    assert cfg.num_grids == (40, 36, 24, 16, 12)
    assert cfg.strides == (8, 8, 16, 32, 32)
    assert cfg.scale_ranges[0] == (1, 96) and cfg.scale_ranges[-1] == (384, 2048)
    assert cfg.lr == pytest.approx(0.01 * 2 / 16)  # 0.01 x batch / 16 (hand-out 7.1)
    assert CIS680.input_size == (800, 1066) and CIS680.lr_steps == (27, 33)


def test_flags_override_the_preset_and_keep_the_rest():
    cfg = parse(["--preset", "cpu", "--num-grids", "12", "10", "8", "6", "4", "--no-augment"])
    assert cfg.num_grids == (12, 10, 8, 6, 4)
    assert cfg.augment is False
    assert cfg.depth == CPU.depth and cfg.preset == "cpu"


def test_config_and_given_names_exactly_the_flags_given():
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    argv = ["--preset", "cpu", "--model", "solo", "--no-augment", "--input-size", "96", "128"]
    cfg, given = config_and_given(parser.parse_args(argv))
    assert given == {"model", "augment", "input_size"}  # not the preset, not what followed
    assert cfg == parse(argv) and cfg.scale_ranges != CPU.scale_ranges  # rescaled, not given
    assert config_and_given(parser.parse_args([]))[1] == frozenset()


def test_scale_range_pairs_parse():
    cfg = parse(["--preset", "cis680", "--scale-ranges", "1,9", "5,20", "10,40", "20,80", "40,999"])
    assert cfg.scale_ranges == ((1, 9), (5, 20), (10, 40), (20, 80), (40, 999))


def test_scale_ranges_follow_a_new_input_size_unless_given():
    # the ranges are in input pixels: twice the input side, twice the ranges
    doubled = ((1, 48), (24, 96), (48, 192), (96, 384), (192, 4096))
    assert parse(["--preset", "cpu", "--input-size", "384", "512"]).scale_ranges == doubled
    assert scale_ranges_for(CPU.scale_ranges, (192, 256), (384, 512)) == doubled
    # the hand-out's ranges belong to 800 x 1066; at 192 x 256 they are x 0.24 (the CPU
    # preset rounds these to 24, 48, 96, 192 and leaves the coarsest level open at 2048)
    assert scale_ranges_for(CIS680.scale_ranges, (800, 1066), (192, 256)) == (
        (1, 23), (12, 46), (23, 92), (46, 184), (92, 492)
    )  # fmt: skip
    given = parse(["--preset", "cpu", "--input-size", "384", "512", "--scale-ranges", "1,9",
                   "5,20", "10,40", "20,80", "40,999"])  # fmt: skip
    assert given.scale_ranges == ((1, 9), (5, 20), (10, 40), (20, 80), (40, 999))
    assert parse(["--preset", "cpu"]).scale_ranges == CPU.scale_ranges
    # a light model's ranges are made for its own 448 input: 896 doubles them
    light = parse(["--preset", "cis680", "--model", "solov2_light", "--input-size", "896", "1194"])
    assert light.scale_ranges == ((1, 112), (56, 224), (112, 448), (224, 896), (448, 1792))


def test_inconsistent_levels_are_refused():
    with pytest.raises(ValueError, match="one entry per pyramid level"):
        parse(["--preset", "cis680", "--num-grids", "40", "36"])


def test_stride_in_1x1_needs_a_bottleneck_resnet():
    with pytest.raises(ValueError, match="stride_in_1x1 needs a bottleneck ResNet"):
        parse(["--preset", "cpu", "--stride-in-1x1"])  # the cpu preset's ResNet-18
    assert parse(["--preset", "cis680", "--stride-in-1x1"]).stride_in_1x1  # ResNet-50
    # A checkpoint's config from before the field: torchvision's strides, as it was trained.
    data = config_to_dict(CIS680)
    del data["stride_in_1x1"]
    assert not config_from_dict(data).stride_in_1x1


def test_dict_round_trip_is_exact():
    for cfg in (CIS680, CPU):
        assert config_from_dict(config_to_dict(cfg)) == cfg


def test_unknown_checkpoint_field_is_an_error():
    data = config_to_dict(CPU)
    data["from_the_future"] = 1
    with pytest.raises(ValueError, match="from_the_future"):
        config_from_dict(data)


def test_an_old_checkpoint_config_with_retired_fields_still_loads():
    # Written before `cpu_bf16` became `amp` and `channels_last` went (the CPU preset's then).
    data = {**config_to_dict(CPU), "cpu_bf16": True, "channels_last": False}
    assert set(RETIRED_FIELDS) == {"cpu_bf16", "channels_last"}
    assert not set(RETIRED_FIELDS) & {f.name for f in dataclasses.fields(Config)}
    assert config_from_dict(data) == CPU
    with pytest.raises(ValueError, match=r"unknown fields \['from_the_future'\]"):
        config_from_dict({**data, "from_the_future": 1})  # only the retired ones are dropped


def test_an_old_checkpoint_file_with_retired_fields_loads(tmp_path):
    path = tmp_path / "last.pt"
    old_config = {**config_to_dict(CPU), "cpu_bf16": True, "channels_last": False}
    torch.save({"config": old_config, "model": {}, "class_names": ["a"]}, path)
    assert config_of(load_checkpoint(path)) == CPU


def test_model_config_is_what_the_model_flag_builds():
    assert model_config(CIS680, "solov2") == parse(["--preset", "cis680", "--model", "solov2"])
    solov2 = model_config(CIS680, "solov2")
    assert (solov2.model, solov2.seg_feat_channels, solov2.stacked_convs) == ("solov2", 512, 4)
    assert (solov2.cate_thresh, solov2.pre_nms_num, solov2.keep_instance) == (0.1, 500, 100)
    # what dataclasses.replace builds instead: SOLOv2 with SOLO's towers and post-processing
    assert dataclasses.replace(CIS680, model="solov2") != solov2
    for preset_name, base in (("cis680", CIS680), ("cpu", CPU)):
        for model in MODELS:
            flags = ["--preset", preset_name, "--model", model]
            assert model_config(base, model) == parse(flags), (preset_name, model)
    assert model_config(CPU, "solov2_light").kernel_channels == 64  # the cpu preset's light E
    assert MODEL_DEFAULTS["cpu"]["solov2_light"] == {"kernel_channels": 64}


def test_model_config_keeps_the_given_fields_and_rescales_ranges_for_a_given_input():
    # a field the caller set on purpose wins over the model's default
    changed = dataclasses.replace(CIS680, stacked_convs=3)
    assert model_config(changed, "solov2", given={"stacked_convs"}).stacked_convs == 3
    assert model_config(changed, "solov2").stacked_convs == 4  # not given: the model's
    # the light model's ranges are made for its 448 input: at 896 they double, as the flags do
    big = dataclasses.replace(CIS680, input_size=(896, 1194))
    light = model_config(big, "solov2_light", given={"input_size"})
    assert light.input_size == (896, 1194)
    assert light.scale_ranges == ((1, 112), (56, 224), (112, 448), (224, 896), (448, 1792))
    flags = ["--preset", "cis680", "--model", "solov2_light", "--input-size", "896", "1194"]
    assert light == parse(flags)
    # a model without its own ranges: the preset's, made for the preset's input
    small = dataclasses.replace(CPU, input_size=(384, 512))
    doubled = ((1, 48), (24, 96), (48, 192), (96, 384), (192, 4096))
    assert model_config(small, "solo", given={"input_size"}).scale_ranges == doubled


def test_augmentation_settings_reach_train_augment():
    from dataset import augmentation

    cfg = parse(["--preset", "cpu", "--aug-scale", "1", "1", "--aug-color", "0"])
    aug = augmentation(cfg)
    assert aug.scale_range == (1.0, 1.0) and aug.brightness == 0.0 and aug.contrast == 0.0
    assert augmentation(parse(["--preset", "cpu", "--no-augment"])) is None
    assert augmentation(parse(["--preset", "cpu", "--overfit", "4"])) is None


@pytest.mark.parametrize(
    "argv, field",
    [
        (["--aug-scale", "1.2", "0.8"], "aug_scale"),
        (["--aug-color", "1.5"], "aug_color"),
        (["--mask-loss-stride", "3"], "mask_loss_stride"),
    ],
)
def test_bad_augmentation_settings_are_refused(argv, field):
    with pytest.raises(ValueError, match=field):
        parse(["--preset", "cpu", *argv])
