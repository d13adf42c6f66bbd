//! What the server says about a connection's session, read off the wire as it goes by.
//!
//! tokio-postgres does not expose a connection's transaction status, but the server states it
//! after every query: the `ReadyForQuery` message carries `I` (idle), `T` (in a transaction) or
//! `E` (in a failed transaction), and a `ParameterStatus` message reports a changed session
//! setting. [`BackendScanner`] follows the message framing of the bytes the TLS stream reads
//! (headers only: bodies are skipped by length, so the cost is per message, not per byte) and
//! publishes both facts in a [`SessionWatch`] the pool reads at checkout, at no I/O cost.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

/// A connection's session state as last reported by the server. (`pub` only to appear in the
/// sealed [`PoolClient`](crate::pool::PoolClient)'s methods; the module is private.)
#[derive(Debug, Default)]
pub struct SessionWatch {
    /// The last `ReadyForQuery` status byte; 0 before the first.
    status: AtomicU8,
    /// A `ParameterStatus` arrived after the first `ReadyForQuery`: a reported setting
    /// (`TimeZone`, `DateStyle`, `application_name`, …) was changed with `SET`.
    settings_changed: AtomicBool,
    /// An `ErrorResponse` of severity `FATAL` or `PANIC` arrived: the server is ending the
    /// session, whatever the statement it answered (a `COMMIT` so answered has an unknown
    /// outcome).
    fatal: AtomicBool,
    /// The connection's task has ended (the socket is gone): what `Client::is_closed` says,
    /// for clients that do not expose it.
    closed: AtomicBool,
    /// A nested transaction (a savepoint) was begun through Diesel's transaction manager.
    #[cfg_attr(not(feature = "diesel-async"), allow(dead_code))]
    nested: AtomicBool,
}

/// The transaction status the server last reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TransactionStatus {
    /// Not yet ready (startup), or a status byte this crate does not know.
    Unknown,
    /// Outside any transaction block.
    Idle,
    /// Inside a transaction block.
    InTransaction,
    /// Inside a failed transaction block (every statement fails until `ROLLBACK`).
    Failed,
}

impl SessionWatch {
    /// The transaction status after the last complete query.
    pub(crate) fn status(&self) -> TransactionStatus {
        match self.status.load(Ordering::Acquire) {
            b'I' => TransactionStatus::Idle,
            b'T' => TransactionStatus::InTransaction,
            b'E' => TransactionStatus::Failed,
            _ => TransactionStatus::Unknown,
        }
    }

    /// Whether a reported setting changed since the connection was opened (or last reset).
    pub(crate) fn settings_changed(&self) -> bool {
        self.settings_changed.load(Ordering::Acquire)
    }

    /// Records that the settings were reset (`RESET ALL`).
    pub(crate) fn settings_reset(&self) {
        self.settings_changed.store(false, Ordering::Release);
    }

    /// Whether the server sent a `FATAL` (or `PANIC`) error on this connection.
    pub(crate) fn fatal_seen(&self) -> bool {
        self.fatal.load(Ordering::Acquire)
    }

    /// Whether the connection's task has ended.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Records that the connection's task has ended.
    pub(crate) fn set_closed(&self) {
        self.closed.store(true, Ordering::Release);
    }

    /// Records that a nested transaction was begun.
    #[cfg(feature = "diesel-async")]
    pub(crate) fn note_nested(&self) {
        self.nested.store(true, Ordering::Release);
    }

    /// Whether a nested transaction was begun since the last call.
    #[cfg(feature = "diesel-async")]
    pub(crate) fn take_nested(&self) -> bool {
        self.nested.swap(false, Ordering::AcqRel)
    }
}

/// How many bytes of an `ErrorResponse` body the scanner keeps to read its severity: the
/// `S` field comes first (`SFATAL\0`), the non-localised `V` field second.
const ERROR_HEAD: usize = 32;

/// Where the scanner is in the message stream.
#[derive(Debug, Clone, Copy)]
enum Position {
    /// Reading a 5-byte header (tag and length); `have` bytes so far.
    Header { have: usize },
    /// Skipping a body; `left` bytes to go, `first` whether none was seen yet.
    Body { left: usize, first: bool },
}

/// Follows the framing of backend messages and updates a [`SessionWatch`].
#[derive(Debug)]
pub(crate) struct BackendScanner {
    watch: std::sync::Arc<SessionWatch>,
    header: [u8; 5],
    position: Position,
    ready_seen: bool,
    /// The first bytes of the `ErrorResponse` body being read.
    error_head: [u8; ERROR_HEAD],
    error_have: usize,
}

impl BackendScanner {
    pub(crate) fn new(watch: std::sync::Arc<SessionWatch>) -> Self {
        BackendScanner {
            watch,
            header: [0; 5],
            position: Position::Header { have: 0 },
            ready_seen: false,
            error_head: [0; ERROR_HEAD],
            error_have: 0,
        }
    }

    /// Feeds the next bytes read from the server.
    pub(crate) fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match self.position {
                Position::Header { have } => {
                    let take = (5 - have).min(data.len());
                    self.header[have..have + take].copy_from_slice(&data[..take]);
                    data = &data[take..];
                    if have + take < 5 {
                        self.position = Position::Header { have: have + take };
                        continue;
                    }
                    let len = u32::from_be_bytes([
                        self.header[1],
                        self.header[2],
                        self.header[3],
                        self.header[4],
                    ]);
                    let left = (len as usize).saturating_sub(4);
                    if left == 0 {
                        self.message_end();
                    } else {
                        self.position = Position::Body { left, first: true };
                    }
                }
                Position::Body { left, first } => {
                    if first && self.header[0] == b'Z' {
                        self.watch.status.store(data[0], Ordering::Release);
                    }
                    let take = left.min(data.len());
                    if self.header[0] == b'E' && self.error_have < ERROR_HEAD {
                        let keep = take.min(ERROR_HEAD - self.error_have);
                        self.error_head[self.error_have..self.error_have + keep]
                            .copy_from_slice(&data[..keep]);
                        self.error_have += keep;
                    }
                    data = &data[take..];
                    if take == left {
                        self.message_end();
                    } else {
                        self.position = Position::Body {
                            left: left - take,
                            first: false,
                        };
                    }
                }
            }
        }
    }

    fn message_end(&mut self) {
        match self.header[0] {
            b'Z' => self.ready_seen = true,
            b'S' if self.ready_seen => self.watch.settings_changed.store(true, Ordering::Release),
            b'E' if fatal(&self.error_head[..self.error_have]) => {
                self.watch.fatal.store(true, Ordering::Release)
            }
            _ => {}
        }
        self.error_have = 0;
        self.position = Position::Header { have: 0 };
    }
}

/// Whether the start of an `ErrorResponse` body has a severity (`S`, or the non-localised
/// `V`) of `FATAL` or `PANIC`. Fields are a type byte and a NUL-terminated string.
fn fatal(mut head: &[u8]) -> bool {
    while let Some((&kind, rest)) = head.split_first() {
        let Some(end) = rest.iter().position(|b| *b == 0) else {
            return false;
        };
        if matches!(kind, b'S' | b'V') && matches!(&rest[..end], b"FATAL" | b"PANIC") {
            return true;
        }
        head = &rest[end + 1..];
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn stream(parts: &[(u8, &[u8])]) -> Vec<u8> {
        parts.iter().flat_map(|(t, b)| message(*t, b)).collect()
    }

    #[test]
    fn follows_ready_for_query_across_any_split() {
        let bytes = stream(&[
            (b'R', &[0, 0, 0, 0]),
            (b'S', b"TimeZone\0UTC\0"),
            (b'K', &[0; 8]),
            (b'Z', b"I"),
            (b'C', b"BEGIN\0"),
            (b'Z', b"T"),
            (b'T', &[0, 0]),
            (b'D', &[0, 1, 0, 0, 0, 1, b'x']),
            (b'C', b"SELECT 1\0"),
            (b'Z', b"T"),
            (b'E', b"SERROR\0C42P01\0Mnope\0\0"),
            (b'Z', b"E"),
        ]);
        // Every way of cutting the stream in two, and byte by byte, gives the same result.
        for cut in 0..=bytes.len() {
            let watch = Arc::new(SessionWatch::default());
            let mut scanner = BackendScanner::new(watch.clone());
            scanner.feed(&bytes[..cut]);
            scanner.feed(&bytes[cut..]);
            assert_eq!(watch.status(), TransactionStatus::Failed, "cut at {cut}");
            assert!(
                !watch.settings_changed(),
                "startup parameters are not changes"
            );
        }
        let watch = Arc::new(SessionWatch::default());
        let mut scanner = BackendScanner::new(watch.clone());
        let mut seen = Vec::new();
        for byte in &bytes {
            scanner.feed(std::slice::from_ref(byte));
            seen.push(watch.status());
        }
        assert_eq!(seen.last(), Some(&TransactionStatus::Failed));
        assert!(seen.contains(&TransactionStatus::InTransaction));
        assert_eq!(seen[0], TransactionStatus::Unknown);
    }

    #[test]
    fn a_parameter_change_after_startup_is_noticed_and_can_be_reset() {
        let watch = Arc::new(SessionWatch::default());
        let mut scanner = BackendScanner::new(watch.clone());
        scanner.feed(&stream(&[(b'S', b"DateStyle\0ISO\0"), (b'Z', b"I")]));
        assert!(!watch.settings_changed());
        scanner.feed(&stream(&[
            (b'S', b"TimeZone\0Europe/Paris\0"),
            (b'C', b"SET\0"),
            (b'Z', b"I"),
        ]));
        assert!(watch.settings_changed());
        assert_eq!(watch.status(), TransactionStatus::Idle);
        watch.settings_reset();
        assert!(!watch.settings_changed());
    }

    #[test]
    fn a_fatal_error_is_noticed_across_any_split_and_an_error_is_not() {
        let error = stream(&[
            (
                b'E',
                b"SERROR\0VERROR\0C40001\0Mchange conflicts (OC000)\0\0",
            ),
            (b'Z', b"E"),
        ]);
        let fatal = stream(&[(
            b'E',
            b"SFATAL\0VFATAL\0C57P01\0Mterminating connection due to administrator command\0\0",
        )]);
        // A localised severity with the non-localised `V` field after it.
        let localised = stream(&[(b'E', b"SFATAL_LOCALE\0VPANIC\0CXX000\0Mx\0\0")]);
        for (bytes, expected) in [(&error, false), (&fatal, true), (&localised, true)] {
            let mut all = error.clone();
            all.extend_from_slice(bytes);
            for cut in 0..=all.len() {
                let watch = Arc::new(SessionWatch::default());
                let mut scanner = BackendScanner::new(watch.clone());
                scanner.feed(&all[..cut]);
                scanner.feed(&all[cut..]);
                assert_eq!(watch.fatal_seen(), expected, "cut at {cut}");
            }
        }
        // A data row holding the bytes of a fatal error is not one.
        let watch = Arc::new(SessionWatch::default());
        let mut scanner = BackendScanner::new(watch.clone());
        scanner.feed(&stream(&[(b'D', b"SFATAL\0"), (b'Z', b"I")]));
        assert!(!watch.fatal_seen());
    }

    #[test]
    fn empty_bodies_and_large_bodies_keep_the_framing() {
        let watch = Arc::new(SessionWatch::default());
        let mut scanner = BackendScanner::new(watch.clone());
        let big = vec![b'Z'; 100_000]; // a data row full of 'Z' bytes is not a ReadyForQuery
        scanner.feed(&stream(&[
            (b'1', b""),
            (b'2', b""),
            (b'D', &big),
            (b'n', b""),
            (b'Z', b"T"),
        ]));
        assert_eq!(watch.status(), TransactionStatus::InTransaction);
    }
}
