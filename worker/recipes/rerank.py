"""Reranking: teach a cross-encoder to score how well a document answers a query.

setup → train → save, on sentence-transformers' CrossEncoderTrainer.

- Data: JSONL rows {"query", "document", "relevance"}; relevance is 0/1 or graded (0..3). The
  model reads query and document together and gives one score.
- Training is listwise (ListNet): one example is a query with all of its documents, and the loss
  is the cross-entropy between the softmax of the model's scores and the softmax of the
  relevances over those documents. So a batch holds spec.batch_size *queries*, graded labels
  count (a 3 should outrank a 1), and only the order within a query is learned: with a fresh
  scoring head this ranks well after far fewer steps than a row-by-row loss. A query whose
  documents all have the same relevance has no order to teach and is not trained on.
- Held-out split by query: every row of a held-out query is held out, so the evaluation ranks
  documents for queries the model never saw. Only queries with a relevant document are held
  out (a ranking with nothing to find has no NDCG).
- Metrics over the held-out queries: NDCG@10 (gain 2^relevance - 1, discount log2(rank + 1))
  and MRR@10 (1 / rank of the first document with relevance above 0). NDCG@10 is the primary one.
  With them `forgetting`: how far the encoder under the scoring head moved on general text
  (worker.encoder_forgetting).
- Methods: full (every weight); lora (adapters on the encoder's linear layers, the fresh
  scoring head trained in full; merged into the weights before saving); head (only the scoring
  head trains).
- The artifact is a CrossEncoder folder: ``CrossEncoder(folder)`` loads it as is. A LoRA
  artifact also keeps the unmerged adapter (the scoring head in its modules_to_save) in its
  adapter/ subfolder.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from datasets import Dataset
from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments
from sentence_transformers.cross_encoder.losses import ListNetLoss
from transformers import PreTrainedModel, set_seed
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
from worker.rows import hold_out_queries, normalised, validation_split
from worker.rows import read_rows as read_jsonl_rows
from worker.spec import TrainSpec

PRIMARY_METRIC = FAMILIES["rerank"].primary_metric
CUTOFF = 10  # the @10 of the metrics: how deep a user looks into a ranking


def run(spec: TrainSpec, reporter: Reporter) -> dict[str, Any]:
    setup = set_up(spec, reporter)
    resume_from, baseline = resume_or_measure(spec, reporter, partial(sentence_models.measure_baseline, setup))
    setup.forgetting.keep_base(baseline.get("probe"))
    step = training.train(setup.trainer, resume_from, reporter)
    metrics_after = evaluate_after_training(setup, step)
    return sentence_models.save(setup, baseline["metrics"], metrics_after, step, usage(setup.spec))


@dataclass
class Setup:
    """What one reranking run trains and evaluates."""

    spec: TrainSpec
    reporter: Reporter
    model: CrossEncoder
    trainer: CrossEncoderTrainer
    progress: ReportProgress
    held_out: list[dict]
    """The held-out rows; empty when nothing is held out (no metrics)."""
    evaluate: Callable[[], dict[str, float]] | None
    """The model's ranking metrics on the held-out queries (None when nothing is held out)."""
    forgetting: ForgettingMeter
    """How far the encoder moved on general text (worker.encoder_forgetting)."""


def set_up(spec: TrainSpec, reporter: Reporter) -> Setup:
    """The queries, the base as a cross-encoder with its method applied, and a trainer over them."""
    reporter.state("preparing")
    set_seed(spec.seed)  # the fresh scoring head is drawn from the seeded generator
    train_lists, held_out = prepare_data(spec, reporter)
    model = load_cross_encoder(spec)
    apply_method(model, spec)
    reporter.params(census(model, spec))
    evaluate = (lambda: ranking_metrics(held_out, predict(model, held_out))) if held_out else None
    forgetting = ForgettingMeter(lambda: model[0].model, model.tokenizer)
    during_training = (lambda: evaluate() | forgetting.if_affordable()) if evaluate else None
    progress = ReportProgress(reporter, during_training, spec.eval_every)
    trainer = RerankTrainer(
        model=model,
        args=training.arguments(spec, CrossEncoderTrainingArguments),
        train_dataset=train_lists,
        # All pairs of a batch in one forward pass (by default it takes batch_size pairs at a
        # time, which is slower and saves no memory: every chunk waits for the backward pass).
        loss=ListNetLoss(model, mini_batch_size=-1),
        callbacks=[progress, Checkpointing(spec, reporter, best_by=PRIMARY_METRIC, higher_is_better=True)],
    )
    trainer.remove_callback(PrinterCallback)  # events go through the reporter, not stdout
    return Setup(spec, reporter, model, trainer, progress, held_out, evaluate, forgetting)


class RerankTrainer(AdapterResume, CrossEncoderTrainer):
    """CrossEncoderTrainer that resumes a LoRA model's checkpoint (see AdapterResume)."""


def evaluate_after_training(setup: Setup, step: int) -> dict[str, float]:
    """The ranking metrics of the held-out queries ({} when nothing is held out), and
    eval_predictions.json."""
    training.without_autocast(setup.trainer, setup.model)
    scores, metrics = [], {}
    if setup.held_out:
        setup.reporter.state("evaluating")
        scores = predict(setup.model, setup.held_out)
        metrics = ranking_metrics(setup.held_out, scores) | setup.forgetting()
        setup.reporter.eval(step, final=True, **metrics)
    write_predictions(Path(setup.spec.output_dir) / "eval_predictions.json", setup.held_out, scores)
    return metrics


# Model -----------------------------------------------------------------------------------------


def load_cross_encoder(spec: TrainSpec) -> CrossEncoder:
    """The base as a cross-encoder with one output (a fresh scoring head unless it has one)."""
    return sentence_models.load(CrossEncoder, spec, "a reranker", "a cross-encoder", num_labels=1)


def apply_method(model: CrossEncoder, spec: TrainSpec) -> None:
    """full: train every weight; head: only the scoring head; lora: adapters + the head."""
    transformer = model[0]
    if spec.method == "full":
        model.requires_grad_(True)
    elif spec.method == "head":
        freeze_all_but_head(transformer.model)
    else:
        from peft import get_peft_model

        # SEQ_CLS keeps the scoring head trainable (peft's modules_to_save).
        config = lora_config(spec, transformer.model, FAMILIES["rerank"].peft_task_type)
        transformer.model = get_peft_model(transformer.model, config)


def freeze_all_but_head(model: PreTrainedModel) -> None:
    """Train only what sits on top of the encoder (model.base_model): the scoring head."""
    model.requires_grad_(False)
    encoder = {id(parameter) for parameter in model.base_model.parameters()}
    for parameter in model.parameters():
        if id(parameter) not in encoder:
            parameter.requires_grad_(True)


def predict(model: CrossEncoder, rows: list[dict]) -> list[float]:
    """One relevance score per row (the sigmoid of the logit, as CrossEncoder.predict gives it)."""
    pairs = [(row["query"], row["document"]) for row in rows]
    return model.predict(pairs, batch_size=64, show_progress_bar=False).tolist()


def usage(spec: TrainSpec) -> str:
    folder = artifact_name(spec)
    note = f"\n\n{sentence_models.ADAPTER_NOTE}" if spec.method == "lora" else ""
    return f"""```python
from sentence_transformers import CrossEncoder

model = CrossEncoder("{folder}")  # this folder, unzipped
query = "How do I reset my password?"
documents = ["Open Settings, then Account, then Reset password.", "Our office is closed on Sundays."]
scores = model.predict([(query, document) for document in documents])  # higher = more relevant
for hit in model.rank(query, documents, return_documents=True):
    print(f"{{hit['score']:.3f}}  {{hit['text']}}")
```{note}"""


# Metrics ---------------------------------------------------------------------------------------


def ranking_metrics(rows: list[dict], scores: list[float]) -> dict[str, float]:
    """NDCG@10 and MRR@10 averaged over the queries of `rows`, ranking each query's documents
    by score (ties keep the rows' order). Queries without a relevant document are skipped."""
    by_query: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for row, score in zip(rows, scores, strict=True):
        by_query[row["query"]].append((score, row["relevance"]))
    ndcg, mrr = [], []
    for pairs in by_query.values():
        ranked = [relevance for _, relevance in sorted(pairs, key=lambda pair: -pair[0])]
        ideal = dcg(sorted(ranked, reverse=True))
        if ideal == 0:
            continue
        ndcg.append(dcg(ranked) / ideal)
        mrr.append(next((1 / rank for rank, rel in enumerate(ranked[:CUTOFF], start=1) if rel > 0), 0.0))
    if not ndcg:
        return {}
    return {"ndcg@10": sum(ndcg) / len(ndcg), "mrr@10": sum(mrr) / len(mrr)}


def dcg(relevances: list[float]) -> float:
    """Discounted cumulative gain of the first CUTOFF documents of a ranking."""
    return sum((2**rel - 1) / math.log2(rank + 1) for rank, rel in enumerate(relevances[:CUTOFF], start=1))


def write_predictions(path: Path, rows: list[dict], scores: list[float]) -> None:
    predictions = [{**row, "score": score} for row, score in zip(rows, scores, strict=True)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(predictions, indent=1) + "\n")


# Data ------------------------------------------------------------------------------------------


def prepare_data(spec: TrainSpec, reporter: Reporter) -> tuple[Dataset, list[dict]]:
    """The training queries as ranked lists, and the held-out rows (split by query)."""
    rows = read_rows(Path(spec.dataset_path))
    require_relevant(rows, "No document has a relevance above 0, so there is nothing to rank first.")
    if spec.validation_path:
        validation = read_rows(Path(spec.validation_path), "the validation file")
        train, held_out = validation_split(rows, validation, spec.drop_validation_overlap)
        require_relevant(
            held_out, "No document in the validation file has a relevance above 0, so no ranking can be scored."
        )
    else:
        train, held_out = split_by_query(rows, spec.validation_fraction, spec.seed)
    lists = query_lists(train)
    if not lists:
        raise UserError(
            "No query has documents of different relevance, so there is no order to learn. Give "
            "each query documents that answer it (relevance 1 or more) and some that do not (0)."
        )
    log_split(reporter, train, lists, held_out)
    return lists, held_out


def require_relevant(rows: list[dict], problem: str) -> None:
    if not any(row["relevance"] > 0 for row in rows):
        raise UserError(
            f"{problem} Mark the documents that answer each query with relevance 1 (or 1-3 for graded relevance)."
        )


def log_split(reporter: Reporter, train: list[dict], lists: Dataset, held_out: list[dict]) -> None:
    queries = len({row["query"] for row in train})
    held_queries = len({row["query"] for row in held_out})
    reporter.log(
        f"{len(lists)} training queries ({sum(map(len, lists['labels']))} rows), "
        f"{held_queries} held-out queries ({len(held_out)} rows)."
    )
    if len(lists) < queries:
        reporter.log(
            f"{queries - len(lists)} training queries are not trained on: all of their documents "
            "have the same relevance, so they teach no order."
        )


def query_lists(rows: list[dict]) -> Dataset:
    """One example per query: its documents and their relevances (queries with an order only)."""
    documents: dict[str, list[str]] = defaultdict(list)
    relevances: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        documents[row["query"]].append(row["document"])
        relevances[row["query"]].append(row["relevance"])
    queries = [query for query, labels in relevances.items() if len(set(labels)) > 1]
    return Dataset.from_dict(
        {
            "query": queries,
            "documents": [documents[query] for query in queries],
            "labels": [relevances[query] for query in queries],
        }
    )


def split_by_query(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held out): a seeded share of the queries that have a relevant document is held
    out with all of its rows; every other row trains."""
    best: dict[str, float] = {}
    for row in rows:
        query = normalised(row["query"])
        best[query] = max(best.get(query, 0.0), row["relevance"])
    return hold_out_queries(rows, [query for query, top in best.items() if top > 0], fraction, seed)


def read_rows(path: Path, source: str = "the dataset") -> list[dict[str, Any]]:
    def keep(row: dict, where: str) -> dict[str, Any]:
        relevance = row.get("relevance")
        if isinstance(relevance, bool) or not isinstance(relevance, int | float) or not 0 <= relevance < math.inf:
            raise UserError(f"{where}: relevance must be a number of at least 0 (got {relevance!r}).")
        return {"query": row["query"], "document": row["document"], "relevance": float(relevance)}

    return read_jsonl_rows(path, ("query", "document"), source, keep)
