//! Runtime errors. `User` errors (bad data, bad checkpoint, bad flag, an embedding id out
//! of range) exit with code 1; `Internal` errors are bugs and exit with code 3.

use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    User(String),
    Internal(String),
}

impl Error {
    pub fn user(msg: impl Into<String>) -> Self {
        Error::User(msg.into())
    }
    pub fn internal(msg: impl Into<String>) -> Self {
        Error::Internal(msg.into())
    }
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::User(_) => 1,
            Error::Internal(_) => 3,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::User(m) => write!(f, "error: {m}"),
            Error::Internal(m) => {
                write!(f, "internal error: {m}\nThis is a bug in bmc; please report it with the command and the .bm file that caused it.")
            }
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;
