//! Start-up read traces: the recorder fed by the FUSE layer (`recorder`), the trace format
//! (`trace`), and merging traces of several starts.
//!
//! It knows chunks by identity (`brisk_blobcache::Digest`) and layers by blob digest, never
//! file contents, environment or arguments.

mod error;
pub mod plan;
pub mod recorder;
pub mod share;
pub mod trace;

pub use error::{Error, Result};
pub use recorder::{ReadRecord, Reader, Recorder, Session};
pub use trace::{Trace, TraceEntry, MEDIA_TYPE, TRACE_VERSION};
