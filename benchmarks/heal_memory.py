"""Peak resident memory of a distillation step with a large vocabulary (Llama 3's 128256 tokens).

    python benchmarks/heal_memory.py [--batch-size 2] [--seqlen 2048] [--vocab 128256] [--chunk-bytes BYTES]

A small random model (2 blocks, hidden 256) with a large vocabulary, so the vocabulary-sized part of the losses
dominates: two ``kd+lm`` training steps on ``batch-size x seqlen`` tokens (the first compiles), and the process's
peak resident memory during them (Linux ``VmHWM``, reset after the models are built). ``--chunk-bytes`` overrides
:data:`modegpt_jax.heal.LOSS_CHUNK_BYTES`, e.g. ``--chunk-bytes 100000000000`` for one chunk: the whole
``[batch, seqlen, vocab]`` logits at once.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from flax import nnx

from modegpt_jax import heal as healing
from modegpt_jax.config import LayerSpec, ModelConfig
from modegpt_jax.model import Transformer


def status_gib() -> dict[str, float]:
    with open("/proc/self/status") as f:
        return {line.split(":")[0]: int(line.split()[1]) / 2**20 for line in f if line.startswith(("VmHWM", "VmRSS"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--chunk-bytes", type=int, default=None)
    args = parser.parse_args()
    if args.chunk_bytes is not None:
        healing.LOSS_CHUNK_BYTES = args.chunk_bytes
    cfg = ModelConfig(model_type="llama", vocab_size=args.vocab, hidden_size=256, num_heads=4, num_kv_heads=2,
                      head_dim=64, intermediate_size=512, layers=(LayerSpec(512, 64, 64),) * 2,
                      max_position_embeddings=max(4096, args.seqlen))
    model, teacher = Transformer(cfg, rngs=nnx.Rngs(0)), Transformer(cfg, rngs=nnx.Rngs(1))
    settings = healing.HealSettings(steps=2, batch_size=args.batch_size, warmup=1, loss="kd+lm")
    optimizer = healing.make_optimizer(model, settings)
    tokens = np.random.default_rng(0).integers(0, args.vocab, (args.batch_size, args.seqlen)).astype(np.int32)
    before = status_gib()["VmRSS"]
    with open("/proc/self/clear_refs", "w") as f:  # restart VmHWM from the current resident memory
        f.write("5")
    times = []
    for _ in range(2):
        start = time.perf_counter()
        healing.train_step(model, optimizer, tokens, teacher, settings)
        times.append(time.perf_counter() - start)
    logits = args.batch_size * args.seqlen * args.vocab * 4 / 2**30
    print(f"{args.batch_size} x {args.seqlen} tokens, vocabulary {args.vocab}: float32 logits {logits:.2f} GiB per "
          f"copy, chunk budget {healing.LOSS_CHUNK_BYTES / 2**20:.0f} MiB; resident memory {before:.2f} GiB before "
          f"the steps, peak {status_gib()['VmHWM']:.2f} GiB during them; step seconds "
          f"{', '.join(f'{t:.1f}' for t in times)}")


if __name__ == "__main__":
    main()
