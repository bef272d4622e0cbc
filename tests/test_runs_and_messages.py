"""Issue #19, cases 1, 2, 3, 10, 11, 12: runs never overwrite each other, a checkpoint write
leaves the previous or the new complete file, and every bad input or Ctrl-C is one line.

The command-line tests run the entry scripts as subprocesses (real exit status and stderr) on
the tiny model of tests/test_train.py, passed as flags.
"""

import errno
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch
from test_train import TINY

import main_infer
import main_train
import model as M
import resume_train
import training
from config import CPU, Config, config_from_args, config_to_dict
from errors import NonFiniteLossError

ROOT = Path(__file__).resolve().parents[1]


class Stop(Exception):
    """Raised in place of building the model: ends `train` right after it chose its folder."""


@pytest.fixture(scope="module")
def data_root(data_root):
    """conftest's folder with the tiny built-in data set generated once, for in-process and
    subprocess runs alike."""
    from synthetic import ensure_builtin_dataset

    ensure_builtin_dataset(data_root, num_images=TINY.num_images, seed=TINY.data_seed)
    return data_root


@pytest.fixture
def stop_before_model(monkeypatch, data_root):
    """train() stops once it has read the (tiny built-in) data and chosen the run's folder,
    with Stop(folder)."""

    def stop(cfg, *args):
        raise Stop(cfg.out)

    monkeypatch.setattr(training, "build_training", stop)


def snapshot(folder: Path) -> dict:
    """{relative path: (bytes, mtime in ns)} of every file under `folder`."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def flags_of(cfg: Config) -> list[str]:
    """Command-line flags that rebuild `cfg` on top of the cpu preset."""
    flags = ["--preset", "cpu"]
    for f in fields(Config):
        value = getattr(cfg, f.name)
        if f.name == "preset" or (value == getattr(CPU, f.name) and f.name != "scale_ranges"):
            continue  # the ranges always: a new input size would rescale the preset's
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif f.name == "scale_ranges":
            flags += [flag, *(f"{lo},{hi}" for lo, hi in value)]
        elif isinstance(value, tuple):
            flags += [flag, *(str(v) for v in value)]
        else:
            flags += [flag, str(value)]
    return flags


def run_script(script: str, args: list[str], cwd: Path, timeout: float = 300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def error_line(proc, script: str) -> str:
    """The one error line of a failed script: exit status 2, no traceback."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith(f"{script}: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"{script}: error: ")
    return lines[0]


def test_tiny_flags_rebuild_the_tiny_config():
    args = main_train.build_parser().parse_args(flags_of(TINY))
    assert config_from_args(args) == TINY


# --------------------------------------------------------------------------------------------
# case 1: a new run never overwrites another
# --------------------------------------------------------------------------------------------


def test_case_01_run_numbers_count_like_ultralytics(tmp_path):
    run = tmp_path / "solo_cpu"
    assert training.free_run_number(run) == 1  # no folder yet
    run.mkdir()
    (run / "config.json").write_text("{}")
    assert training.free_run_number(run) == 1  # a folder without a checkpoint is free
    (run / "last.pt").write_bytes(b"a run")
    assert training.free_run_number(run) == 2
    assert training.numbered_run_dir(run, 2) == tmp_path / "solo_cpu2"
    (tmp_path / "solo_cpu2").mkdir()
    (tmp_path / "solo_cpu2" / "last.pt").write_bytes(b"another run")
    assert training.free_run_number(run) == 3
    assert training.numbered_run_dir(run, 1) == run


def test_case_01_a_second_training_takes_the_next_free_folder(data_root, tmp_path, capsys):
    run = tmp_path / "run"
    for folder in (run, tmp_path / "run2"):
        folder.mkdir()
        (folder / "last.pt").write_bytes(b"an earlier run's checkpoint")
    (tmp_path / "run3").mkdir()  # a run that stopped before its first checkpoint: free
    (tmp_path / "run3" / "config.json").write_text("{}")
    before = {name: snapshot(tmp_path / name) for name in ("run", "run2")}

    training.train(replace(TINY, epochs=1, out=str(run)))

    chosen = tmp_path / "run3"
    out = capsys.readouterr().out
    assert f"{run} holds a run (last.pt): this run goes to {chosen}" in out
    assert f"run folder {chosen}" in out
    assert {name: snapshot(tmp_path / name) for name in ("run", "run2")} == before
    checkpoint = torch.load(chosen / "last.pt", weights_only=True)
    assert checkpoint["config"]["out"] == str(chosen) and checkpoint["epoch"] == 1
    assert json.loads((chosen / "config.json").read_text())["out"] == str(chosen)
    assert not (tmp_path / "run4").exists()


def test_case_01_exist_ok_trains_into_the_folder_given(tmp_path, stop_before_model):
    args = main_train.build_parser().parse_args(["--preset", "cpu", "--exist-ok"])
    assert config_from_args(args).exist_ok and not CPU.exist_ok
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"reused on purpose")
    with pytest.raises(Stop, match=re.escape(str(run))):
        training.train(replace(TINY, out=str(run), exist_ok=True))
    assert json.loads((run / "config.json").read_text())["exist_ok"] is True
    assert not (tmp_path / "run2").exists()
    # and without it the same call goes to run2, leaving run as it was
    with pytest.raises(Stop, match=re.escape(str(tmp_path / "run2"))):
        training.train(replace(TINY, out=str(run)))
    assert (run / "last.pt").read_bytes() == b"reused on purpose"
    assert json.loads((tmp_path / "run2" / "config.json").read_text())["out"] == str(
        tmp_path / "run2"
    )


# --------------------------------------------------------------------------------------------
# case 2: resume writes where it was pointed
# --------------------------------------------------------------------------------------------


def test_case_02_resuming_a_copied_run_leaves_the_original_untouched(data_root, tmp_path):
    original = tmp_path / "original"
    training.train(replace(TINY, epochs=1, out=str(original)))
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    (copy / "last.pt.tmp").write_bytes(b"partial")  # a write killed midway, earlier
    before = snapshot(original)
    time.sleep(0.01)  # a rewrite would show in the mtimes

    resume_train.main([str(copy), "--epochs", "2"])

    assert snapshot(original) == before
    checkpoint = torch.load(copy / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["config"]["out"] == str(copy)
    assert json.loads((copy / "config.json").read_text())["out"] == str(copy)
    assert not (copy / "last.pt.tmp").exists()  # stale partial files go when a resume starts


def test_case_02_resume_folder_is_the_folder_named_or_out_on_purpose(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"x")
    assert resume_train.resume_folder(run, None) == run
    assert resume_train.resume_folder(run / "last.pt", None) == run  # a .pt file's folder
    assert resume_train.resume_folder(run, str(run)) == run
    assert resume_train.resume_folder(run, str(tmp_path / "more")) == tmp_path / "more"
    other = tmp_path / "other"
    other.mkdir()
    (other / "last.pt").write_bytes(b"another run")
    assert resume_train.resume_folder(run, str(other)) == tmp_path / "other2"
    assert f"{other} holds another run (last.pt)" in capsys.readouterr().out
    # An older checkpoint beside a newer last.pt resumes into a new folder, never over it.
    (run / "epoch1.pt").write_bytes(b"older")
    assert resume_train.resume_folder(run / "epoch1.pt", None) == tmp_path / "run2"
    assert resume_train.resume_folder(run / "epoch1.pt", str(tmp_path / "more")) == (
        tmp_path / "more"
    )


# --------------------------------------------------------------------------------------------
# case 3: a full disk during a checkpoint write
# --------------------------------------------------------------------------------------------


def write_then_fail(exc: BaseException, after: int = 100):
    """A `model._write_all` that writes `after` bytes, then raises `exc` (a full disk)."""

    def fake(f, data, chunk=1 << 24):
        f.write(data[:after])
        f.flush()
        raise exc

    return fake


def test_case_03_disk_full_keeps_the_previous_checkpoint_and_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    M.atomic_save({"epoch": 4, "model": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()
    monkeypatch.setattr(M, "_write_all", write_then_fail(OSError(errno.ENOSPC, "No space")))
    with pytest.raises(M.CheckpointWriteError) as info:
        M.atomic_save({"epoch": 5, "model": {"w": torch.zeros(3)}}, path)
    assert str(info.value) == (
        f"no space left on device writing {path}: the previous checkpoint (epoch 4) is intact"
    )
    assert isinstance(info.value, OSError) and info.value.__cause__.errno == errno.ENOSPC
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_case_03_disk_full_on_the_first_write_says_none_was_written(tmp_path, monkeypatch):
    monkeypatch.setattr(M, "_write_all", write_then_fail(OSError(errno.ENOSPC, "No space")))
    path = tmp_path / "last.pt"
    with pytest.raises(M.CheckpointWriteError, match="no checkpoint was written yet"):
        M.atomic_save({"epoch": 1}, path)
    assert list(tmp_path.iterdir()) == []


def test_case_03_ctrl_c_during_a_write_leaves_the_previous_complete_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    M.atomic_save({"epoch": 2}, path)
    before = path.read_bytes()
    monkeypatch.setattr(M, "_write_all", write_then_fail(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        M.atomic_save({"epoch": 3, "w": torch.ones(1000)}, path)
    assert path.read_bytes() == before and M.saved_epoch(path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_case_03_a_run_removes_stale_partial_checkpoints_at_its_start(
    tmp_path, stop_before_model, capsys
):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt.tmp").write_bytes(b"half a checkpoint")
    (run / "notes.tmp").write_text("not ours")
    with pytest.raises(Stop):
        training.train(replace(TINY, out=str(run)))
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "notes.tmp"]
    assert "removed" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# case 10: one line and an exit status from every entry script
# --------------------------------------------------------------------------------------------


def test_case_10_every_entry_script_prints_one_line_for_bad_input(data_root, tmp_path):
    random_bytes = tmp_path / "random.pt"
    random_bytes.write_bytes(os.urandom(3000))
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    broken_json = tmp_path / "broken.json"
    broken_json.write_text("{not json")
    missing = tmp_path / "missing"
    cases = [
        ("main_train.py", ["--data", str(broken_json), "--coco-images", str(tmp_path),
                           "--out", str(tmp_path / "run")], [str(broken_json)]),
        # A flag no model has stops the run before its data and its folder.
        ("main_train.py", ["--backbone-width", "30", "--out", str(tmp_path / "run_w")], [
            "backbone width must be a positive multiple of 8, got 30"]),
        ("main_train.py", ["--model", "solo3"], ["model must be one of", "got 'solo3'"]),
        ("resume_train.py", [str(random_bytes)], [str(random_bytes), "not a PyTorch checkpoint"]),
        ("main_infer.py", ["--checkpoint", str(missing)], [str(missing), "no checkpoint"]),
        ("main_infer.py", ["--onnx", str(random_bytes)], [str(random_bytes), "ONNX"]),
        ("export.py", ["--checkpoint", str(empty)], [str(empty), "an empty file"]),
        ("dataset.py", ["--coco-json", str(broken_json), "--coco-images", str(tmp_path)], [
            str(broken_json)]),
    ]  # fmt: skip
    for script, args, needles in cases:
        line = error_line(run_script(script, args, tmp_path), script)
        for needle in needles:
            assert needle in line, (script, line)
    assert random_bytes.stat().st_size == 3000 and empty.stat().st_size == 0
    # Nothing was changed or left behind: no run folder for the bad data or the bad flags.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.json", "empty.pt", "random.pt"]


def ctrl_c_as_in_a_terminal() -> None:
    """In the child before exec: SIGINT delivered, with its default disposition, as in a
    terminal. Where this test runs with SIGINT ignored (a background job), Python would keep
    ignoring it; where it runs with SIGINT blocked (some CI runners' signal mask, which fork
    and exec inherit), the signal would stay pending and the run would train to its end."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def start(script: str, args: list[str], cwd: Path) -> tuple[subprocess.Popen, Path, Path]:
    out, err = cwd / f"{script}.stdout", cwd / f"{script}.stderr"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    with open(out, "w") as stdout, open(err, "w") as stderr:  # the child keeps its copies
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / script), *args],
            cwd=cwd,
            env=env,
            stdout=stdout,
            stderr=stderr,
            preexec_fn=ctrl_c_as_in_a_terminal,
        )
    return proc, out, err


SIGINT_BIT = 1 << (signal.SIGINT - 1)  # its bit in /proc/PID/status's signal masks
AGAIN_AFTER_S = 20.0  # a process still running this long after Ctrl-C gets a second one


def sigint_state(pid: int) -> str:
    """How the process `pid` stands towards SIGINT now, from /proc/PID/status (Linux; "" where
    there is none): blocked, ignored, caught by a handler, pending. For the message of a
    Ctrl-C that did not stop a process."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return ""
    names = {"SigBlk": "blocked", "SigIgn": "ignored", "SigCgt": "caught", "ShdPnd": "pending"}
    found = []
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in names:
            found.append(f"{names[key]} {'yes' if int(value, 16) & SIGINT_BIT else 'no'}")
    return "SIGINT " + ", ".join(found) if found else ""


def interrupt_when(ready, proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    """Send Ctrl-C (SIGINT) to `proc` once `ready()` is true: (its exit status, how it stood
    towards SIGINT when sent, `sigint_state`). A process still running AGAIN_AFTER_S later
    gets a second Ctrl-C, as a user would press it again, with a warning that names its state
    (once, in a CI run, a Ctrl-C had no effect, not reproduced since). The process is killed if
    it is still running at the end, whatever happened."""
    deadline = time.time() + timeout
    try:
        while not ready():
            assert proc.poll() is None, "the process ended before it was ready"
            assert time.time() < deadline, f"not ready after {timeout} s"
            time.sleep(0.05)
        state = sigint_state(proc.pid)
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(timeout=AGAIN_AFTER_S), state
        except subprocess.TimeoutExpired:
            again = sigint_state(proc.pid)
            warnings.warn(
                f"Ctrl-C did not stop pid {proc.pid} in {AGAIN_AFTER_S:.0f} s ({state} when "
                f"sent; {again} now); sending it again",
                stacklevel=2,
            )
            proc.send_signal(signal.SIGINT)
            return proc.wait(timeout=120), f"{state}; {again} before the second Ctrl-C"
    finally:
        if proc.poll() is None:
            proc.kill()


def tail(path: Path, n: int = 1500) -> str:
    """The last `n` characters of a text file, progress bars' carriage returns as new lines."""
    return path.read_text()[-n:].replace("\r", "\n")


def test_case_10_ctrl_c_during_training_says_where_and_how_to_continue(data_root, tmp_path):
    run = tmp_path / "run"
    flags = flags_of(replace(TINY, epochs=100, out=str(run), device="cpu"))
    proc, out, err = start("main_train.py", flags, tmp_path)
    rc, state = interrupt_when((run / "last.pt").exists, proc)
    stderr = err.read_text()
    assert rc == 130, f"{state}; stderr: {stderr[-1500:]!r}; stdout: {tail(out)}"
    assert "Traceback" not in stderr, stderr[-3000:]
    line = stderr.strip().splitlines()[-1]
    found = re.fullmatch(
        r"main_train\.py: interrupted at epoch (\d+), iteration (\d+); last checkpoint: "
        r"(.+) \(epoch (\d+)\); continue with `python resume_train\.py (.+)`",
        line,
    )
    assert found, line
    epoch, _, path, saved, folder = found.groups()
    checkpoint = torch.load(run / "last.pt", weights_only=True)  # complete, not partial
    assert path == str(run / "last.pt") and folder == str(run)
    assert int(saved) == checkpoint["epoch"] >= 1 and int(epoch) >= int(saved) + 1
    assert not list(run.glob("*.tmp"))


def test_sigint_state_reads_a_blocked_and_a_caught_sigint():
    code = (
        "import signal, sys, time\n"
        "if sys.argv[1] == 'block':\n"
        "    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    for how, expected in (("block", "blocked yes"), ("catch", "caught yes")):
        proc = subprocess.Popen(
            [sys.executable, "-c", code, how], stdout=subprocess.PIPE, text=True,
            preexec_fn=ctrl_c_as_in_a_terminal,
        )  # fmt: skip
        try:
            assert proc.stdout.readline().strip() == "ready"
            state = sigint_state(proc.pid)
        finally:
            proc.kill()
            proc.wait()
        assert expected in state, (how, state)
        if how == "catch":  # Python's own handler, which raises KeyboardInterrupt
            assert "blocked no" in state and "ignored no" in state


def test_case_10_ctrl_c_in_another_script_is_one_line_too(tmp_path):
    root = tmp_path / "data"
    args = ["--root", str(root), "--num", "100000", "--workers", "1"]
    proc, out, err = start("synthetic.py", args, tmp_path)
    rc, state = interrupt_when(lambda: any(root.glob(".*.lock")), proc, timeout=120)
    stderr = err.read_text()
    assert rc == 130 and "Traceback" not in stderr, f"{state}; {stderr[-3000:]}; {tail(out)}"
    assert stderr.strip().splitlines()[-1] == "synthetic.py: interrupted"


# --------------------------------------------------------------------------------------------
# case 11: a non-finite loss names the checkpoint that exists
# --------------------------------------------------------------------------------------------


def poison_loss(monkeypatch, when) -> None:
    """solo_head.total_loss gives a NaN total once `when()` is true."""
    import solo_head

    real = solo_head.total_loss

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        if when():
            out["total"] = out["total"] * float("nan")
        return out

    monkeypatch.setattr(solo_head, "total_loss", poisoned)


def test_case_11_a_non_finite_loss_before_any_checkpoint_says_none_was_written(
    data_root, tmp_path, monkeypatch
):
    poison_loss(monkeypatch, lambda: True)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as info:
        training.train(replace(TINY, epochs=1, out=str(run)))
    message = str(info.value)
    assert "at epoch 1, iteration 0" in message and "total=nan" in message
    assert message.endswith("; no checkpoint was written yet") and "last.pt" not in message
    assert not (run / "last.pt").exists()


def test_case_11_a_non_finite_loss_after_a_checkpoint_names_it(data_root, tmp_path, monkeypatch):
    saved = []
    real_save = training.save_checkpoint

    def save_and_count(*args, **kwargs):
        real_save(*args, **kwargs)
        saved.append(1)

    monkeypatch.setattr(training, "save_checkpoint", save_and_count)
    poison_loss(monkeypatch, lambda: bool(saved))
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as info:
        training.train(replace(TINY, epochs=2, out=str(run)))
    assert str(info.value).endswith(f"; last checkpoint: {run / 'last.pt'} (epoch 1)")
    assert M.load_checkpoint(run)["epoch"] == 1


# --------------------------------------------------------------------------------------------
# case 12: files that are not our checkpoints or exports
# --------------------------------------------------------------------------------------------


class WritesMarker:
    """Unpickling this runs `touch MARKER`: a file that executes code when loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def zip_checkpoint(path: Path) -> None:
    torch.save({"config": {}, "model": {"w": torch.ones(100)}, "class_names": ["a"]}, path)


FOREIGN = {
    "random bytes": (lambda p: p.write_bytes(os.urandom(2000)), "not a PyTorch checkpoint"),
    "empty": (lambda p: p.write_bytes(b""), "an empty file"),
    "plain state_dict": (
        lambda p: torch.save(torch.nn.Linear(2, 2).state_dict(), p),
        "a PyTorch file, but not a checkpoint written by main_train.py: it has keys 'weight', "
        "'bias'; expected config, model, class_names",
    ),
    "other dict": (
        lambda p: torch.save({"epoch": 3, **{f"k{i}": i for i in range(9)}}, p),
        "it has keys 'epoch', 'k0', 'k1', 'k2', 'k3', ... (10 in all); expected config",
    ),
    "a list": (lambda p: torch.save([1, 2], p), "a PyTorch file holding a list"),
    "truncated": (
        lambda p: (zip_checkpoint(p), p.write_bytes(p.read_bytes()[:300])),
        "a zip archive as a PyTorch checkpoint is, but damaged",
    ),
    "bad config": (
        lambda p: torch.save({"config": {"colour": 1}, "model": {}, "class_names": []}, p),
        "its stored config does not fit this code: checkpoint config has unknown fields",
    ),
}


@pytest.mark.parametrize("kind", list(FOREIGN))
def test_case_12_a_file_that_is_not_our_checkpoint_gets_one_line(kind, tmp_path):
    path = tmp_path / "model.pt"
    make, expected = FOREIGN[kind]
    make(path)
    before = path.read_bytes()
    with pytest.raises(M.ModelFileError) as info:
        M.load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and expected in message, message
    assert "\n" not in message
    assert path.read_bytes() == before
    with pytest.raises(M.ModelFileError, match=re.escape(expected)):
        main_infer.load_model(path, torch.device("cpu"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


@pytest.mark.parametrize("protocol", ["torch.save", "plain pickle"])
def test_case_12_a_pickle_that_runs_code_is_refused_and_nothing_runs(protocol, tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "last.pt"
    payload = {"config": WritesMarker(marker), "model": {}, "class_names": []}
    if protocol == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(M.ModelFileError) as info:
        M.load_checkpoint(tmp_path)
    assert str(info.value).startswith(f"{path}: refused: its pickle asks for ")
    assert "system" in str(info.value) and "nothing was executed" in str(info.value)
    assert not marker.exists()


def test_case_12_weights_that_do_not_fit_their_config_get_one_line(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint = {"config": config_to_dict(TINY), "model": {"w": torch.ones(1)}}
    torch.save({**checkpoint, "class_names": ["a", "b", "c"]}, path)
    with pytest.raises(M.ModelFileError) as info:
        main_infer.load_model(path, torch.device("cpu"))
    message = str(info.value)
    assert message.startswith(f"{path}: its weights do not fit the model its config builds: ")
    assert "Missing key(s)" in message and "\n" not in message


def foreign_onnx(path: Path) -> None:
    """A valid ONNX model that export.py did not make: one Identity node, no metadata."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.save(proto, str(path))


@pytest.mark.parametrize(
    "kind, make, expected",
    [
        ("random", lambda p: p.write_bytes(os.urandom(500)), "not a readable ONNX model"),
        ("empty", lambda p: p.write_bytes(b""), "not a readable ONNX model"),
        ("foreign", foreign_onnx, "an ONNX model, but without this project's metadata"),
    ],
)
def test_case_12_an_onnx_file_that_is_not_our_export_gets_one_line(kind, make, expected, tmp_path):
    from export import OnnxSOLO

    path = tmp_path / "solo.onnx"
    make(path)
    with pytest.raises(M.ModelFileError) as info:
        OnnxSOLO(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message
    with pytest.raises(M.ModelFileError, match=re.escape(expected)):
        main_infer.main(["--onnx", str(path), "--images", str(path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["solo.onnx"]  # nothing written


def test_a_ctrl_c_python_could_only_print_is_raised_at_the_next_step(monkeypatch, capsys):
    # What synthetic.py met about once in 20 Ctrl-Cs: Python raised the KeyboardInterrupt in
    # a weakref callback of the garbage collector, printed "Exception ignored in ..." and went
    # on. Under cli.run it is kept and raised at the loop's next raise_if_interrupted.
    import cli

    monkeypatch.setattr(sys, "unraisablehook", cli.keep_interrupt)

    class Finalised:
        def __init__(self, error):
            self.error = error

        def __del__(self):
            raise self.error

    Finalised(KeyboardInterrupt())  # dropped at once: its __del__ can only be printed
    assert capsys.readouterr().err == ""
    with pytest.raises(KeyboardInterrupt):
        cli.raise_if_interrupted()
    cli.raise_if_interrupted()  # once only
    Finalised(ValueError("a bug"))  # anything else is printed as Python prints it
    err = capsys.readouterr().err
    assert "Exception ignored" in err and "ValueError: a bug" in err
    cli.raise_if_interrupted()
