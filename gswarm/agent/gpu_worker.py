"""The worker process that holds model weights resident on one device and serves them.

Started by the agent as `python -m gswarm.agent.gpu_worker --device cuda:0|cpu`, one per GPU
(a simulated GPU uses `cpu`: host memory, the same code path). It speaks JSON lines on
stdin/stdout with the agent:

    -> {"id": 1, "cmd": "load", "model": "m", "dir": "/dram/m", "files": ["model.safetensors"]}
    <- {"event": "progress", "id": 1, "done": 1048576, "total": 4194304}
    <- {"id": 1, "ok": true, "bytes": 4194304}
    -> {"id": 2, "cmd": "serve", "service": "m@n:gpu0", "model": "m", "dir": "/dram/m", "port": 8080,
        "names": ["m", "alias"], "max_model_len": null, "max_waiting": 256}
    -> {"id": 3, "cmd": "unserve", "service": "m@n:gpu0"} / "unload" / "status" / "exit"
    -> {"id": 4, "cmd": "log", "path": "/disk/.gswarm-logs/m@n_disk.log"}   (stderr goes there)

Everything else it prints goes to stderr (the agent's log file for it). Needs torch and
safetensors (extra `gswarm[gpu]`); serving needs transformers (extra `gswarm[serve]`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from typing import Any

log = logging.getLogger("gswarm.gpu_worker")


class Worker:
    """Resident models and the servers over them."""

    def __init__(self, device: str, resident: bool = False) -> None:
        self.device = device
        self.resident = resident
        self.models: dict[str, dict[str, Any]] = {}
        self.sizes: dict[str, int] = {}
        self.dirs: dict[str, str] = {}
        self.servers: dict[str, Any] = {}
        self.warm: asyncio.Task[None] | None = None
        self._out = sys.stdout.buffer
        self._lock = asyncio.Lock()

    def send(self, msg: dict[str, Any]) -> None:
        self._out.write(json.dumps(msg).encode() + b"\n")
        self._out.flush()

    def _load(self, req_id: int, model_dir: str, files: list[str]) -> tuple[dict[str, Any], int]:
        import os

        from gswarm.agent.weights import WeightLoader

        paths = [os.path.join(model_dir, f) for f in files]
        total = sum(os.path.getsize(p) for p in paths)
        last = 0.0

        def progress(done: int) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last > 0.2:
                last = now
                self.send({"event": "progress", "id": req_id, "done": min(done, total), "total": total})

        if self.device == "cpu" and not self.resident:
            # Serving from a disk/dram copy: the tensors map that file, no copy is held.
            tensors = _map_files(paths)
        else:
            # One device buffer per file, streamed through staging buffers (gswarm.agent.weights);
            # a simulated GPU ("cpu", resident) runs the same path into host memory it owns.
            tensors = WeightLoader(self.device).load(paths, progress)
        resident = sum(t.numel() * t.element_size() for t in tensors.values())
        return tensors, resident

    async def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "load":
            model = req["model"]
            if model in self.models:
                return {"bytes": self.sizes[model], "already": True}
            t0 = time.monotonic()
            tensors, size = await asyncio.to_thread(self._load, req["id"], req["dir"], req["files"])
            self.models[model], self.sizes[model], self.dirs[model] = tensors, size, req["dir"]
            log.info("loaded %s from %s: %d bytes in %.2f s", model, req["dir"], size, time.monotonic() - t0)
            return {"bytes": size}
        if cmd == "unload":
            model = req["model"]
            for sid in [s for s, srv in self.servers.items() if srv.name == model]:
                await self.servers.pop(sid).stop()
            freed = self.sizes.pop(model, 0)
            self.models.pop(model, None)
            self.dirs.pop(model, None)
            await asyncio.to_thread(self._free)
            log.info("unloaded %s: %d bytes freed", model, freed)
            return {"freed": freed}
        if cmd == "serve":
            if self.warm is not None:
                await self.warm  # one import of transformers at a time: it is not thread-safe
            from gswarm.agent.builtin_server import BuiltinServer, build_model

            sid, model = req["service"], req["model"]
            if sid in self.servers:
                return {"already": True}
            if model not in self.models:
                raise LookupError(f"{model} is not resident on {self.device}")
            lm, tokenizer = await asyncio.to_thread(build_model, req["dir"], self.models[model], self.device)
            names = req.get("names") or [model]
            server = BuiltinServer(
                model,
                names,
                lm,
                tokenizer,
                self.device,
                req.get("max_model_len"),
                req.get("max_waiting", 256),
            )
            await server.start(req.get("host", "127.0.0.1"), int(req["port"]))
            self.servers[sid] = server
            host = req.get("host", "127.0.0.1")
            log.info("serving %s on %s port %s (service %s)", model, host, req["port"], sid)
            return {"serving": sid}
        if cmd == "unserve":
            server = self.servers.pop(req["service"], None)
            if server is not None:
                await server.stop()
                log.info("stopped service %s", req["service"])
            return {"stopped": server is not None}
        if cmd == "log":
            await asyncio.to_thread(_redirect_stderr, req["path"])
            return {"log": req["path"]}
        if cmd == "status":
            return {"models": self.sizes, "services": sorted(self.servers)}
        raise ValueError(f"unknown command {cmd!r}")

    def _free(self) -> None:
        import gc

        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 20)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        self.send({"event": "ready", "device": self.device})
        # Importing transformers takes seconds; do it now, off the loop, not in the first serve.
        self.warm = asyncio.create_task(asyncio.to_thread(_preimport))
        tasks: set[asyncio.Task[None]] = set()
        while True:
            line = await reader.readline()
            if not line:
                break
            req = json.loads(line)
            if req.get("cmd") == "exit":
                break
            task = asyncio.create_task(self._answer(req))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        for server in list(self.servers.values()):
            await server.stop()
        await asyncio.gather(self.warm, return_exceptions=True)

    async def _answer(self, req: dict[str, Any]) -> None:
        try:
            async with self._lock:
                result = await self.handle(req)
            self.send({"id": req.get("id"), "ok": True, **result})
        except Exception as exc:
            code = "insufficient_space" if "out of memory" in str(exc).lower() else "worker_error"
            if code == "insufficient_space":  # the GPU is full: expected, one line
                log.warning("command %s failed: %s", req.get("cmd"), exc)
            else:
                log.exception("command %s failed", req.get("cmd"))
            self.send(
                {"id": req.get("id"), "ok": False, "code": code, "error": f"{type(exc).__name__}: {exc}"}
            )


def _map_files(paths: list[str]) -> dict[str, Any]:
    """The tensors of safetensors files `paths`, mapped from the files (CPU, nothing copied)."""
    from safetensors import safe_open

    tensors: dict[str, Any] = {}
    for path in paths:
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                tensors[key] = f.get_tensor(key)
    return tensors


def _redirect_stderr(path: str) -> None:
    """Send this process's stderr (its log: Python's and the libraries' own output) to `path`."""
    import os

    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 2)
    finally:
        os.close(fd)


def _preimport() -> None:
    try:
        import transformers  # noqa: F401
        from transformers import AutoModelForCausalLM  # noqa: F401
    except ImportError:
        pass  # no serve extra: this worker only holds weights


def main() -> None:
    """Entry point of the worker process."""
    parser = argparse.ArgumentParser(description="gswarm model worker (one per GPU)")
    parser.add_argument("--device", default="cpu", help="cuda:N or cpu")
    parser.add_argument(
        "--resident",
        action="store_true",
        help="load CPU tensors into memory of its own, not mapped from the file (simulated GPU)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    try:
        import torch  # noqa: F401
    except ImportError:
        print(
            json.dumps({"event": "fatal", "error": "torch is not installed: pip install 'gswarm[gpu]'"}),
            flush=True,
        )
        sys.exit(3)
    asyncio.run(Worker(args.device, args.resident).run())


if __name__ == "__main__":
    main()
