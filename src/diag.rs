//! Dumps the TCP sockets of one network namespace through sock_diag (placeholder, being written).
