"""The agent's handler table: every op kind an agent runs, matched on its typed args.

Adding an op kind means one Args/Result pair in `gswarm.ops`, one case here and its handler.
"""

from __future__ import annotations

from gswarm.agent import serving, tier_ops
from gswarm.agent.context import OpContext, Reply
from gswarm.errors import GswarmError
from gswarm.ops import (
    CopyArgs,
    DeleteArgs,
    DownloadArgs,
    FetchArgs,
    HealthCheckArgs,
    LoadArgs,
    LogsArgs,
    OpArgs,
    OpResult,
    ProbeArgs,
    ProbeResult,
    ReplicateArgs,
    ServeArgs,
    StopArgs,
)


async def probe(ctx: OpContext) -> Reply:
    """Re-read inventory and holdings and report them."""
    inventory, holdings, partials = await ctx.agent.survey()
    return Reply(ProbeResult(inventory=inventory, holdings=holdings, partials=partials), holdings)


async def run_op(ctx: OpContext, args: OpArgs) -> OpResult | Reply:
    """Run one op by its kind."""
    match args:
        case ProbeArgs():
            return await probe(ctx)
        case DownloadArgs():
            return await tier_ops.download(ctx, args)
        case FetchArgs():
            return await tier_ops.fetch(ctx, args)
        case CopyArgs():
            return await tier_ops.copy(ctx, args)
        case DeleteArgs():
            return await tier_ops.delete(ctx, args)
        case LoadArgs():
            return await serving.load(ctx, args)
        case ServeArgs():
            return await serving.serve(ctx, args)
        case StopArgs():
            return await serving.stop(ctx, args)
        case HealthCheckArgs():
            return await serving.health_check(ctx, args)
        case LogsArgs():
            return await serving.logs(ctx, args)
        case ReplicateArgs():
            raise GswarmError("replicate runs on the head, not on an agent", code="unsupported")
