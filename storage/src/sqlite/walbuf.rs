//! A thin VFS over SQLite's own `unix` VFS that hands the writer's write-ahead-log frames
//! to the kernel in one `pwrite` per commit instead of two per page.
//!
//! SQLite writes every frame of a commit as two calls, its 24-byte header and then its
//! page: a submit that touches 7 pages made 14 `pwrite`s on the writer thread, and the
//! serial profile spent twice as long in the kernel as in SQLite itself. This VFS keeps
//! a connection's log writes in a buffer while they append one after another and writes
//! the buffer at once when the commit's last page arrives. Everything else (the database
//! file, locks, the shared-memory index, every other file) goes straight to `unix`,
//! whose file each of ours wraps, so that connections of this VFS and of the default one
//! share one file, one set of POSIX locks and one wal-index.
//!
//! Why it stays correct:
//! - A frame becomes visible to readers only when the writer publishes a new wal-index
//!   header, which it does after writing the frames and through a memory barrier on the
//!   database file (`xShmBarrier`) between its two copies of the header. Every buffered
//!   byte is written before that barrier returns, so no reader, in this process or
//!   another, can be pointed at a frame the kernel has not got.
//! - The commit's own write is flushed in the call that carries its last page (the one
//!   after a header whose "database size" field is set, which only commit frames have),
//!   so a failed write fails the commit with SQLite's own error. The barrier flush is
//!   a backstop that has nothing to do unless SQLite changes how it writes frames.
//! - Any read, size query, truncation, sync, file control or close of the log, and any
//!   release of a shared-memory lock, first writes what is buffered, so SQLite never
//!   sees a log that differs from what it wrote.
//! - A process that dies with frames still buffered dies before it published them:
//!   like a crash just before the commit, which SQLite's recovery already handles (the
//!   caller of that commit was not answered).
//!
//! Why by hand: the VFS crates of the ecosystem (`sqlite-vfs`, `sqlite-plugin`) build a
//! whole file system from a trait and leave out the shared-memory index WAL mode needs;
//! none wraps the `unix` VFS. This is the shim SQLite's documentation describes (a VFS
//! that delegates to another), about as small as one can be.

use std::collections::HashMap;
use std::ffi::{CStr, c_int, c_void};
use std::sync::{Mutex, OnceLock};

use rusqlite::ffi;

/// The name this VFS registers under.
pub(super) const NAME: &CStr = c"kiln-batched-wal";

/// The most bytes of log a connection holds before writing them even without a commit:
/// a bound on the memory of one huge transaction (a batch of 20,000 submits writes
/// about 12 MiB of log), far more than any ordinary commit.
const MAX_BUFFERED_BYTES: usize = 4 << 20;

/// The most bytes one write to the `unix` file may carry: its `pwrite` takes the length
/// modulo 128 KiB (`seekAndWriteFd` masks it with `0x1ffff`), so a longer buffer goes
/// in pieces of 64 KiB (fifteen frames of a 4 KiB page and a part of the next).
const MAX_WRITE_BYTES: usize = 64 << 10;

/// SQLite's WAL frame header: page number, database size after a commit (zero on every
/// frame but a commit's last), salts and checksums.
const FRAME_HEADER_BYTES: usize = 24;

/// A `sqlite3_file_control` operation of this VFS's database files: writes the
/// connection's [`LogWrites`] into the `LogWrites` its argument points to. Outside the
/// range SQLite uses for its own operations.
pub(super) const FCNTL_LOG_WRITES: c_int = 0x4b49_4c4e;

/// How a connection's log writes reached the kernel, read with [`FCNTL_LOG_WRITES`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub(super) struct LogWrites {
    /// Writes SQLite asked of the log.
    pub(super) asked: u64,
    /// Writes that reached the kernel.
    pub(super) made: u64,
    /// Bytes held at the moment of asking: none between transactions.
    pub(super) buffered: u64,
}

/// Registers the VFS once per process; every later call returns the first outcome.
pub(super) fn register() -> Result<(), String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            // SAFETY: sqlite3_vfs_find only reads SQLite's list of VFSs (it initialises
            // SQLite first if need be); a null name asks for the default.
            let unix = unsafe { ffi::sqlite3_vfs_find(std::ptr::null()) };
            if unix.is_null() {
                return Err("SQLite has no default VFS to wrap".into());
            }
            // SAFETY: `unix` is a registered VFS, which SQLite never frees.
            let mut vfs = unsafe { *unix };
            let inner_size = usize::try_from(vfs.szOsFile).map_err(|e| e.to_string())?;
            vfs.szOsFile = c_int::try_from(INNER_OFFSET + inner_size).map_err(|e| e.to_string())?;
            vfs.zName = NAME.as_ptr();
            vfs.pNext = std::ptr::null_mut();
            vfs.xOpen = Some(open);
            // Every other method of `unix` ignores which VFS it is called through, or
            // reads only what this copy keeps (its path length and lock style).
            let shim = Box::leak(Box::new(Shim { vfs, unix }));
            // SAFETY: the VFS lives for the rest of the process (leaked above), and
            // `pAppData` leads back to it from the `sqlite3_vfs` SQLite passes to open.
            shim.vfs.pAppData = (shim as *mut Shim).cast();
            let rc = unsafe { ffi::sqlite3_vfs_register(&mut shim.vfs, 0) };
            match rc {
                ffi::SQLITE_OK => Ok(()),
                rc => Err(format!("SQLite refused the VFS {NAME:?}: error {rc}")),
            }
        })
        .clone()
}

/// The registered VFS: a copy of `unix` whose files are [`File`]s, and `unix` itself.
#[repr(C)]
struct Shim {
    vfs: ffi::sqlite3_vfs,
    unix: *mut ffi::sqlite3_vfs,
}

/// What this VFS's file is to SQLite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A connection's database file: its shared-memory barrier flushes the log.
    Main,
    /// A connection's write-ahead log: its writes are buffered.
    Wal,
    /// Anything else (temporary files, journals): passed through.
    Other,
}

/// One open file: SQLite's base struct first, then the `unix` file it wraps, which
/// lives in the same allocation at [`INNER_OFFSET`].
#[repr(C)]
struct File {
    base: ffi::sqlite3_file,
    inner: *mut ffi::sqlite3_file,
    kind: Kind,
    /// The database name SQLite opened the connection's files with: its address is the
    /// same for a connection's database and log (`sqlite3_filename_database`), which is
    /// how the two find each other in [`CONNECTIONS`].
    key: usize,
    /// The log's buffer (a `Box` of its own; null for other files).
    log: *mut Log,
    /// The database file's log, once SQLite has opened it (null otherwise).
    wal: *mut File,
}

/// Where the `unix` file starts in a [`File`]'s allocation.
const INNER_OFFSET: usize = std::mem::size_of::<File>().next_multiple_of(16);

/// The bytes of the log not yet written: one run starting at `start`.
#[derive(Default)]
struct Log {
    start: i64,
    bytes: Vec<u8>,
    /// Where the page of a commit frame whose header was just written will go: that
    /// write ends the commit and is flushed at once.
    commit_page_at: Option<i64>,
    counts: LogWrites,
}

impl Log {
    fn end(&self) -> i64 {
        self.start + self.bytes.len() as i64
    }
}

/// A connection's database files by [`File::key`]: addresses only, read and written
/// under the lock when a database or log file opens or closes.
static CONNECTIONS: Mutex<Option<HashMap<usize, usize>>> = Mutex::new(None);

fn connections<T>(f: impl FnOnce(&mut HashMap<usize, usize>) -> T) -> T {
    let mut guard = CONNECTIONS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    f(guard.get_or_insert_with(HashMap::new))
}

/// The method table of every [`File`] that opened.
static METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(close),
    xRead: Some(read),
    xWrite: Some(write),
    xTruncate: Some(truncate),
    xSync: Some(sync),
    xFileSize: Some(file_size),
    xLock: Some(lock),
    xUnlock: Some(unlock),
    xCheckReservedLock: Some(check_reserved_lock),
    xFileControl: Some(file_control),
    xSectorSize: Some(sector_size),
    xDeviceCharacteristics: Some(device_characteristics),
    xShmMap: Some(shm_map),
    xShmLock: Some(shm_lock),
    xShmBarrier: Some(shm_barrier),
    xShmUnmap: Some(shm_unmap),
    xFetch: Some(fetch),
    xUnfetch: Some(unfetch),
};

/// The `unix` file's method table.
///
/// # Safety
/// `f` is an open [`File`].
unsafe fn inner(
    f: *mut ffi::sqlite3_file,
) -> (*mut ffi::sqlite3_file, &'static ffi::sqlite3_io_methods) {
    // SAFETY: an open File's inner file is open, and its method table is static in SQLite.
    unsafe {
        let inner = (*f.cast::<File>()).inner;
        (inner, &*(*inner).pMethods)
    }
}

/// Calls the `unix` file's method `$m` with the arguments given after the file, or
/// answers `$missing` when the `unix` file has no such method. Used inside `unsafe`:
/// the file is open (SQLite calls methods only on those) and the arguments are SQLite's
/// own, passed through unchanged under the method's contract.
macro_rules! delegate {
    ($f:expr, $m:ident, $missing:expr $(, $arg:expr)*) => {{
        let (inner, methods) = inner($f);
        match methods.$m {
            Some(m) => m(inner $(, $arg)*),
            None => $missing,
        }
    }};
}

/// Runs `$flush` on the file (writing what a log holds), answers its error if it
/// fails, and delegates like [`delegate!`] otherwise. Used inside `unsafe`, as it is.
macro_rules! flushed_then {
    ($flush:ident, $f:expr, $m:ident, $missing:expr $(, $arg:expr)*) => {{
        let rc = $flush($f);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        delegate!($f, $m, $missing $(, $arg)*)
    }};
}

unsafe extern "C" fn open(
    vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    // SAFETY: SQLite gives open a VFS of ours and `szOsFile` bytes at `file`.
    unsafe {
        let shim = (*vfs).pAppData.cast::<Shim>();
        let unix = (*shim).unix;
        let f = file.cast::<File>();
        let inner = file
            .cast::<u8>()
            .add(INNER_OFFSET)
            .cast::<ffi::sqlite3_file>();
        // SQLite calls close only on a file whose method table is set.
        (*f).base.pMethods = std::ptr::null();
        (*inner).pMethods = std::ptr::null();
        let Some(unix_open) = (*unix).xOpen else {
            return ffi::SQLITE_CANTOPEN;
        };
        let rc = unix_open(unix, name, inner, flags, out_flags);
        if rc != ffi::SQLITE_OK {
            if let Some(close) = (*inner).pMethods.as_ref().and_then(|m| m.xClose) {
                close(inner);
            }
            return rc;
        }
        let kind = if flags & ffi::SQLITE_OPEN_WAL != 0 && !name.is_null() {
            Kind::Wal
        } else if flags & ffi::SQLITE_OPEN_MAIN_DB != 0 && !name.is_null() {
            Kind::Main
        } else {
            Kind::Other
        };
        let key = match kind {
            Kind::Wal => ffi::sqlite3_filename_database(name) as usize,
            Kind::Main => name as usize,
            Kind::Other => 0,
        };
        let log = match kind {
            Kind::Wal => Box::into_raw(Box::new(Log::default())),
            _ => std::ptr::null_mut(),
        };
        f.write(File {
            base: ffi::sqlite3_file { pMethods: &METHODS },
            inner,
            kind,
            key,
            log,
            wal: std::ptr::null_mut(),
        });
        match kind {
            Kind::Main => connections(|c| c.insert(key, f as usize)),
            Kind::Wal => connections(|c| {
                if let Some(&main) = c.get(&key) {
                    (*(main as *mut File)).wal = f;
                }
                None
            }),
            Kind::Other => None,
        };
        ffi::SQLITE_OK
    }
}

/// Writes what the log holds to the `unix` file in one call.
///
/// # Safety
/// `f` is an open log [`File`].
unsafe fn flush(f: *mut File) -> c_int {
    // SAFETY: a log File owns its Log and its open inner file.
    unsafe {
        let log = &mut *(*f).log;
        if log.bytes.is_empty() {
            return ffi::SQLITE_OK;
        }
        let mut rc = ffi::SQLITE_OK;
        let mut offset = log.start;
        for chunk in log.bytes.chunks(MAX_WRITE_BYTES) {
            // At most MAX_WRITE_BYTES, so the length fits.
            let amount = chunk.len() as c_int;
            rc = delegate!(
                f.cast(),
                xWrite,
                ffi::SQLITE_IOERR_WRITE,
                chunk.as_ptr().cast(),
                amount,
                offset
            );
            log.counts.made += 1;
            if rc != ffi::SQLITE_OK {
                break;
            }
            offset += i64::from(amount);
        }
        // Written or not, the bytes are SQLite's to write again: after a failed write it
        // rolls the transaction back and rewrites those frames if it retries.
        log.bytes.clear();
        rc
    }
}

/// Flushes the log of a log file (and nothing for other files).
///
/// # Safety
/// `f` is an open [`File`].
unsafe fn flush_if_log(f: *mut ffi::sqlite3_file) -> c_int {
    let f = f.cast::<File>();
    // SAFETY: the caller's File is open.
    unsafe {
        match (*f).kind {
            Kind::Wal => flush(f),
            _ => ffi::SQLITE_OK,
        }
    }
}

/// Flushes the log of the connection whose database file `f` is.
///
/// # Safety
/// `f` is an open [`File`].
unsafe fn flush_connection(f: *mut ffi::sqlite3_file) -> c_int {
    let f = f.cast::<File>();
    // SAFETY: a database File's log pointer is either null or its open log (cleared
    // when the log closes); both belong to one connection, used by one thread at a time.
    unsafe {
        match (*f).kind {
            Kind::Main if !(*f).wal.is_null() => flush((*f).wal),
            _ => ffi::SQLITE_OK,
        }
    }
}

unsafe extern "C" fn close(f: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite closes an open File once.
    unsafe {
        let file = f.cast::<File>();
        let flushed = flush_if_log(f);
        let key = (*file).key;
        match (*file).kind {
            Kind::Main => connections(|c| {
                if c.get(&key) == Some(&(file as usize)) {
                    c.remove(&key);
                }
            }),
            Kind::Wal => connections(|c| {
                if let Some(&main) = c.get(&key) {
                    let main = main as *mut File;
                    if (*main).wal == file {
                        (*main).wal = std::ptr::null_mut();
                    }
                }
            }),
            Kind::Other => {}
        }
        let closed = delegate!(f, xClose, ffi::SQLITE_OK);
        if !(*file).log.is_null() {
            drop(Box::from_raw((*file).log));
            (*file).log = std::ptr::null_mut();
        }
        (*file).base.pMethods = std::ptr::null();
        if flushed != ffi::SQLITE_OK {
            flushed
        } else {
            closed
        }
    }
}

unsafe extern "C" fn read(
    f: *mut ffi::sqlite3_file,
    buf: *mut c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    // SAFETY: SQLite's contract for xRead.
    unsafe {
        flushed_then!(
            flush_if_log,
            f,
            xRead,
            ffi::SQLITE_IOERR_READ,
            buf,
            amount,
            offset
        )
    }
}

unsafe extern "C" fn write(
    f: *mut ffi::sqlite3_file,
    buf: *const c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    // SAFETY: SQLite's contract for xWrite: `amount` readable bytes at `buf`.
    unsafe {
        let file = f.cast::<File>();
        if (*file).kind != Kind::Wal {
            return delegate!(f, xWrite, ffi::SQLITE_IOERR_WRITE, buf, amount, offset);
        }
        let Ok(len) = usize::try_from(amount) else {
            return ffi::SQLITE_IOERR_WRITE;
        };
        let data = std::slice::from_raw_parts(buf.cast::<u8>(), len);
        let log = &mut *(*file).log;
        log.counts.asked += 1;
        let through = |f: *mut ffi::sqlite3_file| -> c_int {
            let rc = flush(f.cast());
            if rc != ffi::SQLITE_OK {
                return rc;
            }
            (*(*f.cast::<File>()).log).counts.made += 1;
            delegate!(f, xWrite, ffi::SQLITE_IOERR_WRITE, buf, amount, offset)
        };
        let appends = !log.bytes.is_empty() && offset == log.end();
        if len == FRAME_HEADER_BYTES && data[4..8] != [0; 4] {
            // A commit frame's header: its page follows and ends the commit. Alone (the
            // whole commit is one page, or SQLite is rewriting a header in place), it
            // goes through at once, and so will its page.
            log.commit_page_at = Some(offset + FRAME_HEADER_BYTES as i64);
            if appends {
                log.bytes.extend_from_slice(data);
                return ffi::SQLITE_OK;
            }
            return through(f);
        }
        if let Some(page_at) = log.commit_page_at.take() {
            if page_at == offset {
                if appends {
                    log.bytes.extend_from_slice(data);
                    return flush(file);
                }
                return through(f);
            }
            // A commit header with no page after it: write it before anything else.
            let rc = flush(file);
            if rc != ffi::SQLITE_OK {
                return rc;
            }
        }
        let log = &mut *(*file).log;
        if !log.bytes.is_empty() && offset != log.end() {
            let rc = flush(file);
            if rc != ffi::SQLITE_OK {
                return rc;
            }
        }
        let log = &mut *(*file).log;
        if log.bytes.is_empty() {
            log.start = offset;
        }
        log.bytes.extend_from_slice(data);
        if log.bytes.len() >= MAX_BUFFERED_BYTES {
            return flush(file);
        }
        ffi::SQLITE_OK
    }
}

unsafe extern "C" fn truncate(f: *mut ffi::sqlite3_file, size: i64) -> c_int {
    // SAFETY: SQLite's contract for xTruncate.
    unsafe { flushed_then!(flush_if_log, f, xTruncate, ffi::SQLITE_IOERR_TRUNCATE, size) }
}

unsafe extern "C" fn sync(f: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    // SAFETY: SQLite's contract for xSync.
    unsafe { flushed_then!(flush_if_log, f, xSync, ffi::SQLITE_IOERR_FSYNC, flags) }
}

unsafe extern "C" fn file_size(f: *mut ffi::sqlite3_file, size: *mut i64) -> c_int {
    // SAFETY: SQLite's contract for xFileSize.
    unsafe { flushed_then!(flush_if_log, f, xFileSize, ffi::SQLITE_IOERR_FSTAT, size) }
}

unsafe extern "C" fn lock(f: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    // SAFETY: passed through under SQLite's contract for the method.
    unsafe { delegate!(f, xLock, ffi::SQLITE_IOERR_LOCK, level) }
}

unsafe extern "C" fn unlock(f: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    // SAFETY: passed through under SQLite's contract for the method.
    unsafe { delegate!(f, xUnlock, ffi::SQLITE_IOERR_UNLOCK, level) }
}

unsafe extern "C" fn check_reserved_lock(f: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    // SAFETY: passed through under SQLite's contract for the method.
    unsafe {
        delegate!(
            f,
            xCheckReservedLock,
            ffi::SQLITE_IOERR_CHECKRESERVEDLOCK,
            out
        )
    }
}

unsafe extern "C" fn file_control(f: *mut ffi::sqlite3_file, op: c_int, arg: *mut c_void) -> c_int {
    // SAFETY: SQLite's contract for xFileControl; for FCNTL_LOG_WRITES the caller
    // passes a LogWrites to fill.
    unsafe {
        let file = f.cast::<File>();
        if op == FCNTL_LOG_WRITES {
            if (*file).kind != Kind::Main || arg.is_null() {
                return ffi::SQLITE_NOTFOUND;
            }
            let wal = (*file).wal;
            let counts = match wal.is_null() {
                true => LogWrites::default(),
                false => {
                    let log = &*(*wal).log;
                    LogWrites {
                        buffered: log.bytes.len() as u64,
                        ..log.counts
                    }
                }
            };
            arg.cast::<LogWrites>().write(counts);
            return ffi::SQLITE_OK;
        }
        flushed_then!(flush_if_log, f, xFileControl, ffi::SQLITE_NOTFOUND, op, arg)
    }
}

unsafe extern "C" fn sector_size(f: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: passed through under SQLite's contract for the method.
    unsafe { delegate!(f, xSectorSize, 4096) }
}

unsafe extern "C" fn device_characteristics(f: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: passed through under SQLite's contract for the method.
    unsafe { delegate!(f, xDeviceCharacteristics, 0) }
}

unsafe extern "C" fn shm_map(
    f: *mut ffi::sqlite3_file,
    page: c_int,
    size: c_int,
    extend: c_int,
    out: *mut *mut c_void,
) -> c_int {
    // SAFETY: passed through under SQLite's contract for the method.
    unsafe {
        delegate!(
            f,
            xShmMap,
            ffi::SQLITE_IOERR_SHMMAP,
            page,
            size,
            extend,
            out
        )
    }
}

unsafe extern "C" fn shm_lock(
    f: *mut ffi::sqlite3_file,
    offset: c_int,
    n: c_int,
    flags: c_int,
) -> c_int {
    // SAFETY: SQLite's contract for xShmLock.
    unsafe {
        // Nothing should be buffered once a lock goes; should it be, it goes first.
        if flags & ffi::SQLITE_SHM_UNLOCK != 0 {
            let rc = flush_connection(f);
            if rc != ffi::SQLITE_OK {
                return rc;
            }
        }
        delegate!(f, xShmLock, ffi::SQLITE_IOERR_SHMLOCK, offset, n, flags)
    }
}

unsafe extern "C" fn shm_barrier(f: *mut ffi::sqlite3_file) {
    // SAFETY: SQLite's contract for xShmBarrier.
    unsafe {
        // The writer is about to publish a header that may point at buffered frames.
        // The commit's own write flushed them already; should anything remain and fail
        // to reach the kernel, publishing would point readers at frames that are not
        // there, and this call cannot report an error. Dying instead loses only the
        // commit nobody was answered for: recovery rebuilds the index from the log.
        let rc = flush_connection(f);
        if rc != ffi::SQLITE_OK {
            tracing::error!(
                code = rc,
                "the SQLite write-ahead log could not be written before a commit was published; stopping"
            );
            std::process::abort();
        }
        delegate!(f, xShmBarrier, ())
    }
}

unsafe extern "C" fn shm_unmap(f: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    // SAFETY: SQLite's contract for xShmUnmap.
    unsafe { flushed_then!(flush_connection, f, xShmUnmap, ffi::SQLITE_OK, delete) }
}

unsafe extern "C" fn fetch(
    f: *mut ffi::sqlite3_file,
    offset: i64,
    amount: c_int,
    out: *mut *mut c_void,
) -> c_int {
    // SAFETY: SQLite's contract for xFetch; without it, SQLite reads instead.
    unsafe {
        let (_, methods) = inner(f);
        if methods.iVersion < 3 {
            *out = std::ptr::null_mut();
            return ffi::SQLITE_OK;
        }
        delegate!(f, xFetch, ffi::SQLITE_OK, offset, amount, out)
    }
}

unsafe extern "C" fn unfetch(f: *mut ffi::sqlite3_file, offset: i64, page: *mut c_void) -> c_int {
    // SAFETY: SQLite's contract for xUnfetch.
    unsafe {
        let (_, methods) = inner(f);
        if methods.iVersion < 3 {
            return ffi::SQLITE_OK;
        }
        delegate!(f, xUnfetch, ffi::SQLITE_OK, offset, page)
    }
}

/// How the log writes of `conn` (a connection of this VFS) reached the kernel so far;
/// `None` for a connection of another VFS.
pub(super) fn log_writes(conn: &rusqlite::Connection) -> Option<LogWrites> {
    let mut counts = LogWrites::default();
    // SAFETY: the handle is live for the borrow; FCNTL_LOG_WRITES writes one LogWrites
    // through the pointer, and other VFSs answer SQLITE_NOTFOUND without touching it.
    let rc = unsafe {
        ffi::sqlite3_file_control(
            conn.handle(),
            c"main".as_ptr(),
            FCNTL_LOG_WRITES,
            (&mut counts as *mut LogWrites).cast(),
        )
    };
    (rc == ffi::SQLITE_OK).then_some(counts)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use rusqlite::{Connection, OpenFlags, params};

    use super::*;

    fn writer(path: &std::path::Path, synchronous: &str, cache_pages: u32) -> Connection {
        register().expect("the VFS registers");
        let conn = Connection::open_with_flags_and_vfs(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
            NAME,
        )
        .expect("the writer opens");
        conn.execute_batch(&format!(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = {synchronous};
             PRAGMA cache_size = {cache_pages}; PRAGMA wal_autocheckpoint = 0;
             CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, v BLOB NOT NULL);
             CREATE INDEX IF NOT EXISTS t_v ON t (length(v), k);"
        ))
        .expect("the writer sets up");
        conn
    }

    fn plain(path: &std::path::Path) -> Connection {
        let conn = Connection::open(path).expect("a plain connection opens");
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .expect("busy timeout");
        conn
    }

    fn contents(conn: &Connection) -> BTreeMap<i64, Vec<u8>> {
        let mut statement = conn
            .prepare_cached("SELECT k, v FROM t ORDER BY k")
            .expect("prepare");
        statement
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("query")
            .collect::<rusqlite::Result<_>>()
            .expect("rows")
    }

    /// Inserts `rows` rows of 1,500 bytes in one transaction and answers how many
    /// writes SQLite asked of the log and how many reached the kernel.
    fn commit_rows(conn: &Connection, first: i64, rows: i64) -> (u64, u64) {
        let before = log_writes(conn).expect("a connection of the VFS counts");
        let tx = conn.unchecked_transaction().expect("begin");
        for k in first..first + rows {
            tx.execute(
                "INSERT INTO t (k, v) VALUES (?1, ?2)",
                params![k, vec![7u8; 1500]],
            )
            .expect("insert");
        }
        tx.commit().expect("commit");
        let after = log_writes(conn).expect("counts");
        (after.asked - before.asked, after.made - before.made)
    }

    #[test]
    fn a_commit_of_many_pages_reaches_the_log_in_one_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("one.db");
        let conn = writer(&path, "NORMAL", 2000);
        // About eight pages: a header and a page each, one write.
        let (asked, made) = commit_rows(&conn, 0, 16);
        assert!(asked >= 8, "SQLite asked for {asked} writes");
        assert_eq!(made, 1, "{asked} writes asked reached the kernel as {made}");
        // About a hundred pages: 64 KiB a write.
        let (asked, made) = commit_rows(&conn, 100, 200);
        assert!(asked >= 150, "SQLite asked for {asked} writes");
        assert!(
            made * 20 <= asked,
            "{asked} writes asked reached the kernel as {made}"
        );
        // A plain connection, through SQLite's own VFS, sees both commits.
        assert_eq!(contents(&plain(&path)).len(), 216);
    }

    #[test]
    fn a_connection_of_another_vfs_has_no_log_counts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let conn = plain(&dir.path().join("plain.db"));
        conn.execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE x (a)")
            .expect("set up");
        assert_eq!(log_writes(&conn), None);
    }

    /// Random transactions (large and small, committed and rolled back, with
    /// savepoints, spilling a tiny page cache), checkpoints of every kind from another
    /// connection and reopened writers: after every commit a connection of SQLite's own
    /// VFS reads exactly what was committed, and the file checks out at the end.
    #[test]
    fn every_commit_is_what_other_connections_read_whatever_the_writes() {
        let seed = std::env::var("KILN_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| fastrand::u64(..));
        println!("seed: {seed} (KILN_SEED={seed} repeats this run)");
        // FULL syncs the log at every commit, which flushes it too: NORMAL is the mode
        // where only the commit's own write and the barrier stand between the writer's
        // buffer and a reader.
        for synchronous in ["NORMAL", "FULL"] {
            random_transactions(seed, synchronous);
        }
    }

    fn random_transactions(seed: u64, synchronous: &str) {
        let mut rng = fastrand::Rng::with_seed(seed);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("random.db");
        let mut conn = writer(&path, synchronous, 16);
        let reader = plain(&path);
        let checkpointer = plain(&path);
        let mut model: BTreeMap<i64, Vec<u8>> = BTreeMap::new();
        for step in 0..300 {
            match rng.u32(..20) {
                0 => {
                    let mode = ["PASSIVE", "FULL", "RESTART", "TRUNCATE"][rng.usize(..4)];
                    // A checkpoint that cannot finish (a reader in the way) is no error.
                    let _ = checkpointer.query_row(
                        &format!("PRAGMA wal_checkpoint({mode})"),
                        [],
                        |_| Ok(()),
                    );
                }
                1 => {
                    drop(conn);
                    conn = writer(&path, synchronous, 16);
                }
                _ => {
                    let mut next = model.clone();
                    let tx = conn.unchecked_transaction().expect("begin");
                    let rows = if rng.u32(..10) == 0 {
                        rng.usize(100..600)
                    } else {
                        rng.usize(1..8)
                    };
                    let savepoint_at = rng.usize(..rows + 1);
                    let mut saved: Option<BTreeMap<i64, Vec<u8>>> = None;
                    for i in 0..rows {
                        if i == savepoint_at {
                            tx.execute_batch("SAVEPOINT s").expect("savepoint");
                            saved = Some(next.clone());
                        }
                        let k = rng.i64(0..2_000);
                        if rng.u32(..4) == 0 {
                            tx.execute("DELETE FROM t WHERE k = ?1", [k])
                                .expect("delete");
                            next.remove(&k);
                        } else {
                            let len = if rng.u32(..8) == 0 {
                                rng.usize(4_000..20_000)
                            } else {
                                rng.usize(0..300)
                            };
                            let mut v = vec![0u8; len];
                            rng.fill(&mut v);
                            tx.execute(
                                "INSERT INTO t (k, v) VALUES (?1, ?2)
                                 ON CONFLICT (k) DO UPDATE SET v = excluded.v",
                                params![k, v],
                            )
                            .expect("upsert");
                            next.insert(k, v);
                        }
                    }
                    if let Some(before) = saved {
                        if rng.bool() {
                            tx.execute_batch("ROLLBACK TO s").expect("rollback to");
                            next = before;
                        }
                        tx.execute_batch("RELEASE s").expect("release");
                    }
                    if rng.u32(..8) == 0 {
                        tx.rollback().expect("rollback");
                    } else {
                        tx.commit().expect("commit");
                        model = next;
                    }
                    let held = log_writes(&conn).expect("counts").buffered;
                    assert_eq!(
                        held, 0,
                        "{synchronous}, step {step} (seed {seed}): bytes held after the transaction"
                    );
                    assert_eq!(
                        contents(&reader),
                        model,
                        "{synchronous}, step {step} (seed {seed}): another connection reads what was committed"
                    );
                }
            }
        }
        drop((conn, reader, checkpointer));
        let check = plain(&path);
        let ok: String = check
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .expect("integrity check");
        assert_eq!(ok, "ok", "seed {seed}");
        assert_eq!(
            contents(&check),
            model,
            "seed {seed}: the file after reopening"
        );
    }
}
