"""Training, checkpoint/resume, inference and DDP on a tiny model and the built-in data."""

import csv
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import dataset
import evaluation
import main_infer
import model as M
import resume_train
import training
from config import CIS680, CPU
from errors import NonFiniteLossError

ROOT = Path(__file__).resolve().parents[1]

# A tiny model on a tiny input: seconds per epoch on two CPU cores.
TINY = replace(
    CPU,
    model="solo",
    num_images=24,
    data_seed=0,
    input_size=(64, 96),
    depth=18,
    fpn_channels=32,
    seg_feat_channels=16,
    stacked_convs=1,
    num_grids=(8, 8, 6, 4, 3),
    scale_ranges=((1, 24), (12, 48), (24, 96), (48, 192), (96, 2048)),
    batch_size=4,
    epochs=2,
    warmup_iters=2,
    time_budget_min=0.0,
    num_workers=0,
    log_every=1,
    keep_instance=10,
    cate_thresh=0.05,
)


def test_lr_schedule_warmup_steps_and_cosine():
    cfg = replace(
        CPU, lr=1.0, warmup_iters=10, warmup_ratio=1 / 3, lr_schedule="step", lr_steps=(3, 5)
    )
    assert training.lr_at(cfg, 0, 0, 100) == pytest.approx(1 / 3)  # the authors' start
    assert training.lr_at(cfg, 5, 0, 100) == pytest.approx(1 / 3 + 2 / 3 * 0.5)
    assert training.lr_at(replace(cfg, warmup_ratio=0.001), 0, 0, 100) == pytest.approx(0.001)
    assert training.lr_at(cfg, 10, 0, 100) == pytest.approx(1.0)
    assert training.lr_at(cfg, 50, 2, 100) == pytest.approx(0.1)  # the 3rd epoch
    assert training.lr_at(cfg, 90, 4, 100) == pytest.approx(0.01)
    cos = replace(cfg, lr_schedule="cosine", warmup_iters=0)
    assert training.lr_at(cos, 50, 0, 100) == pytest.approx(0.5)
    assert training.lr_at(cos, 100, 0, 100) == pytest.approx(0.0, abs=1e-12)


def test_kernel_lr_mult_gives_solov2_kernel_output_its_own_learning_rate():
    from model import build_model

    cfg = replace(
        TINY, model="solov2", kernel_channels=8, mask_feat_channels=8, lr=0.01, kernel_lr_mult=1.0
    )
    model = build_model(cfg, num_classes=3)
    names = {id(p): n for n, p in model.named_parameters()}
    plain = training.build_optimizer(cfg, model)
    assert [(g["weight_decay"], g["lr_mult"]) for g in plain.param_groups] == [
        (cfg.weight_decay, 1.0),
        (0.0, 1.0),
    ]
    optimizer = training.build_optimizer(replace(cfg, kernel_lr_mult=0.25), model)
    seen = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(names.values())  # every parameter once
    for group in optimizer.param_groups:
        for p in group["params"]:
            in_kernel_out = ".kernel_out." in "." + names[id(p)]
            assert group["lr_mult"] == (0.25 if in_kernel_out else 1.0)
            assert group["weight_decay"] == (cfg.weight_decay if p.ndim > 1 else 0.0)
    assert sum(g["lr_mult"] == 0.25 for g in optimizer.param_groups) == 2  # weight, bias
    training.set_lr(optimizer, 0.004)
    assert sorted({g["lr"] for g in optimizer.param_groups}) == pytest.approx([0.001, 0.004])


def test_budget_probe_fits_iterations_to_the_time_left():
    cfg = replace(CPU, time_budget_min=1.0, epochs=12)  # 60 s
    probe = training.TimeBudget(cfg, t_start=0.0, iters_per_epoch=10, val_batches=3)
    # 1 s per iteration, an epoch costs 10 + 3/3 = 11 s: 55 s left after 5 s hold 5 epochs
    assert probe.iterations_that_fit(1.0, iteration=5, elapsed=5.0) == 55
    # a fraction of an epoch is kept: 52.25 s left hold 4.75 epochs, 47.5 iterations
    assert probe.iterations_that_fit(1.0, iteration=5, elapsed=7.75) == 52
    assert probe.iterations_that_fit(0.001, iteration=5, elapsed=5.0) == 120  # 12 epochs at most
    assert probe.iterations_that_fit(1.0, iteration=5, elapsed=90.0) == 6  # over: one more
    # at an epoch's end, from measured speeds: 1 s per iteration and a 4 s validation pass make
    # 14 s epochs; 28 s left hold 2 more, 7 s half of one, none left ends the run now
    assert probe.replan(20, per_iter=1.0, val_seconds=4.0, elapsed=32.0) == 40
    assert probe.replan(20, per_iter=1.0, val_seconds=4.0, elapsed=53.0) == 25
    assert probe.replan(20, per_iter=1.0, val_seconds=4.0, elapsed=70.0) == 20


def test_a_time_budget_may_end_the_last_epoch_early(data_root, tmp_path, monkeypatch):
    monkeypatch.setattr(training.TimeBudget, "SKIP", 1)
    monkeypatch.setattr(training.TimeBudget, "PROBE_ITERS", 3)
    monkeypatch.setattr(
        training.TimeBudget,
        "iterations_that_fit",
        lambda self, per_iter, iteration, elapsed: self.iters_per_epoch + 2,
    )
    monkeypatch.setattr(  # the re-plan after epoch 1 keeps the plan
        training.TimeBudget, "replan", lambda self, *args: self.iters_per_epoch + 2
    )
    cfg = replace(TINY, epochs=5, time_budget_min=10.0, out=str(tmp_path / "run"))
    metrics = training.train(cfg)
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    per_epoch = ckpt["iters_total"] - 2
    assert per_epoch >= 3 and ckpt["iteration"] == per_epoch + 2
    assert (ckpt["epoch"], ckpt["epochs_total"]) == (2, 2) and metrics is not None
    last = ckpt["history"][-1]
    assert last["iter"] == per_epoch + 2 and last["epoch"] == 2
    # the cosine schedule runs over the iterations that fit, not over whole epochs
    assert last["lr"] == pytest.approx(training.lr_at(cfg, per_epoch + 1, 1, per_epoch + 2))


def test_learning_curve_has_a_point_per_mark_and_one_at_the_end(data_root, tmp_path, monkeypatch):
    evaluate = evaluation.evaluate_model

    def slow_evaluate(*args, **kwargs):  # every evaluation takes 3 s more
        time.sleep(3.0)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(training, "evaluate_model", slow_evaluate)
    cfg = replace(TINY, epochs=1, eval_at_min=(0.0,), out=str(tmp_path / "run"))
    t0 = time.time()
    metrics = training.train(cfg)
    seconds = time.time() - t0
    with open(tmp_path / "run" / "learning_curve.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["iteration"]) for r in rows][0] == 1  # the 0-minute mark: after iteration 1
    assert len(rows) == 2 and float(rows[1]["mark_min"]) > 0
    assert float(rows[1]["AP"]) == pytest.approx(metrics["AP"])
    # minutes without either evaluation (the csv rounds them to 0.01 min = 0.6 s)
    assert float(rows[1]["mark_min"]) * 60 <= seconds - 6.0 + 0.6
    assert (tmp_path / "run" / "learning_curve.png").stat().st_size > 0


def test_atomic_save_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "last.pt"
    M.atomic_save({"a": torch.ones(2)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        M.atomic_save({"a": Unpicklable()}, path)
    assert torch.load(path, weights_only=True)["a"].tolist() == [1.0, 1.0]


def test_cached_samples_are_read_once_and_augmented_on_every_read(data_root, monkeypatch):
    train_set, _ = dataset.build_data(replace(TINY, cache_data=False))
    assert train_set.augment is not None
    reads = []
    plain_getitem = type(train_set).__getitem__

    def counting_getitem(self, i):
        reads.append(i)
        return plain_getitem(self, i)

    monkeypatch.setattr(type(train_set), "__getitem__", counting_getitem)
    order = [0, 1, 0, 0, 1]
    torch.manual_seed(0)
    plain = [train_set[i] for i in order]
    reads.clear()
    cached = dataset.CachedSamples(train_set)
    torch.manual_seed(0)
    got = [cached[i] for i in order]
    assert reads == [0, 1]  # each item decoded once
    for (img, labels, masks, boxes, meta), want in zip(got, plain, strict=True):
        # the augmentation ran on every read, with the draws of the uncached data set
        assert meta["augment"] == want[4]["augment"]
        assert torch.equal(img, want[0]) and torch.equal(labels, want[1])
        assert torch.equal(masks, want[2]) and torch.equal(boxes, want[3])
    assert {m["augment"]["hflip"] for *_, m in got} == {True, False}  # both kinds of read

    assert isinstance(dataset.build_data(TINY)[0], dataset.CachedSamples)
    with_workers = replace(TINY, num_workers=1)
    with pytest.warns(UserWarning, match="cache_data ignored with num_workers=1"):
        assert not isinstance(dataset.build_data(with_workers)[0], dataset.CachedSamples)


def test_two_iteration_smoke_then_resume_equals_uninterrupted(data_root, tmp_path):
    # Uninterrupted: 2 epochs. Interrupted: stop after epoch 1, resume from the run folder.
    full = replace(TINY, out=str(tmp_path / "full"))
    training.train(full)
    part = replace(TINY, out=str(tmp_path / "part"))
    training.train(part, stop_after_epoch=1)
    ckpt = torch.load(tmp_path / "part" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["config"]["num_grids"] == list(TINY.num_grids)
    resume_train.main([str(tmp_path / "part")])

    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "last.pt", weights_only=True)
    assert a["iteration"] == b["iteration"] > 2
    losses_a = [(r["iter"], r["total"], r["cate"], r["mask"]) for r in a["history"]]
    losses_b = [(r["iter"], r["total"], r["cate"], r["mask"]) for r in b["history"]]
    assert losses_a == losses_b
    assert all(math.isfinite(r["total"]) for r in a["history"])
    for key, value in a["model"].items():
        torch.testing.assert_close(value, b["model"][key], msg=key)
    run = tmp_path / "full"
    assert (run / "loss.png").stat().st_size > 0
    header = (run / "loss.csv").read_text().splitlines()[0]
    assert header == "iteration,epoch,total,focal,dice,lr"
    assert json.loads((run / "metrics.json").read_text()).keys() >= {"AP", "AP50", "AP75"}


def test_inference_writes_pictures_and_a_valid_results_json(data_root, tmp_path):
    cfg = replace(TINY, out=str(tmp_path / "run"), epochs=1)
    training.train(cfg)
    out = tmp_path / "infer"
    metrics = main_infer.main(
        ["--checkpoint", cfg.out, "--out", str(out), "--eval", "--score-min", "0"]
    )
    assert set(metrics) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    results = json.loads((out / "results.json").read_text())
    assert isinstance(results, list)
    for det in results:
        assert det.keys() >= {"image_id", "category_id", "segmentation", "score"}
        assert det["category_id"] in (1, 2, 3)
    assert len(list(out.glob("*_pred.png"))) > 0

    # Plain image files (not from a data set) work too.
    from PIL import Image

    img_dir = tmp_path / "photos"
    img_dir.mkdir()
    Image.new("RGB", (120, 90), (100, 150, 200)).save(img_dir / "a.png")
    main_infer.main(["--checkpoint", cfg.out, "--images", str(img_dir), "--out", str(out / "p")])
    assert (out / "p" / "results.json").is_file()
    assert len(list((out / "p").glob("*_pred.png"))) == 1


def test_non_finite_loss_stops_with_the_terms_named(data_root, tmp_path, monkeypatch):
    cfg = replace(TINY, out=str(tmp_path / "nan"), epochs=1)
    import solo_head

    real = solo_head.total_loss

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        out["total"] = out["total"] * float("nan")
        return out

    monkeypatch.setattr(solo_head, "total_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match="total=nan"):
        training.train(cfg)


def test_ddp_two_processes_on_the_cpu(data_root, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_port=29533", str(ROOT / "main_train.py"),
        "--preset", "cpu", "--model", "solo", "--device", "cpu", "--epochs", "1",
        "--num-images", "24",
        "--input-size", "64", "96", "--depth", "18", "--fpn-channels", "32",
        "--seg-feat-channels", "16", "--stacked-convs", "1", "--num-grids", "8", "8", "6", "4",
        "3", "--scale-ranges", "1,24", "12,48", "24,96", "48,192", "96,2048",
        "--batch-size", "2", "--num-workers", "0", "--time-budget-min", "0",
        "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "SOLO_DATA_DIR": str(data_root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "last.pt").is_file()
    assert "COCO mask AP" in proc.stdout


def test_bf16_autocast_only_where_the_cpu_runs_bf16_natively(monkeypatch):
    # Emulated bf16 (AVX2-only CPUs) made the preset's step 16x slower than float32.
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert TINY.amp
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: True)
    assert training.autocast_dtype(TINY, cpu) == torch.bfloat16
    assert training.autocast_dtype(replace(TINY, amp=False), cpu) is None
    assert training.autocast_dtype(CIS680, cpu) == torch.bfloat16  # one flag: amp, any preset
    assert training.autocast_dtype(TINY, cuda) == torch.float16
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: False)
    assert training.autocast_dtype(TINY, cpu) is None
    assert training.autocast_dtype(replace(TINY, amp=False), cuda) is None
    with training._autocast(TINY, cpu):
        assert not torch.is_autocast_enabled("cpu")


# --------------------------------------------------------------------------------------------
# the run's pieces: its state, its time budget, its learning curve
# --------------------------------------------------------------------------------------------


def test_run_state_saves_its_fields_and_restores_an_old_checkpoint():
    run = training.RunState(epoch=3, iteration=30, epochs_total=5, iters_total=48)
    run.history.append({"iter": 30, "epoch": 3, "lr": 0.1, "total": 1.0, "cate": 0.5, "mask": 0.5})
    run.class_names = ["vehicle", "person", "animal"]
    assert tuple(run.saved()) == training.SAVED_FIELDS
    assert run.saved()["iters_total"] == 48 and run.saved()["history"] is run.history
    assert training.RunState().history is not training.RunState().history  # not shared

    torch.manual_seed(1)
    net = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    old = {  # a checkpoint from before the learning curve and iters_total: neither key
        "model": {k: v.clone() for k, v in net.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scaler": {},
        "epoch": 2,
        "iteration": 20,
        "epochs_total": 4,
        "history": [{"iter": 20}],
        "val_history": [{"iter": 20, "epoch": 2}],
        "rng": M.rng_states(),
    }
    expected_draw = torch.rand(3)
    fresh = torch.nn.Linear(2, 2)
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    restored = training.RunState()
    restored.restore(old, fresh, fresh_optimizer, scaler)
    assert (restored.epoch, restored.iteration, restored.epochs_total) == (2, 20, 4)
    assert restored.iters_total == 0 and restored.ap_history == []  # whole epochs, no curve
    assert restored.history == [{"iter": 20}] and restored.history is not old["history"]
    assert torch.equal(fresh.weight, net.weight)
    assert fresh_optimizer.state_dict()["state"][0]["momentum_buffer"].shape == (2, 2)
    assert torch.equal(torch.rand(3), expected_draw)  # the random states came back


def test_time_budget_fixes_the_totals_once_then_replans_after_each_epoch(monkeypatch):
    cfg = replace(CPU, time_budget_min=1.0, epochs=12)  # 60 s
    shared = []

    def share(value):  # rank 0's number, recorded
        shared.append(value)
        return value

    budget = training.TimeBudget(cfg, time.time(), 10, 3, share=share)
    monkeypatch.setattr(budget, "PROBE_ITERS", 3)
    monkeypatch.setattr(budget, "SKIP", 1)
    monkeypatch.setattr(budget, "iterations_that_fit", lambda per_iter, it, elapsed: 15)
    run = training.RunState(epochs_total=12, iters_total=120)
    for _ in range(4):
        run.iteration += 1
        budget.after_iteration(run)
    # nothing until 3 iterations are done, then 15 iterations (2 epochs, the last cut short)
    assert shared == [0, 0, 15] and budget.decided
    assert (run.iters_total, run.epochs_total) == (15, 2)

    # at an epoch's end, from measured speeds: 1 s per iteration and a 4 s validation pass
    # make 14 s epochs; 28 s left after 32 s hold 2 more (see the test above)
    run = training.RunState(epoch=2, iteration=20, epochs_total=12, iters_total=120)
    budget.after_epoch(run, 2, per_iter=1.0, val_seconds=4.0, elapsed=32.0)
    assert (run.iters_total, run.epochs_total) == (40, 4) and shared[-1] == 40
    # the last epoch planned: no more planning
    budget.after_epoch(run, 4, per_iter=1.0, val_seconds=4.0, elapsed=1.0)
    assert (run.iters_total, run.epochs_total) == (40, 4) and len(shared) == 4


def test_time_budget_decides_from_whole_epochs_when_an_epoch_is_shorter_than_the_probe():
    cfg = replace(CPU, time_budget_min=1.0, epochs=12)  # 60 s
    # one epoch of 10 iterations took 25 s: 35 s left hold one more whole epoch
    budget = training.TimeBudget(cfg, time.time() - 25.0, 10, 3)
    run = training.RunState(epoch=0, iteration=10, epochs_total=12, iters_total=120)
    budget.after_epoch(run, 1, per_iter=2.5, val_seconds=0.0, elapsed=25.0)
    assert budget.decided and (run.iters_total, run.epochs_total) == (20, 2)


def test_learning_curve_skips_the_marks_a_resumed_run_has_passed():
    cfg = replace(TINY, eval_at_min=(10.0, 5.0, 20.0))
    procs = training.Processes(0, 1, torch.device("cpu"))
    run = training.RunState(ap_history=[{"mark_min": 5.0, "iteration": 7, "AP": 0.1}])
    curve = training.LearningCurve(cfg, None, [0, 1], run, time.time(), procs)
    assert curve.marks == [10.0, 20.0]
    assert training.LearningCurve(cfg, None, [], run, time.time(), procs).marks == []  # no data
    assert 0.0 <= curve.run_seconds() < 5.0
    curve.after_iteration()  # 10 minutes not reached: no evaluation (the model is None)
    assert curve.marks == [10.0, 20.0] and curve.eval_seconds == 0.0
