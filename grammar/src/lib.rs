//! The `.bm` language front end: the pest grammar (`bm.pest`), the AST with source
//! spans ([`ast`]), the parser ([`parser`]) and diagnostics shared by every stage
//! that reports errors about source ([`diagnostic`]).

pub mod ast;
pub mod diagnostic;
pub mod parser;

pub use diagnostic::{Diagnostic, SourceFile};
pub use parser::parse;
