//! Dump files of a graph, written and read as a few large arrays.
//!
//! Two files, each a fixed header then raw arrays in the machine's byte order (the header
//! carries a byte-order mark, so a file from a machine of the other order is refused):
//! - the graph file: header, node levels (`u8`), base-level lists (`u32`, `1 + 2M` per
//!   node), then the upper-level lists of every node above level 0, in node order;
//! - the vector file: header, slot numbers (`u64`), vectors (`f32`, `dimension` per node).
//!
//! Readers checksum what they read on the way (see [`crate::checksum`]), so a file is read
//! once.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;

use crate::checksum::Checksum;

use super::cells::{atomics_from, bytes, bytes_mut, zeroed, zeroed_atomics, Cells, Plain};
use super::distance::Dot;
use super::{unpack_entry, Hnsw, Ranking, Shape, MAX_LEVEL};

const GRAPH_MAGIC: [u8; 8] = *b"MPGRAPH1";
const VECTOR_MAGIC: [u8; 8] = *b"MPVECTS1";
const BYTE_ORDER_MARK: u32 = 0x0102_0304;
/// Format version of both files.
pub(crate) const FORMAT: u32 = 1;
/// Header words after the magic: byte-order mark, format, dimension, max connections,
/// ef_construction, node count (two words), entry point (two words), upper words (two).
const HEADER_WORDS: usize = 11;
const HEADER_BYTES: usize = 8 + HEADER_WORDS * 4;
/// Bytes written per call.
const WRITE_CHUNK: usize = 1 << 20;
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
    levels: Vec<u8>,
    base: Vec<u32>,
    upper: Vec<u32>,
    /// Checksum of the whole file, as [`Checksum::hex`] writes it.
    pub checksum: String,
}

/// The vector file's content, read and hashed.
pub(crate) struct VectorFile {
    header: Header,
    slots: Vec<u64>,
    vectors: Vec<f32>,
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
    fn array<T: Plain + Default>(&mut self, len: usize, spare: usize) -> Result<Vec<T>, String> {
        let mut values = zeroed::<T>(len + spare);
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

/// Refuses a node count whose arrays could not fit in a file of `len` bytes, so that a
/// damaged header never causes a huge allocation.
fn check_fits(nodes: u64, bytes_per_node: u64, extra: u64, len: u64) -> Result<usize, String> {
    let need = nodes
        .checked_mul(bytes_per_node)
        .and_then(|b| b.checked_add(extra))
        .and_then(|b| b.checked_add(HEADER_BYTES as u64));
    if need != Some(len) {
        return Err(format!(
            "file of {len} bytes cannot hold {nodes} nodes of {bytes_per_node} bytes"
        ));
    }
    usize::try_from(nodes).map_err(|e| e.to_string())
}

impl GraphFile {
    /// Reads and hashes a graph file, leaving `spare` nodes of room in the arrays.
    pub fn read(path: &Path, spare: usize) -> Result<Self, String> {
        let (mut reader, len) = open_hashing(path)?;
        let header = reader.header(GRAPH_MAGIC)?;
        let stride = header.shape.base_stride() as u64;
        let extra = header
            .upper_words
            .checked_mul(4)
            .ok_or("upper word count overflows")?;
        let nodes = check_fits(header.nodes, 1 + 4 * stride, extra, len)?;
        let levels = reader.array::<u8>(nodes, spare)?;
        let base = reader.array::<u32>(nodes * stride as usize, spare * stride as usize)?;
        let upper = reader.array::<u32>(header.upper_words as usize, 0)?;
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
    /// Reads and hashes a vector file, leaving `spare` nodes of room in the arrays.
    pub fn read(path: &Path, spare: usize) -> Result<Self, String> {
        let (mut reader, len) = open_hashing(path)?;
        let header = reader.header(VECTOR_MAGIC)?;
        let dim = header.shape.dimension;
        let nodes = check_fits(header.nodes, 8 + 4 * dim as u64, 0, len)?;
        let slots = reader.array::<u64>(nodes, spare)?;
        let vectors = reader.array::<f32>(nodes * dim, spare * dim)?;
        let checksum = reader.finish(len)?;
        Ok(Self {
            header,
            slots,
            vectors,
            checksum,
        })
    }
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

    /// Writes the graph file and the vector file (not synced). Waits for a running insert
    /// batch; searches go on.
    pub fn write_files(&self, graph: &Path, vectors: &Path) -> std::io::Result<()> {
        let _writer = self.writer.lock();
        let len = self.len();
        let upper: Vec<u32> = (0..len)
            .filter_map(|node| self.upper.get(node).as_deref())
            .flat_map(|lists| lists.iter().map(|w| w.load(Ordering::Acquire)))
            .collect();
        let header = self.header(len, upper.len());

        let mut out = BufWriter::with_capacity(WRITE_CHUNK, File::create(graph)?);
        out.write_all(&header.encode(GRAPH_MAGIC))?;
        write_array(&mut out, self.levels.row(0, len))?;
        let words = len * self.shape.base_stride();
        let mut buffer = Vec::with_capacity(WRITE_CHUNK / 4);
        for chunk in self.base[..words].chunks(WRITE_CHUNK / 4) {
            buffer.clear();
            buffer.extend(chunk.iter().map(|w| w.load(Ordering::Acquire)));
            write_array(&mut out, &buffer)?;
        }
        write_array(&mut out, &upper)?;
        out.into_inner().map_err(|e| e.into_error())?.flush()?;

        let mut out = BufWriter::with_capacity(WRITE_CHUNK, File::create(vectors)?);
        out.write_all(&header.encode(VECTOR_MAGIC))?;
        write_array(&mut out, self.slots.row(0, len))?;
        write_array(&mut out, self.vectors.row(0, len * self.shape.dimension))?;
        out.into_inner().map_err(|e| e.into_error())?.flush()
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
            vectors: Cells::from_vec(vectors.vectors),
            slots: Cells::from_vec(vectors.slots),
            levels: Cells::from_vec(graph.levels),
            upper: Cells::from_vec(upper),
            base: atomics_from(graph.base),
            locks: (0..capacity).map(|_| Mutex::new(())).collect(),
            ranks: zeroed_atomics(capacity),
            anchors: zeroed_atomics(capacity),
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
