"""A merged Llama-architecture model (worker/exports.py) as one GGUF file for llama.cpp and
Ollama, with the Ollama Modelfile that runs it.

Written with the `gguf` package the way llama.cpp's convert_hf_to_gguf.py writes LlamaModel
(nothing is downloaded): its tensor names (TensorNameMap for MODEL_ARCH.LLAMA), the q/k rows
permuted from the Hugging Face rotary layout to llama.cpp's interleaved one, the byte-level BPE
vocabulary (tokens, types, merges, special ids, `tokenizer.ggml.pre`), the chat template
(`tokenizer.chat_template`) and the end-of-turn id, so a chat in llama.cpp stops where the
fine-tune learnt to stop. 1-D tensors (norms) stay F32, as llama.cpp keeps them; with Q8_0 a
tensor whose rows do not split into 32-value blocks falls back to F16.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from worker.errors import UserError
from worker.exports import end_of_turn_tokens

TYPES = ("f16", "q8_0")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
_PRE_TOKENIZERS = {
    # tokenizer.json's pre_tokenizer → the name llama.cpp knows its splitting rules by.
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
}
_PROBE = {"system": "SYSTEM-PROBE", "user": "USER-PROBE", "assistant": "ASSISTANT-PROBE"}


def problem(model_dir: Path) -> str | None:
    """Why `model_dir` cannot become a GGUF here (a sentence for the user), or None."""
    config = _read(Path(model_dir) / "config.json")
    architectures = config.get("architectures") or [config.get("model_type", "unknown")]
    if not set(architectures) & set(SUPPORTED_ARCHITECTURES):
        return (f"GGUF export supports the Llama architecture (such as SmolLM2); this model is "
                f"{', '.join(architectures)}. The merged model (safetensors) can be exported instead.")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        return f"GGUF export does not handle the rotary scaling {rope.get('rope_type') or rope.get('type')!r} yet."
    if config.get("attention_bias") or config.get("mlp_bias"):
        return "GGUF export does not handle Llama models with bias terms yet."
    if _pre_tokenizer(Path(model_dir)) is None:
        return "GGUF export knows byte-level BPE tokenizers (GPT-2 style, SmolLM2's); this model's tokenizer is another kind."
    return None


def to_gguf(model_dir: Path, out_path: Path, type: str) -> Path:
    """Write the merged model in `model_dir` to `out_path` as GGUF of `type` ("f16" or "q8_0")."""
    import gguf

    model_dir, out_path = Path(model_dir), Path(out_path)
    if type not in TYPES:
        raise ValueError(f"type must be one of {TYPES}, not {type!r}")
    if reason := problem(model_dir):
        raise UserError(reason)
    hparams = _read(model_dir / "config.json")
    partial = out_path.with_name(f".{out_path.name}.partial")
    writer = gguf.GGUFWriter(partial, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        _write_hyperparameters(writer, hparams, model_dir.name, type)
        _write_vocab(writer, model_dir, hparams)
        _write_tensors(writer, model_dir, hparams, type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(partial, 0o644)
        os.replace(partial, out_path)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    return out_path


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _file_type(type: str):
    import gguf

    return {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[type]


def _write_hyperparameters(writer, hparams: dict, name: str, type: str) -> None:
    import gguf

    heads = hparams["num_attention_heads"]
    head_dim = hparams.get("head_dim") or hparams["hidden_size"] // heads
    rope = hparams.get("rope_parameters") or {}
    writer.add_name(name)
    writer.add_block_count(hparams["num_hidden_layers"])
    writer.add_context_length(hparams["max_position_embeddings"])
    writer.add_embedding_length(hparams["hidden_size"])
    writer.add_feed_forward_length(hparams["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(hparams.get("num_key_value_heads") or heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta") or hparams.get("rope_theta") or 10000.0))
    writer.add_layer_norm_rms_eps(hparams["rms_norm_eps"])
    writer.add_vocab_size(hparams["vocab_size"])
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hparams["hidden_size"] // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(_file_type(type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _pre_tokenizer(model_dir: Path) -> str | None:
    tokenizer = _read(model_dir / "tokenizer.json")
    if (tokenizer.get("model") or {}).get("type") != "BPE":
        return None
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    shape = tuple((s.get("type"), s.get("individual_digits", s.get("use_regex"))) for s in steps)
    return _PRE_TOKENIZERS.get(shape)


def vocab(model_dir: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """The token strings and llama.cpp token types of ids 0..vocab_size-1 (convert_hf_to_gguf's
    get_vocab_base): added special tokens are CONTROL, other added ones USER_DEFINED, holes UNUSED."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    by_id = {token_id: token for token, token_id in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for token_id in range(vocab_size):
        if token_id not in by_id:
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[token_id])
        if token_id in added:
            types.append(gguf.TokenType.CONTROL if added[token_id].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _write_vocab(writer, model_dir: Path, hparams: dict) -> None:
    import gguf
    from transformers import AutoTokenizer

    tokens, types = vocab(model_dir, hparams["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(model_dir))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # Merges, bos/eos/unk/pad ids, add_bos_token and the chat template (chat_template.jinja).
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    # Said outright: llama.cpp's default would add a bos the model never saw in training.
    special.add_special_token.setdefault("bos", tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id])
    special.add_to_gguf(writer, quiet=True)
    if not tokenizer.chat_template:
        raise UserError("The model has no chat template: llama.cpp and Ollama would not know where a turn ends.")
    ends = end_of_turn_tokens(tokenizer)
    writer.add_eot_token_id(tokenizer.convert_tokens_to_ids(ends[-1]))


def _write_tensors(writer, model_dir: Path, hparams: dict, type: str) -> None:
    import gguf
    from safetensors import safe_open

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hparams["num_hidden_layers"])
    tied = hparams.get("tie_word_embeddings", False)
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, framework="pt") as weights:
            for hf_name in weights.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                if tied and hf_name == "lm_head.weight":
                    continue  # llama.cpp reads the output head from token_embd when there is none
                name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise UserError(f"GGUF export does not know the tensor {hf_name} of this Llama model.")
                data = _llama_cpp_layout(hf_name, weights.get_tensor(hf_name).float().numpy(), hparams)
                encoded, qtype = _encode(data, type)
                writer.add_tensor(name, encoded, raw_dtype=qtype)


def _llama_cpp_layout(hf_name: str, data, hparams: dict):
    heads = hparams["num_attention_heads"]
    if hf_name.endswith("q_proj.weight"):
        return permute(data, heads, heads)
    if hf_name.endswith("k_proj.weight"):
        return permute(data, heads, hparams.get("num_key_value_heads") or heads)
    return data


def permute(weights, n_head: int, n_head_kv: int):
    """convert_hf_to_gguf.py's LlamaModel.permute: Hugging Face stores each head's rotary halves
    one after the other, llama.cpp interleaves them."""
    if n_head_kv != n_head:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _encode(data, type: str):
    import gguf
    import numpy as np

    if data.ndim <= 1:
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32
    if type == "q8_0":
        try:
            return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
        except gguf.QuantError:
            pass
    return data.astype(np.float16), gguf.GGMLQuantizationType.F16


def chatml_layout(tokenizer) -> str | None:
    """The default system prompt of a ChatML template ("" if it has none); None if the template
    is not ChatML, which is the one layout the Modelfile below is written for."""
    probe = [{"role": role, "content": text} for role, text in _PROBE.items()]
    expected = "".join(f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in _PROBE.items())
    try:
        if tokenizer.apply_chat_template(probe, tokenize=False) != expected:
            return None
        prompt = tokenizer.apply_chat_template(probe[1:2], tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that raises on our probe (a custom one's own checks) is not ChatML
        return None
    user_turn = f"<|im_start|>user\n{_PROBE['user']}<|im_end|>\n<|im_start|>assistant\n"
    if not prompt.endswith(user_turn):
        return None
    before = prompt[: -len(user_turn)]
    if before == "":
        return ""
    if before.startswith("<|im_start|>system\n") and before.endswith("<|im_end|>\n"):
        return before[len("<|im_start|>system\n"): -len("<|im_end|>\n")]
    return None


OLLAMA_CHATML = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range .Messages }}{{ if ne .Role "system" }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}{{ end }}<|im_start|>assistant
"""
"""The ChatML chat template in Ollama's Go template syntax; the template's default system prompt
is the Modelfile's SYSTEM, which Ollama replaces with a conversation's own system message."""


NOT_CHATML = ("GGUF export writes the Ollama template for ChatML chat templates (such as SmolLM2's); "
              "this model's chat template is another layout.")


def ollama_problem(model_dir: Path) -> str | None:
    """Why no Modelfile can be written for `model_dir`, or None (checked before building)."""
    from transformers import AutoTokenizer

    return NOT_CHATML if chatml_layout(AutoTokenizer.from_pretrained(model_dir)) is None else None


def modelfile(model_dir: Path, gguf_name: str = "model.gguf") -> str:
    """The Ollama Modelfile for the GGUF of `model_dir`: the template, its stops and sampling defaults."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    system = chatml_layout(tokenizer)
    if system is None:
        raise UserError(NOT_CHATML)
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{OLLAMA_CHATML}"""']
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{token}"' for token in end_of_turn_tokens(tokenizer)]
    context = _read(Path(model_dir) / "config.json").get("max_position_embeddings", 2048)
    lines += ["PARAMETER temperature 0.7", "PARAMETER top_p 0.9", f"PARAMETER num_ctx {min(context, 4096)}"]
    return "\n".join(lines) + "\n"
