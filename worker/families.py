"""The task families: one record per family, the only place its facts are written.

Both halves of Specialist read this module: the web side (dataset fields, the job form's
methods and suggested settings, which base models fit) and the worker (which recipe trains it,
which peft task type wraps the model, what the artifact is called). It imports neither Django
nor torch. Every other table of task facts is derived from `FAMILIES`.

Adding a family (docs/architecture.md, "Add a task family"): one `Family` here, one recipe
(worker/recipes/<name>.py with run(spec, reporter)), one checks file
(webapp/datasets/checks/<name>.py with check(rows)), one samples file
(webapp/datasets/samples/<name>.py with rows()).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Suggested:
    """Starting settings that learn on the family's sample data; the job form offers them when the
    task or method changes, and a user's own value always wins."""

    base_model: str
    method: str
    learning_rates: dict[str, float]
    """Per method: LoRA and full fine-tunes want learning rates orders of magnitude apart."""
    max_steps: int
    batch_size: int
    max_seq_length: int

    def for_form(self) -> dict[str, Any]:
        """The shape the new-job page's script reads: the learning rate under each method's key."""
        return {"base_model": self.base_model, "method": self.method, **self.learning_rates,
                "max_steps": self.max_steps, "batch_size": self.batch_size, "max_seq_length": self.max_seq_length}


@dataclass(frozen=True)
class Family:
    key: str
    """The name used everywhere: Dataset.task, TrainSpec.task, URLs."""
    name: str
    """What the pages call it."""
    row: str
    """What one row holds, in the user's words."""
    required: tuple[str, ...]
    """The canonical fields every row has (the column mapping maps the user's columns onto them)."""
    optional: tuple[str, ...]
    """Fields a row may leave empty."""
    inputs: tuple[str, ...]
    """What a model reads from a row: the same input in training and validation measures memory."""
    methods: tuple[str, ...]
    """Training methods that apply (worker.spec.METHODS)."""
    base_kinds: tuple[str, ...]
    """Catalog kinds (worker.catalog) that can learn it."""
    recipe: str
    """The module whose run(spec, reporter) trains it."""
    peft_task_type: str
    """How peft wraps the model for LoRA: CAUSAL_LM, or SEQ_CLS for a classifier head."""
    card: str
    """What the model card says the model was trained for."""
    suggested: Suggested
    primary_metric: str
    """The held-out metric the job page and the comparison lead with."""
    metrics: tuple[str, ...]
    """The held-out metrics each evaluation reports."""
    numeric: tuple[str, ...] = ()
    """Fields written as numbers (float); every other field is written as text."""
    checks: str = ""
    """The module under webapp/datasets/checks that refuses unusable rows (default: the key)."""
    samples: str = ""
    """The module under webapp/datasets/samples with sample rows (default: the key)."""
    generative: bool = False
    """A causal LM that writes replies through the chat template (its LoRA artifact is an adapter)."""

    @property
    def fields(self) -> tuple[str, ...]:
        return self.required + self.optional

    @property
    def checks_module(self) -> str:
        return f"webapp.datasets.checks.{self.checks or self.key}"

    @property
    def samples_module(self) -> str:
        return f"webapp.datasets.samples.{self.samples or self.key}"

    @property
    def in_a_sentence(self) -> str:
        """The name for the middle of a sentence: "preference tuning" for "Preference tuning (DPO)"."""
        return self.name.split(" (")[0].lower()

    @property
    def label(self) -> str:
        """The family with what a row holds, for choices."""
        return f"{self.name}: {self.row}"


FAMILIES: dict[str, Family] = {
    f.key: f
    for f in (
        Family(
            "sft", "Instruction tuning", "instruction → response, or a conversation (query rewriting, chat, tool calls)",
            required=("instruction", "response"), optional=("system", "input"),
            inputs=("system", "instruction", "input"),
            methods=("lora", "qlora", "full"), base_kinds=("causal-lm",),
            recipe="worker.recipes.sft", peft_task_type="CAUSAL_LM",
            card="instruction tuning (SFT, loss on the assistant's turns only)",
            # Batches pad to their longest row, so room for a dozen tools' listing costs short rows nothing.
            suggested=Suggested("smollm2-135m-instruct", "lora", {"lora": 2e-3, "qlora": 2e-3, "full": 5e-5},
                                max_steps=30, batch_size=8, max_seq_length=1024),
            primary_metric="eval_loss", metrics=("eval_loss", "perplexity"),
            generative=True,
        ),
        Family(
            "domain", "Domain adaptation", "a document of raw domain text (.txt, .md, a .zip of them)",
            required=("text",), optional=(), inputs=("text",),
            methods=("lora", "qlora", "full"), base_kinds=("causal-lm",),
            recipe="worker.recipes.domain", peft_task_type="CAUSAL_LM",
            card="domain adaptation (continued pre-training on raw text, loss on every token)",
            # Every token of a packed row is trained on, so steps stay small for a CPU (2 rows of 128
            # tokens); 30 LoRA steps take the sample manual's held-out perplexity from 79.5 to 1.39.
            suggested=Suggested("smollm2-135m-instruct", "lora", {"lora": 2e-3, "qlora": 2e-3, "full": 5e-5},
                                max_steps=30, batch_size=2, max_seq_length=128),
            primary_metric="perplexity", metrics=("perplexity", "eval_loss"),
            generative=True,
        ),
        Family(
            "classify", "Classification", "text → label (intent, topic, tool selection)",
            required=("text", "label"), optional=(), inputs=("text",),
            methods=("lora", "full", "head"), base_kinds=("encoder", "causal-lm"),
            recipe="worker.recipes.classify", peft_task_type="SEQ_CLS",
            card="text classification",
            # MiniLM is small (22M): a full fine-tune is quick and learns the sample tasks fastest.
            suggested=Suggested("all-minilm-l6-v2", "full", {"lora": 1e-3, "full": 1e-4, "head": 5e-3},
                                max_steps=60, batch_size=16, max_seq_length=128),
            primary_metric="accuracy", metrics=("accuracy", "macro_f1", "eval_loss", "f1", "auroc"),
        ),
        Family(
            "pair", "Pair classification", "text_a + text_b → label (faithfulness, NLI)",
            required=("text_a", "text_b", "label"), optional=(), inputs=("text_a", "text_b"),
            methods=("lora", "full", "head"), base_kinds=("encoder", "causal-lm"),
            recipe="worker.recipes.classify", peft_task_type="SEQ_CLS",
            card="text-pair classification",
            suggested=Suggested("all-minilm-l6-v2", "full", {"lora": 1e-3, "full": 1e-4, "head": 5e-3},
                                max_steps=120, batch_size=16, max_seq_length=256),
            primary_metric="accuracy", metrics=("accuracy", "macro_f1", "eval_loss", "f1", "auroc"),
            checks="classify",  # pair rows are checked like classification rows
        ),
        Family(
            "rerank", "Reranker", "query + document → relevance (0/1 or graded)",
            required=("query", "document", "relevance"), optional=(), inputs=("query", "document"),
            numeric=("relevance",),
            methods=("lora", "full", "head"), base_kinds=("encoder",),
            recipe="worker.recipes.rerank", peft_task_type="SEQ_CLS",
            card="reranking (a cross-encoder scoring query–document pairs)",
            # A reranker's batch is a number of queries, each with all its documents.
            suggested=Suggested("all-minilm-l6-v2", "full", {"lora": 1e-3, "full": 5e-4, "head": 5e-3},
                                max_steps=30, batch_size=8, max_seq_length=256),
            primary_metric="ndcg@10", metrics=("ndcg@10", "mrr@10"),
        ),
        Family(
            "embed", "Embedding model", "query → positive (+ optional negative)",
            required=("query", "positive"), optional=("negative",), inputs=("query",),
            methods=("lora", "full"), base_kinds=("encoder",),
            recipe="worker.recipes.embed", peft_task_type="FEATURE_EXTRACTION",
            card="embedding training (a bi-encoder with in-batch negatives)",
            suggested=Suggested("all-minilm-l6-v2", "full", {"lora": 1e-3, "full": 1e-4},
                                max_steps=30, batch_size=16, max_seq_length=128),
            primary_metric="recall@1", metrics=("recall@1", "recall@10", "mrr@10"),
        ),
        Family(
            "dpo", "Preference tuning (DPO)", "prompt → chosen vs rejected",
            required=("prompt", "chosen", "rejected"), optional=("system",), inputs=("system", "prompt"),
            methods=("lora", "qlora", "full"), base_kinds=("causal-lm",),
            recipe="worker.recipes.dpo", peft_task_type="CAUSAL_LM",
            card="preference tuning (DPO on chosen / rejected pairs)",
            suggested=Suggested("smollm2-135m-instruct", "lora", {"lora": 5e-4, "qlora": 5e-4, "full": 5e-6},
                                max_steps=30, batch_size=8, max_seq_length=512),
            primary_metric="preference_accuracy",
            metrics=("preference_accuracy", "reward_accuracy", "reward_margin", "eval_loss"),
            generative=True,
        ),
        Family(
            "kto", "Preference tuning (KTO)", "prompt → completion, labelled desirable or undesirable",
            required=("prompt", "completion", "label"), optional=("system",), inputs=("system", "prompt"),
            methods=("lora", "qlora", "full"), base_kinds=("causal-lm",),
            recipe="worker.recipes.kto", peft_task_type="CAUSAL_LM",
            card="preference tuning (KTO on completions labelled desirable or undesirable)",
            suggested=Suggested("smollm2-135m-instruct", "lora", {"lora": 5e-4, "qlora": 5e-4, "full": 5e-6},
                                max_steps=30, batch_size=8, max_seq_length=512),
            primary_metric="sign_accuracy", metrics=("sign_accuracy", "reward_margin", "eval_loss"),
            generative=True,
        ),
    )
}


def suggested_settings() -> dict[str, dict[str, Any]]:
    """Every family's suggested settings, as the job form's script reads them."""
    return {key: f.suggested.for_form() for key, f in FAMILIES.items()}


def generative_keys() -> tuple[str, ...]:
    return tuple(key for key, f in FAMILIES.items() if f.generative)

