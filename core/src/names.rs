//! Field names arrive as camelCase (`storeId`) or snake_case (`store_id`).

/// `store_id` -> `storeId`; camelCase input is returned unchanged.
pub fn to_camel(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut upper = false;
    for c in name.chars() {
        if c == '_' {
            upper = !out.is_empty();
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// The camelCase form of a name given as exactly its camelCase form
/// (`storeId`) or exactly its snake_case form (`store_id`); None for any
/// other spelling that [`to_camel`] would fold into a name (`_store_id`,
/// `store__id`, `store_Id`, `year_`), as a record's member is judged.
pub fn camel_of(name: &str) -> Option<String> {
    let camel = to_camel(name);
    (camel == name || to_snake(&camel) == name).then_some(camel)
}

/// `storeId` -> `store_id`.
pub fn to_snake(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for c in name.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Characters that show as nothing: Unicode's Default_Ignorable_Code_Point
/// set (zero-width spaces and joiners, direction marks, the soft hyphen,
/// the byte order mark, the shorthand format controls...), the other
/// format controls that draw nothing by themselves (interlinear
/// annotation marks, Egyptian hieroglyph format controls), and the blank
/// Hangul fillers and Braille pattern: an address holding one looks like
/// another user's.
pub fn invisible(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}'
        | '\u{180B}'..='\u{180F}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{206F}' | '\u{2800}' | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}'
        | '\u{FFA0}' | '\u{FFF0}'..='\u{FFFB}' | '\u{13430}'..='\u{1343F}'
        | '\u{1BCA0}'..='\u{1BCA3}' | '\u{1D173}'..='\u{1D17A}'
        | '\u{E0000}'..='\u{E0FFF}')
}

/// A character no store name or region holds: a control (C0, DEL, C1),
/// a line or paragraph separator, or a bidirectional embedding, override
/// or isolate control (U+202A..U+202E, U+2066..U+2069), which makes what
/// follows it on a line read in another direction (a name holding U+202E
/// showed the figures after it reversed in a list).
pub fn breaks_text(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Whether a reader sees nothing of `s`: blanks and characters that show
/// as nothing (a zero-width space) only.
pub fn shows_nothing(s: &str) -> bool {
    s.chars().all(|c| c.is_whitespace() || invisible(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn camel_and_snake() {
        assert_eq!(to_camel("store_id"), "storeId");
        assert_eq!(to_camel("storeId"), "storeId");
        assert_eq!(to_camel("daily_data"), "dailyData");
        assert_eq!(to_camel("id"), "id");
        assert_eq!(to_snake("dailyData"), "daily_data");
        assert_eq!(to_snake("id"), "id");
        for (given, camel) in [
            ("storeId", "storeId"),
            ("store_id", "storeId"),
            ("id", "id"),
            ("total_sales", "totalSales"),
            ("previous_year", "previousYear"),
        ] {
            assert_eq!(camel_of(given).as_deref(), Some(camel), "{given}");
        }
        for bent in [
            "_store_id",
            "store__id",
            "store_Id",
            "year_",
            "_",
            "total_Sales",
        ] {
            assert_eq!(camel_of(bent), None, "{bent}");
        }
    }
}
