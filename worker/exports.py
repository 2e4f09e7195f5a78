"""A trained generative model made ready to leave Specialist: merged into its base, with the
stop tokens its chat template needs.

merge(final_dir, base, out_dir) writes a plain transformers model (safetensors) that loads with
`AutoModelForCausalLM.from_pretrained(out_dir)` and needs neither peft nor the base: a LoRA
adapter is merged into its base (peft `merge_and_unload`), a full fine-tune is copied as it is.
Either way the folder gets the tokenizer (chat template included) and a generation_config.json
whose eos_token_id lists every end-of-turn id: a model that only knows the tokenizer's eos keeps
talking past `<|im_end|>` in tools that stop on the generation config.

The GGUF side (llama.cpp, Ollama) is worker/gguf_export.py, which reads the merged folder.
build() makes one export as the cpu worker hands it over: a zip holding one folder (the model or
the GGUF with its Ollama Modelfile) and a README.md model card.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from worker.artifacts import make_readable, zip_dir
from worker.errors import UserError

_PROBE = "SPECIALIST-PROBE-REPLY"
"""An assistant reply that no template writes itself: what follows it in the rendered
conversation is how the template ends a turn."""
GGUF_TYPES = {"gguf-f16": "f16", "gguf-q8_0": "q8_0"}
_LEFT_BEHIND = ("README.md", "train_spec.json", "eval_predictions.json", "generation_config.json")


def build(kind: str, final_dir: Path, base: str, out_dir: Path, name: str) -> Path:
    """Export the job model in `final_dir` (on `base`) as `kind` ("merged", "gguf-f16",
    "gguf-q8_0"): `out_dir`/`name`.zip, holding the folder `name`/. Returns the zip."""
    from worker import gguf_export

    final_dir, out_dir = Path(final_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=out_dir) as staging:
        merged = merge(final_dir, base, Path(staging) / ("model" if kind in GGUF_TYPES else name))
        folder, usage = merged, merged_usage(name)
        if kind in GGUF_TYPES:
            if reason := gguf_export.problem(merged) or gguf_export.ollama_problem(merged):
                raise UserError(reason)
            folder = Path(staging) / name
            folder.mkdir()
            gguf_export.to_gguf(merged, folder / "model.gguf", GGUF_TYPES[kind])
            (folder / "Modelfile").write_text(gguf_export.modelfile(merged))
            usage = gguf_usage(name)
        card = (final_dir / "README.md").read_text() if (final_dir / "README.md").is_file() else ""
        (folder / "README.md").write_text(model_card(name, card, usage))
        make_readable(folder)
        return zip_dir(folder, out_dir / f"{name}.zip")


def merge(final_dir: Path, base: str, out_dir: Path) -> Path:
    """The job's model (`final_dir`: an adapter on `base`, or a whole model) as one transformers
    model folder `out_dir`, with its tokenizer and a generation config that stops."""
    final_dir, out_dir = Path(final_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if (final_dir / "adapter_config.json").is_file():
        _merge_adapter(final_dir, base, out_dir)
    elif (final_dir / "config.json").is_file():
        _copy_model(final_dir, out_dir)
    else:
        raise UserError("The job's folder holds neither an adapter nor a model: there is nothing to export.")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(final_dir)
    tokenizer.save_pretrained(out_dir)
    write_generation_config(out_dir, tokenizer)
    make_readable(out_dir)
    return out_dir


def _merge_adapter(final_dir: Path, base: str, out_dir: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from worker.models import resolve_base

    model = AutoModelForCausalLM.from_pretrained(resolve_base(base), dtype=torch.float32, use_safetensors=True)
    merged = PeftModel.from_pretrained(model, str(final_dir)).merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)


def _copy_model(final_dir: Path, out_dir: Path) -> None:
    for path in final_dir.iterdir():
        if path.is_file() and path.name not in _LEFT_BEHIND:
            shutil.copyfile(path, out_dir / path.name)


def end_of_turn_tokens(tokenizer) -> list[str]:
    """The special tokens that end a reply: the tokenizer's eos, and the one the chat template
    writes right after an assistant's turn (`<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3)."""
    found = [tokenizer.eos_token] if tokenizer.eos_token else []
    after = turn_ending(tokenizer)
    specials = sorted(set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab()), key=len, reverse=True)
    for token in specials:
        if after.lstrip().startswith(token):
            found.append(token)
            break
    return list(dict.fromkeys(found))


def turn_ending(tokenizer) -> str:
    """What the chat template writes after an assistant's reply ("" without a template)."""
    if not tokenizer.chat_template:
        return ""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    return rendered.split(_PROBE, 1)[1] if _PROBE in rendered else ""


def end_of_turn_ids(tokenizer) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(token) for token in end_of_turn_tokens(tokenizer)]


def write_generation_config(model_dir: Path, tokenizer) -> None:
    """generation_config.json with every end-of-turn id as eos (and a pad id), kept from the
    model's own generation settings otherwise."""
    from transformers import GenerationConfig

    path = Path(model_dir) / "generation_config.json"
    config = GenerationConfig.from_pretrained(model_dir) if path.is_file() else GenerationConfig()
    config.eos_token_id = end_of_turn_ids(tokenizer)
    config.bos_token_id = tokenizer.bos_token_id
    config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.eos_token_id[0]
    config.save_pretrained(model_dir)


def model_card(title: str, training_card: str, usage: str) -> str:
    """An export's README.md: what it is and how to run it, then the training card of the job."""
    body = training_card.split("\n---\n", 1)[1] if training_card.startswith("---\n") else training_card
    front = training_card.split("\n---\n", 1)[0] + "\n---\n" if training_card.startswith("---\n") else ""
    return f"{front}\n# {title}\n\n{usage.strip()}\n\n## The training run\n{body.replace(chr(10) + '# ', chr(10) + '### ', 1)}"


def merged_usage(folder: str) -> str:
    return f"""A complete model (the fine-tune merged into its base): no peft needed.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{folder}")  # this folder, unzipped
tokenizer = AutoTokenizer.from_pretrained("{folder}")
messages = [{{"role": "user", "content": "Your instruction here"}}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
output = model.generate(**inputs, max_new_tokens=256)  # stops at the end of the turn
print(tokenizer.decode(output[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

Serving it with vLLM or text-generation-inference: point them at this folder."""


def gguf_usage(folder: str) -> str:
    return f"""One GGUF file with the chat template and its stop token inside, for llama.cpp and Ollama.

```sh
cd {folder}                                   # this folder, unzipped
llama-cli -m model.gguf -cnv                  # llama.cpp: chat with the embedded template
ollama create {folder} -f Modelfile           # Ollama: the template, stops and sampling defaults
ollama run {folder}
```

```python
from llama_cpp import Llama

llm = Llama(model_path="{folder}/model.gguf")
print(llm.create_chat_completion(messages=[{{"role": "user", "content": "Your instruction here"}}]))
```"""
