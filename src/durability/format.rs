//! The on-disk formats of the write-ahead log and of snapshots, as pure functions over bytes and files,
//! so that the writer, recovery and the tests agree on one definition of every byte.
//!
//! A log segment `wal-<first_seq>.log` is a header followed by records:
//!
//! ```text
//! header  [magic "QUOTAWAL"][version u32][first_seq u64][crc32c u32 over the previous 20 bytes]
//! record  [payload_len u32][seq u64][crc32c u32 over payload][crc32c u32 over the previous 16 bytes][payload]
//! ```
//!
//! A record's header has a checksum of its own, so that its length is trusted before it is used: a
//! damaged length is reported as damage, never taken for a record cut short by a crash. The end of a
//! segment is a torn tail (a crash mid-write, cut off by recovery) when it is less than a record header,
//! a record header that fails its checksum and ends in zeros with only zeros after it (the writer copies
//! front to back, so a header cut short ends in the zeros of unused space), a valid header whose payload runs
//! past the end of the file, or a valid header whose payload fails its checksum with only zeros after
//! the record (the record at the end of the file included). Zeros are what the writer's preallocated,
//! not yet used space holds, or blocks a power loss left zeroed. Anything else that does not check out
//! is corruption.
//!
//! A snapshot `snapshot-<covered_seq>.snap` is a header, framed items and a trailer:
//!
//! ```text
//! header  [magic "QUOTASNP"][version u32][covered_seq u64][crc32c u32 over the previous 20 bytes]
//! item    [len u32][crc32c u32 over payload][payload]
//! trailer [item_count u64][crc32c u32 over every item byte, frames included][magic "QUOTAEND"]
//! ```
//!
//! Every integer is little-endian and every sequence number is written with 20 digits in file names, so
//! that names sort in sequence order. Payloads are opaque here.

use std::{
    fs,
    io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
};

pub const SEGMENT_MAGIC: [u8; 8] = *b"QUOTAWAL";
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"QUOTASNP";
pub const SNAPSHOT_TRAILER_MAGIC: [u8; 8] = *b"QUOTAEND";
/// The one version of both formats this build reads and writes; any other is refused, never guessed at.
pub const FORMAT_VERSION: u32 = 4;

/// Magic, version, sequence number and checksum; the same shape for segments and snapshots.
pub const FILE_HEADER_LEN: usize = 8 + 4 + 8 + 4;
/// Payload length, sequence number, payload checksum and header checksum.
pub const RECORD_HEADER_LEN: usize = 4 + 8 + 4 + 4;
pub const ITEM_HEADER_LEN: usize = 4 + 4;
pub const SNAPSHOT_TRAILER_LEN: usize = 8 + 4 + 8;

/// The largest record payload: a ledger event is a few hundred bytes, so a longer length field can only
/// be corruption, and is refused before anything is allocated for it.
pub const MAX_RECORD_PAYLOAD: usize = 1024 * 1024;
/// The largest snapshot item: one environment with its maximum of open holds and remembered
/// resolutions serialises to a few hundred MiB.
pub const MAX_SNAPSHOT_ITEM: usize = 1024 * 1024 * 1024;

const _: () = assert!(MAX_RECORD_PAYLOAD <= u32::MAX as usize);
const _: () = assert!(MAX_SNAPSHOT_ITEM <= u32::MAX as usize);

const SEGMENT_PREFIX: &str = "wal-";
const SEGMENT_SUFFIX: &str = ".log";
const SNAPSHOT_PREFIX: &str = "snapshot-";
const SNAPSHOT_SUFFIX: &str = ".snap";
const TMP_SUFFIX: &str = ".tmp";
const SEQ_DIGITS: usize = 20;

/// A file that cannot be read as what its name says it is.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: {kind} at byte offset {offset}", path.display())]
    Corrupt { path: PathBuf, offset: u64, kind: Corruption },
}

impl FormatError {
    /// What was wrong and where, for corruption; `None` for an I/O error.
    pub fn corruption(&self) -> Option<(u64, &Corruption)> {
        match self {
            Self::Io { .. } => None,
            Self::Corrupt { offset, kind, .. } => Some((*offset, kind)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Corruption {
    #[error("the file is shorter than its {FILE_HEADER_LEN}-byte header")]
    ShortHeader,
    #[error("bad magic number {found:?}")]
    BadMagic { found: [u8; 8] },
    #[error("format version {found}, but this build reads only version {FORMAT_VERSION}")]
    UnknownVersion { found: u32 },
    #[error("header checksum mismatch")]
    HeaderChecksum,
    #[error("the header says sequence number {header}, but the file name says {name}")]
    NameMismatch { name: u64, header: u64 },
    #[error("record length {len} exceeds the limit of {max} bytes")]
    OversizedRecord { len: u64, max: usize },
    #[error("record header checksum mismatch with nonzero data after it")]
    RecordHeaderChecksum,
    #[error("record payload checksum mismatch with more data after it")]
    RecordChecksum,
    #[error("record has sequence number {found} where {expected} was expected")]
    SequenceGap { expected: u64, found: u64 },
    #[error("the file ends inside an item")]
    Truncated,
    #[error("item checksum mismatch")]
    ItemChecksum,
    #[error("no trailer: the file was not written to the end")]
    MissingTrailer,
    #[error("the trailer counts {trailer} items, but the file holds {found}")]
    ItemCount { trailer: u64, found: u64 },
    #[error("trailer checksum mismatch")]
    TrailerChecksum,
}

fn corrupt(path: &Path, offset: u64, kind: Corruption) -> FormatError {
    FormatError::Corrupt { path: path.to_owned(), offset, kind }
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> FormatError + '_ {
    move |source| FormatError::Io { path: path.to_owned(), source }
}

// ---------------------------------------------------------------------------------------------------
// File names

pub fn segment_file_name(first_seq: u64) -> String {
    format!("{SEGMENT_PREFIX}{first_seq:0SEQ_DIGITS$}{SEGMENT_SUFFIX}")
}

pub fn snapshot_file_name(covered_seq: u64) -> String {
    format!("{SNAPSHOT_PREFIX}{covered_seq:0SEQ_DIGITS$}{SNAPSHOT_SUFFIX}")
}

/// The name a file has while it is written, before the rename that makes it count.
pub fn tmp_file_name(final_name: &str) -> String {
    format!("{final_name}{TMP_SUFFIX}")
}

/// The sequence number in `<prefix><20 digits><suffix>`; anything else is not ours.
fn parse_seq_name(name: &str, prefix: &str, suffix: &str) -> Option<u64> {
    let digits = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
    if digits.len() != SEQ_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn seq_from_path(path: &Path, prefix: &str, suffix: &str) -> Option<u64> {
    parse_seq_name(path.file_name()?.to_str()?, prefix, suffix)
}

// ---------------------------------------------------------------------------------------------------
// Headers shared by segments and snapshots

fn encode_file_header(magic: [u8; 8], seq: u64, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&magic);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    let crc = crc32c::crc32c(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

pub fn encode_segment_header(first_seq: u64, out: &mut Vec<u8>) {
    encode_file_header(SEGMENT_MAGIC, first_seq, out);
}

/// The sequence number in a header, once magic, version and checksum hold. The version is checked
/// before the checksum so that a file from a newer build says so instead of looking damaged.
fn decode_file_header(bytes: &[u8], magic: [u8; 8]) -> Result<u64, (u64, Corruption)> {
    let header = bytes.get(..FILE_HEADER_LEN).ok_or((0, Corruption::ShortHeader))?;
    let found: [u8; 8] = header[..8].try_into().expect("8 bytes");
    if found != magic {
        return Err((0, Corruption::BadMagic { found }));
    }
    let version = u32_at(header, 8);
    if version != FORMAT_VERSION {
        return Err((8, Corruption::UnknownVersion { found: version }));
    }
    if crc32c::crc32c(&header[..20]) != u32_at(header, 20) {
        return Err((20, Corruption::HeaderChecksum));
    }
    Ok(u64_at(header, 12))
}

fn check_name(path: &Path, prefix: &str, suffix: &str, header_seq: u64) -> Result<(), FormatError> {
    match seq_from_path(path, prefix, suffix) {
        Some(name) if name != header_seq => {
            Err(corrupt(path, 12, Corruption::NameMismatch { name, header: header_seq }))
        }
        _ => Ok(()),
    }
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

// ---------------------------------------------------------------------------------------------------
// Log records and segments

/// Appends one complete record to `out`.
pub fn encode_record(seq: u64, payload: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    encode_record_unsealed(seq, payload, out);
    seal_records(&mut out[start..]);
}

/// Appends a record whose checksums are left zero, so that the journal's hot path only copies bytes;
/// [`seal_records`] fills the checksums in later, off that path.
///
/// # Panics
/// If `payload` is longer than [`MAX_RECORD_PAYLOAD`]: the caller encodes bounded events, so a longer
/// one is a bug, and writing it would make the log unreadable.
pub(crate) fn encode_record_unsealed(seq: u64, payload: &[u8], out: &mut Vec<u8>) {
    assert!(payload.len() <= MAX_RECORD_PAYLOAD, "log record of {} bytes over the limit", payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(payload);
}

/// Computes the checksums of every record in `records`, which holds whole records only: the payload's
/// first, then the header's, which covers it.
pub(crate) fn seal_records(records: &mut [u8]) {
    let mut at = 0;
    while at < records.len() {
        let record = &mut records[at..];
        let len = u32_at(record, 0) as usize;
        let end = RECORD_HEADER_LEN + len;
        let payload_crc = crc32c::crc32c(&record[RECORD_HEADER_LEN..end]);
        record[12..16].copy_from_slice(&payload_crc.to_le_bytes());
        let header_crc = crc32c::crc32c(&record[..16]);
        record[16..20].copy_from_slice(&header_crc.to_le_bytes());
        at += end;
    }
}

/// Records as read back: (sequence number, payload).
type Records = Vec<(u64, Vec<u8>)>;

/// A log segment as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub first_seq: u64,
    /// Consecutive from `first_seq`.
    pub records: Vec<(u64, Vec<u8>)>,
    /// The length of the part of the file that holds whole, valid records.
    pub valid_len: u64,
    /// Where an incomplete last record starts, if the file ends in one (a crash mid-write); equals
    /// `valid_len`. The caller truncates the file there.
    pub torn_tail: Option<u64>,
    /// Everything after `valid_len` is zeros: space the writer reserved and had not used yet (or blocks
    /// a power loss left zeroed), rather than a record cut short.
    pub tail_is_zero: bool,
}

/// Reads and checks a whole segment. An incomplete record at the end is reported as a torn tail (see
/// the module documentation for exactly what counts as one); anything else that does not check out is
/// an error naming the offset.
pub fn read_segment(path: &Path) -> Result<Segment, FormatError> {
    let bytes = fs::read(path).map_err(io_error(path))?;
    let first_seq = decode_file_header(&bytes, SEGMENT_MAGIC).map_err(|(offset, kind)| corrupt(path, offset, kind))?;
    check_name(path, SEGMENT_PREFIX, SEGMENT_SUFFIX, first_seq)?;
    let (records, end) = parse_records(&bytes, first_seq).map_err(|(offset, kind)| corrupt(path, offset, kind))?;
    let torn_tail = (end < bytes.len()).then_some(end as u64);
    let tail_is_zero = is_zero(&bytes[end..]);
    Ok(Segment { first_seq, records, valid_len: end as u64, torn_tail, tail_is_zero })
}

/// Parses records from after the header to the end of the file, or to the start of a torn record.
/// Returns the records and the offset where valid data ends.
fn parse_records(bytes: &[u8], first_seq: u64) -> Result<(Records, usize), (u64, Corruption)> {
    let mut records = Vec::new();
    let mut at = FILE_HEADER_LEN;
    let mut expected = first_seq;
    while at < bytes.len() {
        let rest = &bytes[at..];
        // A record header cut short by a crash ends the file.
        let Some(header) = rest.get(..RECORD_HEADER_LEN) else {
            return Ok((records, at));
        };
        if crc32c::crc32c(&header[..16]) != u32_at(header, 16) {
            // A header that a crash cut short in space the writer had reserved (its end still zero), or
            // blocks that a power loss left zeroed, may end the file; a damaged header followed by anything
            // else may hide any number of records, so it is never cut off.
            let written = header.iter().rposition(|&b| b != 0).map_or(0, |last| last + 1);
            if written < RECORD_HEADER_LEN && is_zero(&rest[RECORD_HEADER_LEN..]) {
                return Ok((records, at));
            }
            return Err((at as u64, Corruption::RecordHeaderChecksum));
        }
        // From here on the length is what the writer wrote.
        let len = u32_at(header, 0) as usize;
        if len > MAX_RECORD_PAYLOAD {
            return Err((at as u64, Corruption::OversizedRecord { len: len as u64, max: MAX_RECORD_PAYLOAD }));
        }
        let Some(record) = rest.get(..RECORD_HEADER_LEN + len) else {
            // A crash mid-write: the header reached the file, the end of the payload did not.
            return Ok((records, at));
        };
        let payload = &record[RECORD_HEADER_LEN..];
        if crc32c::crc32c(payload) != u32_at(header, 12) {
            // The last record whose payload never fully reached the disk, perhaps followed by zeroed blocks.
            if is_zero(&rest[record.len()..]) {
                return Ok((records, at));
            }
            return Err((at as u64, Corruption::RecordChecksum));
        }
        let seq = u64_at(header, 4);
        if seq != expected {
            return Err((at as u64 + 4, Corruption::SequenceGap { expected, found: seq }));
        }
        records.push((seq, payload.to_vec()));
        // A segment cannot hold 2^64 records; wrapping here would only ever follow a forged header.
        expected = expected.wrapping_add(1);
        at += record.len();
    }
    Ok((records, at))
}

fn is_zero(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| b == 0)
}

/// Cuts a segment back to `valid_len` (after a torn tail) and makes the cut durable.
pub fn truncate_segment(path: &Path, valid_len: u64) -> io::Result<()> {
    let file = fs::OpenOptions::new().write(true).open(path)?;
    file.set_len(valid_len)?;
    file.sync_all()
}

// ---------------------------------------------------------------------------------------------------
// Snapshots

/// Writes a snapshot so that it appears under its final name complete and durable, or not at all.
pub struct SnapshotWriter {
    out: BufWriter<fs::File>,
    dir: PathBuf,
    tmp_path: PathBuf,
    final_path: PathBuf,
    item_count: u64,
    /// Over every item byte written so far, frames included.
    items_crc: u32,
    /// Cleared by `finish`, so that a writer dropped half-way removes its temporary file.
    unfinished: bool,
}

impl SnapshotWriter {
    /// Starts `snapshot-<covered_seq>.snap.tmp` in `dir`, replacing a leftover one.
    pub fn create(dir: &Path, covered_seq: u64) -> io::Result<Self> {
        let final_name = snapshot_file_name(covered_seq);
        let tmp_path = dir.join(tmp_file_name(&final_name));
        let file = fs::File::create(&tmp_path)?;
        let mut writer = Self {
            out: BufWriter::with_capacity(1024 * 1024, file),
            dir: dir.to_owned(),
            tmp_path,
            final_path: dir.join(final_name),
            item_count: 0,
            items_crc: 0,
            unfinished: true,
        };
        let mut header = Vec::with_capacity(FILE_HEADER_LEN);
        encode_file_header(SNAPSHOT_MAGIC, covered_seq, &mut header);
        writer.out.write_all(&header)?;
        Ok(writer)
    }

    pub fn append(&mut self, item: &[u8]) -> io::Result<()> {
        if item.len() > MAX_SNAPSHOT_ITEM {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("snapshot item of {} bytes over the limit of {MAX_SNAPSHOT_ITEM}", item.len()),
            ));
        }
        let mut frame = [0u8; ITEM_HEADER_LEN];
        frame[..4].copy_from_slice(&(item.len() as u32).to_le_bytes());
        frame[4..].copy_from_slice(&crc32c::crc32c(item).to_le_bytes());
        self.out.write_all(&frame)?;
        self.out.write_all(item)?;
        self.items_crc = crc32c::crc32c_append(crc32c::crc32c_append(self.items_crc, &frame), item);
        self.item_count += 1;
        Ok(())
    }

    /// Writes the trailer, makes the file durable, renames it to its final name and makes the rename
    /// durable. Returns the final path.
    pub fn finish(mut self) -> io::Result<PathBuf> {
        let mut trailer = Vec::with_capacity(SNAPSHOT_TRAILER_LEN);
        trailer.extend_from_slice(&self.item_count.to_le_bytes());
        trailer.extend_from_slice(&self.items_crc.to_le_bytes());
        trailer.extend_from_slice(&SNAPSHOT_TRAILER_MAGIC);
        self.out.write_all(&trailer)?;
        self.out.flush()?;
        self.out.get_ref().sync_all()?;
        fs::rename(&self.tmp_path, &self.final_path)?;
        self.unfinished = false;
        sync_dir(&self.dir)?;
        Ok(self.final_path.clone())
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        if self.unfinished {
            // Best effort: a leftover is also removed at the next start.
            let _ = fs::remove_file(&self.tmp_path);
        }
    }
}

/// Reads and checks a whole snapshot: its covered sequence number and its items in order.
pub fn read_snapshot(path: &Path) -> Result<(u64, Vec<Vec<u8>>), FormatError> {
    let file = fs::File::open(path).map_err(io_error(path))?;
    let file_len = file.metadata().map_err(io_error(path))?.len();
    let mut header = [0u8; FILE_HEADER_LEN];
    let header = &mut header[..file_len.min(FILE_HEADER_LEN as u64) as usize];
    file.read_exact_at(header, 0).map_err(io_error(path))?;
    let covered_seq =
        decode_file_header(header, SNAPSHOT_MAGIC).map_err(|(offset, kind)| corrupt(path, offset, kind))?;
    check_name(path, SNAPSHOT_PREFIX, SNAPSHOT_SUFFIX, covered_seq)?;
    // The trailer is read first so that a snapshot cut short says so, rather than failing on whichever
    // item its last bytes happen to fall in.
    let trailer = read_trailer(&file, file_len).map_err(io_error(path))?;
    let items_end = match trailer {
        Some(trailer) if trailer[12..] == SNAPSHOT_TRAILER_MAGIC => file_len - SNAPSHOT_TRAILER_LEN as u64,
        _ => return Err(corrupt(path, file_len, Corruption::MissingTrailer)),
    };
    let mut input = BufReader::with_capacity(1024 * 1024, file);
    input.seek(SeekFrom::Start(FILE_HEADER_LEN as u64)).map_err(io_error(path))?;
    let (items, items_crc) = read_items(&mut input, path, items_end)?;
    let trailer = trailer.expect("checked above");
    check_trailer(&trailer, items.len() as u64, items_crc).map_err(|(at, kind)| corrupt(path, items_end + at, kind))?;
    Ok((covered_seq, items))
}

/// The last bytes of a snapshot, if it is long enough to have both a header and a trailer.
fn read_trailer(file: &fs::File, file_len: u64) -> io::Result<Option<[u8; SNAPSHOT_TRAILER_LEN]>> {
    if file_len < (FILE_HEADER_LEN + SNAPSHOT_TRAILER_LEN) as u64 {
        return Ok(None);
    }
    let mut trailer = [0u8; SNAPSHOT_TRAILER_LEN];
    file.read_exact_at(&mut trailer, file_len - SNAPSHOT_TRAILER_LEN as u64)?;
    Ok(Some(trailer))
}

/// Reads framed items from just after the header up to `items_end`, where the trailer starts.
fn read_items(input: &mut impl Read, path: &Path, items_end: u64) -> Result<(Vec<Vec<u8>>, u32), FormatError> {
    let mut items = Vec::new();
    let mut items_crc = 0;
    let mut at = FILE_HEADER_LEN as u64;
    while at < items_end {
        if items_end - at < ITEM_HEADER_LEN as u64 {
            return Err(corrupt(path, at, Corruption::Truncated));
        }
        let mut frame = [0u8; ITEM_HEADER_LEN];
        read_full(input, &mut frame, path)?;
        let len = u32_at(&frame, 0) as u64;
        // Checked against the file before allocating, so a damaged length cannot ask for gigabytes.
        if len > MAX_SNAPSHOT_ITEM as u64 || len > items_end - at - ITEM_HEADER_LEN as u64 {
            return Err(corrupt(path, at, Corruption::Truncated));
        }
        let mut item = vec![0u8; len as usize];
        read_full(input, &mut item, path)?;
        if crc32c::crc32c(&item) != u32_at(&frame, 4) {
            return Err(corrupt(path, at, Corruption::ItemChecksum));
        }
        items_crc = crc32c::crc32c_append(crc32c::crc32c_append(items_crc, &frame), &item);
        items.push(item);
        at += ITEM_HEADER_LEN as u64 + len;
    }
    Ok((items, items_crc))
}

/// Checks a trailer, whose magic is known good, against what was read; the offset returned is
/// relative to the trailer.
fn check_trailer(trailer: &[u8], found: u64, items_crc: u32) -> Result<(), (u64, Corruption)> {
    let count = u64_at(trailer, 0);
    if count != found {
        return Err((0, Corruption::ItemCount { trailer: count, found }));
    }
    if u32_at(trailer, 8) != items_crc {
        return Err((8, Corruption::TrailerChecksum));
    }
    Ok(())
}

fn read_full(input: &mut impl Read, buf: &mut [u8], path: &Path) -> Result<(), FormatError> {
    input.read_exact(buf).map_err(io_error(path))
}

// ---------------------------------------------------------------------------------------------------
// The data directory

/// What a data directory holds, by kind; the caller decides what to do with each.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DataDirListing {
    /// By first sequence number.
    pub segments: Vec<(u64, PathBuf)>,
    /// By covered sequence number.
    pub snapshots: Vec<(u64, PathBuf)>,
    /// Files left by a write that did not finish; never read, safe to remove.
    pub stray_tmp: Vec<PathBuf>,
    /// Anything else, sorted by path.
    pub other: Vec<PathBuf>,
}

pub fn list_data_dir(dir: &Path) -> io::Result<DataDirListing> {
    let mut listing = DataDirListing::default();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_str().unwrap_or_default();
        if !entry.file_type()?.is_file() {
            listing.other.push(path);
        } else if let Some(seq) = parse_seq_name(name, SEGMENT_PREFIX, SEGMENT_SUFFIX) {
            listing.segments.push((seq, path));
        } else if let Some(seq) = parse_seq_name(name, SNAPSHOT_PREFIX, SNAPSHOT_SUFFIX) {
            listing.snapshots.push((seq, path));
        } else if name.ends_with(TMP_SUFFIX) {
            listing.stray_tmp.push(path);
        } else {
            listing.other.push(path);
        }
    }
    listing.segments.sort();
    listing.snapshots.sort();
    listing.stray_tmp.sort();
    listing.other.sort();
    Ok(listing)
}

/// Makes renames, creations and removals in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use std::fmt;

    use proptest::prelude::*;

    use super::*;

    /// Segment bytes with records `first_seq..` holding `payloads`, and the offset of each record.
    fn segment_bytes(first_seq: u64, payloads: &[Vec<u8>]) -> (Vec<u8>, Vec<usize>) {
        let mut bytes = Vec::new();
        encode_segment_header(first_seq, &mut bytes);
        let mut offsets = Vec::new();
        for (seq, payload) in (first_seq..).zip(payloads) {
            offsets.push(bytes.len());
            encode_record(seq, payload, &mut bytes);
        }
        (bytes, offsets)
    }

    fn write_segment(dir: &Path, first_seq: u64, payloads: &[Vec<u8>]) -> (PathBuf, Vec<u8>, Vec<usize>) {
        let (bytes, offsets) = segment_bytes(first_seq, payloads);
        let path = dir.join(segment_file_name(first_seq));
        fs::write(&path, &bytes).unwrap();
        (path, bytes, offsets)
    }

    fn numbered(seqs: u64, payloads: &[Vec<u8>]) -> Vec<(u64, Vec<u8>)> {
        (seqs..).zip(payloads.iter().cloned()).collect()
    }

    fn sample_payloads() -> Vec<Vec<u8>> {
        vec![b"first".to_vec(), Vec::new(), vec![0; 3], (0..=255).collect(), b"last one".to_vec()]
    }

    fn write_snapshot(dir: &Path, covered_seq: u64, items: &[Vec<u8>]) -> PathBuf {
        let mut writer = SnapshotWriter::create(dir, covered_seq).unwrap();
        for item in items {
            writer.append(item).unwrap();
        }
        writer.finish().unwrap()
    }

    /// Recomputes the header checksum of the record at `at`, as if the writer had written what is there.
    fn reseal_header(bytes: &mut [u8], at: usize) {
        let crc = crc32c::crc32c(&bytes[at..at + 16]);
        bytes[at + 16..at + 20].copy_from_slice(&crc.to_le_bytes());
    }

    fn corruption(result: Result<impl fmt::Debug, FormatError>) -> (u64, Corruption) {
        let err = result.expect_err("corruption must be reported");
        let (offset, kind) = err.corruption().unwrap_or_else(|| panic!("not corruption: {err}"));
        (offset, kind.clone())
    }

    #[test]
    fn a_record_is_laid_out_as_documented() {
        let mut out = Vec::new();
        encode_record(0x0102_0304_0506_0708, b"abc", &mut out);
        assert_eq!(out.len(), RECORD_HEADER_LEN + 3);
        assert_eq!(&out[..4], &3u32.to_le_bytes());
        assert_eq!(&out[4..12], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&out[12..16], &crc32c::crc32c(b"abc").to_le_bytes());
        assert_eq!(&out[16..20], &crc32c::crc32c(&out[..16]).to_le_bytes());
        assert_eq!(&out[20..], b"abc");
    }

    #[test]
    fn sealing_later_gives_the_same_bytes_as_encoding_whole() {
        let mut whole = Vec::new();
        let mut unsealed = Vec::new();
        for (seq, payload) in (7..).zip(sample_payloads()) {
            encode_record(seq, &payload, &mut whole);
            encode_record_unsealed(seq, &payload, &mut unsealed);
        }
        seal_records(&mut unsealed);
        assert_eq!(whole, unsealed);
    }

    #[test]
    fn file_names_sort_in_sequence_order_and_parse_back() {
        assert_eq!(segment_file_name(42), "wal-00000000000000000042.log");
        assert_eq!(snapshot_file_name(u64::MAX), "snapshot-18446744073709551615.snap");
        assert_eq!(parse_seq_name(&segment_file_name(u64::MAX), SEGMENT_PREFIX, SEGMENT_SUFFIX), Some(u64::MAX));
        assert_eq!(parse_seq_name("wal-42.log", SEGMENT_PREFIX, SEGMENT_SUFFIX), None);
        assert_eq!(parse_seq_name("wal-+0000000000000000042.log", SEGMENT_PREFIX, SEGMENT_SUFFIX), None);
        assert_eq!(parse_seq_name("wal-99999999999999999999.log", SEGMENT_PREFIX, SEGMENT_SUFFIX), None);
    }

    #[test]
    fn a_segment_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let payloads = sample_payloads();
        let (path, bytes, _) = write_segment(dir.path(), 10, &payloads);
        let segment = read_segment(&path).unwrap();
        assert_eq!(
            segment,
            Segment {
                first_seq: 10,
                records: numbered(10, &payloads),
                valid_len: bytes.len() as u64,
                torn_tail: None,
                tail_is_zero: true
            }
        );
    }

    #[test]
    fn an_empty_segment_is_valid() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _, _) = write_segment(dir.path(), 1, &[]);
        let segment = read_segment(&path).unwrap();
        assert_eq!(segment.records, vec![]);
        assert_eq!((segment.valid_len, segment.torn_tail), (FILE_HEADER_LEN as u64, None));
    }

    #[test]
    fn a_torn_tail_at_every_byte_offset_of_the_last_record_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let payloads = sample_payloads();
        let (path, bytes, offsets) = write_segment(dir.path(), 1, &payloads);
        let last = *offsets.last().unwrap();
        let kept = numbered(1, &payloads[..payloads.len() - 1]);
        for cut in last..bytes.len() {
            fs::write(&path, &bytes[..cut]).unwrap();
            let segment = read_segment(&path).unwrap();
            assert_eq!(segment.records, kept, "cut at {cut}");
            assert_eq!(segment.valid_len, last as u64, "cut at {cut}");
            let torn = (cut > last).then_some(last as u64);
            assert_eq!(segment.torn_tail, torn, "cut at {cut}");
        }
    }

    #[test]
    fn a_torn_record_whose_checksum_fails_at_the_end_of_the_file_is_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut bytes, offsets) = write_segment(dir.path(), 1, &sample_payloads());
        // A whole-length last record whose payload never reached the disk.
        let n = bytes.len();
        bytes[n - 3..].fill(0);
        fs::write(&path, &bytes).unwrap();
        let segment = read_segment(&path).unwrap();
        assert_eq!(segment.torn_tail, Some(*offsets.last().unwrap() as u64));
    }

    #[test]
    fn truncating_a_torn_tail_leaves_a_clean_segment() {
        let dir = tempfile::tempdir().unwrap();
        let payloads = sample_payloads();
        let (path, bytes, offsets) = write_segment(dir.path(), 1, &payloads);
        fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        let torn = read_segment(&path).unwrap();
        truncate_segment(&path, torn.valid_len).unwrap();
        let clean = read_segment(&path).unwrap();
        assert_eq!(clean.torn_tail, None);
        assert_eq!(clean.valid_len, *offsets.last().unwrap() as u64);
        assert_eq!(clean.records, torn.records);
    }

    #[test]
    fn a_zeroed_tail_left_by_a_power_loss_is_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let payloads = sample_payloads();
        let (path, mut bytes, _) = write_segment(dir.path(), 1, &payloads);
        let end = bytes.len();
        bytes.resize(end + 4096, 0);
        fs::write(&path, &bytes).unwrap();
        let segment = read_segment(&path).unwrap();
        assert!(segment.tail_is_zero);
        assert_eq!((segment.records, segment.torn_tail), (numbered(1, &payloads), Some(end as u64)));
    }

    #[test]
    fn an_entirely_zeroed_last_record_left_by_a_power_loss_is_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let payloads = sample_payloads();
        let (path, mut bytes, offsets) = write_segment(dir.path(), 1, &payloads);
        let last = *offsets.last().unwrap();
        bytes[last..].fill(0);
        fs::write(&path, &bytes).unwrap();
        let segment = read_segment(&path).unwrap();
        assert_eq!((segment.records, segment.torn_tail), (numbered(1, &payloads[..4]), Some(last as u64)));
    }

    #[test]
    fn a_last_payload_cut_short_and_followed_by_zeroed_blocks_is_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let payloads = sample_payloads();
        let (path, mut bytes, offsets) = write_segment(dir.path(), 1, &payloads);
        // The block holding the header reached the disk; the one holding the end of the payload did not.
        let last = *offsets.last().unwrap();
        let end = bytes.len();
        bytes[last + RECORD_HEADER_LEN + 2..].fill(0);
        bytes.resize(end + 4096, 0);
        fs::write(&path, &bytes).unwrap();
        let segment = read_segment(&path).unwrap();
        assert_eq!((segment.records, segment.torn_tail), (numbered(1, &payloads[..4]), Some(last as u64)));
    }

    #[test]
    fn a_damaged_record_header_before_the_tail_is_an_error_naming_file_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let (path, pristine, offsets) = write_segment(dir.path(), 1, &sample_payloads());
        // Length, sequence number, payload checksum, header checksum.
        for field in [0, 4, 12, 16] {
            let mut bytes = pristine.clone();
            bytes[offsets[1] + field] ^= 1;
            fs::write(&path, &bytes).unwrap();
            let err = read_segment(&path).unwrap_err();
            assert_eq!(err.corruption(), Some((offsets[1] as u64, &Corruption::RecordHeaderChecksum)), "{field}");
            let message = err.to_string();
            assert!(message.starts_with(&path.display().to_string()), "{message}");
            assert!(message.ends_with(&format!("at byte offset {}", offsets[1])), "{message}");
        }
    }

    #[test]
    fn a_damaged_record_header_followed_by_zeros_only_is_an_error() {
        // Zeros after a damaged header are not a torn tail when the header itself is not zero.
        let dir = tempfile::tempdir().unwrap();
        let (path, mut bytes, offsets) = write_segment(dir.path(), 1, &sample_payloads());
        let last = *offsets.last().unwrap();
        bytes[last + RECORD_HEADER_LEN..].fill(0);
        bytes[last] ^= 0x10;
        fs::write(&path, &bytes).unwrap();
        assert_eq!(corruption(read_segment(&path)), (last as u64, Corruption::RecordHeaderChecksum));
    }

    #[test]
    fn a_header_cut_short_in_preallocated_space_is_a_torn_tail() {
        // The writer copies front to back into zeroed, preallocated space: a crash leaves a prefix of the
        // last record's header with zeros after it.
        let dir = tempfile::tempdir().unwrap();
        let payloads = sample_payloads();
        let (path, pristine, offsets) = write_segment(dir.path(), 1, &payloads);
        let last = *offsets.last().unwrap();
        for cut in 0..RECORD_HEADER_LEN {
            let mut bytes = pristine.clone();
            bytes[last + cut..].fill(0);
            bytes.resize(pristine.len() + 4096, 0);
            fs::write(&path, &bytes).unwrap();
            let segment = read_segment(&path).unwrap();
            let expected = (numbered(1, &payloads[..4]), Some(last as u64), cut == 0);
            assert_eq!((segment.records, segment.torn_tail, segment.tail_is_zero), expected, "cut at {cut}");
        }
    }

    #[test]
    fn a_payload_checksum_failure_before_the_tail_is_an_error_naming_file_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut bytes, offsets) = write_segment(dir.path(), 1, &sample_payloads());
        bytes[offsets[3] + RECORD_HEADER_LEN + 100] ^= 1;
        fs::write(&path, &bytes).unwrap();
        let err = read_segment(&path).unwrap_err();
        assert_eq!(err.corruption(), Some((offsets[3] as u64, &Corruption::RecordChecksum)));
        let message = err.to_string();
        assert!(message.starts_with(&path.display().to_string()), "{message}");
        assert!(message.ends_with(&format!("at byte offset {}", offsets[3])), "{message}");
    }

    /// A damaged length that points past the end of the file, but not past the largest record, must not
    /// be taken for a record cut short by a crash: the records after it were acknowledged.
    #[test]
    fn a_damaged_length_pointing_past_the_end_of_the_file_is_an_error_not_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut bytes, offsets) = write_segment(dir.path(), 1, &sample_payloads());
        bytes[offsets[1] + 2] ^= 0x01;
        let claimed = u32_at(&bytes, offsets[1]) as usize;
        assert!(offsets[1] + RECORD_HEADER_LEN + claimed > bytes.len() && claimed <= MAX_RECORD_PAYLOAD);
        fs::write(&path, &bytes).unwrap();
        assert_eq!(corruption(read_segment(&path)), (offsets[1] as u64, Corruption::RecordHeaderChecksum));
    }

    /// Once the header checks out its length is trusted: a payload running past the end of the file is a
    /// crash mid-write.
    #[test]
    fn a_valid_header_whose_payload_runs_past_the_end_of_the_file_is_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let payloads = sample_payloads();
        let (path, bytes, offsets) = write_segment(dir.path(), 1, &payloads);
        let last = *offsets.last().unwrap();
        fs::write(&path, &bytes[..last + RECORD_HEADER_LEN]).unwrap();
        let segment = read_segment(&path).unwrap();
        assert_eq!((segment.records, segment.torn_tail), (numbered(1, &payloads[..4]), Some(last as u64)));
    }

    #[test]
    fn a_sequence_gap_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = Vec::new();
        encode_segment_header(5, &mut bytes);
        encode_record(5, b"a", &mut bytes);
        let second = bytes.len();
        encode_record(7, b"b", &mut bytes);
        let path = dir.path().join(segment_file_name(5));
        fs::write(&path, &bytes).unwrap();
        assert_eq!(
            corruption(read_segment(&path)),
            (second as u64 + 4, Corruption::SequenceGap { expected: 6, found: 7 })
        );
    }

    #[test]
    fn the_first_record_must_carry_the_headers_sequence_number() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = Vec::new();
        encode_segment_header(5, &mut bytes);
        encode_record(4, b"a", &mut bytes);
        let path = dir.path().join(segment_file_name(5));
        fs::write(&path, &bytes).unwrap();
        let (_, kind) = corruption(read_segment(&path));
        assert_eq!(kind, Corruption::SequenceGap { expected: 5, found: 4 });
    }

    #[test]
    fn record_payload_length_is_limited_at_the_maximum() {
        let dir = tempfile::tempdir().unwrap();
        for len in [MAX_RECORD_PAYLOAD - 1, MAX_RECORD_PAYLOAD] {
            let payloads = vec![vec![0xA5; len], b"after".to_vec()];
            let (path, _, _) = write_segment(dir.path(), 1, &payloads);
            assert_eq!(read_segment(&path).unwrap().records, numbered(1, &payloads));
        }
        // One byte over, in a header that checks out: the length is refused as corruption even where it
        // would be a torn tail.
        let (path, mut bytes, offsets) = write_segment(dir.path(), 1, &[b"x".to_vec()]);
        bytes[offsets[0]..offsets[0] + 4].copy_from_slice(&(MAX_RECORD_PAYLOAD as u32 + 1).to_le_bytes());
        reseal_header(&mut bytes, offsets[0]);
        fs::write(&path, &bytes).unwrap();
        assert_eq!(
            corruption(read_segment(&path)),
            (
                offsets[0] as u64,
                Corruption::OversizedRecord { len: MAX_RECORD_PAYLOAD as u64 + 1, max: MAX_RECORD_PAYLOAD }
            )
        );
    }

    #[test]
    #[should_panic(expected = "over the limit")]
    fn encoding_a_record_over_the_limit_is_a_bug() {
        encode_record(1, &vec![0; MAX_RECORD_PAYLOAD + 1], &mut Vec::new());
    }

    #[test]
    fn a_segment_of_an_unknown_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = Vec::new();
        encode_file_header(SEGMENT_MAGIC, 1, &mut bytes);
        for version in [FORMAT_VERSION - 1, FORMAT_VERSION + 1] {
            bytes[8..12].copy_from_slice(&version.to_le_bytes());
            let crc = crc32c::crc32c(&bytes[..20]);
            bytes[20..24].copy_from_slice(&crc.to_le_bytes());
            let path = dir.path().join(segment_file_name(1));
            fs::write(&path, &bytes).unwrap();
            assert_eq!(corruption(read_segment(&path)), (8, Corruption::UnknownVersion { found: version }));
        }
    }

    #[test]
    fn a_segment_shorter_than_its_header_is_refused() {
        // Segments appear under their name only once their header is durable, so this is damage.
        let dir = tempfile::tempdir().unwrap();
        let (path, bytes, _) = write_segment(dir.path(), 1, &[]);
        for cut in 0..FILE_HEADER_LEN {
            fs::write(&path, &bytes[..cut]).unwrap();
            assert_eq!(corruption(read_segment(&path)), (0, Corruption::ShortHeader));
        }
    }

    #[test]
    fn a_segment_whose_header_disagrees_with_its_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (bytes, _) = segment_bytes(3, &[b"a".to_vec()]);
        let path = dir.path().join(segment_file_name(4));
        fs::write(&path, bytes).unwrap();
        assert_eq!(corruption(read_segment(&path)), (12, Corruption::NameMismatch { name: 4, header: 3 }));
    }

    /// Flipping any one bit of a segment is caught: as an error, or as a torn tail at the record that
    /// holds the bit with every earlier record intact; never as different data. A flip anywhere in a
    /// record with records after it, its length field above all, is an error naming that record.
    #[test]
    fn every_single_bit_flip_in_a_segment_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let payloads = sample_payloads();
        let (path, bytes, offsets) = write_segment(dir.path(), 1, &payloads);
        for bit in 0..bytes.len() * 8 {
            let mut damaged = bytes.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            fs::write(&path, &damaged).unwrap();
            check_flip_detected(read_segment(&path), &payloads, &offsets, bit / 8);
        }
    }

    fn check_flip_detected(result: Result<Segment, FormatError>, payloads: &[Vec<u8>], offsets: &[usize], byte: usize) {
        let record = offsets.iter().rposition(|&start| start <= byte);
        let segment = match (result, record) {
            (Err(_), None) => return,
            (Err(err), Some(record)) => {
                let (offset, _) = err.corruption().unwrap_or_else(|| panic!("flip at byte {byte}: {err}"));
                assert_eq!(offset, offsets[record] as u64, "flip at byte {byte}: {err}");
                return;
            }
            (Ok(_), None) => panic!("a flip in the header at byte {byte} was accepted"),
            (Ok(segment), Some(record)) => {
                let last = record + 1 == offsets.len();
                let in_length = byte < offsets[record] + 4;
                assert!(last, "a flip at byte {byte} of record {record}, with records after it, was accepted");
                assert!(!in_length, "a flip in the length field at byte {byte} was accepted");
                segment
            }
        };
        let record = record.expect("matched above");
        assert_eq!(segment.torn_tail, Some(offsets[record] as u64), "flip at byte {byte}");
        assert_eq!(segment.records, numbered(1, &payloads[..record]), "flip at byte {byte}");
    }

    #[test]
    fn a_snapshot_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        for items in [vec![], sample_payloads()] {
            let path = write_snapshot(dir.path(), 99, &items);
            assert_eq!(path, dir.path().join("snapshot-00000000000000000099.snap"));
            assert_eq!(read_snapshot(&path).unwrap(), (99, items));
        }
        assert!(list_data_dir(dir.path()).unwrap().stray_tmp.is_empty());
    }

    #[test]
    fn a_snapshot_writer_dropped_unfinished_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = SnapshotWriter::create(dir.path(), 5).unwrap();
        writer.append(b"item").unwrap();
        assert_eq!(list_data_dir(dir.path()).unwrap().stray_tmp.len(), 1);
        drop(writer);
        assert_eq!(list_data_dir(dir.path()).unwrap(), DataDirListing::default());
    }

    #[test]
    fn a_snapshot_item_over_the_limit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = SnapshotWriter::create(dir.path(), 5).unwrap();
        let err = writer.append(&vec![0; MAX_SNAPSHOT_ITEM + 1]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn a_snapshot_cut_anywhere_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_snapshot(dir.path(), 7, &sample_payloads());
        let bytes = fs::read(&path).unwrap();
        for cut in 0..bytes.len() {
            fs::write(&path, &bytes[..cut]).unwrap();
            assert!(read_snapshot(&path).is_err(), "cut at {cut} was accepted");
        }
        fs::write(&path, &bytes[..bytes.len() - SNAPSHOT_TRAILER_LEN]).unwrap();
        let (_, kind) = corruption(read_snapshot(&path));
        assert_eq!(kind, Corruption::MissingTrailer);
    }

    #[test]
    fn every_single_bit_flip_in_a_snapshot_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_snapshot(dir.path(), 7, &sample_payloads());
        let bytes = fs::read(&path).unwrap();
        for bit in 0..bytes.len() * 8 {
            let mut damaged = bytes.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            fs::write(&path, &damaged).unwrap();
            assert!(read_snapshot(&path).is_err(), "flip of bit {bit} was accepted");
        }
    }

    #[test]
    fn a_snapshot_item_checksum_failure_names_the_item_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_snapshot(dir.path(), 7, &[b"one".to_vec(), b"two".to_vec()]);
        let mut bytes = fs::read(&path).unwrap();
        let second = FILE_HEADER_LEN + ITEM_HEADER_LEN + 3;
        bytes[second + ITEM_HEADER_LEN] ^= 0x80;
        fs::write(&path, &bytes).unwrap();
        assert_eq!(corruption(read_snapshot(&path)), (second as u64, Corruption::ItemChecksum));
    }

    #[test]
    fn a_snapshot_of_an_unknown_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_snapshot(dir.path(), 7, &[b"one".to_vec()]);
        let pristine = fs::read(&path).unwrap();
        for version in [FORMAT_VERSION - 1, FORMAT_VERSION + 1] {
            let mut bytes = pristine.clone();
            bytes[8..12].copy_from_slice(&version.to_le_bytes());
            let crc = crc32c::crc32c(&bytes[..20]);
            bytes[20..24].copy_from_slice(&crc.to_le_bytes());
            fs::write(&path, &bytes).unwrap();
            assert_eq!(corruption(read_snapshot(&path)), (8, Corruption::UnknownVersion { found: version }));
        }
    }

    #[test]
    fn listing_sorts_by_sequence_and_sets_aside_what_is_not_ours() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            segment_file_name(100),
            segment_file_name(2),
            snapshot_file_name(50),
            snapshot_file_name(7),
            tmp_file_name(&snapshot_file_name(60)),
            tmp_file_name(&segment_file_name(101)),
            "LOCK".to_owned(),
            "wal-12.log".to_owned(),
        ] {
            fs::write(dir.path().join(name), b"").unwrap();
        }
        fs::create_dir(dir.path().join("wal-00000000000000000009.log")).unwrap();
        let p = |name: String| dir.path().join(name);
        let listing = list_data_dir(dir.path()).unwrap();
        assert_eq!(listing.segments, vec![(2, p(segment_file_name(2))), (100, p(segment_file_name(100)))]);
        assert_eq!(listing.snapshots, vec![(7, p(snapshot_file_name(7))), (50, p(snapshot_file_name(50)))]);
        assert_eq!(
            listing.stray_tmp,
            vec![p(tmp_file_name(&snapshot_file_name(60))), p(tmp_file_name(&segment_file_name(101)))]
        );
        let mut other = vec![p("LOCK".into()), p("wal-00000000000000000009.log".into()), p("wal-12.log".into())];
        other.sort();
        assert_eq!(listing.other, other);
    }

    fn payload_lists() -> impl Strategy<Value = Vec<Vec<u8>>> {
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..16)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn segments_round_trip(first_seq in 1..u64::MAX / 2, payloads in payload_lists()) {
            let dir = tempfile::tempdir().unwrap();
            let (path, bytes, _) = write_segment(dir.path(), first_seq, &payloads);
            let segment = read_segment(&path).unwrap();
            prop_assert_eq!(segment.records, numbered(first_seq, &payloads));
            prop_assert_eq!((segment.valid_len, segment.torn_tail), (bytes.len() as u64, None));
        }

        /// A segment cut anywhere after its header reads back as the records wholly before the cut.
        #[test]
        fn a_cut_segment_reads_back_as_a_prefix(payloads in payload_lists(), cut in any::<prop::sample::Index>()) {
            let dir = tempfile::tempdir().unwrap();
            let (path, bytes, offsets) = write_segment(dir.path(), 1, &payloads);
            let cut = FILE_HEADER_LEN + cut.index(bytes.len() - FILE_HEADER_LEN + 1);
            fs::write(&path, &bytes[..cut]).unwrap();
            let segment = read_segment(&path).unwrap();
            let whole = offsets.iter().zip(&payloads).filter(|&(&start, p)| start + RECORD_HEADER_LEN + p.len() <= cut).count();
            prop_assert_eq!(&segment.records, &numbered(1, &payloads[..whole]));
            let valid_len = offsets.get(whole).copied().unwrap_or(bytes.len()).min(cut);
            prop_assert_eq!(segment.valid_len, valid_len as u64);
            prop_assert_eq!(segment.torn_tail, (cut > valid_len).then_some(valid_len as u64));
        }

        #[test]
        fn a_bit_flip_in_a_segment_is_detected(payloads in payload_lists(), bit in any::<prop::sample::Index>()) {
            let dir = tempfile::tempdir().unwrap();
            let (path, mut bytes, offsets) = write_segment(dir.path(), 1, &payloads);
            let bit = bit.index(bytes.len() * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
            fs::write(&path, &bytes).unwrap();
            check_flip_detected(read_segment(&path), &payloads, &offsets, bit / 8);
        }

        #[test]
        fn snapshots_round_trip(covered_seq in any::<u64>(), items in payload_lists()) {
            let dir = tempfile::tempdir().unwrap();
            let path = write_snapshot(dir.path(), covered_seq, &items);
            prop_assert_eq!(read_snapshot(&path).unwrap(), (covered_seq, items));
        }

        #[test]
        fn a_bit_flip_in_a_snapshot_is_an_error(items in payload_lists(), bit in any::<prop::sample::Index>()) {
            let dir = tempfile::tempdir().unwrap();
            let path = write_snapshot(dir.path(), 3, &items);
            let mut bytes = fs::read(&path).unwrap();
            let bit = bit.index(bytes.len() * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
            fs::write(&path, &bytes).unwrap();
            prop_assert!(read_snapshot(&path).is_err());
        }
    }
}
