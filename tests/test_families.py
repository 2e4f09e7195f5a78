"""The task-family registry is complete: every record names modules that exist and settings
that its own checks accept, so a new family cannot be half-added."""

import importlib.util
from pathlib import Path

import pytest

from worker.families import FAMILIES
from worker.spec import METHODS, TrainChoices

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("family", FAMILIES.values(), ids=list(FAMILIES))
def test_each_family_names_its_recipe_checks_and_samples(family):
    for module in (family.recipe, family.checks_module, family.samples_module):
        assert importlib.util.find_spec(module) is not None, module
    assert (ROOT / (family.recipe.replace(".", "/") + ".py")).is_file()


@pytest.mark.parametrize("family", FAMILIES.values(), ids=list(FAMILIES))
def test_each_familys_facts_agree_with_each_other(family):
    assert family.primary_metric in family.metrics
    assert set(family.methods) <= set(METHODS)
    assert set(family.inputs) <= set(family.fields) and set(family.numeric) <= set(family.required)
    assert family.suggested.method in family.methods
    assert set(family.suggested.learning_rates) <= set(family.methods)
    assert family.peft_task_type in ("CAUSAL_LM", "SEQ_CLS", "FEATURE_EXTRACTION")


@pytest.mark.parametrize("family", FAMILIES.values(), ids=list(FAMILIES))
def test_the_suggested_settings_are_valid_choices_for_every_suggested_method(family):
    suggested = family.suggested
    for method, learning_rate in suggested.learning_rates.items():
        TrainChoices(
            base_model=suggested.base_model, task=family.key, method=method, learning_rate=learning_rate,
            max_steps=suggested.max_steps, batch_size=suggested.batch_size, max_seq_length=suggested.max_seq_length,
        )
