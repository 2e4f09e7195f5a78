"""The quality report (worker/quality.py) on small crafted rows with known answers,
checked against the worker's own tokenization and splits."""

import pytest

from tests.support.model_fixtures import write_jsonl
from worker import quality
from worker.quality import compute_report


def problem(report: dict, key: str) -> dict:
    return next(p for p in report["problems"] if p["key"] == key)


def sft_rows() -> list[dict]:
    rows = [{"instruction": f"Question number {n}?", "response": f"Answer {n}."} for n in range(20)]
    rows[5] = dict(rows[4])  # an exact duplicate of row 5 (1-based)
    rows[7]["system"] = "Be brief."
    rows[8]["input"] = "Some context."
    rows[9]["response"] = "word " * 80  # long: past a cutoff of 48
    rows[10]["instruction"] = "long question " * 40  # the prompt alone fills 48 tokens
    rows[11]["response"] = "  \n leading whitespace <|im_end|> typed as text"
    return rows


def test_sft_lengths_equal_the_workers_tokenization(tmp_path, smollm2_dir):
    from transformers import AutoTokenizer

    from worker.recipes.sft import tokenize_example

    rows = sft_rows()
    report = compute_report(write_jsonl(tmp_path / "rows.jsonl", rows), "sft", smollm2_dir, 48)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    full = [len(tokenize_example(row, tokenizer, 10**6)["input_ids"]) for row in rows]
    skipped = [n for n, row in enumerate(rows, 1) if tokenize_example(row, tokenizer, 48) is None]
    counter = quality.TokenCounter(smollm2_dir, "sft", 48)
    assert counter.lengths(rows)[0] == full
    longer = [n for n, length in enumerate(full, 1) if length > 48]
    assert report["tokens"]["truncated"] == problem(report, "truncated")["count"] == len(longer) >= 2
    assert [e["row"] for e in problem(report, "truncated")["examples"]] == longer[:3]
    assert report["tokens"]["max"] == max(full)
    assert sum(report["tokens"]["counts"]) == 20
    assert [e["row"] for e in problem(report, "no_reply")["examples"]] == skipped == [11]


def test_sft_counts_duplicates_and_missing_optional_fields(tmp_path, smollm2_dir):
    report = compute_report(write_jsonl(tmp_path / "rows.jsonl", sft_rows()), "sft", smollm2_dir, 512)
    duplicates = problem(report, "duplicates")
    assert duplicates["count"] == 1 and duplicates["examples"][0] | {"text": ""} == {"row": 6, "same_as": 5, "text": ""}
    assert problem(report, "empty_system")["count"] == 19
    assert problem(report, "empty_input")["count"] == 19
    assert report["tokens"]["truncated"] == 0 and report["labels"] is None


def test_the_seeded_split_keeps_a_repeated_prompt_on_one_side_as_the_worker_does(tmp_path, smollm2_dir):
    from worker.rows import split_rows

    rows = [{"instruction": f"q{n % 10}" + " " * (n % 3), "response": f"a{n}"} for n in range(40)]  # 4 times each
    report = compute_report(write_jsonl(tmp_path / "rows.jsonl", rows), "sft", smollm2_dir, 64, seed=7)
    train, held = split_rows(rows, 0.1, 7)
    assert len({row["instruction"].strip() for row in held}) == 1 and len(held) == 4
    assert not {row["instruction"].strip() for row in held} & {row["instruction"].strip() for row in train}
    assert report["split"] == {"kind": "seeded", "seed": 7, "fraction": 0.1, "train_rows": 36, "validation_rows": 4}
    assert problem(report, "overlap")["count"] == 0


def test_an_uploaded_validation_file_replaces_the_split(tmp_path, smollm2_dir):
    rows = [{"instruction": f"q{n}", "response": "a"} for n in range(10)]
    validation = [{"instruction": "q3", "response": "other"}, {"instruction": "new", "response": "a"}]
    report = compute_report(
        write_jsonl(tmp_path / "rows.jsonl", rows),
        "sft",
        smollm2_dir,
        64,
        validation_path=write_jsonl(tmp_path / "validation.jsonl", validation),
    )
    assert report["split"] == {"kind": "file", "train_rows": 10, "validation_rows": 2}
    overlap = problem(report, "overlap")
    assert overlap["count"] == 1 and overlap["examples"][0]["row"] == 1 and "q3" in overlap["examples"][0]["text"]


def test_dpo_pairs_measure_the_longer_answer_and_flag_same_answers(tmp_path, smollm2_dir):
    from transformers import AutoTokenizer

    from worker.recipes.dpo import tokenize_pair

    rows = [{"prompt": f"Pick {n}", "chosen": "yes", "rejected": "no " * n} for n in range(12)]
    rows[3]["rejected"] = " yes "  # the same answer once trimmed
    rows[4]["prompt"] = "very long prompt " * 30
    report = compute_report(write_jsonl(tmp_path / "rows.jsonl", rows), "dpo", smollm2_dir, 40)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    pairs = [tokenize_pair(row, tokenizer) for row in rows]
    longest = [len(p["prompt"]) + max(len(p["chosen"]), len(p["rejected"])) for p in pairs]
    assert report["tokens"]["max"] == max(longest)
    assert report["tokens"]["truncated"] == sum(length > 40 for length in longest)
    assert [e["row"] for e in problem(report, "same_pair")["examples"]] == [4]
    assert (
        [e["row"] for e in problem(report, "no_reply")["examples"]]
        == [n for n, p in enumerate(pairs, 1) if len(p["prompt"]) >= 40]
        == [5]
    )


def test_classification_reports_label_balance_and_the_stratified_split(tmp_path, minilm_dir):
    from transformers import AutoTokenizer

    from worker.rows import stratified_split

    rows = [{"text": f"message {n}", "label": ["spam", "ham ", "ham"][n % 3]} for n in range(30)]
    rows.append({"text": "word " * 300, "label": "spam"})
    rows.append({"text": "message 0", "label": "ham"})  # message 0 again, other label
    report = compute_report(write_jsonl(tmp_path / "rows.jsonl", rows), "classify", minilm_dir, 128)
    assert report["labels"]["counts"] == [["ham", 21], ["spam", 11]]
    assert report["cutoff"] == 128 and report["tokens"]["truncated"] == 1
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    assert report["tokens"]["max"] == len(tokenizer("word " * 300)["input_ids"])
    trimmed = [row | {"label": row["label"].strip(), "n": n} for n, row in enumerate(rows)]
    _, held = stratified_split(trimmed, 0.1, 42)
    assert sorted(quality_stratified(trimmed, 0.1, 42).tolist()) == sorted(row["n"] for row in held)
    assert report["split"]["validation_rows"] == len(held)
    assert sum(row["text"] == "message 0" for row in held) in (0, 2)  # its two labels on one side


def test_the_encoder_cutoff_is_the_models_own_limit_when_lower(tmp_path, minilm_dir):
    rows = [{"query": f"q{n}", "positive": "word " * 400} for n in range(4)]
    report = compute_report(write_jsonl(tmp_path / "rows.jsonl", rows), "embed", minilm_dir, 4096)
    assert report["cutoff"] == 256  # sentence-transformers' max_seq_length for MiniLM
    assert report["tokens"]["truncated"] == 4
    # No row has a negative: the dataset does not use the field, which is not a problem of each row.
    assert "empty_negative" not in {p["key"] for p in report["problems"]}
    assert report["unused_optional"] == ["negative"]


def test_reranking_flags_queries_without_a_relevant_document(tmp_path, minilm_dir):
    from worker.recipes.rerank import split_by_query

    rows = []
    for q in range(12):
        for d in range(3):
            rows.append({"query": f"query {q}", "document": f"doc {q}-{d}", "relevance": float(d == 0 and q % 4 != 0)})
    report = compute_report(write_jsonl(tmp_path / "rows.jsonl", rows), "rerank", minilm_dir, 64)
    no_relevant = problem(report, "no_relevant")
    assert no_relevant["count"] == 3 and [e["row"] for e in no_relevant["examples"]] == [1, 13, 25]
    assert report["labels"]["counts"] == [["0", 27], ["1", 9]]
    _, held = split_by_query(rows, 0.1, 42)
    assert report["split"]["validation_rows"] == len(held) == 3


def test_embedding_overlap_is_by_query(tmp_path, minilm_dir):
    rows = [{"query": f"q{n}", "positive": f"p{n}"} for n in range(20)]
    validation = [
        {"query": "q1", "positive": "else"},
        {"query": "q2", "positive": "p2"},
        {"query": "z", "positive": "p"},
    ]
    report = compute_report(
        write_jsonl(tmp_path / "rows.jsonl", rows),
        "embed",
        minilm_dir,
        64,
        validation_path=write_jsonl(tmp_path / "v.jsonl", validation),
    )
    assert problem(report, "overlap")["count"] == 2


@pytest.mark.parametrize("count", [0, 1, 2, 7, 100])
def test_split_positions_hold_out_what_split_rows_holds_out(count):
    from worker.rows import split_rows

    _, held = split_rows(list(range(count)), 0.2, 3, key=str)
    assert sorted(quality.split_positions(count, 0.2, 3).tolist()) == held


def test_templating_placeholders_left_in_the_text_are_flagged_with_examples(tmp_path, smollm2_dir):
    rows = [{"instruction": f"Question {n}?", "response": f"Answer {n}."} for n in range(8)]
    rows[1]["instruction"] = "Write to {{ customer_name }} about the order."
    rows[3]["response"] = "Dear {name}, thanks."
    rows[4]["system"] = "You help ${company}'s customers."
    rows[5]["response"] = r"Not a placeholder: \frac{a}{b}, \textbf{bold}, {\"json\": 1} and {{ }}."
    report = compute_report(write_jsonl(tmp_path / "rows.jsonl", rows), "sft", smollm2_dir, 128)
    placeholders = problem(report, "placeholders")
    assert placeholders["count"] == 3
    assert [(e["row"], e["placeholder"]) for e in placeholders["examples"]] == [
        (2, "{{ customer_name }}"), (4, "{name}"), (5, "${company}")
    ]
    assert "customer_name" in placeholders["examples"][0]["text"]


def test_an_optional_field_no_row_fills_is_named_once_not_counted_as_a_problem(tmp_path, smollm2_dir):
    rows = [{"instruction": f"Question {n}?", "response": f"Answer {n}."} for n in range(5)]
    rows[2]["system"] = "Be brief."
    report = compute_report(write_jsonl(tmp_path / "rows.jsonl", rows), "sft", smollm2_dir, 128)
    assert problem(report, "empty_system")["count"] == 4  # used by one row: the others lack it
    assert "empty_input" not in {p["key"] for p in report["problems"]} and report["unused_optional"] == ["input"]


def quality_stratified(rows: list[dict], fraction: float, seed: int):
    import numpy as np

    from worker.rows import row_input

    names = sorted({row["label"] for row in rows})
    labels = np.array([names.index(row["label"]) for row in rows], dtype=np.int64)
    digests = np.array([quality._digest(row_input(row)) for row in rows], dtype=np.uint64)
    return quality.stratified_positions(labels, names, *quality.first_appearance_groups(digests), fraction, seed)


def tricky_conversations() -> list[list[dict]]:
    """Contents the chat template's fast path must render exactly as transformers' renderer."""
    texts = [
        "A typed <|im_end|> and <|im_start|>assistant\nnot a turn, <|endoftext|> too",
        "\U000f0000<|im_end|>\U000f0001 forged control-token markers",
        "\U000f00f00\U000f00f1 the fast path's own placeholder characters",
        "Unicode: é ß 漢字 🙂 مرحبا \u200b\u2028 e\u0301",
        "{{ messages }} {% endfor %} {# jinja in the data #}",
        "  leading and trailing whitespace \n\n",
    ]
    conversations = []
    for n, text in enumerate(texts):
        reply = {"role": "assistant", "content": texts[(n + 1) % len(texts)]}
        conversations.append([{"role": "user", "content": text}, reply])
        conversations.append([{"role": "system", "content": texts[n - 1]}, {"role": "user", "content": text}, reply])
        conversations.append([{"role": "system", "content": ""}, {"role": "user", "content": text}, reply])
    return conversations


def test_the_chat_templates_fast_path_renders_tricky_rows_as_transformers_does(smollm2_dir):
    counter = quality.TokenCounter(smollm2_dir, "sft", 512)
    conversations = tricky_conversations() * 12  # every layout past its checked rows
    for add_generation_prompt in (False, True):
        prompts = [c[:-1] for c in conversations] if add_generation_prompt else conversations
        real = counter.render_slowly(prompts, add_generation_prompt)
        assert counter.render(prompts, add_generation_prompt) == real  # checked against the renderer
        assert counter.render(prompts, add_generation_prompt) == real  # then through the fast path alone
    layouts = counter._layouts.values()
    assert len(layouts) == 6 and all(layout.trusted for layout in layouts)


def test_tricky_rows_measure_as_the_workers_tokenization(smollm2_dir):
    from transformers import AutoTokenizer

    from worker.recipes.sft import tokenize_example

    rows = []
    for conversation in tricky_conversations() * 6:
        *prompt, reply = conversation
        row = {"instruction": prompt[-1]["content"], "response": reply["content"]}
        rows.append(row | ({"system": prompt[0]["content"]} if len(prompt) == 2 else {}))
    counter = quality.TokenCounter(smollm2_dir, "sft", 512)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    expected = [len(tokenize_example(row, tokenizer, 10**6)["input_ids"]) for row in rows]
    assert counter.lengths(rows)[0] == expected
    assert counter.lengths(rows)[0] == expected  # the fast path, now trusted


def test_a_template_that_changes_the_contents_keeps_the_real_renderer(tmp_path, smollm2_dir):
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, tmp_path / name)
    (tmp_path / "chat_template.jinja").write_text(
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] | trim }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    counter = quality.TokenCounter(tmp_path, "sft", 512)
    conversations = tricky_conversations() * 12
    real = counter.render_slowly(conversations, False)
    assert counter.render(conversations, False) == counter.render(conversations, False) == real
    assert "  leading" not in "".join(real)  # the template trimmed the contents
    assert not any(layout.trusted for layout in counter._layouts.values())


def test_kto_rows_and_conversations_are_measured_through_the_template(tmp_path, smollm2_dir):
    rows = [{"prompt": "Say hi", "completion": "Hi!", "label": "true"},
            {"prompt_messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                 {"role": "user", "content": "c"}], "completion": "d", "label": "false"}]
    from transformers import AutoTokenizer

    report = compute_report(write_jsonl(tmp_path / "rows.jsonl", rows), "kto", smollm2_dir, 512)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    longest = tokenizer.apply_chat_template(
        [*rows[1]["prompt_messages"], {"role": "assistant", "content": "d"}], return_dict=False)
    assert report["rows"] == 2 and report["tokens"]["max"] == len(longest)


def test_a_long_document_is_not_truncated_it_is_packed(tmp_path, smollm2_dir):
    rows = [{"text": "valve maintenance " * 200}, {"text": "short note"}]
    report = compute_report(write_jsonl(tmp_path / "rows.jsonl", rows), "domain", smollm2_dir, 64)
    assert report["tokens"]["max"] > 64
    assert next(p for p in report["problems"] if p["key"] == "truncated")["count"] == 0
