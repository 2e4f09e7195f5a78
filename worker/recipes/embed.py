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
  first positive). recall@1 is the primary one. With them `forgetting` (how far the encoder moved
  on general text) and general_gold_rho (how well its similarities order the probe's everyday
  sentence pairs against a person's scores): worker.encoder_forgetting.
- Methods: full (every weight); lora (adapters on the encoder's linear layers, merged into the
  weights before saving).
- The artifact is a SentenceTransformer folder: ``SentenceTransformer(folder)`` loads it as is.
  A LoRA artifact also keeps the unmerged adapter of the encoder in its adapter/ subfolder.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
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

from worker import sentence_models, training
from worker.artifacts import artifact_name
from worker.checkpointing import AdapterResume, Checkpointing
from worker.checkpoints import resume_or_measure
from worker.encoder_forgetting import ForgettingMeter
from worker.errors import UserError
from worker.events import Reporter
from worker.families import FAMILIES
from worker.models import lora_config
from worker.params import census
from worker.progress import ReportProgress
from worker.rows import hold_out_queries, validation_split
from worker.rows import read_rows as read_jsonl_rows
from worker.spec import TrainSpec

PRIMARY_METRIC = FAMILIES["embed"].primary_metric
CUTOFF = 10  # how deep the metrics look into each ranking


def run(spec: TrainSpec, reporter: Reporter) -> dict[str, Any]:
    setup = set_up(spec, reporter)
    resume_from, baseline = resume_or_measure(spec, reporter, partial(sentence_models.measure_baseline, setup))
    setup.forgetting.keep_base(baseline.get("probe"))
    step = training.train(setup.trainer, resume_from, reporter)
    metrics_after = evaluate_after_training(setup, step)
    return sentence_models.save(setup, baseline["metrics"], metrics_after, step, usage(setup.spec))


@dataclass
class Setup:
    """What one embedding run trains and evaluates."""

    spec: TrainSpec
    reporter: Reporter
    model: SentenceTransformer
    trainer: SentenceTransformerTrainer
    progress: ReportProgress
    queries: list[str]
    """The held-out queries (empty when nothing is held out: no metrics)..."""
    corpus: list[str]
    """...the held-out corpus they search..."""
    relevant: list[set[int]]
    """...and per query the corpus indices of its positives (retrieval_task)."""
    evaluate: Callable[[], dict[str, float]] | None
    """The model's retrieval metrics on the held-out queries (None when nothing is held out)."""
    forgetting: ForgettingMeter
    """How far the encoder moved on general text (worker.encoder_forgetting)."""

    def search(self) -> list[list[tuple[int, float]]]:
        return search(self.model, self.queries, self.corpus)


def set_up(spec: TrainSpec, reporter: Reporter) -> Setup:
    """The rows, the base as a bi-encoder with its method applied, and a trainer over them."""
    reporter.state("preparing")
    set_seed(spec.seed)
    train_rows, held_out = prepare_data(spec, reporter)
    model = load_sentence_transformer(spec)
    apply_method(model, spec)
    reporter.params(census(model, spec))
    queries, corpus, relevant = retrieval_task(held_out)
    evaluate = (lambda: retrieval_metrics(relevant, search(model, queries, corpus))) if queries else None
    forgetting = ForgettingMeter(lambda: model[0].model, model.tokenizer, gold=True)
    during_training = (lambda: evaluate() | forgetting.if_affordable()) if evaluate else None
    progress = ReportProgress(reporter, during_training, spec.eval_every)
    trainer = EmbeddingTrainer(
        model=model,
        # A duplicate in a batch would be a false in-batch negative.
        args=training.arguments(spec, SentenceTransformerTrainingArguments, batch_sampler=BatchSamplers.NO_DUPLICATES),
        train_dataset=training_dataset(train_rows, spec.seed),
        loss=MultipleNegativesRankingLoss(model),
        callbacks=[progress, Checkpointing(spec, reporter, best_by=PRIMARY_METRIC, higher_is_better=True)],
    )
    trainer.remove_callback(PrinterCallback)  # events go through the reporter, not stdout
    return Setup(spec, reporter, model, trainer, progress, queries, corpus, relevant, evaluate, forgetting)


class EmbeddingTrainer(AdapterResume, SentenceTransformerTrainer):
    """SentenceTransformerTrainer that resumes a LoRA model's checkpoint (see AdapterResume)."""


def evaluate_after_training(setup: Setup, step: int) -> dict[str, float]:
    """The retrieval metrics of the held-out queries ({} when nothing is held out), and
    eval_predictions.json."""
    training.without_autocast(setup.trainer, setup.model)
    rankings, metrics = [], {}
    if setup.queries:
        setup.reporter.state("evaluating")
        rankings = setup.search()
        metrics = retrieval_metrics(setup.relevant, rankings) | setup.forgetting()
        setup.reporter.eval(step, final=True, **metrics)
    path = Path(setup.spec.output_dir) / "eval_predictions.json"
    write_predictions(path, setup.queries, setup.corpus, setup.relevant, rankings)
    return metrics


# Model -----------------------------------------------------------------------------------------


def load_sentence_transformer(spec: TrainSpec) -> SentenceTransformer:
    """The base as a bi-encoder (a plain encoder folder gets mean pooling)."""
    return sentence_models.load(SentenceTransformer, spec, "an embedding model", "an embedding model")


def apply_method(model: SentenceTransformer, spec: TrainSpec) -> None:
    """full: train every weight; lora: adapters on the encoder, everything else frozen."""
    transformer = model[0]
    if spec.method == "full":
        model.requires_grad_(True)
        return
    from peft import get_peft_model

    transformer.model = get_peft_model(
        transformer.model, lora_config(spec, transformer.model, FAMILIES["embed"].peft_task_type)
    )


def search(model: SentenceTransformer, queries: list[str], corpus: list[str]) -> list[list[tuple[int, float]]]:
    """The top CUTOFF (corpus index, similarity) of each query, best first."""
    encode = dict(batch_size=64, convert_to_tensor=True, show_progress_bar=False)
    scores = model.similarity(model.encode(queries, **encode), model.encode(corpus, **encode))
    top = torch.topk(scores.float(), k=min(CUTOFF, len(corpus)), dim=1)
    return [list(zip(indices.tolist(), values.tolist(), strict=True)) for values, indices in zip(*top, strict=True)]


def usage(spec: TrainSpec) -> str:
    folder = artifact_name(spec)
    note = f"\n\n{sentence_models.ADAPTER_NOTE}" if spec.method == "lora" else ""
    return f"""```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("{folder}")  # this folder, unzipped
documents = ["Open Settings, then Account, then Reset password.", "Our office is closed on Sundays."]
document_vectors = model.encode(documents)  # encode the collection once, then search it
query_vectors = model.encode(["How do I reset my password?"])
scores = model.similarity(query_vectors, document_vectors)  # one row per query, higher = closer
print(documents[scores[0].argmax()])
```{note}"""


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
        validation = read_rows(Path(spec.validation_path), "the validation file")
        train, held_out = validation_split(rows, validation, spec.drop_validation_overlap)
    else:
        queries = list(dict.fromkeys(row["query"] for row in rows))
        train, held_out = hold_out_queries(rows, queries, spec.validation_fraction, spec.seed)
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
    def keep(row: dict, where: str) -> dict[str, str]:
        if not isinstance(row.get("negative", ""), str):
            raise UserError(f"{where}: negative must be text.")
        return {key: row[key] for key in ("query", "positive", "negative") if row.get(key)}

    return read_jsonl_rows(path, ("query", "positive"), source, keep)
