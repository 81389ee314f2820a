"""``selfextend serve`` against live servers on 127.0.0.1, through the real ``openai`` client and raw HTTP.

The tiny model shares the embedded model's tokenizer (vocab 49152), trained length 64, SelfExtend G=4 W=16
(reach 208): every prompt here is past its trained length. Expected answers come from ``model.generate``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import build_model

import selfextend

httpx = pytest.importorskip("httpx", reason="the serve tests need the dev extra (httpx)")
openai = pytest.importorskip("openai", reason="the serve tests need the dev extra (openai)")
uvicorn = pytest.importorskip("uvicorn", reason="the serve tests need the serve extra")
from selfextend.serve.app import create_app  # noqa: E402
from selfextend.serve.engine import Engine, Sampling  # noqa: E402

NAME = "tiny"
G, W = 4, 16
DOC = ("The archive holds letters, maps and a ledger of the harbour's ships. " * 8).strip()


@pytest.fixture(scope="module")
def model(tokenizer):
    model = build_model("llama", vocab_size=len(tokenizer))
    return selfextend.apply(model, group_size=G, window=W)


class LiveServer:
    """uvicorn in a thread, on a socket bound before it starts (so the port is known and free)."""

    def __init__(self, app) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                return self
            time.sleep(0.05)
        raise RuntimeError("server did not start")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    def client(self, **kw) -> openai.OpenAI:
        key = kw.pop("api_key", "none")
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)


@pytest.fixture(scope="module")
def live(model, tokenizer):
    engine = Engine(model, tokenizer, cache_bytes=64 << 20)
    with LiveServer(create_app(engine, NAME)) as server:
        server.engine = engine
        yield server


@torch.no_grad()
def expected(model, tokenizer, ids: list[int], max_tokens: int) -> str:
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                         attention_mask=torch.ones(1, len(ids), dtype=torch.long), pad_token_id=2)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def chat_ids(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def prompt(i: int = 0) -> str:
    return f"{DOC} Question {i}: which ship came in last, and when?"


# --- answers equal model.generate ------------------------------------------------------------------------


def test_completions_stream_and_not_equal_generate(live, model, tokenizer):
    client, text = live.client(), prompt()
    ids = tokenizer(text).input_ids  # a completion prompt is read as tokenizer(text) reads it (BOS if any)
    assert 64 < len(ids) and len(ids) + 24 <= 208  # past the trained length, inside the reach
    want = expected(model, tokenizer, ids, 24)
    got = client.completions.create(model=NAME, prompt=text, max_tokens=24, temperature=0)
    assert got.choices[0].text == want
    assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens <= 24
    chunks = list(client.completions.create(model=NAME, prompt=text, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == len(ids) - 1  # the same prompt again


def test_chat_stream_and_not_equal_generate(live, model, tokenizer):
    client = live.client()
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": prompt(1)}]
    want = expected(model, tokenizer, chat_ids(tokenizer, messages), 20)
    got = client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0)
    assert got.choices[0].message.content == want and got.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want


def test_raw_sse_ends_with_done(live):
    body = {"model": NAME, "prompt": prompt(2), "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_sampling_is_seeded_and_stop_strings_cut(live, model, tokenizer):
    client = live.client()
    a, b = (client.completions.create(model=NAME, prompt=prompt(3), max_tokens=12, temperature=0.9, top_p=0.9,
                                      seed=7).choices[0].text for _ in range(2))
    assert a == b
    full = client.completions.create(model=NAME, prompt=prompt(3), max_tokens=12, temperature=0).choices[0]
    stop = full.text[3:6]
    assert stop.strip()
    cut = client.completions.create(model=NAME, prompt=prompt(3), max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == full.text[: full.text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=NAME, prompt=prompt(3), max_tokens=12, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


# --- prefix cache ----------------------------------------------------------------------------------------


def test_prefix_cache_hit_gives_the_cold_answer(live, tokenizer):
    client, engine = live.client(), live.engine
    engine.prefix_cache.clear()
    first = client.completions.create(model=NAME, prompt=prompt(4), max_tokens=10, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    hit = client.completions.create(model=NAME, prompt=prompt(5), max_tokens=10, temperature=0)
    shared = len(tokenizer(f"{DOC} Question", add_special_tokens=False).input_ids)
    assert hit.usage.prompt_tokens_details.cached_tokens >= shared - 1
    engine.prefix_cache.clear()
    cold = client.completions.create(model=NAME, prompt=prompt(5), max_tokens=10, temperature=0)
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert hit.choices[0].text == cold.choices[0].text


def test_prefix_cache_respects_its_bound(model, tokenizer):
    bound = 150_000  # each entry: 2 layers x (K + V) x 2 heads x 16 dims x ~110 tokens x 4 bytes ~ 56 kB
    engine = Engine(model, tokenizer, cache_bytes=bound)
    for i in range(6):
        ids = tokenizer(f"{i} {prompt(i)}", add_special_tokens=False).input_ids
        engine.generate(ids, Sampling(max_tokens=4, temperature=0))
        assert 0 < engine.prefix_cache.nbytes <= bound
    assert 1 <= len(engine.prefix_cache) <= 2  # the least recently used left
    tiny = Engine(model, tokenizer, cache_bytes=0)
    tiny.generate(tokenizer("hello there", add_special_tokens=False).input_ids, Sampling(max_tokens=2))
    assert len(tiny.prefix_cache) == 0


# --- bad requests: a clear 4xx, and the server keeps serving --------------------------------------------


@pytest.mark.parametrize(("body", "status", "needle"), [
    ("{not json", 400, "not valid JSON"),
    ({"model": NAME, "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": NAME, "prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ({"model": NAME, "prompt": ""}, 400, "prompt is empty"),
    ({"model": NAME, "prompt": "hi", "temperature": 9}, 400, "temperature"),
    ({"model": NAME, "prompt": "hi", "n": 3}, 400, "n"),
    ({"model": NAME, "prompt": [999999]}, 400, "token ids"),
    ({"model": "gpt-4", "prompt": "hi"}, 404, "not served here"),
    ({"prompt": "hi"}, 400, "model"),
    ({"model": NAME, "prompt": DOC * 4, "max_tokens": 8}, 400, "208 tokens"),
])
def test_bad_requests_are_clear_4xx(live, body, status, needle):
    data = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(live.url + "/v1/completions", content=data, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"] and {"type", "param", "code"} <= set(error)
    if "208" in needle:
        assert error["code"] == "context_length_exceeded" and "--target-length" in error["message"]
    assert live.client().completions.create(model=NAME, prompt="still serving?", max_tokens=2).choices


def test_unknown_routes_answer_in_openai_shape(live):
    r = httpx.post(live.url + "/v1/embeddings", json={"model": NAME, "input": "x"})
    assert r.status_code == 404 and "/v1/embeddings" in r.json()["error"]["message"]
    r = httpx.get(live.url + "/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_chat_bad_requests(live):
    client = live.client()
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=NAME, messages=[], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="context_length_exceeded|208 tokens"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": DOC * 4}])


def test_api_key_is_checked(model, tokenizer):
    with LiveServer(create_app(Engine(model, tokenizer), NAME, api_key="sesame")) as server:
        with pytest.raises(openai.AuthenticationError):
            server.client(api_key="wrong").models.list()
        assert httpx.get(server.url + "/v1/models").status_code == 401
        assert server.client(api_key="sesame").models.list().data[0].id == NAME
        assert httpx.get(server.url + "/health").json()["status"] == "ok"


# --- concurrency and faults ------------------------------------------------------------------------------


def test_sixteen_clients_mixed_with_disconnects(live, model, tokenizer):
    texts = [prompt(10 + i % 4) for i in range(16)]
    want = {t: expected(model, tokenizer, tokenizer(t).input_ids, 12) for t in set(texts)}

    def run(i: int) -> str | None:
        body = {"model": NAME, "prompt": texts[i], "max_tokens": 12, "temperature": 0}
        if i % 5 == 4:  # disconnect after the first event
            url, streaming = live.url + "/v1/completions", {**body, "stream": True}
            with httpx.stream("POST", url, json=streaming, timeout=120) as r:
                next(r.iter_lines())
            return None
        client = live.client(timeout=120)
        if i % 2:
            return "".join(c.choices[0].text for c in client.completions.create(**body, stream=True))
        return client.completions.create(**body).choices[0].text

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, range(16)))
    for i, got in enumerate(results):
        if got is not None:
            assert got == want[texts[i]], i
    assert live.client().completions.create(model=NAME, prompt="after", max_tokens=2).choices
    health = httpx.get(live.url + "/health").json()
    assert health["queued"] == 0


def test_full_queue_answers_503(model, tokenizer):
    with LiveServer(create_app(Engine(model, tokenizer), NAME, max_queue=1)) as server:
        body = {"model": NAME, "prompt": prompt(20), "max_tokens": 70, "temperature": 0}

        def post(_):
            return httpx.post(server.url + "/v1/completions", json=body, timeout=120)

        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(post, range(8)))
        codes = sorted(r.status_code for r in responses)
        assert 503 in codes and 200 in codes, codes
        busy = next(r for r in responses if r.status_code == 503)
        assert busy.json()["error"]["code"] == "server_busy" and busy.headers["retry-after"]
        texts = {r.json()["choices"][0]["text"] for r in responses if r.status_code == 200}
        assert len(texts) == 1  # every served request got the same greedy answer


def test_disconnect_mid_stream_frees_the_worker(live):
    body = {"model": NAME, "prompt": prompt(30), "max_tokens": 100, "temperature": 0.8, "stream": True}
    with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=60) as r:
        next(r.iter_lines())
    t = time.perf_counter()
    answer = live.client().completions.create(model=NAME, prompt="next", max_tokens=2)
    assert answer.choices and time.perf_counter() - t < 30
    assert httpx.get(live.url + "/health").json()["busy"] is False


# --- the command: a subprocess, Ctrl-C ---------------------------------------------------------------------


def test_cli_serves_and_exits_cleanly_on_ctrl_c(tmp_path, tokenizer):
    model = build_model("llama", vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "selfextend.cli", "serve", "--model", str(tmp_path),
                             "--port", str(port), "-G", "4", "-W", "16", "--name", "t"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        assert client.models.list().data[0].id == "t"
        assert client.models.list().data[0].model_extra["max_model_len"] == 208
        assert client.completions.create(model="t", prompt=prompt(), max_tokens=3, temperature=0).choices
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert "Traceback" not in err and "shutting down" in err


def test_cli_refuses_contradictory_flags(capsys):
    from selfextend.cli import main

    assert main(["serve", "--port", "70000"]) == 2
    assert "--port: 70000 is not a TCP port" in capsys.readouterr().err


# --- the embedded model, SelfExtend past its trained length ------------------------------------------------


@pytest.mark.slow
def test_embedded_model_past_its_trained_length_equals_generate():
    """Completions and chat, streamed and not: the embedded model reading ~8.4k tokens (trained on 8192)."""
    import pydoc_data.topics

    model, tokenizer = selfextend.load_model()
    selfextend.apply(model, group_size=4, window=1024)
    text = "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    ids = tokenizer(text, add_special_tokens=False).input_ids[:8400]
    document = tokenizer.decode(ids) + "\n\nIn one sentence, what is this document about?\n"
    n_prompt = len(tokenizer(document, add_special_tokens=False).input_ids)
    assert n_prompt > 8192  # past the trained length: SelfExtend's grouped attention is what reads it
    want = expected(model, tokenizer, tokenizer(document, add_special_tokens=False).input_ids, 12)
    with LiveServer(create_app(Engine(model, tokenizer), "smol")) as server:
        client = server.client(timeout=600)
        cold = client.completions.create(model="smol", prompt=document, max_tokens=12, temperature=0)
        assert cold.choices[0].text == want and cold.usage.prompt_tokens == n_prompt
        streamed = client.completions.create(model="smol", prompt=document, max_tokens=12, temperature=0,
                                             stream=True, stream_options={"include_usage": True})
        chunks = list(streamed)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens == n_prompt - 1
        messages = [{"role": "user", "content": document}]
        want_chat = expected(model, tokenizer, chat_ids(tokenizer, messages), 12)
        chat = client.chat.completions.create(model="smol", messages=messages, max_tokens=12, temperature=0)
        assert chat.choices[0].message.content == want_chat
        assert chat.usage.prompt_tokens > 8192
        stream = client.chat.completions.create(model="smol", messages=messages, max_tokens=12, temperature=0,
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream) == want_chat


# --- regressions found in review ----------------------------------------------------------------------------


def test_sliding_window_caches_are_reused_only_when_nothing_needs_cropping(tokenizer):
    gemma = build_model("gemma3_text", vocab_size=len(tokenizer))  # layer 0 slides over 8 tokens
    selfextend.apply(gemma, group_size=G, window=W)  # its global layer reads past 64 tokens
    engine = Engine(gemma, tokenizer)
    first = tokenizer(prompt(40), add_special_tokens=False).input_ids
    engine.generate(first, Sampling(max_tokens=4, temperature=0))
    shorter = first[:30] + tokenizer(" and then?", add_special_tokens=False).input_ids
    cold = Engine(gemma, tokenizer, cache_bytes=0).generate(shorter, Sampling(max_tokens=6, temperature=0))
    hit = engine.generate(shorter, Sampling(max_tokens=6, temperature=0))  # once: RuntimeError from crop
    assert hit.text == cold.text and hit.cached_tokens == 0
    held = max((e.tokens for e in engine.prefix_cache._entries.values()), key=len)  # nothing to crop here
    longer = list(held) + tokenizer(" again", add_special_tokens=False).input_ids
    assert engine.generate(longer, Sampling(max_tokens=2, temperature=0)).cached_tokens == len(held)


def test_a_short_shared_prefix_does_not_evict_a_long_document(model, tokenizer):
    engine = Engine(model, tokenizer)
    doc = tokenizer(prompt(50), add_special_tokens=False).input_ids
    engine.generate(doc, Sampling(max_tokens=2, temperature=0))
    other = doc[:3] + tokenizer(" something else entirely", add_special_tokens=False).input_ids
    assert engine.generate(other, Sampling(max_tokens=2, temperature=0)).cached_tokens == 0
    again = engine.generate(doc[:-1] + [doc[-1]], Sampling(max_tokens=2, temperature=0))
    assert again.cached_tokens == len(doc) - 1  # the document's cache was still there


def test_chat_answers_past_sixteen_tokens_by_default(live):
    reply = live.client().chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}],
                                                  temperature=0)
    assert reply.choices[0].finish_reason == "stop" or reply.usage.completion_tokens > 16


def test_serve_refuses_torchrun(monkeypatch, capsys):
    from selfextend.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["serve", "--port", "0"]) == 2
    assert "without torchrun" in capsys.readouterr().err
