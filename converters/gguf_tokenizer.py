"""The ``tokenizer.*`` fields of a GGUF file: copied from a GGUF of the source model, or built from a Hugging Face
directory: its SentencePiece ``tokenizer.model`` (Llama 2, Mistral, Gemma: llama.cpp's ``llama`` tokenizer, with the
pieces' scores) or its ``tokenizer.json`` (byte-level BPE: Llama 3, Qwen2/3, SmolLM2, GPT-2 style tokenizers).

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
    if kind == "Split" and pre.get("behavior") == "Isolated" and not pre.get("invert"):
        pattern = pre.get("pattern", {})
        return (("split", pattern.get("Regex", pattern.get("String"))),)
    if kind == "Digits":
        return (("digits", bool(pre.get("individual_digits"))),)
    if kind == "ByteLevel" and not pre.get("add_prefix_space"):
        return (("byte_level", bool(pre.get("use_regex", True))),)
    return ((kind, json.dumps(pre, sort_keys=True)),)  # matches no name


def pre_tokenizer_name(tokenizer: dict) -> str | None:
    """llama.cpp's name for the pre-tokenizer of a parsed tokenizer.json; None when it is not one of
    :data:`PRE_TOKENIZERS`."""
    if (tokenizer.get("normalizer") or {}).get("type", "NFC") != "NFC" or tokenizer.get("model", {}).get(
            "ignore_merges"):
        return None  # text changed before the split, or words looked up whole: not what llama.cpp does
    return PRE_TOKENIZERS.get(_steps(tokenizer.get("pre_tokenizer")))


def _token_id(value: Any, ids: dict[str, int]) -> int | None:
    content = value.get("content") if isinstance(value, dict) else value
    return ids.get(content) if isinstance(content, str) else None


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def fields_from_hf(directory: str | Path, vocab_size: int) -> list:
    """``tokenizer.*`` fields built from ``directory``'s tokenizer.model (SentencePiece) or tokenizer.json, with
    tokenizer_config.json's special tokens and chat template."""
    import gguf

    directory = Path(directory)
    if hf_tokenizer_file(directory).name == "tokenizer.model":
        return _fields_from_sentencepiece(directory, vocab_size)
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{directory} has no tokenizer.model or tokenizer.json: pass --tokenizer-gguf FILE (a GGUF "
                        "of the source model)")
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    model = tokenizer.get("model", {})
    byte_level = '"ByteLevel"' in json.dumps(tokenizer.get("pre_tokenizer"))
    if model.get("type") != "BPE" or model.get("byte_fallback") or not byte_level:
        what = (f"a {model.get('type')} model" if model.get("type") != "BPE" else "BPE with byte fallback"
                if model.get("byte_fallback") else "BPE without a ByteLevel pre-tokenizer")
        raise UserError(f"{path}: only byte-level BPE tokenizers are converted from tokenizer.json (this one is "
                        f"{what}; a SentencePiece model is read from the source's tokenizer.model, absent here): "
                        "pass --tokenizer-gguf FILE (a GGUF of the source model)")
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
    if max(ids.values()) >= vocab_size:
        raise UserError(f"{path} has token ids up to {max(ids.values())}, the model's vocabulary only "
                        f"{vocab_size} rows: not this model's tokenizer")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # rows of the embedding no token uses
    token_types = [UNUSED] * vocab_size
    for text, i in ids.items():
        tokens[i], token_types[i] = text, types.get(i, NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    V = gguf.GGUFValueType
    fields = [("tokenizer.ggml.model", "gpt2", V.STRING, None), ("tokenizer.ggml.pre", pre, V.STRING, None),
              ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
              ("tokenizer.ggml.token_type", token_types, V.ARRAY, V.INT32),
              ("tokenizer.ggml.merges", merges, V.ARRAY, V.STRING)]
    return fields + _special_fields(directory, tokenizer, ids, vocab_size)


def _special_fields(directory: Path, tokenizer: dict, ids: dict[str, int], vocab_size: int,
                    add_bos_default: bool | None = None) -> list:
    """The special token ids, ``add_bos_token`` (and ``add_eos_token`` where set) and the chat template, from
    tokenizer_config.json (else the model's config.json and the tokenizer.json post-processor; else
    ``add_bos_default``: SentencePiece tokenizers put BOS first unless told otherwise)."""
    import gguf

    config = _json(directory / "tokenizer_config.json")
    model_config = _json(directory / "config.json")
    special = {}
    for name, key in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"),
                      ("padding", "pad_token")):
        token = _token_id(config.get(key), ids)
        if token is None and name in ("bos", "eos"):  # as llama.cpp's converter: the model's own ids
            token = model_config.get(f"{name}_token_id")
            token = token[0] if isinstance(token, list) and token else token
        if isinstance(token, int) and 0 <= token < vocab_size:
            special[name] = token
    add_bos = config.get("add_bos_token")
    if not isinstance(add_bos, bool) and add_bos_default is not None and not tokenizer.get("post_processor"):
        add_bos = add_bos_default and "bos" in special
    if not isinstance(add_bos, bool):  # the post-processor's template starts with the BOS token, or not
        post = tokenizer.get("post_processor") or {}
        templates = [p for p in post.get("processors", [post]) if p.get("type") == "TemplateProcessing"]
        first = (templates[0].get("single") or [{}])[0] if templates else {}
        add_bos = "bos" in special and ids.get(first.get("SpecialToken", {}).get("id")) == special["bos"]
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if template is None and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")

    V = gguf.GGUFValueType
    fields = [("tokenizer.ggml.add_bos_token", bool(add_bos), V.BOOL, None)]
    if isinstance(config.get("add_eos_token"), bool):
        fields.append(("tokenizer.ggml.add_eos_token", config["add_eos_token"], V.BOOL, None))
    for name, token in special.items():
        fields.append((f"tokenizer.ggml.{name}_token_id", token, V.UINT32, None))
    if isinstance(template, str) and template:
        fields.append(("tokenizer.chat_template", template, V.STRING, None))
    return fields


#: llama.cpp's token types (``llama_token_type``): a SentencePiece piece's kind -> its GGUF type.
UNKNOWN, BYTE = 2, 6


def _sentencepiece(path: Path) -> Any:
    """``path`` as a SentencePiece processor, or None when it is not a SentencePiece model."""
    try:
        import sentencepiece
    except ImportError:
        raise UserError(f"reading {path} needs the sentencepiece package: pip install sentencepiece") from None
    try:
        return sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError):
        return None


def hf_tokenizer_file(directory: str | Path) -> Path:
    """The file :func:`fields_from_hf` builds the tokenizer from: a SentencePiece ``tokenizer.model`` where there is
    one, else ``tokenizer.json``."""
    directory = Path(directory)
    model = directory / "tokenizer.model"
    if model.is_file() and (not (directory / "tokenizer.json").is_file() or _sentencepiece(model) is not None):
        return model
    return directory / "tokenizer.json"


def _added_tokens(directory: Path, tokenizer: dict) -> dict[int, tuple[str, bool]]:
    """id -> (text, special) of the added tokens in tokenizer.json and tokenizer_config.json."""
    added = {int(i): (a["content"], bool(a.get("special")))
             for i, a in _json(directory / "tokenizer_config.json").get("added_tokens_decoder", {}).items()}
    added.update({a["id"]: (a["content"], bool(a.get("special"))) for a in tokenizer.get("added_tokens", [])})
    return added


def _fields_from_sentencepiece(directory: Path, vocab_size: int) -> list:
    """llama.cpp's ``llama`` (SentencePiece) tokenizer from ``directory/tokenizer.model``: every piece with its score
    and kind; the added tokens of tokenizer.json / tokenizer_config.json typed CONTROL (special) or USER_DEFINED
    with score -1000, as llama.cpp's converter types them (pieces SentencePiece itself marks unknown, control or
    byte keep their kind), so llama.cpp splits them out of text whole; and whether a space is put before the text
    (SentencePiece's dummy prefix, read from how the model encodes one letter)."""
    import gguf

    path = directory / "tokenizer.model"
    sp = _sentencepiece(path)
    if sp is None:
        raise UserError(f"{path} is not a SentencePiece model: pass --tokenizer-gguf FILE (a GGUF of the source "
                        "model)")
    n = sp.vocab_size()
    tokenizer = _json(directory / "tokenizer.json")
    added = _added_tokens(directory, tokenizer)
    top = max([n - 1, *added])
    if top >= vocab_size:
        raise UserError(f"{path} has token ids up to {top}, the model's vocabulary only {vocab_size} rows: not this "
                        "model's tokenizer")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-1000.0] * vocab_size
    token_types = [UNUSED] * vocab_size
    for i in range(n):
        tokens[i], scores[i] = sp.id_to_piece(i), float(sp.get_score(i))
        token_types[i] = (UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else
                          UNUSED if sp.is_unused(i) else BYTE if sp.is_byte(i) else NORMAL)
    for i, (text, special) in added.items():
        if i < n and token_types[i] != NORMAL:
            continue
        tokens[i], scores[i], token_types[i] = text, -1000.0, CONTROL if special else USER_DEFINED
    ids = {t: i for i, t in enumerate(tokens)}
    space_prefix = sp.encode("a", out_type=str)[:1] in (["\u2581a"], ["\u2581"])

    V = gguf.GGUFValueType
    fields = [("tokenizer.ggml.model", "llama", V.STRING, None), ("tokenizer.ggml.pre", "default", V.STRING, None),
              ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
              ("tokenizer.ggml.scores", scores, V.ARRAY, V.FLOAT32),
              ("tokenizer.ggml.token_type", token_types, V.ARRAY, V.INT32),
              ("tokenizer.ggml.add_space_prefix", bool(space_prefix), V.BOOL, None)]
    return fields + _special_fields(directory, tokenizer, ids, vocab_size, add_bos_default=True)
