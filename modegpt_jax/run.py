"""Whole runs, from a checkpoint to an output directory: compression (:func:`compress_checkpoint`, what
``modegpt compress``, ``modegpt bench --ratio`` and the README's one-call Python example run) and recovery training
(:func:`heal_checkpoint`, what ``modegpt heal`` runs).

:func:`compress_checkpoint` resolves the checkpoint, draws the calibration windows (every process the same ones,
keeping its own share of the rows), compresses streamed from disk with finished layers staged beside the output
(a killed run resumes from the last finished layer), optionally measures held-out perplexity before and after,
and writes the model, ``report.json``, ``README.md``, ``run_config.yaml`` and ``plots/`` from process 0.

:func:`heal_checkpoint` checks that the student is a compressed version of the teacher with the same tokenizer,
draws training windows (never from the held-out text) and validation windows, trains with
:func:`modegpt_jax.heal.heal` with orbax checkpoints beside the output (a killed run resumes), and writes the
model, ``heal_report.json`` and ``plots/heal.png``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import jax

from modegpt_jax.config import ModelConfig
from modegpt_jax.errors import UserError
from modegpt_jax.pipeline import CompressionSettings

__all__ = ["RunSettings", "check_output", "compress_checkpoint", "heal_checkpoint", "perplexity_before_after",
           "resume_dir"]


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What a run does besides the compression itself: where the calibration windows come from, the parameter
    dtype, and whether held-out perplexity is measured before and after."""

    calib_data: str = "wikipedia"  # the embedded calibration split, a .txt/.jsonl/.parquet file, or a hub dataset
    calib_samples: int = 64
    calib_seqlen: int = 512
    seed: int = 0  # of the calibration windows
    dtype: str = "float32"  # parameter dtype
    eval_perplexity: bool = False  # held-out perplexity (embedded text, calib_seqlen windows) before and after
    eval_max_windows: int | None = None

    def validate(self) -> None:
        if self.calib_samples < 1 or self.calib_seqlen < 2:
            raise UserError(f"calib_samples must be >= 1 and calib_seqlen >= 2, got {self.calib_samples} and "
                            f"{self.calib_seqlen}", argument="calib_samples" if self.calib_samples < 1 else
                            "calib_seqlen")
        if self.dtype not in ("float32", "bfloat16"):
            raise UserError(f"dtype must be float32 or bfloat16, got {self.dtype!r}", argument="dtype")


def check_output(path: str | Path, overwrite: bool) -> Path:
    """The output directory, refused (before any work) when it holds something and ``overwrite`` is off."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a directory", argument="output")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output {out} exists and is not empty: choose another directory or pass overwrite",
                        argument=("output", "overwrite"))
    return out


def resume_dir(output: Path) -> Path:
    """Where finished layers are staged for ``output`` (beside it, removed once the output is written)."""
    return output.parent / f".{output.name}.resume"


def perplexity_before_after(checkpoint, model, tokenizer, seqlen: int, max_windows: int | None,
                            dtype: str = "float32") -> dict[str, Any]:
    """Held-out perplexity of the dense and the compressed model on the same windows."""
    from modegpt_jax.perplexity import perplexity, token_windows, tokenize
    from modegpt_jax.wikipedia import embedded_text

    windows = token_windows(tokenize(tokenizer, embedded_text("heldout")), seqlen, max_windows)
    compressed = perplexity(model, windows, progress=True)
    dense = perplexity(checkpoint.load_model(dtype), windows, progress=True)
    return {"text": "embedded:wikipedia/heldout", "windows": compressed["windows"], "seqlen": compressed["seqlen"],
            "dense": dense["perplexity"], "compressed": compressed["perplexity"]}


def compress_checkpoint(model: Any, output: str | Path, settings: CompressionSettings,
                        run: RunSettings = RunSettings(), *, mesh: jax.sharding.Mesh | None = None,
                        overwrite: bool = False, progress: bool = True,
                        run_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compress ``model`` (a directory, ``.gguf`` file, hub id or embedded name, or an
    :class:`~converters.hf_import.HFCheckpoint`) and write the result to ``output``; returns the report.

    ``mesh``: as :func:`modegpt_jax.pipeline.compress` (default: every device on ``data``); in a multi-process
    run every process calls this with the same arguments after ``jax.distributed.initialize()``, and process 0
    writes. ``run_config``: the options to save as ``run_config.yaml`` (default: the settings given here).
    """
    from converters.hf_export import model_card, save_staged_model
    from converters.hf_import import HFCheckpoint
    from modegpt_jax import run_config as run_config_file
    from modegpt_jax.calibration import calibration_windows
    from modegpt_jax.mesh import make_mesh
    from modegpt_jax.pipeline import compress_streamed
    from modegpt_jax.report import plots

    settings.validate()
    run.validate()
    out = check_output(output, overwrite)
    mesh = mesh if mesh is not None else make_mesh(None)
    start = time.perf_counter()
    checkpoint = model if isinstance(model, HFCheckpoint) else HFCheckpoint(model, dtype=run.dtype)
    tokenizer = checkpoint.load_tokenizer()
    t = time.perf_counter()
    windows = calibration_windows(tokenizer, run.calib_data, run.calib_samples, run.calib_seqlen, run.seed)
    windows = windows[jax.process_index() :: jax.process_count()]  # the same windows everywhere, own rows kept
    calib_seconds = time.perf_counter() - t
    staging = resume_dir(out)
    result = compress_streamed(checkpoint, windows, settings, staging, mesh=mesh, progress=progress)
    report = result.report
    report["timings_seconds"]["calibration_data"] = round(calib_seconds, 3)
    report["model"] = str(model) if not isinstance(model, HFCheckpoint) else str(checkpoint.directory.name)
    report["calibration"].update(source=run.calib_data, seed=run.seed)
    if run_config is None:
        run_config = run_config_file.settings_config({"model": report["model"], "output": str(out),
                                                      **dataclasses.asdict(settings), **dataclasses.asdict(run)})
    report["versions"] = run_config.get("versions", {})
    if jax.process_index() == 0:
        if run.eval_perplexity:
            t = time.perf_counter()
            report["perplexity"] = perplexity_before_after(checkpoint, result.load_model(), tokenizer,
                                                           run.calib_seqlen, run.eval_max_windows, run.dtype)
            report["timings_seconds"]["perplexity"] = round(time.perf_counter() - t, 3)
        report["timings_seconds"]["wall"] = round(time.perf_counter() - start, 3)
        extra = {"report.json": json.dumps(report, indent=2) + "\n", "README.md": model_card(report),
                 "run_config.yaml": run_config_file.dump(run_config)}
        extra.update({f"plots/{name}": png for name, png in plots(report).items()})
        save_staged_model(out, shell=result.shell, config=result.config, staging_dir=staging,
                          base_hf_config=checkpoint.hf_config, tokenizer_dir=checkpoint.directory,
                          extra_files=extra, modegpt_info={"method": "MoDeGPT", "target_ratio": settings.ratio})
        shutil.rmtree(staging, ignore_errors=True)
    return report


def heal_dir(output: Path) -> Path:
    """Where a recovery run keeps its orbax checkpoints for ``output`` (beside it, removed once it is written)."""
    return output.parent / f".{output.name}.heal"


#: A text both tokenizers must encode to the same ids.
TOKENIZER_PROBE = "The quick brown fox jumps over the lazy dog. 1234567890 -- Zürich, naïve café: ok?"


def architecture_differences(student: ModelConfig, teacher: ModelConfig) -> list[str]:
    """Why ``student`` cannot be a compressed version of ``teacher`` (empty when it can): the same family, vocabulary,
    hidden size, layers, heads and head dimension, and no layer wider than the teacher's."""
    fields = ("model_type", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")
    differ = [f"{f} {getattr(student, f)} vs {getattr(teacher, f)}" for f in fields
              if getattr(student, f) != getattr(teacher, f)]
    if not differ:
        differ = [f"layer {i} {name} {getattr(s, name)} > {getattr(t, name)}"
                  for i, (s, t) in enumerate(zip(student.layers, teacher.layers))
                  for name in ("mlp_width", "qk_dim", "vo_dim") if getattr(s, name) > getattr(t, name)]
    return differ


def check_student_teacher(student, teacher) -> None:
    """Refuse, with the reason, a teacher whose architecture or tokenizer is not the student's dense origin
    (``student``, ``teacher``: :class:`~converters.hf_import.HFCheckpoint`)."""
    differ = architecture_differences(student.config, teacher.config)
    if differ:
        raise UserError(f"model is not a compressed version of teacher ({'; '.join(differ[:4])})",
                        argument=("model", "teacher"))
    if student.load_tokenizer()(TOKENIZER_PROBE)["input_ids"] != teacher.load_tokenizer()(TOKENIZER_PROBE)["input_ids"]:
        raise UserError("teacher encodes text differently from model (their tokenizers differ)",
                        argument=("teacher", "model"))


def heal_checkpoint(model: Any, teacher: Any, output: str | Path, settings, *, data: str = "wikipedia",
                    seqlen: int = 512, val_windows: int = 16, overwrite: bool = False,
                    mesh: jax.sharding.Mesh | None = None, progress: bool = True,
                    teacher_cache: str | Path | None = None) -> dict[str, Any]:
    """Recovery training of the compressed ``model`` (a directory written by ``modegpt compress``, or any
    checkpoint :class:`~converters.hf_import.HFCheckpoint` reads) from the dense ``teacher`` with
    :class:`~modegpt_jax.heal.HealSettings` ``settings``; writes the healed model to ``output`` and returns the
    report. ``data``: a calibration source (never the held-out text); validation perplexity is measured on
    ``val_windows`` windows of the embedded validation text. ``teacher`` may be None for ``loss="lm"`` (and is not
    loaded then). The student is loaded in ``settings.param_dtype``, the teacher in ``settings.dtype``. ``overwrite``
    also discards the checkpoints of an earlier run for ``output``. ``mesh``: as :func:`modegpt_jax.heal.heal`.
    ``teacher_cache``: a directory for the teacher's final residual stream on the training windows
    (:mod:`modegpt_jax.teacher_cache`): filled block by block first (or continued, or reused as it is), then only
    the teacher's embeddings and head are loaded; in a multi-process run process 0 fills it and the others wait
    (:func:`modegpt_jax.teacher_cache.open_teacher_cache`)."""
    from converters.hf_export import save_model
    from converters.hf_import import HFCheckpoint
    from modegpt_jax.calibration import calibration_tokens, load_calibration_text, sample_windows
    from modegpt_jax.heal import check_run, heal
    from modegpt_jax.perplexity import token_windows, tokenize
    from modegpt_jax.report import heal_plot
    from modegpt_jax.wikipedia import embedded_text

    settings.validate()
    out = check_output(output, overwrite)
    if teacher_cache is not None and settings.loss == "lm":
        raise UserError("a teacher cache serves the distillation losses; loss lm uses no teacher",
                        argument=("teacher_cache", "loss"))
    if val_windows < 0:
        raise UserError(f"val_windows must be >= 0, got {val_windows}", argument="val_windows")
    if seqlen < 2:
        raise UserError(f"seqlen must be at least 2, got {seqlen}", argument="seqlen")
    if val_windows and str(data).strip().lower() == "wikipedia-validation":
        raise UserError("data wikipedia-validation is the text validation perplexity is measured on: train on "
                        "another text, or set val_windows to 0", argument=("data", "val_windows"))
    check_run(settings, bool(val_windows), mesh)  # before the data, the teacher cache and the models
    if overwrite:
        shutil.rmtree(heal_dir(out), ignore_errors=True)
    start = time.perf_counter()
    student = model if isinstance(model, HFCheckpoint) else HFCheckpoint(model)
    if settings.loss != "lm" and teacher is None:
        raise UserError(f"loss {settings.loss!r} needs a teacher (the dense model)", argument="teacher")
    dense = None
    if teacher is not None:
        dense = teacher if isinstance(teacher, HFCheckpoint) else HFCheckpoint(teacher)
        check_student_teacher(student, dense)
    tokenizer = student.load_tokenizer()
    text = calibration_tokens(tokenizer, load_calibration_text(data))
    needed = settings.windows_needed
    if len(text) < needed * seqlen:
        raise UserError(f"the training text {data!r} has {len(text)} tokens, {settings.steps} steps of "
                        f"{settings.grad_accum} x {settings.batch_size} windows of {seqlen} tokens need "
                        f"{needed * seqlen}: fewer steps, a smaller batch_size or seqlen, or more data",
                        argument=("steps", "batch_size", "seqlen", "data"))
    windows = sample_windows(text, needed, seqlen, settings.seed, source=repr(str(data)))
    val = (token_windows(tokenize(tokenizer, embedded_text("validation")), seqlen, val_windows)
           if val_windows else None)
    teacher_model = teacher_hidden = cache_report = None
    if teacher_cache is not None and dense is not None:  # (refused above for loss lm)
        from modegpt_jax.heal import digest
        from modegpt_jax.teacher_cache import checkpoint_identity, open_teacher_cache

        began = time.perf_counter()
        teacher_hidden, reused = open_teacher_cache(
            teacher_cache, {"teacher": checkpoint_identity(dense), "windows": digest(windows), "dtype": settings.dtype},
            dense, windows, settings.dtype, batch_size=settings.batch_size, progress=progress)
        cache_report = {"directory": str(teacher_cache), "reused": reused,
                        "fill_seconds": round(time.perf_counter() - began, 3)}
        teacher_model = dense.load_shell(dataclasses.replace(dense.config, layers=()), settings.dtype)
    elif dense is not None and settings.loss != "lm":
        teacher_model = dense.load_model(settings.dtype)
    healed, report = heal(student.load_model(settings.param_dtype), teacher_model, windows, settings, val_tokens=val,
                          checkpoint_dir=heal_dir(out), mesh=mesh, progress=progress, teacher_hidden=teacher_hidden)
    report.update(model=str(model if not isinstance(model, HFCheckpoint) else student.directory.name),
                  teacher=None if teacher is None else str(teacher if not isinstance(teacher, HFCheckpoint)
                                                           else dense.directory.name),
                  data={"source": data, "windows": int(len(windows)), "seqlen": seqlen}, teacher_cache=cache_report,
                  validation={"text": "embedded:wikipedia/validation", "windows": 0 if val is None else len(val)},
                  wall_seconds=round(time.perf_counter() - start, 3),
                  versions={"jax": jax.__version__})
    if jax.process_index() == 0:
        save_model(healed, out, base_hf_config=student.hf_config, tokenizer_dir=student.directory,
                   extra_files={"heal_report.json": json.dumps(report, indent=2) + "\n",
                                "plots/heal.png": heal_plot(report)})
        shutil.rmtree(heal_dir(out), ignore_errors=True)
    return report
