//! `switchyard-tests`: end-to-end tests that drive the `switchyard` binary (and, with later
//! issues, whole clusters on loopback) the way people do. The tests live in `tests/`.
