"""The builtin backend speaks OpenAI's API as the official `openai` client expects it: a tiny
Llama is downloaded, loaded and served through a real head and agent (once on a simulated GPU
under its own name, once from dram under served names and aliases with a shorter context),
and every check below talks to it over HTTP. Needs torch, transformers and openai (`tox -e py`);
elsewhere these tests skip."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gswarm.client import GswarmClient
from gswarm.errors import BadRequest
from gswarm.head.app import HeadServer
from tests.conftest import AgentRunner, fast_settings, free_port, running_hub
from tests.test_serving_torch import tiny_llm  # noqa: F401 (the fixture)

openai = pytest.importorskip("openai")

pytestmark = [
    # One worker runs the whole module, so its served model starts once (tox: --dist loadgroup).
    pytest.mark.xdist_group("openai-conformance"),
    pytest.mark.timeout(240),
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(
        importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None,
        reason="needs torch and transformers (the serve extra): run `tox -e py`",
    ),
]

CONTEXT = 256
"""The tiny model's max_position_embeddings."""
SHORT = 64
"""The max_model_len the second service is given."""


@dataclass
class Served:
    """The two services and clients for them."""

    gswarm: GswarmClient
    gpu: Any  # openai.AsyncOpenAI on tiny-llm@w1:gpu0, named tiny-llm
    named: Any  # on tiny-llm@w1:dram, named org/tiny-chat and tiny-alias, 64 positions, 2 may wait
    gpu_url: str
    named_url: str


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(
    tiny_llm: Path,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Served]:
    tmp = tmp_path_factory.mktemp("openai")
    settings = fast_settings()
    head = HeadServer(tmp / "state", "127.0.0.1", 0, settings)
    await head.start()
    runner = AgentRunner(tmp, settings, tmp_path_factory.getbasetemp())
    with pytest.MonkeyPatch.context() as mp:
        async with running_hub({"org/tiny-llm": tiny_llm}, mp):
            try:
                async with GswarmClient(head.url, head.head.tokens.api_token) as gs:
                    await runner.start(head, "w1", simulate_gpus="1:1G")
                    op = await gs.download("tiny-llm", "org/tiny-llm", "w1:dram", wait=True)
                    assert op.state == "succeeded", op.error
                    assert (await gs.load("tiny-llm", "w1:gpu0", wait=True)).state == "succeeded"
                    gpu_port, named_port = free_port(), free_port()
                    op = await gs.serve("tiny-llm", "w1:gpu0", gpu_port, wait=True)
                    assert op.state == "succeeded", op.error
                    config = {
                        "served_model_name": "org/tiny-chat",
                        "aliases": ["tiny-alias"],
                        "max_model_len": SHORT,
                        "max_waiting": 2,
                    }
                    op = await gs.serve("tiny-llm", "w1:dram", named_port, config=config, wait=True)
                    assert op.state == "succeeded", op.error
                    gpu_url, named_url = f"http://127.0.0.1:{gpu_port}", f"http://127.0.0.1:{named_port}"
                    gpu = openai.AsyncOpenAI(base_url=gpu_url + "/v1", api_key="none", max_retries=0)
                    named = openai.AsyncOpenAI(base_url=named_url + "/v1", api_key="none", max_retries=0)
                    async with gpu, named:
                        yield Served(gs, gpu, named, gpu_url, named_url)
            finally:
                await runner.stop_all()
                await head.stop()


async def greedy(served: Served, prompt: str, max_tokens: int) -> Any:
    return await served.gpu.completions.create(
        model="tiny-llm", prompt=prompt, max_tokens=max_tokens, temperature=0
    )


async def raw_post(url: str, body: Any) -> tuple[int, Any]:
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    async with (
        aiohttp.ClientSession() as s,
        s.post(url, data=data, headers={"Content-Type": "application/json"}) as r,
    ):
        return r.status, await r.json(content_type=None)


# ---------------------------------------------------------------- models and names


async def test_models_lists_the_served_names(served: Served) -> None:
    assert [m.id for m in (await served.gpu.models.list()).data] == ["tiny-llm"]
    names = await served.named.models.list()
    assert [m.id for m in names.data] == ["org/tiny-chat", "tiny-alias"]
    assert all(m.object == "model" and m.owned_by == "gswarm" for m in names.data)
    assert (await served.named.models.retrieve("tiny-alias")).id == "tiny-alias"


async def test_every_served_name_answers_and_is_reported(served: Served) -> None:
    for name in ("org/tiny-chat", "tiny-alias"):
        out = await served.named.completions.create(model=name, prompt="fox", max_tokens=2)
        assert out.model == name
    chat = await served.named.chat.completions.create(
        model="tiny-alias", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert chat.model == "tiny-alias"


async def test_other_model_names_are_404_with_openai_error(served: Served) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        await served.gpu.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert err.value.body == {
        "message": "The model `gpt-4` does not exist: this server serves tiny-llm.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
    with pytest.raises(openai.NotFoundError):
        await served.gpu.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    # The gswarm name is not one of the named service's names: it answers to what it was told.
    with pytest.raises(openai.NotFoundError):
        await served.named.completions.create(model="tiny-llm", prompt="hi", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        await served.gpu.models.retrieve("gpt-4")


# ---------------------------------------------------------------- completions


async def test_completion_reports_usage_and_length_finish(served: Served) -> None:
    out = await greedy(served, "the quick brown", 7)
    assert out.object == "text_completion" and out.model == "tiny-llm" and out.id.startswith("cmpl-")
    [choice] = out.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text
    assert out.usage.completion_tokens == 7
    assert out.usage.total_tokens == out.usage.prompt_tokens + 7 and out.usage.prompt_tokens > 0


async def test_streamed_completion_ends_with_finish_reason_and_usage(served: Served) -> None:
    whole = await greedy(served, "the quick brown", 12)
    stream = await served.gpu.completions.create(
        model="tiny-llm",
        prompt="the quick brown",
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    *choice_chunks, usage_chunk = chunks
    assert usage_chunk.choices == [] and usage_chunk.usage == whole.usage
    assert [c.choices[0].finish_reason for c in choice_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in choice_chunks[:-1])
    assert all(c.usage is None for c in choice_chunks)
    assert "".join(c.choices[0].text for c in choice_chunks) == whole.choices[0].text
    assert len(choice_chunks) > 2  # streamed as generated, not as one piece

    # Without stream_options there is no usage chunk.
    stream = await served.gpu.completions.create(
        model="tiny-llm", prompt="fox", max_tokens=3, stream=True, temperature=0
    )
    chunks = [c async for c in stream]
    assert chunks[-1].choices[0].finish_reason == "length" and all(c.usage is None for c in chunks)


async def test_stop_sequences_end_the_text_before_them(served: Served) -> None:
    whole = (await greedy(served, "the lazy dog", 40)).choices[0]
    text = whole.text
    # A stop sequence that first occurs a few characters in.
    start = next(i for i in range(3, len(text) - 2) if text.find(text[i : i + 2]) == i)
    stop = text[start : start + 2]
    for stops in (stop, ["never-there", stop]):
        out = await served.gpu.completions.create(
            model="tiny-llm", prompt="the lazy dog", max_tokens=40, temperature=0, stop=stops
        )
        assert out.choices[0].text == text[:start] and out.choices[0].finish_reason == "stop"
        assert out.usage.completion_tokens < 40
    stream = await served.gpu.completions.create(
        model="tiny-llm", prompt="the lazy dog", max_tokens=40, temperature=0, stop=[stop], stream=True
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks) == text[:start]
    assert chunks[-1].choices[0].finish_reason == "stop"
    # A stop sequence that never comes changes nothing.
    out = await served.gpu.completions.create(
        model="tiny-llm", prompt="the lazy dog", max_tokens=40, temperature=0, stop=["never-there"]
    )
    assert (out.choices[0].text, out.choices[0].finish_reason) == (text, whole.finish_reason)


async def test_prompt_list_and_n_give_one_choice_each(served: Served) -> None:
    one = await greedy(served, "hello", 4)
    two = await greedy(served, "the quick", 4)
    out = await served.gpu.completions.create(
        model="tiny-llm", prompt=["hello", "the quick"], max_tokens=4, temperature=0, n=2
    )
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == [one.choices[0].text] * 2 + [two.choices[0].text] * 2
    assert out.usage.prompt_tokens == one.usage.prompt_tokens + two.usage.prompt_tokens
    assert out.usage.completion_tokens == 16
    # Token ids as the prompt read as the text they stand for.
    ids = await served.gpu.completions.create(
        model="tiny-llm", prompt=[[5, 6, 7], [8, 9]], max_tokens=2, temperature=0
    )
    assert len(ids.choices) == 2 and ids.usage.prompt_tokens == 5

    stream = await served.gpu.completions.create(
        model="tiny-llm", prompt=["hello", "the quick"], max_tokens=4, temperature=0, n=2, stream=True
    )
    texts = ["", "", "", ""]
    finishes: dict[int, str] = {}
    async for chunk in stream:
        [c] = chunk.choices
        texts[c.index] += c.text
        if c.finish_reason is not None:
            finishes[c.index] = c.finish_reason
    assert texts == [c.text for c in out.choices] and finishes == dict.fromkeys(range(4), "length")


async def test_same_seed_same_text(served: Served) -> None:
    async def sample(seed: int, n: int = 1, **kw: Any) -> list[str]:
        out = await served.gpu.completions.create(
            model="tiny-llm", prompt="the fox", max_tokens=16, temperature=1.0, seed=seed, n=n, **kw
        )
        return [c.text for c in out.choices]

    assert await sample(7) == await sample(7)
    assert await sample(7) != await sample(8)
    three = await sample(7, n=3)
    assert three == await sample(7, n=3) and len(set(three)) == 3
    # A top_p this small keeps only the likeliest token: the greedy text.
    assert await sample(9, top_p=1e-6) == [(await greedy(served, "the fox", 16)).choices[0].text]


async def test_penalties_steer_away_from_repeats(served: Served) -> None:
    plain = (await greedy(served, "the fox", 40)).choices[0].text
    for penalty in ("presence_penalty", "frequency_penalty"):
        out = await served.gpu.completions.create(
            model="tiny-llm", prompt="the fox", max_tokens=40, temperature=0, **{penalty: 2.0}
        )
        assert out.choices[0].text != plain, penalty


async def test_an_empty_prompt_starts_from_the_start_token(served: Served) -> None:
    out = await served.gpu.completions.create(model="tiny-llm", prompt="", max_tokens=3, temperature=0)
    assert out.usage.prompt_tokens == 1 and out.usage.completion_tokens == 3


async def test_echo_puts_the_prompt_first(served: Served) -> None:
    out = await served.gpu.completions.create(
        model="tiny-llm", prompt="the quick", max_tokens=3, temperature=0, echo=True
    )
    plain = await greedy(served, "the quick", 3)
    assert out.choices[0].text == "the quick" + plain.choices[0].text


# ---------------------------------------------------------------- chat


async def test_chat_completion_and_stream(served: Served) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    out = await served.gpu.chat.completions.create(
        model="tiny-llm", messages=messages, max_tokens=6, temperature=0
    )
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    [choice] = out.choices
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert out.usage.completion_tokens == 6

    stream = await served.gpu.chat.completions.create(
        model="tiny-llm",
        messages=messages,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    first, *middle, last, usage = chunks
    assert first.object == "chat.completion.chunk"
    assert first.choices[0].delta.role == "assistant" and first.choices[0].finish_reason is None
    assert all(c.choices[0].finish_reason is None for c in middle)
    assert last.choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == choice.message.content
    assert usage.choices == [] and usage.usage == out.usage


async def test_chat_content_parts_and_n(served: Served) -> None:
    parts = [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]
    out = await served.gpu.chat.completions.create(
        model="tiny-llm", messages=[{"role": "user", "content": parts}], max_tokens=3, temperature=0, n=2
    )
    plain = await served.gpu.chat.completions.create(
        model="tiny-llm", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0
    )
    assert [c.message.content for c in out.choices] == [plain.choices[0].message.content] * 2
    with pytest.raises(openai.BadRequestError) as err:
        image = [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/y.png"}}]
        await served.gpu.chat.completions.create(
            model="tiny-llm", messages=[{"role": "user", "content": image}], max_tokens=3
        )
    assert err.value.body["param"] == "messages[0].content"


async def test_max_completion_tokens_is_honoured(served: Served) -> None:
    chat = await served.gpu.chat.completions.create(
        model="tiny-llm",
        messages=[{"role": "user", "content": "hi"}],
        max_completion_tokens=3,
        temperature=0,
    )
    assert chat.usage.completion_tokens == 3 and chat.choices[0].finish_reason == "length"
    # It wins over max_tokens, as in OpenAI's API.
    chat = await served.gpu.chat.completions.create(
        model="tiny-llm",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=9,
        max_completion_tokens=2,
        temperature=0,
    )
    assert chat.usage.completion_tokens == 2
    out = await served.gpu.completions.create(
        model="tiny-llm", prompt="fox", temperature=0, extra_body={"max_completion_tokens": 5}
    )
    assert out.usage.completion_tokens == 5
    # (Greedy: a sampled text could meet the end-of-text token sooner.)
    # A completion without a limit writes 16 tokens (OpenAI's default); a chat runs to the context.
    assert (
        await served.gpu.completions.create(model="tiny-llm", prompt="fox", temperature=0)
    ).usage.completion_tokens == 16
    chat = await served.named.chat.completions.create(
        model="tiny-alias", messages=[{"role": "user", "content": "hi"}], temperature=0
    )
    assert chat.usage.total_tokens == SHORT and chat.choices[0].finish_reason == "length"


# ---------------------------------------------------------------- limits and bad requests


async def test_beyond_the_context_is_400_that_says_so(served: Served) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        await served.gpu.completions.create(model="tiny-llm", prompt="hello", max_tokens=100000)
    body = err.value.body
    assert f"maximum context length is {CONTEXT} tokens" in body["message"]
    assert body["param"] == "max_tokens" and body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as err:
        await served.named.chat.completions.create(
            model="tiny-alias", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=SHORT
        )
    assert f"maximum context length is {SHORT} tokens" in err.value.body["message"]
    assert err.value.body["param"] == "max_completion_tokens"
    with pytest.raises(openai.BadRequestError) as err:
        await served.named.chat.completions.create(
            model="tiny-alias", messages=[{"role": "user", "content": "fox " * 100}]
        )
    assert "reduce the length of the messages" in err.value.body["message"]
    # Exactly the context is fine.
    n = (
        await served.gpu.completions.create(model="tiny-llm", prompt="hello", max_tokens=1)
    ).usage.prompt_tokens
    out = await served.gpu.completions.create(model="tiny-llm", prompt="hello", max_tokens=CONTEXT - n)
    assert out.choices[0].finish_reason == "stop" or out.usage.total_tokens == CONTEXT


BAD_COMPLETIONS: list[tuple[Any, str | None]] = [
    ({"model": "tiny-llm"}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": ["a", 1]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[1, 2], []]}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),
    ({"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": True}, "n"),
    ({"prompt": "x", "temperature": 3}, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "seed": "s"}, "seed"),
    ({"prompt": "x", "seed": 2**70}, "seed"),
    ({"prompt": "x", "stop": 5}, "stop"),
    ({"prompt": "x", "stop": ["a"] * 17}, "stop"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    (
        {"prompt": "x", "stream": True, "stream_options": {"include_usage": "y"}},
        "stream_options.include_usage",
    ),
    ({"prompt": "x", "logprobs": 2}, "logprobs"),
    ({"prompt": "x", "model": 7}, "model"),
    ([{"prompt": "x"}], None),
    ("{not json", None),
    ("", None),
    ("null", None),
]

BAD_CHATS: list[tuple[Any, str | None]] = [
    ({"model": "tiny-llm"}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"text": "x"}]}]}, "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -1}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
    (
        {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}},
        "response_format",
    ),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, "logprobs"),
]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        *[("/v1/completions", b, p) for b, p in BAD_COMPLETIONS],
        *[("/v1/chat/completions", b, p) for b, p in BAD_CHATS],
    ],
)
async def test_malformed_bodies_are_400_with_openai_error(
    served: Served, path: str, body: Any, param: str | None
) -> None:
    status, answer = await raw_post(served.gpu_url + path, body)
    assert status == 400, answer
    assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["message"]
    assert answer["error"]["param"] == param


async def test_malformed_bodies_through_the_openai_client(served: Served) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        await served.gpu.chat.completions.create(model="tiny-llm", messages="hi")
    assert err.value.status_code == 400 and err.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError):
        await served.gpu.completions.create(model="tiny-llm", prompt="x", max_tokens=-3)


async def test_other_paths_and_methods_answer_openai_errors(served: Served) -> None:
    async with aiohttp.ClientSession() as s:
        for method, path, status in [
            ("GET", "/v1/nothing", 404),
            ("GET", "/v1/completions", 405),
            ("POST", "/v1/models", 405),
        ]:
            async with s.request(method, served.gpu_url + path) as r:
                assert r.status == status
                body = await r.json()
                assert set(body["error"]) == {"message", "type", "param", "code"}
        async with s.post(served.gpu_url + "/v1/completions", data=io.BytesIO(b"x" * (5 << 20))) as r:
            assert r.status == 413 and "error" in await r.json()


# ---------------------------------------------------------------- concurrency


async def test_concurrent_requests_are_all_answered(served: Served) -> None:
    """Requests are queued: each answered in full, none mixed with another."""
    expected = {p: (await greedy(served, p, 8)).choices[0].text for p in ("hello", "the quick", "lazy dog")}

    async def plain(prompt: str) -> str:
        return str((await greedy(served, prompt, 8)).choices[0].text)

    async def streamed(prompt: str) -> str:
        stream = await served.gpu.completions.create(
            model="tiny-llm", prompt=prompt, max_tokens=8, temperature=0, stream=True
        )
        return "".join([c.choices[0].text async for c in stream])

    prompts = list(expected) * 4
    calls = [plain(p) for p in prompts] + [streamed(p) for p in prompts]
    answers = await asyncio.gather(*calls)
    assert answers == [expected[p] for p in prompts] * 2


async def test_a_client_that_leaves_frees_the_server(served: Served) -> None:
    async with aiohttp.ClientSession() as s:
        body = {"prompt": "the", "max_tokens": CONTEXT - 2, "stream": True}
        async with s.post(served.gpu_url + "/v1/completions", json=body) as r:
            assert r.status == 200
            await r.content.readline()  # the first chunk, then the client goes
    out = await asyncio.wait_for(greedy(served, "hello", 2), timeout=20)
    assert out.usage.completion_tokens == 2


async def test_beyond_max_waiting_is_429(served: Served) -> None:
    """One generates, two wait (the service's max_waiting), the fourth is told to come back."""
    # Each long enough for all four to arrive while the first generates.
    body = {"model": "tiny-alias", "prompt": "hi", "max_tokens": 40, "n": 16}

    async def post(s: aiohttp.ClientSession) -> tuple[int, Any]:
        async with s.post(served.named_url + "/v1/completions", json=body) as r:
            return r.status, await r.json()

    async with aiohttp.ClientSession() as s:
        answers = sorted(await asyncio.gather(*(post(s) for _ in range(4))), key=lambda a: a[0])
    assert [status for status, _ in answers] == [200, 200, 200, 429]
    assert all(len(a["choices"]) == 16 for _, a in answers[:3])
    error = answers[3][1]["error"]
    assert error["code"] == "overloaded" and "requests are waiting" in error["message"]
    # The queue drained: the next one is answered.
    out = await served.named.completions.create(model="tiny-alias", prompt="hi", max_tokens=1)
    assert out.usage.completion_tokens == 1


# ---------------------------------------------------------------- serve config


async def test_serve_config_of_the_builtin_backend_is_checked(served: Served) -> None:
    for config in (
        {"served_model_name": 5},
        {"served_model_name": []},
        {"aliases": ["has space"]},
        {"max_model_len": 0},
        {"max_waiting": -1},
        {"served_model_names": "typo"},
    ):
        with pytest.raises(BadRequest) as err:
            await served.gswarm.serve("tiny-llm", "w1:dram", free_port(), config=config)
        assert err.value.code == "invalid_config", config


# ---------------------------------------------------------------- hostile bodies, property-based

JUNK = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
"""Any JSON value."""
EDGES = st.sampled_from([-1, 0, 1, 2, 2**31, 2**63, 2**64, -(2**70), 1e308, -0.0, 0.5, "", "1", [], {}])


def field(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A field's value: mostly a valid one, sometimes junk or an edge."""
    return st.one_of(valid, valid, JUNK, EDGES)


SHARED = {
    "model": field(st.sampled_from(["tiny-llm", "gpt-4", "TINY-LLM"])),
    "n": field(st.integers(1, 3)),
    "temperature": field(st.floats(0, 2)),
    "top_p": field(st.floats(0.01, 1)),
    "top_k": field(st.integers(-1, 50)),
    "seed": field(st.integers(-(2**63), 2**63 - 1)),
    "stop": field(st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=3))),
    "stream": field(st.booleans()),
    "stream_options": field(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "presence_penalty": field(st.floats(-2, 2)),
    "frequency_penalty": field(st.floats(-2, 2)),
    "max_completion_tokens": field(st.integers(1, 4)),
    "user": field(st.text(max_size=5)),
    "unknown_field": JUNK,
}
TOKEN_IDS = st.lists(st.integers(0, 299), min_size=1, max_size=5)
COMPLETION = st.fixed_dictionaries(
    {"max_tokens": st.one_of(st.integers(1, 4), EDGES)},
    optional={
        **SHARED,
        "prompt": field(
            st.one_of(
                st.text(max_size=20),
                st.lists(st.text(max_size=10), min_size=1, max_size=3),
                TOKEN_IDS,
                st.lists(TOKEN_IDS, min_size=1, max_size=2),
            )
        ),
        "echo": field(st.booleans()),
    },
)
MESSAGE = st.fixed_dictionaries(
    {"role": field(st.sampled_from(["user", "system", "assistant"]))},
    optional={
        "content": field(
            st.text(max_size=20)
            | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=5)}))
        ),
        "name": JUNK,
    },
)
CHAT = st.fixed_dictionaries(
    {"max_tokens": st.one_of(st.integers(1, 4), EDGES)},
    optional={**SHARED, "messages": field(st.lists(MESSAGE, min_size=1, max_size=3))},
)


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    case=st.one_of(
        st.tuples(st.just("/v1/completions"), COMPLETION), st.tuples(st.just("/v1/chat/completions"), CHAT)
    )
)
async def test_hostile_bodies_are_answered_or_refused_never_5xx(
    served: Served, case: tuple[str, Any]
) -> None:
    path, body = case
    async with aiohttp.ClientSession() as s, s.post(served.gpu_url + path, json=body) as r:
        text = await r.text()
        assert r.status in (200, 400, 404), (r.status, text)
        if r.status == 200:
            if body.get("stream") is True:
                assert text.endswith("data: [DONE]\n\n") and '"finish_reason":"' in text, text
            else:
                answer = json.loads(text)
                assert all(c["finish_reason"] in ("stop", "length") for c in answer["choices"])
            return
        error = json.loads(text)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert (r.status == 404) == (error["code"] == "model_not_found")
