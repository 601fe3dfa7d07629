import os

import torch

if not torch.cuda.is_available():  # the Triton kernels run in the interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from helpers import firing_model  # noqa: E402

from spikeinfer import cli  # noqa: E402
from spikeinfer.checkpoint import save_checkpoint  # noqa: E402
from spikeinfer.validate import compare_outputs, validate  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GLUE = Path(os.environ.get("SPIKEINFER_GLUE_DIR", REPO.parent / "shared" / "data" / "glue"))
needs_glue = pytest.mark.skipif(
    not (GLUE / "SST-2" / "dev.tsv").exists(), reason=f"GLUE data not found at {GLUE}"
)


def word_model(seed=0):
    model = firing_model(seed, vocab_size=30522, max_position_embeddings=128)
    # thresholds away from 1.0: an attention current of exactly sum(p) = 1 is a rounding tie
    with torch.no_grad():
        model.v_th.copy_(torch.linspace(0.8, 1.3, model.v_th.numel()))
    return model


def test_compare_outputs_counts_flips():
    model = word_model()
    ids = torch.randint(1000, 2000, (2, 5))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        a = model(ids, mask, timesteps=4)
        b = model(ids, mask, timesteps=4)
    b.rates["0.K"] = b.rates["0.K"].clone()
    b.rates["0.K"][0, 0, 0] += 0.5  # two spikes more at T = 4
    rows = compare_outputs(a, b, mask.float())
    assert rows["0.K"]["flips"] == 2 and rows["0.K"]["slots"] == 2 * 5 * 32 * 4
    assert rows["0.V"]["flips"] == 0


@needs_glue
@pytest.mark.parametrize("mode", ["unrolled", "sequential"])
def test_triton_backend_validates_on_sst2(mode):
    model = word_model(1)
    model.set_timesteps([[3, 4, 5, 2, 3, 4], [2, 3, 2, 3, 2, 3]], t_emb=3)
    result = validate(
        model,
        "sst2",
        "triton",
        glue_dir=GLUE,
        limit=6,
        batch_size=3,
        mode=mode,
        timesteps=4,
        progress=False,
    )
    assert result["passed"], result
    assert result["n_examples"] == 6 and set(result["sublayers"]) >= {"emb", "1.O2"}


@needs_glue
def test_cli_validate_json(tmp_path, capsys):
    path = save_checkpoint(word_model(2), tmp_path / "m")
    code = cli.main(
        [
            "validate",
            "--backend",
            "triton",
            "--model",
            str(path),
            "--task",
            "sst2",
            "--glue-dir",
            str(GLUE),
            "--limit",
            "3",
            "--timesteps",
            "3",
            "--json",
        ]
    )
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["passed"] and result["backend"] == "triton"


@needs_glue
def test_cli_eval_with_triton_backend(tmp_path, capsys):
    path = save_checkpoint(word_model(3), tmp_path / "m", task="sst2")
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
            "3",
            "--timesteps",
            "2",
            "--backend",
            "triton",
            "--json",
        ]
    )
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["backend"] == "triton" and result["n_examples"] == 3
