//! The record path behind capture.
pub mod dispatcher;
