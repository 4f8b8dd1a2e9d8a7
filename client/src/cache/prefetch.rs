//! The prefetch helper: one thread per cache that sends a planned lookup's requests while the
//! worker computes, and hands the answers back when the lookup lands.

use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use hetkv_transport::wire::Since;
use hetkv_transport::PushRef;

use super::driver::{send_batched, send_round, Answer};
use super::exchange::{RequestKind, ShardRequest};
use crate::cluster::Cluster;

/// A request of the core, owned, so that the helper thread can send it while the core serves the
/// worker.
#[derive(Debug)]
pub(super) struct OwnedRequest {
    shard: usize,
    kind: RequestKind,
    keys: Vec<u64>,
    clocks: Vec<u64>,
    births: Option<Vec<u64>>,
    state_keys: u32,
    bound: u64,
    since: Option<Since>,
    push: Option<OwnedPush>,
}

/// Push rows, owned.
#[derive(Debug)]
struct OwnedPush {
    keys: Vec<u64>,
    counts: Vec<u32>,
    grads: Vec<f32>,
    bases: Option<Vec<u64>>,
}

impl OwnedRequest {
    pub(super) fn new(r: &ShardRequest<'_>) -> Self {
        Self {
            shard: r.shard,
            kind: r.kind,
            keys: r.keys.to_vec(),
            clocks: r.clocks.to_vec(),
            births: r.births.map(<[u64]>::to_vec),
            state_keys: r.state_keys,
            bound: r.bound,
            since: r.since,
            push: r.push.map(|p| OwnedPush {
                keys: p.keys.to_vec(),
                counts: p.counts.to_vec(),
                grads: p.grads.to_vec(),
                bases: p.bases.map(<[u64]>::to_vec),
            }),
        }
    }

    fn view(&self) -> ShardRequest<'_> {
        ShardRequest {
            shard: self.shard,
            kind: self.kind,
            keys: &self.keys,
            clocks: &self.clocks,
            births: self.births.as_deref(),
            state_keys: self.state_keys,
            bound: self.bound,
            since: self.since,
            push: self.push.as_ref().map(|p| PushRef {
                keys: &p.keys,
                counts: &p.counts,
                grads: &p.grads,
                bases: p.bases.as_deref(),
            }),
        }
    }
}

/// The answers of a prefetch of several caches, sent by a thread of its own as one batch a shard
/// ([`super::driver::prefetch_many`]): received by the first cache that lands, and taken by each
/// cache, its own requests' answers in its requests' order.
#[derive(Debug)]
pub(super) struct SharedAnswers {
    state: Mutex<Shared>,
}

#[derive(Debug)]
enum Shared {
    Waiting(mpsc::Receiver<Vec<Answer>>),
    Received(Vec<Option<Answer>>),
    Gone,
}

impl SharedAnswers {
    /// Starts sending `requests` (each with its table's name) on a thread of its own.
    pub(super) fn start(
        cluster: Cluster,
        requests: Vec<(String, OwnedRequest)>,
    ) -> std::io::Result<Arc<Self>> {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("hetkv-prefetch-group".into())
            .spawn(move || {
                let views: Vec<(usize, &str, ShardRequest<'_>)> = requests
                    .iter()
                    .map(|(table, r)| (0, table.as_str(), r.view()))
                    .collect();
                let _ = tx.send(send_batched(&cluster, &views));
            })?;
        Ok(Arc::new(Self {
            state: Mutex::new(Shared::Waiting(rx)),
        }))
    }

    /// Waits for the answers (the first caller does) and takes those at `indices`; None when
    /// the thread is gone.
    pub(super) fn take(&self, indices: &[usize]) -> Option<Vec<Answer>> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Shared::Waiting(rx) = &*state {
            *state = match rx.recv() {
                Ok(all) => Shared::Received(all.into_iter().map(Some).collect()),
                Err(_) => Shared::Gone,
            };
        }
        match &mut *state {
            Shared::Received(all) => indices.iter().map(|&i| all.get_mut(i)?.take()).collect(),
            _ => None,
        }
    }
}

/// The prefetch thread: takes a round of requests, sends them (shards in parallel), hands the
/// answers back. It ends when its cache drops the sending side.
#[derive(Debug)]
pub(super) struct Helper {
    jobs: Option<mpsc::Sender<Vec<OwnedRequest>>>,
    answers: mpsc::Receiver<Vec<Answer>>,
    thread: Option<JoinHandle<()>>,
}

impl Helper {
    pub(super) fn start(cluster: Cluster, table: String) -> std::io::Result<Self> {
        let (jobs, job_rx) = mpsc::channel::<Vec<OwnedRequest>>();
        let (answer_tx, answers) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("hetkv-prefetch-{table}"))
            .spawn(move || {
                for requests in job_rx {
                    let views: Vec<ShardRequest<'_>> =
                        requests.iter().map(OwnedRequest::view).collect();
                    if answer_tx
                        .send(send_round(&cluster, &table, &views))
                        .is_err()
                    {
                        return;
                    }
                }
            })?;
        Ok(Self {
            jobs: Some(jobs),
            answers,
            thread: Some(thread),
        })
    }

    /// Hands a round of requests to the thread; false when it is gone.
    pub(super) fn send(&self, requests: Vec<OwnedRequest>) -> bool {
        matches!(self.jobs.as_ref().map(|j| j.send(requests)), Some(Ok(())))
    }

    /// Waits for the answers of the round sent last; `None` when the thread is gone.
    pub(super) fn answers(&self) -> Option<Vec<Answer>> {
        self.answers.recv().ok()
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
