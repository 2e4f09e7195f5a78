"""The census against parameter counts worked out by hand from the tiny llama's config."""

import json

import pytest

from tests.support.model_fixtures import TINY_LLAMA
from worker.models import apply_method, load_causal_lm
from worker.params import census
from worker.spec import LORA_TARGETS, TrainSpec

HIDDEN = TINY_LLAMA["hidden_size"]  # 64
LAYERS = TINY_LLAMA["num_hidden_layers"]  # 2
HEAD_DIM = HIDDEN // TINY_LLAMA["num_attention_heads"]  # 16
KV = TINY_LLAMA["num_key_value_heads"] * HEAD_DIM  # 32: k and v project to 2 heads of 16
MLP = TINY_LLAMA["intermediate_size"]  # 128

# (out, in) of each linear layer in one decoder layer.
SHAPES = {
    "q_proj": (HIDDEN, HIDDEN),
    "k_proj": (KV, HIDDEN),
    "v_proj": (KV, HIDDEN),
    "o_proj": (HIDDEN, HIDDEN),
    "gate_proj": (MLP, HIDDEN),
    "up_proj": (MLP, HIDDEN),
    "down_proj": (HIDDEN, MLP),
}
PER_LAYER = sum(d * k for d, k in SHAPES.values()) + 2 * HIDDEN  # linears + 2 RMSNorm weights


def base_total(vocab: int) -> int:
    # One embedding matrix (the output head is tied to it, not a second copy) + layers + final norm.
    return vocab * HIDDEN + LAYERS * PER_LAYER + HIDDEN


@pytest.fixture(scope="module")
def vocab(tiny_llama_dir) -> int:
    return json.loads((tiny_llama_dir / "config.json").read_text())["vocab_size"]


def census_for(tiny_llama_dir, **overrides) -> dict:
    spec = TrainSpec(base_model=str(tiny_llama_dir), dataset_path="-", output_dir="-", **overrides)
    model, _ = load_causal_lm(spec)
    return census(apply_method(model, spec), spec)


def test_the_hand_count_of_the_tiny_llama_is_what_we_think():
    assert PER_LAYER == 4096 + 2048 + 2048 + 4096 + 3 * 8192 + 128 == 36_992


def test_lora_on_all_linear_layers(tiny_llama_dir, vocab):
    r = 8
    counts = census_for(tiny_llama_dir, method="lora", lora_r=r)
    adapters = LAYERS * sum(r * (d + k) for d, k in SHAPES.values())
    assert adapters == 2 * 8 * (128 + 96 + 96 + 128 + 192 + 192 + 192) == 16_384
    assert counts["trainable"] == adapters
    assert counts["frozen"] == base_total(vocab)
    assert counts["total"] == base_total(vocab) + adapters
    assert counts["trainable_pct"] == round(100 * adapters / (base_total(vocab) + adapters), 4)
    assert counts["method"] == "lora"
    assert counts["matrices"] == [
        {
            "module": name,
            "shape": [d, k],
            "count": LAYERS,
            "full": d * k,
            "lora": r * (d + k),
            "ratio": round(d * k / (r * (d + k)), 2),
        }
        for name, (d, k) in SHAPES.items()
    ]
    json.dumps(counts)


def test_lora_on_q_and_v_only(tiny_llama_dir, vocab):
    counts = census_for(tiny_llama_dir, method="lora", lora_r=4, lora_target_modules=["q_proj", "v_proj"])
    adapters = LAYERS * (4 * (HIDDEN + HIDDEN) + 4 * (KV + HIDDEN))
    assert adapters == 2 * (512 + 384)
    assert counts["trainable"] == adapters
    assert counts["total"] == base_total(vocab) + adapters
    assert [row["module"] for row in counts["matrices"]] == ["q_proj", "v_proj"]
    assert counts["matrices"][1] == {
        "module": "v_proj",
        "shape": [32, 64],
        "count": 2,
        "full": 2048,
        "lora": 384,
        "ratio": 5.33,
    }


def test_full_fine_tune_trains_everything_once(tiny_llama_dir, vocab):
    counts = census_for(tiny_llama_dir, method="full")
    assert counts["total"] == counts["trainable"] == base_total(vocab)
    assert counts["frozen"] == 0
    assert counts["trainable_pct"] == 100.0
    rows = {row["module"]: row for row in counts["matrices"]}
    # The tied output head is the embedding matrix: it is listed once, as the embedding.
    assert list(rows) == ["embed_tokens", *SHAPES]
    assert rows["embed_tokens"]["shape"] == [vocab, HIDDEN]
    assert rows["k_proj"] == {
        "module": "k_proj",
        "shape": [KV, HIDDEN],
        "count": LAYERS,
        "full": KV * HIDDEN,
        "lora": None,
        "ratio": None,
    }


def test_lora_targets_cover_every_llama_linear_layer():
    assert set(LORA_TARGETS) == set(SHAPES)
