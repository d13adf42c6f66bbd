//! Added network latency between a client and the emulator: each direction of the client's
//! connection is a delay line, so every byte arrives `latency` after it was sent, whichever
//! side sent it, and pipelined bytes are not delayed twice. A round trip costs twice the setting,
//! like a real network; the TCP handshake itself (done by the kernel) is not delayed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The one-way delay in nanoseconds, shared by every connection of one emulator.
pub(crate) type Latency = Arc<AtomicU64>;

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
}
