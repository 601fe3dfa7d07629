"""How much of the teacher survives a student's initialisation: a linear probe on [CLS] features.

A student copied from the teacher starts with a classifier meant for the teacher's pooler, so its
own dev metric at init says nothing. Instead, fit a logistic regression (LBFGS, L2 1e-3, features
standardised) on the last block's [CLS] values of N training examples and score it on the dev set,
for these features:

    teacher      the fine-tuned teacher's last hidden state (the ceiling)
    unclamped    the student's blocks with rates = currents (the teacher on the kept layers)
    plain        the student's rate surrogate, clamp(I, 0, 1), straight from the teacher
    tail=q       the same after `fit_firing_range(tail=q)`
    ... snn      with --snn-timesteps T: the spiking simulation's [CLS] rates (unrolled, torch
                 backend) of the same student, which the surrogate's figures can hide: softmax
                 and LayerNorm see each step's binary spikes, not the rates

    G=../shared/data/glue
    python bench/probe_init.py --task sst2 --teacher runs/sst2/teacher --glue-dir $G
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from provenance import save_result

from spikeinfer.data import bucket_batches, get_task, load_tokenizer
from spikeinfer.distill import (
    TrainArgs,
    _device_batch,
    calibration_batches,
    init_student_from_teacher,
    load_split,
)
from spikeinfer.firing_range import FFN_THRESHOLDS, fit_firing_range, unclamped_rates
from spikeinfer.metrics import compute_metrics
from spikeinfer.teacher import load_teacher


@torch.no_grad()
def features(fn, encoded):
    xs, ys = [], []
    for idx in bucket_batches(encoded.lengths, 64):
        b = _device_batch(encoded, idx, "cpu")
        xs.append(fn(b))
        ys.append(b["labels"])
    return torch.cat(xs), torch.cat(ys)


def probe(task, num_labels, fn, train, dev) -> dict:
    x_train, y_train = features(fn, train)
    x_dev, y_dev = features(fn, dev)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_dev = (x_train - mean) / std, (x_dev - mean) / std
    linear = torch.nn.Linear(x_train.shape[1], num_labels)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=200)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(x_train), y_train) + 1e-3 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return compute_metrics(task, linear(x_dev).argmax(-1).numpy(), y_dev.numpy())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True)
    p.add_argument("--teacher", required=True)
    p.add_argument("--glue-dir", default=None)
    p.add_argument("--layers", default="0,1,3,5")
    p.add_argument("--tails", default="0.005,0.02,0.05")
    p.add_argument("--train-examples", type=int, default=3000)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--snn-timesteps", type=int, default=0, help="also probe the SNN at this T")
    p.add_argument(
        "--ffn-threshold",
        choices=FFN_THRESHOLDS,
        default="all",
        help="rule for the FFN threshold of the fitted students (spikeinfer.firing_range)",
    )
    p.add_argument("--out", default=None, help="JSON file (default bench/results/probe_init_...)")
    a = p.parse_args()
    torch.manual_seed(0)
    spec = get_task(a.task)
    if spec.is_regression:
        raise SystemExit("probe_init: regression tasks have no classifier to probe")
    teacher = load_teacher(a.teacher, spec.num_labels).eval()
    tokenizer = load_tokenizer(a.teacher)
    args = TrainArgs(task=a.task, out=Path("."), glue_dir=a.glue_dir)
    train = load_split(spec, "train", args, tokenizer, a.max_length, a.train_examples)
    dev = load_split(spec, "dev", args, tokenizer, a.max_length)
    layers = [int(x) for x in a.layers.split(",")]

    def student():
        return init_student_from_teacher(teacher, layers, False, 85, "teacher").eval()

    def teacher_cls(b):
        out = teacher.bert(
            input_ids=b["input_ids"],
            attention_mask=b["attention_mask"],
            token_type_ids=b["token_type_ids"],
        )
        return out.last_hidden_state[:, 0]

    def surrogate_cls(model):
        def fn(b):
            out = model.surrogate(
                b["input_ids"], b["attention_mask"], b["token_type_ids"], output_hidden_states=True
            )
            return out.hidden_states[-1][:, 0]

        return fn

    def snn_cls(model):
        def fn(b):
            out = model(
                b["input_ids"],
                b["attention_mask"],
                b["token_type_ids"],
                timesteps=a.snn_timesteps,
            )
            return out.rates[last][:, 0]

        return fn

    last = f"{len(layers) - 1}.O2"
    copied = student()
    rows = {
        "teacher": teacher_cls,
        "unclamped": lambda b: unclamped_rates(copied, b)[last][:, 0],
        "plain": surrogate_cls(copied),
    }
    if a.snn_timesteps:
        rows["plain snn"] = snn_cls(copied)
    for tail in (float(t) for t in a.tails.split(",") if t):
        model = student()
        fit_firing_range(
            model, calibration_batches(train, args, "cpu"), tail, ffn_threshold=a.ffn_threshold
        )
        rows[f"tail={tail}"] = surrogate_cls(model)
        if a.snn_timesteps:
            rows[f"tail={tail} snn"] = snn_cls(model)
    results = {}
    for name, fn in rows.items():
        results[name] = probe(spec.name, spec.num_labels, fn, train, dev)
        print(name, json.dumps(results[name]), flush=True)
    save_result(
        {
            "benchmark": "probe_init",
            "max_length": a.max_length,
            "task": spec.name,
            "layers": layers,
            "train_examples": len(train),
            "snn_timesteps": a.snn_timesteps,
            "ffn_threshold": a.ffn_threshold,
            "dev_examples": len(dev),
            "results": results,
        },
        a.out,
        f"probe_init_{spec.name}_{len(layers)}l",
    )


if __name__ == "__main__":
    main()
