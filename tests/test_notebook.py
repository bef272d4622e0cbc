"""notebooks/solo_colab.ipynb: saved without outputs, and runs top to bottom on the CPU.

The notebook is executed headless with nbclient from the repository's notebooks/ folder (as
Jupyter would run it there), its parameters cell replaced by a tiny, fast configuration, with
the data and every output in tmp_path. Any failing cell fails the test.
"""

import ast
import json
from pathlib import Path

import nbformat
import numpy as np
import torch
from nbclient import NotebookClient
from PIL import Image
from test_zoo import filled_state, layout_file, saved, small_config

import zoo

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "solo_colab.ipynb"

# The tiny model and input of tests/test_train.py: seconds per epoch on two CPU cores.
TINY_FLAGS = [
    "--depth", "18", "--fpn-channels", "32", "--seg-feat-channels", "16",
    "--stacked-convs", "1", "--num-grids", "8", "8", "6", "4", "3",
    "--scale-ranges", "1,24", "12,48", "24,96", "48,192", "96,2048",
    "--batch-size", "4", "--num-workers", "0", "--warmup-iters", "2", "--log-every", "1",
    "--keep-instance", "10", "--cate-thresh", "0.05",
]  # fmt: skip


# Step 9's fine-tuning on the same tiny input (tests/test_finetune.py's TINY_RUN).
FINETUNE_FLAGS = ["--input-size", "64", "96", "--batch-size", "4", "--num-workers", "0"]


def quick_parameters(work_dir: Path, released: str = "", photos: tuple[str, ...] = ()) -> str:
    return "\n".join(
        [
            'REPO_URL = ""',
            f"WORK_DIR = {str(work_dir)!r}",
            'DATA = "builtin"',
            'COCO_IMAGES = ""',
            'MODEL = "solo"',
            'PRESET = "cpu"',
            "EPOCHS = 1",
            "TIME_BUDGET_MIN = 0",
            "NUM_IMAGES = 24",
            "INPUT_SIZE = (64, 96)",
            'RUN_DIR = "runs/quick"',
            "NUM_PICTURES = 2",
            f"EXTRA_FLAGS = {TINY_FLAGS!r}",
            f"RELEASED = {released!r}",
            f"PHOTOS = {list(photos)!r}",
            "FINETUNE_EPOCHS = 1",
            f"FINETUNE_FLAGS = {FINETUNE_FLAGS!r}",
        ]
    )


def assigned_names(source: str) -> set[str]:
    return {
        target.id
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }


def pngs_shown(cell) -> int:
    return sum("image/png" in out.get("data", {}) for out in cell.outputs)


def text_of(cell) -> str:
    return "".join(out.get("text", "") for out in cell.outputs if out.output_type == "stream")


def files_in_repo() -> set[Path]:
    """The repository's top folder and notebooks/, byte-code caches left out."""
    found = set(ROOT.iterdir()) | set(NOTEBOOK.parent.iterdir())
    return {p for p in found if p.name != "__pycache__"}


def test_notebook_is_saved_without_outputs_and_has_one_parameters_cell():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert code_cells
    for cell in code_cells:
        assert cell.outputs == [] and cell.execution_count is None, cell.id
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and params[0] is code_cells[0]
    # The test's configuration sets exactly the notebook's parameters (a new one must be
    # given a quick value here too).
    assert assigned_names(params[0].source) == assigned_names(quick_parameters(Path("w")))


def test_notebook_runs_top_to_bottom_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("SOLO_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the CPU preset's path, as without a GPU
    monkeypatch.setenv("MPLBACKEND", "Agg")
    repo_files = files_in_repo()

    # Steps 8 and 9 take a local released file (mmdetection's layout, 80 COCO classes, random
    # weights: tests/test_zoo.py's) and a local photo; in Colab they are downloaded.
    state = filled_state(small_config("solov2_light"), classes=len(zoo.COCO_CLASSES))
    released = saved(tmp_path, layout_file(state, "mmdet", classes=zoo.COCO_CLASSES))
    photo = tmp_path / "photo.jpg"
    pixels = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(photo)

    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    work = tmp_path / "work"
    params.source = quick_parameters(work, str(released), (str(photo),))
    client = NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on a failure
    cells = {c.id: c for c in nb.cells}

    # Every step showed its pictures, and the run went where the parameters said.
    assert pngs_shown(cells["data"]) == 2
    assert pngs_shown(cells["gt"]) == 2
    assert pngs_shown(cells["train"]) == 1 and pngs_shown(cells["resume"]) == 1
    assert pngs_shown(cells["infer"]) == 2
    assert "preset cpu, model solo, ResNet-18" in text_of(cells["config"])
    run = work / "runs" / "quick"
    checkpoint = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 2  # one epoch of training, one more after the resume
    metrics = json.loads((run / "inference" / "metrics.json").read_text())
    assert set(metrics) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    table = text_of(cells["ap"])
    assert "metric" in table and "AP50" in table
    assert len(list((tmp_path / "data").glob("builtin_v*_n24_s0_*"))) == 4
    # The released model drew the photo; the fine-tuned run started from its weights.
    assert pngs_shown(cells["released"]) == 1
    assert (work / "outputs" / "released" / "images.json").is_file()
    assert pngs_shown(cells["finetune"]) == 1 and "AP50" in text_of(cells["finetune"])
    tuned = torch.load(work / "runs" / "quick_finetuned" / "last.pt", weights_only=True)
    assert tuned["config"]["init_from"] == str(released) and tuned["epoch"] == 1
    assert "re-initialised" in text_of(cells["finetune"])
    # Nothing was written into the repository.
    assert files_in_repo() == repo_files
