//! How a command's result is printed: `-w json` (pretty JSON) or `-w table`
//! (aligned columns, see [`crate::table`]), keys as [`crate::keys`] renders
//! them.

use serde::Serialize;

use crate::cli::Format;
use crate::error::{CtlError, Result};

#[derive(Debug, Clone, Copy)]
pub struct Output {
    pub format: Format,
    /// Every key in hex.
    pub hex: bool,
}

impl Output {
    pub fn new(format: Format, hex: bool) -> Self {
        Output { format, hex }
    }

    pub fn key(&self, key: &[u8]) -> String {
        crate::keys::render(key, self.hex)
    }

    /// A key in a table cell, where the empty key (a region's open end)
    /// would otherwise be an invisible empty cell.
    pub fn key_cell(&self, key: &[u8]) -> String {
        if key.is_empty() {
            "\"\"".to_owned()
        } else {
            self.key(key)
        }
    }

    pub fn is_json(&self) -> bool {
        self.format == Format::Json
    }
}

/// `value` as pretty JSON with a final newline.
pub fn json<T: Serialize>(value: &T) -> Result<String> {
    serde_json::to_string_pretty(value)
        .map(|s| s + "\n")
        .map_err(|e| CtlError::Failed(format!("cannot encode JSON: {e}")))
}
