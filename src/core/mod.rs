//! The pure core: plain data in, plain data out.
