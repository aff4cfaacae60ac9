//! Flash attention over compressed K/V rows.
