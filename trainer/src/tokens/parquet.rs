//! Parquet data files: each row becomes a record (`text`, `prompt`/`completion` or `messages`,
//! each read from the column `[data.columns]` names, by default the column of its own name),
//! read row group by row group through ranged reads, so memory holds one row group at a time
//! whatever the file's size.

use std::collections::BTreeMap;
use std::io::Read;

use bytes::Bytes;
use lockstep_storage::objects::Object;
use parquet::file::reader::{ChunkReader, FileReader, Length, SerializedFileReader};

use super::RANGE;
use crate::error::{Error, Result};

/// An object read in ranges, for the Parquet reader.
#[derive(Clone)]
struct Ranged {
    object: Object,
    rt: tokio::runtime::Handle,
}

impl Ranged {
    fn read(&self, start: u64, len: u64) -> std::io::Result<Bytes> {
        let end = start.saturating_add(len).min(self.object.size);
        if start > end {
            return Err(std::io::Error::other(format!(
                "a read at {start}, past the end ({})",
                self.object.size
            )));
        }
        let got = self
            .rt
            .block_on(self.object.read_range(start..end))
            .map_err(std::io::Error::other)?;
        if got.len() as u64 != end - start {
            return Err(std::io::Error::other(
                "a short read (the object changed while it was being read?)",
            ));
        }
        Ok(got)
    }
}

impl Length for Ranged {
    fn len(&self) -> u64 {
        self.object.size
    }
}

/// The object from an offset on, read a range at a time.
struct Reader {
    src: Ranged,
    pos: u64,
    buf: Bytes,
}

impl Read for Reader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.buf.is_empty() {
            if self.pos >= self.src.object.size {
                return Ok(0);
            }
            self.buf = self.src.read(self.pos, RANGE)?;
            self.pos += self.buf.len() as u64;
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf.split_to(n));
        Ok(n)
    }
}

impl ChunkReader for Ranged {
    type T = Reader;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Reader> {
        Ok(Reader {
            src: self.clone(),
            pos: start,
            buf: Bytes::new(),
        })
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        self.read(start, length as u64)
            .map_err(|e| parquet::errors::ParquetError::External(Box::new(e)))
    }
}

/// Calls `each` with every row of the Parquet file `object` as a JSONL record (the fields
/// `columns` maps, from their columns).
pub(super) fn rows(
    object: &Object,
    rt: &tokio::runtime::Runtime,
    columns: &BTreeMap<String, String>,
    each: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    let bad = |reason: String| Error::Data {
        file: object.url.clone(),
        line: 0,
        reason,
    };
    let src = Ranged {
        object: object.clone(),
        rt: rt.handle().clone(),
    };
    let reader =
        SerializedFileReader::new(src).map_err(|e| bad(format!("not a Parquet file: {e}")))?;
    let names: Vec<(&str, &str)> = lockstep_api::RECORD_FIELDS
        .iter()
        .map(|f| (*f, columns.get(*f).map_or(*f, String::as_str)))
        .collect();
    let fields = reader
        .metadata()
        .file_metadata()
        .schema_descr()
        .root_schema()
        .get_fields()
        .to_vec();
    let have: Vec<String> = fields.iter().map(|f| f.name().to_string()).collect();
    // Two columns of one name: which one a field reads would be a guess.
    for (field, column) in &names {
        if have.iter().filter(|h| h == column).count() > 1 {
            return Err(bad(format!(
                "it has more than one column named `{column}` (read as `{field}`): rename one"
            )));
        }
    }
    // A text field must come from a string column: bytes would read as base64.
    for (field, column) in &names {
        if *field == "messages" {
            continue;
        }
        let Some(f) = fields.iter().find(|f| f.name() == *column) else {
            continue;
        };
        let info = f.get_basic_info();
        let string = f.is_primitive()
            && (info.converted_type() == parquet::basic::ConvertedType::UTF8
                || matches!(
                    info.logical_type_ref(),
                    Some(parquet::basic::LogicalType::String)
                ));
        if !string {
            return Err(bad(format!(
                "column `{column}` (read as `{field}`) is not a string column"
            )));
        }
    }
    if !names.iter().any(|(_, c)| have.iter().any(|h| h == c)) {
        return Err(bad(format!(
            "none of its columns ({}) is a record field (text, prompt and completion, or \
             messages): map yours with [data.columns], e.g. {{ text = \"{}\" }}",
            have.join(", "),
            have.first().map_or("body", String::as_str)
        )));
    }
    let mut line = Vec::new();
    for group in 0..reader.num_row_groups() {
        let rg = reader
            .get_row_group(group)
            .map_err(|e| bad(format!("row group {group}: {e}")))?;
        let iter = rg
            .get_row_iter(None)
            .map_err(|e| bad(format!("row group {group}: {e}")))?;
        for row in iter {
            let row = row.map_err(|e| bad(format!("row group {group}: {e}")))?;
            let value = row.to_json_value();
            let mut record = serde_json::Map::new();
            for (field, column) in &names {
                if let Some(v) = value.get(*column).filter(|v| !v.is_null()) {
                    record.insert(field.to_string(), v.clone());
                }
            }
            line.clear();
            serde_json::to_writer(&mut line, &record)
                .map_err(|e| Error::Internal(format!("a Parquet row as JSON: {e}")))?;
            // The bound a JSONL line has.
            if line.len() > super::MAX_RECORD_BYTES {
                return Err(bad(format!(
                    "a row of row group {group} holds more than {} MiB: not a record",
                    super::MAX_RECORD_BYTES >> 20
                )));
            }
            each(&line)?;
        }
    }
    Ok(())
}
