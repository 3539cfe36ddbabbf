//! A fast, deterministic token estimate, for the mock provider and for budgets before a call.
//!
//! Real tokenizers need megabytes of tables; this one counts the pieces a BPE tokenizer typically
//! makes of English and code (a word of up to four letters or digits per token, each punctuation
//! mark its own token) and lands within about a fifth of OpenAI's counts on ordinary text.

/// Estimated tokens in `text`.
pub fn estimate(text: &str) -> u64 {
    // Prompts are mostly ASCII: classify bytes without decoding characters or consulting the
    // Unicode tables (a fifth of the instructions of a whole proxied call, before).
    if text.is_ascii() {
        return estimate_ascii(text.as_bytes());
    }
    let mut tokens = 0u64;
    let mut word_len = 0u32;
    for c in text.chars() {
        if c.is_alphanumeric() {
            if word_len.is_multiple_of(4) {
                tokens += 1;
            }
            word_len += 1;
        } else {
            word_len = 0;
            if !c.is_whitespace() {
                tokens += 1;
            }
        }
    }
    tokens
}

const SPACE: u8 = 0;
const ALNUM: u8 = 1;
const PUNCT: u8 = 2;

/// Each ASCII byte's class, as [`estimate`]'s character rules see it.
const CLASSES: [u8; 128] = {
    let mut classes = [PUNCT; 128];
    let mut byte = 0;
    while byte < 128 {
        let b = byte as u8;
        classes[byte] = if b.is_ascii_alphanumeric() {
            ALNUM
        } else if matches!(b, b'\t'..=b'\r' | b' ') {
            // `char::is_whitespace` in ASCII: tab to carriage return, and space.
            SPACE
        } else {
            PUNCT
        };
        byte += 1;
    }
    classes
};

/// [`estimate`] for ASCII: the same rules on bytes, without branches.
fn estimate_ascii(bytes: &[u8]) -> u64 {
    let mut tokens = 0u64;
    let mut word_len = 0u32;
    for &b in bytes {
        let class = CLASSES[usize::from(b & 0x7f)];
        let alnum = class == ALNUM;
        tokens += u64::from(class == PUNCT) + u64::from(alnum & (word_len & 3 == 0));
        word_len = if alnum { word_len + 1 } else { 0 };
    }
    tokens
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_words_long_words_and_punctuation() {
        assert_eq!(estimate(""), 0);
        assert_eq!(estimate("hello world"), 4);
        assert_eq!(estimate("Hi, you!"), 4);
        assert_eq!(estimate("a b c"), 3);
    }

    #[test]
    fn the_ascii_path_counts_as_the_general_one() {
        let general = |text: &str| {
            // Forces the character path: a non-ASCII whitespace adds nothing but a word break.
            estimate(&format!("{text}\u{2003}"))
        };
        for text in [
            "The quick brown fox, version 2.0, jumps!",
            "tabs\tand\nnewlines\x0bvertical\x0cfeed\r\n",
            "supercalifragilistic expialidocious 1234567890",
            "{\"json\": [1, 2, 3]} <tag/> ~`!@#$%^&*()",
        ] {
            assert_eq!(estimate(text), general(text), "{text:?}");
        }
    }
}
