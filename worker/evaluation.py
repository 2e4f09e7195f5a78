"""Evaluate models on a test set: the base and any of a user's fine-tunes, every row, the task's
metrics for each, and what each model made of each row (so a user sees which rows got worse).

An evaluation runs on the training worker as a job does (queued, leased, cancellable, progress
events), from an EvalSpec the web app writes. The test set is read by the recipe's own reader (a
problem is named by its line), and the metrics are those of the recipe's final evaluation,
computed by the recipe's own functions (the forgetting meter aside: it measures general text,
not the test set):
- Instruction tuning: the reference reply's loss and perplexity under each model, every row
  rendered and masked as the SFT recipe trains it (worker.recipes.sft.tokenize_example); and each
  model's greedy reply to the first GENERATED_ROWS rows, with exact_match (the reply, stripped,
  equals the reference). Row score: the reference reply's loss (lower is better).
- Domain adaptation: perplexity and eval_loss of the documents packed as the recipe packs its
  held-out documents (worker.recipes.domain.pack, held_out_loss). Row score: the document's loss
  per token (lower is better); output: its perplexity.
- Classification (classify, pair): accuracy, macro F1 (and F1, AUROC for two labels) by
  worker.recipes.classify.classification_metrics, on the predicted label of each row. Row score:
  1 for the right label, 0 for a wrong one.
- Reranking: NDCG@10 and MRR@10 over the test set's queries (worker.recipes.rerank.predict,
  ranking_metrics). Row score: its query's NDCG@10 (every document of a query shares it; None for
  a query without a relevant document); output: the document's relevance score and its rank
  among its query's documents.
- Embeddings: recall@1, recall@10 and MRR@10, each query searching the test set's corpus (its
  positives and negatives, each text once: worker.recipes.embed.retrieval_task, search,
  retrieval_metrics). Row score: 1 / the rank of the row's positive in its query's top 10 (0
  below); output: the top document retrieved, and the positive's rank.
- The base of a model with a fresh head (a classifier, a reranker) is the untrained head the job
  measured at step 0 (its seed; a classifier's labels).
- Preference tuning (DPO, KTO): the recipes' held-out metrics (worker.recipes.dpo
  .preference_metrics, worker.recipes.kto.kto_metrics) from each row's fp32 log-probabilities
  (the recipe's Setup.scores, worker.preference.score), against the model's reference: the
  untouched base, as in training (a LoRA fine-tune's adapters switched off, a full fine-tune's
  base loaded). The base model is its own reference, so it scores what the job measured at step 0
  (DPO: reward_accuracy 0, reward_margin 0, eval_loss log 2; KTO: sign_accuracy 0.5).
  preference_accuracy (DPO) needs no reference. Row score, from the recipe's per-row record
  (pair_predictions, row_predictions): DPO, the pair's implicit reward margin (reward of chosen
  minus reward of rejected, each beta · (log π − log π_ref) summed over the answer's tokens: what
  reward_margin averages, and what DPO's loss pushes up); its output, which answer the model
  prefers by mean log-probability per token (what preference_accuracy counts). KTO, the
  completion's implicit reward signed by its label (+ desirable, − undesirable: the sign that
  sign_accuracy counts); its output, whether the completion became more or less likely than
  under the reference. The base scores 0 on every row, so a row's change is the fine-tune's own.
  Rows whose prompt fills max_seq_length are skipped, as in training (their score is None).

Per row, `rows.json` (and `rows.csv`, safe to open in a spreadsheet) hold the row's input, its
reference and, per model, its output, score and (for some families) a detail; `change` is the
last model's score against the first's, signed so that a positive change is an improvement.
"""

from __future__ import annotations

import csv
import json
import math
import zipfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from worker.conversations import prompt_messages
from worker.errors import Cancelled, UserError
from worker.events import Reporter
from worker.rows import read_rows
from worker.spec import EvalModel, EvalSpec, TrainSpec

GENERATED_ROWS = 50
"""Rows each causal model also answers greedily (generation is the slow part on a CPU)."""
MAX_NEW_TOKENS = 64
MAX_ROWS = 2000
DOCUMENT_CHARS = 400
"""Of each test document, in the per-row records (a domain test set holds whole documents)."""
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
TEST_SET = "the test set"


@dataclass
class Scored:
    """One model on the test rows: its metrics, and per row its output, its score (None where the
    row is not scored) and, for some families, a detail."""

    metrics: dict[str, float]
    outputs: list[str]
    scores: list[float | None] = field(default_factory=list)
    details: list[str] = field(default_factory=list)


Scorer = Callable[[EvalModel, list[dict], EvalSpec, Reporter], Scored]


@dataclass(frozen=True)
class Evaluator:
    """How one family's test rows are read, scored and shown."""

    read: Callable[[Path], list[dict]]
    """The test set's rows, read by the recipe's reader."""
    score: Scorer
    shown: Callable[[dict], tuple[str, str]]
    """A row's input and reference, as the rows page and the CSV show them."""
    output: str
    """What a model's output on a row is, in the pages' words."""
    score_means: str
    """What a row's score is, in the pages' words."""
    lower_is_better: bool = False

    @property
    def described(self) -> dict[str, Any]:
        """What the pages say about the rows (the result's "scored")."""
        return {"output": self.output, "score": self.score_means, "lower_is_better": self.lower_is_better}


def run(spec: EvalSpec, reporter: Reporter) -> dict[str, Any]:
    evaluator = EVALUATORS[spec.task]
    reporter.state("preparing")
    rows = evaluator.read(Path(spec.dataset_path))[:MAX_ROWS]
    reporter.log(f"{len(rows)} test rows, {len(spec.models)} models.")
    reporter.state("evaluating")
    scored = []
    for index, model in enumerate(spec.models):
        if reporter.stop_requested.is_set():
            raise Cancelled()
        model = unpacked(model, Path(spec.output_dir) / "checkpoints" / str(index))
        result = evaluator.score(model, rows, spec, reporter)
        scored.append(result)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items())
        reporter.log(f"{model.label}: {shown}")
        reporter.metric(index + 1, total_steps=len(spec.models))
    out = Path(spec.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = row_records(spec, rows, scored)
    (out / "rows.json").write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n")
    write_csv(out / "rows.csv", spec, records)
    leaderboard = [{"label": m.label, "job_id": m.job_id, "step": m.step, "metrics": s.metrics}
                   for m, s in zip(spec.models, scored, strict=True)]
    reporter.state("exporting")
    return {"evaluation": True, "task": spec.task, "rows": len(rows), "leaderboard": leaderboard,
            "scored": evaluator.described, "rows_json": str(out / "rows.json"), "rows_csv": str(out / "rows.csv")}


def unpacked(model: EvalModel, into: Path) -> EvalModel:
    """The model, or for a kept checkpoint the model with its zip unpacked into `into` (the zip's
    one top-level folder is the checkpoint's artifact, as the final model's is)."""
    if not model.checkpoint_zip:
        return model
    try:
        archive = zipfile.ZipFile(model.checkpoint_zip)
    except (OSError, zipfile.BadZipFile):
        raise UserError(f"{model.label}: the checkpoint is no longer there (its job was deleted?).") from None
    with archive:
        names = archive.namelist()
        tops = {name.split("/")[0] for name in names}
        if len(tops) != 1 or any(name.startswith("/") or ".." in Path(name).parts for name in names):
            raise UserError(f"{model.label}: the checkpoint's zip is not one this server wrote.")
        archive.extractall(into)
    return replace(model, final_dir=str(into / tops.pop()))


def _train_spec(model: EvalModel, spec: EvalSpec, whole: bool = False) -> TrainSpec:
    """The model's TrainSpec, reading spec.max_seq_length tokens (every model the same); with
    `whole`, a fine-tune is its own base (an encoder's folder is a whole model)."""
    train_spec = TrainSpec.from_dict(model.spec)
    train_spec.max_seq_length = spec.max_seq_length
    if whole and model.final_dir:
        train_spec.base_model = model.final_dir
    return train_spec


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


def prompt_text(row: dict) -> str:
    """The last user turn of the prompt a row's answer follows."""
    users = [m for m in prompt_messages(row) if m["role"] == "user"]
    return users[-1]["content"] if users else ""


# Instruction tuning ---------------------------------------------------------------------------


def read_instructions(path: Path) -> list[dict]:
    from worker.recipes.sft import _sft_row

    return read_rows(path, (), TEST_SET, keep=_sft_row, fields_named="instruction and response, or messages")


def score_causal(model: EvalModel, rows: list[dict], spec: EvalSpec, reporter: Reporter) -> Scored:
    import torch

    from worker.conversations import template_prompt
    from worker.generation import generate_replies
    from worker.recipes.sft import tokenize_example

    network, tokenizer = _causal_model(model)
    network.eval()
    loss_on_turns = TrainSpec.from_dict(model.spec).loss_on_turns
    losses: list[float | None] = []
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            example = tokenize_example(row, tokenizer, spec.max_seq_length, loss_on_turns)
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


def reference(row: dict) -> str:
    if "messages" in row:
        return row["messages"][-1].get("content") or ""
    return row.get("response", "")


# Domain adaptation ----------------------------------------------------------------------------


def read_documents(path: Path) -> list[dict]:
    from worker.recipes import domain

    return read_rows(path, domain.FIELDS, TEST_SET)


def score_documents(model: EvalModel, rows: list[dict], spec: EvalSpec, reporter: Reporter) -> Scored:
    from worker.recipes import domain

    network, tokenizer = _causal_model(model)
    config_length = getattr(network.config, "max_position_embeddings", None) or spec.max_seq_length
    packed = domain.pack(domain.tokenize(rows, tokenizer), min(spec.max_seq_length, config_length),
                         tokenizer.pad_token_id)
    held = domain.held_out_loss(network, packed, len(rows), spec.batch_size)
    losses = held.document_losses
    return Scored(held.metrics, [f"perplexity {math.exp(loss):.4g}" for loss in losses], losses)


# Classification -------------------------------------------------------------------------------


def read_labelled(task: str, path: Path) -> list[dict]:
    from worker.recipes import classify

    return classify.read_rows(path, classify.FIELDS[task], TEST_SET)


def score_classifier(model: EvalModel, rows: list[dict], spec: EvalSpec, reporter: Reporter) -> Scored:
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


# Reranking ------------------------------------------------------------------------------------


def read_ranked(path: Path) -> list[dict]:
    from worker.recipes import rerank

    return rerank.read_rows(path, TEST_SET)


def score_reranker(model: EvalModel, rows: list[dict], spec: EvalSpec, reporter: Reporter) -> Scored:
    from transformers import set_seed

    from worker.recipes import rerank

    train_spec = _train_spec(model, spec, whole=True)
    if not model.final_dir:
        set_seed(train_spec.seed)  # the fresh scoring head the job measured at step 0
    scores = rerank.predict(rerank.load_cross_encoder(train_spec), rows)
    by_query: dict[str, list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        by_query[row["query"]].append(index)
    ndcg: list[float | None] = [None] * len(rows)
    details = [""] * len(rows)
    for indices in by_query.values():
        query_ndcg = rerank.ranking_metrics([rows[i] for i in indices], [scores[i] for i in indices]).get("ndcg@10")
        for rank, index in enumerate(sorted(indices, key=lambda i: -scores[i]), start=1):  # ranking_metrics' order
            ndcg[index] = query_ndcg
            details[index] = f"rank {rank} of {len(indices)}"
    return Scored(rerank.ranking_metrics(rows, scores), [f"{score:.4f}" for score in scores], ndcg, details)


# Embeddings -----------------------------------------------------------------------------------


def read_retrieval(path: Path) -> list[dict]:
    from worker.recipes import embed

    return embed.read_rows(path, TEST_SET)


def score_embedder(model: EvalModel, rows: list[dict], spec: EvalSpec, reporter: Reporter) -> Scored:
    from worker.recipes import embed

    encoder = embed.load_sentence_transformer(_train_spec(model, spec, whole=True))
    queries, corpus, relevant = embed.retrieval_task(rows)
    rankings = embed.search(encoder, queries, corpus)
    query_index = {query: index for index, query in enumerate(queries)}
    corpus_index = {text: index for index, text in enumerate(corpus)}
    outputs, scores, details = [], [], []
    for row in rows:
        ranking = rankings[query_index[row["query"]]]
        positive = corpus_index[row["positive"]]
        ranked = [index for index, _ in ranking]
        outputs.append(corpus[ranked[0]])
        scores.append(embed.retrieval_metrics([{positive}], [ranking])["mrr@10"])
        details.append(f"positive at rank {ranked.index(positive) + 1}" if positive in ranked
                       else f"positive not in the top {len(ranked)}")
    return Scored(embed.retrieval_metrics(relevant, rankings), outputs, scores, details)


# Preference tuning ----------------------------------------------------------------------------


def read_preferences(task: str, path: Path) -> list[dict]:
    from worker import preference

    kind = _preference_rows(task)
    return read_rows(path, kind.fields, TEST_SET, keep=partial(preference._keep, kind), fields_named=kind.named)


def _preference_rows(task: str):
    from worker.recipes import dpo, kto

    return dpo.PAIRS if task == "dpo" else kto.LABELLED_ROWS


@dataclass
class AgainstReference:
    """A preference model's scores of the test rows that fit, and its reference's."""

    setup: Any
    """The recipe's Setup over those rows (only its scoring is used: it has no trainer)."""
    scores: Any
    reference: Any
    positions: list[int]
    """The index in the test set of each row scored."""

    def per_row(self, values: list, rows: int, missing: Any = None) -> list:
        """`values` of the scored rows placed at their rows (`missing` at the rows skipped)."""
        placed = [missing] * rows
        for position, value in zip(self.positions, values, strict=True):
            placed[position] = value
        return placed


def against_reference(model: EvalModel, rows: list[dict], spec: EvalSpec, reporter: Reporter) -> AgainstReference:
    """The model's scores (the recipe's Setup.scores) of the rows whose prompt fits (the recipe's
    tokenize), and its reference's: itself for the base; the untouched base for a fine-tune (a
    LoRA adapter switched off; a full fine-tune's base loaded), as the recipe's reference model."""
    from peft import PeftModel

    from worker import preference
    from worker.models import load_causal_lm
    from worker.recipes import dpo, kto

    network, tokenizer = _causal_model(model)
    kept = preference.tokenize(_preference_rows(spec.task), rows, tokenizer, spec.max_seq_length, reporter, "test")
    if not kept:
        raise UserError(f"No test prompt fits in max_seq_length={spec.max_seq_length} tokens with room for an answer.")
    kind = dpo.Setup if spec.task == "dpo" else kto.Setup
    setup = kind(_train_spec(model, spec), reporter, network, tokenizer, None, kept)
    scores = setup.scores()
    if not model.final_dir:
        reference = scores
    elif isinstance(network, PeftModel):
        with network.disable_adapter():
            reference = setup.scores()
    else:
        base, _ = load_causal_lm(TrainSpec.from_dict(model.spec))
        reference = kind(setup.spec, reporter, base, tokenizer, None, kept).scores()
    identity = {id(row): index for index, row in enumerate(rows)}
    return AgainstReference(setup, scores, reference, [identity[id(row)] for row, _ in kept])


def score_pairs(model: EvalModel, rows: list[dict], spec: EvalSpec, reporter: Reporter) -> Scored:
    from worker.recipes import dpo

    scored = against_reference(model, rows, spec, reporter)
    metrics = dpo.preference_metrics(scored.scores, scored.reference, scored.setup.spec.dpo_beta)
    pairs = scored.setup.predictions(scored.scores, scored.reference)
    preferred = ["prefers chosen" if pair["prefers_chosen"] else "prefers rejected" for pair in pairs]
    margins = [pair["reward_chosen"] - pair["reward_rejected"] for pair in pairs]
    details = [f"log-probability: chosen {pair['chosen_logp']:.2f} ({pair['chosen_tokens']} tokens), "
               f"rejected {pair['rejected_logp']:.2f} ({pair['rejected_tokens']} tokens)" for pair in pairs]
    place = partial(scored.per_row, rows=len(rows))
    return Scored(metrics, place(preferred, missing=""), place(margins), place(details, missing=""))


def score_labelled_completions(model: EvalModel, rows: list[dict], spec: EvalSpec, reporter: Reporter) -> Scored:
    from worker.recipes import kto

    scored = against_reference(model, rows, spec, reporter)
    setup = scored.setup
    metrics = kto.kto_metrics(scored.scores, scored.reference, setup.desirable, setup.spec.dpo_beta)
    records = setup.predictions(scored.scores, scored.reference)
    moved = [_likelier(record["reward"]) for record in records]
    signed = [record["reward"] if record["desirable"] else -record["reward"] for record in records]
    details = [f"log-probability {record['logp']:.2f}, reference {record['reference_logp']:.2f}" for record in records]
    place = partial(scored.per_row, rows=len(rows))
    return Scored(metrics, place(moved, missing=""), place(signed), place(details, missing=""))


def _likelier(reward: float) -> str:
    if reward == 0:
        return "as likely as under the reference"
    return f"{'more' if reward > 0 else 'less'} likely than under the reference"


# The families ---------------------------------------------------------------------------------


def _classified(row: dict) -> tuple[str, str]:
    return (row["text"] if "text" in row else f"{row['text_a']} || {row['text_b']}"), row["label"]


EVALUATORS: dict[str, Evaluator] = {
    "sft": Evaluator(
        read_instructions, score_causal, lambda row: (prompt_text(row), reference(row)),
        f"greedy reply (to the first {GENERATED_ROWS} rows)", "the loss of the reference reply per token",
        lower_is_better=True),
    "domain": Evaluator(
        read_documents, score_documents, lambda row: (row["text"][:DOCUMENT_CHARS], ""),
        "perplexity on the document", "the document's loss per token", lower_is_better=True),
    "classify": Evaluator(partial(read_labelled, "classify"), score_classifier, _classified,
                          "label", "1 if the label is right, 0 if it is wrong"),
    "pair": Evaluator(partial(read_labelled, "pair"), score_classifier, _classified,
                      "label", "1 if the label is right, 0 if it is wrong"),
    "rerank": Evaluator(
        read_ranked, score_reranker,
        lambda row: (f"{row['query']} || {row['document']}", f"relevance {row['relevance']:g}"),
        "relevance score for the document, and its rank among its query's documents",
        "its query's NDCG@10 (every document of a query shares it)"),
    "embed": Evaluator(
        read_retrieval, score_embedder, lambda row: (row["query"], row["positive"]),
        "top document for the query, and the rank of the row's positive",
        "1 / the rank of the row's positive in the top 10 (0 below it)"),
    "dpo": Evaluator(
        partial(read_preferences, "dpo"), score_pairs,
        lambda row: (prompt_text(row), f"chosen: {row['chosen']} · rejected: {row['rejected']}"),
        "preferred answer (by mean log-probability per token)",
        "the implicit reward margin against the reference model, chosen's reward minus rejected's; 0 for the base"),
    "kto": Evaluator(
        partial(read_preferences, "kto"), score_labelled_completions,
        lambda row: (prompt_text(row), f"{'desirable' if row['desirable'] else 'undesirable'}: {row['completion']}"),
        "likelihood of the completion against the reference model's",
        "the completion's implicit reward against the reference model, signed by its label (+ desirable, "
        "− undesirable); 0 for the base"),
}


# Per-row records ------------------------------------------------------------------------------


def row_records(spec: EvalSpec, rows: list[dict], scored: list[Scored]) -> list[dict]:
    """Each row: its input, its reference, each model's output and score (and detail), and the
    change of the last model's score from the first's (for a loss, lower is better: the change's
    sign is flipped so that a positive change is always an improvement)."""
    evaluator = EVALUATORS[spec.task]
    records = []
    for index, row in enumerate(rows):
        text, gold = evaluator.shown(row)
        outputs = []
        for result in scored:
            output = {"output": result.outputs[index], "score": result.scores[index]}
            if result.details:
                output["detail"] = result.details[index]
            outputs.append(output)
        first, last = outputs[0]["score"], outputs[-1]["score"]
        change = None if first is None or last is None else (first - last if evaluator.lower_is_better else last - first)
        records.append({"row": index + 1, "input": text, "reference": gold, "models": outputs, "change": change})
    return records


def spreadsheet_safe(value: Any) -> Any:
    """Text a spreadsheet would run as a formula (=, +, -, @ first) is kept as text."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def write_csv(path: Path, spec: EvalSpec, records: list[dict]) -> None:
    details = any("detail" in output for record in records[:1] for output in record["models"])
    header = ["row", "input", "reference"]
    for model in spec.models:
        header += [f"{model.label}: output", f"{model.label}: score"] + ([f"{model.label}: detail"] if details else [])
    header.append("change")
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([spreadsheet_safe(name) for name in header])
        for record in records:
            cells = [record["row"], record["input"], record["reference"]]
            for output in record["models"]:
                cells += [output["output"], output["score"]] + ([output.get("detail", "")] if details else [])
            cells.append(record["change"])
            writer.writerow([spreadsheet_safe(cell) for cell in cells])
