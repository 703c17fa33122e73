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
                if !(1..=31).contains(&d) {
                    return Err(bad());
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

/// `sales[-store12]-2024-01_2024-06-daily.csv`.
pub fn file_name(
    f: &crate::http::filters::SalesFilter,
    format: ExportFormat,
    shape: ExportShape,
) -> String {
    let mut name = String::from("sales");
    if let Some(s) = f.single_store() {
        let _ = write!(name, "-store{s}");
    }
    let ym = |(y, m): (i32, i32)| format!("{y}-{m:02}");
    let period = match (f.year, f.month, f.from, f.to) {
        (Some(y), Some(m), _, _) => ym((y, m)),
        (Some(y), None, _, _) => y.to_string(),
        (None, _, Some(a), Some(b)) if a == b => ym(a),
        (None, _, Some(a), Some(b)) => format!("{}_{}", ym(a), ym(b)),
        (None, _, Some(a), None) => format!("{}_latest", ym(a)),
        (None, _, None, Some(b)) => format!("upto_{}", ym(b)),
        (None, Some(m), None, None) => format!("month{m:02}"),
        (None, None, None, None) => "all".to_string(),
    };
    let _ = write!(name, "-{period}-{}.{}", shape.name(), format.extension());
    name
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::filters::SalesFilter;

    #[test]
    fn keys() {
        let k = RowKey::parse("12:2024-03", ExportShape::Monthly).unwrap();
        assert_eq!(k.to_string(), "12:2024-03");
        let d = RowKey::parse("12:2024-03-05", ExportShape::Daily).unwrap();
        assert_eq!(d.to_string(), "12:2024-03-05");
        assert!(k < d);
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
        for bad in ["12:2024-03", "12:2024-03-32", "12:2024-03-5"] {
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
            file_name(&f, ExportFormat::Csv, ExportShape::Daily),
            "sales-2024-01_2024-06-daily.csv"
        );
        f.store_ids = Some(vec![12]);
        assert_eq!(
            file_name(&f, ExportFormat::Ndjson, ExportShape::Monthly),
            "sales-store12-2024-01_2024-06-monthly.ndjson"
        );
        assert_eq!(
            file_name(
                &SalesFilter::default(),
                ExportFormat::Json,
                ExportShape::Daily
            ),
            "sales-all-daily.json"
        );
    }
}
