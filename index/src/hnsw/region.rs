//! Fixed-size arrays in memory the graph maps itself: zeroed anonymous memory for a graph
//! being built, or a dump file's trailing array mapped copy-on-write, followed by zeroed room
//! for the nodes still to come.
//!
//! Mapping a dump instead of reading it means a reopen allocates no fresh memory for its
//! biggest array (the vectors): the pages the file occupies in the page cache become the
//! array's pages, and a page the owner writes is copied. On virtual machines, where the first
//! touch of fresh memory can cost over a second per gigabyte, this is most of the open time
//! of a large collection.
//!
//! The mapped pages are locked in memory as they are faulted in ([`lock_resident`]): clean
//! page cache is otherwise the first thing reclaim drops, even without memory pressure where
//! the system reclaims cold pages proactively, and a search that touches a dropped page waits
//! for the disk. Locking makes the mapped array as resident as the anonymous memory of a
//! graph that was read, without copying it.
//!
//! A mapped file must not be truncated or rewritten in place while the graph lives: dump
//! files are written once under a new name and only ever removed, and a removed file keeps
//! its blocks until the mapping is dropped.

#![allow(unsafe_code)]

use std::fs::File;
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU32;

/// Alignment of a mapped array inside its file: a huge page, which is a multiple of every
/// common page size.
pub(crate) const FILE_ALIGN: u64 = HUGE as u64;
/// Size of a transparent huge page on common systems.
const HUGE: usize = 2 << 20;
/// `mlock2` flag of Linux (the same on every architecture): lock pages as they are faulted
/// in, and the present ones now, without faulting in the rest.
const MLOCK_ONFAULT: libc::c_uint = 1;

/// Types for which all-zero bytes are a valid value and that need no drop.
///
/// # Safety
/// Implementors must have both properties: regions hand out zeroed memory as values and
/// unmap it without dropping them.
pub(crate) unsafe trait Zeroed: Sized {}
// SAFETY: plain numbers and atomics of them; zero is a value and nothing needs dropping.
unsafe impl Zeroed for u8 {}
// SAFETY: as above.
unsafe impl Zeroed for u32 {}
// SAFETY: as above.
unsafe impl Zeroed for u64 {}
// SAFETY: as above.
unsafe impl Zeroed for f32 {}
// SAFETY: as above.
unsafe impl Zeroed for AtomicU32 {}

/// `len` values of `T` in memory of this region's own mapping.
pub(crate) struct Region<T> {
    ptr: NonNull<T>,
    len: usize,
    /// Start of the whole mapping, at or before `ptr`.
    map_start: NonNull<u8>,
    /// Bytes mapped at `map_start`; 0 for an empty region, which maps nothing.
    mapped: usize,
    /// Whether the region starts with pages of a file.
    from_file: bool,
    _owns: PhantomData<T>,
}

// SAFETY: a region owns its mapping exclusively, like a `Box<[T]>`.
unsafe impl<T: Send> Send for Region<T> {}
// SAFETY: shared access hands out only `&[T]`, like a `Box<[T]>`.
unsafe impl<T: Sync> Sync for Region<T> {}

impl<T: Zeroed> Region<T> {
    /// `len` zeroed values. The pages cost nothing until written; arrays of 8 MiB and more
    /// ask for transparent huge pages.
    ///
    /// Panics when the system refuses the address space, as a failed allocation would.
    pub fn zeroed(len: usize) -> Self {
        let bytes = byte_len::<T>(len);
        if bytes == 0 {
            let empty = NonNull::<T>::dangling().cast::<u8>();
            return Self::from_parts((empty, 0), empty, len, false);
        }
        let Some(ptr) = map_anonymous(bytes) else {
            panic!("cannot reserve {bytes} bytes of address space");
        };
        advise_huge_pages(ptr.as_ptr(), bytes);
        Self::from_parts((ptr, bytes), ptr, len, false)
    }

    /// The last `len` values of `file`, which start at `offset` (a multiple of
    /// [`FILE_ALIGN`]) and end the file, mapped copy-on-write and followed by `spare`
    /// zeroed values. With `lock`, the file's part is locked in memory first
    /// ([`lock_resident`]); either way its pages are read in (from the page cache where they
    /// are cached) before this returns. The zeroed room is anonymous memory, like the arrays
    /// of a graph built in memory.
    ///
    /// Errors: the system cannot map the file there (another page size, a file system
    /// without mapping support) or refuses to lock it (the process lacks `CAP_IPC_LOCK` and
    /// the file's part, with whatever the process has locked already, exceeds
    /// `RLIMIT_MEMLOCK`); callers read the file instead. A refused lock costs no read: it
    /// comes before the pages are read in.
    pub fn map_file(
        file: &File,
        offset: u64,
        (len, spare): (usize, usize),
        lock: bool,
    ) -> std::io::Result<Self> {
        let bytes = byte_len::<T>(len.checked_add(spare).expect("array length overflows"));
        let file_bytes = byte_len::<T>(len);
        if !offset.is_multiple_of(FILE_ALIGN) {
            return Err(std::io::Error::other("array offset is not aligned"));
        }
        let reserved = bytes.checked_add(HUGE).expect("array size overflows");
        let start = map_anonymous(reserved).ok_or_else(std::io::Error::last_os_error)?;
        // The array starts on a 2 MiB boundary, as it does in the file, which lets the kernel
        // map the file's huge page-cache folios with single huge-page entries.
        let address = start.as_ptr() as usize;
        let shift = address.next_multiple_of(HUGE) - address;
        // SAFETY: `shift < HUGE`, so the array's `bytes` bytes lie inside the reservation.
        let ptr = unsafe { NonNull::new_unchecked(start.as_ptr().add(shift)) };
        let region = Self::from_parts((start, reserved), ptr, len + spare, file_bytes > 0);
        if file_bytes > 0 {
            map_file_over(file, offset, (ptr.as_ptr(), file_bytes), lock)?;
        }
        let room = round_to_page(file_bytes);
        if bytes > room {
            // SAFETY: `room` is within the array's `bytes` bytes.
            advise_huge_pages(unsafe { ptr.as_ptr().add(room) }, bytes - room);
        }
        Ok(region)
    }
}

impl<T> Region<T> {
    /// A region of `len` values at `ptr` inside the mapping `(start, bytes)`.
    fn from_parts(
        mapping: (NonNull<u8>, usize),
        ptr: NonNull<u8>,
        len: usize,
        from_file: bool,
    ) -> Self {
        Self {
            ptr: ptr.cast(),
            len,
            map_start: mapping.0,
            mapped: mapping.1,
            from_file,
            _owns: PhantomData,
        }
    }

    /// Whether the region starts with pages mapped from a file.
    pub fn is_file_backed(&self) -> bool {
        self.from_file
    }

    /// The values as a raw pointer, for writes under the owner's protocol.
    pub fn as_ptr(&self) -> *mut T {
        self.ptr.as_ptr()
    }
}

impl Region<u32> {
    /// The same memory as atomics, without copying.
    pub fn into_atomics(self) -> Region<AtomicU32> {
        let this = std::mem::ManuallyDrop::new(self);
        // `AtomicU32` has the size, alignment and bit validity of `u32`.
        Region {
            ptr: this.ptr.cast(),
            len: this.len,
            map_start: this.map_start,
            mapped: this.mapped,
            from_file: this.from_file,
            _owns: PhantomData,
        }
    }
}

impl<T> std::ops::Deref for Region<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        // SAFETY: `ptr` is aligned for `T` (page-aligned mappings, offsets that are multiples
        // of `T`'s size, or `NonNull::dangling` when empty); the mapping holds `len`
        // initialised values (zero bytes are valid for every `Zeroed` type, and file bytes
        // are plain numbers) and lives as long as self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T> std::ops::DerefMut for Region<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as for `deref`; `&mut self` makes the access exclusive, and a write to a
        // file-backed page copies the page (the mapping is private).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T> Drop for Region<T> {
    fn drop(&mut self) {
        if self.mapped == 0 {
            return;
        }
        // SAFETY: the region owns exactly this mapping; its values need no drop.
        let _ = unsafe { libc::munmap(self.map_start.as_ptr().cast(), self.mapped) };
    }
}

fn byte_len<T>(len: usize) -> usize {
    len.checked_mul(std::mem::size_of::<T>())
        .expect("array size overflows the address space")
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096).max(1)
}

fn round_to_page(bytes: usize) -> usize {
    bytes.next_multiple_of(page_size())
}

/// A private anonymous mapping of `bytes` (more than 0) zeroed bytes that reserves no swap.
/// `None` when the system refuses.
fn map_anonymous(bytes: usize) -> Option<NonNull<u8>> {
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    // SAFETY: a fresh anonymous mapping touches no existing memory.
    let ptr = unsafe { libc::mmap(std::ptr::null_mut(), bytes, prot, flags, -1, 0) };
    if ptr == libc::MAP_FAILED {
        return None;
    }
    NonNull::new(ptr.cast())
}

/// Replaces the pages of an anonymous mapping at `at` with `bytes` bytes of `file` from
/// `offset`, private and writable, locked in memory when `lock` is set. The pages are
/// faulted in read-only first (asking for huge pages), so they stay shared with the page
/// cache until written.
fn map_file_over(
    file: &File,
    offset: u64,
    (at, bytes): (*mut u8, usize),
    lock: bool,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;

    let offset = libc::off_t::try_from(offset).map_err(std::io::Error::other)?;
    let flags = libc::MAP_PRIVATE | libc::MAP_FIXED;
    // SAFETY: `at` starts a mapping of at least `bytes` bytes that this module owns and no
    // reference points into yet; MAP_FIXED replaces those pages only.
    let mapped = unsafe {
        libc::mmap(
            at.cast(),
            bytes,
            libc::PROT_READ,
            flags,
            file.as_raw_fd(),
            offset,
        )
    };
    if mapped == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    if lock {
        lock_resident(at, bytes)?;
    }

    advise_huge_pages(at, bytes);
    // SAFETY: the range was just mapped above; populating changes no contents. Kernels
    // before 5.14 refuse the advice, and the pages then fault in as they are read.
    let _ = unsafe { libc::madvise(at.cast(), bytes, libc::MADV_POPULATE_READ) };
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    // SAFETY: the range was just mapped above.
    if unsafe { libc::mprotect(at.cast(), round_to_page(bytes), prot) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Locks the pages of `bytes` bytes at `at` in memory: those present now, and the others as
/// they are first touched. Reclaim then never drops them, whether it runs under memory
/// pressure or proactively on pages it sees as cold. Locking on fault, rather than locking
/// everything at once, also keeps the file's pages shared with the page cache: a full lock
/// of a private mapping that is (or later becomes) writable copies every page.
///
/// Errors: `EPERM` or `ENOMEM` when the process may not lock that much memory.
fn lock_resident(at: *mut u8, bytes: usize) -> std::io::Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    // SAFETY: the range lies inside a mapping this module owns; locking changes no contents,
    // and munmap releases the lock with the mapping.
    if unsafe { libc::mlock2(at.cast(), bytes, MLOCK_ONFAULT) } != 0 {
        let error = std::io::Error::last_os_error();
        return Err(std::io::Error::new(
            error.kind(),
            format!("cannot lock {bytes} bytes of a mapped dump in memory: {error}"),
        ));
    }
    Ok(())
}

/// Asks the kernel to back the 2 MiB-aligned interior of `bytes` bytes at `start` with
/// transparent huge pages (Linux, when THP is enabled or in `madvise` mode): one page fault
/// and one TLB entry per 2 MiB instead of per 4 KiB, which matters for gigabyte-sized vector
/// and link arrays. Contents are unaffected; a no-op below 8 MiB and on other systems.
fn advise_huge_pages<T>(start: *mut T, bytes: usize) {
    #[cfg(target_os = "linux")]
    {
        if bytes < 4 * HUGE {
            return;
        }
        let start = start as usize;
        let first = start.next_multiple_of(HUGE);
        let end = (start + bytes) / HUGE * HUGE;
        if end > first {
            // SAFETY: the range lies inside a mapping owned by the caller; MADV_HUGEPAGE
            // changes only how the kernel backs the pages, not their contents. A failure
            // (THP disabled) leaves ordinary pages, so the result is ignored.
            let _ = unsafe {
                libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE)
            };
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (start, bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::atomic::Ordering;

    #[test]
    fn zeroed_regions_read_zero_and_keep_writes() {
        let mut region = Region::<u32>::zeroed(3 << 20);
        assert!(region.iter().step_by(4099).all(|&v| v == 0));
        region[5] = 7;
        region[(3 << 20) - 1] = 9;
        let atomics = region.into_atomics();
        assert_eq!(atomics[5].load(Ordering::Relaxed), 7);
        assert_eq!(atomics[(3 << 20) - 1].load(Ordering::Relaxed), 9);
        let empty = Region::<f32>::zeroed(0);
        assert!(empty.is_empty() && empty.as_ptr().is_aligned());
    }

    #[test]
    fn a_mapped_file_reads_its_values_then_zeroed_room_and_stays_unchanged_on_disk() {
        let values: Vec<u32> = (0..10_000).map(|i| i * 3 + 1).collect();
        let mut file = tempfile::tempfile().unwrap();
        let offset = FILE_ALIGN as usize;
        file.write_all(&vec![0xAB; offset]).unwrap();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_ne_bytes()).collect();
        file.write_all(&bytes).unwrap();

        let shape = (values.len(), 5000);
        let mut region = Region::<u32>::map_file(&file, offset as u64, shape, false).unwrap();
        assert!(region.is_file_backed());
        assert_eq!(&region[..values.len()], &values[..]);
        assert!(region[values.len()..].iter().all(|&v| v == 0));

        region[0] = 99;
        region[values.len() + 10] = 5;
        assert_eq!((region[0], region[values.len() + 10]), (99, 5));
        let mut on_disk = Vec::new();
        use std::io::{Read, Seek};
        file.rewind().unwrap();
        file.read_to_end(&mut on_disk).unwrap();
        assert_eq!(
            &on_disk[offset..],
            &bytes[..],
            "writes stay private to the mapping"
        );
    }

    /// The `Anonymous` size, in kB, of the mapping that holds `address`: pages copied from
    /// the file (or never backed by it).
    fn anonymous_kb(address: usize) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if let Some((start, end)) = first.split_once('-') {
                let range = usize::from_str_radix(start, 16)
                    .and_then(|s| usize::from_str_radix(end, 16).map(|e| s..e));
                if let Ok(range) = range {
                    inside = range.contains(&address);
                    continue;
                }
            }
            if inside && line.starts_with("Anonymous:") {
                return line.split_whitespace().nth(1).unwrap().parse().unwrap();
            }
        }
        panic!("no mapping holds {address:#x}");
    }

    /// How many of the `pages` pages from `address` the kernel flags as mlocked, from
    /// `/proc/self/pagemap` and `/proc/kpageflags`; `None` when this process may not read
    /// page frame numbers (it lacks `CAP_SYS_ADMIN`).
    fn mlocked_pages(address: usize, pages: usize) -> Option<usize> {
        use std::os::unix::fs::FileExt;
        const PRESENT: u64 = 1 << 63;
        const PFN_MASK: u64 = (1 << 55) - 1;
        const KPF_MLOCKED: u64 = 1 << 33;
        let pagemap = File::open("/proc/self/pagemap").ok()?;
        let flags = File::open("/proc/kpageflags").ok()?;
        let page = page_size();
        let mut locked = 0;
        for i in 0..pages {
            let mut word = [0u8; 8];
            let index = (address / page + i) as u64;
            pagemap.read_exact_at(&mut word, index * 8).ok()?;
            let entry = u64::from_ne_bytes(word);
            let pfn = entry & PFN_MASK;
            if entry & PRESENT == 0 || pfn == 0 {
                return None;
            }
            flags.read_exact_at(&mut word, pfn * 8).ok()?;
            locked += usize::from(u64::from_ne_bytes(word) & KPF_MLOCKED != 0);
        }
        Some(locked)
    }

    #[test]
    fn mapped_arrays_are_locked_without_copying_the_file() {
        let values = 1usize << 20;
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&vec![0u8; FILE_ALIGN as usize]).unwrap();
        file.write_all(&vec![7u8; values * 4]).unwrap();

        let region = match Region::<u32>::map_file(&file, FILE_ALIGN, (values, 1000), true) {
            Ok(region) => region,
            Err(error) => {
                let refused = matches!(
                    error.kind(),
                    std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::OutOfMemory
                );
                assert!(refused, "{error}");
                eprintln!("skipped: this process may not lock 4 MiB ({error})");
                return;
            }
        };
        let address = region.as_ptr() as usize;
        assert_eq!(
            anonymous_kb(address),
            0,
            "locking copies no page of the file"
        );
        assert!(region[..values]
            .iter()
            .step_by(1024)
            .all(|&v| v == 0x0707_0707));
        match mlocked_pages(address, values * 4 / page_size()) {
            Some(locked) => assert_eq!(locked, values * 4 / page_size(), "every page is locked"),
            None => eprintln!("page flags unreadable here; lock state not checked per page"),
        }
    }

    #[test]
    fn unaligned_offsets_are_refused() {
        let file = tempfile::tempfile().unwrap();
        assert!(Region::<u8>::map_file(&file, 100, (0, 10), false).is_err());
    }
}
