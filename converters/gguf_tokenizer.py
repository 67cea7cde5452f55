"""The ``tokenizer.*`` fields of a GGUF file: copied from a GGUF of the source model, or built from a Hugging Face
``tokenizer.json`` (byte-level BPE: Llama 3, Qwen2/3, SmolLM2, GPT-2 style tokenizers).

Built fields follow llama.cpp's conventions: tokens in id order (padded with ``[PAD{i}]`` up to the model's vocabulary
size), special added tokens typed CONTROL and other added tokens USER_DEFINED, merges as ``"a b"``, the special token
ids and ``add_bos_token`` from ``tokenizer_config.json``, the chat template. llama.cpp names its pre-tokenizers
(the regular expressions that split text before BPE); :func:`pre_tokenizer_name` recognises the ones whose
``tokenizer.json`` form llama.cpp documents, and anything else is refused rather than guessed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from modegpt_jax.errors import UserError

# The split expressions of tokenizer.json pre-tokenizers, as llama.cpp's vocabulary code quotes them for its names.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
#: A pre-tokenizer as the steps of tokenizer.json's ``pre_tokenizer`` -> llama.cpp's name for it.
PRE_TOKENIZERS = {
    (("split", LLAMA3_SPLIT), ("byte_level", False)): "llama-bpe",
    (("split", QWEN2_SPLIT), ("byte_level", False)): "qwen2",
    (("digits", True), ("byte_level", True)): "smollm",
    (("byte_level", True),): "gpt-2",
}
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def fields_from_gguf(source: str | Path) -> list:
    """The ``tokenizer.*`` fields of a GGUF file, as (key, value, value type, sub type) for the writer."""
    import gguf

    reader = gguf.GGUFReader(source)
    fields = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        fields.append((key, field.contents(), kind, sub))
    if not fields:
        raise UserError(f"{source} holds no tokenizer")
    return fields


def _steps(pre: dict | None) -> tuple:
    """tokenizer.json's pre_tokenizer as a tuple of comparable steps."""
    if pre is None:
        return ()
    kind = pre.get("type")
    if kind == "Sequence":
        return tuple(step for p in pre.get("pretokenizers", []) for step in _steps(p))
    if kind == "Split":
        pattern = pre.get("pattern", {})
        return (("split", pattern.get("Regex", pattern.get("String"))),)
    if kind == "Digits":
        return (("digits", bool(pre.get("individual_digits"))),)
    if kind == "ByteLevel":
        return (("byte_level", bool(pre.get("use_regex", True))),)
    return ((kind, json.dumps(pre, sort_keys=True)),)


def pre_tokenizer_name(tokenizer: dict) -> str | None:
    """llama.cpp's name for the pre-tokenizer of a parsed tokenizer.json; None when it is not one of
    :data:`PRE_TOKENIZERS`."""
    return PRE_TOKENIZERS.get(_steps(tokenizer.get("pre_tokenizer")))


def _token_id(value: Any, ids: dict[str, int]) -> int | None:
    content = value.get("content") if isinstance(value, dict) else value
    return ids.get(content) if isinstance(content, str) else None


def fields_from_hf(directory: str | Path, vocab_size: int) -> list:
    """``tokenizer.*`` fields built from ``directory``'s tokenizer.json, tokenizer_config.json and chat template."""
    import gguf

    directory = Path(directory)
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{directory} has no tokenizer.json: pass --tokenizer-gguf FILE (a GGUF of the source model)")
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    model = tokenizer.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or not any(
            step[0] == "byte_level" for step in _steps(tokenizer.get("pre_tokenizer"))):
        raise UserError(f"{path}: only byte-level BPE tokenizers are converted here (this one is "
                        f"{model.get('type')}{' with byte fallback' if model.get('byte_fallback') else ''}): pass "
                        "--tokenizer-gguf FILE (a GGUF of the source model)")
    pre = pre_tokenizer_name(tokenizer)
    if pre is None:
        raise UserError(f"{path}: its pre-tokenizer is not one llama.cpp is known here to name ("
                        f"{', '.join(sorted(PRE_TOKENIZERS.values()))}): pass --tokenizer-gguf FILE (a GGUF of the "
                        "source model)")
    ids: dict[str, int] = dict(model["vocab"])
    types: dict[int, int] = {}
    for added in tokenizer.get("added_tokens", []):
        ids[added["content"]] = added["id"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    size = max(vocab_size, max(ids.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    token_types = [UNUSED] * size
    for text, i in ids.items():
        tokens[i], token_types[i] = text, types.get(i, NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    post = tokenizer.get("post_processor") or {}
    single = (post.get("single") or []) if post.get("type") == "TemplateProcessing" else []
    add_bos = config.get("add_bos_token", bool(single) and "SpecialToken" in single[0])
    template = config.get("chat_template")
    if template is None and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")

    V = gguf.GGUFValueType
    fields = [("tokenizer.ggml.model", "gpt2", V.STRING, None), ("tokenizer.ggml.pre", pre, V.STRING, None),
              ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
              ("tokenizer.ggml.token_type", token_types, V.ARRAY, V.INT32),
              ("tokenizer.ggml.merges", merges, V.ARRAY, V.STRING),
              ("tokenizer.ggml.add_bos_token", bool(add_bos), V.BOOL, None)]
    for name, key in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"),
                      ("padding", "pad_token")):
        token = _token_id(config.get(key), ids)
        if token is not None:
            fields.append((f"tokenizer.ggml.{name}_token_id", token, V.UINT32, None))
    if template:
        fields.append(("tokenizer.chat_template", template, V.STRING, None))
    return fields
