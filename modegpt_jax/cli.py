"""The ``modegpt`` command: a thin layer over the Python API.

Every user-caused failure ends in one line on stderr naming the problem and the fix, and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from modegpt_jax.errors import UserError

DEFAULT_MODEL = "smollm2-135m"


def _read_text(path: str) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"--text {path}: no such file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"--text {path}: not UTF-8 text") from None


def cmd_eval(args: argparse.Namespace) -> int:
    from converters.hf_import import HFCheckpoint
    from modegpt_jax.perplexity import perplexity, token_windows, tokenize
    from modegpt_jax.wikipedia import embedded_text

    text = _read_text(args.text) if args.text else embedded_text("heldout")
    start = time.perf_counter()
    checkpoint = HFCheckpoint(args.model)
    model = checkpoint.load_model(args.dtype)
    tokens = tokenize(checkpoint.load_tokenizer(), text)
    windows = token_windows(tokens, args.seqlen, args.max_windows)
    result = perplexity(model, windows, batch_size=args.batch_size, progress=not args.json)
    result.update(
        model=args.model,
        text=args.text or "embedded:wikipedia/heldout",
        dtype=args.dtype,
        seconds=round(time.perf_counter() - start, 2),
    )
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{args.model}: perplexity {result['perplexity']:.4f} over {result['tokens']} predicted tokens "
            f"({result['windows']} windows of {result['seqlen']}) on {result['text']}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modegpt",
        description="MoDeGPT structured compression of language models in JAX.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("eval", help="perplexity of a model on a text (default: the embedded held-out text)")
    ev.add_argument("--model", default=DEFAULT_MODEL,
                    help=f"model directory, .gguf file, hub id or embedded name (default: {DEFAULT_MODEL})")
    ev.add_argument("--text", help="UTF-8 text file (default: the embedded held-out Wikipedia articles)")
    ev.add_argument("--seqlen", type=int, default=512, help="window length in tokens (default: 512)")
    ev.add_argument("--max-windows", type=int, help="evaluate only the first N windows")
    ev.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default: 4)")
    ev.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter dtype")
    ev.add_argument("--json", action="store_true", help="print one JSON object instead of a sentence")
    ev.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
