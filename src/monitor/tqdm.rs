//! The tqdm progress-bar grammar, parsed by hand around its landmarks (`%|`, `| n/total [`,
//! `<`, `]`) rather than by the description, because the description is free text and the bar
//! cells can be Unicode blocks, ASCII digits or a terminal-wide run of spaces.
//!
//! Handles: `s/it` versus `it/s`, `?it/s`, an unknown total (`Steps: 120it [01:40,  1.20it/s]`),
//! hours above 99 (`27743:03:19`), bars cut short by a terminal width (no closing `]`), text
//! glued after the closing `]`, SI-scaled byte bars (recognised so they can be ignored), and both
//! postfix styles (`k=v, k=v` from `set_postfix` and ai-toolkit's `lr: 1.0e-04 loss: 3.2e-01`).
//! The printed percentage is ignored on purpose: it is rounded (`1999/2000` prints 100%).

use std::sync::LazyLock;

use memchr::memmem::Finder;

/// Built once: a searcher per call would cost more than the search on a 100-byte record.
static PERCENT_PIPE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"%|"));

/// One drawn state of a tqdm bar.
#[derive(Clone, Debug, PartialEq)]
pub struct Bar<'a> {
    /// The description before the percentage, without the `: ` separator.
    pub desc: &'a str,
    pub n: u64,
    pub total: Option<u64>,
    /// True for `unit_scale` bars (`4.19G/9.29G`, `54.2MB/s`): downloads, never training steps.
    pub scaled: bool,
    pub elapsed_seconds: Option<u64>,
    pub remaining_seconds: Option<u64>,
    pub seconds_per_step: Option<f64>,
    pub loss: Option<f64>,
    pub learning_rate: Option<f64>,
}

/// Position of an ASCII byte in `text`. The bar parser runs for every redraw, on short strings,
/// where `str::find(char)` spends more time setting up than searching.
fn find_byte(text: &str, byte: u8) -> Option<usize> {
    memchr::memchr(byte, text.as_bytes())
}

/// `text` split around the first `byte` (ASCII, so both halves are valid UTF-8).
fn split_once_byte(text: &str, byte: u8) -> Option<(&str, &str)> {
    find_byte(text, byte).map(|i| (&text[..i], &text[i + 1..]))
}

/// Parses a bar at the start of `text`. Returns the bar and any text glued after its `]`.
pub fn parse_bar(text: &str) -> Option<(Bar<'_>, &str)> {
    let bytes = text.as_bytes();
    match PERCENT_PIPE.find(bytes) {
        Some(pct) => parse_with_total(text, pct),
        None => parse_without_total(text),
    }
}

fn parse_with_total(text: &str, pct: usize) -> Option<(Bar<'_>, &str)> {
    // Left of `%|`: `desc: ` then the percentage `{:3.0f}`.
    let left = &text[..pct];
    let digits_start = left.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    if digits_start == left.len() {
        return None;
    }
    let desc = left[..digits_start].trim_end().trim_end_matches(':').trim();
    // The bar cells run to the next `|`.
    let after_cells = &text[pct + 2..];
    let pipe = find_byte(after_cells, b'|')?;
    let mut rest = after_cells[pipe + 1..].trim_start();
    let (n, n_scaled) = take_count(&mut rest)?;
    rest = rest.strip_prefix('/')?;
    let (total, total_scaled) = if let Some(r) = rest.strip_prefix('?') {
        rest = r;
        (None, false)
    } else {
        let (t, s) = take_count(&mut rest)?;
        (Some(t), s)
    };
    let mut bar = Bar {
        desc,
        n: n.round() as u64,
        total: total.map(|t| t.round() as u64),
        scaled: n_scaled || total_scaled,
        elapsed_seconds: None,
        remaining_seconds: None,
        seconds_per_step: None,
        loss: None,
        learning_rate: None,
    };
    let Some(r) = rest.strip_prefix(" [") else {
        // A bar cut by the terminal width: the counts are all there is.
        return Some((bar, ""));
    };
    let glued = parse_bracket(r, &mut bar, true);
    Some((bar, glued))
}

/// `desc: {n}{unit} [{elapsed}, {rate}{postfix}]`, the form tqdm uses without a total.
fn parse_without_total(text: &str) -> Option<(Bar<'_>, &str)> {
    let open = text.find(" [")?;
    let head = &text[..open];
    let (desc, count) = match head.rfind(": ") {
        Some(i) => (head[..i].trim(), &head[i + 2..]),
        None => ("", head),
    };
    let count = count.trim();
    let number_len = count.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(count.len());
    if number_len == 0 {
        return None;
    }
    let (number, unit) = count.split_at(number_len);
    if !unit.chars().all(|c| c.is_ascii_alphabetic()) {
        return None;
    }
    let inner = &text[open + 2..];
    // Require `elapsed, rate` so ordinary log lines with brackets are not taken for bars.
    let comma = inner.find(", ")?;
    parse_duration(&inner[..comma])?;
    if inner[comma + 2..].trim_start().split(['/', ',', ']']).next().is_none_or(str::is_empty) {
        return None;
    }
    let mut bar = Bar {
        desc,
        n: number.parse::<f64>().ok()?.round() as u64,
        total: None,
        scaled: number.contains('.') || unit.len() > 2 && unit != "it",
        elapsed_seconds: None,
        remaining_seconds: None,
        seconds_per_step: None,
        loss: None,
        learning_rate: None,
    };
    let glued = parse_bracket(inner, &mut bar, false);
    Some((bar, glued))
}

/// Parses `elapsed<remaining, rate, postfix]` (or `elapsed, rate...` without a total) into
/// `bar`, returning what follows the closing `]`. Stops quietly where a cut bar ends.
/// Fields are split on `,` by hand: this runs for every bar redraw, and a substring searcher per
/// call costs more than the rest of the parse.
fn parse_bracket<'a>(inner: &'a str, bar: &mut Bar<'_>, with_remaining: bool) -> &'a str {
    let (body, glued) = split_once_byte(inner, b']').unwrap_or((inner, ""));
    let (times, rest) = split_field(body);
    if with_remaining {
        let (elapsed, remaining) = split_once_byte(times, b'<').unwrap_or((times, ""));
        bar.elapsed_seconds = parse_duration(elapsed);
        bar.remaining_seconds = parse_duration(remaining);
    } else {
        bar.elapsed_seconds = parse_duration(times);
    }
    let Some(rest) = rest else { return glued };
    let (rate, postfix) = split_field(rest);
    let (seconds_per_step, scaled) = parse_rate(rate.trim());
    bar.seconds_per_step = seconds_per_step;
    bar.scaled |= scaled;
    if let Some(postfix) = postfix {
        parse_postfix(postfix, bar);
    }
    glued
}

/// Splits at the first `,`: the field, and what follows (without the separating space).
fn split_field(text: &str) -> (&str, Option<&str>) {
    match split_once_byte(text, b',') {
        Some((field, rest)) => (field, Some(rest.strip_prefix(' ').unwrap_or(rest))),
        None => (text, None),
    }
}

/// A count such as `1800`, `4.19G` or `1.5k`; returns the value and whether it was scaled.
fn take_count(rest: &mut &str) -> Option<(f64, bool)> {
    let s = *rest;
    let len = s.bytes().position(|b| !(b.is_ascii_digit() || b == b'.')).unwrap_or(s.len());
    if len == 0 {
        return None;
    }
    let mut value: f64 = s[..len].parse().ok()?;
    let mut scaled = s[..len].contains('.');
    let mut end = len;
    if let Some(multiplier) = s[len..].chars().next().and_then(si_multiplier) {
        value *= multiplier;
        scaled = true;
        end += 1;
    }
    *rest = &s[end..];
    Some((value, scaled))
}

fn si_multiplier(c: char) -> Option<f64> {
    let power = match c {
        'k' => 1,
        'M' => 2,
        'G' => 3,
        'T' => 4,
        'P' => 5,
        'E' => 6,
        'Z' => 7,
        'Y' => 8,
        _ => return None,
    };
    Some(1000f64.powi(power))
}

/// `[-][D days, ][H:]MM:SS` to seconds; `?` and anything else give `None`. The hour field has
/// no upper bound in tqdm's output.
pub fn parse_duration(text: &str) -> Option<u64> {
    let text = text.trim();
    let mut text = text.strip_prefix('-').unwrap_or(text);
    let mut days = 0u64;
    if memchr::memchr(b'd', text.as_bytes()).is_some() {
        let (d, rest) = text.split_once(" day")?;
        days = d.trim().parse().ok()?;
        text = rest.trim_start_matches('s').trim_start_matches(',').trim();
    }
    // Up to three `:`-separated numbers, read byte by byte (this runs twice per bar redraw).
    let mut fields = [0u64; 3];
    let mut count = 0;
    let mut digits = 0;
    for byte in text.bytes() {
        match byte {
            b'0'..=b'9' => {
                let field = fields.get_mut(count)?;
                *field = field.checked_mul(10)?.checked_add(u64::from(byte - b'0'))?;
                digits += 1;
            }
            b':' if digits > 0 => {
                count += 1;
                digits = 0;
            }
            _ => return None,
        }
    }
    if digits == 0 {
        return None;
    }
    let (hours, minutes, seconds) = match count {
        1 => (0, fields[0], fields[1]),
        2 => (fields[0], fields[1], fields[2]),
        _ => return None,
    };
    days.checked_mul(24)?
        .checked_add(hours)?
        .checked_mul(60)?
        .checked_add(minutes)?
        .checked_mul(60)?
        .checked_add(seconds)
}

/// `2.39it/s`, ` 4.50s/it`, `?it/s`, `54.2MB/s` to seconds per step (and whether it is a byte
/// or otherwise scaled rate).
fn parse_rate(rate: &str) -> (Option<f64>, bool) {
    if let Some(value) = rate.strip_suffix("s/it") {
        return (value.trim().parse::<f64>().ok().filter(|v| *v > 0.0), false);
    }
    let Some(value) = rate.strip_suffix("/s") else {
        return (None, false);
    };
    if let Some(unit) = value.strip_prefix('?') {
        // `?it/s` before the first update; `?B/s` on a download that has not started.
        return (None, !(unit == "it" || unit.is_empty()));
    }
    let number_len = value.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(value.len());
    let unit = &value[number_len..];
    let scaled = !(unit == "it" || unit.is_empty() || unit == "step" || unit == "steps");
    let per_second = value[..number_len].parse::<f64>().ok().filter(|v| *v > 0.0);
    (per_second.map(|v| 1.0 / v), scaled)
}

/// Postfix: `avr_loss=0.123`, `loss=0.0123, lr=0.0001` or `lr: 1.0e-04 loss: 5.871e-01`.
fn parse_postfix(postfix: &str, bar: &mut Bar<'_>) {
    let mut assign = |key: &str, value: &str| {
        let value = value.trim_ascii();
        let value = value.strip_suffix(',').unwrap_or(value);
        match key.trim_ascii() {
            "loss" | "avr_loss" | "avg_loss" | "train_loss" => bar.loss = value.parse().ok(),
            "lr" | "learning_rate" => bar.learning_rate = value.parse().ok(),
            _ => {}
        }
    };
    if find_byte(postfix, b'=').is_some() {
        let mut rest = postfix;
        loop {
            let (pair, next) = split_once_byte(rest, b',').unwrap_or((rest, ""));
            if let Some((key, value)) = split_once_byte(pair, b'=') {
                assign(key, value);
            }
            if next.is_empty() {
                break;
            }
            rest = next;
        }
    } else {
        // ai-toolkit's `lr: 1.0e-04 loss: 3.214e-01`: `key:` tokens each followed by a value.
        let mut tokens = postfix.as_bytes().split(|b| *b == b' ').filter(|t| !t.is_empty());
        while let Some(token) = tokens.next() {
            if let Some(key) = token.strip_suffix(b":")
                && let Some(value) = tokens.next()
                && let (Ok(key), Ok(value)) = (std::str::from_utf8(key), std::str::from_utf8(value))
            {
                assign(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bar(text: &str) -> Bar<'_> {
        parse_bar(text).expect("a bar").0
    }

    #[test]
    fn ai_toolkit_bar_with_it_per_second_and_colon_postfix() {
        let b = bar(
            "my_first_flux_lora_v1:  45%|████▌     | 1800/4000 [12:34<15:20,  2.39it/s, lr: 1.0e-04 loss: 3.214e-01]",
        );
        assert_eq!(b.desc, "my_first_flux_lora_v1");
        assert_eq!((b.n, b.total), (1800, Some(4000)));
        assert_eq!((b.elapsed_seconds, b.remaining_seconds), (Some(754), Some(920)));
        assert!((b.seconds_per_step.unwrap() - 1.0 / 2.39).abs() < 1e-9);
        assert_eq!((b.learning_rate, b.loss), (Some(1e-4), Some(0.3214)));
        assert!(!b.scaled);
    }

    #[test]
    fn seconds_per_iteration_and_big_hours() {
        let b = bar("x:   0%|          | 5/4000 [55:33:20<27743:03:19, 25000.00s/it]");
        assert_eq!(b.seconds_per_step, Some(25000.0));
        assert_eq!(b.elapsed_seconds, Some(55 * 3600 + 33 * 60 + 20));
        assert_eq!(b.remaining_seconds, Some(27743 * 3600 + 3 * 60 + 19));
    }

    #[test]
    fn unknown_rate_and_remaining_are_none() {
        let b = bar("my_lora:   0%|          | 0/2000 [00:00<?, ?it/s]");
        assert_eq!((b.n, b.total, b.seconds_per_step, b.remaining_seconds), (0, Some(2000), None, None));
        assert!(!b.scaled, "`?it/s` is a step rate");
    }

    #[test]
    fn bar_without_total() {
        let b = bar("Steps: 120it [01:40,  1.20it/s]");
        assert_eq!((b.desc, b.n, b.total, b.elapsed_seconds), ("Steps", 120, None, Some(100)));
        assert!(!b.scaled);
    }

    #[test]
    fn byte_bars_are_marked_scaled() {
        assert!(bar("model.safetensors:  45%|████▌     | 4.19G/9.29G [01:23<01:41, 54.2MB/s]").scaled);
    }

    #[test]
    fn glued_text_after_the_bar_is_returned() {
        let (b, glued) = parse_bar("Steps: 100%|██████████| 500/500 [15:00<00:00,  1.80s/it, loss=0.231, lr=1]08/02/2026 11:04:12 - INFO - __main__ - Saved state to out/checkpoint-500").unwrap();
        assert_eq!((b.n, b.loss, b.learning_rate), (500, Some(0.231), Some(1.0)));
        assert!(glued.starts_with("08/02/2026"));
    }

    #[test]
    fn bar_cut_by_the_terminal_has_counts_and_no_postfix() {
        let b = bar("steps:  10%|█         | 100/1000 [01:23<12:36,  1.19it/s, avr_lo");
        assert_eq!((b.n, b.total, b.loss), (100, Some(1000), None));
        let b = bar("steps:  10%|█         | 100/1000");
        assert_eq!(b.n, 100);
    }

    #[test]
    fn nan_loss_and_ascii_cells() {
        let b = bar("steps:  30%|###       | 480/1600 [19:10<44:43,  2.40s/it, avr_loss=nan]");
        assert!(b.loss.unwrap().is_nan());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("05:12"), Some(312));
        assert_eq!(parse_duration("4:37:30"), Some(4 * 3600 + 37 * 60 + 30));
        assert_eq!(parse_duration("1 day, 2:00:00"), Some(26 * 3600));
        assert_eq!(parse_duration("?"), None);
        assert_eq!(parse_duration("12"), None);
        assert_eq!(parse_duration("1:2:3:4"), None);
    }

    #[test]
    fn ordinary_lines_are_not_bars() {
        assert!(parse_bar("Saving at step 250").is_none());
        assert!(parse_bar("loaded [3 files] fine").is_none());
        assert!(parse_bar("progress 50%| broken").is_none());
    }
}
