//! Finds every network namespace on the node (placeholder, being written).
