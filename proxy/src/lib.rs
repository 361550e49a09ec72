//! ditto networking (to come).
