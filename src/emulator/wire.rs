//! The few PostgreSQL v3 protocol messages the emulator reads and writes itself. Everything after
//! authentication is relayed byte for byte.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub(crate) const PROTOCOL_3_0: u32 = 196_608;
pub(crate) const SSL_REQUEST: u32 = 80_877_103;
pub(crate) const GSSENC_REQUEST: u32 = 80_877_104;
pub(crate) const CANCEL_REQUEST: u32 = 80_877_102;

/// Startup packets larger than this are refused (PostgreSQL's own limit is 10 000 bytes).
const MAX_STARTUP_LEN: u32 = 10_000;

/// The first packet a client sends: its code and the rest of its body.
pub(crate) struct StartupPacket {
    pub(crate) code: u32,
    pub(crate) body: Vec<u8>,
}

/// Reads one length-prefixed startup-phase packet (no type byte).
pub(crate) async fn read_startup_packet<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> std::io::Result<StartupPacket> {
    let len = stream.read_u32().await?;
    if !(8..=MAX_STARTUP_LEN).contains(&len) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("invalid startup packet length {len}"),
        ));
    }
    let code = stream.read_u32().await?;
    let mut body = vec![0; len as usize - 8];
    stream.read_exact(&mut body).await?;
    Ok(StartupPacket { code, body })
}

/// The `name\0value\0…\0` pairs of a startup message, in order.
pub(crate) fn startup_parameters(body: &[u8]) -> Option<Vec<(String, String)>> {
    let mut fields = body.split(|b| *b == 0);
    let mut out = Vec::new();
    loop {
        let name = fields.next()?;
        if name.is_empty() {
            return Some(out);
        }
        let value = fields.next()?;
        out.push((
            String::from_utf8(name.to_vec()).ok()?,
            String::from_utf8(value.to_vec()).ok()?,
        ));
    }
}

/// A startup message for protocol 3.0 with the given parameters.
pub(crate) fn startup_message(parameters: &[(String, String)]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&PROTOCOL_3_0.to_be_bytes());
    for (name, value) in parameters {
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

/// Reads one typed message (`tag`, body) of at most `max` body bytes.
pub(crate) async fn read_message<S: AsyncRead + Unpin>(
    stream: &mut S,
    max: u32,
) -> std::io::Result<(u8, Vec<u8>)> {
    let tag = stream.read_u8().await?;
    let len = stream.read_u32().await?;
    if len < 4 || len - 4 > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("invalid length {len} for message {:?}", tag as char),
        ));
    }
    let mut body = vec![0; len as usize - 4];
    stream.read_exact(&mut body).await?;
    Ok((tag, body))
}

/// Appends a typed message (`tag`, length, `body`) to `out`.
pub(crate) fn append_message(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
}

/// `AuthenticationCleartextPassword`.
pub(crate) fn cleartext_password_request() -> [u8; 9] {
    [b'R', 0, 0, 0, 8, 0, 0, 0, 3]
}

/// A FATAL `ErrorResponse`, with a HINT field when `hint` is given.
pub(crate) fn fatal(code: &str, message: &str, hint: Option<&str>) -> Vec<u8> {
    let mut body = Vec::new();
    let fields = [
        (b'S', Some("FATAL")),
        (b'V', Some("FATAL")),
        (b'C', Some(code)),
        (b'M', Some(message)),
        (b'H', hint),
    ];
    for (field, value) in fields
        .iter()
        .filter_map(|(field, value)| value.map(|v| (*field, v)))
    {
        body.push(field);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = vec![b'E'];
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Sends a FATAL error and flushes; errors are ignored (the client may be gone already).
pub(crate) async fn send_fatal<S: AsyncWrite + Unpin>(stream: &mut S, code: &str, message: &str) {
    send_fatal_with_hint(stream, code, message, None).await;
}

/// [`send_fatal`] with a HINT field.
pub(crate) async fn send_fatal_with_hint<S: AsyncWrite + Unpin>(
    stream: &mut S,
    code: &str,
    message: &str,
    hint: Option<&str>,
) {
    let _ = stream.write_all(&fatal(code, message, hint)).await;
    let _ = stream.flush().await;
    let _ = stream.shutdown().await;
}

/// The message text of an `ErrorResponse` body.
pub(crate) fn error_message(body: &[u8]) -> String {
    body.split(|b| *b == 0)
        .find_map(|field| field.strip_prefix(b"M"))
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .unwrap_or_default()
}

/// Follows the framing of a stream of PostgreSQL messages after startup, fed in pieces of any
/// size, and hands each whole message on: its header and at most `keep` bytes of its body.
#[derive(Debug)]
pub(crate) struct Framer {
    keep: usize,
    /// The current message: its header (once whole) and the body bytes kept.
    current: Vec<u8>,
    /// Body bytes still to come in the current message, once its header is whole.
    left: usize,
}

impl Framer {
    /// A framer that keeps at most `keep` bytes of each body.
    pub(crate) fn new(keep: usize) -> Self {
        Framer {
            keep,
            current: Vec::new(),
            left: 0,
        }
    }

    /// Feeds the next bytes; `message` gets each message completed in them (header and kept
    /// body, as a buffer it may take: the framer starts the next message in whatever is left).
    pub(crate) fn feed(&mut self, data: &[u8], mut message: impl FnMut(&mut Vec<u8>)) {
        self.feed_ends(data, |current, _| message(current));
    }

    /// [`feed`](Self::feed), telling `message` also where in `data` each message ends.
    pub(crate) fn feed_ends(
        &mut self,
        mut data: &[u8],
        mut message: impl FnMut(&mut Vec<u8>, usize),
    ) {
        let total = data.len();
        while !data.is_empty() {
            if self.current.len() < 5 {
                let take = (5 - self.current.len()).min(data.len());
                self.current.extend_from_slice(&data[..take]);
                data = &data[take..];
                if self.current.len() < 5 {
                    continue;
                }
                let len = [1, 2, 3, 4].map(|i| self.current[i]);
                self.left = (u32::from_be_bytes(len) as usize).saturating_sub(4);
            } else {
                let take = self.left.min(data.len());
                let room = self
                    .keep
                    .saturating_add(5)
                    .saturating_sub(self.current.len())
                    .min(take);
                self.current.extend_from_slice(&data[..room]);
                self.left -= take;
                data = &data[take..];
            }
            if self.left == 0 {
                message(&mut self.current, total - data.len());
                self.current.clear();
            }
        }
    }
}

/// Follows the framing of a client's messages after startup and spots a simple-protocol
/// `COMMIT` (a `Query` message whose text starts with `COMMIT`, any case).
#[derive(Debug)]
pub(crate) struct CommitSpotter(Framer);

impl Default for CommitSpotter {
    fn default() -> Self {
        // Enough of a query for `COMMIT` after a little white space.
        CommitSpotter(Framer::new(7))
    }
}

impl CommitSpotter {
    /// Feeds the next bytes; `true` if a `COMMIT` query was completed in them.
    pub(crate) fn feed(&mut self, data: &[u8]) -> bool {
        let mut spotted = false;
        self.0.feed(data, |message| {
            if message[0] == b'Q' {
                let text: Vec<u8> = message[5..]
                    .iter()
                    .copied()
                    .skip_while(u8::is_ascii_whitespace)
                    .collect();
                spotted |= text.len() >= 6 && text[..6].eq_ignore_ascii_case(b"COMMIT");
            }
        });
        spotted
    }
}

/// Follows the framing of the server's messages and finds the `CommandComplete` of a
/// `COMMIT` (for `fail_next_commit`).
#[derive(Debug)]
pub(crate) struct CommitReplySpotter(Framer);

impl Default for CommitReplySpotter {
    fn default() -> Self {
        CommitReplySpotter(Framer::new(7))
    }
}

impl CommitReplySpotter {
    /// Feeds the next bytes; the offset in `data` where the first `COMMIT` tag completed in
    /// them starts (0 if it started in an earlier piece).
    pub(crate) fn feed(&mut self, data: &[u8]) -> Option<usize> {
        let mut found = None;
        self.0.feed_ends(data, |message, end| {
            if found.is_none() && message[0] == b'C' && message[5..].starts_with(b"COMMIT\0") {
                let len = u32::from_be_bytes([message[1], message[2], message[3], message[4]]);
                found = Some(end.saturating_sub(1 + len as usize));
            }
        });
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_round_trip() {
        let params = vec![
            ("user".to_owned(), "admin".to_owned()),
            ("database".to_owned(), "postgres".to_owned()),
        ];
        let message = startup_message(&params);
        assert_eq!(
            u32::from_be_bytes(message[..4].try_into().unwrap()) as usize,
            message.len()
        );
        assert_eq!(startup_parameters(&message[8..]).unwrap(), params);
        assert_eq!(startup_parameters(b"user\0"), None);
        assert_eq!(startup_parameters(b"\0").unwrap(), vec![]);
    }

    #[test]
    fn fatal_carries_code_and_message() {
        let message = fatal("53300", "nope", None);
        assert_eq!(message[0], b'E');
        assert_eq!(error_message(&message[5..]), "nope");
        assert!(message.windows(6).any(|w| w == b"C53300"));
        assert!(!message.windows(2).any(|w| w == b"\0H"));
        let message = fatal("08006", "denied", Some("why"));
        assert!(message.windows(5).any(|w| w == b"Hwhy\0"));
        assert_eq!(
            u32::from_be_bytes(message[1..5].try_into().unwrap()) as usize,
            message.len() - 1
        );
    }

    #[test]
    fn the_commit_tag_is_found_where_it_starts() {
        let mut bytes = Vec::new();
        append_message(&mut bytes, b'C', b"SELECT 1\0");
        append_message(&mut bytes, b'Z', b"T");
        let start = bytes.len();
        append_message(&mut bytes, b'C', b"COMMIT\0");
        append_message(&mut bytes, b'Z', b"I");
        assert_eq!(CommitReplySpotter::default().feed(&bytes), Some(start));
        for cut in 1..bytes.len() {
            let mut spotter = CommitReplySpotter::default();
            let first = spotter.feed(&bytes[..cut]);
            let second = spotter.feed(&bytes[cut..]);
            match (first, second) {
                (Some(at), None) => assert_eq!(at, start, "cut at {cut}"),
                (None, Some(at)) => assert_eq!(at, start.saturating_sub(cut), "cut at {cut}"),
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
        let mut other = Vec::new();
        append_message(&mut other, b'C', b"COMMITTED\0");
        append_message(&mut other, b'D', b"COMMIT\0");
        assert_eq!(CommitReplySpotter::default().feed(&other), None);
    }

    #[test]
    fn commit_is_spotted_in_any_split_and_nothing_else_is() {
        let mut bytes = Vec::new();
        append_message(&mut bytes, b'Q', b"SELECT 1\0");
        append_message(&mut bytes, b'P', b"\0COMMIT\0\0\0");
        append_message(&mut bytes, b'Q', b"commit\0");
        for cut in 0..=bytes.len() {
            let mut spotter = CommitSpotter::default();
            let spotted = spotter.feed(&bytes[..cut]) | spotter.feed(&bytes[cut..]);
            assert!(spotted, "cut at {cut}");
        }
        let mut spotter = CommitSpotter::default();
        let mut other = Vec::new();
        append_message(&mut other, b'Q', b"SELECT 'COMMIT'\0");
        append_message(&mut other, b'Q', b"COMMENT ON TABLE t IS 'x'\0");
        append_message(&mut other, b'Q', b"COMMIT");
        assert!(!spotter.feed(&other[..other.len() - 1]));
        assert!(spotter.feed(&other[other.len() - 1..]));
    }
}
