//! Checksums of graph dump files: XXH3 with a 128-bit digest, written as 32 hex digits.
//!
//! A dump is a cache that the collection can always rebuild from its store, so its checksum
//! only has to catch torn writes and damaged media, not deliberate forgery; XXH3 does that
//! at memory bandwidth, several times faster than a cryptographic hash, which matters when
//! a reopen verifies a gigabyte of vectors before serving them.

use xxhash_rust::xxh3::Xxh3;

/// A running checksum over bytes fed in order.
#[derive(Clone, Default)]
pub(crate) struct Checksum {
    state: Xxh3,
}

impl Checksum {
    /// A checksum of no bytes yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.state.update(bytes);
    }

    /// The digest of everything fed, as 32 lowercase hex digits.
    pub fn hex(&self) -> String {
        format!("{:032x}", self.state.digest128())
    }
}

/// The checksum of `bytes`, as [`Checksum::hex`] writes it.
pub(crate) fn of(bytes: &[u8]) -> String {
    let mut sum = Checksum::new();
    sum.update(bytes);
    sum.hex()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_equals_one_shot_and_differs_on_change() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut sum = Checksum::new();
        data.chunks(4093).for_each(|chunk| sum.update(chunk));
        assert_eq!(sum.hex(), of(&data));
        assert_eq!(of(&data).len(), 32);

        let mut damaged = data.clone();
        damaged[77_777] ^= 1;
        assert_ne!(of(&damaged), of(&data));
    }
}
