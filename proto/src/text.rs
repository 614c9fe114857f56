//! Escaping text that people read: names, commands, subjects.
//!
//! Much of what the broker and `shmbusctl` print was chosen by a client:
//! the name it sent in `Hello`, its command name (from `/proc`), the
//! subjects and patterns it used. A subject may not hold whitespace or a
//! control character, but a name or command may hold anything, and a
//! subject may still hold Unicode format characters. Printed as is, a
//! newline forges a log line or a table row, an escape sequence moves the
//! terminal's cursor or recolours what follows, and a bidi override
//! (U+202E) shows text in another order than it has.
//!
//! [`escape`] makes such a string safe to print on one line: it returns
//! it unchanged (borrowed, no allocation) when every character is
//! printable, and otherwise writes
//!
//! - newline, carriage return and tab as `\n`, `\r`, `\t`, and ESC as `\e`;
//! - every other control character (C0, DEL, C1) as `\u{..}` in hex;
//! - every Unicode format character (general category Cf: the bidi
//!   embeddings, overrides, isolates and marks, zero-width spaces and
//!   joiners, the byte-order mark, tag characters, the soft hyphen…) and
//!   the line and paragraph separators (U+2028, U+2029) as `\u{..}`;
//! - a backslash as `\\`, always, so the result is unambiguous: a name
//!   that spells `\n` literally prints as `\\n`, never like an escaped
//!   newline, and every output has exactly one input.
//!
//! Everything else, including letters of any script and emoji, is left as
//! it is: the point is that a client-chosen string cannot act on the
//! terminal or the log, not that it be ASCII. The broker's logs and
//! `shmbusctl` use this one function, so both show a name the same way.

use std::borrow::Cow;
use std::fmt::Write as _;

use crate::limits::MAX_QUOTED_CHARS;

/// `s`, cut to at most `max` bytes at a character boundary.
pub fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A peer's string quoted for a message about it: in double quotes,
/// escaped as `{:?}` escapes it, and past [`MAX_QUOTED_CHARS`] characters
/// cut, with the length it had: `"abc…" (70000 bytes)`. So a refusal of
/// a string that fills a packet is short, and still says what it was.
pub fn quote(s: &str) -> String {
    match s.char_indices().nth(MAX_QUOTED_CHARS) {
        None => format!("{s:?}"),
        Some((end, _)) => {
            let shown = format!("{:?}", &s[..end]);
            format!("{}…\" ({} bytes)", &shown[..shown.len() - 1], s.len())
        }
    }
}

/// `s`, safe to print on one line: unchanged when printable, else with
/// control characters, format (bidi) characters and backslashes escaped
/// as described in the [module documentation](self).
pub fn escape(s: &str) -> Cow<'_, str> {
    let Some(first) = s.char_indices().find(|&(_, c)| needs_escape(c)).map(|(i, _)| i) else {
        return Cow::Borrowed(s);
    };
    let mut out = String::with_capacity(s.len() + 8);
    out.push_str(&s[..first]);
    for c in s[first..].chars() {
        push_escaped(&mut out, c);
    }
    Cow::Owned(out)
}

/// Whether `escape` rewrites `c`.
fn needs_escape(c: char) -> bool {
    match c {
        // Printable ASCII: only the escape character itself.
        ' '..='~' => c == '\\',
        _ => c.is_control() || is_format(c),
    }
}

fn push_escaped(out: &mut String, c: char) {
    match c {
        '\\' => out.push_str("\\\\"),
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        '\u{1b}' => out.push_str("\\e"),
        c if needs_escape(c) => {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
        c => out.push(c),
    }
}

/// Unicode general category Cf (format characters, as of Unicode 15.1),
/// plus the line and paragraph separators (Zl, Zp), which some terminals
/// and log viewers break lines at. None of these is visible by itself;
/// each changes how the text around it is shown.
fn is_format(c: char) -> bool {
    matches!(
        c,
        '\u{ad}'
            | '\u{600}'..='\u{605}'
            | '\u{61c}'
            | '\u{6dd}'
            | '\u{70f}'
            | '\u{890}'..='\u{891}'
            | '\u{8e2}'
            | '\u{180e}'
            | '\u{200b}'..='\u{200f}'
            | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206f}'
            | '\u{feff}'
            | '\u{fff9}'..='\u{fffb}'
            | '\u{110bd}'
            | '\u{110cd}'
            | '\u{13430}'..='\u{1343f}'
            | '\u{1bca0}'..='\u{1bca3}'
            | '\u{1d173}'..='\u{1d17a}'
            | '\u{e0001}'
            | '\u{e0020}'..='\u{e007f}'
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_cuts_at_a_character_boundary() {
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip("abcdef", 3), "abc");
        // "é" is two bytes: a cut inside it goes back before it.
        assert_eq!(clip("aé", 2), "a");
        assert_eq!(clip("aé", 3), "aé");
        let long = "é".repeat(5000);
        let c = clip(&long, 4096);
        assert_eq!(c.len(), 4096);
        assert!(clip(&long, 4095).len() == 4094);
    }

    #[test]
    fn quote_is_debug_quoting_cut_with_the_length() {
        assert_eq!(quote("a.b"), "\"a.b\"");
        assert_eq!(quote("a\nb"), "\"a\\nb\"");
        let exact = "x".repeat(MAX_QUOTED_CHARS);
        assert_eq!(quote(&exact), format!("{exact:?}"));
        let long = "\u{1}".repeat(15_000);
        let q = quote(&long);
        assert!(q.ends_with("…\" (15000 bytes)"), "{q}");
        assert_eq!(q.matches("\\u{1}").count(), MAX_QUOTED_CHARS, "{q}");
        assert!(q.len() < 500);
        // Multi-byte characters are counted as characters, cut whole.
        let wide = "é".repeat(100);
        let q = quote(&wide);
        assert!(q.starts_with(&format!("\"{}…\"", "é".repeat(MAX_QUOTED_CHARS))), "{q}");
    }

    /// The inverse of `escape`, to show that no two inputs print alike.
    fn unescape(s: &str) -> String {
        let mut out = String::new();
        let mut it = s.chars();
        while let Some(c) = it.next() {
            if c != '\\' {
                out.push(c);
                continue;
            }
            match it.next().expect("dangling backslash") {
                '\\' => out.push('\\'),
                'n' => out.push('\n'),
                'r' => out.push('\r'),
                't' => out.push('\t'),
                'e' => out.push('\u{1b}'),
                'u' => {
                    assert_eq!(it.next(), Some('{'));
                    let hex: String = it.by_ref().take_while(|&c| c != '}').collect();
                    out.push(char::from_u32(u32::from_str_radix(&hex, 16).unwrap()).unwrap());
                }
                other => panic!("unknown escape \\{other}"),
            }
        }
        out
    }

    #[test]
    fn printable_text_is_borrowed_unchanged() {
        for s in
            ["", "sensors.kitchen.temp", "my app (v2) ~ 100%", "café", "温度.センサー", "📈 rates", "a/b:c"]
        {
            assert!(matches!(escape(s), Cow::Borrowed(b) if b == s), "{s:?}");
        }
    }

    #[test]
    fn line_breaks_and_terminal_controls_are_escaped() {
        assert_eq!(escape("evil\nshmbusd: client 1 connected"), "evil\\nshmbusd: client 1 connected");
        assert_eq!(escape("a\r\tb"), "a\\r\\tb");
        assert_eq!(escape("\u{1b}[2J\u{1b}]0;title\u{7}"), "\\e[2J\\e]0;title\\u{7}");
        assert_eq!(escape("nul\0del\u{7f}"), "nul\\u{0}del\\u{7f}");
        // C1 controls: CSI and NEL act like ESC [ and a newline on some terminals.
        assert_eq!(escape("x\u{9b}31mred\u{85}y"), "x\\u{9b}31mred\\u{85}y");
    }

    #[test]
    fn bidi_and_invisible_characters_are_escaped() {
        assert_eq!(escape("file\u{202e}txt.exe"), "file\\u{202e}txt.exe");
        assert_eq!(escape("\u{2066}a\u{2069}"), "\\u{2066}a\\u{2069}");
        assert_eq!(escape("ad\u{200b}min"), "ad\\u{200b}min");
        assert_eq!(escape("\u{feff}name"), "\\u{feff}name");
        assert_eq!(escape("line\u{2028}sep"), "line\\u{2028}sep");
        assert_eq!(escape("tag\u{e0041}"), "tag\\u{e0041}");
        assert_eq!(escape("soft\u{ad}hyphen"), "soft\\u{ad}hyphen");
    }

    #[test]
    fn backslash_is_always_doubled_so_escapes_cannot_be_forged() {
        assert_eq!(escape("C:\\dir"), "C:\\\\dir");
        // A literal backslash-n and a real newline print differently.
        assert_ne!(escape("a\\nb"), escape("a\nb"));
        assert_eq!(escape("a\\nb"), "a\\\\nb");
    }

    #[test]
    fn output_is_printable_and_round_trips_for_every_char() {
        let mut all = String::new();
        for c in (0..=0x10ffff).filter_map(char::from_u32) {
            let e = escape(c.encode_utf8(&mut [0; 4])).into_owned();
            assert!(!e.chars().any(|c| c.is_control() || is_format(c)), "{:x} -> {e:?}", c as u32);
            assert_eq!(unescape(&e), c.to_string(), "{:x}", c as u32);
            all.push(c);
        }
        // And the whole range as one string, escaped in one go.
        assert_eq!(unescape(&escape(&all)), all);
    }

    #[test]
    fn mixed_strings_round_trip() {
        for s in ["\\u{41}", "a\\", "\\\\\n", "ok\u{202e}\\e\u{1b}", "末尾\n"] {
            assert_eq!(unescape(&escape(s)), s, "{s:?}");
        }
    }
}
