//! Allocator tuning for processes that run the model with mimalloc as their global
//! allocator (the `mplug-search` binary and the model bench).
//!
//! A forward pass allocates and frees buffers of tens of MB per op. By default mimalloc
//! returns freed memory to the OS about a second after it is freed, so later ops fault the
//! pages back in and the kernel zeroes them again (2 MiB at a time with transparent huge
//! pages); on the reference machine that zeroing took a large share of the CPU time. Keeping
//! freed memory reserved avoids it, at the cost of a resident size that stays at its peak.

#![expect(
    unsafe_code,
    reason = "mimalloc options are set through its C interface"
)]

/// mimalloc's `mi_option_purge_delay` (position 15 of `mi_option_e` in mimalloc v3's
/// `mimalloc.h`; the Rust bindings do not name it).
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Tells mimalloc never to return freed memory to the OS. Call it first thing in `main`;
/// it has no effect on another global allocator.
pub fn keep_freed_memory() {
    // SAFETY: sets one integer in mimalloc's option table; mimalloc reads options atomically.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purge_delay_option_has_mimallocs_default_of_1000_ms() {
        // SAFETY: reads one integer from mimalloc's option table.
        let delay = unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) };
        assert_eq!(
            delay, 1000,
            "option {PURGE_DELAY} is not mimalloc's purge delay"
        );
    }
}
