//! Reading JSON without building it: serde types that borrow from the bytes they read, and where
//! a borrowed value lies in those bytes, so a field can be rewritten in place.
//!
//! A borrowing pass only vouches for what it read. **Whatever it cannot read (an escaped string, a
//! repeated field, a value of another type) makes it fail, and the full parse decides**; the pass
//! never accepts what the full parse would refuse for the fields it reads.

use std::marker::PhantomData;
use std::ops::Range;

use serde::de::value::MapAccessDeserializer;
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

/// A field's raw value if the field is there, `null` included (an `Option` would read `null` as
/// absent, and a relabelled `"model": null` would then appear twice).
#[derive(Debug, Default)]
pub struct Present<'a>(pub Option<&'a RawValue>);

impl<'de: 'a, 'a> Deserialize<'de> for Present<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        <&'de RawValue>::deserialize(deserializer).map(|raw| Present(Some(raw)))
    }
}

impl Present<'_> {
    /// The raw text of the value, if the field is there.
    pub fn raw(&self) -> Option<&str> {
        self.0.map(RawValue::get)
    }

    /// Whether the field is there and holds a string.
    pub fn is_string(&self) -> bool {
        self.raw().is_some_and(|raw| raw.starts_with('"'))
    }
}

/// `T`, read only from a JSON object: a derived struct would also read one from an array.
#[derive(Debug)]
pub struct ObjectOf<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for ObjectOf<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Only<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for Only<T> {
            type Value = T;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map))
            }
        }
        deserializer
            .deserialize_map(Only(PhantomData))
            .map(ObjectOf)
    }
}

/// Where `part`, a slice of `whole` that serde borrowed, lies in it; `None` if it is not in it.
pub fn span_in(whole: &[u8], part: &str) -> Option<Range<usize>> {
    let start = (part.as_ptr() as usize).checked_sub(whole.as_ptr() as usize)?;
    let end = start.checked_add(part.len())?;
    (end <= whole.len()).then_some(start..end)
}

/// The entry `"key": value` whose value is at `value`, with one comma beside it, so that what
/// remains is still an object. `None` if the key is not written plainly before it.
pub fn entry_span(sent: &[u8], value: Range<usize>, key: &str) -> Option<Range<usize>> {
    let before_value = sent[..value.start].trim_ascii_end();
    let before_colon = before_value.strip_suffix(b":")?.trim_ascii_end();
    // The key is the last string before the colon; ending in `"key"`, it is that key (a longer
    // one ending so would contain an escaped quote, and serde would not have read it as `key`).
    let quoted_len = key.len() + 2;
    let key_start = before_colon.len().checked_sub(quoted_len)?;
    let quoted = &before_colon[key_start..];
    if quoted.first() != Some(&b'"')
        || quoted.last() != Some(&b'"')
        || &quoted[1..quoted_len - 1] != key.as_bytes()
    {
        return None;
    }
    let after = &sent[value.end..];
    let after_trimmed = after.trim_ascii_start();
    if after_trimmed.first() == Some(&b',') {
        let comma = value.end + (after.len() - after_trimmed.len());
        return Some(key_start..comma + 1);
    }
    let head = sent[..key_start].trim_ascii_end();
    if head.last() == Some(&b',') {
        return Some(head.len() - 1..value.end);
    }
    Some(key_start..value.end)
}

/// Copies `sent` with each span replaced by its text (`None`: cut out); spans must not overlap.
pub fn splice(sent: &[u8], mut edits: Vec<(Range<usize>, Option<&str>)>, out: &mut Vec<u8>) {
    edits.sort_by_key(|(span, _)| span.start);
    let mut at = 0;
    for (span, replacement) in edits {
        out.extend_from_slice(&sent[at..span.start]);
        if let Some(text) = replacement {
            crate::json::write_str(out, text);
        }
        at = span.end;
    }
    out.extend_from_slice(&sent[at..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Named<'a> {
        #[serde(borrow, default)]
        name: Present<'a>,
    }

    #[test]
    fn object_of_refuses_what_a_struct_would_read_from_an_array() {
        assert!(serde_json::from_str::<Named<'_>>(r#"["x"]"#).is_ok());
        assert!(serde_json::from_str::<ObjectOf<Named<'_>>>(r#"["x"]"#).is_err());
        let read = serde_json::from_str::<ObjectOf<Named<'_>>>(r#"{"name": null}"#).expect("read");
        assert_eq!(read.0.name.raw(), Some("null"));
        assert!(!read.0.name.is_string());
    }

    #[test]
    fn entries_are_cut_with_one_comma() {
        let sent = br#"{"a": 1, "b": 2, "c": 3}"#;
        let cut = |key: &str, value: Range<usize>| {
            let entry = entry_span(sent, value, key).expect("plain key");
            let mut out = Vec::new();
            splice(sent, vec![(entry, None)], &mut out);
            String::from_utf8(out).expect("text")
        };
        assert_eq!(cut("a", 6..7), r#"{ "b": 2, "c": 3}"#);
        assert_eq!(cut("b", 14..15), r#"{"a": 1,  "c": 3}"#);
        assert_eq!(cut("c", 22..23), r#"{"a": 1, "b": 2}"#);
        assert_eq!(entry_span(sent, 6..7, "b"), None);
    }
}
