//! Reading and writing relative timeouts on the wire: the gRPC `grpc-timeout` header and a plain HTTP header in
//! milliseconds.
//!
//! Pure functions over bytes and [`Duration`]s: no allocation, no clock, no `http` types, and no panics on any
//! input.
//!
//! # `grpc-timeout`
//!
//! The gRPC over HTTP/2 protocol defines `Timeout → TimeoutValue TimeoutUnit`, where `TimeoutValue` is at most
//! eight ASCII digits and `TimeoutUnit` one of `H` (hours), `M` (minutes), `S` (seconds), `m` (milliseconds),
//! `u` (microseconds) and `n` (nanoseconds). [`decode_grpc_timeout`] accepts exactly that: one to eight digits
//! (leading zeros allowed, `0n` meaning "already expired") and one unit letter, nothing else: no sign, no
//! whitespace, no ninth digit. The largest value, `99999999H`, is about 11 400 years and fits a [`Duration`], so
//! decoding never overflows.
//!
//! [`encode_grpc_timeout`] picks the finest unit whose value fits in eight digits, and **truncates** to that
//! unit. A budget passed on to another hop must never grow: rounding up would hand the next hop time the caller
//! does not have, and over many hops the error would add up on the wrong side. Truncating costs less than one
//! unit of the chosen (finest fitting) unit: nothing below 100 ms (sent in nanoseconds), and above that less than
//! 1/100 000 of the value (a coarser unit is only chosen once the value reaches 100 000 of it). Budgets beyond `99999999H` saturate to it (still never larger than the truth).
//!
//! # The millisecond header
//!
//! Plain HTTP has no standard relative-timeout header. This crate reads and writes one in whole milliseconds,
//! named [`TIMEOUT_MS_HEADER`] (`x-request-timeout-ms`) unless configured otherwise on the layers: one or more
//! ASCII digits, nothing else, no larger than `u64::MAX` milliseconds. Encoding truncates for the same reason,
//! so a budget under a millisecond encodes as `0` (expired): the next hop could not do useful work in it anyway,
//! and [`PropagateDeadlineLayer`](super::PropagateDeadlineLayer) fails such a call at once rather than send it.
//!
//! ```
//! use std::time::Duration;
//! use tower_backpressure::deadline::codec::{decode_grpc_timeout, encode_grpc_timeout};
//!
//! assert_eq!(decode_grpc_timeout(b"250m"), Ok(Duration::from_millis(250)));
//! assert!(decode_grpc_timeout(b"123456789S").is_err()); // nine digits
//! assert_eq!(encode_grpc_timeout(Duration::from_secs(30)).as_str(), "30000000u");
//! ```

use std::fmt;
use std::time::Duration;

/// The default name of the plain HTTP header carrying a relative timeout in whole milliseconds.
pub const TIMEOUT_MS_HEADER: &str = "x-request-timeout-ms";

/// The name of the gRPC timeout header.
pub const GRPC_TIMEOUT_HEADER: &str = "grpc-timeout";

/// The largest `TimeoutValue` the gRPC grammar allows (eight digits).
pub const GRPC_TIMEOUT_MAX_VALUE: u64 = 99_999_999;

const MAX_DIGITS: usize = 8;

/// A timeout header value that does not follow its grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidTimeout {
    problem: Problem,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Problem {
    Empty,
    NoDigits,
    TooManyDigits,
    NotADigit,
    UnknownUnit,
    OutOfRange,
}

impl InvalidTimeout {
    const fn new(problem: Problem) -> Self {
        InvalidTimeout { problem }
    }
}

impl fmt::Display for InvalidTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.problem {
            Problem::Empty => "invalid timeout header: empty",
            Problem::NoDigits => "invalid timeout header: no digits",
            Problem::TooManyDigits => "invalid timeout header: more than 8 digits",
            Problem::NotADigit => "invalid timeout header: not an ascii digit",
            Problem::UnknownUnit => "invalid timeout header: unknown unit",
            Problem::OutOfRange => "invalid timeout header: out of range",
        })
    }
}

impl std::error::Error for InvalidTimeout {}

/// The unit of a `grpc-timeout` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GrpcTimeoutUnit {
    /// `H`
    Hours,
    /// `M`
    Minutes,
    /// `S`
    Seconds,
    /// `m`
    Millis,
    /// `u`
    Micros,
    /// `n`
    Nanos,
}

impl GrpcTimeoutUnit {
    /// Finest first: the order in which the encoder tries units.
    const FINEST_FIRST: [GrpcTimeoutUnit; 6] = [
        GrpcTimeoutUnit::Nanos,
        GrpcTimeoutUnit::Micros,
        GrpcTimeoutUnit::Millis,
        GrpcTimeoutUnit::Seconds,
        GrpcTimeoutUnit::Minutes,
        GrpcTimeoutUnit::Hours,
    ];

    /// The unit's letter on the wire.
    pub const fn letter(self) -> u8 {
        match self {
            GrpcTimeoutUnit::Hours => b'H',
            GrpcTimeoutUnit::Minutes => b'M',
            GrpcTimeoutUnit::Seconds => b'S',
            GrpcTimeoutUnit::Millis => b'm',
            GrpcTimeoutUnit::Micros => b'u',
            GrpcTimeoutUnit::Nanos => b'n',
        }
    }

    /// The unit for a letter, if it is one of the six.
    pub const fn from_letter(letter: u8) -> Option<Self> {
        Some(match letter {
            b'H' => GrpcTimeoutUnit::Hours,
            b'M' => GrpcTimeoutUnit::Minutes,
            b'S' => GrpcTimeoutUnit::Seconds,
            b'm' => GrpcTimeoutUnit::Millis,
            b'u' => GrpcTimeoutUnit::Micros,
            b'n' => GrpcTimeoutUnit::Nanos,
            _ => return None,
        })
    }

    const fn nanos(self) -> u128 {
        match self {
            GrpcTimeoutUnit::Hours => 3_600_000_000_000,
            GrpcTimeoutUnit::Minutes => 60_000_000_000,
            GrpcTimeoutUnit::Seconds => 1_000_000_000,
            GrpcTimeoutUnit::Millis => 1_000_000,
            GrpcTimeoutUnit::Micros => 1_000,
            GrpcTimeoutUnit::Nanos => 1,
        }
    }

    /// `value` of this unit as a duration; exact, and never overflows for values of up to eight digits.
    fn duration(self, value: u64) -> Duration {
        match self {
            GrpcTimeoutUnit::Hours => Duration::from_secs(value * 3600),
            GrpcTimeoutUnit::Minutes => Duration::from_secs(value * 60),
            GrpcTimeoutUnit::Seconds => Duration::from_secs(value),
            GrpcTimeoutUnit::Millis => Duration::from_millis(value),
            GrpcTimeoutUnit::Micros => Duration::from_micros(value),
            GrpcTimeoutUnit::Nanos => Duration::from_nanos(value),
        }
    }
}

/// Parses a `grpc-timeout` value: one to eight ASCII digits, then one of `H M S m u n`.
///
/// ```
/// use std::time::Duration;
/// use tower_backpressure::deadline::codec::decode_grpc_timeout;
///
/// assert_eq!(decode_grpc_timeout(b"1H"), Ok(Duration::from_secs(3600)));
/// assert_eq!(decode_grpc_timeout(b"00000100u"), Ok(Duration::from_micros(100)));
/// assert!(decode_grpc_timeout(b"10s").is_err()); // unit letters are case-sensitive
/// assert!(decode_grpc_timeout(b" 10S").is_err());
/// ```
pub fn decode_grpc_timeout(bytes: &[u8]) -> Result<Duration, InvalidTimeout> {
    let (&letter, digits) = bytes
        .split_last()
        .ok_or(InvalidTimeout::new(Problem::Empty))?;
    let unit =
        GrpcTimeoutUnit::from_letter(letter).ok_or(InvalidTimeout::new(Problem::UnknownUnit))?;
    if digits.is_empty() {
        return Err(InvalidTimeout::new(Problem::NoDigits));
    }
    if digits.len() > MAX_DIGITS {
        return Err(InvalidTimeout::new(Problem::TooManyDigits));
    }
    let value = parse_digits(digits)?;
    Ok(unit.duration(value))
}

/// Parses a millisecond timeout value: one or more ASCII digits, at most `u64::MAX`.
///
/// ```
/// use std::time::Duration;
/// use tower_backpressure::deadline::codec::decode_timeout_ms;
///
/// assert_eq!(decode_timeout_ms(b"1500"), Ok(Duration::from_millis(1500)));
/// assert!(decode_timeout_ms(b"1.5").is_err());
/// assert!(decode_timeout_ms(b"-1").is_err());
/// ```
pub fn decode_timeout_ms(bytes: &[u8]) -> Result<Duration, InvalidTimeout> {
    if bytes.is_empty() {
        return Err(InvalidTimeout::new(Problem::Empty));
    }
    parse_digits(bytes).map(Duration::from_millis)
}

fn parse_digits(digits: &[u8]) -> Result<u64, InvalidTimeout> {
    digits.iter().try_fold(0u64, |value, &b| {
        if !b.is_ascii_digit() {
            return Err(InvalidTimeout::new(Problem::NotADigit));
        }
        value
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(b - b'0')))
            .ok_or(InvalidTimeout::new(Problem::OutOfRange))
    })
}

/// An encoded `grpc-timeout` value, held inline (at most nine bytes).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct GrpcTimeout {
    buf: [u8; MAX_DIGITS + 1],
    len: u8,
    value: u32,
    unit: GrpcTimeoutUnit,
}

impl GrpcTimeout {
    /// The header value, e.g. `"250000u"`.
    pub fn as_str(&self) -> &str {
        // Only ASCII digits and a unit letter are ever written.
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }

    /// The header value's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }

    /// The numeric part.
    pub fn value(&self) -> u64 {
        u64::from(self.value)
    }

    /// The unit.
    pub fn unit(&self) -> GrpcTimeoutUnit {
        self.unit
    }

    /// The duration this value stands for (at most the duration it was encoded from).
    pub fn duration(&self) -> Duration {
        self.unit.duration(self.value())
    }
}

impl fmt::Debug for GrpcTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("GrpcTimeout").field(&self.as_str()).finish()
    }
}

impl fmt::Display for GrpcTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Encodes `timeout` for `grpc-timeout`: the finest unit whose value fits in eight digits, truncated toward zero
/// so the encoded budget is never larger than `timeout`; saturates at `99999999H`.
///
/// ```
/// use std::time::Duration;
/// use tower_backpressure::deadline::codec::encode_grpc_timeout;
///
/// assert_eq!(encode_grpc_timeout(Duration::from_nanos(99_999_999)).as_str(), "99999999n");
/// assert_eq!(encode_grpc_timeout(Duration::from_nanos(100_000_001)).as_str(), "100000u");
/// assert_eq!(encode_grpc_timeout(Duration::ZERO).as_str(), "0n");
/// ```
pub fn encode_grpc_timeout(timeout: Duration) -> GrpcTimeout {
    let nanos = timeout.as_nanos();
    let (value, unit) = GrpcTimeoutUnit::FINEST_FIRST
        .iter()
        .find_map(|&unit| {
            let value = nanos / unit.nanos();
            (value <= u128::from(GRPC_TIMEOUT_MAX_VALUE)).then_some((value as u32, unit))
        })
        .unwrap_or((GRPC_TIMEOUT_MAX_VALUE as u32, GrpcTimeoutUnit::Hours));
    // At most `MAX_DIGITS` digits: `value` is capped at `GRPC_TIMEOUT_MAX_VALUE` above.
    let digits = Digits::new(u64::from(value));
    let digits = digits.as_bytes();
    let mut buf = [0u8; MAX_DIGITS + 1];
    buf[..digits.len()].copy_from_slice(digits);
    buf[digits.len()] = unit.letter();
    GrpcTimeout {
        buf,
        len: (digits.len() + 1) as u8,
        value,
        unit,
    }
}

/// A number's decimal digits, written on the stack: what both encoders put in a header value, which is then one
/// allocation (its copy), where `HeaderValue::from(u64)` makes two (a growable buffer, then its conversion).
pub(crate) struct Digits {
    buf: [u8; 20],
    start: usize,
}

impl Digits {
    /// The digits of `n` (as many as `u64::MAX` has, at most).
    pub(crate) fn new(mut n: u64) -> Self {
        let mut buf = [0u8; 20];
        let mut start = buf.len();
        loop {
            start -= 1;
            buf[start] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break Digits { buf, start };
            }
        }
    }

    /// The digits, most significant first.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

/// Encodes `timeout` in whole milliseconds for the plain HTTP header, truncated toward zero (never larger than
/// `timeout`), saturating at `u64::MAX`.
pub fn encode_timeout_ms(timeout: Duration) -> u64 {
    u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn digits_match_display() {
        for n in [
            0,
            7,
            9,
            10,
            99,
            100,
            1_000,
            3_599_995,
            1 << 40,
            u64::MAX - 1,
            u64::MAX,
        ] {
            assert_eq!(Digits::new(n).as_bytes(), n.to_string().as_bytes());
        }
    }

    #[test]
    fn every_unit_decodes() {
        let cases: [(&[u8], Duration); 6] = [
            (b"2H", Duration::from_secs(7200)),
            (b"3M", Duration::from_secs(180)),
            (b"4S", Duration::from_secs(4)),
            (b"5m", Duration::from_millis(5)),
            (b"6u", Duration::from_micros(6)),
            (b"7n", Duration::from_nanos(7)),
        ];
        for (bytes, expected) in cases {
            assert_eq!(
                decode_grpc_timeout(bytes),
                Ok(expected),
                "{}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn eight_digits_is_the_limit() {
        assert_eq!(
            decode_grpc_timeout(b"99999999S"),
            Ok(Duration::from_secs(99_999_999))
        );
        assert_eq!(
            decode_grpc_timeout(b"00000001S"),
            Ok(Duration::from_secs(1))
        );
        assert_eq!(
            decode_grpc_timeout(b"99999999H"),
            Ok(Duration::from_secs(99_999_999 * 3600))
        );
        for bad in [&b"100000000S"[..], b"000000001S", b"999999999n"] {
            assert_eq!(
                decode_grpc_timeout(bad).unwrap_err().to_string(),
                "invalid timeout header: more than 8 digits"
            );
        }
    }

    #[test]
    fn malformed_values_are_rejected() {
        for bad in [
            &b""[..],
            b"S",
            b"1",
            b"10",
            b"1s",
            b"1h",
            b"1x",
            b"-1S",
            b"+1S",
            b" 1S",
            b"1S ",
            b"1 S",
            b"1.5S",
            b"1SS",
            b"0x10S",
            "１S".as_bytes(),
        ] {
            assert!(
                decode_grpc_timeout(bad).is_err(),
                "{:?} accepted",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn encode_picks_the_finest_fitting_unit() {
        let cases = [
            (Duration::ZERO, "0n"),
            (Duration::from_nanos(1), "1n"),
            (Duration::from_nanos(99_999_999), "99999999n"),
            (Duration::from_nanos(100_000_000), "100000u"),
            (Duration::from_micros(99_999_999), "99999999u"),
            (Duration::from_micros(100_000_000), "100000m"),
            (Duration::from_millis(99_999_999), "99999999m"),
            (Duration::from_millis(100_000_000), "100000S"),
            (Duration::from_secs(99_999_999), "99999999S"),
            (Duration::from_secs(100_000_000), "1666666M"),
            (Duration::from_secs(99_999_999 * 60), "99999999M"),
            (Duration::from_secs(100_000_000 * 60), "1666666H"),
            (Duration::from_secs(99_999_999 * 3600), "99999999H"),
            (Duration::MAX, "99999999H"),
        ];
        for (timeout, expected) in cases {
            assert_eq!(
                encode_grpc_timeout(timeout).as_str(),
                expected,
                "{timeout:?}"
            );
        }
    }

    #[test]
    fn encode_truncates_never_grows() {
        // 100000000 s does not fit in seconds: 1666666.67 minutes truncates to 1666666, i.e. 40 s less.
        let t = encode_grpc_timeout(Duration::from_secs(100_000_000));
        assert_eq!(t.duration(), Duration::from_secs(99_999_960));
        // 0.1 s + 999 ns: nanoseconds do not fit, the 999 ns are dropped.
        let t = encode_grpc_timeout(Duration::from_nanos(100_000_999));
        assert_eq!((t.value(), t.unit()), (100_000, GrpcTimeoutUnit::Micros));
        assert_eq!(encode_timeout_ms(Duration::from_micros(2_999)), 2);
        assert_eq!(encode_timeout_ms(Duration::from_micros(999)), 0);
    }

    #[test]
    fn millisecond_header() {
        assert_eq!(decode_timeout_ms(b"0"), Ok(Duration::ZERO));
        assert_eq!(
            decode_timeout_ms(b"18446744073709551615"),
            Ok(Duration::from_millis(u64::MAX))
        );
        assert_eq!(
            decode_timeout_ms(b"18446744073709551616")
                .unwrap_err()
                .to_string(),
            "invalid timeout header: out of range"
        );
        for bad in [
            &b""[..],
            b" 1",
            b"1 ",
            b"1ms",
            b"-1",
            b"+1",
            b"1e3",
            b"1_000",
        ] {
            assert!(
                decode_timeout_ms(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// The next finer unit, if there is one, written independently of the encoder's list of units.
    fn next_finer(unit: GrpcTimeoutUnit) -> Option<GrpcTimeoutUnit> {
        match unit {
            GrpcTimeoutUnit::Hours => Some(GrpcTimeoutUnit::Minutes),
            GrpcTimeoutUnit::Minutes => Some(GrpcTimeoutUnit::Seconds),
            GrpcTimeoutUnit::Seconds => Some(GrpcTimeoutUnit::Millis),
            GrpcTimeoutUnit::Millis => Some(GrpcTimeoutUnit::Micros),
            GrpcTimeoutUnit::Micros => Some(GrpcTimeoutUnit::Nanos),
            GrpcTimeoutUnit::Nanos => None,
        }
    }

    /// What the grammar allows, written independently of the parser.
    fn grammar_accepts(bytes: &[u8]) -> bool {
        matches!(bytes.split_last(), Some((unit, digits))
            if b"HMSmun".contains(unit)
                && (1..=8).contains(&digits.len())
                && digits.iter().all(u8::is_ascii_digit))
    }

    /// What the millisecond header's grammar gives, written independently of the parser: one or more ASCII
    /// digits whose value (leading zeros allowed) is at most `u64::MAX` milliseconds.
    fn ms_grammar_value(bytes: &[u8]) -> Option<Duration> {
        if bytes.is_empty() || !bytes.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let text = std::str::from_utf8(bytes).ok()?;
        let significant = text.trim_start_matches('0');
        if significant.len() > 20 {
            return None;
        }
        // Up to 20 digits fit in a u128 whatever they are.
        let value: u128 = if significant.is_empty() {
            0
        } else {
            significant.parse().ok()?
        };
        u64::try_from(value).ok().map(Duration::from_millis)
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics_and_follows_the_grammar(bytes in proptest::collection::vec(any::<u8>(), 0..12)) {
            prop_assert_eq!(decode_grpc_timeout(&bytes).is_ok(), grammar_accepts(&bytes));
            prop_assert_eq!(decode_timeout_ms(&bytes).ok(), ms_grammar_value(&bytes));
        }

        #[test]
        fn the_millisecond_header_follows_its_grammar_up_to_and_past_u64_max(
            prefix in "[ +-]?",
            zeros in "0{0,3}",
            digits in "[0-9]{0,22}",
            suffix in "(ms| |x)?",
        ) {
            let s = format!("{prefix}{zeros}{digits}{suffix}");
            prop_assert_eq!(decode_timeout_ms(s.as_bytes()).ok(), ms_grammar_value(s.as_bytes()));
        }

        #[test]
        fn decoding_near_valid_bytes_follows_the_grammar(
            digits in "[0-9]{0,10}",
            unit in "[HMSmunhsx ]?",
            prefix in "[ +-]?",
        ) {
            let s = format!("{prefix}{digits}{unit}");
            prop_assert_eq!(decode_grpc_timeout(s.as_bytes()).is_ok(), grammar_accepts(s.as_bytes()));
        }

        #[test]
        fn encode_round_trips_within_one_unit_and_never_grows(
            nanos in any::<u64>(),
            shift in 0u32..64,
            secs in 0u64..400_000_000_000,
        ) {
            // Shifted, the nanoseconds spread evenly over their orders of magnitude, so that every unit is picked
            // often; uniform, nearly all of them are in minutes or hours.
            let spread = Duration::from_nanos(nanos >> shift);
            for timeout in [spread, Duration::new(secs, (nanos % 1_000_000_000) as u32)] {
                let encoded = encode_grpc_timeout(timeout);
                prop_assert!(encoded.as_bytes().len() <= 9);
                let decoded = decode_grpc_timeout(encoded.as_bytes()).unwrap();
                prop_assert_eq!(decoded, encoded.duration());
                prop_assert!(decoded <= timeout);
                if timeout < Duration::from_secs(99_999_999 * 3600) {
                    let unit = Duration::from_nanos(encoded.unit().nanos() as u64);
                    prop_assert!(timeout - decoded < unit);
                }
                // The finest fitting unit: in the next finer one the timeout would need nine digits.
                if let Some(finer) = next_finer(encoded.unit()) {
                    let in_finer = timeout.as_nanos() / finer.nanos();
                    prop_assert!(in_finer > 99_999_999, "{:?} encoded as {}", timeout, encoded.as_str());
                }
            }
        }

        #[test]
        fn exact_values_round_trip(value in 0u64..=GRPC_TIMEOUT_MAX_VALUE, letter in proptest::sample::select(b"HMSmun".to_vec())) {
            let text = format!("{value}{}", letter as char);
            let decoded = decode_grpc_timeout(text.as_bytes()).unwrap();
            prop_assert_eq!(decode_grpc_timeout(encode_grpc_timeout(decoded).as_bytes()), Ok(decoded));
        }
    }
}
