//! Export formats and shapes, row keys (the resume points) and file names.

use poem_openapi::Enum;
use std::fmt::Write as _;

#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
#[oai(rename_all = "lowercase")]
pub enum ExportFormat {
    /// RFC 4180 CSV with a header row, CRLF line ends, UTF-8.
    Csv,
    /// One JSON array of row objects.
    Json,
    /// One JSON object per line.
    Ndjson,
}

impl ExportFormat {
    pub fn content_type(self) -> &'static str {
        match self {
            ExportFormat::Csv => "text/csv; charset=utf-8",
            ExportFormat::Json => "application/json",
            ExportFormat::Ndjson => "application/x-ndjson",
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            ExportFormat::Csv => "csv",
            ExportFormat::Json => "json",
            ExportFormat::Ndjson => "ndjson",
        }
    }

    pub fn name(self) -> &'static str {
        self.extension()
    }
}

#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
#[oai(rename_all = "lowercase")]
pub enum ExportShape {
    /// One row per store-month, a column per day.
    Monthly,
    /// One row per store-day.
    Daily,
}

impl ExportShape {
    pub fn name(self) -> &'static str {
        match self {
            ExportShape::Monthly => "monthly",
            ExportShape::Daily => "daily",
        }
    }
}

/// The resume key of a row: `store:YYYY-MM` (monthly) or `store:YYYY-MM-DD` (daily).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct RowKey {
    pub store: i64,
    pub year: i32,
    pub month: i32,
    pub day: Option<u32>,
}

impl RowKey {
    pub fn parse(raw: &str, shape: ExportShape) -> Result<Self, String> {
        let example = match shape {
            ExportShape::Monthly => "12:2024-03",
            ExportShape::Daily => "12:2024-03-05",
        };
        let bad = || {
            format!(
                "{raw:?} is not a {} row key like {example} (the `key` of the last row you have)",
                shape.name()
            )
        };
        let (store, date) = raw.trim().split_once(':').ok_or_else(bad)?;
        let digits = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_digit());
        let store: i64 = store
            .parse()
            .ok()
            .filter(|s| *s > 0 && store.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(bad)?;
        let parts: Vec<&str> = date.split('-').collect();
        let want = if shape == ExportShape::Daily { 3 } else { 2 };
        if parts.len() != want || !digits(parts[0], 4) || !digits(parts[1], 2) {
            return Err(bad());
        }
        let year: i32 = parts[0].parse().map_err(|_| bad())?;
        let month: i32 = parts[1].parse().map_err(|_| bad())?;
        if !(2000..=2100).contains(&year) || !(1..=12).contains(&month) {
            return Err(bad());
        }
        let day = match parts.get(2) {
            Some(d) if digits(d, 2) => {
                let d: u32 = d.parse().map_err(|_| bad())?;
                if chrono::NaiveDate::from_ymd_opt(year, month as u32, d).is_none() {
                    return Err(format!("{raw:?}: {year}-{month:02} has no day {d}"));
                }
                Some(d)
            }
            Some(_) => return Err(bad()),
            None => None,
        };
        Ok(Self {
            store,
            year,
            month,
            day,
        })
    }
}

impl std::fmt::Display for RowKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}-{:02}", self.store, self.year, self.month)?;
        if let Some(d) = self.day {
            write!(f, "-{d:02}")?;
        }
        Ok(())
    }
}

/// The first 8 hex digits of the SHA-256 of `text`.
fn short_digest(text: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(text.as_bytes())[..4])
}

/// A name for the file, after every filter that narrows it, e.g.
/// `sales-store12-2024-01_2024-06-daily.csv`,
/// `sales-North_East-2025-min100-after-12_2024-03-monthly.csv`: exports
/// that hold different rows get different names. Only ASCII letters,
/// digits, `-`, `_` and `.` (a region's other characters become `_`).
pub fn file_name(
    f: &crate::http::filters::SalesFilter,
    format: ExportFormat,
    shape: ExportShape,
    after: Option<&RowKey>,
) -> String {
    let mut name = String::from("sales");
    match f.store_ids.as_deref() {
        Some([one]) => {
            let _ = write!(name, "-store{one}");
        }
        Some(many) if many.len() <= 5 => {
            let ids: Vec<String> = many.iter().map(i64::to_string).collect();
            let _ = write!(name, "-stores{}", ids.join("_"));
        }
        // Too many to list: their count and a digest of the set, so two
        // sets of as many stores are told apart.
        Some(many) => {
            let mut ids = many.to_vec();
            ids.sort_unstable();
            let text: Vec<String> = ids.iter().map(i64::to_string).collect();
            let _ = write!(
                name,
                "-{}stores-{}",
                many.len(),
                short_digest(&text.join(","))
            );
        }
        None => {}
    }
    if let Some(r) = &f.region {
        let slug: String = r
            .chars()
            .take(40)
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let _ = write!(name, "-{slug}");
        // A slug that lost characters (not ASCII letters or digits, or past
        // 40) could be another region's: a digest of the name tells them
        // apart (`Île-de-France` and `Üle-de-France`).
        if slug != *r {
            let _ = write!(name, "-{}", short_digest(r));
        }
    }
    let ym = |(y, m): (i32, i32)| format!("{y}-{m:02}");
    let mut period: Vec<String> = Vec::new();
    match (f.year, f.month) {
        (Some(y), Some(m)) => period.push(ym((y, m))),
        (Some(y), None) => period.push(y.to_string()),
        (None, Some(m)) => period.push(format!("month{m:02}")),
        (None, None) => {}
    }
    match (f.from, f.to) {
        (Some(a), Some(b)) if a == b => period.push(ym(a)),
        (Some(a), Some(b)) => period.push(format!("{}_{}", ym(a), ym(b))),
        (Some(a), None) => period.push(format!("{}_latest", ym(a))),
        (None, Some(b)) => period.push(format!("upto_{}", ym(b))),
        (None, None) => {}
    }
    if period.is_empty() {
        period.push("all".to_string());
    }
    let _ = write!(name, "-{}", period.join("-"));
    // As written when short (`min10_5`); past 15 characters in scientific
    // form (`max1e300`, not 301 digits), and one whose digits are many
    // whichever way it is written (400 after the point) as its first 16
    // characters and a digest of the whole, so that the name stays within
    // what file systems hold (255 bytes) and different bounds differ.
    let amount = |v: &sales_core::decimal::Bound| {
        let short = v.short();
        let shown = if short.len() > 24 {
            format!("{}_{}", &short[..16], short_digest(v.as_str()))
        } else {
            short
        };
        shown.replace(['.', '-'], "_")
    };
    if let Some(v) = &f.min_total_sales {
        let _ = write!(name, "-min{}", amount(v));
    }
    if let Some(v) = &f.max_total_sales {
        let _ = write!(name, "-max{}", amount(v));
    }
    if let Some(k) = after {
        let _ = write!(name, "-after-{}", k.to_string().replace(':', "_"));
    }
    let _ = write!(name, "-{}.{}", shape.name(), format.extension());
    name
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::filters::SalesFilter;
    use sales_core::decimal::Bound;

    #[test]
    fn keys() {
        let k = RowKey::parse("12:2024-03", ExportShape::Monthly).unwrap();
        assert_eq!(k.to_string(), "12:2024-03");
        let d = RowKey::parse("12:2024-03-05", ExportShape::Daily).unwrap();
        assert_eq!(d.to_string(), "12:2024-03-05");
        assert!(k < d);
        assert!(RowKey::parse("2:2024-02-29", ExportShape::Daily).is_ok());
        for bad in [
            "12:2024-3",
            "x:2024-03",
            "0:2024-03",
            "12-2024-03",
            "12:2024-13",
            "12:2024-03-05",
            "+1:2024-03",
        ] {
            assert!(RowKey::parse(bad, ExportShape::Monthly).is_err(), "{bad}");
        }
        for bad in [
            "12:2024-03",
            "12:2024-03-32",
            "12:2024-03-5",
            "12:2024-03-00",
            "2:2026-02-30",
            "2:2026-02-29",
            "2:2026-04-31",
        ] {
            assert!(RowKey::parse(bad, ExportShape::Daily).is_err(), "{bad}");
        }
    }

    #[test]
    fn names() {
        let mut f = SalesFilter {
            from: Some((2024, 1)),
            to: Some((2024, 6)),
            ..Default::default()
        };
        assert_eq!(
            file_name(&f, ExportFormat::Csv, ExportShape::Daily, None),
            "sales-2024-01_2024-06-daily.csv"
        );
        f.store_ids = Some(vec![12]);
        assert_eq!(
            file_name(&f, ExportFormat::Ndjson, ExportShape::Monthly, None),
            "sales-store12-2024-01_2024-06-monthly.ndjson"
        );
        assert_eq!(
            file_name(
                &SalesFilter::default(),
                ExportFormat::Json,
                ExportShape::Daily,
                None
            ),
            "sales-all-daily.json"
        );
        // Every narrowing filter shows, so different exports differ.
        let f = SalesFilter {
            store_ids: Some(vec![3, 5]),
            region: Some("Île-de-France / Nord".into()),
            year: Some(2026),
            from: Some((2025, 3)),
            to: Some((2025, 5)),
            min_total_sales: Some(Bound::parse("100.5").unwrap()),
            ..Default::default()
        };
        let after = RowKey::parse("12:2024-03", ExportShape::Monthly).unwrap();
        let name = file_name(&f, ExportFormat::Csv, ExportShape::Monthly, Some(&after));
        let digest = short_digest("Île-de-France / Nord");
        assert_eq!(
            name,
            format!("sales-stores3_5-_le_de_France___Nord-{digest}-2026-2025-03_2025-05-min100_5-after-12_2024-03-monthly.csv")
        );
        // Names that lost characters, and sets of many stores, keep apart.
        let named = |store_ids: Option<Vec<i64>>, region: Option<&str>| {
            let f = SalesFilter {
                store_ids,
                region: region.map(str::to_string),
                ..Default::default()
            };
            file_name(&f, ExportFormat::Csv, ExportShape::Monthly, None)
        };
        assert_ne!(
            named(None, Some("Île-de-France")),
            named(None, Some("Üle-de-France"))
        );
        assert_eq!(named(None, Some("North")), "sales-North-all-monthly.csv");
        assert_ne!(named(Some(vec![1, 2]), None), named(Some(vec![3, 4]), None));
        let six = named(Some((1..=6).collect()), None);
        assert!(six.starts_with("sales-6stores-"), "{six}");
        assert_ne!(six, named(Some((2..=7).collect()), None));
        assert_eq!(six, named(Some(vec![6, 5, 4, 3, 2, 1]), None));
        let f = SalesFilter {
            month: Some(10),
            from: Some((2025, 3)),
            ..Default::default()
        };
        assert_eq!(
            file_name(&f, ExportFormat::Csv, ExportShape::Monthly, None),
            "sales-month10-2025-03_latest-monthly.csv"
        );
        // Totals at the ends of the double range keep the name short.
        let f = SalesFilter {
            store_ids: Some(vec![384]),
            min_total_sales: Some(Bound::parse("1e-300").unwrap()),
            max_total_sales: Some(Bound::parse("1e300").unwrap()),
            ..Default::default()
        };
        assert_eq!(
            file_name(&f, ExportFormat::Csv, ExportShape::Monthly, None),
            "sales-store384-all-min1e_300-max1e300-monthly.csv"
        );
        let f = SalesFilter {
            min_total_sales: Some(Bound::parse("123456789012.75").unwrap()),
            max_total_sales: Some(Bound::parse("1.7976931348623157e308").unwrap()),
            ..Default::default()
        };
        let name = file_name(&f, ExportFormat::Csv, ExportShape::Monthly, None);
        assert_eq!(
            name,
            "sales-all-min123456789012_75-max1_7976931348623157e308-monthly.csv"
        );
        // Many digits either way: bounded, and told apart by a digest.
        let long = |digits: &str| {
            let f = SalesFilter {
                min_total_sales: Some(Bound::parse(&format!("0.{digits}")).unwrap()),
                max_total_sales: Some(Bound::parse(&"9".repeat(309)).unwrap()),
                ..Default::default()
            };
            file_name(&f, ExportFormat::Csv, ExportShape::Monthly, None)
        };
        let (a, b) = (long(&"12".repeat(200)), long(&"13".repeat(200)));
        assert!(a.len() < 120 && b.len() < 120, "{a} {b}");
        assert_ne!(a, b);
    }
}
