"""Benchmark formatting and scoring (anjax/eval/tasks.py).

Expected strings are written by hand from the lm-evaluation-harness YAMLs
(lm_eval/tasks/{arc,openbookqa,piqa,hellaswag,sciq,winogrande,super_glue/boolq})
applied to the real documents in tests/data/tasks/, not produced by the code.
Tests marked `real_data` also run on the full copies when
scripts/fetch_eval_data.sh has been run, and are skipped otherwise.
"""

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anjax.eval import tasks

SLICES = Path(__file__).parent / "data" / "tasks"
HAVE_REAL = (tasks.DEFAULT_DATA_DIR / "hf_datasets").is_dir()
real_data = pytest.mark.skipif(not HAVE_REAL, reason="run scripts/fetch_eval_data.sh for the full data")


def doc(task, index, pool=False):
    """Document `index` of the slice: a scored doc, or (pool=True) a demonstration candidate."""
    docs = tasks.load_fewshot_pool(task, SLICES) if pool else tasks.load_task(task, SLICES)
    (d,) = [x for x in docs if x.index == index]
    return d


def one(task, index, pool=False, **kw):
    (item,) = tasks.build_requests(task, [doc(task, index, pool)], **kw)
    return item


# ----------------------------------------------------------------- zero-shot formats, by hand


def test_arc_easy_format():
    item = one("arc_easy", 29)
    assert item.context == "Question: What causes sound?\nAnswer:"
    assert item.continuations == (" sunlight", " vibrations", " x-rays", " pitch")
    assert item.gold == 1
    assert item.pairs() == [("Question: What causes sound?\nAnswer:", c) for c in item.continuations]
    five = one("arc_easy", 500)  # a 5-choice question, answer B
    assert five.continuations == (" nitrogen", " oxygen", " carbon dioxide", " hydrogen", " water vapor")
    assert five.gold == 1


def test_arc_numeric_answer_key():
    # validation doc whose labels are "1".."4" and answerKey "1"
    item = one("arc_easy", 8, pool=True)
    assert item.context == (
        "Question: A green plant absorbs light. A frog eats flies. These are both examples of how organisms\nAnswer:"
    )
    assert item.gold == 0 and item.continuations[0] == " obtain energy"


def test_arc_challenge_format():
    item = one("arc_challenge", 553)
    assert item.context == "Question: Planets orbit\nAnswer:"
    assert item.continuations == (" Earth.", " the Moon.", " the galaxy.", " the Sun.")
    assert item.gold == 3


def test_obqa_format_is_bare_question_stem():
    item = one("obqa", 2)
    assert item.context == "Predators eat"
    assert item.continuations == (" lions", " humans", " bunnies", " grass")
    assert item.gold == 2


def test_piqa_format_keeps_trailing_spaces():
    item = one("piqa", 1549)
    assert item.context == "Question: laser\nAnswer:"
    assert item.continuations == (" burns face ", " burns air ")
    assert item.choices == ("burns face ", "burns air ")
    assert item.gold == 0


def test_hellaswag_format():
    item = one("hellaswag", 3)  # ctx_b "the boy" is capitalized
    assert item.context == "High jump: A boy is running down a track. The boy"
    assert item.continuations == (
        " runs into a car.",
        " gets in a mat.",
        " lifts his body above the height of a pole.",
        " stands on his hands and springs.",
    )
    assert item.gold == 2


def test_hellaswag_wikihow_preprocessing():
    # " [title]" -> ". ", other [tags] removed, "  " -> " " once (the harness keeps "..").
    item = one("hellaswag", 3469)
    assert item.context == (
        "Food and Entertaining: How to make turkey stuffing. Preheat the oven. "
        "Set it to 275ºf (135ºc).. Cube the bread."
    )
    assert item.continuations[0] == (
        "  Thinly slice two to three large cloves of garlic, then place them "
        "in a wok over medium-high heat.. Add in the fresh vegetables "
        "(pesto or marinara)."
    )
    assert item.continuations[1] == (
        "  Cut the bread into cubes roughly ¾ inches (1.9 centimeters) wide. "
        "If using unsliced bread, slice lengthwise down the loaf first, "
        "then cut through the stacked slices."
    )
    assert item.gold == 1


def test_sciq_format():
    item = one("sciq", 699)
    assert item.context == (
        "Kinetic energy is the energy of motion.\nQuestion: Kinetic energy is the energy of what?\nAnswer:"
    )
    assert item.continuations == (" heat", " light", " wind", " motion")
    assert item.gold == 3
    # an empty support still leaves its newline, as in the harness template
    assert one("sciq", 325).context == "\nQuestion: What part of the plant absorbs water?\nAnswer:"


def test_boolq_format_superglue_passage():
    item = one("boolq", 2644)
    assert item.context == (
        "The Punisher (season 2) -- The season is set for release in 2019.\n"
        "Question: are they going to make a punisher season 2?\nAnswer:"
    )
    assert item.continuations == (" no", " yes")
    assert item.gold == 1


def test_winogrande_partial_evaluation():
    item = one("winogrande", 81)
    assert item.contexts == [
        "God liked to control the day and the night, but the day",
        "God liked to control the day and the night, but the night",
    ]
    assert item.context == "God liked to control the day and the night, but the "
    assert item.continuations == (" was too bright.", " was too bright.")
    assert item.gold == 0


# ----------------------------------------------------------------- few-shot formats, by hand


def test_arc_one_shot_context():
    pool = [doc("arc_easy", 8, pool=True)]
    (item,) = tasks.build_requests("arc_easy", [doc("arc_easy", 29)], shots=1, pool=pool)
    assert item.context == (
        "Question: A green plant absorbs light. A frog eats flies. These are both "
        "examples of how organisms\nAnswer: obtain energy\n\n"
        "Question: What causes sound?\nAnswer:"
    )


def test_obqa_one_shot_context():
    pool = [doc("obqa", 154, pool=True)]
    (item,) = tasks.build_requests("obqa", [doc("obqa", 2)], shots=1, pool=pool)
    assert item.context == "What creates a valley? water\n\nPredators eat"


def test_winogrande_one_shot_and_ac_suffix():
    # pool = {scored doc, other doc}: drawing 2, dropping the scored one, leaves the other
    d81, d95 = doc("winogrande", 81), doc("winogrande", 95)
    (item,) = tasks.build_requests("winogrande", [d81], shots=1, pool=[d81, d95])
    demo = "The arrow stuck to the bark but not the stone because the stone was hard."
    assert item.demos == (demo,)
    assert item.contexts == [
        demo + "\n\nGod liked to control the day and the night, but the day",
        demo + "\n\nGod liked to control the day and the night, but the night",
    ]
    assert item.pairs(demo_suffix="<AC>")[1] == (
        demo + "<AC>\n\nGod liked to control the day and the night, but the night",
        " was too bright.",
    )


def test_boolq_one_shot_context():
    d1, d2 = doc("boolq", 2644), doc("boolq", 347)
    (item,) = tasks.build_requests("boolq", [d1], shots=1, pool=[d1, d2])
    assert item.context == (
        "Skunks as pets -- It is currently legal to keep skunks as pets in Britain without a license.\n"
        "Question: can you own a skunk in the uk?\nAnswer: yes\n\n"
        "The Punisher (season 2) -- The season is set for release in 2019.\n"
        "Question: are they going to make a punisher season 2?\nAnswer:"
    )


# ----------------------------------------------------------------- few-shot sampling


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_fewshot_deterministic_and_never_self(name):
    docs = tasks.load_task(name, SLICES)
    a = tasks.build_requests(name, docs, shots=5, seed=1234)  # pool: the same slice dir
    b = tasks.build_requests(name, docs, shots=5, seed=1234)
    assert a == b
    for item in a:
        assert len(item.demos) == 5 == len(item.demo_docs)
        assert item.doc not in item.demo_docs
        assert item.context == "\n\n".join(list(item.demos) + [item.question])
        assert all(d.origin == str(SLICES) for d in item.demo_docs)
    c = tasks.build_requests(name, docs, shots=5, seed=7)
    assert [i.demo_docs for i in a] != [i.demo_docs for i in c]


def test_fewshot_limit_is_a_prefix():
    # the harness's sampler advances over the scored docs in order, so a limited
    # run sees the same demonstrations as the first docs of a full run
    docs = tasks.load_task("piqa", SLICES)
    full = tasks.build_requests("piqa", docs, shots=3, seed=0)
    assert tasks.build_requests("piqa", docs[:2], shots=3, seed=0) == full[:2]
    assert tasks.load_task("piqa", SLICES, limit=2) == docs[:2]


@real_data
@pytest.mark.parametrize("name", ["piqa", "winogrande", "sciq", "boolq"])
def test_fewshot_never_self_real(name):
    docs = tasks.load_task(name)
    items = tasks.build_requests(name, docs, shots=5)
    assert all(item.doc not in item.demo_docs and len(item.demo_docs) == 5 for item in items)


@real_data
def test_real_split_sizes():
    sizes = {
        "obqa": 500,
        "winogrande": 1267,
        "arc_easy": 2376,
        "arc_challenge": 1172,
        "piqa": 1838,
        "hellaswag": 10042,
        "sciq": 1000,
        "boolq": 3270,
    }
    assert {n: len(tasks.load_task(n)) for n in tasks.TASKS} == sizes
    assert len(tasks.lambada_texts()) == 5153
    first = tasks.build_requests("arc_easy", tasks.load_task("arc_easy", limit=1))[0]
    assert first.context == (
        "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:"
    )
    assert first.gold == 0


# ----------------------------------------------------------------- scoring


def fake_loglik(table):
    def fn(pairs):
        return [table[cont] for _, cont in pairs]

    return fn


def test_score_acc_and_acc_norm_by_hand():
    items = tasks.build_requests("arc_easy", [doc("arc_easy", 29), doc("arc_easy", 913)])
    table = {  # doc 29, gold " vibrations" (1); doc 913, gold " kg/m^3" (3)
        " sunlight": -8.0,
        " vibrations": -9.0,
        " x-rays": -7.0,
        " pitch": -6.0,
        " lb": -4.0,
        " kg": -4.0,
        " lb/ft^3": -3.0,
        " kg/m^3": -2.9,
    }
    # doc 29: acc -> pitch (wrong); per char -1, -0.9, -1.17, -1.2 -> vibrations (right)
    # doc 913: acc -> kg/m^3 (right); per char -2, -2, -0.43, -0.48 -> lb/ft^3 (wrong)
    out = tasks.score_items(fake_loglik(table), items)
    assert out["n"] == 2 and out["task"] == "arc_easy" and out["preds"] == [3, 3]
    assert out["acc"] == 0.5 and out["acc_norm"] == 0.5
    assert math.isclose(out["acc_stderr"], 0.5) and math.isclose(out["acc_norm_stderr"], 0.5)
    assert out["acc_per_doc"] == [0, 1] and out["acc_norm_per_doc"] == [1, 0]


def test_acc_norm_divides_by_choice_length_without_delimiter():
    # "burns face " has 11 characters, "burns air " 10: -11/11 > -10.05/10, but with the
    # leading space counted (12, 11) the second would win.
    items = [one("piqa", 1549)]
    out = tasks.score_items(fake_loglik({" burns face ": -11.0, " burns air ": -10.05}), items)
    assert out["acc"] == 0.0 and out["acc_norm"] == 1.0


def test_score_ties_take_first_and_winogrande_reports_acc_only():
    items = [one("winogrande", 81), one("winogrande", 95)]
    out = tasks.score_items(lambda pairs: [0.0] * len(pairs), items)
    assert out["preds"] == [0, 0] and out["acc"] == 0.5  # golds are 0 and 1
    assert "acc_norm" not in out
    assert "acc_norm" not in tasks.score_items(lambda p: [0.0] * len(p), [one("boolq", 2644)])


def test_score_passes_pairs_with_demo_suffix():
    d81, d95 = doc("winogrande", 81), doc("winogrande", 95)
    items = tasks.build_requests("winogrande", [d81], shots=1, pool=[d81, d95])
    seen = []
    tasks.score_items(lambda pairs: seen.extend(pairs) or [0.0] * len(pairs), items, demo_suffix="<AC>")
    assert seen == items[0].pairs(demo_suffix="<AC>") and "<AC>\n\n" in seen[0][0]


# ----------------------------------------------------------------- other data


def test_lambada_slice():
    texts = tasks.lambada_texts(SLICES, limit=2)
    assert len(texts) == 2 and texts[0].endswith("real list")


# ----------------------------------------------------------------- bad inputs


def test_unknown_task_lists_known_ones():
    with pytest.raises(ValueError, match="known tasks: obqa, winogrande, arc_easy"):
        tasks.load_task("mmlu", SLICES)
    with pytest.raises(ValueError, match="unknown task"):
        tasks.build_requests("nope", [])


def test_missing_data_dir_says_how_to_fetch(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="fetch_eval_data.sh"):
        tasks.load_task("piqa", tmp_path / "absent")
    with pytest.raises(ValueError, match="fetch_eval_data.sh"):
        tasks.load_task("piqa", tmp_path)  # exists but empty
    monkeypatch.setenv("ANJAX_EVAL_DATA", str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="fetch_eval_data.sh"):
        tasks.load_task("piqa")
    monkeypatch.delenv("ANJAX_EVAL_DATA")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # default dir missing, hub off
    monkeypatch.setattr(tasks, "DEFAULT_DATA_DIR", tmp_path / "absent")
    with pytest.raises(ValueError, match="fetch_eval_data.sh"):
        tasks.lambada_texts()


def test_bad_arguments():
    piqa = tasks.load_task("piqa", SLICES)
    for limit in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="limit"):
            tasks.load_task("piqa", SLICES, limit=limit)
    with pytest.raises(ValueError, match="shots"):
        tasks.build_requests("piqa", piqa, shots=-1)
    with pytest.raises(ValueError, match="task 'piqa'"):
        tasks.build_requests("boolq", piqa)
    with pytest.raises(ValueError, match="pool docs"):
        tasks.build_requests("piqa", piqa, shots=2, pool=piqa[:2])  # needs shots + 1
    items = tasks.build_requests("piqa", piqa)
    with pytest.raises(ValueError, match="at least one"):
        tasks.score_items(lambda p: [], [])
    with pytest.raises(ValueError, match="returned 1 values for 12 pairs"):
        tasks.score_items(lambda p: [0.0], items)
    mixed = items[:1] + tasks.build_requests("boolq", tasks.load_task("boolq", SLICES, limit=1))
    with pytest.raises(ValueError, match="several tasks"):
        tasks.score_items(lambda p: [0.0] * len(p), mixed)


# ----------------------------------------------------------------- a user's task (.jsonl)


def user_file(tmp_path, lines, name="mine.jsonl"):
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


USER_DOCS = [
    {"context": "Question: What causes sound?\nAnswer:", "choices": ["sunlight", "vibrations"], "gold": 1, "id": "q1"},
    {"context": "The sky is", "choices": ["blue", "green", "loud"], "gold": 0},
    {"context": "Two plus two is", "choices": ["four", "five"], "gold": 0, "id": 7},
]


def test_user_task_is_formatted_like_a_builtin_task(tmp_path):
    path = user_file(tmp_path, USER_DOCS[:1] + [""] + USER_DOCS[1:])  # a blank line is skipped
    docs = tasks.load_task(path)
    assert [d.index for d in docs] == [0, 1, 2] and docs[0].fields["id"] == "q1"
    assert [d.index for d in tasks.load_task(path, limit=2)] == [0, 1]
    (item, *_) = tasks.build_requests(path, docs)
    builtin = one("arc_easy", 29)  # the same question as ARC-Easy formats it
    assert item.pairs() == builtin.pairs()[:2] and item.gold == 1 and item.choices == ("sunlight", "vibrations")
    out = tasks.score_items(lambda pairs: [-len(c) for _, c in pairs], tasks.build_requests(path, docs))
    assert out["preds"] == [0, 0, 0] and out["acc_per_doc"] == [0, 1, 1] and "acc_norm" in out


def test_user_task_demonstrations_come_from_its_file(tmp_path):
    path = user_file(tmp_path, USER_DOCS)
    items = tasks.build_requests(path, tasks.load_task(path), shots=2)
    for it in items:
        assert len(it.demos) == 2 and it.doc not in it.demo_docs
    assert items[0].context.endswith("\n\nQuestion: What causes sound?\nAnswer:")
    assert "The sky is blue" in items[0].context and "Two plus two is four" in items[0].context


@pytest.mark.parametrize(
    "lines, fragment",
    [
        ([USER_DOCS[0], "{not json"], ":2: not valid JSON"),
        ([USER_DOCS[0], "[1, 2]"], ":2: expected a JSON object"),
        ([{"context": "a", "choices": ["x", "y"]}], ":1: missing field 'gold'"),
        ([{"context": "a", "choices": ["x", "y"], "gold": 0, "answer": 1}], ":1: unknown field 'answer'"),
        ([{"context": 3, "choices": ["x", "y"], "gold": 0}], ":1: 'context' must be a string"),
        ([{"context": "a", "choices": ["x"], "gold": 0}], ":1: 'choices' must be a list of at least 2"),
        ([{"context": "a", "choices": "xy", "gold": 0}], ":1: 'choices' must be a list"),
        ([{"context": "a", "choices": ["x", ""], "gold": 0}], ":1: every choice must be a non-empty string"),
        ([{"context": "a", "choices": ["x", "y"], "gold": 2}], ":1: 'gold' must be an int index into choices (0..1)"),
        ([{"context": "a", "choices": ["x", "y"], "gold": True}], ":1: 'gold' must be an int"),
        ([{"context": "a", "choices": ["x", "y"], "gold": "0"}], ":1: 'gold' must be an int"),
        ([{"context": "a", "choices": ["x", "y"], "gold": 0, "id": [1]}], ":1: 'id' must be a string or an int"),
        ([USER_DOCS[0], USER_DOCS[1], USER_DOCS[0]], ":3: duplicate id 'q1' (first on line 1)"),
        (["", " "], "holds no documents"),
    ],
)
def test_user_task_bad_lines(tmp_path, lines, fragment):
    path = user_file(tmp_path, lines)
    with pytest.raises(ValueError) as e:
        tasks.get_task(path)
    message = str(e.value)
    assert fragment in message and path in message and "\n" not in message


def test_user_task_missing_or_binary_file(tmp_path):
    with pytest.raises(ValueError, match="task file .*nope.jsonl: No such file"):
        tasks.get_task(str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "bin.jsonl"
    bad.write_bytes(json.dumps(USER_DOCS[0]).encode() + b"\n\xff\xfe\n")
    with pytest.raises(ValueError, match="bin.jsonl:2: not UTF-8"):
        tasks.get_task(str(bad))


def test_user_task_file_edits_are_seen(tmp_path):
    path = user_file(tmp_path, USER_DOCS[:1])
    assert len(tasks.load_task(path)) == 1
    user_file(tmp_path, USER_DOCS)
    assert len(tasks.load_task(path)) == 3


@settings(max_examples=40, deadline=None)
@given(
    docs=st.lists(
        st.fixed_dictionaries({"context": st.text(), "choices": st.lists(st.text(min_size=1), min_size=2, max_size=5)}),
        min_size=1,
        max_size=4,
    ),
    data=st.data(),
)
def test_user_task_round_trips_any_text(tmp_path_factory, docs, data):
    """Any valid document (any unicode, newlines and quotes included) is read back as written and
    scored as context -> " " + choice."""
    for d in docs:
        d["gold"] = data.draw(st.integers(0, len(d["choices"]) - 1))
    path = tmp_path_factory.mktemp("user") / "any.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    items = tasks.build_requests(str(path), tasks.load_task(str(path)))
    assert [dict(it.doc.fields) for it in items] == docs
    for it, d in zip(items, docs):
        assert it.pairs() == [(d["context"], " " + c) for c in d["choices"]] and it.gold == d["gold"]
