//! Reading `jsonb` in place, in Postgres' binary format.
//!
//! `pgrx::JsonB` converts every argument with `jsonb_out` (text, one
//! `numeric_out` per number) and parses that text with serde, and converts
//! results back with `jsonb_in`. For the CHECK constraint (called for every
//! row written), the generated total columns and `batch_upsert`'s input, that
//! round trip cost more than the work itself. [`RawJsonb`] instead hands out
//! views ([`Jb`]) into the detoasted datum, walked with Postgres' own jsonb
//! iterator; numbers stay `numeric` (exact sums, no text).
//!
//! Lifetimes: a [`Jb`] borrows its [`RawJsonb`], whose datum lives in the
//! memory context of the current call.

use crate::jsonb_text::Node;
use pgrx::callconv::{Arg, ArgAbi, BoxRet, FcInfo};
use pgrx::datum::Datum;
use pgrx::nullable::Nullable;
use pgrx::pg_sys;
use pgrx::prelude::*;
use sales_core::json::{JsonRead, Kind, NumberClass};
use sales_core::pgnumeric::{Decoded, Header};
use std::marker::PhantomData;

/// Whether two varlena values hold the same bytes (header included).
///
/// # Safety
/// Both point to live varlena values.
unsafe fn same_bytes(a: *const pg_sys::varlena, b: *const pg_sys::varlena) -> bool {
    unsafe {
        let (la, lb) = (pgrx::varsize_any(a), pgrx::varsize_any(b));
        la == lb
            && std::slice::from_raw_parts(a as *const u8, la)
                == std::slice::from_raw_parts(b as *const u8, lb)
    }
}

/// A jsonb value as Postgres holds it: detoasted, never copied or parsed.
pub struct RawJsonb(*mut pg_sys::Jsonb);

impl RawJsonb {
    /// The top-level value.
    pub fn root(&self) -> Jb<'_> {
        // SAFETY: self.0 is a detoasted jsonb datum (see from_polymorphic_datum).
        unsafe {
            let root = std::ptr::addr_of_mut!((*self.0).root);
            let header = (*root).header;
            if header & pg_sys::JB_FSCALAR != 0 {
                // A scalar document is stored as a one-element array.
                let v = pg_sys::getIthJsonbValueFromContainer(root, 0);
                Jb::from_value(&*v)
            } else if header & pg_sys::JB_FOBJECT != 0 {
                Jb::Object(Container::new(root))
            } else {
                Jb::Array(Container::new(root))
            }
        }
    }

    /// Whether two documents are equal as jsonb (`=`): the same bytes, or
    /// equal values ([`Jb::equals`]: `1.0` and `1.00` are the same number).
    pub fn equals(&self, other: &RawJsonb) -> bool {
        // SAFETY: both are detoasted jsonb datums (see from_polymorphic_datum).
        let same = unsafe { same_bytes(self.0 as *const _, other.0 as *const _) };
        same || self.root().equals(other.root())
    }

    /// Whether two documents have the same bytes (and so are the same
    /// value written the same way: `10.5` and `10.500` are equal values,
    /// not the same bytes).
    pub fn same_bytes(&self, other: &RawJsonb) -> bool {
        // SAFETY: both are detoasted jsonb datums (see from_polymorphic_datum).
        unsafe { same_bytes(self.0 as *const _, other.0 as *const _) }
    }

    /// The datum, to pass on to a query unchanged.
    pub fn datum(&self) -> JsonbDatum {
        JsonbDatum(pg_sys::Datum::from(self.0))
    }
}

impl FromDatum for RawJsonb {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _typoid: pg_sys::Oid,
    ) -> Option<Self> {
        if is_null {
            return None;
        }
        // Full detoast: decompressed, fetched from TOAST, and with a 4-byte
        // header, which the Jsonb struct layout assumes (as PG_GETARG_JSONB_P).
        let p = unsafe { pg_sys::pg_detoast_datum(datum.cast_mut_ptr()) };
        Some(RawJsonb(p.cast()))
    }
}

unsafe impl<'fcx> ArgAbi<'fcx> for RawJsonb {
    unsafe fn unbox_arg_unchecked(arg: Arg<'_, 'fcx>) -> Self {
        let index = arg.index();
        unsafe { arg.unbox_arg_using_from_datum() }
            .unwrap_or_else(|| panic!("argument {index} must not be null"))
    }

    unsafe fn unbox_nullable_arg(arg: Arg<'_, 'fcx>) -> Nullable<Self> {
        unsafe { arg.unbox_arg_using_from_datum() }.into()
    }
}

impl_sql_translatable!(RawJsonb, "jsonb");

/// A jsonb datum passed on to a query as it is (an SPI argument).
#[derive(Clone, Copy)]
pub struct JsonbDatum(pg_sys::Datum);

impl IntoDatum for JsonbDatum {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        Some(self.0)
    }

    fn type_oid() -> pg_sys::Oid {
        pg_sys::JSONBOID
    }
}

unsafe impl BoxRet for JsonbDatum {
    unsafe fn box_into<'fcx>(self, fcinfo: &mut FcInfo<'fcx>) -> Datum<'fcx> {
        unsafe { fcinfo.return_raw_datum(self.0) }
    }
}

impl_sql_translatable!(JsonbDatum, "jsonb");

impl JsonbDatum {
    /// A jsonb datum a Postgres function returned.
    pub fn from_datum(d: pg_sys::Datum) -> Self {
        JsonbDatum(d)
    }

    /// A jsonb datum of `bytes`: a whole jsonb varlena whose 4-byte header
    /// is still to be set, copied into the current memory context.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        // SAFETY: palloc'd in the current memory context, which outlives
        // the call; the bytes are a complete jsonb varlena once the header
        // is set.
        unsafe {
            let out = pg_sys::palloc(bytes.len()) as *mut u8;
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), out, bytes.len());
            pgrx::set_varsize_4b(out as *mut pg_sys::varlena, bytes.len() as i32);
            JsonbDatum(pg_sys::Datum::from(out))
        }
    }

    /// Serialises a value built with `pushJsonbValue`.
    ///
    /// # Safety
    /// `v` is what the last `pushJsonbValue` returned, and every pointer in
    /// it is still valid.
    pub unsafe fn from_value(v: *mut pg_sys::JsonbValue) -> Self {
        JsonbDatum(pg_sys::Datum::from(unsafe { pg_sys::JsonbValueToJsonb(v) }))
    }
}

/// A `numeric[]` argument read in place: its elements' datums (NULL as
/// `None`), each with a 4-byte header, valid for the call. (pgrx's
/// `AnyNumeric` copies every element out and back in.)
pub struct NumericArray(pub Vec<Option<pg_sys::Numeric>>);

impl FromDatum for NumericArray {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _typoid: pg_sys::Oid,
    ) -> Option<Self> {
        if is_null {
            return None;
        }
        unsafe {
            let array = pg_sys::pg_detoast_datum(datum.cast_mut_ptr()).cast::<pg_sys::ArrayType>();
            let mut elems: *mut pg_sys::Datum = std::ptr::null_mut();
            let mut nulls: *mut bool = std::ptr::null_mut();
            let mut n: i32 = 0;
            // numeric: varlena, not by value, int-aligned.
            pg_sys::deconstruct_array(
                array,
                pg_sys::NUMERICOID,
                -1,
                false,
                pg_sys::TYPALIGN_INT as std::ffi::c_char,
                &mut elems,
                &mut nulls,
                &mut n,
            );
            let n = n.max(0) as usize;
            let (elems, nulls) = if n == 0 {
                (&[][..], &[][..])
            } else {
                (
                    std::slice::from_raw_parts(elems, n),
                    std::slice::from_raw_parts(nulls, n),
                )
            };
            Some(NumericArray(
                elems
                    .iter()
                    .zip(nulls)
                    .map(|(d, &null)| {
                        // In place unless stored with a short header.
                        (!null).then(|| pg_sys::pg_detoast_datum(d.cast_mut_ptr()).cast())
                    })
                    .collect(),
            ))
        }
    }
}

unsafe impl<'fcx> ArgAbi<'fcx> for NumericArray {
    unsafe fn unbox_arg_unchecked(arg: Arg<'_, 'fcx>) -> Self {
        let index = arg.index();
        unsafe { arg.unbox_arg_using_from_datum() }
            .unwrap_or_else(|| panic!("argument {index} must not be null"))
    }

    unsafe fn unbox_nullable_arg(arg: Arg<'_, 'fcx>) -> Nullable<Self> {
        unsafe { arg.unbox_arg_using_from_datum() }.into()
    }
}

impl_sql_translatable!(NumericArray, arg_only = "numeric[]");

/// A `text` argument as its bytes, in the server's encoding, valid for the
/// call. (pgrx's `&str` refuses text that is not UTF-8 before the function
/// runs, so a database in another encoding could not pass any non-ASCII.)
pub struct TextBytes(*mut pg_sys::varlena);

impl TextBytes {
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: a detoasted text datum that lives for the call.
        unsafe {
            let len = pgrx::varlena::varsize_any_exhdr(self.0);
            let data = pgrx::varlena::vardata_any(self.0) as *const u8;
            if len == 0 {
                &[]
            } else {
                std::slice::from_raw_parts(data, len)
            }
        }
    }
}

impl FromDatum for TextBytes {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _typoid: pg_sys::Oid,
    ) -> Option<Self> {
        if is_null {
            return None;
        }
        Some(TextBytes(unsafe {
            pg_sys::pg_detoast_datum_packed(datum.cast_mut_ptr())
        }))
    }
}

unsafe impl<'fcx> ArgAbi<'fcx> for TextBytes {
    unsafe fn unbox_arg_unchecked(arg: Arg<'_, 'fcx>) -> Self {
        let index = arg.index();
        unsafe { arg.unbox_arg_using_from_datum() }
            .unwrap_or_else(|| panic!("argument {index} must not be null"))
    }

    unsafe fn unbox_nullable_arg(arg: Arg<'_, 'fcx>) -> Nullable<Self> {
        unsafe { arg.unbox_arg_using_from_datum() }.into()
    }
}

impl_sql_translatable!(TextBytes, arg_only = "text");

/// A `numeric` computed by Postgres' own arithmetic, returned as it is.
pub struct NumericDatum(pg_sys::Numeric);

impl IntoDatum for NumericDatum {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        Some(pg_sys::Datum::from(self.0))
    }

    fn type_oid() -> pg_sys::Oid {
        pg_sys::NUMERICOID
    }
}

unsafe impl BoxRet for NumericDatum {
    unsafe fn box_into<'fcx>(self, fcinfo: &mut FcInfo<'fcx>) -> Datum<'fcx> {
        unsafe { fcinfo.return_raw_datum(pg_sys::Datum::from(self.0)) }
    }
}

impl_sql_translatable!(NumericDatum, "numeric");

impl NumericDatum {
    pub fn zero() -> Self {
        NumericDatum(unsafe { pg_sys::int64_to_numeric(0) })
    }

    /// Whether `numeric_int8` takes it without an error (rounded, within
    /// the bigint range; NaN and infinities do not fit).
    pub fn fits_int8(&self) -> bool {
        self.as_f64().is_some_and(|v| v.abs() < 9.2e18)
    }

    pub fn is_negative(&self) -> bool {
        self.as_f64().is_some_and(|v| v < 0.0)
    }

    /// Its value as a double (None for NaN), read from `numeric_out`.
    fn as_f64(&self) -> Option<f64> {
        // SAFETY: numeric_out takes one numeric and returns a cstring.
        let text = unsafe {
            pgrx::direct_function_call_as_datum(
                pg_sys::numeric_out,
                &[Some(pg_sys::Datum::from(self.0))],
            )
            .map(|d| std::ffi::CStr::from_ptr(d.cast_mut_ptr::<std::ffi::c_char>()))?
        };
        text.to_str()
            .ok()?
            .parse::<f64>()
            .ok()
            .filter(|v| !v.is_nan())
    }

    /// self + n, exactly (numeric arithmetic, no rounding); past what a
    /// numeric holds, self. Reached only by days far past what the daily
    /// data CHECK allows (10^12 each), which then refuses the row naming
    /// itself, as for customers summing past the bigint range (before, the
    /// trigger failed first with 22023 "numeric overflow in a daily
    /// total", which named neither the field nor the rule).
    pub fn add(&self, n: Num<'_>) -> Self {
        let mut error = false;
        let sum = unsafe { pg_sys::numeric_add_opt_error(self.0, n.0, &mut error) };
        if error {
            return NumericDatum(self.0);
        }
        NumericDatum(sum)
    }
}

/// An exact running sum of numerics. While every value has at most eight
/// decimal places and the sum fits, it is kept in a 128-bit integer of
/// units of 10^-8 (no allocation per value); past that it goes on in
/// Postgres' numeric arithmetic. The result is what adding the values one
/// by one with `numeric +` gives: the same value, and the largest display
/// scale of the values.
pub struct NumericSum {
    units: Option<i128>,
    dscale: u16,
    exact: Option<NumericDatum>,
}

/// 10^-8 as base-10000 digits after the point.
const SUM_FRACTION_DIGITS: i32 = 2;
/// Values under 10^28 (seven base-10000 digits before the point): the sum
/// of any number of them fits the i128 unless it overflows, which is checked.
const SUM_WHOLE_DIGITS: i32 = 7;

impl NumericSum {
    pub fn new() -> Self {
        NumericSum {
            units: Some(0),
            dscale: 0,
            exact: None,
        }
    }

    pub fn add(&mut self, n: Num<'_>) {
        if let Some(units) = self.units {
            let (n_words, word) = n.words();
            if let Ok(h) = Header::from_words(n_words, word) {
                if let Some(sum) = h
                    .units(word, SUM_FRACTION_DIGITS, SUM_WHOLE_DIGITS)
                    .and_then(|v| units.checked_add(v))
                {
                    self.units = Some(sum);
                    self.dscale = self.dscale.max(h.dscale);
                    return;
                }
            }
            self.exact = Some(self.numeric_of_units());
            self.units = None;
        }
        let sum = self.exact.take().unwrap_or_else(NumericDatum::zero).add(n);
        self.exact = Some(sum);
    }

    /// Whether the sum, rounded, fits a bigint: known from the units while
    /// the sum is kept in them (always, for values under 10^28 with at most
    /// eight decimal places), else read from the numeric.
    pub fn fits_int8(&self) -> bool {
        match (self.units, &self.exact) {
            (Some(u), _) => u.unsigned_abs() / 10u128.pow(8) < 9_200_000_000_000_000_000,
            (None, Some(e)) => e.fits_int8(),
            (None, None) => true,
        }
    }

    pub fn finish(self) -> NumericDatum {
        match self.exact {
            Some(e) => e,
            None => self.numeric_of_units(),
        }
    }

    /// The integer sum as a numeric with the sum's display scale.
    fn numeric_of_units(&self) -> NumericDatum {
        let units = self.units.unwrap_or(0);
        let scale = 10i128.pow(4 * SUM_FRACTION_DIGITS as u32);
        let (whole, fraction) = (
            units.unsigned_abs() / scale as u128,
            units.unsigned_abs() % scale as u128,
        );
        let mut text = String::with_capacity(48);
        if units < 0 {
            text.push('-');
        }
        text.push_str(&whole.to_string());
        if self.dscale > 0 {
            let digits = format!("{fraction:08}");
            text.push('.');
            let shown = (self.dscale as usize).min(digits.len());
            // Digits past the eighth place are zeros (the values had none).
            text.push_str(&digits[..shown]);
            for _ in shown..self.dscale as usize {
                text.push('0');
            }
        }
        let text = std::ffi::CString::new(text).expect("digits and a point");
        // SAFETY: numeric_in takes (cstring, typioparam, typmod).
        let d = unsafe {
            pgrx::direct_function_call_as_datum(
                pg_sys::numeric_in,
                &[
                    Some(pg_sys::Datum::from(text.as_ptr())),
                    Some(pg_sys::Datum::from(pg_sys::InvalidOid)),
                    Some(pg_sys::Datum::from(-1i32)),
                ],
            )
        };
        NumericDatum(
            d.expect("numeric_in returns a value")
                .cast_mut_ptr::<pg_sys::NumericData>(),
        )
    }
}

impl Default for NumericSum {
    fn default() -> Self {
        Self::new()
    }
}

/// A container (object or array) inside a jsonb datum, with its size in
/// bytes when known (0 for a document's root).
#[derive(Clone, Copy)]
pub struct Container<'a>(*mut pg_sys::JsonbContainer, usize, PhantomData<&'a ()>);

impl<'a> Container<'a> {
    fn new(c: *mut pg_sys::JsonbContainer) -> Self {
        Container(c, 0, PhantomData)
    }

    fn nested(c: *mut pg_sys::JsonbContainer, bytes: i32) -> Self {
        Container(c, bytes.max(0) as usize, PhantomData)
    }

    /// The container's bytes, when its size is known. jsonb's binary form is
    /// canonical (keys sorted, no duplicates, fixed layout), so equal bytes
    /// mean equal values; different bytes may still be equal values (1.0
    /// and 1).
    pub fn bytes(self) -> Option<&'a [u8]> {
        (self.1 > 0).then(|| unsafe { std::slice::from_raw_parts(self.0 as *const u8, self.1) })
    }

    pub fn len(self) -> usize {
        (unsafe { (*self.0).header } & pg_sys::JB_CMASK) as usize
    }

    /// An object's members in storage order (keys by length, then bytes,
    /// as jsonb keeps them), read straight from the binary layout: no
    /// iterator of Postgres', no allocation. Empty for an array.
    pub fn members(self) -> Members<'a> {
        unsafe {
            let header = (*self.0).header;
            let n = if header & pg_sys::JB_FOBJECT == 0 {
                0
            } else {
                (header & pg_sys::JB_CMASK) as usize
            };
            let entries = std::ptr::addr_of!((*self.0).children) as *const u32;
            // The values' data follows the keys' data: walk the keys'
            // JEntries once to find where the first value starts.
            let mut keys_end = 0;
            for i in 0..n {
                keys_end = entry_end(*entries.add(i), keys_end);
            }
            Members {
                entries,
                base: entries.add(2 * n) as *const u8,
                n,
                i: 0,
                key_start: 0,
                value_start: keys_end,
                _life: PhantomData,
            }
        }
    }

    /// The raw container, for Postgres' jsonb functions.
    pub fn as_ptr(self) -> *mut pg_sys::JsonbContainer {
        self.0
    }

    /// Walks the container one level deep: `f(key, value)` for objects,
    /// `f("", element)` for arrays.
    fn walk(self, mut f: impl FnMut(&'a str, Jb<'a>)) {
        unsafe {
            let mut it = pg_sys::JsonbIteratorInit(self.0);
            let mut v: pg_sys::JsonbValue = std::mem::zeroed();
            let mut key: &'a str = "";
            loop {
                // skipNested: nested containers come back as jbvBinary, unvisited.
                match pg_sys::JsonbIteratorNext(&mut it, &mut v, true) {
                    pg_sys::JsonbIteratorToken::WJB_KEY => key = string_of(&v),
                    pg_sys::JsonbIteratorToken::WJB_VALUE => f(key, Jb::from_value(&v)),
                    pg_sys::JsonbIteratorToken::WJB_ELEM => f("", Jb::from_value(&v)),
                    pg_sys::JsonbIteratorToken::WJB_DONE => break,
                    _ => {}
                }
            }
        }
    }
}

/// `a || b` for two objects: their members merged in storage order, `b`'s
/// value winning for a key in both. What `jsonb_concat` returns, byte for
/// byte, but written straight in jsonb's binary form: the values' bytes are
/// copied as they are, where `jsonb_concat` unpacks every nested value,
/// sorts all members of both objects together and serialises the result
/// again (about a sixth of a 1,000-record merge batch's CPU).
pub fn merge_objects(a: Container<'_>, b: Container<'_>) -> JsonbDatum {
    let mut pairs = Vec::with_capacity(a.len() + b.len());
    walk_together(Some(a.members()), Some(b.members()), |x, y| {
        if let Some(m) = y.or(x) {
            pairs.push((std::borrow::Cow::Borrowed(m.key), m.stored()));
        }
    });
    crate::jsonb_text::document_datum(Node::Obj(pairs), "a merged month")
}

/// Walks two objects' members together in storage order (shorter keys
/// first, then by bytes): `f(Some(a), None)` for a key only in the first,
/// `f(None, Some(b))` for one only in the second, `f(Some(a), Some(b))` for
/// one in both. `None` stands for no object (no members).
pub fn walk_together<'a>(
    mut a: Option<Members<'a>>,
    mut b: Option<Members<'a>>,
    mut f: impl FnMut(Option<RawMember<'a>>, Option<RawMember<'a>>),
) {
    fn next<'a>(m: &mut Option<Members<'a>>) -> Option<RawMember<'a>> {
        m.as_mut().and_then(|m| m.next_raw())
    }
    let (mut x, mut y) = (next(&mut a), next(&mut b));
    loop {
        let step = match (&x, &y) {
            (Some(l), Some(r)) => (l.key.len(), l.key).cmp(&(r.key.len(), r.key)),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => break,
        };
        match step {
            std::cmp::Ordering::Less => {
                f(x, None);
                x = next(&mut a);
            }
            std::cmp::Ordering::Greater => {
                f(None, y);
                y = next(&mut b);
            }
            std::cmp::Ordering::Equal => {
                f(x, y);
                x = next(&mut a);
                y = next(&mut b);
            }
        }
    }
}

/// One jsonb value, read in place.
#[derive(Clone, Copy)]
pub enum Jb<'a> {
    Null,
    Bool(bool),
    Number(Num<'a>),
    String(&'a str),
    Array(Container<'a>),
    Object(Container<'a>),
}

unsafe fn string_of<'a>(v: &pg_sys::JsonbValue) -> &'a str {
    unsafe {
        let s = v.val.string;
        text_of(std::slice::from_raw_parts(
            s.val as *const u8,
            s.len.max(0) as usize,
        ))
    }
}

/// A jsonb string's bytes as text.
// jsonb.h: an object's header counts its pairs; the JEntries of the n keys
// and then of the n values follow it, then their data. A JEntry holds either
// its data's length or (every 32nd) its end offset; numerics and containers
// start at the next 4-byte boundary.
pub(crate) const JENTRY_OFFLEN: u32 = 0x0FFF_FFFF;
pub(crate) const JENTRY_HAS_OFF: u32 = 0x8000_0000;
pub(crate) const JENTRY_TYPE: u32 = 0x7000_0000;
pub(crate) const JENTRY_STRING: u32 = 0x0000_0000;
pub(crate) const JENTRY_NUMERIC: u32 = 0x1000_0000;
pub(crate) const JENTRY_FALSE: u32 = 0x2000_0000;
pub(crate) const JENTRY_TRUE: u32 = 0x3000_0000;
pub(crate) const JENTRY_NULL: u32 = 0x4000_0000;
pub(crate) const JENTRY_CONTAINER: u32 = 0x5000_0000;
/// Every JB_OFFSET_STRIDE-th JEntry holds its end offset instead of a length.
pub(crate) const JB_OFFSET_STRIDE: usize = 32;

/// `off` rounded up to the next 4-byte boundary.
fn aligned(off: usize) -> usize {
    (off + 3) & !3
}

/// Where the data of the JEntry `e` ends, given where it starts.
fn entry_end(e: u32, start: usize) -> usize {
    if e & JENTRY_HAS_OFF != 0 {
        (e & JENTRY_OFFLEN) as usize
    } else {
        start + (e & JENTRY_OFFLEN) as usize
    }
}

/// The members of a jsonb object, in storage order (`Container::members`).
pub struct Members<'a> {
    entries: *const u32,
    base: *const u8,
    n: usize,
    i: usize,
    key_start: usize,
    value_start: usize,
    _life: PhantomData<&'a ()>,
}

/// One member of an object as stored: the key's bytes, the value's JEntry
/// (its type bits) and the value's data (for numbers and containers, from
/// the 4-byte boundary where they start; empty for booleans and null).
#[derive(Clone, Copy)]
pub struct RawMember<'a> {
    key: &'a [u8],
    entry: u32,
    data: &'a [u8],
}

impl<'a> RawMember<'a> {
    pub fn key(&self) -> &'a str {
        text_of(self.key)
    }

    /// Whether the two members' values are stored alike (the same type and
    /// bytes): equal values written differently (`10.5`, `10.500`) are not.
    pub fn same_stored(&self, other: &RawMember<'_>) -> bool {
        self.entry & JENTRY_TYPE == other.entry & JENTRY_TYPE && self.data == other.data
    }

    /// The value, to be copied as stored into another document.
    pub(crate) fn stored(&self) -> Node<'a> {
        Node::Stored(self.entry & JENTRY_TYPE, self.data)
    }

    pub fn value(&self) -> Jb<'a> {
        match self.entry & JENTRY_TYPE {
            JENTRY_STRING => Jb::String(text_of(self.data)),
            JENTRY_NUMERIC => Jb::Number(Num(self.data.as_ptr() as pg_sys::Numeric, PhantomData)),
            JENTRY_FALSE => Jb::Bool(false),
            JENTRY_TRUE => Jb::Bool(true),
            JENTRY_CONTAINER => {
                let c = self.data.as_ptr() as *mut pg_sys::JsonbContainer;
                // SAFETY: a container's data starts with its header.
                if unsafe { (*c).header } & pg_sys::JB_FOBJECT != 0 {
                    Jb::Object(Container::nested(c, self.data.len() as i32))
                } else {
                    Jb::Array(Container::nested(c, self.data.len() as i32))
                }
            }
            _ => Jb::Null,
        }
    }
}

impl<'a> Members<'a> {
    /// The next member as stored ([`RawMember`]).
    pub fn next_raw(&mut self) -> Option<RawMember<'a>> {
        if self.i >= self.n {
            return None;
        }
        // SAFETY: entries and base point into the object this iterator was
        // made from, and every offset stays inside its data.
        unsafe {
            let ke = *self.entries.add(self.i);
            let key_end = entry_end(ke, self.key_start);
            let key =
                std::slice::from_raw_parts(self.base.add(self.key_start), key_end - self.key_start);
            let ve = *self.entries.add(self.n + self.i);
            let (vs, value_end) = (self.value_start, entry_end(ve, self.value_start));
            let start = match ve & JENTRY_TYPE {
                JENTRY_NUMERIC | JENTRY_CONTAINER => aligned(vs).min(value_end),
                _ => vs,
            };
            let data = std::slice::from_raw_parts(self.base.add(start), value_end - start);
            self.i += 1;
            self.key_start = key_end;
            self.value_start = value_end;
            Some(RawMember {
                key,
                entry: ve,
                data,
            })
        }
    }
}

impl<'a> Iterator for Members<'a> {
    type Item = (&'a str, Jb<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        self.next_raw().map(|m| (m.key(), m.value()))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.n - self.i;
        (left, Some(left))
    }
}

impl ExactSizeIterator for Members<'_> {}

fn text_of(bytes: &[u8]) -> &str {
    if server_is_utf8() {
        // Postgres checked the encoding when the text entered the server.
        unsafe { std::str::from_utf8_unchecked(bytes) }
    } else {
        // Another server encoding: anything that is not also valid UTF-8
        // shows as a replacement character (and so matches no known name).
        std::str::from_utf8(bytes).unwrap_or("\u{fffd}")
    }
}

pub(crate) fn server_is_utf8() -> bool {
    thread_local! {
        static UTF8: bool = unsafe { pg_sys::GetDatabaseEncoding() == pg_sys::pg_enc::PG_UTF8 as i32 };
    }
    UTF8.with(|u| *u)
}

impl<'a> Jb<'a> {
    unsafe fn from_value(v: &pg_sys::JsonbValue) -> Jb<'a> {
        unsafe {
            match v.type_ {
                pg_sys::jbvType::jbvBool => Jb::Bool(v.val.boolean),
                pg_sys::jbvType::jbvNumeric => Jb::Number(Num(v.val.numeric, PhantomData)),
                pg_sys::jbvType::jbvString => Jb::String(string_of(v)),
                pg_sys::jbvType::jbvBinary => {
                    let (c, len) = (v.val.binary.data, v.val.binary.len);
                    if (*c).header & pg_sys::JB_FOBJECT != 0 {
                        Jb::Object(Container::nested(c, len))
                    } else {
                        Jb::Array(Container::nested(c, len))
                    }
                }
                // jbvNull, and unpacked arrays/objects, which iteration over a
                // stored container never yields.
                _ => Jb::Null,
            }
        }
    }

    /// jsonb equality (`=` on jsonb: 1.0 equals 1), read in place. Objects
    /// keep their keys in one canonical order, so equal objects have equal
    /// members pairwise, and a nested container with the same bytes is
    /// equal without a walk (most days of an update are untouched). Arrays,
    /// which sales data does not hold, are left to Postgres' comparison.
    pub fn equals(self, other: Jb<'_>) -> bool {
        // One call per level of nesting: a document nested thousands deep
        // must end in Postgres' "stack depth limit exceeded", not overflow
        // the backend's stack.
        // SAFETY: a plain check of the stack pointer; raises an ERROR.
        unsafe { pg_sys::check_stack_depth() };
        match (self, other) {
            (Jb::Object(x), Jb::Object(y)) => {
                if let (Some(p), Some(q)) = (x.bytes(), y.bytes()) {
                    if p == q {
                        return true;
                    }
                }
                x.len() == y.len()
                    && x.members()
                        .zip(y.members())
                        .all(|((ka, va), (kb, vb))| ka == kb && va.equals(vb))
            }
            (Jb::Array(x), Jb::Array(y)) => {
                matches!((x.bytes(), y.bytes()), (Some(p), Some(q)) if p == q)
                    // SAFETY: both are containers of live jsonb datums.
                    || unsafe { pg_sys::compareJsonbContainers(x.as_ptr(), y.as_ptr()) == 0 }
            }
            (Jb::Null, Jb::Null) => true,
            (Jb::Bool(x), Jb::Bool(y)) => x == y,
            (Jb::String(x), Jb::String(y)) => x == y,
            (Jb::Number(x), Jb::Number(y)) => x.equals(y),
            _ => false,
        }
    }

    /// Calls `f(index, element)` for each element of an array.
    pub fn each_element(self, mut f: impl FnMut(usize, Jb<'a>)) {
        if let Jb::Array(c) = self {
            let mut i = 0;
            c.walk(|_, v| {
                f(i, v);
                i += 1;
            });
        }
    }

    /// The member `key` of an object (binary search, as jsonb's `->`).
    pub fn get(self, key: &str) -> Option<Jb<'a>> {
        let Jb::Object(c) = self else { return None };
        unsafe {
            let mut k: pg_sys::JsonbValue = std::mem::zeroed();
            k.type_ = pg_sys::jbvType::jbvString;
            k.val.string.val = key.as_ptr() as *mut std::ffi::c_char;
            k.val.string.len = key.len() as i32;
            let found = pg_sys::findJsonbValueFromContainer(c.0, pg_sys::JB_FOBJECT, &mut k);
            if found.is_null() {
                None
            } else {
                Some(Jb::from_value(&*found))
            }
        }
    }
}

impl<'a> JsonRead<'a> for Jb<'a> {
    fn kind(self) -> Kind {
        match self {
            Jb::Null => Kind::Null,
            Jb::Bool(_) => Kind::Bool,
            Jb::Number(_) => Kind::Number,
            Jb::String(_) => Kind::String,
            Jb::Array(_) => Kind::Array,
            Jb::Object(_) => Kind::Object,
        }
    }

    fn as_f64(self) -> Option<f64> {
        match self {
            Jb::Number(n) => Some(n.decode().to_f64()),
            _ => None,
        }
    }

    fn number_class(self) -> Option<NumberClass> {
        match self {
            Jb::Number(n) => Some(n.class()),
            _ => None,
        }
    }

    fn as_i64(self) -> Option<i64> {
        match self {
            Jb::Number(n) => n.decode().to_i64(),
            _ => None,
        }
    }

    fn as_str(self) -> Option<&'a str> {
        match self {
            Jb::String(s) => Some(s),
            _ => None,
        }
    }

    fn len(self) -> usize {
        match self {
            Jb::Array(c) | Jb::Object(c) => c.len(),
            _ => 0,
        }
    }

    fn each_member(self, mut f: impl FnMut(&'a str, Self)) {
        if let Jb::Object(c) = self {
            for (k, v) in c.members() {
                f(k, v);
            }
        }
    }
}

/// A `numeric` inside a jsonb datum.
#[derive(Clone, Copy)]
pub struct Num<'a>(pg_sys::Numeric, PhantomData<&'a ()>);

impl<'a> Num<'a> {
    /// Exact numeric equality (numeric_eq: 1.0 equals 1).
    pub fn equals(self, other: Num<'_>) -> bool {
        unsafe {
            // The same bytes are the same number; only different encodings
            // of a value (1.0 and 1) need Postgres' comparison.
            if same_bytes(self.0 as *const _, other.0 as *const _) {
                return true;
            }
            pgrx::direct_function_call::<bool>(
                pg_sys::numeric_eq,
                &[
                    Some(pg_sys::Datum::from(self.0)),
                    Some(pg_sys::Datum::from(other.0)),
                ],
            )
            .unwrap_or(false)
        }
    }

    pub fn decode(self) -> Decoded {
        let (n_words, word) = self.words();
        Decoded::from_words(n_words, word)
    }

    /// The value, when it is an integer written with a scale (`2.0`,
    /// `2.50e1`; `int8_numeric` would store it without one) that fits an
    /// `i64`. None for any other number.
    pub fn scaled_integer(self) -> Option<i64> {
        // Most numbers have no scale: told by the header alone.
        let (n_words, word) = self.words();
        if Header::from_words(n_words, word).ok()?.dscale == 0 {
            return None;
        }
        let mut d = self.decode();
        // Whole: no base-10000 digit after the point (trailing zero digits
        // are stripped), which `to_i64` checks once the scale is gone.
        d.dscale = 0;
        d.to_i64()
    }

    /// What the metric rules ask of a number, decided exactly from its
    /// digits (no `f64` rounding).
    pub fn class(self) -> NumberClass {
        let (n_words, word) = self.words();
        match Header::from_words(n_words, word) {
            Ok(h) => h.class(word),
            Err(_) => NumberClass::SPECIAL,
        }
    }

    /// The number of 16-bit words after the varlena header, and a reader of
    /// word `i` (`i` below that number).
    fn words(self) -> (usize, impl Fn(usize) -> u16 + Copy + 'a) {
        // SAFETY: a numeric datum inside a jsonb value that lives for 'a.
        unsafe {
            let ptr = self.0 as *const pg_sys::varlena;
            let len = pgrx::varlena::varsize_any_exhdr(ptr);
            let data = pgrx::varlena::vardata_any(ptr) as *const u8;
            let word = move |i: usize| -> u16 { (data.add(2 * i) as *const u16).read_unaligned() };
            (len / 2, word)
        }
    }
}
