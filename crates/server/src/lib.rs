//! Server lib.
