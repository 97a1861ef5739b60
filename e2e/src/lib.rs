//! End-to-end harness: starts the real registry, containerd and Brisk for system tests.
