//! The node's lifecycle: stop (no new work), kill (abort what remains), and the task sets that
//! shutdown waits for.

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Shared by every task that must end with the node.
#[derive(Clone, Default)]
pub struct Lifecycle {
    /// Stop accepting new work (listeners, dialers).
    pub stop: CancellationToken,
    /// Abort everything still running.
    pub kill: CancellationToken,
    /// Long-lived tasks: listeners, dialers, links, timers.
    pub tasks: TaskTracker,
    /// Flow tasks, waited for (up to the drain timeout) on shutdown.
    pub flows: TaskTracker,
}
