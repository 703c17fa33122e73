//! Demo data: stores spread over regions, each with months of daily sales
//! shaped like a real chain's (store size, weekday rhythm, season, growth,
//! noise). Written through `sales.batch_upsert`, like any client would.

use crate::cli::SeedArgs;
use anyhow::{bail, Context};
use chrono::{Datelike, NaiveDate, Utc};
use indicatif::{ProgressBar, ProgressStyle};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::{json, Map, Value};
use sqlx::PgPool;

const REGIONS: &[&str] = &[
    "North",
    "South",
    "East",
    "West",
    "Central",
    "Coastal",
    "Highlands",
    "Lakes",
    "Valley",
    "Metro",
    "Islands",
    "Plains",
];
const PLACES: &[&str] = &[
    "Market Street",
    "Harbour",
    "Old Town",
    "Riverside",
    "Station",
    "Park Lane",
    "High Street",
    "Mill Road",
    "Cathedral",
    "Airport",
    "University",
    "Garden City",
    "Bridge End",
    "Castle Hill",
    "Seafront",
    "Northgate",
];

#[derive(Debug, Default)]
pub struct SeedSummary {
    pub skipped: bool,
    pub stores: usize,
    pub records: usize,
    pub inserted: i64,
    pub updated: i64,
}

/// (year, month) pairs ending with `end`, oldest first.
fn months_back(end: (i32, u32), count: u32) -> Vec<(i32, u32)> {
    let mut out = Vec::with_capacity(count as usize);
    let (mut y, mut m) = end;
    for _ in 0..count {
        out.push((y, m));
        if m == 1 {
            y -= 1;
            m = 12;
        } else {
            m -= 1;
        }
    }
    out.reverse();
    out
}

fn parse_end(raw: Option<&str>) -> anyhow::Result<((i32, u32), Option<u32>)> {
    let today = Utc::now().date_naive();
    match raw {
        None => Ok(((today.year(), today.month()), Some(today.day()))),
        Some(s) => {
            // Exactly YYYY-MM: `26-1` is not read as the year 26, nor
            // `+2026-11` or `02026-11` as 2026.
            let shaped = s.len() == 7
                && s.bytes().enumerate().all(|(i, b)| {
                    if i == 4 {
                        b == b'-'
                    } else {
                        b.is_ascii_digit()
                    }
                });
            if !shaped {
                bail!("--end must look like 2025-06 (YYYY-MM), got {s:?}");
            }
            let (y, m) = s.split_once('-').context("--end must look like 2025-06")?;
            let y: i32 = y.parse().context("--end: bad year")?;
            let m: u32 = m.parse().context("--end: bad month")?;
            if !(1..=12).contains(&m) {
                bail!("--end: month must be 1..12");
            }
            if i64::from(y) < sales_core::daily::MIN_YEAR {
                bail!(
                    "--end: {s} is before {}, the first year a record may have",
                    sales_core::daily::MIN_YEAR
                );
            }
            if (y, m) > (today.year(), today.month()) {
                bail!(
                    "--end: {y}-{m:02} is after the current month ({}-{:02}); demo data has no future sales",
                    today.year(),
                    today.month()
                );
            }
            let last = if (y, m) == (today.year(), today.month()) {
                Some(today.day())
            } else {
                None
            };
            Ok(((y, m), last))
        }
    }
}

/// One month of daily data for a store.
fn month_data(
    rng: &mut StdRng,
    base: f64,
    growth: f64,
    year: i32,
    month: u32,
    last_day: Option<u32>,
) -> Value {
    let days = sales_core::daily::days_in_month(year as i64, month as i64).unwrap_or(28);
    let days = last_day.map_or(days, |d| d.min(days));
    let season = match month {
        12 => 1.45,
        11 => 1.15,
        1 => 0.85,
        2 => 0.9,
        7 | 8 => 1.1,
        _ => 1.0,
    };
    let mut out = Map::new();
    for d in 1..=days {
        let weekday = NaiveDate::from_ymd_opt(year, month, d)
            .map(|dt| dt.weekday().num_days_from_monday())
            .unwrap_or(0);
        let week = match weekday {
            5 => 1.35,
            6 => 1.2,
            4 => 1.1,
            _ => 1.0,
        };
        let noise: f64 = rng.gen_range(0.8..1.2);
        let sales = (base * growth * season * week * noise * 100.0).round() / 100.0;
        let basket: f64 = rng.gen_range(22.0..48.0);
        let customers = (sales / basket).round().max(1.0) as i64;
        out.insert(d.to_string(), json!({"sales": sales, "customers": customers, "transactions": customers + rng.gen_range(0..(customers / 10 + 2))}));
    }
    Value::Object(out)
}

/// Checks the arguments before the command touches the database: `--end`
/// and how far back `--months` reaches from it (records start in 2000).
pub fn check(args: &SeedArgs) -> anyhow::Result<()> {
    let (end, _) = parse_end(args.end.as_deref())?;
    let first = months_back(end, args.months)[0];
    if i64::from(first.0) < sales_core::daily::MIN_YEAR {
        let most = (end.0 as i64 - sales_core::daily::MIN_YEAR) * 12 + end.1 as i64;
        bail!(
            "--months: {} months ending {}-{:02} would start in {}-{:02}; records start in {} (at most {most} months end there)",
            args.months,
            end.0,
            end.1,
            first.0,
            first.1,
            sales_core::daily::MIN_YEAR
        );
    }
    Ok(())
}

/// What `--if-empty` finds.
#[derive(Debug, PartialEq, Eq)]
enum Found {
    /// No stores: seed.
    Empty,
    /// A seed cut off part-way: add the store-months it lacks.
    CutOff,
    /// Someone's data: leave it alone.
    Data,
}

/// A database with stores is left alone, except one holding exactly a
/// seed's stores (`ST0001` up, in id order, no more than asked for) of
/// which some have no month yet: a seed that was cut off part-way (it
/// writes the stores first, then their months a batch at a time, store
/// after store). Its missing store-months are added; the months it has
/// are left as they are.
async fn found(pool: &PgPool, args: &SeedArgs) -> anyhow::Result<Found> {
    let (stores, seeded_codes, without_months): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*),
                count(*) FILTER (WHERE code = 'ST' || lpad(n::text, greatest(4, length(n::text)), '0')),
                count(*) FILTER (WHERE NOT EXISTS (SELECT 1 FROM sales.monthly_sales m WHERE m.store_id = s.id))
         FROM (SELECT id, code, row_number() OVER (ORDER BY id) AS n FROM sales.stores) s",
    )
    .fetch_one(pool)
    .await?;
    Ok(if stores == 0 {
        Found::Empty
    } else if seeded_codes == stores && stores <= i64::from(args.stores) && without_months > 0 {
        Found::CutOff
    } else {
        Found::Data
    })
}

pub async fn seed(pool: &PgPool, args: &SeedArgs) -> anyhow::Result<SeedSummary> {
    check(args)?;
    let found = if args.if_empty {
        found(pool, args).await?
    } else {
        Found::Empty
    };
    if found == Found::Data {
        return Ok(SeedSummary {
            skipped: true,
            ..Default::default()
        });
    }
    // Store-months a cut-off seed wrote already: kept as they are.
    let have: std::collections::HashSet<(i64, i32, i32)> = if found == Found::CutOff {
        sqlx::query_as::<_, (i64, i32, i32)>(
            "SELECT store_id, year, month FROM sales.monthly_sales",
        )
        .fetch_all(pool)
        .await?
        .into_iter()
        .collect()
    } else {
        Default::default()
    };
    let (end, last_day) = parse_end(args.end.as_deref())?;
    let months = months_back(end, args.months);
    let mut rng = StdRng::seed_from_u64(args.seed);

    let n = args.stores as usize;
    let codes: Vec<String> = (1..=n).map(|i| format!("ST{i:04}")).collect();
    let names: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "{} {}",
                PLACES[i % PLACES.len()],
                REGIONS[i % args.regions as usize]
            )
        })
        .collect();
    let regions: Vec<String> = (0..n)
        .map(|i| REGIONS[i % args.regions as usize].to_string())
        .collect();
    let statuses: Vec<String> = (0..n)
        .map(|i| {
            match i % 40 {
                7 => "renovating",
                23 => "closed",
                _ => "open",
            }
            .to_string()
        })
        .collect();
    let ids: Vec<i64> = sqlx::query_scalar(
        "WITH input AS (SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) WITH ORDINALITY AS t(code, name, region, status, ord)),
              ins AS (INSERT INTO sales.stores (code, name, region, status)
                      SELECT code, name, region, status FROM input ORDER BY ord
                      ON CONFLICT (code) DO NOTHING RETURNING id, code)
         -- Rows inserted by the CTE are not visible to this query's snapshot: take their ids from RETURNING.
         SELECT coalesce(n.id, s.id) FROM input i
         LEFT JOIN ins n ON n.code = i.code LEFT JOIN sales.stores s ON s.code = i.code
         ORDER BY i.ord",
    )
    .bind(&codes)
    .bind(&names)
    .bind(&regions)
    .bind(&statuses)
    .fetch_all(pool)
    .await
    .context("creating stores")?;

    let total = ids.len() * months.len();
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} months ({per_sec}, eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message("seeding");

    let mut summary = SeedSummary {
        stores: ids.len(),
        ..Default::default()
    };
    let mut batch: Vec<Value> = Vec::with_capacity(args.batch as usize);
    for &store in &ids {
        let base: f64 = rng.gen_range(1500.0..15000.0);
        let yearly_growth: f64 = rng.gen_range(-0.03..0.12);
        for (i, &(y, m)) in months.iter().enumerate() {
            let growth = 1.0 + yearly_growth * (i as f64 / 12.0);
            let day_limit = if (y, m) == end { last_day } else { None };
            // Generated either way, so that the months after it draw what
            // they would have drawn.
            let days = month_data(&mut rng, base, growth, y, m, day_limit);
            if have.contains(&(store, y, m as i32)) {
                bar.inc(1);
                continue;
            }
            batch.push(json!({"storeId": store, "year": y, "month": m, "dailyData": days}));
            if batch.len() >= args.batch as usize {
                flush(pool, &mut batch, &mut summary, &bar).await?;
            }
        }
    }
    flush(pool, &mut batch, &mut summary, &bar).await?;
    bar.finish_with_message("seeded");
    Ok(summary)
}

async fn flush(
    pool: &PgPool,
    batch: &mut Vec<Value>,
    summary: &mut SeedSummary,
    bar: &ProgressBar,
) -> anyhow::Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let records = Value::Array(std::mem::take(batch));
    let n = records.as_array().map_or(0, Vec::len);
    let result: Value = sqlx::query_scalar("SELECT sales.batch_upsert($1, 'replace', true)")
        .bind(&records)
        .fetch_one(pool)
        .await
        .context("writing a batch of demo data")?;
    summary.records += n;
    summary.inserted += result["inserted"].as_i64().unwrap_or(0);
    summary.updated += result["updated"].as_i64().unwrap_or(0);
    bar.inc(n as u64);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_wrap_years() {
        assert_eq!(
            months_back((2025, 2), 3),
            vec![(2024, 12), (2025, 1), (2025, 2)]
        );
    }

    #[test]
    fn generated_months_are_valid() {
        let mut rng = StdRng::seed_from_u64(1);
        for (y, m) in months_back((2025, 3), 24) {
            let d = month_data(&mut rng, 5000.0, 1.0, y, m, None);
            assert!(sales_core::daily::validate(y as i64, m as i64, &d, "dailyData").is_empty());
        }
        let d = month_data(&mut rng, 5000.0, 1.0, 2025, 3, Some(10));
        assert_eq!(d.as_object().unwrap().len(), 10);
    }

    #[test]
    fn the_end_is_never_in_the_future() {
        let today = Utc::now().date_naive();
        let this = format!("{}-{:02}", today.year(), today.month());
        assert_eq!(
            parse_end(Some(&this)).unwrap(),
            ((today.year(), today.month()), Some(today.day()))
        );
        assert_eq!(parse_end(Some("2020-02")).unwrap(), ((2020, 2), None));
        let next = format!("{}-{:02}", today.year() + 1, today.month());
        let e = parse_end(Some(&next)).unwrap_err().to_string();
        assert!(e.contains("after the current month"), "{e}");
    }

    #[test]
    fn the_end_is_exactly_year_and_month() {
        for bad in [
            "26-1", "2026-1", "+2026-11", "02026-11", "2026-011", "2026/11", "2026-1x",
        ] {
            let e = parse_end(Some(bad)).unwrap_err().to_string();
            assert!(e.contains("YYYY-MM"), "{bad}: {e}");
        }
    }
}
