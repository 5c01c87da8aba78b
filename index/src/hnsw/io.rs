//! Dump files of a graph, written and read as a few large arrays.
//!
//! Two files, each a fixed header then raw arrays in the machine's byte order (the header
//! carries a byte-order mark, so a file from a machine of the other order is refused):
//! - the graph file: header, node levels (`u8`), the upper-level lists of every node above
//!   level 0 in node order (`u32`), zero padding up to a multiple of [`FILE_ALIGN`], then
//!   the base-level lists (`u32`, `1 + 2M` per node);
//! - the vector file: header, slot numbers (`u64`), zero padding, then the vectors (`f32`,
//!   `dimension` per node).
//!
//! The vectors, which end the vector file, are mapped and locked in memory rather than read
//! (see [`Region::map_file`]): a graph never rewrites the vector of a node it holds. The
//! base-level lists that end the graph file are read like the small arrays: inserts after a
//! reload write into old nodes' lists, and a write into a mapped huge page unmaps the rest of
//! that page from the process, which leaves those pages unlocked until touched again. Either
//! way everything is checksummed on the way (see [`crate::checksum`]), so a file is read
//! once.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;

use crate::checksum::Checksum;

use super::cells::{atomics_from, bytes, bytes_mut, Cells, Plain};
use super::distance::Dot;
use super::region::{Region, FILE_ALIGN};
use super::{unpack_entry, Hnsw, Ranking, Shape, MAX_LEVEL};

const GRAPH_MAGIC: [u8; 8] = *b"MPGRAPH1";
const VECTOR_MAGIC: [u8; 8] = *b"MPVECTS1";
const BYTE_ORDER_MARK: u32 = 0x0102_0304;
/// Format version of both files.
pub(crate) const FORMAT: u32 = 2;
/// Header words after the magic: byte-order mark, format, dimension, max connections,
/// ef_construction, node count (two words), entry point (two words), upper words (two).
const HEADER_WORDS: usize = 11;
const HEADER_BYTES: usize = 8 + HEADER_WORDS * 4;
/// Bytes written per call for the small arrays.
const WRITE_CHUNK: usize = 1 << 20;
/// Bytes written per call for the array that ends a file: whole huge pages at offsets
/// aligned to them, so that the page cache keeps the array in huge folios, which a mapping
/// then maps with huge-page entries (see [`Region::map_file`]).
const LAST_CHUNK: usize = 4 << 20;
/// Bytes read per call: small enough that the hash reads them back from the cache.
const READ_CHUNK: usize = 4 << 20;

/// Header fields shared by both files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    shape: Shape,
    nodes: u64,
    entry: u64,
    upper_words: u64,
}

impl Header {
    fn encode(&self, magic: [u8; 8]) -> Vec<u8> {
        let s = &self.shape;
        let mut out = magic.to_vec();
        let small = [
            BYTE_ORDER_MARK,
            FORMAT,
            s.dimension as u32,
            s.max_connections as u32,
            s.ef_construction as u32,
        ];
        small
            .iter()
            .for_each(|w| out.extend_from_slice(&w.to_ne_bytes()));
        for wide in [self.nodes, self.entry, self.upper_words] {
            out.extend_from_slice(&wide.to_ne_bytes());
        }
        out
    }

    fn decode(bytes: &[u8; HEADER_BYTES], magic: [u8; 8]) -> Result<Self, String> {
        if bytes[..8] != magic {
            return Err("file does not start with the expected magic".into());
        }
        let word = |i: usize| {
            let at = 8 + i * 4;
            u32::from_ne_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let wide = |i: usize| {
            let at = 8 + i * 4;
            let mut raw = [0u8; 8];
            raw.copy_from_slice(&bytes[at..at + 8]);
            u64::from_ne_bytes(raw)
        };
        if word(0) != BYTE_ORDER_MARK || word(1) != FORMAT {
            return Err(format!("byte order {:#x} / format {}", word(0), word(1)));
        }
        let shape = Shape {
            dimension: word(2) as usize,
            max_connections: word(3) as usize,
            ef_construction: word(4) as usize,
        };
        Ok(Self {
            shape,
            nodes: wide(5),
            entry: wide(7),
            upper_words: wide(9),
        })
    }
}

/// The graph file's content, read and hashed.
pub(crate) struct GraphFile {
    header: Header,
    levels: Region<u8>,
    base: Region<u32>,
    upper: Region<u32>,
    /// Checksum of the whole file, as [`Checksum::hex`] writes it.
    pub checksum: String,
}

/// The vector file's content, read and hashed.
pub(crate) struct VectorFile {
    header: Header,
    slots: Region<u64>,
    vectors: Region<f32>,
    /// Checksum of the whole file, as [`Checksum::hex`] writes it.
    pub checksum: String,
}

/// A reader that hashes everything read through it.
struct Hashing<R> {
    inner: R,
    sum: Checksum,
    read: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sum.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

impl<R: Read> Hashing<R> {
    fn array<T: Plain>(&mut self, len: usize, spare: usize) -> Result<Region<T>, String> {
        let mut values = Region::<T>::zeroed(len + spare);
        for chunk in bytes_mut(&mut values[..len]).chunks_mut(READ_CHUNK) {
            self.read_exact(chunk)
                .map_err(|e| format!("short file: {e}"))?;
        }
        Ok(values)
    }

    fn header(&mut self, magic: [u8; 8]) -> Result<Header, String> {
        let mut raw = [0u8; HEADER_BYTES];
        self.read_exact(&mut raw)
            .map_err(|e| format!("short header: {e}"))?;
        Header::decode(&raw, magic)
    }

    /// Reads the zero padding up to the next multiple of [`FILE_ALIGN`].
    fn padding(&mut self) -> Result<(), String> {
        let mut pad = vec![0u8; padding(self.read) as usize];
        self.read_exact(&mut pad)
            .map_err(|e| format!("short padding: {e}"))?;
        if pad.iter().any(|&b| b != 0) {
            return Err("padding is not zero".into());
        }
        Ok(())
    }

    /// Checks that the file ends here and returns the hash of everything read.
    fn finish(mut self, expected_len: u64) -> Result<String, String> {
        let mut probe = [0u8; 1];
        let extra = self.inner.read(&mut probe).map_err(|e| e.to_string())?;
        if extra != 0 || self.read != expected_len {
            return Err(format!("file is longer than its {expected_len} bytes"));
        }
        Ok(self.sum.hex())
    }
}

impl Hashing<File> {
    /// The array of `len` values that ends a file of `file_len` bytes, followed by `spare`
    /// zeroed values, and the hash of the whole file. Maps and locks the array where the
    /// system allows and `placement` asks for it; reads it otherwise.
    fn last_array<T: Plain>(
        mut self,
        (len, spare): (usize, usize),
        file_len: u64,
        placement: Placement,
    ) -> Result<(Region<T>, String), String> {
        let mapped = match placement {
            Placement::MappedLocked => {
                Region::<T>::map_file(&self.inner, self.read, (len, spare), true)
                    .inspect_err(|error| {
                        tracing::info!(%error, "reading a dump array instead of mapping it");
                    })
                    .ok()
            }
            Placement::Read => None,
        };
        let Some(values) = mapped else {
            let values = self.array(len, spare)?;
            return Ok((values, self.finish(file_len)?));
        };

        let raw = bytes(&values[..len]);
        raw.chunks(READ_CHUNK)
            .for_each(|chunk| self.sum.update(chunk));
        self.read += raw.len() as u64;
        let actual = self.inner.metadata().map_err(|e| e.to_string())?.len();
        if self.read != file_len || actual != file_len {
            return Err(format!("file is not {file_len} bytes long"));
        }
        Ok((values, self.sum.hex()))
    }
}

/// Where [`VectorFile::read_as`] puts the vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placement {
    /// Mapped from the file and locked in memory, or read where either is refused.
    MappedLocked,
    /// Read into anonymous memory.
    #[cfg_attr(
        not(test),
        expect(
            dead_code,
            reason = "the product reads only as the fallback of a refused map"
        )
    )]
    Read,
}

/// Zero bytes that follow `offset` bytes to reach a multiple of [`FILE_ALIGN`].
fn padding(offset: u64) -> u64 {
    offset.next_multiple_of(FILE_ALIGN) - offset
}

fn open_hashing(path: &Path) -> Result<(Hashing<File>, u64), String> {
    let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    let reader = Hashing {
        inner: file,
        sum: Checksum::new(),
        read: 0,
    };
    Ok((reader, len))
}

/// Sizes of a file's parts for a given node count, in bytes.
struct Layout {
    nodes: u64,
    /// Bytes of the small arrays per node, and in all beyond that.
    small: (u64, u64),
    /// Bytes of the final array per node.
    last: u64,
}

impl Layout {
    /// Refuses a node count whose arrays could not fit in a file of `len` bytes, so that a
    /// damaged header never causes a huge allocation or a mapping past the file's end.
    fn check(&self, len: u64) -> Result<usize, String> {
        let small = self
            .nodes
            .checked_mul(self.small.0)
            .and_then(|b| b.checked_add(self.small.1))
            .and_then(|b| b.checked_add(HEADER_BYTES as u64));
        let need = small
            .and_then(|b| b.checked_add(padding(b)))
            .and_then(|b| b.checked_add(self.nodes.checked_mul(self.last)?));
        if need != Some(len) {
            return Err(format!(
                "file of {len} bytes cannot hold {} nodes",
                self.nodes
            ));
        }
        usize::try_from(self.nodes).map_err(|e| e.to_string())
    }
}

impl GraphFile {
    /// Reads and hashes a graph file, leaving `spare` nodes of room in the arrays.
    pub fn read(path: &Path, spare: usize) -> Result<Self, String> {
        let (mut reader, len) = open_hashing(path)?;
        let header = reader.header(GRAPH_MAGIC)?;
        let stride = header.shape.base_stride() as u64;
        let upper_bytes = header
            .upper_words
            .checked_mul(4)
            .ok_or("upper word count overflows")?;
        let layout = Layout {
            nodes: header.nodes,
            small: (1, upper_bytes),
            last: 4 * stride,
        };
        let nodes = layout.check(len)?;
        let levels = reader.array::<u8>(nodes, spare)?;
        let upper = reader.array::<u32>(header.upper_words as usize, 0)?;
        reader.padding()?;
        let stride = stride as usize;
        let base = reader.array(nodes * stride, spare * stride)?;
        let checksum = reader.finish(len)?;
        Ok(Self {
            header,
            levels,
            base,
            upper,
            checksum,
        })
    }
}

impl VectorFile {
    /// Reads and hashes a vector file, leaving `spare` nodes of room in the arrays, with the
    /// vectors mapped and locked where the system allows ([`Placement::MappedLocked`]).
    pub fn read(path: &Path, spare: usize) -> Result<Self, String> {
        Self::read_as(path, spare, Placement::MappedLocked)
    }

    /// [`VectorFile::read`] with the vectors placed as `placement` says.
    pub(crate) fn read_as(path: &Path, spare: usize, placement: Placement) -> Result<Self, String> {
        let (mut reader, len) = open_hashing(path)?;
        let header = reader.header(VECTOR_MAGIC)?;
        let dim = header.shape.dimension;
        let layout = Layout {
            nodes: header.nodes,
            small: (8, 0),
            last: 4 * dim as u64,
        };
        let nodes = layout.check(len)?;
        let slots = reader.array::<u64>(nodes, spare)?;
        reader.padding()?;
        let (vectors, checksum) = reader.last_array((nodes * dim, spare * dim), len, placement)?;
        Ok(Self {
            header,
            slots,
            vectors,
            checksum,
        })
    }

    /// Whether the vectors are mapped from the file rather than read into memory.
    pub fn is_mapped(&self) -> bool {
        self.vectors.is_file_backed()
    }
}

/// Creates a file that must not exist yet: a dump file that a reloaded graph maps must never
/// be rewritten in place.
fn create_new(path: &Path) -> std::io::Result<File> {
    File::options().write(true).create_new(true).open(path)
}

/// Flushes the small arrays and moves to the next multiple of [`FILE_ALIGN`], leaving a hole
/// (which reads as zeros) for the padding.
fn start_last_array(out: BufWriter<File>) -> std::io::Result<File> {
    let mut file = out.into_inner().map_err(|e| e.into_error())?;
    let at = file.stream_position()?;
    file.seek(SeekFrom::Start(at + padding(at)))?;
    Ok(file)
}

/// Sets the length of a file whose last array may be empty (so that the padding hole is
/// part of it) and flushes it.
fn end_file(mut file: File) -> std::io::Result<()> {
    let at = file.stream_position()?;
    file.set_len(at)?;
    file.flush()
}

/// Writes `values` in chunks of about [`WRITE_CHUNK`] bytes.
fn write_array<T: Plain>(out: &mut impl Write, values: &[T]) -> std::io::Result<()> {
    let per_chunk = (WRITE_CHUNK / std::mem::size_of::<T>()).max(1);
    values
        .chunks(per_chunk)
        .try_for_each(|chunk| out.write_all(bytes(chunk)))
}

impl Hnsw {
    fn header(&self, len: usize, upper_words: usize) -> Header {
        Header {
            shape: self.shape,
            nodes: len as u64,
            entry: self.entry.load(Ordering::Acquire),
            upper_words: upper_words as u64,
        }
    }

    /// Writes the graph file and the vector file (not synced), which must not exist yet.
    /// Waits for a running insert batch; searches go on.
    pub fn write_files(&self, graph: &Path, vectors: &Path) -> std::io::Result<()> {
        let _writer = self.writer.lock();
        let len = self.len();
        let upper: Vec<u32> = (0..len)
            .filter_map(|node| self.upper.get(node).as_deref())
            .flat_map(|lists| lists.iter().map(|w| w.load(Ordering::Acquire)))
            .collect();
        let header = self.header(len, upper.len());

        let mut out = BufWriter::with_capacity(WRITE_CHUNK, create_new(graph)?);
        out.write_all(&header.encode(GRAPH_MAGIC))?;
        write_array(&mut out, self.levels.row(0, len))?;
        write_array(&mut out, &upper)?;
        let mut file = start_last_array(out)?;
        let words = len * self.shape.base_stride();
        let mut buffer = Vec::with_capacity(LAST_CHUNK / 4);
        for chunk in self.base[..words].chunks(LAST_CHUNK / 4) {
            buffer.clear();
            buffer.extend(chunk.iter().map(|w| w.load(Ordering::Acquire)));
            file.write_all(bytes(&buffer))?;
        }
        end_file(file)?;

        let mut out = BufWriter::with_capacity(WRITE_CHUNK, create_new(vectors)?);
        out.write_all(&header.encode(VECTOR_MAGIC))?;
        write_array(&mut out, self.slots.row(0, len))?;
        let mut file = start_last_array(out)?;
        let values = self.vectors.row(0, len * self.shape.dimension);
        for chunk in values.chunks(LAST_CHUNK / 4) {
            file.write_all(bytes(chunk))?;
        }
        end_file(file)
    }

    /// Assembles a graph from its two files, checking that they belong together, match
    /// `shape` and hold a well-formed graph (every id in range, every count within its
    /// list). `spare` must be the room both files were read with. Ranks the nodes afresh,
    /// relinking any node the entry point does not reach (dumps hold no ranks).
    pub fn from_files(
        shape: Shape,
        graph: GraphFile,
        vectors: VectorFile,
        spare: usize,
    ) -> Result<Self, String> {
        let header = graph.header;
        if header.shape != shape || vectors.header != header {
            return Err(format!(
                "dump headers {header:?} / {:?} do not match {shape:?}",
                vectors.header
            ));
        }
        let nodes = header.nodes as usize;
        let upper = split_upper(&shape, &graph.levels[..nodes], &graph.upper)?;
        let capacity = nodes + spare;
        let upper = upper.into_iter().chain((0..spare).map(|_| None)).collect();
        let hnsw = Self {
            shape,
            capacity,
            len: AtomicUsize::new(nodes),
            vectors: Cells::from_region(vectors.vectors),
            slots: Cells::from_region(vectors.slots),
            levels: Cells::from_region(graph.levels),
            upper: Cells::from_vec(upper),
            base: graph.base.into_atomics(),
            locks: (0..capacity).map(|_| Mutex::new(())).collect(),
            ranks: Region::zeroed(capacity),
            anchors: Region::zeroed(capacity),
            unanchored: Mutex::new(Vec::new()),
            entry: AtomicU64::new(header.entry),
            entry_lock: Mutex::new(()),
            writer: Mutex::new(Ranking::default()),
            dot: Dot::detect(),
        };
        hnsw.validate()?;
        hnsw.rank_all(&mut hnsw.writer.lock());
        Ok(hnsw)
    }

    /// Checks every invariant a search relies on for memory safety and termination.
    fn validate(&self) -> Result<(), String> {
        let len = self.len();
        let sizes = [
            self.vectors.len() / self.shape.dimension.max(1),
            self.slots.len(),
            self.levels.len(),
            self.upper.len(),
            self.locks.len(),
            self.base.len() / self.shape.base_stride(),
        ];
        if sizes.iter().any(|&s| s != self.capacity) {
            return Err(format!(
                "array sizes {sizes:?} differ from {}",
                self.capacity
            ));
        }
        let packed = self.entry.load(Ordering::Acquire);
        match unpack_entry(packed) {
            None if len > 0 => return Err("nodes but no entry point".into()),
            Some((node, level)) if node as usize >= len || level != self.level(node) => {
                return Err(format!("entry point {node} at level {level} is invalid"));
            }
            _ => {}
        }
        for node in 0..len as u32 {
            for level in 0..=self.level(node) {
                let list = self.links(node, level);
                let (count, ids) = list.split_first().ok_or("missing neighbour list")?;
                let count = count.load(Ordering::Relaxed) as usize;
                let bad = count > ids.len()
                    || ids[..count]
                        .iter()
                        .any(|id| id.load(Ordering::Relaxed) as usize >= len);
                if bad {
                    return Err(format!("node {node} has a bad list on level {level}"));
                }
            }
        }
        Ok(())
    }
}

/// Splits the concatenated upper lists back into one array per node above level 0.
fn split_upper(
    shape: &Shape,
    levels: &[u8],
    upper: &[u32],
) -> Result<Vec<Option<Box<[AtomicU32]>>>, String> {
    let stride = shape.upper_stride();
    let mut offset = 0usize;
    let mut lists = Vec::with_capacity(levels.len());
    for &level in levels {
        let level = usize::from(level);
        if level > MAX_LEVEL {
            return Err(format!("node level {level} above {MAX_LEVEL}"));
        }
        if level == 0 {
            lists.push(None);
            continue;
        }
        let words = level * stride;
        let part = upper
            .get(offset..offset + words)
            .ok_or("upper lists shorter than the levels need")?;
        lists.push(Some(atomics_from(part.to_vec())));
        offset += words;
    }
    if offset != upper.len() {
        return Err("upper lists longer than the levels need".into());
    }
    Ok(lists)
}
