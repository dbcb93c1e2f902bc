//! Host-side harness for tern guest suites.
