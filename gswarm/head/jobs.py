"""Workflows: job files run as DAGs of actions, each action as one or more ops.

`POST /jobs` validates the whole file first (422 with every problem), then a runner task
starts every action whose dependencies have succeeded, in parallel, retrying failures with
backoff; a failed action skips its dependents unless it has `continue_on_error`. Actions that
write the same model on the same device, in this job or another, take a lock first, so they
never interleave. Jobs are persisted action by action; a restarted head resumes them,
waiting on the ops already running (which the agents report back) and starting the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

import msgspec
from aiohttp import web

from gswarm.api import CopyBody, DownloadBody, HealthBody, LoadBody, ReplicateBody, ServeBody
from gswarm.devices import parse_device
from gswarm.errors import Conflict, GswarmError
from gswarm.head.http import json_response, query_int, read_body
from gswarm.head.replication import submit_replicate
from gswarm.head.services import submit_health_check, submit_load, submit_serve, submit_stop
from gswarm.head.state import HEAD_KEY, Head
from gswarm.head.transfers import delete_copy, submit_copy, submit_download
from gswarm.ops import Op
from gswarm.protocol import Job, JobAction
from gswarm.states import ACTION_TERMINAL, ActionState
from gswarm.workflow import (
    CopyAction,
    DeleteAction,
    DownloadAction,
    HealthCheckAction,
    JobSpec,
    LoadAction,
    MoveAction,
    ReplicateAction,
    ServeAction,
    StopAction,
    load_text,
    validate,
)

log = logging.getLogger(__name__)

_MAX_BACKOFF = 30.0


def writes(action: JobAction) -> list[tuple[str, str]]:
    """The (model, device) pairs an action writes: the locks it must hold."""
    out = []
    for device in action.spec.writes():
        with contextlib.suppress(GswarmError):
            out.append((action.spec.model, str(parse_device(device))))
    return sorted(set(out))


async def submit_action(head: Head, action: JobAction) -> Op:
    """Start the op of one action through the same checks as the REST routes."""
    f = action.spec
    timeout = action.timeout
    match f:
        case DownloadAction():
            body = DownloadBody(
                model_name=f.model,
                source_url=f.source,
                target_device=f.target,
                allow_patterns=f.include,
                ignore_patterns=f.exclude,
                timeout=timeout,
            )
            return (await submit_download(head, body)).op
        case CopyAction() | MoveAction():
            cbody = CopyBody(
                model_name=f.model,
                source_device=f.from_,
                target_device=f.to,
                keep_source=f.keep_source,
                timeout=timeout,
            )
            return (await submit_copy(head, cbody, move=isinstance(f, MoveAction))).op
        case DeleteAction():
            return await delete_copy(head, f.model, parse_device(f.device), force=f.force)
        case LoadAction():
            lbody = LoadBody(model_name=f.model, device=f.device, source_device=f.from_, timeout=timeout)
            return (await submit_load(head, lbody)).op
        case ServeAction():
            sbody = ServeBody(
                model_name=f.model,
                device=f.device,
                port=f.port,
                config=f.config,
                backend=f.backend,
                timeout=timeout,
            )
            return (await submit_serve(head, sbody)).op
        case StopAction():
            return (await submit_stop(head, f.model, f.device)).op
        case ReplicateAction():
            rbody = ReplicateBody(
                model_name=f.model,
                targets=list(f.targets or []),
                all_nodes=f.all_nodes,
                source_device=f.from_,
                timeout=timeout,
            )
            return (await submit_replicate(head, rbody)).op
        case HealthCheckAction():
            hbody = HealthBody(model_name=f.model or None, device=f.device, node_id=f.node)
            return (await submit_health_check(head, hbody)).op
    raise AssertionError(f"action {action.id}: no submit for {action.action}")


def _cancelling(job: Job) -> bool:
    # A function, not an inline test: another task may cancel the job between two awaits.
    return job.state == "cancelling"


class JobRunner:
    """Runs every job of a head."""

    def __init__(self, head: Head) -> None:
        self.head = head
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def create(self, spec: JobSpec) -> Job:
        """Record a validated job and start running it."""
        job_id = uuid.uuid4().hex[:12]
        actions = [
            JobAction(
                job_id=job_id,
                id=a.id,
                index=i,
                action=a.action,
                spec=a.fields,
                depends_on=a.depends_on,
                retries=a.retries,
                timeout=a.timeout,
                continue_on_error=a.continue_on_error,
            )
            for i, a in enumerate(spec.actions)
        ]
        job = Job(job_id=job_id, name=spec.name, description=spec.description, actions=actions)
        self.head.commit(self.head.registry.add_job(job))
        self.head.spawn(self.run(job), name=f"job-{job_id}")
        return job

    def resume_all(self) -> None:
        """After a restart: carry on with every job that had not ended."""
        for job in self.head.registry.jobs.values():
            if not job.terminal:
                self.head.spawn(self.run(job), name=f"job-{job.job_id}")

    def _action(
        self,
        job: Job,
        action: JobAction,
        state: ActionState,
        error: str | None = None,
        op_id: str | None = None,
    ) -> None:
        self.head.commit(self.head.registry.update_action(job, action, state, error=error, op_id=op_id))

    async def run(self, job: Job) -> None:
        """Drive a job's DAG to its end."""
        reg = self.head.registry
        if job.state == "pending":
            self.head.commit(reg.set_job_state(job, "running"))
        by_id = {a.id: a for a in job.actions}
        tasks: dict[str, asyncio.Task[None]] = {}
        try:
            while True:
                for a in job.actions:
                    if a.id in tasks or a.state in ACTION_TERMINAL:
                        continue
                    if _cancelling(job):
                        self._action(job, a, "cancelled", "job cancelled")
                        continue
                    deps = [by_id[d] for d in a.depends_on if d in by_id]
                    if any(d.state not in ACTION_TERMINAL for d in deps):
                        continue
                    blocking = [
                        d
                        for d in deps
                        if d.state != "succeeded" and not (d.state == "failed" and d.continue_on_error)
                    ]
                    if blocking:
                        why = f"skipped: {blocking[0].id} {blocking[0].state}"
                        self._action(job, a, "skipped", why)
                        continue
                    tasks[a.id] = asyncio.create_task(
                        self._run_action(job, a), name=f"job-{job.job_id}-{a.id}"
                    )
                live = [t for t in tasks.values() if not t.done()]
                if not live:
                    stuck = [a for a in job.actions if a.state not in ACTION_TERMINAL and a.id not in tasks]
                    for a in stuck:  # only possible with an unsatisfiable dependency
                        self._action(job, a, "skipped", "dependencies never ran")
                    break
                await asyncio.wait(live, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks.values():
                t.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
        self._finish(job)

    def _finish(self, job: Job) -> None:
        failed = [a for a in job.actions if a.state in ("failed", "skipped") and not a.continue_on_error]
        reg = self.head.registry
        if _cancelling(job) or any(a.state == "cancelled" for a in job.actions):
            self.head.commit(reg.set_job_state(job, "cancelled", "cancelled"))
        elif failed:
            error = f"{failed[0].id}: {failed[0].error}" + (
                f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
            )
            self.head.commit(reg.set_job_state(job, "failed", error))
        else:
            self.head.commit(reg.set_job_state(job, "succeeded"))

    async def _run_action(self, job: Job, action: JobAction) -> None:
        keys = writes(action)
        locks = [self._locks.setdefault(k, asyncio.Lock()) for k in keys]
        if any(lock.locked() for lock in locks):
            self._action(job, action, "waiting", "waiting for another action on the same copy")
        async with contextlib.AsyncExitStack() as stack:
            for lock in locks:
                await stack.enter_async_context(lock)
            await self._attempts(job, action)

    async def _attempts(self, job: Job, action: JobAction) -> None:
        reg = self.head.registry
        # After a restart, an op the action had started is still its op: wait for it.
        resume = reg.ops.get(action.op_ids[-1]) if action.op_ids and action.state == "running" else None
        while True:
            if _cancelling(job):
                self._action(job, action, "cancelled", "job cancelled")
                return
            error = ""
            op: Op | None = None
            if resume is not None:
                op, resume = resume, None
            else:
                reg.action_attempt(action)
                try:
                    op = await submit_action(self.head, action)
                except GswarmError as exc:
                    error = exc.message
                else:
                    self._action(job, action, "running", "", op_id=op.op_id)
            if op is not None:
                op = await self.head.dispatcher.wait(op.op_id, 7 * 86400)
                if op.state == "succeeded":
                    self._action(job, action, "succeeded")
                    return
                error = op.error.message if op.error else op.state
                if _cancelling(job):
                    self._action(job, action, "cancelled", error)
                    return
            if action.attempts > action.retries:
                self._action(job, action, "failed", error)
                return
            self._action(job, action, "retrying", error)
            await asyncio.sleep(min(_MAX_BACKOFF, 0.5 * 2 ** (action.attempts - 1)))

    async def cancel(self, job_id: str) -> Job:
        """Cancel a job: its running ops are cancelled, the rest skipped."""
        job = self.head.registry.get_job(job_id)
        if job.terminal:
            raise Conflict(f"job {job_id} has already ended ({job.state})", code="job_finished")
        self.head.commit(self.head.registry.set_job_state(job, "cancelling"))
        for a in job.actions:
            if a.state in ("running", "retrying") and a.op_ids:
                op = self.head.registry.ops.get(a.op_ids[-1])
                if op is not None and not op.terminal:
                    with contextlib.suppress(GswarmError):
                        await self.head.dispatcher.cancel(op.op_id, f"job {job_id} cancelled")
        return job


RUNNER_KEY: web.AppKey[JobRunner] = web.AppKey("job_runner")


def _parse_job(body: bytes, max_chars: int) -> JobSpec:
    return validate(load_text(body.decode(errors="replace"), "request body", max_chars))


async def create_job(request: web.Request) -> web.Response:
    """`POST /jobs`: a job as JSON (the original body) or YAML, up to `max_job_bytes` (8 MiB),
    parsed and validated in a thread within the limits of `workflow.load_text`; 422 with every
    problem."""
    head = request.app[HEAD_KEY]
    limit = head.settings.max_job_bytes
    body = await read_body(request, limit, "job file")
    spec = await asyncio.to_thread(_parse_job, body, limit)
    job = request.app[RUNNER_KEY].create(spec)
    return json_response(job, status=202)


async def list_jobs(request: web.Request) -> web.Response:
    """`GET /jobs`: every job, newest first, without its actions."""
    reg = request.app[HEAD_KEY].registry
    jobs = sorted(reg.jobs.values(), key=lambda j: j.created_at, reverse=True)
    limit = query_int(request, "limit", 100, lo=1)
    return json_response({"jobs": [msgspec.structs.replace(j, actions=[]) for j in jobs[:limit]]})


async def get_job(request: web.Request) -> web.Response:
    """`GET /jobs/{job_id}`: the job and each action's state, ops, timings and error."""
    return json_response(request.app[HEAD_KEY].registry.get_job(request.match_info["job_id"]))


async def cancel_job(request: web.Request) -> web.Response:
    """`POST /jobs/{job_id}/cancel`."""
    return json_response(await request.app[RUNNER_KEY].cancel(request.match_info["job_id"]))


def setup(app: web.Application) -> None:
    """Attach the job routes and the runner."""
    head = app[HEAD_KEY]
    runner = JobRunner(head)
    app[RUNNER_KEY] = runner
    head.on_started.append(runner.resume_all)
    r = app.router
    r.add_post("/jobs", create_job)
    r.add_get("/jobs", list_jobs)
    r.add_get("/jobs/{job_id}", get_job)
    r.add_post("/jobs/{job_id}/cancel", cancel_job)
