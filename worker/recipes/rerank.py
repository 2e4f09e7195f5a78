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
- Methods: full (every weight); lora (adapters on the encoder's linear layers, the fresh
  scoring head trained in full; merged into the weights before saving); head (only the scoring
  head trains).
- The artifact is a CrossEncoder folder: ``CrossEncoder(folder)`` loads it as is.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments
from sentence_transformers.cross_encoder.losses import ListNetLoss
from transformers import PreTrainedModel, TrainerCallback, set_seed
from transformers.trainer_callback import PrinterCallback

from worker.artifacts import artifact_name, write_card_and_spec
from worker.checkpoints import AdapterResume, Checkpointing, keep_baseline, resume_point
from worker.errors import UserError
from worker.events import Reporter
from worker.models import lora_config
from worker.params import census
from worker.recipes.sft import bf16_supported, split_rows
from worker.spec import TrainSpec

PRIMARY_METRIC = "ndcg@10"
CUTOFF = 10  # the @10 of the metrics: how deep a user looks into a ranking


def run(spec: TrainSpec, reporter: Reporter) -> dict[str, Any]:
    # Setup: data, base model, method.
    reporter.state("preparing")
    set_seed(spec.seed)  # the fresh scoring head is drawn from the seeded generator
    train_lists, held_out = prepare_data(spec, reporter)
    model = load_cross_encoder(spec)
    apply_method(model, spec)
    reporter.params(census(model, spec))
    evaluate = (lambda: ranking_metrics(held_out, predict(model, held_out))) if held_out else None
    progress = ReportProgress(reporter, evaluate, spec.eval_every)
    trainer = RerankTrainer(
        model=model,
        args=training_arguments(spec),
        train_dataset=train_lists,
        # All pairs of a batch in one forward pass (by default it takes batch_size pairs at a
        # time, which is slower and saves no memory: every chunk waits for the backward pass).
        loss=ListNetLoss(model, mini_batch_size=-1),
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

    # Train, then rank the held-out queries once more.
    reporter.raise_if_stopped()
    trainer.train(resume_from_checkpoint=resume_from)
    reporter.raise_if_stopped()
    # Training ran the forward pass under autocast (accelerate wraps model.forward); the final
    # evaluation and the artifact see the model as a user runs it, in full precision.
    trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    step = trainer.state.global_step
    scores = []
    metrics_after = {}
    if held_out:
        reporter.state("evaluating")
        scores = predict(model, held_out)
        metrics_after = ranking_metrics(held_out, scores)
        reporter.eval(step, final=True, **metrics_after)
    write_predictions(Path(spec.output_dir) / "eval_predictions.json", held_out, scores)

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


class RerankTrainer(AdapterResume, CrossEncoderTrainer):
    """CrossEncoderTrainer that resumes a LoRA model's checkpoint (see AdapterResume)."""


class ReportProgress(TrainerCallback):
    """Trainer events → reporter events, an evaluation every `every` steps (run in the training
    precision), and a requested stop ends training after the current step."""

    def __init__(self, reporter: Reporter, evaluate: Callable[[], dict[str, float]] | None, every: int):
        self.reporter = reporter
        self.evaluate = evaluate
        self.every = every
        self.last_loss: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.reporter.state("training")

    def on_step_end(self, args, state, control, **kwargs):
        if self.reporter.stop_requested.is_set():
            control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        self.last_loss = float(logs["loss"])
        values = {key: float(logs[key]) for key in ("learning_rate", "grad_norm") if key in logs}
        step = state.global_step
        self.reporter.metric(
            step, loss=self.last_loss, total_steps=state.max_steps, epoch=round(float(state.epoch or 0), 4), **values
        )
        # After the step's loss, like the Trainer's own evaluation; the last step is evaluated
        # by the recipe (final=True), and a stopping run is not evaluated at all.
        if self.evaluate and step % self.every == 0 and not control.should_training_stop:
            self.reporter.eval(step, **self.evaluate())


def training_arguments(spec: TrainSpec) -> CrossEncoderTrainingArguments:
    return CrossEncoderTrainingArguments(
        output_dir=spec.output_dir,
        per_device_train_batch_size=spec.batch_size,
        learning_rate=spec.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=0.05,  # a ratio of the total steps when below 1
        max_steps=spec.max_steps or -1,
        num_train_epochs=spec.epochs,
        logging_steps=1,
        eval_strategy="no",  # the callback ranks the held-out queries itself
        save_strategy="steps",  # resumable checkpoints; worker.checkpoints signs and prunes them
        save_steps=spec.checkpoint_every,
        report_to="none",
        dataloader_num_workers=0,
        seed=spec.seed,
        data_seed=spec.seed,
        bf16=bf16_supported(),
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )


# Model -----------------------------------------------------------------------------------------


def load_cross_encoder(spec: TrainSpec) -> CrossEncoder:
    """The base as a cross-encoder with one output (a fresh scoring head unless it has one)."""
    from worker.models import resolve_encoder

    path = resolve_encoder(spec, "a reranker")
    try:
        model = CrossEncoder(
            path,
            num_labels=1,
            trust_remote_code=False,
            local_files_only=True,
            model_kwargs={"dtype": torch.float32, "use_safetensors": True},
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"Could not load {spec.base_model} as a cross-encoder: {exc}") from exc
    model.max_seq_length = min(spec.max_seq_length, model.max_seq_length)
    return model


def apply_method(model: CrossEncoder, spec: TrainSpec) -> None:
    """full: train every weight; head: only the scoring head; lora: adapters + the head."""
    transformer = model[0]
    if spec.method == "full":
        model.requires_grad_(True)
    elif spec.method == "head":
        freeze_all_but_head(transformer.model)
    else:
        from peft import TaskType, get_peft_model

        # SEQ_CLS keeps the scoring head trainable (peft's modules_to_save).
        config = lora_config(spec, transformer.model, TaskType.SEQ_CLS)
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


def export(model: CrossEncoder, spec: TrainSpec, metrics: dict[str, Any], out_dir: Path) -> Path:
    """A folder CrossEncoder(folder) loads as is: LoRA is merged into the weights first."""
    transformer = model[0]
    if spec.method == "lora":
        transformer.model = transformer.model.merge_and_unload()
    model.save(str(out_dir), create_model_card=False, safe_serialization=True)
    write_card_and_spec(out_dir, spec, {**metrics, "library": "sentence-transformers"}, usage(spec))
    return out_dir


def usage(spec: TrainSpec) -> str:
    folder = artifact_name(spec)
    return f"""```python
from sentence_transformers import CrossEncoder

model = CrossEncoder("{folder}")  # this folder, unzipped
query = "How do I reset my password?"
documents = ["Open Settings, then Account, then Reset password.", "Our office is closed on Sundays."]
scores = model.predict([(query, document) for document in documents])  # higher = more relevant
for hit in model.rank(query, documents, return_documents=True):
    print(f"{{hit['score']:.3f}}  {{hit['text']}}")
```"""


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
    if not any(row["relevance"] > 0 for row in rows):
        raise UserError(
            "No document has a relevance above 0, so there is nothing to rank first. Mark the "
            "documents that answer each query with relevance 1 (or 1-3 for graded relevance)."
        )
    if spec.validation_path:
        train, held_out = rows, read_rows(Path(spec.validation_path), "the validation file")
        if not any(row["relevance"] > 0 for row in held_out):
            raise UserError(
                "No document in the validation file has a relevance above 0, so no ranking can be scored. "
                "Mark the documents that answer each query with relevance 1 (or 1-3 for graded relevance)."
            )
    else:
        train, held_out = split_by_query(rows, spec.validation_fraction, spec.seed)
    lists = query_lists(train)
    if not lists:
        raise UserError(
            "No query has documents of different relevance, so there is no order to learn. Give "
            "each query documents that answer it (relevance 1 or more) and some that do not (0)."
        )
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
    return lists, held_out


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
        best[row["query"]] = max(best.get(row["query"], 0.0), row["relevance"])
    _, held = split_rows([query for query, top in best.items() if top > 0], fraction, seed)
    held = set(held)
    return [row for row in rows if row["query"] not in held], [row for row in rows if row["query"] in held]


def read_rows(path: Path, source: str = "the dataset") -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"Line {number} of {source} is not valid JSON: {exc.msg}.") from exc
        if not isinstance(row, dict) or not all(isinstance(row.get(key), str) for key in ("query", "document")):
            raise UserError(f"Line {number} of {source} needs text fields query and document.")
        relevance = row.get("relevance")
        if isinstance(relevance, bool) or not isinstance(relevance, int | float) or not 0 <= relevance < math.inf:
            raise UserError(f"Line {number} of {source}: relevance must be a number of at least 0 (got {relevance!r}).")
        rows.append({"query": row["query"], "document": row["document"], "relevance": float(relevance)})
    if not rows:
        raise UserError(f"{source[0].upper()}{source[1:]} has no rows.")
    return rows
