"""Stopping ``selfextend serve``: chunked prefill (exact), cancellation between chunks, Ctrl-C, server flags.

A "slow" model is the tiny one with a forward pre-hook that sleeps per input token: a long prefill then takes
seconds whatever this machine's load, and how soon a stop takes effect is measured in chunks of it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import build_model, logit_tolerance
from test_serve import LiveServer

import selfextend
from selfextend.integrations.hf.compat import cache_kwarg, output_cache

httpx = pytest.importorskip("httpx", reason="the serve tests need the dev extra (httpx)")
openai = pytest.importorskip("openai", reason="the serve tests need the dev extra (openai)")
uvicorn = pytest.importorskip("uvicorn", reason="the serve tests need the serve extra")
from selfextend.serve import engine as engine_module  # noqa: E402
from selfextend.serve.app import create_app  # noqa: E402
from selfextend.serve.engine import Engine, Sampling  # noqa: E402

NAME = "tiny"
G, W = 4, 16  # reach (64 - 16) * 4 + 16 = 208
DOC = "The archive holds letters, maps and a ledger of the harbour's ships. " * 16
CHUNK = 8
PER_TOKEN = 0.02  # the slow model: seconds per input token, so one chunk takes 0.16 s
CHUNK_S = CHUNK * PER_TOKEN


@pytest.fixture(scope="module")
def model(tokenizer):
    return selfextend.apply(build_model("llama", vocab_size=len(tokenizer)), group_size=G, window=W)


@pytest.fixture
def slow(model):
    """The model with every forward pass sleeping ``PER_TOKEN`` per input token (removed afterwards)."""
    def hook(module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        time.sleep(PER_TOKEN * ids.shape[-1])

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    yield model
    handle.remove()


def long_ids(tokenizer, n: int = 190) -> list[int]:
    """``n`` prompt tokens past the trained length (64), inside the reach with a few answer tokens."""
    ids = tokenizer(DOC, add_special_tokens=False).input_ids
    assert len(ids) >= n
    return ids[:n]


class Stoppable(LiveServer):
    """The CLI's server (``server.Server``) in a thread; ``ctrl_c()`` does what the signal handler does."""

    def __init__(self, app, grace: float) -> None:
        from selfextend.serve.server import BACKSTOP_S, Server, bind, url

        self.sock = bind("127.0.0.1", 0)
        self.url = url(self.sock)
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=grace + BACKSTOP_S)
        self.server = Server(config, app.state.worker, grace)
        self.worker = app.state.worker
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def ctrl_c(self) -> None:
        self.server.handle_exit(signal.SIGINT, None)

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, **kw)


def wait_for(condition, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("timed out")
        time.sleep(0.01)


def prefilled(engine: Engine, tokens: int):
    return lambda: engine.running is not None and engine.running.prefilled >= tokens


# --- the chunked prefill is the one-pass prefill -----------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("chunk", [7, 16, 64, 1000])
def test_chunked_prefill_equals_one_pass_with_selfextend(model, tokenizer, chunk):
    ids = long_ids(tokenizer, 150)  # past the trained 64: grouped keys are read, and kept in the cache
    one = model(torch.tensor([ids]), use_cache=True)
    engine = Engine(model, tokenizer, cache_bytes=0, prefill_chunk=chunk)
    logits, cache, done = engine.prefill(ids)
    assert done == len(ids)
    tol = logit_tolerance(logits)
    torch.testing.assert_close(logits, one.logits[0, -1], atol=tol, rtol=0)
    # the caches carry on alike: five greedy steps give the same logits
    ref_cache, ref, arg = output_cache(one), one.logits[0, -1], cache_kwarg(model)
    for _ in range(5):
        token = torch.tensor([[int(ref.argmax())]])
        a = model(token, use_cache=True, **{arg: ref_cache})
        b = model(token, use_cache=True, **{arg: cache})
        torch.testing.assert_close(b.logits[0, -1], a.logits[0, -1], atol=tol, rtol=0)
        ref = a.logits[0, -1]
    # and the served answer is model.generate's
    want = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=2,
                          attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    got = engine.generate(ids, Sampling(max_tokens=8, temperature=0))
    assert got.text == tokenizer.decode(want[0, len(ids):], skip_special_tokens=True)


def test_cancel_between_chunks_stops_within_one_chunk_and_keeps_what_was_read(model, tokenizer):
    ids = long_ids(tokenizer, 150)
    engine = Engine(model, tokenizer, prefill_chunk=CHUNK)
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[-1]))
    try:
        result = engine.generate(ids, Sampling(max_tokens=4, temperature=0),
                                 cancelled=lambda: len(calls) >= 3)
    finally:
        handle.remove()
    assert result.finish_reason == "cancelled" and calls == [CHUNK] * 3  # no forward after the flag
    assert result.prefilled == 3 * CHUNK and result.to_prefill == len(ids) and result.completion_tokens == 0
    assert engine.running is None
    again = engine.generate(ids, Sampling(max_tokens=6, temperature=0))  # continues from the 24 tokens read
    cold = Engine(model, tokenizer, cache_bytes=0).generate(ids, Sampling(max_tokens=6, temperature=0))
    assert again.cached_tokens == 3 * CHUNK and again.text == cold.text


def test_long_prefills_log_every_chunk(model, tokenizer, monkeypatch, caplog):
    monkeypatch.setattr(engine_module, "PROGRESS_TOKENS", 32)
    engine = Engine(model, tokenizer, cache_bytes=0, prefill_chunk=40)
    with caplog.at_level(logging.INFO, logger="selfextend.serve"):
        engine.generate(long_ids(tokenizer, 150), Sampling(max_tokens=1, temperature=0))
    lines = [r.getMessage() for r in caplog.records if r.name == "selfextend.serve"]
    steps = [x for x in lines if re.match(r"prefill \d+/150 tokens \(\d+%\), \d+ tokens/s, about", x)]
    assert [s.split()[1] for s in steps] == ["40/150", "80/150", "120/150", "150/150"], lines


# --- a client that leaves frees the worker within one chunk ------------------------------------------------


def test_client_leaving_during_a_long_prefill_frees_the_worker(slow, tokenizer):
    engine = Engine(slow, tokenizer, prefill_chunk=CHUNK)
    with Stoppable(create_app(engine, NAME), grace=5) as server:
        ids = long_ids(tokenizer)  # one pass: 3.8 s; in chunks: 0.16 s each
        with pytest.raises(openai.APITimeoutError):
            server.client(timeout=1.0).completions.create(model=NAME, prompt=ids, max_tokens=4, temperature=0)
        gave_up = time.perf_counter()
        assert engine.running is not None and engine.running.prefilled < len(ids)  # still reading it
        reply = server.client(timeout=30).completions.create(model=NAME, prompt="Say hi.", max_tokens=2)
        waited = time.perf_counter() - gave_up
        assert reply.choices and reply.usage.prompt_tokens < 10
        # the disconnect is seen within 0.5 s (the handler polls), then at most one chunk ends
        assert waited < 0.5 + CHUNK_S + 1.0, waited
        health = httpx.get(server.url + "/health").json()
        assert health["busy"] is False and health["queued"] == 0


def test_full_queue_503_gives_the_queue_position_and_an_estimated_wait(slow, tokenizer):
    engine = Engine(slow, tokenizer, prefill_chunk=CHUNK)
    with Stoppable(create_app(engine, NAME, max_queue=1), grace=5) as server:
        ids = long_ids(tokenizer)
        body = {"model": NAME, "prompt": ids, "max_tokens": 2, "temperature": 0}
        results = {}

        def post(key: str) -> None:
            results[key] = httpx.post(server.url + "/v1/completions", json=body, timeout=60)

        running = threading.Thread(target=post, args=("running",))
        running.start()
        wait_for(prefilled(engine, 2 * CHUNK))  # a prefill rate was measured
        queued = threading.Thread(target=post, args=("queued",))
        queued.start()
        wait_for(lambda: server.worker.jobs.qsize() == 1)
        busy = httpx.post(server.url + "/v1/completions", json=body, timeout=10)
        assert busy.status_code == 503
        error = busy.json()["error"]
        assert error["code"] == "server_busy" and error["queue_position"] == 2
        assert "number 2 in the queue" in error["message"] and "tokens/s" in error["message"]
        # at ~50 tokens/s: the running one's rest and the queued one's 190 tokens, and this one's own
        assert 2 < error["estimated_wait_s"] < 60 and 2 < error["estimated_seconds"] < 30
        assert error["queue"]["running"]["to_prefill"] == len(ids)
        assert 1 <= int(busy.headers["retry-after"]) <= error["estimated_wait_s"] + 1
        running.join(60)
        queued.join(60)
    assert results["running"].status_code == results["queued"].status_code == 200


# --- Ctrl-C: the running request gets its answer or an OpenAI-shaped error, streams end with [DONE] -------


def sse_lines(url: str, body: dict, out: dict) -> None:
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=30) as r:
        out["status"] = r.status_code
        out["lines"] = [line for line in r.iter_lines() if line]
    out["ended"] = time.perf_counter()


@pytest.mark.parametrize("stream", [True, False])
def test_ctrl_c_stops_the_running_request_after_grace_in_openai_shape(slow, tokenizer, stream):
    grace = 0.6
    engine = Engine(slow, tokenizer, prefill_chunk=CHUNK)
    server = Stoppable(create_app(engine, NAME), grace=grace)
    body = {"model": NAME, "prompt": long_ids(tokenizer), "max_tokens": 4, "temperature": 0}
    running, waiting = {}, {}

    def post(out: dict) -> None:
        out["response"] = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
        out["ended"] = time.perf_counter()

    with server:
        first = threading.Thread(target=sse_lines if stream else post,
                                 args=((server.url, body, running) if stream else (running,)))
        first.start()
        wait_for(prefilled(engine, 2 * CHUNK))
        second = threading.Thread(target=post, args=(waiting,))  # queued behind it
        second.start()
        wait_for(lambda: server.worker.jobs.qsize() == 1)
        signalled = time.perf_counter()
        server.ctrl_c()
        first.join(30)
        second.join(30)
        server.thread.join(30)
        assert not server.thread.is_alive() and not server.worker.thread.is_alive()
        stopped = time.perf_counter() - signalled
    refused = waiting["response"]
    assert refused.status_code == 503 and waiting["ended"] - signalled < 1.0  # queued: refused at once
    assert refused.json()["error"]["code"] == "shutting_down" and "had not started" in refused.text
    if stream:
        assert running["status"] == 200 and running["lines"][-1] == "data: [DONE]"
        error = json.loads(running["lines"][-2].removeprefix("data: "))["error"]
    else:
        assert running["response"].status_code == 503
        error = running["response"].json()["error"]
    assert error["code"] == "shutting_down" and error["type"] == "server_error"
    assert "while reading its prompt" in error["message"] and "--grace" in error["message"]
    # answered after the grace, within one more chunk (and the event loop's tick)
    assert grace - 0.05 < running["ended"] - signalled < grace + CHUNK_S + 0.6
    assert stopped < grace + CHUNK_S + 1.5, stopped


def test_ctrl_c_lets_a_request_finish_within_grace(slow, tokenizer):
    engine = Engine(slow, tokenizer, prefill_chunk=CHUNK)
    ids = long_ids(tokenizer, 72)
    want = Engine(slow, tokenizer, cache_bytes=0, prefill_chunk=1000).generate(
        ids, Sampling(max_tokens=4, temperature=0)).text
    out = {}
    with Stoppable(create_app(engine, NAME), grace=20) as server:
        client = server.client(timeout=30)
        thread = threading.Thread(target=lambda: out.update(reply=client.completions.create(
            model=NAME, prompt=ids, max_tokens=4, temperature=0)))
        thread.start()
        wait_for(prefilled(engine, CHUNK))
        server.ctrl_c()
        thread.join(30)
        server.thread.join(30)
        assert not server.thread.is_alive()
    assert out["reply"].choices[0].text == want


def test_second_ctrl_c_answers_at_once(slow, tokenizer):
    engine = Engine(slow, tokenizer, prefill_chunk=CHUNK)
    server = Stoppable(create_app(engine, NAME), grace=60)
    body = {"model": NAME, "prompt": long_ids(tokenizer), "max_tokens": 4, "temperature": 0}
    out = {}
    with server:
        thread = threading.Thread(target=sse_lines, args=(server.url, body, out))
        thread.start()
        wait_for(prefilled(engine, CHUNK))
        server.ctrl_c()
        time.sleep(0.3)
        second = time.perf_counter()
        server.ctrl_c()
        thread.join(30)
        server.thread.join(30)
        assert time.perf_counter() - second < 2.0 and not server.thread.is_alive()
    assert out["ended"] - second < 1.0
    assert out["lines"][-1] == "data: [DONE]"
    error = json.loads(out["lines"][-2].removeprefix("data: "))["error"]
    assert error["code"] == "shutting_down" and "at once" in error["message"]
    wait_for(lambda: not server.worker.thread.is_alive(), timeout=5)  # it stopped at its next chunk


# --- the command: SIGINT during a long prefill, one or two ------------------------------------------------

# the CLI, with the slow model's sleep added to the engine's model (a model too large for this machine)
LAUNCH = f"""
import sys, time
from selfextend.serve import engine
init = engine.Engine.__init__
def slow_init(self, model, *args, **kwargs):
    init(self, model, *args, **kwargs)
    model.register_forward_pre_hook(lambda m, a: time.sleep({PER_TOKEN} * a[0].shape[-1]))
engine.Engine.__init__ = slow_init
from selfextend.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny")
    build_model("llama", vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class Process:
    """``selfextend serve --port 0`` in a subprocess; the port comes from its banner."""

    def __init__(self, model_dir, *flags: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCH, "serve", "--model", str(model_dir), "--port", "0", "-G", str(G),
             "-W", str(W), "--name", NAME, *flags],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
            env={**os.environ, "TQDM_DISABLE": "1"})
        self.lines: list[str] = []
        self.port = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            found = re.search(r"serving .* at http://127\.0\.0\.1:(\d+)/v1", line)
            if found:
                self.url = f"http://127.0.0.1:{found.group(1)}"
                self.port.set()

    def wait_ready(self) -> None:
        assert self.port.wait(60), "".join(self.lines)
        wait_for(lambda: self._healthy(), timeout=60)

    def _healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    @property
    def log(self) -> str:
        self.reader.join(10)
        return "".join(self.lines)


@pytest.mark.parametrize("signals", [1, 2])
def test_cli_sigint_during_a_long_prefill_exits_0_in_time(model_dir, tokenizer, signals):
    grace = 1.0
    server = Process(model_dir, "--grace", str(grace), "--prefill-chunk", str(CHUNK))
    try:
        server.wait_ready()
        assert int(server.url.rsplit(":", 1)[1]) > 0  # the banner shows the bound port, not :0
        body = {"model": NAME, "prompt": long_ids(tokenizer), "max_tokens": 4, "temperature": 0}
        out = {}
        thread = threading.Thread(target=sse_lines, args=(server.url, body, out))
        thread.start()
        wait_for(lambda: (server.health()["queue"]["running"] or {}).get("prefilled", 0) >= 2 * CHUNK)
        signalled = time.perf_counter()
        server.proc.send_signal(signal.SIGINT)
        if signals == 2:
            time.sleep(0.2)
            server.proc.send_signal(signal.SIGINT)
        code = server.proc.wait(timeout=grace + 10)
        exited = time.perf_counter() - signalled
        thread.join(10)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    log = server.log
    assert code == 0, log
    bound = grace + CHUNK_S + 2.0 if signals == 1 else 0.2 + 2.0
    assert exited < bound, (exited, log)
    assert out["lines"][-1] == "data: [DONE]", out
    assert json.loads(out["lines"][-2].removeprefix("data: "))["error"]["code"] == "shutting_down"
    assert "Traceback" not in log and "terminate called" not in log and "shutting down" in log, log


# --- server flags and content types ----------------------------------------------------------------------


@pytest.mark.parametrize("key", ["", "  ", " padded", "naïve"])
def test_unusable_api_keys_are_refused_before_the_model_loads(monkeypatch, capsys, key):
    from selfextend import cli

    monkeypatch.setattr(cli, "_load", lambda *a, **k: pytest.fail("the model loaded"))
    assert cli.main(["serve", "--api-key", key]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: argument --api-key:") and err.count("\n") == 1
    assert ("empty" in err) if not key.strip() else ("ASCII" in err)


def test_a_busy_port_is_refused_before_the_model_loads(monkeypatch, capsys):
    from selfextend import cli

    monkeypatch.setattr(cli, "_load", lambda *a, **k: pytest.fail("the model loaded"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_a_wrong_content_type_is_named_in_the_error(model, tokenizer, content_type):
    with Stoppable(create_app(Engine(model, tokenizer), NAME), grace=1) as server:
        data = json.dumps({"model": NAME, "prompt": "hi", "max_tokens": 1})
        for route in ("/v1/completions", "/v1/chat/completions"):
            r = httpx.post(server.url + route, content=data, headers={"content-type": content_type})
            assert r.status_code == 415, r.text
            error = r.json()["error"]
            assert error["code"] == "unsupported_media_type" and error["param"] == "Content-Type"
            assert content_type.split(";")[0] in error["message"] and "application/json" in error["message"]
        ok = httpx.post(server.url + "/v1/completions", content=data,
                        headers={"content-type": "application/json; charset=utf-8"})
        assert ok.status_code == 200, ok.text
