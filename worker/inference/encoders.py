"""Embeddings, reranking and classification: one loaded encoder, adapters swapped per batch.

An `Encoder` is one loaded model of a kind:
- embed: a SentenceTransformer (its pooling and normalisation as saved);
- rerank: a CrossEncoder with one output (the sigmoid of the logit, as CrossEncoder.predict);
- classify: a transformers sequence classifier over a job's labels.

LoRA adapters are attached to the transformer inside it with peft (classifier and reranker
heads travel in the adapter as peft's modules_to_save), and the one an input needs is made
active for its batch: switching costs a pointer, not a load. Inputs are cut to the length
the model was trained with, as the downloaded model's own tokenizer cuts them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from worker.inference.requests import BadRequest
from worker.inference.resident import adapter_name, tensor_bytes

ENCODE_BATCH = 64


class Encoder:
    def __init__(self, kind: str, path: str, labels: tuple[str, ...] = (), seed: int = 0, device: str = "cpu"):
        self.kind, self.path, self.labels = kind, path, labels
        self.adapters: dict[str, str] = {}
        self.tokenizers: dict[str, object] = {}
        self.lengths: dict[str | None, int] = {}
        """Per adapter folder, the input length its job trained with (None: the base's)."""
        options = {"trust_remote_code": False, "local_files_only": True, "device": device,
                   "model_kwargs": {"dtype": torch.float32, "use_safetensors": True}}
        if kind == "embed":
            from sentence_transformers import SentenceTransformer

            self.model = SentenceTransformer(path, **options)
        elif kind == "rerank":
            from sentence_transformers import CrossEncoder

            self.model = CrossEncoder(path, num_labels=1, **options)
        else:
            self.model, self.tokenizer = _classifier(path, labels, seed, device)
        self.model.eval()
        self.size = tensor_bytes(self.model)
        if kind in ("embed", "rerank"):
            self.lengths[None] = self.model[0].max_seq_length

    @property
    def _network(self):
        """The module adapters attach to: the transformer inside a sentence-transformers model."""
        return self.model[0].model if self.kind in ("embed", "rerank") else self.model

    def attach(self, folder: str) -> tuple[str, int]:
        from peft import PeftModel

        if not (Path(folder) / "adapter_model.safetensors").is_file():
            raise BadRequest("The model's adapter is missing from the server's storage (adapter_model.safetensors).",
                             "model", status=503, code="artifact_missing")
        name = adapter_name(folder)
        before = tensor_bytes(self.model)
        if not self.adapters:
            wrapped = PeftModel.from_pretrained(self._network, folder, adapter_name=name, is_trainable=False)
            if self.kind in ("embed", "rerank"):
                self.model[0].model = wrapped
            else:
                self.model = wrapped
        else:
            self._network.load_adapter(folder, adapter_name=name, is_trainable=False)
        self._network.eval()
        self.adapters[folder] = name
        self._tokenizer_for(folder)
        if self.kind in ("embed", "rerank"):
            self.lengths[folder] = _trained_length(folder, self.lengths[None])
        return name, tensor_bytes(self.model) - before

    def detach(self, folder: str) -> None:
        name = self.adapters.pop(folder, None)
        self.tokenizers.pop(folder, None)
        self.lengths.pop(folder, None)
        if name is None:
            return
        if self.adapters:
            self._network.delete_adapter(name)
            return
        plain = self._network.unload().eval()  # the last one: back to the plain base
        if self.kind in ("embed", "rerank"):
            self.model[0].model = plain
        else:
            self.model = plain

    @torch.inference_mode()
    def run(self, adapter: str | None, method: str, *args):
        """`method` ("embed", "scores" or "probabilities") through `adapter` (None: the base)."""
        network = self._network
        if self.kind in ("embed", "rerank"):  # inputs cut where the job's own model cuts them
            self.model[0].max_seq_length = self.lengths.get(adapter, self.lengths[None])
        if not self.adapters:
            return getattr(self, method)(adapter, *args)
        if adapter is None:
            with network.disable_adapter():
                return getattr(self, method)(adapter, *args)
        network.set_adapter(self.adapters[adapter])
        return getattr(self, method)(adapter, *args)

    def embed(self, adapter: str | None, texts: list[str]) -> tuple[list[list[float]], int]:
        embeddings = self.model.encode(texts, batch_size=ENCODE_BATCH, convert_to_tensor=True,
                                       show_progress_bar=False)
        return embeddings.float().cpu().tolist(), self._count_tokens(texts)

    def scores(self, adapter: str | None, query: str, documents: list[str]) -> tuple[list[float], int]:
        pairs = [(query, document) for document in documents]
        scores = self.model.predict(pairs, batch_size=ENCODE_BATCH, show_progress_bar=False,
                                    convert_to_tensor=True)
        return scores.float().cpu().view(-1).tolist(), self._count_tokens([f"{query} {d}" for d in documents])

    def probabilities(self, adapter: str | None, inputs: list) -> tuple[list[list[float]], int]:
        tokenizer = self._tokenizer_for(adapter) if adapter else self.tokenizer
        rows, tokens = [], 0
        for start in range(0, len(inputs), ENCODE_BATCH):
            chunk = inputs[start:start + ENCODE_BATCH]
            texts = [item if isinstance(item, str) else item[0] for item in chunk]
            pairs = [item[1] for item in chunk] if not isinstance(chunk[0], str) else None
            if pairs is not None and any(isinstance(item, str) for item in chunk):
                raise BadRequest("Mix of single texts and pairs in one request.", "input")
            encoded = tokenizer(texts, pairs, truncation=True, padding=True, return_tensors="pt").to(self.model.device)
            tokens += int(encoded["attention_mask"].sum())
            logits = self.model(**encoded).logits.float()
            rows += torch.softmax(logits, -1).cpu().tolist()
        return rows, tokens

    def _tokenizer_for(self, folder: str | None):
        """The tokenizer saved with a job's model (its training length as model_max_length)."""
        if self.kind != "classify" or folder is None:
            return None
        if folder not in self.tokenizers:
            from transformers import AutoTokenizer

            job_folder = Path(folder).parent
            source = job_folder if (job_folder / "tokenizer_config.json").is_file() else self.path
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            self.tokenizers[folder] = tokenizer
        return self.tokenizers[folder]

    def _count_tokens(self, texts: list[str]) -> int:
        tokenizer = self.model.tokenizer
        return sum(len(ids) for ids in tokenizer(texts, truncation=True)["input_ids"])


def _trained_length(adapter: str, default: int) -> int:
    """The max_seq_length saved with the job's merged model, beside its adapter/ folder."""
    import json

    try:
        return int(json.loads((Path(adapter).parent / "sentence_bert_config.json").read_text())["max_seq_length"])
    except (OSError, ValueError, KeyError, TypeError):
        return default


def _classifier(path: str, labels: tuple[str, ...], seed: int, device: str):
    """A sequence classifier over `labels`: a whole trained one as saved, or a base with a fresh
    head drawn from `seed` (the untrained model a job measured at step 0)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if labels and list(getattr(config, "id2label", {}).values()) != list(labels):
        config.id2label = dict(enumerate(labels))
        config.label2id = {label: index for index, label in enumerate(labels)}
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, config=config, dtype=torch.float32, use_safetensors=True, trust_remote_code=False).to(device)
    return model, tokenizer


def label_names(encoder: Encoder) -> list[str]:
    config = (encoder.model.base_model.model if encoder.adapters else encoder.model).config
    return [config.id2label[i] for i in range(len(config.id2label))]
