"""Hostile input: every bad request is a 4xx with the documented error body, never a 5xx, a
stall or a traceback; job files and bodies are parsed within bounds (size, depth, aliases,
string lengths); aiohttp's own answers and the agent socket's failures keep to the contract."""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gswarm import PROTOCOL_VERSION
from gswarm.config import load_tokens
from gswarm.errors import InvalidWorkflow
from gswarm.head.app import HeadServer
from gswarm.workflow import MAX_DEPTH, parse
from tests.conftest import AgentRunner, Cli

pytestmark = pytest.mark.timeout(120)

JOB = {"name": "j", "actions": [{"action": "health_check", "node": "nowhere"}]}


def bomb(levels: int = 7, fanout: int = 9) -> str:
    """A "billion laughs" job: each level an anchored list of `fanout` aliases of the one before."""
    lines = ["name: bomb", "l0: &l0 [" + ", ".join(["lol"] * fanout) + "]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * fanout) + "]")
    lines += ["actions:", "  - action: health_check", "    node: n1", f"    description: *l{levels - 1}"]
    return "\n".join(lines) + "\n"


async def send(
    head: HeadServer,
    method: str,
    path: str,
    *,
    data: Any = None,
    json_body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """One request with the api token; the status and the JSON body (None when it is not JSON)."""
    hdrs = {"Authorization": f"Bearer {head.head.tokens.api_token}", **(headers or {})}
    if json_body is not None:
        data = json.dumps(json_body)
        hdrs.setdefault("Content-Type", "application/json")
    payload: Any = io.BytesIO(data.encode() if isinstance(data, str) else data) if data is not None else None
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, head.url + path, data=payload, headers=hdrs) as r,
    ):
        raw = await r.read()
    try:
        return r.status, json.loads(raw)
    except ValueError:
        return r.status, None


def assert_error(status: int, body: Any, expected: int | tuple[int, ...], code: str | None = None) -> None:
    """A 4xx with `{"error": {"code", "message", "details"}}`."""
    allowed = expected if isinstance(expected, tuple) else (expected,)
    assert status in allowed, (status, body)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert set(err) >= {"code", "message", "details"}, err
    assert isinstance(err["code"], str) and isinstance(err["message"], str)
    assert isinstance(err["details"], dict)
    if code is not None:
        assert err["code"] == code, err


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _deep(n: int) -> str:
    return '{"a":' * n + "1" + "}" * n


# ---------------------------------------------------------------- job files


def test_alias_bomb_is_refused_by_the_parser() -> None:
    text = bomb()
    assert len(text) < 500
    start = time.perf_counter()
    with pytest.raises(InvalidWorkflow) as exc:
        parse(text)
    assert time.perf_counter() - start < 0.1
    assert "aliases" in exc.value.message and exc.value.details["line"] == 3


def test_alias_bomb_leaves_a_head_process_unmoved(cli: Cli) -> None:
    proc, url = cli.start_head()
    tokens = load_tokens(cli.tmp_path / "state")
    assert tokens is not None
    headers = {"Authorization": f"Bearer {tokens.api_token}"}

    async def main() -> tuple[float, int, int]:
        async with aiohttp.ClientSession(headers=headers) as s:
            async with s.get(url + "/") as r:  # warm: the first request pays for imports
                assert r.status == 200
            before = rss_bytes(proc.p.pid)
            times = []
            for _ in range(3):
                start = time.perf_counter()
                async with s.post(url + "/jobs", data=bomb()) as r:
                    body = await r.json()
                times.append(time.perf_counter() - start)
                assert_error(r.status, body, 422, "invalid_workflow")
                assert "aliases" in body["error"]["message"]
            after = rss_bytes(proc.p.pid)
            # The head still takes mutations (the bomb once killed the SQLite writer).
            async with s.post(url + "/models", json={"name": "m", "type": "llm"}) as r:
                assert r.status == 201
        return min(times), before, after

    best, before, after = asyncio.run(main())
    print(f"bomb: best {best * 1000:.1f} ms, head RSS {before >> 20} MiB -> {after >> 20} MiB")
    assert best < 0.1
    assert after - before < 8 << 20


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("[" * 200_000, "nest"),
        ("{" * 200_000, "JSON does not parse"),
        ('{"a":' * 5000 + "1" + "}" * 5000, "nest"),
        ('{"name": "j", "actions": ' + "[" * 100 + "]" * 100 + "}", "nest"),
        ("".join(f"{'  ' * i}k:\n" for i in range(500)), "nest"),
        ("name: j\nactions:\n" + "".join(f"{'  ' * i}- \n" for i in range(1, 500)), "nest"),
        ("name: " + "x" * 70_000 + "\nactions: []\n", "characters"),
        ("name: j\nx: " + "9" * 5000 + "\nactions: []\n", "does not parse"),
        ('{"name": "j", "timeout": NaN, "actions": []}', "does not parse"),
        ('{"name": "j", "x": ' + "9" * 5000 + ', "actions": []}', "does not parse"),
        ("name: j\nactions: [{? [a, b] : 1}]\n", ""),
        ("name: !!python/object:os.system x\nactions: []\n", "YAML does not parse"),
        ("name: j\nx: !!binary " + "A" * 100 + "\nactions: []\n", ""),
    ],
)
async def test_hostile_job_files_are_422(head: HeadServer, text: str, why: str) -> None:
    start = time.perf_counter()
    status, body = await send(head, "POST", "/jobs", data=text)
    assert time.perf_counter() - start < 5
    assert_error(status, body, 422, "invalid_workflow")
    assert why in body["error"]["message"]


async def test_job_files_up_to_8_mib_are_taken(head: HeadServer) -> None:
    text = json.dumps(JOB)
    padded = text + " " * (3 << 20)  # between aiohttp's 1 MiB default and the route's 8 MiB
    status, body = await send(head, "POST", "/jobs", data=padded)
    assert status == 202, body
    yaml_padded = "name: j\nactions:\n  - action: health_check\n    node: nowhere\n" + "#" * (2 << 20)
    status, body = await send(head, "POST", "/jobs", data=yaml_padded)
    assert status == 202, body
    over = text + " " * (8 << 20)
    status, body = await send(head, "POST", "/jobs", data=over)
    assert_error(status, body, 413, "payload_too_large")

    token = head.head.tokens.api_token

    async def chunked() -> Any:  # no Content-Length: the limit holds while reading
        for _ in range(9):
            yield b" " * (1 << 20)

    async with (
        aiohttp.ClientSession() as s,
        s.post(head.url + "/jobs", data=chunked(), headers={"Authorization": f"Bearer {token}"}) as r,
    ):
        status, body = r.status, await r.json()
    assert_error(status, body, 413, "payload_too_large")


async def test_job_check_of_an_endless_file_stops_at_the_limit(cli: Cli) -> None:
    start = time.perf_counter()
    result = await cli.ainvoke("job", "/dev/zero", "--check")
    assert result.returncode != 0
    assert "limit" in result.stderr and "Traceback" not in result.stderr
    assert time.perf_counter() - start < 10


def test_job_fields_are_type_checked_at_validation() -> None:
    text = """
name: typed
actions:
  - action: health_check
    node: [1, 2]
  - action: health_check
    node: "bad node!"
  - action: download
    model: m
    source: hf://org/m
    target: n1:disk
    include: "*.safetensors"
    exclude: [1]
  - action: [download]
    model: m
  - action: health_check
    node: n1
    timeout: .nan
  - action: health_check
    node: n1
    timeout: .inf
  - id: LONG_ID
    action: health_check
    node: n1
  - action: serve
    model: m
    device: n1:gpu0
    port: 8000
    config: {a: {b: {c: {d: {e: {f: {g: {h: {i: 1}}}}}}}}}
"""
    with pytest.raises(InvalidWorkflow) as exc:
        parse(text.replace("LONG_ID", "x" * 200))
    problems = {(p["action"].split(" ")[1], p["field"]) for p in exc.value.details["errors"]}
    assert {
        ("1", "node"),
        ("2", "node"),
        ("3", "include"),
        ("3", "exclude"),
        ("4", "action"),
        ("5", "timeout"),
        ("6", "timeout"),
        ("7", "id"),
        ("8", "config"),
    } <= problems, problems


def test_depth_bound_matches_the_documented_one() -> None:
    # The job (1), its actions (2), an action (3), then maps under the action's description.
    head = "name: j\nactions:\n  - action: health_check\n    node: n1\n    description:\n"

    def nested(levels: int) -> str:
        return head + "".join(f"{'  ' * (i + 3)}k{i}:\n" for i in range(levels - 3))

    parse(nested(MAX_DEPTH))
    with pytest.raises(InvalidWorkflow, match="nested deeper"):
        parse(nested(MAX_DEPTH + 1))


# ---------------------------------------------------------------- REST bodies


MODEL = {"name": "m", "type": "llm"}
DL = {"model_name": "m", "source_url": "hf://o/m", "target_device": "n:disk"}
COPY = {"model_name": "m", "source_device": "n:disk", "target_device": "n:dram"}
SERVE = {"model_name": "m", "device": "n:gpu0", "port": 80}
REPL = {"model_name": "m", "targets": ["n:disk"]}
NESTED_9 = {"a": [[[[[[[[1]]]]]]]]}


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/models", '{"name": "m", "type": "llm", "metadata": ' + _deep(2000) + "}", ""),
        ("/models", {**MODEL, "metadata": NESTED_9}, "metadata"),
        ("/models", {**MODEL, "metadata": {"a": "x" * 70_000}}, "metadata"),
        ("/models", {**MODEL, "metadata": {str(i): "x" * 1000 for i in range(100)}}, ""),
        ("/models", {**MODEL, "type": "t" * 65}, "type"),
        ("/models", {**MODEL, "source_url": "h" * 5000}, "source_url"),
        ("/nodes", {"node_id": "n1", "gpu_count": -1}, "gpu_count"),
        ("/nodes", {"node_id": "n1", "gpu_count": 2**70}, "gpu_count"),
        ("/nodes", {"node_id": "n1", "gpu_count": 1025}, "gpu_count"),
        ("/nodes", {"node_id": "n1", "hostname": "h" * 7_000_000}, ""),
        ("/download", {**DL, "timeout": -1}, "timeout"),
        ("/download", {**DL, "timeout": 0}, "timeout"),
        ("/download", {**DL, "timeout": 1e12}, "timeout"),
        ("/download", {**DL, "bandwidth_limit": -1}, "bandwidth_limit"),
        ("/download", {**DL, "bandwidth_limit": 1}, "bandwidth_limit"),
        ("/download", {**DL, "bandwidth_limit": 2**41}, "bandwidth_limit"),
        ("/download", {**DL, "source_url": "file://relative/x"}, "source_url"),
        ("/download", {**DL, "source_url": "http://[::1/x"}, "source_url"),
        ("/download", {**DL, "allow_patterns": ["*"] * 2000}, "allow_patterns"),
        ("/copy", {**COPY, "bandwidth_limit": 0}, "bandwidth_limit"),
        ("/load", {"model_name": "m", "device": "n:gpu0", "timeout": -5}, "timeout"),
        ("/serve", {**SERVE, "port": 0}, "port"),
        ("/serve", {**SERVE, "port": 70000}, "port"),
        ("/serve", {**SERVE, "config": NESTED_9}, "config"),
        ("/replicate", {**REPL, "max_fanout": 0}, "max_fanout"),
        ("/replicate", {**REPL, "max_fanout": 65}, "max_fanout"),
        ("/replicate", {**REPL, "timeout": -1}, "timeout"),
        ("/replicate", {**REPL, "targets": ["n:disk"] * 2000}, "targets"),
    ],
)
async def test_out_of_bounds_bodies_are_400(head: HeadServer, path: str, body: Any, field: str) -> None:
    if isinstance(body, str):  # too deep for Python's json module to write
        status, answer = await send(
            head, "POST", path, data=body, headers={"Content-Type": "application/json"}
        )
    else:
        status, answer = await send(head, "POST", path, json_body=body)
    assert_error(status, answer, (400, 413))
    if field:
        assert answer["error"]["details"].get("field", "").startswith(field), answer


async def test_deep_metadata_says_what_is_wrong(head: HeadServer) -> None:
    status, body = await send(
        head, "POST", "/models", json_body={"name": "m", "type": "llm", "metadata": {"a": [[[[[[[[1]]]]]]]]}}
    )
    assert_error(status, body, 400, "invalid_field")
    assert "nested too deeply" in body["error"]["message"]
    status, body = await send(
        head, "POST", "/models", json_body={"name": "m", "type": "llm", "metadata": {"a": [[[[[[[1]]]]]]]}}
    )
    assert status == 201, body


# ---------------------------------------------------------------- query parameters


@pytest.mark.parametrize(
    "path",
    [
        "/events?since=-99999999999999999999",
        "/events?since=99999999999999999999",
        "/events?since=-2",
        "/events?since=abc",
        "/events?limit=-1",
        "/events?limit=0",
        "/events?limit=1e3",
        "/ops?limit=-1",
        "/ops?limit=x",
        "/jobs?limit=-1",
        "/logs/m/n:gpu0?lines=-1",
    ],
)
async def test_bad_query_parameters_are_400(head: HeadServer, path: str) -> None:
    status, body = await send(head, "GET", path)
    assert_error(status, body, 400, "invalid_query")
    assert body["error"]["details"]["field"] in path


async def test_bad_wait_timeouts_are_400(head: HeadServer, agents: AgentRunner) -> None:
    await agents.start(head, "n1")
    status, op = await send(head, "POST", "/nodes/n1/probe")
    assert status == 202, op
    for timeout in ("nan", "-1", "inf", "1e400", "x"):
        status, body = await send(head, "GET", f"/ops/{op['op_id']}?wait=true&timeout={timeout}")
        assert_error(status, body, 400, "invalid_query")
    status, body = await send(head, "GET", f"/ops/{op['op_id']}?wait=true&timeout=30")
    assert status == 200 and body["state"] == "succeeded", body


async def test_in_range_query_parameters_still_work(head: HeadServer) -> None:
    for path in ("/events?since=-1", "/events?since=0&limit=10000", "/ops?limit=5", "/jobs?limit=1"):
        status, body = await send(head, "GET", path)
        assert status == 200, (path, body)


# ---------------------------------------------------------------- aiohttp's own answers


async def raw_request(head: HeadServer, request: bytes) -> tuple[int, Any]:
    """Send bytes as they are; the status and the JSON body of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", head.port)
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head_part, _, body = data.partition(b"\r\n\r\n")
    status = int(head_part.split(b" ", 2)[1])
    assert b"application/json" in head_part.lower(), head_part
    return status, json.loads(body)


async def test_aiohttp_answers_carry_the_error_body(head: HeadServer) -> None:
    status, body = await send(head, "GET", "/no/such/route")
    assert_error(status, body, 404, "not_found")
    status, body = await send(head, "DELETE", "/health")
    assert_error(status, body, 405, "method_not_allowed")
    status, body = await send(head, "PUT", "/models")
    assert_error(status, body, 405, "method_not_allowed")

    long_url = b"GET /models/" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    status, body = await raw_request(head, long_url)
    assert_error(status, body, (400, 414))
    long_header = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 20_000 + b"\r\nConnection: close\r\n\r\n"
    status, body = await raw_request(head, long_header)
    assert_error(status, body, (400, 431))
    status, body = await raw_request(head, b"NOT HTTP AT ALL\r\n\r\n")
    assert_error(status, body, 400)


# ---------------------------------------------------------------- the agent socket


async def test_agent_socket_errors_are_close_codes_not_http(head: HeadServer) -> None:
    hello = {
        "type": "hello",
        "node_id": "n1",
        "token": head.head.tokens.join_token,
        "protocol_version": PROTOCOL_VERSION,
        "instance_id": "i1",
    }
    deep_service = (
        '{"service_id": "s", "model": "m", "device": "n1:gpu0", "backend": "b", "port": 1, "config": '
        + _deep(3000)
        + "}"
    )
    frames = [
        json.dumps(hello)[:-1] + ', "services": [' + deep_service + "]}",
        json.dumps(hello)[:-1] + ', "running": ' + "[" * 3000 + "]" * 3000 + "}",
    ]
    async with aiohttp.ClientSession() as s:
        for frame in frames:
            async with s.ws_connect(head.url.replace("http", "ws") + "/ws/agent") as ws:
                await ws.send_str(frame)
                msg = await ws.receive(timeout=10)
                assert msg.type == aiohttp.WSMsgType.CLOSE, msg
                assert msg.data == 4400, (msg.data, msg.extra)
        # And after a good hello, a bad message is a close code as well.
        async with s.ws_connect(head.url.replace("http", "ws") + "/ws/agent") as ws:
            await ws.send_str(json.dumps(hello))
            welcome = await ws.receive(timeout=10)
            assert json.loads(welcome.data)["type"] == "welcome"
            await ws.send_str(
                '{"type": "heartbeat", "inventory": {"addresses": ' + "[" * 3000 + "]" * 3000 + "}}"
            )
            msg = await ws.receive(timeout=10)
            while msg.type == aiohttp.WSMsgType.TEXT:  # a command the head pushed meanwhile
                msg = await ws.receive(timeout=10)
            assert msg.type == aiohttp.WSMsgType.CLOSE, msg
            assert msg.data == 4400, (msg.data, msg.extra)
    status, body = await send(head, "GET", "/")
    assert status == 200, body
