//! An emulated link: a token bucket per direction that holds a client's frames back to a given
//! bandwidth, for showing on one machine what a slow network does (HET's 1 GbE regime). It only
//! delays: it adds serialization time (bytes / rate) and no propagation latency, and it limits
//! one client's traffic to one shard, not a shared physical link. Everything it shapes is
//! labelled "emulated" where it is reported.
//!
//! The bucket itself does no I/O and reads no clock: [`TokenBucket::reserve`] is given the time
//! and says how long to wait, so it is tested deterministically.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// An emulated link's bandwidth, the same each way.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkLimit {
    /// Bytes per second in each direction.
    pub bytes_per_s: f64,
    /// Bytes that may pass at once after the link was idle (the bucket's depth).
    pub burst: u64,
}

impl LinkLimit {
    /// A link of `gbit_per_s` Gbit/s each way, with a burst of 64 KiB (about one TCP window
    /// of a fast link).
    pub fn gbit(gbit_per_s: f64) -> Self {
        Self {
            bytes_per_s: gbit_per_s * 1e9 / 8.0,
            burst: 64 << 10,
        }
    }
}

/// A token bucket: `rate` bytes per second, at most `burst` saved up.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    /// Tokens (bytes) available at `at`; negative while bytes already sent are still "on the
    /// wire".
    state: Mutex<(f64, Option<Instant>)>,
}

impl TokenBucket {
    /// A full bucket for `limit`.
    pub fn new(limit: LinkLimit) -> Self {
        Self {
            rate: limit.bytes_per_s.max(1.0),
            burst: limit.burst as f64,
            state: Mutex::new((limit.burst as f64, None)),
        }
    }

    /// Takes `bytes` at time `now`: how long the sender must wait before they are through.
    /// Reservations queue up, so concurrent senders share the bandwidth.
    pub fn reserve(&self, now: Instant, bytes: usize) -> Duration {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, at) = *state;
        let refilled = match at {
            None => tokens,
            Some(at) if now > at => {
                (tokens + now.duration_since(at).as_secs_f64() * self.rate).min(self.burst)
            }
            Some(_) => tokens,
        };
        let left = refilled - bytes as f64;
        *state = (left, Some(now.max(at.unwrap_or(now))));
        if left >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-left / self.rate)
        }
    }
}

/// The two directions of one emulated link.
#[derive(Debug)]
pub struct EmulatedLink {
    /// Client to shard.
    pub up: TokenBucket,
    /// Shard to client.
    pub down: TokenBucket,
}

impl EmulatedLink {
    /// Both directions at `limit`.
    pub fn new(limit: LinkLimit) -> Self {
        Self {
            up: TokenBucket::new(limit),
            down: TokenBucket::new(limit),
        }
    }

    /// Waits until `bytes` have passed `bucket` (sleeps; called after the bytes moved, so a
    /// frame's transfer time is added to its call).
    pub fn pass(bucket: &TokenBucket, bytes: usize) {
        let wait = bucket.reserve(Instant::now(), bytes);
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_at_once_and_the_rest_at_the_rate() {
        let b = TokenBucket::new(LinkLimit {
            bytes_per_s: 1000.0,
            burst: 100,
        });
        let t0 = Instant::now();
        assert_eq!(b.reserve(t0, 100), Duration::ZERO, "the burst");
        // 500 more bytes at once: they are through after 0.5 s.
        assert_eq!(b.reserve(t0, 500), Duration::from_millis(500));
        // Queued behind them: 100 bytes more are through 0.1 s after those.
        assert_eq!(b.reserve(t0, 100), Duration::from_millis(600));
        // After 0.6 s the debt is paid; after 2 s more the bucket is full again, not fuller.
        let later = t0 + Duration::from_millis(2600);
        assert_eq!(b.reserve(later, 100), Duration::ZERO);
        assert_eq!(b.reserve(later, 1), Duration::from_millis(1));
    }

    #[test]
    fn a_second_sender_waits_its_turn() {
        let b = TokenBucket::new(LinkLimit::gbit(1.0));
        let t0 = Instant::now();
        let frame = 1 << 20;
        let first = b.reserve(t0, frame);
        let second = b.reserve(t0, frame);
        // 1 MiB at 125 MB/s is 8.4 ms; the second is through 8.4 ms after the first.
        let per_frame = (frame as f64) / 125e6;
        assert!((first.as_secs_f64() - (per_frame - 65536.0 / 125e6)).abs() < 1e-6);
        assert!((second.as_secs_f64() - first.as_secs_f64() - per_frame).abs() < 1e-6);
    }
}
