//! The tables of the CLI and the reports (`show`, `top`, `demo`, `run` totals): one look
//! everywhere, through comfy-table. Plain columns
//! separated by spaces (no box drawing: the output is read in terminals, logs and diffs alike),
//! numbers on the right, and no width limit unless the terminal sets one.

use comfy_table::{presets, Cell, CellAlignment, ContentArrangement, Table};

/// A table with these headers; columns whose header is in `right` are right-aligned.
pub fn new(headers: &[&str], right: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(headers.iter().map(Cell::new));
    for (i, h) in headers.iter().enumerate() {
        if right.contains(h) {
            if let Some(c) = t.column_mut(i) {
                c.set_cell_alignment(CellAlignment::Right);
            }
        }
    }
    t
}

/// The table's text with the one-space margin comfy-table puts on each side of every line cut
/// to none on the left (the first column starts at the margin, as `ip` and `ss` print).
pub fn render(t: &Table) -> String {
    let mut out = String::new();
    for l in t.lines() {
        let l = l.strip_prefix(' ').unwrap_or(&l).trim_end();
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// A duration in seconds as people read it: `45s`, `12m05s`, `3h20m`, `2d04h`.
pub fn duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

#[cfg(test)]
mod test {
    #[test]
    fn columns_line_up_and_numbers_go_right() {
        let mut t = super::new(&["tunnel", "packets"], &["packets"]);
        t.add_row(vec!["a", "5"]);
        t.add_row(vec!["longer-name", "12345"]);
        let text = super::render(&t);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("tunnel"), "{text}");
        // Right-aligned: every row ends at the same column.
        let ends: Vec<usize> = lines.iter().map(|l| l.len()).collect();
        assert!(ends.iter().all(|&e| e == ends[0]), "{text}");
    }

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(super::duration(45), "45s");
        assert_eq!(super::duration(725), "12m05s");
        assert_eq!(super::duration(12_000), "3h20m");
        assert_eq!(super::duration(187_200), "2d04h");
    }
}
