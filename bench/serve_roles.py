"""Subprocess roles of bench/serve.py: everything that imports torch runs here, each role in a
fresh process, so that the benchmark's own process never imports torch.

    python bench/serve_roles.py ROLE ARGS...   -> one JSON line on stdout

`_make OUT SIZE` writes a random Llama checkpoint (one safetensors file) and a BPE tokenizer;
`_anchor PATH cpu|cuda|cpu-to-cuda` times `safetensors.torch.load_file` alone (on the CPU also
reading every weight once, and one plain copy of the file; cpu-to-cuda: onto the CPU, then
`.to("cuda")` per tensor); `_phases DIR` replays a CPU worker's steps one by
one (it prints "ready" once torch is imported, so the parent can time process start + import);
`_h2d NBYTES` measures torch's pinned and pageable host-to-device copy rates; `_cuda_check`
says whether this Python's torch sees a CUDA device; `_generate DIR TOKENS REQUESTS LEVELS` is the
anchor of serving throughput: the model driven directly with transformers `generate` in this one
process (greedy, `TOKENS` new tokens; for each level of N clients, `REQUESTS` calls with a batch of N
prompts), tokens counted as the builtin server counts them (up to and with the first EOS), the
calls made from a thread of their own as the builtin server makes them (on a busy 2-core VM,
`generate` on a process's main thread ran several times slower than on another thread).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from measure import gbps, read_rate

PROMPT = "hello world"
SIZES: dict[str, dict[str, Any]] = {
    "small": {"hidden": 256, "intermediate": 688, "layers": 4, "heads": 4, "dtype": "float32"},
    "medium": {"hidden": 1024, "intermediate": 2816, "layers": 8, "heads": 16, "dtype": "float32"},
    "large": {"hidden": 2048, "intermediate": 5632, "layers": 16, "heads": 16, "dtype": "bfloat16"},
}


def role_make(out: str, size: str) -> dict[str, Any]:
    """Write a random Llama checkpoint (one safetensors file) and a BPE tokenizer into `out`."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import (  # type: ignore[import-not-found, unused-ignore]
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        trainers,
    )
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    spec = SIZES[size]
    os.makedirs(out, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = "the quick brown fox jumps over the lazy dog; hello world, serve me a completion"
    tok.train_from_iterator([corpus] * 50, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=spec["hidden"],
        intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["heads"],
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
    )
    dtype = getattr(torch, spec["dtype"])
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, t in skeleton.state_dict().items():
        if t.dim() == 1:  # norms
            tensors[name] = torch.ones(t.shape, dtype=dtype)
        else:
            tensors[name] = (torch.randn(t.shape, generator=gen) * 0.02).to(dtype)
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    config.dtype = spec["dtype"]
    config.save_pretrained(out)
    fast.save_pretrained(out)
    return {
        **spec,
        "vocab": len(fast),
        "params": sum(t.numel() for t in tensors.values()),
        "file_bytes": os.path.getsize(os.path.join(out, "model.safetensors")),
    }


def role_anchor(path: str, device: str) -> dict[str, Any]:
    """Time `safetensors.torch.load_file(path, device)` alone (imports and CUDA init excluded);
    `device` "cpu-to-cuda": `load_file(path, device="cpu")` then `.to("cuda")` per tensor."""
    import torch
    from safetensors.torch import load_file

    cuda = device in ("cuda", "cpu-to-cuda")
    if cuda:
        torch.cuda.init()
        torch.empty(1, device="cuda")
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    if device == "cpu-to-cuda":
        tensors = {k: t.to("cuda") for k, t in load_file(path, device="cpu").items()}
    else:
        tensors = load_file(path, device=device)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds, "bytes": sum(t.numel() * t.element_size() for t in tensors.values())}
    if device == "cpu":
        # CPU tensors from safetensors may be views of a file mapping, faulted in on first use:
        # time reading every weight once, and one real copy of the file into memory.
        torch.ones(16).sum()  # the first op's one-time setup stays off the clock
        t0 = time.perf_counter()
        for t in tensors.values():
            t.sum()
        out["touch_seconds"] = time.perf_counter() - t0
        out["copy_seconds"], out["copy_bytes"] = read_rate(Path(path))
    return out


def role_phases(model_dir: str) -> dict[str, Any]:
    """Replay a CPU worker's steps (load, build, tokenizer, generate), each timed."""
    import importlib

    import torch

    print("ready", flush=True)  # the parent times process start + `import torch` up to here
    from safetensors import safe_open

    times: dict[str, float] = {}
    t0 = time.perf_counter()
    tensors = {}
    with safe_open(os.path.join(model_dir, "model.safetensors"), framework="pt", device="cpu") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            tensors[key] = f.get_tensor(key)
    times["weight load (safe_open, as gpu_worker._load)"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    from transformers import AutoConfig, AutoTokenizer

    model_type = AutoConfig.from_pretrained(model_dir).model_type
    importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    times["import transformers + modeling module"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    AutoTokenizer.from_pretrained(model_dir)
    times["tokenizer load (first)"] = time.perf_counter() - t0

    from gswarm.agent.builtin_server import build_model

    t0 = time.perf_counter()
    model, tokenizer = build_model(model_dir, tensors, "cpu")
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    AutoTokenizer.from_pretrained(model_dir)
    tok_again = time.perf_counter() - t0
    times["build_model without its tokenizer load (skeleton, assign, rotary)"] = build - tok_again
    times["(build_model's own tokenizer load, second in this process)"] = tok_again

    def generate() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            enc = tokenizer(PROMPT, return_tensors="pt")
            model.generate(**enc, max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        return time.perf_counter() - t

    times["first generate, 1 token"] = generate()
    times["(second generate, 1 token)"] = generate()
    return times


def role_h2d(nbytes: str) -> dict[str, Any]:
    """Host-to-device copy rates of torch: pinned and pageable source, best of 5 after a warm-up."""
    import torch

    n = int(nbytes)
    dst = torch.empty(n, dtype=torch.uint8, device="cuda")
    rates: dict[str, float] = {}
    for name, pinned in (("pinned_gbps", True), ("pageable_gbps", False)):
        src = torch.ones(n, dtype=torch.uint8).pin_memory() if pinned else torch.ones(n, dtype=torch.uint8)
        dst.copy_(src, non_blocking=pinned)
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=pinned)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        rates[name] = gbps(n, best)
        del src
    return {**rates, "bytes": n}


def role_generate(model_dir: str, max_tokens: str, requests: str, levels: str) -> dict[str, Any]:
    """Tokens/s of transformers `generate` on the model, one process, per level of clients."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id

    def generate(batch: int) -> int:
        enc = tokenizer([PROMPT] * batch, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=int(max_tokens), do_sample=False, pad_token_id=pad)
        tokens = 0
        for row in out[:, enc["input_ids"].shape[1] :].tolist():
            tokens += row.index(eos) + 1 if eos in row else len(row)
        return tokens

    def measure() -> dict[str, Any]:
        for _ in range(2):  # a fresh process: its first calls set up threads and the allocator
            generate(1)
        out: dict[str, Any] = {"levels": [], "threads": torch.get_num_threads()}
        for n in (int(x) for x in levels.split(",")):
            out["levels"].append(level(n))
        return out

    def level(n: int) -> dict[str, Any]:
        generate(n)  # warm-up: the first call of a shape allocates
        latencies = []
        tokens = 0
        t0 = time.perf_counter()
        for _ in range(int(requests)):
            t = time.perf_counter()
            tokens += generate(n)
            latencies.append(time.perf_counter() - t)
        seconds = time.perf_counter() - t0
        return {"clients": n, "requests": n * int(requests), "tokens": tokens, "seconds": seconds,
                "latencies": latencies}  # fmt: skip

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(measure).result()


def role_cuda_check() -> dict[str, Any]:
    """Whether this Python's torch sees a CUDA device."""
    import torch

    ok = bool(torch.cuda.is_available())
    return {"available": ok, "torch": torch.__version__, "name": torch.cuda.get_device_name(0) if ok else ""}


ROLES: dict[str, Callable[..., dict[str, Any]]] = {
    "_make": role_make,
    "_anchor": role_anchor,
    "_phases": role_phases,
    "_h2d": role_h2d,
    "_cuda_check": role_cuda_check,
    "_generate": role_generate,
}


if __name__ == "__main__":
    print(json.dumps(ROLES[sys.argv[1]](*sys.argv[2:])), flush=True)
