//! Exactly-once pushes by acknowledgement (after RIFL, SOSP 2015): the one home of the rule that
//! says which of a sending stream's numbered pushes a shard must remember.
//!
//! A *stream* is one sender of numbered pushes: one client id, used by one process (a forked
//! child draws another) and shared by that process's threads. Its pushes to one shard are
//! numbered 1, 2, 3, ... Each push also carries the stream's `settled_below`: every number below
//! it is settled (acknowledged, refused, or given up and reported) and will never be sent again.
//! So the shard may forget numbers below it, and must remember every number at or above it that it
//! applied, to acknowledge a repeat without applying it again. [`AppliedPushes`] is that memory:
//! a floor and a bitmap of the applied numbers from the floor's 64-aligned base, never more than
//! [`MAX_SPAN_WORDS`] words (a stream cannot leave a push unsettled while it sends more than that
//! many after it: the client waits for its oldest to settle first).

use serde::{Deserialize, Serialize};

/// Words (of 64 numbers) one stream's applied pushes may span above its floor: 2^20 numbers, 128
/// KiB. A client keeps its oldest unsettled push within this many numbers of its newest.
pub const MAX_SPAN_WORDS: usize = 1 << 14;
/// The most numbers a stream may have outstanding above its oldest unsettled one.
pub const MAX_SPAN: u64 = (MAX_SPAN_WORDS as u64) * 64 - 64;

/// The numbered pushes of one stream that a shard remembers applying (the answer to a hello
/// naming the stream's id; after a restore, what the checkpoint held).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedPushes {
    /// Every number below this is settled by the stream and forgotten by the shard: a push below
    /// it is refused (`SequenceForgotten`), never applied. After a restore, every push below it
    /// that the stream saw acknowledged is in the checkpoint (it was acknowledged before the
    /// checkpoint's copy began).
    pub floor: u64,
    /// Bit `i` of word `w` says number `base + 64 w + i` was applied, `base` being the floor
    /// rounded down to a multiple of 64. Bits below the floor are clear.
    pub words: Vec<u64>,
}

/// A number too far above the stream's floor to be remembered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "push {seq} is {} numbers above the oldest unsettled push {floor} of its stream (at most {MAX_SPAN})",
    seq - floor
)]
pub struct SpanExceeded {
    /// The push's number.
    pub seq: u64,
    /// The floor.
    pub floor: u64,
}

impl AppliedPushes {
    /// Nothing applied, nothing settled.
    pub fn new() -> Self {
        Self::default()
    }

    /// The first number the bitmap describes.
    pub fn base(&self) -> u64 {
        self.floor & !63
    }

    /// Whether `seq` was applied (false below the floor: forgotten, see [`Self::floor`]).
    pub fn contains(&self, seq: u64) -> bool {
        if seq < self.floor {
            return false;
        }
        let at = seq - self.base();
        self.words
            .get((at / 64) as usize)
            .is_some_and(|w| w >> (at % 64) & 1 == 1)
    }

    /// Records `seq` (at or above the floor) as applied.
    pub fn insert(&mut self, seq: u64) -> Result<(), SpanExceeded> {
        debug_assert!(seq >= self.floor);
        let at = seq - self.base();
        let word = (at / 64) as usize;
        if word >= MAX_SPAN_WORDS {
            return Err(SpanExceeded {
                seq,
                floor: self.floor,
            });
        }
        if self.words.len() <= word {
            self.words.resize(word + 1, 0);
        }
        self.words[word] |= 1 << (at % 64);
        Ok(())
    }

    /// Whether inserting `seq` would fit.
    pub fn fits(&self, seq: u64) -> bool {
        seq >= self.floor && ((seq - self.base()) / 64) < MAX_SPAN_WORDS as u64
    }

    /// Words inserting `seq` would add.
    pub fn growth(&self, seq: u64) -> usize {
        (((seq.saturating_sub(self.base())) / 64) as usize + 1).saturating_sub(self.words.len())
    }

    /// The stream settled every number below `settled_below`: forgets them. Returns the words
    /// freed (those below the new base, and empty ones at the end). A lower value than the floor
    /// changes nothing.
    pub fn advance(&mut self, settled_below: u64) -> usize {
        if settled_below <= self.floor {
            return 0;
        }
        let (old_base, old_len) = (self.base(), self.words.len());
        self.floor = settled_below;
        let drop = ((self.base() - old_base) / 64) as usize;
        self.words.drain(..drop.min(old_len));
        // Clear the bits below the floor in the first word.
        if let Some(first) = self.words.first_mut() {
            let below = self.floor % 64;
            *first &= !((1u64 << below) - 1);
        }
        while self.words.last() == Some(&0) {
            self.words.pop();
        }
        old_len - self.words.len()
    }

    /// The applied numbers at or above the floor, ascending.
    pub fn numbers(&self) -> impl Iterator<Item = u64> + '_ {
        let base = self.base();
        self.words.iter().enumerate().flat_map(move |(w, &bits)| {
            (0..64)
                .filter(move |i| bits >> i & 1 == 1)
                .map(move |i| base + 64 * w as u64 + i)
        })
    }

    /// Checks what a peer or a file sent: the span within [`MAX_SPAN_WORDS`], no bit below the
    /// floor.
    pub fn validate(&self) -> Result<(), String> {
        if self.words.len() > MAX_SPAN_WORDS {
            return Err(format!(
                "{} words of push numbers, above the {MAX_SPAN_WORDS} a stream may span",
                self.words.len()
            ));
        }
        if let Some(&first) = self.words.first() {
            if first & ((1u64 << (self.floor % 64)) - 1) != 0 {
                return Err(format!("numbers below the floor {} are marked", self.floor));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_remembered_from_the_floor_and_forgotten_below_it() {
        let mut a = AppliedPushes::new();
        for seq in [1, 2, 5, 63, 64, 130] {
            a.insert(seq).unwrap();
        }
        assert!(a.contains(5) && a.contains(130) && !a.contains(3));
        assert_eq!(a.numbers().collect::<Vec<_>>(), [1, 2, 5, 63, 64, 130]);
        assert_eq!(a.advance(64), 1, "the first word goes");
        assert!(!a.contains(5) && !a.contains(63) && a.contains(64) && a.contains(130));
        assert_eq!(a.advance(100), 0, "within the word: nothing freed");
        assert!(!a.contains(64), "below the floor: forgotten");
        assert_eq!(a.numbers().collect::<Vec<_>>(), [130]);
        assert_eq!(a.advance(50), 0, "a lower settled_below changes nothing");
        a.validate().unwrap();
        // The span is bounded from the floor.
        let far = a.base() + MAX_SPAN_WORDS as u64 * 64;
        assert!(!a.fits(far) && a.insert(far).is_err());
        assert!(a.fits(far - 1));
        a.advance(far);
        a.insert(far).unwrap();
        assert_eq!(a.numbers().collect::<Vec<_>>(), [far]);
        // A record marking a number below its floor is not what it claims.
        let mut bad = a.clone();
        bad.floor += 1;
        assert!(bad.validate().is_err());
    }
}
