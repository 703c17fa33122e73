//! Postgres' on-disk `numeric` format, decoded without Postgres.
//!
//! The extension reads the numbers inside jsonb in place (see the
//! extension's `jsonb.rs`); decoding the digits here avoids `numeric_out` and
//! `strtod` for every number of every row the CHECK constraint sees. The
//! layout (src/backend/utils/adt/numeric.c) has been stable since 9.1.

/// A numeric's parts: value = sign * sum(digits[i] * 10000^(weight - i)).
#[derive(Debug, PartialEq)]
pub struct Decoded {
    pub special: Option<f64>,
    pub negative: bool,
    pub weight: i32,
    pub dscale: u16,
    /// The first (most significant) base-10000 digits; 8 of them are 32
    /// decimal digits, more than f64 or i64 can hold.
    pub digits: [u16; 8],
    pub n_digits: usize,
}

const NUMERIC_SIGN_MASK: u16 = 0xC000;
const NUMERIC_NEG: u16 = 0x4000;
const NUMERIC_SHORT: u16 = 0x8000;
const NUMERIC_SPECIAL: u16 = 0xC000;
const NUMERIC_EXT_SIGN_MASK: u16 = 0xF000;
const NUMERIC_PINF: u16 = 0xD000;
const NUMERIC_NINF: u16 = 0xF000;
const NUMERIC_DSCALE_MASK: u16 = 0x3FFF;
const NUMERIC_SHORT_SIGN_MASK: u16 = 0x2000;
const NUMERIC_SHORT_DSCALE_MASK: u16 = 0x1F80;
const NUMERIC_SHORT_DSCALE_SHIFT: u16 = 7;
const NUMERIC_SHORT_WEIGHT_SIGN_MASK: u16 = 0x0040;
const NUMERIC_SHORT_WEIGHT_MASK: u16 = 0x003F;

/// A finite numeric's header, read without copying its digits: what the
/// CHECK constraint and the row totals need of most numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Header {
    pub negative: bool,
    pub weight: i32,
    pub dscale: u16,
    /// Index of the first digit word.
    pub first: usize,
    /// Number of base-10000 digits (Postgres strips leading and trailing
    /// zero digits, and gives zero none).
    pub n_digits: usize,
}

impl Header {
    /// Reads the header from the numeric's 16-bit words after the varlena
    /// header; `Err` holds the value of NaN and the infinities.
    pub fn from_words(n_words: usize, word: impl Fn(usize) -> u16) -> Result<Header, f64> {
        if n_words == 0 {
            return Err(f64::NAN);
        }
        let header = word(0);
        if header & NUMERIC_SIGN_MASK == NUMERIC_SPECIAL {
            return Err(match header & NUMERIC_EXT_SIGN_MASK {
                NUMERIC_PINF => f64::INFINITY,
                NUMERIC_NINF => f64::NEG_INFINITY,
                _ => f64::NAN,
            });
        }
        let (negative, weight, dscale, first) = if header & NUMERIC_SIGN_MASK == NUMERIC_SHORT {
            let w = (header & NUMERIC_SHORT_WEIGHT_MASK) as i32;
            let w = if header & NUMERIC_SHORT_WEIGHT_SIGN_MASK != 0 {
                w | !(NUMERIC_SHORT_WEIGHT_MASK as i32)
            } else {
                w
            };
            let dscale = (header & NUMERIC_SHORT_DSCALE_MASK) >> NUMERIC_SHORT_DSCALE_SHIFT;
            (header & NUMERIC_SHORT_SIGN_MASK != 0, w, dscale, 1)
        } else {
            let w = if n_words > 1 {
                word(1) as i16 as i32
            } else {
                0
            };
            (
                header & NUMERIC_SIGN_MASK == NUMERIC_NEG,
                w,
                header & NUMERIC_DSCALE_MASK,
                2,
            )
        };
        Ok(Header {
            negative,
            weight,
            dscale,
            first,
            n_digits: n_words.saturating_sub(first),
        })
    }

    /// The number's [`crate::json::NumberClass`], exactly: 1e12 is
    /// 10000^3, so a value is above it when its first digit sits past
    /// 10000^3, or at it with anything more than a lone 1 (Postgres strips
    /// leading and trailing zero digits, and a negative zero has no digits).
    pub fn class(&self, word: impl Fn(usize) -> u16) -> crate::json::NumberClass {
        let nonzero = self.n_digits > 0;
        let above_max = nonzero
            && (self.weight > 3
                || (self.weight == 3 && (word(self.first) > 1 || self.n_digits > 1)));
        crate::json::NumberClass {
            special: false,
            negative: nonzero && self.negative,
            above_max,
            fractional: self.n_digits as i32 > self.weight + 1,
        }
    }

    /// The value in units of 10^-(4 * `fraction_digits`), when it has at
    /// most that many base-10000 digits after the point and at most
    /// `whole_digits` before it (so that the result fits an i128).
    pub fn units(
        &self,
        word: impl Fn(usize) -> u16,
        fraction_digits: i32,
        whole_digits: i32,
    ) -> Option<i128> {
        let last = self.n_digits as i32 - 1;
        if last - self.weight > fraction_digits || self.weight >= whole_digits {
            return None;
        }
        let mut v: i128 = 0;
        for i in 0..self.n_digits {
            let power = self.weight - i as i32 + fraction_digits;
            v += word(self.first + i) as i128 * 10_000i128.pow(power as u32);
        }
        Some(if self.negative { -v } else { v })
    }
}

impl Decoded {
    fn special(v: f64) -> Decoded {
        Decoded {
            special: Some(v),
            negative: false,
            weight: 0,
            dscale: 0,
            digits: [0; 8],
            n_digits: 0,
        }
    }

    /// Decodes from the numeric's 16-bit words after the varlena header.
    pub fn from_words(n_words: usize, word: impl Fn(usize) -> u16) -> Decoded {
        let h = match Header::from_words(n_words, &word) {
            Ok(h) => h,
            Err(special) => return Decoded::special(special),
        };
        let mut digits = [0u16; 8];
        let n_digits = h.n_digits.min(8);
        for (i, d) in digits.iter_mut().enumerate().take(n_digits) {
            *d = word(h.first + i);
        }
        Decoded {
            special: None,
            negative: h.negative,
            weight: h.weight,
            dscale: h.dscale,
            digits,
            n_digits,
        }
    }

    pub fn to_f64(&self) -> f64 {
        if let Some(s) = self.special {
            return s;
        }
        let mut v = 0f64;
        for d in &self.digits[..self.n_digits] {
            v = v * 10000.0 + *d as f64;
        }
        let v = v * 10000f64.powi(self.weight - (self.n_digits as i32 - 1));
        if self.negative {
            -v
        } else {
            v
        }
    }

    /// The value when it is written as a whole number (display scale 0, as
    /// `2024` but not `2024.0`) and fits an i64.
    pub fn to_i64(&self) -> Option<i64> {
        if self.special.is_some() || self.dscale != 0 {
            return None;
        }
        if self.n_digits == 0 {
            return Some(0);
        }
        // With display scale 0 there are no fractional digits: weight >= 0.
        if self.weight < 0 || self.weight > 4 || self.n_digits > self.weight as usize + 1 {
            return None;
        }
        let mut v: i128 = 0;
        for i in 0..=self.weight as usize {
            v = v * 10000
                + self
                    .digits
                    .get(i)
                    .copied()
                    .filter(|_| i < self.n_digits)
                    .unwrap_or(0) as i128;
        }
        i64::try_from(if self.negative { -v } else { v }).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn short(negative: bool, dscale: u16, weight: i32, digits: &[u16]) -> Decoded {
        let mut header = NUMERIC_SHORT | (dscale << NUMERIC_SHORT_DSCALE_SHIFT);
        if negative {
            header |= NUMERIC_SHORT_SIGN_MASK;
        }
        header |= (weight as u16) & (NUMERIC_SHORT_WEIGHT_MASK | NUMERIC_SHORT_WEIGHT_SIGN_MASK);
        let words: Vec<u16> = std::iter::once(header)
            .chain(digits.iter().copied())
            .collect();
        Decoded::from_words(words.len(), |i| words[i])
    }

    #[test]
    fn decodes_short_numerics() {
        // 1234.5678 = [1234, 5678], weight 0, dscale 4
        let d = short(false, 4, 0, &[1234, 5678]);
        assert!((d.to_f64() - 1234.5678).abs() < 1e-9);
        assert_eq!(d.to_i64(), None);
        // 2024
        let d = short(false, 0, 0, &[2024]);
        assert_eq!((d.to_f64(), d.to_i64()), (2024.0, Some(2024)));
        // 1e12 = [1], weight 3
        let d = short(false, 0, 3, &[1]);
        assert_eq!((d.to_f64(), d.to_i64()), (1e12, Some(1_000_000_000_000)));
        // -5
        let d = short(true, 0, 0, &[5]);
        assert_eq!((d.to_f64(), d.to_i64()), (-5.0, Some(-5)));
        // 0.5 = [5000], weight -1, dscale 1
        let d = short(false, 1, -1, &[5000]);
        assert_eq!((d.to_f64(), d.to_i64()), (0.5, None));
        // 0 has no digits
        let d = short(false, 0, 0, &[]);
        assert_eq!((d.to_f64(), d.to_i64()), (0.0, Some(0)));
        // 2024.0: whole but written with a fraction
        let d = short(false, 1, 0, &[2024]);
        assert_eq!((d.to_f64(), d.to_i64()), (2024.0, None));
    }

    #[test]
    fn decodes_long_and_special_numerics() {
        // long format: sign/dscale word, weight word, digits
        let words = [NUMERIC_NEG | 2, 1u16, 12, 3400];
        let d = Decoded::from_words(words.len(), |i| words[i]);
        assert_eq!(d.to_f64(), -123400.0); // -(12 * 10000 + 3400), shown as -123400.00
        assert_eq!(d.to_i64(), None, "dscale 2");
        let nan = [NUMERIC_SPECIAL];
        assert!(Decoded::from_words(1, |i| nan[i]).to_f64().is_nan());
        let inf = [NUMERIC_PINF];
        assert_eq!(Decoded::from_words(1, |i| inf[i]).to_f64(), f64::INFINITY);
    }

    /// The class is decided from the digits: where an `f64` can tell, it
    /// agrees with it; where it cannot (tiny negatives, a fraction past the
    /// f64's precision, just above 1e12), it is still right.
    #[test]
    fn header_class_is_exact() {
        use crate::json::NumberClass;
        // (negative, weight, digits, negative?, above 1e12?, fractional?)
        type Case = (bool, i32, &'static [u16], bool, bool, bool);
        let cases: &[Case] = &[
            (false, 0, &[], false, false, false),
            (true, 0, &[], false, false, false), // -0
            (false, 0, &[5], false, false, false),
            (true, 0, &[5], true, false, false),
            (false, 0, &[1234, 5678], false, false, true),
            (false, -1, &[5000], false, false, true),
            (true, -1, &[1], true, false, true),
            (false, 2, &[9999, 9999, 9999], false, false, false),
            (false, 2, &[9999, 9999, 9999, 9999], false, false, true), // 999999999999.9999
            (false, 3, &[1], false, false, false),                     // 1e12
            (false, 3, &[1, 0, 0, 0, 1], false, true, true),           // 1e12 + 0.0001
            (false, 3, &[1, 0, 0, 1], false, true, false),             // 1e12 + 1
            (false, 3, &[2], false, true, false),
            (false, 4, &[1], false, true, false),
            (false, 0, &[1, 0, 0, 0, 0, 1], false, false, true), // 1.00000000000000000001
            (true, -100, &[1], true, false, true),               // -1e-400
            (false, -100, &[1], false, false, true),
            (false, 1, &[12, 3400], false, false, false),
        ];
        for &(negative, weight, digits, neg, above, fractional) in cases {
            // The long format: sign and display scale, weight, digits.
            let sign = if negative { NUMERIC_NEG } else { 0 };
            let words: Vec<u16> = [sign | 4, weight as i16 as u16]
                .into_iter()
                .chain(digits.iter().copied())
                .collect();
            let h = Header::from_words(words.len(), |i| words[i]).expect("finite");
            assert_eq!((h.weight, h.n_digits, h.first), (weight, digits.len(), 2));
            let c = h.class(|i| words[i]);
            assert_eq!(
                c,
                NumberClass {
                    special: false,
                    negative: neg,
                    above_max: above,
                    fractional
                },
                "{negative} {weight} {digits:?}"
            );
            // Where an f64 holds the value, it agrees.
            let v = Decoded::from_words(words.len(), |i| words[i]).to_f64();
            if digits.len() <= 3 && (-70..=2).contains(&weight) {
                assert_eq!(NumberClass::of_f64(v), c, "{v}");
            }
        }
    }

    #[test]
    fn header_units_are_exact() {
        let words = [0u16, 1234, 5678, 9000];
        let word = |i: usize| words[i];
        // 1234.56789 in units of 1e-8
        let h = Header {
            negative: false,
            weight: 0,
            dscale: 5,
            first: 1,
            n_digits: 3,
        };
        assert_eq!(h.units(word, 2, 7), Some(123_456_789_000));
        // A third base-10000 digit after the point does not fit 1e-8 units.
        assert_eq!(Header { weight: -1, ..h }.units(word, 2, 7), None);
        assert_eq!(
            Header {
                negative: true,
                n_digits: 1,
                ..h
            }
            .units(word, 2, 7),
            Some(-123_400_000_000)
        );
        assert_eq!(Header { weight: 7, ..h }.units(word, 2, 7), None);
        assert_eq!(Header { n_digits: 0, ..h }.units(word, 2, 7), Some(0));
    }
}
