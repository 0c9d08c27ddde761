"""Placement rules and registry transitions as pure functions: no sockets, no head."""

from __future__ import annotations

import pytest

from gswarm.devices import Device
from gswarm.errors import InsufficientSpace
from gswarm.head.policy import check_room, peer_holders, same_source
from gswarm.ops import DownloadArgs, ReplicateArgs
from gswarm.protocol import Holding, Inventory, Job, Location, Node, OpProgress, TierInfo
from gswarm.registry import Registry
from gswarm.sources import parse_source
from gswarm.states import IllegalTransition


def _registry() -> Registry:
    reg = Registry()
    for n in ("a", "b", "c"):
        inv = Inventory(tiers=[TierInfo("disk", "/d", 100, 50), TierInfo("dram", "/m", 100, 10)])
        reg.nodes[n] = Node(node_id=n, status="online", data_url=f"http://{n}:1", inventory=inv)
    reg.register_model("m", "llm", None, {})
    return reg


def test_same_source_matches_repo_and_revision_not_other_repos_or_paths() -> None:
    loc = Location(model="m", device="a:disk", state="ready", source="hf://org/tiny@main", revision="abc123")
    assert same_source(parse_source("org/tiny"), loc)
    assert same_source(parse_source("hf://org/tiny@abc123"), loc)  # pinned to the commit it resolved to
    assert not same_source(parse_source("org/other"), loc)
    assert not same_source(parse_source("hf://org/tiny@v2"), loc)
    assert not same_source(parse_source("file:///models/tiny"), loc)
    assert not same_source(parse_source("org/tiny"), Location(model="m", device="a:disk", state="ready"))


def test_peer_holders_order_and_filters() -> None:
    reg = _registry()
    reg.set_location("m", "a:disk", "ready", source="hf://org/tiny@main")
    reg.set_location("m", "b:dram", "ready", source="hf://org/tiny@main")
    reg.set_location("m", "c:disk", "ready", source="hf://org/other@main")
    connected = {"a", "b", "c"}
    tiny = parse_source("org/tiny")
    assert [h.device for h in peer_holders(reg, connected, "m", "x", source=tiny)] == ["b:dram", "a:disk"]
    assert [h.device for h in peer_holders(reg, connected, "m", "x", first="a:disk", source=tiny)] == [
        "a:disk",
        "b:dram",
    ]
    assert [h.device for h in peer_holders(reg, {"a"}, "m", "a", source=tiny)] == []  # never itself
    assert len(peer_holders(reg, connected, "m", "x")) == 3


def test_a_copy_being_downloaded_serves_peers_only_once_bytes_flow() -> None:
    reg = _registry()
    op, _ = reg.create_op("a", DownloadArgs(model_name="m", source_url="org/tiny", tier="disk"), 0)
    reg.set_location("m", "a:disk", "downloading", op_id=op.op_id, source="hf://org/tiny@main")
    assert peer_holders(reg, {"a"}, "m", "b") == []
    reg.op_progress(op.op_id, OpProgress(done=1, total=10))
    assert [h.partial for h in peer_holders(reg, {"a"}, "m", "b")] == [True]


def test_check_room_refuses_what_clearly_does_not_fit() -> None:
    reg = _registry()
    check_room(reg, Device("a", "disk"), 50)
    with pytest.raises(InsufficientSpace):
        check_room(reg, Device("a", "dram"), 11)


def test_reconcile_keeps_copies_an_open_op_writes() -> None:
    reg = _registry()
    op, _ = reg.create_op("a", DownloadArgs(model_name="m", source_url="org/tiny", tier="disk"), 0)
    reg.set_location("m", "a:disk", "downloading", op_id=op.op_id)
    reg.set_location("m", "a:dram", "ready")
    events = reg.reconcile_holdings("a", [])  # the agent holds nothing published
    assert [e.kind for e in events] == ["location.deleted"]
    assert reg.locations[("m", "a:disk")].state == "downloading"
    reg.op_finished(op.op_id, "failed")
    assert reg.open_writer("m", "a:disk") is None
    reg.reconcile_holdings("a", [Holding(model="m", tier="disk", path="/d/m", size=5, source="x")])
    assert reg.locations[("m", "a:disk")].state == "ready" and reg.locations[("m", "a:disk")].source == "x"


def test_states_move_only_forward() -> None:
    reg = _registry()
    op, _ = reg.create_op("@head", ReplicateArgs(model_name="m", targets=["a:disk"]), 0)
    assert op.kind == "replicate"
    reg.op_finished(op.op_id, "succeeded")
    assert reg.op_finished(op.op_id, "failed") == []  # a late second ending is ignored
    job = Job(job_id="j", name="j")
    reg.add_job(job)
    reg.set_job_state(job, "running")
    reg.set_job_state(job, "succeeded")
    with pytest.raises(IllegalTransition):
        reg.set_job_state(job, "running")
    reg.set_location("m", "a:disk", "ready")
    with pytest.raises(IllegalTransition):  # a ready copy is deleted first, never rewritten in place
        reg.set_location("m", "a:disk", "copying")
