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

/// Where the ASCII scan is: outside a word, or inside one whose length so far is 1, 2, 3 or 0
/// modulo 4 (states 1 to 4). A token starts at a word's letters 1, 5, 9... and at each
/// punctuation mark.
const OUTSIDE: u8 = 0;
const STATES: usize = 8;

/// For each state and ASCII byte (`state * 128 + byte`): the next state in the low three bits,
/// and in bit 3 whether the byte starts a token. States 5 to 7 never occur; they keep the index in
/// bounds for any three-bit state.
const STEPS: [u8; STATES * 128] = {
    const STARTS_TOKEN: u8 = 8;
    let mut steps = [0u8; STATES * 128];
    let mut state = 0;
    while state < STATES {
        let mut byte = 0;
        while byte < 128 {
            let b = byte as u8;
            steps[state * 128 + byte] = if b.is_ascii_alphanumeric() {
                match state {
                    1..=3 => state as u8 + 1,
                    _ => 1 | STARTS_TOKEN,
                }
            } else if matches!(b, b'\t'..=b'\r' | b' ') {
                // `char::is_whitespace` in ASCII: tab to carriage return, and space.
                OUTSIDE
            } else {
                OUTSIDE | STARTS_TOKEN
            };
            byte += 1;
        }
        state += 1;
    }
    steps
};

/// [`estimate`] for ASCII: the same rules as a table-driven state machine, a few instructions a
/// byte.
fn estimate_ascii(bytes: &[u8]) -> u64 {
    let mut tokens = 0u64;
    let mut state = OUTSIDE;
    for &b in bytes {
        let step = STEPS[usize::from(state & 7) * 128 + usize::from(b & 0x7f)];
        state = step & 7;
        tokens += u64::from(step >> 3);
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
        // Words of every length against every kind of break, in random order.
        let pieces = [
            "a", "bc", "def", "ghij", "klmno", "7", " ", "\t", "\n", ",", "!!", "_",
        ];
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..2_000 {
            let text: String = (0..rng.usize(0..40))
                .map(|_| pieces[rng.usize(..pieces.len())])
                .collect();
            assert_eq!(estimate(&text), general(&text), "{text:?}");
        }
    }
}
