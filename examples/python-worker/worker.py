#!/usr/bin/env python3
"""An example Leasehold worker on a streaming session (WorkerService/Connect).

It registers, works on the tasks the server pushes, heartbeats their leases,
sends each outcome, stops a task when told to, and reconnects, rotating
through the given servers, when a node drains or the stream breaks. A task
still running across a reconnect keeps its lease: the new session re-attaches
it by heartbeating with its token, and its outcome goes out on the new stream.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import random
import socket
import sys
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
    # The complete or fail message, kept until acknowledged: if the stream
    # breaks first, the next session sends it again (the server accepts a
    # repeat with the same token).
    outcome: pb.ConnectRequest | None = None


class Worker:
    def __init__(
        self,
        servers: list[str],
        worker_id: str,
        task_types: list[str],
        slots: int,
        lease_seconds: int | None,
    ):
        self.servers = servers
        self.worker_id = worker_id
        self.task_types = task_types
        self.slots = slots
        self.lease_seconds = lease_seconds
        # Survives reconnects: leases belong to the database, not the stream.
        self.jobs: dict[str, Job] = {}
        # Messages for the live session; None between sessions.
        self.outbox: asyncio.Queue[pb.ConnectRequest] | None = None
        # Task id -> lease token of the leases this session re-attached.
        self.reattached: dict[str, str] = {}
        self.failures = 0

    async def run(self) -> None:
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

        Raises AioRpcError when the stream breaks or is refused.
        """
        outbox: asyncio.Queue[pb.ConnectRequest] = asyncio.Queue()
        outbox.put_nowait(pb.ConnectRequest(register=self.register_request()))

        async def requests():
            while True:
                yield await outbox.get()

        drained = False
        heartbeats: asyncio.Task | None = None
        log.info("connecting to %s", server)
        async with grpc.aio.insecure_channel(server, options=CHANNEL_OPTIONS) as channel:
            call = pb_grpc.WorkerServiceStub(channel).Connect(requests())
            try:
                async for response in call:
                    match response.WhichOneof("kind"):
                        case "registered":
                            registered = response.registered
                            interval = registered.heartbeat_interval.ToTimedelta()
                            heartbeats = asyncio.create_task(
                                self.heartbeat_loop(outbox, interval.total_seconds())
                            )
                            self.on_registered(server, registered, outbox)
                        case "task":
                            self.on_task(response.task)
                        case "heartbeat_ack":
                            self.on_heartbeat_ack(response.heartbeat_ack)
                        case "ack":
                            self.on_ack(response.ack)
                        case "cancel":
                            reason = pb.CancelReason.Name(response.cancel.reason)
                            self.stop(response.cancel.task_id, reason)
                        case "drain":
                            drained = True
                            self.on_drain(response.drain)
            finally:
                self.outbox = None
                if heartbeats is not None:
                    heartbeats.cancel()
        return drained

    def register_request(self) -> pb.RegisterWorker:
        register = pb.RegisterWorker(
            worker_id=self.worker_id,
            task_types=self.task_types,
            slots=self.slots,
            labels={"language": "python"},
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
        # Tasks from an earlier session: renewing their leases here attaches
        # them to this session (so the server counts them and can cancel
        # them), or tells us they were lost meanwhile.
        self.reattached = {
            job.task_id: job.lease_token for job in self.jobs.values() if job.outcome is None
        }
        if self.reattached:
            log.info("re-attaching %d running task(s)", len(self.reattached))
            renewals = [
                pb.LeaseRenewal(task_id=task_id, lease_token=lease_token)
                for task_id, lease_token in self.reattached.items()
            ]
            outbox.put_nowait(pb.ConnectRequest(heartbeat=pb.SessionHeartbeat(leases=renewals)))
        for job in self.jobs.values():
            if job.outcome is not None:
                outbox.put_nowait(job.outcome)

    async def heartbeat_loop(self, outbox: asyncio.Queue, interval: float) -> None:
        # An empty heartbeat renews every lease this session holds.
        while True:
            await asyncio.sleep(interval)
            outbox.put_nowait(pb.ConnectRequest(heartbeat=pb.SessionHeartbeat()))

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
            # so that work and its outcome are void.
            log.info("task %s: dropping the attempt of the earlier lease", task.id)
            earlier.runner.cancel()
        job = Job(task_id=task.id, lease_token=lease.lease_token)
        self.jobs[task.id] = job
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
        if self.jobs.get(job.task_id) is not job:
            return  # taken away meanwhile: its outcome would be refused
        job.outcome = outcome
        self.send(outcome)

    def send(self, message: pb.ConnectRequest) -> None:
        # Between sessions the message waits in its job; on_registered sends it.
        if self.outbox is not None:
            self.outbox.put_nowait(message)

    def on_ack(self, ack: pb.OutcomeAck) -> None:
        job = self.jobs.get(ack.task_id)
        if job is None or job.outcome is None:
            return  # about an outcome already acknowledged, or an earlier lease
        if ack.status == pb.ACK_STATUS_UNAVAILABLE:
            log.warning(
                "task %s: outcome not stored (%s), sending it again in %.0fs",
                ack.task_id,
                ack.message,
                RESEND_DELAY_SECONDS,
            )
            asyncio.get_running_loop().call_later(RESEND_DELAY_SECONDS, self.resend, job)
            return
        del self.jobs[ack.task_id]
        if ack.status != pb.ACK_STATUS_OK:
            log.warning(
                "task %s: outcome refused: %s %s",
                ack.task_id,
                pb.AckStatus.Name(ack.status),
                ack.message,
            )
        elif ack.kind == pb.OUTCOME_KIND_COMPLETE:
            log.info("task %s completed", ack.task_id)
        else:
            log.info(
                "task %s failed (%s): %s",
                ack.task_id,
                task_pb2.TaskStatus.Name(ack.task.status),
                ack.task.last_error,
            )

    def resend(self, job: Job) -> None:
        if self.jobs.get(job.task_id) is job:
            self.send(job.outcome)

    def on_heartbeat_ack(self, ack: pb.HeartbeatResponse) -> None:
        for state in ack.leases:
            if state.status != pb.LEASE_STATUS_HELD:
                # About a re-attached task, the answer concerns the token we
                # sent, and the task may have come back since under a new one.
                token = self.reattached.get(state.task_id)
                self.stop(state.task_id, pb.LeaseStatus.Name(state.status), token)

    def stop(self, task_id: str, why: str, lease_token: str | None = None) -> None:
        """Stops the work on a task whose lease is gone; nothing is sent for it."""
        job = self.jobs.get(task_id)
        if job is None or job.outcome is not None:
            return  # finished already: the outcome's ack tells what happened
        if lease_token is not None and job.lease_token != lease_token:
            return  # about an earlier lease of this task
        del self.jobs[task_id]
        job.runner.cancel()
        log.info("task %s stopped: %s", task_id, why)


def fail_request(job: Job, error: str, permanent: bool) -> pb.ConnectRequest:
    return pb.ConnectRequest(
        fail=pb.FailTaskRequest(
            task_id=job.task_id, lease_token=job.lease_token, error=error, permanent=permanent
        )
    )


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
        help="comma-separated host:port list, tried in turn (env LEASEHOLD_SERVER)",
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
    parser.add_argument("--slots", type=int, default=4, help="tasks worked on at once")
    parser.add_argument(
        "--lease-seconds", type=int, help="lease length to ask for (default: the server's, 30)"
    )
    args = parser.parse_args()

    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    worker = Worker(
        servers=split_list(args.server),
        worker_id=args.worker_id,
        task_types=split_list(args.task_types),
        slots=args.slots,
        lease_seconds=args.lease_seconds,
    )
    try:
        asyncio.run(worker.run())
    except KeyboardInterrupt:
        # Leases still held run out and their tasks are retried elsewhere.
        pass


if __name__ == "__main__":
    main()
