"""The inference server: fine-tunes served the moment they are trained.

One long-lived process (``python -m worker.inference.server``) loads each base model once and
attaches every job's LoRA adapter to it by name, so dozens of fine-tunes answer from one copy of
the base. The web app authenticates and authorises each request and forwards it here over HTTP
on an internal address (webapp/api/forward.py); this side never sees a user, only targets: which
base, which adapter or which whole model.

- requests.py  the OpenAI-shaped request bodies, checked (pure Python)
- registry.py  the Redis records by which the web app finds the servers (pure, no torch)
- resident.py  what is loaded, kept by an LRU within a memory budget; the load counters
- chat.py      causal LMs: continuous batching with mixed adapters in one batch, streaming
- encoders.py  embeddings, reranking and classification, adapters swapped per batch
- engine.py    the one thread that runs the models, and the work it is handed
- server.py    the HTTP server (Starlette on uvicorn) and its registration in Redis
"""
