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
