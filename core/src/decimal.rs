//! Total bounds (`minTotalSales`, `min_total_sales`) as exact decimals.
//!
//! A bound is compared with `numeric` totals of any precision, so it is kept
//! as the decimal it was written as, never rounded through a double (which
//! keeps 15–17 significant digits: `1234567890123.4567` would read as
//! `...4568` and miss the row whose total it is). [`Bound::parse`] reads the
//! forms a number takes in a query string (`10`, `10.50`, `.5`, `1e3`,
//! `+2E-2`) into one canonical plain decimal (`10.5`, `0.5`, `1000`,
//! `0.02`), which is what SQL gets and what a cache key holds, so `10` and
//! `10.0` are one filter.

use std::cmp::Ordering;
use std::fmt;

/// Digits before the point a bound may have: up to 10^309 (exclusive), a
/// little past the largest double (about 1.8e308), which clients read
/// totals as.
pub const MAX_INTEGER_DIGITS: usize = 309;
/// Digits after the point a bound may have (`numeric` keeps up to 16,383).
pub const MAX_FRACTION_DIGITS: usize = 400;

/// A non-negative decimal in plain form: no sign, no exponent, no leading
/// zeros before the point (but `0`), no trailing zeros after it, no point
/// without digits after it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Bound(String);

/// Why a bound was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BoundError {
    /// Not a number (`abc`, `1,5`, `NaN`, `inf`).
    NotANumber,
    /// Below zero (`-1`, `-inf`).
    Negative,
    /// [`MAX_INTEGER_DIGITS`] digits before the point are too many (10^309 or more).
    TooLarge,
    /// More than [`MAX_FRACTION_DIGITS`] digits after the point.
    TooPrecise,
}

impl fmt::Display for BoundError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BoundError::NotANumber => "must be a number",
            BoundError::Negative => "must be at least 0",
            BoundError::TooLarge => "is out of range (10^309 or more)",
            BoundError::TooPrecise => "has too many digits after the point (at most 400)",
        })
    }
}

impl Bound {
    /// Reads `[+-]digits[.digits][e[+-]digits]` (digits on at least one
    /// side of the point); `NaN`, `inf` and `-inf` as Postgres and Rust
    /// spell them are refused as what they are.
    pub fn parse(raw: &str) -> Result<Bound, BoundError> {
        let s = raw.trim();
        let lower = s.to_ascii_lowercase();
        let unsigned = lower.trim_start_matches(['+', '-']);
        if matches!(unsigned, "nan") {
            return Err(BoundError::Negative);
        }
        if matches!(unsigned, "inf" | "infinity") {
            return Err(if lower.starts_with('-') {
                BoundError::Negative
            } else {
                BoundError::TooLarge
            });
        }
        let (negative, body) = match s.as_bytes().first() {
            Some(b'-') => (true, &s[1..]),
            Some(b'+') => (false, &s[1..]),
            _ => (false, s),
        };
        let (mantissa, exp) = match body.find(['e', 'E']) {
            Some(i) => (&body[..i], Some(&body[i + 1..])),
            None => (body, None),
        };
        let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        let digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
        if (int.is_empty() && frac.is_empty()) || !digits(int) || !digits(frac) {
            return Err(BoundError::NotANumber);
        }
        let exp: i64 = match exp {
            None => 0,
            Some(e) => {
                let d = e.strip_prefix(['+', '-']).unwrap_or(e);
                if d.is_empty() || !digits(d) {
                    return Err(BoundError::NotANumber);
                }
                // An exponent this long cannot leave a bound in range, one
                // way or the other: only its sign matters then.
                let d = d.trim_start_matches('0');
                let v: i64 = if d.len() > 9 {
                    1_000_000_000
                } else {
                    d.parse().unwrap_or(0)
                };
                if e.starts_with('-') {
                    -v
                } else {
                    v
                }
            }
        };
        // All digits, and where the point goes in them.
        let all: String = format!("{int}{frac}");
        let point = int.len() as i64 + exp;
        let first = all.bytes().position(|b| b != b'0');
        let Some(first) = first else {
            return Ok(Bound("0".into()));
        };
        if negative {
            return Err(BoundError::Negative);
        }
        let last = all.bytes().rposition(|b| b != b'0').unwrap_or(first);
        let sig = &all[first..=last];
        // Position of the first significant digit relative to the point:
        // digits before the point = point - first (when positive).
        let int_digits = point - first as i64;
        if int_digits > MAX_INTEGER_DIGITS as i64 {
            return Err(BoundError::TooLarge);
        }
        let frac_digits = sig.len() as i64 - int_digits;
        if frac_digits > MAX_FRACTION_DIGITS as i64 {
            return Err(BoundError::TooPrecise);
        }
        let mut out = String::with_capacity(sig.len() + 4);
        if int_digits <= 0 {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', (-int_digits) as usize));
            out.push_str(sig);
        } else if frac_digits <= 0 {
            out.push_str(sig);
            out.extend(std::iter::repeat_n('0', (-frac_digits) as usize));
        } else {
            let (a, b) = sig.split_at(int_digits as usize);
            out.push_str(a);
            out.push('.');
            out.push_str(b);
        }
        Ok(Bound(out))
    }

    /// The canonical plain decimal.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// In scientific form (`1e300`, `1.5e-7`, `1.7976931348623157e308`)
    /// where that is shorter than the plain one, else plain.
    pub fn short(&self) -> String {
        let s = &self.0;
        if s.len() <= 15 {
            return s.clone();
        }
        let (int, frac) = s.split_once('.').unwrap_or((s, ""));
        let all = format!("{int}{frac}");
        let first = all.bytes().position(|b| b != b'0').unwrap_or(0);
        let last = all.bytes().rposition(|b| b != b'0').unwrap_or(first);
        let sig = &all[first..=last];
        let exp = int.len() as i64 - first as i64 - 1;
        let mut out = String::new();
        out.push_str(&sig[..1]);
        if sig.len() > 1 {
            out.push('.');
            out.push_str(&sig[1..]);
        }
        out.push('e');
        out.push_str(&exp.to_string());
        if out.len() < s.len() {
            out
        } else {
            s.clone()
        }
    }
}

impl fmt::Display for Bound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialOrd for Bound {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Bound {
    /// By value: canonical forms compare by the length of their integer
    /// part, then digit by digit.
    fn cmp(&self, other: &Self) -> Ordering {
        let split = |s: &str| {
            let (i, f) = s.split_once('.').unwrap_or((s, ""));
            (i.to_string(), f.to_string())
        };
        let (ai, af) = split(&self.0);
        let (bi, bf) = split(&other.0);
        ai.len()
            .cmp(&bi.len())
            .then_with(|| ai.cmp(&bi))
            .then_with(|| af.cmp(&bf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> String {
        Bound::parse(s).unwrap().as_str().to_string()
    }

    #[test]
    fn forms_read_as_one_plain_decimal() {
        for (raw, want) in [
            ("10", "10"),
            ("10.0", "10"),
            ("010.500", "10.5"),
            (".5", "0.5"),
            ("5.", "5"),
            ("+2E-2", "0.02"),
            ("1e3", "1000"),
            ("1.25e1", "12.5"),
            ("0", "0"),
            ("-0", "0"),
            ("0e999999999", "0"),
            ("0.000", "0"),
            (" 7 ", "7"),
            ("1234567890123.4567", "1234567890123.4567"),
            ("99999999999.999999", "99999999999.999999"),
            ("1.1234567891234567891", "1.1234567891234567891"),
            ("12345e-2", "123.45"),
            ("1e-3", "0.001"),
        ] {
            assert_eq!(p(raw), want, "{raw}");
        }
        let max = p("1.7976931348623157e308");
        assert_eq!(max.len(), 309);
        assert!(max.starts_with("17976931348623157000"));
    }

    #[test]
    fn refusals_say_what_is_wrong() {
        use BoundError::*;
        for (raw, want) in [
            ("", NotANumber),
            (".", NotANumber),
            ("abc", NotANumber),
            ("1,5", NotANumber),
            ("1e", NotANumber),
            ("1e+", NotANumber),
            ("0x10", NotANumber),
            ("1_000", NotANumber),
            ("--1", NotANumber),
            ("NaN", Negative),
            ("-inf", Negative),
            ("-Infinity", Negative),
            ("inf", TooLarge),
            ("Infinity", TooLarge),
            ("-1", Negative),
            ("-0.001", Negative),
            ("1e309", TooLarge),
            ("1e400", TooLarge),
            ("1e99999999999999999999", TooLarge),
            ("1e-401", TooPrecise),
            ("1e-99999999999999999999", TooPrecise),
        ] {
            assert_eq!(Bound::parse(raw), Err(want), "{raw:?}");
        }
        assert!(Bound::parse("1e308").is_ok());
        assert!(Bound::parse("1e-400").is_ok());
    }

    #[test]
    fn order_is_by_value() {
        let b = |s| Bound::parse(s).unwrap();
        assert!(b("10") > b("9.999"));
        assert!(b("0.5") < b("0.50001"));
        assert!(b("100") > b("99"));
        assert_eq!(b("5").cmp(&b("5.0")), Ordering::Equal);
        assert!(b("0") < b("0.0001"));
        assert!(b("1234567890123.4567") > b("1234567890123.4566"));
    }

    #[test]
    fn short_forms_for_names() {
        let b = |s| Bound::parse(s).unwrap().short();
        assert_eq!(b("100.5"), "100.5");
        assert_eq!(b("123456789012.75"), "123456789012.75");
        assert_eq!(b("1e300"), "1e300");
        assert_eq!(b("1e-300"), "1e-300");
        assert_eq!(b("1.7976931348623157e308"), "1.7976931348623157e308");
        assert_eq!(b("1234567890123.4567"), "1234567890123.4567");
        assert_eq!(b("0.0000000000000015"), "1.5e-15");
    }
}
