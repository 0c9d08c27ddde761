"""The REST API as a client sees it: the original routes and bodies, and bad input."""

from __future__ import annotations

import io
import json
from typing import Any

import aiohttp
import pytest

from gswarm.client import GswarmClient
from gswarm.errors import BadRequest
from gswarm.head.app import HeadServer


async def call(
    head: HeadServer,
    method: str,
    path: str,
    body: Any = None,
    *,
    token: str | None = "",
    data: bytes | None = None,
) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    payload: Any = io.BytesIO(json.dumps(body).encode()) if body is not None else data
    tok = head.head.tokens.api_token if token == "" else token
    if tok is not None:
        headers["Authorization"] = f"Bearer {tok}"
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, head.url + path, data=payload, headers=headers) as r,
    ):
        return r.status, await r.json(content_type=None)


async def test_original_model_routes(head: HeadServer) -> None:
    body = {
        "name": "llama-7b",
        "type": "llm",
        "source_url": "https://huggingface.co/meta-llama/Llama-2-7b-hf",
        "metadata": {"family": "llama"},
    }
    status, created = await call(head, "POST", "/models", body)
    assert status == 201
    assert created["name"] == "llama-7b" and created["metadata"] == {"family": "llama"}

    status, listing = await call(head, "GET", "/models")
    assert status == 200
    assert [m["name"] for m in listing["models"]] == ["llama-7b"]
    assert listing["models"][0]["source_url"] == body["source_url"]

    status, one = await call(head, "GET", "/models/llama-7b")
    assert status == 200 and one["type"] == "llm" and one["locations"] == []

    status, _ = await call(head, "DELETE", "/models/llama-7b")
    assert status == 200
    status, gone = await call(head, "GET", "/models/llama-7b")
    assert status == 404 and gone["error"]["code"] == "model_not_found"


async def test_root_and_health(head: HeadServer) -> None:
    status, info = await call(head, "GET", "/")
    assert status == 200 and info["name"] == "gswarm" and info["models"] == 0
    status, health = await call(head, "GET", "/health", token=None)
    assert status == 200 and health["status"] == "ok"


async def test_duplicate_register_is_409(head: HeadServer) -> None:
    body = {"name": "m1", "type": "llm"}
    assert (await call(head, "POST", "/models", body))[0] == 201
    status, err = await call(head, "POST", "/models", body)
    assert status == 409 and err["error"]["code"] == "already_exists"


@pytest.mark.parametrize("name", ["../x", "", "a" * 300, "has space", "a/b", ".hidden", "x\x00y"])
async def test_invalid_model_names_are_400(head: HeadServer, name: str) -> None:
    status, err = await call(head, "POST", "/models", {"name": name, "type": "llm"})
    assert status == 400
    assert err["error"]["code"] == "invalid_name"
    status, listing = await call(head, "GET", "/models")
    assert listing["models"] == []


async def test_unknown_model_and_node_are_404(head: HeadServer) -> None:
    status, err = await call(head, "GET", "/models/nope")
    assert status == 404 and "nope" in err["error"]["message"]
    status, err = await call(head, "GET", "/nodes/nope")
    assert status == 404 and err["error"]["code"] == "node_not_found"
    status, err = await call(head, "GET", "/ops/nope")
    assert status == 404 and err["error"]["code"] == "op_not_found"
    status, err = await call(head, "GET", "/no/such/route")
    assert status == 404 and err["error"]["code"] == "not_found"


async def test_malformed_json_is_400_with_parse_error(head: HeadServer) -> None:
    status, err = await call(head, "POST", "/models", data=b'{"name": "x", ')
    assert status == 400
    assert err["error"]["code"] == "invalid_json"
    assert "malformed JSON" in err["error"]["message"]


async def test_wrong_field_type_is_400_naming_the_field(head: HeadServer) -> None:
    status, err = await call(head, "POST", "/models", {"name": "x", "type": 7})
    assert status == 400
    assert err["error"]["details"]["field"] == "type"
    assert "`$.type`" in err["error"]["message"]
    status, err = await call(head, "POST", "/models", {"type": "llm"})
    assert status == 400 and "name" in err["error"]["message"]


async def test_oversized_body_is_413(head: HeadServer) -> None:
    big = {"name": "big", "type": "llm", "metadata": {"blob": "x" * (2 << 20)}}
    status, err = await call(head, "POST", "/models", big)
    assert status == 413 and err["error"]["code"] == "payload_too_large"
    assert (await call(head, "GET", "/models/big"))[0] == 404


async def test_missing_and_wrong_token(head: HeadServer) -> None:
    status, err = await call(head, "GET", "/models", token=None)
    assert status == 401 and err["error"]["code"] == "unauthorized"
    status, err = await call(head, "GET", "/models", token="not-the-token")
    assert status == 403 and err["error"]["code"] == "forbidden"
    status, _ = await call(head, "POST", "/models", {"name": "m", "type": "llm"}, token="bad")
    assert status == 403
    assert (await call(head, "GET", "/models/m"))[0] == 404


async def test_legacy_node_registration_and_heartbeat(head: HeadServer) -> None:
    body = {
        "node_id": "worker1",
        "hostname": "gpu-server-01",
        "ip_address": "192.168.1.101",
        "storage_devices": {},
        "gpu_count": 2,
    }
    status, node = await call(head, "POST", "/nodes", body)
    assert status == 201 and node["hostname"] == "gpu-server-01"
    status, hb = await call(head, "POST", "/nodes/worker1/heartbeat")
    assert status == 200 and hb["status"] == "online"
    status, nodes = await call(head, "GET", "/nodes")
    assert [n["node_id"] for n in nodes["nodes"]] == ["worker1"]
    # Without an agent connection the node cannot take work: refused, nothing queued.
    status, err = await call(head, "POST", "/nodes/worker1/probe", {})
    assert status == 409 and err["error"]["code"] == "node_offline"
    assert (await call(head, "GET", "/ops"))[1]["ops"] == []


async def test_ops_for_unknown_node_are_404(head: HeadServer) -> None:
    status, err = await call(head, "POST", "/nodes/ghost/probe", {})
    assert status == 404 and err["error"]["code"] == "node_not_found"
    status, err = await call(head, "POST", "/nodes/..%2Fetc/probe", {})
    assert status in (400, 404)


async def test_unknown_topics_states_and_kinds_are_400_naming_the_choices(client: GswarmClient) -> None:
    for path, params, field in [
        ("/events", {"topic": "bogus"}, "topic"),
        ("/events", {"topic": "op,nodes"}, "topic"),
        ("/ops", {"state": "bogus"}, "state"),
        ("/ops", {"kind": "teleport"}, "kind"),
    ]:
        with pytest.raises(BadRequest) as exc:
            await client.request("GET", path, params=params)
        assert exc.value.code == "invalid_query" and exc.value.details["field"] == field, exc.value.message
    with pytest.raises(BadRequest) as exc:
        async for _ in client.events(topics=["bogus"]):
            break
    assert "unknown topic 'bogus'" in exc.value.message
    assert await client.list_ops(state="running", kind="download") == []
