import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import firing_model

from spikeinfer import cli, cost
from spikeinfer.checkpoint import save_checkpoint
from spikeinfer.engine import evaluate, resolve_backend
from spikeinfer.model import BackendUnavailableError

REPO = Path(__file__).resolve().parents[1]
GLUE = Path(os.environ.get("SPIKEINFER_GLUE_DIR", REPO.parent / "shared" / "data" / "glue"))
needs_glue = pytest.mark.skipif(
    not (GLUE / "SST-2" / "dev.tsv").exists(), reason=f"GLUE data not found at {GLUE}"
)


def word_model(seed=0):
    """A tiny spiking model over the teacher's full WordPiece vocabulary."""
    return firing_model(seed, vocab_size=30522, max_position_embeddings=128)


@needs_glue
def test_evaluate_reports_design_keys_and_consistent_costs():
    model = word_model()
    result = evaluate(
        model,
        "sst2",
        glue_dir=GLUE,
        limit=12,
        batch_size=5,
        timesteps=4,
        backend="torch",
        progress=False,
        return_predictions=True,
    )
    for key in (
        "task",
        "n_examples",
        "accuracy",
        "acs_percent",
        "normalized_c",
        "latency",
        "energy_mj",
        "sentences_per_s",
        "wall_s",
        "backend",
        "mode",
        "device",
    ):
        assert key in result, key
    assert result["n_examples"] == 12 and result["backend"] == "torch"
    # dense model at T=4 vs T_conv=8: exactly half the ACs
    assert result["acs_percent"] == pytest.approx(50.0)
    assert 0 < result["normalized_c"] < 0.5 and result["latency"] == 4.0
    preds = result["predictions"]
    assert sorted(preds["index"].tolist()) == list(range(12))
    assert 100 * (preds["pred"] == preds["label"]).mean() == pytest.approx(result["accuracy"])


@needs_glue
def test_evaluate_pruned_sequential_acs_match_ac_count():
    model = word_model(1)
    model.head_mask[0, :2] = 0
    model.set_timesteps([[2, 3, 4, 5, 6, 7], [4] * 6], t_emb=3)
    result = evaluate(
        model,
        "mrpc",
        glue_dir=GLUE,
        limit=6,
        mode="sequential",
        backend="torch-step",
        progress=False,
        return_predictions=True,
    )
    assert set(result) >= {"accuracy", "f1"}
    assert result["latency"] == pytest.approx((27 + 24 + 3) / 13)
    # a single-length check: ac_count on one length reproduces the pooled ratio's parts
    one = cost.ac_count(model.config, model.head_mask, None, model.timesteps, 20)
    assert one < cost.dense_ac_count(model.config, 20)
    assert 0 < result["acs_percent"] < 100


def test_backend_resolution_is_explicit(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend("gpu-magic")
    assert resolve_backend("torch") == "torch"
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(BackendUnavailableError, match="backend 'triton'"):
            resolve_backend("triton")


@needs_glue
def test_cli_eval_json(tmp_path, capsys):
    path = save_checkpoint(word_model(2), tmp_path / "m", task="sst2")
    code = cli.main(
        [
            "eval",
            "--task",
            "sst2",
            "--model",
            str(path),
            "--glue-dir",
            str(GLUE),
            "--limit",
            "4",
            "--timesteps",
            "3",
            "--backend",
            "torch",
            "--json",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_examples"] == 4 and result["task"] == "sst2"


def test_cli_errors_are_clear(tmp_path, capsys):
    assert cli.main(["eval", "--task", "sst2", "--model", str(tmp_path / "missing")]) == 2
    assert "no checkpoint folder" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--limit must be >= 1"):
        cli.main(["eval", "--task", "sst2", "--model", "x", "--limit", "0"])


def test_module_entry_point_help():
    out = subprocess.run(
        [sys.executable, "-m", "spikeinfer", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    assert "eval" in out.stdout
