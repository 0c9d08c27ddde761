"""The head's Prometheus metrics: one `CollectorRegistry` per head (tests run many heads in one
process), exposed at `/metrics` in the text format.

Gauges (nodes, tiers, GPUs, copies, jobs, services) are read from the registry at scrape time by
a custom collector: nothing is kept up to date on the hot path. Counters and histograms change
only where something ends: an op (`op_ended`, called for every op that reaches an end state) and
a batch written by the store's writer thread (`observe_store_write`). Progress ticks cost nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, get_args

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter
from prometheus_client import Histogram as PromHistogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from gswarm import __version__
from gswarm.ops import CopyResult, DownloadResult, FetchResult, LoadResult, Op
from gswarm.states import JobState, LocationState, NodeStatus, OpState, ServiceState

if TYPE_CHECKING:
    from gswarm.head.state import Head

OP_DURATION_BUCKETS = (
    0.01,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
    7200.0,
    21600.0,
)
"""Seconds: from a probe (milliseconds) to a large download (hours)."""

STORE_WRITE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""Seconds from queueing a write to its commit (the writer groups writes for 3 ms)."""

BYTE_KINDS = ("hub", "peer", "tier", "gpu")
"""Where the bytes of a written copy came from: the model's source (the Hub, a URL, a file), a
peer node's data server, another tier of the same node, or a tier of the node onto a GPU."""


def bytes_moved(op: Op) -> tuple[str, int] | None:
    """Which of `BYTE_KINDS` a succeeded op's written copy moved, and how many bytes; None when
    it wrote nothing (another kind, or the copy was already there)."""
    match op.result:
        case DownloadResult(from_peer=peer) as r:
            kind = "peer" if peer else "hub"
        case FetchResult() as r:
            kind = "peer"
        case CopyResult() as r:
            kind = "tier"
        case LoadResult() as r:
            kind = "gpu"
        case _:
            return None
    if r.already_present or r.size <= 0:
        return None
    return kind, r.size


def _tier(device: str) -> str:
    return device.partition(":")[2] or device


class _ClusterCollector:
    """Reads the head's registry at scrape time (on the event loop, like every other read)."""

    def __init__(self, head: Head) -> None:
        self._head = head

    def describe(self) -> Iterable[Metric]:
        """Nothing up front: the registry never checks these names for clashes."""
        return ()

    def collect(self) -> Iterator[Metric]:
        """Every gauge, computed from the registry as it is now."""
        head = self._head
        reg = head.registry
        info = GaugeMetricFamily("gswarm_head_info", "The head's version.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield GaugeMetricFamily("gswarm_models", "Registered models.", value=len(reg.models))

        by_status = Counter(n.status for n in reg.nodes.values())
        nodes = GaugeMetricFamily("gswarm_nodes", "Known nodes by status.", labels=["status"])
        for status in get_args(NodeStatus):
            nodes.add_metric([status], by_status[status])
        yield nodes
        yield GaugeMetricFamily(
            "gswarm_agents_connected", "Agents holding a socket to the head.", value=head.agents.count
        )

        node_up = GaugeMetricFamily("gswarm_node_online", "1 while the node is online.", labels=["node"])
        gpus = GaugeMetricFamily("gswarm_node_gpus", "GPUs the node reports.", labels=["node"])
        gpu_total = GaugeMetricFamily(
            "gswarm_gpu_memory_total_bytes", "Memory of a GPU.", labels=["node", "gpu"]
        )
        gpu_free = GaugeMetricFamily(
            "gswarm_gpu_memory_free_bytes", "Free memory of a GPU.", labels=["node", "gpu"]
        )
        gpu_util = GaugeMetricFamily(
            "gswarm_gpu_utilization_percent", "Utilisation of a GPU (NVML).", labels=["node", "gpu"]
        )
        capacity = GaugeMetricFamily(
            "gswarm_tier_capacity_bytes",
            "Size of a storage tier (its quota when set).",
            labels=["node", "tier"],
        )
        free = GaugeMetricFamily(
            "gswarm_tier_free_bytes", "Free space of a storage tier.", labels=["node", "tier"]
        )
        for node_id, node in sorted(reg.nodes.items()):
            node_up.add_metric([node_id], 1 if node.status == "online" else 0)
            gpus.add_metric([node_id], len(node.inventory.gpus))
            for g in node.inventory.gpus:
                labels = [node_id, f"gpu{g.index}"]
                gpu_total.add_metric(labels, g.memory_total)
                gpu_free.add_metric(labels, g.memory_free)
                gpu_util.add_metric(labels, g.utilization)
            for t in node.inventory.tiers:
                capacity.add_metric([node_id, t.name], t.capacity)
                free.add_metric([node_id, t.name], t.free)
        yield from (node_up, gpus, gpu_total, gpu_free, gpu_util, capacity, free)

        counts: Counter[tuple[str, str]] = Counter()
        sizes: Counter[tuple[str, str]] = Counter()
        for loc in reg.locations.values():
            key = (_tier(loc.device), loc.state)
            counts[key] += 1
            sizes[key] += loc.size
        tiers = sorted({"disk", "dram", *(t for t, _ in counts)})
        locs = GaugeMetricFamily(
            "gswarm_locations", "Copies of models by tier and state.", labels=["tier", "state"]
        )
        loc_bytes = GaugeMetricFamily(
            "gswarm_location_bytes", "Bytes of the copies by tier and state.", labels=["tier", "state"]
        )
        for tier in tiers:
            for state in get_args(LocationState):
                locs.add_metric([tier, state], counts[(tier, state)])
                loc_bytes.add_metric([tier, state], sizes[(tier, state)])
        yield from (locs, loc_bytes)

        open_ops = Counter((op.kind, op.state) for op in reg.open_ops())
        ops = GaugeMetricFamily(
            "gswarm_ops_open", "Ops not yet ended by kind and state.", labels=["kind", "state"]
        )
        for (kind, state), n in sorted(open_ops.items()):
            ops.add_metric([kind, state], n)
        yield ops

        yield _by_state(
            "gswarm_jobs", "Jobs by state.", get_args(JobState), (j.state for j in reg.jobs.values())
        )
        yield _by_state(
            "gswarm_services",
            "Services by health (their state).",
            get_args(ServiceState),
            (s.state for s in reg.services.values()),
        )
        yield GaugeMetricFamily(
            "gswarm_event_subscribers", "Event subscribers attached now.", value=head.bus.subscriber_count
        )
        yield CounterMetricFamily(
            "gswarm_event_subscribers_dropped",
            "Event subscribers dropped as too slow.",
            value=head.bus.dropped_count,
        )


def _by_state(name: str, doc: str, states: tuple[str, ...], values: Iterable[str]) -> GaugeMetricFamily:
    counts = Counter(values)
    family = GaugeMetricFamily(name, doc, labels=["state"])
    for state in states:
        family.add_metric([state], counts[state])
    return family


class Metrics:
    """The metrics of one head."""

    def __init__(self, head: Head) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.ops = PromCounter(
            "gswarm_ops", "Ops ended, by kind and outcome.", ["kind", "outcome"], registry=self.registry
        )
        self.op_seconds = PromHistogram(
            "gswarm_op_duration_seconds",
            "Seconds from an op's creation to its end, by kind and outcome.",
            ["kind", "outcome"],
            buckets=OP_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.bytes_moved = PromCounter(
            "gswarm_bytes_moved",
            "Bytes of the copies written by ops that succeeded, by where they came from and the node "
            "that wrote them.",
            ["kind", "node"],
            registry=self.registry,
        )
        self.store_write = PromHistogram(
            "gswarm_store_write_seconds",
            "Seconds from queueing a state write to its commit in SQLite.",
            buckets=STORE_WRITE_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_ClusterCollector(head))
        # prometheus_client's `labels()` costs tens of µs a call (a lock, label checks); an op's
        # end is on the control plane's hot path, so each (kind, outcome) child is looked up once.
        self._ended: dict[tuple[str, str], tuple[PromCounter, PromHistogram]] = {}

    def op_ended(self, op: Op) -> None:
        """Count an op that has just reached an end state (once per op)."""
        outcome: OpState = op.state
        children = self._ended.get((op.kind, outcome))
        if children is None:
            children = (self.ops.labels(op.kind, outcome), self.op_seconds.labels(op.kind, outcome))
            self._ended[(op.kind, outcome)] = children
        count, seconds = children
        count.inc()
        if op.finished_at is not None and op.created_at:
            seconds.observe(max(0.0, op.finished_at - op.created_at))
        if outcome != "succeeded":
            return  # a failed op's bytes are moved again when it is retried: count copies once
        moved = bytes_moved(op)
        if moved is not None:
            self.bytes_moved.labels(moved[0], op.node_id).inc(moved[1])

    def observe_store_write(self, seconds: float) -> None:
        """A batch of state writes committed `seconds` after the first of them was queued
        (called from the store's writer thread; prometheus_client's metrics are thread-safe)."""
        self.store_write.observe(seconds)

    def render(self, accept: str) -> tuple[bytes, str]:
        """The exposition (text format, or OpenMetrics when asked for) and its content type."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


def metrics_response(head: Head, request: web.Request) -> web.Response:
    """The answer to a scrape of `head`'s metrics."""
    body, content_type = head.metrics.render(request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})
