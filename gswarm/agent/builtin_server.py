"""The builtin serving backend: an OpenAI-compatible HTTP server (`/v1/models`,
`/v1/completions`, `/v1/chat/completions`, streaming or not, `/health`) over a transformers
model whose weights are already resident (in GPU memory, or host memory for the CPU and
simulated GPUs). It runs inside the worker process that holds the weights.

Requests are queued, not batched: one request generates at a time, in a thread of its own, in
the order they arrived (its `n` choices of one prompt are one batch); the others wait their
turn, up to `max_waiting` of them (256 unless the serve config says otherwise), beyond which a
request is answered 429 (OpenAI's "overloaded"). Tokens stream as they are generated. Bodies
are the Structs of `openai_api`; every error is OpenAI's error object.

Needs the `serve` extra (torch, transformers).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web

from gswarm.agent.openai_api import (
    ApiError,
    ChatChoice,
    ChatChunk,
    ChatChunkChoice,
    ChatCompletion,
    ChatMessage,
    ChatRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Delta,
    FinishReason,
    ModelCard,
    ModelList,
    Sampling,
    Usage,
    decode_request,
)

log = logging.getLogger(__name__)

COMPLETION_DEFAULT_TOKENS = 16
"""`max_tokens` of a completion that gives none (OpenAI's and vLLM's default)."""

_encoder = msgspec.json.Encoder()


def build_model(model_dir: str, tensors: dict[str, Any], device: str) -> tuple[Any, Any]:
    """A transformers causal LM and tokenizer over tensors already in memory (no copy): the
    skeleton is built on the meta device and the resident tensors assigned into it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    # Buffers computed at construction (rotary tables) are not in the checkpoint: rebuild the
    # modules that own them, on the real device.
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            try:
                fresh = type(module)(config=model.config, device=device)
            except TypeError:
                fresh = type(module)(model.config).to(device)
            setattr(parent, attr, fresh)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} weights, e.g. {missing[0]}")
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    try:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        pass  # no generation_config.json: the defaults built from config.json stay
    return model, tokenizer


def context_length(config: Any) -> int:
    """The most positions a model's config allows (2048 when it says nothing)."""
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


@dataclass
class Params:
    """How one request samples."""

    temperature: float
    top_p: float
    top_k: int
    presence: float
    frequency: float
    seed: int | None


@dataclass
class Job:
    """One prompt's `n` choices: choice indexes `first` to `first + n - 1`."""

    ids: list[int]
    n: int
    limit: int
    first: int


@dataclass
class Piece:
    """Text a choice gained; `finish` set on its last piece, with its token count."""

    index: int
    text: str
    finish: FinishReason = None
    tokens: int = 0


@dataclass
class _Row:
    """One choice being generated: incremental detokenisation and stop sequences."""

    ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    prefix: int = 0
    read: int = 0
    done: bool = False


class BuiltinServer:
    """One served model on one port, answering to its served names."""

    def __init__(
        self,
        name: str,
        names: list[str],
        model: Any,
        tokenizer: Any,
        device: str,
        max_model_len: int | None = None,
        max_waiting: int = 256,
    ) -> None:
        self.name = name
        self.names = names or [name]
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        own = context_length(model.config)
        self.max_model_len = min(own, max_model_len) if max_model_len else own
        self.vocab = int(model.config.vocab_size)
        gen = getattr(model, "generation_config", None)
        eos: set[int] = set()
        for source in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
            if isinstance(source, int):
                eos.add(source)
            elif isinstance(source, list):
                eos.update(x for x in source if isinstance(x, int))
        self.eos = eos
        self.defaults = _sampling_defaults(gen)
        # transformers renamed `past_key_values` to `cache` (5.x) and `num_logits_to_keep` to
        # `logits_to_keep` (4.50): use what this version takes.
        accepted = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in accepted else "past_key_values"
        keep = [k for k in ("logits_to_keep", "num_logits_to_keep") if k in accepted]
        self._keep_arg = keep[0] if keep else None
        self.requests = 0
        self.waiting = 0
        self.max_waiting = max_waiting
        self._turn = asyncio.Lock()
        self._tok_lock = threading.Lock()  # fast tokenizers are not safe across threads
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="generate")
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> None:
        """Listen on host:port."""
        app = web.Application(client_max_size=4 << 20, middlewares=[_errors])
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{name:.+}", self._model)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------- routes

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "model": self.name, "device": self.device})

    def _card(self, name: str) -> ModelCard:
        return ModelCard(id=name, max_model_len=self.max_model_len, root=self.name)

    async def _models(self, request: web.Request) -> web.Response:
        return _json(ModelList([self._card(n) for n in self.names]))

    async def _model(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self._check_model(name)
        return _json(self._card(name))

    def _check_model(self, model: str | None) -> str:
        """The name to report: the one asked for if served, the first served name if none."""
        if model is None:
            return self.names[0]
        if model not in self.names:
            raise ApiError(
                404,
                f"The model `{model}` does not exist: this server serves {', '.join(self.names)}.",
                param="model",
                code="model_not_found",
            )
        return model

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        req = decode_request(await request.read(), CompletionRequest, "prompt")
        model = self._check_model(req.model)
        prompts = req.prompts(self.vocab)
        ids = await asyncio.to_thread(self._encode_prompts, prompts)
        jobs = self._jobs(ids, req, COMPLETION_DEFAULT_TOKENS, "prompt")
        echo = await asyncio.to_thread(self._echo, ids) if req.echo else None
        return await self._answer(request, req, jobs, model, chat=False, echo=echo)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        req = decode_request(await request.read(), ChatRequest, "messages")
        model = self._check_model(req.model)
        ids = await asyncio.to_thread(self._encode_chat, req.plain_messages())
        jobs = self._jobs([ids], req, None, "messages")
        return await self._answer(request, req, jobs, model, chat=True, echo=None)

    # ---------------------------------------------------------------- prompts

    def _encode_prompts(self, prompts: list[str | list[int]]) -> list[list[int]]:
        out = []
        for p in prompts:
            if isinstance(p, str):
                with self._tok_lock:
                    ids = list(self.tokenizer(p)["input_ids"])
                out.append(ids or self._start())
            else:
                out.append(p)
        return out

    def _encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        with self._tok_lock:
            if getattr(self.tokenizer, "chat_template", None):
                try:
                    text = self.tokenizer.apply_chat_template(
                        messages, tokenize=False, add_generation_prompt=True
                    )
                except Exception as exc:  # the template's own checks (roles, order) raise anything
                    raise ApiError(
                        400, f"the chat template refused the messages: {exc}", param="messages"
                    ) from None
            else:
                text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
            # The template writes the special tokens it wants (vLLM adds none for chat).
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return ids or self._start()

    def _start(self) -> list[int]:
        """What an empty prompt reads: the start (or end) of text token."""
        for tok in (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id):
            if isinstance(tok, int):
                return [tok]
        raise ApiError(400, "the prompt is empty", param="prompt")

    def _echo(self, ids: list[list[int]]) -> list[str]:
        with self._tok_lock:
            return [self.tokenizer.decode(p, skip_special_tokens=True) for p in ids]

    def _jobs(self, prompts: list[list[int]], req: Sampling, default: int | None, param: str) -> list[Job]:
        """One job per prompt, each within the model's context, or a 400 that says why."""
        asked = req.token_limit()
        limit_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        jobs = []
        for i, ids in enumerate(prompts):
            n = len(ids)
            limit = asked if asked is not None else default
            where = "messages" if param == "messages" else "prompt"
            if limit is None:
                if n >= self.max_model_len:
                    raise ApiError(
                        400,
                        f"This model's maximum context length is {self.max_model_len} tokens. However, "
                        f"your {where} has {n} tokens. Please reduce the length of the {where}.",
                        param=param,
                        code="context_length_exceeded",
                    )
                limit = self.max_model_len - n
            elif n + limit > self.max_model_len:
                raise ApiError(
                    400,
                    f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                    f"requested {n + limit} tokens ({n} in the {where}, {limit} in the completion). "
                    f"Please reduce the length of the {where} or completion.",
                    param=limit_param if asked is not None else param,
                    code="context_length_exceeded",
                )
            jobs.append(Job(ids, req.n, limit, i * req.n))
        return jobs

    def _params(self, req: Sampling) -> Params:
        d = self.defaults
        top_k = req.top_k if req.top_k is not None else d.top_k
        return Params(
            temperature=req.temperature if req.temperature is not None else d.temperature,
            top_p=req.top_p if req.top_p is not None else d.top_p,
            top_k=max(top_k, 0),
            presence=req.presence_penalty,
            frequency=req.frequency_penalty,
            seed=req.seed,
        )

    # ---------------------------------------------------------------- answers

    async def _answer(
        self,
        request: web.Request,
        req: Sampling,
        jobs: list[Job],
        model: str,
        chat: bool,
        echo: list[str] | None,
    ) -> web.StreamResponse:
        self.requests += 1
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        prompt_tokens = sum(len(j.ids) for j in jobs)
        choices = sum(j.n for j in jobs)
        lead = [echo[i // req.n] if echo else "" for i in range(choices)]
        run = _Run(self, jobs, self._params(req), req.stops())
        await run.start()  # waits for this request's turn; 429 when too many wait
        try:
            if req.stream:
                return await self._stream(request, req, run, rid, created, model, chat, lead, prompt_tokens)
            texts = list(lead)
            finish: list[FinishReason] = [None] * choices
            tokens = 0
            async for piece in run:
                texts[piece.index] += piece.text
                if piece.finish is not None:
                    finish[piece.index] = piece.finish
                    tokens += piece.tokens
                if request.transport is None or request.transport.is_closing():
                    return web.Response(status=499)  # the client left: stop generating for nobody
        finally:
            run.cancel()
        usage = Usage(prompt_tokens, tokens, prompt_tokens + tokens)
        if chat:
            return _json(
                ChatCompletion(
                    rid,
                    created,
                    model,
                    [
                        ChatChoice(i, ChatMessage(t), f)
                        for i, (t, f) in enumerate(zip(texts, finish, strict=True))
                    ],
                    usage,
                )
            )
        return _json(
            Completion(
                rid,
                created,
                model,
                [CompletionChoice(i, t, f) for i, (t, f) in enumerate(zip(texts, finish, strict=True))],
                usage=usage,
            )
        )

    async def _stream(
        self,
        request: web.Request,
        req: Sampling,
        run: _Run,
        rid: str,
        created: int,
        model: str,
        chat: bool,
        lead: list[str],
        prompt_tokens: int,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)

        async def send(obj: Any) -> None:
            await resp.write(b"data: " + _encoder.encode(obj) + b"\n\n")

        def chunk(index: int, text: str, finish: FinishReason) -> Any:
            if chat:
                delta = Delta(content=text) if text or finish is None else Delta()
                return ChatChunk(rid, created, model, [ChatChunkChoice(index, delta, finish)])
            return Completion(rid, created, model, [CompletionChoice(index, text, finish)])

        tokens = 0
        try:
            for i, text in enumerate(lead):
                if chat:
                    first = Delta(role="assistant", content="")
                    await send(ChatChunk(rid, created, model, [ChatChunkChoice(i, first, None)]))
                elif text:
                    await send(chunk(i, text, None))
            try:
                async for piece in run:
                    if piece.finish is not None:
                        tokens += piece.tokens
                    if piece.text or piece.finish is not None:
                        await send(chunk(piece.index, piece.text, piece.finish))
            except ApiError as exc:  # the status is sent already: the error goes in the stream
                await send(exc.body())
            if req.stream_options is not None and req.stream_options.include_usage:
                usage = Usage(prompt_tokens, tokens, prompt_tokens + tokens)
                if chat:
                    await send(ChatChunk(rid, created, model, [], usage=usage))
                else:
                    await send(Completion(rid, created, model, [], usage=usage))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionError:
            pass  # the client left: the run is cancelled by the caller
        return resp

    # ---------------------------------------------------------------- generation (its thread)

    def generate(
        self, job: Job, p: Params, stops: list[str], emit: Callable[[Piece], None], cancel: threading.Event
    ) -> None:
        """Generate one job's choices, emitting text as it comes; stop early when cancelled."""
        import torch

        gen = torch.Generator(device=self.device)
        gen.manual_seed(p.seed if p.seed is not None else secrets.randbits(63))
        rows = [_Row() for _ in range(job.n)]
        penalties = p.presence != 0 or p.frequency != 0
        with torch.inference_mode():
            ids = torch.tensor([job.ids] * job.n, device=self.device)
            logits, cache = self._forward(ids, None)
            counts = torch.zeros_like(logits, dtype=torch.float32) if penalties else None
            while True:
                if cancel.is_set():
                    return
                nxt = _pick(torch, logits, p, gen, counts)
                for i, tok in enumerate(nxt.tolist()):
                    row = rows[i]
                    if not row.done:
                        piece = self._step(row, int(tok), job.limit, stops)
                        if piece is not None:
                            piece.index = job.first + i
                            emit(piece)
                if all(r.done for r in rows):
                    return
                if counts is not None:
                    counts.scatter_add_(1, nxt[:, None], torch.ones_like(nxt[:, None], dtype=torch.float32))
                logits, cache = self._forward(nxt[:, None], cache)

    def _forward(self, ids: Any, cache: Any) -> tuple[Any, Any]:
        """The last position's logits and the KV cache after reading `ids`."""
        kwargs: dict[str, Any] = {"input_ids": ids, "use_cache": True}
        if cache is not None:
            kwargs[self._cache_arg] = cache
        if self._keep_arg is not None:
            kwargs[self._keep_arg] = 1  # the prompt's other positions need no logits
        out = self.model(**kwargs)
        cache = getattr(out, "cache", None)
        return out.logits[:, -1, :], cache if cache is not None else out.past_key_values

    def _step(self, row: _Row, tok: int, limit: int, stops: list[str]) -> Piece | None:
        """One more token for a row: the text it may send now, and whether it is finished."""
        row.ids.append(tok)
        if tok in self.eos:
            row.done = True
            return Piece(0, row.text[row.sent :], "stop", len(row.ids))
        with self._tok_lock:
            before = self.tokenizer.decode(row.ids[row.prefix : row.read], skip_special_tokens=True)
            now = self.tokenizer.decode(row.ids[row.prefix :], skip_special_tokens=True)
        # A token may end inside a character: wait for the rest unless this is the last token.
        if len(now) > len(before) and (not now.endswith("\ufffd") or len(row.ids) >= limit):
            start = max(0, len(row.text) - max((len(s) for s in stops), default=0))
            row.text += now[len(before) :]
            row.prefix, row.read = row.read, len(row.ids)
            cut = min((i for i in (row.text.find(s, start) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                row.text = row.text[:cut]
                row.done = True
                return Piece(0, row.text[row.sent :] if cut >= row.sent else "", "stop", len(row.ids))
        if len(row.ids) >= limit:
            row.done = True
            return Piece(0, row.text[row.sent :], "length", len(row.ids))
        safe = len(row.text) - _held(row.text, stops)
        if safe > row.sent:
            text, row.sent = row.text[row.sent : safe], safe
            return Piece(0, text)
        return None


def _held(text: str, stops: list[str]) -> int:
    """How many characters at the end of `text` could begin a stop sequence (not sent yet)."""
    held = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:k]):
                held = k
                break
    return held


def _pick(torch: Any, logits: Any, p: Params, gen: Any, counts: Any) -> Any:
    """The next token of each row: greedy at temperature 0, else sampled (top-k, top-p)."""
    logits = logits.float()
    if counts is not None:
        logits = logits - p.frequency * counts - p.presence * (counts > 0).float()
    if p.temperature == 0:
        return logits.argmax(-1)
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1:
        ordered, index = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        ordered = ordered.masked_fill(probs.cumsum(-1) - probs > p.top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, index, ordered)
    return torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(-1)


def _sampling_defaults(gen: Any) -> Params:
    """The model's own sampling defaults (its generation_config.json, as vLLM reads them), else
    OpenAI's: temperature 1, top_p 1."""
    own: dict[str, Any] = {}
    if gen is not None:
        try:
            own = gen.to_diff_dict()
        except Exception:
            own = {}

    def num(key: str, default: float) -> float:
        value = own.get(key)
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else default

    return Params(num("temperature", 1.0), num("top_p", 1.0), int(num("top_k", 0)), 0.0, 0.0, None)


class _Run:
    """One request's generation: waits for its turn, runs its jobs in the generation thread,
    hands the pieces to the handler; cancelled when the handler leaves."""

    def __init__(self, server: BuiltinServer, jobs: list[Job], params: Params, stops: list[str]) -> None:
        self.server = server
        self.jobs = jobs
        self.params = params
        self.stops = stops
        self.cancelled = threading.Event()
        self.queue: asyncio.Queue[Piece | BaseException | None] = asyncio.Queue()

    async def start(self) -> None:
        """Wait for the turn (FIFO) and start generating; 429 when too many wait already."""
        s = self.server
        if s.waiting >= s.max_waiting:
            raise ApiError(
                429,
                f"The server is overloaded: {s.waiting} requests are waiting. Please retry later.",
                type="server_error",
                code="overloaded",
            )
        s.waiting += 1
        try:
            await s._turn.acquire()
        finally:
            s.waiting -= 1
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(s._pool, self._work, loop)
        except BaseException:
            s._turn.release()
            raise
        # The turn passes on when the thread has stopped, not when the handler leaves.
        future.add_done_callback(lambda _: s._turn.release())

    def _work(self, loop: asyncio.AbstractEventLoop) -> None:
        def emit(item: Piece | BaseException | None) -> None:
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, item)
            except RuntimeError:
                self.cancelled.set()  # the loop is closed: the worker is going away

        try:
            for job in self.jobs:
                self.server.generate(job, self.params, self.stops, emit, self.cancelled)
        except Exception as exc:
            log.exception("generation failed")
            emit(ApiError(500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error"))
        finally:
            emit(None)

    def cancel(self) -> None:
        """Stop generating (at the next token)."""
        self.cancelled.set()

    async def __aiter__(self) -> AsyncIterator[Piece]:
        while (item := await self.queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=_encoder.encode(obj), status=status, content_type="application/json")


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error as OpenAI's error object, never aiohttp's text pages."""
    try:
        return await handler(request)
    except ApiError as exc:
        return _json(exc.body(), exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = "invalid_request_error" if exc.status < 500 else "server_error"
        err = ApiError(
            exc.status,
            exc.reason if not exc.text or exc.text.startswith(str(exc.status)) else exc.text,
            type=kind,
        )
        return _json(err.body(), exc.status)
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception as exc:
        log.exception("%s %s failed", request.method, request.path)
        err = ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
        return _json(err.body(), 500)
