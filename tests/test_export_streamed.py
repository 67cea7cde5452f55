"""The Hugging Face directory assembled from staged block files (save_staged_model) is the one save_model writes.

Models here are random and compressed-shaped (per-layer widths, kept RoPE pairs), built directly from a
configuration: the export only sees shapes, names and bytes. Blocks are staged in the pipeline's format
(``block_{i:05d}.safetensors``: a Block's NNX state paths joined by ".", ``[in, out]`` arrays, model dtype).
"""

import errno
import json
import subprocess
import tempfile
import tracemalloc
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from converters import hf_export
from converters.hf_export import (
    export_config, hf_state_dict, model_entries, save_model, save_staged_model, staged_entries, write_safetensors_file,
)
from modegpt_jax.config import LayerSpec, ModelConfig
from modegpt_jax.errors import UserError
from modegpt_jax.families import config_from_hf, family, hf_name
from modegpt_jax.model import Block, Buffer, Transformer
from modegpt_jax.rope import kept_pair_frequencies
from tests.hf_models import TINY_CONFIGS, VOCAB


def hf_config(name: str, **overrides) -> dict:
    """The ``config.json`` dict of a tiny model of tests/hf_models.py (no weights, no torch)."""
    import transformers

    cls_name, kwargs = TINY_CONFIGS[name]
    return getattr(transformers, cls_name)(vocab_size=VOCAB, **{**kwargs, **overrides}).to_dict()


def compressed_specs(cfg: ModelConfig, *, stock: bool = False) -> list[LayerSpec]:
    """Per-layer widths as compression leaves them: varying MLP widths, and (unless ``stock``) fewer query/key
    channels with kept RoPE pairs and fewer value/output channels."""
    specs = []
    for i, _ in enumerate(cfg.layers):
        if stock:
            specs.append(LayerSpec(cfg.intermediate_size // 2, cfg.head_dim, cfg.head_dim))
            continue
        qk = cfg.head_dim - 2 * (1 + i % 3)
        pairs, half = None, cfg.head_dim // 2
        if cfg.use_rope:  # per KV group, the kept pairs' original indices
            pairs = tuple(tuple(sorted(set(range(half)) - {(g + i + 2 * k) % half for k in range(half - qk // 2)}))
                          for g in range(cfg.num_kv_heads))
        specs.append(LayerSpec(cfg.intermediate_size - 8 * (i % 4 + 1), qk, cfg.head_dim - 4 - (i % 2) * 2, pairs))
    return specs


def random_model(name: str, dtype=jnp.float32, *, stock: bool = False, seed: int = 0, **overrides):
    """(model, base Hugging Face config) of a random compressed-shaped model (NumPy-filled: no compilation)."""
    base = hf_config(name, **overrides)
    dense = config_from_hf(base)
    cfg = dense.with_layers(compressed_specs(dense, stock=stock))
    model = nnx.eval_shape(lambda: Transformer(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model)):
        if isinstance(var, Buffer):  # the kept pairs' RoPE frequencies
            var.set_value(jnp.asarray(kept_pair_frequencies(cfg, cfg.layers[int(path[1])])))
        else:
            value = var.get_value()
            var.set_value(jnp.asarray(0.5 * rng.standard_normal(value.shape), dtype=value.dtype))
    return model, base


def stage(model: Transformer, directory: Path) -> Path:
    """Every block of ``model`` in the staging format, as the pipeline writes it."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, block in enumerate(model.layers):
        arrays = {".".join(str(p) for p in path): np.ascontiguousarray(np.asarray(var.get_value()))
                  for path, var in nnx.to_flat_state(nnx.state(block))}
        save_file(arrays, str(directory / f"block_{i:05d}.safetensors"))
    return directory


def shell_of(model: Transformer) -> Transformer:
    """A shell as the pipeline keeps it: abstract blocks, the model's own top-level parameters."""
    shell = nnx.eval_shape(lambda: Transformer(model.config, dtype=model.dtype, rngs=nnx.Rngs(0)))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[0] != "layers":
            target = shell
            for part in path[:-1]:
                target = getattr(target, part)
            getattr(target, path[-1]).set_value(var.get_value())
    return shell


def files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_same_directory(a: Path, b: Path) -> None:
    fa, fb = files(a), files(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        assert fa[name] == fb[name], name


def reference_weights(model: Transformer, max_shard_bytes: int) -> dict[str, bytes]:
    """The weight files as the export wrote them before it streamed (its code then, verbatim in substance): the
    whole state dict in memory, cut into shards in order, safetensors.numpy.save_file per shard."""
    name_map = family(model.config.model_type).names
    tensors = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, transpose = hf_name(name_map, tuple(path))
        array = np.asarray(var.get_value())
        tensors[name] = np.ascontiguousarray(array.T if transpose else array)
    shards, size = [[]], 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += array.nbytes
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        if len(shards) == 1:
            save_file(tensors, f"{tmp}/model.safetensors", metadata={"format": "pt"})
            return {"model.safetensors": Path(f"{tmp}/model.safetensors").read_bytes()}
        weight_map = {}
        for k, names in enumerate(shards, 1):
            fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            save_file({n: tensors[n] for n in names}, f"{tmp}/{fname}", metadata={"format": "pt"})
            out[fname] = Path(f"{tmp}/{fname}").read_bytes()
            weight_map.update(dict.fromkeys(names, fname))
    index = {"metadata": {"total_size": int(sum(a.nbytes for a in tensors.values()))}, "weight_map": weight_map}
    out["model.safetensors.index.json"] = (json.dumps(index, indent=2) + "\n").encode()
    return out


CASES = {
    # remote-code architecture, 11 layers (so HF names sort "layers.10" before "layers.2" inside a file)
    "llama_gqa_untied_f32": dict(name="llama_gqa_untied", dtype=jnp.float32, overrides=dict(num_hidden_layers=11)),
    "opt_bf16": dict(name="opt", dtype=jnp.bfloat16),  # learned positions, biases, LayerNorm
    "qwen2_stock_bf16": dict(name="qwen2", dtype=jnp.bfloat16, stock=True),  # tied embeddings, stock architecture
}


@pytest.mark.parametrize("max_shard_bytes", [hf_export.DEFAULT_MAX_SHARD_BYTES, 20_000])
@pytest.mark.parametrize("case", sorted(CASES))
def test_staged_export_is_byte_identical_to_save_model(case, max_shard_bytes, tmp_path):
    spec = CASES[case]
    model, base = random_model(spec["name"], spec["dtype"], stock=spec.get("stock", False),
                               **spec.get("overrides", {}))
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    common = dict(base_hf_config=base, tokenizer_dir=tokenizer, max_shard_bytes=max_shard_bytes,
                  extra_files={"report.json": '{"ratio": 0.3}\n', "plots/errors.png": b"\x89PNG fake"},
                  modegpt_info={"target_ratio": 0.3})
    expected = save_model(model, tmp_path / "in_memory", **common)
    staged = save_staged_model(tmp_path / "staged", shell=shell_of(model), config=model.config,
                               staging_dir=stage(model, tmp_path / "staging"), **common)
    assert_same_directory(expected, staged)

    # The weights are those the library writer produced before (save_file of each shard of hf_state_dict).
    weights = {k: v for k, v in files(staged).items() if k.startswith(("model.safetensors", "model-"))}
    assert weights == reference_weights(model, max_shard_bytes)
    if max_shard_bytes == 20_000:
        assert len(weights) > 3 and "model.safetensors.index.json" in weights
    else:
        assert list(weights) == ["model.safetensors"]

    # And they hold the model's parameters under their Hugging Face names, dtype included.
    loaded = {}
    for fname in weights:
        if fname.endswith(".safetensors"):
            loaded.update(load_file(str(staged / fname)))
    reference = hf_state_dict(model)
    assert sorted(loaded) == sorted(reference)
    for name, array in reference.items():
        assert loaded[name].dtype == array.dtype == np.dtype(model.dtype)
        np.testing.assert_array_equal(loaded[name], array)
    config = json.loads((staged / "config.json").read_text())
    assert config["model_type"] == ("qwen2" if spec.get("stock") else "modegpt")
    assert config["dtype"] == str(np.dtype(model.dtype))


def test_the_writer_matches_the_safetensors_library_byte_for_byte(tmp_path):
    """Mixed dtypes (alignment order), names out of order, empty and Fortran-ordered (transposed) tensors."""
    import ml_dtypes

    rng = np.random.default_rng(0)
    tensors = {
        "z.weight": rng.standard_normal((3, 5)).astype(np.float32),
        "a.bias": rng.standard_normal(7).astype(ml_dtypes.bfloat16),
        "model.layers.10.x": rng.integers(0, 9, (2, 2)).astype(np.int64),
        "model.layers.2.x": np.array([True, False]),
        "c": rng.standard_normal(4).astype(np.float16),
        "B": rng.integers(0, 9, 3).astype(np.uint8),
        "empty": np.zeros((0, 3), np.float32),
        "f8": rng.standard_normal(5).astype(ml_dtypes.float8_e4m3fn),
        "d64": rng.standard_normal(3),
        "i32": np.arange(5, dtype=np.int32),
        "cx": (rng.standard_normal(2) + 1j).astype(np.complex64),
        "transposed": rng.standard_normal((4, 6)).astype(np.float32).T,
    }
    entries = [hf_export.TensorEntry(k, v.shape, v.dtype, lambda v=v: v) for k, v in tensors.items()]
    for metadata in ({"format": "pt"}, None):
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp_path / "ref"), metadata=metadata)
        write_safetensors_file(tmp_path / "mine", entries, metadata)
        assert (tmp_path / "mine").read_bytes() == (tmp_path / "ref").read_bytes()
    # A transposed tensor larger than one write chunk goes out in row blocks, with the same bytes.
    big = rng.standard_normal((300, 700)).astype(np.float32)
    entry = hf_export.TensorEntry("big", (700, 300), np.dtype(np.float32), lambda: big.T)
    old = hf_export.WRITE_CHUNK_BYTES
    hf_export.WRITE_CHUNK_BYTES = 4096
    try:
        write_safetensors_file(tmp_path / "mine", [entry], {"format": "pt"})
    finally:
        hf_export.WRITE_CHUNK_BYTES = old
    save_file({"big": np.ascontiguousarray(big.T)}, str(tmp_path / "ref"), metadata={"format": "pt"})
    assert (tmp_path / "mine").read_bytes() == (tmp_path / "ref").read_bytes()


def test_entries_come_in_the_in_memory_order(tmp_path):
    model, _ = random_model("llama_gqa_untied", num_hidden_layers=12)
    staged = staged_entries(shell_of(model), model.config, stage(model, tmp_path / "staging"))
    in_memory = model_entries(model)
    assert [(e.name, e.shape, e.dtype) for e in staged] == [(e.name, e.shape, e.dtype) for e in in_memory]
    assert [e.name for e in in_memory] == list(hf_state_dict(model))


def test_export_config_takes_a_config_and_dtype_or_a_model():
    model, base = random_model("llama_gqa_untied", jnp.bfloat16)
    assert export_config(model, base, {"a": 1}) == export_config(model.config, base, {"a": 1}, dtype=jnp.bfloat16)
    assert export_config(model.config, base, dtype=np.float32)["dtype"] == "float32"
    with pytest.raises(TypeError):
        export_config(model.config, base)


def test_peak_memory_is_one_tensor_not_the_model(tmp_path):
    """Blocks of 256 MiB in all, written to one file: what save_staged_model allocates stays near one 16 MiB
    tensor (tracemalloc traces NumPy's buffers; the first measurement shows it does)."""
    cfg = ModelConfig(model_type="llama", vocab_size=256, hidden_size=1024, num_heads=8, num_kv_heads=8,
                      head_dim=128, intermediate_size=4096, layers=tuple(LayerSpec(4096, 128, 128) for _ in range(4)))
    base = {"model_type": "llama", "vocab_size": 256, "hidden_size": 1024, "intermediate_size": 4096,
            "num_attention_heads": 8, "num_hidden_layers": 4}
    rng = np.random.default_rng(0)
    staging = tmp_path / "staging"
    staging.mkdir()
    model_bytes = 0
    for i, spec in enumerate(cfg.layers):
        block = nnx.eval_shape(lambda spec=spec: Block(cfg, spec, dtype=jnp.float32, rngs=nnx.Rngs(0)))
        arrays = {".".join(str(p) for p in path): rng.standard_normal(var.get_value().shape, dtype=np.float32)
                  for path, var in nnx.to_flat_state(nnx.state(block))}
        save_file(arrays, str(staging / f"block_{i:05d}.safetensors"))
        model_bytes += sum(a.nbytes for a in arrays.values())
        del arrays
    largest = 4096 * 1024 * 4
    shell = nnx.eval_shape(lambda: Transformer(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    shell.embed_tokens.set_value(jnp.asarray(rng.standard_normal((256, 1024), dtype=np.float32)))
    shell.final_norm.weight.set_value(jnp.ones(1024))
    shell.lm_head.kernel.set_value(jnp.asarray(rng.standard_normal((1024, 256), dtype=np.float32)))
    assert model_bytes > 250 * 2**20

    tracemalloc.start()
    try:
        # The measurement sees NumPy's buffers: holding every staged tensor at once shows the model's size.
        tracemalloc.reset_peak()
        base_level = tracemalloc.get_traced_memory()[0]
        held = [e.load() for e in staged_entries(shell, cfg, staging)]
        all_at_once = tracemalloc.get_traced_memory()[1] - base_level
        del held
        tracemalloc.reset_peak()
        base_level = tracemalloc.get_traced_memory()[0]
        out = save_staged_model(tmp_path / "export", shell=shell, config=cfg, staging_dir=staging, base_hf_config=base)
        peak = tracemalloc.get_traced_memory()[1] - base_level
    finally:
        tracemalloc.stop()
    mib = 2**20
    measured = f"peak {peak / mib:.1f} MiB, all at once {all_at_once / mib:.1f} MiB, model {model_bytes / mib:.1f} MiB"
    assert all_at_once > 0.95 * model_bytes, measured
    # One staged tensor read whole, plus one row block of its transposed copy: never two tensors, never the model.
    assert peak < largest + hf_export.WRITE_CHUNK_BYTES + 6 * 2**20 < model_bytes / 8, measured
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]
    assert (out / "model.safetensors").stat().st_size > model_bytes


def _small(tmp_path):
    model, base = random_model("llama_gqa_untied")
    return model, base, shell_of(model), stage(model, tmp_path / "staging")


def _both_writers(model, base, shell, staging):
    """Write the same model to a directory from memory and from its staged blocks."""
    return (lambda out: save_model(model, out, base_hf_config=base),
            lambda out: save_staged_model(out, shell=shell, config=model.config, staging_dir=staging,
                                          base_hf_config=base))


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    model, base, shell, staging = _small(tmp_path)
    parent = tmp_path / "outputs"
    parent.mkdir()

    def full(f, array):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hf_export, "_write_array", full)
    for save in _both_writers(model, base, shell, staging):
        with pytest.raises(UserError, match="no space left.*free some space or choose an --output"):
            save(parent / "export")
        assert list(parent.iterdir()) == []


def test_disk_full_on_a_real_small_file_system(tmp_path):
    """On a 256 KiB tmpfs the kernel itself refuses the write (needs root, else skipped)."""
    model, base, shell, staging = _small(tmp_path)
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        for save in _both_writers(model, base, shell, staging):
            with pytest.raises(UserError, match="no space left"):
                save(mount / "export")
            assert list(mount.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_missing_or_mismatched_blocks_are_refused_before_writing(tmp_path):
    model, base, shell, staging = _small(tmp_path)
    parent = tmp_path / "outputs"
    parent.mkdir()
    other, _ = random_model("llama_gqa_untied", stock=True)  # other widths
    (staging / "block_00001.safetensors").unlink()
    with pytest.raises(UserError, match="block_00001.safetensors.*block 1 was not staged"):
        save_staged_model(parent / "export", shell=shell, config=model.config, staging_dir=staging,
                          base_hf_config=base)
    stage(other, staging)
    with pytest.raises(UserError, match="staged block file .*block_00000.safetensors: attn.k_proj.kernel"):
        save_staged_model(parent / "export", shell=shell, config=model.config, staging_dir=staging,
                          base_hf_config=base)
    assert list(parent.iterdir()) == []
