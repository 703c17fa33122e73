//! Summaries (`GET /api/v2/sales/summary`, SQL `sales.summary`): group by
//! any combination of dimensions, any metrics, the list's filters, an
//! optional comparison period and a top N, rendered into one SQL statement
//! here, once, for the server (bind parameters) and the extension
//! (literals).
//!
//! The unit of data is a store-day. Dimensions and metrics that a month's
//! stored totals answer (`store`, `region`, `year`, `quarter`, `month`;
//! sums of sales and customers, counts) read `sales.monthly_sales` row by
//! row; a day-level dimension (`week`, `weekday`, `day`) or metric (avg,
//! min, max, transactions) expands `daily_data` with `jsonb_each`.
//!
//! Whichever source a request reads, a metric answers the same: with
//! month-level dimensions a month with no days still counts (one source row
//! with no day), so `months`, `stores`, `count` and the groups never depend
//! on the other metrics asked for. Sums over nothing (no day, or days that
//! lack the field) are 0, as the stored totals say; averages, minima, maxima
//! and `salesPerCustomer` over nothing are null.
//!
//! Comparison: `previousYear` reads the same months a year earlier,
//! `previousPeriod` the same number of months just before; each compared
//! day (or month) is moved forward by that many months and grouped with the
//! same keys, so "2024-03" meets "2023-03". With a day-level dimension, a
//! compared day that has no counterpart (29 February against a common year,
//! the 31st against a 30-day month) is left out rather than counted twice.

use crate::sql::{push_terms, SqlValue, SqlWriter, Term};

/// The most groups a summary answers without `top` (more: `truncated`).
pub const MAX_GROUPS: u32 = 10_000;
/// The largest `top`.
pub const MAX_TOP: u32 = 1_000;

/// A refused parameter: which one and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SummaryError {
    pub param: &'static str,
    pub reason: String,
}

fn err<T>(param: &'static str, reason: impl Into<String>) -> Result<T, SummaryError> {
    Err(SummaryError {
        param,
        reason: reason.into(),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dim {
    Store,
    Region,
    Year,
    Quarter,
    Month,
    Week,
    Weekday,
    Day,
}

const DIMS: &[(&str, Dim)] = &[
    ("store", Dim::Store),
    ("region", Dim::Region),
    ("year", Dim::Year),
    ("quarter", Dim::Quarter),
    ("month", Dim::Month),
    ("week", Dim::Week),
    ("weekday", Dim::Weekday),
    ("day", Dim::Day),
];

impl Dim {
    pub fn name(self) -> &'static str {
        DIMS.iter()
            .find(|(_, d)| *d == self)
            .map(|(n, _)| *n)
            .unwrap_or("")
    }

    /// The member of a result row that holds this dimension.
    pub fn key(self) -> &'static str {
        match self {
            Dim::Store => "storeId",
            d => d.name(),
        }
    }

    /// Needs the days of a month.
    pub fn daily(self) -> bool {
        matches!(self, Dim::Week | Dim::Weekday | Dim::Day)
    }

    /// Its SQL over a source row `m` and its date `d`.
    fn expr(self) -> &'static str {
        match self {
            Dim::Store => "m.store_id",
            Dim::Region => "m.region",
            Dim::Year => "extract(year FROM d)::int",
            Dim::Quarter => "to_char(d, 'YYYY-\"Q\"Q')",
            Dim::Month => "to_char(d, 'YYYY-MM')",
            Dim::Week => "to_char(d, 'IYYY-\"W\"IW')",
            Dim::Weekday => "extract(isodow FROM d)::int",
            Dim::Day => "to_char(d, 'YYYY-MM-DD')",
        }
    }

    /// Its SQL on the compared side, whose dates `d` were moved forward
    /// `shift` months (`d0`: the date as stored). A weekday is the row's
    /// own (Monday compares with Monday, not with the weekday a date a year
    /// on falls on), and a week moved by whole years is the same ISO week
    /// number that many ISO years on; the rest follow the moved date. With
    /// `day` among the dimensions (`by_day`) every dimension follows the
    /// moved date: a day's weekday and week are the day's, so the compared
    /// day meets its counterpart under the same keys.
    fn expr_shifted(self, shift: i32, by_day: bool) -> String {
        match self {
            _ if by_day => self.expr().into(),
            Dim::Weekday if shift != 0 => "extract(isodow FROM d0)::int".into(),
            Dim::Week if shift != 0 && shift % 12 == 0 => format!(
                "lpad((extract(isoyear FROM d0)::int + {})::text, 4, '0') || '-W' || to_char(d0, 'IW')",
                shift / 12
            ),
            _ => self.expr().into(),
        }
    }

    /// Whether its key on the compared side comes from the moved date, so
    /// that a day with no counterpart after the move (29 February a year
    /// on) must be left out.
    fn follows_moved_day(self, shift: i32) -> bool {
        match self {
            Dim::Day => true,
            Dim::Week => shift % 12 != 0,
            _ => false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    Sales,
    Customers,
    Transactions,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Agg {
    Sum,
    Avg,
    Min,
    Max,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Metric {
    /// Sum of sales (the stored monthly totals), as `sumSales`.
    TotalSales,
    /// Sum of customers, as `sumCustomers`.
    TotalCustomers,
    /// Store-months with data.
    Months,
    /// Distinct stores.
    Stores,
    /// Store-days reported.
    Count,
    Of(Agg, Field),
    /// Sum of sales / sum of customers.
    SalesPerCustomer,
}

const AGGS: &[(&str, Agg)] = &[
    ("sum", Agg::Sum),
    ("avg", Agg::Avg),
    ("min", Agg::Min),
    ("max", Agg::Max),
];
const FIELDS: &[(&str, Field)] = &[
    ("Sales", Field::Sales),
    ("Customers", Field::Customers),
    ("Transactions", Field::Transactions),
];

impl Metric {
    pub fn all() -> Vec<Metric> {
        let mut v = vec![
            Metric::TotalSales,
            Metric::TotalCustomers,
            Metric::Months,
            Metric::Stores,
            Metric::Count,
        ];
        for (_, a) in AGGS {
            for (_, f) in FIELDS {
                v.push(Metric::Of(*a, *f));
            }
        }
        v.push(Metric::SalesPerCustomer);
        v
    }

    pub fn name(self) -> String {
        match self {
            Metric::TotalSales => "totalSales".into(),
            Metric::TotalCustomers => "totalCustomers".into(),
            Metric::Months => "months".into(),
            Metric::Stores => "stores".into(),
            Metric::Count => "count".into(),
            Metric::SalesPerCustomer => "salesPerCustomer".into(),
            Metric::Of(a, f) => {
                let a = AGGS.iter().find(|(_, x)| *x == a).map(|(n, _)| *n).unwrap();
                let f = FIELDS
                    .iter()
                    .find(|(_, x)| *x == f)
                    .map(|(n, _)| *n)
                    .unwrap();
                format!("{a}{f}")
            }
        }
    }

    pub fn parse(raw: &str) -> Option<Metric> {
        let camel = crate::names::camel_of(raw.trim())?;
        Metric::all().into_iter().find(|m| m.name() == camel)
    }

    /// Answered by the stored monthly totals.
    fn monthly(self) -> bool {
        matches!(
            self,
            Metric::TotalSales
                | Metric::TotalCustomers
                | Metric::Months
                | Metric::Stores
                | Metric::Count
                | Metric::SalesPerCustomer
                | Metric::Of(Agg::Sum, Field::Sales | Field::Customers)
        )
    }

    /// Its value over no rows, as [`Metric::expr`] gives it: 0 for sums
    /// and counts, null for averages, extremes and ratios.
    fn empty(self) -> &'static str {
        match self {
            Metric::TotalSales
            | Metric::TotalCustomers
            | Metric::Months
            | Metric::Stores
            | Metric::Count
            | Metric::Of(Agg::Sum, _) => "0",
            Metric::SalesPerCustomer | Metric::Of(Agg::Avg | Agg::Min | Agg::Max, _) => "NULL",
        }
    }

    /// The aggregate over the source columns (sales, customers,
    /// transactions, days, row_id, store_id).
    fn expr(self) -> String {
        match self {
            Metric::TotalSales | Metric::Of(Agg::Sum, Field::Sales) => {
                "coalesce(sum(sales), 0)".into()
            }
            Metric::TotalCustomers | Metric::Of(Agg::Sum, Field::Customers) => {
                "coalesce(sum(customers), 0)".into()
            }
            Metric::Months => "count(DISTINCT row_id)".into(),
            Metric::Stores => "count(DISTINCT store_id)".into(),
            Metric::Count => "coalesce(sum(days), 0)::bigint".into(),
            // Days with customers and no sales count as sales of 0, as in
            // the stored totals; no customers at all is null.
            Metric::SalesPerCustomer => {
                rounded_quotient("coalesce(sum(sales), 0)", "nullif(sum(customers), 0)", 4)
            }
            Metric::Of(a, f) => {
                let col = match f {
                    Field::Sales => "sales",
                    Field::Customers => "customers",
                    Field::Transactions => "transactions",
                };
                match a {
                    // Over nothing: 0, as the stored totals say.
                    Agg::Sum => format!("coalesce(sum({col}), 0)"),
                    Agg::Avg => rounded_quotient(
                        &format!("sum({col})"),
                        &format!("nullif(count({col}), 0)"),
                        4,
                    ),
                    Agg::Min => format!("min({col})"),
                    Agg::Max => format!("max({col})"),
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compare {
    PreviousPeriod,
    PreviousYear,
}

impl Compare {
    pub fn parse(raw: &str) -> Result<Compare, SummaryError> {
        match crate::names::camel_of(raw.trim()).as_deref().unwrap_or("") {
            "previousPeriod" => Ok(Compare::PreviousPeriod),
            "previousYear" => Ok(Compare::PreviousYear),
            _ => err(
                "compareTo",
                format!("{raw:?} is not previousPeriod or previousYear"),
            ),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Compare::PreviousPeriod => "previousPeriod",
            Compare::PreviousYear => "previousYear",
        }
    }
}

/// What to sort by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OrderKey {
    Dim(Dim),
    Metric(Metric),
    /// The change of a metric against the compared period, in percent.
    Change(Metric),
}

/// Months `from..=to`, both as (year, month).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Period {
    pub from: (i32, i32),
    pub to: (i32, i32),
}

impl Period {
    pub fn months(self) -> i32 {
        (self.to.0 - self.from.0) * 12 + (self.to.1 - self.from.1) + 1
    }

    /// This period moved back `n` months.
    pub fn back(self, n: i32) -> Period {
        let mv = |(y, m): (i32, i32)| {
            let i = y * 12 + (m - 1) - n;
            (i.div_euclid(12), i.rem_euclid(12) + 1)
        };
        Period {
            from: mv(self.from),
            to: mv(self.to),
        }
    }

    pub fn label(p: (i32, i32)) -> String {
        format!("{}-{:02}", p.0, p.1)
    }
}

/// The period the filters select, when they select one: the intersection
/// of `year` (with `month`) and `from` / `to`. An empty intersection is an
/// error naming the parameter that empties it.
pub fn period(
    year: Option<i32>,
    month: Option<i32>,
    from: Option<(i32, i32)>,
    to: Option<(i32, i32)>,
) -> Result<Option<Period>, SummaryError> {
    if let (Some(f), Some(t)) = (from, to) {
        if f > t {
            return err(
                "from",
                format!("{} is after to ({})", Period::label(f), Period::label(t)),
            );
        }
    }
    let (ylo, yhi) = match (year, month) {
        (Some(y), Some(m)) => (Some((y, m)), Some((y, m))),
        (Some(y), None) => (Some((y, 1)), Some((y, 12))),
        _ => (None, None),
    };
    let lo = [ylo, from].into_iter().flatten().max();
    let hi = [yhi, to].into_iter().flatten().min();
    // A month without a year selects that month of every year: the period
    // must hold one. An open end is the first or last month a record can
    // have (`to=2000-01&month=2` holds no February).
    let first = (crate::daily::MIN_YEAR as i32, 1);
    let last = (crate::daily::MAX_YEAR as i32, 12);
    let (lo_m, hi_m) = (lo.or(hi.map(|_| first)), hi.or(lo.map(|_| last)));
    if let (None, Some(m), Some(l), Some(h)) = (year, month, lo_m, hi_m) {
        if l <= h && !(l.0..=h.0).any(|y| (y, m) >= l && (y, m) <= h) {
            return err(
                "month",
                format!(
                    "the period is empty: no month {m} in {} .. {}",
                    Period::label(l),
                    Period::label(h)
                ),
            );
        }
    }
    match (lo, hi) {
        (Some(l), Some(h)) if l > h => err(
            if year.is_some() { "year" } else { "from" },
            format!(
                "the period is empty: {} .. {} (year/month and from/to do not overlap)",
                Period::label(l),
                Period::label(h)
            ),
        ),
        (Some(from), Some(to)) => Ok(Some(Period { from, to })),
        _ => Ok(None),
    }
}

/// A checked summary request (everything but the row filters).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Summary {
    pub group_by: Vec<Dim>,
    pub metrics: Vec<Metric>,
    pub compare: Option<Compare>,
    /// The current period, required with `compare`.
    pub period: Option<Period>,
    pub top: Option<u32>,
    pub order_by: Vec<(OrderKey, bool)>,
}

/// The default metrics: what summaries always answered.
pub fn default_metrics() -> Vec<Metric> {
    vec![
        Metric::TotalSales,
        Metric::TotalCustomers,
        Metric::Months,
        Metric::Stores,
    ]
}

impl Summary {
    /// Checks the request's parameters (as their API names say:
    /// `groupBy`, `metrics`, `compareTo`, `top`, `orderBy`) against the
    /// period the filters select.
    pub fn parse(
        group_by: Option<&str>,
        metrics: Option<&str>,
        compare_to: Option<&str>,
        top: Option<i64>,
        order_by: Option<&str>,
        period: Option<Period>,
    ) -> Result<Summary, SummaryError> {
        // Given, a list names something in every place: `store,,region`
        // or a trailing comma (a value a client left out) is refused
        // rather than read as the names around it.
        let list = |param: &'static str, raw: Option<&str>| -> Result<Vec<String>, SummaryError> {
            let Some(r) = raw else {
                return Ok(Vec::new());
            };
            let names: Vec<String> = r.split(',').map(|p| p.trim().to_string()).collect();
            if names.iter().all(|n| n.is_empty()) {
                return Ok(Vec::new());
            }
            if names.iter().any(|n| n.is_empty()) {
                return err(param, format!("{r:?} has an empty name between commas"));
            }
            Ok(names)
        };
        let mut dims = Vec::new();
        let names = list("groupBy", group_by)?;
        if group_by.is_some() && names.is_empty() {
            return err(
                "groupBy",
                "give at least one of store, region, year, quarter, month, week, weekday, day",
            );
        }
        for n in if names.is_empty() {
            vec!["store".to_string()]
        } else {
            names
        } {
            let Some(d) = DIMS.iter().find(|(k, _)| *k == n).map(|(_, d)| *d) else {
                return err(
                    "groupBy",
                    format!(
                        "unknown dimension {n:?}; allowed: {}",
                        DIMS.iter().map(|d| d.0).collect::<Vec<_>>().join(", ")
                    ),
                );
            };
            if dims.contains(&d) {
                return err("groupBy", format!("{n} given twice"));
            }
            dims.push(d);
        }
        let mut ms = Vec::new();
        let names = list("metrics", metrics)?;
        if metrics.is_some() && names.is_empty() {
            return err("metrics", "give at least one metric");
        }
        for n in &names {
            let Some(m) = Metric::parse(n) else {
                return err(
                    "metrics",
                    format!(
                        "unknown metric {n:?}; allowed: {}",
                        Metric::all()
                            .iter()
                            .map(|m| m.name())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
            };
            if ms.contains(&m) {
                return err("metrics", format!("{n} given twice"));
            }
            ms.push(m);
        }
        if ms.is_empty() {
            ms = default_metrics();
        }
        if ms.len() > 20 {
            return err("metrics", "at most 20 metrics");
        }
        // Given, it names a comparison: an empty one (an unset variable in
        // a client) is refused rather than read as none.
        let compare = compare_to
            .map(|c| {
                if c.trim().is_empty() {
                    return err(
                        "compareTo",
                        "must be previousYear or previousPeriod (leave it out for no comparison)",
                    );
                }
                Compare::parse(c.trim())
            })
            .transpose()?;
        if compare.is_some() && period.is_none() {
            return err(
                "compareTo",
                "needs a period to compare: give from and to, or year (and month)",
            );
        }
        let top = match top {
            None => None,
            Some(n) if (1..=MAX_TOP as i64).contains(&n) => Some(n as u32),
            Some(n) => return err("top", format!("{n} is outside 1..{MAX_TOP}")),
        };
        let mut order = Vec::new();
        let keys = list("orderBy", order_by)?;
        if order_by.is_some() && keys.is_empty() {
            return err(
                "orderBy",
                "names no key (leave the parameter out for the default order)",
            );
        }
        for part in keys {
            let (desc, name) = match part.strip_prefix('-') {
                Some(n) => (true, n.to_string()),
                None => (false, part.trim_start_matches('+').to_string()),
            };
            // Its camelCase or exactly its snake_case spelling, as for
            // metrics (`store_id`, `total_sales_change_pct`).
            let camel = crate::names::camel_of(&name).unwrap_or_else(|| name.clone());
            let key = if let Some(d) = DIMS
                .iter()
                .find(|(k, d)| *k == name || d.key() == camel)
                .map(|(_, d)| *d)
            {
                if !dims.contains(&d) {
                    return err("orderBy", format!("{name} is not a groupBy dimension"));
                }
                OrderKey::Dim(d)
            } else if let Some(m) = camel.strip_suffix("ChangePct").and_then(Metric::parse) {
                if compare.is_none() {
                    return err("orderBy", format!("{name} needs compareTo"));
                }
                if !ms.contains(&m) {
                    return err("orderBy", format!("{} is not among the metrics", m.name()));
                }
                OrderKey::Change(m)
            } else if let Some(m) = Metric::parse(&name) {
                if !ms.contains(&m) {
                    return err("orderBy", format!("{} is not among the metrics", m.name()));
                }
                OrderKey::Metric(m)
            } else {
                return err(
                    "orderBy",
                    format!("cannot order by {name:?}: name a groupBy dimension, a metric, or <metric>ChangePct"),
                );
            };
            if order.iter().any(|(k, _)| *k == key) {
                return err("orderBy", format!("{name} given twice"));
            }
            order.push((key, desc));
        }
        // top without an order: the largest first metric.
        if order.is_empty() && top.is_some() {
            order.push((OrderKey::Metric(ms[0]), true));
        }
        Ok(Summary {
            group_by: dims,
            metrics: ms,
            compare,
            period,
            top,
            order_by: order,
        })
    }

    /// Reads the days of each month (a day-level dimension or metric).
    pub fn daily(&self) -> bool {
        self.group_by.iter().any(|d| d.daily()) || self.metrics.iter().any(|m| !m.monthly())
    }

    /// How many months the compared period lies before the current one.
    pub fn offset_months(&self) -> Option<i32> {
        let p = self.period?;
        Some(match self.compare? {
            Compare::PreviousYear => 12,
            Compare::PreviousPeriod => p.months(),
        })
    }

    /// The compared period.
    pub fn compared_period(&self) -> Option<Period> {
        Some(self.period?.back(self.offset_months()?))
    }

    /// Renders the statement: one row of `rows` (a JSON array as text, in
    /// order, at most `top` or [`MAX_GROUPS`]) and `groups` (how many groups
    /// there were in all). `current` are the row conditions; `compared` the
    /// same with the compared period instead of the current one.
    pub fn render(&self, w: &mut impl SqlWriter, current: &[Term<'_>], compared: &[Term<'_>]) {
        let n = self.group_by.len();
        let keys: Vec<String> = (0..n).map(|i| format!("k{i}")).collect();
        let daily = self.daily();
        w.sql("WITH ");
        self.push_side(w, "a", current, 0, daily);
        if let Some(off) = self.offset_months() {
            w.sql(", ");
            self.push_side(w, "b", compared, off, daily);
            // `c`: the current groups, and those only the compared period
            // has, with the current metrics they would have over no rows
            // (a store that sold then and not now shows, at -100%).
            w.sql(", c AS (SELECT * FROM a UNION ALL SELECT ");
            let mut cols: Vec<String> = keys.iter().map(|k| format!("b.{k}")).collect();
            if self.group_by.contains(&Dim::Store) {
                cols.push("b.store_code".into());
                cols.push("b.store_name".into());
            }
            cols.extend(self.metrics.iter().map(|m| m.empty().to_string()));
            cols.push("b.first_d".into());
            w.sql(&cols.join(", "));
            // Not a group whose first date, moved to the current period, is
            // still to come: months, days or stores of the compared period
            // that the current one has not reached yet are not a fall to 0.
            w.sql(" FROM b WHERE b.first_d <= current_date AND NOT EXISTS (SELECT 1 FROM a WHERE true");
            for k in &keys {
                w.sql(&format!(" AND a.{k} = b.{k}"));
            }
            w.sql(")");
            if let (Some(i), Some(p)) = (
                self.group_by.iter().position(|d| *d == Dim::Week),
                self.period,
            ) {
                // A week moved a year on is the same ISO week number, which
                // the current period's days may not have (2022-W52 holds
                // 1 January 2023; 2023-W52 is not in January 2024): only
                // the current period's own weeks are shown.
                w.sql(&format!(
                    " AND b.k{i} IN (SELECT to_char(g, 'IYYY-\"W\"IW') FROM generate_series(make_date({}, {}, 1), make_date({}, {}, 1) + interval '1 month' - interval '1 day', interval '1 day') g)",
                    p.from.0, p.from.1, p.to.0, p.to.1
                ));
            }
            w.sql(")");
        }
        // The result rows.
        w.sql(" SELECT coalesce(jsonb_agg(r ORDER BY ord) FILTER (WHERE ord <= ");
        let limit = self.top.unwrap_or(MAX_GROUPS);
        w.value(SqlValue::Int(limit as i32));
        w.sql("), '[]'::jsonb)::text AS rows, coalesce(max(total), 0)::bigint AS groups FROM (SELECT ");
        // key: the dimension values joined with '/', as text.
        w.sql("jsonb_build_object('key', concat_ws('/'");
        for k in &keys {
            w.sql(&format!(", a.{k}::text"));
        }
        w.sql(")");
        for (i, d) in self.group_by.iter().enumerate() {
            w.sql(&format!(", '{}', a.k{i}", d.key()));
            if *d == Dim::Store {
                w.sql(", 'storeCode', a.store_code, 'storeName', a.store_name");
            }
        }
        w.sql(")");
        // jsonb_build_object takes at most 100 arguments: metrics go in a second object.
        w.sql(" || jsonb_build_object(");
        for (i, m) in self.metrics.iter().enumerate() {
            if i > 0 {
                w.sql(", ");
            }
            w.sql(&format!("'{}', a.m{i}", m.name()));
        }
        w.sql(")");
        if self.compare.is_some() {
            // `previous` is null where the compared period has no such
            // group (every key is NOT NULL, so a joined row has b.k0);
            // `changePct` is by metric, each null where previous is 0 or
            // missing.
            w.sql(" || jsonb_build_object('previous', CASE WHEN b.k0 IS NULL THEN NULL ELSE jsonb_build_object(");
            for (i, m) in self.metrics.iter().enumerate() {
                if i > 0 {
                    w.sql(", ");
                }
                w.sql(&format!("'{}', b.m{i}", m.name()));
            }
            w.sql(") END, 'changePct', jsonb_build_object(");
            for (i, m) in self.metrics.iter().enumerate() {
                if i > 0 {
                    w.sql(", ");
                }
                w.sql(&format!("'{}', {}", m.name(), change(i)));
            }
            w.sql("))");
        }
        w.sql(" AS r, row_number() OVER (ORDER BY ");
        let mut order: Vec<String> = self
            .order_by
            .iter()
            .map(|(k, desc)| {
                let e = match k {
                    OrderKey::Dim(d) => {
                        format!("a.k{}", self.group_by.iter().position(|x| x == d).unwrap())
                    }
                    OrderKey::Metric(m) => {
                        format!("a.m{}", self.metrics.iter().position(|x| x == m).unwrap())
                    }
                    OrderKey::Change(m) => {
                        change(self.metrics.iter().position(|x| x == m).unwrap())
                    }
                };
                format!(
                    "{e} {}",
                    if *desc {
                        "DESC NULLS LAST"
                    } else {
                        "ASC NULLS LAST"
                    }
                )
            })
            .collect();
        order.extend(keys.iter().map(|k| format!("a.{k}")));
        w.sql(&order.join(", "));
        w.sql(") AS ord, count(*) OVER () AS total FROM ");
        w.sql(if self.compare.is_some() {
            "c AS a"
        } else {
            "a"
        });
        if self.compare.is_some() {
            w.sql(" LEFT JOIN b ON ");
            // Every dimension is NOT NULL (store, region, and dates), so a
            // plain equality join (hashable, unlike IS NOT DISTINCT FROM).
            let on: Vec<String> = keys.iter().map(|k| format!("b.{k} = a.{k}")).collect();
            w.sql(&on.join(" AND "));
        }
        w.sql(") x");
    }

    /// `name AS (SELECT keys, metrics FROM <rows> GROUP BY keys)`, the rows'
    /// dates moved forward `shift` months.
    fn push_side(
        &self,
        w: &mut impl SqlWriter,
        name: &str,
        terms: &[Term<'_>],
        shift: i32,
        daily: bool,
    ) {
        w.sql(name);
        w.sql(" AS (SELECT ");
        let by_day = self.group_by.contains(&Dim::Day);
        for (i, d) in self.group_by.iter().enumerate() {
            w.sql(&format!("{} AS k{i}, ", d.expr_shifted(shift, by_day)));
        }
        if self.group_by.contains(&Dim::Store) {
            w.sql("min(store_code) AS store_code, min(store_name) AS store_name, ");
        }
        let ms: Vec<String> = self
            .metrics
            .iter()
            .enumerate()
            .map(|(i, m)| format!("{} AS m{i}", m.expr()))
            .collect();
        w.sql(&ms.join(", "));
        if self.compare.is_some() {
            // The group's first date (moved, on the compared side): a group
            // only the compared period has is shown only when that date is
            // not in the future (see `render`).
            w.sql(", min(d) AS first_d");
        }
        w.sql(" FROM (SELECT m.id AS row_id, m.store_id, s.region, s.code AS store_code, s.name AS store_name, ");
        let month_start = "make_date(m.year, m.month, 1)";
        let moved = |start: &str| {
            if shift == 0 {
                start.to_string()
            } else {
                format!("({start} + make_interval(months => {shift}))::date")
            }
        };
        let values = "(e.value->>'sales')::numeric AS sales, (e.value->>'customers')::numeric AS customers, \
                      (e.value->>'transactions')::numeric AS transactions";
        if daily && self.group_by.iter().any(|d| d.daily()) {
            // Grouped by day, week or weekday: a month with no days is in
            // no group.
            let day = "make_date(m.year, m.month, e.key::int)";
            w.sql(&format!("{} AS d, {day} AS d0, ", moved(day)));
            w.sql(values);
            w.sql(
                ", 1 AS days \
                   FROM sales.monthly_sales m LEFT JOIN sales.stores s ON s.id = m.store_id \
                   CROSS JOIN LATERAL jsonb_each(m.daily_data) e WHERE true",
            );
            if shift != 0 && self.group_by.iter().any(|d| d.follows_moved_day(shift)) {
                // A day with no counterpart (29 February a year on) is left out.
                w.sql(&format!(
                    " AND extract(day FROM {}) = e.key::int",
                    moved(day)
                ));
            }
        } else if daily {
            // Month-level dimensions, day-level metrics: every month is one
            // row at least, so that a month with no days counts (in
            // `months`, `stores`, the groups) as it does without them; its
            // row has no values and no day.
            w.sql(&format!(
                "{} AS d, {month_start} AS d0, ",
                moved(month_start)
            ));
            w.sql(values);
            w.sql(
                ", (e.key IS NOT NULL)::int AS days \
                   FROM sales.monthly_sales m LEFT JOIN sales.stores s ON s.id = m.store_id \
                   LEFT JOIN LATERAL jsonb_each(m.daily_data) e ON true WHERE true",
            );
        } else {
            w.sql(&format!(
                "{} AS d, {month_start} AS d0, ",
                moved(month_start)
            ));
            w.sql("m.total_sales AS sales, m.total_customers::numeric AS customers, \
                   NULL::numeric AS transactions, m.days_reported AS days \
                   FROM sales.monthly_sales m LEFT JOIN sales.stores s ON s.id = m.store_id WHERE true");
        }
        push_terms(w, terms);
        w.sql(") m");
        if !self.group_by.is_empty() {
            w.sql(" GROUP BY ");
            let g: Vec<String> = (1..=self.group_by.len()).map(|i| i.to_string()).collect();
            w.sql(&g.join(", "));
        }
        w.sql(")");
    }
}

/// The change of metric `i` against the compared period, in percent.
fn change(i: usize) -> String {
    rounded_quotient(
        &format!("(a.m{i} - b.m{i})::numeric * 100"),
        &format!("nullif(b.m{i}, 0)"),
        2,
    )
}

/// SQL for `num / den` rounded half away from zero to `places` digits, from
/// the exact quotient: `round(num / den, places)` would round twice, since
/// numeric division first rounds to a scale of its own choosing (5 places
/// for a quotient near 1e12), so 1125000000000.000045 came out as
/// ….0001. `div` truncates the exact quotient; the scale of the result is
/// `places`, as `round` gives. Null when `den` is.
pub fn rounded_quotient(num: &str, den: &str, places: u32) -> String {
    // Both as numeric: `sign` of a bigint would be taken as float8's.
    let (n, d) = (format!("({num})::numeric"), format!("({den})::numeric"));
    format!("(sign({n}) * sign({d}) * div(2 * abs({n}) * 1e{places} + abs({d}), 2 * abs({d})) * 1e-{places})")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::Literals;

    fn p(from: (i32, i32), to: (i32, i32)) -> Option<Period> {
        Some(Period { from, to })
    }

    #[test]
    fn parameters_are_checked_by_name() {
        let bad = |g, m, c, t, o, per| Summary::parse(g, m, c, t, o, per).unwrap_err().param;
        assert_eq!(
            bad(Some("store,colour"), None, None, None, None, None),
            "groupBy"
        );
        assert_eq!(
            bad(Some("store,store"), None, None, None, None, None),
            "groupBy"
        );
        // Names are spelt as documented, like every other name in a query.
        assert_eq!(bad(Some("STORE"), None, None, None, None, None), "groupBy");
        assert_eq!(bad(Some("Month"), None, None, None, None, None), "groupBy");
        assert_eq!(
            bad(Some("month"), None, None, None, Some("MONTH"), None),
            "orderBy"
        );
        assert_eq!(
            bad(None, Some("sumSales,median"), None, None, None, None),
            "metrics"
        );
        assert_eq!(
            bad(
                None,
                None,
                Some("lastWeek"),
                None,
                None,
                p((2024, 1), (2024, 3))
            ),
            "compareTo"
        );
        assert_eq!(
            bad(None, None, Some("previousYear"), None, None, None),
            "compareTo"
        );
        assert_eq!(bad(None, None, None, Some(1001), None, None), "top");
        assert_eq!(bad(None, None, None, Some(0), None, None), "top");
        assert_eq!(bad(None, None, None, None, Some("month"), None), "orderBy");
        assert_eq!(
            bad(None, None, None, None, Some("totalSalesChangePct"), None),
            "orderBy"
        );
        // A list names something in every place; a given order names a key.
        assert_eq!(
            bad(Some("store,,region"), None, None, None, None, None),
            "groupBy"
        );
        assert_eq!(bad(Some("store,"), None, None, None, None, None), "groupBy");
        assert_eq!(
            bad(None, Some("sumSales,,avgSales"), None, None, None, None),
            "metrics"
        );
        assert_eq!(bad(None, None, None, None, Some(""), None), "orderBy");
        assert_eq!(bad(None, None, None, None, Some(" , "), None), "orderBy");
        assert_eq!(
            bad(None, None, None, None, Some("store,,"), None),
            "orderBy"
        );
        let s = Summary::parse(
            Some("region,month"),
            Some("sum_sales,avgCustomers,salesPerCustomer"),
            Some("previousYear"),
            Some(5),
            Some("-sumSalesChangePct,region"),
            p((2024, 1), (2024, 3)),
        )
        .unwrap();
        assert_eq!(s.group_by, vec![Dim::Region, Dim::Month]);
        assert!(s.daily());
        assert_eq!(s.offset_months(), Some(12));
        assert_eq!(s.compared_period(), p((2023, 1), (2023, 3)));
        // orderBy takes the snake_case spelling too, as metrics do: of a
        // change and of a dimension's key.
        let snake = Summary::parse(
            Some("store,month"),
            Some("total_sales"),
            Some("previousYear"),
            Some(5),
            Some("-total_sales_change_pct,store_id"),
            p((2024, 1), (2024, 3)),
        )
        .unwrap();
        let camel = Summary::parse(
            Some("store,month"),
            Some("totalSales"),
            Some("previousYear"),
            Some(5),
            Some("-totalSalesChangePct,storeId"),
            p((2024, 1), (2024, 3)),
        )
        .unwrap();
        assert_eq!(snake.order_by, camel.order_by);
        assert_eq!(
            bad(None, None, None, None, Some("total__sales"), None),
            "orderBy"
        );
    }

    #[test]
    fn periods() {
        assert_eq!(
            period(Some(2024), None, None, None).unwrap(),
            p((2024, 1), (2024, 12))
        );
        assert_eq!(
            period(Some(2024), None, Some((2024, 3)), None).unwrap(),
            p((2024, 3), (2024, 12))
        );
        assert_eq!(period(None, Some(3), None, None).unwrap(), None);
        assert_eq!(
            period(None, None, Some((2024, 5)), Some((2024, 4)))
                .unwrap_err()
                .param,
            "from"
        );
        assert_eq!(
            period(Some(2023), None, Some((2024, 1)), None)
                .unwrap_err()
                .param,
            "year"
        );
        // A month without a year: every year's, so the period must hold one.
        assert_eq!(
            period(None, Some(2), Some((2024, 3)), Some((2024, 4)))
                .unwrap_err()
                .param,
            "month"
        );
        assert_eq!(
            period(None, Some(2), Some((2024, 3)), Some((2025, 2))).unwrap(),
            p((2024, 3), (2025, 2))
        );
        assert_eq!(
            period(None, Some(12), Some((2024, 12)), Some((2024, 12))).unwrap(),
            p((2024, 12), (2024, 12))
        );
        // One end open: it is the first or last month a record can have.
        for (from, to) in [(None, Some((2000, 1))), (Some((2100, 12)), None)] {
            let e = period(None, Some(2), from, to).unwrap_err();
            assert_eq!(e.param, "month", "{from:?} {to:?}");
        }
        assert_eq!(
            period(None, Some(2), None, Some((2000, 2))).unwrap(),
            None,
            "open from: no period of its own"
        );
        assert!(period(None, Some(11), Some((2100, 11)), None).is_ok());
        assert_eq!(
            Period {
                from: (2024, 1),
                to: (2024, 3)
            }
            .back(3),
            Period {
                from: (2023, 10),
                to: (2023, 12)
            }
        );
        assert_eq!(
            Period {
                from: (2024, 11),
                to: (2025, 2)
            }
            .months(),
            4
        );
    }

    #[test]
    fn renders_one_statement() {
        let s = Summary::parse(Some("store"), None, None, None, None, None).unwrap();
        assert!(!s.daily());
        let mut w = Literals::default();
        s.render(&mut w, &[Term::Year(2024)], &[]);
        assert!(
            w.0.starts_with("WITH a AS (SELECT m.store_id AS k0"),
            "{}",
            w.0
        );
        assert!(!w.0.contains("jsonb_each"), "{}", w.0);
        assert!(w.0.contains("m.year = 2024"), "{}", w.0);
    }

    /// A day-level metric by month-level dimensions keeps the months with
    /// no days (one row with no day each); by a day-level dimension such a
    /// month is in no group.
    #[test]
    fn months_without_days_count_whatever_the_metrics() {
        let render = |g: &str, m: &str| {
            let s = Summary::parse(
                Some(g),
                Some(m),
                Some("previousYear"),
                None,
                None,
                p((2024, 1), (2024, 3)),
            )
            .unwrap();
            let mut w = Literals::default();
            s.render(&mut w, &[Term::Year(2024)], &[]);
            (s.daily(), w.0)
        };
        let (daily, sql) = render("store,month", "months,maxSales");
        assert!(daily);
        assert_eq!(
            sql.matches("LEFT JOIN LATERAL jsonb_each(m.daily_data) e ON true")
                .count(),
            2,
            "{sql}"
        );
        assert!(!sql.contains("CROSS JOIN"), "{sql}");
        assert!(sql.contains("(e.key IS NOT NULL)::int AS days"), "{sql}");
        let (_, sql) = render("week", "months,maxSales");
        assert_eq!(
            sql.matches("CROSS JOIN LATERAL jsonb_each").count(),
            2,
            "{sql}"
        );
        assert!(!sql.contains("LEFT JOIN LATERAL"), "{sql}");
        // The compared metrics are null as a whole where the group is missing.
        assert!(
            sql.contains("'previous', CASE WHEN b.k0 IS NULL THEN NULL ELSE jsonb_build_object("),
            "{sql}"
        );
    }

    /// Sums over nothing are 0 on either source; the rest are null.
    #[test]
    fn sums_over_nothing_are_zero() {
        for m in Metric::all() {
            let (name, expr) = (m.name(), m.expr());
            let zero = name.starts_with("sum") || name.starts_with("total") || m == Metric::Count;
            assert_eq!(expr.starts_with("coalesce("), zero, "{name}: {expr}");
        }
        assert!(Metric::SalesPerCustomer
            .expr()
            .contains("nullif(sum(customers), 0)"));
    }
}
