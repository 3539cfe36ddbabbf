//! Server-sent events framing: an incremental parser for upstream streams and the encoder for ours.
//!
//! Upstream bytes arrive in arbitrary pieces; the parser hands out whole events only, so decoders
//! never see half a JSON object (the bug that breaks token counts in other gateways).

use std::borrow::Cow;

use bytes::{Bytes, BytesMut};

/// One whole event: its `event:` name if any and its `data:` lines joined by newlines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: Option<String>,
    pub data: String,
}

/// Cuts a byte stream into events. Feed it pieces with [`SseParser::push`], in order.
#[derive(Debug, Default)]
pub struct SseParser {
    buffer: BytesMut,
    event: Option<String>,
    data: Option<String>,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes and returns every event they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        self.buffer.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some(end) = memchr::memchr(b'\n', &self.buffer) {
            let line = self.buffer.split_to(end + 1);
            let line = strip_line_end(&line);
            if let Some(event) = self.take_line(line) {
                events.push(event);
            }
        }
        events
    }

    /// Flushes an event left unterminated when the stream ended.
    pub fn finish(&mut self) -> Option<SseEvent> {
        if !self.buffer.is_empty() {
            let rest = self.buffer.split();
            let line = strip_line_end(&rest).to_vec();
            if let Some(event) = self.take_line(&line) {
                return Some(event);
            }
        }
        self.take_line(b"")
    }

    fn take_line(&mut self, line: &[u8]) -> Option<SseEvent> {
        if line.is_empty() {
            let data = self.data.take();
            let event = self.event.take();
            return data.map(|data| SseEvent { event, data });
        }
        if line.first() == Some(&b':') {
            return None; // a comment, used as a keep-alive
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let value = &line[i + 1..];
                (&line[..i], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        // The strict check first: it runs words at a time over ASCII, the lossy one byte by byte.
        let value = match std::str::from_utf8(value) {
            Ok(text) => Cow::Borrowed(text),
            Err(_) => String::from_utf8_lossy(value),
        };
        match field {
            b"data" => match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(&value);
                }
                None => self.data = Some(value.into_owned()),
            },
            b"event" => self.event = Some(value.into_owned()),
            _ => {} // `id:` and `retry:` mean nothing to a proxy
        }
        None
    }
}

fn strip_line_end(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// `data: <json>\n\n`, the frame OpenAI streams use.
pub fn encode_data(json: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(json.len() + 8);
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(json);
    out.extend_from_slice(b"\n\n");
    out.freeze()
}

/// The terminator every OpenAI SDK waits for.
pub const DONE: &[u8] = b"data: [DONE]\n\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_pieces_come_out_whole() {
        let mut parser = SseParser::new();
        assert!(parser.push(b"event: message_start\nda").is_empty());
        assert!(parser.push(b"ta: {\"a\":").is_empty());
        let events = parser.push(b"1}\r\n\r\ndata: [DONE]\n\n");
        assert_eq!(
            events,
            vec![
                SseEvent {
                    event: Some("message_start".into()),
                    data: "{\"a\":1}".into()
                },
                SseEvent {
                    event: None,
                    data: "[DONE]".into()
                }
            ]
        );
    }

    #[test]
    fn comments_are_skipped_and_multiline_data_joined() {
        let mut parser = SseParser::new();
        let events = parser.push(b": ping\n\ndata: a\ndata: b\n\n");
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].data, "a\nb");
    }

    #[test]
    fn unterminated_event_is_flushed_at_the_end() {
        let mut parser = SseParser::new();
        assert!(parser.push(b"data: {}").is_empty());
        assert_eq!(parser.finish().map(|e| e.data), Some("{}".into()));
    }
}
