"""Evaluate models on a test set: the base and any of a user's fine-tunes, every row, the task's
metrics for each, and what each model made of each row (so a user sees which rows got worse).

An evaluation runs on the training worker as a job does (queued, leased, cancellable, progress
events), from an EvalSpec the web app writes. The metrics are the recipes' own:
- Instruction tuning: the reference reply's loss and perplexity under each model, every row
  rendered and masked as the SFT recipe trains it (worker.recipes.sft.tokenize_example); and each
  model's greedy reply to the first GENERATED_ROWS rows, with exact_match (the reply, stripped,
  equals the reference).
- Classification (classify, pair): accuracy, macro F1 (and F1, AUROC for two labels) by
  worker.recipes.classify.classification_metrics, on the predicted label of each row. The base of a
  classifier is the untrained head the job measured at step 0 (its seed, its labels).
Other families are refused with a message: evaluating them on a test set is not built yet.

Per row, `rows.json` (and `rows.csv`, safe to open in a spreadsheet) hold the row's input, its
reference and, per model, its output and score (loss for instruction tuning, lower is better;
1/0 for a right/wrong label); `change` is the last model's score against the first's.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.errors import Cancelled, UserError
from worker.events import Reporter
from worker.rows import read_rows
from worker.spec import EVALUATION_TASKS, EvalModel, EvalSpec, TrainSpec

GENERATED_ROWS = 50
"""Rows each causal model also answers greedily (generation is the slow part on a CPU)."""
MAX_NEW_TOKENS = 64
MAX_ROWS = 2000
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


@dataclass
class Scored:
    metrics: dict[str, float]
    outputs: list[str]
    scores: list[float | None] = field(default_factory=list)


def run(spec: EvalSpec, reporter: Reporter) -> dict[str, Any]:
    if spec.task not in EVALUATION_TASKS:
        raise UserError(f"Evaluating on a test set covers instruction tuning and classification so far, not {spec.task}.")
    reporter.state("preparing")
    rows = _rows(spec)
    reporter.log(f"{len(rows)} test rows, {len(spec.models)} models.")
    reporter.state("evaluating")
    scored = []
    for index, model in enumerate(spec.models):
        if reporter.stop_requested.is_set():
            raise Cancelled()
        result = SCORERS[spec.task](model, rows, spec)
        scored.append(result)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items())
        reporter.log(f"{model.label}: {shown}")
        reporter.metric(index + 1, total_steps=len(spec.models))
    out = Path(spec.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = row_records(spec, rows, scored)
    (out / "rows.json").write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n")
    write_csv(out / "rows.csv", spec, records)
    leaderboard = [{"label": m.label, "job_id": m.job_id, "metrics": s.metrics}
                   for m, s in zip(spec.models, scored, strict=True)]
    reporter.state("exporting")
    return {"evaluation": True, "task": spec.task, "rows": len(rows), "leaderboard": leaderboard,
            "rows_json": str(out / "rows.json"), "rows_csv": str(out / "rows.csv")}


def _rows(spec: EvalSpec) -> list[dict]:
    if spec.task == "sft":
        from worker.recipes.sft import _sft_row

        rows = read_rows(Path(spec.dataset_path), (), keep=_sft_row, fields_named="instruction and response, or messages")
    else:
        from worker.recipes import classify

        rows = classify.read_rows(Path(spec.dataset_path), classify.FIELDS[spec.task], "the test set")
    if not rows:
        raise UserError("The test set has no rows.")
    return rows[:MAX_ROWS]


# Instruction tuning ---------------------------------------------------------------------------


def score_causal(model: EvalModel, rows: list[dict], spec: EvalSpec) -> Scored:
    import torch

    from worker.conversations import template_prompt
    from worker.generation import generate_replies
    from worker.recipes.sft import tokenize_example

    network, tokenizer = _causal_model(model)
    network.eval()
    losses: list[float | None] = []
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            example = tokenize_example(row, tokenizer, spec.max_seq_length)
            if example is None:
                losses.append(None)
                continue
            ids = torch.tensor([example["input_ids"]])
            labels = torch.tensor([example["labels"]])
            logits = network(input_ids=ids).logits[:, :-1].float()
            target = labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="sum")
            tokens = int((target != -100).sum())
            losses.append(nll.item() / tokens)
            total, count = total + nll.item(), count + tokens
    prompts = [template_prompt(row, tokenizer) for row in rows[:GENERATED_ROWS]]
    replies = []
    for start in range(0, len(prompts), spec.batch_size):
        batch = prompts[start : start + spec.batch_size]
        replies += generate_replies(network, tokenizer, [m for m, _ in batch], [t for _, t in batch],
                                    max_new_tokens=MAX_NEW_TOKENS)
    references = [reference(row) for row in rows[: len(replies)]]
    exact = sum(reply.strip() == ref.strip() for reply, ref in zip(replies, references, strict=True))
    loss = total / count if count else float("nan")
    metrics = {"eval_loss": loss, "perplexity": math.exp(loss) if count else float("nan"),
               "exact_match": exact / len(replies) if replies else 0.0}
    return Scored(metrics, replies + [""] * (len(rows) - len(replies)), losses)


def _causal_model(model: EvalModel):
    from worker.models import load_causal_lm

    spec = TrainSpec.from_dict(model.spec)
    final = Path(model.final_dir) if model.final_dir else None
    if final and not (final / "adapter_config.json").is_file():
        spec.base_model = str(final)  # a full fine-tune is its own model
        return load_causal_lm(spec)
    network, tokenizer = load_causal_lm(spec)
    if final:
        from peft import PeftModel

        network = PeftModel.from_pretrained(network, final)
    return network, tokenizer


def reference(row: dict) -> str:
    if "messages" in row:
        return row["messages"][-1].get("content") or ""
    return row.get("response", "")


def prompt_text(row: dict) -> str:
    if "messages" in row:
        users = [m for m in row["messages"] if m["role"] == "user"]
        return users[-1]["content"] if users else ""
    return row.get("instruction", "")


# Classification -------------------------------------------------------------------------------


def score_classifier(model: EvalModel, rows: list[dict], spec: EvalSpec) -> Scored:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    from worker.models import load_sequence_classifier
    from worker.recipes.classify import classification_metrics, encode_rows, predict

    if model.final_dir:
        network = AutoModelForSequenceClassification.from_pretrained(model.final_dir, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(model.final_dir)
        labels = [network.config.id2label[i] for i in range(network.config.num_labels)]
    else:
        from transformers import set_seed

        train_spec = TrainSpec.from_dict(model.spec)
        labels = model.labels
        set_seed(train_spec.seed)  # the untrained head the job measured at step 0
        network, tokenizer = load_sequence_classifier(train_spec, labels)
    unknown = sorted({row["label"] for row in rows} - set(labels))
    if unknown:
        raise UserError(f"The test set has labels {model.label} was not trained on: {', '.join(unknown[:5])} "
                        f"(it knows {', '.join(labels)}).")
    examples = encode_rows(rows, tokenizer, labels, spec.max_seq_length, spec.task)
    probabilities, loss = predict(network, examples, DataCollatorWithPadding(tokenizer), spec.batch_size)
    gold = [example["labels"] for example in examples]
    metrics, _ = classification_metrics(probabilities, gold, labels)
    predicted = probabilities.argmax(-1).tolist()
    return Scored({**metrics, "eval_loss": loss}, [labels[i] for i in predicted],
                  [float(p == g) for p, g in zip(predicted, gold, strict=True)])


SCORERS = {"sft": score_causal, "classify": score_classifier, "pair": score_classifier}


# Per-row records ------------------------------------------------------------------------------


def row_records(spec: EvalSpec, rows: list[dict], scored: list[Scored]) -> list[dict]:
    """Each row: its input, its reference, each model's output and score, and the change of the
    last model's score from the first's (for a loss, lower is better: the change's sign is
    flipped so that a positive change is always an improvement)."""
    records = []
    for index, row in enumerate(rows):
        if spec.task == "sft":
            text, gold = prompt_text(row), reference(row)
        else:
            text = row["text"] if spec.task == "classify" else f"{row['text_a']} || {row['text_b']}"
            gold = row["label"]
        outputs = [{"output": s.outputs[index], "score": s.scores[index]} for s in scored]
        first, last = outputs[0]["score"], outputs[-1]["score"]
        change = None if first is None or last is None else (first - last if spec.task == "sft" else last - first)
        records.append({"row": index + 1, "input": text, "reference": gold, "models": outputs, "change": change})
    return records


def spreadsheet_safe(value: Any) -> Any:
    """Text a spreadsheet would run as a formula (=, +, -, @ first) is kept as text."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def write_csv(path: Path, spec: EvalSpec, records: list[dict]) -> None:
    header = ["row", "input", "reference"]
    for model in spec.models:
        header += [f"{model.label}: output", f"{model.label}: score"]
    header.append("change")
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([spreadsheet_safe(name) for name in header])
        for record in records:
            cells = [record["row"], record["input"], record["reference"]]
            for output in record["models"]:
                cells += [output["output"], output["score"]]
            cells.append(record["change"])
            writer.writerow([spreadsheet_safe(cell) for cell in cells])
