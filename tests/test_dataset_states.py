"""Dataset statuses move only along Dataset's transition table, each move one conditional UPDATE."""

import pytest

from webapp.datasets.models import PARSING, READY, REJECTED, REVIEW, TRANSITIONS, UPLOADED, Dataset

pytestmark = pytest.mark.django_db


@pytest.fixture
def dataset(owner):
    return Dataset.objects.create(owner=owner, name="d", original_name="d.jsonl", format="jsonl")


def test_every_status_is_in_the_table_and_every_target_is_a_status():
    statuses = {value for value, _ in Dataset.STATUSES}
    assert set(TRANSITIONS) == statuses
    assert set().union(*TRANSITIONS.values()) <= statuses


def test_only_one_reader_can_claim_a_dataset(dataset):
    assert dataset.claim_parse()
    assert Dataset.objects.get(id=dataset.id).transition(READY, from_states=[PARSING])
    assert not dataset.claim_parse()  # read meanwhile: nothing left to claim
    assert Dataset.objects.get(id=dataset.id).status == READY


def test_a_move_outside_the_table_changes_nothing(dataset):
    assert not dataset.transition(READY)  # uploaded datasets are read before they are ready
    assert dataset.transition(PARSING) and dataset.transition(REVIEW)
    assert not dataset.transition(REJECTED)
    assert Dataset.objects.get(id=dataset.id).status == REVIEW == dataset.status


def test_accepting_dropped_rows_moves_only_a_dataset_in_review(dataset):
    assert not dataset.accept_dropped_rows()
    dataset.transition(PARSING)
    dataset.transition(REVIEW)
    assert dataset.accept_dropped_rows()
    assert Dataset.objects.get(id=dataset.id).status == READY


def test_a_transition_writes_its_fields_with_the_status(dataset):
    dataset.transition(PARSING)
    assert dataset.transition(REJECTED, from_states=[PARSING], message="No rows.")
    stored = Dataset.objects.get(id=dataset.id)
    assert (stored.status, stored.message) == (REJECTED, "No rows.")
    assert dataset.transition(UPLOADED, parse_sent_at=None)
    assert Dataset.objects.get(id=dataset.id).status == UPLOADED
