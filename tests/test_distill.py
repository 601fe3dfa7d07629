import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import batch, firing_model

from spikeinfer.distill import (
    DistillModule,
    TeacherTaps,
    TrainArgs,
    attention_kd_loss,
    distill,
    hidden_kd_loss,
    init_student_from_teacher,
    prediction_kd_loss,
)
from spikeinfer.teacher import default_teacher_path
from spikeinfer.train import DistInfo, linear_warmup_schedule, run_loop

REPO = Path(__file__).resolve().parents[1]
GLUE = Path(os.environ.get("SPIKEINFER_GLUE_DIR", REPO.parent / "shared" / "data" / "glue"))
needs_glue = pytest.mark.skipif(
    not (GLUE / "SST-2" / "train.tsv").exists(), reason=f"GLUE data not found at {GLUE}"
)


def tiny_run(out, **overrides) -> TrainArgs:
    """Training arguments of a few-step run on a slice of GLUE, for the tiny teacher."""
    base = dict(
        task="sst2",
        out=out,
        glue_dir=str(GLUE),
        max_steps=2,
        batch_size=4,
        timesteps=2,
        backend="torch",
        train_limit=16,
        eval_limit=8,
        save_every=1,
    )
    return TrainArgs(**{**base, **overrides})


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A 2-layer random BERT with the real WordPiece tokenizer, saved like a fine-tuned teacher."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=2,
    )
    path = tmp_path_factory.mktemp("teacher")
    BertForSequenceClassification(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(default_teacher_path()).save_pretrained(path)
    return path


def test_student_init_copies_teacher_layers(tiny_teacher):
    from transformers import AutoModelForSequenceClassification

    teacher = AutoModelForSequenceClassification.from_pretrained(tiny_teacher)
    student = init_student_from_teacher(teacher, [1], binary=False, t_conv=8)
    assert not student.embeddings.word_embeddings.weight.requires_grad
    assert student.config.num_layers == 1 and student.config.hidden_size == 32
    layer = teacher.bert.encoder.layer[1]
    assert torch.equal(student.layers[0].ffn1.weight, layer.intermediate.dense.weight)
    assert torch.equal(student.layers[0].ln_o1.bias, layer.attention.output.LayerNorm.bias)
    assert torch.equal(
        student.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight
    )


def test_teacher_scores_match_attention_probabilities(tiny_teacher):
    from transformers import AutoModelForSequenceClassification

    teacher = AutoModelForSequenceClassification.from_pretrained(
        tiny_teacher, attn_implementation="eager"
    ).eval()
    taps = TeacherTaps(teacher, [0, 1])
    ids = torch.randint(1000, 2000, (2, 6))
    b = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "token_type_ids": torch.zeros_like(ids),
    }
    _, hidden, scores = taps(b)
    with torch.no_grad():
        probs = teacher(input_ids=ids, output_attentions=True).attentions
    assert len(hidden) == 3
    for s, p in zip(scores, probs, strict=True):
        assert torch.allclose(torch.softmax(s, -1), p, atol=1e-5)


def test_kd_losses_ignore_padding():
    mask = torch.tensor([[1, 1, 0]])
    s, t = torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3)
    t[..., 2] = 100.0  # only entries touching the padded token differ
    assert attention_kd_loss([s], [t], mask).item() == 0.0
    hs, ht = torch.zeros(1, 3, 4), torch.zeros(1, 3, 4)
    ht[0, 2] = 5.0
    assert hidden_kd_loss([hs], [ht], mask).item() == 0.0
    logits = torch.tensor([[2.0, -1.0]])
    assert prediction_kd_loss(logits, logits, None, False).item() == pytest.approx(
        -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum().item()
    )
    assert prediction_kd_loss(torch.tensor([[1.5]]), None, torch.tensor([2.0]), True).item() == 0.25


def test_asr_swap_forward_values_backward_surrogate():
    """The swapped rates carry the SNN's values but the surrogate's gradients."""
    model = firing_model(seed=1)
    ids, mask, types = batch(1)
    with torch.no_grad():
        snn = model(ids, mask, types, timesteps=5)
    ln = model.embeddings.LayerNorm.weight
    swapped = model.surrogate(ids, mask, types, snn_rates=snn.rates)
    assert torch.equal(swapped.rates["emb"].detach(), snn.rates["emb"])
    (g_swap,) = torch.autograd.grad(swapped.rates["emb"].sum(), ln)
    plain = model.surrogate(ids, mask, types)
    (g_plain,) = torch.autograd.grad(plain.rates["emb"].sum(), ln)
    assert torch.equal(g_swap, g_plain) and g_plain.abs().sum() > 0


def test_ste_reaches_latent_weights_of_1bit_student():
    model = firing_model(seed=2)
    ids, mask, types = batch(2)
    out = model.surrogate(ids, mask, types)
    out.logits.sum().backward()
    for block in model.layers:
        for proj in block.projections():
            assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("moments", [False, True], ids=["rate", "moments"])
def test_few_distillation_steps_lower_the_kd_loss(tiny_teacher, moments):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    teacher = AutoModelForSequenceClassification.from_pretrained(tiny_teacher).eval()
    student = init_student_from_teacher(teacher, [0, 1], binary=True, t_conv=8)
    student.layers[1].ffn2.bias.data += 0.5  # start away from the teacher
    module = DistillModule(student, 32, moments)
    taps = TeacherTaps(teacher, [0, 1])
    ids = torch.randint(1000, 3000, (8, 10))
    b = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "token_type_ids": torch.zeros_like(ids),
        "labels": torch.zeros(8, dtype=torch.long),
    }
    opt = torch.optim.Adam(module.parameters(), lr=3e-3)

    def loss_now():
        t_logits, t_hidden, t_scores = taps(b)
        with torch.no_grad():
            rates = student(ids, timesteps=4).rates
        logits, scores, hidden, _ = module(b, rates, intermediate=True)
        return attention_kd_loss(scores, t_scores, b["attention_mask"]) + hidden_kd_loss(
            hidden, list(t_hidden), b["attention_mask"]
        )

    first = loss_now()
    for _ in range(15):
        opt.zero_grad()
        loss = loss_now()
        loss.backward()
        opt.step()
    assert loss_now().item() < 0.8 * first.item()


def _linear_run(out, *, ema_decay=0.0, stop_at=None, resume=False, total=10, lr=0.002):
    """A few SGD steps of a 4 -> 1 linear model through run_loop. Returns the (step, batch) pairs
    it ran, the weight before every step as the training saw it, the weights every evaluation
    saw, and the module."""
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(module.parameters(), lr=lr)
    sched = linear_warmup_schedule(opt, total, 0.1)
    seen, trained, evaluated = [], [], []

    def step_fn(indices, step):
        if step == stop_at:
            raise KeyboardInterrupt
        seen.append((step, list(indices)))
        trained.append(module.weight.detach().clone())  # the weight after the previous step
        x = torch.tensor([[float(i) for i in indices[:1] * 4]])
        loss = (module(x) - torch.randn(1)).pow(2).sum()
        loss.backward()
        return {"loss": loss.item()}

    def eval_fn(step):
        evaluated.append(module.weight.detach().clone())
        return {}

    try:
        run_loop(
            out=out,
            module=module,
            optimizer=opt,
            scheduler=sched,
            step_fn=step_fn,
            lengths=[3, 5, 2, 7, 4, 4, 6, 1, 9, 8, 2, 3],
            batch_size=4,
            total_steps=total,
            seed=3,
            info=DistInfo(),
            resume=resume,
            save_every=1,
            eval_fn=eval_fn,
            eval_every=4,
            ema_decay=ema_decay,
        )
    except KeyboardInterrupt:
        pass
    return seen, trained, evaluated, module


def test_resume_replays_the_same_step_sequence(tmp_path):
    full, _, _, m_full = _linear_run(tmp_path / "a", lr=0.1)
    first, _, _, _ = _linear_run(tmp_path / "b", stop_at=6, lr=0.1)
    rest, _, _, m_resumed = _linear_run(tmp_path / "b", resume=True, lr=0.1)
    assert first + rest == full  # epochs of 3 batches: crosses two epoch boundaries
    assert torch.equal(m_full.weight.detach(), m_resumed.weight.detach())


def test_weight_average_follows_the_recurrence_and_leaves_training_alone(tmp_path):
    """--ema changes what is evaluated and saved, never the steps: the trained weights are the
    plain run's, the evaluations and the final module see avg_t = d_t avg + (1 - d_t) w_t with
    d_t = min(d, (1 + t) / (10 + t)), and an interrupted run resumes to the same average."""
    _, plain, _, plain_module = _linear_run(tmp_path / "plain")
    _, trained, evaluated, module = _linear_run(tmp_path / "ema", ema_decay=0.5)
    assert all(torch.equal(a, b) for a, b in zip(plain, trained, strict=True))
    final = plain_module.weight.detach()
    after_step = plain[1:] + [final]  # the weight after optimizer steps 1..10
    avg, expected = plain[0].clone(), []
    for t, w in enumerate(after_step, start=1):
        d = min(0.5, (1 + t) / (10 + t))
        avg = d * avg + (1 - d) * w
        expected.append(avg.clone())
    # evaluations after steps 4, 8 and the last
    for seen, want in zip(evaluated, [expected[3], expected[7], expected[9]], strict=True):
        torch.testing.assert_close(seen, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(module.weight.detach(), expected[-1], rtol=0, atol=1e-6)
    assert not torch.allclose(expected[-1], final)  # the average is not the last step's weight

    _linear_run(tmp_path / "cut", ema_decay=0.5, stop_at=6)
    _, _, _, resumed = _linear_run(tmp_path / "cut", ema_decay=0.5, resume=True)
    assert torch.equal(resumed.weight.detach(), module.weight.detach())
    with pytest.raises(ValueError, match="without weight averaging"):
        _linear_run(tmp_path / "plain", ema_decay=0.5, resume=True, total=12)
    with pytest.raises(ValueError, match="with weight averaging"):
        _linear_run(tmp_path / "cut", resume=True)


@needs_glue
def test_distill_stages_and_resume(tiny_teacher, tmp_path):
    args = tiny_run(tmp_path / "run", train_limit=64, eval_limit=16)
    stages = ["fp-pred", "1bit-pred"]
    kwargs = {"stages": stages, "layer_map": [0, 1], "t_conv": 8, "word_embeddings": "teacher"}
    results = distill(args, tiny_teacher, **kwargs)
    assert set(results) == {"fp-pred", "1bit-pred"}
    assert "accuracy" in results["1bit-pred"]["snn"]
    meta = json.loads((tmp_path / "run" / "1bit-pred" / "config.json").read_text())
    assert meta["model"]["binary"] is True and meta["provenance"]["stage"] == "1bit-pred"
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    starts = {r["stage"]: r["init"] for r in log if r["event"] == "stage_start"}
    assert starts == {"fp-pred": "teacher", "1bit-pred": "fp-pred"}
    # the run packages into a servable folder whose results.json matches a fresh evaluation
    from spikeinfer.bundle import bundle
    from spikeinfer.engine import evaluate, load

    (tiny_teacher / "teacher_results.json").write_text(json.dumps({"teacher_accuracy": 50.0}))
    res = bundle(
        tmp_path / "run",
        tiny_teacher,
        tmp_path / "sst2-tiny",
        glue_dir=str(GLUE),
        backend="torch",
        timesteps=(1,),
        limit=16,
    )
    assert set(res["student_1bit_by_timesteps"]) == {"1", "8"} and res["teacher_accuracy"] == 50
    assert res["fp_student"]["run"] == str(tmp_path / "run")
    # a 1-bit run of its own (no fp-pred stage in its log) reports another run's fp student
    shutil.copytree(tmp_path / "run" / "1bit-pred", tmp_path / "only-1bit" / "1bit-pred")
    kw = {"glue_dir": str(GLUE), "backend": "torch", "timesteps": (1,), "limit": 16}
    alone = bundle(tmp_path / "only-1bit", tiny_teacher, tmp_path / "y", **kw)
    assert "fp_student" not in alone
    paired = bundle(
        tmp_path / "only-1bit", tiny_teacher, tmp_path / "z", fp_run=tmp_path / "run", **kw
    )
    assert paired["fp_student"] == res["fp_student"]
    with pytest.raises(FileNotFoundError, match="no evaluation of an fp-pred stage"):
        bundle(tmp_path / "only-1bit", tiny_teacher, tmp_path / "x", fp_run=tmp_path / "only-1bit")
    again = evaluate(
        load(tmp_path / "sst2-tiny"),
        "sst2",
        glue_dir=GLUE,
        backend="torch",
        batch_size=64,
        progress=False,
        limit=16,
    )
    assert again["accuracy"] == res["student_1bit"]["accuracy"]
    args.resume = True  # finished stages are skipped on resume
    again = distill(args, tiny_teacher, **kwargs)
    assert again["1bit-pred"] == results["1bit-pred"]


def test_distill_init_from_another_run(tiny_teacher, tmp_path):
    """--init: the first stage starts from a checkpoint of another run, not from the teacher."""
    from spikeinfer.checkpoint import load_checkpoint

    def args_for(out, lr):
        return tiny_run(out, lr=lr)

    kwargs = {"layer_map": [0, 1], "t_conv": 8, "word_embeddings": "teacher"}
    distill(args_for(tmp_path / "general", 1e-3), tiny_teacher, stages=["fp-inter"], **kwargs)
    source = tmp_path / "general" / "fp-inter"
    with pytest.raises(FileNotFoundError, match="no spikeinfer checkpoint"):
        distill(args_for(tmp_path / "x", 0.0), tiny_teacher, stages=["fp-pred"], init=tmp_path)
    # lr 0: the task stage's weights are exactly the ones it started from
    distill(
        args_for(tmp_path / "task", 0.0), tiny_teacher, stages=["fp-pred"], init=source, **kwargs
    )
    log = [json.loads(line) for line in (tmp_path / "task" / "log.jsonl").read_text().splitlines()]
    assert [r["init"] for r in log if r["event"] == "stage_start"] == [str(source)]
    # the checkpoint records its start and nests the source's provenance: the whole recipe
    task_meta = json.loads((tmp_path / "task" / "fp-pred" / "config.json").read_text())
    source_meta = json.loads((source / "config.json").read_text())
    assert task_meta["provenance"]["init"] == str(source)
    assert task_meta["provenance"]["init_provenance"] == source_meta["provenance"]
    assert source_meta["provenance"]["init"] == "teacher"
    assert source_meta["provenance"]["init_provenance"] is None
    distill(args_for(tmp_path / "plain", 0.0), tiny_teacher, stages=["fp-pred"], **kwargs)
    weight = {
        name: load_checkpoint(folder).layers[0].q_proj.weight
        for name, folder in (
            ("source", source),
            ("task", tmp_path / "task" / "fp-pred"),
            ("plain", tmp_path / "plain" / "fp-pred"),
        )
    }
    assert torch.equal(weight["task"], weight["source"])
    assert not torch.equal(weight["task"], weight["plain"])  # the teacher's, not the source's


@needs_glue
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_torchrun_two_gloo_processes(tiny_teacher, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        "torchrun",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        "-m",
        "spikeinfer",
        "distill",
        "--task",
        "sst2",
        "--glue-dir",
        str(GLUE),
        "--teacher",
        str(tiny_teacher),
        "--out",
        str(tmp_path / "ddp"),
        "--stages",
        "fp-pred",
        "--layers",
        "0,1",
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--timesteps",
        "2",
        "--backend",
        "torch",
        "--train-limit",
        "64",
        "--eval-limit",
        "8",
        "--t-conv",
        "8",
        "--word-embeddings",
        "teacher",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert any(r["event"] == "eval" for r in log)
    assert (tmp_path / "ddp" / "fp-pred" / "model.safetensors").exists()


@needs_glue
def test_distill_augment_trains_on_the_copies(tiny_teacher, tmp_path):
    args = tiny_run(tmp_path / "run", task="mrpc", max_steps=1, train_limit=12, max_length=32)
    kwargs = {"layer_map": [0], "t_conv": 8, "word_embeddings": "teacher"}
    distill(args, tiny_teacher, stages=["fp-pred"], augment=2, **kwargs)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    start = next(r for r in log if r["event"] == "distill_start")
    assert start["train_examples"] == 36 and start["augment"] == 2
    meta = json.loads((tmp_path / "run" / "fp-pred" / "config.json").read_text())
    assert meta["provenance"]["augment"] == 2 and meta["provenance"]["augment_prob"] == 0.4


@needs_glue
def test_projection_carried_through_prediction_stages(tiny_teacher, tmp_path):
    """fp-inter trains the shared hidden projection; fp-pred keeps it frozen and passes it on, so
    1bit-inter starts from the trained projection, not a fresh one."""
    args = tiny_run(tmp_path / "run", lr=1e-2, eval_limit=4)
    kwargs = {"layer_map": [0], "t_conv": 8, "word_embeddings": "teacher"}
    distill(args, tiny_teacher, stages=["fp-inter", "fp-pred"], **kwargs)
    trained, passed_on = (
        torch.load(tmp_path / "run" / stage / "hidden_projection.pt")
        for stage in ("fp-inter", "fp-pred")
    )
    torch.manual_seed(args.seed)  # the seed every stage's fresh projection is drawn with
    fresh = torch.nn.Linear(32, 32).state_dict()
    for name, value in trained.items():
        assert torch.equal(passed_on[name], value), name
        assert not torch.equal(fresh[name], value), name


@needs_glue
def test_pred_hidden_trains_the_projection_in_prediction_stages(tiny_teacher, tmp_path):
    """With pred_hidden > 0 a prediction stage adds the hidden-state KD loss, so its projection
    trains (without it the projection stays as drawn, frozen); a negative weight is refused."""
    kwargs = {"layer_map": [0], "t_conv": 8, "word_embeddings": "teacher"}
    saved = {}
    for weight in (0.0, 1.0):
        args = tiny_run(tmp_path / f"run{weight}", lr=1e-2, eval_limit=4)
        distill(args, tiny_teacher, stages=["fp-pred"], pred_hidden=weight, **kwargs)
        saved[weight] = torch.load(tmp_path / f"run{weight}" / "fp-pred" / "hidden_projection.pt")
    # Both runs draw the same fresh projection (same seed, same draws before it): only the run
    # with the hidden-state loss moves it.
    for name, value in saved[0.0].items():
        assert not torch.equal(saved[1.0][name], value), name
    with pytest.raises(ValueError, match="pred_hidden"):
        distill(tiny_run(tmp_path / "bad"), tiny_teacher, stages=["fp-pred"], pred_hidden=-1.0)


@needs_glue
def test_vth_lr_trains_the_thresholds(tiny_teacher, tmp_path):
    """With vth_lr > 0 every sublayer's V_th is a trained parameter of the 1-bit stage (and is
    saved with it); with 0 the thresholds stay at their initial 1.0. A negative rate is refused.
    (An intermediate stage: its losses reach every sublayer of the tiny random student.)"""
    from spikeinfer.checkpoint import load_checkpoint

    kwargs = {"layer_map": [0], "t_conv": 8, "word_embeddings": "teacher"}
    thresholds = {}
    for vth_lr in (0.0, 0.1):
        out = tmp_path / f"run{vth_lr}"
        distill(
            tiny_run(out, eval_limit=4, timesteps=8),
            tiny_teacher,
            stages=["1bit-inter"],
            vth_lr=vth_lr,
            **kwargs,
        )
        thresholds[vth_lr] = load_checkpoint(out / "1bit-inter").v_th.detach()
    assert torch.equal(thresholds[0.0], torch.ones_like(thresholds[0.0]))
    assert (thresholds[0.1] - 1.0).abs().max() > 1e-3
    with pytest.raises(ValueError, match="vth_lr"):
        distill(tiny_run(tmp_path / "bad"), tiny_teacher, stages=["1bit-inter"], vth_lr=-1.0)


@needs_glue
def test_clamp_leak_changes_training_and_is_recorded(tiny_teacher, tmp_path):
    """The same stage with and without clamp_leak starts from the same student and sees the same
    batches; only the gradients of neurons outside the firing range differ, so the trained
    weights differ. The slope is recorded with the checkpoint; one outside [0, 1] is refused."""
    import json

    from spikeinfer.checkpoint import load_checkpoint

    kwargs = {"layer_map": [0], "t_conv": 8, "word_embeddings": "teacher"}
    weights = {}
    for leak in (0.0, 0.5):
        out = tmp_path / f"run{leak}"
        distill(
            tiny_run(out, eval_limit=4), tiny_teacher, stages=["fp-pred"], clamp_leak=leak, **kwargs
        )
        weights[leak] = load_checkpoint(out / "fp-pred").layers[0].ffn1.weight.detach()
        meta = json.loads((out / "fp-pred" / "config.json").read_text())
        assert meta["provenance"]["clamp_leak"] == leak
    assert not torch.equal(weights[0.0], weights[0.5])
    with pytest.raises(ValueError, match="clamp_leak"):
        distill(tiny_run(tmp_path / "bad"), tiny_teacher, stages=["fp-pred"], clamp_leak=1.5)


@needs_glue
def test_ema_stage_saves_the_average_and_records_it(tiny_teacher, tmp_path):
    """A stage with --ema saves averaged weights (not the plain run's last step), evaluates with
    them and records the decay; a decay outside [0, 1) is refused."""
    import json

    from spikeinfer.checkpoint import load_checkpoint

    kwargs = {"layer_map": [0], "t_conv": 8, "word_embeddings": "teacher", "stages": ["fp-pred"]}
    weights = {}
    for ema in (0.0, 0.9):
        out = tmp_path / f"run{ema}"
        distill(tiny_run(out, eval_limit=4), tiny_teacher, ema=ema, **kwargs)
        weights[ema] = load_checkpoint(out / "fp-pred").layers[0].ffn1.weight.detach()
        meta = json.loads((out / "fp-pred" / "config.json").read_text())
        assert meta["provenance"]["ema"] == ema
    assert not torch.equal(weights[0.0], weights[0.9])
    with pytest.raises(ValueError, match="ema"):
        distill(tiny_run(tmp_path / "bad"), tiny_teacher, ema=1.0, **kwargs)
