"""Faults: a replication whose source (or target) agent is reconnecting (it was killed and
restarted, or the head was) waits for it instead of sending a fetch with no peer to read from.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from gswarm.client import GswarmClient
from gswarm.config import Settings
from gswarm.head.app import HeadServer
from gswarm.ops import ReplicateResult
from tests.conftest import AgentRunner, fast_settings, tree_bytes, wait_for

pytestmark = pytest.mark.timeout(150)


@pytest.fixture
def settings() -> Settings:
    """A reconnect grace long enough to act while a stopped agent's node still counts as online."""
    return fast_settings(reconnect_grace=5.0)


async def test_replication_waits_for_a_reconnecting_source(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, tiny_repo_dir: Path
) -> None:
    """The only holder's agent restarts (a kill -9, or the head restarted and agents are on their
    way back): the coordinator waits for it instead of sending a fetch with no peer, which
    failed with an empty 'no peer could serve the copy: ' and failed the whole replication."""
    await agents.start(head, "n1")
    await agents.start(head, "n2")
    await client.download("m", f"file://{tiny_repo_dir}", "n1:disk", wait=True)
    reg = head.head.registry
    await agents.stop("n1")
    await wait_for(lambda: "n1" not in head.head.agents)
    assert reg.nodes["n1"].status == "online"  # within its reconnect grace
    op = await client.replicate("m", ["n2:disk"])
    with contextlib.suppress(AssertionError):  # the old coordinator failed within milliseconds
        await wait_for(lambda: reg.ops[op.op_id].terminal, timeout=1.0)
    assert not reg.ops[op.op_id].terminal, reg.ops[op.op_id].error
    assert [o.kind for o in reg.ops.values() if o.kind == "fetch"] == []
    await agents.start(head, "n1")
    final = await client.wait_op(op.op_id, timeout=30)
    assert final.state == "succeeded", final.error
    assert [o.state for o in reg.ops.values() if o.kind == "fetch"] == ["succeeded"]
    assert tree_bytes(agents.agents["n2"].stores["disk"].model_dir("m")) == tree_bytes(tiny_repo_dir)


async def test_replication_from_an_offline_source_says_so(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, tiny_repo_dir: Path
) -> None:
    """The only holder's node is offline: the target fails at once, saying why, and no fetch
    goes out (one went with no peer and failed with an empty 'no peer could serve the copy: ')."""
    await agents.start(head, "n1")
    await agents.start(head, "n2")
    await client.download("m", f"file://{tiny_repo_dir}", "n1:disk", wait=True)
    await agents.stop("n1")
    reg = head.head.registry
    await wait_for(lambda: reg.nodes["n1"].status == "offline", timeout=15)
    final = await client.replicate("m", ["n2:disk"], wait=True)
    assert final.state == "failed"
    assert isinstance(final.result, ReplicateResult)
    assert final.result.targets["n2:disk"].error == "no copy on an online node"
    assert [o for o in reg.ops.values() if o.kind == "fetch"] == []  # no fetch with nowhere to fetch from
