//! The CLI's tables: `espada_benches::table` (one look for `show`, `top`, `demo` and `run`).
pub use espada_benches::table::*;
