//! Intentionally empty: the end-to-end tests and their support code live under `tests/e2e/`.
