"""Embedding training: teach a bi-encoder to place each query next to the text that answers it.

setup → train → save, on sentence-transformers' SentenceTransformerTrainer.

- Data: JSONL rows {"query", "positive", optional "negative"}. Queries and documents are
  encoded separately (one vector each); search then compares vectors with the model's
  similarity (cosine for all-MiniLM-L6-v2).
- Loss: MultipleNegativesRankingLoss. For each query of a batch, a softmax cross-entropy picks
  its positive out of every positive and negative in the batch, so the other rows' documents
  serve as negatives ("in-batch negatives"). Batches never hold the same text twice, so a query
  is not pushed away from its own answer because another row carries it too.
- Hard negatives: when some rows have a negative, every row needs one (the loss takes a fixed
  set of columns): a row without one borrows the positive of another query (seeded), which is
  what in-batch negatives give it anyway.
- Held-out split by query: all rows of a query are on one side. The held-out corpus is the
  held-out positives plus negatives (each text once); each held-out query ranks all of it.
  Metrics: recall@1 and recall@10 (positives found in the top k / min(k, positives of the
  query), so recall@1 is 1 exactly when the top hit is a positive), and MRR@10 (1 / rank of the
  first positive). recall@1 is the primary one.
- Methods: full (every weight); lora (adapters on the encoder's linear layers, merged into the
  weights before saving).
- The artifact is a SentenceTransformer folder: ``SentenceTransformer(folder)`` loads it as is.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from sentence_transformers import (
    SentenceTransformer,
    SentenceTransformerTrainer,
    SentenceTransformerTrainingArguments,
)
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
from sentence_transformers.sentence_transformer.training_args import BatchSamplers
from transformers import set_seed
from transformers.trainer_callback import PrinterCallback

from worker.artifacts import artifact_name, write_card_and_spec
from worker.checkpoints import AdapterResume, Checkpointing, keep_baseline, resume_point
from worker.errors import UserError
from worker.events import Reporter
from worker.models import lora_config
from worker.params import census
from worker.recipes.rerank import ReportProgress
from worker.recipes.sft import bf16_supported, split_rows
from worker.spec import TrainSpec

PRIMARY_METRIC = "recall@1"
CUTOFF = 10  # how deep the metrics look into each ranking


def run(spec: TrainSpec, reporter: Reporter) -> dict[str, Any]:
    # Setup: data, base model, method.
    reporter.state("preparing")
    set_seed(spec.seed)
    train_rows, held_out = prepare_data(spec, reporter)
    model = load_sentence_transformer(spec)
    apply_method(model, spec)
    reporter.params(census(model, spec))
    queries, corpus, relevant = retrieval_task(held_out)
    evaluate = (lambda: retrieval_metrics(relevant, search(model, queries, corpus))) if queries else None
    progress = ReportProgress(reporter, evaluate, spec.eval_every)
    trainer = EmbeddingTrainer(
        model=model,
        args=training_arguments(spec),
        train_dataset=training_dataset(train_rows, spec.seed),
        loss=MultipleNegativesRankingLoss(model),
        callbacks=[progress, Checkpointing(spec, reporter, best_by=PRIMARY_METRIC, higher_is_better=True)],
    )
    trainer.remove_callback(PrinterCallback)  # events go through the reporter, not stdout

    # The untouched model on the held-out queries (a resumed job keeps the one it measured first).
    resume_from, metrics_before = resume_point(spec, reporter)
    if resume_from is None:
        metrics_before = evaluate() if evaluate else {}
        keep_baseline(spec, metrics_before)
        if evaluate:
            reporter.eval(0, baseline=True, **metrics_before)

    # Train, then search the held-out corpus once more.
    reporter.raise_if_stopped()
    trainer.train(resume_from_checkpoint=resume_from)
    reporter.raise_if_stopped()
    # Training ran the forward pass under autocast (accelerate wraps model.forward); the final
    # evaluation and the artifact see the model as a user runs it, in full precision.
    trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    step = trainer.state.global_step
    rankings = []
    metrics_after = {}
    if queries:
        reporter.state("evaluating")
        rankings = search(model, queries, corpus)
        metrics_after = retrieval_metrics(relevant, rankings)
        reporter.eval(step, final=True, **metrics_after)
    write_predictions(Path(spec.output_dir) / "eval_predictions.json", queries, corpus, relevant, rankings)

    # Save.
    reporter.state("exporting")
    result = {
        "train_loss": progress.last_loss,
        "steps": step,
        "primary_metric": PRIMARY_METRIC,
        "metrics_before": metrics_before,
        "metrics_after": metrics_after,
    }
    artifact_dir = export(model, spec, result, Path(spec.output_dir) / "final")
    reporter.artifact(str(artifact_dir), method=spec.method, **result)
    return {**result, "artifact_dir": str(artifact_dir)}


class EmbeddingTrainer(AdapterResume, SentenceTransformerTrainer):
    """SentenceTransformerTrainer that resumes a LoRA model's checkpoint (see AdapterResume)."""


def training_arguments(spec: TrainSpec) -> SentenceTransformerTrainingArguments:
    return SentenceTransformerTrainingArguments(
        output_dir=spec.output_dir,
        per_device_train_batch_size=spec.batch_size,
        learning_rate=spec.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=0.05,  # a ratio of the total steps when below 1
        max_steps=spec.max_steps or -1,
        num_train_epochs=spec.epochs,
        logging_steps=1,
        eval_strategy="no",  # the callback searches the held-out corpus itself
        save_strategy="steps",  # resumable checkpoints; worker.checkpoints signs and prunes them
        save_steps=spec.checkpoint_every,
        report_to="none",
        dataloader_num_workers=0,
        batch_sampler=BatchSamplers.NO_DUPLICATES,  # a duplicate would be a false in-batch negative
        seed=spec.seed,
        data_seed=spec.seed,
        bf16=bf16_supported(),
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )


# Model -----------------------------------------------------------------------------------------


def load_sentence_transformer(spec: TrainSpec) -> SentenceTransformer:
    """The base as a bi-encoder (a plain encoder folder gets mean pooling)."""
    from worker.models import resolve_encoder

    path = resolve_encoder(spec, "an embedding model")
    try:
        model = SentenceTransformer(
            path,
            trust_remote_code=False,
            local_files_only=True,
            model_kwargs={"dtype": torch.float32, "use_safetensors": True},
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"Could not load {spec.base_model} as an embedding model: {exc}") from exc
    model.max_seq_length = min(spec.max_seq_length, model.max_seq_length)
    return model


def apply_method(model: SentenceTransformer, spec: TrainSpec) -> None:
    """full: train every weight; lora: adapters on the encoder, everything else frozen."""
    transformer = model[0]
    if spec.method == "full":
        model.requires_grad_(True)
        return
    from peft import TaskType, get_peft_model

    transformer.model = get_peft_model(
        transformer.model, lora_config(spec, transformer.model, TaskType.FEATURE_EXTRACTION)
    )


def search(model: SentenceTransformer, queries: list[str], corpus: list[str]) -> list[list[tuple[int, float]]]:
    """The top CUTOFF (corpus index, similarity) of each query, best first."""
    encode = dict(batch_size=64, convert_to_tensor=True, show_progress_bar=False)
    scores = model.similarity(model.encode(queries, **encode), model.encode(corpus, **encode))
    top = torch.topk(scores.float(), k=min(CUTOFF, len(corpus)), dim=1)
    return [list(zip(indices.tolist(), values.tolist(), strict=True)) for values, indices in zip(*top, strict=True)]


def export(model: SentenceTransformer, spec: TrainSpec, metrics: dict[str, Any], out_dir: Path) -> Path:
    """A folder SentenceTransformer(folder) loads as is: LoRA is merged into the weights first."""
    transformer = model[0]
    if spec.method == "lora":
        transformer.model = transformer.model.merge_and_unload()
    model.save(str(out_dir), create_model_card=False, safe_serialization=True)
    write_card_and_spec(out_dir, spec, {**metrics, "library": "sentence-transformers"}, usage(spec))
    return out_dir


def usage(spec: TrainSpec) -> str:
    folder = artifact_name(spec)
    return f"""```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("{folder}")  # this folder, unzipped
documents = ["Open Settings, then Account, then Reset password.", "Our office is closed on Sundays."]
document_vectors = model.encode(documents)  # encode the collection once, then search it
query_vectors = model.encode(["How do I reset my password?"])
scores = model.similarity(query_vectors, document_vectors)  # one row per query, higher = closer
print(documents[scores[0].argmax()])
```"""


# Metrics ---------------------------------------------------------------------------------------


def retrieval_task(rows: list[dict]) -> tuple[list[str], list[str], list[set[int]]]:
    """(queries, corpus, relevant): each query once, each positive and negative text once, and
    per query the corpus indices of its positives."""
    corpus_index: dict[str, int] = {}
    for row in rows:
        for text in (row["positive"], row.get("negative")):
            if text is not None:
                corpus_index.setdefault(text, len(corpus_index))
    relevant: dict[str, set[int]] = defaultdict(set)
    for row in rows:
        relevant[row["query"]].add(corpus_index[row["positive"]])
    return list(relevant), list(corpus_index), list(relevant.values())


def retrieval_metrics(relevant: list[set[int]], rankings: list[list[tuple[int, float]]]) -> dict[str, float]:
    """recall@1, recall@10 and MRR@10 averaged over the queries (see the module docstring)."""

    def recall(positives: set[int], ranked: list[int], k: int) -> float:
        return len(positives & set(ranked[:k])) / min(k, len(positives))

    recall_1, recall_10, mrr = [], [], []
    for positives, ranking in zip(relevant, rankings, strict=True):
        ranked = [index for index, _ in ranking[:CUTOFF]]
        recall_1.append(recall(positives, ranked, 1))
        recall_10.append(recall(positives, ranked, CUTOFF))
        mrr.append(next((1 / rank for rank, index in enumerate(ranked, start=1) if index in positives), 0.0))
    count = len(relevant)
    return {"recall@1": sum(recall_1) / count, "recall@10": sum(recall_10) / count, "mrr@10": sum(mrr) / count}


def write_predictions(
    path: Path, queries: list[str], corpus: list[str], relevant: list[set[int]], rankings: list[list]
) -> None:
    """The held-out corpus and, per query, its positives and the top documents with their scores."""
    predictions = {
        "corpus": corpus,
        "queries": [
            {
                "query": query,
                "positives": [corpus[index] for index in sorted(positives)],
                "top": [{"document": corpus[index], "score": score} for index, score in ranking],
            }
            for query, positives, ranking in zip(queries, relevant, rankings, strict=True)
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(predictions, indent=1) + "\n")


# Data ------------------------------------------------------------------------------------------


def prepare_data(spec: TrainSpec, reporter: Reporter) -> tuple[list[dict], list[dict]]:
    """Training and held-out rows, split by query."""
    rows = read_rows(Path(spec.dataset_path))
    if len(rows) < 2:
        raise UserError("The dataset needs at least 2 rows: the other rows' documents are the negatives.")
    if spec.validation_path:
        train, held_out = rows, read_rows(Path(spec.validation_path), "the validation file")
    else:
        queries = list(dict.fromkeys(row["query"] for row in rows))
        _, held = split_rows(queries, spec.validation_fraction, spec.seed)
        train = [row for row in rows if row["query"] not in set(held)]
        held_out = [row for row in rows if row["query"] in set(held)]
    reporter.log(
        f"{len({row['query'] for row in train})} training queries ({len(train)} rows), "
        f"{len({row['query'] for row in held_out})} held-out queries ({len(held_out)} rows)."
    )
    return train, held_out


def training_dataset(rows: list[dict], seed: int) -> Dataset:
    """Columns anchor, positive (and negative, when any row has one): the order the loss reads."""
    columns = {"anchor": [row["query"] for row in rows], "positive": [row["positive"] for row in rows]}
    if any("negative" in row for row in rows):
        rng = random.Random(seed)
        columns["negative"] = [row.get("negative") or borrowed_negative(row, rows, rng) for row in rows]
    return Dataset.from_dict(columns)


def borrowed_negative(row: dict, rows: list[dict], rng: random.Random) -> str:
    """The positive of a random row of another query (a few draws; rows of one query are rare)."""
    for _ in range(20):
        other = rng.choice(rows)
        if other["query"] != row["query"]:
            break
    return other["positive"]


def read_rows(path: Path, source: str = "the dataset") -> list[dict[str, str]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"Line {number} of {source} is not valid JSON: {exc.msg}.") from exc
        if not isinstance(row, dict) or not all(isinstance(row.get(key), str) for key in ("query", "positive")):
            raise UserError(f"Line {number} of {source} needs text fields query and positive.")
        if not isinstance(row.get("negative", ""), str):
            raise UserError(f"Line {number} of {source}: negative must be text.")
        rows.append({key: row[key] for key in ("query", "positive", "negative") if row.get(key)})
    if not rows:
        raise UserError(f"{source[0].upper()}{source[1:]} has no rows.")
    return rows
