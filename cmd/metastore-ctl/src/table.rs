//! Plain-text tables with aligned columns, for `-w table`.

/// A header row and data rows; every column is as wide as its widest cell,
/// columns are two spaces apart, and lines carry no trailing spaces.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Table {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are empty, extra cells are dropped.
    pub fn push(&mut self, mut row: Vec<String>) {
        row.resize(self.header.len(), String::new());
        self.rows.push(row);
    }

    pub fn render(&self) -> String {
        let width = |cell: &String| cell.chars().count();
        let mut widths: Vec<usize> = self.header.iter().map(width).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(width(cell));
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(cell);
                line.extend(std::iter::repeat_n(' ', w - width(cell)));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_aligned_without_trailing_spaces() {
        let mut t = Table::new(&["ID", "NAME", "STATE"]);
        t.push(vec!["1".into(), "node-one".into(), "up".into()]);
        t.push(vec!["12".into(), "n2".into()]);
        t.push(vec![
            "3".into(),
            "grüße".into(),
            "offline".into(),
            "x".into(),
        ]);
        assert_eq!(
            t.render(),
            "ID  NAME      STATE\n\
             1   node-one  up\n\
             12  n2\n\
             3   grüße     offline\n"
        );
    }

    #[test]
    fn header_only() {
        assert_eq!(Table::new(&["A", "B"]).render(), "A  B\n");
    }
}
