//! The real local test bed.
