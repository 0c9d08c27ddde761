"""The builtin serving backend: an OpenAI-compatible HTTP server (`/v1/models`,
`/v1/completions`, `/v1/chat/completions` with streaming, `/health`) over a transformers model
whose weights are already resident (in GPU memory, or host memory for the CPU and simulated
GPUs). It runs inside the worker process that holds the weights; generation runs in a thread.

Needs the `serve` extra (torch, transformers).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import Any

from aiohttp import web


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
    return model, tokenizer


class BuiltinServer:
    """One served model on one port."""

    def __init__(self, name: str, model: Any, tokenizer: Any, device: str) -> None:
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self._lock = threading.Lock()
        self._runner: web.AppRunner | None = None
        self.requests = 0

    async def start(self, host: str, port: int) -> None:
        """Listen on host:port."""
        app = web.Application(client_max_size=4 << 20)
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
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

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "model": self.name, "device": self.device})

    async def _models(self, request: web.Request) -> web.Response:
        card = {"id": self.name, "object": "model", "created": 0, "owned_by": "gswarm"}
        return web.json_response({"object": "list", "data": [card]})

    def _generate(self, prompt: str, max_tokens: int, temperature: float) -> tuple[str, int, int]:
        import torch

        with self._lock, torch.no_grad():
            enc = self.tokenizer(prompt, return_tensors="pt").to(self.device)
            sample = temperature > 0
            kwargs: dict[str, Any] = {"max_new_tokens": max_tokens, "do_sample": sample}
            if sample:
                kwargs["temperature"] = temperature
            pad = self.tokenizer.pad_token_id
            kwargs["pad_token_id"] = pad if pad is not None else self.tokenizer.eos_token_id
            out = self.model.generate(**enc, **kwargs)
            new = out[0][enc["input_ids"].shape[1] :]
            return (
                self.tokenizer.decode(new, skip_special_tokens=True),
                int(enc["input_ids"].shape[1]),
                len(new),
            )

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError as exc:
            raise web.HTTPBadRequest(text=f'{{"error": {{"message": "malformed JSON: {exc}"}}}}') from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text='{"error": {"message": "expected a JSON object"}}')
        return body

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        prompt = body.get("prompt", "")
        if isinstance(prompt, list):
            prompt = prompt[0] if prompt else ""
        return await self._answer(request, str(prompt), body, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        messages = body.get("messages") or []
        if getattr(self.tokenizer, "chat_template", None):
            prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            prompt = "".join(f"{m.get('role')}: {m.get('content')}\n" for m in messages) + "assistant:"
        return await self._answer(request, prompt, body, chat=True)

    async def _answer(
        self, request: web.Request, prompt: str, body: dict[str, Any], chat: bool
    ) -> web.StreamResponse:
        max_tokens = int(body.get("max_tokens") or 16)
        temperature = float(body.get("temperature") or 0.0)
        self.requests += 1
        text, n_prompt, n_out = await asyncio.to_thread(
            self._generate, prompt, min(max_tokens, 4096), temperature
        )
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        usage = {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}
        kind = "chat.completion" if chat else "text_completion"
        if not body.get("stream"):
            choice: dict[str, Any] = {
                "index": 0,
                "finish_reason": "length" if n_out >= max_tokens else "stop",
            }
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            return web.json_response(
                {
                    "id": rid,
                    "object": kind,
                    "created": created,
                    "model": self.name,
                    "choices": [choice],
                    "usage": usage,
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        kind = "chat.completion.chunk" if chat else "text_completion"
        for piece in [text[i : i + 8] for i in range(0, len(text), 8)] or [""]:
            delta: dict[str, Any] = {"index": 0, "finish_reason": None}
            if chat:
                delta["delta"] = {"role": "assistant", "content": piece}
            else:
                delta["text"] = piece
            chunk = {"id": rid, "object": kind, "created": created, "model": self.name, "choices": [delta]}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
