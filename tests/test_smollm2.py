"""The real SmolLM2-135M-Instruct (converted from the bundled GGUF) learns a new answer format."""

from pathlib import Path

import pytest

from tests.support.model_fixtures import sft_rows, write_jsonl
from worker.events import Reporter
from worker.recipes import sft
from worker.spec import TrainSpec


@pytest.mark.slow
def test_lora_on_all_linear_layers_learns_a_new_answer_format_in_a_few_steps(smollm2_dir, tmp_path):
    data = write_jsonl(tmp_path / "words.jsonl", sft_rows(40))
    spec = TrainSpec(
        base_model="smollm2-135m-instruct",
        dataset_path=str(data),
        output_dir=str(tmp_path / "out"),
        method="lora",
        learning_rate=2e-3,
        max_steps=6,
        batch_size=8,
        max_seq_length=64,
        validation_fraction=0.1,
    )
    reporter = Reporter()
    result = sft.run(spec, reporter)

    losses = [event["loss"] for event in reporter.events if event["kind"] == "metric"]
    assert len(losses) == 6
    assert losses[-1] < 0.5 * losses[0], losses
    assert result["eval_loss"] < 1.0
    assert (Path(result["artifact_dir"]) / "adapter_model.safetensors").is_file()
    census = next(event for event in reporter.events if event["kind"] == "params")
    assert census["total"] - census["trainable"] == 134_515_008  # the catalog's parameter count
