//! A raw PostgreSQL frontend for the emulator's protocol tests: TLS to the emulator (direct TLS,
//! SNI, its CA), the startup and the token, then the exact message sequences other drivers send
//! (pgJDBC, libpq, Npgsql, node-postgres), written from their documented behaviour rather than
//! from what tokio-postgres happens to send. Every read has a bound, so a relay that hangs fails
//! the test instead of stalling it.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres_dsql::emulator::DsqlEmulator;

/// How long any answer may take before the test calls it a hang.
pub const ANSWER_BOUND: Duration = Duration::from_secs(20);

/// One backend message: its tag and body.
#[derive(Clone, PartialEq, Eq)]
pub struct Message {
    pub tag: u8,
    pub body: Vec<u8>,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = String::from_utf8_lossy(&self.body).replace('\0', "|");
        write!(f, "{}({text})", self.tag as char)
    }
}

impl Message {
    /// A field of an `ErrorResponse` / `NoticeResponse` (`b'C'`: SQLSTATE, `b'M'`: message).
    pub fn field(&self, name: u8) -> Option<String> {
        self.body
            .split(|b| *b == 0)
            .find_map(|f| f.strip_prefix(&[name]))
            .map(|f| String::from_utf8_lossy(f).into_owned())
    }

    /// The text of a `CommandComplete`.
    pub fn tag_text(&self) -> String {
        String::from_utf8_lossy(self.body.strip_suffix(&[0]).unwrap_or(&self.body)).into_owned()
    }
}

/// What one request (up to its `ReadyForQuery`) was answered.
#[derive(Debug, Clone)]
pub struct Answer {
    pub messages: Vec<Message>,
}

impl Answer {
    /// The command tags, in order.
    pub fn tags(&self) -> Vec<String> {
        self.messages
            .iter()
            .filter(|m| m.tag == b'C')
            .map(Message::tag_text)
            .collect()
    }

    /// The first error's SQLSTATE and message.
    pub fn error(&self) -> Option<(String, String)> {
        self.messages.iter().find(|m| m.tag == b'E').map(|m| {
            (
                m.field(b'C').unwrap_or_default(),
                m.field(b'M').unwrap_or_default(),
            )
        })
    }

    /// The transaction status of the closing `ReadyForQuery` (`I`, `T` or `E`).
    pub fn status(&self) -> u8 {
        self.messages
            .last()
            .filter(|m| m.tag == b'Z')
            .and_then(|m| m.body.first().copied())
            .unwrap_or(0)
    }

    /// The tags of the messages, as a string (`"12CZ"`), for asserting a protocol shape.
    pub fn shape(&self) -> String {
        self.messages.iter().map(|m| m.tag as char).collect()
    }

    /// The first column of the data rows, as text.
    pub fn values(&self) -> Vec<Option<String>> {
        self.messages
            .iter()
            .filter(|m| m.tag == b'D')
            .map(|m| {
                let len = i32::from_be_bytes(m.body[2..6].try_into().unwrap());
                usize::try_from(len)
                    .ok()
                    .map(|len| String::from_utf8_lossy(&m.body[6..6 + len]).into_owned())
            })
            .collect()
    }
}

/// A rustls client configuration that trusts `emulator`'s CA, offering ALPN `postgresql` when
/// `alpn` (direct TLS).
pub fn client_tls(emulator: &DsqlEmulator, alpn: bool) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    let ca = rustls::pki_types::pem::PemObject::from_pem_slice(emulator.ca_cert_pem().as_bytes())
        .unwrap();
    roots.add(ca).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    if alpn {
        config.alpn_protocols = vec![b"postgresql".to_vec()];
    }
    config
}

/// A raw session with an emulator.
pub struct Frontend {
    stream: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    out: Vec<u8>,
}

impl Frontend {
    /// Connects as `admin` with a fresh token, through direct TLS with SNI and ALPN.
    pub async fn connect(emulator: &DsqlEmulator) -> Frontend {
        let config = emulator.config_for("admin").build().unwrap();
        let token = tokio_postgres_dsql::DsqlConnector::new(config)
            .await
            .unwrap()
            .token()
            .await
            .unwrap();
        let config = client_tls(emulator, true);
        let tcp = tokio::net::TcpStream::connect(emulator.address())
            .await
            .unwrap();
        let name = rustls::pki_types::ServerName::try_from(emulator.endpoint().to_owned()).unwrap();
        let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .unwrap();
        let mut frontend = Frontend {
            stream,
            out: Vec::new(),
        };
        let body = b"\x00\x03\x00\x00user\x00admin\x00database\x00postgres\x00\x00";
        let mut startup = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        startup.extend_from_slice(body);
        frontend.stream.write_all(&startup).await.unwrap();
        let request = frontend.read().await;
        assert_eq!(request.tag, b'R', "the emulator asks for the password");
        let mut password = token.as_str().as_bytes().to_vec();
        password.push(0);
        frontend.message(b'p', &password);
        let answer = frontend.flush_and_answer().await;
        assert_eq!(answer.status(), b'I', "{answer:?}");
        frontend
    }

    /// Queues one frontend message.
    pub fn message(&mut self, tag: u8, body: &[u8]) -> &mut Self {
        self.out.push(tag);
        self.out
            .extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        self.out.extend_from_slice(body);
        self
    }

    /// `Query`.
    pub fn query(&mut self, text: &str) -> &mut Self {
        let mut body = text.as_bytes().to_vec();
        body.push(0);
        self.message(b'Q', &body)
    }

    /// `Parse` of `text` as statement `name` (`""`: the unnamed one), parameter types left to
    /// the server.
    pub fn parse(&mut self, name: &str, text: &str) -> &mut Self {
        let mut body = format!("{name}\0{text}\0").into_bytes();
        body.extend_from_slice(&0u16.to_be_bytes());
        self.message(b'P', &body)
    }

    /// `Bind` of statement `statement` to the unnamed portal, with text parameters.
    pub fn bind(&mut self, statement: &str, params: &[&str]) -> &mut Self {
        let mut body = format!("\0{statement}\0").into_bytes();
        body.extend_from_slice(&0u16.to_be_bytes());
        body.extend_from_slice(&(params.len() as u16).to_be_bytes());
        for p in params {
            body.extend_from_slice(&(p.len() as i32).to_be_bytes());
            body.extend_from_slice(p.as_bytes());
        }
        body.extend_from_slice(&0u16.to_be_bytes());
        self.message(b'B', &body)
    }

    /// `Describe` of the unnamed portal.
    pub fn describe_portal(&mut self) -> &mut Self {
        self.message(b'D', b"P\0")
    }

    /// `Describe` of statement `name`.
    pub fn describe_statement(&mut self, name: &str) -> &mut Self {
        self.message(b'D', format!("S{name}\0").as_bytes())
    }

    /// `Execute` of the unnamed portal, all rows.
    pub fn execute(&mut self) -> &mut Self {
        self.message(b'E', b"\0\0\0\0\0")
    }

    /// `Sync`.
    pub fn sync(&mut self) -> &mut Self {
        self.message(b'S', b"")
    }

    /// `Flush`.
    pub fn flush_message(&mut self) -> &mut Self {
        self.message(b'H', b"")
    }

    /// Sends what is queued; `Err` says why it could not (the emulator closed the session).
    pub async fn try_send(&mut self) -> Result<(), String> {
        let out = std::mem::take(&mut self.out);
        self.stream
            .write_all(&out)
            .await
            .map_err(|e| format!("the connection closed: {e}"))?;
        self.stream
            .flush()
            .await
            .map_err(|e| format!("the connection closed: {e}"))
    }

    /// Sends what is queued.
    pub async fn send(&mut self) {
        self.try_send().await.unwrap();
    }

    /// Reads one backend message, within [`ANSWER_BOUND`].
    pub async fn read(&mut self) -> Message {
        match self.try_read(ANSWER_BOUND).await {
            Ok(message) => message,
            Err(why) => panic!("the emulator answers: {why}"),
        }
    }

    /// Reads one backend message within `bound`: `Err` says why none came (a hang, or the
    /// connection closed), for callers that report instead of panicking.
    pub async fn try_read(&mut self, bound: Duration) -> Result<Message, String> {
        let read = async {
            let tag = self.stream.read_u8().await?;
            let len = self.stream.read_u32().await?;
            let mut body = vec![0; len.saturating_sub(4) as usize];
            self.stream.read_exact(&mut body).await?;
            Ok::<_, std::io::Error>(Message { tag, body })
        };
        match tokio::time::timeout(bound, read).await {
            Ok(Ok(message)) => Ok(message),
            Ok(Err(error)) => Err(format!("the connection closed: {error}")),
            Err(_) => Err(format!("no answer within {bound:?} (a hang)")),
        }
    }

    /// Reads up to and including the next `ReadyForQuery`, within `bound` a message.
    pub async fn try_answer(&mut self, bound: Duration) -> Result<Answer, String> {
        let mut messages = Vec::new();
        loop {
            let message = self.try_read(bound).await?;
            let ready = message.tag == b'Z';
            messages.push(message);
            if ready {
                return Ok(Answer { messages });
            }
        }
    }

    /// Reads up to and including the next `ReadyForQuery`.
    pub async fn answer(&mut self) -> Answer {
        let mut messages = Vec::new();
        loop {
            let message = self.read().await;
            let ready = message.tag == b'Z';
            messages.push(message);
            if ready {
                return Answer { messages };
            }
        }
    }

    /// Sends what is queued and reads one answer.
    pub async fn flush_and_answer(&mut self) -> Answer {
        self.send().await;
        self.answer().await
    }

    /// A simple query, answered.
    pub async fn simple(&mut self, text: &str) -> Answer {
        self.query(text).flush_and_answer().await
    }

    /// The extended protocol's one-shot form with the unnamed statement (libpq's
    /// `PQexecParams`, node-postgres with values, pgJDBC's default): Parse/Bind/Describe/
    /// Execute/Sync.
    pub async fn extended(&mut self, text: &str, params: &[&str]) -> Answer {
        self.parse("", text)
            .bind("", params)
            .describe_portal()
            .execute()
            .sync()
            .flush_and_answer()
            .await
    }
}
