//! A scripted SMTP client for server tests: it sends a whole script the way
//! a pipelining client does and returns every reply.

use std::time::Duration;

use skein_smtp::{parse_reply, Reply};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Send `script` as a well-behaved pipelining client would: wait for the
/// greeting, then everything up to
/// and including a `DATA` line at once, then — once the server answered all
/// of it — the data if DATA got a 354 (or the next commands if it did not),
/// and so on; finally close the sending side and read until the server
/// closes. Returns every reply, in order.
pub async fn converse<S: AsyncRead + AsyncWrite + Unpin>(stream: S, script: &[u8]) -> Vec<Reply> {
    conversation(stream, script, true).await
}

/// [`converse`] on a session that sends no greeting: the one that follows a
/// STARTTLS handshake.
pub async fn converse_after_tls<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    script: &[u8],
) -> Vec<Reply> {
    conversation(stream, script, false).await
}

async fn conversation<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    script: &[u8],
    greeting: bool,
) -> Vec<Reply> {
    let mut segments: Vec<&[u8]> = Vec::new();
    let mut rest = script;
    while let Some(i) = find(rest, b"DATA\r\n") {
        segments.push(&rest[..i + 6]);
        rest = &rest[i + 6..];
    }
    segments.push(rest);

    let mut replies = Vec::new();
    let mut buf = Vec::new();
    // Never talk before the greeting.
    if greeting
        && (!read_replies(&mut stream, &mut buf, &mut replies, 1).await || replies[0].code != 220)
    {
        return replies;
    }
    let mut expected = replies.len();
    let mut in_data = false;
    let last = segments.len() - 1;
    for (k, seg) in segments.into_iter().enumerate() {
        if stream.write_all(seg).await.is_err() {
            break;
        }
        if k == last {
            break;
        }
        expected += if in_data {
            // The data up to its end marker is answered once.
            match rfind(seg, b"\r\n.\r\n") {
                Some(end) => 1 + lines(&seg[end + 5..]),
                None => lines(seg),
            }
        } else {
            lines(seg)
        };
        if !read_replies(&mut stream, &mut buf, &mut replies, expected).await {
            return replies;
        }
        in_data = replies.last().is_some_and(|r| r.code == 354);
    }
    let _ = stream.shutdown().await;
    read_replies(&mut stream, &mut buf, &mut replies, usize::MAX).await;
    replies
}

/// Read until `replies` holds `n` replies; false if the server closed.
async fn read_replies<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    replies: &mut Vec<Reply>,
    n: usize,
) -> bool {
    loop {
        while let Ok(Some((r, used))) = parse_reply(buf) {
            buf.drain(..used);
            replies.push(r);
        }
        if replies.len() >= n {
            return true;
        }
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(Duration::from_secs(30), stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return false,
            Ok(Ok(m)) => buf.extend_from_slice(&chunk[..m]),
        }
    }
}

fn lines(b: &[u8]) -> usize {
    b.iter().filter(|&&c| c == b'\n').count()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn rfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).rposition(|w| w == needle)
}

/// `"250 2.1.5"` style summaries of replies, for table-driven assertions.
pub fn codes(replies: &[Reply]) -> Vec<String> {
    replies
        .iter()
        .map(|r| match r.enhanced {
            Some(e) => format!("{} {e}", r.code),
            None => r.code.to_string(),
        })
        .collect()
}
