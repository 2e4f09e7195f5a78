"""An uploaded validation file whose inputs are also in training: each recipe keeps those rows
in training unless the job drops them (drop_validation_overlap); instruction and preference
tuning list the validation rows new to the model first, so the sample replies answer those."""

from pathlib import Path

import pytest

from tests.support.model_fixtures import write_jsonl
from worker.errors import UserError
from worker.events import Reporter
from worker.recipes import classify, dpo, embed, rerank, sft
from worker.spec import TrainSpec


def spec_for(tmp_path: Path, task: str, rows: list[dict], validation: list[dict], **choices) -> TrainSpec:
    return TrainSpec(
        base_model="smollm2-135m-instruct" if task in ("sft", "dpo") else "all-minilm-l6-v2",
        task=task,
        method="lora" if task in ("sft", "dpo") else "full",
        dataset_path=str(write_jsonl(tmp_path / "rows.jsonl", rows)),
        validation_path=str(write_jsonl(tmp_path / "validation.jsonl", validation)),
        output_dir=str(tmp_path / "out"),
        **choices,
    )


def test_a_classifier_drops_the_validation_files_texts_from_training_when_asked(tmp_path):
    rows = [{"text": f"message {n}", "label": "ab"[n % 2]} for n in range(10)]
    validation = [{"text": "  message 3", "label": "b"}, {"text": "other", "label": "a"}]
    train, held, _ = classify.prepare_rows(spec_for(tmp_path, "classify", rows, validation))
    assert len(train) == 10 and [row["text"] for row in held] == ["  message 3", "other"]  # the file's order
    train, held, labels = classify.prepare_rows(spec_for(tmp_path, "classify", rows, validation, drop_validation_overlap=True))
    assert "message 3" not in {row["text"] for row in train} and len(train) == 9 and labels == ["a", "b"]


def test_embedding_and_reranking_drop_the_validation_files_inputs_when_asked(tmp_path):
    rows = [{"query": f"q{n}", "positive": f"p{n}"} for n in range(6)]
    spec = spec_for(tmp_path, "embed", rows, [{"query": "q2 ", "positive": "p"}], drop_validation_overlap=True)
    train, _ = embed.prepare_data(spec, Reporter())
    assert [row["query"] for row in train] == ["q0", "q1", "q3", "q4", "q5"]
    rows = [{"query": f"q{n // 2}", "document": f"d{n}", "relevance": float(n % 2)} for n in range(8)]
    validation = [{"query": "q1", "document": "d3", "relevance": 1.0}, {"query": "q9", "document": "x", "relevance": 1.0}]
    spec = spec_for(tmp_path, "rerank", rows, validation, drop_validation_overlap=True)
    lists, held = rerank.prepare_data(spec, Reporter())
    assert sum(map(len, lists["documents"])) == 6  # q1's d3 left out, and q1 (only d2 left) teaches no order
    assert [row["query"] for row in held] == ["q1", "q9"]


@pytest.mark.parametrize("drop", [False, True])
def test_instruction_tuning_drops_the_validation_files_prompts_when_asked(tmp_path, smollm2_dir, drop):
    from transformers import AutoTokenizer

    rows = [{"instruction": f"Question {n}?", "response": f"Answer {n}."} for n in range(8)]
    validation = [{"instruction": "Question  1?", "response": "x"}, {"instruction": "New?", "response": "y"}]
    spec = spec_for(tmp_path, "sft", rows, validation, drop_validation_overlap=drop)
    train, _, held_out = sft.prepare_data(spec, AutoTokenizer.from_pretrained(smollm2_dir), Reporter())
    assert len(train) == (7 if drop else 8)
    assert [row["instruction"] for row in held_out] == (["Question  1?", "New?"] if drop else ["New?", "Question  1?"])


def test_preference_tuning_drops_the_validation_files_prompts_when_asked(tmp_path, smollm2_dir):
    from transformers import AutoTokenizer

    rows = [{"prompt": f"Pick {n}", "chosen": "yes", "rejected": "no"} for n in range(6)]
    validation = [{"prompt": "Pick 4", "chosen": "a", "rejected": "b"}, {"prompt": "Other", "chosen": "a", "rejected": "b"}]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    train, held = dpo.prepare_data(spec_for(tmp_path, "dpo", rows, validation), tokenizer, Reporter())
    assert len(train) == 6 and [row["prompt"] for row, _ in held] == ["Other", "Pick 4"]
    spec = spec_for(tmp_path, "dpo", rows, validation, drop_validation_overlap=True)
    train, held = dpo.prepare_data(spec, tokenizer, Reporter())
    assert "Pick 4" not in {row["prompt"] for row in train} and len(train) == 5


def test_dropping_every_training_row_is_refused_with_the_reason(tmp_path):
    rows = [{"text": "same", "label": "a"}, {"text": "same ", "label": "b"}]
    spec = spec_for(tmp_path, "classify", rows, [{"text": "same", "label": "a"}], drop_validation_overlap=True)
    with pytest.raises(UserError, match="nothing to train on"):
        classify.prepare_rows(spec)
