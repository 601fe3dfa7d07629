import json

import pytest
import torch
from test_distill import GLUE, needs_glue, tiny_run, tiny_teacher  # noqa: F401 (fixture)

from spikeinfer.distill import attention_kd_loss, distill, init_student_from_teacher
from spikeinfer.firing_range import fit_firing_range, unclamped_rates


def _teacher(path):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(path).eval()


def _batches(n_batches=4, batch=8, length=11, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[: batch // 2, length - 3 :] = 0  # some padded rows
        out.append(
            {
                "input_ids": torch.randint(1000, 5000, (batch, length), generator=gen),
                "attention_mask": mask,
                "token_type_ids": torch.zeros(batch, length, dtype=torch.long),
            }
        )
    return out


def test_firing_range_keeps_the_teachers_function(tiny_teacher):  # noqa: F811
    """Without the clamps the rewritten student computes the same logits, and each sublayer's
    values are affine images of the old ones, now inside the firing range."""
    teacher = _teacher(tiny_teacher)
    student = init_student_from_teacher(teacher, [0, 1], binary=False, t_conv=8).eval()
    probe = _batches(1, seed=1)[0]
    valid = probe["attention_mask"].bool()
    before = unclamped_rates(student, probe)
    logits_before = student.classifier(before["1.O2"][:, 0])
    inside = fit_firing_range(student, _batches(), tail=0.02)
    after = unclamped_rates(student, probe)
    torch.testing.assert_close(
        student.classifier(after["1.O2"][:, 0]), logits_before, rtol=1e-4, atol=1e-5
    )
    for name, old in before.items():
        old, new = old[valid], after[name][valid]  # [tokens, F]
        # per feature new = s * old + c: fit on two tokens, check on all
        s = (new[0] - new[1]) / (old[0] - old[1])
        torch.testing.assert_close(new, s * (old - old[0]) + new[0], rtol=1e-3, atol=1e-4)
        if not name.endswith(".F"):  # LayerNorm, K, V and A values now fill [0, 1]
            assert inside[name] > 0.85, (name, inside[name])
            frac = ((new > 0) & (new < 1)).float().mean()
            assert frac > 0.8, (name, float(frac))
    # thresholds: only F's moved (its GELU output cannot be rescaled from inside)
    moved = (student.v_th != 1).nonzero().flatten().tolist()
    assert moved == [1 + 4, 1 + 6 + 4]
    # a 1-bit student gets the same latent weights (its signs then follow them)
    binary = init_student_from_teacher(teacher, [0, 1], binary=True, t_conv=8)
    fit_firing_range(binary, _batches(), tail=0.02)
    for mine, theirs in zip(binary.layers, student.layers, strict=True):
        torch.testing.assert_close(mine.o_proj.weight, theirs.o_proj.weight)


@pytest.mark.parametrize("rule", ["all", "positive"])
def test_ffn_threshold_rules(tiny_teacher, rule):  # noqa: F811
    """Vth_F is the 1 - tail quantile of every GELU output ("all", floored at 1e-3 when that
    quantile is not positive) or of the positive ones; either way the logits are kept."""
    teacher = _teacher(tiny_teacher)
    student = init_student_from_teacher(teacher, [0, 1], binary=False, t_conv=8).eval()
    calibration = _batches()
    gelu = torch.cat(
        [unclamped_rates(student, b)["0.F"][b["attention_mask"].bool()] for b in calibration]
    ).flatten()
    probe = _batches(1, seed=1)[0]
    logits_before = student.classifier(unclamped_rates(student, probe)["1.O2"][:, 0])
    tail = 0.25
    fit_firing_range(student, calibration, tail=tail, ffn_threshold=rule)
    theta = float(student.v_th[1 + 4])
    if rule == "all":
        expected = max(float(gelu.quantile(1 - tail)), 1e-3)
    else:
        expected = float(gelu[gelu > 0].quantile(1 - tail))
        above = float((gelu[gelu > 0] >= theta).float().mean())
        assert abs(above - tail) < 0.01, above
    assert theta == pytest.approx(expected, rel=1e-5)
    logits_after = student.classifier(unclamped_rates(student, probe)["1.O2"][:, 0])
    torch.testing.assert_close(logits_after, logits_before, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="ffn_threshold"):
        fit_firing_range(student, calibration, ffn_threshold="median")


def test_firing_range_refuses_students_it_cannot_rewrite(tiny_teacher):  # noqa: F811
    teacher = _teacher(tiny_teacher)

    def fresh():
        return init_student_from_teacher(teacher, [0], binary=True, t_conv=8)

    with pytest.raises(ValueError, match="tail"):
        fit_firing_range(fresh(), _batches(), tail=0.5)
    with pytest.raises(ValueError, match="frozen"):
        fit_firing_range(fresh().freeze_binary(), _batches())
    masked = fresh()
    masked.head_mask[0, 1] = 0
    with pytest.raises(ValueError, match="unmasked"):
        fit_firing_range(masked, _batches())
    moved = fresh()
    with torch.no_grad():
        moved.v_th[3] = 0.5
    with pytest.raises(ValueError, match="threshold at 1"):
        fit_firing_range(moved, _batches())
    with pytest.raises(ValueError, match="calibration batch"):
        fit_firing_range(fresh(), [])


def test_centred_attention_kd_ignores_a_constant_per_query():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    teacher = torch.randn(2, 3, 4, 4)
    shift = torch.randn(2, 3, 4, 1)  # one constant per query row
    shifted = teacher + shift
    assert attention_kd_loss([shifted], [teacher], mask, centred=True).item() < 1e-10
    assert attention_kd_loss([shifted], [teacher], mask).item() > 0.1
    # padded keys take no part in a row's mean
    student = teacher.clone()
    student[0, :, :, 3] += 100.0
    assert attention_kd_loss([student], [teacher], mask, centred=True).item() < 1e-10
    assert attention_kd_loss([teacher + 1.0], [teacher], mask, centred=True).item() < 1e-10


@needs_glue
def test_distill_with_firing_range_logs_and_records_it(tiny_teacher, tmp_path):  # noqa: F811
    args = tiny_run(tmp_path / "run")
    kwargs = {"layer_map": [0, 1], "t_conv": 8, "word_embeddings": "teacher"}
    distill(
        args,
        tiny_teacher,
        stages=["fp-inter", "fp-pred"],
        firing_range=0.02,
        attention_kd="centred",
        **kwargs,
    )
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    fitted = [r for r in log if r["event"] == "firing_range"]
    # only the stage that starts from the teacher is rewritten; fp-pred continues from fp-inter
    assert [r["stage"] for r in fitted] == ["fp-inter"] and fitted[0]["tail"] == 0.02
    starts = {r["stage"]: r["firing_range_fitted"] for r in log if r["event"] == "stage_start"}
    assert starts == {"fp-inter": True, "fp-pred": False}
    assert set(fitted[0]["inside"]) >= {"emb", "0.K", "1.O2"}
    meta = json.loads((tmp_path / "run" / "fp-pred" / "config.json").read_text())
    assert meta["provenance"]["firing_range"] == 0.02
    assert meta["provenance"]["attention_kd"] == "centred"
    with pytest.raises(ValueError, match="attention_kd"):
        distill(args, tiny_teacher, attention_kd="kl", **kwargs)
    with pytest.raises(ValueError, match="firing_range"):
        distill(args, tiny_teacher, firing_range=0.5, **kwargs)
    with pytest.raises(ValueError, match="ffn_threshold"):
        distill(args, tiny_teacher, firing_range=0.02, ffn_threshold="median", **kwargs)
