//! Exactly-once pushes: what a shard remembers of each client's pushes (docs/ARCHITECTURE.md,
//! "Exactly-once pushes").
//!
//! Every push a client numbers carries `(client, seq)`. The shard applies a numbered push only
//! if it has not applied that number before, and acknowledges a repeat (a request sent again
//! after a lost answer) without applying it. Two copies of one push arriving at once on two
//! connections are serialized: the second waits for the first to finish, then is a repeat (or,
//! if the first was refused, goes ahead itself). Per client it keeps the numbers of its last
//! [`WINDOW`] applied pushes; a number below those is refused as forgotten (whether it was applied
//! is unknown). Clients silent for longer than the idle limit are forgotten, and so are the least
//! recently seen ones beyond [`MAX_CLIENTS`].

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hetkv_transport::wire::{AppliedPushes, Origin};
use serde::{Deserialize, Serialize};

/// Applied push numbers remembered per client.
pub const WINDOW: usize = 4096;
/// Clients remembered at once.
pub const MAX_CLIENTS: usize = 65_536;
/// Default idle limit after which a client is forgotten.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(3600);

#[derive(Debug, Default)]
struct Client {
    /// Numbers below this are forgotten.
    floor: u64,
    applied: BTreeSet<u64>,
    in_progress: HashSet<u64>,
    last: Option<Instant>,
}

/// What a shard remembers of a client, as a checkpoint keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientRecord {
    /// The client's id.
    pub client: u64,
    /// Numbers below this are forgotten.
    pub floor: u64,
    /// The numbers of its applied pushes at or above `floor`, ascending.
    pub applied: Vec<u64>,
}

/// Whether a numbered push is to be applied.
#[derive(Debug)]
pub enum Claim<'a> {
    /// Apply it, then [`Ticket::applied`] (dropping the ticket unapplied lets a repeat try).
    Fresh(Ticket<'a>),
    /// It was applied before: acknowledge it without applying it.
    Repeat,
}

/// The right to apply one numbered push.
#[derive(Debug)]
#[must_use = "a ticket marks its push applied, or frees its number when dropped"]
pub struct Ticket<'a> {
    sessions: &'a Sessions,
    origin: Origin,
    applied: bool,
}

impl Ticket<'_> {
    /// The push was applied.
    pub fn applied(mut self) {
        self.applied = true;
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.sessions.finish(self.origin, self.applied);
    }
}

/// The push numbers a shard remembers, per client.
#[derive(Debug)]
pub struct Sessions {
    clients: Mutex<HashMap<u64, Client>>,
    done: Condvar,
    idle: Duration,
    repeats: std::sync::atomic::AtomicU64,
}

/// A push number the shard no longer remembers.
#[derive(Debug, thiserror::Error)]
#[error(
    "push {seq} of client {client:016x} is older than the {WINDOW} pushes this shard remembers \
     of it (the oldest it knows is {floor}): whether it was applied is unknown"
)]
pub struct Forgotten {
    /// The client.
    pub client: u64,
    /// The push's number.
    pub seq: u64,
    /// The oldest number remembered.
    pub floor: u64,
}

impl Sessions {
    /// Nothing remembered; clients silent for `idle` are forgotten.
    pub fn new(idle: Duration) -> Self {
        Self {
            clients: Mutex::new(HashMap::new()),
            done: Condvar::new(),
            idle,
            repeats: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Client>> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims push `origin`: fresh (apply it), a repeat (do not), or forgotten (an error). Waits
    /// while another copy of the same push is being applied.
    pub fn claim(&self, origin: Origin) -> Result<Claim<'_>, Forgotten> {
        let now = Instant::now();
        let mut clients = self.lock();
        if !clients.contains_key(&origin.client) {
            self.make_room(&mut clients, now);
        }
        loop {
            let c = clients.entry(origin.client).or_default();
            c.last = Some(now);
            if origin.seq < c.floor {
                return Err(Forgotten {
                    client: origin.client,
                    seq: origin.seq,
                    floor: c.floor,
                });
            }
            if c.applied.contains(&origin.seq) {
                self.repeats
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Ok(Claim::Repeat);
            }
            if c.in_progress.insert(origin.seq) {
                return Ok(Claim::Fresh(Ticket {
                    sessions: self,
                    origin,
                    applied: false,
                }));
            }
            clients = self.done.wait(clients).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn finish(&self, origin: Origin, applied: bool) {
        let mut clients = self.lock();
        if let Some(c) = clients.get_mut(&origin.client) {
            c.in_progress.remove(&origin.seq);
            if applied {
                c.applied.insert(origin.seq);
                while c.applied.len() > WINDOW {
                    let oldest = c.applied.pop_first().expect("more than WINDOW");
                    c.floor = c.floor.max(oldest + 1);
                }
            }
        }
        self.done.notify_all();
    }

    /// Forgets idle clients, and the least recently seen ones while at the limit.
    fn make_room(&self, clients: &mut HashMap<u64, Client>, now: Instant) {
        clients.retain(|_, c| {
            !c.in_progress.is_empty() || c.last.is_none_or(|l| now.duration_since(l) < self.idle)
        });
        while clients.len() >= MAX_CLIENTS {
            let Some(oldest) = clients
                .iter()
                .filter(|(_, c)| c.in_progress.is_empty())
                .min_by_key(|(_, c)| c.last)
                .map(|(&id, _)| id)
            else {
                break;
            };
            clients.remove(&oldest);
        }
    }

    /// Repeats acknowledged without being applied, so far.
    pub fn repeats(&self) -> u64 {
        self.repeats.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// What a checkpoint keeps: every client's floor and applied numbers.
    pub fn records(&self) -> Vec<ClientRecord> {
        let clients = self.lock();
        let mut out: Vec<ClientRecord> = clients
            .iter()
            .map(|(&client, c)| ClientRecord {
                client,
                floor: c.floor,
                applied: c.applied.iter().copied().collect(),
            })
            .collect();
        out.sort_by_key(|r| r.client);
        out
    }

    /// What is remembered of client `client`'s pushes (`None` for a client unknown here).
    pub fn applied_of(&self, client: u64) -> Option<AppliedPushes> {
        let clients = self.lock();
        clients.get(&client).map(|c| AppliedPushes {
            floor: c.floor,
            applied: c.applied.iter().copied().collect(),
        })
    }

    /// Replaces what is remembered with a checkpoint's records (at restore, before serving).
    pub fn restore(&self, records: &[ClientRecord]) {
        let now = Instant::now();
        let mut clients = self.lock();
        clients.clear();
        for r in records.iter().take(MAX_CLIENTS) {
            let applied: BTreeSet<u64> = r
                .applied
                .iter()
                .copied()
                .filter(|&s| s >= r.floor)
                .collect();
            let skip = applied.len().saturating_sub(WINDOW);
            let applied: BTreeSet<u64> = applied.into_iter().skip(skip).collect();
            clients.insert(
                r.client,
                Client {
                    floor: r.floor,
                    applied,
                    in_progress: HashSet::new(),
                    last: Some(now),
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(seq: u64) -> Origin {
        Origin { client: 7, seq }
    }

    #[test]
    fn a_push_is_applied_once_and_a_refused_one_may_be_tried_again() {
        let s = Sessions::new(DEFAULT_IDLE);
        match s.claim(origin(1)).unwrap() {
            Claim::Fresh(t) => t.applied(),
            Claim::Repeat => panic!("first sight"),
        }
        assert!(matches!(s.claim(origin(1)).unwrap(), Claim::Repeat));
        // Refused (the ticket dropped unapplied): a copy is fresh again.
        match s.claim(origin(2)).unwrap() {
            Claim::Fresh(t) => drop(t),
            Claim::Repeat => panic!(),
        }
        assert!(matches!(s.claim(origin(2)).unwrap(), Claim::Fresh(_)));
        // Out of order is fine within the window.
        for seq in [10, 5, 9, 3] {
            match s.claim(origin(seq)).unwrap() {
                Claim::Fresh(t) => t.applied(),
                Claim::Repeat => panic!("{seq}"),
            }
        }
        assert!(matches!(s.claim(origin(5)).unwrap(), Claim::Repeat));
        // Another client's numbers are its own.
        assert!(matches!(
            s.claim(Origin { client: 8, seq: 1 }).unwrap(),
            Claim::Fresh(_)
        ));
    }

    #[test]
    fn beyond_the_window_a_number_is_forgotten_not_applied_again() {
        let s = Sessions::new(DEFAULT_IDLE);
        for seq in 1..=(WINDOW as u64 + 10) {
            if let Claim::Fresh(t) = s.claim(origin(seq)).unwrap() {
                t.applied();
            }
        }
        let err = s.claim(origin(3)).unwrap_err();
        assert_eq!(err.floor, 11);
        assert!(matches!(s.claim(origin(11)).unwrap(), Claim::Repeat));
        let kept = s.records();
        let known = s.applied_of(7).unwrap();
        assert_eq!((known.floor, known.applied.len()), (11, WINDOW));
        assert!(s.applied_of(99).is_none());
        let r = Sessions::new(DEFAULT_IDLE);
        r.restore(&kept);
        assert!(matches!(r.claim(origin(11)).unwrap(), Claim::Repeat));
        assert!(r.claim(origin(10)).is_err());
        assert!(matches!(
            r.claim(origin(WINDOW as u64 + 11)).unwrap(),
            Claim::Fresh(_)
        ));
    }

    #[test]
    fn two_copies_at_once_apply_once() {
        let s = std::sync::Arc::new(Sessions::new(DEFAULT_IDLE));
        let applied = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        for seq in 1..200u64 {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let (s, applied) = (s.clone(), applied.clone());
                    std::thread::spawn(move || {
                        if let Claim::Fresh(t) = s.claim(origin(seq)).unwrap() {
                            applied.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            std::thread::yield_now();
                            t.applied();
                        }
                    })
                })
                .collect();
            handles.into_iter().for_each(|h| h.join().unwrap());
        }
        assert_eq!(applied.load(std::sync::atomic::Ordering::SeqCst), 199);
    }

    #[test]
    fn idle_clients_are_forgotten() {
        let s = Sessions::new(Duration::ZERO);
        if let Claim::Fresh(t) = s.claim(origin(1)).unwrap() {
            t.applied();
        }
        // A new client makes room: the idle one goes.
        let _ = s.claim(Origin { client: 9, seq: 1 }).unwrap();
        assert!(s.records().iter().all(|r| r.client != 7));
    }
}
