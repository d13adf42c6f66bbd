//! Added network latency between a client and the emulator: each direction of the client's
//! connection is a delay line, so every byte arrives `latency` after it was sent, whichever
//! side sent it, and pipelined bytes are not delayed twice. A round trip costs twice the setting,
//! like a real network; the TCP handshake itself (done by the kernel) is not delayed.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};

/// The one-way delay in nanoseconds, shared by every connection of one emulator.
pub(crate) type Latency = Arc<AtomicU64>;

/// A client's connection as the emulator sees it: the socket itself while the latency is zero
/// (no task, copy or channel between them), switched behind a [`delay_line`] the first time it
/// is used with a latency set, and kept there. Bytes a direct read returns after the latency
/// was set are held back for the latency, so none arrives early.
pub(crate) struct Line<S> {
    latency: Latency,
    /// Told whenever bytes move (busy polling), with this connection's number.
    activity: Option<(Arc<super::poll::Activity>, u64)>,
    state: State<S>,
    /// Bytes read directly but not yet due.
    held: Option<Held>,
    /// The tasks whose direct read or write is waiting on the socket: woken when it moves
    /// behind the delay line (whose pump then owns the socket's wakers).
    waiting: [Option<std::task::Waker>; 2],
}

enum State<S> {
    Direct(S),
    Delayed(DuplexStream),
    /// Only while switching.
    Switching,
}

struct Held {
    bytes: Vec<u8>,
    at: usize,
    due: Pin<Box<Sleep>>,
}

impl<S> Line<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// `socket`, delayed by `latency` whenever it is not zero.
    pub(crate) fn new(socket: S, latency: Latency) -> Self {
        let state = if latency.load(Ordering::Relaxed) == 0 {
            State::Direct(socket)
        } else {
            State::Delayed(delay_line(socket, latency.clone()))
        };
        Line {
            latency,
            activity: None,
            state,
            held: None,
            waiting: [None, None],
        }
    }

    /// Tells `activity` (busy polling) whenever bytes move.
    pub(crate) fn with_activity(mut self, activity: Option<Arc<super::poll::Activity>>) -> Self {
        self.activity = activity.map(|activity| {
            let connection = activity.connection();
            (activity, connection)
        });
        self
    }

    fn mark(&self) {
        if let Some((activity, connection)) = &self.activity {
            activity.mark(*connection);
        }
    }

    fn delay(&self) -> Duration {
        Duration::from_nanos(self.latency.load(Ordering::Relaxed))
    }

    /// Puts the socket behind the delay line if a latency is set now.
    fn switch_if_delayed(&mut self) {
        if matches!(self.state, State::Direct(_)) && !self.delay().is_zero() {
            let State::Direct(socket) = std::mem::replace(&mut self.state, State::Switching) else {
                unreachable!("matched above");
            };
            self.state = State::Delayed(delay_line(socket, self.latency.clone()));
            for waker in self.waiting.iter_mut().filter_map(Option::take) {
                waker.wake();
            }
        }
    }

    /// Notes that `side` (0 read, 1 write) waits on the socket itself.
    fn wait(&mut self, side: usize, cx: &Context<'_>) {
        match &self.waiting[side] {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => self.waiting[side] = Some(cx.waker().clone()),
        }
    }
}

impl<S> Drop for Line<S> {
    fn drop(&mut self) {
        if let Some((activity, connection)) = &self.activity {
            activity.closed(*connection);
        }
    }
}

fn switching() -> io::Error {
    io::Error::other("the connection failed while its delay line was set up")
}

impl<S> AsyncRead for Line<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if let Some(held) = &mut this.held {
                ready!(held.due.as_mut().poll(cx));
                let n = buf.remaining().min(held.bytes.len() - held.at);
                buf.put_slice(&held.bytes[held.at..held.at + n]);
                held.at += n;
                if held.at == held.bytes.len() {
                    this.held = None;
                }
                return Poll::Ready(Ok(()));
            }
            this.switch_if_delayed();
            match &mut this.state {
                State::Delayed(line) => return Pin::new(line).poll_read(cx, buf),
                State::Switching => return Poll::Ready(Err(switching())),
                State::Direct(socket) => {
                    let before = buf.filled().len();
                    let Poll::Ready(read) = Pin::new(socket).poll_read(cx, buf) else {
                        this.wait(0, cx);
                        return Poll::Pending;
                    };
                    read?;
                    let delay = this.delay();
                    if delay.is_zero() || buf.filled().len() == before {
                        if buf.filled().len() > before {
                            this.mark();
                        }
                        return Poll::Ready(Ok(()));
                    }
                    // The latency was set while this read waited: these bytes are due later.
                    let bytes = buf.filled()[before..].to_vec();
                    buf.set_filled(before);
                    this.held = Some(Held {
                        bytes,
                        at: 0,
                        due: Box::pin(tokio::time::sleep(delay)),
                    });
                }
            }
        }
    }
}

impl<S> AsyncWrite for Line<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.switch_if_delayed();
        match &mut this.state {
            State::Direct(socket) => {
                let written = Pin::new(socket).poll_write(cx, data);
                match &written {
                    Poll::Pending => this.wait(1, cx),
                    Poll::Ready(Ok(n)) if *n > 0 => this.mark(),
                    Poll::Ready(_) => {}
                }
                written
            }
            State::Delayed(line) => Pin::new(line).poll_write(cx, data),
            State::Switching => Poll::Ready(Err(switching())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().state {
            State::Direct(socket) => Pin::new(socket).poll_flush(cx),
            State::Delayed(line) => Pin::new(line).poll_flush(cx),
            State::Switching => Poll::Ready(Err(switching())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().state {
            State::Direct(socket) => Pin::new(socket).poll_shutdown(cx),
            State::Delayed(line) => Pin::new(line).poll_shutdown(cx),
            State::Switching => Poll::Ready(Err(switching())),
        }
    }
}

/// Puts `socket` behind two delay lines and returns the emulator's end. The delay is read when
/// each chunk arrives, so a change applies to open connections too.
pub(crate) fn delay_line<S>(socket: S, latency: Latency) -> DuplexStream
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (emulator_end, pump_end) = tokio::io::duplex(64 * 1024);
    let (socket_read, socket_write) = tokio::io::split(socket);
    let (pump_read, pump_write) = tokio::io::split(pump_end);
    tokio::spawn(pump(socket_read, pump_write, latency.clone()));
    tokio::spawn(pump(pump_read, socket_write, latency));
    emulator_end
}

/// The most chunks one direction of the delay line holds.
const CHUNKS_IN_FLIGHT: usize = 64;

/// Copies `from` to `to`, each chunk released `latency` after it was read.
async fn pump<R, W>(mut from: R, mut to: W, latency: Latency)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    // Bounded: a peer that reads slowly holds the reader back (at most this many chunks of
    // 16 KiB wait in the line).
    let (chunks, mut due) = mpsc::channel::<(Instant, Vec<u8>)>(CHUNKS_IN_FLIGHT);
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let delay = Duration::from_nanos(latency.load(Ordering::Relaxed));
                    if chunks
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
    while let Some((at, chunk)) = due.recv().await {
        // The timer has millisecond resolution: never sleep for nothing.
        if at > Instant::now() {
            tokio::time::sleep_until(at).await;
        }
        if to.write_all(&chunk).await.is_err() {
            reader.abort();
            return;
        }
    }
    let _ = to.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn each_direction_is_delayed_once_and_pipelined() {
        let (mut client, server) = tokio::io::duplex(1024);
        let latency: Latency =
            Arc::new(AtomicU64::new(Duration::from_millis(20).as_nanos() as u64));
        let mut server = delay_line(server, latency);

        let start = Instant::now();
        client.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        server.write_all(b"pong").await.unwrap();
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");
        // Virtual time: one round trip is exactly two delays.
        assert_eq!(start.elapsed(), Duration::from_millis(40));

        // Two messages sent back to back arrive together, not 20 ms apart.
        let start = Instant::now();
        client.write_all(b"a").await.unwrap();
        client.write_all(b"b").await.unwrap();
        let mut two = [0u8; 2];
        server.read_exact(&mut two).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(20));
    }

    #[tokio::test(start_paused = true)]
    async fn a_line_is_direct_until_a_latency_is_set_then_delays_both_ways() {
        let (mut client, server) = tokio::io::duplex(1024);
        let latency: Latency = Arc::new(AtomicU64::new(0));
        let mut server = Line::new(server, latency.clone());
        assert!(matches!(server.state, State::Direct(_)));

        let start = Instant::now();
        client.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        server.read_exact(&mut got).await.unwrap();
        server.write_all(b"pong").await.unwrap();
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert!(matches!(server.state, State::Direct(_)));

        // Set while the emulator's read waits: what arrives after it is held back.
        let reading = tokio::spawn(async move {
            let mut got = [0u8; 4];
            server.read_exact(&mut got).await.unwrap();
            (server, got)
        });
        tokio::task::yield_now().await;
        latency.store(
            Duration::from_millis(20).as_nanos() as u64,
            Ordering::Relaxed,
        );
        let start = Instant::now();
        client.write_all(b"abcd").await.unwrap();
        let (mut server, mut got) = reading.await.unwrap();
        assert_eq!(&got, b"abcd");
        assert_eq!(start.elapsed(), Duration::from_millis(20));

        // Then a round trip is two delays, and the line stays switched.
        let start = Instant::now();
        client.write_all(b"ping").await.unwrap();
        server.read_exact(&mut got).await.unwrap();
        server.write_all(b"pong").await.unwrap();
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(
            (&got, start.elapsed()),
            (b"pong", Duration::from_millis(40))
        );
        assert!(matches!(server.state, State::Delayed(_)));

        // Bytes split across reads keep their order.
        client.write_all(b"0123456789").await.unwrap();
        let mut ten = [0u8; 10];
        server.read_exact(&mut ten).await.unwrap();
        assert_eq!(&ten, b"0123456789");
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_read_longer_than_the_buffer_is_returned_in_order() {
        let (mut client, server) = tokio::io::duplex(1024);
        let latency: Latency = Arc::new(AtomicU64::new(0));
        let mut server = Line::new(server, latency.clone());
        let reading = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut small = [0u8; 3];
            while got.len() < 8 {
                let n = server.read(&mut small).await.unwrap();
                got.extend_from_slice(&small[..n]);
            }
            got
        });
        tokio::task::yield_now().await;
        latency.store(
            Duration::from_millis(5).as_nanos() as u64,
            Ordering::Relaxed,
        );
        client.write_all(b"abcdefgh").await.unwrap();
        assert_eq!(reading.await.unwrap(), b"abcdefgh");
    }
}
