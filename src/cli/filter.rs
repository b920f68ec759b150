//! The arguments that say which tasks a command is about, shared by
//! `task create` (what the new task is about), `task list` and `watch`
//! (which tasks they show), and how they reach the client's builders.

use crate::client::{NewTask, TaskFilter, WatchFilter};
use crate::model::Status;
use crate::proto::TaskStatus;
use crate::wire::convert::status_to_proto;

/// `--library-id`, `--series-id`, `--book-id`: what a task is about
/// ([`Filter`] words their help as filters).
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct About {
    /// Library the task is about (UUID).
    #[arg(long)]
    pub(crate) library_id: Option<String>,

    /// Series the task is about (UUID).
    #[arg(long)]
    pub(crate) series_id: Option<String>,

    /// Book the task is about (UUID).
    #[arg(long)]
    pub(crate) book_id: Option<String>,
}

impl About {
    /// `target` with each id given set on it.
    pub(super) fn apply<T: Ids>(&self, mut target: T) -> T {
        if let Some(id) = &self.library_id {
            target = target.library_id(id.clone());
        }
        if let Some(id) = &self.series_id {
            target = target.series_id(id.clone());
        }
        if let Some(id) = &self.book_id {
            target = target.book_id(id.clone());
        }
        target
    }
}

/// `--status`, `--type` and [`About`]: which tasks `task list` and `watch`
/// show.
#[derive(Debug, Clone, clap::Args)]
#[command(
    mut_arg("library_id", |arg| arg.help("Only tasks about this library (UUID)")),
    mut_arg("series_id", |arg| arg.help("Only tasks about this series (UUID)")),
    mut_arg("book_id", |arg| arg.help("Only tasks about this book (UUID)")),
)]
pub(crate) struct Filter {
    /// Only tasks in these statuses (repeat or separate with commas).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub(crate) status: Vec<Status>,

    /// Only tasks of these types (repeat or separate with commas).
    #[arg(long = "type", value_name = "TYPE", value_delimiter = ',')]
    pub(crate) task_type: Vec<String>,

    #[command(flatten)]
    pub(crate) about: About,
}

impl Filter {
    /// `target` narrowed by every filter given.
    pub(super) fn apply<T: Filters>(&self, target: T) -> T {
        let target = target
            .statuses(self.status.iter().map(|s| status_to_proto(*s)).collect())
            .task_types(self.task_type.clone());
        self.about.apply(target)
    }
}

/// The builders that take a library, series and book id.
pub(super) trait Ids: Sized {
    fn library_id(self, id: String) -> Self;
    fn series_id(self, id: String) -> Self;
    fn book_id(self, id: String) -> Self;
}

/// The builders that also filter by status and type.
pub(super) trait Filters: Ids {
    fn statuses(self, statuses: Vec<TaskStatus>) -> Self;
    fn task_types(self, task_types: Vec<String>) -> Self;
}

// Each forwards to the builder's own method of the same name (inherent
// methods are found before trait methods).
macro_rules! forward {
    ($($ty:ty),+ => Ids) => {
        $(impl Ids for $ty {
            fn library_id(self, id: String) -> Self {
                <$ty>::library_id(self, id)
            }
            fn series_id(self, id: String) -> Self {
                <$ty>::series_id(self, id)
            }
            fn book_id(self, id: String) -> Self {
                <$ty>::book_id(self, id)
            }
        })+
    };
    ($($ty:ty),+ => Filters) => {
        $(impl Filters for $ty {
            fn statuses(self, statuses: Vec<TaskStatus>) -> Self {
                <$ty>::statuses(self, statuses)
            }
            fn task_types(self, task_types: Vec<String>) -> Self {
                <$ty>::task_types(self, task_types)
            }
        })+
    };
}

forward!(NewTask, TaskFilter, WatchFilter => Ids);
forward!(TaskFilter, WatchFilter => Filters);
