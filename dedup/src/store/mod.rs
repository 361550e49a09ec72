//! The chunk store (to come).
