"""One micro-batch per CPU core (worker.microbatches): a split step is the whole batch's step,
and a job gives the same numbers every time it runs, dropout and resumes included."""

import threading
import time

import pytest
import torch

from tests.support.resume import assert_resumed, assert_same_losses, interrupt_and_resume
from worker import microbatches
from worker.events import Reporter
from worker.models import apply_method, load_causal_lm
from worker.recipes import sft
from worker.spec import TrainSpec


@pytest.fixture
def threads():
    """Set torch's thread count for one test (the worker runs one per core)."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture
def token_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECIALIST_TOKEN_CACHE", str(tmp_path / "tokenized"))


def make_spec(base, data, out, **overrides) -> TrainSpec:
    settings = dict(
        max_steps=6,
        batch_size=8,
        max_seq_length=64,
        validation_fraction=0.2,
        eval_every=3,
        learning_rate=1e-2,
        lora_dropout=0,
    )
    return TrainSpec(base_model=str(base), dataset_path=str(data), output_dir=str(out), **(settings | overrides))


def test_rows_are_dealt_in_turn_and_each_micro_batch_is_cut_to_its_longest_row():
    lengths = [6, 5, 3, 2, 1]
    mask = torch.tensor([[1] * n + [0] * (6 - n) for n in lengths])
    batch = {"input_ids": torch.arange(30).view(5, 6) * mask, "attention_mask": mask, "rows": torch.arange(5)}
    first, second = microbatches.split(batch, 2)
    assert first["rows"].tolist() == [0, 2, 4] and second["rows"].tolist() == [1, 3]
    assert first["input_ids"].shape == (3, 6) and second["input_ids"].shape == (2, 5)
    assert second["input_ids"].tolist() == [[6, 7, 8, 9, 10], [18, 19, 0, 0, 0]]
    assert second["attention_mask"].sum().item() == 7


def test_a_cpu_with_several_threads_gets_one_micro_batch_per_thread(threads):
    threads(2)
    assert microbatches.plan(8, torch.device("cpu")) == (2, 1)
    assert microbatches.plan(1, torch.device("cpu")) == (1, 2)
    assert microbatches.plan(8, torch.device("cuda")) == (1, 2)
    threads(6)
    assert microbatches.plan(4, torch.device("cpu")) == (4, 1)
    assert microbatches.plan(2, torch.device("cpu")) == (2, 3)
    threads(1)
    assert microbatches.plan(8, torch.device("cpu")) == (1, 1)


def test_a_failing_micro_batch_is_raised_once_the_others_have_finished():
    finished = []

    def step(batch):
        if batch["rows"][0] == 0:
            raise torch.OutOfMemoryError("simulated")
        time.sleep(0.2)
        finished.append(threading.current_thread().name)
        return 1

    with pytest.raises(torch.OutOfMemoryError):
        microbatches.run(step, [{"rows": torch.tensor([0])}, {"rows": torch.tensor([1])}], threads_each=1)
    assert len(finished) == 1 and finished[0].startswith("micro-batch")


@pytest.fixture
def trainer_and_batch(tiny_llama_dir, sft_jsonl, tmp_path, token_cache_dir, request):
    spec = make_spec(tiny_llama_dir, sft_jsonl, tmp_path, method=request.param)
    model, tokenizer = load_causal_lm(spec)
    model = apply_method(model, spec)
    rows, _, _ = sft.prepare_data(spec, tokenizer, Reporter())
    trainer = sft.LengthGroupedTrainer(
        model=model,
        args=sft.training_arguments(spec, evaluate=False),
        train_dataset=rows,
        data_collator=lambda f: sft.pad_batch(f, tokenizer.pad_token_id),
        compute_loss_func=sft.response_loss,
    )
    batch = sft.pad_batch(sorted(rows[:8], key=lambda row: -len(row["input_ids"])), tokenizer.pad_token_id)
    assert len(set(batch["attention_mask"].sum(dim=1).tolist())) > 1, "the rows should differ in length"
    return trainer, batch


def step_on(trainer, batch, threads: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], set[str]]:
    """The training step's loss and gradients on `threads` torch threads, and the threads that ran
    the model's forward pass."""
    torch.set_num_threads(threads)
    model = trainer.model
    ran_on = set()
    hook = model.register_forward_pre_hook(lambda *_: ran_on.add(threading.current_thread().name))
    model.zero_grad(set_to_none=True)
    loss = trainer.training_step(model, dict(batch), sft.labelled_tokens(batch["labels"]))
    hook.remove()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss, grads, ran_on


@pytest.mark.parametrize("trainer_and_batch", ["lora", "full"], indirect=True)
def test_a_step_split_across_two_cores_has_the_whole_batchs_loss_and_gradients(trainer_and_batch, threads):
    trainer, batch = trainer_and_batch
    whole_loss, whole_grads, whole_threads = step_on(trainer, batch, threads=1)
    split_loss, split_grads, split_threads = step_on(trainer, batch, threads=2)
    assert whole_threads == {"MainThread"}
    assert len(split_threads) == 2 and all(name.startswith("micro-batch") for name in split_threads)
    torch.testing.assert_close(split_loss, whole_loss, rtol=1e-5, atol=1e-6)
    assert split_grads.keys() == whole_grads.keys()
    for name, grad in whole_grads.items():
        torch.testing.assert_close(split_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("trainer_and_batch", ["lora"], indirect=True)
def test_a_split_evaluation_has_the_whole_batchs_loss(trainer_and_batch, threads):
    trainer, batch = trainer_and_batch
    threads(1)
    whole, _, _ = trainer.prediction_step(trainer.model, dict(batch), prediction_loss_only=True)
    threads(2)
    split, _, _ = trainer.prediction_step(trainer.model, dict(batch), prediction_loss_only=True)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)


def losses(events: list[dict]) -> list[float]:
    return [event["loss"] for event in events if event["kind"] == "metric"]


def test_a_job_with_lora_dropout_gives_the_same_numbers_every_run(
    tiny_llama_dir, sft_jsonl, tmp_path, token_cache_dir, threads
):
    threads(2)

    def run(dropout: float, name: str) -> list[dict]:
        reporter = Reporter()
        sft.run(make_spec(tiny_llama_dir, sft_jsonl, tmp_path / name, lora_dropout=dropout), reporter)
        return [e for e in reporter.events if e["kind"] in ("metric", "eval")]

    first, again, without = run(0.3, "first"), run(0.3, "again"), run(0, "without")
    strip = [{k: v for k, v in e.items() if k not in ("t", "samples")} for e in first]
    assert strip == [{k: v for k, v in e.items() if k not in ("t", "samples")} for e in again]
    assert losses(first)[1:] != pytest.approx(losses(without)[1:], rel=1e-3), "the dropout masks were not applied"


def test_an_interrupted_lora_job_resumes_with_the_same_dropout_masks(
    tiny_llama_dir, sft_jsonl, tmp_path, token_cache_dir, threads
):
    threads(2)
    settings = dict(lora_dropout=0.3, checkpoint_every=3)
    spec = make_spec(tiny_llama_dir, sft_jsonl, tmp_path / "resumed", **settings)
    first, second, _ = interrupt_and_resume(sft.run, spec, stop_after=4)
    assert_resumed(first, second, checkpoint=3, total=6)
    uninterrupted = Reporter()
    sft.run(make_spec(tiny_llama_dir, sft_jsonl, tmp_path / "once", **settings), uninterrupted)
    assert_same_losses(second, uninterrupted.events, after=3)
