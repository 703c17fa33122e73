//! Import files to rows: the project's own export CSVs (daily and monthly
//! shapes), a point-of-sale daily CSV (`store_code,date,sales,customers,
//! transactions` in any order, `,` or `;`, a UTF-8 BOM, CRLF) and NDJSON
//! records. Pure: no database. Every data line becomes staged rows (one per
//! day) or one rejected row with its line, column and reason; the file as a
//! whole is refused only when it is empty, binary or has a header that names
//! no store or date, gives a field twice, or has a column that looks like a
//! misspelt field it lacks (see `misspelt`).
//!
//! Values are checked with the rules of `sales_core::daily` (the ones the
//! extension and the table's CHECK apply), so a staged row is one the merge
//! will accept; numbers are kept as the text of the file.

use sales_core::daily::{days_in_month, MAX_YEAR, MIN_YEAR};
use serde_json::value::RawValue;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read};

/// What the caller asked for (`--format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requested {
    Auto,
    Daily,
    Monthly,
    Ndjson,
}

impl Requested {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(Self::Auto),
            "daily" => Some(Self::Daily),
            "monthly" => Some(Self::Monthly),
            "ndjson" => Some(Self::Ndjson),
            _ => None,
        }
    }
}

/// The shape a file turned out to have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Daily,
    Monthly,
    Ndjson,
}

impl Shape {
    pub fn name(self) -> &'static str {
        match self {
            Shape::Daily => "daily",
            Shape::Monthly => "monthly",
            Shape::Ndjson => "ndjson",
        }
    }
}

/// One day of one input line, ready for the staging table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub line: u64,
    pub day: u32,
    pub store_code: Option<String>,
    pub store_id: Option<i64>,
    /// The store id a line gave beside its store code (NDJSON): the upload
    /// checks that both name one store.
    pub id_too: Option<i64>,
    pub year: i32,
    pub month: u32,
    pub sales: Option<String>,
    pub customers: Option<String>,
    pub transactions: Option<String>,
    /// The column the day came from, when it is not the line's `date`.
    pub col: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub line: u64,
    pub column: Option<String>,
    pub reason: String,
}

/// Why a whole file is refused before anything is queued (HTTP 400).
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum FileError {
    #[error("the file is empty")]
    Empty,
    #[error("the file holds a header but no data lines")]
    NoData,
    #[error("the file is not text (binary content in its first bytes)")]
    Binary,
    #[error("wrong header: {0}")]
    Header(String),
    #[error("could not read the file: {0}")]
    Read(String),
    #[error("the file is larger than {0} bytes (IMPORT_MAX_BYTES)")]
    TooLarge(u64),
    #[error("line {0} is longer than {MAX_LINE_BYTES} bytes")]
    LineTooLong(u64),
    /// A quoted value never closed: the rest of the file would be read as
    /// part of it.
    #[error(
        "line {0}: a quoted value starts here and is never closed (a stray or missing \"?); \
         every line after it would be read as part of it"
    )]
    UnclosedQuote(u64),
    #[error(
        "line {0}: a quoted value starts here and is not closed within {MAX_LINE_BYTES} bytes \
         (a stray or missing \"?)"
    )]
    QuoteTooLong(u64),
    /// A quoted value that runs over line breaks into a record the header
    /// does not match: lines would be lost inside it.
    #[error(
        "line {0}: a quoted value starts here and runs to line {1}, making lines {0} to {1} \
         one record that does not fit the header (a stray or missing \"?)"
    )]
    QuoteSpansLines(u64, u64),
}

/// The longest line (or record of lines joined by a quoted value) read,
/// in bytes, not counting the line break that ends it (a line break inside
/// quotes counts as one byte); a longer one refuses the file, as nothing
/// in a sales file comes near it and reading it would hold it in memory.
pub const MAX_LINE_BYTES: u64 = 1 << 20;

/// The first 40 characters of `raw` when it has more: how much of a value
/// an error message quotes.
fn cut_short(raw: &str) -> Option<&str> {
    raw.char_indices().nth(40).map(|(i, _)| &raw[..i])
}

/// A field's text as an error message quotes it: escaped, and cut short.
pub(super) fn shown(raw: &str) -> String {
    match cut_short(raw) {
        None => format!("{raw:?}"),
        Some(head) => format!("{head:?}... ({} bytes)", raw.len()),
    }
}

/// What parsing produces, in file order.
pub enum Item {
    Row(Row),
    Rejected(Rejected),
    /// A data line is done (counted once, whatever it produced).
    LineDone,
}

/// Bytes looked at to tell text from binary and to find the format.
const SNIFF: usize = 8192;

/// Reads a whole file, calling `out` for every item. Returns the shape.
pub fn parse<R: Read>(
    input: R,
    requested: Requested,
    mut out: impl FnMut(Item) -> Result<(), FileError>,
) -> Result<Shape, FileError> {
    // The first bytes decide text or binary and the format; they are read
    // in full (a network body arrives in pieces) and then put back in front.
    let mut input = input;
    let mut head = Vec::with_capacity(SNIFF);
    (&mut input)
        .take(SNIFF as u64)
        .read_to_end(&mut head)
        .map_err(read_error)?;
    let reader = BufReader::with_capacity(1 << 16, std::io::Cursor::new(head.clone()).chain(input));
    if head.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(FileError::Empty);
    }
    if looks_binary(&head) {
        return Err(FileError::Binary);
    }
    let text = head.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&head);
    let first = text.iter().find(|b| !b.is_ascii_whitespace()).copied();
    let ndjson = match requested {
        Requested::Ndjson => true,
        Requested::Auto => first == Some(b'{'),
        _ => false,
    };
    if ndjson {
        parse_ndjson(reader, &mut out)?;
        Ok(Shape::Ndjson)
    } else {
        parse_csv(reader, text, requested, &mut out)
    }
}

fn read_error(e: std::io::Error) -> FileError {
    if let Some(f) = e.get_ref().and_then(|i| i.downcast_ref::<FileError>()) {
        return f.clone();
    }
    match e.get_ref().and_then(|i| i.downcast_ref::<TooLarge>()) {
        Some(t) => FileError::TooLarge(t.0),
        None => FileError::Read(e.to_string()),
    }
}

/// The error a size-limited reader raises (see `Limited`).
#[derive(Debug)]
pub struct TooLarge(pub u64);

impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "larger than {} bytes", self.0)
    }
}

impl std::error::Error for TooLarge {}

/// NUL bytes, or bytes that are not UTF-8 (a sequence cut at the end of the
/// sample is fine).
fn looks_binary(head: &[u8]) -> bool {
    if head.contains(&0) {
        return true;
    }
    match std::str::from_utf8(head) {
        Ok(_) => false,
        Err(e) => e.error_len().is_some(),
    }
}

/// A header name in snake_case, as a rejected row names its column:
/// `Store Code`, `storeCode`, `store-code`, `STORE_CODE` -> `store_code`.
/// A capital begins a word after a small letter or a digit, and before a
/// small letter after another capital, so a run of capitals is one word
/// (`SALES` -> `sales`, `storeID` -> `store_id`, `STORECode` ->
/// `store_code`, `D1SALES` -> `d1_sales`).
fn normalize(name: &str) -> String {
    let name = as_written(name);
    let chars: Vec<char> = name.chars().collect();
    let mut out = String::with_capacity(name.len() + 4);
    for (i, &c) in chars.iter().enumerate() {
        let c = if c == ' ' || c == '-' { '_' } else { c };
        if c.is_uppercase() && i > 0 {
            let prev = chars[i - 1];
            let next_small = chars.get(i + 1).is_some_and(|n| n.is_lowercase());
            if prev.is_lowercase() || prev.is_ascii_digit() || (prev.is_uppercase() && next_small) {
                out.push('_');
            }
        }
        if c == '_' && (out.is_empty() || out.ends_with('_')) {
            continue;
        }
        out.extend(c.to_lowercase());
    }
    out.trim_end_matches('_').to_string()
}

/// What a header name is matched by: its snake_case form without the
/// `_`, so every spelling of a name is one key (`store_code`, `StoreCode`,
/// `STORECODE`, `Store Code` -> `storecode`).
fn match_key(snake: &str) -> String {
    snake.replace('_', "")
}

const METRIC_NAMES: [&str; 3] = ["sales", "customers", "transactions"];

/// Where each known column is.
#[derive(Default, Debug)]
struct Columns {
    store_code: Option<usize>,
    store_id: Option<usize>,
    date: Option<usize>,
    year: Option<usize>,
    month: Option<usize>,
    /// Daily shape: sales, customers, transactions.
    metrics: [Option<usize>; 3],
    /// Monthly shape: (column, day, metric index).
    days: Vec<(usize, u32, usize)>,
    /// The names in snake_case, as rejected rows name their column.
    names: Vec<String>,
}

/// Reads a header's names as written (a refusal quotes them so).
fn read_header(written: &[String]) -> Result<Columns, FileError> {
    let names: Vec<String> = written.iter().map(|n| normalize(n)).collect();
    let mut c = Columns {
        names: names.clone(),
        ..Default::default()
    };
    // A name is matched in any spelling (`Sales`, `SALES`), so two
    // spellings of one name are one column given twice; and two names
    // for one field (`date` and `day`, `d1_sales` and `d01_sales`) are a
    // repeated column as much as one name twice: which of the two a line
    // means cannot be told.
    let mut seen = std::collections::HashMap::new();
    let mut days = std::collections::HashMap::new();
    let mut unread: Vec<(usize, String)> = Vec::new();
    let shown = |i: usize| cut_name(as_written(&written[i]));
    let twice = |a: usize, b: usize, what: &str| {
        let (a, b) = (shown(a), shown(b));
        FileError::Header(if a == b {
            format!("column {a} appears twice")
        } else {
            format!("columns {a} and {b} are the same {what}")
        })
    };
    let set = |slot: &mut Option<usize>, i: usize| match *slot {
        Some(j) => Err(twice(j, i, "field")),
        None => {
            *slot = Some(i);
            Ok(())
        }
    };
    for (i, n) in names.iter().enumerate() {
        let key = match_key(n);
        if key.is_empty() {
            continue;
        }
        match key.as_str() {
            "storecode" | "store" | "code" => set(&mut c.store_code, i)?,
            "storeid" => set(&mut c.store_id, i)?,
            "date" | "day" | "businessdate" => set(&mut c.date, i)?,
            "year" => set(&mut c.year, i)?,
            "month" => set(&mut c.month, i)?,
            m => {
                if let Some(k) = METRIC_NAMES.iter().position(|x| *x == m) {
                    set(&mut c.metrics[k], i)?;
                } else if let Some((d, k)) = day_column(m) {
                    if let Some(j) = days.insert((d, k), i) {
                        return Err(twice(j, i, "field"));
                    }
                    c.days.push((i, d, k));
                } else if let Some(j) = seen.insert(as_written(&written[i]), i) {
                    // A column the import does not read, named twice as
                    // written (`note`, `note`). Names that differ (`note`,
                    // `NOTE`) are two such columns, neither of them read.
                    return Err(twice(j, i, "column"));
                } else {
                    unread.push((i, key));
                }
            }
        }
    }
    // Once every known field is placed: a column one slip from a field the
    // header lacks would be ignored with its values.
    for (i, key) in unread {
        if let Some(why) = misspelt(&key, &c) {
            return Err(FileError::Header(format!(
                "column {} is not one the import reads: {why}",
                shown(i)
            )));
        }
    }
    Ok(c)
}

/// A column name as an error message quotes it: at most 40 characters.
fn cut_name(name: &str) -> String {
    match cut_short(name) {
        None => name.to_string(),
        Some(head) => format!("{head}... ({} bytes)", name.len()),
    }
}

/// A header name as a refusal quotes it: without the spaces around it (or
/// a BOM before it).
fn as_written(name: &str) -> &str {
    name.trim().trim_start_matches('\u{feff}').trim()
}

/// The header's names as a refusal lists them: each cut short, and at
/// most 20 of them.
fn found(names: &[String]) -> String {
    const LISTED: usize = 20;
    let mut s = names
        .iter()
        .take(LISTED)
        .map(|n| cut_name(as_written(n)))
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > LISTED {
        s.push_str(&format!(" and {} more", names.len() - LISTED));
    }
    s
}

impl Columns {
    /// Whether the import reads column `i` (other columns are ignored).
    fn is_read(&self, i: usize) -> bool {
        let some = Some(i);
        [
            self.store_code,
            self.store_id,
            self.date,
            self.year,
            self.month,
        ]
        .contains(&some)
            || self.metrics.contains(&some)
            || self.days.iter().any(|d| d.0 == i)
    }
}

/// The fields a column may name, by their match key, as a refusal names
/// them.
const FIELD_NAMES: [(&str, &str); 8] = [
    ("storecode", "store_code"),
    ("storeid", "store_id"),
    ("date", "date"),
    ("year", "year"),
    ("month", "month"),
    ("sales", "sales"),
    ("customers", "customers"),
    ("transactions", "transactions"),
];

/// The columns of the product's own exports that the import does not read.
const EXPORT_ONLY: [&str; 7] = [
    "key",
    "storename",
    "region",
    "totalsales",
    "totalcustomers",
    "totaltransactions",
    "daysreported",
];

/// What a field's name followed by one of these names is another column
/// (`Customer #`, `Sales %`, `Transaction No`), not a misspelt field.
const SUFFIXES: [&str; 8] = ["id", "no", "nr", "num", "number", "#", "%", "$"];

/// Why a column the import does not read (its match key `key`) looks like
/// a misspelt field that the header `c` lacks: one edit (an insertion,
/// deletion, substitution or swap of neighbours) from its name
/// (`Customer`, `transaction`, `Store_Kode`, `dtae`), or a day column with a
/// day no month has or a metric one edit away (`d32_sales`, `d1_sale`).
/// Such a column would be ignored and its values lost, so the file is
/// refused naming it. A field the header already has is not looked for
/// again (`customer_id` beside `customers`), a field's name with an id or
/// unit after it is another column (`Customer #`, `Sales %`), and other
/// unknown columns (`note`, `cashier`) and the exports' own (`key`,
/// `store_name`, totals) are ignored.
fn misspelt(key: &str, c: &Columns) -> Option<String> {
    if EXPORT_ONLY.contains(&key) {
        return None;
    }
    let near = |a: &str, b: &str| {
        edits(a, b) <= 1
            && !SUFFIXES.iter().any(|s| {
                a.strip_suffix(s)
                    .is_some_and(|stem| !stem.is_empty() && b.starts_with(stem))
            })
    };
    if let Some(rest) = key.strip_prefix('d') {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits > 0 {
            let (day, metric) = rest.split_at(digits);
            let known = METRIC_NAMES
                .iter()
                .position(|m| *m == metric || near(metric, m));
            if let Some(k) = known {
                let m = METRIC_NAMES[k];
                let d: u64 = day.parse().unwrap_or(u64::MAX);
                if !(1..=31).contains(&d) {
                    return Some(format!(
                        "day {day} is not a day of a month (d1_{m} .. d31_{m})"
                    ));
                }
                let given = c
                    .days
                    .iter()
                    .any(|&(_, dd, kk)| u64::from(dd) == d && kk == k);
                return (!given).then(|| format!("did you mean d{d}_{m}?"));
            }
        }
    }
    let has = |field: &str| match field {
        "storecode" => c.store_code.is_some(),
        "storeid" => c.store_id.is_some(),
        "date" => c.date.is_some(),
        "year" => c.year.is_some(),
        "month" => c.month.is_some(),
        m => METRIC_NAMES
            .iter()
            .position(|x| *x == m)
            .is_some_and(|k| c.metrics[k].is_some()),
    };
    FIELD_NAMES
        .iter()
        .find(|(k, _)| !has(k) && near(key, k))
        .map(|(_, name)| format!("did you mean {name}?"))
}

/// Edits (insertions, deletions, substitutions, swaps of neighbours)
/// between two names.
fn edits(a: &str, b: &str) -> usize {
    strsim::osa_distance(a, b)
}

/// `d12sales` (the key of `d12_sales`) -> (12, 0).
fn day_column(key: &str) -> Option<(u32, usize)> {
    let rest = key.strip_prefix('d')?;
    let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    let (day, metric) = rest.split_at(digits);
    let d: u32 = day.parse().ok().filter(|d| (1..=31).contains(d))?;
    let k = METRIC_NAMES.iter().position(|x| *x == metric)?;
    Some((d, k))
}

fn parse_csv<R: Read>(
    reader: BufReader<R>,
    head: &[u8],
    requested: Requested,
    out: &mut impl FnMut(Item) -> Result<(), FileError>,
) -> Result<Shape, FileError> {
    // The header is the first line with something in it: blank lines and
    // a spreadsheet's empty rows (`,,,`, `;;;`, spaces) before it are
    // not data, and guessing the delimiter from one of them would split
    // the header wrongly.
    let header_line = head
        .strip_prefix(b"\xEF\xBB\xBF")
        .unwrap_or(head)
        .split(|b| *b == b'\n' || *b == b'\r')
        .find(|l| {
            l.iter()
                .any(|b| !b.is_ascii_whitespace() && !matches!(b, b',' | b';'))
        })
        .unwrap_or(head);
    let (commas, semis) = header_line.iter().fold((0, 0), |(c, s), b| match b {
        b',' => (c + 1, s),
        b';' => (c, s + 1),
        _ => (c, s),
    });
    let delimiter = if semis > commas { b';' } else { b',' };
    let breaks = SharedBreaks::default();
    let mut csv = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .flexible(true)
        .has_headers(false)
        .from_reader(Lf {
            inner: reader,
            held_cr: false,
            offset: 0,
            breaks: breaks.clone(),
            delimiter,
        });
    let mut record = csv::ByteRecord::new();
    loop {
        let got = csv.read_byte_record(&mut record).map_err(csv_read_error)?;
        if !got {
            return Err(FileError::Empty);
        }
        // Either delimiter: an empty row of the other one (`,,,` above a
        // `;` header) is one field of commas.
        let empty = |b: &u8| b.is_ascii_whitespace() || matches!(b, b',' | b';');
        if !record.iter().all(|f| f.iter().all(empty)) {
            break;
        }
    }
    let written: Vec<String> = record
        .iter()
        .map(|f| String::from_utf8_lossy(f).into_owned())
        .collect();
    let cols = read_header(&written)?;
    let shape = match requested {
        Requested::Daily => Shape::Daily,
        Requested::Monthly => Shape::Monthly,
        _ if cols.date.is_some() => Shape::Daily,
        _ if cols.year.is_some() && cols.month.is_some() => Shape::Monthly,
        _ => Shape::Daily,
    };
    let found = found(&written);
    if cols.store_code.is_none() && cols.store_id.is_none() {
        return Err(FileError::Header(format!(
            "no store column (store_code or store_id); found: {found}"
        )));
    }
    match shape {
        Shape::Daily => {
            if cols.date.is_none() {
                return Err(FileError::Header(format!(
                    "the daily shape needs a date column; found: {found}"
                )));
            }
            if cols.metrics.iter().all(Option::is_none) {
                return Err(FileError::Header(format!(
                    "no metric column (sales, customers, transactions); found: {found}"
                )));
            }
            if let Some(&(i, _, _)) = cols.days.first() {
                return Err(FileError::Header(format!(
                    "column {} is not read in the daily shape, which reads a date and its \
                     day's sales, customers, transactions (format=monthly reads day columns); \
                     found: {found}",
                    cut_name(as_written(&written[i]))
                )));
            }
        }
        Shape::Monthly => {
            // A date or a day's metric column is read in the daily shape
            // only: here its values would be dropped without a word.
            let daily_only = [cols.date].into_iter().chain(cols.metrics).flatten().next();
            if let Some(i) = daily_only {
                return Err(FileError::Header(format!(
                    "column {} is not read in the monthly shape, which reads d1_sales ... \
                     d31_transactions (format=daily reads a date and its day's metrics); found: {found}",
                    cut_name(as_written(&written[i]))
                )));
            }
            if cols.year.is_none() || cols.month.is_none() {
                return Err(FileError::Header(format!(
                    "the monthly shape needs year and month columns; found: {found}"
                )));
            }
            if cols.days.is_empty() {
                return Err(FileError::Header(format!(
                    "no day columns (d1_sales ... d31_customers); found: {found}"
                )));
            }
        }
        Shape::Ndjson => unreachable!(),
    }
    let decimal_comma = delimiter == b';';
    let mut lines = 0u64;
    let mut line_of = LineOf { breaks, before: 0 };
    loop {
        match csv.read_byte_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                // A broken line (bad quoting, invalid UTF-8 is not checked by
                // byte records): reported, the reader goes on.
                if let Some(p) = e.position() {
                    lines += 1;
                    out(Item::Rejected(Rejected {
                        line: line_of.at(p.byte()),
                        column: None,
                        reason: format!("malformed line: {e}"),
                    }))?;
                    out(Item::LineDone)?;
                    continue;
                }
                return Err(csv_read_error(e));
            }
        }
        let start = record.position().map_or(0, |p| p.byte());
        let line = line_of.at(start);
        lines += 1;
        // Text right after a closing quote within this record: the value
        // it was glued to is not what the file says.
        let glued = {
            let end = csv.position().byte();
            let mut b = line_of.breaks.borrow_mut();
            while b.stray.front().is_some_and(|&at| at < start) {
                b.stray.pop_front();
            }
            let mut glued = false;
            while b.stray.front().is_some_and(|&at| at < end) {
                b.stray.pop_front();
                glued = true;
            }
            glued
        };
        // A line of delimiters only (a spreadsheet's empty row, `,,,`) or
        // of spaces is not data, whatever its number of fields.
        if record.iter().all(|f| f.iter().all(u8::is_ascii_whitespace)) {
            lines -= 1;
            continue;
        }
        // A quoted value over line breaks is read as one value, lines and
        // all: when the record it makes does not fit the header, or a
        // value the import reads has a line break inside it (not at its
        // ends, which are trimmed), a quote is stray or missing and the
        // lines inside it would be lost. The file is refused, naming the
        // line where the quote opened.
        let mut breaks_before = 0u64;
        for (i, f) in record.iter().enumerate() {
            let n = f.iter().filter(|b| **b == b'\n').count() as u64;
            let inside = || f.trim_ascii().contains(&b'\n');
            if n > 0 && (record.len() != cols.names.len() || (cols.is_read(i) && inside())) {
                let spanned: u64 = record
                    .iter()
                    .map(|f| f.iter().filter(|b| **b == b'\n').count() as u64)
                    .sum();
                return Err(FileError::QuoteSpansLines(
                    line + breaks_before,
                    line + spanned,
                ));
            }
            breaks_before += n;
        }
        if record.len() != cols.names.len() {
            out(Item::Rejected(Rejected {
                line,
                column: None,
                reason: format!(
                    "malformed line: {} fields where the header has {}",
                    record.len(),
                    cols.names.len()
                ),
            }))?;
            out(Item::LineDone)?;
            continue;
        }
        if glued {
            out(Item::Rejected(Rejected {
                line,
                column: None,
                reason: "malformed line: text after a closing quote (a quote inside a value \
                         is written twice, `\"\"`, and the whole value quoted)"
                    .to_string(),
            }))?;
            out(Item::LineDone)?;
            continue;
        }
        let fields: Result<Vec<&str>, (usize, &str)> = record
            .iter()
            .enumerate()
            .map(|(i, f)| {
                // Postgres text cannot hold NUL: the row is refused here,
                // not the whole file at COPY.
                if f.contains(&0) {
                    return Err((i, "contains a NUL byte"));
                }
                std::str::from_utf8(f)
                    .map(str::trim)
                    .map_err(|_| (i, "not UTF-8 text"))
            })
            .collect();
        let result = match fields {
            Err((i, why)) => Err(vec![(Some(cols.names[i].clone()), why.to_string())]),
            Ok(f) => match shape {
                Shape::Daily => daily_line(&cols, &f, line, decimal_comma).map(|r| vec![r]),
                _ => monthly_line(&cols, &f, line, decimal_comma),
            },
        };
        match result {
            Ok(rows) => {
                for r in rows {
                    out(Item::Row(r))?;
                }
            }
            Err(errors) => {
                for (column, reason) in errors {
                    out(Item::Rejected(Rejected {
                        line,
                        column,
                        reason,
                    }))?;
                }
            }
        }
        out(Item::LineDone)?;
    }
    if lines == 0 {
        return Err(FileError::NoData);
    }
    Ok(shape)
}

/// Where the line breaks are, shared by the reader that sees the bytes
/// ([`Lf`]) and the parser that asks for line numbers ([`LineOf`]).
#[derive(Default)]
struct Breaks {
    /// Runs of consecutive `\n` not yet behind the parser, as (offset of
    /// the first, how many): a run of blank lines is one entry, so memory
    /// stays small whatever a file holds between two records.
    runs: std::collections::VecDeque<(u64, u64)>,
    /// `\n` seen so far.
    total: u64,
    /// Bytes of the record being read: from its first byte up to (not
    /// counting) the line break that ends it, a line break inside quotes
    /// counting as one byte. Blank lines before it are not part of it.
    record_bytes: u64,
    /// `\n` before the record being read: its line is one more.
    record_start: u64,
    /// Where the csv reader is in its grammar, byte by byte (the same
    /// states as `csv_core`'s): a blank line, an open quoted value.
    state: Quoting,
    /// The line of the quote that opened the quoted value being read.
    quote_line: u64,
    /// Offsets of text right after a closing quote (`"12"50`), not yet
    /// behind the parser: the csv reader would append it to the value
    /// (`1250`), so the line is rejected instead.
    stray: std::collections::VecDeque<u64>,
}

/// The csv reader's states that matter for line breaks and quotes, as
/// `csv_core` moves between them (no comments, no escape character, `""`
/// inside quotes), once every line break is a `\n`.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
enum Quoting {
    /// At the start of a record: a `\n` here is a blank line.
    #[default]
    StartRecord,
    StartField,
    /// In an unquoted value: a `"` is an ordinary character.
    InField,
    /// Inside quotes: delimiters and line breaks belong to the value.
    InQuotes,
    /// A `"` inside quotes: closes the value, or is the first of `""`.
    QuoteInQuotes,
}

impl Breaks {
    /// Moves the grammar past byte `b` (`delimiter` separates fields) and
    /// measures the record it belongs to: a record longer than
    /// MAX_LINE_BYTES is refused, naming the line it starts on (or the
    /// line of a quote still open).
    fn step(&mut self, b: u8, at: u64, delimiter: u8) -> Result<(), FileError> {
        // Blanks after a closing quote are trimmed off the value anyway;
        // anything else would be glued to it.
        if self.state == Quoting::QuoteInQuotes
            && !matches!(b, b'"' | b'\n' | b' ' | b'\t')
            && b != delimiter
        {
            self.stray.push_back(at);
        }
        let state = self.next_state(b, delimiter);
        if b == b'\n' && state == Quoting::StartRecord {
            // The break that ends a record (or a blank line).
            self.state = state;
            self.record_bytes = 0;
            self.record_start = self.total;
            return Ok(());
        }
        self.state = state;
        self.record_bytes += 1;
        if self.record_bytes > MAX_LINE_BYTES {
            return Err(match state {
                Quoting::InQuotes | Quoting::QuoteInQuotes => {
                    FileError::QuoteTooLong(self.quote_line)
                }
                _ => FileError::LineTooLong(self.record_start + 1),
            });
        }
        Ok(())
    }

    /// The grammar's state after byte `b`.
    fn next_state(&mut self, b: u8, delimiter: u8) -> Quoting {
        use Quoting::*;
        match (self.state, b) {
            (StartRecord | StartField, b'"') => {
                self.quote_line = self.total + 1;
                InQuotes
            }
            (InQuotes, b'"') => QuoteInQuotes,
            (InQuotes, _) => InQuotes,
            (QuoteInQuotes, b'"') => InQuotes,
            (_, b'\n') => StartRecord,
            (_, b) if b == delimiter => StartField,
            _ => InField,
        }
    }
}

type SharedBreaks = std::rc::Rc<std::cell::RefCell<Breaks>>;

/// Line numbers by byte offset: the csv reader's own count is off after a
/// CRLF terminator or a blank line (it counts a terminator's `\n` only when
/// it reads the next record), and line numbers are what a rejected row is
/// reported by. Offsets behind the current record are dropped as it goes.
struct LineOf {
    breaks: SharedBreaks,
    /// Newlines before the last record asked about.
    before: u64,
}

impl LineOf {
    fn at(&mut self, byte: u64) -> u64 {
        let mut b = self.breaks.borrow_mut();
        while let Some(&(start, n)) = b.runs.front() {
            if start + n <= byte {
                b.runs.pop_front();
                self.before += n;
            } else if start < byte {
                let behind = byte - start;
                self.before += behind;
                b.runs[0] = (byte, n - behind);
            } else {
                break;
            }
        }
        // The reader places a record after blank lines at the first of
        // them: newlines right at its start are blank lines before it.
        if let Some(&(start, n)) = b.runs.front() {
            if start == byte {
                b.runs.pop_front();
                self.before += n;
            }
        }
        self.before + 1
    }
}

/// Every line break (CRLF, LF, or a CR alone, as old Mac files have them)
/// read as one `\n`, as the csv reader ends a record at any of them (a
/// quoted value keeps its line break as `\n`), noting where each `\n` is
/// for [`LineOf`]; refusing a line over MAX_LINE_BYTES before the csv
/// reader holds it, and a file that ends inside quotes.
struct Lf<R> {
    inner: R,
    /// A `\r` that ended the last read: dropped if a `\n` follows, else
    /// read as one.
    held_cr: bool,
    /// Bytes handed out so far.
    offset: u64,
    breaks: SharedBreaks,
    delimiter: u8,
}

impl<R: Read> Read for Lf<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.len() < 2 {
            return self.inner.read(buf);
        }
        loop {
            let start = usize::from(self.held_cr);
            if self.held_cr {
                buf[0] = b'\r';
            }
            let n = self.inner.read(&mut buf[start..])?;
            let end = start + n;
            let eof = n == 0;
            self.held_cr = false;
            if end == 0 {
                let br = self.breaks.borrow();
                if br.state == Quoting::InQuotes {
                    return Err(std::io::Error::other(FileError::UnclosedQuote(
                        br.quote_line,
                    )));
                }
                return Ok(0);
            }
            let mut w = 0;
            for r in 0..end {
                let mut b = buf[r];
                if b == b'\r' {
                    if r + 1 < end {
                        if buf[r + 1] == b'\n' {
                            continue;
                        }
                    } else if !eof {
                        self.held_cr = true;
                        continue;
                    }
                    b = b'\n';
                }
                buf[w] = b;
                w += 1;
            }
            if w > 0 {
                let mut br = self.breaks.borrow_mut();
                for (i, b) in buf[..w].iter().enumerate() {
                    let at = self.offset + i as u64;
                    if *b == b'\n' {
                        br.total += 1;
                        match br.runs.back_mut() {
                            Some((s, n)) if *s + *n == at => *n += 1,
                            _ => br.runs.push_back((at, 1)),
                        }
                    }
                    // The csv reader drops a BOM at the start of the file
                    // (and the line limit does not count it).
                    if at >= 3 || *b != b"\xEF\xBB\xBF"[at as usize] {
                        br.step(*b, at, self.delimiter)
                            .map_err(std::io::Error::other)?;
                    }
                }
                self.offset += w as u64;
                return Ok(w);
            }
        }
    }
}

fn csv_read_error(e: csv::Error) -> FileError {
    match e.into_kind() {
        csv::ErrorKind::Io(io) => read_error(io),
        other => FileError::Read(format!("{other:?}")),
    }
}

type LineErrors = Vec<(Option<String>, String)>;

/// A store code as a CSV export writes one that a spreadsheet would take for
/// a formula (`'-A1`), without the `'` the export put before it. Codes hold
/// only letters, digits, `_` and `-`, so a leading `'` is never part of one.
fn unquoted_code(raw: &str) -> &str {
    match raw.strip_prefix('\'') {
        Some(rest) if rest.starts_with(['=', '+', '-', '@', '\t', '\r']) => rest,
        _ => raw,
    }
}

/// The reason a store code no store can have is refused (a code is 1 to
/// 32 letters, digits, `_` or `-`: the CHECK on `sales.stores.code`), None
/// for one a store may have. The reason is the merge's for an unknown code,
/// `unknown store 'X'` (quoted as Postgres' `quote_literal` quotes, cut to
/// 40 characters); the upload adds `, or not one of your stores` for a
/// caller with a scope, as the merge does. Refused as the line is read, so
/// that a long one is neither copied into every day of its line nor
/// staged (a 1 MiB code in a monthly line was held, and staged, 31 times).
pub(super) fn impossible_code(code: &str) -> Option<String> {
    let possible = (1..=32).contains(&code.len())
        && code
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if possible {
        return None;
    }
    let quote = |t: &str| {
        let body = t.replace('\'', "''");
        if t.contains('\\') {
            format!("E'{}'", body.replace('\\', "\\\\"))
        } else {
            format!("'{body}'")
        }
    };
    let shown = match code.char_indices().nth(40) {
        None => quote(code),
        Some((cut, _)) => format!("{}... ({} bytes)", quote(&code[..cut]), code.len()),
    };
    Some(format!("{UNKNOWN_STORE}{shown}"))
}

/// How the reason for an unknown store code begins.
pub(super) const UNKNOWN_STORE: &str = "unknown store ";

/// The store named by a line: its code, else its id.
fn store_of(cols: &Columns, f: &[&str], errors: &mut LineErrors) -> (Option<String>, Option<i64>) {
    if let Some(i) = cols.store_code {
        if !f[i].is_empty() {
            let code = unquoted_code(f[i]);
            if let Some(why) = impossible_code(code) {
                errors.push((Some(cols.names[i].clone()), why));
                return (None, None);
            }
            return (Some(code.to_string()), None);
        }
    }
    if let Some(i) = cols.store_id {
        match f[i].parse::<i64>() {
            Ok(id) if id > 0 => return (None, Some(id)),
            _ if f[i].is_empty() => {}
            _ => {
                errors.push((
                    Some(cols.names[i].clone()),
                    format!("{} is not a store id", shown(f[i])),
                ));
                return (None, None);
            }
        }
    }
    let col = cols
        .store_code
        .or(cols.store_id)
        .map(|i| cols.names[i].clone());
    errors.push((col, "no store given".into()));
    (None, None)
}

/// A metric as the file wrote it, checked: a plain decimal number (with a
/// decimal comma in `;` files), non-negative, whole for counts, at most
/// 1e12, and one Postgres' `numeric` can hold. The text is judged
/// exactly, digit by digit, as it is staged: what passes here is what the
/// merge writes (a check through `f64` would let `1.00000000000000000001`
/// pass as a count, or `1000000000000.0000001` as at most 1e12).
fn metric(raw: &str, k: usize, decimal_comma: bool) -> Result<Option<String>, String> {
    if raw.is_empty() {
        return Ok(None);
    }
    let text = if decimal_comma && raw.contains(',') && !raw.contains('.') {
        raw.replacen(',', ".", 1)
    } else {
        raw.to_string()
    };
    let Ok(n) = Decimal::read(&text, false) else {
        // Read as JSON reads it (NDJSON takes `1e3`), it is a number: say
        // what a CSV cell wants instead.
        if Decimal::read(&text, true).is_ok() {
            return Err(format!(
                "{} has an exponent; write the number in plain digits (1000, not 1e3)",
                shown(raw)
            ));
        }
        return Err(format!("{} is not a number", shown(raw)));
    };
    n.check(k)?;
    Ok(Some(text))
}

/// An NDJSON metric: a JSON number's text as the line wrote it (an
/// exponent allowed), checked as [`metric`] checks a CSV cell.
fn json_metric(raw: &str, k: usize) -> Result<String, String> {
    let n = Decimal::read(raw, true).map_err(|why| match why {
        Unread::ExponentOutOfRange => EXPONENT_OUT_OF_RANGE.to_string(),
        Unread::NotANumber => "must be a number".to_string(),
    })?;
    n.check(k)?;
    Ok(raw.to_string())
}

/// Most digits after the point a `numeric` holds (NUMERIC_DSCALE_MAX).
const NUMERIC_MAX_SCALE: i64 = 16383;
/// The exponent `numeric_in` refuses from (INT_MAX / 2, either sign).
const NUMERIC_MAX_EXPONENT: i64 = 1_073_741_823;

/// A decimal number's text, judged exactly (no rounding): its digits
/// `digits` (without leading or trailing zeros) stand for
/// `0.digits × 10^point`.
#[derive(Debug, PartialEq)]
struct Decimal {
    negative: bool,
    digits: String,
    point: i64,
    /// Digits after the point as `numeric` keeps them (trailing zeros
    /// included: `1.50` keeps two).
    scale: i64,
}

/// Why a JSON number's text holds a value Postgres' `numeric` cannot
/// store (more digits after the point than it keeps: `1e-20000`), if it
/// does. An `f64` reads such a number as 0, so the metric rules pass it and
/// Postgres would refuse the whole statement.
pub fn numeric_text_problem(text: &str) -> Option<String> {
    let d = match Decimal::read(text.trim(), true) {
        Ok(d) => d,
        Err(Unread::ExponentOutOfRange) => return Some(EXPONENT_OUT_OF_RANGE.into()),
        Err(Unread::NotANumber) => return None,
    };
    (d.scale > NUMERIC_MAX_SCALE).then(|| {
        format!(
            "has {} digits after the point, more than Postgres can store ({NUMERIC_MAX_SCALE})",
            d.scale
        )
    })
}

/// The reason given for [`Unread::ExponentOutOfRange`].
const EXPONENT_OUT_OF_RANGE: &str =
    "has an exponent beyond ±1073741822, more than Postgres can store";

/// Why [`Decimal::read`] read no number.
#[derive(Debug, PartialEq)]
enum Unread {
    NotANumber,
    /// A number whose exponent `numeric_in` refuses whatever the digits
    /// before it (`0e99999999999` is zero, and still refused).
    ExponentOutOfRange,
}

/// Whether a JSON text may hold a number whose digits `numeric` cannot
/// store although an `f64` reads it as a fine value: one with a negative
/// exponent (`1e-20000`: more digits after the point than `numeric`
/// keeps) or an exponent of ten digits or more (`0e99999999999`). A quick
/// pass over the bytes, so that nearly every record is read once only.
pub fn may_hold_unstorable_numbers(text: &str) -> bool {
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(at) = b[i..].iter().position(|&c| c == b'e' || c == b'E') {
        let mut j = i + at + 1;
        match b.get(j) {
            Some(b'-') => return true,
            Some(b'+') => j += 1,
            _ => {}
        }
        let start = j;
        while b.get(j).is_some_and(u8::is_ascii_digit) {
            j += 1;
        }
        if j - start >= 10 {
            return true;
        }
        i = j;
    }
    false
}

impl Decimal {
    /// `-?digits[.digits]` (one side may be empty), and with `exponent`
    /// an `e`/`E` exponent after it; [`Unread`] for anything else.
    fn read(text: &str, exponent: bool) -> Result<Decimal, Unread> {
        let (negative, rest) = match text.strip_prefix('-') {
            Some(r) => (true, r),
            None => (false, text),
        };
        let (mantissa, exp) = match rest.find(['e', 'E']) {
            Some(i) if exponent => {
                let e = &rest[i + 1..];
                let digits = e.strip_prefix(['+', '-']).unwrap_or(e);
                if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(Unread::NotANumber);
                }
                // Postgres' numeric_in refuses an exponent of INT_MAX / 2
                // or more either way, whatever the digits (even `0e...`).
                let v: i64 = digits.parse().unwrap_or(i64::MAX);
                if v >= NUMERIC_MAX_EXPONENT {
                    return Err(Unread::ExponentOutOfRange);
                }
                (&rest[..i], if e.starts_with('-') { -v } else { v })
            }
            _ => (rest, 0),
        };
        let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        if (int.is_empty() && frac.is_empty())
            || !int.bytes().all(|b| b.is_ascii_digit())
            || !frac.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(Unread::NotANumber);
        }
        let lead = int.len() - int.trim_start_matches('0').len();
        let mut digits = format!("{}{frac}", &int[lead..]);
        let mut point = (int.len() - lead) as i64 + exp;
        if digits.is_empty() || int[lead..].is_empty() {
            // No digit before the point: leading zeros after it move it.
            let zeros = digits.len() - digits.trim_start_matches('0').len();
            digits.drain(..zeros);
            point -= zeros as i64;
        }
        digits.truncate(digits.trim_end_matches('0').len());
        Ok(Decimal {
            negative,
            scale: (frac.len() as i64).saturating_sub(exp).max(0),
            digits,
            point,
        })
    }

    /// The rules of `sales_core::daily` for metric `k`, exactly, with the
    /// reasons the extension gives; and what `numeric` can hold.
    fn check(&self, k: usize) -> Result<(), String> {
        let zero = self.digits.is_empty();
        if self.negative && !zero {
            return Err("must not be negative".into());
        }
        // 1e12 is `0.1 × 10^13`.
        if !zero && (self.point > 13 || (self.point == 13 && self.digits != "1")) {
            return Err("is larger than 1e12".into());
        }
        let whole = zero || self.digits.len() as i64 <= self.point;
        if sales_core::daily::METRICS[k].1 && !whole {
            return Err("must be a whole number".into());
        }
        if self.scale > NUMERIC_MAX_SCALE {
            return Err(format!(
                "has {} digits after the point, more than Postgres can store ({NUMERIC_MAX_SCALE})",
                self.scale
            ));
        }
        Ok(())
    }
}

fn parse_date(raw: &str) -> Result<(i32, u32, u32), String> {
    let bad = || format!("{} is not a date; use YYYY-MM-DD", shown(raw));
    let parts: Vec<&str> = raw.split('-').collect();
    if parts.len() != 3
        || parts[0].len() != 4
        || !parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(bad());
    }
    let (y, m, d): (i32, u32, u32) = (
        parts[0].parse().map_err(|_| bad())?,
        parts[1].parse().map_err(|_| bad())?,
        parts[2].parse().map_err(|_| bad())?,
    );
    check_period(y as i64, m as i64)?;
    let days = days_in_month(y as i64, m as i64).unwrap_or(31);
    if d == 0 || d > days {
        return Err(format!(
            "day {d} does not exist in {y}-{m:02} ({days} days)"
        ));
    }
    Ok((y, m, d))
}

fn check_period(y: i64, m: i64) -> Result<(), String> {
    if !(MIN_YEAR..=MAX_YEAR).contains(&y) {
        return Err(format!("year {y} is outside {MIN_YEAR}..{MAX_YEAR}"));
    }
    if !(1..=12).contains(&m) {
        return Err(format!("month {m} is outside 1..12"));
    }
    Ok(())
}

fn daily_line(
    cols: &Columns,
    f: &[&str],
    line: u64,
    decimal_comma: bool,
) -> Result<Row, LineErrors> {
    let mut errors = Vec::new();
    let (store_code, store_id) = store_of(cols, f, &mut errors);
    let date_col = cols.date.expect("checked with the header");
    let date =
        parse_date(f[date_col]).map_err(|e| errors.push((Some(cols.names[date_col].clone()), e)));
    // A daily line's year and month, when the file has those columns and
    // the line fills them, are its date's (as for an NDJSON line): one
    // that says otherwise is a mistake the date alone would hide.
    for (c, of_date) in [
        (cols.year, date.as_ref().ok().map(|d| i64::from(d.0))),
        (cols.month, date.as_ref().ok().map(|d| i64::from(d.1))),
    ] {
        let Some(i) = c else { continue };
        if f[i].is_empty() {
            continue;
        }
        match f[i].parse::<i64>() {
            Err(_) => errors.push((Some(cols.names[i].clone()), "must be a whole number".into())),
            Ok(n) if of_date.is_some_and(|w| w != n) => errors.push((
                Some(cols.names[i].clone()),
                format!("{n} contradicts date {}", f[date_col]),
            )),
            Ok(_) => {}
        }
    }
    let mut values: [Option<String>; 3] = Default::default();
    for (k, c) in cols.metrics.iter().enumerate() {
        if let Some(i) = c {
            match metric(f[*i], k, decimal_comma) {
                Ok(v) => values[k] = v,
                Err(e) => errors.push((Some(cols.names[*i].clone()), e)),
            }
        }
    }
    if errors.is_empty() && values.iter().all(Option::is_none) {
        errors.push((None, "no sales, customers or transactions given".into()));
    }
    match (date, errors.is_empty()) {
        (Ok((year, month, day)), true) => {
            let [sales, customers, transactions] = values;
            Ok(Row {
                line,
                day,
                store_code,
                store_id,
                id_too: None,
                year,
                month,
                sales,
                customers,
                transactions,
                col: None,
            })
        }
        _ => Err(errors),
    }
}

fn monthly_line(
    cols: &Columns,
    f: &[&str],
    line: u64,
    decimal_comma: bool,
) -> Result<Vec<Row>, LineErrors> {
    let mut errors = Vec::new();
    let (store_code, store_id) = store_of(cols, f, &mut errors);
    let (yc, mc) = (cols.year.expect("header"), cols.month.expect("header"));
    let year: Result<i32, _> = f[yc].parse();
    let month: Result<u32, _> = f[mc].parse();
    let period = match (year, month) {
        (Ok(y), Ok(m)) => match check_period(y as i64, m as i64) {
            Ok(()) => Some((y, m)),
            Err(e) => {
                let col = if e.starts_with("year") { yc } else { mc };
                errors.push((Some(cols.names[col].clone()), e));
                None
            }
        },
        (y, m) => {
            if y.is_err() {
                errors.push((
                    Some(cols.names[yc].clone()),
                    format!("{} is not a year", shown(f[yc])),
                ));
            }
            if m.is_err() {
                errors.push((
                    Some(cols.names[mc].clone()),
                    format!("{} is not a month", shown(f[mc])),
                ));
            }
            None
        }
    };
    let days = period
        .and_then(|(y, m)| days_in_month(y as i64, m as i64))
        .unwrap_or(31);
    let mut by_day: std::collections::BTreeMap<u32, ([Option<String>; 3], String)> =
        Default::default();
    for &(i, d, k) in &cols.days {
        match metric(f[i], k, decimal_comma) {
            Ok(None) => {}
            Ok(Some(v)) if d > days => {
                let _ = v;
                let (y, m) = period.unwrap_or_default();
                errors.push((
                    Some(cols.names[i].clone()),
                    format!("day {d} does not exist in {y}-{m:02} ({days} days)"),
                ));
            }
            Ok(Some(v)) => {
                let e = by_day
                    .entry(d)
                    .or_insert_with(|| (Default::default(), cols.names[i].clone()));
                e.0[k] = Some(v);
            }
            Err(e) => errors.push((Some(cols.names[i].clone()), e)),
        }
    }
    if errors.is_empty() && by_day.is_empty() {
        errors.push((None, "no sales, customers or transactions given".into()));
    }
    let Some((year, month)) = period.filter(|_| errors.is_empty()) else {
        return Err(errors);
    };
    Ok(by_day
        .into_iter()
        .map(|(day, (values, col))| {
            let [sales, customers, transactions] = values;
            Row {
                line,
                day,
                store_code: store_code.clone(),
                store_id,
                id_too: None,
                year,
                month,
                sales,
                customers,
                transactions,
                col: Some(col),
            }
        })
        .collect())
}

/// Members of an exported sales document that an import ignores (they are
/// derived or assigned by the database).
const DERIVED: &[&str] = &[
    "id",
    "key",
    "totalSales",
    "totalCustomers",
    "daysReported",
    "version",
    "createdAt",
    "updatedAt",
    "store",
    "storeName",
    "region",
];

fn parse_ndjson<R: Read>(
    reader: BufReader<R>,
    out: &mut impl FnMut(Item) -> Result<(), FileError>,
) -> Result<(), FileError> {
    let mut lines = 0u64;
    let mut buf = Vec::new();
    let mut reader = reader;
    let mut n = 0u64;
    loop {
        buf.clear();
        let got = read_line(&mut reader, &mut buf).map_err(read_error)?;
        if got == 0 {
            break;
        }
        n += 1;
        if line_bytes(&buf) > MAX_LINE_BYTES {
            return Err(FileError::LineTooLong(n));
        }
        let text = match std::str::from_utf8(&buf) {
            Ok(t) => t.trim().trim_start_matches('\u{feff}'),
            Err(_) => {
                lines += 1;
                out(Item::Rejected(Rejected {
                    line: n,
                    column: None,
                    reason: "not UTF-8 text".into(),
                }))?;
                out(Item::LineDone)?;
                continue;
            }
        };
        if text.is_empty() {
            continue;
        }
        lines += 1;
        match ndjson_line(text, n) {
            Ok(rows) => {
                for r in rows {
                    out(Item::Row(r))?;
                }
            }
            Err(errors) => {
                for (column, reason) in errors {
                    out(Item::Rejected(Rejected {
                        line: n,
                        column,
                        reason,
                    }))?;
                }
            }
        }
        out(Item::LineDone)?;
    }
    if lines == 0 {
        return Err(FileError::Empty);
    }
    Ok(())
}

/// The bytes of a line as the line limit counts them: not its line break,
/// nor a BOM before it.
fn line_bytes(line: &[u8]) -> u64 {
    let line = line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line);
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    line.len() as u64
}

/// Reads one line into `buf`, its break included: ended by `\n`, `\r\n` or
/// a `\r` alone (as the CSV reader takes them), or cut once it holds more
/// than MAX_LINE_BYTES before its break ([`line_bytes`]). Returns the bytes
/// read (0 at the end).
fn read_line<R: BufRead>(r: &mut R, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut got = 0;
    let mut after_cr = false;
    loop {
        let avail = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if avail.is_empty() {
            return Ok(got);
        }
        if after_cr {
            if avail[0] == b'\n' {
                buf.push(b'\n');
                r.consume(1);
                got += 1;
            }
            return Ok(got);
        }
        let (used, end) = match avail.iter().position(|b| *b == b'\n' || *b == b'\r') {
            Some(i) => (i + 1, Some(avail[i])),
            None => (avail.len(), None),
        };
        buf.extend_from_slice(&avail[..used]);
        r.consume(used);
        got += used;
        match end {
            Some(b'\n') => return Ok(got),
            // A `\n` may follow in the next read: the line is not cut
            // before it is known.
            Some(_) => after_cr = true,
            None if line_bytes(buf) > MAX_LINE_BYTES => return Ok(got),
            None => {}
        }
    }
}

/// A JSON object's members as the line wrote them, values unparsed: the
/// exact text of its numbers (a `Value` keeps them as `f64`). None
/// members for anything but an object.
struct Members<'a>(Vec<(String, &'a RawValue)>);

impl<'a> Members<'a> {
    fn of(text: &'a str) -> Self {
        serde_json::from_str(text).unwrap_or(Members(Vec::new()))
    }

    /// Member `key`'s value (the last one, as a parsed object keeps it).
    fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.0.iter().rev().find(|(k, _)| k == key).map(|(_, v)| *v)
    }
}

impl<'de> serde::Deserialize<'de> for Members<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Members<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Members<'de>, A::Error> {
                let mut members = Vec::new();
                while let Some(m) = map.next_entry::<String, &'de RawValue>()? {
                    members.push(m);
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(Visit)
    }
}

/// Whether a string or a key anywhere in `v` holds NUL, which Postgres
/// text cannot.
fn holds_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(holds_nul),
        Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
        _ => false,
    }
}

/// One NDJSON line: a sales record (`storeId` or `storeCode`, `year`,
/// `month`, `dailyData`; an exported document's derived members are
/// ignored) or a daily row (`storeCode`/`storeId`, `date`, metrics).
fn ndjson_line(text: &str, line: u64) -> Result<Vec<Row>, LineErrors> {
    let v: Value =
        serde_json::from_str(text).map_err(|e| vec![(None, format!("malformed JSON: {e}"))])?;
    let Some(obj) = v.as_object() else {
        return Err(vec![(None, "must be a JSON object".into())]);
    };
    if holds_nul(&v) {
        return Err(vec![(None, "holds a NUL character (\\u0000)".into())]);
    }
    if let Some(path) = sales_core::json::repeated_key(text.as_bytes()) {
        return Err(vec![(Some(path), sales_core::json::REPEATED.into())]);
    }
    // One member in both spellings (`storeId` and `store_id`): which one
    // was meant cannot be told, as in a batch record.
    let known = || {
        ["storeId", "storeCode", "year", "month", "dailyData", "date"]
            .iter()
            .chain(METRIC_NAMES.iter())
            .chain(DERIVED.iter())
    };
    for camel in known() {
        let mut spellings = obj
            .keys()
            .filter(|k| sales_core::record::spelled_as(k, camel));
        if let (Some(_), Some(second)) = (spellings.next(), spellings.next()) {
            return Err(vec![(Some(second.clone()), format!("{camel} given twice"))]);
        }
    }
    let mut errors: LineErrors = Vec::new();
    // Numbers are staged as the line wrote them: their text, not the f64
    // a `Value` holds (`12345678.123456789012` stays so).
    let raw = Members::of(text);
    let get = |camel: &str| {
        obj.iter()
            .find(|(k, _)| sales_core::record::spelled_as(k, camel))
    };
    // A member set to null is one not given.
    let given = |camel: &str| get(camel).filter(|(_, v)| !v.is_null());
    let store_code = match given("storeCode") {
        None => None,
        // As an empty store_code field in a CSV line: not given (the line
        // may name its store by id), never a store whose code is "".
        Some((_, Value::String(s))) if s.trim().is_empty() => None,
        Some((_, Value::String(s))) => match impossible_code(s) {
            Some(why) => {
                errors.push((Some("storeCode".into()), why));
                None
            }
            None => Some(s.clone()),
        },
        Some(_) => {
            errors.push((Some("storeCode".into()), "must be a string".into()));
            None
        }
    };
    let store_id = match given("storeId") {
        None => None,
        Some((_, v)) => match sales_core::record::parse_id(v) {
            Ok(id) => Some(id),
            Err(e) => {
                errors.push((Some("storeId".into()), e.to_string()));
                None
            }
        },
    };
    if store_code.is_none() && store_id.is_none() && errors.is_empty() {
        errors.push((Some("storeId".into()), "no store given".into()));
    }
    // Both given: the line is staged by its code, and the upload checks
    // that the id names the same store (`Row::id_too`).
    let (store_id, id_too) = match store_code {
        Some(_) => (None, store_id),
        None => (store_id, None),
    };
    for (k, _) in obj {
        let known = known().any(|c| sales_core::record::spelled_as(k, c));
        if !known {
            let name = match cut_short(k) {
                None => k.clone(),
                Some(head) => format!("{head}..."),
            };
            errors.push((Some(name), "unknown field".into()));
        }
    }
    let daily = given("dailyData");
    let date = given("date");
    // A line with a date is a daily row, and so is one with top-level
    // metrics and no dailyData (its date missing).
    let metrics_given = METRIC_NAMES.iter().any(|name| given(name).is_some());
    if date.is_some() || (daily.is_none() && metrics_given) {
        if date.is_some() && daily.is_some() {
            errors.push((
                Some("dailyData".into()),
                "a line gives a date (one day) or dailyData (a month), not both".into(),
            ));
        }
        let mut values: [Option<String>; 3] = Default::default();
        let period = match date {
            None => Err("is missing".to_string()),
            Some((_, Value::String(date))) => parse_date(date),
            Some(_) => Err("must be a string (YYYY-MM-DD)".to_string()),
        }
        .map_err(|e| errors.push((Some("date".into()), e)));
        // A daily row's year and month, when it gives them, are its date's.
        let of_date = period.ok().map(|(y, m, _)| (i64::from(y), i64::from(m)));
        for (name, want) in [
            ("year", of_date.map(|p| p.0)),
            ("month", of_date.map(|p| p.1)),
        ] {
            let Some((_, v)) = given(name) else { continue };
            match v.as_i64() {
                None => errors.push((Some(name.into()), "must be a whole number".into())),
                Some(n) if want.is_some_and(|w| w != n) => {
                    let date = date.and_then(|(_, d)| d.as_str()).unwrap_or_default();
                    errors.push((Some(name.into()), format!("{n} contradicts date {date}")));
                }
                Some(_) => {}
            }
        }
        for (k, name) in METRIC_NAMES.iter().enumerate() {
            if let Some((key, v)) = given(name) {
                let text = raw.get(key).filter(|_| v.is_number());
                match text
                    .ok_or_else(|| "must be a number".to_string())
                    .and_then(|t| json_metric(t.get(), k))
                {
                    Ok(t) => values[k] = Some(t),
                    Err(e) => errors.push((Some((*name).into()), e)),
                }
            }
        }
        if errors.is_empty() && values.iter().all(Option::is_none) {
            errors.push((None, "no sales, customers or transactions given".into()));
        }
        let Ok((year, month, day)) = period else {
            return Err(errors);
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        let [sales, customers, transactions] = values;
        return Ok(vec![Row {
            line,
            day,
            store_code,
            store_id,
            id_too,
            year,
            month,
            sales,
            customers,
            transactions,
            col: None,
        }]);
    }
    let y = get("year").and_then(|(_, v)| v.as_i64());
    let m = get("month").and_then(|(_, v)| v.as_i64());
    let period = match (y, m) {
        (Some(y), Some(m)) => check_period(y, m)
            .map_err(|e| {
                let col = if e.starts_with("year") {
                    "year"
                } else {
                    "month"
                };
                errors.push((Some(col.into()), e))
            })
            .ok()
            .map(|()| (y as i32, m as u32)),
        _ => {
            errors.push((None, "year and month must be whole numbers".into()));
            None
        }
    };
    // A record's values are in dailyData: a top-level metric belongs to a
    // daily row, and is not dropped.
    for name in METRIC_NAMES {
        if given(name).is_some() {
            errors.push((
                Some(name.into()),
                "belongs to a daily row (with a date); a record's days go in dailyData".into(),
            ));
        }
    }
    // Each day's members as the line wrote them, read once for the checks
    // and the rows alike.
    let raw_days: Vec<(String, Members)> = daily
        .and_then(|(key, _)| raw.get(key))
        .map_or(Members(Vec::new()), |r| Members::of(r.get()))
        .0
        .into_iter()
        .map(|(k, r)| (k, Members::of(r.get())))
        .collect();
    // The last member of a key wins, as in the parsed object.
    let raw_day = |key: &str| {
        raw_days
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, m)| m)
    };
    match daily {
        None => errors.push((Some("dailyData".into()), "is missing".into())),
        Some((_, d)) => {
            if let Some((y, m)) = period {
                for e in sales_core::daily::validate(y as i64, m as i64, d, "dailyData") {
                    errors.push((Some(e.field), e.reason));
                }
                if d.as_object().is_some_and(|o| o.is_empty()) {
                    errors.push((Some("dailyData".into()), "holds no day".into()));
                }
                // The values' text, exactly (the rules above read them as
                // f64).
                for (key, day) in d.as_object().into_iter().flatten() {
                    for (name, v) in day.as_object().into_iter().flatten() {
                        let Some(k) = METRIC_NAMES.iter().position(|m| m == name) else {
                            continue;
                        };
                        let Some(text) = raw_day(key).and_then(|r| r.get(name)) else {
                            continue;
                        };
                        let field = format!("dailyData.{key}.{name}");
                        if let (true, Err(e)) = (v.is_number(), json_metric(text.get(), k)) {
                            if !errors.iter().any(|(f, _)| f.as_deref() == Some(&field)) {
                                errors.push((Some(field), e));
                            }
                        }
                    }
                }
            }
        }
    }
    let (Some((year, month)), true) = (period, errors.is_empty()) else {
        return Err(errors);
    };
    let mut rows = Vec::new();
    for (key, day) in daily.and_then(|(_, d)| d.as_object()).into_iter().flatten() {
        let d = sales_core::daily::parse_day_key(key).unwrap_or(0);
        let metric = |name: &str| {
            day.get(name)
                .filter(|v| v.is_number())
                .and(raw_day(key)?.get(name))
                .map(|t| t.get().to_string())
        };
        rows.push(Row {
            line,
            day: d,
            store_code: store_code.clone(),
            store_id,
            id_too,
            year,
            month,
            sales: metric("sales"),
            customers: metric("customers"),
            transactions: metric("transactions"),
            col: Some(format!("dailyData.{key}")),
        });
    }
    rows.sort_by_key(|r| r.day);
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_code_the_export_quoted_reads_back() {
        assert_eq!(unquoted_code("'-A1"), "-A1");
        assert_eq!(unquoted_code("-A1"), "-A1");
        assert_eq!(unquoted_code("'A1"), "'A1");
        assert_eq!(unquoted_code("'"), "'");
        assert_eq!(unquoted_code("T001"), "T001");
    }

    fn run(
        input: &str,
        requested: Requested,
    ) -> Result<(Shape, Vec<Row>, Vec<Rejected>, u64), FileError> {
        let (mut rows, mut bad, mut lines) = (Vec::new(), Vec::new(), 0);
        let shape = parse(input.as_bytes(), requested, |i| {
            match i {
                Item::Row(r) => rows.push(r),
                Item::Rejected(r) => bad.push(r),
                Item::LineDone => lines += 1,
            }
            Ok(())
        })?;
        Ok((shape, rows, bad, lines))
    }

    /// A store code no store can have (over 32 characters, or a character
    /// outside letters, digits, `_` and `-`) refuses its line as it is
    /// read, with the merge's reason for an unknown code: a monthly line's
    /// days are not each given a copy of it.
    #[test]
    fn a_code_no_store_can_have_refuses_its_line_at_once() {
        let days: String = (1..=31).map(|d| format!(",d{d}_sales")).collect();
        let cells: String = (1..=31).map(|_| ",1").collect();
        let long = "Q".repeat(100_000);
        let f = format!(
            "store_code,year,month{days}\n{long},2024,1{cells}\nT 1,2024,1{cells}\nIt's,2024,1{cells}\nT001,2024,1{cells}\n"
        );
        let (_, rows, bad, lines) = run(&f, Requested::Auto).unwrap();
        assert_eq!(lines, 4);
        assert_eq!(rows.len(), 31, "only T001's days");
        assert!(rows.iter().all(|r| r.store_code.as_deref() == Some("T001")));
        let reasons: Vec<(u64, &str, &str)> = bad
            .iter()
            .map(|r| (r.line, r.column.as_deref().unwrap_or(""), r.reason.as_str()))
            .collect();
        let cut = format!("unknown store '{}'... (100000 bytes)", "Q".repeat(40));
        assert_eq!(
            reasons,
            vec![
                (2, "store_code", cut.as_str()),
                (3, "store_code", "unknown store 'T 1'"),
                (4, "store_code", "unknown store 'It''s'"),
            ]
        );
        let f = r#"{"storeCode": "a\\b", "date": "2024-01-01", "sales": 1}"#;
        let (_, rows, bad, _) = run(f, Requested::Auto).unwrap();
        assert!(rows.is_empty());
        assert_eq!(bad[0].column.as_deref(), Some("storeCode"));
        assert_eq!(bad[0].reason, r"unknown store E'a\\b'");
    }

    #[test]
    fn pos_file_with_bom_semicolons_crlf_and_any_order() {
        let f = "\u{feff}Date;Transactions;Store_Code;Sales\r\n2024-02-29;12;S1;1234,50\r\n2024-03-01;;S2;7\r\n";
        let (shape, rows, bad, lines) = run(f, Requested::Auto).unwrap();
        assert_eq!(shape, Shape::Daily);
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(lines, 2);
        assert_eq!(rows[0].store_code.as_deref(), Some("S1"));
        assert_eq!((rows[0].year, rows[0].month, rows[0].day), (2024, 2, 29));
        assert_eq!(rows[0].sales.as_deref(), Some("1234.50"));
        assert_eq!(rows[0].transactions.as_deref(), Some("12"));
        assert_eq!(rows[0].line, 2);
        assert_eq!(rows[1].transactions, None);
        assert_eq!(rows[1].line, 3);
    }

    /// A reader that hands out one byte at a time: CRLF split across reads.
    struct Trickle<'a>(&'a [u8]);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            match self.0.split_first() {
                Some((b, rest)) if !buf.is_empty() => {
                    buf[0] = *b;
                    self.0 = rest;
                    Ok(1)
                }
                _ => Ok(0),
            }
        }
    }

    #[test]
    fn line_numbers_survive_crlf_split_across_reads() {
        let f = "store_code,date,sales\r\nS1,2024-01-01,1\r\n\r\nS1,2024-01-0x,1\r\nS1,2024-01-03,\"3\r\n\"\r";
        let mut lines = Vec::new();
        parse(Trickle(f.as_bytes()), Requested::Auto, |i| {
            match i {
                Item::Row(r) => lines.push((r.line, true)),
                Item::Rejected(r) => lines.push((r.line, false)),
                Item::LineDone => {}
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(lines, vec![(2, true), (4, false), (5, true)]);
    }

    #[test]
    fn every_kind_of_bad_row() {
        let f = "store_code,date,sales,customers\n\
                 S1,2023-02-29,1,1\n\
                 S1,2024-13-01,1,1\n\
                 S1,yesterday,1,1\n\
                 S1,2024-01-01,-5,1\n\
                 S1,2024-01-01,abc,1\n\
                 S1,2024-01-01,1,2.5\n\
                 S1,2024-01-01\n\
                 ,2024-01-01,1,1\n\
                 S1,2024-01-01,,\n\
                 S1,2024-01-01,NaN,1\n\
                 S1,2024-01-02,10,1\n";
        let (_, rows, bad, lines) = run(f, Requested::Auto).unwrap();
        assert_eq!(lines, 11);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].line, 12);
        let got: Vec<(u64, Option<&str>)> =
            bad.iter().map(|b| (b.line, b.column.as_deref())).collect();
        assert_eq!(
            got,
            vec![
                (2, Some("date")),
                (3, Some("date")),
                (4, Some("date")),
                (5, Some("sales")),
                (6, Some("sales")),
                (7, Some("customers")),
                (8, None),
                (9, Some("store_code")),
                (10, None),
                (11, Some("sales")),
            ]
        );
        assert!(
            bad[0].reason.contains("day 29 does not exist"),
            "{}",
            bad[0].reason
        );
        assert_eq!(bad[3].reason, "must not be negative");
        assert_eq!(bad[5].reason, "must be a whole number");
    }

    #[test]
    fn whole_file_refusals() {
        assert_eq!(run("", Requested::Auto).err(), Some(FileError::Empty));
        assert_eq!(run(" \n\n", Requested::Auto).err(), Some(FileError::Empty));
        assert_eq!(run("a\0b", Requested::Auto).err(), Some(FileError::Binary));
        assert!(matches!(
            run("foo,bar\n1,2\n", Requested::Auto).err(),
            Some(FileError::Header(_))
        ));
        assert!(matches!(
            run("S1,2024-01-01,5\n", Requested::Auto).err(),
            Some(FileError::Header(_))
        ));
        assert_eq!(
            run("store_code,date,sales\n", Requested::Auto).err(),
            Some(FileError::NoData)
        );
    }

    #[test]
    fn export_shapes() {
        let daily = "key,store_id,store_code,store_name,date,sales,customers,transactions\n\
                     1:2024-01-05,1,T001,\"Store, one\",2024-01-05,100.5,3,\n";
        let (shape, rows, bad, _) = run(daily, Requested::Auto).unwrap();
        assert_eq!(shape, Shape::Daily);
        assert!(bad.is_empty());
        assert_eq!(rows[0].store_code.as_deref(), Some("T001"));
        assert_eq!(rows[0].customers.as_deref(), Some("3"));
        let monthly = "key,store_id,store_code,store_name,region,year,month,total_sales,total_customers,days_reported,d1_sales,d1_customers,d30_sales,d30_customers\n\
                       1:2024-02,1,T001,S,North,2024,2,5,1,1,5,1,,\n\
                       1:2024-02,1,T001,S,North,2024,2,5,1,1,5,1,9,\n";
        let (shape, rows, bad, _) = run(monthly, Requested::Auto).unwrap();
        assert_eq!(shape, Shape::Monthly);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].col.as_deref(), Some("d1_sales"));
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].column.as_deref(), Some("d30_sales"));
    }

    #[test]
    fn ndjson_records_and_documents() {
        let f = "{\"storeId\": 3, \"year\": 2024, \"month\": 2, \"dailyData\": {\"2\": {\"sales\": 10.25, \"customers\": 1}, \"1\": {\"sales\": 1}}, \"totalSales\": 11.25, \"id\": 9}\n\
                 {\"storeCode\": \"S1\", \"date\": \"2024-04-31\", \"sales\": 1}\n\
                 {\"storeId\": 3, \"year\": 2024, \"month\": 2, \"colour\": 1, \"dailyData\": {}}\n";
        let (shape, rows, bad, lines) = run(f, Requested::Auto).unwrap();
        assert_eq!(shape, Shape::Ndjson);
        assert_eq!(lines, 3);
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].day, rows[0].sales.as_deref()), (1, Some("1")));
        assert_eq!(rows[1].sales.as_deref(), Some("10.25"));
        assert_eq!(bad[0].line, 2);
        assert_eq!(bad[1].column.as_deref(), Some("colour"));
    }

    /// Blank lines between records cost no memory (runs of line breaks are
    /// noted as one entry), count for line numbers, and are not rows.
    #[test]
    fn blank_lines_are_counted_but_not_kept() {
        let blank = 3_000_000;
        let f = format!(
            "store_code,date,sales\nS1,2024-01-01,5\n{}S2,2024-01-02,6\n\n",
            "\n".repeat(blank)
        );
        let breaks = SharedBreaks::default();
        let mut lf = Lf {
            inner: f.as_bytes(),
            held_cr: false,
            offset: 0,
            breaks: breaks.clone(),
            delimiter: b',',
        };
        let mut sink = Vec::new();
        lf.read_to_end(&mut sink).unwrap();
        assert_eq!(
            breaks.borrow().runs.len(),
            3,
            "one run per stretch of breaks"
        );
        let (_, rows, bad, lines) = run(&f, Requested::Auto).unwrap();
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(lines, 2);
        assert_eq!((rows[0].line, rows[1].line), (2, 3 + blank as u64));
    }

    /// A line longer than MAX_LINE_BYTES refuses the file before the reader
    /// holds it, naming the line: unquoted, quoted (line breaks inside the
    /// quotes count), or in NDJSON.
    #[test]
    fn an_overlong_line_refuses_the_file() {
        let long = "9".repeat(MAX_LINE_BYTES as usize + 65_536);
        let f = format!("store_code,date,sales\nS1,2024-01-01,5\nS1,2024-01-02,{long}\n");
        let r = run(&f, Requested::Auto).map(|x| (x.0, x.2, x.3));
        assert!(matches!(r, Err(FileError::LineTooLong(3))), "{r:?}");
        let quoted = format!(
            "store_code,date,sales\n\"S{}\",2024-01-01,5\n",
            "\n".repeat(MAX_LINE_BYTES as usize + 65_536)
        );
        assert!(matches!(
            run(&quoted, Requested::Auto),
            Err(FileError::QuoteTooLong(2))
        ));
        let nd = format!("{{\"storeId\": 1, \"date\": \"2024-01-01\", \"sales\": {long}}}\n");
        assert!(matches!(
            run(&nd, Requested::Auto),
            Err(FileError::LineTooLong(1))
        ));
        // Just under the limit is an ordinary (here: rejected) line.
        let near = "x".repeat(MAX_LINE_BYTES as usize - 65_536);
        let f = format!("store_code,date,sales\nS1,{near},5\n");
        let (_, _, bad, _) = run(&f, Requested::Auto).unwrap();
        assert_eq!(bad.len(), 1);
        assert!(
            bad[0].reason.len() < 120,
            "the field is cut short: {}",
            bad[0].reason
        );
        assert!(bad[0].reason.contains("is not a date"), "{}", bad[0].reason);
    }

    /// A spreadsheet's empty rows (`,,,` with the header's field count) are
    /// not data: neither rows nor rejected lines.
    #[test]
    fn empty_spreadsheet_rows_are_skipped() {
        let f = "store_code,date,sales\r\nS1,2024-01-01,5\r\n,,\r\n , ,\r\n,,\r\n";
        let (_, rows, bad, lines) = run(f, Requested::Auto).unwrap();
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!((rows.len(), lines), (1, 1));
    }

    /// NUL cannot go into Postgres text: the line holding it is a rejected
    /// row (CSV: with its column), and the rest of the file goes on.
    #[test]
    fn a_nul_rejects_its_line_only() {
        // Past the first 8 KiB (a NUL there marks the file binary).
        let good = "S2,2024-01-02,6\n".repeat(600);
        let f = format!("store_code,date,sales\n{good}S\u{0}1,2024-01-01,5\nS2,2024-01-02,6\n");
        let (_, rows, bad, lines) = run(&f, Requested::Auto).unwrap();
        assert_eq!((rows.len(), lines), (601, 602));
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].line, 602);
        assert_eq!(bad[0].column.as_deref(), Some("store_code"));
        assert_eq!(bad[0].reason, "contains a NUL byte");
        let nd = "{\"storeCode\": \"S\\u0000\", \"date\": \"2024-01-01\", \"sales\": 5}\n\
                  {\"storeCode\": \"S2\", \"date\": \"2024-01-01\", \"sales\": 5}\n";
        let (_, rows, bad, _) = run(nd, Requested::Auto).unwrap();
        assert_eq!((rows.len(), bad.len()), (1, 1));
        assert_eq!(bad[0].line, 1);
        assert!(bad[0].reason.contains("NUL"), "{}", bad[0].reason);
    }

    /// Lines ended by a lone CR (old Mac files) are numbered one by one, as
    /// the csv reader ends a record at each; CRs split across reads too.
    #[test]
    fn cr_only_lines_are_numbered() {
        let f = "store_code,date,sales\rS1,2024-01-01,1\r\rS1,2024-01-01,2\rS1,2024-01-0x,3\r";
        for trickle in [false, true] {
            let mut got = Vec::new();
            let mut on = |i| {
                match i {
                    Item::Row(r) => got.push((r.line, r.sales)),
                    Item::Rejected(r) => got.push((r.line, None)),
                    Item::LineDone => {}
                }
                Ok(())
            };
            if trickle {
                parse(Trickle(f.as_bytes()), Requested::Auto, &mut on).unwrap();
            } else {
                parse(f.as_bytes(), Requested::Auto, &mut on).unwrap();
            }
            assert_eq!(
                got,
                vec![(2, Some("1".into())), (4, Some("2".into())), (5, None)],
                "trickle: {trickle}"
            );
        }
    }

    /// Metrics are judged on their text, exactly, as `numeric` reads it.
    #[test]
    fn metrics_are_judged_exactly() {
        let m = |t: &str, k: usize| metric(t, k, false);
        assert_eq!(
            m("1.00000000000000000001", 1),
            Err("must be a whole number".into())
        );
        assert_eq!(m("1.000", 1), Ok(Some("1.000".into())));
        assert_eq!(
            m("1000000000000.0000001", 0),
            Err("is larger than 1e12".into())
        );
        assert_eq!(
            m("1000000000000.000", 0),
            Ok(Some("1000000000000.000".into()))
        );
        assert_eq!(
            m("0999999999999.99", 0),
            Ok(Some("0999999999999.99".into()))
        );
        assert_eq!(m("10000000000000", 2), Err("is larger than 1e12".into()));
        assert_eq!(m("-0.00", 1), Ok(Some("-0.00".into())));
        assert_eq!(m("-0.01", 0), Err("must not be negative".into()));
        assert_eq!(m(".5", 0), Ok(Some(".5".into())));
        // Not in a CSV cell, and said so (NDJSON takes it).
        assert!(m("1e3", 0)
            .unwrap_err()
            .contains("has an exponent; write the number in plain digits"));
        assert!(m("1,5e2", 0).unwrap_err().contains("not a number"));
        assert!(m("NaN", 0).unwrap_err().contains("not a number"));
        let tiny = format!("0.{}1", "0".repeat(20_000));
        assert!(m(&tiny, 0)
            .unwrap_err()
            .contains("more than Postgres can store"));
        let fits = format!("0.{}1", "0".repeat(16_381));
        assert!(m(&fits, 0).is_ok());
        let j = json_metric;
        for huge in [
            "0e99999999999",
            "0e+1073741823",
            "1e-2147483649",
            "5E1073741823",
        ] {
            assert_eq!(j(huge, 0), Err(EXPONENT_OUT_OF_RANGE.into()), "{huge}");
            assert_eq!(
                numeric_text_problem(huge),
                Some(EXPONENT_OUT_OF_RANGE.into()),
                "{huge}"
            );
            assert!(may_hold_unstorable_numbers(&format!(
                r#"{{"dailyData": {{"1": {{"sales": {huge}}}}}}}"#
            )));
        }
        // The largest exponent numeric_in reads, on a zero.
        assert_eq!(j("0e1073741822", 0), Ok("0e1073741822".into()));
        assert_eq!(numeric_text_problem("0e1073741822"), None);
        assert!(may_hold_unstorable_numbers("[1e-5]"));
        assert!(may_hold_unstorable_numbers("[1E-5]"));
        for plain in [
            r#"{"storeId": 1, "year": 2025, "dailyData": {"1": {"sales": 1e5, "customers": 2E+3}}}"#,
            "[1.5, 2e123456789, \"e-mail\"]",
            "",
            "e",
            "1e",
        ] {
            assert_eq!(
                may_hold_unstorable_numbers(plain),
                plain.contains("e-mail"),
                "{plain}"
            );
        }
        assert_eq!(j("1.5e3", 2), Ok("1.5e3".into()));
        assert_eq!(j("1E+12", 0), Ok("1E+12".into()));
        assert_eq!(j("1.0000001E12", 0), Err("is larger than 1e12".into()));
        assert_eq!(j("15e-1", 1), Err("must be a whole number".into()));
        assert!(j("1e-16384", 0).is_err());
        // numeric_in refuses these exponents whatever the digits.
        assert!(j("0e99999999999999999999", 1).is_err());
        assert!(j("0e-1073741823", 1).is_err());
        assert!(j("0e1073741823", 1).is_err());
        assert_eq!(j("0e1073741822", 1), Ok("0e1073741822".into()));
    }

    /// A quote that is never closed, or that joins lines into a record the
    /// header does not match, refuses the file naming the line it opened on.
    #[test]
    fn a_stray_quote_refuses_the_file() {
        let f = "store_code,date,sales\nS1,2024-05-01,1\n\"S8,2024-05-02,2\nS1,2024-05-03,3\n";
        assert_eq!(
            run(f, Requested::Auto).err(),
            Some(FileError::UnclosedQuote(3))
        );
        let f = "store_code,date,sales\r\nS1,2024-05-01,1\r\n\"S8,2024-05-02,2\r\nS1,2024-05-03,\"3\r\nS1,2024-05-04,4\r\n";
        assert_eq!(
            run(f, Requested::Auto).err(),
            Some(FileError::QuoteSpansLines(3, 4))
        );
        // A quote inside an unquoted value is an ordinary character.
        let f = "store_code,date,sales\nS1,2024-05-01,1\"\nS1,2024-05-03,3\n";
        let (_, rows, bad, _) = run(f, Requested::Auto).unwrap();
        assert_eq!((rows.len(), bad.len(), bad[0].line), (1, 1, 2));
        // A quoted value over lines that fits the header is read.
        let f = "store_code,store_name,date,sales\nS1,\"Main\nStreet\",2024-05-01,1\nS1,x,2024-05-03,3\n";
        let (_, rows, bad, _) = run(f, Requested::Auto).unwrap();
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!((rows[0].line, rows[1].line), (2, 4));
    }

    /// Text after a closing quote was glued to the value (`"12"50` read
    /// as 1250): such a line is rejected, its neighbours read; blanks
    /// after the quote and `""` inside it are not text after it.
    #[test]
    fn text_after_a_closing_quote_rejects_its_line() {
        for f in [
            "store_code,date,sales,customers\nS1,2024-05-01,1,2\nS1,2024-05-02,\"12\"50,\"4\"2\nS1,2024-05-03,3,4\n",
            "store_code,date,sales,customers\r\nS1,2024-05-01,1,2\r\n\"S\"1,2024-05-02,5,1\r\nS1,2024-05-03,3,4\r\n",
            "\u{feff}store_code;date;sales\nS1;2024-05-01;1\nS1;\"2024-05\"-02;1,5\nS1;2024-05-03;3\n",
            "store_code,date,sales\nS1,2024-05-01,1\nS1,2024-05-02,\"\"7\nS1,2024-05-03,3\n",
        ] {
            let (_, rows, bad, lines) = run(f, Requested::Auto).unwrap();
            assert_eq!(bad.len(), 1, "{f:?}: {bad:?}");
            assert_eq!(bad[0].line, 3, "{f:?}");
            assert!(bad[0].reason.contains("after a closing quote"), "{bad:?}");
            assert_eq!(rows.iter().map(|r| r.line).collect::<Vec<_>>(), [2, 4], "{f:?}");
            assert_eq!(lines, 3);
        }
        for f in [
            "store_code,date,sales\nS1,2024-05-01,\"12\" \nS1,\"2024-05-02\"\t,\"1\"\"\"\n",
            "store_code,store_name,date,sales\nS1,\"Main \"\"Street\"\"\",2024-05-01,\"3\"\n",
        ] {
            let (_, rows, bad, _) = run(f, Requested::Auto).unwrap();
            assert!(
                bad.iter().all(|b| !b.reason.contains("closing quote")),
                "{f:?}: {bad:?}"
            );
            assert!(!rows.is_empty(), "{f:?}");
        }
    }

    /// Empty rows before the header (a blank line of spaces, `,,,`, a BOM
    /// then CRLF) are skipped: the header is the first line with
    /// something in it, and its delimiter is guessed from it.
    #[test]
    fn empty_rows_before_the_header_are_skipped() {
        for f in [
            "\nstore_code;date;sales\nS1;2024-05-01;1,5\n",
            "\u{feff}\r\nstore_code;date;sales\r\nS1;2024-05-01;1,5\r\n",
            ",,,\nstore_code;date;sales\nS1;2024-05-01;1,5\n",
            "   \n;;\nstore_code;date;sales\nS1;2024-05-01;1,5\n",
        ] {
            let (_, rows, bad, _) = run(f, Requested::Auto).unwrap();
            assert!(bad.is_empty(), "{f:?}: {bad:?}");
            assert_eq!(rows.len(), 1, "{f:?}");
            assert_eq!(rows[0].sales.as_deref(), Some("1.5"), "{f:?}");
            assert_eq!(rows[0].line, f.matches('\n').count() as u64, "{f:?}");
        }
        assert!(matches!(
            run("\n,,,\n  \n", Requested::Auto),
            Err(FileError::Empty)
        ));
    }

    /// A daily line's year and month columns are checked against its
    /// date, and columns one shape does not read refuse the file.
    #[test]
    fn columns_of_the_other_shape_are_not_dropped() {
        let f = "store_code,year,month,date,sales\nS1,2024,5,2024-05-01,1\nS1,2023,3,2024-05-02,2\nS1,abc,,2024-05-03,3\nS1,,,2024-05-04,4\n";
        let (_, rows, bad, _) = run(f, Requested::Auto).unwrap();
        assert_eq!(rows.iter().map(|r| r.line).collect::<Vec<_>>(), [2, 5]);
        let why: Vec<(u64, Option<&str>, &str)> = bad
            .iter()
            .map(|b| (b.line, b.column.as_deref(), b.reason.as_str()))
            .collect();
        assert_eq!(
            why,
            [
                (3, Some("year"), "2023 contradicts date 2024-05-02"),
                (3, Some("month"), "3 contradicts date 2024-05-02"),
                (4, Some("year"), "must be a whole number"),
            ]
        );
        let f = "store_code,year,month,sales,d1_sales\nS1,2024,5,9,1\n";
        match run(f, Requested::Auto) {
            Err(FileError::Header(h)) => assert!(h.contains("column sales is not read"), "{h}"),
            other => panic!("{other:?}"),
        }
        let f = "store_code,date,sales,d1_sales\nS1,2024-05-01,9,1\n";
        match run(f, Requested::Auto) {
            Err(FileError::Header(h)) => assert!(h.contains("column d1_sales is not read"), "{h}"),
            other => panic!("{other:?}"),
        }
    }

    /// An empty `storeCode` is one not given, as an empty CSV field is.
    #[test]
    fn an_empty_store_code_in_ndjson_is_not_given() {
        let nd =
            "{\"storeCode\": \"\", \"storeId\": 412, \"date\": \"2024-01-01\", \"sales\": 1}\n\
                  {\"storeCode\": \"  \", \"date\": \"2024-01-02\", \"sales\": 1}\n";
        let (_, rows, bad, _) = run(nd, Requested::Auto).unwrap();
        assert_eq!(rows.len(), 1, "{bad:?}");
        assert_eq!(
            (rows[0].store_code.as_deref(), rows[0].store_id),
            (None, Some(412))
        );
        assert_eq!(bad.len(), 1);
        assert_eq!((bad[0].line, bad[0].reason.as_str()), (2, "no store given"));
    }

    #[test]
    fn two_names_for_one_field_are_a_repeated_column() {
        for h in [
            "store_code,Date,Day,sales",
            "store,code,date,sales",
            "store_code,year,month,d1_sales,d01_sales",
            "store_code,date,sales,Sales",
        ] {
            let e = header_of(h).err();
            assert!(matches!(e, Some(FileError::Header(_))), "{h}: {e:?}");
        }
        let long = "x".repeat(100_000);
        let f = format!("{long},date,sales\nS1,2024-01-01,1\n");
        let Some(FileError::Header(m)) = run(&f, Requested::Auto).err() else {
            panic!("no header error");
        };
        assert!(m.len() < 300, "cut short: {m}");
    }

    #[test]
    fn lines_without_data_and_ambiguous_ndjson_lines_are_rejected() {
        let f = "store_code,year,month,d1_sales,d2_sales\nS7,2024,9,,\nS7,2024,9,,5\n";
        let (_, rows, bad, _) = run(f, Requested::Auto).unwrap();
        assert_eq!((rows.len(), bad.len(), bad[0].line), (1, 1, 2));
        let nd = [
            r#"{"storeId": 1, "year": 2024, "month": 9, "dailyData": {}}"#,
            r#"{"storeCode": "S1", "date": "2024-09-01", "sales": 1, "dailyData": {"2": {"sales": 2}}}"#,
            r#"{"storeCode": 10, "date": "2024-09-01", "sales": 1}"#,
            r#"{"storeCode": "S1", "storeId": 4, "date": "2024-09-01", "sales": 12345678.123456789012}"#,
            r#"{"storeId": 1, "year": 2024, "month": 9, "dailyData": {"3": {"sales": 0.10000000000000000001, "customers": 1.00000000000000000001}}}"#,
            r#"{"storeId": 1, "year": 2024, "month": 9, "dailyData": {"3": {"sales": 1, "sales": 2}}}"#,
            r#"{"storeCode": "S1", "date": "2024-09-02", "sales": 1, "storeCode": "S2"}"#,
            r#"{"storeId": 1, "store_id": 2, "year": 2024, "month": 9, "dailyData": {"1": {"sales": 5}}}"#,
        ]
        .join("\n");
        let (_, rows, bad, _) = run(&nd, Requested::Auto).unwrap();
        let got: Vec<_> = bad
            .iter()
            .map(|b| (b.line, b.column.as_deref().unwrap_or("-")))
            .collect();
        assert_eq!(
            got,
            vec![
                (1, "dailyData"),
                (2, "dailyData"),
                (3, "storeCode"),
                (5, "dailyData.3.customers"),
                (6, "dailyData.3.sales"),
                (7, "storeCode"),
                (8, "store_id"),
            ]
        );
        assert_eq!(bad[5].reason, "appears more than once in the same object");
        assert_eq!(bad[6].reason, "storeId given twice");
        assert_eq!(bad[2].reason, "must be a string");
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].sales.as_deref(), Some("12345678.123456789012"));
        assert_eq!((rows[0].store_id, rows[0].id_too), (None, Some(4)));
    }

    /// Header names match whatever their case: a run of capitals is one
    /// word (`SALES`, `storeID`), a capital after a small letter or a digit
    /// begins one (`d1Sales`), and `_`, ` ` or `-` between words do not
    /// matter (`STORECODE` is `store_code`).
    #[test]
    fn header_names_match_whatever_their_case() {
        for (written, snake) in [
            ("SALES", "sales"),
            ("Sales", "sales"),
            ("STORE_ID", "store_id"),
            ("storeID", "store_id"),
            ("StoreId", "store_id"),
            ("storeId", "store_id"),
            ("Store ID", "store_id"),
            ("STORECode", "store_code"),
            ("D1_SALES", "d1_sales"),
            ("d1Sales", "d1_sales"),
            ("D1SALES", "d1_sales"),
            ("Store Code", "store_code"),
            ("store-code", "store_code"),
            ("\u{feff} Business_Date ", "business_date"),
        ] {
            assert_eq!(normalize(written), snake, "{written}");
        }
        let f = "STORE_CODE,DATE,SALES,CUSTOMERS\nST0189,2091-07-05,5,1\n";
        let (shape, rows, bad, _) = run(f, Requested::Auto).unwrap();
        assert_eq!(shape, Shape::Daily);
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(rows[0].store_code.as_deref(), Some("ST0189"));
        assert_eq!(
            (rows[0].sales.as_deref(), rows[0].customers.as_deref()),
            (Some("5"), Some("1"))
        );
        // One capitalised column among small ones is read, not dropped.
        let f = "store_code,date,sales,CUSTOMERS\nST0189,2091-07-05,5,1\n";
        let (_, rows, _, _) = run(f, Requested::Auto).unwrap();
        assert_eq!(rows[0].customers.as_deref(), Some("1"));
        let f = "STORE,YEAR,MONTH,D1_SALES,D2CUSTOMERS\nST0189,2091,7,5,3\n";
        let (shape, rows, bad, _) = run(f, Requested::Auto).unwrap();
        assert_eq!(shape, Shape::Monthly);
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(
            rows.iter()
                .map(|r| (r.day, r.col.as_deref().unwrap_or("-")))
                .collect::<Vec<_>>(),
            vec![(1, "d1_sales"), (2, "d2_customers")]
        );
        assert_eq!(rows[1].customers.as_deref(), Some("3"));
        for h in ["STORECODE", "StoreCode", "storecode", "Store Code"] {
            let f = format!("{h},date,sales\nST0189,2091-07-05,5\n");
            let (_, rows, bad, _) = run(&f, Requested::Auto).unwrap();
            assert!(bad.is_empty(), "{h}: {bad:?}");
            assert_eq!(rows[0].store_code.as_deref(), Some("ST0189"), "{h}");
        }
        for h in ["storeID", "STORE_ID", "StoreId", "STOREID"] {
            let f = format!("{h},date,sales\n189,2091-07-05,5\n");
            let (_, rows, bad, _) = run(&f, Requested::Auto).unwrap();
            assert!(bad.is_empty(), "{h}: {bad:?}");
            assert_eq!(rows[0].store_id, Some(189), "{h}");
        }
        // A rejected row names its column in snake_case.
        let f = "STORE_CODE,BUSINESSDATE,SALES\nST0189,2091-07-05,x\n";
        let (_, _, bad, _) = run(f, Requested::Auto).unwrap();
        assert_eq!(bad[0].column.as_deref(), Some("sales"));
        // A refusal lists the columns as the header wrote them.
        let Some(FileError::Header(m)) =
            run("Shop_Number,DATE,SALES\nS1,2091-07-05,5\n", Requested::Auto).err()
        else {
            panic!("no header error");
        };
        assert_eq!(
            m,
            "no store column (store_code or store_id); found: Shop_Number, DATE, SALES"
        );
    }

    /// A column one slip away from a field the import reads would be
    /// ignored and its values lost: the file is refused naming it and the
    /// field meant. Columns far from every field, and the exports' own,
    /// are still ignored.
    #[test]
    fn a_misspelt_column_refuses_the_file() {
        for (h, why) in [
            (
                "store_code,date,sales,Customer",
                "column Customer is not one the import reads: did you mean customers?",
            ),
            (
                "store_code,date,sales,transaction",
                "column transaction is not one the import reads: did you mean transactions?",
            ),
            (
                "Store_Kode,date,sales",
                "column Store_Kode is not one the import reads: did you mean store_code?",
            ),
            (
                "store_code,dtae,sales",
                "column dtae is not one the import reads: did you mean date?",
            ),
            (
                "store_code,year,month,d2_sales,d1_sale",
                "column d1_sale is not one the import reads: did you mean d1_sales?",
            ),
            (
                "store_code,year,month,d1_sales,d32_sales",
                "column d32_sales is not one the import reads: \
                 day 32 is not a day of a month (d1_sales .. d31_sales)",
            ),
            (
                "store_code,year,month,d0_customers,d1_sales",
                "column d0_customers is not one the import reads: \
                 day 0 is not a day of a month (d1_customers .. d31_customers)",
            ),
        ] {
            assert_eq!(
                header_of(h).err(),
                Some(FileError::Header(why.into())),
                "{h}"
            );
        }
        for h in [
            "store_code,date,sales,note,cashier,register,id,total",
            // A field the header has is not looked for again; a field's
            // name with an id or unit after it is another column.
            "store_code,date,sales,customers,transactions,customer_id",
            "Store Code,Store No,Date,Sales",
            "store_code,date,sales,Sales %,Customer #,Transaction No",
            "store_code,date,customers,Customer",
            "store_code,year,month,d1_sales,d1Sales %",
            "key,store_id,store_code,store_name,date,sales,customers,transactions",
            "key,store_id,store_code,store_name,region,year,month,total_sales,\
             total_customers,total_transactions,days_reported,d1_sales",
        ] {
            let r = header_of(h);
            assert!(
                !matches!(r, Err(FileError::Header(_))),
                "{h}: {:?}",
                r.err()
            );
        }
    }

    /// A field given twice in any spelling refuses the file, naming both
    /// columns as the header wrote them.
    #[test]
    fn a_field_given_twice_in_any_spelling_is_refused() {
        for (h, why) in [
            (
                "store_code,date,Sales,SALES",
                "columns Sales and SALES are the same field",
            ),
            ("store_code,date,sales,sales", "column sales appears twice"),
            (
                "STORE_CODE,StoreCode,date,sales",
                "columns STORE_CODE and StoreCode are the same field",
            ),
            (
                "store_code,year,month,D1_SALES,d01Sales",
                "columns D1_SALES and d01Sales are the same field",
            ),
            (
                "store_code,date,sales,note,note",
                "column note appears twice",
            ),
        ] {
            assert_eq!(
                header_of(h).err(),
                Some(FileError::Header(why.into())),
                "{h}"
            );
        }
        // Columns the import does not read are ignored, whatever their
        // names: two that differ in case are two columns.
        for h in [
            "store_code,date,sales,note,NOTE",
            "store_code,date,sales,a_b,ab",
        ] {
            assert!(header_of(h).is_ok(), "{h}");
        }
    }

    /// A file of header `h` and one data line, read.
    fn header_of(h: &str) -> Result<(Shape, Vec<Row>, Vec<Rejected>, u64), FileError> {
        run(&format!("{h}\nS1,2024-01-01,1,1,1\n"), Requested::Auto)
    }

    /// Rejected rows of an NDJSON file: (line, column, reason).
    fn ndjson_rejections(lines: &[&str]) -> (Vec<Row>, Vec<(u64, String, String)>) {
        let (_, rows, bad, _) = run(&lines.join("\n"), Requested::Ndjson).unwrap();
        let bad = bad
            .into_iter()
            .map(|b| (b.line, b.column.unwrap_or_else(|| "-".into()), b.reason))
            .collect();
        (rows, bad)
    }

    /// A member of the other line shape is refused, not dropped: a
    /// record's top-level metrics, a daily row's year or month that is not
    /// its date's; a null member is one not given, `date` included.
    #[test]
    fn ndjson_members_of_the_other_shape_are_rejected() {
        let (rows, bad) = ndjson_rejections(&[
            r#"{"storeId":189,"year":2091,"month":6,"sales":99,"customers":5,"dailyData":{"1":{"sales":1}}}"#,
            r#"{"storeCode":"ST0189","date":"2091-05-01","year":2095,"month":9,"sales":1}"#,
            r#"{"storeCode":"ST0189","date":"2091-05-02","year":"junk","sales":1}"#,
            r#"{"storeCode":"ST0189","date":"2091-05-03","month":5.5,"sales":1}"#,
            r#"{"storeCode":"ST0189","date":"2091-05-04","year":2091,"month":5,"sales":4}"#,
            r#"{"storeCode":"ST0189","date":null,"year":2091,"month":6,"dailyData":{"2":{"sales":2}}}"#,
            r#"{"storeCode":"ST0189","date":"2091-05-05","dailyData":null,"sales":5,"year":null}"#,
            r#"{"storeCode":"ST0189","year":2091,"month":6,"sales":null,"dailyData":{"3":{"sales":3}}}"#,
            r#"{"storeCode":"ST0189","sales":6}"#,
        ]);
        let b = |l: u64, c: &str, r: &str| (l, c.to_string(), r.to_string());
        let daily_member = "belongs to a daily row (with a date); a record's days go in dailyData";
        assert_eq!(
            bad,
            vec![
                b(1, "sales", daily_member),
                b(1, "customers", daily_member),
                b(2, "year", "2095 contradicts date 2091-05-01"),
                b(2, "month", "9 contradicts date 2091-05-01"),
                b(3, "year", "must be a whole number"),
                b(4, "month", "must be a whole number"),
                b(9, "date", "is missing"),
            ]
        );
        let got: Vec<_> = rows
            .iter()
            .map(|r| (r.line, r.year, r.month, r.day))
            .collect();
        assert_eq!(
            got,
            vec![
                (5, 2091, 5, 4),
                (6, 2091, 6, 2),
                (7, 2091, 5, 5),
                (8, 2091, 6, 3)
            ]
        );
    }

    /// A date that is not a string says so, whatever it holds.
    #[test]
    fn an_ndjson_date_must_be_a_string() {
        let (_, bad) = ndjson_rejections(&[
            r#"{"storeCode":"ST0189","date":20910410,"sales":1}"#,
            r#"{"storeCode":"ST0189","date":["2091-04-10"],"sales":1}"#,
            r#"{"storeCode":"ST0189","date":"20910410","sales":1}"#,
        ]);
        let must = "must be a string (YYYY-MM-DD)";
        assert_eq!(
            bad,
            vec![
                (1, "date".into(), must.into()),
                (2, "date".into(), must.into()),
                (
                    3,
                    "date".into(),
                    "\"20910410\" is not a date; use YYYY-MM-DD".into()
                ),
            ]
        );
    }

    /// The line limit is exact: MAX_LINE_BYTES bytes of a line (its line
    /// break not counted) are read, one more refuses the file, naming that
    /// line whatever follows it.
    #[test]
    fn the_line_limit_is_exact_and_names_the_long_line() {
        let max = MAX_LINE_BYTES as usize;
        let csv_line = |len: usize| {
            let head = "S1,2024-01-01,5,";
            format!("{head}{}", "x".repeat(len - head.len()))
        };
        for end in ["\n", "\r\n", "\r"] {
            for trickle in [false, true] {
                let f = format!(
                    "store_code,date,sales,note{end}S1,2024-01-02,6,{end}{}{end}{}",
                    csv_line(max),
                    format!("S1,2024-01-03,7,{end}").repeat(2000)
                );
                let mut rows = 0;
                let counted = |i| {
                    if let Item::Row(_) = i {
                        rows += 1;
                    }
                    Ok(())
                };
                let r = if trickle {
                    parse(Trickle(f.as_bytes()), Requested::Auto, counted)
                } else {
                    parse(f.as_bytes(), Requested::Auto, counted)
                };
                assert_eq!(r, Ok(Shape::Daily), "{end:?}");
                assert_eq!(rows, 2002, "{end:?}");
                for after in [0, 1, 2000] {
                    let f = format!(
                        "store_code,date,sales,note{end}S1,2024-01-02,6,{end}{}{end}{}",
                        csv_line(max + 1),
                        format!("S1,2024-01-03,7,{end}").repeat(after)
                    );
                    let r = if trickle {
                        parse(Trickle(f.as_bytes()), Requested::Auto, |_| Ok(()))
                    } else {
                        parse(f.as_bytes(), Requested::Auto, |_| Ok(()))
                    };
                    assert_eq!(r, Err(FileError::LineTooLong(3)), "{end:?} {after}");
                }
            }
        }
        // The header is a line too, and the last line needs no break.
        let f = format!(
            "store_code,date,sales,{}\nS1,2024-01-02,6\n",
            "n".repeat(max)
        );
        assert_eq!(
            run(&f, Requested::Auto).err(),
            Some(FileError::LineTooLong(1))
        );
        let f = format!("store_code,date,sales,note\n{}", csv_line(max + 1));
        assert_eq!(
            run(&f, Requested::Auto).err(),
            Some(FileError::LineTooLong(2))
        );
        // Blank lines before the long line are not part of it.
        let f = format!(
            "store_code,date,sales,note\n\n\n{}\nS1,2024-01-02,6,\n",
            csv_line(max)
        );
        assert!(run(&f, Requested::Auto).is_ok());
        // A quoted value over lines counts each line break as one byte.
        let quoted = |len: usize| {
            let head = "S1,2024-01-01,5,\"";
            let body = len - head.len() - 1;
            format!(
                "{head}{}\r\n{}\"",
                "y".repeat(body / 2),
                "y".repeat(body - body / 2 - 1)
            )
        };
        let f = format!(
            "store_code,date,sales,note\n{}\nS1,2024-01-02,6,\n",
            quoted(max)
        );
        let (_, rows, bad, _) = run(&f, Requested::Auto).unwrap();
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!((rows[0].line, rows[1].line), (2, 4));
        let f = format!(
            "store_code,date,sales,note\n{}\nS1,2024-01-02,6,\n",
            quoted(max + 1)
        );
        assert_eq!(
            run(&f, Requested::Auto).err(),
            Some(FileError::QuoteTooLong(2))
        );

        // NDJSON: the same limit, the same lines.
        let nd_line = |len: usize, day: u32| {
            let head =
                format!("{{\"storeCode\": \"S1\", \"date\": \"2024-01-{day:02}\", \"sales\": 5}}");
            format!("{head}{}", " ".repeat(len.saturating_sub(head.len())))
        };
        for end in ["\n", "\r\n", "\r"] {
            let f = format!(
                "{}{end}{}{end}{}",
                nd_line(10, 1),
                nd_line(max, 2),
                format!("{}{end}", nd_line(60, 3)).repeat(2000)
            );
            let (_, rows, bad, lines) = run(&f, Requested::Auto).unwrap();
            assert!(bad.is_empty(), "{end:?}: {:?}", &bad[..1]);
            assert_eq!((rows.len(), lines), (2002, 2002), "{end:?}");
            assert_eq!((rows[1].line, rows[2001].line), (2, 2002), "{end:?}");
            for after in [0, 1, 2000] {
                let f = format!(
                    "{}{end}{}{end}{}",
                    nd_line(10, 1),
                    nd_line(max + 1, 2),
                    format!("{}{end}", nd_line(60, 3)).repeat(after)
                );
                assert_eq!(
                    run(&f, Requested::Auto).err(),
                    Some(FileError::LineTooLong(2)),
                    "{end:?} {after}"
                );
            }
        }
    }
}
