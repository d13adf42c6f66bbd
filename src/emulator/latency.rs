//! Added one-way latency: every chunk read from a wrapped stream is held back for the current
//! delay before the reader sees it. Wrapping both the client and the upstream side adds the
//! delay in each direction, so a round trip through the emulator costs twice the setting.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// The delay in nanoseconds, shared by every stream of one emulator.
pub(crate) type Latency = Arc<AtomicU64>;

pub(crate) struct Delayed<S> {
    inner: S,
    latency: Latency,
    buf: Box<[u8]>,
    pos: usize,
    len: usize,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl<S> Delayed<S> {
    pub(crate) fn new(inner: S, latency: Latency) -> Self {
        Delayed {
            inner,
            latency,
            buf: vec![0; 16 * 1024].into_boxed_slice(),
            pos: 0,
            len: 0,
            sleep: None,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Delayed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.pos < this.len {
                if let Some(sleep) = this.sleep.as_mut() {
                    ready!(sleep.as_mut().poll(cx));
                    this.sleep = None;
                }
                let n = out.remaining().min(this.len - this.pos);
                out.put_slice(&this.buf[this.pos..this.pos + n]);
                this.pos += n;
                return Poll::Ready(Ok(()));
            }
            let nanos = this.latency.load(Ordering::Relaxed);
            if nanos == 0 {
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            let mut read = ReadBuf::new(&mut this.buf);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            let n = read.filled().len();
            if n == 0 {
                return Poll::Ready(Ok(()));
            }
            this.pos = 0;
            this.len = n;
            this.sleep = Some(Box::pin(tokio::time::sleep(Duration::from_nanos(nanos))));
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Delayed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn reads_wait_for_the_latency() {
        let (a, mut b) = tokio::io::duplex(64);
        let latency: Latency =
            Arc::new(AtomicU64::new(Duration::from_millis(20).as_nanos() as u64));
        let mut delayed = Delayed::new(a, latency.clone());
        b.write_all(b"hello").await.unwrap();
        let start = tokio::time::Instant::now();
        let mut got = [0u8; 5];
        delayed.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        assert_eq!(start.elapsed(), Duration::from_millis(20)); // virtual time: exact
        latency.store(0, Ordering::Relaxed);
        b.write_all(b"x").await.unwrap();
        let start = tokio::time::Instant::now();
        delayed.read_exact(&mut got[..1]).await.unwrap();
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
