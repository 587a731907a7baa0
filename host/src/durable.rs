//! Letting a round's effects out once its commits are durable.
//!
//! The engine commits with `synchronous=NORMAL`: SQLite writes each commit to the WAL and
//! returns without waiting for the disk. What a round decided (its enqueue answers and the
//! transactions it formed) must not leave the process before those commits are on disk, but the
//! engine need not wait for that either. It hands the round to the [`Releaser`], whose threads
//! (`asched-sync`) fsync the WAL and only then answer the enqueues and start the sends, while
//! the engine goes on with the next round. An fsync makes durable every round handed over
//! before it started, so rounds that arrive while fsyncs run share a later one (group commit).
//! Rounds are let out in the order they were made: one that committed (and the first) once an
//! fsync that started after it has returned, any other once the rounds before it are out. The
//! store in memory needs no fsync, so its rounds are let out at once, on the engine's thread.
//!
//! Up to [`FSYNC_SLOTS`] fsyncs run at once. A round that arrives while one runs starts the
//! next at once instead of waiting for it to end: on the disks measured, an fsync that starts
//! beside another returns sooner than one that waits for it first. When the later fsync
//! returns first, it lets out the rounds of the earlier one too. And when the engine has
//! nothing else to do, it runs its round's fsync itself (`submit` with `now`): a lone event
//! then goes from the engine's fsync straight to the HTTP thread, without waking a releaser
//! thread in between.
//!
//! The releaser's first round after it starts is fsynced whatever it carries: a process that
//! crashed may have left commits in the operating system's cache only, and the new process
//! must not send what they hold before they are on disk.
//!
//! If an fsync fails, the releaser lets nothing out again: every round not yet let out, and
//! every later one, is failed (enqueues answered with an error, sends dropped and named to the
//! engine in `Input::SyncFailed`), and the engine stops the plugin. There is no retry: on Linux
//! a failed fsync may already have dropped the unwritten pages, and a later fsync would succeed
//! without them, so after one failure nothing this process keeps in memory can be trusted to be
//! on disk. The operator restarts the host once the disk is checked. Each fsync slot has an
//! open file of the WAL of its own, because Linux reports a failed writeback once to each open
//! file: so no fsync can return success by missing a failure another one consumed, and one
//! that does return success has waited for every page written before it started. Rounds it
//! let out stay out even if an fsync that started earlier fails after it.

use std::collections::VecDeque;
use std::fs::File;
use std::path::Path;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use anyhow::Context;
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

/// How many fsyncs may run at once, each through its own open file of the WAL.
pub const FSYNC_SLOTS: usize = 2;

/// Makes rounds durable and lets them out, on its threads (`asched-sync`) or, when the engine
/// has nothing else to do, on the engine's ([`Releaser::submit`]).
pub struct Releaser {
    shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Releaser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Releaser").finish_non_exhaustive()
    }
}

/// An fsync through one slot's open file that makes every commit before it durable.
type SyncFn = Box<dyn Fn(usize) -> Result<(), StoreError> + Send + Sync>;

/// What the releaser's threads and the engine share.
struct Shared {
    state: Mutex<State>,
    /// Signalled when a round needs an fsync, when one ends and when the releaser stops.
    work: Condvar,
    sync: SyncFn,
    net: Arc<Net>,
    inputs: Sender<Input>,
}

/// A round handed over and not yet let out.
struct Waiting {
    /// Rounds are numbered in the order they were handed over, from 0.
    number: u64,
    /// Whether an fsync must return after it was handed over before it is let out: it
    /// committed, or it is the first (see the module's documentation).
    needs_fsync: bool,
    round: Round,
}

struct State {
    /// Oldest first.
    waiting: VecDeque<Waiting>,
    /// The number of the next round handed over.
    next: u64,
    /// Rounds numbered below this one that need an fsync have one started for them.
    covered: u64,
    /// Rounds numbered below this one are durable: an fsync that started after them returned.
    durable: u64,
    /// The last round handed over that needs an fsync, plus one (0 for none).
    needed: u64,
    /// The slots whose open file no fsync is using.
    free_slots: Vec<usize>,
    /// Why an fsync failed, once one has.
    failed: Option<String>,
    stopping: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while the lock was held leaves no half-done state that matters: `failed` is
        // set before anything is let out, and the numbers only grow. (A panic while a round is
        // let out loses what of it was not out yet; starting a send and answering an enqueue
        // do not panic.)
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts an fsync for the rounds that wait for one, if none covers them yet and a slot
    /// is free; runs it on this thread (without the lock), then lets out what it made durable.
    /// Returns the lock again, and whether it ran one.
    fn fsync_if_needed<'a>(
        &'a self,
        mut state: MutexGuard<'a, State>,
    ) -> (MutexGuard<'a, State>, bool) {
        if state.failed.is_some() || state.needed <= state.covered {
            return (state, false);
        }
        let Some(slot) = state.free_slots.pop() else {
            return (state, false);
        };
        let upto = state.next;
        state.covered = upto;
        drop(state);
        // A panic in the fsync counts as its failure, so that its slot and rounds are not lost.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (self.sync)(slot)))
            .unwrap_or_else(|_| Err(StoreError::Failed("the fsync panicked".into())));
        let mut state = self.lock();
        state.free_slots.push(slot);
        let mut first_failure = false;
        match result {
            Ok(()) => state.durable = state.durable.max(upto),
            Err(error) => {
                if state.failed.is_none() {
                    let why = format!(
                        "the store could not make its writes durable ({error:?}); nothing more \
                         is acknowledged or sent: check the disk, then restart the host"
                    );
                    tracing::error!(error = %why, "the store failed");
                    state.failed = Some(why);
                    first_failure = true;
                }
            }
        }
        self.let_out(&mut state, first_failure);
        // Another thread may wait for this slot, or for the rounds to be let out to stop.
        self.work.notify_all();
        (state, true)
    }

    /// Lets out, in order, the waiting rounds that are durable or need no fsync, up to the
    /// first that is neither; after a failed fsync, fails every waiting round instead.
    fn let_out(&self, state: &mut State, first_failure: bool) {
        if let Some(why) = &state.failed {
            let rounds = state.waiting.drain(..).map(|w| w.round).collect();
            let dropped = fail(rounds, why);
            if first_failure || !dropped.is_empty() {
                let _ = self.inputs.send(Input::SyncFailed {
                    why: why.clone(),
                    dropped,
                });
            }
            return;
        }
        while let Some(front) = state.waiting.front() {
            if front.needs_fsync && front.number >= state.durable {
                return;
            }
            let waiting = state.waiting.pop_front().expect("the front exists");
            release(waiting.round, &self.net, &self.inputs);
        }
    }
}

impl Releaser {
    /// Starts the threads for the store whose WAL is at `wal`, which each fsync slot opens once
    /// more: Linux reports a failed writeback once to each open file, so an fsync through one
    /// slot never hides another's failure.
    pub fn start(wal: &Path, net: Arc<Net>, inputs: Sender<Input>) -> anyhow::Result<Self> {
        let files = (0..FSYNC_SLOTS)
            .map(|_| File::open(wal))
            .collect::<std::io::Result<Vec<File>>>()
            .with_context(|| format!("cannot open the WAL {}", wal.display()))?;
        Releaser::start_with(move |slot| sync_wal(&files[slot]), net, inputs)
            .context("cannot start the threads that fsync the store")
    }

    /// Starts the threads with `sync(slot)` as the fsync through slot `slot`
    /// (`0..FSYNC_SLOTS`) that makes every commit so far durable.
    pub fn start_with(
        sync: impl Fn(usize) -> Result<(), StoreError> + Send + Sync + 'static,
        net: Arc<Net>,
        inputs: Sender<Input>,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                waiting: VecDeque::new(),
                next: 0,
                covered: 0,
                durable: 0,
                needed: 0,
                free_slots: (0..FSYNC_SLOTS).rev().collect(),
                failed: None,
                stopping: false,
            }),
            work: Condvar::new(),
            sync: Box::new(sync),
            net,
            inputs,
        });
        let mut releaser = Releaser {
            shared,
            threads: Vec::new(),
        };
        for _ in 0..FSYNC_SLOTS {
            let shared = releaser.shared.clone();
            let thread = std::thread::Builder::new()
                .name("asched-sync".into())
                .spawn(move || run(&shared))?;
            releaser.threads.push(thread);
        }
        Ok(releaser)
    }

    /// Hands over a round; it is let out once every commit before now is durable, after every
    /// round handed over before it. With `now`, for a caller with nothing else to do, the
    /// fsync it needs runs on the caller's thread when a slot is free (and the round is out
    /// when this returns, unless it waits for an earlier round whose fsync still runs);
    /// otherwise a releaser thread runs it. Gives the round back if the releaser's threads have
    /// ended, which before the releaser is dropped only a panic does.
    pub fn submit(&self, round: Round, now: bool) -> Result<(), Round> {
        if self
            .threads
            .iter()
            .all(std::thread::JoinHandle::is_finished)
        {
            return Err(round);
        }
        let mut state = self.shared.lock();
        let number = state.next;
        state.next += 1;
        let needs_fsync = round.commits || number == 0;
        if needs_fsync {
            state.needed = number + 1;
        }
        state.waiting.push_back(Waiting {
            number,
            needs_fsync,
            round,
        });
        self.shared.let_out(&mut state, false);
        if now {
            state = self.shared.fsync_if_needed(state).0;
        }
        if state.needed > state.covered {
            self.shared.work.notify_one();
        }
        Ok(())
    }
}

impl Drop for Releaser {
    /// Lets out every round handed over, then stops the threads.
    fn drop(&mut self) {
        self.shared.lock().stopping = true;
        self.shared.work.notify_all();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// A releaser thread: runs an fsync whenever rounds need one and a slot is free, until the
/// releaser stops and nothing waits.
fn run(shared: &Shared) {
    let mut state = shared.lock();
    loop {
        let ran;
        (state, ran) = shared.fsync_if_needed(state);
        if ran {
            continue;
        }
        if state.stopping && state.waiting.is_empty() {
            return;
        }
        state = shared
            .work
            .wait(state)
            .unwrap_or_else(PoisonError::into_inner);
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
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::mpsc::{self, Receiver};
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
        let sync = move |_slot| {
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

    /// Hands over a round of one enqueue answered `Ok(n)` and these sends; returns where the
    /// caller's answer arrives.
    fn hand_over(
        releaser: &Releaser,
        n: u32,
        sends: &[u64],
        commits: bool,
        now: bool,
    ) -> oneshot::Receiver<Result<u32, EnqueueError>> {
        let (reply, answer) = oneshot::channel();
        releaser
            .submit(round(vec![(reply, Ok(n))], sends, commits), now)
            .ok()
            .unwrap();
        answer
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
            .submit(round(vec![(reply, result)], sends, commits), false)
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
            .submit(round(replies, &[8, 9], false), false)
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

    /// A caller with nothing else to do runs the fsync itself: its round is out when `submit`
    /// returns. The first round is fsynced whatever it carries, later ones only when they
    /// committed.
    #[test]
    fn an_idle_callers_round_is_out_when_submit_returns() {
        let (releaser, _reports, syncs) = releaser(usize::MAX);
        for (commits, expected) in [(false, 1), (true, 2), (false, 2)] {
            let mut answer = hand_over(&releaser, 4, &[], commits, true);
            assert_eq!(answer.try_recv(), Ok(Ok(4)), "commits: {commits}");
            assert_eq!(syncs.load(Ordering::SeqCst), expected, "commits: {commits}");
        }
    }

    /// A releaser whose fsyncs, numbered from 1, are told by `plan` whether to wait for a
    /// signal on the returned sender before they return, and what to return; it reports each
    /// fsync's number on the returned receiver as it starts.
    fn planned_releaser(
        plan: fn(usize) -> (bool, Result<(), StoreError>),
    ) -> (Releaser, Receiver<Input>, Receiver<usize>, mpsc::Sender<()>) {
        let (started, starts) = mpsc::channel();
        let (finish, may_finish) = mpsc::channel::<()>();
        let started = Mutex::new(started);
        let may_finish = Mutex::new(may_finish);
        let count = AtomicUsize::new(0);
        let sync = move |_slot| {
            let n = count.fetch_add(1, Ordering::SeqCst) + 1;
            let _ = started.lock().unwrap().send(n);
            let (wait, result) = plan(n);
            if wait {
                let _ = may_finish.lock().unwrap().recv();
            }
            result
        };
        let (inputs, reports) = mpsc::channel();
        let releaser = Releaser::start_with(sync, net(), inputs).unwrap();
        (releaser, reports, starts, finish)
    }

    fn started(starts: &Receiver<usize>) -> usize {
        starts
            .recv_timeout(Duration::from_secs(10))
            .expect("an fsync starts")
    }

    /// While one fsync runs, a round handed over gets a second one at once; when that returns,
    /// it has made both rounds durable, and both are let out, the earlier first.
    #[test]
    fn a_second_fsync_runs_beside_a_slow_one_and_lets_both_rounds_out() {
        let (releaser, _reports, starts, finish) = planned_releaser(|n| (n == 1, Ok(())));
        let mut first_answer = hand_over(&releaser, 1, &[], true, false);
        assert_eq!(started(&starts), 1);
        let mut second_answer = hand_over(&releaser, 2, &[], true, true);
        assert_eq!(started(&starts), 2);
        assert_eq!(first_answer.try_recv(), Ok(Ok(1)), "fsync 1 still runs");
        assert_eq!(second_answer.try_recv(), Ok(Ok(2)));
        finish.send(()).unwrap();
        drop(releaser);
        assert_eq!(starts.try_recv().ok(), None, "two fsyncs in all");
    }

    /// A round that needs no fsync of its own still waits for the rounds before it.
    #[test]
    fn a_round_without_commits_waits_for_the_round_before_it() {
        let (releaser, _reports, starts, finish) = planned_releaser(|_| (true, Ok(())));
        let first_answer = hand_over(&releaser, 1, &[], true, false);
        assert_eq!(started(&starts), 1);
        let mut second_answer = hand_over(&releaser, 2, &[], false, true);
        assert_eq!(
            second_answer.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        );
        finish.send(()).unwrap();
        assert_eq!(first_answer.blocking_recv().unwrap(), Ok(1));
        assert_eq!(second_answer.blocking_recv().unwrap(), Ok(2));
        drop(releaser);
        assert_eq!(starts.try_recv().ok(), None, "one fsync in all");
    }

    /// When the slower of two fsyncs fails after the later one made every round durable, the
    /// rounds already out stay out, and nothing is let out again.
    #[test]
    fn a_slow_fsync_that_fails_stops_every_later_round() {
        let (releaser, reports, starts, finish) = planned_releaser(|n| match n {
            1 => (true, Err(StoreError::Failed("EIO".into()))),
            _ => (false, Ok(())),
        });
        let first_answer = hand_over(&releaser, 1, &[], true, false);
        assert_eq!(started(&starts), 1);
        let mut second_answer = hand_over(&releaser, 2, &[], true, true);
        assert_eq!(started(&starts), 2);
        assert_eq!(second_answer.try_recv(), Ok(Ok(2)));
        finish.send(()).unwrap();
        assert_eq!(first_answer.blocking_recv().unwrap(), Ok(1));
        assert_eq!(dropped_sends(next(&reports)), Vec::<u64>::new());

        let mut third_answer = hand_over(&releaser, 3, &[4], true, true);
        assert!(matches!(
            third_answer.try_recv(),
            Ok(Err(EnqueueError::Storage(why))) if why.contains("restart the host")
        ));
        assert_eq!(dropped_sends(next(&reports)), [4]);
        drop(releaser);
        assert_eq!(starts.try_recv().ok(), None, "no fsync after the failure");
    }

    /// With both slots busy, a round that committed is let out by neither of the fsyncs
    /// already running, whichever returns first, but by a third that a releaser thread starts
    /// as soon as a slot is free.
    #[test]
    fn a_round_behind_two_running_fsyncs_waits_for_a_third() {
        for first_to_return in [1usize, 2] {
            let (started_tx, starts) = mpsc::channel();
            let mut gates = Vec::new();
            let mut opens = Vec::new();
            for _ in 0..3 {
                let (open, gate) = mpsc::channel::<()>();
                opens.push(open);
                gates.push(Mutex::new(gate));
            }
            let started_tx = Mutex::new(started_tx);
            let count = AtomicUsize::new(0);
            // Fsync n (from 1) returns once `opens[n - 1]` is signalled.
            let sync = move |_slot| {
                let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                started_tx.lock().unwrap().send(n).unwrap();
                let _ = gates[n - 1].lock().unwrap().recv();
                Ok(())
            };
            let (inputs, _reports) = mpsc::channel();
            let releaser = Releaser::start_with(sync, net(), inputs).unwrap();
            // Dropped before the releaser, so that a failing assertion ends its fsyncs.
            let opens = opens;
            let answer0 = hand_over(&releaser, 0, &[], true, false);
            assert_eq!(started(&starts), 1);
            let answer1 = hand_over(&releaser, 1, &[], true, false);
            assert_eq!(started(&starts), 2);
            let mut answer2 = hand_over(&releaser, 2, &[], true, true);
            let not_out = Err(oneshot::error::TryRecvError::Empty);
            assert_eq!(answer2.try_recv(), not_out);
            opens[first_to_return - 1].send(()).unwrap();
            assert_eq!(
                started(&starts),
                3,
                "a third fsync starts without the caller"
            );
            assert_eq!(answer0.blocking_recv().unwrap(), Ok(0));
            assert_eq!(answer2.try_recv(), not_out, "not out before fsync 3");
            opens[2 - first_to_return].send(()).unwrap();
            assert_eq!(answer1.blocking_recv().unwrap(), Ok(1));
            assert_eq!(answer2.try_recv(), not_out, "not out before fsync 3");
            opens[2].send(()).unwrap();
            assert_eq!(answer2.blocking_recv().unwrap(), Ok(2));
            drop(releaser);
        }
    }

    /// Dropping the releaser lets out every round still waiting, fsync or not.
    #[test]
    fn dropping_the_releaser_lets_out_every_waiting_round() {
        for _ in 0..50 {
            let (releaser, _reports, _syncs) = releaser(usize::MAX);
            let mut answers = Vec::new();
            for n in 0..5 {
                answers.push(hand_over(&releaser, n, &[], n % 2 == 0, false));
            }
            drop(releaser);
            for (n, mut answer) in (0..).zip(answers) {
                assert_eq!(answer.try_recv(), Ok(Ok(n)));
            }
        }
    }

    /// A panic in an fsync counts as its failure: the rounds it covered are failed, and the
    /// releaser still stops.
    #[test]
    fn a_panicking_fsync_fails_its_rounds() {
        let (inputs, reports) = mpsc::channel();
        let sync = |_slot| -> Result<(), StoreError> { panic!("test: the fsync panics") };
        let releaser = Releaser::start_with(sync, net(), inputs).unwrap();
        let answer = answer_to(&releaser, Ok(1), &[2], true);
        assert!(
            matches!(answer, Err(EnqueueError::Storage(_))),
            "{answer:?}"
        );
        match next(&reports) {
            Input::SyncFailed { why, dropped } => {
                assert!(why.contains("the fsync panicked"), "{why}");
                assert_eq!(dropped, [2]);
            }
            _ => panic!("expected SyncFailed"),
        }
        drop(releaser);
    }

    /// Thousands of rounds, some committing, some handed over `now`, against fsyncs of varied
    /// length: two fsyncs never share a slot, rounds come out in the order they were handed
    /// over, and a round that committed comes out only after an fsync that started after it
    /// returned.
    #[test]
    fn many_rounds_come_out_in_order_each_after_an_fsync_that_started_after_it() {
        use std::sync::atomic::AtomicU64;
        let in_use: Arc<[AtomicUsize; FSYNC_SLOTS]> = Arc::new(Default::default());
        // The rounds handed over so far, as an fsync reads it when it starts. The releaser fixed
        // what its fsync covers a moment before, so this can overstate it: the check below can
        // miss a round let out early, but never fails a releaser that is right.
        let handed = Arc::new(AtomicU64::new(0));
        let durable = Arc::new(AtomicU64::new(0));
        // Set when two fsyncs use one slot at once (asserted at the end: a panic in an fsync
        // would only fail its rounds).
        let shared_slot = Arc::new(AtomicBool::new(false));
        let (slots, handed_seen, made_durable, shared) = (
            in_use.clone(),
            handed.clone(),
            durable.clone(),
            shared_slot.clone(),
        );
        let sync = move |slot: usize| {
            if slots[slot].fetch_add(1, Ordering::SeqCst) != 0 {
                shared.store(true, Ordering::SeqCst);
            }
            let start = handed_seen.load(Ordering::SeqCst);
            std::thread::sleep(Duration::from_micros(50 + (start % 7) * 30));
            slots[slot].fetch_sub(1, Ordering::SeqCst);
            made_durable.fetch_max(start, Ordering::SeqCst);
            Ok(())
        };
        let (inputs, _reports) = mpsc::channel();
        let releaser = Releaser::start_with(sync, net(), inputs).unwrap();
        let mut waiting = Vec::new();
        for n in 0..3000u32 {
            let commits = n % 3 != 1;
            handed.store(u64::from(n) + 1, Ordering::SeqCst);
            let answer = hand_over(&releaser, n, &[], commits, n % 5 == 0);
            waiting.push((n, commits, answer));
            if n % 11 == 0 {
                std::thread::sleep(Duration::from_micros(100));
            }
            // Newest first: once one round is out, every older one must be out too.
            let mut newer_out = false;
            let mut still_waiting = Vec::new();
            for (m, committed, mut answer) in waiting.into_iter().rev() {
                match answer.try_recv() {
                    Ok(result) => {
                        assert_eq!(result, Ok(m));
                        if committed {
                            assert!(durable.load(Ordering::SeqCst) > u64::from(m), "{m} early");
                        }
                        newer_out = true;
                    }
                    Err(_) => {
                        assert!(!newer_out, "round {m} is not out, a later one is");
                        still_waiting.push((m, committed, answer));
                    }
                }
            }
            still_waiting.reverse();
            waiting = still_waiting;
        }
        drop(releaser);
        for (m, _, mut answer) in waiting {
            assert_eq!(answer.try_recv(), Ok(Ok(m)));
        }
        assert!(
            !shared_slot.load(Ordering::SeqCst),
            "two fsyncs shared a slot"
        );
    }

    /// The real fsync of a file that cannot be fsynced (a pipe) fails the first round.
    #[test]
    fn an_unsyncable_wal_fails_the_first_round() {
        let (_reader, writer) = std::io::pipe().unwrap();
        let wal = Arc::new(File::from(OwnedFd::from(writer)));
        let (inputs, reports) = mpsc::channel();
        let releaser = Releaser::start_with(move |_slot| sync_wal(&wal), net(), inputs).unwrap();
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
