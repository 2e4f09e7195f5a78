import pytest

from worker.spec import SpecError, TrainSpec


def make_spec(**overrides) -> TrainSpec:
    return TrainSpec(base_model="smollm2-135m-instruct", dataset_path="data.jsonl", output_dir="out", **overrides)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lora_r", 0),
        ("learning_rate", 0.0),
        ("learning_rate", -1e-4),
        ("max_seq_length", 7),
        ("validation_fraction", 1.0),
        ("validation_fraction", 1.5),
    ],
)
def test_it_names_the_field_that_holds_an_impossible_value(field, value):
    with pytest.raises(SpecError) as raised:
        make_spec(**{field: value})
    assert raised.value.field == field
    assert str(raised.value).startswith(f"{field}: ")


def test_it_accepts_the_defaults():
    spec = make_spec()
    assert spec.method == "lora"
    assert spec.lora_r >= 1


def test_it_survives_a_json_round_trip():
    spec = make_spec(method="full", max_steps=None, epochs=2.5, lora_target_modules=["q_proj"], job_id=7)
    assert TrainSpec.from_json(spec.to_json()) == spec


def test_it_refuses_unknown_fields():
    data = make_spec().to_dict() | {"colour": "blue"}
    with pytest.raises(SpecError) as raised:
        TrainSpec.from_dict(data)
    assert raised.value.field == "colour"
