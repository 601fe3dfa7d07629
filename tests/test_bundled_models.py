"""Every bundled model reproduces the dev metric its results.json reports (the main job's
promise), on the cpu backend at its T_conv."""

import json
import os
from pathlib import Path

import pytest

from spikeinfer.engine import evaluate, load, models_dir

REPO = Path(__file__).resolve().parents[1]
GLUE = Path(os.environ.get("SPIKEINFER_GLUE_DIR", REPO.parent / "shared" / "data" / "glue"))
BUNDLED = sorted(p.parent for p in models_dir().glob("*/results.json"))
FOLDERS = {"sst2": "SST-2", "mrpc": "MRPC", "cola": "CoLA", "qnli": "QNLI"}


@pytest.mark.parametrize("folder", BUNDLED, ids=[p.name for p in BUNDLED])
def test_bundled_model_matches_its_results(folder):
    results = json.loads((folder / "results.json").read_text())
    task = results["task"]
    if not (GLUE / FOLDERS.get(task, task) / "dev.tsv").exists():
        pytest.skip(f"no local {task} dev set under {GLUE}")
    assert (folder / "model.safetensors").stat().st_size + (
        folder / "config.json"
    ).stat().st_size <= 5 * 1024 * 1024
    model = load(folder)
    mode = results.get("mode", "unrolled")
    assert model.checkpoint_meta.get("mode", "unrolled") == mode  # what `eval` runs by default
    result = evaluate(
        model,
        task,
        glue_dir=GLUE,
        backend="cpu",
        batch_size=results.get("batch_size", 64),
        mode=mode,
        seed=results.get("seed", 0),
        progress=False,
    )
    expected = results["student_1bit"]
    for key in ("accuracy", "f1", "mcc"):
        if key in expected:
            assert result[key] == pytest.approx(expected[key], abs=1e-9), key
