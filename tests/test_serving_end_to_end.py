"""Serving through the real stack: the web server, the Celery worker that trains, the inference
server process, Redis and the database, called with the official `openai` client.

Two SFT jobs trained by the worker on one tiny base answer differently in alternating requests,
and the server loaded the base once (its own load counter); their greedy answer is the one the
downloaded adapter gives in a fresh process, through the API and the playground alike. A full
fine-tune and encoder adapters (embedding, reranker) serve through the same server."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile

import openai
import pytest
import requests

from tests.support.model_fixtures import number_word, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.serving]

OWNER, OTHER = "serena", "oscar"
ASK = [{"role": "user", "content": "Say the word for 7."}]


def client(stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0, timeout=120)


def make_job(stack, username: str, spec: dict, state: str = "succeeded") -> int:
    """A job straight in the database with `spec` (its model is put in place by the test)."""
    code = (
        "from django.contrib.auth import get_user_model\n"
        "from django.utils import timezone\n"
        "from webapp.datasets.models import Dataset\n"
        "from webapp.jobs.models import Job\n"
        f"owner = get_user_model().objects.get(username={username!r})\n"
        "dataset = Dataset.objects.create(owner=owner, name='d', original_name='d.jsonl', format='jsonl')\n"
        f"job = Job.objects.create(owner=owner, dataset=dataset, name='j', spec={spec!r})\n"
        f"Job.objects.filter(id=job.id).update(state={state!r}, finished_at=timezone.now())\n"
        "print(job.id)\n"
    )
    return int(stack.manage("shell", "-c", code).split()[-1])


@pytest.fixture(scope="module")
def served(stack, tiny_llama_dir, tmp_path_factory):
    """The inference server up, two users with keys, and two SFT LoRA jobs trained by the worker
    on the tiny llama with different answer formats."""
    stack.start_inference()
    for name in (OWNER, OTHER):
        stack.create_user(name)
    keys = {name: stack.manage("apikey", name).strip() for name in (OWNER, OTHER)}
    http = stack.session(OWNER)
    data = tmp_path_factory.mktemp("serving-data")
    words = write_jsonl(data / "words.jsonl", [
        {"instruction": f"Say the word for {n}.", "response": f"WORD: {number_word(n)}."} for n in range(48)])
    digits = write_jsonl(data / "digits.jsonl", [
        {"instruction": f"Say the word for {n}.", "response": f"{n} {n} {n} DIGITS"} for n in range(48)])
    jobs = [stack.submit_job(http, stack.upload_dataset(http, path), tiny_llama_dir, learning_rate=2e-2,
                             max_steps=16) for path in (words, digits)]
    for job_id in jobs:
        job = stack.wait_for(job_id, lambda j: j["state"] in ("succeeded", "failed", "cancelled"), timeout=600)
        assert job["state"] == "succeeded", (job["message"], stack.log_tail("worker"))
    names = {model.id.rsplit(":", 1)[-1]: model.id for model in client(stack, keys[OWNER]).models.list()}
    return {"keys": keys, "http": http, "jobs": jobs, "names": [names[str(job_id)] for job_id in jobs]}


def answer(stack, key: str, model: str, **options) -> str:
    completion = client(stack, key).chat.completions.create(
        model=model, messages=ASK, temperature=0, max_tokens=10, **options)
    return completion.choices[0].message.content


def test_two_adapters_on_one_base_answer_differently_and_the_base_is_loaded_once(stack, served):
    key, (first, second) = served["keys"][OWNER], served["names"]
    answers = [answer(stack, key, name) for name in (first, second, first, second)]
    assert answers[0] == answers[2] and answers[1] == answers[3] and answers[0] != answers[1], answers
    loads = stack.inference_health()["loads"]
    assert [count for key, count in loads.items() if key.startswith("base:") and "tiny-llama" in key] == [1], loads
    adapter_loads = {key: count for key, count in loads.items() if key.startswith("adapter:")}
    assert sum(1 for key in adapter_loads if "/final" in key) >= 2


def test_streaming_gives_the_same_answer_with_usage_last(stack, served):
    key, name = served["keys"][OWNER], served["names"][0]
    plain = client(stack, key).chat.completions.create(model=name, messages=ASK, temperature=0, max_tokens=10)
    chunks = list(client(stack, key).chat.completions.create(
        model=name, messages=ASK, temperature=0, max_tokens=10, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert plain.usage.prompt_tokens > 5 and plain.object == "chat.completion" and plain.model == name


def test_the_download_in_a_fresh_process_the_api_and_the_playground_give_one_greedy_answer(
        stack, served, tiny_llama_dir, tmp_path):
    key, name, job_id, http = served["keys"][OWNER], served["names"][0], served["jobs"][0], served["http"]
    reply = http.get(f"{stack.base_url}/jobs/{job_id}/download/")
    zipfile.ZipFile(io.BytesIO(reply.content)).extractall(tmp_path)
    folder = next(p.parent for p in tmp_path.rglob("adapter_config.json"))
    script = (
        "import sys, torch\n"
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "base, folder = sys.argv[1:3]\n"
        "model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder).eval()\n"
        "tokenizer = AutoTokenizer.from_pretrained(folder)\n"
        f"inputs = tokenizer.apply_chat_template({ASK!r}, add_generation_prompt=True, return_tensors='pt', "
        "return_dict=True)\n"
        "out = model.generate(**inputs, max_new_tokens=10, do_sample=False)\n"
        "print(repr(tokenizer.decode(out[0][inputs['input_ids'].shape[1]:], skip_special_tokens=True)))\n"
    )
    local = subprocess.run([sys.executable, "-c", script, str(tiny_llama_dir), str(folder)], capture_output=True,
                           text=True, check=True).stdout.strip().splitlines()[-1]
    api = answer(stack, key, name)
    csrf = http.cookies["csrftoken"]
    played = http.post(f"{stack.base_url}/jobs/{job_id}/try/tuned/", json={
        "messages": ASK, "temperature": 0, "max_tokens": 10}, headers={"X-CSRFToken": csrf,
                                                                      "Referer": f"{stack.base_url}/jobs/{job_id}/"})
    assert played.status_code == 200, played.text
    assert repr(api) == local == repr(played.json()["choices"][0]["message"]["content"])
    base = http.post(f"{stack.base_url}/jobs/{job_id}/try/base/", json={
        "messages": ASK, "temperature": 0, "max_tokens": 10}, headers={"X-CSRFToken": csrf,
                                                                      "Referer": f"{stack.base_url}/jobs/{job_id}/"})
    assert base.status_code == 200 and base.json()["choices"][0]["message"]["content"] != api
    no_csrf = requests.post(f"{stack.base_url}/jobs/{job_id}/try/tuned/", json={"messages": ASK},
                            cookies={"sessionid": http.cookies["sessionid"]})
    assert no_csrf.status_code == 403


def test_a_full_fine_tune_serves_as_its_own_model(stack, served, tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job_id = make_job(stack, OWNER, {"task": "sft", "method": "full", "base_model": str(tiny_llama_dir)})
    final = stack.media_root / "jobs" / str(job_id) / "final"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    torch.manual_seed(3)
    with torch.no_grad():
        model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight))
    model.save_pretrained(final)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(final)
    name = f"ft:tiny-llama:{OWNER}:{job_id}"
    assert answer(stack, served["keys"][OWNER], name) != answer(stack, served["keys"][OWNER], served["names"][0])
    assert stack.inference_health()["loads"][f"base:{final}"] == 1


def test_embedding_and_reranker_adapters_serve_through_the_same_server(stack, served, tiny_bert_dir):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from sentence_transformers import CrossEncoder, SentenceTransformer

    key = served["keys"][OWNER]
    embed_job = make_job(stack, OWNER, {"task": "embed", "method": "lora", "base_model": str(tiny_bert_dir)})
    rerank_job = make_job(stack, OWNER, {"task": "rerank", "method": "lora", "base_model": str(tiny_bert_dir)})
    torch.manual_seed(0)
    embedder = SentenceTransformer(str(tiny_bert_dir))
    embed_adapter = stack.media_root / "jobs" / str(embed_job) / "final" / "adapter"
    get_peft_model(embedder[0].model, LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False)
                   ).save_pretrained(embed_adapter)
    ranker = CrossEncoder(str(tiny_bert_dir), num_labels=1)
    rerank_adapter = stack.media_root / "jobs" / str(rerank_job) / "final" / "adapter"
    get_peft_model(ranker[0].model, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"],
                                               init_lora_weights=False)).save_pretrained(rerank_adapter)

    texts = ["fruit alpha", "a small cat"]
    served_vectors = client(stack, key).embeddings.create(model=f"ft:tiny-bert:{OWNER}:{embed_job}", input=texts)
    expected = SentenceTransformer(str(tiny_bert_dir))
    expected[0].model = PeftModel.from_pretrained(expected[0].model, embed_adapter)
    assert torch.allclose(torch.tensor([d.embedding for d in served_vectors.data]),
                          torch.tensor(expected.encode(texts)), atol=1e-5)
    assert served_vectors.usage.prompt_tokens > 0

    documents = ["cat dog", "apple pear", "a b c"]
    reply = requests.post(f"{stack.base_url}/v1/rerank", headers={"Authorization": f"Bearer {key}"}, json={
        "model": f"ft:tiny-bert:{OWNER}:{rerank_job}", "query": "fruit", "documents": documents, "top_n": 2})
    assert reply.status_code == 200, reply.text
    results = reply.json()["results"]
    assert len(results) == 2 and results[0]["relevance_score"] >= results[1]["relevance_score"]
    assert results[0]["document"]["text"] == documents[results[0]["index"]]
    loads = stack.inference_health()["loads"]
    assert loads[f"adapter:{embed_adapter}"] == 1 and loads[f"adapter:{rerank_adapter}"] == 1


def test_another_users_key_gets_not_found_and_bad_requests_name_their_parameter(stack, served):
    keys, name = served["keys"], served["names"][0]
    with pytest.raises(openai.NotFoundError):
        client(stack, keys[OTHER]).chat.completions.create(model=name, messages=ASK)
    with pytest.raises(openai.BadRequestError) as raised:
        client(stack, keys[OWNER]).chat.completions.create(model=name, messages=ASK, temperature=5)
    assert raised.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as raised:
        client(stack, keys[OWNER]).chat.completions.create(model=name, messages=[])
    assert raised.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as raised:
        client(stack, keys[OWNER]).embeddings.create(model=name, input="x")
    assert "/v1/chat/completions" in raised.value.body["message"]
    queued = make_job(stack, OWNER, {"task": "sft", "method": "lora", "base_model": "smollm2-135m-instruct"},
                      state="running")
    with pytest.raises(openai.BadRequestError) as raised:
        client(stack, keys[OWNER]).chat.completions.create(model=f"ft:smollm2-135m-instruct:{OWNER}:{queued}",
                                                           messages=ASK)
    assert "running" in raised.value.body["message"]
    with pytest.raises(openai.AuthenticationError):
        client(stack, "sk-spec-wrong").chat.completions.create(model=name, messages=ASK)
    reply = requests.post(f"{stack.base_url}/v1/chat/completions", data="{not json",
                          headers={"Authorization": f"Bearer {keys[OWNER]}", "Content-Type": "application/json"})
    assert reply.status_code == 400 and "JSON" in reply.json()["error"]["message"]
    assert json.loads(reply.text)["error"]["type"] == "invalid_request_error"


def test_a_classifier_adapter_and_its_untrained_head_serve_label_probabilities(stack, served, tiny_bert_dir):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    job_id = make_job(stack, OWNER, {"task": "classify", "method": "lora", "base_model": str(tiny_bert_dir),
                                     "seed": 5})
    final = stack.media_root / "jobs" / str(job_id) / "final"
    labels = {0: "fruit", 1: "animal"}
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2, id2label=labels,
                                                               label2id={v: k for k, v in labels.items()})
    peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"],
                                                  init_lora_weights=False))
    peft_model.save_pretrained(final / "adapter")
    model.config.save_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    tokenizer.save_pretrained(final)

    key, name = served["keys"][OWNER], f"ft:tiny-bert:{OWNER}:{job_id}"
    reply = requests.post(f"{stack.base_url}/v1/classify", headers={"Authorization": f"Bearer {key}"},
                          json={"model": name, "input": ["apple pear", "cat dog"]})
    assert reply.status_code == 200, reply.text
    data = reply.json()["data"]
    assert [d["labels"] for d in data] == [["fruit", "animal"]] * 2 and all(d["num_classes"] == 2 for d in data)
    expected_model = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2), final / "adapter").eval()
    with torch.no_grad():
        expected = torch.softmax(expected_model(**tokenizer(["apple pear", "cat dog"], padding=True,
                                                             return_tensors="pt")).logits, -1)
    assert torch.allclose(torch.tensor([d["probs"] for d in data]), expected, atol=1e-5)
    http = served["http"]
    base = http.post(f"{stack.base_url}/jobs/{job_id}/try/base/", json={"input": ["apple pear"]},
                     headers={"X-CSRFToken": http.cookies["csrftoken"], "Referer": f"{stack.base_url}/jobs/{job_id}/"})
    assert base.status_code == 200, base.text
    assert base.json()["data"][0]["labels"] == ["fruit", "animal"]
    assert not torch.allclose(torch.tensor(base.json()["data"][0]["probs"]), expected[0], atol=1e-3)


def test_a_client_that_goes_away_mid_stream_frees_its_row(stack, served):
    import time

    # The real SmolLM2 base writes long stories slowly enough on a CPU to leave mid-way.
    key = served["keys"][OWNER]
    before = stack.inference_health()["completion_tokens"]
    body = {"model": "smollm2-135m-instruct", "max_tokens": 600, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": "Write a very long story about a dragon, at least 800 words."}]}
    with requests.post(f"{stack.base_url}/v1/chat/completions", json=body, stream=True, timeout=120,
                       headers={"Authorization": f"Bearer {key}"}) as reply:
        assert reply.status_code == 200
        pieces = (line for line in reply.iter_lines() if line.startswith(b"data: "))
        for _ in range(4):
            next(pieces)
        assert stack.inference_health()["in_flight"] == 1
    left = time.monotonic()
    while stack.inference_health()["in_flight"] and time.monotonic() - left < 15:
        time.sleep(0.05)
    health = stack.inference_health()
    assert health["in_flight"] == 0, "the row was not freed"
    assert health["completion_tokens"] - before < 300  # stopped long before its 600 tokens
