//! `leasehold watch`: live task events, one line each, until Ctrl-C or
//! SIGTERM (exit 0).
//!
//! When standard output is a terminal (and not `--json`), each task that
//! reports progress gets a bar below the event lines, moved by its
//! progress events and removed when the task leaves processing; its
//! progress events then print no line of their own.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};

use futures_util::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::filter::Filter;
use super::{human, json, note, print_json, print_line, Failure, Options};
use crate::client::WatchFilter;
use crate::proto::{self, watch_tasks_response::Kind, TaskEventKind};

/// Bars shown at once; tasks beyond that print their progress as lines, so
/// a busy queue cannot push the event lines off the screen.
const MAX_BARS: usize = 16;

/// Arguments of `leasehold watch`.
#[derive(Debug, clap::Args)]
#[command(mut_arg("status", |arg| arg.help(
    "Only events after which the task is in these statuses (repeat or separate with commas)"
)))]
pub struct WatchArgs {
    /// Only events of the tasks these select.
    #[command(flatten)]
    pub(crate) filter: Filter,

    /// Only events of these tasks (UUIDs; repeat or separate with commas).
    #[arg(long = "task-id", value_name = "ID", value_delimiter = ',')]
    pub(crate) task_id: Vec<String>,

    /// Where the server is, and how to print.
    #[command(flatten)]
    pub(crate) options: Options,
}

pub(super) async fn run(args: WatchArgs) -> Result<(), Failure> {
    let filter = args
        .filter
        .apply(WatchFilter::new().task_ids(args.task_id.iter().cloned()));
    let client = args.options.connect().await?;
    let mut events = client.watch(filter).await?;
    // Said once the server has subscribed: every change from now on shows.
    note(format_args!(
        "watching task events on {}; press Ctrl-C to stop",
        client.address().unwrap_or_default()
    ));

    let bars = (!args.options.json && std::io::stdout().is_terminal()).then(Bars::new);
    let mut screen = Screen {
        json: args.options.json,
        bars,
    };
    let stop = crate::signal::shutdown();
    tokio::pin!(stop);
    let outcome = loop {
        let item = tokio::select! {
            item = events.next() => item,
            _ = &mut stop => break Ok(()),
        };
        match item {
            Some(Ok(item)) => {
                if let Err(err) = screen.show(&item) {
                    break Err(err);
                }
            }
            Some(Err(err)) => break Err(err.into()),
            None => {
                break Err(Failure::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the server ended the watch (it is shutting down)",
                )))
            }
        }
    };
    screen.finish();
    outcome
}

/// Where events go: lines on standard output, and bars when it is a
/// terminal.
struct Screen {
    json: bool,
    bars: Option<Bars>,
}

impl Screen {
    fn show(&mut self, item: &proto::WatchTasksResponse) -> Result<(), Failure> {
        if self.json {
            return print_json(&json::watch(item));
        }
        let line = match &item.kind {
            Some(Kind::Event(event)) => {
                if let Some(bars) = &mut self.bars {
                    if bars.follow(event) {
                        return Ok(());
                    }
                }
                event_line(event)
            }
            Some(Kind::Missed(missed)) => format!(
                "missed {} events: this watcher read too slowly",
                missed.count
            ),
            None => return Ok(()),
        };
        match &self.bars {
            // Above the bars, which are drawn again below it.
            Some(bars) => bars
                .multi
                .suspend(|| writeln!(std::io::stdout().lock(), "{line}"))
                .map_err(Failure::from),
            None => print_line(line),
        }
    }

    fn finish(self) {
        if let Some(bars) = self.bars {
            bars.clear();
        }
    }
}

/// One event as a line: time, kind, task, type, status, then what the event
/// carries as `key=value`.
fn event_line(event: &proto::TaskEvent) -> String {
    let mut line = format!(
        "{}  {:<13}  {}  {}  {:<10}  attempts={}",
        human::time(event.occurred_at.as_ref()),
        human::event_kind(event.kind),
        event.task_id,
        event.task_type,
        human::status(event.status),
        event.attempts,
    );
    if let Some(worker) = &event.worker_id {
        line.push_str(&format!(" worker={worker}"));
    }
    if let Some(progress) = &event.progress {
        line.push_str(&format!(" progress={}", human::progress(Some(progress))));
        if !progress.message.is_empty() {
            line.push_str(&format!(
                " message={:?}",
                human::clip(&progress.message, 200)
            ));
        }
    }
    if let Some(error) = &event.error {
        line.push_str(&format!(" error={:?}", human::clip(error, 300)));
    }
    line
}

/// One progress bar per task that reports progress.
struct Bars {
    multi: MultiProgress,
    by_task: HashMap<String, ProgressBar>,
}

impl Bars {
    fn new() -> Self {
        Bars {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stdout()),
            by_task: HashMap::new(),
        }
    }

    /// Moves, adds or removes the event's bar. True when the bar shows all
    /// the event says, so it needs no line.
    fn follow(&mut self, event: &proto::TaskEvent) -> bool {
        let kind = TaskEventKind::try_from(event.kind).unwrap_or(TaskEventKind::Unspecified);
        match kind {
            TaskEventKind::Progress => {
                let Some(progress) = &event.progress else {
                    return false;
                };
                let bar = match self.by_task.get(&event.task_id) {
                    Some(bar) => bar.clone(),
                    None if self.by_task.len() < MAX_BARS => {
                        let bar = self.multi.add(ProgressBar::new(0));
                        bar.set_prefix(format!("{} {}", event.task_type, event.task_id));
                        self.by_task.insert(event.task_id.clone(), bar.clone());
                        bar
                    }
                    None => return false,
                };
                let total = u64::try_from(progress.total).unwrap_or(0);
                bar.set_style(style(total > 0));
                bar.set_length(total);
                bar.set_position(u64::try_from(progress.current).unwrap_or(0));
                bar.set_message(human::clip(&progress.message, 80));
                true
            }
            // The task left processing (or never will again): its bar goes,
            // and the event prints as a line.
            TaskEventKind::Completed
            | TaskEventKind::Failed
            | TaskEventKind::Cancelled
            | TaskEventKind::LeaseExpired
            | TaskEventKind::Released
            | TaskEventKind::Retried => {
                if let Some(bar) = self.by_task.remove(&event.task_id) {
                    bar.finish_and_clear();
                    self.multi.remove(&bar);
                }
                false
            }
            _ => false,
        }
    }

    /// Takes the bars off the screen, leaving the event lines.
    fn clear(self) {
        // Cleared all at once, then hidden, so that no bar is drawn again
        // while the others finish.
        let _ = self.multi.clear();
        self.multi.set_draw_target(ProgressDrawTarget::hidden());
        for bar in self.by_task.values() {
            bar.finish_and_clear();
        }
    }
}

/// A task with a known total: a bar.
const BAR_TEMPLATE: &str = "{prefix} [{bar:30}] {pos}/{len} {msg}";
/// A task with an unknown total: a counter.
const COUNTER_TEMPLATE: &str = "{prefix} {pos} {msg}";

fn style(known_total: bool) -> ProgressStyle {
    let template = if known_total {
        BAR_TEMPLATE
    } else {
        COUNTER_TEMPLATE
    };
    ProgressStyle::with_template(template)
        .map(|style| style.progress_chars("=> "))
        // The templates are constants; should one not parse, plain bars
        // still work.
        .unwrap_or_else(|_| ProgressStyle::default_bar())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_parse() {
        for template in [BAR_TEMPLATE, COUNTER_TEMPLATE] {
            assert!(ProgressStyle::with_template(template).is_ok());
        }
    }

    #[test]
    fn event_lines_carry_what_the_event_says() {
        let event = proto::TaskEvent {
            kind: TaskEventKind::Progress as i32,
            task_id: "t1".into(),
            task_type: "scan".into(),
            status: proto::TaskStatus::Processing as i32,
            attempts: 1,
            worker_id: Some("w".into()),
            progress: Some(proto::TaskProgress {
                current: 4,
                total: 10,
                message: "pages".into(),
                updated_at: None,
            }),
            ..Default::default()
        };
        assert_eq!(
            event_line(&event),
            "-  progress       t1  scan  processing  attempts=1 worker=w progress=4/10 \
             message=\"pages\""
        );
    }
}
