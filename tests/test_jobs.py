"""Workflows: validation (every problem at once), DAG semantics and parallelism, retries,
failures that skip dependents, serialisation, cancel, and a head restarted mid-job."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from gswarm.agent.serving import ServingConfig, Template
from gswarm.client import GswarmClient
from gswarm.errors import InvalidWorkflow
from gswarm.head.app import HeadServer
from gswarm.protocol import Job
from tests.conftest import AgentRunner, Cli, free_port, tree_bytes, wait_for, wait_until
from tests.hubserver import HubRepo, ThreadedHubServer

pytestmark = pytest.mark.timeout(120)

PYHTTP = ServingConfig(
    templates={
        "pyhttp": Template(
            command=[sys.executable, "-m", "http.server", "{port}", "--bind", "127.0.0.1"], health="/"
        )
    },
    health_interval=0.5,
)


async def _finish(client: GswarmClient, job: Job, timeout: float = 60) -> Job:
    async def done() -> Job | None:
        j = await client.get_job(job.job_id)
        return j if j.terminal else None

    result: Job = await wait_for(done, timeout=timeout, interval=0.1)
    return result


def _invalid(client_text: str) -> list[dict[str, Any]]:
    from gswarm.workflow import parse

    with pytest.raises(InvalidWorkflow) as exc:
        parse(client_text)
    return list(exc.value.details.get("errors", [exc.value.message]))


async def test_validation_names_every_problem_at_once(client: GswarmClient) -> None:
    text = """
name: broken
actions:
  - action: teleport
    model: m
  - id: dl
    action: download
    model: m
    target: node1:floppy
  - action: serve
    model: m
    device: node1:gpu0
    port: "eighty"
  - action: copy
    model: "../etc"
    from: node1:disk
    to: node1:dram
    depends_on: [nope]
  - id: a
    action: delete
    model: x
    device: node1:disk
    depends_on: [b]
  - id: b
    action: delete
    model: x
    device: node1:dram
    depends_on: [a]
"""
    with pytest.raises(InvalidWorkflow) as exc:
        await client.submit_job(text)
    errors = exc.value.details["errors"]
    found = {(e["field"], e["message"].split(":")[0]) for e in errors}
    messages = " | ".join(f"{e['action']} {e['field']}: {e['message']}" for e in errors)
    assert "unknown action 'teleport'" in messages
    assert "download needs 'source'" in messages
    assert "unknown tier 'floppy'" in messages
    assert "'eighty' is not a port" in messages
    assert "invalid model name '../etc'" in messages
    assert "depends on 'nope'" in messages
    assert "dependency cycle: a -> b -> a" in messages or "dependency cycle: b -> a -> b" in messages
    assert len(found) >= 7
    assert await client.list_jobs() == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "is empty"),
        ("name: x\nactions:\n\t- action: download\n", "line 3, column 1: YAML does not parse: "),
        ('{"name": "x", "actions": [', "line 1, column 27: JSON does not parse: "),
        ("- just\n- a list\n", "a job is a mapping"),
        ("name: x\nactions: []\n", "non-empty list of actions"),
    ],
)
async def test_unparseable_files(client: GswarmClient, text: str, expected: str) -> None:
    with pytest.raises(InvalidWorkflow) as exc:
        await client.submit_job(text)
    assert expected in exc.value.message


async def test_ten_thousand_actions_are_refused_quickly(client: GswarmClient) -> None:
    actions = [{"action": "health_check", "node": "n1"} for _ in range(10_000)]
    t0 = time.monotonic()
    with pytest.raises(InvalidWorkflow) as exc:
        await client.submit_job({"name": "huge", "actions": actions})
    assert "at most 1000" in exc.value.message and time.monotonic() - t0 < 10


def test_check_prints_every_problem(cli: Cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nactions:\n  - action: download\n    model: m\n  - action: fly\n")
    r = cli.invoke("job", str(bad), "--check")
    assert r.returncode == 1 and "download needs 'source'" in r.stderr and "unknown action 'fly'" in r.stderr
    assert "Traceback" not in r.stderr
    good = Path(__file__).parents[1] / "examples" / "multi-model.yaml"
    r = cli.invoke("job", str(good), "--check")
    assert (
        r.returncode == 0
        and "4 actions" in r.stdout
        and "3-serve: serve llama-7b after 1-download" in r.stdout
    )


async def test_a_job_file_that_does_not_parse_is_named_with_its_line_and_column(
    head: HeadServer, cli: Cli, tmp_path: Path
) -> None:
    """`job FILE` (submitting, not only `--check`) names the file, the line and the column, and
    a file that does not validate names the file too; the head is never asked."""
    bad = tmp_path / "jobs" / "x.yaml"
    bad.parent.mkdir()
    bad.write_text("name: x\nactions:\n  - id: a\n    action: [download\n")
    for extra in ((), ("--check",)):
        r = await cli.ainvoke("job", str(bad), *extra, "--head-url", head.url)
        assert r.returncode == 1 and "request body" not in r.stderr, r.stderr
        assert r.stderr.startswith(f"error: {bad}: line 5, column 1: YAML does not parse: "), r.stderr
    bad.write_text("name: x\nactions:\n  - action: download\n    model: m\n  - action: fly\n")
    r = await cli.ainvoke("job", str(bad), "--head-url", head.url)
    assert r.returncode == 1 and "download needs 'source'" in r.stderr and "unknown action 'fly'" in r.stderr
    assert f"error: {bad}: invalid job: " in r.stderr
    assert head.head.registry.jobs == {}


async def test_dag_runs_models_in_parallel_and_in_order(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, hub: Any, tiny_repo_dir: Path
) -> None:
    """The original multi-model example's shape: two downloads at once, each model then served."""
    await agents.start(head, "node1", serving_config=PYHTTP)
    await agents.start(head, "node2", serving_config=PYHTTP)
    hub.add_repo(HubRepo.from_dir("stabilityai/stable-diffusion-2-1", tiny_repo_dir))
    hub.add_repo(HubRepo.from_dir("meta-llama/Llama-2-7b-hf", tiny_repo_dir))
    await hub.wait_hashed()
    hub.rate_limit = 120 << 20
    llama, sd = (
        "https://huggingface.co/meta-llama/Llama-2-7b-hf",
        "https://huggingface.co/stabilityai/stable-diffusion-2-1",
    )
    actions: list[dict[str, Any]] = [
        {"action": "download", "model": "llama-7b", "source": llama, "target": "node1:disk"},
        {"action": "download", "model": "stable-diffusion", "source": sd, "target": "node2:disk"},
        {
            "action": "serve",
            "model": "llama-7b",
            "device": "node1:disk",
            "port": free_port(),
            "backend": "pyhttp",
        },
        {
            "action": "serve",
            "model": "stable-diffusion",
            "device": "node2:disk",
            "port": free_port(),
            "backend": "pyhttp",
        },
    ]
    job = await client.submit_job({"name": "multi-model-deployment", "actions": actions})
    final = await _finish(client, job)
    assert final.state == "succeeded", [(a.id, a.state, a.error) for a in final.actions]
    a = {x.id: x for x in final.actions}
    d1, d2, s1, s2 = a["1-download"], a["2-download"], a["3-serve"], a["4-serve"]
    # Both downloads ran at the same time; each serve started after its own download.
    assert d1.started_at and d2.started_at and d1.finished_at and d2.finished_at
    assert d2.started_at < d1.finished_at and d1.started_at < d2.finished_at
    assert (
        s1.started_at
        and s1.started_at >= d1.finished_at
        and s2.started_at
        and s2.started_at >= d2.finished_at
    )
    assert {s.device for s in await client.list_services()} == {"node1:disk", "node2:disk"}
    kinds = [e.kind for e in await client.list_events(0, ["job"])]
    assert kinds.count("job.updated") >= 3 and "job.action" in kinds
    for s in await client.list_services():
        await client.stop_service(s.model, s.device, wait=True)


async def test_failure_skips_dependents_unless_continue_on_error(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, tiny_repo_dir: Path
) -> None:
    await agents.start(head, "n1")
    job = await client.submit_job(
        {
            "name": "partial",
            "actions": [
                {"id": "bad", "action": "copy", "model": "m", "from": "n1:disk", "to": "n1:dram"},
                {"id": "after-bad", "action": "copy", "model": "m", "from": "n1:dram", "to": "n1:disk"},
                {"id": "soft", "action": "delete", "model": "z", "device": "n1:disk",
                 "continue_on_error": True},
                {"id": "after-soft", "action": "download", "model": "z", "source": f"file://{tiny_repo_dir}",
                 "target": "n1:dram", "depends_on": ["soft"]},
            ],
        }
    )  # fmt: skip
    final = await _finish(client, job)
    states = {a.id: a.state for a in final.actions}
    assert states == {"bad": "failed", "after-bad": "skipped", "soft": "failed", "after-soft": "succeeded"}
    assert final.state == "failed" and "bad" in final.error
    assert "not registered" in next(a.error for a in final.actions if a.id == "bad")


async def test_retries_until_the_node_comes_back(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, tiny_repo_dir: Path
) -> None:
    """A job that targets an offline node: the action retries with backoff and runs once the
    node is back; with no retries left it fails saying the node is offline."""
    await agents.start(head, "n1")
    await agents.stop("n1")
    await wait_for(lambda: head.head.registry.nodes["n1"].status == "offline", timeout=5)
    src = f"file://{tiny_repo_dir}"
    job = await client.submit_job({"name": "offline", "actions": [
        {"id": "now", "action": "download", "model": "a", "source": src, "target": "n1:disk"},
        {"id": "later", "action": "download", "model": "b", "source": src, "target": "n1:disk", "retries": 6},
    ]})  # fmt: skip
    await wait_for(lambda: head.head.registry.jobs[job.job_id].actions[0].state == "failed", timeout=10)
    await agents.start(head, "n1")
    final = await _finish(client, job, timeout=60)
    a = {x.id: x for x in final.actions}
    assert a["now"].state == "failed" and "offline" in a["now"].error
    assert a["later"].state == "succeeded" and a["later"].attempts > 1


async def test_two_jobs_writing_the_same_copy_never_interleave(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, tiny_repo_dir: Path
) -> None:
    await agents.start(head, "n1")
    src = f"file://{tiny_repo_dir}"
    await client.download("m", src, "n1:disk", wait=True)
    first = await client.submit_job({"name": "one", "actions": [
        {"action": "copy", "model": "m", "from": "n1:disk", "to": "n1:dram"},
        {"action": "delete", "model": "m", "device": "n1:dram"},
    ]})  # fmt: skip
    second = await client.submit_job({"name": "two", "actions": [
        {"action": "copy", "model": "m", "from": "n1:disk", "to": "n1:dram"},
    ]})  # fmt: skip
    one, two = await _finish(client, first), await _finish(client, second)
    assert one.state == "succeeded" and two.state == "succeeded"
    spans = sorted((a.started_at or 0, a.finished_at or 0) for j in (one, two) for a in j.actions)
    for (_, e1), (s2, _) in itertools.pairwise(spans):
        assert s2 >= e1 - 0.01, spans  # one after the other, never overlapping


async def test_cancel_mid_download_publishes_nothing(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, hub: Any
) -> None:
    agent = await agents.start(head, "n1")
    hub.rate_limit = 10 << 20
    job = await client.submit_job({"name": "slow", "actions": [
        {"id": "dl", "action": "download", "model": "tiny", "source": "org/tiny", "target": "n1:disk"},
        {"id": "next", "action": "copy", "model": "tiny", "from": "n1:disk", "to": "n1:dram"},
    ]})  # fmt: skip
    reg = head.head.registry
    await wait_for(
        lambda: any(o.kind == "download" and o.progress.done > 1 << 20 for o in reg.ops.values()), timeout=20
    )
    await client.cancel_job(job.job_id)
    final = await _finish(client, job)
    assert final.state == "cancelled"
    assert {a.id: a.state for a in final.actions} == {"dl": "cancelled", "next": "cancelled"}
    await wait_for(lambda: not agent.executor.running, timeout=10)
    store = agent.stores["disk"]
    assert not store.model_dir("tiny").exists() and not store.partial_dir("tiny").exists()
    assert (await client.get_model("tiny")).locations == []


def test_head_killed_mid_job_finishes_after_restart(cli: Cli, tiny_repo_dir: Path, tmp_path: Path) -> None:
    hub = ThreadedHubServer([HubRepo.from_dir("org/tiny", tiny_repo_dir)], rate_limit=20 << 20)
    hub.start()
    try:
        port = free_port()
        head, url = cli.start_head(port)
        cli.spawn("client", url, "--node-id", "n1", env={"HF_ENDPOINT": hub.url}, name="agent")
        wait_until(lambda: '"online"' in cli.invoke("nodes", "--json", "--head-url", url).stdout, timeout=15)
        jobfile = tmp_path / "job.yaml"
        jobfile.write_text(
            "name: survive\nactions:\n"
            "  - {id: dl, action: download, model: tiny, source: org/tiny, target: n1:disk}\n"
            "  - {id: stage, action: copy, model: tiny, from: n1:disk, to: n1:dram}\n"
        )
        r = cli.invoke("job", str(jobfile), "--detach", "--head-url", url)
        assert r.returncode == 0, r.stderr
        job_id = r.stdout.strip()

        def downloaded() -> int:
            ops = json.loads(cli.invoke("ops", "--json", "--head-url", url).stdout)
            return sum(op["progress"]["done"] for op in ops if op["kind"] == "download")

        wait_until(lambda: downloaded() > 10 << 20, timeout=20)  # mid-download
        head.signal(signal.SIGKILL)
        head.p.wait()
        cli.start_head(port)

        def finished() -> dict[str, Any] | None:
            shown: dict[str, Any] = json.loads(
                cli.invoke("jobs", "show", job_id, "--json", "--head-url", url).stdout
            )
            return shown if shown["state"] in ("succeeded", "failed", "cancelled") else None

        shown = wait_until(finished, timeout=60, interval=0.2)
        assert shown["state"] == "succeeded", shown
        assert {a["id"]: a["state"] for a in shown["actions"]} == {"dl": "succeeded", "stage": "succeeded"}
        assert tree_bytes(cli.tmp_path / "dram" / "tiny") == tree_bytes(tiny_repo_dir)
    finally:
        hub.stop()


async def test_job_events_and_listing(head: HeadServer, agents: AgentRunner, client: GswarmClient) -> None:
    await agents.start(head, "n1")
    job = await client.submit_job("name: hc\nactions:\n  - action: health_check\n    node: n1\n")
    final = await _finish(client, job)
    assert final.state == "succeeded" and final.actions[0].op_ids
    (listed,) = await client.list_jobs()
    assert listed.job_id == job.job_id and listed.counts == {"succeeded": 1}
    await asyncio.sleep(0)
