//! Streamed text: the tokenizer's incremental decoder (never splits a UTF-8 character) plus
//! stop strings. Text that could be the start of a stop string is held back until it is known
//! not to be, so nothing past a stop string is ever emitted, and the chunks handed out add up
//! to exactly the final text.

use crate::error::Result;
use crate::tokenizer::TokenDecoder;

pub struct TextStream<'a> {
    decoder: TokenDecoder<'a>,
    stops: Vec<String>,
    text: String,
    emitted: usize,
    stopped: bool,
}

impl<'a> TextStream<'a> {
    pub fn new(decoder: TokenDecoder<'a>, stops: &[String]) -> Self {
        Self { decoder, stops: stops.to_vec(), text: String::new(), emitted: 0, stopped: false }
    }

    /// Adds a token; appends the text that is safe to show to `chunk`. Returns true when the
    /// text now contains a stop string (the text is cut before it).
    pub fn push(&mut self, token: u32, chunk: &mut String) -> Result<bool> {
        if self.stopped {
            return Ok(true);
        }
        if let Some(piece) = self.decoder.step(token)? {
            self.text.push_str(&piece);
        }
        // A stop string can only appear overlapping the text that is not yet emitted.
        let from = self.emitted.saturating_sub(self.stops.iter().map(String::len).max().unwrap_or(0));
        let from = floor_char_boundary(&self.text, from);
        let found = self.stops.iter().filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i)).min();
        if let Some(at) = found {
            self.text.truncate(at.max(self.emitted));
            self.stopped = true;
            self.flush(chunk);
            return Ok(true);
        }
        let safe = self.text.len() - self.held_back();
        chunk.push_str(&self.text[self.emitted..safe]);
        self.emitted = safe;
        Ok(false)
    }

    /// Releases any held-back text (the generation ended for another reason).
    pub fn flush(&mut self, chunk: &mut String) {
        chunk.push_str(&self.text[self.emitted..]);
        self.emitted = self.text.len();
    }

    pub fn into_text(self) -> String {
        self.text
    }

    /// Length of the longest suffix of the unemitted text that is a proper prefix of a stop string.
    fn held_back(&self) -> usize {
        let pending = &self.text[self.emitted..];
        let mut hold = 0;
        for s in &self.stops {
            for (k, _) in s.char_indices().skip(1) {
                if k > hold && pending.ends_with(&s[..k]) {
                    hold = k;
                }
            }
        }
        hold
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}
