"""Serving benchmark (issue 14): the inference server on SmolLM2-135M-Instruct with 16 LoRA
adapters, and all-MiniLM-L6-v2 with 16 embedding and 16 reranker adapters.

``python -m bench.inference`` (the fourth part of ``make bench``) makes the adapters (random,
non-zero LoRA weights, one seed each) in a scratch folder under var/bench/, then measures:

1. swap cost, the engine in-process: 24 sequential greedy requests of 8 tokens alternating over
   the 16 adapters against 24 all on one adapter, in interleaved blocks of 4 (p95 within 10 % or
   20 ms), and a naive server that loads the base and the adapter for every request and
   generates (ratio of the p95s at least 50x); beside them the same request on the plain base,
   before and after the adapters are attached;
2. memory, the same process: VmRSS before loading, after the base and after the 16 adapters
   (growth at most base + 16 adapters + 10 %), beside what 16 full copies would take;
3. batching, over HTTP against ``python -m worker.inference.server``: aggregate decode tokens/s
   (each reply's tokens after its first, over the time from the first token to the last) of 8
   concurrent streaming clients against 1 (at least 4x), and the time to the first token of a
   60-token prompt with 1 client (p95 under 500 ms); then the same server with 8 adapters
   attached (a mixed batch, one adapter alone, the base alone);
4. the web hop: tokens/s through the web app's /v1/chat/completions (``manage.py serve`` on a
   fresh database, bench.served, which starts its own inference server) against that inference
   server called directly (within 10 %), with 1 and with 8 clients, alternately;
5. encoders, over HTTP: /v1/embeddings and /v1/rerank texts/s over 16 adapters against one
   (within 10 %).

Every process that runs a model gets OMP_WAIT_POLICY=PASSIVE (as ``manage.py serve`` starts the
inference server); this process imports no torch. The Redis database in
SPECIALIST_BENCH_INFERENCE_REDIS (default redis://127.0.0.1:6379/7) is flushed first and used
as scratch. Results go to stdout and var/bench/inference.json; docs/performance.md says what
they mean. About 6 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import redis

from bench.served import stop

REPO = Path(__file__).resolve().parent.parent
WORK_DIR = REPO / "var" / "bench"
CHAT_BASE = "smollm2-135m-instruct"
ENCODER_BASE = "all-minilm-l6-v2"
ADAPTERS = 16
ENGINE_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
              "TRANSFORMERS_OFFLINE": "1"}
"""The environment of every process that runs a model (set before torch is imported)."""
GOALS = {"swap_p95": 0.10, "swap_p95_ms": 20.0, "naive_ratio": 50.0, "memory_over": 0.10, "batching": 4.0,
         "ttft_p95_s": 0.5, "web_hop": 0.10, "encoder_loss": 0.10}
# A prompt SmolLM2 answers at length (it counts on past 64 tokens), ~50 tokens through its chat
# template (its default system message included).
PROMPT = "Count from 1 to 300 in words, separated by commas, and do not stop before you reach 300, please."
SWAP_REQUESTS, SWAP_TOKENS, NAIVE_REQUESTS = 24, 8, 4
STREAM_TOKENS, ADAPTER_STREAM_TOKENS, WEB_BATCH_TOKENS = 64, 24, 32
ENCODE_REQUESTS, ENCODE_TEXTS = 16, 32
LORA_B_SCALE = 0.3
"""The chat adapters' lora_B is scaled down from its random init: at full size most adapters turn
SmolLM2 into noise that ends at once, and requests of different lengths would not compare."""


def messages(text: str = PROMPT) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else float("nan")


def vmrss(field: str = "VmRSS") -> int:
    """This process's resident memory, bytes (VmRSS of /proc/self/status; RssFile: the part that is
    mapped files, such as safetensors weights)."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(f"{field}:"))
    return int(line.split()[1]) * 1024


def verdict(met: bool) -> str:
    return "PASS" if met else "MISS"


MIB = 1024 * 1024


# The machine ----------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = re.search(r"^Model name:\s*(.+)$", lscpu, re.M).group(1).strip()
    except (OSError, subprocess.CalledProcessError, AttributeError):
        cpu = "unknown"
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return {
        "cpu": cpu, "cores": os.cpu_count(),
        "avx512_bf16": "avx512_bf16" in flags, "amx": bool({"amx_bf16", "amx_tile"} & flags),
        "versions": {name: metadata.version(name) for name in ("torch", "transformers", "peft",
                                                               "sentence-transformers")},
        "load_average_at_start": os.getloadavg(),
    }


def run_part(part: str, work: Path) -> dict[str, Any]:
    """One of the parts that run a model, in its own process with ENGINE_ENV; its JSON result."""
    out = work / f"{part}.json"
    env = {**os.environ, **ENGINE_ENV, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "bench.inference", "--part", part, "--work", str(work)], cwd=REPO, env=env,
                   check=True)
    return json.loads(out.read_text())


# Part 0 (subprocess): the adapters --------------------------------------------------------------


def make_adapters(work: Path) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from sentence_transformers import CrossEncoder, SentenceTransformer
    from transformers import AutoModelForCausalLM

    from worker.models import resolve_base

    started = time.perf_counter()
    chat_base, encoder_base = resolve_base(CHAT_BASE), resolve_base(ENCODER_BASE)
    made: dict[str, Any] = {"chat_base": chat_base, "encoder_base": encoder_base}

    def series(kind: str, network, config, scale: float = 1.0) -> list[str]:
        folders = []
        for seed in range(ADAPTERS):
            torch.manual_seed(seed)
            wrapped = get_peft_model(network, config)
            with torch.no_grad():
                for name, parameter in wrapped.named_parameters():
                    if "lora_B" in name:
                        parameter.mul_(scale)
            folder = work / kind / f"a{seed:02d}"
            wrapped.save_pretrained(folder)
            folders.append(str(folder))
            network = wrapped.unload()
        return folders

    model = AutoModelForCausalLM.from_pretrained(chat_base, dtype=torch.float32)
    made["chat"] = series("chat", model, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False),
                          LORA_B_SCALE)
    del model
    embedder = SentenceTransformer(encoder_base, device="cpu")
    made["embed"] = series("embed", embedder[0].model,
                           LoraConfig(r=8, target_modules=["query", "value"], init_lora_weights=False))
    reranker = CrossEncoder(encoder_base, num_labels=1, device="cpu")
    made["rerank"] = series("rerank", reranker[0].model, LoraConfig(task_type="SEQ_CLS", r=8,
                                                                    target_modules=["query", "value"],
                                                                    init_lora_weights=False))
    made["adapter_bytes"] = {kind: [_weight_bytes(f) for f in made[kind]] for kind in ("chat", "embed", "rerank")}
    made["chat_base_bytes"] = _weight_bytes(chat_base)
    made["seconds"] = time.perf_counter() - started
    return made


def _weight_bytes(folder: str) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


# Parts 1 and 2 (subprocess): the engine in-process, and the naive server -----------------------


class EngineCall:
    """One greedy chat request on the in-process engine, waited for."""

    def __init__(self, engine, base: str, adapter: str | None, max_tokens: int):
        import threading

        from worker.inference import requests as api
        from worker.inference.engine import ChatWork

        self.done, self.reply, self.reason, self.error, self.pieces = threading.Event(), None, None, None, []
        body = {"messages": messages(), "temperature": 0, "max_tokens": max_tokens}
        self.started = time.perf_counter()
        engine.submit(ChatWork(api.Target("b", "chat", base, adapter=adapter), api.chat_request(body),
                               emit=self._emit, started=self._admitted, fail=self._fail))
        if not self.done.wait(300):
            raise RuntimeError("the engine did not answer in 300 s")
        if self.error is not None:
            raise RuntimeError(f"the engine refused the request: {self.error.message}")

    def _admitted(self, reply):
        self.reply = reply

    def _emit(self, text, reason):
        self.pieces.append(text)
        if reason:
            self.seconds, self.reason = time.perf_counter() - self.started, reason
            self.done.set()

    def _fail(self, exc):
        self.error = exc
        self.done.set()

    @property
    def tokens(self) -> int:
        return len(self.reply.generated)

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def engine_part(work: Path) -> dict[str, Any]:
    import ctypes
    import gc

    # The libraries first: "before loading" is a process that has imported everything it needs.
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from worker.inference.engine import Engine
    from worker.inference.resident import Resident

    made = json.loads((work / "adapters.json").read_text())
    base, adapters = made["chat_base"], made["chat"]
    result: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
    gc.collect()
    result["rss_before"], result["rss_file_before"] = vmrss(), vmrss("RssFile")
    engine = Engine(Resident(64 * 1024 * MIB), device="cpu")
    engine.start()
    plain = [EngineCall(engine, base, None, SWAP_TOKENS) for _ in range(3)]  # the first loads the base
    result["rss_base"] = vmrss()
    result["base_alone_s"] = [call.seconds for call in plain[1:]]
    attach = [EngineCall(engine, base, adapter, SWAP_TOKENS) for adapter in adapters]  # each attached
    result["rss_adapters"], result["rss_file_adapters"] = vmrss(), vmrss("RssFile")
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # what of it is freed heap glibc kept
    result["rss_adapters_trimmed"] = vmrss()
    result["first_request_per_adapter_s"] = [call.seconds for call in attach]
    result["adapters_changing_the_reply"] = sum(call.text != plain[0].text for call in attach)
    result["summary"] = engine.resident.summary()
    gc.collect()
    before_tokenizer = vmrss()
    tokenizer = AutoTokenizer.from_pretrained(base)  # what one more tokenizer object costs
    result["tokenizer_rss"] = vmrss() - before_tokenizer
    result["base_with_adapters_s"] = [EngineCall(engine, base, None, SWAP_TOKENS).seconds for _ in range(2)]

    # 1. Swap cost: blocks of 4 requests, all on adapter 0 or cycling over the 16, interleaved so
    # that a drift in the machine's speed weighs on both alike.
    one, alternating, tokens, reasons = [], [], [], set()
    cycle = 0
    for block in range(2 * SWAP_REQUESTS // 4):
        if block % 2 == 0:
            EngineCall(engine, base, adapters[0], SWAP_TOKENS)  # back on adapter 0 before its block (not counted)
        for _ in range(4):
            if block % 2 == 0:
                call = EngineCall(engine, base, adapters[0], SWAP_TOKENS)
                one.append(call.seconds)
            else:
                call = EngineCall(engine, base, adapters[cycle % ADAPTERS], SWAP_TOKENS)
                cycle += 1
                alternating.append(call.seconds)
            tokens.append(call.tokens)
            reasons.add(call.reason)
    result["swap"] = {"one_s": one, "alternating_s": alternating, "tokens": sorted(set(tokens)),
                      "finish_reasons": sorted(reasons)}
    result["summary_after"] = engine.resident.summary()
    engine.stop()
    engine.thread.join(timeout=10)

    # The naive server: every request loads the base and its adapter, then generates.
    # The naive server's tokenizer is loaded once (above): in its favour.
    inputs = tokenizer.apply_chat_template(messages(), add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    naive = []
    for index in range(NAIVE_REQUESTS):
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="sdpa")
        model = PeftModel.from_pretrained(model, adapters[index % ADAPTERS]).eval()
        loaded = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=SWAP_TOKENS, min_new_tokens=SWAP_TOKENS,
                                    do_sample=False, pad_token_id=tokenizer.eos_token_id)
        done = time.perf_counter()
        naive.append({"total_s": done - started, "load_s": loaded - started, "generate_s": done - loaded,
                      "tokens": int(output.shape[1] - inputs["input_ids"].shape[1])})
        del model, output
        gc.collect()
    result["naive"] = naive
    return result


# The inference server over HTTP -------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def inference_server(work: Path, redis_url: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python -m worker.inference.server` on a free port, as `manage.py serve` starts it."""
    port = free_port()
    env = {**os.environ, **ENGINE_ENV, "REDIS_URL": redis_url, "PYTHONPATH": str(REPO)}
    env.pop("SPECIALIST_INFERENCE_TOKEN", None)
    log = (work / "inference-server.log").open("a")
    process = subprocess.Popen([sys.executable, "-m", "worker.inference.server", "--port", str(port)], cwd=REPO,
                               env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the inference server did not start:\n" + _tail(work / "inference-server.log"))
            try:
                httpx.get(f"{url}/health", timeout=2).raise_for_status()
                break
            except httpx.HTTPError:
                time.sleep(0.3)
        yield url, process
    finally:
        stop(process, timeout=30)
        log.close()


def _tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text().splitlines()[-lines:]) if path.exists() else ""


def process_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def chat_body(adapter: str | None = None, max_tokens: int = STREAM_TOKENS, text: str = PROMPT) -> dict[str, Any]:
    target = {"name": "b", "kind": "chat", "base": CHAT_BASE, **({"adapter": adapter} if adapter else {})}
    return {"messages": messages(text), "stream": True, "max_tokens": max_tokens, "temperature": 0,
            "stream_options": {"include_usage": True}, "target": target}


async def stream_chat(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """One streaming chat completion: time to the first content, total time, tokens received
    (the usage chunk's completion_tokens) and the finish reason."""
    started = time.perf_counter()
    first, last, usage, reason, error = None, None, {}, None, None
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url}: {response.status_code} {(await response.aread()).decode()[:500]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]
                continue
            for choice in event.get("choices", []):
                if choice["delta"].get("content"):
                    last = time.perf_counter()
                    first = first or last
                reason = choice.get("finish_reason") or reason
            usage = event.get("usage") or usage
    if error:
        raise RuntimeError(f"{url}: the stream ended with {error}")
    if first is None:
        raise RuntimeError(f"{url}: a reply without text ({reason}, {usage})")
    return {"ttft_s": first - started, "first_at": first, "last_at": last, "seconds": time.perf_counter() - started,
            "tokens": usage.get("completion_tokens", 0),
            "prompt_tokens": usage.get("prompt_tokens", 0), "finish_reason": reason}


async def clients_round(url: str, bodies: list[dict[str, Any]], repeats: int,
                        headers: dict[str, str] | None = None) -> dict[str, Any]:
    """len(bodies) concurrent clients, each sending its body `repeats` times one after the other;
    aggregate tokens/s = all tokens received ÷ the wall time of the round."""

    async def client_loop(client, body):
        return [await stream_chat(client, url, body) for _ in range(repeats)]

    limits = httpx.Limits(max_connections=len(bodies) + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits, headers=headers) as client:
        started = time.perf_counter()
        replies = await asyncio.gather(*(client_loop(client, body) for body in bodies))
        wall = time.perf_counter() - started
    flat = [reply for replies_of_one in replies for reply in replies_of_one]
    tokens = sum(reply["tokens"] for reply in flat)
    # Decoding: the tokens after each reply's first, over the time from the first reply's first
    # token to the last reply's last (the prefill of the batch left out).
    decode_tokens = sum(reply["tokens"] - 1 for reply in flat)
    decode_s = max(r["last_at"] for r in flat) - min(r["first_at"] for r in flat) if repeats == 1 else 0.0
    decode_s = decode_s if decode_s > 0 else float("nan")
    return {"clients": len(bodies), "requests": len(flat), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "decode_tokens": decode_tokens, "decode_s": decode_s,
            "decode_tokens_per_s": decode_tokens / decode_s, "finish_reasons": sorted({str(r["finish_reason"]) for r in flat}),
            "ttft_s": [r["ttft_s"] for r in flat], "prompt_tokens": sorted({r["prompt_tokens"] for r in flat})}


def batching(url: str, adapters: list[str]) -> dict[str, Any]:
    chat = f"{url}/v1/chat/completions"
    # Warm-up: the base loaded, the first passes' kernels built (a batch of 8 included).
    asyncio.run(clients_round(chat, [chat_body(max_tokens=8)], 1))
    asyncio.run(clients_round(chat, [chat_body(max_tokens=8) for _ in range(8)], 1))
    result = {}
    # The plain base: 1 client and 8 clients alternately, twice (a drift in the machine's speed
    # weighs on both), then the time to the first token.
    ones, eights = [], []
    for _ in range(2):
        ones.append(asyncio.run(clients_round(chat, [chat_body()], 1)))
        eights.append(asyncio.run(clients_round(chat, [chat_body() for _ in range(8)], 1)))
    result["one_client"] = _pooled(ones)
    result["eight_clients"] = _pooled(eights)
    result["ttft"] = asyncio.run(clients_round(chat, [chat_body(max_tokens=4)], 10))
    # The same server with 8 adapters attached: one mixed batch, one adapter alone, the base alone.
    asyncio.run(clients_round(chat, [chat_body(a, max_tokens=2) for a in adapters[:8]], 1))
    tokens = ADAPTER_STREAM_TOKENS
    result["with_adapters"] = {
        "max_tokens": tokens,
        "eight_clients_eight_adapters": asyncio.run(clients_round(chat, [chat_body(a, tokens) for a in adapters[:8]],
                                                                  1)),
        "one_client_one_adapter": asyncio.run(clients_round(chat, [chat_body(adapters[0], tokens)], 1)),
        "one_client_base": asyncio.run(clients_round(chat, [chat_body(None, tokens)], 1)),
        "ttft_one_adapter": asyncio.run(clients_round(chat, [chat_body(adapters[0], max_tokens=4)], 6)),
    }
    return result


def _pooled(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    tokens, wall = sum(r["tokens"] for r in rounds), sum(r["wall_s"] for r in rounds)
    decode_tokens, decode_s = sum(r["decode_tokens"] for r in rounds), sum(r["decode_s"] for r in rounds)
    return {"clients": rounds[0]["clients"], "requests": sum(r["requests"] for r in rounds), "tokens": tokens,
            "wall_s": wall, "tokens_per_s": tokens / wall, "per_round": [r["tokens_per_s"] for r in rounds],
            "decode_tokens_per_s": decode_tokens / decode_s,
            "decode_per_round": [r["decode_tokens_per_s"] for r in rounds],
            "finish_reasons": sorted({f for r in rounds for f in r["finish_reasons"]}),
            "prompt_tokens": sorted({p for r in rounds for p in r["prompt_tokens"]})}


SENTENCE_WORDS = (["small", "quiet", "bright", "heavy", "old", "green", "busy", "careful"],
                  ["engineer", "river", "library", "train", "garden", "teacher", "market", "storm"],
                  ["watches", "crosses", "repairs", "follows", "paints", "measures", "opens", "describes"])


def sentences(count: int, salt: int = 0) -> list[str]:
    adjectives, nouns, verbs = SENTENCE_WORDS
    return [f"The {adjectives[(i + salt) % 8]} {nouns[(3 * i + salt) % 8]} {verbs[(5 * i + salt) % 8]} the "
            f"{nouns[(i + 2 * salt + 1) % 8]} near the {adjectives[(7 * i) % 8]} {nouns[(i + 5) % 8]} every morning, "
            f"number {i}." for i in range(count)]


def encoders(url: str, embed: list[str], rerank: list[str]) -> dict[str, Any]:
    texts = sentences(ENCODE_TEXTS)
    query = "Which engineer repairs the old train every morning?"

    def body(kind: str, adapter: str) -> tuple[str, dict[str, Any]]:
        target = {"name": "b", "kind": kind, "base": ENCODER_BASE, "adapter": adapter}
        if kind == "embed":
            return f"{url}/v1/embeddings", {"input": texts, "target": target}
        return f"{url}/v1/rerank", {"query": query, "documents": texts, "target": target}

    result = {}
    with httpx.Client(timeout=120) as client:
        for kind, adapters in (("embed", embed), ("rerank", rerank)):
            for adapter in adapters:  # warm-up: each adapter attached once
                endpoint, payload = body(kind, adapter)
                client.post(endpoint, json=payload).raise_for_status()
            one, many, cycle = [], [], 0
            for block in range(2 * ENCODE_REQUESTS // 8):  # blocks of 8, interleaved
                for _ in range(8):
                    adapter = adapters[0] if block % 2 == 0 else adapters[cycle % ADAPTERS]
                    cycle += block % 2
                    endpoint, payload = body(kind, adapter)
                    started = time.perf_counter()
                    reply = client.post(endpoint, json=payload)
                    reply.raise_for_status()
                    (one if block % 2 == 0 else many).append(time.perf_counter() - started)
            result[kind] = {"texts_per_request": len(texts), "one_s": one, "sixteen_s": many,
                            "one_texts_per_s": len(texts) * len(one) / sum(one),
                            "sixteen_texts_per_s": len(texts) * len(many) / sum(many)}
    return result


def direct_server(work: Path, redis_url: str, made: dict[str, Any]) -> dict[str, Any]:
    redis.Redis.from_url(redis_url).flushdb()
    with inference_server(work, redis_url) as (url, process):
        result = {"batching": batching(url, made["chat"])}
        result["encoders"] = encoders(url, made["embed"], made["rerank"])
        result["health"] = httpx.get(f"{url}/health", timeout=10).json()
        result["server_rss"] = process_rss(process.pid)
    return result


# Part 4: the web hop ------------------------------------------------------------------------------


def web_hop(work: Path, redis_url: str) -> dict[str, Any]:
    from bench.served import served_app
    from worker.inference import registry

    token = os.urandom(16).hex()
    overrides = {"SPECIALIST_INFERENCE_PORT": str(free_port()), "SPECIALIST_INFERENCE_TOKEN": token}
    tmp = work / "stack"
    tmp.mkdir()
    started = time.perf_counter()
    with served_app(tmp, redis_url, **overrides) as app:
        client = redis.Redis.from_url(redis_url)
        deadline = time.monotonic() + 180
        while not (servers := registry.live_servers(client)):
            if time.monotonic() > deadline:
                raise RuntimeError("serve's inference server never registered:\n" + app.log_tail())
            time.sleep(0.5)
        _wait_for_training_worker(client, app, deadline)
        up_s = time.perf_counter() - started
        app.create_user("bench")
        key = subprocess.run([sys.executable, "manage.py", "apikey", "bench"], cwd=REPO, env=app.env, check=True,
                             capture_output=True, text=True).stdout.strip()
        web = (f"{app.base_url}/v1/chat/completions", {"Authorization": f"Bearer {key}"})
        direct = (f"{servers[0]['url']}/v1/chat/completions", {"X-Specialist-Token": token})
        body = chat_body()
        web_body = {**{k: v for k, v in body.items() if k != "target"}, "model": CHAT_BASE}
        for (url, headers), payload in ((web, web_body), (direct, body)):  # warm-up (the base loads)
            asyncio.run(clients_round(url, [{**payload, "max_tokens": 8}], 1, headers))
        rounds: dict[str, list] = {"web_1": [], "direct_1": [], "web_8": [], "direct_8": []}
        # Web and direct alternately: 1 client (64 tokens) twice, 8 clients (32 tokens) three times.
        for clients, times, tokens in ((1, 2, STREAM_TOKENS), (8, 3, WEB_BATCH_TOKENS)):
            for _ in range(times):
                for way, (url, headers), payload in (("web", web, web_body), ("direct", direct, body)):
                    bodies = [{**payload, "max_tokens": tokens}] * clients
                    rounds[f"{way}_{clients}"].append(asyncio.run(clients_round(url, bodies, 1, headers)))
        health = httpx.get(f"{servers[0]['url']}/health", timeout=10).json()
    return {"stack_up_s": up_s, **{name: _pooled(r) for name, r in rounds.items()}, "health": health}


def _wait_for_training_worker(client: redis.Redis, app, deadline: float) -> None:
    """Until the training worker has published its capabilities: it has imported torch, and the
    stack's start-up no longer takes the cores."""
    from worker.capabilities import KEY_PREFIX

    while not any(True for _ in client.scan_iter(match=f"{KEY_PREFIX}*:capabilities")):
        if time.monotonic() > deadline:
            raise RuntimeError("the training worker published no capabilities:\n" + app.log_tail())
        time.sleep(0.5)
    time.sleep(2)


# Report -------------------------------------------------------------------------------------------


def report(results: dict[str, Any]) -> None:
    env = results["environment"]
    print(f"CPU: {env['cpu']}, {env['cores']} cores, avx512_bf16: {'yes' if env['avx512_bf16'] else 'no'}, "
          f"AMX: {'yes' if env['amx'] else 'no'}; load average at start {env['load_average_at_start'][0]:.2f}; "
          + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    made, engine = results["adapters"], results["engine"]
    adapter_bytes = made["adapter_bytes"]["chat"]
    print(f"adapters: 16 chat LoRA (r=8, all linear layers, {adapter_bytes[0] / MIB:.1f} MiB each), 16 embedding "
          f"and 16 reranker LoRA (r=8, query+value) made in {made['seconds']:.0f} s")

    swap = engine["swap"]
    one_p95, alt_p95 = percentile(swap["one_s"], 0.95), percentile(swap["alternating_s"], 0.95)
    allowed = max(GOALS["swap_p95"] * one_p95, GOALS["swap_p95_ms"] / 1000)
    print(f"1. swap cost ({len(swap['one_s'])} + {len(swap['alternating_s'])} sequential greedy requests of "
          f"{SWAP_TOKENS} tokens, in-process, {engine['torch_threads']} torch threads): p95 alternating over 16 "
          f"adapters {alt_p95 * 1000:.0f} ms vs one adapter {one_p95 * 1000:.0f} ms: "
          f"{(alt_p95 - one_p95) * 1000:+.0f} ms ({alt_p95 / one_p95 - 1:+.1%}) (goal at most 10 % or 20 ms slower: "
          f"{verdict(alt_p95 - one_p95 <= allowed)}); medians {statistics.median(swap['alternating_s']) * 1000:.0f} / "
          f"{statistics.median(swap['one_s']) * 1000:.0f} ms; tokens per reply {swap['tokens']}, "
          f"finish {swap['finish_reasons']}")
    print(f"   the same request on the plain base before any adapter: {_ms(engine['base_alone_s'])}; on the base "
          f"with 16 adapters attached: {_ms(engine['base_with_adapters_s'])}; first request of each adapter "
          f"(attach + reply): {_ms(engine['first_request_per_adapter_s'][:1])} for the 1st, "
          f"{_ms(engine['first_request_per_adapter_s'][-1:])} for the 16th; "
          f"{engine['adapters_changing_the_reply']} of 16 adapters change the reply's text")
    naive = engine["naive"]
    naive_p95 = percentile([n["total_s"] for n in naive], 0.95)
    ratio = naive_p95 / alt_p95
    print(f"   naive server (per request from_pretrained + PeftModel.from_pretrained + generate, {len(naive)} "
          f"requests): p95 {naive_p95:.2f} s = load {statistics.median(n['load_s'] for n in naive):.2f} s + generate "
          f"{statistics.median(n['generate_s'] for n in naive):.2f} s (medians); ratio of p95s {ratio:.1f}x (goal "
          f">= {GOALS['naive_ratio']:g}x: {verdict(ratio >= GOALS['naive_ratio'])})")

    base_bytes, total_adapters = made["chat_base_bytes"], sum(adapter_bytes)
    grown = engine["rss_adapters"] - engine["rss_before"]
    limit = (base_bytes + total_adapters) * (1 + GOALS["memory_over"])
    print(f"2. memory (VmRSS of the engine process): before loading {engine['rss_before'] / MIB:.0f} MiB, after the "
          f"base {engine['rss_base'] / MIB:.0f} MiB (+{(engine['rss_base'] - engine['rss_before']) / MIB:.0f}), after "
          f"16 adapters {engine['rss_adapters'] / MIB:.0f} MiB "
          f"(+{(engine['rss_adapters'] - engine['rss_base']) / MIB:.0f}); grown by {grown / MIB:.0f} MiB against base "
          f"{base_bytes / MIB:.0f} + 16 x {adapter_bytes[0] / MIB:.1f} MiB = {(base_bytes + total_adapters) / MIB:.0f} "
          f"MiB (goal <= +10 % = {limit / MIB:.0f} MiB: {verdict(grown <= limit)}); of the growth "
          f"{(engine['rss_file_adapters'] - engine['rss_file_before']) / MIB:.0f} MiB are mapped files (the "
          f"safetensors weights), one tokenizer costs {engine['tokenizer_rss'] / MIB:.0f} MiB; after malloc_trim(0) "
          f"{engine['rss_adapters_trimmed'] / MIB:.0f} MiB (+{(engine['rss_adapters_trimmed'] - engine['rss_before']) / MIB:.0f}); "
          f"16 separate full copies: {16 * base_bytes / MIB:.0f} MiB; resident.summary() used_mib "
          f"{engine['summary']['used_mib']}")

    direct = results["direct"]
    batch = direct["batching"]
    one, eight = batch["one_client"], batch["eight_clients"]
    speedup = eight["decode_tokens_per_s"] / one["decode_tokens_per_s"]
    overall = eight["tokens_per_s"] / one["tokens_per_s"]
    print(f"3. batching over HTTP on the base ({STREAM_TOKENS} tokens a reply, prompt {one['prompt_tokens']} tokens, "
          f"greedy): decoding, 8 concurrent clients {eight['decode_tokens_per_s']:.1f} tokens/s vs 1 client "
          f"{one['decode_tokens_per_s']:.1f} tokens/s: {speedup:.2f}x (goal >= {GOALS['batching']:g}x: "
          f"{verdict(speedup >= GOALS['batching'])}); per round {_rounded(eight['decode_per_round'])} / "
          f"{_rounded(one['decode_per_round'])}; request to last token (prefill included) "
          f"{eight['tokens_per_s']:.1f} vs {one['tokens_per_s']:.1f} tokens/s: {overall:.2f}x; finish "
          f"{sorted(set(one['finish_reasons'] + eight['finish_reasons']))}")
    ttft = batch["ttft"]
    ttft_p95 = percentile(ttft["ttft_s"], 0.95)
    print(f"   time to first token, 1 client, {ttft['prompt_tokens']}-token prompt, {len(ttft['ttft_s'])} requests: "
          f"p50 {percentile(ttft['ttft_s'], 0.5) * 1000:.0f} ms, p95 {ttft_p95 * 1000:.0f} ms (goal < "
          f"{GOALS['ttft_p95_s'] * 1000:.0f} ms: {verdict(ttft_p95 < GOALS['ttft_p95_s'])})")
    extra = batch["with_adapters"]
    mixed, alone, plain = (extra["eight_clients_eight_adapters"], extra["one_client_one_adapter"],
                           extra["one_client_base"])
    print(f"   with 8 adapters attached ({extra['max_tokens']} tokens a reply), decoding: 8 clients on 8 adapters (one "
          f"mixed batch) {mixed['decode_tokens_per_s']:.1f} tokens/s, 1 client on one adapter "
          f"{alone['decode_tokens_per_s']:.1f}, 1 client on the base {plain['decode_tokens_per_s']:.1f}; time to first "
          f"token on one adapter p95 "
          f"{percentile(extra['ttft_one_adapter']['ttft_s'], 0.95) * 1000:.0f} ms; finish "
          f"{sorted(set(mixed['finish_reasons'] + alone['finish_reasons'] + plain['finish_reasons']))}")

    hop = results["web_hop"]
    for clients in (1, 8):
        web, straight = hop[f"web_{clients}"], hop[f"direct_{clients}"]
        loss = 1 - web["tokens_per_s"] / straight["tokens_per_s"]
        print(f"4. web hop, {clients} client{'s' if clients > 1 else ''}: through the web app "
              f"{web['tokens_per_s']:.0f} tokens/s vs the inference server directly {straight['tokens_per_s']:.0f} "
              f"tokens/s: {-loss:+.1%} (goal at most 10 % slower: {verdict(loss <= GOALS['web_hop'])}); per round "
              f"{_rounded(web['per_round'])} / {_rounded(straight['per_round'])}")
    print(f"   (manage.py serve up, its training worker ready, in {hop['stack_up_s']:.0f} s; serve's inference server "
          f"loads: {_base_loads(hop['health'], made['chat_base'])})")

    for kind, name in (("embed", "/v1/embeddings"), ("rerank", "/v1/rerank")):
        enc = direct["encoders"][kind]
        ratio = enc["sixteen_texts_per_s"] / enc["one_texts_per_s"]
        print(f"5. {name} ({enc['texts_per_request']} texts a request, {len(enc['one_s'])} + {len(enc['sixteen_s'])} "
              f"requests): over 16 adapters {enc['sixteen_texts_per_s']:.0f} texts/s vs one adapter "
              f"{enc['one_texts_per_s']:.0f} texts/s: {ratio - 1:+.1%} (goal at most 10 % slower: "
              f"{verdict(ratio >= 1 - GOALS['encoder_loss'])})")
    health = direct["health"]
    print(f"inference server /health after parts 3 and 5: used {health['used_mib']} MiB of weights, VmRSS "
          f"{direct['server_rss'] / MIB:.0f} MiB, {len(health['resident'])} entries, evictions "
          f"{health['evictions']}; loads: {_base_loads(health, made['chat_base'], made['encoder_base'])}")


def _ms(seconds: list[float]) -> str:
    return " / ".join(f"{x * 1000:.0f}" for x in seconds) + " ms"


def _rounded(values: list[float]) -> list[float]:
    return [round(x, 1) for x in values]


def _base_loads(health: dict[str, Any], *folders: str) -> str:
    loads = health["loads"]
    parts = []
    for key, count in loads.items():
        kind, folder = key.split(":", 1)
        if kind != "adapter" and any(folder == f for f in folders):
            parts.append(f"{kind} {Path(folder).name} loaded {count}x")
    adapters = [count for key, count in loads.items() if key.startswith("adapter:")]
    if adapters:
        parts.append(f"{len(adapters)} adapters, each loaded {'once' if set(adapters) == {1} else sorted(adapters)}")
    return "; ".join(parts) or "nothing loaded"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.inference", description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("adapters", "engine"), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part:  # a child process: one part, its result as JSON in the work folder
        run = make_adapters if args.part == "adapters" else engine_part
        (args.work / f"{args.part}.json").write_text(json.dumps(run(args.work)))
        return 0
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Django's logging config would print every request
    redis_url = os.environ.get("SPECIALIST_BENCH_INFERENCE_REDIS", "redis://127.0.0.1:6379/7")
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results: dict[str, Any] = {"environment": environment(), "redis": redis_url}
    with tempfile.TemporaryDirectory(dir=WORK_DIR) as tmp:
        work = Path(tmp)
        results["adapters"] = run_part("adapters", work)
        results["load_average"] = {"engine": os.getloadavg()[0]}
        results["engine"] = run_part("engine", work)
        results["load_average"]["direct"] = os.getloadavg()[0]
        results["direct"] = direct_server(work, redis_url, results["adapters"])
        results["load_average"]["web_hop"] = os.getloadavg()[0]
        results["web_hop"] = web_hop(work, redis_url)
        results["load_average"]["end"] = os.getloadavg()[0]
    results["wall_s"] = time.time() - started
    (WORK_DIR / "inference.json").write_text(json.dumps(results, indent=2) + "\n")
    report(results)
    loads = ", ".join(f"{name} {value:.2f}" for name, value in results["load_average"].items())
    print(f"{results['wall_s'] / 60:.1f} minutes (1-minute load average as each part started: {loads}); results in "
          f"{WORK_DIR / 'inference.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
