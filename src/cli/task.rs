//! `leasehold task create|get|list|cancel|retry|purge`.
//!
//! One file for the six subcommands (about 600 lines with their tests):
//! they share their arguments' types and their output helpers, and each
//! is a few dozen lines.

use std::io::BufRead;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use futures_util::TryStreamExt;

use super::filter::{About, Filter};
use super::parse;
use super::{describe, human, json, note, print_json, print_line, Failure, Options};
use crate::client::{Client, CreateManyError, NewTask, TaskFilter, MAX_CREATE_BATCH};
use crate::model::Status;
use crate::proto;
use crate::wire::convert::code_name;

/// Tasks `task list` prints unless told otherwise.
const DEFAULT_LIMIT: u64 = 100;

/// `leasehold task`: create, inspect and administer tasks.
#[derive(Debug, clap::Subcommand)]
pub enum TaskCommand {
    /// Create a task, or many from JSON lines (`--from-file`).
    Create(CreateArgs),
    /// Show one task with its params, result and progress.
    Get(GetArgs),
    /// List tasks newest first, with filters.
    List(ListArgs),
    /// Cancel a pending or processing task; its lease becomes void.
    Cancel(CancelArgs),
    /// Put a failed or cancelled task back to pending, due now.
    Retry(RetryArgs),
    /// Delete finished tasks (completed, failed, cancelled).
    Purge(PurgeArgs),
}

/// Arguments of `task create`.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Task type, e.g. `scan_library`.
    #[arg(value_name = "TYPE", required_unless_present = "from_file")]
    pub(crate) task_type: Option<String>,

    /// Task input, a JSON object.
    #[arg(long, value_name = "JSON", value_parser = parse::json_object)]
    pub(crate) params: Option<serde_json::Value>,

    /// Higher runs first.
    #[arg(long, allow_negative_numbers = true)]
    pub(crate) priority: Option<i32>,

    /// Executions allowed (1 to 1000); the server's default is 3.
    #[arg(long)]
    pub(crate) max_attempts: Option<i32>,

    /// Not handed out before this delay from now, e.g. `10s`, `2h`.
    #[arg(long, value_name = "DURATION", value_parser = parse::duration, conflicts_with = "scheduled_for")]
    pub(crate) scheduled_in: Option<Duration>,

    /// Not handed out before this time (UTC, RFC 3339).
    #[arg(long, value_name = "TIME", value_parser = parse::time)]
    pub(crate) scheduled_for: Option<SystemTime>,

    /// What the task is about.
    #[command(flatten)]
    pub(crate) about: About,

    /// Deduplication key: while a pending or processing task holds it, the
    /// existing task is returned instead.
    #[arg(long)]
    pub(crate) dedup_key: Option<String>,

    /// Create one task per line of this file (`-` for standard input), in
    /// one call per 10,000: JSON objects with the fields of
    /// CreateTaskRequest (`task_type`, `params`, `priority`, `max_attempts`,
    /// `scheduled_for`, `library_id`, `series_id`, `book_id`,
    /// `dedup_key`). Blank lines are skipped. Every line is checked before
    /// the first call; if a later call fails, the tasks of the calls before
    /// it are printed, then the error names the line refused.
    #[arg(
        long,
        value_name = "PATH",
        conflicts_with_all = [
            "task_type", "params", "priority", "max_attempts", "scheduled_in",
            "scheduled_for", "library_id", "series_id", "book_id", "dedup_key",
        ]
    )]
    pub(crate) from_file: Option<PathBuf>,

    /// Where the server is, and how to print.
    #[command(flatten)]
    pub(crate) options: Options,
}

/// Arguments of `task get`.
#[derive(Debug, clap::Args)]
pub struct GetArgs {
    /// Task id (UUID).
    pub(crate) id: String,

    /// Where the server is, and how to print.
    #[command(flatten)]
    pub(crate) options: Options,
}

/// Arguments of `task list`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Which tasks.
    #[command(flatten)]
    pub(crate) filter: Filter,

    /// Print at most this many tasks (a note on standard error tells when
    /// there are more).
    #[arg(
        long,
        default_value_t = DEFAULT_LIMIT,
        value_parser = clap::value_parser!(u64).range(1..),
        conflicts_with = "all"
    )]
    pub(crate) limit: u64,

    /// Print every matching task, page after page.
    #[arg(long)]
    pub(crate) all: bool,

    /// Where the server is, and how to print.
    #[command(flatten)]
    pub(crate) options: Options,
}

/// Arguments of `task cancel`.
#[derive(Debug, clap::Args)]
pub struct CancelArgs {
    /// Task id (UUID).
    pub(crate) id: String,

    /// Why, kept as the task's last error.
    #[arg(long)]
    pub(crate) reason: Option<String>,

    /// Where the server is, and how to print.
    #[command(flatten)]
    pub(crate) options: Options,
}

/// Arguments of `task retry`.
#[derive(Debug, clap::Args)]
pub struct RetryArgs {
    /// Task id (UUID).
    pub(crate) id: String,

    /// Where the server is, and how to print.
    #[command(flatten)]
    pub(crate) options: Options,
}

/// Arguments of `task purge`.
#[derive(Debug, clap::Args)]
pub struct PurgeArgs {
    /// Only tasks in these statuses (repeat or separate with commas);
    /// default all three.
    #[arg(long, value_parser = parse::finished(), value_delimiter = ',')]
    pub(crate) status: Vec<Status>,

    /// Only tasks that finished before this time (UTC, RFC 3339); default
    /// now.
    #[arg(long, value_name = "TIME", value_parser = parse::time, conflicts_with = "older_than")]
    pub(crate) completed_before: Option<SystemTime>,

    /// Only tasks that finished longer ago than this, e.g. `7d`.
    #[arg(long, value_name = "DURATION", value_parser = parse::duration)]
    pub(crate) older_than: Option<Duration>,

    /// Where the server is, and how to print.
    #[command(flatten)]
    pub(crate) options: Options,
}

pub(super) async fn run(command: TaskCommand) -> Result<(), Failure> {
    match command {
        TaskCommand::Create(args) => create(args).await,
        TaskCommand::Get(args) => get(args).await,
        TaskCommand::List(args) => list(args).await,
        TaskCommand::Cancel(args) => cancel(args).await,
        TaskCommand::Retry(args) => retry(args).await,
        TaskCommand::Purge(args) => purge(args).await,
    }
}

async fn create(args: CreateArgs) -> Result<(), Failure> {
    let Some(path) = &args.from_file else {
        let task = new_task(&args)?;
        let client = args.options.connect().await?;
        let created = client.create(task).await?;
        return print_created(&args.options, &created);
    };
    // Read and checked in full before connecting: a bad line creates
    // nothing.
    let lines = read_task_lines(path)?;
    let client = args.options.connect().await?;
    create_lines(&client, &args.options, lines).await
}

/// Creates the tasks of a `--from-file` input, one call per
/// [`MAX_CREATE_BATCH`], printing each call's results as soon as it
/// returns. When a call fails, the tasks of the calls before it exist: they
/// have been printed, and the error names the line the server refused and
/// which lines were created, so that nothing created is lost track of.
async fn create_lines(client: &Client, options: &Options, lines: TaskLines) -> Result<(), Failure> {
    let TaskLines {
        name,
        tasks,
        numbers,
    } = lines;
    // A reader that went away must not stop the creation halfway: the
    // first printing error is kept and returned at the end.
    let mut printed = Ok(());
    let mut before = 0;
    let mut tasks = tasks.into_iter().peekable();
    while tasks.peek().is_some() {
        let batch: Vec<NewTask> = tasks.by_ref().take(MAX_CREATE_BATCH).collect();
        let size = batch.len();
        match client.create_many(batch).await {
            Ok(results) => {
                show_created(&mut printed, options, &results);
                before += results.len();
            }
            Err(err) => {
                show_created(&mut printed, options, &err.created);
                return Err(stopped(&name, &numbers, before, size, &err));
            }
        }
    }
    printed
}

/// Prints `results` unless an earlier printing failed (kept in `printed`).
fn show_created(
    printed: &mut Result<(), Failure>,
    options: &Options,
    results: &[proto::CreateTaskResponse],
) {
    if printed.is_ok() {
        *printed = results
            .iter()
            .try_for_each(|result| print_created(options, result));
    }
}

/// The failure of a `--from-file` call that began after `before` tasks had
/// been created and held `size` tasks: the server's message with the line
/// it names, and, if any were created, which lines were and which were
/// not.
fn stopped(
    name: &str,
    numbers: &[usize],
    before: usize,
    size: usize,
    err: &CreateManyError,
) -> Failure {
    let line = |index: usize| numbers.get(index).copied();
    let mut message = match err.invalid_entry() {
        Some((index, rest)) => match line(before + index) {
            Some(number) => format!(
                "{}: {name} line {number}: {rest}",
                code_name(tonic::Code::InvalidArgument)
            ),
            None => describe(&err.error),
        },
        None => describe(&err.error),
    };
    let created = before + err.created.len();
    if let (Some(first), Some(last)) = (line(0), created.checked_sub(1).and_then(line)) {
        let tasks = if created == 1 { "task" } else { "tasks" };
        message.push_str(&format!(
            "\ncreated the {created} {tasks} printed above ({})",
            lines_span(first, last)
        ));
        let end = before + size;
        if let (Some(from), Some(to)) = (line(created), end.checked_sub(1).and_then(line)) {
            message.push_str(&format!("; the call for {} failed", lines_span(from, to)));
        }
        if let (Some(from), Some(&to)) = (line(end), numbers.last()) {
            let were = if from == to { "was" } else { "were" };
            message.push_str(&format!(", and {} {were} not sent", lines_span(from, to)));
        }
    }
    Failure::Refused(message)
}

/// `line 7` or `lines 7 to 9`.
fn lines_span(from: usize, to: usize) -> String {
    if from == to {
        format!("line {from}")
    } else {
        format!("lines {from} to {to}")
    }
}

/// One `task create` result: `created <id> <type>` (or `deduplicated`), or
/// its JSON.
fn print_created(options: &Options, result: &proto::CreateTaskResponse) -> Result<(), Failure> {
    if options.json {
        return print_json(&json::created(result)?);
    }
    let (id, task_type) = result
        .task
        .as_ref()
        .map(|t| (t.id.as_str(), t.task_type.as_str()))
        .unwrap_or_default();
    let verb = if result.deduplicated {
        "deduplicated"
    } else {
        "created"
    };
    print_line(format_args!("{verb} {id} {task_type}"))
}

/// The task of `task create TYPE`; a `--scheduled-in` past the end of
/// time is a usage error.
fn new_task(args: &CreateArgs) -> Result<NewTask, Failure> {
    // clap guarantees TYPE unless --from-file is given.
    let mut task = NewTask::new(args.task_type.clone().unwrap_or_default());
    if let Some(params) = &args.params {
        task = task.params(params.clone());
    }
    if let Some(priority) = args.priority {
        task = task.priority(priority);
    }
    if let Some(max_attempts) = args.max_attempts {
        task = task.max_attempts(max_attempts);
    }
    if let Some(delay) = args.scheduled_in {
        let at = SystemTime::now().checked_add(delay).ok_or_else(|| {
            Failure::Usage(format!(
                "--scheduled-in {} is too far ahead",
                humantime::format_duration(delay)
            ))
        })?;
        task = task.scheduled_for(at);
    }
    if let Some(at) = args.scheduled_for {
        task = task.scheduled_for(at);
    }
    if let Some(key) = &args.dedup_key {
        task = task.dedup_key(key);
    }
    Ok(args.about.apply(task))
}

/// The tasks of a `--from-file` input.
struct TaskLines {
    /// The file's name, or `standard input`.
    name: String,
    tasks: Vec<NewTask>,
    /// The line number (from 1) of each task; blank lines have no task.
    numbers: Vec<usize>,
}

/// The tasks of a `--from-file` input; a line that does not parse or
/// fails a field check is a usage error naming its line number.
fn read_task_lines(path: &std::path::Path) -> Result<TaskLines, Failure> {
    let stdin = path.as_os_str() == "-";
    let name = if stdin {
        "standard input".to_owned()
    } else {
        path.display().to_string()
    };
    let reader: Box<dyn BufRead> = if stdin {
        Box::new(std::io::stdin().lock())
    } else {
        let file = std::fs::File::open(path)
            .map_err(|err| Failure::Usage(format!("cannot read {name}: {err}")))?;
        Box::new(std::io::BufReader::new(file))
    };
    let mut tasks = Vec::new();
    let mut numbers = Vec::new();
    for (index, line) in reader.lines().enumerate() {
        let line = line.map_err(|err| Failure::Usage(format!("cannot read {name}: {err}")))?;
        if line.trim().is_empty() {
            continue;
        }
        let task = parse::task_line(&line)
            .map_err(|err| Failure::Usage(format!("{name} line {}: {err}", index + 1)))?;
        tasks.push(task);
        numbers.push(index + 1);
    }
    if tasks.is_empty() {
        return Err(Failure::Usage(format!("{name} holds no tasks")));
    }
    Ok(TaskLines {
        name,
        tasks,
        numbers,
    })
}

async fn get(args: GetArgs) -> Result<(), Failure> {
    let client = args.options.connect().await?;
    let task = client.get(&args.id).await?;
    if args.options.json {
        return print_json(&json::task(&task)?);
    }
    // Field names down the left; a header would add nothing.
    let mut table = human::table(&[], &[]);
    let compact = |s: &Option<prost_types::Struct>| -> Result<String, Failure> {
        Ok(match s {
            Some(s) => crate::client::from_struct(s)?.to_string(),
            None => human::NONE.to_owned(),
        })
    };
    let progress = match &task.progress {
        Some(p) if !p.message.is_empty() => {
            format!("{} {}", human::progress(Some(p)), p.message)
        }
        other => human::progress(other.as_ref()),
    };
    let rows = [
        ("id", task.id.clone()),
        ("type", task.task_type.clone()),
        ("status", human::status(task.status)),
        ("priority", task.priority.to_string()),
        (
            "attempts",
            format!("{} of {}", task.attempts, task.max_attempts),
        ),
        ("scheduled for", human::time(task.scheduled_for.as_ref())),
        ("created", human::time(task.created_at.as_ref())),
        ("started", human::time(task.started_at.as_ref())),
        ("completed", human::time(task.completed_at.as_ref())),
        ("locked by", human::or_none(task.locked_by.as_deref())),
        ("locked until", human::time(task.locked_until.as_ref())),
        ("last error", human::or_none(task.last_error.as_deref())),
        ("library", human::or_none(task.library_id.as_deref())),
        ("series", human::or_none(task.series_id.as_deref())),
        ("book", human::or_none(task.book_id.as_deref())),
        ("dedup key", human::or_none(task.dedup_key.as_deref())),
        ("progress", progress),
        ("params", compact(&task.params)?),
        ("result", compact(&task.result)?),
    ];
    for (field, value) in rows {
        table.add_row(vec![field.to_owned(), value]);
    }
    print_line(human::render(&table))
}

async fn list(args: ListArgs) -> Result<(), Failure> {
    let limit = if args.all { u64::MAX } else { args.limit };
    let filter = args.filter.apply(
        // One more than printed, to tell whether there are more; big pages
        // for --all.
        TaskFilter::new().page_size(limit.saturating_add(1).clamp(1, 1000) as i32),
    );
    let client = args.options.connect().await?;
    let mut tasks = client.list(filter);
    let mut table = human::table(
        &[
            "ID",
            "TYPE",
            "STATUS",
            "PRIORITY",
            "ATTEMPTS",
            "CREATED",
            "WORKER",
            "PROGRESS",
            "LAST ERROR",
        ],
        &[3, 4],
    );
    let mut printed = 0;
    let mut more = false;
    while let Some(task) = tasks.try_next().await? {
        if printed == limit {
            more = true;
            break;
        }
        printed += 1;
        if args.options.json {
            // Streamed: a script sees the first page before the last
            // arrives.
            print_json(&json::task(&task)?)?;
            continue;
        }
        table.add_row(vec![
            task.id.clone(),
            task.task_type.clone(),
            human::status(task.status),
            task.priority.to_string(),
            format!("{}/{}", task.attempts, task.max_attempts),
            human::time(task.created_at.as_ref()),
            human::or_none(task.locked_by.as_deref()),
            human::progress(task.progress.as_ref()),
            human::clip(&human::or_none(task.last_error.as_deref()), 60),
        ]);
    }
    if !args.options.json {
        if printed == 0 {
            print_line("no tasks")?;
        } else {
            print_line(human::render(&table))?;
        }
    }
    if more {
        note(format_args!(
            "showing the first {limit} tasks; use --limit N or --all for more"
        ));
    }
    Ok(())
}

async fn cancel(args: CancelArgs) -> Result<(), Failure> {
    let client = args.options.connect().await?;
    let task = client
        .cancel(&args.id, args.reason.clone().unwrap_or_default())
        .await?;
    if args.options.json {
        return print_json(&json::task(&task)?);
    }
    print_line(format_args!("cancelled {}", task.id))
}

async fn retry(args: RetryArgs) -> Result<(), Failure> {
    let client = args.options.connect().await?;
    let task = client.retry(&args.id).await?;
    if args.options.json {
        return print_json(&json::task(&task)?);
    }
    print_line(format_args!("retried {}: pending again", task.id))
}

async fn purge(args: PurgeArgs) -> Result<(), Failure> {
    let completed_before = match (args.completed_before, args.older_than) {
        (Some(at), _) => Some(at),
        (None, Some(age)) => Some(SystemTime::now().checked_sub(age).ok_or_else(|| {
            Failure::Usage(format!(
                "--older-than {} reaches before 1970",
                humantime::format_duration(age)
            ))
        })?),
        (None, None) => None,
    };
    let statuses: Vec<proto::TaskStatus> = args
        .status
        .iter()
        .map(|s| crate::wire::convert::status_to_proto(*s))
        .collect();
    let client = args.options.connect().await?;
    let deleted = client.purge(completed_before, &statuses).await?;
    if args.options.json {
        return print_json(&serde_json::json!({ "deleted_count": deleted }));
    }
    let noun = if deleted == 1 { "task" } else { "tasks" };
    print_line(format_args!("purged {deleted} {noun}"))
}

#[cfg(test)]
mod tests {
    use clap::{error::ErrorKind, Args, Command};

    use super::*;

    fn create_command() -> Command {
        CreateArgs::augment_args(Command::new("create"))
    }

    #[test]
    fn argument_ids_resolve() {
        // Panics on an id that names no argument, e.g. in
        // `conflicts_with_all` or `mut_arg`.
        create_command().debug_assert();
        ListArgs::augment_args(Command::new("list")).debug_assert();
        crate::cli::WatchArgs::augment_args(Command::new("watch")).debug_assert();
    }

    #[test]
    fn from_file_conflicts_with_every_field_of_a_task() {
        for args in [
            &["x"][..],
            &["--params", "{}"],
            &["--priority", "1"],
            &["--max-attempts", "1"],
            &["--scheduled-in", "1s"],
            &["--scheduled-for", "2030-01-01T00:00:00Z"],
            &["--library-id", "l"],
            &["--series-id", "s"],
            &["--book-id", "b"],
            &["--dedup-key", "k"],
        ] {
            let err = create_command()
                .try_get_matches_from(["create", "--from-file", "-"].iter().chain(args))
                .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ArgumentConflict, "{args:?}: {err}");
        }
    }

    #[test]
    fn a_delay_past_the_end_of_time_is_a_usage_error() {
        let matches = create_command()
            .try_get_matches_from(["create", "x", "--scheduled-in", "300000000000y"])
            .unwrap();
        let args = <CreateArgs as clap::FromArgMatches>::from_arg_matches(&matches).unwrap();
        match new_task(&args) {
            Err(Failure::Usage(message)) => assert!(message.contains("too far ahead"), "{message}"),
            other => panic!("{other:?}"),
        }
    }
}
