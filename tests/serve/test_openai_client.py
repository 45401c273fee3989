"""The official `openai` client against `jisu serve` (in-process uvicorn on 127.0.0.1): completions,
chat, streaming, logprobs, echo scoring and errors. Once on the tiny model (fast), once on the
default model (e2e)."""
from __future__ import annotations

import pytest

from jisu.serve.app import create_app
from tests.serve.conftest import running

openai = pytest.importorskip("openai")


def exercise(client, *, check_text: bool) -> None:
    ids = [m.id for m in client.models.list().data]
    assert len(ids) == 1
    model = ids[0]

    # completions
    c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert c.object == "text_completion" and c.choices[0].finish_reason in ("stop", "length")
    assert c.usage.completion_tokens <= 8 and c.usage.prompt_tokens > 0
    if check_text:
        assert "Paris" in c.choices[0].text
    streamed = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8,
                                         temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == c.choices[0].text

    # echo scoring, as lm-eval-harness local-completions asks for it
    s = client.completions.create(model=model, prompt="The capital of France is Paris", max_tokens=1, temperature=0,
                                  echo=True, logprobs=1)
    lp = s.choices[0].logprobs
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert s.choices[0].text.startswith("The capital of France is Paris")

    # chat, plain and streamed
    messages = [{"role": "user", "content": "What is the capital of France? One word."}]
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                       logprobs=True, top_logprobs=2)
    msg = r.choices[0].message
    assert r.object == "chat.completion" and msg.role == "assistant" and r.choices[0].finish_reason in ("stop", "length")
    assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in r.choices[0].logprobs.content)
    if check_text:
        assert "Paris" in msg.content
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == msg.content
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == \
        [r.choices[0].finish_reason]

    # seeded sampling repeats
    a = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0.9, seed=42)
    b = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0.9, seed=42)
    assert a.choices[0].message.content == b.choices[0].message.content

    # errors come back as openai exceptions
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="hi", max_tokens=10**6)
    assert "max_tokens" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=messages, temperature=5)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)


def test_openai_client_tiny(tiny_llm):
    app = create_app(tiny_llm, kv_memory_mb=1, api_key="k")
    with running(app) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=60)
        exercise(client, check_text=False)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()


@pytest.mark.e2e
def test_openai_client_default_model(default_llm):
    app = create_app(default_llm, kv_memory_mb=32, max_concurrency=8)
    with running(app) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        exercise(client, check_text=True)
