//! Human tables: every table and key/value block `cloudctl` prints goes through
//! [`print`], which aligns the columns with elastic tabstops (`tabwriter`), so a value
//! longer than any before it widens its column instead of pushing the rest of its row out
//! of line. It only formats for people: `--json` output never comes here.

use std::io::Write as _;

/// Spaces between columns at least.
const PADDING: usize = 2;

/// Prints `rows` to stdout with their columns aligned. The last cell of a row is not
/// padded, so it may be as long as it likes.
pub fn print<R, C>(rows: impl IntoIterator<Item = R>)
where
    R: IntoIterator<Item = C>,
    C: AsRef<str>,
{
    let mut writer = tabwriter::TabWriter::new(std::io::stdout().lock())
        .minwidth(0)
        .padding(PADDING);
    for row in rows {
        let line = row
            .into_iter()
            .map(|cell| cell_text(cell.as_ref()))
            .collect::<Vec<_>>()
            .join("\t");
        // A closed stdout (`cloudctl ... | head`) is not worth a panic or an error.
        let _ = writeln!(writer, "{line}");
    }
    let _ = writer.flush();
}

/// A cell on one line: a tab would start a new column and a newline a new row, so both
/// become spaces.
fn cell_text(text: &str) -> String {
    text.replace(['\t', '\n', '\r'], " ")
}
