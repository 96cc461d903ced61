//! The pure core: plain data in, plain data out. Nothing here touches a socket.
pub mod duration;
pub mod inventory;
pub mod last_used;
pub mod manifest;
pub mod plan;
pub mod platform;
pub mod policy;
pub mod prune;
pub mod reference;
pub mod resolve;
pub mod schedule;
