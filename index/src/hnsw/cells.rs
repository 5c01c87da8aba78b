//! The few memory primitives the graph needs beyond safe Rust: arrays whose elements are
//! written once through a shared reference before any reader can reach them, and byte views
//! of plain numeric arrays for bulk file reads.

#![allow(unsafe_code)]

use std::cell::UnsafeCell;
use std::sync::atomic::AtomicU32;

/// A fixed-size array whose elements are written through a shared reference.
///
/// Soundness rests on one protocol, kept by the graph: an element is written only while no
/// other thread can read it (before the node it belongs to is published with a release store
/// that readers acquire), and never again while the array is shared.
pub(crate) struct Cells<T> {
    cells: Box<[UnsafeCell<T>]>,
}

// SAFETY: concurrent access follows the write-once protocol above, so a shared `Cells` only
// ever hands out shared references to elements that no thread writes any more.
unsafe impl<T: Send + Sync> Sync for Cells<T> {}

impl<T> Cells<T> {
    /// Takes ownership of `values` without copying.
    pub fn from_vec(values: Vec<T>) -> Self {
        let mut values = std::mem::ManuallyDrop::new(values);
        let (ptr, len, cap) = (values.as_mut_ptr(), values.len(), values.capacity());
        // SAFETY: `UnsafeCell<T>` is `repr(transparent)` over `T`, so the allocation has the
        // same layout; ownership moves from the forgotten vector.
        let cells = unsafe { Vec::from_raw_parts(ptr.cast::<UnsafeCell<T>>(), len, cap) };
        Self {
            cells: cells.into_boxed_slice(),
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.cells.len()
    }

    /// Element `index`. Panics when out of bounds.
    #[inline]
    pub fn get(&self, index: usize) -> &T {
        // SAFETY: by the write-once protocol nobody writes this element while it is readable.
        unsafe { &*self.cells[index].get() }
    }

    /// Elements `start..start + len`. Panics when out of bounds.
    #[inline]
    pub fn row(&self, start: usize, len: usize) -> &[T] {
        let cells = &self.cells[start..start + len];
        // SAFETY: `UnsafeCell<T>` has the layout of `T`; by the write-once protocol nobody
        // writes these elements while they are readable.
        unsafe { std::slice::from_raw_parts(cells.as_ptr().cast::<T>(), len) }
    }

    /// Exclusive access to every element.
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        let len = self.cells.len();
        // SAFETY: `&mut self` excludes every other access; the layouts are identical.
        unsafe { std::slice::from_raw_parts_mut(self.cells.as_mut_ptr().cast::<T>(), len) }
    }

    /// Writes element `index`.
    ///
    /// # Safety
    /// No other thread may read or write this element during the call, and no reader may
    /// reach it before a release store that follows this write.
    pub unsafe fn set(&self, index: usize, value: T) {
        // SAFETY: exclusive access to this element is the caller's obligation.
        unsafe { *self.cells[index].get() = value };
    }
}

impl<T: Copy> Cells<T> {
    /// Writes elements `start..start + values.len()`.
    ///
    /// # Safety
    /// As for [`Cells::set`], for every element written.
    pub unsafe fn write_row(&self, start: usize, values: &[T]) {
        let cells = &self.cells[start..start + values.len()];
        for (cell, value) in cells.iter().zip(values) {
            // SAFETY: exclusive access to these elements is the caller's obligation.
            unsafe { *cell.get() = *value };
        }
    }
}

/// `len` zeroed atomics; the pages stay untouched (and not resident) until written.
pub(crate) fn zeroed_atomics(len: usize) -> Box<[AtomicU32]> {
    let mut zeros = vec![0u32; len];
    advise_huge_pages(&mut zeros);
    atomics_from(zeros)
}

/// A zeroed array of `len` values, backed by huge pages where the system allows it.
pub(crate) fn zeroed<T: Plain + Default>(len: usize) -> Vec<T> {
    let mut values = vec![T::default(); len];
    advise_huge_pages(&mut values);
    values
}

/// Asks the kernel to back the 2 MiB-aligned interior of a large array with transparent
/// huge pages (Linux, when THP is enabled or in `madvise` mode): one page fault and one TLB
/// entry per 2 MiB instead of per 4 KiB, which matters for gigabyte-sized vector and link
/// arrays. Contents are unaffected; a no-op for small arrays and on other systems.
fn advise_huge_pages<T>(values: &mut [T]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let bytes = std::mem::size_of_val(values);
        if bytes < 4 * HUGE {
            return;
        }
        let start = values.as_mut_ptr() as usize;
        let first = start.next_multiple_of(HUGE);
        let end = (start + bytes) / HUGE * HUGE;
        if end > first {
            // SAFETY: the range lies inside `values`, which this function borrows mutably;
            // MADV_HUGEPAGE changes only how the kernel backs the pages, not their contents.
            // A failure (THP disabled) leaves ordinary pages, so the result is ignored.
            let _ = unsafe {
                libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE)
            };
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = values;
    }
}

/// Converts plain values into atomics without copying.
pub(crate) fn atomics_from(values: Vec<u32>) -> Box<[AtomicU32]> {
    let mut values = std::mem::ManuallyDrop::new(values);
    let (ptr, len, cap) = (values.as_mut_ptr(), values.len(), values.capacity());
    // SAFETY: `AtomicU32` has the same size, alignment and bit validity as `u32`; ownership
    // moves from the forgotten vector.
    let atomics = unsafe { Vec::from_raw_parts(ptr.cast::<AtomicU32>(), len, cap) };
    atomics.into_boxed_slice()
}

/// Numeric types every bit pattern of which is a valid value.
pub(crate) trait Plain: Copy + sealed::Sealed {}
impl Plain for u8 {}
impl Plain for u32 {}
impl Plain for u64 {}
impl Plain for f32 {}

mod sealed {
    pub trait Sealed {}
    impl Sealed for u8 {}
    impl Sealed for u32 {}
    impl Sealed for u64 {}
    impl Sealed for f32 {}
}

/// The bytes of `values`, for reading a file straight into a typed array.
pub(crate) fn bytes_mut<T: Plain>(values: &mut [T]) -> &mut [u8] {
    let len = std::mem::size_of_val(values);
    // SAFETY: `Plain` types have no padding and accept every bit pattern, and `u8` has
    // alignment one, so the byte view is valid for reads and writes of the same memory.
    unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<u8>(), len) }
}

/// The bytes of `values`, for writing a typed array in bulk.
pub(crate) fn bytes<T: Plain>(values: &[T]) -> &[u8] {
    let len = std::mem::size_of_val(values);
    // SAFETY: as for `bytes_mut`; the view is read-only.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), len) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn cells_hand_back_what_was_written() {
        let cells = Cells::from_vec(vec![0f32; 8]);
        // SAFETY: the array is not shared with any other thread in this test.
        unsafe { cells.write_row(2, &[1.0, 2.0, 3.0]) };
        assert_eq!(cells.row(1, 4), &[0.0, 1.0, 2.0, 3.0]);
        assert_eq!(*cells.get(3), 2.0);
        assert_eq!(cells.len(), 8);
    }

    #[test]
    fn byte_views_and_atomics_keep_the_values() {
        let mut values = vec![0u32; 2];
        bytes_mut(&mut values).copy_from_slice(&[1, 0, 0, 0, 0, 1, 0, 0]);
        assert_eq!(values, [u32::from_le_bytes([1, 0, 0, 0]), 256]);
        assert_eq!(bytes(&values).len(), 8);
        let atomics = atomics_from(values);
        assert_eq!(atomics[1].load(Ordering::Relaxed), 256);
        assert!(zeroed_atomics(3)
            .iter()
            .all(|a| a.load(Ordering::Relaxed) == 0));
    }
}
