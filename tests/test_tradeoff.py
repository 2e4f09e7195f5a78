"""Task gain against forgetting (worker.tradeoff), and the checkpoints kept for download by it
(worker.snapshots): which evaluations are kept, which one is the best trade-off, what a kept one
holds."""

import json
import zipfile

import pytest
import torch
from safetensors.torch import load_file

from worker import tradeoff
from worker.snapshots import MAX_KEPT, Snapshots, load_weights, trained_weights
from worker.spec import TrainSpec

P = tradeoff.Point


def test_a_point_beaten_on_both_counts_is_off_the_front_whichever_way_the_metric_goes():
    accuracy = [P(1, 0.6, 0.1), P(2, 0.8, 0.2), P(3, 0.7, 0.3), P(4, 0.8, 0.2)]
    assert [p.key for p in tradeoff.front(accuracy, "accuracy")] == [1, 2, 4]  # 3: worse than 2 on both; 2 = 4
    loss = [P(1, 2.0, 0.1), P(2, 1.5, 0.2), P(3, 1.8, 0.3)]
    assert [p.key for p in tradeoff.front(loss, "eval_loss")] == [1, 2]


def test_the_balanced_point_weighs_shares_of_the_gain_against_shares_of_the_forgetting():
    # From 0.3: gains 0.5, 0.6, 0.6; forgetting 0.02, 0.30, 0.10: 0.83 - 0.07 beats 1 - 1 and 1 - 0.33.
    runs = [P("gentle", 0.8, 0.02), P("strong", 0.9, 0.30), P("middle", 0.9, 0.10)]
    assert tradeoff.balanced(runs, "accuracy", base=0.3).key == "gentle"
    # Lower is better for a loss: from 2.0 at step 0, 1.0 for 0.05 beats 0.9 for 0.5.
    evals = [P(10, 1.0, 0.05), P(20, 0.9, 0.5)]
    assert tradeoff.balanced(evals, "eval_loss", base=2.0).key == 10
    assert tradeoff.balanced([], "accuracy") is None
    # Nothing forgotten anywhere: the best metric wins.
    assert tradeoff.balanced([P(1, 0.5, 0.0), P(2, 0.7, 0.0)], "accuracy").key == 2


def test_points_need_both_numbers():
    entries = [(1, {"accuracy": 0.5, "forgetting": 0.1}), (2, {"accuracy": 0.6}), (3, {"accuracy": float("nan"),
                                                                                        "forgetting": 0.1})]
    assert tradeoff.points(entries, "accuracy") == [P(1, 0.5, 0.1)]


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = torch.nn.Linear(3, 3)
        self.trained = torch.nn.Linear(3, 2)
        self.frozen.requires_grad_(False)


@pytest.fixture
def snapshots(tmp_path):
    spec = TrainSpec(base_model="x", dataset_path="d", output_dir=str(tmp_path), task="classify", job_id=7)
    return Snapshots(spec)


def evaluate(snapshots, model, step, accuracy, forgetting):
    with torch.no_grad():
        model.trained.weight.fill_(step)
    snapshots.take(model, step, {"kind": "eval", "step": step, "accuracy": accuracy, "forgetting": forgetting})


def test_only_the_trained_weights_of_the_evaluations_on_the_front_are_kept(snapshots):
    model = Tiny()
    evaluate(snapshots, model, 10, 0.6, 0.1)
    evaluate(snapshots, model, 20, 0.5, 0.2)  # worse on both than step 10: not kept
    evaluate(snapshots, model, 30, 0.8, 0.3)
    evaluate(snapshots, model, 40, 0.7, 0.05)  # better on both than step 10: 10 is dropped
    assert [step for step, _ in snapshots.entries()] == [30, 40]
    kept = load_file(str(snapshots.folder / "step-40.safetensors"))
    assert set(kept) == {"trained.weight", "trained.bias"} and torch.all(kept["trained.weight"] == 40)
    assert json.loads((snapshots.folder / "step-40.json").read_text())["accuracy"] == 0.7


def test_an_evaluation_without_forgetting_is_not_kept(snapshots):
    evaluate_without = {"kind": "eval", "step": 5, "accuracy": 0.9}
    snapshots.take(Tiny(), 5, evaluate_without)
    assert snapshots.entries() == []


def test_at_most_max_kept_stay_with_both_extremes_and_the_balanced_one(snapshots):
    model = Tiny()
    for i in range(MAX_KEPT + 3):  # every one on the front: more accuracy for more forgetting
        evaluate(snapshots, model, 10 * (i + 1), 0.5 + 0.04 * i, 0.01 * (i + 1) ** 2)
    steps = [step for step, _ in snapshots.entries()]
    assert len(steps) == MAX_KEPT and 10 in steps and 10 * (MAX_KEPT + 3) in steps


def test_the_export_writes_each_kept_evaluation_with_its_own_weights_and_restores_the_final(snapshots):
    model = Tiny()
    evaluate(snapshots, model, 10, 0.6, 0.02)
    evaluate(snapshots, model, 20, 0.7, 0.15)
    with torch.no_grad():
        model.trained.weight.fill_(99)  # the final model
    seen = {}

    def write(target, folder, card):
        folder.mkdir(parents=True)
        seen[card["checkpoint_step"]] = (target is model, float(target.trained.weight[0, 0]), card)
        (folder / "weights.json").write_text(json.dumps(target.trained.weight.tolist()))
        return folder

    card = {"metrics_before": {"accuracy": 0.3}, "train_loss": 0.1}
    listed = snapshots.export(model, 30, {"accuracy": 0.9, "forgetting": 0.5}, card, write, merges=True)
    assert [(e["step"], e["final"], e["balanced"]) for e in listed] == [(10, False, True), (20, False, False),
                                                                         (30, True, False)]
    assert {step: value for step, (_, value, _) in seen.items()} == {10: 10.0, 20: 20.0}
    assert not any(same for same, _, _ in seen.values())  # merges: each export got a copy
    assert seen[10][2]["metrics_after"]["accuracy"] == 0.6 and seen[10][2]["train_loss"] is None
    assert torch.all(model.trained.weight == 99)  # the final model is back for its own export
    with zipfile.ZipFile(listed[0]["zip"]) as archive:
        assert archive.namelist() == ["specialist-job-7-model-step-10/weights.json"]
    assert listed[2]["zip"] is None and listed[0]["metrics"] == {"accuracy": 0.6, "forgetting": 0.02}


def test_a_final_model_better_on_both_counts_leaves_nothing_else_to_download(snapshots):
    model = Tiny()
    evaluate(snapshots, model, 10, 0.6, 0.2)
    listed = snapshots.export(model, 20, {"accuracy": 0.9, "forgetting": 0.1}, {}, lambda *a: pytest.fail("written"))
    assert [(e["step"], e["final"], e["balanced"]) for e in listed] == [(20, True, True)]


def test_kept_weights_load_back_into_the_model_and_refuse_a_different_one():
    model, other = Tiny(), torch.nn.Linear(2, 2)
    weights = trained_weights(model)
    with torch.no_grad():
        model.trained.weight.zero_()
    load_weights(model, weights)
    assert torch.equal(model.trained.weight, weights["trained.weight"])
    with pytest.raises(RuntimeError, match="lacks"):
        load_weights(other, weights)


def test_a_final_model_beaten_by_a_kept_one_is_listed_and_restored_after_the_kept_ones_export(snapshots):
    model = Tiny()
    evaluate(snapshots, model, 10, 0.9, 0.1)
    with torch.no_grad():
        model.trained.weight.fill_(99)
    written = []

    def write(target, folder, card):
        folder.mkdir(parents=True)
        written.append(float(target.trained.weight[0, 0]))
        return folder

    listed = snapshots.export(model, 20, {"accuracy": 0.8, "forgetting": 0.3}, {}, write)
    assert [(e["step"], e["final"], e["balanced"]) for e in listed] == [(10, False, True), (20, True, False)]
    assert written == [10.0] and torch.all(model.trained.weight == 99)
