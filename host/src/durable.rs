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
//! If an fsync fails, nothing of that round or of any later one is let out: enqueues are answered
//! with an error and sends are dropped, each reported to the engine (`Input::SyncFailed`), which
//! stops the plugin instance and asks for a [`Releaser::reset`]. The reset is confirmed on the
//! engine's channel (`Input::SyncReset`) after every round before it was reported, so the engine
//! rebuilds the plugin from the store knowing exactly which sends never went out.

use std::fs::File;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};

use tokio::sync::oneshot;

use crate::engine::{EnqueueError, Input};
use crate::http::{Net, SendJob};
use crate::store::sync_wal;

/// Where an enqueue's answer goes.
pub type PendingEnqueue = oneshot::Sender<Result<u32, EnqueueError>>;

/// What one round of the engine decided.
#[derive(Default)]
pub struct Round {
    /// The transactions to send.
    pub sends: Vec<SendJob>,
    /// The enqueue answers.
    pub replies: Vec<(PendingEnqueue, Result<u32, EnqueueError>)>,
    /// Whether the round (or one before it) committed anything not yet made durable.
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

enum Message {
    Round(Round),
    Reset,
}

/// The thread that makes rounds durable and lets them out.
pub struct Releaser {
    messages: Option<Sender<Message>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Releaser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Releaser").finish_non_exhaustive()
    }
}

impl Releaser {
    /// Starts the thread for the store whose WAL is `wal`.
    pub fn start(wal: Arc<File>, net: Arc<Net>, inputs: Sender<Input>) -> std::io::Result<Self> {
        let (messages, receiver) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("asched-sync".into())
            .spawn(move || run(&wal, &net, &inputs, &receiver))?;
        Ok(Releaser {
            messages: Some(messages),
            thread: Some(thread),
        })
    }

    /// Hands over a round; it is let out once every commit before now is durable.
    pub fn submit(&self, round: Round) {
        self.send(Message::Round(round));
    }

    /// Ends the failed state after an fsync failed; confirmed with `Input::SyncReset`.
    pub fn reset(&self) {
        self.send(Message::Reset);
    }

    fn send(&self, message: Message) {
        if let Some(messages) = &self.messages {
            // The thread only ends when this handle closes the channel.
            let _ = messages.send(message);
        }
    }
}

impl Drop for Releaser {
    /// Lets out every round handed over, then stops the thread.
    fn drop(&mut self) {
        self.messages.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(wal: &File, net: &Net, inputs: &Sender<Input>, messages: &Receiver<Message>) {
    let mut failed: Option<String> = None;
    while let Ok(first) = messages.recv() {
        let mut rounds = Vec::new();
        for message in std::iter::once(first).chain(messages.try_iter()) {
            match message {
                Message::Round(round) => rounds.push(round),
                Message::Reset => {
                    flush(std::mem::take(&mut rounds), &mut failed, wal, net, inputs);
                    failed = None;
                    let _ = inputs.send(Input::SyncReset);
                }
            }
        }
        flush(rounds, &mut failed, wal, net, inputs);
    }
}

/// Makes the rounds durable with one fsync and lets them out; fails them if that fsync or an
/// earlier one failed.
fn flush(
    rounds: Vec<Round>,
    failed: &mut Option<String>,
    wal: &File,
    net: &Net,
    inputs: &Sender<Input>,
) {
    if rounds.is_empty() {
        return;
    }
    let first_failure = failed.is_none()
        && rounds.iter().any(|round| round.commits)
        && match sync_wal(wal) {
            Ok(()) => false,
            Err(error) => {
                let why = format!("the store could not make its writes durable: {error:?}");
                tracing::error!(error = %why, "nothing more is acknowledged or sent until the plugin is rebuilt");
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
    let mut dropped = Vec::new();
    for round in rounds {
        dropped.extend(round.sends.iter().map(|job| job.id));
        for (reply, result) in round.replies {
            let _ = reply.send(result.and(Err(EnqueueError::Storage(why.to_owned()))));
        }
    }
    if first_failure || !dropped.is_empty() {
        let _ = inputs.send(Input::SyncFailed {
            why: why.to_owned(),
            dropped,
        });
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;
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
                assert!(why.contains("fsync of the WAL failed"), "{why}");
                dropped
            }
            _ => panic!("expected SyncFailed"),
        }
    }

    /// When the fsync fails (a pipe cannot be fsynced), the round and every later one are
    /// failed: accepted enqueues are answered with a storage error, refusals keep their own,
    /// sends are dropped and named to the engine. After the reset, rounds go out again.
    #[test]
    fn a_failed_fsync_lets_nothing_out_until_the_reset() {
        let (_reader, writer) = std::io::pipe().unwrap();
        let wal = Arc::new(File::from(OwnedFd::from(writer)));
        let net = Arc::new(Net::new(&HttpConfig::default(), &[], &[]).unwrap());
        let (inputs, reports) = mpsc::channel();
        let releaser = Releaser::start(wal, net, inputs).unwrap();

        let (reply, answer) = oneshot::channel();
        releaser.submit(Round {
            sends: vec![job(7)],
            replies: vec![(reply, Ok(3))],
            commits: true,
        });
        let answer = answer.blocking_recv().unwrap();
        assert!(
            matches!(&answer, Err(EnqueueError::Storage(why)) if why.contains("fsync of the WAL failed")),
            "{answer:?}"
        );
        assert_eq!(dropped_sends(next(&reports)), [7]);

        let (accepted, accepted_answer) = oneshot::channel();
        let (refused, refused_answer) = oneshot::channel();
        releaser.submit(Round {
            sends: vec![job(8), job(9)],
            replies: vec![
                (accepted, Ok(1)),
                (refused, Err(EnqueueError::UnknownAppservice("x".into()))),
            ],
            commits: false,
        });
        assert!(matches!(
            accepted_answer.blocking_recv().unwrap(),
            Err(EnqueueError::Storage(_))
        ));
        assert_eq!(
            refused_answer.blocking_recv().unwrap(),
            Err(EnqueueError::UnknownAppservice("x".into()))
        );
        assert_eq!(dropped_sends(next(&reports)), [8, 9]);

        releaser.reset();
        assert!(matches!(next(&reports), Input::SyncReset));
        let (reply, answer) = oneshot::channel();
        releaser.submit(Round {
            sends: Vec::new(),
            replies: vec![(reply, Ok(2))],
            commits: false,
        });
        assert_eq!(answer.blocking_recv().unwrap(), Ok(2));
        drop(releaser);
        assert!(reports.try_recv().is_err(), "nothing else was reported");
    }
}
