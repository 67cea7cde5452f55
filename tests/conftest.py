import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Converted checkpoints go to a per-session cache, never the user's."""
    old = os.environ.get("MODEGPT_CACHE")
    os.environ["MODEGPT_CACHE"] = str(tmp_path_factory.mktemp("modegpt-cache"))
    yield
    if old is None:
        os.environ.pop("MODEGPT_CACHE", None)
    else:
        os.environ["MODEGPT_CACHE"] = old


@pytest.fixture(scope="module", autouse=True)
def _free_compiled_programs():
    """Drop the compiled programs after a test module once the process holds half its limit of memory maps. Every
    XLA:CPU executable holds a few maps of its own; kept for the whole session, the suite's programs passed the
    kernel's limit (vm.max_map_count, 65530 by default) and XLA crashed with a segmentation fault while compiling.
    Below half the limit they stay, so later modules reuse them."""
    yield
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            limit = int(f.read())
        with open("/proc/self/maps") as f:
            held = sum(1 for _ in f)
    except OSError:  # not Linux
        return
    if held > limit // 2:
        import gc

        import jax

        jax.clear_caches()
        gc.collect()


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M checkpoint (converted from GGUF once per session)."""
    from converters.hf_import import HFCheckpoint

    return HFCheckpoint("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_models(smollm2):
    """(our JAX model, transformers' PyTorch model, tokenizer) of the embedded SmolLM2, loaded once."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(smollm2.directory, dtype=torch.float32).eval()
    return smollm2.load_model(), hf, smollm2.load_tokenizer()


@pytest.fixture(scope="session")
def smollm2_compressed(smollm2):
    """(model, report) of the embedded SmolLM2 compressed at 0.3 in memory (32 x 256 calibration tokens, block
    influence allocation, widths multiple of 32 so that every matrix quantises in a GGUF file)."""
    from modegpt_jax.calibration import calibration_windows
    from modegpt_jax.pipeline import CompressionSettings, compress

    tokens = calibration_windows(smollm2.load_tokenizer(), "wikipedia", 32, 256, 0)  # more tokens than MLP channels
    return compress(smollm2, tokens, CompressionSettings(ratio=0.3, width_multiple=32), progress=False)


@pytest.fixture(scope="session")
def tiny_compressed(tmp_path_factory, smollm2):
    """(dense directory, compressed directory): a tiny random Llama with SmolLM2's tokenizer, and the directory
    `modegpt compress` writes for it at ratio 0.3 with every module narrowed (``--attention-scale 1``)."""
    from tests.test_cli_compress import make_tiny_with_tokenizer
    from tests.test_cli_errors import run_cli

    root = tmp_path_factory.mktemp("tiny_compressed")
    dense = make_tiny_with_tokenizer(root / "dense", smollm2, layers=2)
    compressed = root / "compressed"
    proc = run_cli("compress", "--model", str(dense), "--ratio", "0.3", "--output", str(compressed),
                   "--calib-samples", "8", "--calib-seqlen", "32", "--attention-scale", "1", timeout=600)
    assert proc.returncode == 0, proc.stderr
    return dense, compressed
