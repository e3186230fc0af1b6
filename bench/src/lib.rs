//! What the benchmark programs share: latency percentiles ([`stats`]) and a description
//! of the machine a run was made on ([`machine`]), so every report states both the same way.

pub mod machine;
pub mod stats;
