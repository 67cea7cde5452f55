"""Memory of a compression run does not grow with depth: finished blocks go to disk and leave memory, one set
of hidden states is alive at a time, and the streamed result equals the in-memory one exactly."""

import gc
import weakref

import jax
import numpy as np
import pytest
from flax import nnx

from converters.hf_import import HFCheckpoint
from modegpt_jax import pipeline, staging
from modegpt_jax.pipeline import CompressionSettings, compress, compress_streamed

torch = pytest.importorskip("torch")

SETTINGS = CompressionSettings(ratio=0.3, attention_scale=1.0, batch_size=4)


def checkpoint(directory, layers):
    import transformers

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=384,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=False)
    torch.manual_seed(layers)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return HFCheckpoint(directory)


def tokens(n=16, length=32):
    return np.random.default_rng(0).integers(0, 128, (n, length)).astype(np.int32)


def live_bytes():
    gc.collect()
    return sum(a.nbytes for a in jax.live_arrays() if not a.is_deleted())


def params(model):
    return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model))}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("streaming")
    return {n: checkpoint(root / f"l{n}", n) for n in (4, 12)}


@pytest.mark.slow  # keeps `make test` within its time budget; CI runs it in `make test-slow`
def test_memory_does_not_grow_with_depth(checkpoints, tmp_path, monkeypatch):
    written = []
    real_arrays = staging.block_arrays

    def block_arrays(block):  # every finished block passes here on its way to the staging directory
        written.append(weakref.ref(block))
        return real_arrays(block)

    monkeypatch.setattr(staging, "block_arrays", block_arrays)
    peaks, alive = {}, {}
    for n, ckpt in checkpoints.items():
        written.clear()
        base = live_bytes()
        seen, blocks_alive = [], []

        def on_layer(entry):
            seen.append(live_bytes() - base)
            blocks_alive.append(sum(ref() is not None for ref in written))

        compress_streamed(ckpt, tokens(), SETTINGS, tmp_path / f"stage{n}", on_layer=on_layer, progress=False)
        assert len(seen) == n and len(written) == n
        peaks[n], alive[n] = max(seen), max(blocks_alive)

    block = sum(int(np.prod(v.shape)) * 4 for _, v in nnx.to_flat_state(nnx.state(checkpoints[4].load_block(0))))
    # Three times the layers: the largest live set grows by less than half of one dense block (had the finished
    # blocks stayed, it would grow by eight compressed ones).
    assert peaks[12] - peaks[4] < block / 2, (peaks, block)
    assert alive[4] <= 1 and alive[12] <= 1


def test_streamed_result_equals_the_in_memory_one(checkpoints, tmp_path):
    ckpt = checkpoints[4]
    in_memory, report = compress(ckpt, tokens(), SETTINGS, progress=False)
    result = compress_streamed(ckpt, tokens(), SETTINGS, tmp_path / "stage", progress=False)
    assert sorted(p.name for p in (tmp_path / "stage").glob("block_*.safetensors")) == [
        f"block_{i:05d}.safetensors" for i in range(4)]
    assert result.blocks is None  # nothing kept in memory
    streamed = params(result.load_model())
    expected = params(in_memory)
    assert streamed.keys() == expected.keys()
    for path in expected:
        np.testing.assert_array_equal(streamed[path], expected[path], err_msg=str(path))
    assert [x["mlp_width"] for x in result.report["layers"]] == [x["mlp_width"] for x in report["layers"]]
    # Resuming is possible from the staging directory; what it cost per layer is in the report.
    assert all(x["resume_seconds"] >= 0 for x in result.report["layers"])
    assert result.report["timings_seconds"]["compile"] > 0


def test_host_parked_hidden_states_give_the_same_model(checkpoints):
    ckpt = checkpoints[4]
    on_device, _ = compress(ckpt, tokens(), SETTINGS, progress=False)
    parked, report = compress(ckpt, tokens(), pipeline.CompressionSettings(
        **{**SETTINGS.__dict__, "activations_on_host": True}), progress=False)
    assert report["devices"]["activations_on_host"] is True
    a, b = params(on_device), params(parked)
    for path in a:
        np.testing.assert_array_equal(a[path], b[path], err_msg=str(path))


def test_bfloat16_hidden_states(checkpoints, monkeypatch):
    ckpt = checkpoints[4]
    dtypes = set()
    real_set = pipeline.HiddenStates.set

    def record(self, j, x):
        real_set(self, j, x)
        dtypes.add(str(self.get(j).dtype))

    monkeypatch.setattr(pipeline.HiddenStates, "set", record)
    ref, _ = compress(ckpt, tokens(), SETTINGS, progress=False)
    dtypes.clear()
    bf16, report = compress(ckpt, tokens(), pipeline.CompressionSettings(
        **{**SETTINGS.__dict__, "activation_dtype": "bfloat16"}), progress=False)
    assert dtypes == {"bfloat16"}
    assert report["settings"]["activation_dtype"] == "bfloat16"
    sample = tokens(4, 32)
    dense = np.asarray(ckpt.load_model()(sample))
    err_ref = np.linalg.norm(np.asarray(ref(sample)) - dense)
    err_bf16 = np.linalg.norm(np.asarray(bf16(sample)) - dense)
    # Same widths; bfloat16 hidden states change the fitted weights a little, not the quality.
    assert err_bf16 < 1.5 * err_ref
    assert not np.array_equal(np.asarray(ref(sample)), np.asarray(bf16(sample)))


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("on_host", [False, True])
def test_an_interrupted_run_resumes_to_the_same_model(checkpoints, tmp_path, on_host):
    ckpt = checkpoints[4]
    settings = pipeline.CompressionSettings(**{**SETTINGS.__dict__, "activations_on_host": on_host})
    reference = params(compress_streamed(ckpt, tokens(), settings, tmp_path / "ref", progress=False).load_model())

    def stop_after_two(entry):
        if entry["layer"] == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        compress_streamed(ckpt, tokens(), settings, tmp_path / "run", progress=False, on_layer=stop_after_two)
    # Only the last finished layer's hidden states are kept.
    assert [p.name for p in sorted((tmp_path / "run").glob("hidden_*"))] == ["hidden_001"]
    done = []
    result = compress_streamed(ckpt, tokens(), settings, tmp_path / "run", progress=False,
                               on_layer=lambda e: done.append(e["layer"]))
    assert done == [2, 3]
    resumed = params(result.load_model())
    for path in reference:
        np.testing.assert_array_equal(resumed[path], reference[path], err_msg=str(path))
