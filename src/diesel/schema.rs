//! Diesel's `table!` definitions from the database's catalog: the migrations stay the one
//! schema, and `schema.rs` is checked against what they built.

use std::fmt::Write as _;

use crate::Error;

/// Rust keywords a column or table cannot be named as in `table!` (Diesel's print-schema
/// renames them `name_` with `#[sql_name = "name"]`).
const KEYWORDS: &[&str] = &[
    "as", "async", "await", "break", "const", "continue", "crate", "dyn", "else", "enum", "extern",
    "false", "fn", "for", "if", "impl", "in", "let", "loop", "match", "mod", "move", "mut", "pub",
    "ref", "return", "self", "Self", "static", "struct", "super", "trait", "true", "type",
    "unsafe", "use", "where", "while", "abstract", "become", "box", "do", "final", "macro",
    "override", "priv", "typeof", "unsized", "virtual", "yield", "try", "gen",
];

/// The Diesel SQL type of a PostgreSQL base type, by `pg_type.typname`.
fn diesel_type(typname: &str) -> Option<&'static str> {
    Some(match typname {
        "bool" => "Bool",
        "int2" => "Int2",
        "int4" => "Int4",
        "int8" => "Int8",
        "float4" => "Float4",
        "float8" => "Float8",
        "numeric" => "Numeric",
        "text" => "Text",
        "varchar" => "Varchar",
        "bpchar" => "Bpchar",
        "char" => "CChar",
        "name" => "Text",
        "bytea" => "Bytea",
        "uuid" => "Uuid",
        "date" => "Date",
        "time" => "Time",
        "timetz" => "Timetz",
        "timestamp" => "Timestamp",
        "timestamptz" => "Timestamptz",
        "interval" => "Interval",
        "json" => "Json",
        "jsonb" => "Jsonb",
        "inet" => "Inet",
        "cidr" => "Cidr",
        "macaddr" => "MacAddr",
        "money" => "Money",
        "oid" => "Oid",
        "bit" => "Bit",
        "varbit" => "Varbit",
        _ => return None,
    })
}

/// A name as `table!` spells it: `(attribute, name)`. A keyword gets a `_` after it; a name
/// that is not a Rust identifier (`first name`, `1x`) gets its characters outside
/// `[A-Za-z0-9_]` replaced by `_` (and a `_` before a leading digit); both keep the real name
/// in `#[sql_name]`.
fn rust_name(name: &str) -> (Option<String>, String) {
    let identifier = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if KEYWORDS.contains(&name) {
        (
            Some(format!("#[sql_name = \"{name}\"]")),
            format!("{name}_"),
        )
    } else if identifier {
        (None, name.to_owned())
    } else {
        let mut spelt: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        if !spelt.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
            spelt.insert(0, '_');
        }
        let escaped = name.replace('\\', "\\\\").replace('"', "\\\"");
        (Some(format!("#[sql_name = \"{escaped}\"]")), spelt)
    }
}

/// Writes Diesel's `table!` definitions (and `allow_tables_to_appear_in_same_query!`) for
/// every table of `schema`, from the catalog, as `diesel print-schema` would: columns in
/// their order, `Nullable<…>` where a column allows NULL, `#[max_length = n]` on sized
/// character and bit types, arrays as `Array<…>`, the primary key as the table's key, tables
/// sorted by name, the migration runner's own history tables (`dsql_migrations` and its
/// `_lock`, the default names) left out. A column of a domain type is written as the
/// domain's base type (NOT NULL if the domain is). Run it against the emulator after the
/// migrations (`migrate up`), check the result in as `schema.rs`, and keep it honest with
/// [`check_schema`]. No `joinable!` lines are written (foreign keys are not read): add the
/// ones your joins need by hand.
///
/// A type Diesel has no name for is written as its PostgreSQL name in PascalCase with a
/// comment above it (define it with `#[derive(diesel::sql_types::SqlType)]`). A table
/// without a primary key is skipped with a comment: `table!` needs one.
pub async fn print_schema(client: &tokio_postgres::Client, schema: &str) -> Result<String, Error> {
    let rows = client
        .query(
            "SELECT c.relname::text, a.attname::text, t.typname::text, \
                    coalesce(e.typname::text, ''), \
                    CASE WHEN d.oid IS NULL THEN a.atttypmod ELSE d.typtypmod END, \
                    a.attnotnull OR coalesce(d.typnotnull, false), \
                    coalesce((SELECT array_position(i.indkey::int2[], a.attnum) \
                                     - array_lower(i.indkey::int2[], 1) + 1 \
                              FROM pg_catalog.pg_index i \
                              WHERE i.indrelid = c.oid AND i.indisprimary), 0) \
             FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid \
                  AND a.attnum > 0 AND NOT a.attisdropped \
             LEFT JOIN pg_catalog.pg_type d ON d.oid = a.atttypid AND d.typtype = 'd' \
             JOIN pg_catalog.pg_type t ON t.oid = coalesce(d.typbasetype, a.atttypid) \
             LEFT JOIN pg_catalog.pg_type e ON e.oid = t.typelem AND t.typcategory = 'A' \
             WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') \
                   AND c.relname NOT IN ('dsql_migrations', 'dsql_migrations_lock') \
             ORDER BY c.relname, a.attnum",
            &[&schema],
        )
        .await?;
    struct Column {
        name: String,
        typname: String,
        element: String,
        typmod: i32,
        not_null: bool,
        key: i32,
    }
    let mut tables: Vec<(String, Vec<Column>)> = Vec::new();
    for row in rows {
        let table: String = row.get(0);
        let column = Column {
            name: row.get(1),
            typname: row.get(2),
            element: row.get(3),
            typmod: row.get(4),
            not_null: row.get(5),
            key: row.get(6),
        };
        match tables.last_mut() {
            Some((name, columns)) if *name == table => columns.push(column),
            _ => tables.push((table, vec![column])),
        }
    }
    let mut out = String::from(
        "// @generated by tokio_postgres_dsql::diesel::print_schema from the database's catalog.\n",
    );
    let mut printed = Vec::new();
    for (table, columns) in &tables {
        let mut key: Vec<&Column> = columns.iter().filter(|c| c.key > 0).collect();
        key.sort_by_key(|c| c.key);
        out.push('\n');
        if key.is_empty() {
            let _ = writeln!(
                out,
                "// Table `{table}` has no primary key: diesel's table! needs one."
            );
            continue;
        }
        let (table_attribute, table_name) = rust_name(table);
        let qualified = if schema == "public" {
            table_name.clone()
        } else {
            format!("{schema}.{table_name}")
        };
        let key: Vec<String> = key.iter().map(|c| rust_name(&c.name).1).collect();
        out.push_str("diesel::table! {\n");
        if let Some(attribute) = table_attribute {
            let _ = writeln!(out, "    {attribute}");
        }
        let _ = writeln!(out, "    {qualified} ({}) {{", key.join(", "));
        for column in columns {
            let (attribute, name) = rust_name(&column.name);
            let array = !column.element.is_empty();
            let base = if array {
                &column.element
            } else {
                &column.typname
            };
            let sql_type = match diesel_type(base) {
                Some(known) => known.to_owned(),
                None => {
                    let _ = writeln!(
                        out,
                        "        // `{base}` has no Diesel type: define `{}` as a SqlType.",
                        pascal(base)
                    );
                    pascal(base)
                }
            };
            if let Some(attribute) = attribute {
                let _ = writeln!(out, "        {attribute}");
            }
            if matches!(base.as_str(), "varchar" | "bpchar" | "bit" | "varbit") && !array {
                let length = match base.as_str() {
                    "bit" | "varbit" => column.typmod,
                    _ => column.typmod - 4,
                };
                if length > 0 {
                    let _ = writeln!(out, "        #[max_length = {length}]");
                }
            }
            let mut sql_type = if array {
                format!("Array<Nullable<{sql_type}>>")
            } else {
                sql_type
            };
            if !column.not_null {
                sql_type = format!("Nullable<{sql_type}>");
            }
            let _ = writeln!(out, "        {name} -> {sql_type},");
        }
        out.push_str("    }\n}\n");
        printed.push(table_name);
    }
    if printed.len() > 1 {
        let _ = write!(
            out,
            "\ndiesel::allow_tables_to_appear_in_same_query!({},);\n",
            printed.join(", ")
        );
    }
    Ok(out)
}

fn pascal(name: &str) -> String {
    name.split('_')
        .map(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .map(|first| first.to_uppercase().chain(chars).collect::<String>())
                .unwrap_or_default()
        })
        .collect()
}

/// Why [`check_schema`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SchemaMismatch {
    /// The catalog could not be read.
    #[error("could not read the database's schema")]
    Query(#[source] Error),
    /// The checked-in schema and the database disagree.
    #[error(
        "schema.rs and the database disagree at table `{table}`{}: schema.rs has `{expected}`, \
         the database gives `{actual}` (regenerate it with print_schema)",
        column.as_ref().map(|c| format!(", column `{c}`")).unwrap_or_default()
    )]
    Differs {
        /// The table where they first differ.
        table: String,
        /// The column, when the difference is in one.
        column: Option<String>,
        /// schema.rs's line (`(end)` when its table ends first, the table's name when the
        /// database lacks the table, `(no such table)` when schema.rs does).
        expected: String,
        /// The line [`print_schema`] writes there (likewise `(end)`, the table's name, or
        /// `(no such table)`).
        actual: String,
    },
}

/// Checks `expected` (a `schema.rs`'s text, e.g. `include_str!("schema.rs")`) against what
/// [`print_schema`] writes for `schema` now, ignoring blank lines, comments, indentation and
/// the order of tables, and names the first table and column where they differ (or the table
/// only one side has). Run it in a test, on the emulator
/// after the migrations: the migrations stay the one schema.
pub async fn check_schema(
    client: &tokio_postgres::Client,
    schema: &str,
    expected: &str,
) -> Result<(), SchemaMismatch> {
    let actual = print_schema(client, schema)
        .await
        .map_err(SchemaMismatch::Query)?;
    match first_difference(expected, &actual) {
        None => Ok(()),
        Some(differs) => Err(differs),
    }
}

fn significant(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with("//"))
        .collect()
}

/// The table a line opens (`name (key) {`), if it opens one.
fn opens_table(line: &str) -> Option<&str> {
    let (name, rest) = line.split_once(' ')?;
    (rest.starts_with('(') && line.ends_with('{')).then_some(name)
}

/// The column a line declares (`name -> Type,`), if it declares one.
fn declares_column(line: &str) -> Option<&str> {
    line.split_once(" -> ").map(|(name, _)| name)
}

/// One top-level item of a schema (a `table!`, `allow_tables_to_appear_in_same_query!`, a
/// `sql_types` module): its key (the table's name, or the item's first line) and its lines.
struct Item<'a> {
    table: Option<&'a str>,
    lines: Vec<&'a str>,
}

impl Item<'_> {
    fn key(&self) -> &str {
        self.table.unwrap_or(self.lines[0])
    }
}

/// Splits significant lines into top-level items by brace depth.
fn items<'a>(lines: &[&'a str]) -> Vec<Item<'a>> {
    let mut items: Vec<Item<'a>> = Vec::new();
    let mut depth = 0usize;
    for &line in lines {
        if depth == 0 {
            items.push(Item {
                table: None,
                lines: Vec::new(),
            });
        }
        let item = items.last_mut().expect("pushed above");
        item.lines.push(line);
        if item.table.is_none() && depth == 1 {
            item.table = opens_table(line);
        }
        let opened = line.matches('{').count();
        let closed = line.matches('}').count();
        depth = (depth + opened).saturating_sub(closed);
    }
    items
}

fn first_difference(expected: &str, actual: &str) -> Option<SchemaMismatch> {
    let (expected, actual) = (significant(expected), significant(actual));
    let (expected, actual) = (items(&expected), items(&actual));
    let find = |items: &[Item<'_>], key: &str| items.iter().position(|i| i.key() == key);
    const ABSENT: &str = "(no such table)";
    for item in &actual {
        let table = item.table.unwrap_or("(outside the tables)").to_owned();
        let Some(index) = find(&expected, item.key()) else {
            return Some(SchemaMismatch::Differs {
                table,
                column: None,
                expected: ABSENT.to_owned(),
                actual: item.table.map_or(item.lines[0], |t| t).to_owned(),
            });
        };
        let theirs = &expected[index].lines;
        for line in 0..theirs.len().max(item.lines.len()) {
            let (e, a) = (theirs.get(line), item.lines.get(line));
            if e == a {
                continue;
            }
            let column = e
                .and_then(|line| declares_column(line))
                .or_else(|| a.and_then(|line| declares_column(line)))
                .map(str::to_owned);
            return Some(SchemaMismatch::Differs {
                table,
                column,
                expected: e.copied().unwrap_or("(end)").to_owned(),
                actual: a.copied().unwrap_or("(end)").to_owned(),
            });
        }
    }
    expected
        .iter()
        .find(|item| find(&actual, item.key()).is_none())
        .map(|item| SchemaMismatch::Differs {
            table: item.table.unwrap_or("(outside the tables)").to_owned(),
            column: None,
            expected: item.table.map_or(item.lines[0], |t| t).to_owned(),
            actual: ABSENT.to_owned(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: &str = "\
// @generated
diesel::table! {
    notes (id) {
        id -> Uuid,
        likes -> Int8,
    }
}

diesel::table! {
    users (id) {
        id -> Uuid,
        #[max_length = 80]
        name -> Varchar,
    }
}
";

    #[test]
    fn the_first_difference_names_its_table_and_column() {
        assert!(first_difference(SCHEMA, SCHEMA).is_none());
        // Indentation, blank lines and comments do not count.
        let reformatted: String = SCHEMA
            .lines()
            .map(|l| format!("{}\n\n// note\n", l.trim()))
            .collect();
        assert!(first_difference(&reformatted, SCHEMA).is_none());

        let changed = SCHEMA.replace("likes -> Int8", "likes -> Int4");
        let message = first_difference(&changed, SCHEMA).unwrap().to_string();
        assert!(message.contains("table `notes`"), "{message}");
        assert!(message.contains("column `likes`"), "{message}");
        assert!(message.contains("`likes -> Int4,`"), "{message}");
        assert!(message.contains("`likes -> Int8,`"), "{message}");

        let missing = SCHEMA.replace("        #[max_length = 80]\n", "");
        let Some(SchemaMismatch::Differs { table, column, .. }) =
            first_difference(&missing, SCHEMA)
        else {
            panic!("no difference found");
        };
        assert_eq!(table, "users");
        assert_eq!(column.as_deref(), Some("name"));

        // A table only one side has is named, whichever side and wherever it sorts.
        let shorter = SCHEMA.split("diesel::table! {\n    users").next().unwrap();
        let Some(SchemaMismatch::Differs {
            table,
            column,
            expected,
            actual,
        }) = first_difference(shorter, SCHEMA)
        else {
            panic!("no difference found");
        };
        assert_eq!((table.as_str(), column), ("users", None));
        assert_eq!(expected, "(no such table)");
        assert_eq!(actual, "users");
        let first =
            format!("diesel::table! {{\n    a (id) {{\n        id -> Int8,\n    }}\n}}\n{SCHEMA}");
        let Some(SchemaMismatch::Differs { table, actual, .. }) = first_difference(SCHEMA, &first)
        else {
            panic!("no difference found");
        };
        assert_eq!((table.as_str(), actual.as_str()), ("a", "a"));
        let Some(SchemaMismatch::Differs {
            table, expected, ..
        }) = first_difference(&first, SCHEMA)
        else {
            panic!("no difference found");
        };
        assert_eq!((table.as_str(), expected.as_str()), ("a", "a"));
        // Tables in another order agree.
        let (head, users) = SCHEMA.split_at(SCHEMA.find("diesel::table! {\n    users").unwrap());
        let swapped = format!("{users}\n{}", head.replace("// @generated", ""));
        assert!(first_difference(&swapped, SCHEMA).is_none());
    }

    #[test]
    fn keywords_and_unknown_types_are_spelt_as_diesel_does() {
        assert_eq!(
            rust_name("type"),
            (Some("#[sql_name = \"type\"]".into()), "type_".into())
        );
        assert_eq!(rust_name("likes"), (None, "likes".into()));
        assert_eq!(
            rust_name("first name"),
            (
                Some("#[sql_name = \"first name\"]".into()),
                "first_name".into()
            )
        );
        assert_eq!(
            rust_name("1x"),
            (Some("#[sql_name = \"1x\"]".into()), "_1x".into())
        );
        assert_eq!(
            rust_name("a\"b"),
            (Some("#[sql_name = \"a\\\"b\"]".into()), "a_b".into())
        );
        assert_eq!(pascal("my_enum"), "MyEnum");
        assert_eq!(diesel_type("timestamptz"), Some("Timestamptz"));
        assert_eq!(diesel_type("my_enum"), None);
    }
}
