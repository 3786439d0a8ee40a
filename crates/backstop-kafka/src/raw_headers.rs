//! A record's headers read as bytes, through librdkafka's own header API.
//!
//! rdkafka 0.39's accessor (`BorrowedHeaders::try_get`) unwraps
//! `CStr::to_str` on every key, so one record whose header key is not UTF-8
//! panics the consumer that reads it, and the next group member after it
//! (HEADERS.md, "Limits"). This module is the workspace's one exception to
//! its ban on unsafe code: two librdkafka calls, read exactly as rdkafka
//! itself reads them, minus the unwrap.
#![allow(unsafe_code)]

use rdkafka::bindings::{
    rd_kafka_header_get_all, rd_kafka_headers_t, rd_kafka_message_headers, rd_kafka_resp_err_t,
};
use rdkafka::message::BorrowedMessage;
use std::ffi::{CStr, c_char, c_void};
use std::marker::PhantomData;

/// One header: the key's bytes (librdkafka keeps keys NUL-terminated, so a
/// key never holds a NUL) and the value, `None` for a null value.
pub(crate) type RawHeader<'a> = (&'a [u8], Option<&'a [u8]>);

/// The headers of one record, valid while the record is borrowed.
pub(crate) struct RawHeaders<'a> {
    hdrs: *const rd_kafka_headers_t,
    count: usize,
    _message: PhantomData<&'a BorrowedMessage<'a>>,
}

/// The record's headers; `None` when it has none.
pub(crate) fn raw_headers<'a>(m: &'a BorrowedMessage<'a>) -> Option<RawHeaders<'a>> {
    let mut hdrs: *mut rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: `m.ptr()` is the live message `m` borrows. librdkafka parses
    // the record's headers once, keeps them with the message and hands back
    // a pointer to them that stays valid until the message is destroyed,
    // which the borrow of `m` (and so `'a`) outlives nowhere.
    let err = unsafe { rd_kafka_message_headers(m.ptr(), &mut hdrs) };
    if err != rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || hdrs.is_null() {
        return None;
    }
    // SAFETY: `hdrs` is the non-null header list of the live message.
    let count = unsafe { rdkafka::bindings::rd_kafka_header_cnt(hdrs) };
    Some(RawHeaders {
        hdrs,
        count,
        _message: PhantomData,
    })
}

impl<'a> RawHeaders<'a> {
    /// Header `idx`, in record order; `None` past the end.
    pub(crate) fn get(&self, idx: usize) -> Option<RawHeader<'a>> {
        let mut name: *const c_char = std::ptr::null();
        let mut value: *const c_void = std::ptr::null();
        let mut size = 0usize;
        // SAFETY: `self.hdrs` is the live header list (see `raw_headers`);
        // librdkafka checks `idx` against its length and writes the three
        // out-pointers only on success.
        let err =
            unsafe { rd_kafka_header_get_all(self.hdrs, idx, &mut name, &mut value, &mut size) };
        if err != rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            return None;
        }
        // SAFETY: on success `name` points to the header's NUL-terminated
        // name, owned by the header list, which lives for `'a`.
        let key = unsafe { CStr::from_ptr(name) }.to_bytes();
        let value = (!value.is_null()).then(|| {
            // SAFETY: a non-null value points to `size` bytes owned by the
            // header list, which lives for `'a` (as rdkafka's
            // `util::ptr_to_slice` reads it).
            unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) }
        });
        Some((key, value))
    }

    /// Every header, in record order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = RawHeader<'a>> + '_ {
        (0..self.count).map_while(|i| self.get(i))
    }
}
