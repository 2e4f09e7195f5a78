"""The encoder families' forgetting meter: the probe, the rank correlation and what moves it."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from worker import encoder_forgetting
from worker.encoder_forgetting import ForgettingMeter, forgetting, load_probe, ranks, spearman


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def classifier(folder, labels: int = 2):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=labels, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(folder)


def test_the_probe_has_pairs_of_two_sentences_with_a_gold_score_from_0_to_5():
    pairs = load_probe()
    assert 100 <= len(pairs) <= 200
    for pair in pairs:
        assert set(pair) == {"a", "b", "gold"}
        assert pair["a"].strip() and pair["b"].strip() and pair["a"] != pair["b"]
        assert 0 <= pair["gold"] <= 5
    golds = [pair["gold"] for pair in pairs]
    assert min(golds) == 0 and max(golds) == 5, "the probe spans unrelated to paraphrase"
    assert len({(pair["a"], pair["b"]) for pair in pairs}) == len(pairs)


def test_ties_share_their_average_rank():
    assert ranks(torch.tensor([10.0, 20.0, 20.0, 5.0, 20.0])).tolist() == [2.0, 4.0, 4.0, 1.0, 4.0]


def test_spearman_matches_a_hand_computed_case_with_ties():
    # x ranks 1, 2.5, 2.5, 4; y ranks 1, 2, 4, 3. Centred: (-1.5, 0, 0, 1.5) and (-1.5, -0.5, 1.5, 0.5);
    # their products sum to 3, the norms are sqrt(4.5) and sqrt(5): rho = 3 / sqrt(22.5).
    assert spearman([1.0, 2.0, 2.0, 3.0], [0.1, 0.5, 0.9, 0.7]) == pytest.approx(3 / 22.5**0.5)
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) == 0.0, "a constant side has no order"


def test_a_model_compared_with_itself_has_rho_1_and_forgetting_0(minilm_dir):
    model, tokenizer = classifier(minilm_dir)
    meter = ForgettingMeter(lambda: model, tokenizer, gold=True)
    baseline = meter()
    assert spearman(meter.base, meter.base) == pytest.approx(1.0)
    assert baseline["forgetting"] == 0.0
    values = meter()
    assert values == baseline
    assert values["general_gold_rho"] > 0.6, "MiniLM orders everyday sentence pairs much as a person does"


def test_training_on_noise_raises_forgetting_clearly(tiny_bert_dir):
    model, tokenizer = classifier(tiny_bert_dir)
    meter = ForgettingMeter(lambda: model, tokenizer)
    assert meter()["forgetting"] == 0.0
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-2)
    model.train()
    for _ in range(5):
        ids = torch.randint(1000, len(tokenizer), (16, 12), generator=generator)
        labels = torch.randint(0, 2, (16,), generator=generator)
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert meter()["forgetting"] > 0.2
    assert model.training, "the meter leaves the model in the mode it found it in"


def test_forgetting_is_one_minus_rho():
    assert forgetting([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(1 - 0.8)


def test_evaluations_during_training_measure_only_within_the_time_budget(tiny_bert_dir, monkeypatch):
    model, tokenizer = classifier(tiny_bert_dir)
    meter = ForgettingMeter(lambda: model, tokenizer)
    now = [100.0]
    monkeypatch.setattr(encoder_forgetting.time, "monotonic", lambda: now[0])
    meter.started = now[0]
    meter()  # the baseline: 0 s on this clock
    meter.spent = meter.last_cost = 1.0  # as if the pass had taken a second
    now[0] += 39  # 2 s of probe in 39 s is over 5 %
    assert meter.if_affordable() == {}
    now[0] += 1  # in 40 s it is 5 %
    assert meter.if_affordable() == {"forgetting": 0.0}
