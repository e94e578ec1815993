//! lsmd
