//! Anti-join: which records of A have no match in B.
//!
//! `files` answers it over files with memory independent of the left input's size;
//! `stream` answers it continuously over topics.

pub mod columnar;
pub mod error;
pub mod files;
pub mod input;
pub mod right;
pub mod stream;

pub use error::{AntijoinError, Result};
