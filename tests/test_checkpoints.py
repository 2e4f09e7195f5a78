from pathlib import Path

from worker.checkpoints import is_signed, latest_checkpoint, prune, sign


def make_checkpoint(root: Path, step: int, content: bytes = b"weights") -> Path:
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(content)
    (folder / "optimizer.pt").write_bytes(b"optimizer " + content)
    return folder


def test_the_newest_signed_checkpoint_is_resumed(tmp_path):
    for step in (10, 20):
        sign(make_checkpoint(tmp_path, step), score=None)
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-20")


def test_a_planted_checkpoint_is_never_resumed(tmp_path):
    sign(make_checkpoint(tmp_path, 10), score=None)
    make_checkpoint(tmp_path, 30, content=b"a pickle someone put here")
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")


def test_a_tampered_checkpoint_fails_its_signature(tmp_path):
    folder = make_checkpoint(tmp_path, 10)
    sign(folder, score=1.0)
    (folder / "optimizer.pt").write_bytes(b"replaced")
    assert not is_signed(folder)
    assert latest_checkpoint(tmp_path) is None


def test_a_signature_made_with_another_key_is_refused(tmp_path, monkeypatch):
    folder = make_checkpoint(tmp_path, 10)
    monkeypatch.setenv("SECRET_KEY", "another server")
    sign(folder, score=None)
    monkeypatch.setenv("SECRET_KEY", "this server")
    assert not is_signed(folder)


def test_pruning_keeps_the_last_and_the_best(tmp_path):
    for step, loss in ((10, 2.0), (20, 0.5), (30, 1.0), (40, 1.5)):
        sign(make_checkpoint(tmp_path, step), score=loss)
    prune(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-20", "checkpoint-40"]


def test_the_best_checkpoint_is_judged_by_the_named_metric_of_the_latest_eval_during_training(tmp_path):
    from worker.checkpointing import Checkpointing
    from worker.events import Reporter
    from worker.spec import TrainSpec

    reporter = Reporter()
    spec = TrainSpec(base_model="m", dataset_path="d", output_dir=str(tmp_path), task="rerank", method="full")
    checkpointing = Checkpointing(spec, reporter, best_by="ndcg@10", higher_is_better=True)
    reporter.eval(0, baseline=True, **{"ndcg@10": 0.9})
    assert checkpointing.score(5) is None, "the untouched model's baseline says nothing about a checkpoint"
    reporter.eval(10, **{"ndcg@10": 0.5})
    reporter.eval(20, **{"ndcg@10": 0.7})
    assert checkpointing.score(10) == -0.5
    assert checkpointing.score(25) == -0.7


def test_every_checkpoint_folder_carries_the_resolved_spec(tmp_path):
    from types import SimpleNamespace

    from transformers import TrainerControl

    from worker.checkpointing import Checkpointing
    from worker.events import Reporter
    from worker.spec import TrainSpec

    spec = TrainSpec(base_model="m", dataset_path="d", output_dir=str(tmp_path), task="rerank", method="full", seed=7)
    folder = make_checkpoint(tmp_path, 10)
    state = SimpleNamespace(global_step=10, max_steps=30)
    Checkpointing(spec, Reporter()).on_save(SimpleNamespace(output_dir=str(tmp_path)), state, TrainerControl())
    assert TrainSpec.from_json((folder / "train_spec.json").read_text()) == spec
    assert is_signed(folder), "the spec is signed with the rest of the checkpoint"
