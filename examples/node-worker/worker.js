// An example Leasehold worker on a streaming session (WorkerService/Connect).
//
// It registers, works on the tasks the server pushes, heartbeats their leases,
// sends each outcome, stops a task when told to, and reconnects, rotating
// through the given servers, when a node drains or the stream breaks. A task
// still running across a reconnect keeps its lease: the new session
// re-attaches it by heartbeating with its token, and its outcome goes out on
// the new stream. A busy worker uses the batched forms: several tasks pushed
// at once come in one `tasks` message, and outcomes ready at the same moment
// go out in one `outcomes` message, answered by one `acks`. On SIGTERM or
// SIGINT it drains: no new tasks, the running ones get --drain-seconds to
// finish, the rest are given back, and it exits 0.

import fs from 'node:fs';
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
// After the drain timeout, how long the last outcomes and releases may take
// to be acknowledged before the worker exits anyway.
const ACK_WAIT_MS = 5_000;
// The server refuses an error text over 65,536 characters, or with control
// characters other than tab and line breaks: longer texts are cut well short
// of the limit, and those characters replaced.
const MAX_ERROR_CHARS = 60_000;
const CONTROL_CHARS = /[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]/g;
// A registration refused for these reasons fails the same way on every
// server: retrying cannot help.
const FATAL_CODES = new Set([grpc.status.INVALID_ARGUMENT, grpc.status.FAILED_PRECONDITION]);
// The messages that can travel together in one `outcomes` message, at most
// MAX_OUTCOMES of them (the server's limit) and about MAX_OUTCOME_BATCH_BYTES
// (well inside the server's message limit; a larger one goes alone). The
// size is that of the message as JSON, more than its encoded size.
const OUTCOME_KINDS = ['complete', 'fail', 'release'];
const MAX_OUTCOMES = 1_000;
const MAX_OUTCOME_BATCH_BYTES = 1024 * 1024;
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

/** The server refused the registration itself (e.g. invalid slots). */
class Refused extends Error {}

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
  constructor({
    servers,
    workerId,
    taskTypes,
    slots,
    leaseSeconds,
    drainSeconds,
    tlsCa = null,
    token = null,
  }) {
    this.servers = servers;
    // PEM of the CAs to trust for TLS servers (null: the system's).
    this.tlsCa = tlsCa;
    // Sent as `authorization: Bearer <token>` to a node with --auth required.
    this.metadata = new grpc.Metadata();
    if (token) {
      this.metadata.add('authorization', `Bearer ${token}`);
    }
    this.workerId = workerId;
    this.taskTypes = taskTypes;
    this.slots = slots;
    this.leaseSeconds = leaseSeconds;
    this.drainSeconds = drainSeconds;
    // Task id -> job, from hand-out until the outcome is acknowledged. It
    // survives reconnects: leases belong to the database, not the stream.
    this.jobs = new Map();
    // The live session's Outbox; null between sessions.
    this.outbox = null;
    // Acks name only the task: when a task comes back under a new lease,
    // this many acks still due for the old lease's outcome are skipped
    // (task id -> count).
    this.staleAcks = new Map();
    this.failures = 0;
    this.draining = false;
  }

  /**
   * Keeps a session open, moving to the next server whenever one ends.
   * Rejects with Refused when the server refuses the registration.
   */
  async run() {
    for (let i = 0; ; i = (i + 1) % this.servers.length) {
      const server = this.servers[i];
      try {
        if (await this.session(server)) {
          continue; // the node drained: the next one at once
        }
        log('WARNING', `session on ${server} ended without a drain notice`);
      } catch (err) {
        if (err instanceof Refused) {
          throw err;
        }
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
   * Where `server` is and whether it speaks TLS: https://, or a bare
   * host:port when a CA file was given.
   */
  target(server) {
    const match = /^([a-z]+):\/\/(.*)$/.exec(server);
    if (match) {
      return { target: match[2], secure: match[1] === 'https' };
    }
    return { target: server, secure: this.tlsCa !== null };
  }

  /**
   * Serves one session. Resolves true if it ended after the node's drain
   * notice; rejects with the status when the stream breaks or is refused,
   * with Refused when the registration is.
   */
  session(server) {
    log('INFO', `connecting to ${server}`);
    const { target, secure } = this.target(server);
    const credentials = secure
      ? grpc.credentials.createSsl(this.tlsCa)
      : grpc.credentials.createInsecure();
    const client = new WorkerService(target, credentials, CHANNEL_OPTIONS);
    const call = client.Connect(this.metadata);
    const outbox = new Outbox(call);
    let registered = false;
    let drained = false;
    let heartbeats = null;
    outbox.push({ register: this.registerRequest() });
    call.on('data', (response) => {
      switch (response.kind) {
        case 'registered': {
          registered = true;
          const interval = durationMs(response.registered.heartbeatInterval);
          heartbeats = setInterval(() => this.heartbeat(), interval);
          this.onRegistered(server, response.registered, outbox);
          break;
        }
        case 'task':
          this.onTask(response.task);
          break;
        case 'tasks':
          for (const leased of response.tasks.tasks) {
            this.onTask(leased);
          }
          break;
        case 'heartbeatAck':
          this.onHeartbeatAck(response.heartbeatAck);
          break;
        case 'ack':
          this.onAck(response.ack);
          break;
        case 'acks':
          // One per outcome of an `outcomes` message, in order.
          for (const ack of response.acks.acks) {
            this.onAck(ack);
          }
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
        outbox.close();
        if (this.outbox === outbox) {
          this.outbox = null;
        }
        client.close();
        if (status.code === grpc.status.OK) {
          resolve(drained);
        } else if (!registered && FATAL_CODES.has(status.code)) {
          reject(new Refused(`${grpc.status[status.code]}: ${status.details}`));
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
      // Several tasks leased at once then come in one `tasks` message.
      batchedPushes: true,
    };
  }

  onRegistered(server, registered, outbox) {
    const interval = durationMs(registered.heartbeatInterval) / 1000;
    log(
      'INFO',
      `registered on ${server}: node=${registered.nodeId} session=${registered.sessionId} heartbeat every ${interval.toFixed(2)}s`,
    );
    this.failures = 0;
    this.outbox = outbox;
    // Acks of what went out on an earlier stream never come on this one.
    this.staleAcks.clear();
    for (const job of this.jobs.values()) {
      job.unanswered = 0;
    }
    if (this.draining) {
      this.send({ drain: {} });
    }
    // Tasks from an earlier session: renewing their leases here attaches
    // them to this session (so the server counts them and can cancel them),
    // or tells us they were lost meanwhile.
    const running = [...this.jobs.values()].filter((job) => !job.outcome).length;
    if (running > 0) {
      log('INFO', `re-attaching ${running} running task(s)`);
      this.heartbeat();
    }
    for (const job of this.jobs.values()) {
      if (job.outcome) {
        this.sendOutcome(job);
      }
    }
  }

  /**
   * Renews the leases of the running tasks, each named with its token.
   *
   * Never an empty heartbeat: that renews every lease the session holds, so
   * a lease whose outcome the server refused would be kept forever and its
   * slot never freed. A lease no longer named runs out instead.
   */
  heartbeat() {
    const running = [...this.jobs.values()].filter((job) => !job.outcome);
    if (running.length === 0) {
      return;
    }
    for (const job of running) {
      job.heartbeated = true;
    }
    const leases = running.map(({ taskId, leaseToken }) => ({ taskId, leaseToken }));
    this.send({ heartbeat: { leases } });
  }

  onTask({ task, lease }) {
    log('INFO', `task ${task.id} (${task.taskType}) received, attempt ${lease.attempt}`);
    const earlier = this.jobs.get(task.id);
    if (earlier) {
      // Handed out again: our earlier lease ran out while we were away, so
      // that work and its outcome are void, and the acks still due for that
      // outcome must not settle the new lease.
      log('INFO', `task ${task.id}: dropping the attempt of the earlier lease`);
      earlier.abort.abort();
      this.staleAcks.set(task.id, (this.staleAcks.get(task.id) ?? 0) + earlier.unanswered);
    }
    const job = {
      taskId: task.id,
      leaseToken: lease.leaseToken,
      abort: new AbortController(),
      // Whether a heartbeat has named this lease yet. A "lost" answer about
      // a lease never heartbeated concerns an earlier lease of the same task.
      heartbeated: false,
      // The complete, fail or release message, kept until acknowledged: if
      // the stream breaks first, the next session sends it again (the
      // server accepts a repeat with the same token).
      outcome: null,
      // Outcome messages sent on the live session and not answered yet.
      unanswered: 0,
      // Whether a malformed outcome has already been replaced by a plain fail.
      replaced: false,
    };
    this.jobs.set(task.id, job);
    if (this.draining) {
      // Pushed before the server read our drain: give it back unstarted.
      this.release(job);
      return;
    }
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
        return; // stopped or given back: nothing is sent for it
      }
      if (err instanceof TaskFailed) {
        outcome = failRequest(job, err.message, err.permanent);
      } else {
        // A bug in the handler: report it and let the server retry.
        log('ERROR', `task ${job.taskId}: handler threw: ${err.stack}`);
        outcome = failRequest(job, `${err.name}: ${err.message}`, false);
      }
    }
    if (job.abort.signal.aborted) {
      return; // stopped or given back meanwhile: nothing is sent for it
    }
    job.outcome = outcome;
    this.sendOutcome(job);
  }

  /** Gives a lease back: the task is pending again and the attempt does not count. */
  release(job) {
    job.abort.abort();
    job.outcome = { release: { taskId: job.taskId, leaseToken: job.leaseToken } };
    this.sendOutcome(job);
  }

  /** Sends a message on the live session; between sessions it is dropped. */
  send(message) {
    this.outbox?.push(message);
  }

  sendOutcome(job) {
    // Between sessions the outcome waits in its job; onRegistered sends it.
    if (this.outbox) {
      job.unanswered += 1;
      this.outbox.push(job.outcome);
    }
  }

  onAck(ack) {
    if (ack.kind === 'OUTCOME_KIND_PROGRESS') {
      return; // this worker reports no progress
    }
    const stale = this.staleAcks.get(ack.taskId) ?? 0;
    if (stale > 0) {
      this.staleAcks.set(ack.taskId, stale - 1);
      return; // about the outcome of an earlier lease of the task
    }
    const job = this.jobs.get(ack.taskId);
    if (!job?.outcome) {
      return; // about an outcome already acknowledged
    }
    job.unanswered -= 1;
    if (ack.status === 'ACK_STATUS_UNAVAILABLE') {
      log(
        'WARNING',
        `task ${ack.taskId}: outcome not stored (${ack.message}), sending it again in ${RESEND_DELAY_MS / 1000}s`,
      );
      setTimeout(() => {
        if (this.jobs.get(job.taskId) === job) {
          this.sendOutcome(job);
        }
      }, RESEND_DELAY_MS);
      return;
    }
    if (ack.status === 'ACK_STATUS_INVALID') {
      const replacement = this.replacement(job, ack);
      if (replacement) {
        job.outcome = replacement;
        this.sendOutcome(job);
        return;
      }
    }
    this.jobs.delete(ack.taskId);
    if (ack.status !== 'ACK_STATUS_OK') {
      log('WARNING', `task ${ack.taskId}: outcome refused: ${ack.status} ${ack.message}`);
    } else if (ack.kind === 'OUTCOME_KIND_COMPLETE') {
      log('INFO', `task ${ack.taskId} completed`);
    } else if (ack.kind === 'OUTCOME_KIND_RELEASE') {
      log('INFO', `task ${ack.taskId} released`);
    } else {
      const error = ack.task.lastError.slice(0, 200);
      log('INFO', `task ${ack.taskId} failed (${ack.task.status}): ${error}`);
    }
  }

  /**
   * A fail to send instead of an outcome refused as malformed. Giving up
   * instead would leave the task processing until its lease runs out, and
   * then retry it to the same end. Null when the replacement was refused
   * too: the job is dropped and the lease runs out.
   */
  replacement(job, ack) {
    if (job.replaced) {
      return null;
    }
    job.replaced = true;
    const { complete, fail } = job.outcome;
    const kind = complete ? 'complete' : fail ? 'fail' : 'release';
    log('WARNING', `task ${job.taskId}: ${kind} refused (${ack.message}), failing it instead`);
    if (complete) {
      // The result cannot be stored (over the size limit, say): the same
      // result would come again, so the task fails for good.
      return failRequest(job, `result refused: ${ack.message}`, true);
    }
    if (fail) {
      // Again in a form always accepted: the error plain and cut short
      // (failRequest does it), no retryAfter.
      return failRequest(job, fail.error, fail.permanent);
    }
    return null;
  }

  onHeartbeatAck({ leases }) {
    for (const { taskId, status } of leases) {
      if (status !== 'LEASE_STATUS_HELD') {
        this.stop(taskId, status, { fromHeartbeat: true });
      }
    }
  }

  /** Stops the work on a task whose lease is gone; nothing is sent for it. */
  stop(taskId, why, { fromHeartbeat = false } = {}) {
    const job = this.jobs.get(taskId);
    if (!job || job.outcome) {
      return; // finished already: the outcome's ack tells what happened
    }
    if (fromHeartbeat && !job.heartbeated) {
      return; // a heartbeat's answer about an earlier lease of this task
    }
    this.jobs.delete(taskId);
    job.abort.abort();
    log('INFO', `task ${taskId} stopped: ${why}`);
  }

  /**
   * Takes no new tasks, lets the running ones finish for the drain timeout,
   * gives the rest back, and waits (bounded) for every outcome and release
   * to be acknowledged.
   */
  async drain() {
    this.draining = true;
    log(
      'INFO',
      `shutting down: finishing ${this.jobs.size} task(s) for up to ${this.drainSeconds}s`,
    );
    this.send({ drain: {} });
    if (await this.settled(this.drainSeconds * 1000)) {
      return;
    }
    const running = [...this.jobs.values()].filter((job) => !job.outcome);
    if (running.length > 0) {
      log('WARNING', `drain timeout: releasing ${running.length} task(s) still running`);
    }
    for (const job of running) {
      this.release(job);
    }
    if (!(await this.settled(ACK_WAIT_MS))) {
      // Their leases run out on their own and the tasks are retried.
      log('WARNING', `exiting with ${this.jobs.size} outcome(s) not acknowledged`);
    }
  }

  /** Waits up to `ms` for every job to be acknowledged; true if none is left. */
  async settled(ms) {
    const deadline = Date.now() + ms;
    while (this.jobs.size > 0 && Date.now() < deadline) {
      await sleep(50);
    }
    return this.jobs.size === 0;
  }
}

/**
 * The messages for one session's stream. They are written once the current
 * turn of the event loop is over rather than at once, so that outcomes ready
 * at the same moment (several tasks of one push that ended together, or the
 * outcomes re-sent after a reconnect) go out in one `outcomes` message.
 */
class Outbox {
  constructor(call) {
    this.call = call;
    this.queue = [];
    this.closed = false;
  }

  push(message) {
    if (this.closed) {
      return;
    }
    if (this.queue.length === 0) {
      // setImmediate runs after this turn's promise callbacks, where the
      // handlers that finished (every task of a push that failed at once,
      // say) hand in their outcomes.
      setImmediate(() => this.flush());
    }
    this.queue.push(message);
  }

  flush() {
    const ready = this.queue.splice(0);
    if (!this.closed) {
      for (const message of packed(ready)) {
        this.call.write(message);
      }
    }
  }

  /** The stream has ended: what is still queued is dropped. */
  close() {
    this.closed = true;
  }
}

/**
 * `messages` as they go on the stream, in order: outcomes (completes, fails,
 * releases) that follow each other packed into `outcomes` messages of up to
 * MAX_OUTCOMES and about MAX_OUTCOME_BATCH_BYTES (a larger one alone),
 * everything else as it is. A lone outcome keeps its single
 * form. (An outcome of an `outcomes` message has the same shape as the
 * single message: `{complete: ...}`, `{fail: ...}` or `{release: ...}`.)
 */
function packed(messages) {
  const out = [];
  let run = [];
  let size = 0;
  const flush = () => {
    if (run.length === 1) {
      out.push(run[0]);
    } else if (run.length > 1) {
      out.push({ outcomes: { outcomes: run } });
    }
    run = [];
    size = 0;
  };
  for (const message of messages) {
    if (!OUTCOME_KINDS.some((kind) => message[kind])) {
      flush();
      out.push(message);
      continue;
    }
    const length = Buffer.byteLength(JSON.stringify(message));
    if (run.length > 0 && size + length > MAX_OUTCOME_BATCH_BYTES) {
      flush();
    }
    run.push(message);
    size += length;
    if (run.length === MAX_OUTCOMES) {
      flush();
    }
  }
  flush();
  return out;
}

function failRequest(job, error, permanent) {
  return {
    fail: { taskId: job.taskId, leaseToken: job.leaseToken, error: errorText(error), permanent },
  };
}

/** An error text the server accepts: plain, and cut short when too long. */
function errorText(error) {
  const plain = error.replace(CONTROL_CHARS, '\uFFFD');
  // Counted in code points, as the server does (`length` counts UTF-16 units).
  const chars = Array.from(plain);
  if (chars.length <= MAX_ERROR_CHARS) {
    return plain;
  }
  const total = chars.length.toLocaleString('en-US');
  return `${chars.slice(0, MAX_ERROR_CHARS).join('')}... (${total} characters in all)`;
}

// An unset Duration arrives as null.
function durationMs(duration) {
  return duration ? Number(duration.seconds) * 1000 + duration.nanos / 1e6 : 0;
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

const USAGE = `usage: node worker.js [--server HOST:PORT,...] [--tls-ca FILE] [--token TOKEN]
                      [--worker-id ID] [--task-types TYPE,...] [--slots N]
                      [--lease-seconds N] [--drain-seconds N]

  --server         comma-separated host:port list, tried in turn;
                   https://host:port for TLS (env LEASEHOLD_SERVER,
                   default 127.0.0.1:50051)
  --token          bearer token of a worker, for a node with --auth
                   required (env LEASEHOLD_TOKEN)
  --tls-ca         PEM file of the CAs to trust for TLS instead of the
                   system's; a bare host:port then means TLS
                   (env LEASEHOLD_TLS_CA)
  --worker-id      worker id shown as the tasks' locked_by, 1 to 100
                   characters (env LEASEHOLD_WORKER_ID, default HOST-PID)
  --task-types     comma-separated task types to take; all run the demo
                   handler (default generate_thumbnail)
  --slots          tasks worked on at once, 1 to 10000 (default 4)
  --lease-seconds  lease length to ask for, 1 to 3600 (default: the
                   server's, 30)
  --drain-seconds  on SIGTERM or SIGINT, how long running tasks may take to
                   finish before they are given back (default 30)`;

/** Bad usage: says what is wrong and exits 2. */
function usageError(message) {
  console.error(`${message}\n\n${USAGE}`);
  process.exit(2);
}

/** A numeric flag within [min, max]; anything else is a usage error. */
function numberFlag(values, name, min, max, { fraction = false } = {}) {
  const text = values[name];
  const value = Number(text);
  const pattern = fraction ? /^\d+(\.\d+)?$/ : /^\d+$/;
  if (!pattern.test(text) || value < min || value > max) {
    const what = fraction ? 'a number' : 'a whole number';
    usageError(`--${name}: must be ${what} from ${min} to ${max}, not ${JSON.stringify(text)}`);
  }
  return value;
}

function main() {
  let values;
  try {
    ({ values } = parseArgs({
      options: {
        server: { type: 'string', default: process.env.LEASEHOLD_SERVER ?? '127.0.0.1:50051' },
        'tls-ca': { type: 'string', default: process.env.LEASEHOLD_TLS_CA },
        token: { type: 'string', default: process.env.LEASEHOLD_TOKEN },
        'worker-id': {
          type: 'string',
          default: process.env.LEASEHOLD_WORKER_ID ?? `${os.hostname()}-${process.pid}`,
        },
        'task-types': { type: 'string', default: 'generate_thumbnail' },
        slots: { type: 'string', default: '4' },
        'lease-seconds': { type: 'string' },
        'drain-seconds': { type: 'string', default: '30' },
        help: { type: 'boolean', short: 'h' },
      },
    }));
  } catch (err) {
    usageError(err.message); // an unknown flag, or one without its value
  }
  if (values.help) {
    console.log(USAGE);
    return;
  }
  // The server would refuse these at registration; say so before connecting.
  const servers = splitList(values.server);
  if (servers.length === 0) {
    usageError('--server: no host:port given');
  }
  for (const server of servers) {
    const scheme = /^([a-z]+):\/\//.exec(server)?.[1];
    if (scheme !== undefined && scheme !== 'http' && scheme !== 'https') {
      usageError(`--server: ${server}: use host:port, http:// or https://`);
    }
    if (scheme === 'http' && values['tls-ca']) {
      usageError(`--tls-ca: ${server} is a plaintext address; use https://`);
    }
  }
  let tlsCa = null;
  if (values['tls-ca']) {
    try {
      tlsCa = fs.readFileSync(values['tls-ca']);
    } catch (err) {
      usageError(`--tls-ca: ${err.message}`);
    }
  }
  const workerIdChars = Array.from(values['worker-id']).length;
  if (workerIdChars < 1 || workerIdChars > 100) {
    usageError('--worker-id: must be 1 to 100 characters');
  }
  const worker = new Worker({
    servers,
    workerId: values['worker-id'],
    taskTypes: splitList(values['task-types']),
    slots: numberFlag(values, 'slots', 1, 10_000),
    leaseSeconds:
      values['lease-seconds'] === undefined ? null : numberFlag(values, 'lease-seconds', 1, 3600),
    drainSeconds: numberFlag(values, 'drain-seconds', 0, 86_400, { fraction: true }),
    tlsCa,
    token: values.token ?? null,
  });
  // SIGTERM (as from a service manager) or Ctrl-C: drain, then exit. A
  // second signal acts as usual: it stops the worker at once.
  const shutdown = () => {
    process.off('SIGTERM', shutdown);
    process.off('SIGINT', shutdown);
    worker.drain().then(() => process.exit(0));
  };
  process.on('SIGTERM', shutdown);
  process.on('SIGINT', shutdown);
  worker.run().catch((err) => {
    log('ERROR', `the server refused the registration: ${err.message}`);
    process.exit(1);
  });
}

main();
