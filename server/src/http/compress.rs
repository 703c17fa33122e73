//! Content codings, one compressor for buffered responses (the
//! representation middleware) and streamed exports alike.

use bytes::Bytes;
use std::io::{self, Write};

/// Bodies under this size are sent uncompressed.
pub const COMPRESS_MIN: usize = 1024;
/// Bodies over this size get a higher compression level.
pub const COMPRESS_HIGH: usize = 10 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Zstd,
    Brotli,
    Gzip,
    Identity,
}

impl Encoding {
    pub fn token(self) -> &'static str {
        match self {
            Encoding::Zstd => "zstd",
            Encoding::Brotli => "br",
            Encoding::Gzip => "gzip",
            Encoding::Identity => "identity",
        }
    }
}

/// Every line of a list-valued header field as one list (RFC 9110 5.3:
/// `A: x` and `A: y` mean `A: x, y`), or `None` when the request has none.
/// A line that is not visible ASCII is kept (lossily) rather than dropped,
/// so that it still counts as sent: an `If-Match` made only of such a line
/// matches nothing instead of being ignored.
pub fn field_list(
    headers: &poem::http::HeaderMap,
    name: impl poem::http::header::AsHeaderName,
) -> Option<String> {
    let lines: Vec<String> = headers
        .get_all(name)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    (!lines.is_empty()).then(|| lines.join(", "))
}

/// The request's `Accept-Encoding`, every line of it (see [`field_list`]).
pub fn accept_encoding(headers: &poem::http::HeaderMap) -> Option<String> {
    field_list(headers, poem::http::header::ACCEPT_ENCODING)
}

/// Picks the encoding the client weighs highest (RFC 9110 12.5.3) among
/// `offered` and `identity`; on a tie, the earlier in `offered` (the
/// server's preference: zstd, br, gzip), then identity. A coding named in
/// the header takes its own weight (`q=0`: not acceptable) and `*` stands
/// only for the codings the header does not name. `identity` takes its own
/// weight when named (`gzip;q=0.1, identity` is sent without a coding),
/// else that of `*`; named by neither, it is acceptable but comes after
/// every coding the header accepts. When nothing is acceptable, identity
/// included (`identity;q=0, *;q=0`), the body is sent without a coding.
pub fn negotiate(accept: Option<&str>, offered: &[Encoding]) -> Encoding {
    let Some(accept) = accept else {
        return Encoding::Identity;
    };
    let mut named: Vec<(Encoding, f32)> = Vec::new();
    let mut star: Option<f32> = None;
    for part in accept.split(',') {
        let mut it = part.trim().split(';');
        let name = it.next().unwrap_or("").trim().to_ascii_lowercase();
        // The weight (the parameter's name is case-insensitive: `Q=0`).
        // One that is not a qvalue (0 to 1, at most three decimals:
        // `q=abc`, `q=2`) makes the element malformed: it accepts nothing.
        let q = match it.find_map(|p| {
            let (k, v) = p.split_once('=')?;
            k.trim().eq_ignore_ascii_case("q").then(|| qvalue(v.trim()))
        }) {
            None => 1.0,
            Some(Some(q)) => q,
            Some(None) => continue,
        };
        let enc = match name.as_str() {
            "zstd" => Encoding::Zstd,
            "br" => Encoding::Brotli,
            "gzip" | "x-gzip" => Encoding::Gzip,
            "identity" => Encoding::Identity,
            "*" => {
                star = Some(star.map_or(q, |s: f32| s.max(q)));
                continue;
            }
            _ => continue,
        };
        match named.iter_mut().find(|(e, _)| *e == enc) {
            Some((_, nq)) => *nq = nq.max(q),
            None => named.push((enc, q)),
        }
    }
    let weight = |enc: Encoding| named.iter().find(|(e, _)| *e == enc).map(|&(_, q)| q);
    let mut best: Option<(Encoding, f32)> = None;
    for &enc in offered.iter().filter(|&&e| e != Encoding::Identity) {
        let q = weight(enc).or(star).unwrap_or(0.0);
        // `offered` is in preference order: a tie keeps the earlier one.
        if q > 0.0 && best.is_none_or(|(_, bq)| q > bq) {
            best = Some((enc, q));
        }
    }
    // Identity, last in preference, wins only by a higher weight.
    match (best, weight(Encoding::Identity).or(star)) {
        (Some((_, bq)), Some(iq)) if iq > bq => Encoding::Identity,
        (Some((enc, _)), _) => enc,
        (None, _) => Encoding::Identity,
    }
}

/// An RFC 9110 qvalue: `0`, `0.` and up to three digits, `1`, or `1.`
/// and up to three zeros.
fn qvalue(v: &str) -> Option<f32> {
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    let ok = match int {
        "0" => frac.len() <= 3 && frac.bytes().all(|b| b.is_ascii_digit()),
        "1" => frac.len() <= 3 && frac.bytes().all(|b| b == b'0'),
        _ => false,
    };
    ok.then(|| v.parse().ok()).flatten()
}

/// A compressor fed chunk by chunk.
pub enum Compressor {
    Identity,
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Brotli(Box<brotli::CompressorWriter<Vec<u8>>>),
}

impl Compressor {
    /// `level` is COMPRESSION_LEVEL (1..9), bounded to what each coding takes.
    pub fn new(enc: Encoding, level: u32) -> io::Result<Self> {
        Ok(match enc {
            Encoding::Identity => Compressor::Identity,
            Encoding::Zstd => Compressor::Zstd(zstd::stream::write::Encoder::new(
                Vec::new(),
                level.clamp(1, 19) as i32,
            )?),
            Encoding::Gzip => Compressor::Gzip(flate2::write::GzEncoder::new(
                Vec::new(),
                flate2::Compression::new(level.clamp(1, 9)),
            )),
            Encoding::Brotli => Compressor::Brotli(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                4096,
                level.clamp(1, 11),
                22,
            ))),
        })
    }

    /// Feeds a chunk; returns what is ready to send (possibly nothing yet).
    pub fn encode(&mut self, chunk: Vec<u8>) -> io::Result<Bytes> {
        let out = match self {
            Compressor::Identity => return Ok(Bytes::from(chunk)),
            Compressor::Zstd(e) => {
                e.write_all(&chunk)?;
                e.get_mut()
            }
            Compressor::Gzip(e) => {
                e.write_all(&chunk)?;
                e.get_mut()
            }
            Compressor::Brotli(e) => {
                e.write_all(&chunk)?;
                e.get_mut()
            }
        };
        Ok(Bytes::from(std::mem::take(out)))
    }

    /// Ends the stream; returns the rest.
    pub fn finish(self) -> io::Result<Bytes> {
        match self {
            Compressor::Identity => Ok(Bytes::new()),
            Compressor::Zstd(e) => e.finish().map(Bytes::from),
            Compressor::Gzip(e) => e.finish().map(Bytes::from),
            Compressor::Brotli(e) => Ok(Bytes::from(e.into_inner())),
        }
    }
}

/// Compresses a whole body; `level` is COMPRESSION_LEVEL (1..9), raised
/// for large bodies.
pub fn compress(enc: Encoding, data: &[u8], level: u32) -> io::Result<Vec<u8>> {
    let level = if data.len() > COMPRESS_HIGH {
        (level + 3).min(9)
    } else {
        level.clamp(1, 9)
    };
    let mut c = Compressor::new(enc, level)?;
    let mut out = c.encode(data.to_vec())?.to_vec();
    out.extend_from_slice(&c.finish()?);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation() {
        let all = [Encoding::Zstd, Encoding::Brotli, Encoding::Gzip];
        assert_eq!(
            negotiate(Some("gzip, deflate, br, zstd"), &all),
            Encoding::Zstd
        );
        assert_eq!(negotiate(Some("gzip, br"), &all), Encoding::Brotli);
        assert_eq!(negotiate(Some("gzip"), &all), Encoding::Gzip);
        assert_eq!(
            negotiate(Some("zstd;q=0, gzip;q=0.5"), &all),
            Encoding::Gzip
        );
        assert_eq!(
            negotiate(Some("br;q=0.2, gzip;q=0.9"), &all),
            Encoding::Gzip
        );
        assert_eq!(negotiate(Some("identity"), &all), Encoding::Identity);
        assert_eq!(negotiate(Some("*"), &all), Encoding::Zstd);
        // A coding refused by name is not brought back by `*`.
        assert_eq!(negotiate(Some("zstd;q=0, *"), &all), Encoding::Brotli);
        assert_eq!(
            negotiate(Some("zstd;q=0, br;q=0, *;q=0.5"), &all),
            Encoding::Gzip
        );
        assert_eq!(negotiate(Some("*;q=0, gzip"), &all), Encoding::Gzip);
        assert_eq!(negotiate(Some("*;q=0"), &all), Encoding::Identity);
        assert_eq!(
            negotiate(Some("zstd;Q=0, br; q=0, gzip"), &all),
            Encoding::Gzip
        );
        assert_eq!(
            negotiate(Some("zstd;q=0.1, *"), &[Encoding::Zstd, Encoding::Gzip]),
            Encoding::Gzip
        );
        assert_eq!(negotiate(None, &all), Encoding::Identity);
    }

    /// `identity` is weighed against the codings (RFC 9110 12.5.3): it
    /// used to be ignored, so `gzip;q=0.1, identity;q=1` answered gzip.
    #[test]
    fn identity_takes_its_weight() {
        let all = [Encoding::Zstd, Encoding::Brotli, Encoding::Gzip];
        for accept in [
            "gzip;q=0.1, identity;q=1",
            "gzip;q=0.1, identity",
            "identity;q=0.6, br;q=0.5, zstd;q=0.2",
            "zstd;q=0.5, *;q=0.9, br;q=0, gzip;q=0.4",
            "IDENTITY, gzip;q=0.999",
        ] {
            assert_eq!(
                negotiate(Some(accept), &all),
                Encoding::Identity,
                "{accept}"
            );
        }
        // A tie goes to the server's preference, codings before identity.
        assert_eq!(
            negotiate(Some("gzip;q=0.5, identity;q=0.5"), &all),
            Encoding::Gzip
        );
        assert_eq!(negotiate(Some("identity, *"), &all), Encoding::Zstd);
        // Identity not named: it comes after any coding accepted.
        assert_eq!(negotiate(Some("gzip;q=0.1"), &all), Encoding::Gzip);
        assert_eq!(negotiate(Some("gzip;q=0.2, *;q=0.1"), &all), Encoding::Gzip);
        assert_eq!(
            negotiate(Some("identity;q=0, gzip;q=0.1"), &all),
            Encoding::Gzip
        );
        assert_eq!(
            negotiate(Some("identity;q=0.9, gzip"), &[Encoding::Zstd]),
            Encoding::Identity
        );
        assert_eq!(
            negotiate(
                Some("identity;q=0.9, gzip"),
                &[Encoding::Zstd, Encoding::Gzip]
            ),
            Encoding::Gzip
        );
    }

    #[test]
    fn field_lines_make_one_list() {
        use poem::http::{header, HeaderMap, HeaderValue};
        let mut h = HeaderMap::new();
        assert_eq!(accept_encoding(&h), None);
        h.append(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        h.append(header::ACCEPT_ENCODING, HeaderValue::from_static("gzip"));
        assert_eq!(accept_encoding(&h).as_deref(), Some("identity, gzip"));
        h.append(
            header::IF_MATCH,
            HeaderValue::from_bytes(b"\"\xff\"").unwrap(),
        );
        assert!(field_list(&h, header::IF_MATCH).is_some());
    }

    #[test]
    fn malformed_weights_accept_nothing() {
        let all = [Encoding::Zstd, Encoding::Brotli, Encoding::Gzip];
        for accept in [
            "gzip;q=abc",
            "gzip;q=2",
            "gzip;q=-1",
            "gzip;q=0.5000",
            "gzip;q=NaN",
            "gzip;q=",
        ] {
            assert_eq!(
                negotiate(Some(accept), &all),
                Encoding::Identity,
                "{accept}"
            );
        }
        assert_eq!(negotiate(Some("gzip;q=abc, br"), &all), Encoding::Brotli);
        for accept in [
            "gzip;q=1",
            "gzip;q=1.000",
            "gzip;q=0.001",
            "gzip;Q=0.5",
            "gzip; q=1.",
        ] {
            assert_eq!(negotiate(Some(accept), &all), Encoding::Gzip, "{accept}");
        }
        assert_eq!(qvalue("0"), Some(0.0));
        assert_eq!(qvalue("1.001"), None);
    }

    #[test]
    fn round_trips() {
        let data = br#"{"data":[1,2,3]}"#.repeat(500);
        for enc in [Encoding::Zstd, Encoding::Gzip, Encoding::Brotli] {
            let c = compress(enc, &data, 3).unwrap();
            assert!(c.len() < data.len() / 5, "{enc:?}");
        }
        assert_eq!(
            zstd::decode_all(&compress(Encoding::Zstd, &data, 3).unwrap()[..]).unwrap(),
            data
        );
    }

    #[test]
    fn chunked_round_trips() {
        let data = b"key,store_id\r\n1:2024-01,1\r\n".repeat(5000);
        for enc in [
            Encoding::Zstd,
            Encoding::Gzip,
            Encoding::Brotli,
            Encoding::Identity,
        ] {
            let mut e = Compressor::new(enc, 3).unwrap();
            let mut out = Vec::new();
            for part in data.chunks(64 * 1024) {
                out.extend_from_slice(&e.encode(part.to_vec()).unwrap());
            }
            out.extend_from_slice(&e.finish().unwrap());
            let back = match enc {
                Encoding::Zstd => zstd::decode_all(&out[..]).unwrap(),
                Encoding::Gzip => {
                    let mut v = Vec::new();
                    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&out[..]), &mut v)
                        .unwrap();
                    v
                }
                Encoding::Brotli => {
                    let mut v = Vec::new();
                    std::io::Read::read_to_end(
                        &mut brotli::Decompressor::new(&out[..], 4096),
                        &mut v,
                    )
                    .unwrap();
                    v
                }
                Encoding::Identity => out,
            };
            assert_eq!(back, data, "{enc:?}");
        }
    }
}
