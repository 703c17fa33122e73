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
