//! Anti-join: which records of A have no match in B.
//!
//! `files` answers it over files with memory independent of the left input's size.

pub mod error;
pub mod files;
pub mod right;

pub use error::{AntijoinError, Result};
