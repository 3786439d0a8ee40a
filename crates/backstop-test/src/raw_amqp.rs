//! A hostile AMQP 0-9-1 publisher written frame by frame over a plain
//! `TcpStream`, for tests that must send what no client library would
//! (or could, without overflowing its own stack): a headers table nested
//! thousands of levels deep, say. It speaks just enough of the protocol to
//! log in as guest, open a channel with confirms and publish one message,
//! waiting for the broker's ack.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const FRAME_END: u8 = 0xCE;

/// Raw bytes of a field value: `levels` arrays nested in one another
/// around a void, 5 bytes a level, written without recursion.
pub fn nested_value(levels: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(5 * levels + 1);
    for level in 0..levels {
        v.push(b'A');
        push_u32(&mut v, 5 * (levels - 1 - level) + 1);
    }
    v.push(b'V');
    v
}

/// Raw bytes of a headers table whose one entry `key` holds
/// [`nested_value`]`(levels)`.
pub fn nested_headers(key: &str, levels: usize) -> Vec<u8> {
    let value = nested_value(levels);
    let mut table = Vec::with_capacity(value.len() + key.len() + 5);
    push_u32(&mut table, value.len() + 1 + key.len());
    push_short(&mut table, key);
    table.extend_from_slice(&value);
    table
}

/// Raw bytes of a headers table entry `key` = long string `value`.
pub fn string_entry(key: &str, value: &str) -> Vec<u8> {
    let mut entry = Vec::new();
    push_short(&mut entry, key);
    entry.push(b'S');
    push_u32(&mut entry, value.len());
    entry.extend_from_slice(value.as_bytes());
    entry
}

/// `table` (as from [`nested_headers`]) with `entries` added in front.
pub fn with_entries(table: &[u8], entries: &[Vec<u8>]) -> Vec<u8> {
    let body = table.get(4..).unwrap_or_default();
    let extra: usize = entries.iter().map(Vec::len).sum();
    let mut out = Vec::new();
    push_u32(&mut out, body.len() + extra);
    for entry in entries {
        out.extend_from_slice(entry);
    }
    out.extend_from_slice(body);
    out
}

/// Where and as whom [`publish`] logs in (vhost `/`).
#[derive(Debug, Clone)]
pub struct Login {
    /// `host:port`.
    pub addr: String,
    /// The user name.
    pub user: String,
    /// Its password.
    pub password: String,
}

/// Publishes `body` to `queue` through the default exchange with the raw
/// headers table `headers` (persistent), waiting for the broker's confirm.
pub fn publish(login: &Login, queue: &str, headers: &[u8], body: &[u8]) -> io::Result<()> {
    publish_to(login, "", queue.as_bytes(), headers, body)
}

/// Publishes `body` to `exchange` with a routing key of any bytes (AMQP
/// calls for UTF-8; RabbitMQ does not check), as [`publish`] does.
pub fn publish_to(
    login: &Login,
    exchange: &str,
    routing_key: &[u8],
    headers: &[u8],
    body: &[u8],
) -> io::Result<()> {
    let mut s = TcpStream::connect(&login.addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(b"AMQP\x00\x00\x09\x01")?;
    expect_method(&mut s, 10, 10)?; // connection.start
    let mut start_ok = method(10, 11);
    push_u32(&mut start_ok, 0); // client properties
    push_short(&mut start_ok, "PLAIN");
    let response = format!("\0{}\0{}", login.user, login.password);
    push_u32(&mut start_ok, response.len());
    start_ok.extend_from_slice(response.as_bytes());
    push_short(&mut start_ok, "en_US");
    frame(&mut s, 1, 0, &start_ok)?;
    let tune = expect_method(&mut s, 10, 30)?;
    let mut tune_ok = method(10, 31);
    tune_ok.extend_from_slice(tune.get(..6).unwrap_or(&[0, 0, 0, 2, 0, 0]));
    tune_ok.extend_from_slice(&[0, 0]); // no heartbeats
    frame(&mut s, 1, 0, &tune_ok)?;
    let mut open = method(10, 40);
    push_short(&mut open, "/");
    push_short(&mut open, "");
    open.push(0);
    frame(&mut s, 1, 0, &open)?;
    expect_method(&mut s, 10, 41)?;
    let mut channel_open = method(20, 10);
    push_short(&mut channel_open, "");
    frame(&mut s, 1, 1, &channel_open)?;
    expect_method(&mut s, 20, 11)?;
    let mut select = method(85, 10);
    select.push(0);
    frame(&mut s, 1, 1, &select)?;
    expect_method(&mut s, 85, 11)?;
    let mut basic_publish = method(60, 40);
    basic_publish.extend_from_slice(&[0, 0]);
    push_short(&mut basic_publish, exchange);
    basic_publish.push(u8::try_from(routing_key.len()).unwrap_or(u8::MAX));
    basic_publish.extend_from_slice(routing_key);
    basic_publish.push(0);
    frame(&mut s, 1, 1, &basic_publish)?;
    let mut header = Vec::new();
    header.extend_from_slice(&60u16.to_be_bytes());
    header.extend_from_slice(&[0, 0]);
    header.extend_from_slice(&(body.len() as u64).to_be_bytes());
    header.extend_from_slice(&((1u16 << 13) | (1u16 << 12)).to_be_bytes());
    header.extend_from_slice(headers);
    header.push(2); // persistent
    frame(&mut s, 2, 1, &header)?;
    frame(&mut s, 3, 1, body)?;
    let (class, id) = read_method(&mut s)?;
    if (class, id) != (60, 80) {
        return Err(io::Error::other(format!(
            "the broker answered the publish with method {class}.{id}, not basic.ack"
        )));
    }
    Ok(())
}

fn method(class: u16, id: u16) -> Vec<u8> {
    let mut m = class.to_be_bytes().to_vec();
    m.extend_from_slice(&id.to_be_bytes());
    m
}

fn push_u32(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes());
}

fn push_short(out: &mut Vec<u8>, s: &str) {
    out.push(u8::try_from(s.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(s.as_bytes());
}

fn frame(s: &mut TcpStream, kind: u8, channel: u16, payload: &[u8]) -> io::Result<()> {
    let mut f = vec![kind];
    f.extend_from_slice(&channel.to_be_bytes());
    push_u32(&mut f, payload.len());
    f.extend_from_slice(payload);
    f.push(FRAME_END);
    s.write_all(&f)
}

/// The next method frame's class, id and arguments, skipping heartbeats.
fn read_frame_method(s: &mut TcpStream) -> io::Result<(u16, u16, Vec<u8>)> {
    loop {
        let mut head = [0u8; 7];
        s.read_exact(&mut head)?;
        let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]);
        let mut payload = vec![0u8; size as usize + 1];
        s.read_exact(&mut payload)?;
        payload.pop();
        if head[0] != 1 {
            continue;
        }
        let class = u16::from_be_bytes([payload[0], payload[1]]);
        let id = u16::from_be_bytes([payload[2], payload[3]]);
        return Ok((class, id, payload.split_off(4)));
    }
}

fn read_method(s: &mut TcpStream) -> io::Result<(u16, u16)> {
    read_frame_method(s).map(|(c, i, _)| (c, i))
}

fn expect_method(s: &mut TcpStream, class: u16, id: u16) -> io::Result<Vec<u8>> {
    let (c, i, args) = read_frame_method(s)?;
    if (c, i) != (class, id) {
        return Err(io::Error::other(format!(
            "expected method {class}.{id} from the broker, got {c}.{i}"
        )));
    }
    Ok(args)
}
