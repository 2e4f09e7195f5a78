"""The GPU-side options of a TrainSpec (QLoRA, gradient checkpointing) and how the worker chooses
its attention and precision; the parts that run without a GPU."""

import subprocess
import sys

import pytest
import torch

from tests.support.stack import REPO
from worker.errors import UserError
from worker.models import attention_implementation, load_causal_lm, qlora_problem
from worker.spec import SpecError, TrainSpec


def spec(**overrides) -> TrainSpec:
    return TrainSpec(base_model="smollm2-135m-instruct", dataset_path="d.jsonl", output_dir="out", **overrides)


@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_qlora_is_a_method_for_the_generative_tasks(task):
    made = spec(task=task, method="qlora")
    assert made.adapters and TrainSpec.from_json(made.to_json()) == made


@pytest.mark.parametrize("task", ["classify", "pair", "rerank", "embed"])
def test_qlora_is_refused_for_the_encoder_tasks_on_the_method_field(task):
    with pytest.raises(SpecError) as refused:
        spec(task=task, method="qlora")
    assert refused.value.field == "method" and "qlora does not apply" in refused.value.message


def test_qlora_needs_layers_to_adapt_like_lora():
    with pytest.raises(SpecError) as refused:
        spec(method="qlora", lora_target_modules=[])
    assert refused.value.field == "lora_target_modules"


def test_gradient_checkpointing_is_off_by_default_and_survives_the_round_trip():
    assert spec().gradient_checkpointing is False
    assert TrainSpec.from_json(spec(gradient_checkpointing=True).to_json()).gradient_checkpointing is True


def test_gradient_checkpointing_must_be_true_or_false():
    with pytest.raises(SpecError) as refused:
        spec(gradient_checkpointing="yes")
    assert refused.value.field == "gradient_checkpointing"


def test_only_lora_and_qlora_train_adapters():
    assert [m for m in ("lora", "qlora", "full") if spec(method=m).adapters] == ["lora", "qlora"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine can run QLoRA")
def test_a_qlora_job_on_a_machine_without_cuda_fails_with_a_message_that_says_why(tiny_llama_dir, tmp_path):
    assert "CUDA GPU" in qlora_problem()
    with pytest.raises(UserError, match="QLoRA needs a CUDA GPU"):
        load_causal_lm(TrainSpec(base_model=str(tiny_llama_dir), dataset_path="", output_dir="", method="qlora"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA always uses SDPA")
def test_a_cpu_uses_eager_attention_unless_the_attention_matrices_would_be_large():
    assert attention_implementation(spec(batch_size=8, max_seq_length=512)) == "eager"
    assert attention_implementation(spec(batch_size=16, max_seq_length=1024)) == "sdpa"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_uses_sdpa_attention():
    assert attention_implementation(spec(batch_size=1, max_seq_length=64)) == "sdpa"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the GPU bench")
def test_the_gpu_bench_on_a_machine_without_cuda_says_so_and_succeeds():
    done = subprocess.run([sys.executable, "-m", "bench.training", "--cuda"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "No CUDA device" in done.stdout
