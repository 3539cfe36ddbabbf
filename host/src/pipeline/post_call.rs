//! Stage 7: post-call hooks, run by one worker off the request path.
//!
//! **Post-call work never delays a response; when its queue is full, events are dropped and
//! counted.**

use std::panic::AssertUnwindSafe;

use futures_util::FutureExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::call::{Call, CallRecord, Outcome};
use crate::extension::{ready, BoxFuture, CallHook};
use crate::generation::Generation;

type Hooks = Arc<[Arc<dyn CallHook>]>;

/// Ends a call: its usage settles its key's token reservation, its cost is charged to the key's
/// counters (at once, before the caller can send another request) and queued for the store, its
/// parallel slot is freed, and the hooks get its record.
pub fn finish(generation: &Generation, call: Call, outcome: Outcome) -> Charging {
    if let (Some(admission), Some(usage)) = (&call.admission, call.usage) {
        admission.settle(usage.total_tokens);
    }
    let charging = generation
        .governance
        .as_ref()
        .and_then(|governance| governance.charge(&call, &outcome));
    // A record is made only for hooks to read; the call's own fields move into it.
    if !generation.hooks.is_empty() {
        generation
            .post_call
            .submit(&generation.hooks, call.into_record(outcome));
    }
    Charging(charging)
}

/// A call's cost on its way to the counters other replicas share. A response that can wait for
/// it does, so the client's next request sees the spend whichever replica it reaches.
#[derive(Debug, Default)]
pub struct Charging(Option<tokio::task::JoinHandle<()>>);

impl Charging {
    pub async fn landed(self) {
        if let Some(task) = self.0 {
            // A failed charge is owed and retried by the shared counters themselves.
            let _ = task.await;
        }
    }
}

/// The handle stages use to hand finished calls to the hooks; cheap to clone.
#[derive(Debug, Clone)]
pub struct PostCallQueue {
    sender: mpsc::Sender<(Hooks, CallRecord)>,
    dropped: Arc<AtomicU64>,
}

impl PostCallQueue {
    /// Starts the worker on the current tokio runtime.
    pub fn start(capacity: usize) -> PostCallQueue {
        let (sender, mut receiver) = mpsc::channel::<(Hooks, CallRecord)>(capacity.max(1));
        tokio::spawn(async move {
            while let Some((hooks, record)) = receiver.recv().await {
                run_hooks(&hooks, &record).await;
            }
        });
        PostCallQueue {
            sender,
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Queues a finished call without waiting.
    pub fn submit(&self, hooks: &Hooks, record: CallRecord) {
        if hooks.is_empty() {
            return;
        }
        if self.sender.try_send((Arc::clone(hooks), record)).is_err() {
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            // Say so now and then, not once per event, so a flood does not become a log flood.
            if dropped.is_power_of_two() {
                tracing::warn!(dropped, "post-call queue full: events dropped");
            }
        }
    }

    /// Events dropped because the queue was full, since start.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

async fn run_hooks(hooks: &Hooks, record: &CallRecord) {
    for hook in hooks.iter() {
        // One hook's bug must not stop the worker, or every later event would be lost.
        let ran = AssertUnwindSafe(hook.on_call_end(record))
            .catch_unwind()
            .await;
        if ran.is_err() {
            tracing::error!(hook = hook.name(), call_id = %record.call_id, "post-call hook panicked");
        }
    }
}

/// The built-in hook: one structured log line per call.
#[derive(Debug)]
pub struct LogHook;

impl LogHook {
    /// Whether the log filter lets its line through. When it does not, a call with no other
    /// hooks builds no record and wakes no worker.
    pub fn wanted() -> bool {
        tracing::enabled!(target: "portcullis::calls", tracing::Level::INFO)
    }

    fn log(record: &CallRecord) {
        let usage = record.usage.unwrap_or_default();
        tracing::info!(
            target: "portcullis::calls",
            call_id = %record.call_id,
            key = record.key_alias.as_deref().unwrap_or("-"),
            model = %record.model,
            end_user = record.end_user.as_deref(),
            deployment = record.deployment.as_deref().unwrap_or("-"),
            stream = record.stream,
            status = record.outcome.status(),
            error = record.outcome.error(),
            latency_ms = record.latency.as_millis() as u64,
            prompt_tokens = usage.prompt_tokens,
            completion_tokens = usage.completion_tokens,
            cost_usd = record.cost,
            attempts = record.attempts,
            fallbacks = record.fallbacks,
            metadata = %serde_json::Value::Object(record.metadata.clone()),
            tags = ?record.tags,
            "call finished"
        );
    }
}

impl CallHook for LogHook {
    fn name(&self) -> &str {
        "log"
    }

    fn on_call_end<'a>(&'a self, record: &'a CallRecord) -> BoxFuture<'a, ()> {
        LogHook::log(record);
        ready(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::call::{Call, Outcome};
    use crate::providers::Endpoint;
    use std::sync::Mutex;

    #[derive(Debug, Default)]
    struct Counting(Mutex<Vec<String>>);

    impl CallHook for Counting {
        fn name(&self) -> &str {
            "counting"
        }
        fn on_call_end<'a>(&'a self, record: &'a CallRecord) -> BoxFuture<'a, ()> {
            self.0.lock().expect("lock").push(record.call_id.clone());
            ready(())
        }
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let queue = PostCallQueue::start(1);
        let counting = Arc::new(Counting::default());
        let hooks: Hooks = Arc::new([counting.clone() as Arc<dyn CallHook>]);
        // The worker has not run yet (no await), so only one event fits.
        for _ in 0..5 {
            queue.submit(
                &hooks,
                Call::new(Endpoint::ChatCompletions).into_record(Outcome::Success),
            );
        }
        assert_eq!(queue.dropped(), 4);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(counting.0.lock().expect("lock").len(), 1);
    }
}
