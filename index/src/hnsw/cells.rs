//! The few memory primitives the graph needs beyond safe Rust: arrays whose elements are
//! written once through a shared reference before any reader can reach them, and byte views
//! of plain numeric arrays for bulk file reads.

#![allow(unsafe_code)]

use std::ptr::NonNull;
use std::sync::atomic::AtomicU32;

use super::region::{Region, Zeroed};

/// A fixed-size array whose elements are written through a shared reference.
///
/// Soundness rests on one protocol, kept by the graph: an element is written only while no
/// other thread can read it (before the node it belongs to is published with a release store
/// that readers acquire), and never again while the array is shared.
pub(crate) struct Cells<T> {
    ptr: NonNull<T>,
    len: usize,
    /// Owns the memory `ptr` points into.
    storage: Storage<T>,
}

/// The memory behind a [`Cells`].
enum Storage<T> {
    /// A boxed slice turned into `Cells::ptr` and `Cells::len` (`Box::into_raw`), rebuilt
    /// only to be dropped.
    Heap,
    /// A mapped region, held only to own it; `Cells::ptr` points into it.
    Region(#[expect(dead_code, reason = "reached through `Cells::ptr`")] Region<T>),
}

// SAFETY: concurrent access follows the write-once protocol above, so a shared `Cells` only
// ever hands out shared references to elements that no thread writes any more.
unsafe impl<T: Send + Sync> Sync for Cells<T> {}
// SAFETY: the storage is owned like a `Box<[T]>`.
unsafe impl<T: Send> Send for Cells<T> {}

impl<T> Cells<T> {
    /// Takes ownership of `values` (copied only when it has spare capacity).
    pub fn from_vec(values: Vec<T>) -> Self {
        let len = values.len();
        let raw = Box::into_raw(values.into_boxed_slice());
        let ptr = NonNull::new(raw.cast::<T>()).expect("boxes are never null");
        Self {
            ptr,
            len,
            storage: Storage::Heap,
        }
    }

    /// Takes ownership of `region` without copying.
    pub fn from_region(region: Region<T>) -> Self {
        let len = region.len();
        let ptr = NonNull::new(region.as_ptr()).expect("regions are never null");
        Self {
            ptr,
            len,
            storage: Storage::Region(region),
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Element `index`. Panics when out of bounds.
    #[inline]
    pub fn get(&self, index: usize) -> &T {
        assert!(index < self.len, "cell {index} of {}", self.len);
        // SAFETY: in bounds; by the write-once protocol nobody writes this element while it
        // is readable.
        unsafe { &*self.ptr.as_ptr().add(index) }
    }

    /// Elements `start..start + len`. Panics when out of bounds.
    #[inline]
    pub fn row(&self, start: usize, len: usize) -> &[T] {
        assert!(
            start <= self.len && len <= self.len - start,
            "cells out of bounds"
        );
        // SAFETY: in bounds; by the write-once protocol nobody writes these elements while
        // they are readable.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(start), len) }
    }

    /// Exclusive access to every element.
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: `&mut self` excludes every other access to the owned storage.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Writes element `index`.
    ///
    /// # Safety
    /// No other thread may read or write this element during the call, and no reader may
    /// reach it before a release store that follows this write.
    pub unsafe fn set(&self, index: usize, value: T) {
        assert!(index < self.len, "cell {index} of {}", self.len);
        // SAFETY: in bounds; exclusive access to this element is the caller's obligation.
        unsafe { *self.ptr.as_ptr().add(index) = value };
    }
}

impl<T> Drop for Cells<T> {
    fn drop(&mut self) {
        if let Storage::Heap = self.storage {
            let raw = std::ptr::slice_from_raw_parts_mut(self.ptr.as_ptr(), self.len);
            // SAFETY: `ptr` and `len` came from `Box::into_raw` in `from_vec` and are
            // released only here.
            drop(unsafe { Box::from_raw(raw) });
        }
    }
}

impl<T: Copy> Cells<T> {
    /// Writes elements `start..start + values.len()`.
    ///
    /// # Safety
    /// As for [`Cells::set`], for every element written.
    pub unsafe fn write_row(&self, start: usize, values: &[T]) {
        let len = values.len();
        assert!(
            start <= self.len && len <= self.len - start,
            "cells out of bounds"
        );
        // SAFETY: in bounds; exclusive access to these elements is the caller's obligation,
        // and `values` cannot overlap them (it is borrowed while they are unreadable).
        unsafe {
            std::ptr::copy_nonoverlapping(values.as_ptr(), self.ptr.as_ptr().add(start), len)
        };
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
///
/// # Safety
/// Implementors have no padding and accept every bit pattern, which the byte views rely on.
pub(crate) unsafe trait Plain: Copy + Zeroed {}
// SAFETY: plain numbers without padding; every bit pattern is a value.
unsafe impl Plain for u8 {}
// SAFETY: as above.
unsafe impl Plain for u32 {}
// SAFETY: as above.
unsafe impl Plain for u64 {}
// SAFETY: as above.
unsafe impl Plain for f32 {}

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
        for cells in [
            Cells::from_vec(vec![0f32; 8]),
            Cells::from_region(Region::zeroed(8)),
        ] {
            // SAFETY: the array is not shared with any other thread in this test.
            unsafe { cells.write_row(2, &[1.0, 2.0, 3.0]) };
            // SAFETY: as above.
            unsafe { cells.set(7, 4.0) };
            assert_eq!(cells.row(1, 4), &[0.0, 1.0, 2.0, 3.0]);
            assert_eq!((*cells.get(3), *cells.get(7)), (2.0, 4.0));
            assert_eq!(cells.len(), 8);
        }
    }

    #[test]
    fn byte_views_and_atomics_keep_the_values() {
        let mut values = vec![0u32; 2];
        bytes_mut(&mut values).copy_from_slice(&[1, 0, 0, 0, 0, 1, 0, 0]);
        assert_eq!(values, [u32::from_le_bytes([1, 0, 0, 0]), 256]);
        assert_eq!(bytes(&values).len(), 8);
        let atomics = atomics_from(values);
        assert_eq!(atomics[1].load(Ordering::Relaxed), 256);
    }
}
