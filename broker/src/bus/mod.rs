//! Bus semantics, free of I/O: routing, delivery queues and overflow
//! policy, admission policy. The daemon layer above owns every socket and
//! calls into these; each is unit-tested beside its code.

pub mod policy;
pub mod queue;
pub mod quota;
pub mod router;
