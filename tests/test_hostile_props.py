"""Property-based hostile input (hypothesis): REST bodies, job files, device and model names
and query strings, thrown at a real in-process head. No input ever gets a 5xx; every refusal
is a 4xx with the documented error body."""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gswarm import PROTOCOL_VERSION
from gswarm.errors import InvalidWorkflow
from gswarm.head.app import HeadServer
from gswarm.workflow import ACTIONS, parse

pytestmark = pytest.mark.timeout(300)

EXAMPLES = int(os.environ.get("GSWARM_HYPOTHESIS_EXAMPLES", "100"))
"""Examples per property: 100 in the suite (it must stay under 3 minutes on 2 cores);
`GSWARM_HYPOTHESIS_EXAMPLES=1000 tox -e py -- tests/test_hostile_props.py` for a longer hunt."""
PROPS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
TRIED: Counter[str] = Counter()
"""Inputs sent per class (printed with -s at the end of each test)."""

# ---------------------------------------------------------------- strategies

EDGE_INTS = st.sampled_from([-1, 0, 1, 65535, 65536, 1024, 1025, 2**31, 2**63, 2**64, 2**70, -(2**70)])
EDGE_FLOATS = st.sampled_from([-1.0, 0.0, 1e-300, 1e12, 1e308, float("inf"), float("nan")])
NAMES = st.one_of(
    st.text(max_size=40),
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True),
    st.sampled_from([".", "..", "a/b", "../etc", "%2e%2e", "a" * 200, "a\x00b", "é", "٣", " m", "m\n"]),
)
DEVICES = st.one_of(
    st.text(max_size=30),
    st.builds(
        "{}:{}".format,
        NAMES,
        st.sampled_from(["disk", "dram", "gpu0", "gpu:1", "gpu999", "gpu٣", "gpu-1", "", "floppy", "gpu:"]),
    ),
    st.sampled_from(["n1:disk", "n1:gpu0", ":", "::", "n1:gpu:0:0", "n1" * 100 + ":disk"]),
)
SOURCES = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "hf://o/m",
            "hf://o/m@..",
            "file:///etc/shadow",
            "file://relative/x",
            "file://",
            "http://[::1/x",
            "http://127.0.0.1:9/",
            "https://huggingface.co/",
            "https://huggingface.co/a/b/tree/",
            "o/m@",
            "hf://",
        ]
    ),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    EDGE_INTS,
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
    NAMES,
    DEVICES,
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=25,
)


class Deep:
    """Lists `depth` deep, as a value of a body. Never a real nested list: `json.dumps` and
    hypothesis's printing of a failing example recurse once a level and overflow the stack
    past about a thousand; `to_json` writes its brackets without recursion."""

    def __init__(self, depth: int) -> None:
        self.depth = depth

    def __repr__(self) -> str:
        return f"Deep({self.depth})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


DEEP = st.one_of(st.sampled_from([33, 1000, 3000]), st.integers(min_value=5, max_value=3000)).map(Deep)
_DEEP_MARK = "\x00deep:"


def to_json(value: Any) -> str:
    """`json.dumps(value, allow_nan=True)`, each `Deep` written as its brackets."""

    def mark(obj: object) -> str:
        if isinstance(obj, Deep):
            return f"{_DEEP_MARK}{obj.depth}"
        raise TypeError(f"not JSON: {obj!r}")

    text = json.dumps(value, allow_nan=True, default=mark)
    quoted_mark = json.dumps(_DEEP_MARK)[:-1]  # the mark as json.dumps writes it, open quote kept
    while (start := text.find(quoted_mark)) >= 0:
        end = text.index('"', start + len(quoted_mark))
        depth = int(text[start + len(quoted_mark) : end])
        text = text[:start] + "[" * depth + "]" * depth + text[end + 1 :]
    return text


ROUTE_FIELDS: dict[str, list[str]] = {
    "/models": ["name", "type", "source_url", "metadata"],
    "/nodes": ["node_id", "hostname", "ip_address", "storage_devices", "gpu_count"],
    "/download": [
        "model_name",
        "source_url",
        "target_device",
        "model_type",
        "allow_patterns",
        "ignore_patterns",
        "prefer_peer",
        "bandwidth_limit",
        "timeout",
    ],
    "/copy": ["model_name", "source_device", "target_device", "keep_source", "verify", "bandwidth_limit"],
    "/move": ["model_name", "source_device", "target_device", "keep_source", "timeout"],
    "/load": ["model_name", "device", "source_device", "keep_source", "timeout"],
    "/serve": ["model_name", "device", "port", "config", "backend", "timeout"],
    "/health_check": ["model_name", "device", "node_id"],
    "/replicate": [
        "model_name",
        "targets",
        "all_nodes",
        "source_device",
        "max_fanout",
        "bandwidth_limit",
        "timeout",
    ],
    "/jobs": ["name", "actions"],
}


def field_value(name: str) -> st.SearchStrategy[Any]:
    """Values for a field: plausible ones for its kind, edge numbers, and anything at all."""
    plausible: dict[str, st.SearchStrategy[Any]] = {
        "name": NAMES,
        "model_name": NAMES,
        "node_id": NAMES,
        "type": st.text(max_size=70),
        "source_url": SOURCES,
        "target_device": DEVICES,
        "source_device": DEVICES,
        "device": DEVICES,
        "targets": st.lists(DEVICES, max_size=3),
        "metadata": st.dictionaries(st.text(max_size=8), JSON, max_size=4) | DEEP,
        "storage_devices": st.dictionaries(st.text(max_size=8), JSON, max_size=4),
        "config": st.dictionaries(st.text(max_size=8), JSON, max_size=4) | DEEP,
        "allow_patterns": st.lists(st.text(max_size=10), max_size=3),
        "ignore_patterns": st.lists(st.text(max_size=10), max_size=3),
    }
    numbers = st.one_of(EDGE_INTS, EDGE_FLOATS, st.integers())
    return st.one_of(plausible.get(name, numbers), numbers, JSON)


@st.composite
def rest_bodies(draw: st.DrawFn) -> tuple[str, Any]:
    path = draw(st.sampled_from(sorted(ROUTE_FIELDS)))
    fields = ROUTE_FIELDS[path]
    keys = draw(st.lists(st.sampled_from([*fields, "junk"]), unique=True, max_size=len(fields) + 1))
    body: Any = {k: draw(field_value(k)) for k in keys}
    if draw(st.integers(0, 9)) == 0:
        body = draw(JSON)  # not even an object
    return path, body


@st.composite
def action_dicts(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from([*ACTIONS, "teleport"]) | JSON)
    keys = [
        "model",
        "source",
        "target",
        "from",
        "to",
        "device",
        "port",
        "node",
        "include",
        "exclude",
        "targets",
        "all_nodes",
        "config",
        "backend",
        "keep_source",
        "force",
        "id",
        "depends_on",
        "retries",
        "timeout",
        "continue_on_error",
        "model_name",
        "target_device",
        "action_type",
    ]
    chosen = draw(st.lists(st.sampled_from(keys), unique=True, max_size=6))
    action: dict[str, Any] = {"action": kind}
    for key in chosen:
        plausible = {
            "model": NAMES,
            "model_name": NAMES,
            "node": NAMES,
            "source": SOURCES,
            "depends_on": st.lists(st.text(max_size=5), max_size=3),
        }.get(key, DEVICES if key in ("target", "from", "to", "device", "target_device") else JSON)
        action[key] = draw(st.one_of(plausible, JSON, EDGE_INTS, EDGE_FLOATS))
    return action


@st.composite
def job_texts(draw: st.DrawFn) -> str:
    """Job files: structured jobs with hostile values (as YAML or JSON), YAML-ish soup, and
    valid files with hostile text spliced in."""
    job: Any = {
        "name": draw(st.one_of(NAMES, JSON)),
        "actions": draw(st.lists(action_dicts(), max_size=4) | JSON),
    }
    if draw(st.booleans()):
        job["description"] = draw(JSON)
    how = draw(st.integers(0, 5))
    if how == 0:
        return to_json(job)
    if how in (1, 2):
        return yaml.safe_dump(job, allow_unicode=draw(st.booleans()))
    if how == 3:
        soup = st.text(alphabet="[]{}:,-&*!|>'\"#%@`? \n\tab0.~", max_size=200)
        return draw(soup)
    text = yaml.safe_dump(job)
    at = draw(st.integers(0, len(text)))
    tricks = ["&a ", "*a", "!!python/name:os.system", "<<: *a\n", "[" * 50, "\t", "---\n", "%YAML 1.1\n"]
    splice = draw(st.sampled_from(tricks) | st.text(max_size=20))
    return text[:at] + splice + text[at:]


# ---------------------------------------------------------------- the checks


async def post(session: aiohttp.ClientSession, url: str, data: bytes | str) -> tuple[int, bytes]:
    async with session.post(url, data=data, headers={"Content-Type": "application/json"}) as r:
        return r.status, await r.read()


def check_answer(status: int, raw: bytes, what: Any) -> None:
    assert status < 500, (status, raw[:500], what)
    if status >= 400:
        body = json.loads(raw)
        err = body["error"]
        assert isinstance(err["code"], str) and isinstance(err["message"], str), body
        assert isinstance(err["details"], dict), body


def session_for(head: HeadServer) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(headers={"Authorization": f"Bearer {head.head.tokens.api_token}"})


@PROPS
@given(case=rest_bodies())
async def test_rest_bodies_never_5xx(head: HeadServer, case: tuple[str, Any]) -> None:
    path, body = case
    TRIED["rest bodies"] += 1
    async with session_for(head) as s:
        status, raw = await post(s, head.url + path, to_json(body))
    check_answer(status, raw, case)


@PROPS
@given(text=job_texts())
async def test_job_files_never_5xx(head: HeadServer, text: str) -> None:
    TRIED["job files"] += 1
    async with session_for(head) as s:
        status, raw = await post(s, head.url + "/jobs", text.encode(errors="surrogatepass"))
    check_answer(status, raw, text)
    assert status in (202, 400, 413, 422), (status, raw[:300])


@settings(max_examples=EXAMPLES, deadline=None, database=None)
@given(text=job_texts())
def test_job_parser_only_raises_invalid_workflow(text: str) -> None:
    TRIED["job files (parser only)"] += 1
    try:
        parse(text)
    except InvalidWorkflow as exc:
        json.dumps(exc.details)  # the error body encodes


@PROPS
@given(
    name=NAMES,
    device=DEVICES,
    route=st.sampled_from(
        [
            "GET /models/{n}",
            "GET /nodes/{n}",
            "POST /nodes/{n}/heartbeat",
            "POST /nodes/{n}/probe",
            "DELETE /models/{n}",
            "DELETE /models/{n}/locations/{d}",
            "POST /stop/{n}/{d}",
            "GET /logs/{n}/{d}",
            "GET /ops/{n}",
            "GET /jobs/{n}",
            "POST /ops/{n}/cancel",
            "POST /jobs/{n}/cancel",
        ]
    ),
)
async def test_names_and_devices_in_paths_never_5xx(
    head: HeadServer, name: str, device: str, route: str
) -> None:
    TRIED["device/model names"] += 1
    method, template = route.split(" ")
    path = template.format(n=quote(name, safe=""), d=quote(device, safe=""))
    async with session_for(head) as s, s.request(method, head.url + path) as r:
        check_answer(r.status, await r.read(), (route, name, device))


@PROPS
@given(
    path=st.sampled_from(["/events", "/ops", "/jobs", "/logs/m/n1:gpu0", "/services", "/models"]),
    params=st.dictionaries(
        st.sampled_from(["since", "limit", "topic", "lines", "node", "state", "kind", "wait", "timeout"]),
        st.one_of(
            st.text(max_size=25),
            st.integers().map(str),
            EDGE_INTS.map(str),
            EDGE_FLOATS.map(str),
            st.sampled_from(["-99999999999999999999", "99999999999999999999", "1e400", "-0", " 1", "1_0"]),
        ),
        max_size=4,
    ),
)
async def test_query_strings_never_5xx(head: HeadServer, path: str, params: dict[str, str]) -> None:
    TRIED["query strings"] += 1
    query = "&".join(f"{quote(k)}={quote(v, safe='')}" for k, v in params.items())
    async with session_for(head) as s, s.get(f"{head.url}{path}?{query}") as r:
        check_answer(r.status, await r.read(), (path, params))


def teardown_module() -> None:
    print("\ninputs tried:", dict(TRIED))


HOLDINGS = st.lists(
    st.fixed_dictionaries(
        {
            "model": NAMES,
            "tier": st.sampled_from(["disk", "dram", "gpu0", "floppy", ""]) | NAMES,
            "path": st.text(max_size=20),
            "size": EDGE_INTS,
        },
        optional={"files": EDGE_INTS, "source": SOURCES},
    ),
    max_size=3,
)
SERVICES = st.lists(
    st.fixed_dictionaries(
        {
            "service_id": st.text(max_size=10),
            "model": NAMES,
            "device": DEVICES | st.just("n1:gpu0"),
            "backend": st.text(max_size=10),
            "port": EDGE_INTS,
        },
        optional={"state": st.text(max_size=10), "config": JSON, "pid": EDGE_INTS},
    ),
    max_size=2,
)


@st.composite
def agent_frames(draw: st.DrawFn) -> list[Any]:
    """A Hello with hostile holdings, services and inventory, then a few hostile messages."""
    hello: dict[str, Any] = {
        "type": "hello",
        "node_id": draw(st.just("n1") | NAMES),
        "protocol_version": draw(st.sampled_from([None, None, None]) | EDGE_INTS),
        "instance_id": draw(st.text(max_size=10)),
        "holdings": draw(HOLDINGS),
        "services": draw(SERVICES),
        "running": draw(st.lists(st.text(max_size=10), max_size=3)),
        "finished": draw(st.lists(st.text(max_size=10), max_size=3)),
        "inventory": draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "hostname": st.text(max_size=20),
                    "tiers": st.lists(
                        st.fixed_dictionaries(
                            {
                                "name": st.sampled_from(["disk", "dram"]) | st.text(max_size=6),
                                "path": st.text(max_size=6),
                                "capacity": EDGE_INTS,
                                "free": EDGE_INTS,
                            },
                        ),
                        max_size=2,
                    ),
                    "memory_total": EDGE_INTS,
                },
            )
        ),
    }
    later = draw(
        st.lists(
            st.one_of(
                st.builds(lambda h: {"type": "holdings", "holdings": h}, HOLDINGS),
                st.builds(lambda s: {"type": "service", "service": s[0]} if s else {"type": "x"}, SERVICES),
                st.builds(lambda o: {"type": "succeeded", "op_id": o, "result": {}}, st.text(max_size=8)),
                st.builds(lambda o: {"type": "progress", "op_id": o}, st.text(max_size=8)),
                JSON,
            ),
            max_size=3,
        )
    )
    return [hello, *later]


CLOSE_CODES = {4400, 4401, 4409, 4426, 4000, 1000}


@PROPS
@given(frames=agent_frames())
async def test_agent_messages_never_break_the_socket_or_the_head(head: HeadServer, frames: list[Any]) -> None:
    """Hostile agent frames end in a 44xx close (or are taken); never HTTP written into the
    socket (the client would see a protocol error), never 1011 (an internal error)."""
    TRIED["agent frames"] += 1
    hello = frames[0]
    if hello["protocol_version"] is None:
        hello["protocol_version"] = PROTOCOL_VERSION
    hello["token"] = head.head.tokens.join_token
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(head.url.replace("http", "ws") + "/ws/agent") as ws:
            for frame in frames:
                if ws.closed:
                    break
                await ws.send_str(json.dumps(frame))
            await ws.close()
            assert ws.close_code in CLOSE_CODES, (ws.close_code, frames)
            TRIED[f"agent frames closed {ws.close_code}"] += 1
        headers = {"Authorization": f"Bearer {head.head.tokens.api_token}"}
        async with s.get(head.url + "/", headers=headers) as r:
            assert r.status == 200
