"""End to end: a tiny random model through the two-stage schedule on SST-2, resume, report."""

import argparse
import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import firing_model

from spikeinfer import cost
from spikeinfer.checkpoint import load_checkpoint, save_checkpoint
from spikeinfer.config import SUBLAYERS
from spikeinfer.data import load_glue, load_tokenizer, tokenize
from spikeinfer.prune.commands import add_prune_parser, add_report_parser, prune_args
from spikeinfer.prune.schedule import TWO_STAGE

GLUE = Path(os.environ.get("SPIKEINFER_GLUE_DIR") or "/work/shared/data/glue")
EVAL_LIMIT = 24

pytestmark = pytest.mark.skipif(
    not (GLUE / "SST-2" / "dev.tsv").is_file(), reason=f"no SST-2 under {GLUE}"
)


def _cli(argv):
    parser = argparse.ArgumentParser(prog="spikeinfer")
    sub = parser.add_subparsers()
    add_prune_parser(sub)
    add_report_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def _prune(model_dir, out, schedule, *extra):
    return _cli(
        ["prune", "--task", "sst2", "--model", str(model_dir), "--out", str(out)]
        + ["--schedule", schedule, "--glue-dir", str(GLUE), "--backend", "torch"]
        + ["--max-steps", "2", "--batch-size", "8", "--timesteps", "4", "--save-every", "1"]
        + ["--fisher-samples", "32", "--fisher-batch-size", "16", "--calib-samples", "16"]
        + ["--noise-samples", "16"]
        + ["--train-limit", "128", "--eval-limit", str(EVAL_LIMIT), "--budget", "0.5"]
        + list(extra)
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune")
    model = firing_model(0, vocab_size=30522, max_position_embeddings=128)
    save_checkpoint(model, root / "tiny", task="sst2", label_names=["negative", "positive"])
    out = root / "runs" / "sst2"
    assert _prune(root / "tiny", out, "two-stage") == 0
    return root, out


def _dev_lengths():
    dev = load_glue("sst2", "dev", GLUE).select(range(EVAL_LIMIT))
    return [len(ids) for ids in tokenize(dev, "sst2", load_tokenizer(), 128).input_ids]


def test_two_stage_writes_every_stage_and_acs_match_cost_model(run):
    root, out = run
    lengths = _dev_lengths()
    for stage in TWO_STAGE:
        metrics = json.loads((out / stage / "metrics.json").read_text())
        assert metrics["n_examples"] == EVAL_LIMIT and 0 <= metrics["accuracy"] <= 100
        assert metrics["run_seconds"] >= 0
        if stage == "baseline":
            assert metrics["acs_percent"] == pytest.approx(100.0)
            continue
        served = load_checkpoint(out / stage / "compact")
        assert load_checkpoint(out / stage / "model").config == served.config
        table = served.timesteps if metrics["mode"] == "sequential" else served.unrolled_timesteps
        cfg, hm, nm = served.config, served.head_mask, served.neuron_mask
        pruned = sum(cost.ac_count(cfg, hm, nm, table, n) for n in lengths)
        dense = sum(cost.dense_ac_count(cfg, n) for n in lengths)
        assert metrics["acs_percent"] == pytest.approx(100.0 * pruned / dense, rel=1e-9)
        assert metrics["heads_per_layer"] == [int(x) for x in hm.sum(1)]
    post = json.loads((out / "spatial-post" / "metrics.json").read_text())["spatial"]
    assert post["acs"] <= post["budget_acs"]
    # The thresholds stage learns V_th at the temporal stage's timesteps, which it keeps.
    temporal = json.loads((out / "temporal-retrain" / "metrics.json").read_text())
    learned = json.loads((out / "thresholds" / "metrics.json").read_text())
    assert learned["timesteps"] == temporal["timesteps"] and learned["t_emb"] == temporal["t_emb"]
    assert learned["acs_percent"] == pytest.approx(temporal["acs_percent"])
    v_th = {s: load_checkpoint(out / s / "model").v_th for s in ("temporal-retrain", "thresholds")}
    assert not torch.equal(v_th["temporal-retrain"], v_th["thresholds"])
    adaptive = json.loads((out / "adaptive" / "metrics.json").read_text())
    t_conv = adaptive["t_conv"]
    assert adaptive["latency"] <= max(1.0, 0.16 * t_conv)
    assert adaptive["latency"] == pytest.approx(
        cost.latency(adaptive["timesteps"], adaptive["t_emb"])
    )
    # noise-alloc re-spreads the thresholds model's timesteps at its own ACs (no --acs-target),
    # adaptive-alloc the adaptive model's at the target latency; neither trains.
    spread = json.loads((out / "noise-alloc" / "metrics.json").read_text())
    detail = spread["noise_alloc"]
    assert detail["cost_after"] <= detail["budget"] == pytest.approx(detail["cost_before"])
    assert detail["timesteps_before"] == [learned["t_emb"]] + sum(learned["timesteps"], [])
    assert set(detail["drop"]) == {"emb"} | {f"{l}.{s}" for l in range(2) for s in SUBLAYERS}
    assert spread["t_emb"] == t_conv  # the embedding neurons cost no ACs
    assert torch.equal(load_checkpoint(out / "noise-alloc" / "model").v_th, v_th["thresholds"])
    late = json.loads((out / "adaptive-alloc" / "metrics.json").read_text())
    assert late["latency"] <= late["noise_alloc"]["budget"] == pytest.approx(0.16 * t_conv)
    # adaptive-uniform: the unpruned model with every sublayer at the largest T within the
    # latency target, unrolled, thresholds learnt; its checkpoint runs at that T by default.
    uniform = json.loads((out / "adaptive-uniform" / "metrics.json").read_text())
    T = max(1, int(0.16 * t_conv))
    assert uniform["mode"] == "unrolled" and uniform["timesteps"] == uniform["t_emb"] == T
    assert uniform["latency"] == T and uniform["acs_percent"] == pytest.approx(100.0 * T / t_conv)
    served = load_checkpoint(out / "adaptive-uniform" / "compact")
    assert served.unrolled_timesteps == T
    assert not torch.equal(served.v_th, load_checkpoint(root / "tiny").v_th)


def test_resume_skips_finished_stages_and_single_stage_runs_alone(run):
    root, out = run
    before = (out / "temporal-retrain" / "metrics.json").read_text()
    assert _prune(root / "tiny", out, "two-stage", "--resume") == 0
    assert (out / "temporal-retrain" / "metrics.json").read_text() == before
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    skipped = {e["stage"] for e in events if e.get("event") == "stage_skipped"}
    assert skipped == set(TWO_STAGE)
    # One stage alone, reusing spatial-post's Fisher information.
    assert _prune(root / "tiny", out, "spatial-ablation") == 0
    ablation = json.loads((out / "spatial-ablation" / "metrics.json").read_text())
    assert set(ablation["variants"]) == {"fim", "fim+asr-neurons", "fim+asr-attention", "fim+asr"}


def test_report_tables_and_plots(run):
    root, out = run
    md = root / "docs" / "pruning.md"
    argv = ["report", "--runs", str(root / "runs"), "--out", str(md)]
    if not _has_matplotlib():
        argv.append("--no-plots")
    assert _cli(argv) == 0
    text = md.read_text()
    two_stage = json.loads((out / "temporal-retrain" / "metrics.json").read_text())
    row = next(line for line in text.splitlines() if line.startswith("| Two-stage |"))
    assert f"{two_stage['accuracy']:.2f}" in row and f"{two_stage['acs_percent']:.2f}" in row
    learned = json.loads((out / "thresholds" / "metrics.json").read_text())
    row = next(line for line in text.splitlines() if line.startswith("| + Learned thresholds |"))
    assert f"{learned['accuracy']:.2f} | {learned['acs_percent']:.2f}" in row
    assert "| Adaptive threshold |" in text and "| Joint retraining | - |" in text
    assert "| sst2 | paper | 86.58 | 85 | 87.27 | 41.53 | 86.58 | 13.04 |" in text
    spread = json.loads((out / "noise-alloc" / "metrics.json").read_text())
    row = next(line for line in text.splitlines() if line.startswith("| + Noise-aware timesteps |"))
    assert f"{spread['accuracy']:.2f} | {spread['acs_percent']:.2f}" in row
    # Next to the paper, the pruned model is the noise-aware stage and the adaptive one the
    # uniform-T stage (report.ADAPTIVE_STAGES).
    uniform = json.loads((out / "adaptive-uniform" / "metrics.json").read_text())
    ours = next(line for line in text.splitlines() if line.startswith("| sst2 | ours |"))
    assert f"{spread['accuracy']:.2f} | {spread['acs_percent']:.2f}" in ours
    assert ours.endswith(f"| {uniform['accuracy']:.2f} | {uniform['latency']:.2f} |")
    # The listed commands parse back to the arguments the stages recorded.
    commands = [line for line in text.splitlines() if line.startswith("spikeinfer prune ")]
    recorded = {
        json.dumps(json.loads((out / s / "metrics.json").read_text())["args"])
        for s in ("baseline", "spatial-ablation")
    }
    parsed = set()
    for command in commands:
        parser = argparse.ArgumentParser()
        args = add_prune_parser(parser.add_subparsers()).parse_args(command.split()[2:])
        parsed.add(json.dumps({**dataclasses.asdict(prune_args(args)), "resume": False}))
    recorded = {json.dumps({**json.loads(r), "resume": False}) for r in recorded}
    assert parsed == recorded
    if _has_matplotlib():
        for kind in ("asr", "timesteps", "metric_vs_acs"):
            assert (md.parent / f"pruning_sst2_{kind}.png").stat().st_size > 1000


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_cli_rejects_bad_flags(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _cli(["prune", "--task", "sst2", "--model", "x", "--out", str(tmp_path), "--budget", "2"])
    assert "--budget" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli(["prune", "--task", "sst2", "--model", "x", "--out", "o", "--schedule", "nope"])
    assert "unknown schedule" in capsys.readouterr().err
    teacher = tmp_path / "mrpc-teacher"
    teacher.mkdir()
    (teacher / "teacher_results.json").write_text('{"task": "mrpc"}')
    with pytest.raises(SystemExit):
        _cli(["prune", "--task", "sst2", "--model", "x", "--out", "o", "--teacher", str(teacher)])
    assert "fine-tuned on 'mrpc', not 'sst2'" in capsys.readouterr().err


def test_bundle_pruned_stage_serves_in_its_mode(run, tmp_path):
    from spikeinfer.cli import main

    root, out = run
    folder = tmp_path / "sst2-1bit-pruned"
    argv = ["bundle", "--prune-run", str(out), "--out", str(folder), "--glue-dir", str(GLUE)]
    with pytest.raises(SystemExit, match="--fp-run belongs to --run"):
        main([*argv, "--fp-run", str(root)])
    assert main([*argv, "--backend", "torch", "--seeds", "2"]) == 0
    results = json.loads((folder / "results.json").read_text())
    # By default the two-stage schedule's pruned model: the noise-alloc stage.
    stage = json.loads((out / "noise-alloc" / "metrics.json").read_text())
    assert results["stage"] == "noise-alloc" and results["mode"] == "sequential"
    assert results["baseline"]["acs_percent"] == pytest.approx(100.0)
    assert results["timesteps"] == stage["timesteps"]
    assert any("--schedule two-stage" in c for c in results["commands"])
    spread = results["student_1bit_over_seeds"]
    assert spread["seeds"] == [0, 1]
    # `eval` runs the bundled model in its own mode by default and reproduces results.json
    # (on the whole dev set here, where the stage itself measured only EVAL_LIMIT examples).
    model = load_checkpoint(folder)
    assert model.checkpoint_meta["mode"] == "sequential"
    from spikeinfer.engine import evaluate

    again = evaluate(
        model,
        "sst2",
        glue_dir=GLUE,
        backend="torch",
        batch_size=results["batch_size"],
        progress=False,
    )
    assert again["mode"] == "sequential"
    assert again["accuracy"] == pytest.approx(results["student_1bit"]["accuracy"], abs=1e-9)
    assert again["latency"] == pytest.approx(stage["latency"])
    seed1 = evaluate(
        model,
        "sst2",
        glue_dir=GLUE,
        backend="torch",
        batch_size=results["batch_size"],
        seed=1,
        progress=False,
    )
    pair = [again["accuracy"], seed1["accuracy"]]
    assert spread["accuracy_mean"] == pytest.approx(sum(pair) / 2)
    assert spread["accuracy_std"] == pytest.approx(abs(pair[0] - pair[1]) / 2**0.5)


def test_prune_commands_rebuild_recorded_flags():
    """`report` rebuilds each run's command from the arguments its stages recorded, leaving out
    flags at their defaults; a run recorded before the adaptive stage had its own activity
    weight used the temporal one there, and its command says so."""
    from spikeinfer.prune.schedule import PruneArgs
    from spikeinfer.report import Run, prune_commands

    recorded = dataclasses.asdict(PruneArgs(task="sst2", model="m", out="o"))
    old = {**recorded, "vth_lr": 1e-3, "activity_eta": 1e-3}
    del old["adaptive_activity_eta"]
    new = {**recorded, "schedule": "adaptive", "activity_eta": 0.0}
    run = Run("r", Path("o"), "sst2", {"adaptive": {"args": old}, "later": {"args": new}})
    assert prune_commands(run) == [
        "spikeinfer prune --task sst2 --model m --out o --schedule two-stage --vth-lr 0.001 "
        "--adaptive-activity-eta 0.001",
        "spikeinfer prune --task sst2 --model m --out o --schedule adaptive --activity-eta 0.0",
    ]


def test_bundle_of_a_run_without_thresholds_stage_takes_temporal_retrain(run, tmp_path):
    """Runs made before the thresholds stage existed bundle their temporal-retrain model."""
    from spikeinfer.bundle import bundle_pruned

    _, out = run
    older = tmp_path / "older"
    shutil.copytree(out / "temporal-retrain", older / "temporal-retrain")
    results = bundle_pruned(older, tmp_path / "b", glue_dir=GLUE, backend="torch", limit=8, seeds=1)
    assert results["stage"] == "temporal-retrain"
    with pytest.raises(FileNotFoundError, match="includes 'thresholds'"):
        bundle_pruned(older, tmp_path / "c", stage="thresholds", glue_dir=GLUE, backend="torch")
