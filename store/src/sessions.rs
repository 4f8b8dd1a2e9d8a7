//! Exactly-once pushes by acknowledgement: what a shard remembers of each sending stream's pushes
//! (docs/ARCHITECTURE.md, "Exactly-once pushes"; the rule itself: `hetkv_transport::pushes`).
//!
//! Every push carries `(client, seq, settled_below)`. The shard applies a numbered push only if it
//! has not applied that number before, and acknowledges a repeat (a request sent again after a
//! lost answer) without applying it. Two copies of one push arriving at once on two connections
//! are serialized: the second waits for the first to finish, then is a repeat (or, if the first
//! was refused, goes ahead itself). Per stream it keeps the applied numbers at or above the
//! stream's `settled_below` (which only the stream advances, as its pushes settle); a number
//! below it is refused as forgotten, never applied. Memory is bounded: a stream spans at most
//! `MAX_SPAN_WORDS` words of numbers, all streams together [`MAX_WORDS`], and [`MAX_CLIENTS`]
//! streams; a push that would pass a bound is refused unapplied (`SessionsFull`) after idle
//! streams are forgotten. [`RESERVED_BYTES`] is counted in the shard's `--max-memory`, and a
//! checkpoint's records of all of it fit a manifest.

use std::collections::{HashMap, HashSet};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hetkv_transport::pushes::MAX_SPAN_WORDS;
use hetkv_transport::wire::{AppliedPushes, Origin};
use serde::{Deserialize, Serialize};

/// Streams remembered at once.
pub const MAX_CLIENTS: usize = 65_536;
/// Words (64 push numbers each) all streams together may hold.
pub const MAX_WORDS: usize = 1 << 18;
/// Bytes a remembered stream costs besides its words (map entry, set, bookkeeping), at most.
const CLIENT_BYTES: usize = 160;
/// Memory the sessions may take, counted in the shard's `--max-memory`: 12 MiB.
pub const RESERVED_BYTES: u64 = (MAX_WORDS * 8 + MAX_CLIENTS * CLIENT_BYTES) as u64;
/// Default idle limit after which a stream is forgotten.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(3600);

#[derive(Debug, Default)]
struct Client {
    pushes: AppliedPushes,
    in_progress: HashSet<u64>,
    last: Option<Instant>,
}

#[derive(Debug, Default)]
struct State {
    clients: HashMap<u64, Client>,
    /// Words held by all clients' bitmaps.
    words: usize,
}

/// What a shard remembers of a stream, as a checkpoint keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientRecord {
    /// The stream's id.
    pub client: u64,
    /// Numbers below this are settled and forgotten.
    pub floor: u64,
    /// The applied numbers from the floor's 64-aligned base: one 16-digit hex word per 64
    /// numbers, bit `i` of word `w` standing for `base + 64 w + i` (`AppliedPushes::words`).
    #[serde(default)]
    pub words: String,
}

impl ClientRecord {
    fn of(client: u64, pushes: &AppliedPushes) -> Self {
        Self {
            client,
            floor: pushes.floor,
            words: pushes.words.iter().map(|w| format!("{w:016x}")).collect(),
        }
    }

    /// The record's pushes, checked (hex words, within a stream's span, nothing below the floor).
    pub fn pushes(&self) -> Result<AppliedPushes, String> {
        let what = |e: String| format!("the push record of client {:016x}: {e}", self.client);
        if !self.words.len().is_multiple_of(16) || self.words.len() / 16 > MAX_SPAN_WORDS {
            return Err(what(format!(
                "{} hex digits (a multiple of 16, at most {} words)",
                self.words.len(),
                MAX_SPAN_WORDS
            )));
        }
        let words = (0..self.words.len() / 16)
            .map(|i| u64::from_str_radix(&self.words[16 * i..16 * i + 16], 16))
            .collect::<Result<Vec<u64>, _>>()
            .map_err(|e| what(format!("not hex: {e}")))?;
        let pushes = AppliedPushes {
            floor: self.floor,
            words,
        };
        pushes.validate().map_err(what)?;
        Ok(pushes)
    }
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

/// The push numbers a shard remembers, per stream.
#[derive(Debug)]
pub struct Sessions {
    state: Mutex<State>,
    done: Condvar,
    idle: Duration,
    repeats: std::sync::atomic::AtomicU64,
}

/// Why a numbered push is not claimed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The number is below what the stream said is settled: the stream never sends such a
    /// push again, so this is a late copy; whether it was applied is unknown here.
    #[error(
        "push {seq} of client {client:016x} is below the {floor} its sender said were settled: a \
         late copy, not applied"
    )]
    Forgotten {
        /// The client.
        client: u64,
        /// The push's number.
        seq: u64,
        /// The stream's floor.
        floor: u64,
    },
    /// Remembering the number would pass a bound: nothing was applied.
    #[error("{0}")]
    Full(String),
    /// The origin contradicts itself (`settled_below` above `seq`).
    #[error("push {seq} of client {client:016x} says every number below {settled_below} is settled, itself included")]
    Malformed {
        /// The client.
        client: u64,
        /// The push's number.
        seq: u64,
        /// What it said.
        settled_below: u64,
    },
}

impl Sessions {
    /// Nothing remembered; streams silent for `idle` are forgotten.
    pub fn new(idle: Duration) -> Self {
        Self {
            state: Mutex::new(State::default()),
            done: Condvar::new(),
            idle,
            repeats: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims push `origin`: fresh (apply it), a repeat (do not), or an error (forgotten, or no
    /// room to remember it). Waits while another copy of the same push is being applied.
    pub fn claim(&self, origin: Origin) -> Result<Claim<'_>, SessionError> {
        let Origin {
            client,
            seq,
            settled_below,
        } = origin;
        if settled_below > seq {
            return Err(SessionError::Malformed {
                client,
                seq,
                settled_below,
            });
        }
        let now = Instant::now();
        let mut state = self.lock();
        if !state.clients.contains_key(&client) {
            self.make_room(&mut state, now, 0);
            if state.clients.len() >= MAX_CLIENTS {
                return Err(SessionError::Full(format!(
                    "this shard remembers the pushes of {MAX_CLIENTS} clients, all active: \
                     client {client:016x}'s push {seq} is not applied; send it again later"
                )));
            }
        }
        loop {
            let State { clients, words } = &mut *state;
            let c = clients.entry(client).or_default();
            c.last = Some(now);
            *words -= c.pushes.advance(settled_below);
            if seq < c.pushes.floor {
                return Err(SessionError::Forgotten {
                    client,
                    seq,
                    floor: c.pushes.floor,
                });
            }
            if c.pushes.contains(seq) {
                self.repeats
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Ok(Claim::Repeat);
            }
            if c.in_progress.contains(&seq) {
                state = self.done.wait(state).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            if !c.pushes.fits(seq) {
                return Err(SessionError::Full(format!(
                    "client {client:016x}'s push {seq} is too far above its oldest unsettled push \
                     ({}): not applied",
                    c.pushes.floor
                )));
            }
            let growth = c.pushes.growth(seq);
            if *words + growth > MAX_WORDS {
                self.make_room(&mut state, now, growth);
                if state.words + growth > MAX_WORDS {
                    return Err(SessionError::Full(format!(
                        "this shard's memory for push numbers ({MAX_WORDS} words) is full: \
                         client {client:016x}'s push {seq} is not applied; send it again later"
                    )));
                }
                continue;
            }
            c.in_progress.insert(seq);
            return Ok(Claim::Fresh(Ticket {
                sessions: self,
                origin,
                applied: false,
            }));
        }
    }

    fn finish(&self, origin: Origin, applied: bool) {
        let mut state = self.lock();
        let State { clients, words } = &mut *state;
        if let Some(c) = clients.get_mut(&origin.client) {
            c.in_progress.remove(&origin.seq);
            if applied && origin.seq >= c.pushes.floor {
                let growth = c.pushes.growth(origin.seq);
                if c.pushes.insert(origin.seq).is_ok() {
                    *words += growth;
                }
            }
        }
        self.done.notify_all();
    }

    /// Forgets idle streams, then (while the streams or words are at their bounds) the least
    /// recently seen ones with nothing in progress.
    fn make_room(&self, state: &mut State, now: Instant, words_wanted: usize) {
        let idle = self.idle;
        let State { clients, words } = state;
        clients.retain(|_, c| {
            let keep =
                !c.in_progress.is_empty() || c.last.is_none_or(|l| now.duration_since(l) < idle);
            if !keep {
                *words -= c.pushes.words.len();
            }
            keep
        });
        while clients.len() >= MAX_CLIENTS || *words + words_wanted > MAX_WORDS {
            let Some(oldest) = clients
                .iter()
                .filter(|(_, c)| c.in_progress.is_empty())
                .filter(|(_, c)| c.last.is_some_and(|l| now.duration_since(l) >= idle / 4))
                .min_by_key(|(_, c)| c.last)
                .map(|(&id, _)| id)
            else {
                break;
            };
            if let Some(c) = clients.remove(&oldest) {
                *words -= c.pushes.words.len();
                tracing::warn!(
                    client = format!("{oldest:016x}"),
                    "forgetting the pushes of a quiet client to make room"
                );
            }
        }
    }

    /// Repeats acknowledged without being applied, so far.
    pub fn repeats(&self) -> u64 {
        self.repeats.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// What a checkpoint keeps: every stream's floor and applied numbers.
    pub fn records(&self) -> Vec<ClientRecord> {
        let state = self.lock();
        let mut out: Vec<ClientRecord> = state
            .clients
            .iter()
            .map(|(&client, c)| ClientRecord::of(client, &c.pushes))
            .collect();
        out.sort_by_key(|r| r.client);
        out
    }

    /// What is remembered of stream `client`'s pushes (`None` for one unknown here).
    pub fn applied_of(&self, client: u64) -> Option<AppliedPushes> {
        self.lock().clients.get(&client).map(|c| c.pushes.clone())
    }

    /// Words held, and streams remembered.
    pub fn usage(&self) -> (usize, usize) {
        let state = self.lock();
        (state.words, state.clients.len())
    }

    /// Replaces what is remembered with a checkpoint's records (at restore, before serving).
    /// Records past the bounds, or not what they claim, are refused.
    pub fn restore(&self, records: &[ClientRecord]) -> Result<(), String> {
        if records.len() > MAX_CLIENTS {
            return Err(format!(
                "{} client push records, above the {MAX_CLIENTS} a shard remembers",
                records.len()
            ));
        }
        let now = Instant::now();
        let mut fresh = State::default();
        for r in records {
            let pushes = r.pushes()?;
            fresh.words += pushes.words.len();
            fresh.clients.insert(
                r.client,
                Client {
                    pushes,
                    in_progress: HashSet::new(),
                    last: Some(now),
                },
            );
        }
        if fresh.words > MAX_WORDS {
            return Err(format!(
                "client push records of {} words, above the {MAX_WORDS} a shard remembers",
                fresh.words
            ));
        }
        *self.lock() = fresh;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(seq: u64) -> Origin {
        at(seq, 0)
    }

    fn at(seq: u64, settled_below: u64) -> Origin {
        Origin {
            client: 7,
            seq,
            settled_below,
        }
    }

    fn apply(s: &Sessions, o: Origin) {
        match s.claim(o).unwrap() {
            Claim::Fresh(t) => t.applied(),
            Claim::Repeat => panic!("{o:?} is a repeat"),
        }
    }

    #[test]
    fn a_push_is_applied_once_and_a_refused_one_may_be_tried_again() {
        let s = Sessions::new(DEFAULT_IDLE);
        apply(&s, origin(1));
        assert!(matches!(s.claim(origin(1)).unwrap(), Claim::Repeat));
        // Refused (the ticket dropped unapplied): a copy is fresh again.
        match s.claim(origin(2)).unwrap() {
            Claim::Fresh(t) => drop(t),
            Claim::Repeat => panic!(),
        }
        assert!(matches!(s.claim(origin(2)).unwrap(), Claim::Fresh(_)));
        // Out of order is fine.
        for seq in [10, 5, 9, 3] {
            apply(&s, origin(seq));
        }
        assert!(matches!(s.claim(origin(5)).unwrap(), Claim::Repeat));
        // Another client's numbers are its own.
        assert!(matches!(
            s.claim(Origin {
                client: 8,
                seq: 1,
                settled_below: 0
            })
            .unwrap(),
            Claim::Fresh(_)
        ));
    }

    #[test]
    fn numbers_are_forgotten_when_their_sender_says_they_are_settled_and_not_before() {
        let s = Sessions::new(DEFAULT_IDLE);
        // One push stays unsettled (number 3) while 100,000 later ones are applied and settle:
        // the shard remembers from 3 on, however many come after.
        for seq in 1..=100_003u64 {
            if seq != 3 {
                apply(&s, at(seq, 3.min(seq)));
            }
        }
        assert!(
            matches!(s.claim(at(3, 3)).unwrap(), Claim::Fresh(_)),
            "3 was never applied"
        );
        assert!(matches!(s.claim(at(50_000, 3)).unwrap(), Claim::Repeat));
        // 3 settles (applied now); everything below 100,004 is settled: all forgotten.
        apply(&s, at(3, 3));
        apply(&s, at(100_004, 100_004));
        assert_eq!(s.usage(), (1, 1), "one word left");
        // A late copy of push 50,000 (it carries what was settled when it was sent).
        let err = s.claim(at(50_000, 3)).unwrap_err();
        assert!(
            matches!(err, SessionError::Forgotten { floor: 100_004, .. }),
            "{err}"
        );
        // What a checkpoint keeps restores to the same answers.
        let kept = s.records();
        let r = Sessions::new(DEFAULT_IDLE);
        r.restore(&kept).unwrap();
        assert!(matches!(
            r.claim(at(100_004, 100_004)).unwrap(),
            Claim::Repeat
        ));
        assert!(matches!(
            r.claim(at(100_003, 3)),
            Err(SessionError::Forgotten { .. })
        ));
        assert!(matches!(
            r.claim(at(100_005, 100_004)).unwrap(),
            Claim::Fresh(_)
        ));
        assert_eq!(
            r.applied_of(7).unwrap().numbers().collect::<Vec<_>>(),
            [100_004]
        );
        assert!(r.applied_of(99).is_none());
    }

    #[test]
    fn a_stream_too_far_from_its_oldest_unsettled_push_is_refused_unapplied() {
        let s = Sessions::new(DEFAULT_IDLE);
        apply(&s, at(1, 1));
        let far = 64 * MAX_SPAN_WORDS as u64;
        assert!(matches!(s.claim(at(far, 1)), Err(SessionError::Full(_))));
        assert!(matches!(s.claim(at(far - 1, 1)), Ok(Claim::Fresh(_))));
        assert!(matches!(
            s.claim(at(5, 6)),
            Err(SessionError::Malformed { .. })
        ));
    }

    #[test]
    fn forged_records_are_refused() {
        let s = Sessions::new(DEFAULT_IDLE);
        let record = |words: &str| ClientRecord {
            client: 1,
            floor: 3,
            words: words.into(),
        };
        assert!(s.restore(&[record("zz")]).is_err());
        assert!(
            s.restore(&[record("0000000000000001")]).is_err(),
            "below the floor"
        );
        assert!(s
            .restore(&[record(&"0".repeat(16 * (MAX_SPAN_WORDS + 1)))])
            .is_err());
        s.restore(&[record("0000000000000008")]).unwrap();
        assert!(matches!(
            s.claim(Origin {
                client: 1,
                seq: 3,
                settled_below: 3
            })
            .unwrap(),
            Claim::Repeat
        ));
    }

    #[test]
    fn a_full_memory_of_push_numbers_fits_a_manifest_and_more_is_refused_unapplied() {
        let s = Sessions::new(DEFAULT_IDLE);
        let span = 64 * MAX_SPAN_WORDS as u64 - 64;
        // 16 streams, each with its oldest push unsettled and one 2^20 numbers later: the whole
        // budget of words.
        for client in 0..(MAX_WORDS / MAX_SPAN_WORDS) as u64 {
            for seq in [1, span] {
                let o = Origin {
                    client,
                    seq,
                    settled_below: 1,
                };
                match s.claim(o).unwrap() {
                    Claim::Fresh(t) => t.applied(),
                    Claim::Repeat => panic!(),
                }
            }
        }
        assert_eq!(s.usage().0, MAX_WORDS);
        // One more stream's first push would pass the budget: refused, nothing applied.
        let more = Origin {
            client: 999,
            seq: 1,
            settled_below: 1,
        };
        assert!(matches!(s.claim(more), Err(SessionError::Full(_))));
        // Its records fit a manifest with room to spare, and restore.
        let records = s.records();
        let bytes = serde_json::to_vec_pretty(&records).unwrap().len();
        assert!(
            bytes < crate::checkpoint::format::MAX_MANIFEST_BYTES as usize / 2,
            "{bytes} bytes of records"
        );
        let r = Sessions::new(DEFAULT_IDLE);
        r.restore(&records).unwrap();
        assert_eq!(r.usage(), s.usage());
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
        apply(&s, origin(1));
        // A new client makes room: the idle one goes.
        let _ = s
            .claim(Origin {
                client: 9,
                seq: 1,
                settled_below: 0,
            })
            .unwrap();
        assert!(s.records().iter().all(|r| r.client != 7));
    }
}
