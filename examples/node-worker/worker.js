// An example Leasehold worker on a streaming session (WorkerService/Connect).
//
// It registers, works on the tasks the server pushes, heartbeats their leases,
// sends each outcome, stops a task when told to, and reconnects, rotating
// through the given servers, when a node drains or the stream breaks. A task
// still running across a reconnect keeps its lease: the new session
// re-attaches it by heartbeating with its token, and its outcome goes out on
// the new stream.

import os from 'node:os';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';

// Reconnect delay: a random wait up to an exponential ceiling ("full
// jitter"), so that workers cut off together do not come back together.
const BACKOFF_BASE_MS = 200;
const BACKOFF_CAP_MS = 10_000;
// When the server could not store an outcome (database unreachable).
const RESEND_DELAY_MS = 1_000;
// HTTP/2 pings notice a dead node even while the stream is idle.
const CHANNEL_OPTIONS = {
  'grpc.keepalive_time_ms': 30_000,
  'grpc.keepalive_timeout_ms': 10_000,
};

// The contract is read at start-up straight from proto/. Field names become
// camelCase, enums arrive as their names, 64-bit integers as strings, and
// `kind` names the member of a oneof that is set.
const definition = protoLoader.loadSync('leasehold/v1/worker_service.proto', {
  includeDirs: [fileURLToPath(new URL('../../proto', import.meta.url))],
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});
const { WorkerService } = grpc.loadPackageDefinition(definition).leasehold.v1;

function log(level, message) {
  process.stderr.write(`${new Date().toISOString()} ${level} ${message}\n`);
}

/** Thrown by a handler to fail the attempt with a message. */
class TaskFailed extends Error {
  constructor(message, { permanent = false } = {}) {
    super(message);
    this.permanent = permanent;
  }
}

/**
 * The demo handler: "renders" a thumbnail by sleeping `sleep_ms`.
 *
 * `{"fail": "message"}` fails the attempt with that message, for good with
 * `"permanent": true`; otherwise the server retries it after a backoff.
 * `signal` aborts when the task is taken away.
 */
async function generateThumbnail(params, { workerId, signal }) {
  if ('fail' in params) {
    throw new TaskFailed(String(params.fail), { permanent: Boolean(params.permanent) });
  }
  await sleep(Number(params.sleep_ms ?? 100), undefined, { signal });
  const image = String(params.image ?? 'image.png');
  return { thumbnail: `thumbs/${image}`, worker: workerId };
}

class Worker {
  constructor({ servers, workerId, taskTypes, slots, leaseSeconds }) {
    this.servers = servers;
    this.workerId = workerId;
    this.taskTypes = taskTypes;
    this.slots = slots;
    this.leaseSeconds = leaseSeconds;
    // Task id -> job, from hand-out until the outcome is acknowledged. It
    // survives reconnects: leases belong to the database, not the stream.
    this.jobs = new Map();
    // The live session's stream; null between sessions.
    this.call = null;
    // Task id -> lease token of the leases this session re-attached.
    this.reattached = new Map();
    this.failures = 0;
  }

  /** Keeps a session open, moving to the next server whenever one ends. */
  async run() {
    for (let i = 0; ; i = (i + 1) % this.servers.length) {
      const server = this.servers[i];
      try {
        if (await this.session(server)) {
          continue; // the node drained: the next one at once
        }
        log('WARNING', `session on ${server} ended without a drain notice`);
      } catch (err) {
        log('WARNING', `session on ${server}: ${grpc.status[err.code]} ${err.details}`);
      }
      this.failures += 1;
      const ceiling = BACKOFF_BASE_MS * 2 ** Math.min(this.failures, 10);
      const delay = Math.random() * Math.min(BACKOFF_CAP_MS, ceiling);
      log('INFO', `reconnecting in ${(delay / 1000).toFixed(2)}s`);
      await sleep(delay);
    }
  }

  /**
   * Serves one session. Resolves true if it ended after the node's drain
   * notice; rejects with the status when the stream breaks or is refused.
   */
  session(server) {
    log('INFO', `connecting to ${server}`);
    const client = new WorkerService(server, grpc.credentials.createInsecure(), CHANNEL_OPTIONS);
    const call = client.Connect();
    let drained = false;
    let heartbeats = null;
    call.write({ register: this.registerRequest() });
    call.on('data', (response) => {
      switch (response.kind) {
        case 'registered': {
          // An empty heartbeat renews every lease this session holds.
          const interval = durationMs(response.registered.heartbeatInterval);
          heartbeats = setInterval(() => call.write({ heartbeat: {} }), interval);
          this.onRegistered(server, response.registered, call);
          break;
        }
        case 'task':
          this.onTask(response.task);
          break;
        case 'heartbeatAck':
          this.onHeartbeatAck(response.heartbeatAck);
          break;
        case 'ack':
          this.onAck(response.ack);
          break;
        case 'cancel':
          this.stop(response.cancel.taskId, response.cancel.reason);
          break;
        case 'drain': {
          // Nothing new comes; the node ends the stream once our tasks are
          // done or its grace period is over. Tasks still running then go
          // on to the next node.
          drained = true;
          const grace = durationMs(response.drain.gracePeriod) / 1000;
          log(
            'INFO',
            `node draining (grace ${grace.toFixed(1)}s): finishing ${this.jobs.size} task(s), then reconnecting`,
          );
          break;
        }
      }
    });
    return new Promise((resolve, reject) => {
      // Errors are handled through 'status'; without a listener an 'error'
      // event would crash the process.
      call.on('error', () => {});
      // 'status' comes once, after the last message: OK when the node ended
      // the stream after draining, an error code when it broke.
      call.on('status', (status) => {
        clearInterval(heartbeats);
        if (this.call === call) {
          this.call = null;
        }
        client.close();
        if (status.code === grpc.status.OK) {
          resolve(drained);
        } else {
          reject(status);
        }
      });
    });
  }

  registerRequest() {
    return {
      workerId: this.workerId,
      taskTypes: this.taskTypes,
      slots: this.slots,
      labels: { language: 'node' },
      leaseDuration: this.leaseSeconds ? { seconds: this.leaseSeconds } : null,
    };
  }

  onRegistered(server, registered, call) {
    const interval = durationMs(registered.heartbeatInterval) / 1000;
    log(
      'INFO',
      `registered on ${server}: node=${registered.nodeId} session=${registered.sessionId} heartbeat every ${interval.toFixed(2)}s`,
    );
    this.failures = 0;
    this.call = call;
    // Tasks from an earlier session: renewing their leases here attaches
    // them to this session (so the server counts them and can cancel them),
    // or tells us they were lost meanwhile.
    const running = [...this.jobs.values()].filter((job) => !job.outcome);
    this.reattached = new Map(running.map((job) => [job.taskId, job.leaseToken]));
    if (running.length > 0) {
      log('INFO', `re-attaching ${running.length} running task(s)`);
      const leases = running.map(({ taskId, leaseToken }) => ({ taskId, leaseToken }));
      call.write({ heartbeat: { leases } });
    }
    for (const job of this.jobs.values()) {
      if (job.outcome) {
        call.write(job.outcome);
      }
    }
  }

  onTask({ task, lease }) {
    log('INFO', `task ${task.id} (${task.taskType}) received, attempt ${lease.attempt}`);
    const earlier = this.jobs.get(task.id);
    if (earlier) {
      // Handed out again: our earlier lease ran out while we were away, so
      // that work and its outcome are void.
      log('INFO', `task ${task.id}: dropping the attempt of the earlier lease`);
      earlier.abort.abort();
    }
    const job = {
      taskId: task.id,
      leaseToken: lease.leaseToken,
      abort: new AbortController(),
      // The complete or fail message, kept until acknowledged: if the
      // stream breaks first, the next session sends it again (the server
      // accepts a repeat with the same token).
      outcome: null,
    };
    this.jobs.set(task.id, job);
    this.work(job, fromStruct(task.params));
  }

  async work(job, params) {
    let outcome;
    try {
      const result = await generateThumbnail(params, {
        workerId: this.workerId,
        signal: job.abort.signal,
      });
      outcome = {
        complete: { taskId: job.taskId, leaseToken: job.leaseToken, result: toStruct(result) },
      };
    } catch (err) {
      if (job.abort.signal.aborted) {
        return; // stopped: nothing is sent for it
      }
      if (err instanceof TaskFailed) {
        outcome = failRequest(job, err.message, err.permanent);
      } else {
        // A bug in the handler: report it and let the server retry.
        log('ERROR', `task ${job.taskId}: handler threw: ${err.stack}`);
        outcome = failRequest(job, `${err.name}: ${err.message}`, false);
      }
    }
    if (this.jobs.get(job.taskId) !== job) {
      return; // taken away meanwhile: its outcome would be refused
    }
    job.outcome = outcome;
    this.send(outcome);
  }

  send(message) {
    // Between sessions the message waits in its job; onRegistered sends it.
    this.call?.write(message);
  }

  onAck(ack) {
    const job = this.jobs.get(ack.taskId);
    if (!job?.outcome) {
      return; // about an outcome already acknowledged, or an earlier lease
    }
    if (ack.status === 'ACK_STATUS_UNAVAILABLE') {
      log(
        'WARNING',
        `task ${ack.taskId}: outcome not stored (${ack.message}), sending it again in ${RESEND_DELAY_MS / 1000}s`,
      );
      setTimeout(() => {
        if (this.jobs.get(job.taskId) === job) {
          this.send(job.outcome);
        }
      }, RESEND_DELAY_MS);
      return;
    }
    this.jobs.delete(ack.taskId);
    if (ack.status !== 'ACK_STATUS_OK') {
      log('WARNING', `task ${ack.taskId}: outcome refused: ${ack.status} ${ack.message}`);
    } else if (ack.kind === 'OUTCOME_KIND_COMPLETE') {
      log('INFO', `task ${ack.taskId} completed`);
    } else {
      log('INFO', `task ${ack.taskId} failed (${ack.task.status}): ${ack.task.lastError}`);
    }
  }

  onHeartbeatAck({ leases }) {
    for (const { taskId, status } of leases) {
      if (status !== 'LEASE_STATUS_HELD') {
        // About a re-attached task, the answer concerns the token we sent,
        // and the task may have come back since under a new one.
        this.stop(taskId, status, this.reattached.get(taskId));
      }
    }
  }

  /** Stops the work on a task whose lease is gone; nothing is sent for it. */
  stop(taskId, why, leaseToken = undefined) {
    const job = this.jobs.get(taskId);
    if (!job || job.outcome) {
      return; // finished already: the outcome's ack tells what happened
    }
    if (leaseToken !== undefined && job.leaseToken !== leaseToken) {
      return; // about an earlier lease of this task
    }
    this.jobs.delete(taskId);
    job.abort.abort();
    log('INFO', `task ${taskId} stopped: ${why}`);
  }
}

function failRequest(job, error, permanent) {
  return { fail: { taskId: job.taskId, leaseToken: job.leaseToken, error, permanent } };
}

function durationMs({ seconds, nanos }) {
  return Number(seconds) * 1000 + nanos / 1e6;
}

// google.protobuf.Struct arrives as {fields: {name: Value}}, each Value a
// oneof; these turn it into plain JSON and back.
function fromStruct(struct) {
  const fields = Object.entries(struct?.fields ?? {});
  return Object.fromEntries(fields.map(([name, value]) => [name, fromValue(value)]));
}

function fromValue(value) {
  switch (value.kind) {
    case 'structValue':
      return fromStruct(value.structValue);
    case 'listValue':
      return (value.listValue.values ?? []).map(fromValue);
    case 'nullValue':
      return null;
    default: // numberValue, stringValue, boolValue
      return value[value.kind];
  }
}

function toStruct(object) {
  const fields = Object.entries(object);
  return { fields: Object.fromEntries(fields.map(([name, value]) => [name, toValue(value)])) };
}

function toValue(value) {
  if (value === null || value === undefined) {
    return { nullValue: 'NULL_VALUE' };
  }
  if (Array.isArray(value)) {
    return { listValue: { values: value.map(toValue) } };
  }
  switch (typeof value) {
    case 'number':
      return { numberValue: value };
    case 'string':
      return { stringValue: value };
    case 'boolean':
      return { boolValue: value };
    case 'object':
      return { structValue: toStruct(value) };
    default:
      throw new TypeError(`a ${typeof value} cannot go into a Struct`);
  }
}

function splitList(text) {
  return text
    .split(',')
    .map((item) => item.trim())
    .filter(Boolean);
}

const USAGE = `usage: node worker.js [--server HOST:PORT,...] [--worker-id ID]
                      [--task-types TYPE,...] [--slots N] [--lease-seconds N]

  --server         comma-separated host:port list, tried in turn
                   (env LEASEHOLD_SERVER, default 127.0.0.1:50051)
  --worker-id      worker id shown as the tasks' locked_by
                   (env LEASEHOLD_WORKER_ID, default HOST-PID)
  --task-types     comma-separated task types to take; all run the demo
                   handler (default generate_thumbnail)
  --slots          tasks worked on at once (default 4)
  --lease-seconds  lease length to ask for (default: the server's, 30)`;

function main() {
  const { values } = parseArgs({
    options: {
      server: { type: 'string', default: process.env.LEASEHOLD_SERVER ?? '127.0.0.1:50051' },
      'worker-id': {
        type: 'string',
        default: process.env.LEASEHOLD_WORKER_ID ?? `${os.hostname()}-${process.pid}`,
      },
      'task-types': { type: 'string', default: 'generate_thumbnail' },
      slots: { type: 'string', default: '4' },
      'lease-seconds': { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) {
    console.log(USAGE);
    return;
  }
  const worker = new Worker({
    servers: splitList(values.server),
    workerId: values['worker-id'],
    taskTypes: splitList(values['task-types']),
    slots: Number.parseInt(values.slots, 10),
    leaseSeconds: values['lease-seconds'] ? Number.parseInt(values['lease-seconds'], 10) : null,
  });
  worker.run();
}

main();
