"""The OpenAI-compatible server (anjax.serve) through the official `openai` client, on 127.0.0.1.

A tiny model (2 layers, width 64, a tiny BPE tokenizer with a chat template) served in a thread by uvicorn:
greedy and seeded output equal `Engine.generate`; batch invariance; a long prompt is prefilled one chunk per
decode step; stop strings, max_tokens; a client that leaves mid-stream frees its slot; malformed bodies are
400s; SIGTERM drains (subprocess, slow).
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import jax
import openai
import pytest
import uvicorn
from conftest import make_tiny_tokenizer

from anjax import cli
from anjax.cli.serve import parse_args
from anjax.core.config import tiny_config
from anjax.core.model import init_params
from anjax.inference.engine import Engine, EngineConfig
from anjax.io import hf
from anjax.serve.api import create_app
from anjax.serve.metrics import Metrics
from anjax.serve.scheduler import Delta, QueueFullError, Request, Scheduler, visible_text

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)
CONFIG = EngineConfig(anchor_mode="ep", chunk_size=16, capacity=128)
PROMPTS = [
    "The cat sat on the mat. Did the dog see it? Yes",
    "Mr. Smith went to Washington.",
    "Numbers like 12, 345 and 6789 appear too. The dog saw the cat",
    "A sentence ends with a period",
    "Questions end with a question mark? Some end with an exclamation mark! Commas, semicolons",
    "He arrived at 3 p.m. and left",
    "The dog",
    "Yes! The dog saw the cat, and the cat ran. A sentence ends",
]


@functools.cache
def tiny_weights(vocab_size: int):
    cfg = tiny_config(vocab_size=vocab_size)
    return cfg, init_params(cfg, jax.random.key(0))


def tiny_model():
    """(cfg, params, a fresh tokenizer with a chat template): the weights are built once."""
    tok = make_tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return *tiny_weights(len(tok)), tok


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 (a free port) in a thread."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, http="h11", log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def served():
    """(openai client, base url, a second Engine on the same model for reference outputs, the scheduler).

    The reference Engine shares the served one's compile cache (the same executables, run outside the server)."""
    cfg, params, tok = tiny_model()
    engine = Engine(cfg, params, tok, CONFIG)
    scheduler = Scheduler(engine, slots=8, capacity=CONFIG.capacity, metrics=Metrics(), max_queue=32)
    server = ServerThread(create_app(scheduler, "tiny"))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    yield client, server.url, Engine(cfg, params, make_tiny_tokenizer(), CONFIG, runtime=engine.runtime), scheduler
    server.stop()


def complete(client, prompt, **kw):
    kw = dict(temperature=0.0, max_tokens=12) | kw
    return client.completions.create(model="tiny", prompt=prompt, **kw).choices[0]


def ids_of(choice) -> list[int]:
    return choice.model_extra["token_ids"]


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read().decode()


def metric(url: str, name: str) -> float:
    return float(re.search(rf"^{re.escape(name)} (\S+)$", get(url + "/metrics"), re.M).group(1))


def test_greedy_and_seeded_completions_equal_engine_generate(served):
    client, _, engine, _ = served
    for prompt in PROMPTS[:3]:
        want = engine.generate([prompt], max_new_tokens=12)[0]
        got = complete(client, prompt)
        assert ids_of(got) == want.ids[len(want.prompt_ids) :] and got.text == want.text
    sampling = dict(temperature=0.9, top_p=0.8, seed=7)
    want = engine.generate([PROMPTS[0]], max_new_tokens=12, **sampling)[0]
    got = complete(client, PROMPTS[0], **sampling)
    assert ids_of(got) == want.ids[len(want.prompt_ids) :]
    other = complete(client, PROMPTS[0], **(sampling | dict(seed=8)))
    assert ids_of(other) != ids_of(got)


def test_batch_invariance_eight_concurrent_requests_equal_each_alone(served):
    client, *_ = served
    for kw in (dict(), dict(temperature=1.0, seed=11)):
        alone = [ids_of(complete(client, p, max_tokens=16, **kw)) for p in PROMPTS]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda p, kw=kw: ids_of(complete(client, p, max_tokens=16, **kw)), PROMPTS))
        assert together == alone


def test_new_sampling_values_stops_and_lengths_compile_nothing(served):
    client, _, _, scheduler = served
    complete(client, PROMPTS[0])  # compiles what prompts of this bucket need
    before = dict(scheduler.engine.runtime.executables)
    for kw in (
        dict(temperature=0.5, top_p=0.9, seed=3),
        dict(temperature=1.3, seed=4, stop=["e", "th"], extra_body={"top_k": 5}),
        dict(max_tokens=3),
    ):
        complete(client, PROMPTS[1], **kw)
    assert scheduler.engine.runtime.executables == before


def test_streaming_chat_and_completions_equal_non_streaming(served):
    client, *_ = served
    whole = complete(client, PROMPTS[0])
    parts = list(client.completions.create(model="tiny", prompt=PROMPTS[0], temperature=0, max_tokens=12, stream=True))
    assert "".join(c.choices[0].text for c in parts) == whole.text
    assert parts[-1].choices[0].finish_reason == whole.finish_reason
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[1]}]
    reply = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=10)
    assert reply.object == "chat.completion" and reply.usage.completion_tokens == len(ids_of(reply.choices[0]))
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=messages,
            temperature=0,
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content and chunks[-1].usage.completion_tokens == 10 >= 1


def test_stop_strings_and_max_tokens(served):
    client, *_ = served
    full = complete(client, PROMPTS[2], max_tokens=20)
    assert full.finish_reason == "length" and len(ids_of(full)) == 20
    stop = full.text[len(full.text) // 2 :][:2]
    cut = full.text[: full.text.find(stop)]
    got = complete(client, PROMPTS[2], max_tokens=20, stop=[stop, "never appears"])
    assert (got.text, got.finish_reason) == (cut, "stop") and len(ids_of(got)) < 20
    stream = client.completions.create(
        model="tiny", prompt=PROMPTS[2], temperature=0, max_tokens=20, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == cut


def test_visible_text_holds_back_stop_prefixes_and_partial_characters():
    assert visible_text("hello wo", ["world"]) == 6
    assert visible_text("hello", ["xyz"]) == 5
    assert visible_text("caf\ufffd", []) == 3
    assert visible_text("xab", ["abc", "bz"]) == 1


def test_client_disconnect_frees_the_slot(served):
    client, url, *_ = served
    before = metric(url, 'anjax_requests_total{outcome="cancelled"}')
    stream = client.completions.create(model="tiny", prompt=PROMPTS[3], temperature=0, max_tokens=100, stream=True)
    next(iter(stream))
    assert metric(url, "anjax_slots_in_use") == 1
    stream.response.close()
    deadline = time.monotonic() + 20
    while metric(url, "anjax_slots_in_use") != 0:
        assert time.monotonic() < deadline, "the slot was not freed"
        time.sleep(0.05)
    assert metric(url, 'anjax_requests_total{outcome="cancelled"}') == before + 1


MALFORMED = [
    b"{not json",
    b"[]",
    b'"a string"',
    b"{}",
    b'{"prompt": 5}',
    b'{"prompt": null}',
    b'{"prompt": ["a", "b"]}',
    b'{"prompt": []}',
    b'{"prompt": "   "}',
    b'{"prompt": "hi", "max_tokens": -1}',
    b'{"prompt": "hi", "max_tokens": 0}',
    b'{"prompt": "hi", "max_tokens": "10"}',
    b'{"prompt": "hi", "max_tokens": 1.5}',
    b'{"prompt": "hi", "max_tokens": 1000000000}',
    b'{"prompt": "hi", "temperature": -0.1}',
    b'{"prompt": "hi", "temperature": 1e9}',
    b'{"prompt": "hi", "temperature": "hot"}',
    b'{"prompt": "hi", "top_p": 0}',
    b'{"prompt": "hi", "top_p": 1.5}',
    b'{"prompt": "hi", "top_k": -3}',
    b'{"prompt": "hi", "seed": -1}',
    b'{"prompt": "hi", "seed": 99999999999}',
    b'{"prompt": "hi", "stop": 3}',
    b'{"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}',
    b'{"prompt": "hi", "stop": [""]}',
    b'{"prompt": "hi", "n": 2}',
    b'{"prompt": "hi", "stream": "yes"}',
    b'{"prompt": [1, 2, 99999999]}',
    b'{"prompt": "hi", "logprobs": 3}',
    b'{"messages": []}',
    b'{"messages": [{"role": "wizard", "content": "hi"}]}',
    b'{"messages": "hi"}',
]


def test_malformed_requests_are_400_with_a_message_and_the_server_stays_healthy(served):
    client, url, *_ = served
    for body in MALFORMED:
        path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
        req = urllib.request.Request(url + path, data=body, headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 400, body
        err = json.loads(e.value.read())["error"]
        assert err["message"] and err["type"] == "invalid_request_error", body
    with pytest.raises(openai.BadRequestError, match="positions"):
        complete(client, PROMPTS[0], max_tokens=5000)
    assert json.loads(get(url + "/health"))["status"] == "ok"
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert complete(client, PROMPTS[0]).finish_reason in ("stop", "length")
    assert metric(url, "anjax_slots_in_use") == 0 and metric(url, "anjax_queue_length") == 0


def post(url: str, body: bytes, content_type: str | None = "application/json"):
    """(status, parsed JSON error body) of a POST that fails."""
    headers = {"Content-Type": content_type} if content_type else {}
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=30)
    return e.value.code, json.loads(e.value.read())["error"]


def test_every_4xx_is_in_openais_error_format(served):
    _, url, *_ = served
    good = b'{"prompt": "hi", "max_tokens": 2}'
    for body, content_type, message in (
        (good, "text/plain", "Content-Type: application/json (got text/plain)"),
        (good, None, "Content-Type: application/json"),
        (b'{"prompt": "\xff\xfe"}', "application/json", "not a JSON object"),
        (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "application/json", "nested too deep"),
    ):
        status, err = post(url + "/v1/completions", body, content_type)
        assert status == 400 and message in err["message"] and err["type"] == "invalid_request_error", body[:40]
    status, err = post(url + "/v1/nothing", good)
    assert status == 404 and err["message"] == "Not Found"
    assert json.loads(get(url + "/health"))["status"] == "ok"


def test_prompts_are_encoded_off_the_event_loop_and_an_impossible_one_is_refused_first(served, monkeypatch):
    client, url, _, scheduler = served
    engine, threads = scheduler.engine, []
    encode = engine.encode
    monkeypatch.setattr(engine, "encode", lambda text: threads.append(threading.current_thread().name) or encode(text))
    assert complete(client, PROMPTS[0], max_tokens=2).finish_reason in ("stop", "length")
    assert threads and all(name.startswith("anjax-encode") for name in threads)
    limit = engine.cfg.max_position_embeddings * max(map(len, engine.tokenizer.get_vocab()))
    t0, calls = time.monotonic(), len(threads)
    status, err = post(url + "/v1/completions", json.dumps({"prompt": "x" * (limit + 1)}).encode())
    assert status == 400 and f"{limit + 1} characters cannot fit" in err["message"] and err["param"] == "prompt"
    assert len(threads) == calls and time.monotonic() - t0 < 10  # refused by arithmetic, never encoded
    status, err = post(
        url + "/v1/chat/completions",
        json.dumps({"messages": [{"role": "user", "content": "x" * (limit + 1)}]}).encode(),
    )
    assert status == 400 and "cannot fit" in err["message"] and len(threads) == calls


def test_a_non_streamed_client_that_leaves_is_cancelled_at_once(served):
    _, url, *_ = served
    before = metric(url, 'anjax_requests_total{outcome="cancelled"}')
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": PROMPTS[3], "max_tokens": 1000, "temperature": 0, "stop": ["never"]})
    with socket.create_connection((host, int(port))) as s:
        s.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
        )
        deadline = time.monotonic() + 30
        while metric(url, "anjax_slots_in_use") != 1:
            assert time.monotonic() < deadline, "the request never took a slot"
            time.sleep(0.01)
    deadline = time.monotonic() + 10
    while metric(url, "anjax_slots_in_use") != 0:
        assert time.monotonic() < deadline, "the slot was not freed"
        time.sleep(0.02)
    assert metric(url, 'anjax_requests_total{outcome="cancelled"}') == before + 1


def test_the_cache_filling_up_is_its_own_finish_reason(served):
    client, *_ = served  # EP anchors, 128 cache slots: anchors and the open sentence fill them before 1900 tokens
    choice = complete(client, "The dog saw the cat", max_tokens=1900, stop=["never"])
    assert choice.finish_reason == "cache_full" and len(ids_of(choice)) < 1900


def test_a_drain_ends_streams_with_a_final_error_event(served):
    client, url, _, scheduler = served
    stream = client.completions.create(
        model="tiny", prompt=PROMPTS[3], temperature=0, max_tokens=1000, stream=True, stop=["never"]
    )
    chunks = iter(stream)
    next(chunks)
    scheduler.drain(0.0)
    with pytest.raises(openai.APIError, match="shut down before the request finished"):
        list(chunks)
    status, err = post(url + "/v1/completions", b'{"prompt": "hi"}')
    assert status == 429 and "shutting down" in err["message"]
    scheduler.draining = False  # the module's server serves on: restart its loop
    scheduler.stopping = False
    scheduler.start()


def test_slots_times_capacity_beyond_memory_is_refused_by_arithmetic():
    from anjax.cli.serve import check_cache_fits

    cfg = tiny_model()[0]
    with pytest.raises(cli.UsageError, match=r"--slots 100000 x --capacity 1000000 needs a 47683.* GiB KV cache"):
        check_cache_fits(cfg, 100_000, 1_000_000)
    with pytest.raises(cli.UsageError, match=r"needs a 23841.* GiB KV cache"):  # split over two devices
        check_cache_fits(cfg, 100_000, 1_000_000, {"data": 2, "tensor": 1})
    check_cache_fits(cfg, 8, 1024)


def test_full_queue_refuses_and_full_cache_admission_checks_capacity():
    cfg, params, tok = tiny_model()
    sched = Scheduler(Engine(cfg, params, tok, CONFIG), slots=1, capacity=64, metrics=Metrics(), max_queue=2)
    make = lambda n, m: Request(prompt_ids=[5] * n, protected=[False] * n, max_tokens=m, emit=print)
    sched.submit(make(4, 4))
    sched.submit(make(4, 4))
    with pytest.raises(QueueFullError, match="queue is full"):
        sched.submit(make(4, 4))
    full = Scheduler(Engine(cfg, params, tok, EngineConfig(cache="full")), 1, 64, Metrics())
    full.check(make(60, 5))
    with pytest.raises(ValueError, match="full cache"):
        full.check(make(60, 6))
    with pytest.raises(ValueError, match="not 'h2o'"):  # the policies generate through `Engine.generate` only
        Scheduler(Engine(cfg, params, tok, EngineConfig(cache="h2o", budget=8)), 1, 64, Metrics())


def test_an_internal_error_fails_the_request_with_500_and_health_says_so(monkeypatch):
    cfg, params, tok = tiny_model()
    engine = Engine(cfg, params, tok, CONFIG)

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine, "prefill", broken)
    server = ServerThread(create_app(Scheduler(engine, slots=2, capacity=128, metrics=Metrics()), "tiny"))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        with pytest.raises(openai.InternalServerError, match="device lost"):
            complete(client, PROMPTS[0])
        with pytest.raises(urllib.error.HTTPError) as e:
            get(server.url + "/health")
        assert e.value.code == 503
    finally:
        server.stop()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--slots", "0"], "--slots must be >= 1"),
        (["--capacity", "-5"], "--capacity must be >= 1"),
        (["--port", "70000"], "--port must be <= 65535"),
        (["--drain-seconds", "-1"], "--drain-seconds must be >= 0"),
    ],
)
def test_bad_arguments_are_usage_errors(args, message):
    with pytest.raises(cli.UsageError, match=message):
        parse_args(args)


def test_a_port_in_use_is_a_usage_error():
    with socket.create_server(("127.0.0.1", 0)) as s:
        with pytest.raises(cli.UsageError, match="cannot listen on 127.0.0.1"):
            parse_args(["--port", str(s.getsockname()[1])])


@pytest.mark.slow  # a server subprocess
@pytest.mark.parametrize("sig,drain", [(signal.SIGTERM, 30), (signal.SIGINT, 0.5)])
def test_sigterm_and_ctrl_c_drain_requests_in_flight_and_exit_0(tmp_path, sig, drain):
    """A drain long enough lets the streams finish; a short one ends them with a final error event."""
    cfg, params, tok = tiny_model()
    model = hf.save_hf_dir(cfg, params, tok, tmp_path / "model")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--model", model, "--port", port, "--anchor-mode", "ep", "--capacity", 128, "--chunk-size", 16]
    args += ["--drain-seconds", drain, "--cache", "full", "--capacity", 1100] if drain < 1 else []
    proc = subprocess.Popen([sys.executable, "-m", "anjax.serve", *map(str, args)], stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while True:
            try:
                get(url + "/health")
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
                time.sleep(0.5)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        started = threading.Barrier(4)

        def run(prompt):
            stream = client.completions.create(
                model="m",
                prompt=prompt,
                temperature=0,
                max_tokens=100 if drain > 1 else 1000,
                stream=True,
                stop=["never"],
            )
            chunks = iter(stream)
            first = next(chunks)
            started.wait()
            try:
                rest = list(chunks)
            except openai.APIError as e:
                return str(e)
            return (rest or [first])[-1].choices[0].finish_reason

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(run, p) for p in PROMPTS[:3]]
            started.wait(timeout=120)
            proc.send_signal(sig)
            results = [f.result(timeout=120) for f in futures]
        ended = ["shut down before the request finished"] if drain < 1 else ["stop", "length", "cache_full"]
        assert all(any(e in r for e in ended) for r in results), results
        assert proc.wait(timeout=60) == 0
        stderr = proc.stderr.read()
        assert "Traceback" not in stderr and "CancelledError" not in stderr, stderr
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow  # the embedded SmolLM2-135M
def test_smollm2_chat_and_greedy_completion():
    config = EngineConfig(anchor_mode="ep", chunk_size=32, capacity=128)
    engine = Engine.load(None, config)
    scheduler = Scheduler(engine, slots=2, capacity=128, metrics=Metrics())
    server = ServerThread(create_app(scheduler, "smollm2"))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)
        # 18+ tokens: the reference prefills in the server's 32-token chunks, with the server's executable
        prompt = "Rome is the capital of Italy, and Madrid is the capital of Spain. The capital of France is"
        reference = Engine(engine.cfg, engine.params, engine.tokenizer, config, runtime=engine.runtime)
        want = reference.generate([prompt], max_new_tokens=6)[0]
        assert len(want.prompt_ids) > 17
        got = complete(client, prompt, max_tokens=6)
        assert ids_of(got) == want.ids[len(want.prompt_ids) :] and got.text == want.text
        reply = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "Say hello."}], temperature=0, max_tokens=6
        )
        assert reply.choices[0].message.content.strip()
    finally:
        server.stop()


def test_a_long_prompt_is_prefilled_one_chunk_per_decode_step(monkeypatch):
    """A 6-chunk prompt admitted while a request decodes: the running request gets one id between each
    two of the new request's chunks (never a whole prefill's stall), and both outputs equal `Engine.generate`."""
    cfg, params, tok = tiny_model()
    engine = Engine(cfg, params, tok, CONFIG)
    sched = Scheduler(engine, slots=2, capacity=CONFIG.capacity, metrics=Metrics())
    events, finished = [], {"a": threading.Event(), "b": threading.Event()}
    feed = engine.prefill_more  # `Engine.prefill(chunks=1)` and the scheduler feed every chunk through it
    monkeypatch.setattr(engine, "prefill_more", lambda *a, **kw: events.append("chunk") or feed(*a, **kw))

    def emit(name):
        def record(event):
            if isinstance(event, Delta):
                events.append(name)
            else:
                finished[name].set()

        return record

    short, long = engine.encode(PROMPTS[0]), engine.encode(" ".join(PROMPTS[1:]))
    n_chunks = -(-(len(long[0]) - 1) // CONFIG.chunk_size)
    assert n_chunks >= 5
    a = Request(*short, max_tokens=40, emit=emit("a"))
    b = Request(*long, max_tokens=8, emit=emit("b"))
    sched.start()
    try:
        sched.submit(a)
        while "a" not in events:
            time.sleep(0.01)
        sched.submit(b)
        assert finished["b"].wait(120) and finished["a"].wait(120)
    finally:
        sched.stop()
    chunks = [i for i, e in enumerate(events) if e == "chunk" and i > events.index("a")]  # b's
    assert len(chunks) == n_chunks and "a" in events[chunks[-1] + 1 :]
    assert all(events[i + 1 : j] == ["a"] for i, j in zip(chunks, chunks[1:])), events
    monkeypatch.undo()
    for r, (ids, _), n in ((a, short, 40), (b, long, 8)):
        want = engine.generate([ids], max_new_tokens=n)[0]
        assert r.ids == want.ids[len(ids) :]
