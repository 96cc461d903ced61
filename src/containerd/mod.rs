//! The containerd shell.
