//! How `quotad admin` prints answers. Every answer is turned into one model, records of named fields,
//! and printed from it as an aligned table, CSV or JSON, so the three formats always carry the same
//! facts. Pure functions of their input: the exact text is tested here.
//!
//! Table and CSV are for people and spreadsheets: amounts in messages with 3 decimals (`12.500`),
//! times in RFC 3339, enum values without their prefix (`ok`, `tenant_pool`). JSON is for programs:
//! the proto field names and raw values (`allocated_milli: 12500`, `STATE_OK`).

use std::{
    fmt::Write as _,
    time::{Duration, UNIX_EPOCH},
};

use clap::ValueEnum;
use serde_json::{Map, Value as Json};
use tonic::Code;

const MILLI_PER_MESSAGE: u64 = 1_000;
/// Columns of a table are separated by this many spaces.
const COLUMN_GAP: usize = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns with a header; a single record as `field  value` lines.
    Table,
    /// A header row, then one row per record; RFC 4180 quoting.
    Csv,
    /// An object for a single record, an array of objects for a list (one object per line for a watch).
    Json,
}

/// One field's value, typed so that each format can print it its own way.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Text(String),
    /// A count, percentage or version.
    Number(u64),
    /// Thousandths of a message.
    Milli(u64),
    Flag(bool),
    /// Unix milliseconds; 0 means none.
    UnixMs(u64),
    /// A proto enum value by its full name (`STATE_OK`), and the prefix that tables leave out.
    Enum {
        name: &'static str,
        prefix: &'static str,
    },
    /// Nested records, such as the draws of a hold: one cell in a table, an array in JSON.
    List(Vec<Record>),
    /// Several texts, such as ids: one cell in a table, separated by spaces; an array in JSON.
    Texts(Vec<String>),
    /// A nested message, such as a balance: flattened into `name.field` columns in a table.
    Record(Record),
}

#[derive(Debug, Clone, PartialEq)]
struct Field {
    name: &'static str,
    value: Value,
    /// Printed in JSON only: detail too wide for a table row.
    json_only: bool,
}

/// Named fields in the order they are printed; names are the proto field names.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Record {
    fields: Vec<Field>,
}

impl Record {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with(mut self, name: &'static str, value: Value) -> Self {
        self.fields.push(Field { name, value, json_only: false });
        self
    }

    /// A field that JSON carries but tables and CSV leave out.
    pub fn with_json_only(mut self, name: &'static str, value: Value) -> Self {
        self.fields.push(Field { name, value, json_only: true });
        self
    }

    /// The table and CSV columns: headers and cell text, nested records flattened.
    fn cells(&self) -> Vec<Cell> {
        let mut cells = Vec::with_capacity(self.fields.len());
        for field in self.fields.iter().filter(|field| !field.json_only) {
            match &field.value {
                Value::Record(inner) => cells.extend(
                    inner
                        .cells()
                        .into_iter()
                        .map(|cell| Cell { header: format!("{}.{}", field.name, cell.header), ..cell }),
                ),
                value => cells.push(Cell {
                    header: header(field.name, value).to_owned(),
                    text: cell_text(value),
                    right_aligned: matches!(value, Value::Number(_) | Value::Milli(_)),
                }),
            }
        }
        cells
    }

    pub fn to_json(&self) -> Json {
        let object: Map<String, Json> =
            self.fields.iter().map(|field| (field.name.to_owned(), json(&field.value))).collect();
        Json::Object(object)
    }
}

struct Cell {
    header: String,
    text: String,
    right_aligned: bool,
}

/// What a command prints.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// One message: `field  value` lines in a table, one CSV row, one JSON object.
    Record(Record),
    /// A list: table rows, CSV rows, a JSON array. `template` is any record of the row type (a default
    /// one will do), so that an empty list still prints its header.
    Rows { template: Record, rows: Vec<Record> },
}

impl Output {
    pub fn render(&self, format: Format) -> String {
        match (self, format) {
            (Output::Record(record), Format::Table) => record_table(record),
            (Output::Record(record), Format::Csv) => rows_csv(record, std::slice::from_ref(record)),
            (Output::Record(record), Format::Json) => pretty(&record.to_json()),
            (Output::Rows { template, rows }, Format::Table) => rows_table(template, rows),
            (Output::Rows { template, rows }, Format::Csv) => rows_csv(template, rows),
            (Output::Rows { rows, .. }, Format::Json) => {
                pretty(&Json::Array(rows.iter().map(Record::to_json).collect()))
            }
        }
    }
}

/// Prints rows one at a time as they arrive (a watch), each as one line: table rows are padded to the
/// header's widths, since later rows cannot be known in advance; JSON is one object per line.
pub struct RowStream {
    format: Format,
    widths: Vec<usize>,
}

impl RowStream {
    pub fn new(format: Format, template: &Record) -> Self {
        let widths = template.cells().iter().map(|cell| width(&cell.header)).collect();
        Self { format, widths }
    }

    /// The header line, if the format has one.
    pub fn header(&self, template: &Record) -> Option<String> {
        let headers: Vec<String> = template.cells().into_iter().map(|cell| cell.header).collect();
        match self.format {
            Format::Table => Some(padded_line(&headers, &self.widths, &vec![false; headers.len()])),
            Format::Csv => Some(csv_line(&headers)),
            Format::Json => None,
        }
    }

    pub fn row(&self, record: &Record) -> String {
        match self.format {
            Format::Table => {
                let cells = record.cells();
                let texts: Vec<String> = cells.iter().map(|cell| cell.text.clone()).collect();
                let right: Vec<bool> = cells.iter().map(|cell| cell.right_aligned).collect();
                padded_line(&texts, &self.widths, &right)
            }
            Format::Csv => csv_line(&record.cells().into_iter().map(|cell| cell.text).collect::<Vec<_>>()),
            Format::Json => {
                let mut line = record.to_json().to_string();
                line.push('\n');
                line
            }
        }
    }
}

/// Milli as messages with exactly 3 decimals: `12500` → `12.500`. `u64::MAX` is what the server
/// reports as available under pay-as-you-go without a budget: `unlimited`.
pub fn messages(milli: u64) -> String {
    if milli == u64::MAX {
        return "unlimited".to_owned();
    }
    format!("{}.{:03}", milli / MILLI_PER_MESSAGE, milli % MILLI_PER_MESSAGE)
}

/// The canonical gRPC name of a status code (`NOT_FOUND`), as other gRPC tools print it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The table and CSV header of a field: the unit suffix goes, since the cell is no longer in that unit.
fn header<'a>(name: &'a str, value: &Value) -> &'a str {
    match value {
        Value::Milli(_) => name.strip_suffix("_milli").unwrap_or(name),
        Value::UnixMs(_) => name.strip_suffix("_unix_ms").unwrap_or(name),
        _ => name,
    }
}

fn cell_text(value: &Value) -> String {
    match value {
        Value::Text(text) => text.clone(),
        Value::Number(number) => number.to_string(),
        Value::Milli(milli) => messages(*milli),
        Value::Flag(flag) => flag.to_string(),
        Value::UnixMs(0) => String::new(),
        Value::UnixMs(ms) => humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(*ms)).to_string(),
        Value::Enum { name, prefix } => name.strip_prefix(prefix).unwrap_or(name).to_ascii_lowercase(),
        // `environment_allocation:4.000 tenant_pool:1.000`: each item's cells joined by `:`.
        Value::List(items) => items
            .iter()
            .map(|item| item.cells().into_iter().map(|cell| cell.text).collect::<Vec<_>>().join(":"))
            .collect::<Vec<_>>()
            .join(" "),
        Value::Record(record) => record.cells().into_iter().map(|cell| cell.text).collect::<Vec<_>>().join(":"),
        Value::Texts(texts) => texts.join(" "),
    }
}

fn json(value: &Value) -> Json {
    match value {
        Value::Text(text) => Json::from(text.as_str()),
        Value::Number(number) | Value::Milli(number) | Value::UnixMs(number) => Json::from(*number),
        Value::Flag(flag) => Json::from(*flag),
        Value::Enum { name, .. } => Json::from(*name),
        Value::List(items) => Json::Array(items.iter().map(Record::to_json).collect()),
        Value::Record(record) => record.to_json(),
        Value::Texts(texts) => Json::Array(texts.iter().map(|text| Json::from(text.as_str())).collect()),
    }
}

fn pretty(json: &Json) -> String {
    let mut text = serde_json::to_string_pretty(json).expect("a JSON value always serializes");
    text.push('\n');
    text
}

/// Characters, not bytes, so that ids with non-ASCII text still line up.
fn width(text: &str) -> usize {
    text.chars().count()
}

/// `field  value` lines, the names padded to the longest.
fn record_table(record: &Record) -> String {
    let cells = record.cells();
    let name_width = cells.iter().map(|cell| width(&cell.header)).max().unwrap_or(0);
    let mut text = String::new();
    for cell in cells {
        let line = format!("{:<name_width$}{:gap$}{}", cell.header, "", cell.text, gap = COLUMN_GAP);
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

fn rows_table(template: &Record, rows: &[Record]) -> String {
    let headers: Vec<String> = template.cells().into_iter().map(|cell| cell.header).collect();
    let body: Vec<Vec<Cell>> = rows.iter().map(Record::cells).collect();
    let mut widths: Vec<usize> = headers.iter().map(|header| width(header)).collect();
    for row in &body {
        for (column, cell) in row.iter().enumerate() {
            if let Some(column_width) = widths.get_mut(column) {
                *column_width = (*column_width).max(width(&cell.text));
            }
        }
    }
    let right: Vec<bool> = template.cells().iter().map(|cell| cell.right_aligned).collect();
    let mut text = padded_line(&headers, &widths, &vec![false; headers.len()]);
    for row in body {
        let texts: Vec<String> = row.into_iter().map(|cell| cell.text).collect();
        text.push_str(&padded_line(&texts, &widths, &right));
    }
    text
}

/// One table line ending in a newline, without trailing spaces.
fn padded_line(texts: &[String], widths: &[usize], right_aligned: &[bool]) -> String {
    let mut line = String::new();
    for (column, text) in texts.iter().enumerate() {
        if column > 0 {
            line.push_str(&" ".repeat(COLUMN_GAP));
        }
        let column_width = widths.get(column).copied().unwrap_or(0);
        if right_aligned.get(column).copied().unwrap_or(false) {
            let _ = write!(line, "{text:>column_width$}");
        } else {
            let _ = write!(line, "{text:<column_width$}");
        }
    }
    let mut line = line.trim_end().to_owned();
    line.push('\n');
    line
}

fn rows_csv(template: &Record, rows: &[Record]) -> String {
    let headers: Vec<String> = template.cells().into_iter().map(|cell| cell.header).collect();
    let mut text = csv_line(&headers);
    for row in rows {
        text.push_str(&csv_line(&row.cells().into_iter().map(|cell| cell.text).collect::<Vec<_>>()));
    }
    text
}

/// One CSV record: fields with a comma, quote or line break are quoted, quotes doubled (RFC 4180).
fn csv_line(fields: &[String]) -> String {
    let quoted: Vec<String> = fields
        .iter()
        .map(|field| {
            if field.contains([',', '"', '\n', '\r']) {
                format!("\"{}\"", field.replace('"', "\"\""))
            } else {
                field.clone()
            }
        })
        .collect();
    let mut line = quoted.join(",");
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draw(source: &'static str, milli: u64) -> Record {
        Record::new()
            .with("source", Value::Enum { name: source, prefix: "SOURCE_" })
            .with("amount_milli", Value::Milli(milli))
    }

    fn hold(id: &str, milli: u64, draws: Vec<Record>) -> Record {
        Record::new()
            .with("reservation_id", Value::Text(id.to_owned()))
            .with("reserved_milli", Value::Milli(milli))
            .with("draws", Value::List(draws))
            .with("expires_at_unix_ms", Value::UnixMs(1_794_744_060_000))
    }

    #[test]
    fn milli_print_as_messages_with_three_decimals() {
        assert_eq!(messages(0), "0.000");
        assert_eq!(messages(1), "0.001");
        assert_eq!(messages(12_500), "12.500");
        assert_eq!(messages(25_000_000), "25000.000");
        assert_eq!(messages(u64::MAX - 1), "18446744073709551.614");
        assert_eq!(messages(u64::MAX), "unlimited");
    }

    #[test]
    fn code_names_are_the_canonical_ones() {
        assert_eq!(code_name(Code::NotFound), "NOT_FOUND");
        assert_eq!(code_name(Code::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(code_name(Code::Unimplemented), "UNIMPLEMENTED");
        assert_eq!(code_name(Code::Unauthenticated), "UNAUTHENTICATED");
    }

    #[test]
    fn a_record_prints_as_aligned_lines_one_csv_row_and_an_object() {
        let balance = Record::new()
            .with("environment_id", Value::Text("acme-prod".into()))
            .with("allocated_milli", Value::Milli(12_500))
            .with("payg_enabled", Value::Flag(true))
            .with("state", Value::Enum { name: "STATE_LOW", prefix: "STATE_" })
            .with("period", Value::Text(String::new()));
        let output = Output::Record(balance);
        assert_eq!(
            output.render(Format::Table),
            "environment_id  acme-prod\nallocated       12.500\npayg_enabled    true\nstate           low\nperiod\n"
        );
        assert_eq!(
            output.render(Format::Csv),
            "environment_id,allocated,payg_enabled,state,period\nacme-prod,12.500,true,low,\n"
        );
        let json: Json = serde_json::from_str(&output.render(Format::Json)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "environment_id": "acme-prod", "allocated_milli": 12500, "payg_enabled": true,
                "state": "STATE_LOW", "period": ""
            })
        );
    }

    #[test]
    fn rows_align_under_their_header_with_amounts_to_the_right() {
        let rows = vec![
            hold("env/1", 4_000, vec![draw("SOURCE_ENVIRONMENT_ALLOCATION", 4_000)]),
            hold(
                "env/12",
                12_500,
                vec![draw("SOURCE_ENVIRONMENT_ALLOCATION", 2_500), draw("SOURCE_TENANT_POOL", 10_000)],
            ),
        ];
        let output = Output::Rows { template: hold("", 0, vec![]), rows };
        assert_eq!(
            output.render(Format::Table),
            "reservation_id  reserved  draws                                            expires_at\n\
             env/1              4.000  environment_allocation:4.000                     2026-11-15T12:01:00.000Z\n\
             env/12            12.500  environment_allocation:2.500 tenant_pool:10.000  2026-11-15T12:01:00.000Z\n"
        );
        let json: Json = serde_json::from_str(&output.render(Format::Json)).unwrap();
        assert_eq!(json[1]["draws"][1], serde_json::json!({"source": "SOURCE_TENANT_POOL", "amount_milli": 10000}));
        assert_eq!(json[1]["expires_at_unix_ms"], 1_794_744_060_000_u64);
    }

    #[test]
    fn an_empty_list_still_prints_its_header() {
        let output = Output::Rows { template: hold("", 0, vec![]), rows: vec![] };
        assert_eq!(output.render(Format::Table), "reservation_id  reserved  draws  expires_at\n");
        assert_eq!(output.render(Format::Csv), "reservation_id,reserved,draws,expires_at\n");
        assert_eq!(output.render(Format::Json), "[]\n");
    }

    #[test]
    fn csv_quotes_commas_quotes_and_line_breaks() {
        let fields = ["plain", "a,b", "say \"hi\"", "two\nlines", ""].map(String::from);
        assert_eq!(csv_line(&fields), "plain,\"a,b\",\"say \"\"hi\"\"\",\"two\nlines\",\n");
    }

    #[test]
    fn nested_records_flatten_in_tables_and_nest_in_json() {
        let balance = Record::new().with("available_milli", Value::Milli(1_000));
        let record = Record::new()
            .with("released_count", Value::Number(2))
            .with("balance", Value::Record(balance))
            .with_json_only("detail", Value::Text("json only".into()));
        let output = Output::Record(record);
        assert_eq!(output.render(Format::Csv), "released_count,balance.available\n2,1.000\n");
        let json: Json = serde_json::from_str(&output.render(Format::Json)).unwrap();
        assert_eq!(json["balance"]["available_milli"], 1_000);
        assert_eq!(json["detail"], "json only");
    }

    #[test]
    fn a_stream_prints_one_line_per_row() {
        let template = Record::new().with("kind", Value::Text(String::new())).with("used_milli", Value::Milli(0));
        let row = Record::new().with("kind", Value::Text("environment_low".into())).with("used_milli", Value::Milli(5));
        let table = RowStream::new(Format::Table, &template);
        assert_eq!(table.header(&template).as_deref(), Some("kind  used\n"));
        assert_eq!(table.row(&row), "environment_low  0.005\n");
        let csv = RowStream::new(Format::Csv, &template);
        assert_eq!(csv.header(&template).as_deref(), Some("kind,used\n"));
        assert_eq!(csv.row(&row), "environment_low,0.005\n");
        let json = RowStream::new(Format::Json, &template);
        assert_eq!(json.header(&template), None);
        assert_eq!(json.row(&row), "{\"kind\":\"environment_low\",\"used_milli\":5}\n");
    }
}
