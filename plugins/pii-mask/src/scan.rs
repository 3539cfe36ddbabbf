//! Hand-written scanners for emails, phone numbers, card numbers and US SSNs.
//!
//! Numbers are scanned as bytes: every byte they accept is ASCII, so match boundaries always fall
//! on `char` boundaries. Emails accept letters of any script. No regex engine: this runs on
//! every request, and a few small loops are faster and far smaller in wasm.

use serde::Deserialize;
use std::fmt;

/// A kind of personal data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Entity {
    /// `jane.doe@example.com`
    Email,
    /// `+44 20 7946 0958`, `(555) 123-4567`, `555-123-4567`, `020 7946 0958`, `555-1234`
    Phone,
    /// 13 to 19 digits, optionally grouped by spaces or dashes, passing the Luhn check.
    CreditCard,
    /// A US social security number, `ddd-dd-dddd`.
    Ssn,
}

impl Entity {
    /// Every kind, in the order overlapping matches are preferred.
    pub const ALL: [Entity; 4] = [
        Entity::Email,
        Entity::Ssn,
        Entity::CreditCard,
        Entity::Phone,
    ];

    /// What replaces a match when masking.
    pub fn placeholder(self) -> &'static str {
        match self {
            Entity::Email => "[EMAIL]",
            Entity::Phone => "[PHONE]",
            Entity::CreditCard => "[CREDIT_CARD]",
            Entity::Ssn => "[SSN]",
        }
    }

    fn bit(self) -> u8 {
        match self {
            Entity::Email => 1,
            Entity::Phone => 2,
            Entity::CreditCard => 4,
            Entity::Ssn => 8,
        }
    }
}

impl fmt::Display for Entity {
    /// The name shown to clients in block reasons.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Entity::Email => "email address",
            Entity::Phone => "phone number",
            Entity::CreditCard => "credit card number",
            Entity::Ssn => "US social security number",
        })
    }
}

/// A set of [`Entity`] kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entities(u8);

impl Entities {
    /// Every kind.
    pub fn all() -> Self {
        Self::from_iter(Entity::ALL)
    }

    /// Whether `entity` is in the set.
    pub fn contains(self, entity: Entity) -> bool {
        self.0 & entity.bit() != 0
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The kinds in the set, in [`Entity::ALL`] order.
    pub fn iter(self) -> impl Iterator<Item = Entity> {
        Entity::ALL.into_iter().filter(move |e| self.contains(*e))
    }
}

impl FromIterator<Entity> for Entities {
    fn from_iter<I: IntoIterator<Item = Entity>>(iter: I) -> Self {
        Self(iter.into_iter().fold(0, |bits, e| bits | e.bit()))
    }
}

/// One match: `text[start..end]` is an `entity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    /// Byte offset of the first byte.
    pub start: usize,
    /// Byte offset just past the last byte.
    pub end: usize,
    /// What was found.
    pub entity: Entity,
}

/// Every match of the `wanted` kinds in `text`, in order and without overlaps. Where matches of
/// different kinds overlap, the earlier kind in [`Entity::ALL`] wins (an email's digits are not a
/// phone number).
pub fn find(text: &str, wanted: Entities) -> Vec<Found> {
    let bytes = text.as_bytes();
    // Every number kind has a digit; most prose has none, and one look settles it for all three.
    let has_digits = has_digit(bytes);
    let mut kept: Vec<Found> = Vec::new();
    for entity in wanted.iter() {
        if entity != Entity::Email && !has_digits {
            continue;
        }
        let candidates = match entity {
            Entity::Email => emails(text),
            Entity::Ssn => ssns(bytes),
            Entity::CreditCard => cards(bytes),
            Entity::Phone => phones(bytes),
        };
        for found in candidates {
            if !kept
                .iter()
                .any(|k| found.start < k.end && k.start < found.end)
            {
                kept.push(found);
            }
        }
    }
    kept.sort_by_key(|found| found.start);
    kept
}

/// Whether `bytes` holds an ASCII digit, looking at eight bytes at a time: a byte is a digit
/// exactly when, XORed with `'0'`, it is below 10, and one subtraction tests all eight for that.
fn has_digit(bytes: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGH_BITS: u64 = ONES * 0x80;
    let (words, rest) = bytes.as_chunks::<8>();
    words.iter().any(|word| {
        let shifted = u64::from_ne_bytes(*word) ^ (ONES * u64::from(b'0'));
        shifted.wrapping_sub(ONES * 10) & !shifted & HIGH_BITS != 0
    }) || rest.iter().any(u8::is_ascii_digit)
}

/// `text` with each match replaced by its placeholder.
pub fn mask(text: &str, found: &[Found]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    for found in found {
        out.push_str(&text[copied..found.start]);
        out.push_str(found.entity.placeholder());
        copied = found.end;
    }
    out.push_str(&text[copied..]);
    out
}

/// Whether more text appended to `text` could still change what [`find`] reports near its end:
/// the tail is (or could start) an email or a number. A streaming guardrail holds such text.
pub fn could_grow(text: &str, wanted: Entities) -> bool {
    let Some(last_char) = text.chars().next_back() else {
        return false;
    };
    if wanted.contains(Entity::Email) && (is_local(last_char) || last_char == '@') {
        return true;
    }
    let bytes = text.as_bytes();
    let last = bytes[bytes.len() - 1];
    let numbers = wanted.contains(Entity::Phone)
        || wanted.contains(Entity::CreditCard)
        || wanted.contains(Entity::Ssn);
    if !numbers {
        return false;
    }
    if last.is_ascii_digit() || (wanted.contains(Entity::Phone) && matches!(last, b'+' | b'(')) {
        return true;
    }
    // "555 123 " or "(555) " may still be followed by the rest of the number.
    let trailing = bytes
        .iter()
        .rev()
        .take(3)
        .take_while(|b| matches!(b, b' ' | b'-' | b'.' | b'(' | b')'))
        .count();
    trailing > 0 && bytes.len() > trailing && bytes[bytes.len() - trailing - 1].is_ascii_digit()
}

// ---------------------------------------------------------------------------------------------
// Emails

/// Characters allowed in the local part (before `@`); letters and digits of any script.
fn is_local(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '.' | '_' | '%' | '+' | '-')
}

fn is_domain(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '.' | '-')
}

fn emails(text: &str) -> Vec<Found> {
    let mut out = Vec::new();
    for (at, _) in text.match_indices('@') {
        let before = &text[..at];
        let start = before
            .char_indices()
            .rev()
            .take_while(|(_, c)| is_local(*c))
            .last()
            .map_or(at, |(i, _)| i);
        // "...john@x.com": the ellipsis is punctuation, not part of the address.
        let start = start + text[start..at].len() - text[start..at].trim_start_matches('.').len();
        if start == at {
            continue;
        }
        let after = &text[at + 1..];
        let domain_len = after
            .char_indices()
            .find(|(_, c)| !is_domain(*c))
            .map_or(after.len(), |(i, _)| i);
        // A sentence's final period or a dash after the address is not part of it.
        let domain = after[..domain_len].trim_end_matches(['.', '-']);
        if valid_domain(domain) {
            out.push(Found {
                start,
                end: at + 1 + domain.len(),
                entity: Entity::Email,
            });
        }
    }
    out
}

/// At least two dot-separated labels of 1–63 bytes not starting or ending with `-`, and an
/// alphabetic top-level label of two or more letters.
fn valid_domain(domain: &str) -> bool {
    let mut labels = 0;
    let mut last = "";
    for label in domain.split('.') {
        if label.is_empty() || label.len() > 63 || label.starts_with('-') || label.ends_with('-') {
            return false;
        }
        labels += 1;
        last = label;
    }
    labels >= 2 && last.chars().count() >= 2 && last.chars().all(char::is_alphabetic)
}

// ---------------------------------------------------------------------------------------------
// Numbers: shared helpers

fn digit_at(bytes: &[u8], i: usize) -> bool {
    bytes.get(i).is_some_and(u8::is_ascii_digit)
}

/// Length of the run of ASCII digits starting at `i`.
fn digits_from(bytes: &[u8], i: usize) -> usize {
    bytes[i.min(bytes.len())..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count()
}

/// A number may start at `start` unless it continues a word, an email, or a longer dotted or
/// dashed number ("v2.555-1234", "2024-555-1234").
fn number_starts(bytes: &[u8], start: usize) -> bool {
    let Some(&prev) = start.checked_sub(1).and_then(|i| bytes.get(i)) else {
        return true;
    };
    if prev.is_ascii_alphanumeric() || matches!(prev, b'_' | b'@' | b'+') {
        return false;
    }
    !(matches!(prev, b'.' | b'-' | b'/' | b',') && start >= 2 && digit_at(bytes, start - 2))
}

/// A number may end at `end` unless a word, an email domain or more of a dotted, dashed or
/// slashed number follows ("555-123-4567-89", "4111…1111.5", "12/34").
fn number_ends(bytes: &[u8], end: usize) -> bool {
    let Some(&next) = bytes.get(end) else {
        return true;
    };
    if next.is_ascii_alphanumeric() || matches!(next, b'_' | b'@') {
        return false;
    }
    !(matches!(next, b'.' | b'-' | b'/' | b',') && digit_at(bytes, end + 1))
}

/// Every non-overlapping match of `at` (which returns where a match starting at `i` ends), left
/// to right. `at` is asked only where `starts` accepts the byte (so it need not check that byte
/// again): a quick loop skips the rest.
fn scan(
    bytes: &[u8],
    entity: Entity,
    starts: impl Fn(u8) -> bool,
    at: impl Fn(&[u8], usize) -> Option<usize>,
) -> Vec<Found> {
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(skipped) = bytes
        .get(i..)
        .and_then(|rest| rest.iter().position(|&b| starts(b)))
    {
        i += skipped;
        match at(bytes, i) {
            Some(end) if end > i => {
                out.push(Found {
                    start: i,
                    end,
                    entity,
                });
                i = end;
            }
            _ => i += 1,
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// SSNs

fn ssns(bytes: &[u8]) -> Vec<Found> {
    scan(bytes, Entity::Ssn, |b| b.is_ascii_digit(), ssn_at)
}

/// `ddd-dd-dddd` at `start`, with the area not 000, 666 or 9xx, the group not 00 and the serial
/// not 0000 (numbers the SSA never issues).
fn ssn_at(bytes: &[u8], start: usize) -> Option<usize> {
    let s = bytes.get(start..start + 11)?;
    let shape = s.iter().enumerate().all(|(i, b)| match i {
        3 | 6 => *b == b'-',
        _ => b.is_ascii_digit(),
    });
    if !shape || !number_starts(bytes, start) || !number_ends(bytes, start + 11) {
        return None;
    }
    let (area, group, serial) = (&s[0..3], &s[4..6], &s[7..11]);
    let invalid =
        area == b"000" || area == b"666" || area[0] == b'9' || group == b"00" || serial == b"0000";
    (!invalid).then_some(start + 11)
}

// ---------------------------------------------------------------------------------------------
// Credit cards

fn cards(bytes: &[u8]) -> Vec<Found> {
    scan(
        bytes,
        Entity::CreditCard,
        |b| b.is_ascii_digit(),
        |bytes, i| number_starts(bytes, i).then(|| card_at(bytes, i)).flatten(),
    )
}

/// The longest run of 13–19 digits at `start`, in groups joined by single spaces or dashes,
/// that passes the Luhn check and ends at a number boundary.
fn card_at(bytes: &[u8], start: usize) -> Option<usize> {
    let mut digits: Vec<u8> = Vec::with_capacity(19);
    // (end offset, digit count) after each group.
    let mut cuts: Vec<(usize, usize)> = Vec::new();
    let mut i = start;
    loop {
        let run = digits_from(bytes, i);
        if digits.len() + run > 19 {
            break;
        }
        digits.extend(bytes[i..i + run].iter().map(|b| b - b'0'));
        i += run;
        cuts.push((i, digits.len()));
        match bytes.get(i) {
            Some(b' ' | b'-') if digit_at(bytes, i + 1) => i += 1,
            _ => break,
        }
    }
    cuts.into_iter()
        .rev()
        .find(|&(end, count)| {
            (13..=19).contains(&count) && number_ends(bytes, end) && luhn(&digits[..count])
        })
        .map(|(end, _)| end)
}

/// The Luhn checksum every payment card number satisfies.
pub fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 1 {
                let doubled = d * 2;
                if doubled > 9 {
                    doubled - 9
                } else {
                    doubled
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

// ---------------------------------------------------------------------------------------------
// Phone numbers

fn phones(bytes: &[u8]) -> Vec<Found> {
    scan(
        bytes,
        Entity::Phone,
        |b| matches!(b, b'+' | b'(' | b'0'..=b'9'),
        |bytes, i| {
            number_starts(bytes, i)
                .then(|| phone_at(bytes, i))
                .flatten()
        },
    )
}

fn phone_at(bytes: &[u8], start: usize) -> Option<usize> {
    if bytes[start] == b'+' {
        return grouped(bytes, start + 1, 7, 15, 1);
    }
    if let Some(end) = us_phone(bytes, start) {
        return Some(end);
    }
    // National numbers behind a trunk prefix, as most countries outside North America write
    // them: "020 7946 0958", "030-1234567", "06 12 34 56 78"; "0044 …" is international.
    let first = if bytes[start] == b'(' {
        start + 1
    } else {
        start
    };
    if bytes.get(first) == Some(&b'0') {
        let max = if bytes.get(first + 1) == Some(&b'0') {
            15
        } else {
            12
        };
        return grouped(bytes, start, 9, max, 2);
    }
    us_local(bytes, start)
}

/// Digit groups from `start`, joined by one space, dash or dot (a parenthesised group may be
/// followed by a space or nothing). Takes groups while the total stays within `max` digits and
/// accepts `min..=max` digits when each group has at least `min_group` digits and the number ends
/// at a boundary.
fn grouped(bytes: &[u8], start: usize, min: usize, max: usize, min_group: usize) -> Option<usize> {
    let mut i = start;
    let mut total = 0;
    let mut end = None;
    loop {
        let paren = bytes.get(i) == Some(&b'(');
        let digits_start = i + usize::from(paren);
        let run = digits_from(bytes, digits_start);
        if run == 0 || run < min_group || total + run > max {
            break;
        }
        let mut next = digits_start + run;
        if paren {
            if bytes.get(next) != Some(&b')') {
                break;
            }
            next += 1;
        }
        total += run;
        i = next;
        end = Some(i);
        let after_paren = paren && matches!(bytes.get(i), Some(b'0'..=b'9' | b'('));
        if after_paren {
            continue;
        }
        match bytes.get(i) {
            Some(b' ' | b'-' | b'.') if matches!(bytes.get(i + 1), Some(b'0'..=b'9' | b'(')) => {
                i += 1;
            }
            _ => break,
        }
    }
    let end = end?;
    (total >= min && number_ends(bytes, end)).then_some(end)
}

/// North American numbers: "(555) 123-4567", "(555)123-4567", "555-123-4567", "555.123.4567",
/// "555 123 4567", each optionally after "1 " / "1-" / "1.".
fn us_phone(bytes: &[u8], start: usize) -> Option<usize> {
    let country_code =
        bytes.get(start) == Some(&b'1') && matches!(bytes.get(start + 1), Some(b' ' | b'-' | b'.'));
    country_code
        .then(|| us_ten(bytes, start + 2))
        .flatten()
        .or_else(|| us_ten(bytes, start))
}

/// The ten-digit part of [`us_phone`] at `start`.
fn us_ten(bytes: &[u8], start: usize) -> Option<usize> {
    let mut i = start;
    let sep;
    if bytes.get(i) == Some(&b'(') {
        if digits_from(bytes, i + 1) != 3 || bytes.get(i + 4) != Some(&b')') {
            return None;
        }
        i += 5;
        if bytes.get(i) == Some(&b' ') {
            i += 1;
        }
        if digits_from(bytes, i) != 3 {
            return None;
        }
        i += 3;
        sep = *bytes.get(i)?;
        if !matches!(sep, b' ' | b'-' | b'.') {
            return None;
        }
    } else {
        if digits_from(bytes, i) != 3 {
            return None;
        }
        i += 3;
        sep = *bytes.get(i)?;
        if !matches!(sep, b' ' | b'-' | b'.') {
            return None;
        }
        i += 1;
        if digits_from(bytes, i) != 3 || bytes.get(i + 3) != Some(&sep) {
            return None;
        }
        i += 3;
    }
    i += 1;
    if digits_from(bytes, i) != 4 {
        return None;
    }
    let end = i + 4;
    number_ends(bytes, end).then_some(end)
}

/// Seven-digit local numbers, "555-1234": the exchange starts with 2–9 as in the North American
/// plan, and a second part ending in "00" reads as a range ("200-1000"), not a number.
fn us_local(bytes: &[u8], start: usize) -> Option<usize> {
    let s = bytes.get(start..start + 8)?;
    let shape = s.iter().enumerate().all(|(i, b)| match i {
        3 => *b == b'-',
        _ => b.is_ascii_digit(),
    });
    let plausible = shape && s[0] >= b'2' && &s[6..8] != b"00";
    (plausible && number_ends(bytes, start + 8)).then_some(start + 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The placeholders `text` gets with every kind enabled.
    fn masked(text: &str) -> String {
        mask(text, &find(text, Entities::all()))
    }

    fn only(entity: Entity, text: &str) -> Vec<String> {
        find(text, Entities::from_iter([entity]))
            .iter()
            .map(|f| text[f.start..f.end].to_string())
            .collect()
    }

    #[test]
    fn digits_are_found_in_any_position_and_only_digits() {
        let fillers: Vec<u8> = (0..=255u8).filter(|b| !b.is_ascii_digit()).collect();
        for len in 0..20 {
            for &filler in &fillers {
                let mut bytes = vec![filler; len];
                assert!(!has_digit(&bytes), "{filler:#x} x {len}");
                for at in 0..len {
                    for digit in b'0'..=b'9' {
                        bytes[at] = digit;
                        assert!(has_digit(&bytes), "{digit} at {at} of {len}");
                    }
                    bytes[at] = filler;
                }
            }
        }
    }

    #[test]
    fn emails_found() {
        for (text, email) in [
            ("mail jane.doe@example.com now", "jane.doe@example.com"),
            ("<a+tag@sub.example.co.uk>", "a+tag@sub.example.co.uk"),
            ("Write to bob_99@my-site.org.", "bob_99@my-site.org"),
            ("...x@y.io", "x@y.io"),
            (
                "(first.last%dept@corp.example)",
                "first.last%dept@corp.example",
            ),
            ("Email:ADMIN@EXAMPLE.COM", "ADMIN@EXAMPLE.COM"),
        ] {
            assert_eq!(only(Entity::Email, text), vec![email], "{text}");
        }
    }

    #[test]
    fn emails_not_found() {
        for text in [
            "@handle on social media",
            "user@localhost",
            "a@b.c",
            "x@-bad.com",
            "x@bad-.com",
            "x@exa..mple.com",
            "x@example.123",
            "price @ 5.00",
            "npm i @scope/pkg@1.2.3",
        ] {
            assert!(only(Entity::Email, text).is_empty(), "{text}");
        }
    }

    #[test]
    fn phones_found() {
        for (text, phone) in [
            ("call +44 20 7946 0958 today", "+44 20 7946 0958"),
            ("+1 (555) 123-4567", "+1 (555) 123-4567"),
            ("+49-30-1234567", "+49-30-1234567"),
            ("+4915112345678", "+4915112345678"),
            ("+33 6 12 34 56 78.", "+33 6 12 34 56 78"),
            ("+44 (0) 20 7946 0958", "+44 (0) 20 7946 0958"),
            ("(555) 123-4567", "(555) 123-4567"),
            ("(555)123-4567", "(555)123-4567"),
            ("phone: 555-123-4567.", "555-123-4567"),
            ("555.123.4567", "555.123.4567"),
            ("555 123 4567", "555 123 4567"),
            ("1-800-555-0199", "1-800-555-0199"),
            ("123-456-7890", "123-456-7890"),
            ("tel:555-1234", "555-1234"),
            ("020 7946 0958", "020 7946 0958"),
            ("(020) 7946 0958", "(020) 7946 0958"),
            ("030-1234567", "030-1234567"),
            ("06 12 34 56 78", "06 12 34 56 78"),
            ("0044 20 7946 0958", "0044 20 7946 0958"),
        ] {
            assert_eq!(only(Entity::Phone, text), vec![phone], "{text}");
        }
    }

    #[test]
    fn phones_not_found() {
        for text in [
            "version 10.0.19041.1",
            "v1.2.3",
            "released 2024-01-15",
            "on 01-02-2024",
            "on 01.02.2024",
            "host 192.168.1.1",
            "order 5551234567",
            "timestamp 1700000000",
            "costs 200-1000 dollars",
            "pages 100-1000",
            "ORD-1234567",
            "id 555-123-4567-89",
            "x555-123-4567",
            "555-123-45678",
            "scores 85 90 78 92",
            "+12 34",
            "zip 12345-6789",
            "1.5551234567",
            "3.14159265",
            "$1,234,567",
            "0 1 2 3 4 5 6 7 8 9",
        ] {
            assert!(
                only(Entity::Phone, text).is_empty(),
                "{text}: {:?}",
                only(Entity::Phone, text)
            );
        }
    }

    #[test]
    fn international_numbers_stop_at_fifteen_digits() {
        assert_eq!(
            only(Entity::Phone, "+44 20 7946 0958 2024 was"),
            vec!["+44 20 7946 0958"]
        );
    }

    #[test]
    fn cards_found() {
        for (text, card) in [
            ("4111111111111111", "4111111111111111"),
            ("card 4111 1111 1111 1111 exp", "4111 1111 1111 1111"),
            ("5500-0000-0000-0004.", "5500-0000-0000-0004"),
            ("amex 3782 822463 10005", "3782 822463 10005"),
            ("6011000990139424", "6011000990139424"),
            ("4222222222222", "4222222222222"),
            ("4111 1111 1111 1111 2 items", "4111 1111 1111 1111"),
        ] {
            assert_eq!(only(Entity::CreditCard, text), vec![card], "{text}");
        }
    }

    #[test]
    fn cards_not_found() {
        for text in [
            "4111 1111 1111 1112",
            "order 1234567890123456",
            "4111111111111",
            "41111111111111111111111",
            "4111-1111-1111-1111-5",
            "4111111111111111x",
            "ref 12345678901234567890",
            "4111 1111  1111 1111",
        ] {
            assert!(only(Entity::CreditCard, text).is_empty(), "{text}");
        }
    }

    #[test]
    fn luhn_examples() {
        let digits = |s: &str| s.bytes().map(|b| b - b'0').collect::<Vec<u8>>();
        assert!(luhn(&digits("79927398713")));
        assert!(!luhn(&digits("79927398710")));
        assert!(luhn(&digits("4111111111111111")));
    }

    #[test]
    fn ssns() {
        for (text, ssn) in [
            ("ssn 123-45-6789", Some("123-45-6789")),
            ("078-05-1120.", Some("078-05-1120")),
            ("000-12-3456", None),
            ("666-12-3456", None),
            ("900-12-3456", None),
            ("123-00-4567", None),
            ("123-45-0000", None),
            ("123-45-67890", None),
            ("1123-45-6789", None),
            ("123-45-6789-1", None),
            ("123 45 6789", None),
        ] {
            assert_eq!(
                only(Entity::Ssn, text),
                ssn.into_iter().map(String::from).collect::<Vec<_>>(),
                "{text}"
            );
        }
    }

    #[test]
    fn masks_everything_in_one_text() {
        assert_eq!(
            masked("Jane (jane@example.com, +1 555-123-4567) paid with 4111-1111-1111-1111; SSN 123-45-6789."),
            "Jane ([EMAIL], [PHONE]) paid with [CREDIT_CARD]; SSN [SSN]."
        );
    }

    #[test]
    fn ordinary_text_is_untouched() {
        for text in [
            "Released v2.10.3 on 2024-01-15 at 10:30:00Z.",
            "Build 10.0.19041.1288, node 192.168.100.200:8080",
            "Total: $1,234,567.89 (about 1.2e6)",
            "ISBN 978-3-16-148410-0",
            "uuid 123e4567-e89b-12d3-a456-426614174000",
            "sha 3f786850e387550fdab836ed7e6dc881de23001b",
            "Invoice INV-2024-000123, PO 4500012345",
            "lines 120-180 and 300-1200",
            "Range 1000000 to 2000000, step 250000",
            "π ≈ 3.14159265358979",
            "Coordinates 40.7128, -74.0060",
            "See https://example.com/a/b?id=12345678901",
            "user@host is not an address; neither is @everyone",
            "Tracking 1Z999AA10123456784",
        ] {
            assert_eq!(masked(text), text);
        }
    }

    #[test]
    fn overlaps_prefer_email_then_ssn_then_card() {
        assert_eq!(masked("5551234567@example.com"), "[EMAIL]");
        assert_eq!(masked("4111111111111111@pay.example"), "[EMAIL]");
        assert_eq!(masked("123-45-6789"), "[SSN]");
    }

    #[test]
    fn subsets_only_find_their_kinds() {
        let text = "jane@example.com 555-123-4567";
        let phones_only = Entities::from_iter([Entity::Phone]);
        assert_eq!(
            mask(text, &find(text, phones_only)),
            "jane@example.com [PHONE]"
        );
    }

    #[test]
    fn unicode_letters_belong_to_addresses() {
        assert_eq!(
            masked("Grüße an jörg@bücher.de — danke"),
            "Grüße an [EMAIL] — danke"
        );
        assert_eq!(masked("naïve café 555-123-4567 ✓"), "naïve café [PHONE] ✓");
    }

    #[test]
    fn could_grow_cases() {
        let all = Entities::all();
        let numbers = Entities::from_iter([Entity::Phone, Entity::CreditCard, Entity::Ssn]);
        for text in [
            "call me at jane",
            "jane@",
            "jane@example.",
            "555",
            "555-",
            "(555) ",
            "+",
            "4111 1111 ",
        ] {
            assert!(could_grow(text, all), "{text}");
        }
        for text in ["", "Hello, ", "done!", "ok\n", "a; "] {
            assert!(!could_grow(text, all), "{text}");
        }
        assert!(!could_grow("Hello world", numbers));
        assert!(could_grow("Call 555 ", numbers));
        // Digits may be the start of an email's local part too.
        assert!(could_grow("Call 555", Entities::from_iter([Entity::Email])));
        assert!(could_grow("Grüße jörg", all));
    }
}
