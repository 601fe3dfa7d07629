import pytest
import torch

from spikeinfer.teacher import check_teacher_task, default_teacher_path, load_teacher


def test_default_teacher_loads_offline_with_task_head(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    teacher = load_teacher(None, num_labels=3).eval()
    assert teacher.config.model_type == "bert"
    assert teacher.config.num_hidden_layers == 6 and teacher.config.hidden_size == 384
    with torch.no_grad():
        out = teacher(input_ids=torch.tensor([[101, 7592, 102]]))
    assert out.logits.shape == (1, 3)
    assert (default_teacher_path() / "vocab.txt").exists()


def test_non_bert_teacher_is_refused(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="BERT-architecture"):
        load_teacher(str(tmp_path))


def test_missing_teacher_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a checkpoint folder .* finetune-teacher"):
        load_teacher(str(tmp_path / "no-such-teacher"))


def test_a_teacher_fine_tuned_on_another_task_is_refused(tmp_path):
    (tmp_path / "teacher_results.json").write_text('{"task": "mrpc", "teacher_accuracy": 80.0}')
    with pytest.raises(ValueError, match="fine-tuned on 'mrpc', not 'sst2'.*--task sst2"):
        load_teacher(str(tmp_path), 2, task="sst2")
    check_teacher_task(tmp_path, "mrpc")  # its own task passes
