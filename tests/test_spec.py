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


def test_the_users_choices_are_validated_without_any_paths():
    from worker.spec import TrainChoices

    choices = TrainChoices(base_model="smollm2-135m-instruct", task="classify", method="head")
    assert "dataset_path" not in choices.to_dict() and "output_dir" not in choices.to_dict()
    with pytest.raises(SpecError, match="head does not apply to sft"):
        TrainChoices(base_model="smollm2-135m-instruct", method="head")


def test_a_spec_is_the_choices_and_where_the_worker_runs_them():
    from worker.spec import TrainChoices

    with pytest.raises(TypeError, match="dataset_path"):
        TrainSpec(base_model="m", output_dir="/tmp/o")
    spec = TrainSpec(base_model="m", dataset_path="/d.jsonl", output_dir="/o", job_id=7, lora_r=4)
    assert isinstance(spec, TrainChoices) and spec.lora_r == 4 and spec.job_id == 7
    assert TrainSpec.from_json(spec.to_json()) == spec


def test_defaults_are_read_from_one_place():
    from worker.spec import TrainChoices

    defaults = TrainChoices.defaults()
    assert TrainChoices(base_model="m").to_dict() == {"base_model": "m", **defaults}
    assert defaults["lora_target_modules"] is not TrainChoices.defaults()["lora_target_modules"]
