#!/usr/bin/env python3
"""An example Leasehold worker on a streaming session (WorkerService/Connect).

It registers, works on the tasks the server pushes, heartbeats their leases,
sends each outcome, stops a task when told to, and reconnects, rotating
through the given servers, when a node drains or the stream breaks. A task
still running across a reconnect keeps its lease: the new session re-attaches
it by heartbeating with its token, and its outcome goes out on the new stream.
A busy worker uses the batched forms: several tasks pushed at once come in one
`tasks` message, and outcomes ready at the same moment go out in one
`outcomes` message, answered by one `acks`.
On SIGTERM or SIGINT it drains: no new tasks, the running ones get
--drain-seconds to finish, the rest are given back, and it exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import os
import random
import re
import signal
import socket
import sys
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import grpc
from google.protobuf import json_format, struct_pb2

# The stubs are generated into gen/ (see README.md), not installed.
sys.path.insert(0, str(Path(__file__).resolve().parent / "gen"))
from leasehold.v1 import task_pb2  # noqa: E402
from leasehold.v1 import worker_service_pb2 as pb  # noqa: E402
from leasehold.v1 import worker_service_pb2_grpc as pb_grpc  # noqa: E402

log = logging.getLogger("worker")

# Reconnect delay: a random wait up to an exponential ceiling ("full
# jitter"), so that workers cut off together do not come back together.
BACKOFF_BASE_SECONDS = 0.2
BACKOFF_CAP_SECONDS = 10.0
# When the server could not store an outcome (database unreachable).
RESEND_DELAY_SECONDS = 1.0
# After the drain timeout, how long the last outcomes and releases may take
# to be acknowledged before the worker exits anyway.
ACK_WAIT_SECONDS = 5.0
# The server refuses an error text over 65,536 characters, or with control
# characters other than tab and line breaks: longer texts are cut well short
# of the limit, and those characters replaced.
MAX_ERROR_CHARS = 60_000
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# A registration refused for these reasons fails the same way on every
# server: retrying cannot help.
FATAL_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION}
# The messages that can travel together in one `outcomes` message, at most
# MAX_OUTCOMES of them (the server's limit) and about MAX_OUTCOME_BATCH_BYTES
# encoded (well inside the server's message limit; a larger one goes alone).
OUTCOME_KINDS = ("complete", "fail", "release")
MAX_OUTCOMES = 1_000
MAX_OUTCOME_BATCH_BYTES = 1024 * 1024
# HTTP/2 pings notice a dead node even while the stream is idle.
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]


class TaskFailed(Exception):
    """Raised by a handler to fail the attempt with a message."""

    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


class Refused(Exception):
    """The server refused the registration itself (e.g. invalid slots)."""


async def generate_thumbnail(params: dict, worker_id: str) -> dict:
    """The demo handler: "renders" a thumbnail by sleeping `sleep_ms`.

    `{"fail": "message"}` fails the attempt with that message, for good with
    `"permanent": true`; otherwise the server retries it after a backoff.
    """
    if "fail" in params:
        raise TaskFailed(str(params["fail"]), permanent=bool(params.get("permanent")))
    await asyncio.sleep(float(params.get("sleep_ms", 100)) / 1000)
    image = str(params.get("image", "image.png"))
    return {"thumbnail": f"thumbs/{image}", "worker": worker_id}


@dataclass
class Job:
    """A task this worker holds, from hand-out until its outcome is acknowledged."""

    task_id: str
    lease_token: str
    runner: asyncio.Task | None = None
    # Whether a heartbeat has named this lease yet. A "lost" answer about a
    # lease never heartbeated concerns an earlier lease of the same task.
    heartbeated: bool = False
    # The complete, fail or release message, kept until acknowledged: if the
    # stream breaks first, the next session sends it again (the server
    # accepts a repeat with the same token).
    outcome: pb.ConnectRequest | None = None
    # Outcome messages sent on the live session and not answered yet.
    unanswered: int = 0
    # Whether a malformed outcome has already been replaced by a plain fail.
    replaced: bool = False

    def cancel(self) -> None:
        if self.runner is not None:
            self.runner.cancel()


class Worker:
    def __init__(
        self,
        servers: list[str],
        worker_id: str,
        task_types: list[str],
        slots: int,
        lease_seconds: int | None,
        drain_seconds: float,
        tls_ca: bytes | None = None,
        token: str | None = None,
    ):
        self.servers = servers
        # PEM of the CAs to trust for TLS servers (None: the system's).
        self.tls_ca = tls_ca
        # Sent as `authorization: Bearer <token>` to a node with --auth required.
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.worker_id = worker_id
        self.task_types = task_types
        self.slots = slots
        self.lease_seconds = lease_seconds
        self.drain_seconds = drain_seconds
        # Survives reconnects: leases belong to the database, not the stream.
        self.jobs: dict[str, Job] = {}
        # Messages for the live session; None between sessions.
        self.outbox: asyncio.Queue[pb.ConnectRequest | None] | None = None
        # Acks name only the task: when a task comes back under a new lease,
        # this many acks still due for the old lease's outcome are skipped.
        self.stale_acks: Counter[str] = Counter()
        self.failures = 0
        self.draining = False

    async def run(self) -> None:
        """Serves sessions until SIGTERM or SIGINT, then drains.

        Raises Refused when the server refuses the registration.
        """
        loop = asyncio.get_running_loop()
        signalled = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, signalled.set)
        serving = asyncio.create_task(self.serve())
        waiting = asyncio.create_task(signalled.wait())
        await asyncio.wait({serving, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if serving.done():
            waiting.cancel()
            serving.result()  # serve() ends only by raising Refused
            return
        # A second signal acts as usual: it stops the worker at once.
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await self.drain()
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving

    async def serve(self) -> None:
        """Keeps a session open, moving to the next server whenever one ends."""
        for server in itertools.cycle(self.servers):
            try:
                if await self.session(server):
                    continue  # the node drained: the next one at once
                log.warning("session on %s ended without a drain notice", server)
            except grpc.aio.AioRpcError as err:
                log.warning("session on %s: %s %s", server, err.code().name, err.details())
            self.failures += 1
            ceiling = BACKOFF_BASE_SECONDS * 2 ** min(self.failures, 10)
            delay = random.uniform(0, min(BACKOFF_CAP_SECONDS, ceiling))
            log.info("reconnecting in %.2fs", delay)
            await asyncio.sleep(delay)

    async def session(self, server: str) -> bool:
        """Serves one session; True if it ended after the node's drain notice.

        Raises AioRpcError when the stream breaks or is refused, Refused when
        the registration is.
        """
        outbox: asyncio.Queue[pb.ConnectRequest | None] = asyncio.Queue()
        outbox.put_nowait(pb.ConnectRequest(register=self.register_request()))

        async def requests():
            # Whatever is queued by the time grpc asks for the next message
            # was ready at the same moment (several tasks of one push that
            # ended before this ran, or the outcomes re-sent after a
            # reconnect): it goes out together, its outcomes packed. None
            # ends the requests with the session; otherwise grpc would wait
            # on this generator forever.
            while True:
                ready = [await outbox.get()]
                while not outbox.empty():
                    ready.append(outbox.get_nowait())
                end = ready.index(None) if None in ready else len(ready)
                for message in packed(ready[:end]):
                    yield message
                if end < len(ready):
                    return

        registered = drained = False
        heartbeats: asyncio.Task | None = None
        log.info("connecting to %s", server)
        async with self.channel(server) as channel:
            call = pb_grpc.WorkerServiceStub(channel).Connect(requests(), metadata=self.metadata)
            try:
                async for response in call:
                    match response.WhichOneof("kind"):
                        case "registered":
                            registered = True
                            interval = response.registered.heartbeat_interval.ToTimedelta()
                            heartbeats = asyncio.create_task(
                                self.heartbeat_loop(interval.total_seconds())
                            )
                            self.on_registered(server, response.registered, outbox)
                        case "task":
                            self.on_task(response.task)
                        case "tasks":
                            for leased in response.tasks.tasks:
                                self.on_task(leased)
                        case "heartbeat_ack":
                            self.on_heartbeat_ack(response.heartbeat_ack)
                        case "ack":
                            self.on_ack(response.ack)
                        case "acks":
                            # One per outcome of an `outcomes` message, in order.
                            for ack in response.acks.acks:
                                self.on_ack(ack)
                        case "cancel":
                            reason = enum_name(pb.CancelReason, response.cancel.reason)
                            self.stop(response.cancel.task_id, reason)
                        case "drain":
                            drained = True
                            self.on_drain(response.drain)
            except grpc.aio.AioRpcError as err:
                if not registered and err.code() in FATAL_CODES:
                    raise Refused(f"{err.code().name}: {err.details()}") from err
                raise
            finally:
                self.outbox = None
                outbox.put_nowait(None)
                if heartbeats is not None:
                    heartbeats.cancel()
        return drained

    def channel(self, server: str) -> grpc.aio.Channel:
        """A channel to `server`: TLS for https://, or for a bare host:port
        when a CA file was given; plaintext otherwise."""
        scheme, _, target = server.rpartition("://")
        secure = scheme == "https" or (not scheme and self.tls_ca is not None)
        if not secure:
            return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        credentials = grpc.ssl_channel_credentials(root_certificates=self.tls_ca)
        return grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS)

    def register_request(self) -> pb.RegisterWorker:
        register = pb.RegisterWorker(
            worker_id=self.worker_id,
            task_types=self.task_types,
            slots=self.slots,
            labels={"language": "python"},
            # Several tasks leased at once then come in one `tasks` message.
            batched_pushes=True,
        )
        if self.lease_seconds:
            register.lease_duration.FromTimedelta(timedelta(seconds=self.lease_seconds))
        return register

    def on_registered(
        self, server: str, registered: pb.SessionRegistered, outbox: asyncio.Queue
    ) -> None:
        log.info(
            "registered on %s: node=%s session=%s heartbeat every %.2fs",
            server,
            registered.node_id,
            registered.session_id,
            registered.heartbeat_interval.ToTimedelta().total_seconds(),
        )
        self.failures = 0
        self.outbox = outbox
        # Acks of what went out on an earlier stream never come on this one.
        self.stale_acks.clear()
        for job in self.jobs.values():
            job.unanswered = 0
        if self.draining:
            self.send(pb.ConnectRequest(drain=pb.DrainSession()))
        # Tasks from an earlier session: renewing their leases here attaches
        # them to this session (so the server counts them and can cancel
        # them), or tells us they were lost meanwhile.
        running = sum(1 for job in self.jobs.values() if job.outcome is None)
        if running:
            log.info("re-attaching %d running task(s)", running)
            self.heartbeat()
        for job in self.jobs.values():
            if job.outcome is not None:
                self.send_outcome(job)

    async def heartbeat_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.heartbeat()

    def heartbeat(self) -> None:
        """Renews the leases of the running tasks, each named with its token.

        Never an empty heartbeat: that renews every lease the session holds,
        so a lease whose outcome the server refused would be kept forever
        and its slot never freed. A lease no longer named runs out instead.
        """
        running = [job for job in self.jobs.values() if job.outcome is None]
        if not running:
            return
        for job in running:
            job.heartbeated = True
        renewals = [pb.LeaseRenewal(task_id=j.task_id, lease_token=j.lease_token) for j in running]
        self.send(pb.ConnectRequest(heartbeat=pb.SessionHeartbeat(leases=renewals)))

    def on_drain(self, drain: pb.DrainNotice) -> None:
        # Nothing new comes; the node ends the stream once our tasks are done
        # or its grace period is over. Tasks still running then go on to the
        # next node.
        log.info(
            "node draining (grace %.1fs): finishing %d task(s), then reconnecting",
            drain.grace_period.ToTimedelta().total_seconds(),
            len(self.jobs),
        )

    def on_task(self, leased: task_pb2.LeasedTask) -> None:
        task, lease = leased.task, leased.lease
        log.info("task %s (%s) received, attempt %d", task.id, task.task_type, lease.attempt)
        earlier = self.jobs.get(task.id)
        if earlier is not None:
            # Handed out again: our earlier lease ran out while we were away,
            # so that work and its outcome are void, and the acks still due
            # for that outcome must not settle the new lease.
            log.info("task %s: dropping the attempt of the earlier lease", task.id)
            earlier.cancel()
            self.stale_acks[task.id] += earlier.unanswered
        job = Job(task_id=task.id, lease_token=lease.lease_token)
        self.jobs[task.id] = job
        if self.draining:
            # Pushed before the server read our drain: give it back unstarted.
            self.release(job)
            return
        job.runner = asyncio.create_task(self.work(job, json_format.MessageToDict(task.params)))

    async def work(self, job: Job, params: dict) -> None:
        try:
            result = await generate_thumbnail(params, self.worker_id)
            outcome = pb.ConnectRequest(
                complete=pb.CompleteTaskRequest(
                    task_id=job.task_id, lease_token=job.lease_token, result=to_struct(result)
                )
            )
        except TaskFailed as err:
            outcome = fail_request(job, str(err), err.permanent)
        except Exception as err:
            # A bug in the handler: report it and let the server retry.
            log.exception("task %s: handler raised", job.task_id)
            outcome = fail_request(job, f"{type(err).__name__}: {err}", permanent=False)
        if self.jobs.get(job.task_id) is not job or job.outcome is not None:
            return  # taken away or given back meanwhile: nothing to send
        job.outcome = outcome
        self.send_outcome(job)

    def release(self, job: Job) -> None:
        """Gives a lease back: the task is pending again and the attempt does not count."""
        job.cancel()
        job.outcome = pb.ConnectRequest(
            release=pb.ReleaseTaskRequest(task_id=job.task_id, lease_token=job.lease_token)
        )
        self.send_outcome(job)

    def send(self, message: pb.ConnectRequest) -> None:
        if self.outbox is not None:
            self.outbox.put_nowait(message)

    def send_outcome(self, job: Job) -> None:
        # Between sessions the outcome waits in its job; on_registered sends it.
        if self.outbox is not None:
            job.unanswered += 1
            self.outbox.put_nowait(job.outcome)

    def on_ack(self, ack: pb.OutcomeAck) -> None:
        if ack.kind == pb.OUTCOME_KIND_PROGRESS:
            return  # this worker reports no progress
        if self.stale_acks[ack.task_id] > 0:
            self.stale_acks[ack.task_id] -= 1
            return  # about the outcome of an earlier lease of the task
        job = self.jobs.get(ack.task_id)
        if job is None or job.outcome is None:
            return  # about an outcome already acknowledged
        job.unanswered -= 1
        if ack.status == pb.ACK_STATUS_UNAVAILABLE:
            log.warning(
                "task %s: outcome not stored (%s), sending it again in %.0fs",
                ack.task_id,
                ack.message,
                RESEND_DELAY_SECONDS,
            )
            asyncio.get_running_loop().call_later(RESEND_DELAY_SECONDS, self.resend, job)
            return
        if ack.status == pb.ACK_STATUS_INVALID:
            replacement = self.replacement(job, ack)
            if replacement is not None:
                job.outcome = replacement
                self.send_outcome(job)
                return
        del self.jobs[ack.task_id]
        if ack.status != pb.ACK_STATUS_OK:
            log.warning(
                "task %s: outcome refused: %s %s",
                ack.task_id,
                enum_name(pb.AckStatus, ack.status),
                ack.message,
            )
        elif ack.kind == pb.OUTCOME_KIND_COMPLETE:
            log.info("task %s completed", ack.task_id)
        elif ack.kind == pb.OUTCOME_KIND_RELEASE:
            log.info("task %s released", ack.task_id)
        else:
            log.info(
                "task %s failed (%s): %.200s",
                ack.task_id,
                enum_name(task_pb2.TaskStatus, ack.task.status),
                ack.task.last_error,
            )

    def replacement(self, job: Job, ack: pb.OutcomeAck) -> pb.ConnectRequest | None:
        """A fail to send instead of an outcome refused as malformed.

        Giving up instead would leave the task processing until its lease runs
        out, and then retry it to the same end. None when the replacement was
        refused too: the job is dropped and the lease runs out.
        """
        if job.replaced:
            return None
        job.replaced = True
        kind = job.outcome.WhichOneof("kind")
        log.warning("task %s: %s refused (%s), failing it instead", job.task_id, kind, ack.message)
        if kind == "complete":
            # The result cannot be stored (over the size limit, say): the same
            # result would come again, so the task fails for good.
            return fail_request(job, f"result refused: {ack.message}", permanent=True)
        if kind == "fail":
            # Again in a form always accepted: the error plain and cut short
            # (fail_request does it), no retry_after.
            return fail_request(job, job.outcome.fail.error, job.outcome.fail.permanent)
        return None

    def resend(self, job: Job) -> None:
        if self.jobs.get(job.task_id) is job:
            self.send_outcome(job)

    def on_heartbeat_ack(self, ack: pb.HeartbeatResponse) -> None:
        for state in ack.leases:
            if state.status != pb.LEASE_STATUS_HELD:
                why = enum_name(pb.LeaseStatus, state.status)
                self.stop(state.task_id, why, from_heartbeat=True)

    def stop(self, task_id: str, why: str, from_heartbeat: bool = False) -> None:
        """Stops the work on a task whose lease is gone; nothing is sent for it."""
        job = self.jobs.get(task_id)
        if job is None or job.outcome is not None:
            return  # finished already: the outcome's ack tells what happened
        if from_heartbeat and not job.heartbeated:
            return  # a heartbeat's answer about an earlier lease of this task
        del self.jobs[task_id]
        job.cancel()
        log.info("task %s stopped: %s", task_id, why)

    async def drain(self) -> None:
        """Takes no new tasks, lets the running ones finish for the drain
        timeout, gives the rest back, and waits (bounded) for every outcome
        and release to be acknowledged."""
        self.draining = True
        log.info(
            "shutting down: finishing %d task(s) for up to %.1fs",
            len(self.jobs),
            self.drain_seconds,
        )
        self.send(pb.ConnectRequest(drain=pb.DrainSession()))
        if await self.settled(self.drain_seconds):
            return
        running = [job for job in self.jobs.values() if job.outcome is None]
        if running:
            log.warning("drain timeout: releasing %d task(s) still running", len(running))
        for job in running:
            self.release(job)
        if not await self.settled(ACK_WAIT_SECONDS):
            # Their leases run out on their own and the tasks are retried.
            log.warning("exiting with %d outcome(s) not acknowledged", len(self.jobs))

    async def settled(self, seconds: float) -> bool:
        """Waits up to `seconds` for every job to be acknowledged."""
        deadline = asyncio.get_running_loop().time() + seconds
        while self.jobs and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        return not self.jobs


def packed(messages: list[pb.ConnectRequest]) -> list[pb.ConnectRequest]:
    """`messages` as they go on the stream, in order: outcomes (completes,
    fails, releases) that follow each other packed into `outcomes` messages
    of up to MAX_OUTCOMES and about MAX_OUTCOME_BATCH_BYTES (a larger one
    alone), everything else as it is. A lone outcome keeps its single
    form."""
    out: list[pb.ConnectRequest] = []
    run: list[pb.ConnectRequest] = []
    size = 0

    def flush() -> None:
        nonlocal size
        size = 0
        if len(run) == 1:
            out.append(run[0])
        elif run:
            outcomes = [as_outcome(message) for message in run]
            out.append(pb.ConnectRequest(outcomes=pb.OutcomeBatch(outcomes=outcomes)))
        run.clear()

    for message in messages:
        if message.WhichOneof("kind") not in OUTCOME_KINDS:
            flush()
            out.append(message)
            continue
        length = message.ByteSize()
        if run and size + length > MAX_OUTCOME_BATCH_BYTES:
            flush()
        run.append(message)
        size += length
        if len(run) == MAX_OUTCOMES:
            flush()
    flush()
    return out


def as_outcome(message: pb.ConnectRequest) -> pb.Outcome:
    """A complete, fail or release as one outcome of an `outcomes` message."""
    kind = message.WhichOneof("kind")
    return pb.Outcome(**{kind: getattr(message, kind)})


def fail_request(job: Job, error: str, permanent: bool) -> pb.ConnectRequest:
    return pb.ConnectRequest(
        fail=pb.FailTaskRequest(
            task_id=job.task_id,
            lease_token=job.lease_token,
            error=error_text(error),
            permanent=permanent,
        )
    )


def error_text(error: str) -> str:
    """An error text the server accepts: plain, and cut short when too long."""
    error = CONTROL_CHARS.sub("\ufffd", error)
    if len(error) > MAX_ERROR_CHARS:
        error = f"{error[:MAX_ERROR_CHARS]}... ({len(error):,} characters in all)"
    return error


def enum_name(enum, value: int) -> str:
    """The name of an enum value; one newer than the generated code (which
    makes `Name` raise ValueError) is shown as its number."""
    try:
        return enum.Name(value)
    except ValueError:
        return str(value)


def to_struct(value: dict) -> struct_pb2.Struct:
    result = struct_pb2.Struct()
    result.update(value)
    return result


def split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--server",
        default=os.environ.get("LEASEHOLD_SERVER", "127.0.0.1:50051"),
        help="comma-separated host:port list, tried in turn; https://host:port for TLS"
        " (env LEASEHOLD_SERVER)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("LEASEHOLD_TOKEN"),
        help="bearer token of a worker, for a node with --auth required (env LEASEHOLD_TOKEN)",
    )
    parser.add_argument(
        "--tls-ca",
        default=os.environ.get("LEASEHOLD_TLS_CA"),
        help="PEM file of the CAs to trust for TLS instead of the system's; a bare"
        " host:port then means TLS (env LEASEHOLD_TLS_CA)",
    )
    parser.add_argument(
        "--worker-id",
        default=os.environ.get("LEASEHOLD_WORKER_ID", f"{socket.gethostname()}-{os.getpid()}"),
        help="worker id shown as the tasks' locked_by (env LEASEHOLD_WORKER_ID)",
    )
    parser.add_argument(
        "--task-types",
        default="generate_thumbnail",
        help="comma-separated task types to take; all run the demo handler",
    )
    parser.add_argument("--slots", type=int, default=4, help="tasks worked on at once, 1 to 10000")
    parser.add_argument(
        "--lease-seconds",
        type=int,
        help="lease length to ask for, 1 to 3600 (default: the server's, 30)",
    )
    parser.add_argument(
        "--drain-seconds",
        type=float,
        default=30.0,
        help="on SIGTERM or SIGINT, how long running tasks may take to finish"
        " before they are given back (default 30)",
    )
    args = parser.parse_args()
    # The server would refuse these at registration; say so before connecting.
    servers = split_list(args.server)
    if not servers:
        parser.error("argument --server: no host:port given")
    if not 1 <= len(args.worker_id) <= 100:
        parser.error("argument --worker-id: must be 1 to 100 characters")
    if not 1 <= args.slots <= 10_000:
        parser.error(f"argument --slots: must be 1 to 10000, not {args.slots}")
    if args.lease_seconds is not None and not 1 <= args.lease_seconds <= 3600:
        parser.error(f"argument --lease-seconds: must be 1 to 3600, not {args.lease_seconds}")
    if not 0 <= args.drain_seconds <= 86_400:
        parser.error(f"argument --drain-seconds: must be 0 to 86400, not {args.drain_seconds}")
    for server in servers:
        scheme, _, _ = server.rpartition("://")
        if scheme not in ("", "http", "https"):
            parser.error(f"argument --server: {server}: use host:port, http:// or https://")
        if scheme == "http" and args.tls_ca:
            parser.error(f"argument --tls-ca: {server} is a plaintext address; use https://")
    tls_ca = None
    if args.tls_ca:
        try:
            with open(args.tls_ca, "rb") as ca_file:
                tls_ca = ca_file.read()
        except OSError as err:
            parser.error(f"argument --tls-ca: {err}")

    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    worker = Worker(
        servers=servers,
        worker_id=args.worker_id,
        task_types=split_list(args.task_types),
        slots=args.slots,
        lease_seconds=args.lease_seconds,
        drain_seconds=args.drain_seconds,
        tls_ca=tls_ca,
        token=args.token,
    )
    try:
        asyncio.run(worker.run())
    except Refused as err:
        log.error("the server refused the registration: %s", err)
        sys.exit(1)
    except KeyboardInterrupt:
        # A second Ctrl-C: leases still held run out and their tasks are
        # retried elsewhere.
        sys.exit(130)


if __name__ == "__main__":
    main()
