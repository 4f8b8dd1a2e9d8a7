//! The one 64-bit mixing function of hetkv: SplitMix64's output function (Steele, Lea and Flood),
//! a bijection of u64 whose every output bit depends on every input bit. Initial values, a dynamic
//! table's buckets and digests, and the frequency sketches' counters all derive from it.

/// SplitMix64 of `x`: the golden-ratio increment, then two multiply-xorshift rounds.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_outputs() {
        // The first outputs of the reference SplitMix64 generator seeded with 0: its state
        // advances by the increment before mixing, so output n is splitmix64(n * increment).
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
        assert_eq!(splitmix64(0x9E37_79B9_7F4A_7C15), 0x6E78_9E6A_A1B9_65F4);
    }
}
