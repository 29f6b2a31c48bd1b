//! Whole jobs against in-memory ports.
