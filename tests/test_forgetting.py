"""The forgetting meter (worker.forgetting) on the tiny llama: a model compared with itself has
forgotten nothing, one trained on noise has, and the top-k KL kept without a second model is close
to the full KL computed with two."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from worker import forgetting
from worker.recipes import sft
from worker.spec import SpecError, TrainChoices

KL_TOLERANCE = 0.05
"""How far the kept estimate (top-k exact, tail sampled) may be from the full KL on the tiny model
trained on noise, relative to the full KL. The tiny random model's next-token distributions are
nearly flat (its top-64 hold under a tenth of the mass): the hardest case, most of the KL is in the
sampled tail."""


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def base(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def noise_trained(base):
    """The base after a few steps of full fine-tuning on random tokens at a high learning rate."""
    model = copy.deepcopy(base).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        noise = torch.randint(0, model.config.vocab_size, (4, 32), generator=generator)
        model(input_ids=noise, labels=noise).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def reference(base, tokenizer):
    return forgetting.measure_base(base, tokenizer)


def test_the_probe_files_load_and_tokenize_through_the_bases_tokenizer(tokenizer):
    texts = forgetting.probe_texts()
    assert set(texts) == {"prose.txt", "dialogue.txt", "code.txt"} and all(texts.values())
    probe = forgetting.tokenize_probe(tokenizer)
    assert probe.input_ids.shape == (3, forgetting.PROBE_TOKENS)  # each file is longer than the probe reads
    assert probe.rows[2] == tokenizer(texts["code.txt"])["input_ids"][: forgetting.PROBE_TOKENS]
    assert probe.positions == 3 * (forgetting.PROBE_TOKENS - 1)
    prompts = forgetting.general_prompts()
    assert 8 <= len(prompts) <= 12 and all(isinstance(prompt, str) and prompt for prompt in prompts)
    assert "licensed with it" in (forgetting.PROBE_DIR / "README.md").read_text()


def test_a_shorter_probe_row_is_padded_and_its_padding_not_scored():
    probe = forgetting.Probe.from_rows([[5, 6, 7], [8, 9]])
    assert probe.input_ids.tolist() == [[5, 6, 7], [8, 9, 0]]
    assert probe.scored.tolist() == [[True, True], [True, False]]
    assert probe.rows == [[5, 6, 7], [8, 9]]


def test_a_model_compared_with_itself_has_forgotten_nothing(base, reference):
    metrics, kept = reference
    assert metrics["forgetting"] == metrics["general_kl"] == 0
    again = forgetting.measure(base, kept)
    assert again["forgetting"] == 0
    assert again["general_perplexity"] == pytest.approx(metrics["general_perplexity"], rel=1e-9)
    assert 0 < again["general_kl_coverage"] < 1
    # Kept as JSON with the baseline (rounded log-probabilities), as a resumed attempt reads it.
    from_json = forgetting.Reference.from_json(json.loads(json.dumps(kept.to_json())))
    assert forgetting.measure(base, from_json)["forgetting"] == pytest.approx(0, abs=1e-5)


def test_forgetting_grows_when_the_model_is_trained_on_noise(noise_trained, reference):
    metrics, kept = reference
    after = forgetting.measure(noise_trained, kept)
    assert after["forgetting"] > 0.05, after
    assert after["general_perplexity"] != pytest.approx(metrics["general_perplexity"], rel=1e-3)


def test_the_kept_kl_estimate_is_close_to_the_full_kl_of_two_models(base, noise_trained, reference):
    _, kept = reference
    base_logprobs, _ = forgetting.probe_logprobs(base, kept.probe)
    tuned_logprobs, _ = forgetting.probe_logprobs(noise_trained, kept.probe)
    full = float(forgetting.full_kl(base_logprobs, tuned_logprobs).mean())
    estimate = forgetting.measure(noise_trained, kept)["general_kl"]
    print(f"tiny llama trained on noise: full KL {full:.5f}, kept estimate {estimate:.5f} "
          f"({(estimate - full) / full:+.2%}), top-{forgetting.TOP_K} coverage {kept.top_logprobs.exp().sum(-1).mean():.3f}")
    assert estimate == pytest.approx(full, rel=KL_TOLERANCE)


def test_over_the_whole_vocabulary_the_estimate_is_the_full_kl(base, noise_trained, reference):
    _, kept = reference
    base_logprobs, _ = forgetting.probe_logprobs(base, kept.probe)
    tuned_logprobs, _ = forgetting.probe_logprobs(noise_trained, kept.probe)
    everything = base_logprobs.argsort(-1, descending=True)
    no_tail = everything[:, :0]
    kl, coverage = forgetting.kl_estimate(base_logprobs.gather(-1, everything), tuned_logprobs.gather(-1, everything),
                                          base_logprobs.gather(-1, no_tail), tuned_logprobs.gather(-1, no_tail))
    assert kl == pytest.approx(forgetting.full_kl(base_logprobs, tuned_logprobs), rel=1e-6, abs=1e-9)
    assert coverage == pytest.approx(torch.ones_like(coverage), abs=1e-5)  # fp32 sums


def test_the_tail_is_weighted_by_the_mass_outside_the_top_k():
    base_top, tuned_top = torch.tensor([[0.5, 0.3]]).log(), torch.tensor([[0.25, 0.15]]).log()
    # Outside the top-2 the base has 0.2 of the mass; the two tail draws say the tuned model puts
    # three times as much on them as the base.
    base_tail, tuned_tail = torch.tensor([[0.1, 0.05]]).log(), torch.tensor([[0.3, 0.15]]).log()
    kl, coverage = forgetting.kl_estimate(base_top, tuned_top, base_tail, tuned_tail)
    expected = 0.8 * torch.log(torch.tensor(2.0)) + 0.2 * torch.log(torch.tensor(1 / 3))
    assert float(kl[0]) == pytest.approx(float(expected)) and float(coverage[0]) == pytest.approx(0.8)


def test_a_kept_sft_baseline_brings_back_its_reference_and_answers(reference):
    metrics, kept = reference
    baseline = sft.Baseline(metrics, ["a reply"], kept, ["Paris."])
    again = sft.kept_baseline(json.loads(json.dumps(baseline.kept())))
    assert again.metrics == metrics and again.general_answers == ["Paris."]
    assert again.general.top_ids.tolist() == kept.top_ids.tolist()
    # A baseline kept before the meter existed resumes without it.
    assert sft.kept_baseline([metrics, ["a reply"]]).general is None


# Replay: the remedy -----------------------------------------------------------------------------


def test_replay_rows_are_general_text_other_than_the_probe_with_the_loss_on_every_token(tokenizer):
    rows = forgetting.replay_rows(tokenizer, 20, max_length=64)
    assert len(rows) == 20 and all(row["labels"] == row["input_ids"] and 1 < len(row["input_ids"]) <= 64 for row in rows)
    pieces = {tuple(row["input_ids"]) for row in rows}
    assert len(pieces) < 20  # the corpus is taken again from the start
    replay = (forgetting.PROBE_DIR / forgetting.REPLAY_FILE).read_text()
    probe_lines = {line.strip() for text in forgetting.probe_texts().values() for line in text.splitlines()}
    shared = {line.strip() for line in replay.splitlines()} & probe_lines - {""}
    assert not {line for line in shared if len(line) > 20}, shared  # no sentence of the probe is trained on


def test_replay_makes_its_share_of_the_training_rows():
    assert forgetting.replay_count(30, 0.25) == 10 and forgetting.replay_count(30, 0) == 0


@pytest.mark.parametrize(("task", "fraction", "message"), [
    ("sft", 0.6, "at most 0.5"), ("sft", -0.1, "at least 0"), ("domain", 0.2, "instruction tuning only"),
])
def test_replay_is_refused_outside_its_range_and_task(task, fraction, message):
    with pytest.raises(SpecError, match=message) as caught:
        TrainChoices(base_model="smollm2-135m-instruct", task=task, replay_fraction=fraction)
    assert caught.value.field == "replay_fraction"
