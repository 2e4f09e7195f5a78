"""`python -m worker.inference.server`: the inference server's HTTP side.

It listens on an internal address (default 127.0.0.1:8001) for the web app, which has already
authenticated the user and checked that the model is theirs: each request body is the public
API's (OpenAI's chat completions and embeddings, vLLM's rerank and classify) plus a ``target``
(requests.Target) saying which base, adapter or model to run it on. When
SPECIALIST_INFERENCE_TOKEN is set, a request must carry it in ``X-Specialist-Token``.

Responses are in the public API's shapes, streamed as server-sent events for ``stream: true``;
a client that goes away mid-stream frees its row of the batch at once. The server registers
itself in Redis (registry.py) every few seconds with what it holds.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hmac
import json
import logging
import os
import socket
import struct
import threading
import time
import uuid
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from worker.conversations import TOOL_CALL, parse_tool_calls
from worker.inference import registry, requests
from worker.inference.engine import ChatWork, EncodeWork, Engine
from worker.inference.requests import BadRequest
from worker.inference.resident import Resident, budget_from_environment

log = logging.getLogger("worker.inference")


class Service:
    """The engine and the figures the server reports about it."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.completion_tokens = 0
        self.requests = 0

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "device": self.engine.device, "in_flight": self.engine.in_flight(),
                "requests": self.requests, "completion_tokens": self.completion_tokens,
                **self.engine.resident.summary()}


def create_app(engine: Engine, token: str | None = None) -> Starlette:
    service = Service(engine)

    def guarded(handler):
        async def endpoint(request: Request) -> Response:
            if token and not hmac.compare_digest(request.headers.get("x-specialist-token", ""), token):
                return JSONResponse(BadRequest("Wrong or missing inference token.", status=401).body(), 401)
            try:
                body = json.loads(await request.body())
            except ValueError as exc:
                return _error(BadRequest(f"The request body is not valid JSON: {exc}."))
            try:
                service.requests += 1
                return await handler(service, body)
            except BadRequest as exc:
                return _error(exc)
        return endpoint

    async def health(request: Request) -> Response:
        return JSONResponse(service.health())

    return Starlette(routes=[
        Route("/health", health),
        Route("/v1/chat/completions", guarded(chat_completions), methods=["POST"]),
        Route("/v1/embeddings", guarded(embeddings), methods=["POST"]),
        Route("/v1/rerank", guarded(rerank), methods=["POST"]),
        Route("/v1/classify", guarded(classify), methods=["POST"]),
    ])


def _error(exc: BadRequest) -> JSONResponse:
    headers = {"Retry-After": "5"} if exc.status == 503 else None
    return JSONResponse(exc.body(), exc.status, headers=headers)


# Chat ------------------------------------------------------------------------------------------


async def chat_completions(service: Service, body: dict) -> Response:
    target, request = requests.target(body.get("target")), requests.chat_request(body)
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()
    admitted: asyncio.Future = loop.create_future()

    def settle(value):
        if not admitted.done():
            admitted.set_result(value)

    work = ChatWork(
        target, request,
        emit=lambda text, reason: loop.call_soon_threadsafe(pieces.put_nowait, (text, reason)),
        started=lambda reply: loop.call_soon_threadsafe(settle, reply),
        fail=lambda exc: loop.call_soon_threadsafe(settle, exc),
    )
    service.engine.submit(work)
    try:
        reply = await admitted
    except asyncio.CancelledError:
        work.cancelled.set()
        raise
    if isinstance(reply, BadRequest):
        raise reply
    completion = Completion(target.name, reply, service)
    if request.stream:
        return StreamingResponse(completion.events(pieces, work, request.include_usage, request.tools),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        text, reason = await completion.collect(pieces)
    finally:
        work.cancelled.set()
    if reason == "error":
        raise BadRequest(text, status=500, code="generation_failed")
    message, reason = completion.message(text, reason, request.tools)
    return JSONResponse({
        **completion.header("chat.completion"),
        "choices": [{"index": 0, "message": message, "finish_reason": reason, "logprobs": None}],
        "usage": completion.usage(),
    })


class Completion:
    def __init__(self, model: str, reply, service: Service):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model, self.reply, self.service = model, reply, service

    def header(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def usage(self) -> dict[str, int]:
        prompt, completion = len(self.reply.prompt), len(self.reply.generated)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def collect(self, pieces: asyncio.Queue) -> tuple[str, str]:
        texts = []
        while True:
            text, reason = await pieces.get()
            if reason is None:
                texts.append(text)
                continue
            self.service.completion_tokens += len(self.reply.generated)
            return (text if reason == "error" else "".join(texts)), reason

    def message(self, text: str, reason: str, tools: list[dict] | None) -> tuple[dict, str]:
        """The reply as OpenAI's assistant message, and its finish reason: with tools, the calls it
        wrote (worker.conversations.parse_tool_calls) as tool_calls and finish_reason "tool_calls"."""
        calls = parse_tool_calls(text) if tools else []
        if not calls:
            return {"role": "assistant", "content": text}, reason
        rest = TOOL_CALL.sub("", text).strip() if TOOL_CALL.search(text) else ""
        return {"role": "assistant", "content": rest or None, "tool_calls": [
            {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}
            for call in calls]}, "tool_calls"

    def chunk(self, delta: dict, finish_reason: str | None = None) -> str:
        body = {**self.header("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
        return f"data: {json.dumps(body)}\n\n"

    async def events(self, pieces: asyncio.Queue, work: ChatWork, include_usage: bool, tools: list[dict] | None = None):
        held: list[str] = []  # with tools, the reply is read whole: a call is only known at its end
        try:
            yield self.chunk({"role": "assistant", "content": ""})
            while True:
                text, reason = await pieces.get()
                if reason is None:
                    if text and tools:
                        held.append(text)
                    elif text:
                        yield self.chunk({"content": text})
                    continue
                if tools and reason != "error":
                    message, reason = self.message("".join(held), reason, tools)
                    if message["content"]:
                        yield self.chunk({"content": message["content"]})
                    if message.get("tool_calls"):
                        yield self.chunk({"tool_calls": [{"index": i, **call}
                                                         for i, call in enumerate(message["tool_calls"])]})
                self.service.completion_tokens += len(self.reply.generated)
                if reason == "error":
                    error = BadRequest(text, status=500, code="generation_failed").body()
                    yield f"data: {json.dumps(error)}\n\n"
                    break
                yield self.chunk({}, reason)
                if include_usage:
                    yield f"data: {json.dumps({**self.header('chat.completion.chunk'), 'choices': [], 'usage': self.usage()})}\n\n"
                break
            yield "data: [DONE]\n\n"
        finally:
            work.cancelled.set()  # a client that went away frees its row at the next step


# Encoders --------------------------------------------------------------------------------------


async def _encode(service: Service, target, method: str, *args):
    loop = asyncio.get_running_loop()
    result: asyncio.Future = loop.create_future()
    service.engine.submit(EncodeWork(
        target, method, args,
        done=lambda value: loop.call_soon_threadsafe(result.set_result, value),
        fail=lambda exc: loop.call_soon_threadsafe(result.set_result, exc),
    ))
    value = await result
    if isinstance(value, BadRequest):
        raise value
    return value


def _need(target, kind: str, endpoint: str) -> None:
    if target.kind != kind:
        raise BadRequest(f"{target.name} is a {target.kind} model; {endpoint} serves {kind} models.", "model")


async def embeddings(service: Service, body: dict) -> Response:
    target, request = requests.target(body.get("target")), requests.embeddings_request(body)
    _need(target, "embed", "/v1/embeddings")
    vectors, tokens = await _encode(service, target, "embed", request.texts)
    if request.encoding_format == "base64":
        vectors = [base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() for v in vectors]
    return JSONResponse({
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
        "model": target.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })


async def rerank(service: Service, body: dict) -> Response:
    target, request = requests.target(body.get("target")), requests.rerank_request(body)
    _need(target, "rerank", "/v1/rerank")
    scores, tokens = await _encode(service, target, "scores", request.query, request.documents)
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[:request.top_n or len(scores)]
    return JSONResponse({
        "id": f"rerank-{uuid.uuid4().hex}",
        "model": target.name,
        "usage": {"total_tokens": tokens},
        "results": [{"index": i, "document": {"text": request.documents[i]}, "relevance_score": scores[i]}
                    for i in order],
    })


async def classify(service: Service, body: dict) -> Response:
    target, request = requests.target(body.get("target")), requests.classify_request(body)
    _need(target, "classify", "/v1/classify")
    probabilities, tokens, labels = await _encode(service, target, "probabilities", request.inputs)
    data = []
    for index, probs in enumerate(probabilities):
        best = max(range(len(probs)), key=probs.__getitem__)
        data.append({"index": index, "label": labels[best], "probs": probs, "num_classes": len(probs),
                     "labels": labels})
    return JSONResponse({
        "id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
        "model": target.name, "data": data,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
    })


# Process ---------------------------------------------------------------------------------------


def register_forever(engine: Engine, redis_url: str, server_id: str, url: str, stopping: threading.Event) -> None:
    """Keep this server's record in Redis while it lives (a Redis outage is logged and retried)."""
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
    while not stopping.is_set():
        try:
            summary = engine.resident.summary()
            registry.publish(client, server_id, {"url": url, "holds": engine.holds(), "in_flight": engine.in_flight(),
                                                 "device": engine.device, "used_mib": summary["used_mib"],
                                                 "budget_mib": summary["budget_mib"], "pid": os.getpid()})
        except Exception as exc:  # Redis down: the web app answers 503 until it is back
            log.warning("could not register in Redis: %s", exc)
        stopping.wait(registry.RENEW_SECONDS)
    with contextlib.suppress(Exception):  # Redis down: the record expires on its own
        registry.withdraw(client, server_id)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default=os.environ.get("SPECIALIST_INFERENCE_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("SPECIALIST_INFERENCE_PORT", 8001)))
    parser.add_argument("--advertise", default=os.environ.get("SPECIALIST_INFERENCE_ADVERTISE"),
                        help="The URL the web app reaches this server at (default http://host:port).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s inference %(levelname)s %(message)s")
    engine = Engine(Resident(budget_from_environment()))
    engine.start()
    url = args.advertise or f"http://{args.host}:{args.port}"
    server_id = f"{socket.gethostname()}-{args.port}-{uuid.uuid4().hex[:6]}"
    stopping = threading.Event()
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    registration = threading.Thread(target=register_forever, args=(engine, redis_url, server_id, url, stopping),
                                    daemon=True)
    registration.start()
    app = create_app(engine, os.environ.get("SPECIALIST_INFERENCE_TOKEN") or None)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        stopping.set()
        engine.stop()
        registration.join(timeout=3)  # withdraws the record: the web app stops routing here


if __name__ == "__main__":
    main()
