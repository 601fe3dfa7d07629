import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import firing_model

from spikeinfer import cli, cost
from spikeinfer.checkpoint import save_checkpoint
from spikeinfer.engine import evaluate, load, resolve_backend
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
    assert "kernel_path" not in result  # only the cpu backend has kernel paths
    # dense model at T=4 vs T_conv=8: exactly half the ACs
    assert result["acs_percent"] == pytest.approx(50.0)
    assert 0 < result["normalized_c"] < 0.5 and result["latency"] == 4.0
    preds = result["predictions"]
    assert sorted(preds["index"].tolist()) == list(range(12))
    assert 100 * (preds["pred"] == preds["label"]).mean() == pytest.approx(result["accuracy"])


@needs_glue
def test_evaluate_on_the_cpu_backend_names_its_kernel_path(monkeypatch):
    cb = pytest.importorskip("spikeinfer.cpu_backend")
    ok, why = cb.is_available()
    if not ok:
        pytest.skip(why)
    monkeypatch.setenv("SPIKEINFER_CPU_ISA", "portable")
    run = dict(glue_dir=GLUE, limit=3, timesteps=2, backend="cpu", progress=False)
    result = evaluate(load("sst2-1bit"), "sst2", **run)
    assert result["backend"] == "cpu" and result["kernel_path"] == "portable"
    monkeypatch.delenv("SPIKEINFER_CPU_ISA")
    assert evaluate(load("sst2-1bit"), "sst2", **run)["kernel_path"] == cb.isa()


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


@needs_glue
def test_evaluate_sequential_at_given_timesteps_leaves_the_model_alone():
    model = word_model(3)
    own = [[2, 3, 4, 5, 6, 7], [4] * 6]
    model.set_timesteps(own, t_emb=3)
    run = dict(glue_dir=GLUE, limit=6, mode="sequential", backend="torch", progress=False)
    uniform = evaluate(model, "sst2", timesteps=5, return_predictions=True, **run)
    assert model.timesteps == own and model.t_emb == 3
    assert uniform["latency"] == 5.0
    # an int is every sublayer and the embedding neurons at that T
    model.set_timesteps([[5] * 6, [5] * 6], t_emb=5)
    explicit = evaluate(model, "sst2", return_predictions=True, **run)
    assert (uniform["predictions"]["pred"] == explicit["predictions"]["pred"]).all()
    assert uniform["normalized_c"] == explicit["normalized_c"]
    model.set_timesteps(own, t_emb=3)
    listed = evaluate(model, "sst2", timesteps=[[1] * 6, [2] * 6], **run)
    assert model.timesteps == own and listed["latency"] == pytest.approx((6 + 12 + 3) / 13)


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


@needs_glue
def test_a_model_of_another_task_is_refused(tmp_path):
    path = save_checkpoint(word_model(2), tmp_path / "m", task="mrpc")
    args = ["eval", "--task", "sst2", "--model", str(path), "--glue-dir", str(GLUE)]
    with pytest.raises(SystemExit, match="trained on 'mrpc', not 'sst2'; pass --task mrpc"):
        cli.main([*args, "--limit", "2"])
    three_way = firing_model(4, vocab_size=30522, max_position_embeddings=128, num_labels=3)
    with pytest.raises(ValueError, match="3 outputs but sst2 needs 2"):
        evaluate(three_way, "sst2", glue_dir=GLUE, limit=2, backend="torch", progress=False)


def test_cli_errors_are_clear(tmp_path, capsys):
    assert cli.main(["eval", "--task", "sst2", "--model", str(tmp_path / "missing")]) == 2
    assert "no checkpoint folder" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--limit must be >= 1"):
        cli.main(["eval", "--task", "sst2", "--model", "x", "--limit", "0"])


def test_cli_bad_checkpoints_backends_and_numbers_are_clear(tmp_path, capsys, monkeypatch):
    path = save_checkpoint(word_model(7), tmp_path / "m", task="sst2")
    args = ["eval", "--task", "sst2", "--glue-dir", str(GLUE), "--limit", "2"]
    # truncated weights file
    broken = tmp_path / "truncated"
    shutil.copytree(path, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert cli.main([*args, "--model", str(broken), "--backend", "torch"]) == 2
    err = capsys.readouterr().err
    assert "truncated" in err and "model.safetensors" in err
    # a config that does not match the weights (another hidden size)
    wrong = tmp_path / "wrong-config"
    shutil.copytree(path, wrong)
    meta = json.loads((wrong / "config.json").read_text())
    meta["model"]["intermediate_size"] += 8
    (wrong / "config.json").write_text(json.dumps(meta))
    assert cli.main([*args, "--model", str(wrong), "--backend", "torch"]) == 2
    assert "shape" in capsys.readouterr().err
    # a backend that cannot run here
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        assert cli.main([*args, "--model", str(path), "--backend", "triton"]) == 2
        assert "backend 'triton'" in capsys.readouterr().err
    # negative or zero numbers
    for flag, value in (("--limit", "-3"), ("--batch-size", "0"), ("--timesteps", "-1")):
        with pytest.raises(SystemExit, match=f"{flag} must be >= 1"):
            cli.main(["eval", "--task", "sst2", "--model", str(path), flag, value])


def test_module_entry_point_help():
    out = subprocess.run(
        [sys.executable, "-m", "spikeinfer", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    assert "eval" in out.stdout


@needs_glue
def test_eval_bundled_default_task_all_and_truncation(tmp_path, monkeypatch, capsys):
    models = tmp_path / "models"
    save_checkpoint(word_model(3), models / "sst2-1bit", task="sst2")
    save_checkpoint(word_model(4), models / "mrpc-1bit", task="mrpc")
    monkeypatch.setenv("SPIKEINFER_MODELS", str(models))
    common = [
        "--glue-dir",
        str(GLUE),
        "--limit",
        "3",
        "--timesteps",
        "2",
        "--backend",
        "torch",
        "--json",
    ]
    assert cli.main(["eval", "--task", "sst2", *common]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "sst2-1bit" and result["n_examples"] == 3
    assert cli.main(["eval", "--task", "all", *common]) == 0
    assert [r["task"] for r in json.loads(capsys.readouterr().out)] == ["mrpc", "sst2"]
    # a model with 16 positions truncates MRPC pairs and says how many
    short = firing_model(5, vocab_size=30522, max_position_embeddings=16)
    save_checkpoint(short, models / "short", task="mrpc")
    assert cli.main(["eval", "--task", "mrpc", "--model", "short", *common]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["num_truncated"] == 3
    assert "3 of 3 mrpc examples were longer" in captured.err
    assert cli.main(["eval", "--task", "nope", *common]) == 2
    assert "unknown" in capsys.readouterr().err


@needs_glue
def test_eval_missing_data_offline_is_clear(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = save_checkpoint(word_model(6), tmp_path / "m", task="rte")
    code = cli.main(
        [
            "eval",
            "--task",
            "rte",
            "--model",
            str(path),
            "--glue-dir",
            str(GLUE),
            "--backend",
            "torch",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "SPIKEINFER_GLUE_DIR" in err and "RTE" in err


@needs_glue
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_eval_data_parallel_with_two_gloo_processes(tmp_path):
    path = save_checkpoint(word_model(7), tmp_path / "m", task="sst2")
    args = [
        "--task",
        "sst2",
        "--model",
        str(path),
        "--glue-dir",
        str(GLUE),
        "--limit",
        "10",
        "--timesteps",
        "2",
        "--batch-size",
        "2",
        "--backend",
        "torch",
        "--json",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, "-m", "spikeinfer", "eval", *args],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        cwd=REPO,
    )
    ddp = subprocess.run(
        [
            "torchrun",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29523",
            "-m",
            "spikeinfer",
            "eval",
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    one, two = json.loads(single.stdout), json.loads(ddp.stdout)  # only rank 0 prints
    assert two["n_examples"] == 10
    for key in ("accuracy", "acs_percent", "normalized_c", "energy_mj"):
        assert two[key] == pytest.approx(one[key]), key


@needs_glue
def test_masked_and_compacted_models_report_the_same_costs():
    from spikeinfer.model import compact

    model = word_model(8)
    model.head_mask[0, 1:3] = 0
    model.neuron_mask[1, ::2] = 0
    kwargs = {"glue_dir": GLUE, "limit": 4, "timesteps": 3, "backend": "torch", "progress": False}
    masked = evaluate(model, "sst2", **kwargs)
    compacted = evaluate(compact(model), "sst2", **kwargs)
    for key in ("accuracy", "acs_percent", "normalized_c", "energy_mj"):
        assert masked[key] == pytest.approx(compacted[key], rel=1e-9), key
