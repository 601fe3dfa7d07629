"""Does the student fail to fit its teacher, or fail to generalise? Accuracy of the teacher, the
student's rate surrogate and its spiking simulation (unrolled, at the model's own T), and how
often the student's label is the teacher's, on training examples (the distillation's own data)
and on the dev set.

The training sample is the first `--train-examples` training examples of at least
`--min-words` words (SST-2's training set is mostly short phrases; its dev set whole sentences).

    G=../shared/data/glue
    python bench/teacher_agreement.py --task sst2 --glue-dir $G --teacher runs/sst2/teacher \\
        --model models/sst2-1bit --min-words 18 --train-examples 1000
"""

from __future__ import annotations

import argparse
import json

import torch
from provenance import save_result
from transformers import AutoModelForSequenceClassification

from spikeinfer.data import bucket_batches, collate, get_task, load_glue, load_tokenizer, tokenize
from spikeinfer.engine import device_name, load


@torch.inference_mode()
def labels_of(teacher, student, encoded, timesteps: int, batch_size: int = 64):
    """(teacher, surrogate, SNN) predicted labels in the order of `encoded`."""
    n = len(encoded.input_ids)
    preds = {name: torch.empty(n, dtype=torch.long) for name in ("teacher", "surrogate", "snn")}
    for idx in bucket_batches(encoded.lengths, batch_size):
        b = collate(encoded, idx)
        ids, mask, types = b["input_ids"], b["attention_mask"], b["token_type_ids"]
        rows = torch.as_tensor(idx)
        out = teacher(input_ids=ids, attention_mask=mask, token_type_ids=types)
        preds["teacher"][rows] = out.logits.argmax(-1)
        preds["surrogate"][rows] = student.surrogate(ids, mask, types).logits.argmax(-1)
        preds["snn"][rows] = student(ids, mask, types, timesteps=timesteps).logits.argmax(-1)
    return preds


def summary(preds: dict, gold: torch.Tensor) -> dict:
    def pct(x):
        return round(100 * float(x.float().mean()), 2)

    teacher_right = preds["teacher"] == gold
    return {
        "n_examples": len(gold),
        **{f"{name}_accuracy": pct(p == gold) for name, p in preds.items()},
        "snn_agrees_with_teacher": pct(preds["snn"] == preds["teacher"]),
        "surrogate_agrees_with_teacher": pct(preds["surrogate"] == preds["teacher"]),
        "snn_accuracy_where_teacher_right": pct((preds["snn"] == gold)[teacher_right]),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True)
    p.add_argument("--glue-dir", default=None)
    p.add_argument("--teacher", required=True, help="the fine-tuned teacher folder")
    p.add_argument("--model", required=True, help="student checkpoint or bundled model name")
    p.add_argument("--min-words", type=int, default=18)
    p.add_argument("--train-examples", type=int, default=1000)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--backend", default="cpu", help="backend of the spiking simulation")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    spec = get_task(a.task)
    if spec.is_regression:
        raise SystemExit(f"{spec.name} is a regression task: there are no labels to agree on")
    tokenizer = load_tokenizer(a.teacher)
    teacher = AutoModelForSequenceClassification.from_pretrained(a.teacher).eval()
    student = load(a.model).eval().to_backend(a.backend)
    timesteps = student.unrolled_timesteps
    text = spec.text_columns
    train = load_glue(spec.name, "train", a.glue_dir)
    long_enough = [
        i
        for i, row in enumerate(train.select_columns(list(text)))
        if sum(len(str(row[c]).split()) for c in text) >= a.min_words
    ][: a.train_examples]
    splits = {"train": train.select(long_enough), "dev": load_glue(spec.name, "dev", a.glue_dir)}
    result = {}
    for name, dataset in splits.items():
        encoded = tokenize(dataset, spec.name, tokenizer, max_length=a.max_length)
        preds = labels_of(teacher, student, encoded, timesteps)
        result[name] = summary(preds, torch.as_tensor(dataset["label"]))
        print(name, json.dumps(result[name]), flush=True)
    save_result(
        {
            "benchmark": "teacher_agreement",
            "task": spec.name,
            "model": a.model,
            "teacher": a.teacher,
            "timesteps": timesteps,
            "min_words": a.min_words,
            "backend": a.backend,
            "device": device_name(torch.device("cpu")),
            **result,
        },
        a.out,
        f"teacher_agreement_{spec.name}",
    )


if __name__ == "__main__":
    main()
