//! Writing JSON on the request path: the bytes `serde_json` would write, faster. A string that
//! needs no escaping (nearly every string in LLM traffic) is copied whole after one vectorised
//! scan; `serde_json` walks it a byte at a time. Reading it without building it is in
//! [`borrowed`].

pub mod borrowed;

use serde_json::Value;

use crate::providers::JsonObject;

/// `value` as JSON.
pub fn to_vec(value: &JsonObject) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    write_object(&mut out, value);
    out
}

pub fn write_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(number) => write_with_serde(out, number),
        Value::String(text) => write_str(out, text),
        Value::Array(items) => {
            out.push(b'[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                write_value(out, item);
            }
            out.push(b']');
        }
        Value::Object(object) => write_object(out, object),
    }
}

pub fn write_object(out: &mut Vec<u8>, object: &JsonObject) {
    let mut writer = ObjectWriter::new(out);
    for (key, value) in object {
        writer.entry(key, value);
    }
    writer.end();
}

pub fn write_str(out: &mut Vec<u8>, text: &str) {
    if needs_escaping(text.as_bytes()) {
        write_with_serde(out, text);
    } else {
        out.reserve(text.len() + 2);
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    }
}

/// Writes an object entry by entry, for bodies built from parts.
#[derive(Debug)]
pub struct ObjectWriter<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> ObjectWriter<'a> {
    pub fn new(out: &'a mut Vec<u8>) -> ObjectWriter<'a> {
        out.push(b'{');
        ObjectWriter { out, first: true }
    }

    pub fn entry(&mut self, key: &str, value: &Value) {
        self.key(key);
        write_value(self.out, value);
    }

    pub fn str_entry(&mut self, key: &str, value: &str) {
        self.key(key);
        write_str(self.out, value);
    }

    fn key(&mut self, key: &str) {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        write_str(self.out, key);
        self.out.push(b':');
    }

    pub fn end(self) {
        self.out.push(b'}');
    }
}

/// Control characters, quotes and backslashes are escaped; everything else (UTF-8 included) is
/// written as it is. No early exit, so the loop vectorises.
fn needs_escaping(bytes: &[u8]) -> bool {
    bytes.iter().fold(false, |found, &b| {
        found | (b < 0x20) | (b == b'"') | (b == b'\\')
    })
}

fn write_with_serde<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    // Writing a string or number into a Vec cannot fail.
    let _ = serde_json::to_writer(out, value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn writes_what_serde_json_writes() {
        let value = json!({
            "model": "gpt-4o",
            "messages": [
                { "role": "user", "content": "plain text, ünïcödé and emoji 🦀" },
                { "role": "user", "content": "quotes \" backslash \\ newline \n tab \t bell \u{7}" },
            ],
            "temperature": 0.7,
            "n": 1,
            "big": 12345678901234567890u64,
            "negative": -3,
            "stream": false,
            "stop": null,
            "nested": { "empty": {}, "list": [] },
        });
        let Value::Object(object) = &value else {
            panic!("an object");
        };
        let ours = String::from_utf8(to_vec(object)).expect("UTF-8");
        let theirs = serde_json::to_string(&value).expect("serialises");
        assert_eq!(ours, theirs);
    }

    #[test]
    fn finds_every_character_that_needs_escaping() {
        for byte in 0u8..0x20 {
            assert!(needs_escaping(&[b'a', byte, b'b']), "{byte:#x}");
        }
        assert!(needs_escaping(b"say \"hi\""));
        assert!(needs_escaping(b"C:\\path"));
        assert!(!needs_escaping(
            "no escapes here: é, 中文, /slash".as_bytes()
        ));
    }
}
