//! [`Guarded`]: the byte stream lapin reads, with every method and content
//! header frame mended (`method_frame::mend`, `header_frame::mend`) before
//! lapin parses it. Body and heartbeat frames pass through unbuffered as
//! they arrive; method and content header frames are held until they are
//! whole (lapin holds them too). Writes go straight to the inner stream.

use super::{header_frame, method_frame};
use futures_io::{AsyncRead, AsyncWrite};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

const FRAME_HEADER: usize = 7;
const FRAME_METHOD: u8 = 1;
const FRAME_CONTENT_HEADER: u8 = 2;
const FRAME_END: u8 = 0xCE;
const READ_CHUNK: usize = 64 * 1024;

/// An AMQP byte stream from the broker, made safe for lapin's parser.
#[derive(Debug)]
pub(crate) struct Guarded<S> {
    inner: S,
    /// Bytes read; those before `head` are handed out already, the `ready`
    /// after it are checked, the rest wait for the end of their frame.
    buf: Vec<u8>,
    head: usize,
    ready: usize,
    /// Bytes still to come of a frame that passes through unchecked.
    passing: usize,
    /// Notes for the next content header on a channel whose method frame
    /// was mended.
    notes: Vec<(u16, &'static str)>,
    scratch: Vec<u8>,
}

impl<S> Guarded<S> {
    pub(crate) fn new(inner: S) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            head: 0,
            ready: 0,
            passing: 0,
            notes: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// Checks as much of `buf` as is there, mending method and content
    /// header frames.
    fn check(&mut self) {
        loop {
            let checked = self.head + self.ready;
            if self.passing > 0 {
                let n = self.passing.min(self.buf.len() - checked);
                if n == 0 {
                    return;
                }
                self.ready += n;
                self.passing -= n;
                continue;
            }
            let rest = self.buf.get(checked..).unwrap_or_default();
            if rest.starts_with(b"AMQP") {
                // The broker's protocol header (a version mismatch).
                self.passing = 8;
                continue;
            }
            let Some(head) = rest.get(..FRAME_HEADER) else {
                return;
            };
            let (kind, channel) = (head[0], u16::from_be_bytes([head[1], head[2]]));
            let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]);
            let whole = usize::try_from(size)
                .unwrap_or(usize::MAX)
                .saturating_add(FRAME_HEADER + 1);
            if kind != FRAME_METHOD && kind != FRAME_CONTENT_HEADER {
                self.passing = whole;
                continue;
            }
            let Some(frame) = rest.get(..whole) else {
                return;
            };
            let payload = frame.get(FRAME_HEADER..whole - 1).unwrap_or_default();
            let mended = if kind == FRAME_METHOD {
                method_frame::mend(payload).map(|(mended, note)| {
                    self.notes.push((channel, note));
                    mended
                })
            } else {
                let note = self.notes.iter().position(|(c, _)| *c == channel);
                let note = note.map(|i| self.notes.swap_remove(i).1);
                header_frame::mend(payload, note)
            };
            match mended {
                None => self.ready += whole,
                Some(payload) => {
                    let mut frame_out = Vec::with_capacity(payload.len() + FRAME_HEADER + 1);
                    frame_out.extend_from_slice(&head[..3]);
                    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
                    frame_out.extend_from_slice(&len.to_be_bytes());
                    frame_out.extend_from_slice(&payload);
                    frame_out.push(FRAME_END);
                    self.buf
                        .splice(checked..checked + whole, frame_out.iter().copied());
                    self.ready += frame_out.len();
                }
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        loop {
            if this.ready > 0 {
                let n = this.ready.min(out.len());
                out[..n].copy_from_slice(&this.buf[this.head..this.head + n]);
                this.head += n;
                this.ready -= n;
                if this.head == this.buf.len() {
                    this.buf.clear();
                    this.head = 0;
                } else if this.head >= READ_CHUNK {
                    this.buf.drain(..this.head);
                    this.head = 0;
                }
                return Poll::Ready(Ok(n));
            }
            if this.scratch.len() < READ_CHUNK {
                this.scratch.resize(READ_CHUNK, 0);
            }
            let n = match Pin::new(&mut this.inner).poll_read(cx, &mut this.scratch) {
                Poll::Ready(Ok(n)) => n,
                other => return other,
            };
            if n == 0 {
                // End of stream: what is left (a cut frame) goes to lapin,
                // which reports the cut connection.
                this.ready = this.buf.len() - this.head;
                if this.ready == 0 {
                    return Poll::Ready(Ok(0));
                }
                continue;
            }
            this.buf.extend_from_slice(&this.scratch[..n]);
            this.check();
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
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

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hands out its bytes `chunk` at a time.
    struct Chunked {
        bytes: Vec<u8>,
        at: usize,
        chunk: usize,
    }

    impl AsyncRead for Chunked {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            out: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            let n = self.chunk.min(out.len()).min(self.bytes.len() - self.at);
            out[..n].copy_from_slice(&self.bytes[self.at..self.at + n]);
            self.at += n;
            Poll::Ready(Ok(n))
        }
    }

    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![kind, 0, 1];
        f.extend_from_slice(&u32::try_from(payload.len()).expect("small").to_be_bytes());
        f.extend_from_slice(payload);
        f.push(0xCE);
        f
    }

    /// A content header payload with a headers table of one entry `d`
    /// nested `levels` deep.
    fn header_payload(levels: usize) -> Vec<u8> {
        let mut p = vec![0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];
        p.extend_from_slice(&(1u16 << 13).to_be_bytes());
        p.extend_from_slice(&backstop_test::raw_amqp::nested_headers("d", levels));
        p
    }

    fn read_all(bytes: Vec<u8>, chunk: usize) -> Vec<u8> {
        let mut g = Guarded::new(Chunked {
            bytes,
            at: 0,
            chunk,
        });
        let mut out = Vec::new();
        let mut buf = [0u8; 8192];
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        loop {
            let read = std::future::poll_fn(|cx| Pin::new(&mut g).poll_read(cx, &mut buf));
            let n = rt.block_on(read).expect("read");
            if n == 0 {
                return out;
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    #[test]
    fn frames_pass_through_and_deep_headers_are_mended_whatever_the_read_sizes() {
        let method = frame(1, &[0, 60, 0, 60, 1, 2, 3]);
        let deep = header_payload(5_000);
        let body = frame(3, &[7; 100_000]);
        let mut input = b"AMQP\x00\x00\x09\x01".to_vec();
        for f in [
            &method,
            &frame(2, &deep),
            &body,
            &frame(2, &header_payload(2)),
        ] {
            input.extend_from_slice(f);
        }
        let mended = header_frame::mend(&deep, None).expect("deep is mended");
        let mut expected = b"AMQP\x00\x00\x09\x01".to_vec();
        for f in [
            &method,
            &frame(2, &mended),
            &body,
            &frame(2, &header_payload(2)),
        ] {
            expected.extend_from_slice(f);
        }
        for chunk in [1, 3, 7, 4096, 1 << 20] {
            assert_eq!(
                read_all(input.clone(), chunk),
                expected,
                "read {chunk} at a time"
            );
        }
    }

    #[test]
    fn a_cut_frame_reaches_lapin_as_it_came() {
        let mut input = frame(3, &[1, 2, 3]);
        input.extend_from_slice(&frame(2, &header_payload(40))[..20]);
        assert_eq!(read_all(input.clone(), 5), input);
    }
}
