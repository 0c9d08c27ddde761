"""The result hook of every op kind, in one table: what an op's ending changes in the registry.

A kind without an entry changes nothing but the op itself (serve, health_check, logs: the
agent reports services as they change). The dispatcher is built with this table.
"""

from __future__ import annotations

from gswarm.head.copies import delete_result, write_result
from gswarm.head.dispatcher import ResultHook
from gswarm.head.routes import probe_result
from gswarm.head.services import load_result, stop_result
from gswarm.head.transfers import fetch_result

RESULT_HOOKS: dict[str, ResultHook] = {
    "probe": probe_result,
    "download": write_result,
    "fetch": fetch_result,
    "copy": write_result,
    "delete": delete_result,
    "load": load_result,
    "stop": stop_result,
}
