//! Letting a round's effects out once its commits are durable.
//!
//! The engine commits with `synchronous=NORMAL`: SQLite writes each commit to the WAL and
//! returns without waiting for the disk. What a round decided (its enqueue answers and the
//! transactions it formed) must not leave the process before those commits are on disk, but the
//! engine need not wait for that either. It hands the round to the [`Releaser`], whose thread
//! (`asched-sync`) fsyncs the WAL and only then answers the enqueues and starts the sends, while
//! the engine goes on with the next round. Rounds that arrive while an fsync runs share the next
//! one (group commit), and rounds are let out in the order they were made. The store in memory
//! needs no fsync, so its rounds are let out at once, on the engine's thread.
//!
//! When the engine has nothing else to do and no earlier round waits for the releaser, it
//! makes its round durable itself ([`Releaser::release_now`]): a lone event then goes from the
//! engine's fsync straight to the HTTP thread, without waking the releaser's thread in between.
//! Both paths share one lock around the fsync and its failure state, and the engine hands
//! rounds over only from its own thread, so the order in which rounds are let out is the same.
//!
//! The releaser's first round after it starts is fsynced whatever it carries: a process that
//! crashed may have left commits in the operating system's cache only, and the new process
//! must not send what they hold before they are on disk.
//!
//! If an fsync fails, the releaser lets nothing out again: that round and every later one are
//! failed (enqueues answered with an error, sends dropped and named to the engine in
//! `Input::SyncFailed`), and the engine stops the plugin. There is no retry: on Linux a failed
//! fsync may already have dropped the unwritten pages, and a later fsync would succeed without
//! them, so after one failure nothing this process keeps in memory can be trusted to be on
//! disk. The operator restarts the host once the disk is checked.

use std::fs::File;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::oneshot;

use crate::engine::{EnqueueError, Input};
use crate::http::{Net, SendJob};
use crate::store::{StoreError, sync_wal};

/// Where an enqueue's answer goes.
pub type PendingEnqueue = oneshot::Sender<Result<u32, EnqueueError>>;

/// What one round of the engine decided.
#[derive(Default)]
pub struct Round {
    /// The transactions to send.
    pub sends: Vec<SendJob>,
    /// The enqueue answers.
    pub replies: Vec<(PendingEnqueue, Result<u32, EnqueueError>)>,
    /// Whether the round committed anything (its commits are not yet durable).
    pub commits: bool,
}

impl Round {
    /// Whether there is nothing to let out and nothing to make durable.
    pub fn is_empty(&self) -> bool {
        self.sends.is_empty() && self.replies.is_empty() && !self.commits
    }
}

/// Starts a round's sends, each reporting its outcome to `inputs`, then answers its enqueues.
pub fn release(round: Round, net: &Net, inputs: &Sender<Input>) {
    for job in round.sends {
        let inputs = inputs.clone();
        let id = job.id;
        net.start(job.target, job.body, move |outcome| {
            let _ = inputs.send(Input::SendFinished { id, outcome });
        });
    }
    for (reply, result) in round.replies {
        let _ = reply.send(result);
    }
}

/// The thread that makes rounds durable and lets them out.
pub struct Releaser {
    rounds: Option<Sender<Round>>,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Releaser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Releaser").finish_non_exhaustive()
    }
}

/// The fsync that makes every commit so far durable.
type SyncFn = Box<dyn FnMut() -> Result<(), StoreError> + Send>;

/// What the releaser's thread and [`Releaser::release_now`] share.
struct Shared {
    fsync: Mutex<FsyncState>,
    /// Rounds handed to the thread and not yet let out.
    queued: AtomicUsize,
    net: Arc<Net>,
    inputs: Sender<Input>,
}

struct FsyncState {
    sync: SyncFn,
    /// No round was let out yet: the next one is fsynced whatever it carries.
    first: bool,
    /// Why an fsync failed, once one has.
    failed: Option<String>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, FsyncState> {
        // A panic while the lock was held left no half-done state that matters: `failed` is set
        // before anything is let out, and a round is let out or failed as a whole.
        self.fsync.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl FsyncState {
    /// Makes `rounds` durable with one fsync (when they committed anything, or are the first)
    /// and lets them out in order.
    fn flush(&mut self, rounds: Vec<Round>, net: &Net, inputs: &Sender<Input>) {
        let needs_sync =
            std::mem::take(&mut self.first) || rounds.iter().any(|round| round.commits);
        flush(
            rounds,
            needs_sync,
            &mut self.failed,
            &mut *self.sync,
            net,
            inputs,
        );
    }
}

impl Releaser {
    /// Starts the thread for the store whose WAL is `wal`.
    pub fn start(wal: Arc<File>, net: Arc<Net>, inputs: Sender<Input>) -> std::io::Result<Self> {
        Releaser::start_with(move || sync_wal(&wal), net, inputs)
    }

    /// Starts the thread with `sync` as the fsync that makes every commit so far durable.
    pub fn start_with(
        sync: impl FnMut() -> Result<(), StoreError> + Send + 'static,
        net: Arc<Net>,
        inputs: Sender<Input>,
    ) -> std::io::Result<Self> {
        let (rounds, receiver) = mpsc::channel();
        let shared = Arc::new(Shared {
            fsync: Mutex::new(FsyncState {
                sync: Box::new(sync),
                first: true,
                failed: None,
            }),
            queued: AtomicUsize::new(0),
            net,
            inputs,
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("asched-sync".into())
                .spawn(move || run(&shared, &receiver))?
        };
        Ok(Releaser {
            rounds: Some(rounds),
            shared,
            thread: Some(thread),
        })
    }

    /// Hands over a round; it is let out once every commit before now is durable. Gives the
    /// round back if the thread is gone.
    ///
    /// Rounds must be handed over (here and to [`Releaser::release_now`]) from one thread, in
    /// the order they were made.
    pub fn submit(&self, round: Round) -> Result<(), Round> {
        let Some(rounds) = &self.rounds else {
            return Err(round);
        };
        self.shared.queued.fetch_add(1, Ordering::SeqCst);
        rounds.send(round).map_err(|refused| {
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            refused.0
        })
    }

    /// Makes the round durable and lets it out on the caller's thread, if no round handed
    /// over before it is still waiting; gives it back otherwise, to be handed over with
    /// [`Releaser::submit`]. For a caller with nothing else to do: it blocks for the fsync.
    pub fn release_now(&self, round: Round) -> Result<(), Round> {
        if self.shared.queued.load(Ordering::SeqCst) != 0 {
            return Err(round);
        }
        // The thread holds the lock only while it lets rounds out; it counts them off before it
        // lets go, so a round is never let out here before an earlier one.
        let Ok(mut state) = self.shared.fsync.try_lock() else {
            return Err(round);
        };
        state.flush(vec![round], &self.shared.net, &self.shared.inputs);
        Ok(())
    }
}

impl Drop for Releaser {
    /// Lets out every round handed over, then stops the thread.
    fn drop(&mut self) {
        self.rounds.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(shared: &Shared, rounds: &Receiver<Round>) {
    while let Ok(round) = rounds.recv() {
        let waiting: Vec<Round> = std::iter::once(round).chain(rounds.try_iter()).collect();
        let count = waiting.len();
        let mut state = shared.lock();
        state.flush(waiting, &shared.net, &shared.inputs);
        shared.queued.fetch_sub(count, Ordering::SeqCst);
    }
}

/// Makes the rounds durable with one fsync and lets them out; fails them if that fsync or an
/// earlier one failed.
fn flush(
    rounds: Vec<Round>,
    needs_sync: bool,
    failed: &mut Option<String>,
    sync: &mut dyn FnMut() -> Result<(), StoreError>,
    net: &Net,
    inputs: &Sender<Input>,
) {
    let first_failure = failed.is_none()
        && needs_sync
        && match sync() {
            Ok(()) => false,
            Err(error) => {
                let why = format!(
                    "the store could not make its writes durable ({error:?}); nothing more is \
                     acknowledged or sent: check the disk, then restart the host"
                );
                tracing::error!(error = %why, "the store failed");
                *failed = Some(why);
                true
            }
        };
    let Some(why) = failed.as_deref() else {
        for round in rounds {
            release(round, net, inputs);
        }
        return;
    };
    let dropped = fail(rounds, why);
    if first_failure || !dropped.is_empty() {
        let _ = inputs.send(Input::SyncFailed {
            why: why.to_owned(),
            dropped,
        });
    }
}

/// Answers the rounds' accepted enqueues with a storage error (refusals keep their own) and
/// drops their sends; returns the sends' handles.
pub fn fail(rounds: Vec<Round>, why: &str) -> Vec<u64> {
    let mut dropped = Vec::new();
    for round in rounds {
        dropped.extend(round.sends.iter().map(|job| job.id));
        for (reply, result) in round.replies {
            let _ = reply.send(result.and(Err(EnqueueError::Storage(why.to_owned()))));
        }
    }
    dropped
}

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::http::{HttpConfig, Target};

    fn job(id: u64) -> SendJob {
        SendJob {
            id,
            target: Target::unused(),
            body: b"{}".to_vec(),
        }
    }

    fn next(inputs: &Receiver<Input>) -> Input {
        inputs
            .recv_timeout(Duration::from_secs(10))
            .expect("the releaser reports")
    }

    fn dropped_sends(input: Input) -> Vec<u64> {
        match input {
            Input::SyncFailed { why, dropped } => {
                assert!(
                    why.contains("EIO") && why.contains("restart the host"),
                    "{why}"
                );
                dropped
            }
            _ => panic!("expected SyncFailed"),
        }
    }

    fn net() -> Arc<Net> {
        Arc::new(Net::new(&HttpConfig::default(), &[], &[]).unwrap())
    }

    /// A releaser whose first `good` fsyncs succeed and every later one fails with "EIO"; the
    /// engine's side of its channel; and the number of fsyncs so far.
    fn releaser(good: usize) -> (Releaser, Receiver<Input>, Arc<AtomicUsize>) {
        let syncs = Arc::new(AtomicUsize::new(0));
        let counted = syncs.clone();
        let sync = move || {
            if counted.fetch_add(1, Ordering::SeqCst) < good {
                Ok(())
            } else {
                Err(StoreError::Failed("EIO".into()))
            }
        };
        let (inputs, reports) = mpsc::channel();
        let releaser = Releaser::start_with(sync, net(), inputs).unwrap();
        (releaser, reports, syncs)
    }

    fn round(
        replies: Vec<(PendingEnqueue, Result<u32, EnqueueError>)>,
        sends: &[u64],
        commits: bool,
    ) -> Round {
        Round {
            sends: sends.iter().copied().map(job).collect(),
            replies,
            commits,
        }
    }

    /// Hands over a round of one enqueue answered `result` and these sends; waits for the
    /// answer the caller gets.
    fn answer_to(
        releaser: &Releaser,
        result: Result<u32, EnqueueError>,
        sends: &[u64],
        commits: bool,
    ) -> Result<u32, EnqueueError> {
        let (reply, answer) = oneshot::channel();
        releaser
            .submit(round(vec![(reply, result)], sends, commits))
            .ok()
            .unwrap();
        answer.blocking_recv().unwrap()
    }

    /// The first round is fsynced whatever it carries (a crashed process may have left commits
    /// in the cache only); later rounds only when they, or rounds waiting with them, committed.
    #[test]
    fn the_first_round_is_fsynced_then_only_rounds_with_commits() {
        let (releaser, _reports, syncs) = releaser(usize::MAX);
        let count = || syncs.load(Ordering::SeqCst);
        for (commits, expected) in [(false, 1), (false, 1), (true, 2), (false, 2)] {
            let answer = answer_to(&releaser, Ok(1), &[], commits);
            assert_eq!(answer, Ok(1));
            assert_eq!(count(), expected, "after a round with commits: {commits}");
        }
    }

    /// After an fsync fails, nothing is let out again and the fsync is not retried: accepted
    /// enqueues are answered with a storage error, refusals keep their own, sends are dropped
    /// and named to the engine.
    #[test]
    fn a_failed_fsync_lets_nothing_out_again() {
        let (releaser, reports, syncs) = releaser(1);
        let answer = answer_to(&releaser, Ok(3), &[], true);
        assert_eq!(answer, Ok(3));

        let answer = answer_to(&releaser, Ok(3), &[7], true);
        assert!(
            matches!(&answer, Err(EnqueueError::Storage(why)) if why.contains("restart the host")),
            "{answer:?}"
        );
        assert_eq!(dropped_sends(next(&reports)), [7]);

        let (accepted, accepted_answer) = oneshot::channel();
        let (refused, refused_answer) = oneshot::channel();
        let replies = vec![
            (accepted, Ok(1)),
            (refused, Err(EnqueueError::UnknownAppservice("x".into()))),
        ];
        releaser
            .submit(round(replies, &[8, 9], false))
            .ok()
            .unwrap();
        assert!(matches!(
            accepted_answer.blocking_recv().unwrap(),
            Err(EnqueueError::Storage(_))
        ));
        assert_eq!(
            refused_answer.blocking_recv().unwrap(),
            Err(EnqueueError::UnknownAppservice("x".into()))
        );
        assert_eq!(dropped_sends(next(&reports)), [8, 9]);

        let answer = answer_to(&releaser, Ok(2), &[], true);
        assert!(matches!(answer, Err(EnqueueError::Storage(_))));
        drop(releaser);
        assert_eq!(syncs.load(Ordering::SeqCst), 2, "no retry");
        assert!(reports.try_recv().is_err(), "nothing else was reported");
    }

    /// With nothing waiting for the thread, `release_now` makes the round durable and lets it
    /// out before it returns, on the caller's thread; the first round is fsynced whatever it
    /// carries, later ones only when they committed.
    #[test]
    fn release_now_lets_a_round_out_before_it_returns() {
        let (releaser, _reports, syncs) = releaser(usize::MAX);
        for (commits, expected) in [(false, 1), (true, 2), (false, 2)] {
            let (reply, mut answer) = oneshot::channel();
            let round = round(vec![(reply, Ok(4))], &[], commits);
            assert!(releaser.release_now(round).is_ok());
            assert_eq!(
                answer.try_recv(),
                Ok(Ok(4)),
                "answered before release_now returned"
            );
            assert_eq!(syncs.load(Ordering::SeqCst), expected, "commits: {commits}");
        }
    }

    /// While a round handed to the thread waits for its fsync, `release_now` gives a later
    /// round back untouched, so that it is let out after the earlier one.
    #[test]
    fn release_now_never_overtakes_a_waiting_round() {
        let (started, fsync_started) = mpsc::channel();
        let (finish, may_finish) = mpsc::channel::<()>();
        let syncs = Arc::new(AtomicUsize::new(0));
        let counted = syncs.clone();
        let sync = move || {
            counted.fetch_add(1, Ordering::SeqCst);
            let _ = started.send(());
            let _ = may_finish.recv();
            Ok(())
        };
        let (inputs, _reports) = mpsc::channel();
        let releaser = Releaser::start_with(sync, net(), inputs).unwrap();

        let (first_reply, first_answer) = oneshot::channel();
        releaser
            .submit(round(vec![(first_reply, Ok(1))], &[], true))
            .ok()
            .unwrap();
        fsync_started
            .recv_timeout(Duration::from_secs(10))
            .expect("the thread fsyncs");
        let (second_reply, mut second_answer) = oneshot::channel();
        let given_back = releaser
            .release_now(round(vec![(second_reply, Ok(2))], &[], true))
            .expect_err("an earlier round waits");
        assert_eq!(
            second_answer.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        );
        releaser.submit(given_back).ok().unwrap();
        finish.send(()).unwrap();
        finish.send(()).unwrap();
        assert_eq!(first_answer.blocking_recv().unwrap(), Ok(1));
        assert_eq!(second_answer.blocking_recv().unwrap(), Ok(2));
        drop(releaser);
        assert_eq!(syncs.load(Ordering::SeqCst), 2);
    }

    /// An fsync that failed on the thread fails the rounds `release_now` lets out too, without
    /// another fsync.
    #[test]
    fn release_now_shares_the_threads_failure() {
        let (releaser, reports, syncs) = releaser(0);
        let answer = answer_to(&releaser, Ok(1), &[3], true);
        assert!(
            matches!(answer, Err(EnqueueError::Storage(_))),
            "{answer:?}"
        );
        assert_eq!(dropped_sends(next(&reports)), [3]);

        let (reply, mut answer) = oneshot::channel();
        assert!(
            releaser
                .release_now(round(vec![(reply, Ok(5))], &[6], true))
                .is_ok()
        );
        assert!(matches!(
            answer.try_recv(),
            Ok(Err(EnqueueError::Storage(why))) if why.contains("restart the host")
        ));
        assert_eq!(dropped_sends(next(&reports)), [6]);
        assert_eq!(syncs.load(Ordering::SeqCst), 1, "no retry");
    }

    /// The real fsync of a file that cannot be fsynced (a pipe) fails the first round.
    #[test]
    fn an_unsyncable_wal_fails_the_first_round() {
        let (_reader, writer) = std::io::pipe().unwrap();
        let wal = Arc::new(File::from(OwnedFd::from(writer)));
        let (inputs, reports) = mpsc::channel();
        let releaser = Releaser::start(wal, net(), inputs).unwrap();
        let answer = answer_to(&releaser, Ok(1), &[5], false);
        assert!(matches!(answer, Err(EnqueueError::Storage(_))));
        match next(&reports) {
            Input::SyncFailed { why, dropped } => {
                assert!(why.contains("fsync of the WAL failed"), "{why}");
                assert_eq!(dropped, [5]);
            }
            _ => panic!("expected SyncFailed"),
        }
    }
}
